//! Workflows through the library: a catalog step and a program step chained on a real SQLite
//! catalog and real sandboxed runs; failures stop successors, independent branches finish, a
//! resumed run reuses what succeeded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use stepbox::catalog::{Blob, Case, Catalog, CheckSpec, Origin, StepDefinition, StepRef};
use stepbox::workflow::artifacts::Artifacts;
use stepbox::workflow::model::WorkflowFile;
use stepbox::workflow::{StepState, WorkflowError, WorkflowEvent, Workflows};

use crate::common;

const PIVOT: &str = r#"
import csv, collections
totals = collections.Counter()
with open("/input/sales.csv", newline="") as f:
    for row in csv.DictReader(f):
        totals[(row["month"], row["rep"])] += int(row["amount"])
with open("/output/monthly_by_rep.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["month", "rep", "amount"])
    for (m, r), a in sorted(totals.items()):
        w.writerow([m, r, a])
print(len(totals), "groups")
"#;

const SALES: &str = "month,rep,amount\n2026-01,ana,10\n2026-01,ana,5\n2026-01,bo,7\n2026-02,bo,1\n";
const PIVOTED: &str = "month,rep,amount\r\n2026-01,ana,15\r\n2026-01,bo,7\r\n2026-02,bo,1\r\n";

const SUMMARY: &str = r##"
import csv
rows = list(csv.DictReader(open("/input/monthly_by_rep.csv")))
total = sum(int(r["amount"]) for r in rows)
open("/output/report.md", "w").write(f"# Monthly report\n\n{len(rows)} rows, total {total}\n")
"##;

async fn catalog(dir: &Path) -> Arc<Catalog> {
    let store =
        stepbox_store::Store::open(&stepbox_store::Store::sqlite_url(&dir.join("catalog.db")))
            .await
            .unwrap();
    let executor = Arc::new(common::new_executor(&dir.join("work")));
    let catalog = Catalog::new(store, executor, stepbox::catalog::default_stages(), None)
        .await
        .unwrap();
    let def = StepDefinition {
        name: "monthly-by-rep".into(),
        description: "Totals sales by month and rep".into(),
        runtime: "python".into(),
        program: Blob::Text(PIVOT.into()),
        filename: None,
        layout: "input-output".into(),
        policy: "default".into(),
        env: BTreeMap::new(),
        cases: vec![Case {
            name: "sample".into(),
            inputs: BTreeMap::from([("sales.csv".into(), Blob::Text(SALES.into()))]),
            checks: vec![CheckSpec {
                kind: "file_csv_equals".into(),
                path: Some("monthly_by_rep.csv".into()),
                expected: Some(Blob::Text(PIVOTED.into())),
                ..CheckSpec::default()
            }],
            ..Case::default()
        }],
        contract: vec![CheckSpec {
            kind: "file_exists".into(),
            path: Some("monthly_by_rep.csv".into()),
            ..CheckSpec::default()
        }],
        origin: Origin::Api,
    };
    let published = catalog.publish(&def, "test", false).await.unwrap();
    assert!(published.version.is_some(), "{:?}", published.cases);
    let r = StepRef::parse("ref", "monthly-by-rep@v1").unwrap();
    let promoted = catalog.promote(&r, "prod", "test").await.unwrap();
    assert!(promoted.promoted, "{}", promoted.reason);
    Arc::new(catalog)
}

fn workflow(summary: &str, extra: &str) -> WorkflowFile {
    let text = format!(
        r#"
name = "monthly-report"
[inputs]
sales = "sales.csv"
[[steps]]
id = "pivot"
uses = "monthly-by-rep@prod"
inputs = {{ "sales.csv" = "inputs.sales" }}
[[steps]]
id = "summary"
program = "summary.py"
source = {summary:?}
inputs = {{ "monthly_by_rep.csv" = "steps.pivot.outputs.monthly_by_rep.csv" }}
{extra}
[outputs]
report = "steps.summary.outputs.report.md"
"#
    );
    toml::from_str(&text).unwrap()
}

fn inputs() -> BTreeMap<String, bytes::Bytes> {
    BTreeMap::from([("sales".into(), bytes::Bytes::from_static(SALES.as_bytes()))])
}

#[tokio::test]
async fn a_catalog_step_feeds_a_program_step_and_a_failure_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog(dir.path()).await;
    let artifacts = Arc::new(Artifacts::open(&dir.path().join("artifacts")).unwrap());
    let wf = Workflows::new(catalog, artifacts, 2);

    // The minimal form runs: the report is the summary of the pivot of the input.
    let plan = workflow(SUMMARY, "").plan().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = wf.run(&plan, inputs(), None, Some(tx)).await.unwrap();
    assert_eq!(run.status, "succeeded", "{run:#?}");
    assert!(run.verify());
    // Its times are sealed with it; a record written before times were kept still verifies.
    let started = chrono::DateTime::parse_from_rfc3339(&run.started_at).unwrap();
    let finished = chrono::DateTime::parse_from_rfc3339(&run.finished_at).unwrap();
    assert!(
        started <= finished && run.started_at.ends_with('Z'),
        "{run:?}"
    );
    let mut retimed = run.clone();
    retimed.finished_at = "2000-01-01T00:00:00.000Z".into();
    assert!(!retimed.verify());
    let mut untimed = run.clone();
    untimed.started_at.clear();
    untimed.finished_at.clear();
    let untimed = untimed.with_origin(stepbox::workflow::Trigger::Manual, "");
    let json = serde_json::to_string(&untimed).unwrap();
    assert!(!json.contains("started_at"), "{json}");
    let old: stepbox::workflow::WorkflowRunRecord = serde_json::from_str(&json).unwrap();
    assert!(old.verify());
    let report = wf.output(&run, "report").unwrap();
    assert_eq!(&report[..], b"# Monthly report\n\n3 rows, total 23\n");
    assert_eq!(run.steps[0].version, "monthly-by-rep@v1");
    assert_eq!(run.steps[0].version_digest.len(), 64);
    assert!(!run.steps[0].checks.is_empty());
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert!(matches!(&events[0], WorkflowEvent::Queued(s) if s == "pivot"));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, WorkflowEvent::Finished(r) if r.id == "summary" && r.state == StepState::Succeeded))
    );

    // A failing second step: the pivot's result stands, the summary fails, and an independent
    // branch still finishes.
    let branch = r#"
[[steps]]
id = "count"
program = "count.py"
source = "print(len(open('/input/s.csv').read().splitlines()))"
inputs = { "s.csv" = "inputs.sales" }
"#;
    let failing = workflow("raise SystemExit(3)", branch).plan().unwrap();
    let failed = wf.run(&failing, inputs(), None, None).await.unwrap();
    assert_eq!(failed.status, "failed");
    let state = |r: &stepbox::workflow::WorkflowRunRecord, id: &str| {
        r.steps.iter().find(|s| s.id == id).unwrap().clone()
    };
    assert_eq!(state(&failed, "pivot").state, StepState::Succeeded);
    assert_eq!(state(&failed, "summary").state, StepState::Failed);
    assert_eq!(state(&failed, "summary").status, "FAILED");
    assert_eq!(state(&failed, "count").state, StepState::Succeeded);
    assert!(failed.outputs.is_empty());

    // Resuming with the summary fixed reuses the pivot and the branch (same run ids: they did
    // not run again) and runs only the summary.
    let fixed = workflow(SUMMARY, branch).plan().unwrap();
    let resumed = wf.run(&fixed, inputs(), Some(&failed), None).await.unwrap();
    assert_eq!(resumed.status, "succeeded", "{resumed:#?}");
    assert_eq!(resumed.resumed_from, failed.run_id);
    for id in ["pivot", "count"] {
        assert_eq!(state(&resumed, id).state, StepState::Reused);
        assert_eq!(state(&resumed, id).run_id, state(&failed, id).run_id);
    }
    assert_eq!(state(&resumed, "summary").state, StepState::Succeeded);
    assert_ne!(
        state(&resumed, "summary").run_id,
        state(&failed, "summary").run_id
    );

    // Different input: nothing is reused.
    let other = BTreeMap::from([(
        "sales".into(),
        bytes::Bytes::from_static(b"month,rep,amount\n2026-03,cy,2\n"),
    )]);
    let again = wf.run(&fixed, other, Some(&failed), None).await.unwrap();
    assert_eq!(state(&again, "pivot").state, StepState::Succeeded);
    assert_ne!(
        state(&again, "pivot").run_id,
        state(&failed, "pivot").run_id
    );
}

#[tokio::test]
async fn wires_are_checked_against_versions_and_files_written() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog(dir.path()).await;
    let artifacts = Arc::new(Artifacts::open(&dir.path().join("artifacts")).unwrap());
    let wf = Workflows::new(catalog, artifacts, 2);

    // A wire to a file the catalog version does not write is refused before anything runs.
    let mut bad = workflow(SUMMARY, "");
    bad.steps[1].inputs.insert(
        "monthly_by_rep.csv".into(),
        "steps.pivot.outputs.totals.csv".into(),
    );
    let e = wf
        .run(&bad.plan().unwrap(), inputs(), None, None)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, WorkflowError::Invalid { .. }), "{msg}");
    assert!(
        msg.contains("steps.summary.inputs.monthly_by_rep.csv")
            && msg.contains("does not write `totals.csv`")
            && msg.contains("monthly_by_rep.csv"),
        "{msg}"
    );

    // An unknown catalog reference and a missing workflow input are refused by name.
    let mut unknown = workflow(SUMMARY, "");
    unknown.steps[0].uses = Some("no-such-step@prod".into());
    let e = wf
        .run(&unknown.plan().unwrap(), inputs(), None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("step `pivot`"), "{e}");
    let e = wf
        .run(
            &workflow(SUMMARY, "").plan().unwrap(),
            BTreeMap::new(),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("inputs.sales"), "{e}");

    // A program step that does not write the file its successor reads: the successor is
    // skipped with a message naming both.
    let text = r#"
name = "gap"
[inputs]
sales = "sales.csv"
[[steps]]
id = "first"
program = "first.py"
source = "open('/output/other.txt', 'w').write('x')"
inputs = { "s.csv" = "inputs.sales" }
[[steps]]
id = "second"
program = "second.py"
source = "print(open('/input/r.txt').read())"
inputs = { "r.txt" = "steps.first.outputs.result.txt" }
"#;
    let plan = toml::from_str::<WorkflowFile>(text)
        .unwrap()
        .plan()
        .unwrap();
    let run = wf.run(&plan, inputs(), None, None).await.unwrap();
    assert_eq!(run.status, "failed");
    let second = run.steps.iter().find(|s| s.id == "second").unwrap();
    assert_eq!(second.state, StepState::Skipped);
    assert!(
        second
            .message
            .contains("`first` did not write `result.txt`"),
        "{}",
        second.message
    );
}

#[tokio::test]
async fn the_cli_runs_checks_and_resumes_a_workflow_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The catalog step is published through the library into the file the CLI then opens.
    drop(catalog(d).await);
    let url = stepbox_store::Store::sqlite_url(&d.join("catalog.db"));
    std::fs::write(d.join("sales.csv"), SALES).unwrap();
    std::fs::write(d.join("summary.py"), "raise SystemExit(3)\n").unwrap();
    std::fs::write(
        d.join("workflow.toml"),
        r#"
name = "monthly-report"
[inputs]
sales = "sales.csv"
[[steps]]
id = "pivot"
uses = "monthly-by-rep@prod"
inputs = { "sales.csv" = "inputs.sales" }
[[steps]]
id = "summary"
program = "summary.py"
inputs = { "monthly_by_rep.csv" = "steps.pivot.outputs.monthly_by_rep.csv" }
[outputs]
report = "steps.summary.outputs.report.md"
"#,
    )
    .unwrap();
    let stepbox = |args: &[&str]| {
        common::outcome(
            common::stepbox_command(d)
                .env("XDG_DATA_HOME", d.join("data"))
                .env("STEPBOX_CATALOG_DATABASE", &url)
                .env_remove("STEPBOX_CONFIG")
                .args(args),
        )
    };
    let (code, out, err) = stepbox(&["workflow", "check", "workflow.toml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("workflow `monthly-report` OK: 2 steps"),
        "{out}"
    );

    // The summary fails: exit 1, plain progress lines (stderr is not a terminal), and a hint
    // to resume with the run id.
    let (code, out, err) = stepbox(&[
        "workflow",
        "run",
        "workflow.toml",
        "--input",
        "sales=sales.csv",
        "--output-dir",
        "out",
        "--json",
    ]);
    assert_eq!(code, Some(1), "{err}");
    let failed: stepbox::workflow::WorkflowRunRecord = serde_json::from_str(&out).unwrap();
    assert_eq!(failed.status, "failed");
    assert!(err.contains("pivot: succeeded"), "{err}");
    assert!(err.contains("summary: FAILED"), "{err}");
    assert!(!d.join("out/report.md").exists());

    // Fixed and resumed: the pivot is reused, the report is written.
    std::fs::write(d.join("summary.py"), SUMMARY).unwrap();
    let (code, _, err) = stepbox(&[
        "workflow",
        "run",
        "workflow.toml",
        "--input",
        "sales=sales.csv",
        "--output-dir",
        "out",
        "--resume",
        &failed.run_id,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("pivot: reused from the resumed run"), "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("out/report.md")).unwrap(),
        "# Monthly report\n\n3 rows, total 23\n"
    );

    // Published with a case, promoted, and run by reference.
    std::fs::write(
        d.join("expected.md"),
        "# Monthly report\n\n3 rows, total 23\n",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(d.join("workflow.toml")).unwrap();
    text.push_str(
        "[[cases]]\nname = \"sample\"\ninputs = { sales = \"sales.csv\" }\nexpected_outputs = { report = \"expected.md\" }\n",
    );
    std::fs::write(d.join("workflow.toml"), text).unwrap();
    let (code, out, err) = stepbox(&["workflow", "publish", "workflow.toml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("monthly-report@v1 sha256:") && out.contains("verified"),
        "{out}"
    );
    let (code, _, err) = stepbox(&["workflow", "promote", "monthly-report@v1", "--to", "prod"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = stepbox(&[
        "workflow",
        "run",
        "monthly-report@prod",
        "--input",
        "sales=sales.csv",
        "--output-dir",
        "out2",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("out2/report.md")).unwrap(),
        "# Monthly report\n\n3 rows, total 23\n"
    );
    let (code, out, _) = stepbox(&["workflow", "show", "monthly-report"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("prod") && out.contains("v1"), "{out}");

    // Bad requests exit 2 naming what is wrong.
    let (code, _, err) = stepbox(&[
        "workflow",
        "run",
        "workflow.toml",
        "--input",
        "sale=sales.csv",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("inputs.sale"), "{err}");
    let (code, _, err) = stepbox(&[
        "workflow",
        "run",
        "workflow.toml",
        "--input",
        "sales=sales.csv",
        "--resume",
        "nope",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no workflow run `nope`"), "{err}");
    std::fs::write(d.join("bad.toml"), "name = \"x\"\n[[steps]]\nid = \"a\"\nprogram = \"summary.py\"\ninputs = { \"f\" = \"inputs.missing\" }\n").unwrap();
    let (code, _, err) = stepbox(&["workflow", "check", "bad.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("steps.a.inputs.f") && err.contains("bad.toml"),
        "{err}"
    );

    // The configuration's `[workflows]` holds for `workflow run` as for `serve`: its artifact
    // store, and its `artifact_limit` (here below the input's size: refused naming the key).
    let config = d.join("stepbox.toml");
    let store = d.join("configured-artifacts");
    let configure = |workflows: &str| {
        let text = format!(
            "[catalog]\ndatabase = {url:?}\n[workflows]\nartifacts = {:?}\n{workflows}\n",
            store.display().to_string()
        );
        std::fs::write(&config, text).unwrap();
    };
    configure("artifact_limit = 4096");
    let with_config = |args: &[&str]| {
        common::outcome(
            common::stepbox_command(d)
                .env_remove("STEPBOX_CATALOG_DATABASE")
                .env("STEPBOX_CONFIG", &config)
                .args(args),
        )
    };
    let args = [
        "workflow",
        "run",
        "monthly-report@prod",
        "--input",
        "sales=sales.csv",
        "--output-dir",
        "out3",
    ];
    let (code, _, err) = with_config(&args);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read_dir(&store).unwrap().count() > 0,
        "nothing kept in `[workflows] artifacts`"
    );
    std::fs::write(
        d.join("big.csv"),
        format!("{SALES}{}", "2026-03,cy,1\n".repeat(1000)),
    )
    .unwrap();
    let big = [
        "workflow",
        "run",
        "monthly-report@prod",
        "--input",
        "sales=big.csv",
    ];
    let (code, _, err) = with_config(&big);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("artifact_limit"), "{err}");
    // Without the configuration the default limit (256 MiB) lets it run.
    let (code, _, err) = stepbox(&big);
    assert!(code == Some(0) || code == Some(1), "{err}");
    assert!(!err.contains("artifact_limit"), "{err}");

    // `[workflows] run_history = 1`: a run's record replaces the workflow's older ones.
    configure("run_history = 1");
    let json_run = [
        "workflow",
        "run",
        "monthly-report@prod",
        "--input",
        "sales=sales.csv",
        "--json",
    ];
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (code, out, err) = with_config(&json_run);
        assert_eq!(code, Some(0), "{err}");
        let r: stepbox::workflow::WorkflowRunRecord = serde_json::from_str(&out).unwrap();
        ids.push(r.run_id);
    }
    let (code, _, err) = with_config(&["workflow", "record", &ids[0]]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no workflow run"), "{err}");
    let (code, _, err) = with_config(&["workflow", "record", &ids[1]]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = with_config(&["workflow", "runs"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&ids[1])
            && out.contains("monthly-report")
            && out.contains("succeeded")
            && out.contains("manual")
            && out.contains("2/2 steps"),
        "{out}"
    );
    let (code, out, _) = with_config(&["workflow", "runs", "another"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    // The earlier runs of this test went at the first prune too.
    let (code, _, _) = stepbox(&["workflow", "record", &failed.run_id]);
    assert_eq!(code, Some(2));
}

#[tokio::test]
async fn published_workflows_pin_step_versions_and_promote_like_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let catalog = catalog(d).await;
    let artifacts = Arc::new(Artifacts::open(&d.join("artifacts")).unwrap());
    let wf = Workflows::new(catalog.clone(), artifacts, 2);
    let mut file = workflow(SUMMARY, "");
    file.description = "Monthly totals report".into();
    let case = stepbox::workflow::publish::WorkflowCase {
        name: "sample".into(),
        inputs: BTreeMap::from([("sales".into(), Blob::Text(SALES.into()))]),
        expected_outputs: BTreeMap::from([(
            "report".into(),
            Blob::Text("# Monthly report\n\n3 rows, total 23\n".into()),
        )]),
    };

    // A case that expects something else: not published, and the reason says which output.
    let mut wrong = case.clone();
    wrong
        .expected_outputs
        .insert("report".into(), Blob::Text("nope".into()));
    let p = wf
        .publish(&file, vec![wrong.clone()], "t", false)
        .await
        .unwrap();
    assert!(p.version.is_none());
    assert!(
        p.unverified_because[0].contains("output `report` differs"),
        "{:?}",
        p.unverified_because
    );
    // With --unverified it is stored, but may not go past the first stage.
    let p = wf.publish(&file, vec![wrong], "t", true).await.unwrap();
    let v1 = p.version.unwrap();
    assert_eq!(v1.state, stepbox_store::VersionState::Unverified);
    let r = |s: &str| StepRef::parse("ref", s).unwrap();
    let refused = wf
        .promote(&r("monthly-report@v1"), "prod", "t")
        .await
        .unwrap();
    assert!(!refused.promoted);
    assert!(refused.reason.contains("unverified"), "{}", refused.reason);

    // The right case: verified v2, pinned to the step's digest, promoted to prod.
    let p = wf
        .publish(&file, vec![case.clone()], "t", false)
        .await
        .unwrap();
    let v2 = p.version.unwrap();
    assert_eq!(
        (v2.number, v2.state),
        (2, stepbox_store::VersionState::Verified)
    );
    assert!(p.created);
    let again = wf.publish(&file, vec![case], "t", false).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.version.unwrap().digest, v2.digest);
    let (_, def, _) = wf.resolve_workflow(&r("monthly-report@v2")).await.unwrap();
    let step_digest = catalog
        .resolve(&r("monthly-by-rep@v1"))
        .await
        .unwrap()
        .version
        .digest
        .clone();
    assert_eq!(
        def.workflow.steps[0].uses.as_deref(),
        Some(format!("monthly-by-rep@sha256:{step_digest}").as_str())
    );
    assert_eq!(def.resolved_from["pivot"], "monthly-by-rep@prod");
    assert!(
        wf.promote(&r("monthly-report@v2"), "prod", "t")
            .await
            .unwrap()
            .promoted
    );

    // A new step version promoted to prod does not change the published workflow: its runs
    // still use v1.
    let mut v2_step = catalog
        .resolve(&r("monthly-by-rep@v1"))
        .await
        .unwrap()
        .version
        .definition
        .clone();
    v2_step.description = "Totals sales by month and rep (v2)".into();
    catalog.publish(&v2_step, "t", false).await.unwrap();
    assert!(
        catalog
            .promote(&r("monthly-by-rep@v2"), "prod", "t")
            .await
            .unwrap()
            .promoted
    );
    let (_, _, plan) = wf
        .resolve_workflow(&r("monthly-report@prod"))
        .await
        .unwrap();
    let run = wf.run(&plan, inputs(), None, None).await.unwrap();
    assert_eq!(run.status, "succeeded");
    assert_eq!(run.steps[0].version, "monthly-by-rep@v1");

    // Unknown stage and unknown version are refused by name.
    let e = wf
        .promote(&r("monthly-report@v2"), "qa", "t")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown stage `qa`"), "{e}");
    let e = wf
        .resolve_workflow(&r("monthly-report@v9"))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no workflow version `monthly-report@v9`"),
        "{e}"
    );
    assert!(!e.to_string().contains("step `"), "{e}");
    let history = catalog
        .store()
        .list_promotions(stepbox_store::Kind::Workflow, "monthly-report", 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 2);
    assert!(history.iter().any(|h| !h.accepted));
}

#[tokio::test]
async fn a_run_holds_at_most_its_artifact_limit_and_pruned_artifacts_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog(dir.path()).await;
    let artifacts = Arc::new(Artifacts::open(&dir.path().join("artifacts")).unwrap());
    let plan = workflow(SUMMARY, "").plan().unwrap();
    let report_len = "# Monthly report\n\n3 rows, total 23\n".len() as u64;
    let held = (SALES.len() + PIVOTED.len()) as u64 + report_len;

    // Exactly at the limit: it holds.
    let wf = Workflows::new(catalog.clone(), artifacts.clone(), 2).with_run_limit(held);
    let run = wf.run(&plan, inputs(), None, None).await.unwrap();
    assert_eq!(run.status, "succeeded", "{run:#?}");

    // One byte less: the summary's report is the file too many; it fails, nothing is kept.
    let tight = Workflows::new(catalog.clone(), artifacts.clone(), 2).with_run_limit(held - 1);
    let over = tight.run(&plan, inputs(), None, None).await.unwrap();
    assert_eq!(over.status, "failed");
    let summary = over.steps.iter().find(|s| s.id == "summary").unwrap();
    assert_eq!(summary.state, StepState::Failed);
    assert_eq!(summary.status, "OUTPUT_EXCEEDED");
    assert!(
        summary
            .message
            .contains(&format!("limit of {} bytes", held - 1))
            && summary.message.contains("artifact_limit"),
        "{}",
        summary.message
    );
    assert!(summary.outputs.is_empty() && over.outputs.is_empty());

    // Inputs alone past the limit: refused before anything runs, naming the key.
    let tiny = Workflows::new(catalog.clone(), artifacts.clone(), 2).with_run_limit(10);
    let err = tiny.run(&plan, inputs(), None, None).await.unwrap_err();
    assert!(matches!(err, WorkflowError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("artifact_limit"), "{err}");

    // Retention: once the failed run's artifacts are pruned, resuming it re-runs the pivot
    // instead of reusing files that are gone.
    let pruned = artifacts.prune(std::time::Duration::ZERO).unwrap();
    assert!(pruned.files >= 2, "{pruned:?}");
    let resumed = wf.run(&plan, inputs(), Some(&over), None).await.unwrap();
    assert_eq!(resumed.status, "succeeded", "{resumed:#?}");
    let pivot = |r: &stepbox::workflow::WorkflowRunRecord| {
        r.steps.iter().find(|s| s.id == "pivot").unwrap().clone()
    };
    assert_eq!(pivot(&resumed).state, StepState::Succeeded);
    assert_ne!(pivot(&resumed).run_id, pivot(&over).run_id);
}
