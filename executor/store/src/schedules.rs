//! Workflow schedules and their firings.
//!
//! A schedule is a row holding the caller's JSON definition (cron, zone, inputs: the executor's
//! `workflow::schedule` module defines and checks it) plus what the database itself must know:
//! its tenant, whether it is paused, and `active_from`, the instant after which occurrences are
//! due (creation, or the last resume: occurrences while paused are never run nor "missed").
//!
//! A firing is one occurrence, keyed by `(schedule_id, fire_at)`. Replicas fire without a
//! leader: each one that sees an occurrence due calls [`Store::claim_firing`], an
//! `INSERT ... ON CONFLICT DO NOTHING`; the unique key lets exactly one row land, and only the
//! replica whose row landed runs it. The claim also applies the overlap policy in the same
//! transaction (serialised per schedule on its row), so two occurrences claimed at once on two
//! replicas never both see "nothing running". A running firing carries a heartbeat; one whose
//! heartbeat is older than the lease (its replica died) is marked failed at the next claim.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Result, Store, StoreError, with_pool};

/// What happens to an occurrence while an earlier run of the same schedule is still running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Record it as `skipped_overlap` (the default: a slow run never piles up more).
    #[default]
    Skip,
    /// Keep at most one waiting (`queued`); it starts when the running one ends. Further
    /// occurrences meanwhile are `skipped_overlap`.
    QueueOne,
    /// Run it anyway, alongside.
    Allow,
}

/// How a firing stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FiringStatus {
    /// Waiting for the running firing to end ([`Overlap::QueueOne`]).
    Queued,
    /// Its workflow run is under way.
    Running,
    /// Not run: an earlier run was still running.
    SkippedOverlap,
    /// Not run: it was missed (no replica up) and is older than the catch-up window, or a newer
    /// missed occurrence ran instead.
    SkippedMissed,
    /// The workflow run succeeded.
    Succeeded,
    /// The workflow run failed, could not start (inputs missing, outbox refused), or its replica
    /// stopped while running it.
    Failed,
}

impl FiringStatus {
    /// The stored text: `queued`, `running`, `skipped_overlap`, `skipped_missed`, `succeeded`,
    /// `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            FiringStatus::Queued => "queued",
            FiringStatus::Running => "running",
            FiringStatus::SkippedOverlap => "skipped_overlap",
            FiringStatus::SkippedMissed => "skipped_missed",
            FiringStatus::Succeeded => "succeeded",
            FiringStatus::Failed => "failed",
        }
    }

    /// Parses [`FiringStatus::as_str`]'s text.
    pub fn parse(s: &str) -> Option<FiringStatus> {
        [
            FiringStatus::Queued,
            FiringStatus::Running,
            FiringStatus::SkippedOverlap,
            FiringStatus::SkippedMissed,
            FiringStatus::Succeeded,
            FiringStatus::Failed,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What started a firing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The schedule's cron expression.
    Schedule,
    /// A person ("run now").
    Manual,
    /// A program through the API.
    Api,
}

impl Trigger {
    /// `schedule`, `manual` or `api`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::Api => "api",
        }
    }
}

/// A stored schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRow {
    /// Its id (chosen by the caller, e.g. a UUID).
    pub id: String,
    /// The tenant that owns it.
    pub tenant: String,
    /// A name to list it by (the workflow's name).
    pub name: String,
    /// Created, unix ms.
    pub created_at: i64,
    /// Last changed, unix ms.
    pub updated_at: i64,
    /// Occurrences after this instant (unix ms) are due.
    pub active_from: i64,
    /// Paused schedules do not fire.
    pub paused: bool,
    /// The caller's definition.
    pub definition: Value,
}

/// One firing of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FiringRow {
    /// The schedule.
    pub schedule_id: String,
    /// The occurrence, unix ms.
    pub fire_at: i64,
    /// The schedule's tenant.
    pub tenant: String,
    /// What started it: `schedule`, `manual`, `api`.
    pub trigger: String,
    /// Its status ([`FiringStatus::as_str`]).
    pub status: String,
    /// The workflow run's id, once it ran.
    pub run_id: String,
    /// Why it was skipped or failed.
    pub message: String,
    /// The replica that claimed it.
    pub replica: String,
    /// Claimed, unix ms.
    pub claimed_at: i64,
    /// Last changed, unix ms.
    pub updated_at: i64,
    /// Last heartbeat of its run, unix ms.
    pub heartbeat_at: i64,
}

/// A claim of one occurrence for [`Store::claim_firing`].
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// The schedule.
    pub schedule_id: &'a str,
    /// Its tenant.
    pub tenant: &'a str,
    /// The occurrence, unix ms.
    pub fire_at: i64,
    /// What started it.
    pub trigger: Trigger,
    /// The schedule's overlap policy.
    pub overlap: Overlap,
    /// Who claims (for the record).
    pub replica: &'a str,
    /// Now, unix ms (the caller's clock).
    pub now: i64,
    /// A running firing whose heartbeat is older than this many ms is taken as dead (failed).
    pub lease_ms: i64,
}

type ScheduleTuple = (String, String, String, i64, i64, i64, bool, String);
type FiringTuple = (
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
);

const SELECT_SCHEDULE: &str = "SELECT id, tenant, name, created_at, updated_at, active_from, paused, definition FROM schedules";
const SELECT_FIRING: &str = "SELECT schedule_id, fire_at, tenant, trigger_kind, status, run_id, \
                             message, replica, claimed_at, updated_at, heartbeat_at FROM schedule_firings";

/// Marks dead runs (heartbeat older than the lease) of one schedule failed.
const REAP: &str = "UPDATE schedule_firings SET status = 'failed', updated_at = $2, \
                    message = 'the replica running it stopped (no heartbeat within the lease)' \
                    WHERE schedule_id = $1 AND status = 'running' AND heartbeat_at < $3";

/// Inserts the claim; its status decided from the overlap policy and what runs (the `CASE`),
/// in one statement. `$5` is the policy's status when something runs, `$6` when nothing does.
const CLAIM: &str = "INSERT INTO schedule_firings (schedule_id, fire_at, tenant, trigger_kind, status, \
     replica, claimed_at, updated_at, heartbeat_at) \
     SELECT $1, $2, $3, $4, CASE WHEN EXISTS (SELECT 1 FROM schedule_firings \
       WHERE schedule_id = $1 AND status = 'running') THEN \
         CASE WHEN $5 = 'queued' AND EXISTS (SELECT 1 FROM schedule_firings \
           WHERE schedule_id = $1 AND status = 'queued') THEN 'skipped_overlap' ELSE $5 END \
       ELSE $6 END, $7, $8, $8, $8 WHERE 1 = 1 \
     ON CONFLICT (schedule_id, fire_at) DO NOTHING RETURNING status";

impl Store {
    /// Stores a new schedule. A schedule with this id already existing is
    /// [`StoreError::InvalidArgument`].
    pub async fn create_schedule(&self, row: &ScheduleRow) -> Result<()> {
        let definition = row.definition.to_string();
        let done = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "INSERT INTO schedules (id, tenant, name, created_at, updated_at, active_from, \
                 paused, definition) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&row.id)
            .bind(&row.tenant)
            .bind(&row.name)
            .bind(row.created_at)
            .bind(row.updated_at)
            .bind(row.active_from)
            .bind(row.paused)
            .bind(&definition)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        });
        match done.map_err(|e| self.name_err(e.into()))? {
            1 => Ok(()),
            _ => Err(StoreError::InvalidArgument {
                field: "id",
                reason: format!("schedule `{}` already exists", row.id),
            }),
        }
    }

    /// Schedule `id` of `tenant`; None when it does not exist or is another tenant's.
    pub async fn get_schedule(&self, tenant: &str, id: &str) -> Result<Option<ScheduleRow>> {
        let sql = format!("{SELECT_SCHEDULE} WHERE tenant = $1 AND id = $2");
        let row = with_pool!(self, |pool, _begin| {
            sqlx::query_as::<_, ScheduleTuple>(&sql)
                .bind(tenant)
                .bind(id)
                .fetch_optional(pool)
                .await
        });
        row.map_err(|e| self.name_err(e.into()))?
            .map(|t| self.schedule_row(t))
            .transpose()
    }

    /// `tenant`'s schedules by name, or every tenant's unpaused schedules with `None` (what a
    /// scheduler ticks over).
    pub async fn list_schedules(&self, tenant: Option<&str>) -> Result<Vec<ScheduleRow>> {
        let sql = match tenant {
            Some(_) => format!("{SELECT_SCHEDULE} WHERE tenant = $1 ORDER BY name, id"),
            None => format!("{SELECT_SCHEDULE} WHERE paused = $1 ORDER BY id"),
        };
        let rows = with_pool!(self, |pool, _begin| {
            let q = sqlx::query_as::<_, ScheduleTuple>(&sql);
            match tenant {
                Some(t) => q.bind(t).fetch_all(pool).await,
                None => q.bind(false).fetch_all(pool).await,
            }
        });
        rows.map_err(|e| self.name_err(e.into()))?
            .into_iter()
            .map(|t| self.schedule_row(t))
            .collect()
    }

    /// Pauses or resumes schedule `id`; resuming sets `active_from` to `now` (unix ms), so the
    /// occurrences of the pause are neither run nor recorded as missed. False when there is no
    /// such schedule of `tenant`.
    pub async fn set_schedule_paused(
        &self,
        tenant: &str,
        id: &str,
        paused: bool,
        now: i64,
    ) -> Result<bool> {
        let sql = if paused {
            "UPDATE schedules SET paused = $3, updated_at = $4 WHERE tenant = $1 AND id = $2"
        } else {
            "UPDATE schedules SET paused = $3, updated_at = $4, active_from = \
             CASE WHEN paused = $5 THEN $4 ELSE active_from END WHERE tenant = $1 AND id = $2"
        };
        let n = with_pool!(self, |pool, _begin| {
            sqlx::query(sql)
                .bind(tenant)
                .bind(id)
                .bind(paused)
                .bind(now)
                .bind(true)
                .execute(pool)
                .await
                .map(|r| r.rows_affected())
        });
        Ok(n.map_err(|e| self.name_err(e.into()))? == 1)
    }

    /// Deletes schedule `id` of `tenant` and its firings. False when there is none.
    pub async fn delete_schedule(&self, tenant: &str, id: &str) -> Result<bool> {
        let n = with_pool!(self, |pool, begin| {
            async {
                let mut tx = pool.begin_with(begin).await?;
                let n = sqlx::query("DELETE FROM schedules WHERE tenant = $1 AND id = $2")
                    .bind(tenant)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 1 {
                    sqlx::query("DELETE FROM schedule_firings WHERE schedule_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok::<u64, sqlx::Error>(n)
            }
            .await
        });
        Ok(n.map_err(|e| self.name_err(e.into()))? == 1)
    }

    /// The newest occurrence of `schedule_id` fired by its cron (any status), unix ms.
    pub async fn last_scheduled_firing(&self, schedule_id: &str) -> Result<Option<i64>> {
        let v = with_pool!(self, |pool, _begin| {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT MAX(fire_at) FROM schedule_firings \
                 WHERE schedule_id = $1 AND trigger_kind = 'schedule'",
            )
            .bind(schedule_id)
            .fetch_one(pool)
            .await
        });
        v.map_err(|e| self.name_err(e.into()))
    }

    /// Claims an occurrence: exactly one claim of `(schedule_id, fire_at)` ever succeeds, across
    /// every replica. Returns the status it was recorded with ([`FiringStatus::Running`]: the
    /// caller runs it now; [`FiringStatus::Queued`] or [`FiringStatus::SkippedOverlap`] by the
    /// overlap policy), or None when another claim won.
    pub async fn claim_firing(&self, c: &Claim<'_>) -> Result<Option<FiringStatus>> {
        let (busy, idle) = match c.overlap {
            Overlap::Skip => ("skipped_overlap", "running"),
            Overlap::QueueOne => ("queued", "running"),
            Overlap::Allow => ("running", "running"),
        };
        let status = with_pool!(self, |pool, begin| {
            async {
                let mut tx = pool.begin_with(begin).await?;
                // Lock the schedule's row first: claims of one schedule serialise here.
                sqlx::query("UPDATE schedules SET claims = claims + 1 WHERE id = $1")
                    .bind(c.schedule_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(REAP)
                    .bind(c.schedule_id)
                    .bind(c.now)
                    .bind(c.now.saturating_sub(c.lease_ms))
                    .execute(&mut *tx)
                    .await?;
                let status = sqlx::query_scalar::<_, String>(CLAIM)
                    .bind(c.schedule_id)
                    .bind(c.fire_at)
                    .bind(c.tenant)
                    .bind(c.trigger.as_str())
                    .bind(busy)
                    .bind(idle)
                    .bind(c.replica)
                    .bind(c.now)
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<Option<String>, sqlx::Error>(status)
            }
            .await
        });
        let status = status.map_err(|e| self.name_err(e.into()))?;
        Ok(status.as_deref().and_then(FiringStatus::parse))
    }

    /// Records an occurrence that will not run (e.g. [`FiringStatus::SkippedMissed`]) unless
    /// it is recorded already; true when this call recorded it. Of `c`, the overlap policy and
    /// the lease are not used.
    pub async fn record_skipped_firing(
        &self,
        c: &Claim<'_>,
        status: FiringStatus,
        message: &str,
    ) -> Result<bool> {
        let n = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "INSERT INTO schedule_firings (schedule_id, fire_at, tenant, trigger_kind, status, \
                 message, replica, claimed_at, updated_at, heartbeat_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8) \
                 ON CONFLICT (schedule_id, fire_at) DO NOTHING",
            )
            .bind(c.schedule_id)
            .bind(c.fire_at)
            .bind(c.tenant)
            .bind(c.trigger.as_str())
            .bind(status.as_str())
            .bind(message)
            .bind(c.replica)
            .bind(c.now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        });
        Ok(n.map_err(|e| self.name_err(e.into()))? == 1)
    }

    /// Starts the queued firing of `schedule_id` if nothing of it runs any more: it becomes
    /// `running`, claimed by `replica`. Returns its `fire_at`, or None (nothing queued, still
    /// busy, or another replica started it).
    pub async fn start_queued_firing(
        &self,
        schedule_id: &str,
        replica: &str,
        now: i64,
        lease_ms: i64,
    ) -> Result<Option<i64>> {
        let started = with_pool!(self, |pool, begin| {
            async {
                let mut tx = pool.begin_with(begin).await?;
                sqlx::query("UPDATE schedules SET claims = claims + 1 WHERE id = $1")
                    .bind(schedule_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(REAP)
                    .bind(schedule_id)
                    .bind(now)
                    .bind(now.saturating_sub(lease_ms))
                    .execute(&mut *tx)
                    .await?;
                let fire_at = sqlx::query_scalar::<_, i64>(
                    "UPDATE schedule_firings SET status = 'running', replica = $2, \
                     updated_at = $3, heartbeat_at = $3 \
                     WHERE schedule_id = $1 AND status = 'queued' AND NOT EXISTS \
                     (SELECT 1 FROM schedule_firings WHERE schedule_id = $1 AND status = 'running') \
                     RETURNING fire_at",
                )
                .bind(schedule_id)
                .bind(replica)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok::<Option<i64>, sqlx::Error>(fire_at)
            }
            .await
        });
        started.map_err(|e| self.name_err(e.into()))
    }

    /// Keeps a running firing alive (see the lease in [`Claim::lease_ms`]).
    pub async fn heartbeat_firing(&self, schedule_id: &str, fire_at: i64, now: i64) -> Result<()> {
        let done = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "UPDATE schedule_firings SET heartbeat_at = $3 \
                 WHERE schedule_id = $1 AND fire_at = $2 AND status = 'running'",
            )
            .bind(schedule_id)
            .bind(fire_at)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        });
        done.map_err(|e| self.name_err(e.into()))
    }

    /// Records how a firing ended: its status, the workflow run id (empty if it never ran) and
    /// a message.
    pub async fn finish_firing(
        &self,
        schedule_id: &str,
        fire_at: i64,
        status: FiringStatus,
        run_id: &str,
        message: &str,
        now: i64,
    ) -> Result<()> {
        let done = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "UPDATE schedule_firings SET status = $3, run_id = $4, message = $5, \
                 updated_at = $6 WHERE schedule_id = $1 AND fire_at = $2",
            )
            .bind(schedule_id)
            .bind(fire_at)
            .bind(status.as_str())
            .bind(run_id)
            .bind(message)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        });
        done.map_err(|e| self.name_err(e.into()))
    }

    /// Deletes old firing records: of each schedule, every ended firing past its newest
    /// `keep_last`, and every ended firing last changed before `older_than` (unix ms). Running
    /// and queued firings are never deleted, nor the newest firing its cron made (the cursor a
    /// restarted replica resumes from, [`Store::last_scheduled_firing`]): deleting it would make
    /// a replica see long-past occurrences as missed again. Returns how many rows went.
    pub async fn prune_firings(&self, keep_last: u32, older_than: i64) -> Result<u64> {
        let n = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "DELETE FROM schedule_firings WHERE status NOT IN ('running', 'queued') \
                 AND (schedule_id, fire_at) IN (SELECT schedule_id, fire_at FROM ( \
                   SELECT schedule_id, fire_at, updated_at, \
                     ROW_NUMBER() OVER (PARTITION BY schedule_id ORDER BY fire_at DESC) AS rn, \
                     MAX(CASE WHEN trigger_kind = 'schedule' THEN fire_at END) \
                       OVER (PARTITION BY schedule_id) AS cursor_at \
                   FROM schedule_firings) ranked \
                 WHERE (rn > $1 OR updated_at < $2) \
                   AND (cursor_at IS NULL OR fire_at <> cursor_at))",
            )
            .bind(i64::from(keep_last))
            .bind(older_than)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        });
        n.map_err(|e| self.name_err(e.into()))
    }

    /// The newest `limit` firings of schedule `schedule_id` of `tenant`, newest first.
    pub async fn list_firings(
        &self,
        tenant: &str,
        schedule_id: &str,
        limit: u32,
    ) -> Result<Vec<FiringRow>> {
        let sql = format!(
            "{SELECT_FIRING} WHERE tenant = $1 AND schedule_id = $2 ORDER BY fire_at DESC LIMIT $3"
        );
        let rows = with_pool!(self, |pool, _begin| {
            sqlx::query_as::<_, FiringTuple>(&sql)
                .bind(tenant)
                .bind(schedule_id)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
        });
        Ok(rows
            .map_err(|e| self.name_err(e.into()))?
            .into_iter()
            .map(
                |(
                    schedule_id,
                    fire_at,
                    tenant,
                    trigger,
                    status,
                    run_id,
                    message,
                    replica,
                    claimed_at,
                    updated_at,
                    heartbeat_at,
                )| FiringRow {
                    schedule_id,
                    fire_at,
                    tenant,
                    trigger,
                    status,
                    run_id,
                    message,
                    replica,
                    claimed_at,
                    updated_at,
                    heartbeat_at,
                },
            )
            .collect())
    }

    fn schedule_row(&self, t: ScheduleTuple) -> Result<ScheduleRow> {
        let (id, tenant, name, created_at, updated_at, active_from, paused, definition) = t;
        let definition = serde_json::from_str(&definition).map_err(|e| StoreError::Corrupt {
            database: self.describe().to_string(),
            what: format!("definition of schedule `{id}`"),
            reason: e.to_string(),
        })?;
        Ok(ScheduleRow {
            id,
            tenant,
            name,
            created_at,
            updated_at,
            active_from,
            paused,
            definition,
        })
    }
}
