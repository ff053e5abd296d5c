//! `StepWorkflows` over gRPC: real tonic clients on loopback against an in-process server on a
//! SQLite catalog (two tenants), and a `stepbox serve` process that fires schedules made over
//! gRPC into an outbox. Steps are real sandboxed Python runs.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stepbox::catalog::{Catalog, default_stages};
use stepbox::pb::step_catalog_client::StepCatalogClient;
use stepbox::pb::step_workflows_client::StepWorkflowsClient;
use stepbox::pb::{self, check::Kind};
use stepbox::service::catalog::CatalogHandle;
use stepbox::service::config::{CatalogPermission, TenantConfig, hash_token};
use stepbox::service::tenancy::Tenants;
use stepbox::service::workflow::WorkflowOptions;
use stepbox::service::{ServerOptions, serve};
use stepbox::workflow::artifacts::Artifacts;
use stepbox::workflow::schedule::WorkflowsSection;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// The published step: counts the rows of `rows.csv` into `report.json`.
const ROW_COUNT: &str = "import csv, json\nrows = list(csv.DictReader(open('/input/rows.csv')))\nprint(f'{len(rows)} rows')\njson.dump({'rows': len(rows)}, open('/output/report.json', 'w'))\n";

/// Fails (exit 3) when the title is `bad`.
const SUMMARY: &str = "import json\nt = open('/input/title.txt').read().strip()\nif t == 'bad':\n    raise SystemExit(3)\nn = json.load(open('/input/report.json'))['rows']\nopen('/output/summary.md', 'w').write(f'# {t}\\n\\n{n} rows\\n')\n";
const FINAL: &str =
    "open('/output/final.md', 'w').write(open('/input/summary.md').read() + 'done\\n')\n";
const SIDE: &str = "n = len(open('/input/rows.csv').read().splitlines())\nopen('/output/side.txt', 'w').write(f'{n} lines\\n')\n";

const ROWS: &str = "id\n1\n2\n3\n";
const REPORT: &str = "# Monthly\n\n3 rows\ndone\n";

const WORKFLOW: &str = r#"
name = "rows-report"
description = "Counts rows and writes a summary"
[inputs]
rows = "rows.csv"
title = "title.txt"
[[steps]]
id = "count"
uses = "row-count@dev"
inputs = { "rows.csv" = "inputs.rows" }
[[steps]]
id = "summary"
program = "summary.py"
inputs = { "report.json" = "steps.count.outputs.report.json", "title.txt" = "inputs.title" }
[[steps]]
id = "final"
program = "./final.py"
inputs = { "summary.md" = "steps.summary.outputs.summary.md" }
[[steps]]
id = "side"
program = "side.py"
inputs = { "rows.csv" = "inputs.rows" }
[outputs]
report = "steps.final.outputs.final.md"
side = "steps.side.outputs.side.txt"
[[cases]]
name = "three-rows"
inputs = { rows = "cases/rows.csv", title = "cases/title.txt" }
expected_outputs = { report = "cases/final.md" }
"#;

fn file(path: &str, content: &str) -> pb::File {
    pb::File {
        path: path.into(),
        content: content.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// The workflow with its program and case files.
fn inline(toml: &str) -> pb::InlineWorkflow {
    pb::InlineWorkflow {
        toml: toml.into(),
        files: vec![
            file("summary.py", SUMMARY),
            file("final.py", FINAL),
            file("side.py", SIDE),
            file("cases/rows.csv", ROWS),
            file("cases/title.txt", "Monthly\n"),
            file("cases/final.md", REPORT),
        ],
    }
}

fn inputs(title: &str) -> Vec<pb::File> {
    vec![file("rows", ROWS), file("title", title)]
}

fn row_count() -> pb::StepDefinition {
    pb::StepDefinition {
        name: "row-count".into(),
        description: "Counts the rows of rows.csv".into(),
        runtime: "python".into(),
        program: ROW_COUNT.as_bytes().to_vec(),
        policy: "default".into(),
        cases: vec![pb::StepCase {
            name: "three-rows".into(),
            inputs: vec![file("rows.csv", ROWS)],
            checks: vec![pb::Check {
                name: String::new(),
                kind: Some(Kind::FileJsonEquals(pb::FileContent {
                    path: "report.json".into(),
                    content: br#"{"rows": 3}"#.to_vec(),
                })),
            }],
            ..Default::default()
        }],
        // Checked on every run, so each workflow run of it reports a verdict.
        contract: vec![pb::Check {
            name: String::new(),
            kind: Some(Kind::FileJsonSchema(pb::FileJsonSchema {
                path: "report.json".into(),
                schema_json: r#"{"type":"object","required":["rows"]}"#.into(),
            })),
        }],
        ..Default::default()
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Publishes `row-count` and puts v1 in `dev`.
async fn publish_step(catalog: &mut StepCatalogClient<Channel>, token: Option<&str>) {
    fn req<T>(m: T, token: Option<&str>) -> tonic::Request<T> {
        match token {
            Some(t) => authed(m, t),
            None => tonic::Request::new(m),
        }
    }
    let p = catalog
        .publish_step(req(
            pb::PublishStepRequest {
                step: Some(row_count()),
                allow_unverified: false,
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(p.version.is_some(), "{}", p.refused_reason);
    let p = catalog
        .promote_step(req(
            pb::PromoteStepRequest {
                step_ref: "row-count@v1".into(),
                stage: "dev".into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(p.promoted, "{}", p.reason);
}

/// An in-process server on a SQLite catalog with two tenants: `ops` (everything) and
/// `billing` (run only, steps and workflows named `billing-*`).
struct Server {
    workflows: StepWorkflowsClient<Channel>,
    catalog: StepCatalogClient<Channel>,
    metrics: Arc<stepbox::service::metrics::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: tempfile::TempDir,
}

const OPS: &str = "ops-token";
const BILLING: &str = "billing-token";

impl Server {
    async fn start(with_catalog: bool, schedules: bool) -> Server {
        Server::start_with(with_catalog, schedules, ServerOptions::default()).await
    }

    async fn start_with(with_catalog: bool, schedules: bool, mut options: ServerOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let exec = Arc::new(new_executor(&dir.path().join("work")));
        let tenant = |name: &str, catalog: Vec<CatalogPermission>, steps: Vec<&str>| TenantConfig {
            name: name.into(),
            tokens: vec![hash_token(&format!("{name}-token"))],
            tokens_file: None,
            policies: vec![],
            concurrency: 0,
            rate_per_second: 0.0,
            burst: None,
            catalog,
            steps: steps.into_iter().map(String::from).collect(),
        };
        use CatalogPermission::{Promote, Publish, Run};
        options.tenants = Arc::new(
            Tenants::from_config(&[
                tenant("ops", vec![Run, Publish, Promote], vec![]),
                tenant("billing", vec![Run], vec!["billing-*"]),
            ])
            .unwrap(),
        );
        if with_catalog {
            let store = stepbox_store::Store::open(&stepbox_store::Store::sqlite_url(
                &dir.path().join("catalog.db"),
            ))
            .await
            .unwrap();
            let catalog = Catalog::new(store, exec.clone(), default_stages(), None)
                .await
                .unwrap();
            options.catalog = Some(Arc::new(CatalogHandle::ready(Arc::new(catalog))));
        }
        for d in ["in", "out/ops", "out/billing", "artifacts"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let section = WorkflowsSection {
            input_roots: vec![root.join("in")],
            output_roots: vec![root.join("out")],
            artifacts: Some(root.join("artifacts")),
            ..WorkflowsSection::default()
        };
        options.workflows = Some(WorkflowOptions {
            artifacts: Arc::new(Artifacts::open(&root.join("artifacts")).unwrap()),
            section,
            concurrency: 2,
            schedules,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = options.metrics.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(serve(exec, listener, options, async {
            let _ = rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Server {
            workflows: StepWorkflowsClient::new(channel.clone()),
            catalog: StepCatalogClient::new(channel),
            metrics,
            stop: Some(tx),
            done,
            dir,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }

    /// Runs and collects every event; the last is the result (or the error).
    async fn run(
        &mut self,
        req: tonic::Request<pb::RunWorkflowRequest>,
    ) -> Result<(Vec<pb::workflow_run_event::Event>, pb::WorkflowRun), tonic::Status> {
        let stream = self.workflows.run_workflow(req).await?.into_inner();
        collect(stream).await
    }
}

async fn collect(
    mut stream: tonic::Streaming<pb::WorkflowRunEvent>,
) -> Result<(Vec<pb::workflow_run_event::Event>, pb::WorkflowRun), tonic::Status> {
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await? {
        events.push(ev.event.unwrap());
    }
    match events.pop() {
        Some(pb::workflow_run_event::Event::Result(r)) => Ok((events, r)),
        other => panic!("the last event is not the result: {other:?}"),
    }
}

fn by_ref(r: &str, title: &str) -> pb::RunWorkflowRequest {
    pb::RunWorkflowRequest {
        workflow: Some(pb::run_workflow_request::Workflow::WorkflowRef(r.into())),
        inputs: inputs(title),
        max_output_bytes: 0,
    }
}

fn by_inline(toml: &str, title: &str) -> pb::RunWorkflowRequest {
    pb::RunWorkflowRequest {
        workflow: Some(pb::run_workflow_request::Workflow::Inline(inline(toml))),
        inputs: inputs(title),
        max_output_bytes: 0,
    }
}

/// The index of each kind of event per step: (queued, started, finished).
fn order(events: &[pb::workflow_run_event::Event]) -> HashMap<String, [Option<usize>; 3]> {
    use pb::workflow_run_event::Event;
    let mut m: HashMap<String, [Option<usize>; 3]> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        let (id, k) = match e {
            Event::Queued(id) => (id.clone(), 0),
            Event::Started(id) => (id.clone(), 1),
            Event::Finished(r) => (r.id.clone(), 2),
            Event::Result(_) => panic!("a result before the end"),
        };
        let slot = &mut m.entry(id).or_default()[k];
        assert!(
            slot.is_none(),
            "two events of one kind for a step: {events:?}"
        );
        *slot = Some(i);
    }
    m
}

/// Regular files anywhere under `dir`.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                files_under(&e.path())
            } else {
                usize::from(t.is_file())
            }
        })
        .sum()
}

fn step<'a>(r: &'a pb::WorkflowRun, id: &str) -> &'a pb::WorkflowStepResult {
    r.steps.iter().find(|s| s.id == id).unwrap()
}

fn state(r: &pb::WorkflowRun, id: &str) -> pb::WorkflowStepState {
    step(r, id).state()
}

fn output<'a>(r: &'a pb::WorkflowRun, name: &str) -> &'a pb::WorkflowOutput {
    r.outputs.iter().find(|o| o.name == name).unwrap()
}

#[tokio::test]
async fn publish_promote_then_run_streams_every_step_in_order_and_matches_the_cli() {
    let mut s = Server::start(true, true).await;
    publish_step(&mut s.catalog, Some(OPS)).await;

    let p = s
        .workflows
        .publish_workflow(authed(
            pb::PublishWorkflowRequest {
                workflow: Some(inline(WORKFLOW)),
                allow_unverified: false,
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    let v = p.version.expect(&p.refused_reason);
    assert!(v.verified && p.created, "{:?}", p.unverified_because);
    assert_eq!(v.number, 1);
    assert_eq!(p.case_results.len(), 1);
    assert!(p.case_results[0].passed, "{}", p.case_results[0].detail);
    // The version pins the exact step version `row-count@dev` resolved to.
    let count = v.steps.iter().find(|s| s.id == "count").unwrap();
    assert!(count.uses.starts_with("row-count@sha256:"), "{count:?}");
    assert_eq!(count.resolved_from, "row-count@dev");
    assert_eq!(v.inputs, ["rows", "title"]);

    let promoted = s
        .workflows
        .promote_workflow(authed(
            pb::PromoteWorkflowRequest {
                workflow_ref: "rows-report@v1".into(),
                stage: "staging".into(),
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(promoted.promoted, "{}", promoted.reason);
    assert!(promoted.case_results.iter().all(|c| c.passed));
    assert_eq!(promoted.record.unwrap().to_number, 1);

    let got = s
        .workflows
        .get_workflow(authed(
            pb::GetWorkflowRequest {
                workflow_ref: "rows-report@staging".into(),
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.selected.unwrap().digest, v.digest);
    let staging = got.stages.iter().find(|a| a.stage == "staging").unwrap();
    assert!(staging.set && staging.number == 1);
    let list = s
        .workflows
        .list_workflows(authed(pb::ListWorkflowsRequest {}, OPS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.workflows.len(), 1);
    assert_eq!(list.workflows[0].name, "rows-report");

    let (events, r) = s
        .run(authed(by_ref("rows-report@staging", "Monthly\n"), OPS))
        .await
        .unwrap();
    assert_eq!(r.status, "succeeded", "{r:?}");
    assert_eq!(r.trigger, "api");
    assert_eq!(r.source, format!("rows-report@sha256:{}", v.digest));
    assert_eq!(r.manifest_digest.len(), 64);
    // Every step queued, started, finished, in that order, each after what it waits for.
    let o = order(&events);
    for id in ["count", "summary", "final", "side"] {
        let [q, st, f] = o[id];
        assert!(
            q.unwrap() < st.unwrap() && st.unwrap() < f.unwrap(),
            "{id}: {events:?}"
        );
        assert_eq!(state(&r, id), pb::WorkflowStepState::Succeeded);
    }
    assert!(o["count"][2] < o["summary"][1] && o["summary"][2] < o["final"][1]);
    let count = step(&r, "count");
    assert!(count.version.starts_with("row-count@v1"), "{count:?}");
    assert_eq!(count.status, "SUCCEEDED");
    assert!(!count.checks.is_empty() && count.checks.iter().all(|c| c.passed));
    let report = output(&r, "report");
    assert_eq!(report.content, REPORT.as_bytes());
    assert!(!report.content_omitted && report.step == "final");
    assert_eq!(output(&r, "side").content, b"4 lines\n");

    // GetWorkflowRun returns the same record.
    let again = s
        .workflows
        .get_workflow_run(authed(
            pb::GetWorkflowRunRequest {
                run_id: r.run_id.clone(),
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, r);

    // An output past `max_output_bytes` carries only its digest and size.
    let mut small = by_ref("rows-report@staging", "Monthly\n");
    small.max_output_bytes = 10;
    let (_, r2) = s.run(authed(small, OPS)).await.unwrap();
    let report = output(&r2, "report");
    assert!(report.content_omitted && report.content.is_empty());
    assert_eq!(report.size, REPORT.len() as u64);
    assert_eq!(report.sha256, output(&r, "report").sha256);
    assert_eq!(output(&r2, "side").content, b"4 lines\n", "fits the bound");

    // The CLI on the same catalog file runs the same version to the same step versions and
    // outputs; its record says `manual`.
    let d = s.dir.path().to_path_buf();
    std::fs::write(d.join("rows.csv"), ROWS).unwrap();
    std::fs::write(d.join("title.txt"), "Monthly\n").unwrap();
    let out = stepbox_command(&d)
        .env(
            "STEPBOX_CATALOG_DATABASE",
            stepbox_store::Store::sqlite_url(&d.join("catalog.db")),
        )
        .env_remove("STEPBOX_CONFIG")
        .args([
            "workflow",
            "run",
            "rows-report@staging",
            "--input",
            "rows=rows.csv",
            "--input",
            "title=title.txt",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["trigger"], "manual");
    assert_eq!(cli["source"], r.source.as_str());
    assert_eq!(cli["status"], "succeeded");
    for s in &r.steps {
        let c = cli["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == s.id.as_str())
            .unwrap();
        assert_eq!(c["version_digest"], s.version_digest.as_str(), "{}", s.id);
        for (file, digest) in &s.output_digests {
            assert_eq!(c["outputs"][file], digest.as_str(), "{}: {file}", s.id);
        }
    }
    assert_eq!(
        cli["outputs"]["report"][1],
        output(&r, "report").sha256.as_str()
    );
    s.stop().await;
}

#[tokio::test]
async fn a_failed_step_stops_its_successors_and_a_resume_reuses_what_succeeded() {
    let mut s = Server::start(true, false).await;
    publish_step(&mut s.catalog, Some(OPS)).await;

    let (events, failed) = s
        .run(authed(by_inline(WORKFLOW, "bad"), OPS))
        .await
        .unwrap();
    assert_eq!(failed.status, "failed");
    assert!(
        failed.source.starts_with("inline:sha256:"),
        "{}",
        failed.source
    );
    assert_eq!(state(&failed, "count"), pb::WorkflowStepState::Succeeded);
    assert_eq!(state(&failed, "summary"), pb::WorkflowStepState::Failed);
    assert_eq!(step(&failed, "summary").status, "FAILED");
    // Its successor did not run; the independent branch finished.
    assert_eq!(state(&failed, "final"), pb::WorkflowStepState::Skipped);
    assert!(
        step(&failed, "final")
            .message
            .contains("step `summary` did not succeed"),
        "{}",
        step(&failed, "final").message
    );
    assert_eq!(order(&events)["final"][..2], [None, None]);
    assert_eq!(state(&failed, "side"), pb::WorkflowStepState::Succeeded);
    assert_eq!(output(&failed, "side").content, b"4 lines\n");
    assert!(failed.outputs.iter().all(|o| o.name != "report"));

    // Resume with a good title: `count` and `side` (same version, policy and inputs) are
    // reused: no queued or started event, the same step run ids; the rest runs.
    let stream = s
        .workflows
        .resume_workflow_run(authed(
            pb::ResumeWorkflowRunRequest {
                run_id: failed.run_id.clone(),
                inputs: vec![file("title", "Monthly\n")],
                max_output_bytes: 0,
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    let (events, resumed) = collect(stream).await.unwrap();
    assert_eq!(resumed.status, "succeeded", "{resumed:?}");
    assert_eq!(resumed.resumed_from, failed.run_id);
    assert_ne!(resumed.run_id, failed.run_id);
    let o = order(&events);
    for id in ["count", "side"] {
        assert_eq!(state(&resumed, id), pb::WorkflowStepState::Reused);
        assert_eq!(o[id][..2], [None, None], "{id} ran again: {events:?}");
        assert_eq!(step(&resumed, id).run_id, step(&failed, id).run_id);
    }
    for id in ["summary", "final"] {
        assert_eq!(state(&resumed, id), pb::WorkflowStepState::Succeeded);
        assert!(o[id][1].is_some());
        assert!(!step(&resumed, id).run_id.is_empty());
    }
    assert_eq!(output(&resumed, "report").content, REPORT.as_bytes());

    let got = s
        .workflows
        .get_workflow_run(authed(
            pb::GetWorkflowRunRequest {
                run_id: resumed.run_id.clone(),
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.trigger.as_str(), got.resumed_from.as_str()),
        ("api", failed.run_id.as_str())
    );

    // Listed newest first, of every workflow or one; outputs by name and digest only; another
    // tenant lists none of them.
    let list = |workflow: &str, limit: u32, token: &str| {
        let mut w = s.workflows.clone();
        let req = authed(
            pb::ListWorkflowRunsRequest {
                workflow: workflow.into(),
                limit,
            },
            token,
        );
        async move { w.list_workflow_runs(req).await }
    };
    let runs = list("", 0, OPS).await.unwrap().into_inner().runs;
    let ids: Vec<_> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, [resumed.run_id.as_str(), failed.run_id.as_str()]);
    assert_eq!(runs[0].status, "succeeded");
    assert_eq!(runs[0].steps.len(), resumed.steps.len());
    // Times: RFC 3339 UTC, so they sort as text; the resume started after the failed run ended.
    assert!(runs[0].started_at <= runs[0].finished_at, "{:?}", runs[0]);
    assert!(runs[1].finished_at <= runs[0].started_at, "{runs:?}");
    assert!(runs[0].started_at.ends_with('Z'));
    let report = runs[0].outputs.iter().find(|o| o.name == "report").unwrap();
    assert!(report.content.is_empty() && report.content_omitted && !report.sha256.is_empty());
    let one = list("rows-report", 1, OPS).await.unwrap().into_inner().runs;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].run_id, resumed.run_id);
    assert!(
        list("other", 0, OPS)
            .await
            .unwrap()
            .into_inner()
            .runs
            .is_empty()
    );
    assert!(
        list("", 0, BILLING)
            .await
            .unwrap()
            .into_inner()
            .runs
            .is_empty()
    );
    let (c, m) = code_and_message(list("Bad Name!", 0, OPS).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("workflow"), "{m}");
    // Both recorded runs are counted.
    let text = s.metrics.encode();
    for line in [
        r#"stepbox_workflow_runs_total{tenant="ops",trigger="api",status="failed"} 1"#,
        r#"stepbox_workflow_runs_total{tenant="ops",trigger="api",status="succeeded"} 1"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    s.stop().await;
}

fn code_and_message<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let e = r.unwrap_err();
    (e.code(), e.message().to_string())
}

#[tokio::test]
async fn every_refusal_names_what_was_wrong() {
    let mut s = Server::start(true, true).await;
    publish_step(&mut s.catalog, Some(OPS)).await;

    let mut refused = Vec::new();
    for (toml, code, words) in [
        (
            "name = \"x\"\n[[steps\n".to_string(),
            Code::InvalidArgument,
            "invalid `inline.toml`",
        ),
        (
            WORKFLOW.replace(
                "steps.count.outputs.report.json",
                "steps.cnt.outputs.report.json",
            ),
            Code::InvalidArgument,
            "invalid `steps.summary.inputs.report.json`",
        ),
        (
            WORKFLOW.replace(
                "\"inputs.rows\" }\n[[steps]]\nid = \"summary\"",
                "\"steps.final.outputs.x\" }\n[[steps]]\nid = \"summary\"",
            ),
            Code::InvalidArgument,
            "cycle",
        ),
        (
            WORKFLOW.replace(
                "report.json\" = \"steps.count.outputs.report.json",
                "report.json\" = \"steps.count.outputs.nope.json",
            ),
            Code::InvalidArgument,
            "step `count` does not write `nope.json`",
        ),
        (
            WORKFLOW.replace("row-count@dev", "row-count@prod"),
            Code::NotFound,
            "step `count`: no version of step `row-count` in stage `prod`",
        ),
        (
            WORKFLOW.replace("program = \"side.py\"", "program = \"missing.py\""),
            Code::InvalidArgument,
            "invalid `steps.side.program`: names the file `missing.py`",
        ),
    ] {
        let (c, m) = code_and_message(s.run(authed(by_inline(&toml, "x"), OPS)).await);
        assert_eq!(c, code, "{m}");
        assert!(m.contains(words), "{words}: {m}");
        refused.push(m);
    }
    // The cycle names the field `steps`.
    assert!(refused[2].starts_with("invalid `steps`"), "{}", refused[2]);

    // Missing and unknown inputs.
    let mut req = by_inline(WORKFLOW, "x");
    req.inputs.pop();
    let (c, m) = code_and_message(s.run(authed(req, OPS)).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(
        m.starts_with("invalid `inputs.title`: was not provided"),
        "{m}"
    );
    let mut req = by_inline(WORKFLOW, "x");
    req.inputs.push(file("extra", "x"));
    let (c, m) = code_and_message(s.run(authed(req, OPS)).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("`inputs.extra`"), "{m}");
    let mut req = by_inline(WORKFLOW, "x");
    req.inputs.push(file("rows", "x"));
    let (c, m) = code_and_message(s.run(authed(req, OPS)).await);
    assert!(
        c == Code::InvalidArgument && m.contains("`inputs[2].path`"),
        "{m}"
    );
    let (c, m) = code_and_message(
        s.run(authed(
            pb::RunWorkflowRequest {
                workflow: None,
                ..Default::default()
            },
            OPS,
        ))
        .await,
    );
    assert!(
        c == Code::InvalidArgument && m.starts_with("invalid `workflow`"),
        "{m}"
    );
    // Nothing of the refused requests was kept.
    assert_eq!(files_under(&s.dir.path().join("artifacts")), 0);

    // Unknown references: NOT_FOUND, and a workflow another tenant may not see answers with
    // the very same words.
    let (c, m) = code_and_message(s.run(authed(by_ref("rows-report@v9", "x"), OPS)).await);
    assert_eq!(
        (c, m.as_str()),
        (Code::NotFound, "no workflow version `rows-report@v9`")
    );
    let (c, m) = code_and_message(s.run(authed(by_ref("rows-report@v1x", "x"), OPS)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    let p = s
        .workflows
        .publish_workflow(authed(
            pb::PublishWorkflowRequest {
                workflow: Some(inline(WORKFLOW)),
                allow_unverified: false,
            },
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(p.version.is_some(), "{}", p.refused_reason);
    let (c, seen) = code_and_message(s.run(authed(by_ref("rows-report@v1", "x"), BILLING)).await);
    let (_, unknown) =
        code_and_message(s.run(authed(by_ref("billing-nope@v1", "x"), BILLING)).await);
    assert_eq!(c, Code::NotFound);
    assert_eq!(
        seen.replace("rows-report", "X"),
        unknown.replace("billing-nope", "X")
    );
    let hidden = s
        .workflows
        .list_workflows(authed(pb::ListWorkflowsRequest {}, BILLING))
        .await
        .unwrap()
        .into_inner();
    assert!(hidden.workflows.is_empty());
    // ... and may not publish or promote.
    let (c, _) = code_and_message(
        s.workflows
            .publish_workflow(authed(
                pb::PublishWorkflowRequest {
                    workflow: Some(inline(WORKFLOW)),
                    allow_unverified: true,
                },
                BILLING,
            ))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    // An inline workflow of billing's own name that uses a step billing may not see: the step
    // is NOT_FOUND, as if it did not exist.
    let (c, m) = code_and_message(
        s.run(authed(
            by_inline(&WORKFLOW.replace("rows-report", "billing-report"), "x"),
            BILLING,
        ))
        .await,
    );
    assert_eq!(
        (c, m.as_str()),
        (
            Code::NotFound,
            "step `count`: no version of step `row-count` in stage `dev`"
        )
    );

    // Another tenant's run and schedule are NOT_FOUND, worded like unknown ones.
    let (_, r) = s
        .run(authed(by_inline(WORKFLOW, "bad"), OPS))
        .await
        .unwrap();
    for (id, token) in [(r.run_id.as_str(), BILLING), ("no-such-run", OPS)] {
        let (c, m) = code_and_message(
            s.workflows
                .get_workflow_run(authed(
                    pb::GetWorkflowRunRequest { run_id: id.into() },
                    token,
                ))
                .await,
        );
        assert_eq!((c, m), (Code::NotFound, format!("no workflow run `{id}`")));
        let (c, m) = code_and_message(
            s.workflows
                .resume_workflow_run(authed(
                    pb::ResumeWorkflowRunRequest {
                        run_id: id.into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        );
        assert_eq!((c, m), (Code::NotFound, format!("no workflow run `{id}`")));
    }
    let sched = s
        .workflows
        .create_schedule(authed(
            schedule_request(&s.dir.path().join("out/ops"), true),
            OPS,
        ))
        .await
        .unwrap()
        .into_inner();
    for (id, token) in [(sched.id.as_str(), BILLING), ("no-such-schedule", OPS)] {
        let req = || pb::ScheduleRequest {
            schedule_id: id.into(),
        };
        let want = (Code::NotFound, format!("no schedule `{id}`"));
        assert_eq!(
            code_and_message(s.workflows.pause_schedule(authed(req(), token)).await),
            want
        );
        assert_eq!(
            code_and_message(s.workflows.delete_schedule(authed(req(), token)).await),
            want
        );
        assert_eq!(
            code_and_message(
                s.workflows
                    .list_firings(authed(
                        pb::ListFiringsRequest {
                            schedule_id: id.into(),
                            limit: 0
                        },
                        token
                    ))
                    .await
            ),
            want
        );
    }
    let theirs = s
        .workflows
        .list_schedules(authed(pb::ListSchedulesRequest {}, BILLING))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.schedules.is_empty());

    // Schedules: a bad cron, an outbox outside `[workflows] output_roots`, missing inputs.
    let out = s.dir.path().join("out/ops");
    let mut bad_cron = schedule_request(&out, true);
    bad_cron.cron = "61 * * * *".into();
    let mut outside = schedule_request(&out, true);
    outside.outbox = s.dir.path().join("in").display().to_string();
    let mut relative = schedule_request(&out, true);
    relative.outbox = "out".into();
    let mut no_inputs = schedule_request(&out, true);
    no_inputs.inputs = None;
    // Another tenant's outbox or inbox, and the root itself: over gRPC only `ROOT/TENANT/...`.
    let theirs = schedule_request(&s.dir.path().join("out/billing"), true);
    let root = schedule_request(&s.dir.path().join("out"), true);
    let mut their_inbox = schedule_request(&out, true);
    their_inbox.inputs = Some(pb::create_schedule_request::Inputs::Inbox(
        pb::ScheduleInbox {
            dir: s.dir.path().join("in").display().to_string(),
            files: [
                ("rows".into(), "*.csv".into()),
                ("title".into(), "*.txt".into()),
            ]
            .into(),
        },
    ));
    for (req, field, words) in [
        (bad_cron, "cron", "61 * * * *"),
        (
            outside,
            "outbox",
            "outside every `[workflows] output_roots`",
        ),
        (relative, "outbox", "not an absolute directory path"),
        (no_inputs, "inputs", "give exactly the workflow's inputs"),
        (theirs, "outbox", "not in tenant `ops`'s own directory"),
        (root, "outbox", "not in tenant `ops`'s own directory"),
        (
            their_inbox,
            "inbox.dir",
            "not in tenant `ops`'s own directory",
        ),
    ] {
        let (c, m) = code_and_message(s.workflows.create_schedule(authed(req, OPS)).await);
        assert_eq!(c, Code::InvalidArgument, "{m}");
        assert!(m.starts_with(&format!("invalid `{field}`")), "{m}");
        assert!(m.contains(words), "{words}: {m}");
    }
    // A tenant may not schedule a workflow outside its names.
    let (c, m) = code_and_message(
        s.workflows
            .create_schedule(authed(schedule_request(&out, true), BILLING))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied, "{m}");
    s.stop().await;

    // No catalog: FAILED_PRECONDITION; a catalog but nothing that fires schedules: schedule
    // calls are FAILED_PRECONDITION, runs work.
    let mut none = Server::start(false, false).await;
    let (c, m) = code_and_message(none.run(authed(by_inline(WORKFLOW, "x"), OPS)).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("[catalog] database"), "{m}");
    none.stop().await;
    let mut unscheduled = Server::start(true, false).await;
    let (c, m) = code_and_message(
        unscheduled
            .workflows
            .list_schedules(authed(pb::ListSchedulesRequest {}, OPS))
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("[catalog] database"), "{m}");
    unscheduled.stop().await;
}

/// A per-second schedule of the inline workflow with fixed inputs, delivering to `outbox`.
fn schedule_request(outbox: &Path, inline_workflow: bool) -> pb::CreateScheduleRequest {
    pb::CreateScheduleRequest {
        workflow: Some(if inline_workflow {
            pb::create_schedule_request::Workflow::Inline(inline(WORKFLOW))
        } else {
            pb::create_schedule_request::Workflow::WorkflowRef("rows-report@staging".into())
        }),
        cron: "* * * * * *".into(),
        timezone: "Europe/Berlin".into(),
        inputs: Some(pb::create_schedule_request::Inputs::Fixed(
            pb::ScheduleFixedInputs {
                files: inputs("Monthly\n"),
            },
        )),
        outbox: outbox.display().to_string(),
        overlap: pb::ScheduleOverlap::Skip as i32,
        catch_up_ms: 0,
        paused: false,
    }
}

#[tokio::test]
async fn a_client_deadline_stops_the_run() {
    let mut s = Server::start(true, false).await;
    publish_step(&mut s.catalog, Some(OPS)).await;
    let slow = WORKFLOW.replace("program = \"side.py\"", "program = \"slow.py\"");
    let mut w = inline(&slow);
    w.files
        .push(file("slow.py", "import time\ntime.sleep(60)\n"));
    let mut req = authed(
        pb::RunWorkflowRequest {
            workflow: Some(pb::run_workflow_request::Workflow::Inline(w)),
            inputs: inputs("Monthly\n"),
            max_output_bytes: 0,
        },
        OPS,
    );
    req.set_timeout(Duration::from_secs(8));
    let started = Instant::now();
    let e = s.run(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(30));
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_run_and_frees_its_place() {
    // Room for one job: while a run holds it, the next is RESOURCE_EXHAUSTED at once.
    let options = ServerOptions {
        concurrency: 1,
        queue: 0,
        ..ServerOptions::default()
    };
    let mut s = Server::start_with(true, false, options).await;
    publish_step(&mut s.catalog, Some(OPS)).await;
    let slow = WORKFLOW.replace("program = \"side.py\"", "program = \"slow.py\"");
    let request = || {
        let mut w = inline(&slow);
        w.files
            .push(file("slow.py", "import time\ntime.sleep(120)\n"));
        authed(
            pb::RunWorkflowRequest {
                workflow: Some(pb::run_workflow_request::Workflow::Inline(w)),
                inputs: inputs("Monthly\n"),
                max_output_bytes: 0,
            },
            OPS,
        )
    };
    let mut first = s
        .workflows
        .run_workflow(request())
        .await
        .unwrap()
        .into_inner();
    // Wait until the slow step runs.
    loop {
        match first.message().await.unwrap().unwrap().event.unwrap() {
            pb::workflow_run_event::Event::Started(id) if id == "side" => break,
            _ => {}
        }
    }
    let (c, m) = code_and_message(s.run(request()).await);
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    // The client goes away: the run stops and its place is free again within seconds, long
    // before the step's two minutes.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut second = loop {
        match s.workflows.run_workflow(request()).await {
            Ok(stream) => break stream.into_inner(),
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the first run still holds its place: {e:?}"),
        }
    };
    assert!(second.message().await.unwrap().is_some());
    drop(second);
    s.stop().await;
}

#[tokio::test]
async fn workflow_steps_take_the_servers_slots_like_any_job() {
    // One slot: the two independent first steps (`count`, `side`) may not run at once, though
    // the workflow's own concurrency is 2.
    let options = ServerOptions {
        concurrency: 1,
        queue: 4,
        ..ServerOptions::default()
    };
    let mut s = Server::start_with(true, false, options).await;
    publish_step(&mut s.catalog, Some(OPS)).await;
    let (events, r) = s
        .run(authed(by_inline(WORKFLOW, "Monthly\n"), OPS))
        .await
        .unwrap();
    assert_eq!(r.status, "succeeded");
    let o = order(&events);
    let spans: Vec<(usize, usize)> = o
        .values()
        .map(|[_, st, f]| (st.unwrap(), f.unwrap()))
        .collect();
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            assert!(a.1 < b.0 || b.1 < a.0, "two steps ran at once: {events:?}");
        }
    }
    s.stop().await;
}

/// `stepbox serve` with a `[catalog] database` and `[workflows]` roots in `dir`.
struct Replica {
    child: std::process::Child,
    addr: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[server]` lines after `addr`, e.g. `concurrency = 1`.
fn start_replica(dir: &Path, server: &str) -> Replica {
    let config = dir.join("stepbox.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\naddr = \"127.0.0.1:0\"\n{server}\n[catalog]\ndatabase = \"{}\"\n\
             [workflows]\noutput_roots = [\"{}\"]\nartifacts = \"{}\"\n",
            stepbox_store::Store::sqlite_url(&dir.join("catalog.db")),
            dir.join("out").display(),
            dir.join("artifacts").display(),
        ),
    )
    .unwrap();
    let mut child = stepbox_command(dir)
        .args(["serve", "--config"])
        .arg(&config)
        .env("STEPBOX_LOG", "warn")
        .env_remove("STEPBOX_TEST_POSTGRES_URL")
        .env_remove("STEPBOX_TEST_POSTGRES_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("stepbox serve said {line:?}"))
        .to_string();
    Replica { child, addr }
}

/// Waits until `dir` holds a file whose name starts with `prefix`.
async fn wait_for_file(dir: &Path, prefix: &str) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
        {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "nothing `{prefix}*` in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn schedules_over_grpc_fire_into_the_outbox_of_stepbox_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    // The anonymous tenant is `local`: its outboxes lie under `ROOT/local/`.
    for sub in ["out/local/inline", "out/local/published", "artifacts"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let replica = start_replica(&d, "");
    let channel = Channel::from_shared(format!("http://{}", replica.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut catalog = StepCatalogClient::new(channel.clone());
    let mut wf = StepWorkflowsClient::new(channel);
    publish_step(&mut catalog, None).await;
    let p = wf
        .publish_workflow(pb::PublishWorkflowRequest {
            workflow: Some(inline(WORKFLOW)),
            allow_unverified: false,
        })
        .await
        .unwrap()
        .into_inner();
    let v = p.version.expect(&p.refused_reason);
    let promoted = wf
        .promote_workflow(pb::PromoteWorkflowRequest {
            workflow_ref: "rows-report@v1".into(),
            stage: "staging".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(promoted.promoted, "{}", promoted.reason);

    // Created paused: nothing fires; listed; resumed; fires within seconds.
    let mut req = schedule_request(&d.join("out/local/inline"), true);
    req.paused = true;
    let inline_s = wf.create_schedule(req).await.unwrap().into_inner();
    assert!(
        inline_s.paused && inline_s.workflow == "rows-report" && inline_s.workflow_ref.is_empty()
    );
    assert_eq!(inline_s.fixed_inputs.len(), 2);
    let published = wf
        .create_schedule(schedule_request(&d.join("out/local/published"), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.workflow_ref, "rows-report@staging");
    let listed = wf
        .list_schedules(pb::ListSchedulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.schedules.len(), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        std::fs::read_dir(d.join("out/local/inline"))
            .unwrap()
            .count(),
        0,
        "paused"
    );
    let resumed = wf
        .resume_schedule(pb::ScheduleRequest {
            schedule_id: inline_s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resumed.paused);

    for (s, sub) in [
        (&inline_s, "out/local/inline"),
        (&published, "out/local/published"),
    ] {
        let f = wait_for_file(&d.join(sub), "report-").await;
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            REPORT,
            "{}",
            f.display()
        );
        // The firing record names the run; the run record says it was the schedule.
        let deadline = Instant::now() + Duration::from_secs(60);
        let firing = loop {
            let firings = wf
                .list_firings(pb::ListFiringsRequest {
                    schedule_id: s.id.clone(),
                    limit: 50,
                })
                .await
                .unwrap()
                .into_inner()
                .firings;
            if let Some(f) = firings.into_iter().find(|f| f.status == "succeeded") {
                break f;
            }
            assert!(Instant::now() < deadline, "no succeeded firing of {}", s.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(firing.trigger, "schedule");
        let run = wf
            .get_workflow_run(pb::GetWorkflowRunRequest {
                run_id: firing.run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (run.status.as_str(), run.trigger.as_str()),
            ("succeeded", "schedule")
        );
        if s.id == published.id {
            // The scheduled `NAME@STAGE` ran the version the stage points at.
            assert_eq!(run.source, format!("rows-report@sha256:{}", v.digest));
        }
        assert_eq!(output(&run, "report").content, REPORT.as_bytes());
    }

    // Paused, then deleted: gone from the list, its firings with it.
    let paused = wf
        .pause_schedule(pb::ScheduleRequest {
            schedule_id: inline_s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    for s in [&inline_s, &published] {
        wf.delete_schedule(pb::ScheduleRequest {
            schedule_id: s.id.clone(),
        })
        .await
        .unwrap();
    }
    assert!(
        wf.list_schedules(pb::ListSchedulesRequest {})
            .await
            .unwrap()
            .into_inner()
            .schedules
            .is_empty()
    );
    let e = wf
        .list_firings(pb::ListFiringsRequest {
            schedule_id: inline_s.id.clone(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    drop(replica);
}

/// A firing's step: sleeps, and writes when it ran (`START END`, seconds since the epoch).
const TIMED: &str = "import time\nt0 = time.time()\ntime.sleep(0.3)\nopen('/output/span.txt', 'w').write(f'{t0} {time.time()}')\n";

#[tokio::test]
async fn scheduled_firings_of_stepbox_serve_take_its_slots_like_any_job() {
    // One slot: a per-second schedule's steps and the RunStep calls of a client never run at
    // once (before, the scheduler ran firings beside the server's `concurrency`).
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    for sub in ["out/local/timed", "artifacts"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let replica = start_replica(
        &d,
        &format!("concurrency = 1\nqueue = 4\n[metrics]\naddr = \"127.0.0.1:{metrics_port}\""),
    );
    let channel = Channel::from_shared(format!("http://{}", replica.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut wf = StepWorkflowsClient::new(channel.clone());
    let mut runs = stepbox::pb::step_executor_client::StepExecutorClient::new(channel);
    let workflow = pb::InlineWorkflow {
        toml: "name = \"timed\"\n[[steps]]\nid = \"timed\"\nprogram = \"timed.py\"\n\
               [outputs]\nspan = \"steps.timed.outputs.span.txt\"\n"
            .into(),
        files: vec![file("timed.py", TIMED)],
    };
    let schedule = wf
        .create_schedule(pb::CreateScheduleRequest {
            workflow: Some(pb::create_schedule_request::Workflow::Inline(workflow)),
            cron: "* * * * * *".into(),
            timezone: "UTC".into(),
            inputs: None,
            outbox: d.join("out/local/timed").display().to_string(),
            overlap: pb::ScheduleOverlap::Skip as i32,
            catch_up_ms: 0,
            paused: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_for_file(&d.join("out/local/timed"), "span-").await;

    // Two client steps of 1.5 s each, while the schedule fires every second.
    let mut spans = Vec::new();
    for _ in 0..2 {
        let r = runs
            .run_step(pb::RunStepRequest {
                step: Some(pb::Step {
                    runtime: "python".into(),
                    source:
                        "import time\nt0 = time.time()\ntime.sleep(1.5)\nprint(t0, time.time())\n"
                            .into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        spans.push(("RunStep".to_string(), out));
    }
    // Firings that waited for the slot run after the second call.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wf.pause_schedule(pb::ScheduleRequest {
        schedule_id: schedule.id.clone(),
    })
    .await
    .unwrap();
    for e in std::fs::read_dir(d.join("out/local/timed"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("span-") {
            spans.push((name, std::fs::read_to_string(e.path()).unwrap()));
        }
    }
    let mut spans: Vec<(String, f64, f64)> = spans
        .into_iter()
        .map(|(who, text)| {
            let mut t = text.split_whitespace().map(|x| x.parse::<f64>().unwrap());
            let (a, b) = (t.next().unwrap(), t.next().unwrap());
            (who, a, b)
        })
        .collect();
    spans.sort_by(|a, b| a.1.total_cmp(&b.1));
    // The firings' runs are counted in the server's metrics, as scheduled ones.
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"stepbox_workflow_runs_total{tenant="local",trigger="schedule",status="succeeded"}"#
        ),
        "{text}"
    );
    let firings = spans.iter().filter(|s| s.0.starts_with("span-")).count();
    // The first firing, and at least one while or after the client's three seconds.
    assert!(firings >= 2, "{spans:?}");
    for w in spans.windows(2) {
        assert!(
            w[0].2 <= w[1].1,
            "`{}` and `{}` ran at once on a server with one slot: {spans:?}",
            w[0].0,
            w[1].0
        );
    }
}
