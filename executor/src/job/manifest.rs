//! A verifiable record of a run: digests of everything that went in and came out, the effective
//! limits, policy, runtime and engine, and one digest over all of it.
//!
//! `digest` is the sha256 of this struct's JSON (fields in declaration order, maps sorted) with
//! `digest` itself empty. Wall time and other non-deterministic usage are left out, so a job under a
//! deterministic policy has the same digest on every run and every machine with the same versions.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::job::digest::sha256_hex;
use crate::job::limits::Limits;
use crate::job::status::Status;

/// The manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// A path and the sha256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileDigest {
    /// Relative path.
    pub path: String,
    /// Hex sha256.
    pub sha256: String,
}

/// Which catalog version a run by reference ran: "which code produced this output" has one
/// answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StepVersionRef {
    /// The step's name.
    pub name: String,
    /// `N` of `vN`.
    pub version: i64,
    /// Hex sha256 of the version's canonical definition.
    pub digest: String,
}

/// See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// sha256 of the program.
    pub program_sha256: String,
    /// Runtime name.
    pub runtime: String,
    /// sha256 of the runtime component (empty for `wasm`).
    pub runtime_sha256: String,
    /// Engine and version.
    pub engine: String,
    /// Policy name.
    pub policy: String,
    /// sha256 of the policy's JSON.
    pub policy_sha256: String,
    /// Whether the policy is deterministic.
    pub deterministic: bool,
    /// The effective limits.
    pub limits: Limits,
    /// File layout.
    pub layout: String,
    /// Inputs, sorted by path.
    pub inputs: Vec<FileDigest>,
    /// sha256 of stdin.
    pub stdin_sha256: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Effective environment.
    pub env: BTreeMap<String, String>,
    /// Status of the run (before checks).
    pub status: Status,
    /// Exit code, when the step exited.
    pub exit_code: Option<i32>,
    /// sha256 of stdout as returned.
    pub stdout_sha256: String,
    /// sha256 of stderr as returned.
    pub stderr_sha256: String,
    /// Outputs, sorted by path (symlinks: digest of `symlink:` + target).
    pub outputs: Vec<FileDigest>,
    /// The catalog version that ran, for runs by reference (absent otherwise, so manifests of
    /// inline runs keep their digests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<StepVersionRef>,
    /// sha256 over all of the above.
    pub digest: String,
}

impl Manifest {
    /// Fills in `digest` from the other fields.
    pub fn seal(mut self) -> Manifest {
        self.digest = String::new();
        let canonical = serde_json::to_vec(&self).expect("a manifest serialises");
        self.digest = sha256_hex(&canonical);
        self
    }

    /// Whether `digest` matches the other fields.
    pub fn verify(&self) -> bool {
        self.clone().seal().digest == self.digest
    }
}
