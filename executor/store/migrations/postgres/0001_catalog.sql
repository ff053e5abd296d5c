-- The catalog: immutable versions keyed by (kind, name), stage aliases, the promotion audit trail
-- and the change counter that replicas poll. Kinds: 'step' (issue 11), 'workflow' (issue 12).
-- Timestamps are unix milliseconds; documents are the caller's JSON text, kept byte for byte.

CREATE TABLE catalog_generation (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO catalog_generation (id, value) VALUES (1, 0);

CREATE TABLE versions (
    kind TEXT NOT NULL CHECK (kind IN ('step', 'workflow')),
    name TEXT NOT NULL,
    number BIGINT NOT NULL CHECK (number > 0),
    digest TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('verified', 'unverified')),
    description TEXT NOT NULL,
    document TEXT NOT NULL,
    evidence TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, name, number),
    UNIQUE (kind, name, digest)
);

CREATE TABLE stages (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    stage TEXT NOT NULL,
    digest TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    generation BIGINT NOT NULL,
    PRIMARY KEY (kind, name, stage),
    FOREIGN KEY (kind, name, digest) REFERENCES versions (kind, name, digest)
);

CREATE TABLE promotions (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    stage TEXT NOT NULL,
    from_digest TEXT,
    to_digest TEXT NOT NULL,
    tenant TEXT NOT NULL,
    at BIGINT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'refused')),
    reason TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE INDEX promotions_by_name ON promotions (kind, name, id);
