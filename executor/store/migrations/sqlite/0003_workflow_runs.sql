-- Workflow runs: one row per run, the caller's JSON record (every step's status, the digests of
-- its version, policy, inputs and outputs), so a failed run can be resumed on any replica.

CREATE TABLE workflow_runs (
    run_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    workflow TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX workflow_runs_by_tenant ON workflow_runs (tenant, workflow, created_at);
