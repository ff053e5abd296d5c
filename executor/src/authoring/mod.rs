//! Authoring: the doors through which steps are written rather than run.
//!
//! It owns the generate→run→verify→repair loop against an OpenAI-compatible model
//! ([`generate`]) and the import of ChatGPT Code Interpreter conversations as steps
//! ([`conversation`]). Both run steps through the core ([`crate::Executor`]) and use the job
//! model; neither knows of proto, the CLI or tenants.

pub mod conversation;
pub mod generate;
