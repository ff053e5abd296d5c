//! `stepbox run`: one step, its output passed through byte for byte, an exit code per status.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::Executor;
use crate::cli::io::{Finished, Presentation, present, read_inputs, read_stdin};
use crate::cli::{CheckArgs, GlobalArgs};
use crate::job::limits::LimitOverrides;
use crate::job::request::{Layout, RuntimeKind, StepJob};

/// `stepbox run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Runtime: `python` or `wasm`; inferred from FILE's extension (.py, .wasm, .wat) when omitted.
    #[arg(long)]
    pub runtime: Option<RuntimeKind>,
    /// Policy name (see `stepbox policy list`).
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Tighten a limit, e.g. `--limit memory=256MiB --limit wall_time=5s --limit fuel=1000000000`.
    /// Keys: memory, fuel, wall_time, stdout, stderr, output_files, output_bytes, scratch_files,
    /// scratch_bytes.
    #[arg(long = "limit", value_name = "KEY=VALUE")]
    pub limits: Vec<String>,
    /// An input file, placed in the data directory under its file name.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// A directory of inputs, placed in the data directory keeping relative paths.
    #[arg(long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// Where to write the step's output files (keeping relative paths).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// A file whose bytes become the step's stdin.
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// File layout: `input-output` (/input, /output, /tmp) or `mnt-data` (/mnt/data, /tmp).
    #[arg(long, default_value = "input-output")]
    pub layout: Layout,
    /// A variable for the step's environment, `KEY=VALUE` (on top of the policy's).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Print the whole result as JSON on stdout instead of passing the step's output through.
    #[arg(long)]
    pub json: bool,
    /// Don't print the status line on stderr when the step does not succeed.
    #[arg(short, long)]
    pub quiet: bool,
    /// Checks on the result; a failed check makes the status CHECKS_FAILED.
    #[command(flatten)]
    pub checks: CheckArgs,
    /// Run the step imported from this ChatGPT conversation (layout mnt-data; the files it offered
    /// for download are checked to exist) instead of FILE.
    #[arg(long, value_name = "CONVERSATION", conflicts_with_all = ["file", "runtime", "layout"])]
    pub from_conversation: Option<PathBuf>,
    /// For --from-conversation with conversations.json: the id or title.
    #[arg(
        long = "conversation",
        value_name = "ID|TITLE",
        requires = "from_conversation"
    )]
    pub select: Option<String>,
    /// For --from-conversation: also check stdout against the conversation's recorded output
    /// (meaningful when the inputs are the conversation's own).
    #[arg(long, requires = "from_conversation")]
    pub verify_recorded: bool,
    /// The step: Python source, a wasm module or component, or WAT text.
    #[arg(required_unless_present = "from_conversation")]
    pub file: Option<PathBuf>,
    /// Arguments for the step (after `--`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl RunArgs {
    /// Builds the job these arguments describe, from FILE or from `base` (an imported step).
    pub fn job(&self, base: Option<StepJob>) -> anyhow::Result<StepJob> {
        let mut job = match (base, &self.file) {
            (Some(job), _) => job,
            (None, Some(file)) => {
                let runtime = match self.runtime {
                    Some(r) => r,
                    None => RuntimeKind::from_extension(file).with_context(|| {
                        format!(
                            "cannot tell the runtime of `{}` from its extension: pass --runtime python or --runtime wasm",
                            file.display()
                        )
                    })?,
                };
                let program = std::fs::read(file)
                    .with_context(|| format!("failed to read step `{}`", file.display()))?;
                let mut job = StepJob::new(runtime, program);
                job.filename = file
                    .file_name()
                    .and_then(|f| f.to_str())
                    .map(str::to_string);
                job.layout = self.layout;
                job
            }
            (None, None) => bail!("give a step FILE or --from-conversation"),
        };
        job.policy = self.policy.clone();
        let mut limits = LimitOverrides::default();
        for pair in &self.limits {
            limits.set_pair(pair).map_err(anyhow::Error::msg)?;
        }
        job.limits = limits;
        job.inputs = read_inputs(self.input_dir.as_deref(), &self.inputs)?;
        job.stdin = read_stdin(self.stdin.as_deref())?;
        for pair in &self.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env `{pair}` is not KEY=VALUE"))?;
            job.env.insert(k.to_string(), v.to_string());
        }
        job.args = self.args.clone();
        Ok(job)
    }

    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let executor = Executor::new(global.executor_config()?)?;
        let mut checks = self.checks.checks()?;
        let base = match &self.from_conversation {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("failed to read `{}`", path.display()))?;
                let imported = crate::authoring::conversation::import(
                    &executor,
                    &bytes,
                    self.select.as_deref(),
                )
                .await?;
                for u in &imported.unsupported_imports {
                    eprintln!(
                        "stepbox: warning: cell {} imports `{}`, which the {} runtime does not have",
                        u.cell, u.module, imported.runtime
                    );
                }
                checks.extend(if self.verify_recorded {
                    imported.recorded_checks()
                } else {
                    imported.output_checks()
                });
                Some(imported.job())
            }
            None => None,
        };
        let job = self.job(base)?;
        let (result, verdicts) = executor
            .run_checked(job, &checks, crate::RunOptions::default())
            .await?;
        present(
            &Finished::local(result, verdicts)?,
            &Presentation {
                output_dir: self.output_dir.as_deref(),
                json: self.json,
                quiet: self.quiet,
                verbose: global.verbose,
            },
        )
    }
}
