//! The product's own story, end to end through the `stepbox` binary: a Tableau crosstab export
//! (UTF-16, tab-separated, US dates) -> a transform step -> the bulk-edit validator -> a report
//! step, each published with its evidence and promoted to prod; the workflow published, verified
//! by its case and promoted; then run now by reference, and by a schedule that a real
//! `stepbox serve` fires within the test from an inbox into an outbox.

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common;

const STEPS: [(&str, &str); 3] = [
    (
        "tableau-bulk-edit/transform.step.toml",
        "tableau-to-bulk-edit",
    ),
    ("bulk-edit-validator/step.toml", "bulk-edit-validator"),
    ("tableau-bulk-edit/report.step.toml", "bulk-edit-report"),
];

fn example(p: &str) -> std::path::PathBuf {
    common::root().join("examples").join(p)
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_file(dir: &Path, prefix: &str, within: Duration) -> std::path::PathBuf {
    let deadline = Instant::now() + within;
    loop {
        if let Some(f) = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
        {
            return f.path();
        }
        assert!(
            Instant::now() < deadline,
            "nothing named {prefix}* in {} within {within:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_tableau_export_is_checked_as_a_bulk_edit_now_and_on_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["in", "out/outbox"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let config = d.join("stepbox.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\naddr = \"127.0.0.1:0\"\n[catalog]\ndatabase = {:?}\n\
             [workflows]\ninput_roots = [{:?}]\noutput_roots = [{:?}]\nartifacts = {:?}\n",
            stepbox_store::Store::sqlite_url(&d.join("catalog.db")),
            d.join("in").display().to_string(),
            d.join("out").display().to_string(),
            d.join("artifacts").display().to_string(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| -> (i32, String, String) {
        let out = common::stepbox_command(d)
            .env_remove("STEPBOX_CATALOG_DATABASE")
            .env("STEPBOX_CONFIG", &config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Each step is published with the evidence of its cases, then promoted to prod.
    for (file, name) in STEPS {
        let path = example(file);
        let (code, out, err) = run(&["step", "publish", path.to_str().unwrap()]);
        assert_eq!(code, 0, "publishing {file}: {out}{err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{name}@v1 sha256:")) && l.contains("verified")),
            "{out}"
        );
        let (code, out, err) = run(&["step", "promote", &format!("{name}@v1"), "--to", "prod"]);
        assert_eq!(code, 0, "promoting {name}: {out}{err}");
    }

    // The workflow is checked, published (its case runs the three steps on the sample export
    // and compares both outputs), and promoted.
    let wf = example("tableau-bulk-edit/workflow.toml");
    let wf = wf.to_str().unwrap();
    let (code, out, err) = run(&["workflow", "check", wf]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["workflow", "publish", wf]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("tableau-bulk-edit-check@v1 sha256:") && l.contains("verified")),
        "{out}"
    );
    let (code, out, err) = run(&[
        "workflow",
        "promote",
        "tableau-bulk-edit-check@v1",
        "--to",
        "prod",
    ]);
    assert_eq!(code, 0, "{out}{err}");

    // Run now, by reference.
    let export = example("tableau-bulk-edit/accounts_crosstab.csv");
    let (code, out, err) = run(&[
        "workflow",
        "run",
        "tableau-bulk-edit-check@prod",
        "--input",
        &format!("export={}", export.display()),
        "--output-dir",
        "now",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let record: stepbox::workflow::WorkflowRunRecord = serde_json::from_str(&out).unwrap();
    assert_eq!(record.status, "succeeded");
    assert!(record.verify());
    let ids: Vec<(&str, &str)> = record
        .steps
        .iter()
        .map(|s| (s.id.as_str(), s.version.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("transform", "tableau-to-bulk-edit@v1"),
            ("validate", "bulk-edit-validator@v1"),
            ("report", "bulk-edit-report@v1"),
        ]
    );
    // The validator's contract checks ran on this input and passed, by name.
    let validate = &record.steps[1];
    for name in ["report written", "report header", "summary line"] {
        assert!(
            validate.checks.iter().any(|(n, ok, _)| n == name && *ok),
            "{:?}",
            validate.checks
        );
    }
    let expected_errors =
        std::fs::read(example("bulk-edit-validator/expected/bulk_edit_errors.csv")).unwrap();
    let expected_report = std::fs::read(example("tableau-bulk-edit/expected/report.md")).unwrap();
    assert_eq!(
        std::fs::read(d.join("now/errors.csv")).unwrap(),
        expected_errors
    );
    let report = std::fs::read_to_string(d.join("now/report.md")).unwrap();
    assert_eq!(report.as_bytes(), expected_report);
    assert!(
        report.contains("9 problems on 7 lines")
            && report.contains("| email        | \"  hans@example.de \" |"),
        "{report}"
    );

    // By a schedule: the newest export in the inbox, every second, delivered to the outbox.
    std::fs::copy(&export, d.join("in/accounts_crosstab-2026-11.csv")).unwrap();
    let (code, out, err) = run(&[
        "schedule",
        "create",
        "--workflow",
        "tableau-bulk-edit-check@prod",
        "--cron",
        "* * * * * *",
        "--timezone",
        "Europe/Berlin",
        "--inbox",
        d.join("in").to_str().unwrap(),
        "--file",
        "export=accounts_crosstab-*.csv",
        "--outbox",
        d.join("out/outbox").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let schedule = out.trim().to_string();

    let mut child = common::stepbox_command(d)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("STEPBOX_CATALOG_DATABASE")
        .env_remove("STEPBOX_TEST_POSTGRES_URL")
        .env_remove("STEPBOX_TEST_POSTGRES_DIR")
        .env("STEPBOX_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let server = Server(child);
    assert!(line.starts_with("listening on "), "{line:?}");
    let delivered = wait_for_file(&d.join("out/outbox"), "report-", Duration::from_secs(30));
    assert_eq!(std::fs::read(&delivered).unwrap(), expected_report);
    drop(server);

    let (code, out, err) = run(&["schedule", "firings", &schedule]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");
}
