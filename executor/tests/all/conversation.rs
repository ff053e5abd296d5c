//! Conversations as code: the fixtures (a shared-link page and an export with two conversations),
//! imported, analysed in the sandbox, and run.

use std::path::PathBuf;

use stepbox::Status;
use stepbox::authoring::conversation::{ImportError, extract, import};

use crate::common::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conversations")
        .join(name)
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

#[tokio::test]
async fn the_shared_validator_runs_on_bulk_edit_csv_as_recorded() {
    let step = import(executor(), &bytes("bulk-edit-validator.share.html"), None)
        .await
        .unwrap();
    let ex = &step.extracted;
    assert_eq!(ex.title, "Bulk Edit CSV Validator");
    assert_eq!(ex.cells.len(), 3);
    assert_eq!(
        ex.inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["bulk_edit.csv"]
    );
    assert_eq!(ex.outputs, ["bulk_edit_errors.csv"]);
    assert!(step.unsupported_imports.is_empty());
    assert_eq!(
        step.expected_stdout.as_deref(),
        Some("8 rows checked, 9 problems\n")
    );
    assert!(step.source.contains("# --- cell 3 ---"));

    let mut job = step.job();
    job.inputs = vec![input("bulk_edit.csv", bytes("bulk_edit.csv"))];
    let (r, verdicts) = executor()
        .run_checked(job, &step.recorded_checks(), Default::default())
        .await
        .unwrap();
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "8 rows checked, 9 problems\n");
    assert!(verdicts.iter().all(|v| v.passed), "{verdicts:?}");
    let errors = r
        .output("bulk_edit_errors.csv")
        .expect("the offered file is written");
    assert_eq!(
        String::from_utf8_lossy(&errors.content).lines().count(),
        10,
        "a header and 9 problems"
    );
}

#[tokio::test]
async fn the_export_is_selected_by_title_or_id_and_abandoned_branches_are_ignored() {
    let export = bytes("conversations.json");
    let by_title = extract(&export, Some("Bulk Edit CSV Validator")).unwrap();
    let by_id = extract(&export, Some("0c6b2f7e-0000-4000-8000-0000000000c1")).unwrap();
    assert_eq!(by_title, by_id);
    assert!(
        by_title
            .cells
            .iter()
            .all(|c| !c.code.contains("'@' not in r['email']")),
        "the regenerated branch is not on the path"
    );
    assert_eq!(
        extract(&export, Some("revenue BY region")).unwrap().title,
        "Revenue by region"
    );
    let e = extract(&export, None).unwrap_err().to_string();
    assert!(
        e.contains("holds 2 conversations") && e.contains("Revenue by region"),
        "{e}"
    );
    let e = extract(&export, Some("nope")).unwrap_err().to_string();
    assert!(
        e.contains("no conversation has the id or title \"nope\""),
        "{e}"
    );
}

#[tokio::test]
async fn unsupported_imports_are_named_with_their_cell() {
    let step = import(
        executor(),
        &bytes("conversations.json"),
        Some("Revenue by region"),
    )
    .await
    .unwrap();
    if executor()
        .runtimes()
        .availability(stepbox::RuntimeKind::PythonData)
        .is_ok()
    {
        // pandas is in the python-data runtime: python_data.rs tests that choice.
        assert_eq!(step.runtime, stepbox::RuntimeKind::PythonData);
        assert!(step.unsupported_imports.is_empty());
        return;
    }
    assert_eq!(step.unsupported_imports.len(), 1);
    assert_eq!(
        (
            step.unsupported_imports[0].module.as_str(),
            step.unsupported_imports[0].cell
        ),
        ("pandas", 1)
    );
    assert!(step.notes[0].contains("cell 1 imports `pandas`"));
    let mut job = step.job();
    job.inputs = vec![input("export.csv", "region,revenue\nWest,1\n")];
    let r = run(job).await;
    assert_status(&r, Status::Failed);
    assert!(err(&r).contains("No module named 'pandas'"));
}

#[tokio::test]
async fn cells_that_failed_in_the_conversation_are_kept_as_comments() {
    let conv = serde_json::json!({
        "title": "Retry", "current_node": "t2",
        "mapping": {
            "c1": {"id": "c1", "parent": null, "children": ["t1"], "message": {"id": "c1", "author": {"role": "assistant"}, "recipient": "python",
                   "content": {"content_type": "code", "text": "print(undefined_name)"}}},
            "t1": {"id": "t1", "parent": "c1", "children": ["c2"], "message": {"id": "t1", "author": {"role": "tool"},
                   "content": {"content_type": "execution_output", "text": "Traceback (most recent call last):\nNameError: name 'undefined_name' is not defined"},
                   "metadata": {"aggregate_result": {"status": "failed_with_in_kernel_exception"}}}},
            "c2": {"id": "c2", "parent": "t1", "children": ["t2"], "message": {"id": "c2", "author": {"role": "assistant"}, "recipient": "python",
                   "content": {"content_type": "code", "text": "print('fixed')"}}},
            "t2": {"id": "t2", "parent": "c2", "children": [], "message": {"id": "t2", "author": {"role": "tool"},
                   "content": {"content_type": "execution_output", "text": "fixed\n"}}}
        }
    });
    let step = import(executor(), &serde_json::to_vec(&conv).unwrap(), None)
        .await
        .unwrap();
    assert!(step.source.contains("# print(undefined_name)"));
    assert!(
        step.notes
            .iter()
            .any(|n| n.contains("cell 1 raised an exception"))
    );
    assert_eq!(step.expected_stdout.as_deref(), Some("fixed\n"));
    let r = run(step.job()).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "fixed\n");
}

#[tokio::test]
async fn malformed_conversations_are_clear_errors() {
    let page_without_conversation = br#"<html><script id="__NEXT_DATA__" type="application/json">{"props": {"pageProps": {}}}</script></html>"#;
    let e = import(executor(), page_without_conversation, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ImportError::Malformed(_)));
    assert!(
        e.to_string()
            .contains("no `props.pageProps.serverResponse.data`"),
        "{e}"
    );
    let e = import(executor(), b"\x00\x01binary", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither an HTML page nor JSON"), "{e}");
}

#[tokio::test]
async fn porting_with_a_model_replaces_pandas_and_is_verified_on_the_inputs() {
    use crate::generate::{Scripted, fake_model};
    let ported = "import csv\nfrom collections import defaultdict\ntotals = defaultdict(float)\nfor r in csv.DictReader(open('/mnt/data/export.csv')):\n    totals[r['region']] += float(r['revenue'])\nwith open('/mnt/data/revenue_by_region.csv', 'w', newline='') as f:\n    w = csv.writer(f)\n    w.writerow(['region', 'revenue'])\n    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):\n        w.writerow([k, round(v, 2)])";
    let model = fake_model(vec![Scripted::Reply(format!("```python\n{ported}\n```"))]).await;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("export.csv"),
        "region,revenue\nWest,10.5\nEast,3\nWest,1\n",
    )
    .unwrap();
    let url = model.base_url.clone();
    let dir = d.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        stepbox_command(&dir)
            .arg("import")
            .arg(fixture("conversations.json"))
            .args([
                "--conversation",
                "Revenue by region",
                "--port",
                "--input",
                "export.csv",
                "-o",
                "ported.py",
            ])
            .env("OPENAI_BASE_URL", &url)
            // Porting is for a server without the python-data runtime (which has pandas).
            .env("STEPBOX_PYTHON_DATA_DIR", "")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("Ported:   Verified in 1 attempts")
            && stdout.contains("Unsupported imports: none"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(d.path().join("ported.py")).unwrap(),
        format!("{ported}\n")
    );
    let prompt = model.requests()[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        prompt.contains("does not have: pandas") && prompt.contains("Summarise revenue by region"),
        "{prompt}"
    );
}

#[test]
fn cli_import_summarises_and_run_from_conversation_runs() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("bulk_edit.csv"), d.path().join("bulk_edit.csv")).unwrap();
    let stepbox = |args: &[&str]| stepbox_command(d.path()).args(args).output().unwrap();
    let page = fixture("bulk-edit-validator.share.html");
    let page = page.to_str().unwrap();
    let o = stepbox(&["import", page, "-o", "step.py"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        s.contains("Title:    Bulk Edit CSV Validator")
            && s.contains("Outputs:  bulk_edit_errors.csv")
            && s.contains("Unsupported imports: none"),
        "{s}"
    );
    assert!(
        std::fs::read_to_string(d.path().join("step.py"))
            .unwrap()
            .contains("bulk_edit_errors.csv")
    );

    let o = stepbox(&[
        "run",
        "--from-conversation",
        page,
        "--input",
        "bulk_edit.csv",
        "--output-dir",
        "out",
        "--verify-recorded",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout, b"8 rows checked, 9 problems\n");
    assert!(d.path().join("out/bulk_edit_errors.csv").is_file());

    let o = stepbox(&[
        "import",
        fixture("conversations.json").to_str().unwrap(),
        "--json",
        "--conversation",
        "Revenue by region",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    if v["runtime"] == "python-data" {
        assert_eq!(v["unsupported_imports"], serde_json::json!([]));
    } else {
        assert_eq!(v["unsupported_imports"][0]["module"], "pandas");
    }

    let o = stepbox(&["import", "bulk_edit.csv"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither an HTML page nor JSON"));
}
