//! The job model: what a step job is, what it may ask for, and how its end is described.
//!
//! It owns the request and its validation ([`request`]), policies ([`policy`]) and their typed
//! limits ([`limits`]), the one status a run ends with and its result ([`outcome`]), checks
//! ([`checks`]) and the sealed run manifest ([`manifest`]), plus the digest helper they share
//! ([`digest`]).
//!
//! Plain data and rules: it uses no other room of the crate, and nothing of wasmtime, proto, clap,
//! tenants or HTTP.

pub mod checks;
pub mod digest;
pub mod limits;
pub mod manifest;
pub mod outcome;
pub mod policy;
pub mod request;
pub mod status;
