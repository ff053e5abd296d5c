//! `stepbox generate`: a verified step from plain-language requirements, through an
//! OpenAI-compatible model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::Executor;
use crate::cli::io::{read_inputs, text_or_file};
use crate::cli::{CheckArgs, GlobalArgs};
use crate::job::limits::Millis;
use crate::job::request::Layout;

/// `stepbox generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What the step must do: text, or @FILE.
    #[arg(long)]
    pub requirements: String,
    /// A sample input file, placed in the data directory under its file name.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// A directory of sample inputs (relative paths kept).
    #[arg(long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// Checks every attempt must pass.
    #[command(flatten)]
    pub checks: CheckArgs,
    /// Most model calls.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// Deadline for the whole loop.
    #[arg(long, default_value = "5m")]
    pub deadline: Millis,
    /// Policy the attempts run under.
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Limits for the attempts (see `stepbox run --limit`).
    #[arg(long = "limit", value_name = "KEY=VALUE")]
    pub limits: Vec<String>,
    /// File layout the program runs in.
    #[arg(long, default_value = "input-output")]
    pub layout: Layout,
    /// Write the program here instead of printing it on stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write the exchange with the model (OpenAI chat messages as JSON) here.
    #[arg(long, value_name = "FILE")]
    pub transcript: Option<PathBuf>,
    /// Print the whole outcome as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The model to ask.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Which OpenAI-compatible model to ask, and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Base URL of the OpenAI-compatible API (default: $OPENAI_BASE_URL or OpenAI's).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub base_url: Option<String>,
    /// Model name (default: $STEPBOX_MODEL, $OPENAI_MODEL or gpt-4o-mini).
    #[arg(long)]
    pub model: Option<String>,
    /// Environment variable holding the API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Sampling temperature.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Timeout of one model request.
    #[arg(long)]
    pub request_timeout: Option<Millis>,
    /// Retries of a failed model request (timeouts, connection errors, 429, 5xx).
    #[arg(long)]
    pub retries: Option<u32>,
}

impl ModelArgs {
    /// The model configuration: defaults from the environment, overridden by these flags.
    pub fn config(&self) -> crate::authoring::generate::ModelConfig {
        let mut c = crate::authoring::generate::ModelConfig::default();
        if let Some(u) = &self.base_url {
            c.base_url = u.clone();
        }
        if let Some(m) = &self.model {
            c.model = m.clone();
        }
        c.api_key_env = self.api_key_env.clone();
        if let Some(t) = self.temperature {
            c.temperature = t;
        }
        if let Some(t) = self.request_timeout {
            c.request_timeout = t.0;
        }
        if let Some(r) = self.retries {
            c.retries = r;
        }
        c
    }
}

impl GenerateArgs {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        use crate::authoring::generate::{GenerateEvent, GenerateRequest, Generator, Verdict};
        let requirements = String::from_utf8(text_or_file(&self.requirements)?)
            .context("the requirements are not UTF-8")?;
        let mut req = GenerateRequest::new(requirements);
        req.inputs = read_inputs(self.input_dir.as_deref(), &self.inputs)?;
        req.checks = self.checks.checks()?;
        req.max_attempts = self.max_attempts;
        req.deadline = self.deadline.0;
        req.policy = self.policy.clone();
        req.layout = self.layout;
        for pair in &self.limits {
            req.limits.set_pair(pair).map_err(anyhow::Error::msg)?;
        }
        let config = self.model.config();
        let executor = std::sync::Arc::new(Executor::new(global.executor_config()?)?);
        let generator = Generator::new(executor, config.clone())?;
        eprintln!(
            "stepbox: generating with {} at {} (at most {} attempts)",
            config.model, config.base_url, req.max_attempts
        );
        if req.checks.is_empty() {
            eprintln!("stepbox: no checks given: the result will be unverified");
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenerateEvent::AttemptStarted { number } => {
                        eprintln!("stepbox: attempt {number}: asking the model")
                    }
                    GenerateEvent::ModelReply {
                        number,
                        code,
                        tokens,
                        ..
                    } => eprintln!(
                        "stepbox: attempt {number}: model replied ({} tokens){}",
                        tokens.total,
                        if code.is_some() {
                            ", running the program"
                        } else {
                            " without a code block"
                        }
                    ),
                    GenerateEvent::AttemptResult(a) => {
                        let passed = a.check_results.iter().filter(|c| c.passed).count();
                        let status = a.status.map_or("NOT RUN".to_string(), |s| s.to_string());
                        eprintln!(
                            "stepbox: attempt {}: {status}{}{}",
                            a.number,
                            if a.check_results.is_empty() {
                                String::new()
                            } else {
                                format!(", {passed}/{} checks passed", a.check_results.len())
                            },
                            if a.message.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", a.message)
                            }
                        );
                    }
                }
            }
        });
        let outcome = generator.generate(req, Some(tx)).await;
        let _ = progress.await;
        let outcome = outcome?;
        if let Some(t) = &self.transcript {
            std::fs::write(t, serde_json::to_vec_pretty(&outcome.transcript)?)
                .with_context(|| format!("failed to write `{}`", t.display()))?;
        }
        eprintln!(
            "stepbox: {:?}: {} ({} tokens)",
            outcome.verdict, outcome.stopped, outcome.tokens.total
        );
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &outcome)?;
            writeln!(out)?;
        } else if let Some(source) = &outcome.source {
            match &self.output {
                Some(path) => std::fs::write(path, source)
                    .with_context(|| format!("failed to write `{}`", path.display()))?,
                None => std::io::stdout().lock().write_all(source.as_bytes())?,
            }
        }
        Ok(if outcome.verdict == Verdict::Failed {
            1
        } else {
            0
        })
    }
}
