//! Realistic data steps give the same bytes (stdout and output files) in the sandbox as under the
//! machine's native `python3`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use stepbox::Status;

use crate::common::*;

fn steps_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/steps")
}

/// Runs `step` natively: `python3 step /input-copy /output-copy`; returns stdout and output files.
fn native(step: &str, inputs: &[&str]) -> (String, BTreeMap<String, Vec<u8>>) {
    let tmp = tempfile::tempdir().unwrap();
    let (i, o) = (tmp.path().join("input"), tmp.path().join("output"));
    std::fs::create_dir_all(&i).unwrap();
    std::fs::create_dir_all(&o).unwrap();
    for name in inputs {
        std::fs::copy(steps_dir().join("data").join(name), i.join(name)).unwrap();
    }
    let output = Command::new("python3")
        .arg(steps_dir().join(step))
        .arg(&i)
        .arg(&o)
        .env("TZ", "UTC")
        .env("LANG", "C.UTF-8")
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "native {step}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    (String::from_utf8(output.stdout).unwrap(), files)
}

async fn sandboxed(step: &str, inputs: &[&str]) -> (String, BTreeMap<String, Vec<u8>>) {
    let mut job = py(&std::fs::read_to_string(steps_dir().join(step)).unwrap());
    job.filename = Path::new(step)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    job.args = vec!["/input".into(), "/output".into()];
    job.inputs = inputs
        .iter()
        .map(|n| input(n, std::fs::read(steps_dir().join("data").join(n)).unwrap()))
        .collect();
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    (
        out(&r),
        r.outputs
            .iter()
            .map(|o| (o.path.clone(), o.content.to_vec()))
            .collect(),
    )
}

async fn same_as_native(step: &str, inputs: &[&str]) -> String {
    let (want_out, want_files) = native(step, inputs);
    let (got_out, got_files) = sandboxed(step, inputs).await;
    assert_eq!(
        got_out, want_out,
        "{step}: stdout differs from native python3"
    );
    assert_eq!(
        got_files.keys().collect::<Vec<_>>(),
        want_files.keys().collect::<Vec<_>>(),
        "{step}: output files differ"
    );
    for (name, bytes) in &want_files {
        assert!(
            got_files[name] == *bytes,
            "{step}: output `{name}` differs from native python3"
        );
    }
    got_out
}

#[tokio::test]
async fn csv_validation_matches_native() {
    // The quick-start example (examples/validate_bulk_edit.py) is this step.
    let out = same_as_native(
        "../../../examples/validate_bulk_edit.py",
        &["bulk_edit.csv"],
    )
    .await;
    assert!(out.starts_with("8 rows checked, 9 problems\n"), "{out}");
}

#[tokio::test]
async fn json_flattening_matches_native() {
    let out = same_as_native("json_flatten.py", &["orders.json"]).await;
    assert!(out.contains("\"records\": 3"), "{out}");
}

#[tokio::test]
async fn date_parsing_matches_native() {
    let out = same_as_native("dates.py", &["dates.txt"]).await;
    assert!(
        out.contains("'29/02/2024': 2024-02-29T00:00:00 Thursday W09/2024 (+1d)"),
        "{out}"
    );
    assert!(out.contains("'2024-13-01': unparseable"), "{out}");
}

#[tokio::test]
async fn hashing_matches_native() {
    same_as_native("hashing.py", &["bulk_edit.csv", "orders.json", "dates.txt"]).await;
}

#[tokio::test]
async fn zip_packing_matches_native() {
    same_as_native(
        "zip_pack.py",
        &["bulk_edit.csv", "orders.json", "dates.txt"],
    )
    .await;
}
