//! Schedules in the store, on SQLite always and on PostgreSQL when `STEPBOX_TEST_POSTGRES_URL`
//! is set (under `CI` the PostgreSQL tests fail without it): exactly one of several racing
//! claims of an occurrence wins, the overlap policy is applied in the claim, dead runs are
//! reaped by their lease, pause/resume/delete, old firings pruned.

#[macro_use]
mod common;

use common::TestDb;

use std::sync::Arc;

use serde_json::json;
use stepbox_store::{Claim, FiringStatus, Overlap, ScheduleRow, StoreError, Trigger};
use tokio::sync::Barrier;

both_backends!(
    racing_replicas_claim_an_occurrence_once,
    overlap_policies_in_the_claim,
    dead_runs_are_reaped_by_the_lease,
    pause_resume_delete_and_tenancy,
    old_firings_are_pruned_but_not_running_ones_nor_the_cursor,
);

fn schedule(id: &str, tenant: &str) -> ScheduleRow {
    ScheduleRow {
        id: id.into(),
        tenant: tenant.into(),
        name: "report".into(),
        created_at: 1_000,
        updated_at: 1_000,
        active_from: 1_000,
        paused: false,
        definition: json!({"cron": "* * * * * *"}),
    }
}

fn claim(id: &str, fire_at: i64, overlap: Overlap, replica: &str) -> Claim<'static> {
    Claim {
        schedule_id: Box::leak(id.to_string().into_boxed_str()),
        tenant: "t",
        fire_at,
        trigger: Trigger::Schedule,
        overlap,
        replica: Box::leak(replica.to_string().into_boxed_str()),
        now: fire_at,
        lease_ms: 60_000,
    }
}

mod cases {
    use super::*;

    pub async fn racing_replicas_claim_an_occurrence_once(db: &TestDb) {
        // Two replicas (two stores, two pools) and several tasks each race for the same
        // occurrences: every occurrence has exactly one winner, and one row.
        let a = db.open().await;
        let b = db.open().await;
        a.create_schedule(&schedule("s", "t")).await.unwrap();
        for fire_at in [2_000, 3_000, 4_000] {
            let barrier = Arc::new(Barrier::new(8));
            let mut tasks = Vec::new();
            for i in 0..8 {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                let barrier = barrier.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let c = claim("s", fire_at, Overlap::Allow, &format!("replica-{i}"));
                    store.claim_firing(&c).await.unwrap()
                }));
            }
            let mut won = Vec::new();
            for t in tasks {
                if let Some(status) = t.await.unwrap() {
                    won.push(status);
                }
            }
            assert_eq!(won, vec![FiringStatus::Running], "at {fire_at}");
        }
        let rows = a.list_firings("t", "s", 10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.fire_at).collect::<Vec<_>>(),
            vec![4_000, 3_000, 2_000]
        );
        assert!(
            rows.iter()
                .all(|r| r.trigger == "schedule" && r.status == "running")
        );
        assert_eq!(b.last_scheduled_firing("s").await.unwrap(), Some(4_000));
        assert_eq!(b.last_scheduled_firing("other").await.unwrap(), None);
        // A skipped record of an occurrence already claimed is not recorded again.
        assert!(
            !a.record_skipped_firing(
                &claim("s", 3_000, Overlap::Skip, "r"),
                FiringStatus::SkippedMissed,
                "m"
            )
            .await
            .unwrap()
        );
        assert!(
            a.record_skipped_firing(
                &claim("s", 1_500, Overlap::Skip, "r"),
                FiringStatus::SkippedMissed,
                "m"
            )
            .await
            .unwrap()
        );
        a.finish_firing("s", 4_000, FiringStatus::Succeeded, "run-1", "", 4_500)
            .await
            .unwrap();
        let rows = b.list_firings("t", "s", 1).await.unwrap();
        assert_eq!(rows[0].status, "succeeded");
        assert_eq!(rows[0].run_id, "run-1");
    }

    pub async fn overlap_policies_in_the_claim(db: &TestDb) {
        let store = db.open().await;
        for (id, overlap) in [
            ("skip", Overlap::Skip),
            ("queue", Overlap::QueueOne),
            ("allow", Overlap::Allow),
        ] {
            store.create_schedule(&schedule(id, "t")).await.unwrap();
            let first = store.claim_firing(&claim(id, 2_000, overlap, "r")).await;
            assert_eq!(first.unwrap(), Some(FiringStatus::Running), "{id}");
            let second = store
                .claim_firing(&claim(id, 3_000, overlap, "r"))
                .await
                .unwrap();
            let third = store
                .claim_firing(&claim(id, 4_000, overlap, "r"))
                .await
                .unwrap();
            let expected = match overlap {
                Overlap::Skip => [FiringStatus::SkippedOverlap, FiringStatus::SkippedOverlap],
                Overlap::QueueOne => [FiringStatus::Queued, FiringStatus::SkippedOverlap],
                Overlap::Allow => [FiringStatus::Running, FiringStatus::Running],
            };
            assert_eq!([second.unwrap(), third.unwrap()], expected, "{id}");
        }
        // The queued one starts only once nothing runs, and only once.
        assert_eq!(
            store
                .start_queued_firing("queue", "r", 3_500, 60_000)
                .await
                .unwrap(),
            None
        );
        store
            .finish_firing("queue", 2_000, FiringStatus::Succeeded, "x", "", 3_600)
            .await
            .unwrap();
        let (x, y) = tokio::join!(
            store.start_queued_firing("queue", "a", 3_700, 60_000),
            store.start_queued_firing("queue", "b", 3_700, 60_000)
        );
        let mut started = [x.unwrap(), y.unwrap()];
        started.sort();
        assert_eq!(started, [None, Some(3_000)]);
        // Nothing else waits now.
        let rows = store.list_firings("t", "queue", 10).await.unwrap();
        let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(statuses, ["skipped_overlap", "running", "succeeded"]);
    }

    pub async fn dead_runs_are_reaped_by_the_lease(db: &TestDb) {
        let store = db.open().await;
        store.create_schedule(&schedule("s", "t")).await.unwrap();
        let mut c = claim("s", 2_000, Overlap::Skip, "dead-replica");
        assert_eq!(
            store.claim_firing(&c).await.unwrap(),
            Some(FiringStatus::Running)
        );
        // Within the lease (heartbeat kept): still running, the next one is skipped.
        store.heartbeat_firing("s", 2_000, 50_000).await.unwrap();
        c.fire_at = 100_000;
        c.now = 100_000;
        assert_eq!(
            store.claim_firing(&c).await.unwrap(),
            Some(FiringStatus::SkippedOverlap)
        );
        // No heartbeat for longer than the lease: the dead run is failed and the next one runs.
        c.fire_at = 111_000;
        c.now = 111_000;
        assert_eq!(
            store.claim_firing(&c).await.unwrap(),
            Some(FiringStatus::Running)
        );
        let rows = store.list_firings("t", "s", 10).await.unwrap();
        let dead = rows.iter().find(|r| r.fire_at == 2_000).unwrap();
        assert_eq!(dead.status, "failed");
        assert!(dead.message.contains("no heartbeat"), "{}", dead.message);
    }

    pub async fn pause_resume_delete_and_tenancy(db: &TestDb) {
        let store = db.open().await;
        store.create_schedule(&schedule("s", "t")).await.unwrap();
        store
            .create_schedule(&schedule("o", "other"))
            .await
            .unwrap();
        let err = store
            .create_schedule(&schedule("s", "t"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidArgument { field: "id", .. }),
            "{err}"
        );
        assert_eq!(store.list_schedules(None).await.unwrap().len(), 2);
        assert_eq!(store.list_schedules(Some("t")).await.unwrap().len(), 1);
        assert!(store.get_schedule("other", "s").await.unwrap().is_none());
        let got = store.get_schedule("t", "s").await.unwrap().unwrap();
        assert_eq!(got, schedule("s", "t"));

        assert!(
            !store
                .set_schedule_paused("other", "s", true, 5_000)
                .await
                .unwrap()
        );
        assert!(
            store
                .set_schedule_paused("t", "s", true, 5_000)
                .await
                .unwrap()
        );
        let active: Vec<String> = store
            .list_schedules(None)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(active, ["o"]);
        // Resuming moves `active_from`: the pause's occurrences are not due.
        assert!(
            store
                .set_schedule_paused("t", "s", false, 9_000)
                .await
                .unwrap()
        );
        let s = store.get_schedule("t", "s").await.unwrap().unwrap();
        assert!(!s.paused);
        assert_eq!(s.active_from, 9_000);
        // Resuming a running schedule leaves it alone.
        assert!(
            store
                .set_schedule_paused("t", "s", false, 12_000)
                .await
                .unwrap()
        );
        assert_eq!(
            store
                .get_schedule("t", "s")
                .await
                .unwrap()
                .unwrap()
                .active_from,
            9_000
        );

        store
            .claim_firing(&claim("s", 10_000, Overlap::Skip, "r"))
            .await
            .unwrap();
        assert!(
            store
                .list_firings("other", "s", 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(!store.delete_schedule("other", "s").await.unwrap());
        assert!(store.delete_schedule("t", "s").await.unwrap());
        assert!(store.get_schedule("t", "s").await.unwrap().is_none());
        assert!(store.list_firings("t", "s", 10).await.unwrap().is_empty());
    }

    pub async fn old_firings_are_pruned_but_not_running_ones_nor_the_cursor(db: &TestDb) {
        let store = db.open().await;
        store.create_schedule(&schedule("s", "t")).await.unwrap();
        store.create_schedule(&schedule("u", "t")).await.unwrap();
        // `s`: six scheduled firings at 1..6 s, ended at that time; one manual firing after
        // them; one still running (never deleted).
        for i in 1..=6 {
            let at = i * 1_000;
            store
                .claim_firing(&claim("s", at, Overlap::Allow, "r"))
                .await
                .unwrap();
            store
                .finish_firing("s", at, FiringStatus::Succeeded, "run", "", at)
                .await
                .unwrap();
        }
        let mut manual = claim("s", 7_000, Overlap::Allow, "r");
        manual.trigger = Trigger::Manual;
        store.claim_firing(&manual).await.unwrap();
        store
            .finish_firing("s", 7_000, FiringStatus::Failed, "", "boom", 7_000)
            .await
            .unwrap();
        store
            .claim_firing(&claim("u", 1_000, Overlap::Allow, "r"))
            .await
            .unwrap();
        let at = |rows: Vec<stepbox_store::FiringRow>| -> Vec<i64> {
            rows.iter().map(|r| r.fire_at).collect()
        };

        // Keep the newest 3 of each schedule, no age limit: `s` loses 1..4 s.
        assert_eq!(store.prune_firings(3, 0).await.unwrap(), 4);
        assert_eq!(
            at(store.list_firings("t", "s", 100).await.unwrap()),
            [7_000, 6_000, 5_000]
        );
        // Keep 1: the manual firing is newest, but the newest scheduled one (the cursor a
        // restarted replica resumes from) stays too.
        assert_eq!(store.prune_firings(1, 0).await.unwrap(), 1);
        assert_eq!(
            at(store.list_firings("t", "s", 100).await.unwrap()),
            [7_000, 6_000]
        );
        assert_eq!(store.last_scheduled_firing("s").await.unwrap(), Some(6_000));
        // By age: everything ended before 100 s goes, except the cursor and the running firing.
        assert_eq!(store.prune_firings(1000, 100_000).await.unwrap(), 1);
        assert_eq!(
            at(store.list_firings("t", "s", 100).await.unwrap()),
            [6_000]
        );
        assert_eq!(
            at(store.list_firings("t", "u", 100).await.unwrap()),
            [1_000]
        );
        assert_eq!(store.prune_firings(0, i64::MAX).await.unwrap(), 0);
    }
}
