//! The step catalog over gRPC: real clients on loopback against in-process servers on SQLite
//! files, `stepbox serve` processes (a database that is down at start), and two `stepbox serve`
//! replicas on one real PostgreSQL when `STEPBOX_TEST_POSTGRES_URL` is set (`eval "$(bash
//! scripts/postgres.sh start)"`; under `CI` those tests fail without it instead of skipping).

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Connection;
use stepbox::catalog::{Catalog, StageConfig};
use stepbox::pb::step_catalog_client::StepCatalogClient;
use stepbox::pb::step_executor_client::StepExecutorClient;
use stepbox::pb::{self, check::Kind};
use stepbox::service::catalog::CatalogHandle;
use stepbox::service::config::{CatalogPermission, TenantConfig, hash_token};
use stepbox::service::history::Retention;
use stepbox::service::tenancy::Tenants;
use stepbox::service::{ServerOptions, serve};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// Counts the rows of `rows.csv`, prints `N rows` and writes `report.json`.
const ROW_COUNT: &str = "import csv, json\nrows = list(csv.DictReader(open('/input/rows.csv')))\nprint(f'{len(rows)} rows')\njson.dump({'rows': len(rows)}, open('/output/report.json', 'w'))\n";

/// The stages the in-process servers use: `prod` runs under `strict`.
fn stages() -> Vec<StageConfig> {
    vec![
        StageConfig {
            name: "dev".into(),
            policy: None,
        },
        StageConfig {
            name: "staging".into(),
            policy: None,
        },
        StageConfig {
            name: "prod".into(),
            policy: Some("strict".into()),
        },
    ]
}

fn check(kind: Kind) -> pb::Check {
    pb::Check {
        name: String::new(),
        kind: Some(kind),
    }
}

fn file(path: &str, content: &str) -> pb::File {
    pb::File {
        path: path.into(),
        content: content.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// `row-count` with `program`, one case on three rows, and a contract: a report with at least
/// one row.
fn row_count(program: &str) -> pb::StepDefinition {
    pb::StepDefinition {
        name: "row-count".into(),
        description: "Counts the rows of rows.csv".into(),
        runtime: "python".into(),
        program: program.as_bytes().to_vec(),
        policy: "default".into(),
        cases: vec![pb::StepCase {
            name: "three-rows".into(),
            inputs: vec![file("rows.csv", "id\n1\n2\n3\n")],
            checks: vec![
                check(Kind::StdoutEquals(b"3 rows\n".to_vec())),
                check(Kind::FileJsonEquals(pb::FileContent {
                    path: "report.json".into(),
                    content: br#"{"rows": 3}"#.to_vec(),
                })),
            ],
            ..Default::default()
        }],
        contract: vec![check(Kind::FileJsonSchema(pb::FileJsonSchema {
            path: "report.json".into(),
            schema_json: r#"{"type":"object","required":["rows"],"properties":{"rows":{"type":"integer","minimum":1}}}"#.into(),
        }))],
        ..Default::default()
    }
}

fn by_ref(step_ref: &str, rows: &str) -> pb::RunStepRequest {
    pb::RunStepRequest {
        step_ref: step_ref.into(),
        inputs: vec![file("rows.csv", rows)],
        ..Default::default()
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

struct Server {
    catalog: StepCatalogClient<Channel>,
    runs: StepExecutorClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    _work: tempfile::TempDir,
}

impl Server {
    async fn start_with(
        exec: Arc<stepbox::Executor>,
        work: tempfile::TempDir,
        options: ServerOptions,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
            catalog: StepCatalogClient::new(channel.clone()),
            runs: StepExecutorClient::new(channel),
            stop: Some(tx),
            done,
            _work: work,
        }
    }

    /// A server whose catalog is the SQLite file `db` with [`stages`].
    async fn sqlite(db: &Path, mut options: ServerOptions) -> Server {
        let work = tempfile::tempdir().unwrap();
        let exec = Arc::new(new_executor(work.path()));
        let store = stepbox_store::Store::open(&stepbox_store::Store::sqlite_url(db))
            .await
            .unwrap();
        let catalog = Catalog::new(
            store,
            exec.clone(),
            stages(),
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap();
        options.catalog = Some(Arc::new(CatalogHandle::ready(Arc::new(catalog))));
        Server::start_with(exec, work, options).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }

    async fn publish(&mut self, step: pb::StepDefinition, allow: bool) -> pb::PublishStepResponse {
        self.catalog
            .publish_step(pb::PublishStepRequest {
                step: Some(step),
                allow_unverified: allow,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn promote(&mut self, step_ref: &str, stage: &str) -> pb::PromoteStepResponse {
        self.catalog
            .promote_step(pb::PromoteStepRequest {
                step_ref: step_ref.into(),
                stage: stage.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn run(&mut self, step_ref: &str, rows: &str) -> pb::RunStepResponse {
        self.runs
            .run_step(by_ref(step_ref, rows))
            .await
            .unwrap_or_else(|e| panic!("{step_ref}: {e:?}"))
            .into_inner()
    }
}

fn version_of(r: &pb::RunStepResponse) -> (String, i64, String) {
    let m = r.manifest.as_ref().unwrap();
    (m.step_name.clone(), m.step_version, m.step_digest.clone())
}

#[tokio::test]
async fn publish_promote_and_run_by_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::sqlite(&dir.path().join("catalog.db"), ServerOptions::default()).await;

    // Publishing runs the case: verified, v1.
    let p = s.publish(row_count(ROW_COUNT), false).await;
    let v1 = p.version.expect("stored");
    assert!(p.created && v1.verified && p.refused_reason.is_empty());
    assert_eq!((v1.number, v1.digest.len()), (1, 64));
    assert_eq!(p.case_results.len(), 1);
    let case = &p.case_results[0];
    assert_eq!(case.status(), pb::Status::Succeeded, "{}", case.message);
    assert_eq!(
        case.check_results.len(),
        3,
        "the case's two checks and the contract"
    );
    assert!(case.check_results.iter().all(|c| c.passed));
    assert_eq!(case.manifest_digest.len(), 64);
    let definition = v1.definition.expect("the definition comes back");
    assert_eq!(definition.program, ROW_COUNT.as_bytes());
    assert_eq!(definition.cases[0].checks.len(), 2);

    // The same content again is the same version; nothing new is stored.
    let again = s.publish(row_count(ROW_COUNT), false).await;
    let same = again.version.unwrap();
    assert!(!again.created);
    assert_eq!((same.number, &same.digest), (1, &v1.digest));

    // Failing cases: refused with the verdicts, and nothing stored...
    let wrong = row_count(&ROW_COUNT.replace("{len(rows)} rows", "{len(rows)} lines"));
    let refused = s.publish(wrong.clone(), false).await;
    assert!(refused.version.is_none() && !refused.created);
    assert!(
        refused
            .refused_reason
            .contains("1 of 1 cases failed: three-rows"),
        "{}",
        refused.refused_reason
    );
    assert_eq!(refused.case_results[0].status(), pb::Status::ChecksFailed);
    let listed = s
        .catalog
        .list_versions(pb::ListVersionsRequest {
            name: "row-count".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.versions.len(), 1);
    // ...unless asked: stored unverified as v2.
    let v2 = s.publish(wrong, true).await.version.unwrap();
    assert!(!v2.verified);
    assert_eq!(v2.number, 2);

    // v3: verified.
    let v3 = s
        .publish(row_count(&format!("# v3\n{ROW_COUNT}")), false)
        .await
        .version
        .unwrap();
    assert!(v3.verified);
    assert_eq!(v3.number, 3);

    // Unverified versions never pass the first stage.
    let r = s.promote("row-count@v2", "staging").await;
    assert!(!r.promoted);
    assert!(r.reason.contains("unverified"), "{}", r.reason);
    assert!(!r.record.unwrap().accepted);

    // v1 through dev, staging and prod (prod re-runs the case under `strict`).
    for stage in ["dev", "staging", "prod"] {
        let r = s.promote("row-count@v1", stage).await;
        assert!(r.promoted, "{stage}: {}", r.reason);
        let record = r.record.unwrap();
        assert_eq!(
            (record.to_number, record.to_digest.as_str()),
            (1, v1.digest.as_str())
        );
        assert_eq!(r.case_results.len(), 1);
    }
    let prod = s.run("row-count@prod", "id\n7\n").await;
    assert_eq!(prod.status(), pb::Status::Succeeded, "{}", prod.message);
    assert_eq!(prod.stdout, b"1 rows\n");
    assert_eq!(
        version_of(&prod),
        ("row-count".into(), 1, v1.digest.clone())
    );
    let m = prod.manifest.as_ref().unwrap();
    assert_eq!(m.policy, "strict", "prod's policy");
    assert_eq!(prod.check_results.len(), 1, "the contract check");

    // Promote v3 to prod: this replica sees it at once (its own write).
    assert!(s.promote("row-count@v3", "prod").await.promoted);
    assert_eq!(version_of(&s.run("row-count@prod", "id\n7\n").await).1, 3);
    // By number, by digest, and bare (the newest verified: v3, not the unverified v2).
    assert_eq!(version_of(&s.run("row-count@v1", "id\n7\n").await).1, 1);
    let by_digest = s
        .run(&format!("row-count@sha256:{}", v3.digest), "id\n7\n")
        .await;
    assert_eq!(
        version_of(&by_digest),
        ("row-count".into(), 3, v3.digest.clone())
    );
    assert_eq!(version_of(&s.run("row-count", "id\n7\n").await).1, 3);
    // The contract holds on every input: an empty CSV fails it.
    let empty = s.run("row-count@v1", "id\n").await;
    assert_eq!(
        empty.status(),
        pb::Status::ChecksFailed,
        "{}",
        empty.message
    );
    // Extra checks from the request come after the contract's.
    let mut req = by_ref("row-count@v1", "id\n1\n");
    req.checks
        .push(check(Kind::StdoutEquals(b"2 rows\n".to_vec())));
    let extra = s.runs.run_step(req).await.unwrap().into_inner();
    assert_eq!(extra.status(), pb::Status::ChecksFailed);
    assert_eq!(extra.check_results.len(), 2);
    assert!(extra.check_results[0].passed && !extra.check_results[1].passed);

    // Rollback: promote the older version again, gated the same way.
    let back = s.promote("row-count@v1", "prod").await;
    assert!(back.promoted, "{}", back.reason);
    let record = back.record.unwrap();
    assert_eq!((record.from_number, record.to_number), (3, 1));
    let after = s.run("row-count@prod", "id\n7\n").await;
    assert_eq!(version_of(&after).1, 1);

    // The run history keeps the version that ran.
    let got = s
        .runs
        .get_run(pb::GetRunRequest {
            run_id: after.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.manifest.unwrap().step_digest, v1.digest);

    // The audit trail: newest first, the refused attempt included.
    let history = s
        .catalog
        .list_promotions(pb::ListPromotionsRequest {
            name: "row-count".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .promotions;
    let trail: Vec<(String, i64, bool)> = history
        .iter()
        .map(|p| (p.stage.clone(), p.to_number, p.accepted))
        .collect();
    assert_eq!(
        trail,
        [
            ("prod".to_string(), 1, true),
            ("prod".to_string(), 3, true),
            ("prod".to_string(), 1, true),
            ("staging".to_string(), 1, true),
            ("dev".to_string(), 1, true),
            ("staging".to_string(), 2, false),
        ]
    );
    assert!(history.iter().all(|p| p.tenant == "local"));
    assert_eq!(history[0].policy, "strict");
    assert_eq!(history[0].cases[0].status(), pb::Status::Succeeded);
    assert_eq!(history[0].cases[0].manifest_digest.len(), 64);

    // GetStep: versions, where each stage points, and the selected version.
    let step = s
        .catalog
        .get_step(pb::GetStepRequest {
            step_ref: "row-count@prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(step.versions.len(), 3);
    assert!(step.versions.iter().all(|v| v.definition.is_none()));
    assert_eq!(step.selected.as_ref().unwrap().number, 1);
    assert!(step.selected.unwrap().definition.is_some());
    let stages: Vec<(String, String, i64)> = step
        .stages
        .iter()
        .map(|a| (a.stage.clone(), a.policy.clone(), a.number))
        .collect();
    assert_eq!(
        stages,
        [
            ("dev".to_string(), String::new(), 1),
            ("staging".to_string(), String::new(), 1),
            ("prod".to_string(), "strict".to_string(), 1),
        ]
    );
    let steps = s
        .catalog
        .list_steps(pb::ListStepsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(steps.len(), 1);
    assert_eq!((steps[0].latest_number, steps[0].versions), (3, 3));
    s.stop().await;
}

#[tokio::test]
async fn every_refusal_has_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::sqlite(&dir.path().join("catalog.db"), ServerOptions::default()).await;
    assert!(
        s.publish(row_count(ROW_COUNT), false)
            .await
            .version
            .is_some()
    );

    // A case that needs more than `strict` allows: fine under `default`, refused for prod.
    let heavy = pb::StepDefinition {
        name: "big-buffer".into(),
        description: "Holds 300 MiB".into(),
        runtime: "python".into(),
        program: b"b = bytearray(300 * 1024 * 1024)\nprint(len(b))\n".to_vec(),
        cases: vec![pb::StepCase {
            name: "allocates".into(),
            checks: vec![check(Kind::ExitCode(0))],
            ..Default::default()
        }],
        ..Default::default()
    };
    let p = s.publish(heavy, false).await;
    assert!(p.version.unwrap().verified, "{}", p.refused_reason);
    assert!(s.promote("big-buffer@v1", "staging").await.promoted);
    let r = s.promote("big-buffer@v1", "prod").await;
    assert!(!r.promoted);
    assert!(
        r.reason
            .contains("1 of 1 cases failed under policy `strict`: allocates"),
        "{}",
        r.reason
    );
    assert_eq!(r.case_results[0].status(), pb::Status::MemoryExceeded);
    assert!(!r.record.as_ref().unwrap().accepted);
    assert_eq!(
        r.record.unwrap().cases[0].status(),
        pb::Status::MemoryExceeded
    );
    let e = s
        .catalog
        .get_step(pb::GetStepRequest {
            step_ref: "big-buffer@prod".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "prod never moved: {}",
        e.message()
    );

    let code_of = |r: Result<tonic::Response<pb::PromoteStepResponse>, tonic::Status>| {
        let e = r.unwrap_err();
        (e.code(), e.message().to_string())
    };
    let (code, msg) = code_of(
        s.catalog
            .promote_step(pb::PromoteStepRequest {
                step_ref: "row-count@v1".into(),
                stage: "qa".into(),
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.starts_with("invalid `stage`: unknown stage `qa`"),
        "{msg}"
    );
    let (code, msg) = code_of(
        s.catalog
            .promote_step(pb::PromoteStepRequest {
                step_ref: "row-count@v7".into(),
                stage: "dev".into(),
            })
            .await,
    );
    assert_eq!(
        (code, msg.as_str()),
        (Code::NotFound, "no version `row-count@v7`")
    );

    // Runs by reference.
    for (step_ref, code, wanted) in [
        (
            "nope@prod",
            Code::NotFound,
            "no version of step `nope` in stage `prod`",
        ),
        ("row-count@v9", Code::NotFound, "no version `row-count@v9`"),
        ("nope", Code::NotFound, "no verified version of step `nope`"),
        (
            "row-count@qa",
            Code::InvalidArgument,
            "invalid `step_ref`: unknown stage `qa`",
        ),
        ("Row Count", Code::InvalidArgument, "invalid `step_ref`: "),
        ("row-count@", Code::InvalidArgument, "invalid `step_ref`: "),
    ] {
        let e = s
            .runs
            .run_step(by_ref(step_ref, "id\n1\n"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{step_ref}: {}", e.message());
        assert!(
            e.message().starts_with(wanted),
            "{step_ref}: {}",
            e.message()
        );
    }
    // Exactly one of `step` and `step_ref`.
    let mut both = by_ref("row-count@v1", "id\n1\n");
    both.step = Some(pb::Step {
        runtime: "python".into(),
        source: "print(1)".into(),
        ..Default::default()
    });
    let e = s.runs.run_step(both.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("invalid `step_ref`: is set together with `step`"),
        "{}",
        e.message()
    );
    let mut stream = s.runs.clone();
    let e = stream.run_step_stream(both).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = s
        .runs
        .run_step(pb::RunStepRequest::default())
        .await
        .unwrap_err();
    assert!(e.message().contains("`step_ref`"), "{}", e.message());
    // A policy other than the one the reference runs under.
    let mut other_policy = by_ref("row-count@v1", "id\n1\n");
    other_policy.policy = "heavy".into();
    let e = s.runs.run_step(other_policy).await.unwrap_err();
    assert!(
        e.message().starts_with("invalid `policy`"),
        "{}",
        e.message()
    );
    // The stream by reference works and records the version.
    let mut events = s
        .runs
        .run_step_stream(by_ref("row-count@v1", "id\n1\n"))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(e) = events.message().await.unwrap() {
        last = e.event;
    }
    let Some(pb::run_step_event::Event::Response(r)) = last else {
        panic!("no response")
    };
    assert_eq!(version_of(&r).1, 1);

    // Bad definitions name the field.
    let mut bad = row_count(ROW_COUNT);
    bad.name = "Row".into();
    let e = s
        .catalog
        .publish_step(pb::PublishStepRequest {
            step: Some(bad),
            allow_unverified: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("invalid `step.name`"),
        "{}",
        e.message()
    );
    let mut bad = row_count(ROW_COUNT);
    bad.cases[0].checks[0] = check(Kind::FileExists("../x".into()));
    let e = s
        .catalog
        .publish_step(pb::PublishStepRequest {
            step: Some(bad),
            allow_unverified: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("cases[0]"), "{}", e.message());
    s.stop().await;
}

#[tokio::test]
async fn tenants_need_permissions_and_see_only_their_steps() {
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
    let tenants = Tenants::from_config(&[
        tenant("ops", vec![Run, Publish, Promote], vec![]),
        tenant("billing", vec![Run], vec!["billing-*"]),
        tenant("viewer", vec![], vec![]),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::sqlite(
        &dir.path().join("catalog.db"),
        ServerOptions {
            tenants: Arc::new(tenants),
            ..ServerOptions::default()
        },
    )
    .await;
    for name in ["billing-export", "hr-export"] {
        let mut step = row_count(ROW_COUNT);
        step.name = name.into();
        let p = s
            .catalog
            .publish_step(authed(
                pb::PublishStepRequest {
                    step: Some(step),
                    allow_unverified: false,
                },
                "ops-token",
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.version.unwrap().created_by, "ops");
    }

    // Without the permission: PERMISSION_DENIED.
    let e = s
        .catalog
        .publish_step(authed(
            pb::PublishStepRequest {
                step: Some(row_count(ROW_COUNT)),
                allow_unverified: false,
            },
            "billing-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("`publish`"), "{}", e.message());
    let e = s
        .catalog
        .promote_step(authed(
            pb::PromoteStepRequest {
                step_ref: "billing-export@v1".into(),
                stage: "dev".into(),
            },
            "billing-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = s
        .runs
        .run_step(authed(
            by_ref("billing-export@v1", "id\n1\n"),
            "viewer-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("`run`"), "{}", e.message());

    // A step it may not see is NOT_FOUND in the words of one that does not exist.
    let ok = s
        .runs
        .run_step(authed(
            by_ref("billing-export@v1", "id\n1\n"),
            "billing-token",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status(), pb::Status::Succeeded, "{}", ok.message);
    for (hidden, missing) in [
        ("hr-export@v1", "zz-export@v1"),
        ("hr-export", "zz-export"),
        ("hr-export@prod", "zz-export@prod"),
    ] {
        let run = |r: &str| {
            let mut c = s.runs.clone();
            let req = authed(by_ref(r, "id\n1\n"), "billing-token");
            async move { c.run_step(req).await.unwrap_err() }
        };
        let (h, m) = (run(hidden).await, run(missing).await);
        assert_eq!((h.code(), m.code()), (Code::NotFound, Code::NotFound));
        assert_eq!(
            h.message().replace("hr-export", "X"),
            m.message().replace("zz-export", "X")
        );
    }
    let get = |r: &str| {
        let mut c = s.catalog.clone();
        let req = authed(pb::GetStepRequest { step_ref: r.into() }, "billing-token");
        async move { c.get_step(req).await.unwrap_err() }
    };
    let (h, m) = (get("hr-export").await, get("zz-export").await);
    assert_eq!((h.code(), m.code()), (Code::NotFound, Code::NotFound));
    assert_eq!(
        h.message().replace("hr-export", "X"),
        m.message().replace("zz-export", "X")
    );
    let e = s
        .catalog
        .list_promotions(authed(
            pb::ListPromotionsRequest {
                name: "hr-export".into(),
                limit: 0,
            },
            "billing-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "no step `hr-export`")
    );
    let listed: Vec<String> = s
        .catalog
        .list_steps(authed(pb::ListStepsRequest::default(), "billing-token"))
        .await
        .unwrap()
        .into_inner()
        .steps
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, ["billing-export"]);
    let all = s
        .catalog
        .list_steps(authed(pb::ListStepsRequest::default(), "ops-token"))
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(all.len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn a_database_that_is_down_is_unavailable_and_inline_steps_keep_running() {
    let work = tempfile::tempdir().unwrap();
    let exec = Arc::new(new_executor(work.path()));
    let url = "postgres://u:secret@127.0.0.1:1/db";
    let handle = CatalogHandle::open(url, exec.clone(), stages(), Duration::from_millis(200))
        .await
        .expect("a database that is down does not stop the server");
    let mut s = Server::start_with(
        exec,
        work,
        ServerOptions {
            catalog: Some(Arc::new(handle)),
            shared_runs: Some(Retention {
                per_tenant: 10,
                max_age: Duration::from_secs(3600),
            }),
            ..ServerOptions::default()
        },
    )
    .await;
    let unavailable = |e: tonic::Status| {
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        assert!(
            e.message().contains("postgres://u:***@127.0.0.1:1/db")
                && !e.message().contains("secret"),
            "{}",
            e.message()
        );
    };
    unavailable(
        s.catalog
            .publish_step(pb::PublishStepRequest {
                step: Some(row_count(ROW_COUNT)),
                allow_unverified: false,
            })
            .await
            .unwrap_err(),
    );
    unavailable(
        s.catalog
            .list_steps(pb::ListStepsRequest::default())
            .await
            .unwrap_err(),
    );
    // Past the reopen interval it is tried again, and still answers UNAVAILABLE.
    tokio::time::sleep(stepbox::service::catalog::REOPEN_INTERVAL).await;
    unavailable(
        s.runs
            .run_step(by_ref("row-count@prod", "id\n1\n"))
            .await
            .unwrap_err(),
    );
    let inline = s
        .runs
        .run_step(pb::RunStepRequest {
            step: Some(pb::Step {
                runtime: "python".into(),
                source: "print('still here')".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inline.stdout, b"still here\n");
    unavailable(
        s.runs
            .get_run(pb::GetRunRequest {
                run_id: inline.run_id,
            })
            .await
            .unwrap_err(),
    );
    s.stop().await;
}

#[tokio::test]
async fn shared_run_history_on_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog.db");
    let shared = |per_tenant| ServerOptions {
        shared_runs: Some(Retention {
            per_tenant,
            max_age: Duration::from_secs(3600),
        }),
        ..ServerOptions::default()
    };
    let mut a = Server::sqlite(&db, shared(10)).await;
    let mut b = Server::sqlite(&db, shared(10)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = a
            .runs
            .run_step(pb::RunStepRequest {
                step: Some(pb::Step {
                    runtime: "python".into(),
                    source: format!("print({i})"),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(r.run_id);
    }
    // B finds A's run, and pages through A's runs newest first.
    let got = b
        .runs
        .get_run(pb::GetRunRequest {
            run_id: ids[1].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.run_id, ids[1]);
    let p1 = b
        .runs
        .list_runs(pb::ListRunsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        p1.runs
            .iter()
            .map(|r| r.run_id.as_str())
            .collect::<Vec<_>>(),
        [ids[2].as_str(), ids[1].as_str()]
    );
    assert_eq!(p1.next_page_token, format!("s1.{}", ids[1]));
    let p2 = b
        .runs
        .list_runs(pb::ListRunsRequest {
            page_size: 2,
            page_token: p1.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.runs.len(), 1);
    assert_eq!(p2.runs[0].run_id, ids[0]);
    assert!(p2.next_page_token.is_empty());
    let e = b
        .runs
        .list_runs(pb::ListRunsRequest {
            page_token: "r1.3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    a.stop().await;
    b.stop().await;
    // A replica that keeps 2 per tenant prunes at start.
    let mut c = Server::sqlite(&db, shared(2)).await;
    let mut listed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        listed = c
            .runs
            .list_runs(pb::ListRunsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .runs;
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        listed.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        [ids[2].as_str(), ids[1].as_str()]
    );
    c.stop().await;
}

/// A `stepbox serve` process; killed when dropped.
struct Replica {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    /// Starts `stepbox serve` with a config whose `[catalog]` database is `database`.
    fn start(database: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("stepbox.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\naddr = \"127.0.0.1:0\"\n[catalog]\ndatabase = \"{database}\"\nrefresh = \"200ms\"\n\
                 stages = [{{ name = \"dev\" }}, {{ name = \"staging\" }}, {{ name = \"prod\" }}]\n"
            ),
        )
        .unwrap();
        let mut child = stepbox_command(dir.path())
            .args(["serve", "--config"])
            .arg(&config)
            .env("STEPBOX_LOG", "warn")
            // Not configuration keys: they would only be reported as such.
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
        Replica {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn clients(&self) -> (StepCatalogClient<Channel>, StepExecutorClient<Channel>) {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (
            StepCatalogClient::new(channel.clone()),
            StepExecutorClient::new(channel),
        )
    }
}

#[tokio::test]
async fn stepbox_serve_starts_with_its_database_down() {
    let replica = Replica::start("postgres://u:secret@127.0.0.1:1/db");
    let (mut catalog, mut runs) = replica.clients().await;
    let e = catalog
        .get_step(pb::GetStepRequest {
            step_ref: "row-count".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("postgres://u:***@127.0.0.1:1/db") && !e.message().contains("secret"),
        "{}",
        e.message()
    );
    let r = runs
        .run_step(pb::RunStepRequest {
            step: Some(pb::Step {
                runtime: "python".into(),
                source: "print(6 * 7)".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"42\n");
}

/// A fresh PostgreSQL database for one test (dropped at the end), or None to skip when no
/// server is configured; under `CI` a missing server fails the test.
struct PgDatabase {
    url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    async fn create() -> Option<PgDatabase> {
        let Ok(admin) = std::env::var("STEPBOX_TEST_POSTGRES_URL") else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set but STEPBOX_TEST_POSTGRES_URL is not: the PostgreSQL tests must run \
                     in CI (start a server with `eval \"$(bash scripts/postgres.sh start)\"`)"
                );
            }
            eprintln!(
                "skipped: PostgreSQL (set STEPBOX_TEST_POSTGRES_URL; see scripts/postgres.sh)"
            );
            return None;
        };
        let name = format!("stepbox_catalog_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        // The admin URL's path names its database: swap it for the new one.
        let (base, _) = admin.rsplit_once('/').unwrap();
        let query = admin
            .split_once('?')
            .map(|(_, q)| format!("?{q}"))
            .unwrap_or_default();
        Some(PgDatabase {
            url: format!("{base}/{name}{query}"),
            admin,
            name,
        })
    }

    async fn drop_database(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin).await.unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn two_replicas_share_one_postgres_catalog() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let (a, b) = (Replica::start(&db.url), Replica::start(&db.url));
    let (mut a_catalog, mut a_runs) = a.clients().await;
    let (mut b_catalog, mut b_runs) = b.clients().await;

    // Publish on A (two versions), run by reference on B.
    let publish = |c: &mut StepCatalogClient<Channel>, program: String| {
        let mut c = c.clone();
        async move {
            c.publish_step(pb::PublishStepRequest {
                step: Some(row_count(&program)),
                allow_unverified: false,
            })
            .await
            .unwrap()
            .into_inner()
            .version
            .unwrap()
        }
    };
    let v1 = publish(&mut a_catalog, ROW_COUNT.to_string()).await;
    let v2 = publish(&mut a_catalog, format!("# v2\n{ROW_COUNT}")).await;
    assert_eq!((v1.number, v2.number), (1, 2));
    let on_b = b_runs
        .run_step(by_ref("row-count@v1", "id\n1\n"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        version_of(&on_b),
        ("row-count".into(), 1, v1.digest.clone())
    );
    assert_eq!(
        version_of(
            &b_runs
                .run_step(by_ref("row-count", "id\n1\n"))
                .await
                .unwrap()
                .into_inner()
        )
        .1,
        2
    );

    // A serves prod from its cache; B promotes; A sees it within the refresh bound.
    let promote = |c: &mut StepCatalogClient<Channel>, r: &str, stage: &str| {
        let mut c = c.clone();
        let req = pb::PromoteStepRequest {
            step_ref: r.into(),
            stage: stage.into(),
        };
        async move { c.promote_step(req).await.unwrap().into_inner() }
    };
    assert!(
        promote(&mut a_catalog, "row-count@v1", "prod")
            .await
            .promoted
    );
    assert_eq!(
        version_of(
            &a_runs
                .run_step(by_ref("row-count@prod", "id\n1\n"))
                .await
                .unwrap()
                .into_inner()
        )
        .1,
        1
    );
    let r = promote(&mut b_catalog, "row-count@v2", "prod").await;
    assert!(r.promoted, "{}", r.reason);
    let promoted_at = Instant::now();
    let mut seen = None;
    let mut polls = 0;
    while promoted_at.elapsed() < Duration::from_secs(10) {
        polls += 1;
        let r = a_runs
            .run_step(by_ref("row-count@prod", "id\n1\n"))
            .await
            .unwrap()
            .into_inner();
        if version_of(&r).1 == 2 {
            seen = Some(promoted_at.elapsed());
            break;
        }
    }
    let delay = seen.expect("replica A never saw B's promotion within 10 s");
    eprintln!(
        "replica propagation: A ran prod = v2 {delay:?} after B's promotion answered ({polls} runs polled; refresh 200ms)"
    );
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    // A's GetStep reads the store directly.
    let step = a_catalog
        .get_step(pb::GetStepRequest {
            step_ref: "row-count@prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(step.selected.unwrap().number, 2);

    // A run made on A is found on B.
    let on_a = a_runs
        .run_step(by_ref("row-count@v1", "id\n1\n2\n"))
        .await
        .unwrap()
        .into_inner();
    let got = b_runs
        .get_run(pb::GetRunRequest {
            run_id: on_a.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.manifest.unwrap().step_digest, v1.digest);
    let listed = b_runs
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs[0].run_id, on_a.run_id);

    // Two promotions of one stage at once, from both replicas: one winner, two audit records.
    // The case sleeps, so both read the stage before either writes.
    let slow = |tag: &str| {
        let mut s = row_count(&format!("import time\ntime.sleep(1)\n# {tag}\n{ROW_COUNT}"));
        s.name = "slow-count".into();
        s
    };
    let mut ids = Vec::new();
    for tag in ["x", "y"] {
        let v = a_catalog
            .publish_step(pb::PublishStepRequest {
                step: Some(slow(tag)),
                allow_unverified: false,
            })
            .await
            .unwrap()
            .into_inner()
            .version
            .unwrap();
        ids.push(v.digest);
    }
    let (ra, rb) = tokio::join!(
        promote(&mut a_catalog, "slow-count@v1", "staging"),
        promote(&mut b_catalog, "slow-count@v2", "staging"),
    );
    assert_eq!(
        [ra.promoted, rb.promoted].iter().filter(|p| **p).count(),
        1,
        "A: {} / B: {}",
        ra.reason,
        rb.reason
    );
    let loser = if ra.promoted { &rb } else { &ra };
    assert!(loser.reason.contains("concurrently"), "{}", loser.reason);
    let winner = if ra.promoted { &ra } else { &rb };
    let trail = b_catalog
        .list_promotions(pb::ListPromotionsRequest {
            name: "slow-count".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .promotions;
    assert_eq!(trail.len(), 2);
    assert_eq!(trail.iter().filter(|p| p.accepted).count(), 1);
    let step = a_catalog
        .get_step(pb::GetStepRequest {
            step_ref: "slow-count@staging".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        step.selected.unwrap().digest,
        winner.record.as_ref().unwrap().to_digest
    );
    drop((a, b));
    db.drop_database().await;
}
