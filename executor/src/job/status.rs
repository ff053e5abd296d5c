//! The one status every run ends with.

use std::fmt;

use serde::Serialize;

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
