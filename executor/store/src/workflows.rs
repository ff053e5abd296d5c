//! Workflow runs: one row per run holding the caller's JSON record, so a failed run can be
//! resumed (on any replica) from the steps that already succeeded.

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
