//! Rows going in and out of the store. The store knows nothing of what a step is: a version is an
//! opaque JSON document plus the few columns the store indexes (digest, number, state, description).

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use crate::StoreError;

/// What a catalog entry is. Versions, stages and promotions are keyed by `(kind, name)`, so steps
/// (issue 11) and workflows (issue 12) share the tables and a step and a workflow may share a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A published step.
    Step,
    /// A published workflow.
    Workflow,
}

impl Kind {
    /// The value stored in the `kind` columns: `"step"` or `"workflow"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Step => "step",
            Kind::Workflow => "workflow",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "step" => Ok(Kind::Step),
            "workflow" => Ok(Kind::Workflow),
            other => Err(StoreError::InvalidArgument {
                field: "kind",
                reason: format!("`{other}` is neither `step` nor `workflow`"),
            }),
        }
    }
}

/// Whether a version's cases all passed when it was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Every case passed at publication.
    Verified,
    /// Published with the explicit flag despite failing or missing cases.
    Unverified,
}

impl VersionState {
    /// The value stored in `versions.state`: `"verified"` or `"unverified"`.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Verified => "verified",
            VersionState::Unverified => "unverified",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "verified" => Some(VersionState::Verified),
            "unverified" => Some(VersionState::Unverified),
            _ => None,
        }
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version to publish. The caller computes `digest` over its canonical form of `document`;
/// the store only checks that it is 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVersion {
    /// Step or workflow.
    pub kind: Kind,
    /// The entry's name (validated by the caller).
    pub name: String,
    /// sha256 of the canonical document, 64 lowercase hex digits, without a `sha256:` prefix.
    pub digest: String,
    /// Verified (all cases passed) or explicitly unverified.
    pub state: VersionState,
    /// Copied out of the document so that [`Store::list_names`](crate::Store::list_names) can
    /// search it.
    pub description: String,
    /// The whole version (program, runtime, policy, cases, contract, source), opaque to the store.
    pub document: Value,
    /// The case results of the publication (statuses, verdicts, manifest digests).
    pub evidence: Value,
    /// The tenant that published it.
    pub created_by: String,
}

/// A stored, immutable version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    /// Step or workflow.
    pub kind: Kind,
    /// The entry's name.
    pub name: String,
    /// `N` of `vN`: 1 for the first version of `(kind, name)`, then 2, 3...
    pub number: i64,
    /// sha256 hex of the canonical document.
    pub digest: String,
    /// Verified or unverified at publication.
    pub state: VersionState,
    /// The description column (search).
    pub description: String,
    /// The document as published.
    pub document: Value,
    /// The case results of the publication.
    pub evidence: Value,
    /// The tenant that published it.
    pub created_by: String,
    /// When it was first published, unix milliseconds.
    pub created_at: i64,
}

/// One name in [`Store::list_names`](crate::Store::list_names): its newest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSummary {
    /// The entry's name.
    pub name: String,
    /// Number of the newest version (any state).
    pub latest_number: i64,
    /// Digest of the newest version.
    pub latest_digest: String,
    /// State of the newest version.
    pub latest_state: VersionState,
    /// Description of the newest version.
    pub description: String,
    /// When the newest version was published, unix milliseconds.
    pub updated_at: i64,
    /// How many versions the name has.
    pub versions: i64,
}

/// Where a stage alias points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRow {
    /// The stage's name, e.g. `prod`.
    pub stage: String,
    /// Digest of the version it points to.
    pub digest: String,
    /// Number of that version.
    pub number: i64,
    /// When the alias last moved, unix milliseconds.
    pub updated_at: i64,
    /// The tenant whose promotion moved it.
    pub updated_by: String,
    /// [`Store::catalog_generation`](crate::Store::catalog_generation) right after that move.
    pub generation: i64,
}

/// A promotion request. The caller has already re-run the cases under the stage's policy and says
/// whether they passed (`accepted`); the store records the attempt either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Promotion {
    /// Step or workflow.
    pub kind: Kind,
    /// The entry's name.
    pub name: String,
    /// The stage alias to move.
    pub stage: String,
    /// The digest the caller saw the stage at (None: the stage was unset). The alias moves only
    /// if it still points there (compare-and-swap).
    pub expected_current: Option<String>,
    /// The version to point the stage at; it must exist.
    pub to_digest: String,
    /// Who asked.
    pub tenant: String,
    /// True when the gate passed and the alias should move; false records a refusal.
    pub accepted: bool,
    /// Why (for refusals: which case failed; for acceptances: free text).
    pub reason: String,
    /// The evidence of the gate (case results, manifest digests).
    pub evidence: Value,
}

/// One audit record of the promotion trail.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionRecord {
    /// Increasing id; newer records have larger ids.
    pub id: i64,
    /// Step or workflow.
    pub kind: Kind,
    /// The entry's name.
    pub name: String,
    /// The stage.
    pub stage: String,
    /// Where the stage pointed when the record was written (None: unset).
    pub from_digest: Option<String>,
    /// The version asked for.
    pub to_digest: String,
    /// Who asked.
    pub tenant: String,
    /// When, unix milliseconds.
    pub at: i64,
    /// True when the alias moved.
    pub accepted: bool,
    /// The caller's reason, or the store's ("stage moved concurrently from X to Y").
    pub reason: String,
    /// The caller's evidence.
    pub evidence: Value,
}

/// What [`Store::promote`](crate::Store::promote) did. Every outcome wrote one audit record.
#[derive(Debug, Clone, PartialEq)]
pub enum PromotionOutcome {
    /// The alias moved.
    Promoted(PromotionRecord),
    /// The caller refused it (`accepted: false`); the alias did not move.
    Refused(PromotionRecord),
    /// The alias no longer pointed at `expected_current`: someone else promoted first. The record
    /// says refused; `current` is where the stage points now.
    Conflict {
        /// The refused audit record.
        record: PromotionRecord,
        /// The stage's digest now (None: unset).
        current: Option<String>,
    },
}

impl PromotionOutcome {
    /// The audit record written, whatever the outcome.
    pub fn record(&self) -> &PromotionRecord {
        match self {
            PromotionOutcome::Promoted(r) | PromotionOutcome::Refused(r) => r,
            PromotionOutcome::Conflict { record, .. } => record,
        }
    }
}

/// One stored run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEntry {
    /// Insertion order across all tenants; the page cursor.
    pub seq: i64,
    /// The run's id.
    pub run_id: String,
    /// When the run was created, unix milliseconds (as the caller gave it).
    pub created_at: i64,
    /// Its status name, as the caller gave it (e.g. `SUCCEEDED`).
    pub status: String,
    /// The caller's encoded record (a protobuf), byte for byte.
    pub record: Vec<u8>,
}

/// One page of [`Store::list_runs`](crate::Store::list_runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<RunEntry>,
    /// Pass as `after_seq` to get the next page; None on the last page.
    pub next_after_seq: Option<i64>,
}
