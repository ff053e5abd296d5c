//! The store's behaviour, one suite run twice: on a temporary SQLite file (always) and on a fresh
//! PostgreSQL database per test when `STEPBOX_TEST_POSTGRES_URL` names a role that may create
//! databases (`eval "$(scripts/postgres.sh start)"`). Under `CI` the PostgreSQL tests fail
//! without it instead of skipping.

#[macro_use]
mod common;

use common::TestDb;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;
use stepbox_store::{
    Backend, Kind, NewVersion, Promotion, PromotionOutcome, Store, StoreError, StoreOptions,
    VersionState,
};
use tokio::sync::Barrier;

both_backends!(
    publish_is_idempotent_and_numbered,
    lookups_and_kinds,
    list_names_filters,
    promotion_audit_and_compare_and_swap,
    concurrent_promotions_have_one_winner,
    concurrent_publishes_get_distinct_numbers,
    replica_sees_promotion_through_generation,
    run_history,
    prune_by_age_and_count,
    workflow_runs_are_pruned_by_count_and_age,
    reopen_is_idempotent,
    first_open_by_two_replicas_at_once,
    upgrade_from_previous_schema,
    refusals,
);

/// A sha256-shaped digest from a small number.
fn digest(n: u32) -> String {
    format!("{n:064x}")
}

fn version(name: &str, n: u32, state: VersionState) -> NewVersion {
    NewVersion {
        kind: Kind::Step,
        name: name.to_string(),
        digest: digest(n),
        state,
        description: format!("Checks CSV files, variant {n}"),
        document: json!({"program": format!("print({n})"), "runtime": "python", "n": n}),
        evidence: json!({"cases": [{"status": "SUCCEEDED", "n": n}]}),
        created_by: "tenant-a".to_string(),
    }
}

fn promotion(stage: &str, expected: Option<u32>, to: u32, accepted: bool) -> Promotion {
    Promotion {
        kind: Kind::Step,
        name: "csv-check".to_string(),
        stage: stage.to_string(),
        expected_current: expected.map(digest),
        to_digest: digest(to),
        tenant: "tenant-a".to_string(),
        accepted,
        reason: if accepted {
            "all cases passed"
        } else {
            "case 2 failed"
        }
        .to_string(),
        evidence: json!({"cases": ["sha256:aa"], "to": to}),
    }
}

mod cases {
    use super::*;

    pub async fn publish_is_idempotent_and_numbered(db: &TestDb) {
        let store = db.open().await;
        let g0 = store.catalog_generation().await.unwrap();
        let (v1, created) = store
            .publish_version(&version("csv-check", 1, VersionState::Verified))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(v1.number, 1);
        assert_eq!(v1.document["n"], 1);
        let g1 = store.catalog_generation().await.unwrap();
        assert!(g1 > g0, "a publish bumps the generation");

        // Same digest again, even with other metadata: the stored row, unchanged, no new number.
        let mut again = version("csv-check", 1, VersionState::Unverified);
        again.created_by = "tenant-b".into();
        let (same, created) = store.publish_version(&again).await.unwrap();
        assert!(!created);
        assert_eq!(same, v1);
        assert_eq!(store.catalog_generation().await.unwrap(), g1);

        let (v2, created) = store
            .publish_version(&version("csv-check", 2, VersionState::Verified))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(v2.number, 2);
        let (v3, _) = store
            .publish_version(&version("csv-check", 3, VersionState::Unverified))
            .await
            .unwrap();
        assert_eq!(v3.number, 3);
        // Numbers are per name.
        let (other, _) = store
            .publish_version(&version("other", 9, VersionState::Verified))
            .await
            .unwrap();
        assert_eq!(other.number, 1);

        let all = store.list_versions(Kind::Step, "csv-check").await.unwrap();
        assert_eq!(all.iter().map(|v| v.number).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[0], v1);
    }

    pub async fn lookups_and_kinds(db: &TestDb) {
        let store = db.open().await;
        assert_eq!(
            store
                .latest_verified(Kind::Step, "csv-check")
                .await
                .unwrap(),
            None
        );
        let (v1, _) = store
            .publish_version(&version("csv-check", 1, VersionState::Verified))
            .await
            .unwrap();
        let (v2, _) = store
            .publish_version(&version("csv-check", 2, VersionState::Verified))
            .await
            .unwrap();
        store
            .publish_version(&version("csv-check", 3, VersionState::Unverified))
            .await
            .unwrap();

        let by_digest = store
            .get_version_by_digest(Kind::Step, "csv-check", &digest(1))
            .await
            .unwrap();
        assert_eq!(by_digest, Some(v1.clone()));
        let by_number = store
            .get_version_by_number(Kind::Step, "csv-check", 2)
            .await
            .unwrap();
        assert_eq!(by_number, Some(v2.clone()));
        assert_eq!(
            store
                .get_version_by_number(Kind::Step, "csv-check", 4)
                .await
                .unwrap(),
            None
        );
        // The unverified v3 is newer but a bare name means the latest verified one.
        let latest = store
            .latest_verified(Kind::Step, "csv-check")
            .await
            .unwrap();
        assert_eq!(latest.map(|v| v.number), Some(2));

        // A workflow with the same name and digest is a separate entry with its own numbering.
        let mut workflow = version("csv-check", 1, VersionState::Verified);
        workflow.kind = Kind::Workflow;
        let (w, created) = store.publish_version(&workflow).await.unwrap();
        assert!(created);
        assert_eq!((w.kind, w.number), (Kind::Workflow, 1));
        assert_eq!(
            store
                .list_versions(Kind::Workflow, "csv-check")
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store
                .get_version_by_digest(Kind::Workflow, "csv-check", &digest(2))
                .await
                .unwrap(),
            None
        );
    }

    pub async fn list_names_filters(db: &TestDb) {
        let store = db.open().await;
        for (name, n, description) in [
            ("csv-check", 1, "Checks CSV files"),
            ("csv-check", 2, "Validates bulk-edit CSV files"),
            ("json-report", 3, "Writes a JSON report, 100% offline"),
            ("zip", 4, "Packs outputs"),
        ] {
            let mut v = version(name, n, VersionState::Verified);
            v.description = description.into();
            store.publish_version(&v).await.unwrap();
        }
        let all = store.list_names(Kind::Step, None).await.unwrap();
        let names: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["csv-check", "json-report", "zip"]);
        assert_eq!(all[0].latest_number, 2);
        assert_eq!(all[0].latest_digest, digest(2));
        assert_eq!(all[0].description, "Validates bulk-edit CSV files");
        assert_eq!(all[0].versions, 2);

        let by_desc = store.list_names(Kind::Step, Some("BULK")).await.unwrap();
        assert_eq!(by_desc.len(), 1);
        assert_eq!(by_desc[0].name, "csv-check");
        // An old description does not match: only the newest version's is searched.
        assert!(
            store
                .list_names(Kind::Step, Some("checks csv"))
                .await
                .unwrap()
                .is_empty()
        );
        let by_name = store.list_names(Kind::Step, Some("json")).await.unwrap();
        assert_eq!(by_name[0].name, "json-report");
        // LIKE wildcards in the filter are literal.
        let percent = store.list_names(Kind::Step, Some("100%")).await.unwrap();
        assert_eq!(percent.len(), 1);
        assert!(
            store
                .list_names(Kind::Step, Some("_"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .list_names(Kind::Workflow, None)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn promotion_audit_and_compare_and_swap(db: &TestDb) {
        let store = db.open().await;
        for n in 1..=3 {
            store
                .publish_version(&version("csv-check", n, VersionState::Verified))
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .get_stage(Kind::Step, "csv-check", "dev")
                .await
                .unwrap(),
            None
        );

        let outcome = store
            .promote(&promotion("dev", None, 1, true))
            .await
            .unwrap();
        let PromotionOutcome::Promoted(first) = &outcome else {
            panic!("expected Promoted, got {outcome:?}")
        };
        assert_eq!(first.from_digest, None);
        assert!(first.accepted);
        let dev = store
            .get_stage(Kind::Step, "csv-check", "dev")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((dev.digest.as_str(), dev.number), (digest(1).as_str(), 1));
        assert_eq!(dev.updated_by, "tenant-a");
        assert_eq!(dev.generation, store.catalog_generation().await.unwrap());

        // dev -> v2 from the right expected value.
        let outcome = store
            .promote(&promotion("dev", Some(1), 2, true))
            .await
            .unwrap();
        assert!(
            matches!(outcome, PromotionOutcome::Promoted(ref r) if r.from_digest == Some(digest(1)))
        );

        // A stale expected value: refused with the store's reason, the alias stays.
        let outcome = store
            .promote(&promotion("dev", Some(1), 3, true))
            .await
            .unwrap();
        let PromotionOutcome::Conflict { record, current } = &outcome else {
            panic!("expected Conflict, got {outcome:?}")
        };
        assert_eq!(current.as_deref(), Some(digest(2).as_str()));
        assert!(!record.accepted);
        assert_eq!(
            record.reason,
            format!(
                "stage moved concurrently from sha256:{} to sha256:{}",
                digest(1),
                digest(2)
            )
        );
        // Expecting an unset stage that is set is a conflict too.
        let outcome = store
            .promote(&promotion("dev", None, 3, true))
            .await
            .unwrap();
        assert!(matches!(outcome, PromotionOutcome::Conflict { .. }));

        // The caller's refusal: recorded, alias unchanged.
        let outcome = store
            .promote(&promotion("dev", Some(2), 3, false))
            .await
            .unwrap();
        let PromotionOutcome::Refused(refused) = &outcome else {
            panic!("expected Refused, got {outcome:?}")
        };
        assert_eq!(refused.reason, "case 2 failed");
        let dev = store
            .get_stage(Kind::Step, "csv-check", "dev")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dev.number, 2);

        store
            .promote(&promotion("prod", None, 1, true))
            .await
            .unwrap();
        let stages = store.list_stages(Kind::Step, "csv-check").await.unwrap();
        let names: Vec<_> = stages
            .iter()
            .map(|s| (s.stage.as_str(), s.number))
            .collect();
        assert_eq!(names, [("dev", 2), ("prod", 1)]);

        let trail = store
            .list_promotions(Kind::Step, "csv-check", 100)
            .await
            .unwrap();
        assert_eq!(trail.len(), 6);
        assert!(trail.windows(2).all(|w| w[0].id > w[1].id), "newest first");
        assert_eq!(trail[0].stage, "prod");
        assert_eq!(trail[1].reason, "case 2 failed");
        assert_eq!(trail[1].evidence, json!({"cases": ["sha256:aa"], "to": 3}));
        let accepted: Vec<bool> = trail.iter().map(|r| r.accepted).collect();
        assert_eq!(accepted, [true, false, false, false, true, true]);
        assert_eq!(
            store
                .list_promotions(Kind::Step, "csv-check", 2)
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(
            store
                .list_promotions(Kind::Workflow, "csv-check", 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn concurrent_promotions_have_one_winner(db: &TestDb) {
        // Two replicas (two stores, two pools) on one database.
        let a = db.open().await;
        let b = db.open().await;
        for n in 1..=20 {
            a.publish_version(&version("csv-check", n, VersionState::Verified))
                .await
                .unwrap();
        }
        let mut expected: Option<u32> = None;
        let rounds = 8;
        for round in 0..rounds {
            let barrier = Arc::new(Barrier::new(2));
            let (to_a, to_b) = (2 * round + 1, 2 * round + 2);
            let spawn = |store: Store, to: u32| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    store
                        .promote(&promotion("prod", expected, to, true))
                        .await
                        .unwrap()
                })
            };
            let ta = spawn(a.clone(), to_a);
            let tb = spawn(b.clone(), to_b);
            let (oa, ob) = (ta.await.unwrap(), tb.await.unwrap());
            let winners: Vec<_> = [&oa, &ob]
                .into_iter()
                .filter(|o| matches!(o, PromotionOutcome::Promoted(_)))
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {oa:?} / {ob:?}");
            let winner = winners[0].record().to_digest.clone();
            let loser = [&oa, &ob]
                .into_iter()
                .find(|o| matches!(o, PromotionOutcome::Conflict { .. }))
                .expect("the other one conflicts");
            let PromotionOutcome::Conflict { current, .. } = loser else {
                unreachable!()
            };
            assert_eq!(current.as_deref(), Some(winner.as_str()));
            let stage = b
                .get_stage(Kind::Step, "csv-check", "prod")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stage.digest, winner);
            expected = Some(if winner == digest(to_a) { to_a } else { to_b });
        }
        let trail = a
            .list_promotions(Kind::Step, "csv-check", 1000)
            .await
            .unwrap();
        assert_eq!(
            trail.len(),
            2 * rounds as usize,
            "two audit records per round"
        );
        assert_eq!(trail.iter().filter(|r| r.accepted).count(), rounds as usize);
    }

    pub async fn concurrent_publishes_get_distinct_numbers(db: &TestDb) {
        let a = db.open().await;
        let b = db.open().await;
        let barrier = Arc::new(Barrier::new(12));
        let mut tasks = Vec::new();
        // Ten different versions, plus two more publishes of version 1.
        for (i, n) in (1..=10).chain([1, 1]).enumerate() {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .publish_version(&version("csv-check", n, VersionState::Verified))
                    .await
                    .unwrap()
            }));
        }
        let mut created = 0;
        for t in tasks {
            let (_, c) = t.await.unwrap();
            created += usize::from(c);
        }
        assert_eq!(created, 10, "the same digest is created once");
        let all = a.list_versions(Kind::Step, "csv-check").await.unwrap();
        assert_eq!(
            all.iter().map(|v| v.number).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        let mut digests: Vec<_> = all.iter().map(|v| v.digest.clone()).collect();
        digests.sort();
        digests.dedup();
        assert_eq!(digests.len(), 10);
    }

    pub async fn replica_sees_promotion_through_generation(db: &TestDb) {
        let a = db.open().await;
        let b = db.open().await;
        a.publish_version(&version("csv-check", 1, VersionState::Verified))
            .await
            .unwrap();
        // Replica b caches "prod is unset" at generation g.
        let g = b.catalog_generation().await.unwrap();
        assert_eq!(
            b.get_stage(Kind::Step, "csv-check", "prod").await.unwrap(),
            None
        );
        a.promote(&promotion("prod", None, 1, true)).await.unwrap();
        // Its next poll sees a new generation, so it re-reads and finds the promotion.
        let g2 = b.catalog_generation().await.unwrap();
        assert!(g2 > g);
        let prod = b
            .get_stage(Kind::Step, "csv-check", "prod")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(prod.digest, digest(1));
        assert_eq!(prod.generation, g2);
        // Reads do not move it.
        b.list_stages(Kind::Step, "csv-check").await.unwrap();
        assert_eq!(a.catalog_generation().await.unwrap(), g2);
    }

    pub async fn run_history(db: &TestDb) {
        let store = db.open().await;
        let statuses = ["SUCCEEDED", "FAILED", "SUCCEEDED", "TIMED_OUT", "SUCCEEDED"];
        for (i, status) in statuses.iter().enumerate() {
            store
                .record_run(
                    "tenant-a",
                    &format!("run-{i}"),
                    1_000 + i as i64,
                    status,
                    &[i as u8; 3],
                )
                .await
                .unwrap();
        }
        store
            .record_run("tenant-b", "run-b", 5, "FAILED", b"b")
            .await
            .unwrap();

        let run = store.get_run("tenant-a", "run-1").await.unwrap().unwrap();
        assert_eq!(
            (run.status.as_str(), run.record.as_slice()),
            ("FAILED", &[1u8; 3][..])
        );
        assert_eq!(run.created_at, 1_001);
        assert_eq!(
            store.get_run("tenant-b", "run-1").await.unwrap(),
            None,
            "another tenant's run"
        );
        assert_eq!(store.get_run("tenant-a", "nope").await.unwrap(), None);

        // Recording again replaces status and record, keeps the place.
        let seq_before = run.seq;
        let seq = store
            .record_run("tenant-a", "run-1", 1_001, "SUCCEEDED", b"final")
            .await
            .unwrap();
        assert_eq!(seq, seq_before);
        let run = store.get_run("tenant-a", "run-1").await.unwrap().unwrap();
        assert_eq!(
            (run.status.as_str(), run.record.as_slice()),
            ("SUCCEEDED", &b"final"[..])
        );

        // Pages of two, newest first.
        let p1 = store.list_runs("tenant-a", None, 2, None).await.unwrap();
        let ids = |p: &stepbox_store::RunPage| {
            p.runs.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&p1), ["run-4", "run-3"]);
        let p2 = store
            .list_runs("tenant-a", None, 2, p1.next_after_seq)
            .await
            .unwrap();
        assert_eq!(ids(&p2), ["run-2", "run-1"]);
        let p3 = store
            .list_runs("tenant-a", None, 2, p2.next_after_seq)
            .await
            .unwrap();
        assert_eq!(ids(&p3), ["run-0"]);
        assert_eq!(p3.next_after_seq, None);
        let exact = store.list_runs("tenant-a", None, 5, None).await.unwrap();
        assert_eq!((exact.runs.len(), exact.next_after_seq), (5, None));

        let ok = store
            .list_runs("tenant-a", Some("SUCCEEDED"), 10, None)
            .await
            .unwrap();
        assert_eq!(ids(&ok), ["run-4", "run-2", "run-1", "run-0"]);
        let ok2 = store
            .list_runs("tenant-a", Some("SUCCEEDED"), 2, Some(ok.runs[1].seq))
            .await
            .unwrap();
        assert_eq!(ids(&ok2), ["run-1", "run-0"]);
        let b = store.list_runs("tenant-b", None, 10, None).await.unwrap();
        assert_eq!(ids(&b), ["run-b"]);
        assert!(matches!(
            store.list_runs("tenant-a", None, 0, None).await,
            Err(StoreError::InvalidArgument {
                field: "page_size",
                ..
            })
        ));
    }

    pub async fn workflow_runs_are_pruned_by_count_and_age(db: &TestDb) {
        let store = db.open().await;
        let save = |tenant: &'static str, id: String, workflow: &'static str| {
            let store = store.clone();
            async move {
                store
                    .save_workflow_run(tenant, &id, workflow, "succeeded", &json!({"id": id}))
                    .await
                    .unwrap();
                // Distinct creation times, in order.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        };
        for i in 0..4 {
            save("t", format!("report-{i}"), "report").await;
        }
        save("t", "other-0".into(), "other").await;
        save("u", "report-u".into(), "report").await;
        // Listed newest first, per tenant, all workflows or one.
        let ids = |v: Vec<serde_json::Value>| -> Vec<String> {
            v.iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            ids(store.list_workflow_runs("t", None, 10).await.unwrap()),
            ["other-0", "report-3", "report-2", "report-1", "report-0"]
        );
        assert_eq!(
            ids(store
                .list_workflow_runs("t", Some("report"), 2)
                .await
                .unwrap()),
            ["report-3", "report-2"]
        );
        assert_eq!(
            ids(store.list_workflow_runs("u", None, 10).await.unwrap()),
            ["report-u"]
        );
        assert!(
            store
                .list_workflow_runs("nobody", None, 10)
                .await
                .unwrap()
                .is_empty()
        );
        // Two per tenant and workflow: t's two oldest reports go, nothing else.
        let deleted = store
            .prune_workflow_runs(2, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(deleted, 2);
        for (tenant, id, kept) in [
            ("t", "report-0", false),
            ("t", "report-1", false),
            ("t", "report-2", true),
            ("t", "report-3", true),
            ("t", "other-0", true),
            ("u", "report-u", true),
        ] {
            assert_eq!(
                store.get_workflow_run(tenant, id).await.unwrap().is_some(),
                kept,
                "{tenant}/{id}"
            );
        }
        // Nothing younger than a millisecond is left with a zero age.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .prune_workflow_runs(100, Duration::ZERO)
                .await
                .unwrap(),
            4
        );
        assert_eq!(store.get_workflow_run("u", "report-u").await.unwrap(), None);
    }

    pub async fn prune_by_age_and_count(db: &TestDb) {
        let store = db.open().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let hour = 3_600_000;
        // tenant-a: 2 runs two hours old, 5 recent ones. tenant-b: 2 recent.
        for i in 0..2 {
            store
                .record_run(
                    "tenant-a",
                    &format!("old-{i}"),
                    now - 2 * hour,
                    "SUCCEEDED",
                    b"x",
                )
                .await
                .unwrap();
        }
        for i in 0..5 {
            store
                .record_run("tenant-a", &format!("new-{i}"), now - i, "SUCCEEDED", b"x")
                .await
                .unwrap();
        }
        for i in 0..2 {
            store
                .record_run("tenant-b", &format!("b-{i}"), now, "FAILED", b"y")
                .await
                .unwrap();
        }
        // Keep 3 per tenant, nothing older than an hour: 2 old + 2 surplus of tenant-a go.
        let deleted = store
            .prune_runs(3, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(deleted, 4);
        let a = store.list_runs("tenant-a", None, 100, None).await.unwrap();
        let ids: Vec<_> = a.runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, ["new-4", "new-3", "new-2"]);
        assert_eq!(
            store
                .list_runs("tenant-b", None, 100, None)
                .await
                .unwrap()
                .runs
                .len(),
            2
        );
        assert_eq!(
            store
                .prune_runs(3, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
    }

    pub async fn reopen_is_idempotent(db: &TestDb) {
        let store = db.open().await;
        store
            .publish_version(&version("csv-check", 1, VersionState::Verified))
            .await
            .unwrap();
        store
            .record_run("t", "r", 1, "SUCCEEDED", b"r")
            .await
            .unwrap();
        let generation = store.catalog_generation().await.unwrap();
        store.close().await;
        let err = store.catalog_generation().await.unwrap_err();
        assert!(err.is_unavailable(), "a closed store is unavailable: {err}");

        // Two replicas starting at once against an existing database: migrations already applied.
        let (a, b) = tokio::join!(db.open(), db.open());
        assert_eq!(a.catalog_generation().await.unwrap(), generation);
        assert_eq!(
            b.list_versions(Kind::Step, "csv-check")
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(b.get_run("t", "r").await.unwrap().is_some());
        a.close().await;
        b.close().await;

        // A newer release migrated further (a rolling upgrade): this one still opens it.
        let future = "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                      execution_time) VALUES (99990101000000, 'from a newer release', $1, $2, 0)";
        match db.backend {
            Backend::Sqlite => {
                let path = db.url.strip_prefix("sqlite://").unwrap();
                let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
                sqlx::query(future)
                    .bind(true)
                    .bind(vec![0u8])
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                sqlx::query(future)
                    .bind(true)
                    .bind(vec![0u8])
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
            }
        }
        let store = db.open().await;
        assert_eq!(store.catalog_generation().await.unwrap(), generation);
    }

    pub async fn first_open_by_two_replicas_at_once(db: &TestDb) {
        // Both race to migrate an empty database; both must come up on one schema.
        let (a, b) = tokio::join!(Store::open(&db.url), Store::open(&db.url));
        let (a, b) = (a.unwrap(), b.unwrap());
        a.publish_version(&version("csv-check", 1, VersionState::Verified))
            .await
            .unwrap();
        assert_eq!(
            b.list_versions(Kind::Step, "csv-check")
                .await
                .unwrap()
                .len(),
            1
        );
    }

    /// The database at the previous schema (every migration but the newest: 0004 adds
    /// schedules) with a version in it; opening upgrades it and keeps the data.
    pub async fn upgrade_from_previous_schema(db: &TestDb) {
        let dir = tempfile::tempdir().unwrap();
        let backend = match db.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(backend);
        let mut files: Vec<_> = std::fs::read_dir(&source)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 2,
            "there is a previous schema to upgrade from"
        );
        for f in &files[..files.len() - 1] {
            std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        let previous = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
        let insert = "INSERT INTO versions (kind, name, number, digest, state, description, \
                      document, evidence, created_by, created_at) \
                      VALUES ('step', 'old', 1, $1, 'verified', 'from before', '{\"a\":1}', '[]', 't', 7)";
        match db.backend {
            Backend::Sqlite => {
                let path = db.url.strip_prefix("sqlite://").unwrap();
                std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true);
                let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
                previous.run(&mut conn).await.unwrap();
                sqlx::query(insert)
                    .bind(digest(1))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let schedules = sqlx::query("SELECT 1 FROM schedules")
                    .fetch_all(&mut conn)
                    .await;
                assert!(
                    schedules.is_err(),
                    "the previous schema has no schedules table"
                );
                conn.close().await.unwrap();
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                previous.run(&mut conn).await.unwrap();
                sqlx::query(insert)
                    .bind(digest(1))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
            }
        }
        let store = db.open().await;
        let old = store
            .get_version_by_number(Kind::Step, "old", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(old.document, json!({"a": 1}));
        assert_eq!(old.description, "from before");
        store
            .record_run("t", "r", 1, "SUCCEEDED", b"kept table")
            .await
            .unwrap();
        store
            .save_workflow_run("t", "w1", "report", "failed", &json!({"steps": []}))
            .await
            .unwrap();
        assert_eq!(
            store.get_workflow_run("t", "w1").await.unwrap(),
            Some(json!({"steps": []}))
        );
        assert_eq!(store.get_workflow_run("other", "w1").await.unwrap(), None);
        store
            .create_schedule(&stepbox_store::ScheduleRow {
                id: "s1".into(),
                tenant: "t".into(),
                name: "report".into(),
                created_at: 1,
                updated_at: 1,
                active_from: 1,
                paused: false,
                definition: json!({"cron": "0 * * * * *"}),
            })
            .await
            .unwrap();
        assert_eq!(store.list_schedules(None).await.unwrap().len(), 1);
        let (v2, created) = store
            .publish_version(&version("old", 2, VersionState::Verified))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(v2.number, 2);
    }

    pub async fn refusals(db: &TestDb) {
        let store = db.open().await;
        let mut bad = version("csv-check", 1, VersionState::Verified);
        bad.digest = format!("sha256:{}", digest(1));
        let err = store.publish_version(&bad).await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::InvalidArgument {
                    field: "digest",
                    ..
                }
            ),
            "{err}"
        );
        bad.digest = digest(1).to_uppercase().replace('0', "A");
        assert!(store.publish_version(&bad).await.is_err());

        // Promoting a version that does not exist: NotFound, nothing recorded, stage untouched.
        let err = store
            .promote(&promotion("dev", None, 5, true))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&digest(5)), "{err}");
        assert!(
            store
                .list_promotions(Kind::Step, "csv-check", 10)
                .await
                .unwrap()
                .is_empty()
        );
        let mut p = promotion("dev", None, 1, true);
        p.expected_current = Some("HEAD".into());
        assert!(matches!(
            store.promote(&p).await,
            Err(StoreError::InvalidArgument {
                field: "expected_current",
                ..
            })
        ));
    }
}

/// A PostgreSQL server that is not there: a clear Unavailable naming the database with the
/// password masked, within the connect timeout, never a panic.
#[tokio::test]
async fn unreachable_postgres_is_unavailable_with_masked_password() {
    let started = Instant::now();
    let options = StoreOptions {
        acquire_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let err = Store::open_with("postgres://u:secret@127.0.0.1:1/db", &options)
        .await
        .unwrap_err();
    let message = err.to_string();
    eprintln!("{message} (after {:?})", started.elapsed());
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        message.starts_with("database postgres://u:***@127.0.0.1:1/db is unavailable: "),
        "{message}"
    );
    assert!(!message.contains("secret"), "{message}");
    assert!(!format!("{err:?}").contains("secret"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A SQLite file that cannot be created is Unavailable too, and an unknown scheme is a bad URL.
#[tokio::test]
async fn unusable_urls() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let url = Store::sqlite_url(&file.join("catalog.db"));
    let err = Store::open(&url).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");

    let err = Store::open("mysql://u:pw@h/db").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err:?}");
    assert!(err.to_string().contains("mysql://u:***@h/db"), "{err}");
    assert!(matches!(
        Store::open("sqlite://").await,
        Err(StoreError::InvalidUrl { .. })
    ));
}

/// A PostgreSQL database that goes away under an open store: Unavailable, not a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_database_going_away_is_unavailable() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.open().await;
    assert!(store.describe().contains(":***@"), "{}", store.describe());
    store.catalog_generation().await.unwrap();
    db.finish().await; // DROP DATABASE ... WITH (FORCE) ends the store's connections.
    let err = store.catalog_generation().await.unwrap_err();
    eprintln!("{err}");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains(store.describe()), "{err}");
}

#[test]
fn default_sqlite_path_is_under_the_data_home() {
    if let Some(path) = Store::default_sqlite_path() {
        assert!(path.ends_with("stepbox/catalog.db"), "{}", path.display());
        assert!(path.is_absolute());
    }
}

/// A server that accepts connections but never answers: Unavailable once the connect timeout
/// passes, not a hang.
#[tokio::test]
async fn silent_postgres_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let options = StoreOptions {
        acquire_timeout: Duration::from_millis(500),
        ..StoreOptions::default()
    };
    let started = Instant::now();
    let url = format!("postgres://u:secret@127.0.0.1:{port}/db");
    let err = Store::open_with(&url, &options).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("no answer within 500ms"), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    hold.abort();
}
