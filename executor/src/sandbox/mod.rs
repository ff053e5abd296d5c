//! The sandbox: the part of Stepbox that narrows wasmtime to what a step may do.
//!
//! It owns the engines and the compiled-artifact cache ([`engine`]), how a program becomes
//! something to instantiate ([`runtime`]), the `python-data` runtime's snapshot ([`data`]), one
//! run's Store with its WASI context and limits ([`run`]), capped stdout/stderr ([`pipe`]), the job's own directory ([`jobdir`]) and the
//! collection of what the step left behind, without following symlinks ([`outputs`]).
//!
//! It uses the job model ([`crate::job`]) and nothing above it: no proto, CLI, tenants or HTTP.

pub mod data;
pub mod engine;
pub mod jobdir;
#[cfg(target_os = "linux")]
pub mod landlock;
pub mod outputs;
pub mod pipe;
pub mod run;
pub mod runtime;
#[cfg(target_os = "linux")]
pub mod seccomp;
pub mod wasi_files;
pub mod wasi_readdir;
pub mod worker;
