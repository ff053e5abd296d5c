//! The generated gRPC contract for `stepbox.v1` (`proto/stepbox/v1/executor.proto`,
//! `catalog.proto` and `workflow.proto`: `StepExecutor`, `StepCatalog` and `StepWorkflows`),
//! shared by the service and the CLI's clients. Nothing in the core ([`crate::job`], [`crate::sandbox`]) uses it.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

tonic::include_proto!("stepbox.v1");

/// The encoded file descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stepbox_descriptor");
