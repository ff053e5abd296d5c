//! What a run ends with: one [`Status`], the step's streams and files, and what it used.

use serde::{Deserialize, Serialize, Serializer};

use crate::job::limits::Limits;
pub use crate::job::status::Status;

/// Where a run's compiled code came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSource {
    /// Already loaded in this process.
    Memory,
    /// Deserialised from the on-disk cache.
    Disk,
    /// Compiled now.
    Compiled,
}

/// What kind of entry an output is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum OutputKind {
    /// A regular file.
    File,
    /// A symbolic link, reported with its target and never followed.
    Symlink {
        /// The link's target text.
        target: String,
    },
}

/// One file a step left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutputFile {
    /// Path relative to the directory it was found in, `/`-separated. Files under `/tmp` are not
    /// outputs and are never listed.
    pub path: String,
    /// File or symlink.
    #[serde(flatten)]
    pub kind: OutputKind,
    /// Size in bytes (0 for a symlink).
    pub size: u64,
    /// Hex sha256 of the content (of the empty string for a symlink).
    pub sha256: String,
    /// The content (not in JSON: the CLI writes files to `--output-dir`).
    #[serde(skip)]
    pub content: bytes::Bytes,
}

/// What a run used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Wall time from instantiation to the end of the step, in microseconds.
    pub wall_time_us: u64,
    /// Fuel consumed, when the run was metered.
    pub fuel_consumed: Option<u64>,
    /// Highest total linear memory of the guest, in bytes.
    pub peak_memory_bytes: u64,
    /// Time to compile or load the program (and the runtime), in microseconds.
    pub compile_us: u64,
    /// Where the compiled program came from.
    pub compile_cache: Option<CacheSource>,
    /// Time to instantiate the guest, in microseconds.
    pub instantiate_us: u64,
    /// Output files the step left (new or changed files in its output directory).
    pub output_files: u64,
    /// Their bytes.
    pub output_bytes: u64,
    /// Files left in `/tmp` at the end.
    pub scratch_files: u64,
    /// Their bytes.
    pub scratch_bytes: u64,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// A fresh id for this run.
    pub run_id: String,
    /// How it ended.
    pub status: Status,
    /// The step's exit code, when it exited (not when it was stopped or trapped).
    pub exit_code: Option<i32>,
    /// Empty for `SUCCEEDED`; otherwise what happened, in words (which limit, which trap).
    pub message: String,
    /// The step's stdout, up to its limit (lossy UTF-8 in JSON).
    #[serde(serialize_with = "lossy")]
    pub stdout: bytes::Bytes,
    /// The step's stderr, up to its limit (lossy UTF-8 in JSON).
    #[serde(serialize_with = "lossy")]
    pub stderr: bytes::Bytes,
    /// Whether stdout was cut at its limit.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at its limit.
    pub stderr_truncated: bool,
    /// The files the step left, sorted by path (symlinks reported, never followed).
    pub outputs: Vec<OutputFile>,
    /// What the run used.
    pub usage: Usage,
    /// The limits it ran under.
    pub limits: Limits,
    /// The policy it ran under.
    pub policy: String,
    /// The runtime that ran it.
    pub runtime: String,
    /// A verifiable record of the run.
    pub manifest: crate::job::manifest::Manifest,
}

fn lossy<S: Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

impl RunResult {
    /// The file at `path` among the outputs.
    pub fn output(&self, path: &str) -> Option<&OutputFile> {
        self.outputs.iter().find(|o| o.path == path)
    }
}
