//! Workflow runs: one row per run holding the caller's JSON record, so a failed run can be
//! resumed (on any replica) from the steps that already succeeded.

use std::time::Duration;

use serde_json::Value;

use crate::{Result, Store, now_ms, with_pool};

impl Store {
    /// Stores (or replaces) the record of workflow run `run_id` of `tenant`.
    pub async fn save_workflow_run(
        &self,
        tenant: &str,
        run_id: &str,
        workflow: &str,
        status: &str,
        record: &Value,
    ) -> Result<()> {
        let now = now_ms();
        let text = record.to_string();
        let done = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "INSERT INTO workflow_runs (run_id, tenant, workflow, created_at, updated_at, status, record) \
                 VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (run_id) \
                 DO UPDATE SET updated_at = excluded.updated_at, status = excluded.status, record = excluded.record \
                 WHERE workflow_runs.tenant = excluded.tenant",
            )
            .bind(run_id)
            .bind(tenant)
            .bind(workflow)
            .bind(now)
            .bind(status)
            .bind(&text)
            .execute(pool)
            .await
            .map(|_| ())
        });
        done.map_err(|e| self.name_err(e.into()))
    }

    /// Deletes old workflow run records: of each tenant's workflow, every run past its newest
    /// `keep_per_workflow`, and every run last saved more than `max_age` ago. Returns how many
    /// rows went. (Runs are saved once they end, so none is in progress.)
    pub async fn prune_workflow_runs(
        &self,
        keep_per_workflow: u32,
        max_age: Duration,
    ) -> Result<u64> {
        let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(max_age_ms);
        let n = with_pool!(self, |pool, _begin| {
            sqlx::query(
                "DELETE FROM workflow_runs WHERE run_id IN (SELECT run_id FROM ( \
                   SELECT run_id, updated_at, ROW_NUMBER() OVER ( \
                     PARTITION BY tenant, workflow ORDER BY created_at DESC, run_id DESC) AS rn \
                   FROM workflow_runs) ranked \
                 WHERE rn > $1 OR updated_at < $2)",
            )
            .bind(i64::from(keep_per_workflow))
            .bind(cutoff)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
        });
        n.map_err(|e| self.name_err(e.into()))
    }

    /// The newest `limit` run records of `tenant` (of `workflow` only, when given), newest
    /// first.
    pub async fn list_workflow_runs(
        &self,
        tenant: &str,
        workflow: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Value>> {
        let rows = with_pool!(self, |pool, _begin| {
            sqlx::query_scalar::<_, String>(
                "SELECT record FROM workflow_runs WHERE tenant = $1 \
                 AND ($2 IS NULL OR workflow = $2) \
                 ORDER BY created_at DESC, run_id DESC LIMIT $3",
            )
            .bind(tenant)
            .bind(workflow)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
        });
        let rows = rows.map_err(|e| self.name_err(e.into()))?;
        Ok(rows
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    /// The record of workflow run `run_id`; None when it does not exist or is another tenant's.
    pub async fn get_workflow_run(&self, tenant: &str, run_id: &str) -> Result<Option<Value>> {
        let row = with_pool!(self, |pool, _begin| {
            sqlx::query_scalar::<_, String>(
                "SELECT record FROM workflow_runs WHERE tenant = $1 AND run_id = $2",
            )
            .bind(tenant)
            .bind(run_id)
            .fetch_optional(pool)
            .await
        });
        let row = row.map_err(|e| self.name_err(e.into()))?;
        Ok(row.and_then(|t| serde_json::from_str(&t).ok()))
    }
}
