-- Workflow schedules and their firings. A firing is one occurrence of a schedule: the UNIQUE
-- (schedule_id, fire_at) key is what makes several replicas fire an occurrence exactly once
-- (each inserts with ON CONFLICT DO NOTHING; the one whose row landed runs it). No leader.

CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- Occurrences after this instant (unix ms) are due: creation, or the last resume.
    active_from BIGINT NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    -- Bumped by every claim: the row lock that serialises one schedule's claims.
    claims BIGINT NOT NULL DEFAULT 0,
    definition TEXT NOT NULL
);
CREATE INDEX schedules_by_tenant ON schedules (tenant, name);

CREATE TABLE schedule_firings (
    schedule_id TEXT NOT NULL,
    fire_at BIGINT NOT NULL,
    tenant TEXT NOT NULL,
    trigger_kind TEXT NOT NULL,
    status TEXT NOT NULL,
    run_id TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    replica TEXT NOT NULL DEFAULT '',
    claimed_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    UNIQUE (schedule_id, fire_at)
);
CREATE INDEX schedule_firings_by_status ON schedule_firings (schedule_id, status);
