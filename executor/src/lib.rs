//! Stepbox's execution core: run untrusted data steps in a WebAssembly sandbox and say precisely
//! how each run ended.
//!
//! The crate is grouped by role; dependencies point one way, from the doors to the core:
//!
//! - [`job`]: what a job is and how it ends: the request and its validation, policies and
//!   limits, outcomes, checks, manifests. Plain data and rules; knows nothing of wasmtime, proto,
//!   clap, tenants or HTTP.
//! - [`sandbox`]: the part that narrows wasmtime to what Stepbox uses: engines and the compiled
//!   artifact cache, runtimes, the Store with its limits, capped pipes, job directories, output
//!   collection. Uses [`job`].
//! - [`executor`]: one job's straight path through the two ([`Executor`]).
//! - [`authoring`]: the doors that write steps: the generate→run→verify→repair loop and
//!   ChatGPT conversation import. Uses the core.
//! - [`service`]: the gRPC service and the platform around it: proto conversions, admission,
//!   the RPCs, tenancy, TLS, metrics, traces, run history, configuration. Uses the core and
//!   [`authoring`].
//! - [`web`]: the web page for people and its JSON endpoint: a third door onto the same
//!   [`service`] as gRPC. Uses [`service`].
//! - [`cli`]: the `stepbox` command line, one file per subcommand. Uses everything above.
//! - [`pb`]: the generated gRPC contract (`proto/`), shared by the service and CLI clients.
//!
//! Defaults: the embedded policies, a work root under the system temp directory, and compiled
//! runtime components cached in `$XDG_CACHE_HOME/stepbox` (or `~/.cache/stepbox`).
//!
//! ```no_run
//! use stepbox::{Executor, ExecutorConfig, InputFile, RuntimeKind, Status, StepJob};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let executor = Executor::new(ExecutorConfig::default())?;
//! let mut job = StepJob::new(RuntimeKind::Python, "print(open('/input/a.csv').read().count('\\n'))");
//! job.inputs.push(InputFile { path: "a.csv".into(), content: "x\n1\n".into() });
//! job.limits.set_pair("wall_time=5s").map_err(anyhow::Error::msg)?;
//! let result = executor.run(job).await?;
//! assert_eq!(result.status, Status::Succeeded);
//! assert_eq!(&result.stdout[..], b"2\n");
//! # Ok(()) }
//! ```

pub mod authoring;
pub mod catalog;
pub mod cli;
pub mod executor;
pub mod job;
pub mod pb;
pub mod sandbox;
pub mod service;
pub mod web;
pub mod workflow;

pub use crate::executor::{
    Executor, ExecutorConfig, RunOptions, default_cache_dir, default_work_root,
};
pub use crate::job::limits::{LimitOverrides, Limits};
pub use crate::job::outcome::{RunResult, Status, Usage};
pub use crate::job::policy::{Policy, PolicySet};
pub use crate::job::request::{InputFile, JobError, Layout, RuntimeKind, StepJob};
pub use crate::sandbox::pipe::{OutputChunk, StreamKind};
