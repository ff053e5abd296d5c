-- Run history shared by every replica: one row per (tenant, run_id), the caller's encoded record.
-- `seq` orders runs newest first and is the page cursor.

CREATE TABLE runs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant TEXT NOT NULL,
    run_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    record BYTEA NOT NULL,
    UNIQUE (tenant, run_id)
);
CREATE INDEX runs_by_tenant ON runs (tenant, seq);
CREATE INDEX runs_by_tenant_status ON runs (tenant, status, seq);
CREATE INDEX runs_by_age ON runs (created_at);
