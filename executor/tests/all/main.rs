//! Integration tests: real guests (the CPython component, WAT modules and components) run through
//! the library and the `stepbox` binary. One test binary, one module per area.
//!
//! The Python component must be built first (`guest-runtime/python/build.sh`); compiled artifacts
//! are cached in `target/test-cache` so only the first run of the suite pays for compilation.

mod catalog;
mod cli;
mod common;
mod conversation;
mod data_steps;
mod escape;
mod generate;
mod grpc;
mod limits;
mod manifest;
mod packages;
mod platform;
mod python;
mod python_data;
mod schedule;
mod step_cli;
mod story;
mod telemetry;
mod wasm;
mod web;
mod workers;
mod workflow;
mod workflow_grpc;
