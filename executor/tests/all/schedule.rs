//! Workflow schedules through the library: real sandboxed runs, real inbox and outbox files, a
//! real SQLite file (and PostgreSQL when `STEPBOX_TEST_POSTGRES_URL` is set; under `CI` it must
//! be). Time is a hand-moved clock except in the one test where a per-second cron fires by the
//! system clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stepbox::catalog::Catalog;
use stepbox::job::limits::Millis;
use stepbox::workflow::Workflows;
use stepbox::workflow::artifacts::Artifacts;
use stepbox::workflow::model::WorkflowFile;
use stepbox::workflow::schedule::{
    Clock, ManualClock, Overlap, Schedule, ScheduleError, ScheduleInputs, Scheduler,
    SchedulerOptions, SystemClock, WorkflowsSection,
};
use stepbox_store::{FiringStatus, Store};

use crate::common;

/// Copies the newest sales file into a report, after sleeping `argv[1]` seconds.
const REPORT: &str = r##"
import sys, time
data = open("/input/sales.csv").read()
time.sleep(float(sys.argv[1]))
open("/output/report.md", "w").write("# report\n" + data)
"##;

fn workflow(sleep_secs: &str) -> WorkflowFile {
    let text = format!(
        r#"
name = "inbox-report"
[inputs]
sales = "sales.csv"
[[steps]]
id = "report"
program = "report.py"
source = {REPORT:?}
args = ["{sleep_secs}"]
inputs = {{ "sales.csv" = "inputs.sales" }}
[outputs]
report = "steps.report.outputs.report.md"
"#
    );
    toml::from_str(&text).unwrap()
}

/// A test's world: a data directory with the inbox/outbox roots and the artifact store.
struct World {
    dir: tempfile::TempDir,
    config: WorkflowsSection,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        for d in ["in/inbox", "out/outbox", "outside"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let config = WorkflowsSection {
            input_roots: vec![dir.path().join("in")],
            output_roots: vec![dir.path().join("out")],
            artifacts: Some(dir.path().join("artifacts")),
            ..WorkflowsSection::default()
        };
        World { dir, config }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn sqlite_url(&self) -> String {
        Store::sqlite_url(&self.path("catalog.db"))
    }

    /// One replica: its own store handle, executor and scheduler on the shared database.
    async fn replica(&self, url: &str, clock: Arc<dyn Clock>, name: &str) -> Scheduler {
        let store = Store::open(url).await.unwrap();
        let executor = Arc::new(common::new_executor(&self.path(&format!("work-{name}"))));
        let catalog = Catalog::new(
            store.clone(),
            executor,
            stepbox::catalog::default_stages(),
            None,
        )
        .await
        .unwrap();
        let artifacts = Arc::new(Artifacts::open(self.config.artifacts.as_ref().unwrap()).unwrap());
        let workflows = Workflows::new(Arc::new(catalog), artifacts.clone(), 2);
        Scheduler::new(
            store,
            workflows,
            artifacts,
            &self.config,
            clock,
            SchedulerOptions {
                replica: name.into(),
                ..SchedulerOptions::default()
            },
        )
        .unwrap()
    }

    fn inbox_schedule(&self, cron: &str, sleep_secs: &str) -> Schedule {
        Schedule {
            id: String::new(),
            tenant: String::new(),
            workflow: workflow(sleep_secs),
            workflow_ref: None,
            cron: cron.into(),
            timezone: "Europe/Berlin".into(),
            inputs: ScheduleInputs::Inbox {
                dir: self.path("in/inbox"),
                files: BTreeMap::from([("sales".into(), "sales-*.csv".into())]),
            },
            outbox: Some(self.path("out/outbox")),
            overlap: Overlap::Skip,
            catch_up: Millis(Duration::from_secs(3600)),
            paused: false,
        }
    }

    fn drop_inbox_file(&self, name: &str, body: &str, mtime_secs: u64) {
        let p = self.path("in/inbox").join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime_secs))
            .unwrap();
    }

    fn outbox(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(self.path("out/outbox"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// (occurrence in RFC 3339 UTC, status) of a schedule's firings, oldest first.
async fn statuses(s: &Scheduler, id: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = s
        .firings("acme", id, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|f| {
            let t = DateTime::<Utc>::from_timestamp_millis(f.fire_at).unwrap();
            (t.format("%H:%M:%S").to_string(), f.status)
        })
        .collect();
    v.reverse();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_second_cron_fires_and_delivers_the_newest_inbox_file() {
    let w = World::new();
    // The newest matching file is taken, not the newest file, not a link.
    w.drop_inbox_file("sales-2026-01.csv", "january\n", 1_000);
    w.drop_inbox_file("sales-2026-02.csv", "february\n", 2_000);
    w.drop_inbox_file("notes.csv", "not sales\n", 3_000);
    std::fs::write(w.path("outside/secret.csv"), "secret\n").unwrap();
    std::os::unix::fs::symlink(
        w.path("outside/secret.csv"),
        w.path("in/inbox/sales-2099.csv"),
    )
    .unwrap();

    let scheduler = w
        .replica(&w.sqlite_url(), Arc::new(SystemClock), "only")
        .await;
    let s = scheduler
        .create("acme", w.inbox_schedule("* * * * * *", "0"))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let scheduler = scheduler.clone();
        tokio::spawn(async move {
            scheduler
                .run_forever(async {
                    let _ = stop_rx.await;
                })
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while w.outbox().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no outbox file within 120 s: {:?}",
            statuses(&scheduler, &s.id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_tx.send(()).unwrap();
    runner.await.unwrap();
    scheduler.wait_idle().await;

    let out = w.outbox();
    let (name, body) = &out[0];
    assert!(
        name.starts_with("report-")
            && name.ends_with("Z.md")
            && name.len() == "report-20260101T000000Z.md".len(),
        "{name}"
    );
    assert_eq!(body, "# report\nfebruary\n");
    assert!(
        out.iter().all(|(n, _)| !n.starts_with('.')),
        "no partial files: {out:?}"
    );
    let firings = scheduler.firings("acme", &s.id, 1000).await.unwrap();
    let done: Vec<_> = firings.iter().filter(|f| f.status == "succeeded").collect();
    assert!(!done.is_empty(), "{firings:?}");
    assert!(
        firings
            .iter()
            .all(|f| f.trigger == "schedule" && f.replica == "only")
    );
    // The run record is stored under the schedule's tenant.
    let store = Store::open(&w.sqlite_url()).await.unwrap();
    let rec = store
        .get_workflow_run("acme", &done[0].run_id)
        .await
        .unwrap()
        .expect("the firing's run record");
    assert_eq!(rec["status"], "succeeded");
    assert!(
        store
            .get_workflow_run("other", &done[0].run_id)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_outlasts_the_interval_skips_the_next_occurrence() {
    let w = World::new();
    w.drop_inbox_file("sales-1.csv", "one\n", 1_000);
    let clock = Arc::new(ManualClock::new(at("2026-06-01T10:00:00.500Z")));
    let scheduler = w.replica(&w.sqlite_url(), clock.clone(), "only").await;
    let skip = scheduler
        .create("acme", w.inbox_schedule("* * * * * *", "3"))
        .await
        .unwrap();
    let mut queued = w.inbox_schedule("* * * * * *", "3");
    queued.overlap = Overlap::QueueOne;
    queued.outbox = None;
    let queued = scheduler.create("acme", queued).await.unwrap();

    for t in ["10:00:01", "10:00:02", "10:00:03"] {
        clock.set(at(&format!("2026-06-01T{t}.100Z")));
        scheduler.tick(clock.now()).await.unwrap();
    }
    scheduler.wait_idle().await;
    clock.set(at("2026-06-01T10:00:03.200Z"));
    // The queued one starts once the running one has ended.
    let fired = scheduler.tick(clock.now()).await.unwrap();
    assert!(
        fired
            .iter()
            .any(|f| f.schedule_id == queued.id && f.status == FiringStatus::Running),
        "{fired:?}"
    );
    scheduler.wait_idle().await;

    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        statuses(&scheduler, &skip.id).await,
        [
            s("10:00:01", "succeeded"),
            s("10:00:02", "skipped_overlap"),
            s("10:00:03", "skipped_overlap"),
        ]
    );
    assert_eq!(
        statuses(&scheduler, &queued.id).await,
        [
            s("10:00:01", "succeeded"),
            s("10:00:02", "succeeded"),
            s("10:00:03", "skipped_overlap"),
        ]
    );
    assert_eq!(w.outbox().len(), 1, "only the one run of `skip` delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missed_firings_catch_up_once_after_downtime_and_a_restart_does_not_repeat() {
    let w = World::new();
    let clock = Arc::new(ManualClock::new(at("2026-06-01T00:10:00Z")));
    let scheduler = w.replica(&w.sqlite_url(), clock.clone(), "first").await;
    // Fixed inputs: uploaded once when the schedule is made.
    let artifacts = Artifacts::open(w.config.artifacts.as_ref().unwrap()).unwrap();
    let digest = artifacts.put(b"fixed\n").unwrap();
    let mut hourly = w.inbox_schedule("0 0 * * * *", "0");
    hourly.timezone = "UTC".into();
    hourly.inputs = ScheduleInputs::Fixed(BTreeMap::from([("sales".into(), digest)]));
    hourly.catch_up = Millis(Duration::from_secs(90 * 60));
    let catching = scheduler.create("acme", hourly.clone()).await.unwrap();
    hourly.catch_up = Millis(Duration::from_secs(10 * 60));
    hourly.outbox = None;
    let strict = scheduler.create("acme", hourly).await.unwrap();

    // Down from 00:10 to 05:20: 01:00 ... 05:00 were missed. 05:00 is 20 min late.
    clock.set(at("2026-06-01T05:20:00Z"));
    scheduler.tick(clock.now()).await.unwrap();
    scheduler.wait_idle().await;
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    let missed = |last: &str| {
        let mut v: Vec<(String, String)> = ["01:00:00", "02:00:00", "03:00:00", "04:00:00"]
            .iter()
            .map(|t| s(t, "skipped_missed"))
            .collect();
        v.push(s("05:00:00", last));
        v
    };
    assert_eq!(
        statuses(&scheduler, &catching.id).await,
        missed("succeeded")
    );
    assert_eq!(
        statuses(&scheduler, &strict.id).await,
        missed("skipped_missed")
    );
    let out = w.outbox();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, "report-20260601T050000Z.md");
    assert_eq!(out[0].1, "# report\nfixed\n");
    let firings = scheduler.firings("acme", &strict.id, 10).await.unwrap();
    assert!(
        firings[0].message.contains("catch-up window"),
        "{}",
        firings[0].message
    );

    // A restarted server (a new scheduler, nothing in memory) at the same instant and a bit
    // later repeats nothing; the next occurrence runs on time.
    let restarted = w.replica(&w.sqlite_url(), clock.clone(), "second").await;
    clock.set(at("2026-06-01T05:30:00Z"));
    assert!(restarted.tick(clock.now()).await.unwrap().is_empty());
    clock.set(at("2026-06-01T06:00:00.300Z"));
    let fired = restarted.tick(clock.now()).await.unwrap();
    assert_eq!(fired.len(), 2, "{fired:?}");
    assert!(fired.iter().all(|f| f.status == FiringStatus::Running));
    restarted.wait_idle().await;
    assert_eq!(statuses(&restarted, &catching.id).await.len(), 6);
    assert_eq!(
        statuses(&restarted, &catching.id).await[5],
        s("06:00:00", "succeeded")
    );

    // Paused: nothing fires; resumed: what passed meanwhile is neither run nor missed.
    restarted
        .set_paused("acme", &catching.id, true)
        .await
        .unwrap();
    clock.set(at("2026-06-01T08:30:00Z"));
    restarted.tick(clock.now()).await.unwrap();
    restarted
        .set_paused("acme", &catching.id, false)
        .await
        .unwrap();
    clock.set(at("2026-06-01T08:40:00Z"));
    restarted.tick(clock.now()).await.unwrap();
    restarted.wait_idle().await;
    assert_eq!(statuses(&restarted, &catching.id).await.len(), 6);
}

/// Two replicas on one database tick the same instant: the occurrence runs once.
async fn two_replicas_fire_once(w: &World, url: &str) {
    w.drop_inbox_file("sales-1.csv", "one\n", 1_000);
    let clock = Arc::new(ManualClock::new(at("2026-06-01T10:00:00.500Z")));
    let a = w.replica(url, clock.clone(), "a").await;
    let b = w.replica(url, clock.clone(), "b").await;
    let s = a
        .create("acme", w.inbox_schedule("*/5 * * * * *", "0"))
        .await
        .unwrap();
    for t in ["10:00:05.010Z", "10:00:10.020Z", "10:00:15.030Z"] {
        clock.set(at(&format!("2026-06-01T{t}")));
        let (fa, fb) = tokio::join!(a.tick(clock.now()), b.tick(clock.now()));
        let (fa, fb) = (fa.unwrap(), fb.unwrap());
        let runs = fa.len() + fb.len();
        assert_eq!(runs, 1, "exactly one replica fires {t}: a {fa:?}, b {fb:?}");
        a.wait_idle().await;
        b.wait_idle().await;
    }
    let firings = a.firings("acme", &s.id, 100).await.unwrap();
    assert_eq!(firings.len(), 3, "{firings:?}");
    assert!(
        firings.iter().all(|f| f.status == "succeeded"),
        "{firings:?}"
    );
    assert_eq!(w.outbox().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_sqlite_file_fire_each_occurrence_once() {
    let w = World::new();
    two_replicas_fire_once(&w, &w.sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_fire_each_occurrence_once() {
    let Ok(admin) = std::env::var("STEPBOX_TEST_POSTGRES_URL") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but STEPBOX_TEST_POSTGRES_URL is not: the PostgreSQL tests must run \
                 in CI (start a server with `eval \"$(scripts/postgres.sh start)\"`)"
            );
        }
        eprintln!("skipped: PostgreSQL (set STEPBOX_TEST_POSTGRES_URL; see scripts/postgres.sh)");
        return;
    };
    use sqlx::Connection;
    let name = format!("stepbox_sched_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("CREATE DATABASE (the role needs CREATEDB)");
    let start = admin.find("://").unwrap() + 3;
    let slash = admin[start..]
        .find(['/', '?'])
        .map_or(admin.len(), |i| start + i);
    let query = admin[slash..].find('?').map_or("", |q| &admin[slash + q..]);
    let url = format!("{}/{name}{query}", &admin[..slash]);
    let w = World::new();
    two_replicas_fire_once(&w, &url).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directories_outside_the_roots_are_refused_at_creation_and_at_firing() {
    let w = World::new();
    let clock = Arc::new(ManualClock::new(at("2026-06-01T10:00:00Z")));
    let scheduler = w.replica(&w.sqlite_url(), clock.clone(), "only").await;
    let refused = |r: Result<Schedule, ScheduleError>| match r {
        Err(ScheduleError::Refused { field, reason, .. }) => format!("{field}: {reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let with_inbox = |dir: &Path| {
        let mut s = w.inbox_schedule("* * * * * *", "0");
        s.inputs = ScheduleInputs::Inbox {
            dir: dir.to_path_buf(),
            files: BTreeMap::from([("sales".into(), "*.csv".into())]),
        };
        s
    };
    let e = refused(
        scheduler
            .create("acme", with_inbox(&w.path("outside")))
            .await,
    );
    assert!(e.starts_with("inputs.dir: is outside every"), "{e}");
    // An outbox under the input roots only.
    let mut s = w.inbox_schedule("* * * * * *", "0");
    s.outbox = Some(w.path("in/inbox"));
    let e = refused(scheduler.create("acme", s).await);
    assert!(
        e.starts_with("outbox: is outside every `[workflows] output_roots`"),
        "{e}"
    );
    // A symlink in an output root that leads out of it.
    std::os::unix::fs::symlink(w.path("outside"), w.path("out/escape")).unwrap();
    let mut s = w.inbox_schedule("* * * * * *", "0");
    s.outbox = Some(w.path("out/escape"));
    let e = refused(scheduler.create("acme", s).await);
    assert!(e.contains("through a symlink"), "{e}");
    // `..` and a relative path.
    let e = refused(
        scheduler
            .create("acme", with_inbox(&w.path("in/../outside")))
            .await,
    );
    assert!(e.contains("`..`"), "{e}");
    let e = refused(
        scheduler
            .create("acme", with_inbox(Path::new("in/inbox")))
            .await,
    );
    assert!(e.contains("not an absolute path"), "{e}");
    // Inputs that are not the workflow's.
    let mut s = w.inbox_schedule("* * * * * *", "0");
    s.inputs = ScheduleInputs::Inbox {
        dir: w.path("in/inbox"),
        files: BTreeMap::from([("sale".into(), "*.csv".into())]),
    };
    let e = scheduler.create("acme", s).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("give exactly the workflow's inputs (sales)"),
        "{e}"
    );
    assert!(scheduler.list("acme").await.unwrap().is_empty());

    // Allowed at creation, then the inbox is swapped for a symlink to a directory outside:
    // the firing fails naming it, and nothing outside is read or delivered.
    std::fs::create_dir_all(w.path("in/inbox2")).unwrap();
    let s = scheduler
        .create("acme", with_inbox(&w.path("in/inbox2")))
        .await
        .unwrap();
    std::fs::remove_dir(w.path("in/inbox2")).unwrap();
    std::fs::write(w.path("outside/secret.csv"), "secret\n").unwrap();
    std::os::unix::fs::symlink(w.path("outside"), w.path("in/inbox2")).unwrap();
    clock.set(at("2026-06-01T10:00:01.100Z"));
    scheduler.tick(clock.now()).await.unwrap();
    scheduler.wait_idle().await;
    let f = scheduler.firings("acme", &s.id, 10).await.unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].status, "failed");
    assert!(
        f[0].message.contains("through a symlink"),
        "{}",
        f[0].message
    );
    assert!(f[0].run_id.is_empty());
    assert!(w.outbox().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_downtime_is_recorded_without_a_row_per_occurrence() {
    let mut w = World::new();
    // Above the rows this writes, so the second replica's first tick prunes none (pruning has
    // its own test).
    w.config.firing_history = 5_000;
    let clock = Arc::new(ManualClock::new(at("2026-06-01T00:00:30Z")));
    let mut scheduler = w.replica(&w.sqlite_url(), clock.clone(), "first").await;
    let mut s = w.inbox_schedule("0 * * * * *", "0");
    s.catch_up = Millis(Duration::ZERO);
    let s = scheduler.create("acme", s).await.unwrap();
    // A day down: 1440 missed occurrences, older than the (zero) catch-up window.
    clock.set(at("2026-06-02T00:00:30Z"));
    for name in ["first", "second"] {
        if name == "second" {
            // A restart resumes after the newest recorded occurrence: nothing is recorded twice.
            scheduler = w.replica(&w.sqlite_url(), clock.clone(), name).await;
        }
        let fired = scheduler.tick(clock.now()).await.unwrap();
        if name == "first" {
            assert_eq!(fired.len(), 1001, "1000 one by one and one summary");
        } else {
            assert!(fired.is_empty(), "{fired:?}");
        }
    }
    let rows = scheduler.firings("acme", &s.id, 2000).await.unwrap();
    assert_eq!(rows.len(), 1001);
    assert!(rows.iter().all(|r| r.status == "skipped_missed"));
    assert_eq!(
        rows[0].fire_at,
        at("2026-06-02T00:00:00Z").timestamp_millis()
    );
    assert!(
        rows[0]
            .message
            .contains("2026-06-01 18:41:00 CEST to here (not recorded one by one)"),
        "{}",
        rows[0].message
    );
    assert!(
        rows[1].message.contains("catch-up window"),
        "{}",
        rows[1].message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_firing_records_are_pruned_by_history_and_age() {
    let mut w = World::new();
    w.config.firing_history = 2;
    w.config.firing_retention = Millis(Duration::from_secs(86_400));
    w.drop_inbox_file("sales-1.csv", "x\n", 1_000);
    let t0 = at("2026-03-02T09:00:00Z");
    let clock = Arc::new(ManualClock::new(t0));
    let scheduler = w.replica(&w.sqlite_url(), clock.clone(), "only").await;
    let s = scheduler
        .create("acme", w.inbox_schedule("* * * * * *", "0"))
        .await
        .unwrap();
    for _ in 0..4 {
        clock.advance(Duration::from_secs(1));
        scheduler.tick(clock.now()).await.unwrap();
        scheduler.wait_idle().await;
    }
    let fired = statuses(&scheduler, &s.id).await;
    let want: Vec<(String, String)> = ["09:00:01", "09:00:02", "09:00:03", "09:00:04"]
        .iter()
        .map(|t| (t.to_string(), "succeeded".to_string()))
        .collect();
    assert_eq!(fired, want);
    // Paused so the next tick fires nothing; an hour later the tick prunes to the newest two.
    scheduler.set_paused("acme", &s.id, true).await.unwrap();
    clock.advance(stepbox::workflow::schedule::PRUNE_EVERY + Duration::from_secs(1));
    scheduler.tick(clock.now()).await.unwrap();
    assert_eq!(
        statuses(&scheduler, &s.id).await,
        fired[2..].to_vec(),
        "kept the newest two"
    );
    // Past the retention everything ended goes, except the newest scheduled firing (where a
    // restarted replica resumes).
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(scheduler.prune_firings(clock.now()).await.unwrap(), 1);
    assert_eq!(statuses(&scheduler, &s.id).await, fired[3..].to_vec());
}

/// The command line end to end: `stepbox schedule create` on the catalog database a config
/// names, then a real `stepbox serve` on that config fires the per-second schedule, delivers to
/// the outbox and records the firing; an outbox outside `[workflows] output_roots` is refused
/// naming the flag.
#[test]
fn stepbox_schedule_create_then_serve_fires_into_the_outbox() {
    use std::io::BufRead;
    let w = World::new();
    let d = w.dir.path();
    let config = d.join("stepbox.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\naddr = \"127.0.0.1:0\"\n[catalog]\ndatabase = {:?}\n\
             [workflows]\ninput_roots = [{:?}]\noutput_roots = [{:?}]\nartifacts = {:?}\n",
            w.sqlite_url(),
            w.path("in").display().to_string(),
            w.path("out").display().to_string(),
            w.path("artifacts").display().to_string(),
        ),
    )
    .unwrap();
    std::fs::write(d.join("report.py"), REPORT).unwrap();
    std::fs::write(
        d.join("workflow.toml"),
        r#"
name = "cli-report"
[inputs]
sales = "sales.csv"
[[steps]]
id = "report"
program = "report.py"
args = ["0"]
inputs = { "sales.csv" = "inputs.sales" }
[outputs]
report = "steps.report.outputs.report.md"
"#,
    )
    .unwrap();
    std::fs::write(d.join("sales.csv"), "rep,total\nana,7\n").unwrap();
    let stepbox = |args: &[&str]| {
        common::outcome(
            common::stepbox_command(d)
                .env_remove("STEPBOX_CATALOG_DATABASE")
                .env("STEPBOX_CONFIG", &config)
                .args(args),
        )
    };

    let outside = w.path("outside").display().to_string();
    let (code, out, err) = stepbox(&[
        "schedule",
        "create",
        "workflow.toml",
        "--cron",
        "* * * * * *",
        "--input",
        "sales=sales.csv",
        "--outbox",
        &outside,
    ]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("--outbox") && err.contains("output_roots"),
        "{err}"
    );

    // A published workflow that does not exist is refused naming the flag.
    let (code, out, err) = stepbox(&[
        "schedule",
        "create",
        "--workflow",
        "nope@v1",
        "--cron",
        "* * * * * *",
        "--input",
        "sales=sales.csv",
    ]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("--workflow") && err.contains("no workflow version `nope@v1`"),
        "{err}"
    );

    let outbox = w.path("out/outbox").display().to_string();
    let (code, out, err) = stepbox(&[
        "schedule",
        "create",
        "workflow.toml",
        "--cron",
        "* * * * * *",
        "--input",
        "sales=sales.csv",
        "--outbox",
        &outbox,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let id = out.trim().to_string();
    let (code, out, err) = stepbox(&["schedule", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&id) && out.contains("cli-report") && out.contains("active"),
        "{out}"
    );

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
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut child = Kill(child);
    assert!(
        line.starts_with("listening on "),
        "stepbox serve said {line:?}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let files: Vec<_> = std::fs::read_dir(w.path("out/outbox"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("report-") && n.ends_with(".md"))
            .collect();
        if let Some(f) = files.first() {
            break f.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing delivered to the outbox within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        std::fs::read_to_string(w.path("out/outbox").join(&delivered)).unwrap(),
        "# report\nrep,total\nana,7\n"
    );
    let (code, out, err) = stepbox(&["schedule", "firings", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("succeeded"), "{out}");
    // The firing's run record says the schedule started it.
    let run_id = out
        .lines()
        .find(|l| l.contains("succeeded"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    let (code, out, err) = stepbox(&["workflow", "record", &run_id]);
    assert_eq!(code, Some(0), "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&record["trigger"], &record["run_id"]),
        (&serde_json::json!("schedule"), &serde_json::json!(run_id))
    );
    let (code, _, err) = stepbox(&["workflow", "record", "no-such-run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no workflow run `no-such-run`"), "{err}");

    // SIGTERM: the server stops within its grace period.
    let pid = child.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stepbox serve did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, out, err) = stepbox(&["schedule", "pause", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = stepbox(&["schedule", "list"]);
    assert!(code == Some(0) && out.contains("paused"), "{out}");
    let (code, _, err) = stepbox(&["schedule", "delete", &id]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = stepbox(&["schedule", "firings", &id]);
    assert_eq!(code, Some(2), "{err}");
}
