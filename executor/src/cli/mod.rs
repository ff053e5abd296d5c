//! The `stepbox` command line: clap types that tests can call directly, and what each subcommand does.
//!
//! `stepbox run` passes the step's stdout and stderr through byte for byte, writes its output files
//! into `--output-dir`, and exits with a code per status ([`Status::exit_code`]); 2 means the request
//! was refused, 10 that the host failed.
//!
//! One file per subcommand ([`run`], [`serve`], [`generate`], [`import`], [`config`],
//! [`policy`], [`step`]); the flags for checks ([`checks`]), reading inputs and handing results
//! over ([`io`]), and the gRPC client of `--server` ([`remote`]) are shared. The CLI uses the core, the service and authoring; nothing uses it.

pub mod checks;
pub mod config;
pub mod generate;
pub mod import;
pub mod io;
pub mod policy;
pub mod remote;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod step;
pub mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::ExecutorConfig;
pub use crate::cli::checks::CheckArgs;
pub use crate::cli::config::ConfigCommand;
pub use crate::cli::generate::{GenerateArgs, ModelArgs};
pub use crate::cli::import::ImportArgs;
pub use crate::cli::io::write_outputs;
pub use crate::cli::policy::PolicyCommand;
pub use crate::cli::run::RunArgs;
pub use crate::cli::serve::ServeArgs;
pub use crate::cli::step::{CatalogArgs, StepArgs, StepCommand};
pub use crate::cli::workflow::WorkflowCommand;
use crate::job::policy::PolicySet;
use crate::job::request::JobError;

/// Exit code for a refused request (bad path, unknown policy, limit above maximum, bad flags).
pub const EXIT_BAD_REQUEST: u8 = 2;
/// Exit code when the host itself failed.
pub const EXIT_HOST_ERROR: u8 = 10;

/// Stepbox: run untrusted data steps in a WebAssembly sandbox and verify what they produce.
#[derive(Debug, Parser)]
#[command(name = "stepbox", version, about)]
pub struct Cli {
    /// Options every subcommand shares.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where Stepbox keeps its files and finds its policies and runtimes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory of policy files (`NAME.toml`); default: the policies built into this binary.
    #[arg(long, global = true, env = "STEPBOX_POLICIES_DIR")]
    pub policies_dir: Option<PathBuf>,
    /// Parent directory of job directories (each removed when its job ends).
    #[arg(long, global = true, env = "STEPBOX_WORK_ROOT")]
    pub work_root: Option<PathBuf>,
    /// Cache of compiled runtime components.
    #[arg(long, global = true, env = "STEPBOX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The Python runtime component (default: next to the binary, or the checkout's build output).
    #[arg(long, global = true, env = "STEPBOX_PYTHON_COMPONENT")]
    pub python_component: Option<PathBuf>,
    /// Where guests run: `workers` (default) runs them in sandbox worker processes compiled
    /// without in-guest interruption checks, stopped at their wall time by killing the worker;
    /// `in-process` runs them in this process with epoch checks (slower on Python code).
    #[arg(long, global = true, env = "STEPBOX_ISOLATION", value_enum, default_value_t = IsolationArg::Workers)]
    pub isolation: IsolationArg,
    /// Print progress and timings to stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

/// `--isolation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IsolationArg {
    /// Worker processes (runs with fuel stay in-process).
    Workers,
    /// This process, with epoch checks.
    InProcess,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one step and pass its output through.
    Run(RunArgs),
    /// Serve the gRPC API (`stepbox.v1.StepExecutor`, health, reflection).
    Serve(ServeArgs),
    /// Generate a verified step from plain-language requirements with an OpenAI-compatible model.
    Generate(GenerateArgs),
    /// Turn a ChatGPT Code Interpreter conversation into a step and summarise it.
    Import(ImportArgs),
    /// Check a configuration file, or hash a bearer token for it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The step catalog: publish, list, show, promote, history, run by reference.
    Step(StepArgs),
    /// Workflows: steps chained output to input.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Workflow schedules (fired by `stepbox serve` with a `[catalog] database`).
    #[command(subcommand)]
    Schedule(crate::cli::schedule::ScheduleCommand),
}

impl GlobalArgs {
    pub(crate) fn policies(&self) -> anyhow::Result<PolicySet> {
        match &self.policies_dir {
            Some(dir) => PolicySet::load_dir(dir),
            None => Ok(PolicySet::embedded()),
        }
    }

    /// The executor configuration these options describe.
    pub fn executor_config(&self) -> anyhow::Result<ExecutorConfig> {
        let mut c = ExecutorConfig {
            policies: self.policies()?,
            ..ExecutorConfig::default()
        };
        if let Some(w) = &self.work_root {
            c.work_root = w.clone();
        }
        if let Some(d) = &self.cache_dir {
            c.cache_dir = Some(d.clone());
        }
        c.python_component = self.python_component.clone();
        if self.isolation == IsolationArg::Workers {
            c.isolation = crate::executor::Isolation::Workers(
                crate::sandbox::worker::WorkerOptions::current_exe()?,
            );
        }
        Ok(c)
    }
}

impl Cli {
    /// Logs and traces: `STEPBOX_LOG` wins as the filter; `serve` takes the format, filter and
    /// trace export from its configuration (`[log]`, `[telemetry]`); other commands log text.
    /// A configuration that does not load gives the defaults here; `serve` then reports it.
    pub fn telemetry_settings(&self) -> crate::service::telemetry::TelemetrySettings {
        let mut s = crate::service::telemetry::TelemetrySettings {
            filter: if self.global.verbose {
                "stepbox=debug"
            } else {
                "stepbox=warn"
            }
            .into(),
            ..Default::default()
        };
        if let Command::Serve(args) = &self.command
            && let Ok(c) = args.config()
        {
            s.format = c.log.format;
            if !self.global.verbose {
                s.filter = c.log.filter.unwrap_or_else(|| "stepbox=info".into());
            }
            s.otlp = c.telemetry;
        }
        if let Ok(f) = std::env::var("STEPBOX_LOG")
            && !f.is_empty()
        {
            s.filter = f;
        }
        s
    }

    /// Runs the command; the returned code is the process exit code.
    pub async fn execute(self) -> ExitCode {
        let verbose = self.global.verbose;
        let result = match self.command {
            Command::Run(args) => args.execute(&self.global).await,
            Command::Serve(args) => args.execute(self.global).await.map(|()| 0),
            Command::Generate(args) => args.execute(&self.global).await,
            Command::Import(args) => args.execute(&self.global).await,
            Command::Config(cmd) => cmd.execute().map(|()| 0),
            Command::Policy(cmd) => cmd.execute(&self.global).map(|()| 0),
            Command::Step(args) => args.execute(&self.global).await,
            Command::Workflow(cmd) => cmd.execute(&self.global).await,
            Command::Schedule(cmd) => cmd.execute(&self.global).await,
        };
        match result {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                use crate::authoring::generate::GenerateError;
                let code = if let Some(c) = e.downcast_ref::<crate::catalog::CatalogError>() {
                    crate::cli::step::exit_code(c)
                } else if let Some(s) = e.downcast_ref::<stepbox_store::StoreError>() {
                    if s.is_unavailable() {
                        EXIT_HOST_ERROR
                    } else {
                        EXIT_BAD_REQUEST
                    }
                } else if let Some(r) = e.downcast_ref::<crate::cli::remote::RemoteError>() {
                    r.exit_code()
                } else {
                    match (
                        e.downcast_ref::<JobError>(),
                        e.downcast_ref::<GenerateError>(),
                    ) {
                        (Some(j), _) | (_, Some(GenerateError::Job(j))) if !j.is_caller_error() => {
                            EXIT_HOST_ERROR
                        }
                        (_, Some(GenerateError::Model(_))) => EXIT_HOST_ERROR,
                        _ => EXIT_BAD_REQUEST,
                    }
                };
                if verbose {
                    eprintln!("stepbox: error: {e:?}");
                } else {
                    eprintln!("stepbox: error: {e:#}");
                }
                ExitCode::from(code)
            }
        }
    }
}
