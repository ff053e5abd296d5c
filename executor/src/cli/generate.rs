//! `stepbox generate`: a verified step from plain-language requirements, through an
//! OpenAI-compatible model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::Executor;
use crate::catalog::{Blob, Case, CheckSpec, Origin, StepDefinition};
use crate::cli::io::{read_inputs, text_or_file};
use crate::cli::{CatalogArgs, CheckArgs, GlobalArgs};
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
    /// Publish the verified program to the step catalog under this name, with the sample inputs
    /// and checks as its case and the transcript as its origin (see `stepbox step`).
    #[arg(long, value_name = "NAME")]
    pub publish: Option<String>,
    /// The published step's description (default: the requirements).
    #[arg(long, requires = "publish")]
    pub description: Option<String>,
    /// The catalog --publish stores into.
    #[command(flatten)]
    pub catalog: CatalogArgs,
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
        // Refuse a publication that cannot happen before spending model calls on it.
        let door = match &self.publish {
            Some(name) => {
                crate::catalog::model::check_name("--publish", name)
                    .map_err(crate::catalog::CatalogError::Invalid)?;
                anyhow::ensure!(
                    !req.checks.is_empty(),
                    "--publish needs checks (--check, --expect-file, --expect-stdout): a published \
                     step's case is the evidence that it works"
                );
                if !self.limits.is_empty() {
                    eprintln!(
                        "stepbox: warning: --limit is not part of a published step; its runs use \
                         its policy's limits"
                    );
                }
                Some(self.catalog.open(global).await?)
            }
            None => None,
        };
        let sample = Case {
            name: "sample".into(),
            inputs: req
                .inputs
                .iter()
                .map(|i| (i.path.clone(), Blob::from_bytes(&i.content)))
                .collect(),
            stdin: None,
            args: req.args.clone(),
            checks: req.checks.iter().map(CheckSpec::from_check).collect(),
        };
        let (description, layout, policy) = (
            self.description
                .clone()
                .unwrap_or_else(|| req.requirements.trim().to_string()),
            req.layout,
            req.policy.clone(),
        );
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
        let mut code = if outcome.verdict == Verdict::Failed {
            1
        } else {
            0
        };
        if let (Some(door), Some(name)) = (&door, &self.publish) {
            let mut err = std::io::stderr().lock();
            match (&outcome.verdict, &outcome.source) {
                (Verdict::Verified, Some(source)) => {
                    let def = StepDefinition {
                        name: name.clone(),
                        description,
                        runtime: outcome.runtime.name().to_string(),
                        program: Blob::Text(source.clone()),
                        filename: None,
                        layout: layout.name().to_string(),
                        policy,
                        env: Default::default(),
                        cases: vec![sample],
                        contract: Vec::new(),
                        origin: Origin::Generated {
                            model: outcome.transcript.model.clone(),
                            transcript: serde_json::to_value(&outcome.transcript)?,
                        },
                    };
                    code =
                        code.max(crate::cli::step::publish_from_door(door, &def, &mut err).await?);
                }
                (verdict, _) => {
                    writeln!(
                        err,
                        "stepbox: not published: the program is {verdict:?}, not Verified"
                    )?;
                    code = 1;
                }
            }
        }
        Ok(code)
    }
}
