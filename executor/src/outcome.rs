//! What a run ends with: one [`Status`], the step's streams and files, and what it used.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::engine::CacheSource;
use crate::limits::Limits;
use crate::outputs::OutputFile;

/// How a run ended. Exactly one per run, decided from wasmtime's own signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// The step exited 0 within every limit.
    Succeeded,
    /// The step exited non-zero (including an uncaught Python exception: exit code 1).
    Failed,
    /// The wall-time limit was reached (epoch interruption), or the run was cancelled.
    TimedOut,
    /// The fuel budget ran out (`Trap::OutOfFuel`).
    FuelExhausted,
    /// The step asked for more memory than its limit (refused by the store's limiter).
    MemoryExceeded,
    /// stdout, stderr, output files or output bytes went past their limit.
    OutputExceeded,
    /// A WebAssembly trap: stack overflow, unreachable, out-of-bounds access, ...
    Trapped,
    /// The step succeeded but a verification check failed.
    ChecksFailed,
}

impl Status {
    /// Every status, in documentation order.
    pub const ALL: [Status; 8] = [
        Status::Succeeded,
        Status::Failed,
        Status::TimedOut,
        Status::FuelExhausted,
        Status::MemoryExceeded,
        Status::OutputExceeded,
        Status::Trapped,
        Status::ChecksFailed,
    ];

    /// The name used in JSON and the API.
    pub fn name(self) -> &'static str {
        match self {
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::TimedOut => "TIMED_OUT",
            Status::FuelExhausted => "FUEL_EXHAUSTED",
            Status::MemoryExceeded => "MEMORY_EXCEEDED",
            Status::OutputExceeded => "OUTPUT_EXCEEDED",
            Status::Trapped => "TRAPPED",
            Status::ChecksFailed => "CHECKS_FAILED",
        }
    }

    /// The `stepbox run` exit code for this status (0 only for `SUCCEEDED`; 2 is kept for bad
    /// requests and 10 for host errors).
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Succeeded => 0,
            Status::Failed => 1,
            Status::TimedOut => 3,
            Status::FuelExhausted => 4,
            Status::MemoryExceeded => 5,
            Status::OutputExceeded => 6,
            Status::Trapped => 7,
            Status::ChecksFailed => 8,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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
    /// Files left in the writable directories.
    pub output_files: u64,
    /// Bytes left in the writable directories.
    pub output_bytes: u64,
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
    pub manifest: crate::manifest::Manifest,
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
