-- Run history shared by every replica: one row per (tenant, run_id), the caller's encoded record.
-- `seq` orders runs newest first and is the page cursor.

CREATE TABLE runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (tenant, run_id)
);
CREATE INDEX runs_by_tenant ON runs (tenant, seq);
CREATE INDEX runs_by_tenant_status ON runs (tenant, status, seq);
CREATE INDEX runs_by_age ON runs (created_at);
