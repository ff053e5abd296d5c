//! The shared run history: one row per `(tenant, run_id)` holding the caller's encoded record,
//! so `GetRun`/`ListRuns` find a run on any replica. Bounded by [`Store::prune_runs`].

use std::time::Duration;

use crate::types::{RunEntry, RunPage};
use crate::{Result, Store, StoreError, now_ms, with_pool};

type RunTuple = (i64, String, i64, String, Vec<u8>);

impl Store {
    /// Stores a run's record; recording the same `(tenant, run_id)` again replaces its status and
    /// record (a run recorded when accepted and again when finished) and keeps its place (`seq`).
    /// Returns the run's `seq`.
    pub async fn record_run(
        &self,
        tenant: &str,
        run_id: &str,
        created_at_ms: i64,
        status: &str,
        record: &[u8],
    ) -> Result<i64> {
        let seq = with_pool!(self, |pool, _begin| {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO runs (tenant, run_id, created_at, status, record) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, run_id) \
                 DO UPDATE SET status = excluded.status, record = excluded.record RETURNING seq",
            )
            .bind(tenant)
            .bind(run_id)
            .bind(created_at_ms)
            .bind(status)
            .bind(record)
            .fetch_one(pool)
            .await
        });
        seq.map_err(|e| self.name_err(e.into()))
    }

    /// The run `run_id` of `tenant`; None when it does not exist or belongs to another tenant.
    pub async fn get_run(&self, tenant: &str, run_id: &str) -> Result<Option<RunEntry>> {
        let row = with_pool!(self, |pool, _begin| {
            sqlx::query_as::<_, RunTuple>(
                "SELECT seq, run_id, created_at, status, record FROM runs \
                 WHERE tenant = $1 AND run_id = $2",
            )
            .bind(tenant)
            .bind(run_id)
            .fetch_optional(pool)
            .await
        });
        row.map(|r| r.map(run_entry))
            .map_err(|e| self.name_err(e.into()))
    }

    /// One page of `tenant`'s runs, newest first, optionally only those with `status`. Pass the
    /// page's `next_after_seq` as `after_seq` for the next page; `page_size` must be at least 1.
    pub async fn list_runs(
        &self,
        tenant: &str,
        status: Option<&str>,
        page_size: u32,
        after_seq: Option<i64>,
    ) -> Result<RunPage> {
        if page_size == 0 {
            return Err(StoreError::InvalidArgument {
                field: "page_size",
                reason: "must be at least 1".into(),
            });
        }
        // Parameters are numbered in the order the optional conditions appear.
        let mut sql = String::from(
            "SELECT seq, run_id, created_at, status, record FROM runs WHERE tenant = $1",
        );
        let mut n = 1;
        if status.is_some() {
            n += 1;
            sql.push_str(&format!(" AND status = ${n}"));
        }
        if after_seq.is_some() {
            n += 1;
            sql.push_str(&format!(" AND seq < ${n}"));
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", n + 1));
        // One extra row says whether a next page exists.
        let limit = i64::from(page_size) + 1;
        let rows = with_pool!(self, |pool, _begin| {
            let mut query = sqlx::query_as::<_, RunTuple>(&sql).bind(tenant);
            if let Some(status) = status {
                query = query.bind(status);
            }
            if let Some(after) = after_seq {
                query = query.bind(after);
            }
            query.bind(limit).fetch_all(pool).await
        });
        let mut runs: Vec<RunEntry> = rows
            .map_err(|e| self.name_err(e.into()))?
            .into_iter()
            .map(run_entry)
            .collect();
        let next_after_seq = if runs.len() > page_size as usize {
            runs.truncate(page_size as usize);
            runs.last().map(|r| r.seq)
        } else {
            None
        };
        Ok(RunPage {
            runs,
            next_after_seq,
        })
    }

    /// Retention: deletes runs created more than `max_age` ago, then all but the newest
    /// `max_per_tenant` runs of every tenant, in one transaction; returns how many were deleted.
    ///
    /// Cost: the age pass uses the `created_at` index; the count pass ranks every remaining row
    /// (a window function over the table, O(n log n) with n bounded by tenants x
    /// `max_per_tenant` between calls), so call it every minute or so, not per run.
    pub async fn prune_runs(&self, max_per_tenant: u64, max_age: Duration) -> Result<u64> {
        let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(max_age_ms);
        let keep = i64::try_from(max_per_tenant).unwrap_or(i64::MAX);
        let deleted = with_pool!(self, |pool, begin| {
            async {
                let mut tx = pool.begin_with(begin).await?;
                let by_age = sqlx::query("DELETE FROM runs WHERE created_at < $1")
                    .bind(cutoff)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let by_count = sqlx::query(
                    "DELETE FROM runs WHERE seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() \
                     OVER (PARTITION BY tenant ORDER BY seq DESC) AS rn FROM runs) ranked \
                     WHERE rn > $1)",
                )
                .bind(keep)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                Ok::<u64, sqlx::Error>(by_age + by_count)
            }
            .await
        });
        deleted.map_err(|e| self.name_err(e.into()))
    }
}

fn run_entry(t: RunTuple) -> RunEntry {
    let (seq, run_id, created_at, status, record) = t;
    RunEntry {
        seq,
        run_id,
        created_at,
        status,
        record,
    }
}
