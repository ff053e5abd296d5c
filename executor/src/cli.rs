//! The `stepbox` command line: clap types that tests can call directly, and what each subcommand does.
//!
//! `stepbox run` passes the step's stdout and stderr through byte for byte, writes its output files
//! into `--output-dir`, and exits with a code per status ([`Status::exit_code`]); 2 means the request
//! was refused, 10 that the host failed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::checks::{Check, CheckKind};
use crate::limits::{ByteSize, LimitOverrides, Millis};
use crate::outcome::{RunResult, Status};
use crate::outputs::OutputKind;
use crate::policy::PolicySet;
use crate::request::{InputFile, JobError, Layout, RuntimeKind, StepJob, check_relative_path};
use crate::{Executor, ExecutorConfig};

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
    /// Print progress and timings to stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
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
}

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
    /// Keys: memory, fuel, wall_time, stdout, stderr, output_files, output_bytes.
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

/// Checks on a run's result, as flags.
#[derive(Debug, Args, Default)]
pub struct CheckArgs {
    /// A check, `KIND=ARG`: exit_code=N, stdout_equals=TEXT|@FILE, stdout_matches=REGEX,
    /// file_exists=NAME, file_matches=NAME:REGEX, file_sha256=NAME:HEX,
    /// file_json_schema=NAME:@SCHEMA_FILE.
    #[arg(long = "check", value_name = "KIND=ARG")]
    pub checks: Vec<String>,
    /// An expected output file, `NAME=PATH`: compared as JSON for .json, as CSV for .csv, byte for
    /// byte otherwise.
    #[arg(long = "expect-file", value_name = "NAME=PATH")]
    pub expect_files: Vec<String>,
    /// A file holding the exact expected stdout.
    #[arg(long, value_name = "PATH")]
    pub expect_stdout: Option<PathBuf>,
}

fn text_or_file(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("failed to read `{path}`")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

impl CheckArgs {
    /// The checks these flags describe.
    pub fn checks(&self) -> anyhow::Result<Vec<Check>> {
        let mut out = Vec::new();
        for spec in &self.checks {
            let (kind, arg) = spec.split_once('=').with_context(|| {
                format!("--check `{spec}` is not KIND=ARG (for example exit_code=0)")
            })?;
            let path_and = |what: &str| {
                arg.split_once(':')
                    .map(|(p, r)| (p.to_string(), r.to_string()))
                    .with_context(|| format!("--check {kind}: expected NAME:{what}, got `{arg}`"))
            };
            let kind = match kind {
                "exit_code" => CheckKind::ExitCode(
                    arg.parse()
                        .with_context(|| format!("--check exit_code: `{arg}` is not an integer"))?,
                ),
                "stdout_equals" => CheckKind::StdoutEquals(text_or_file(arg)?.into()),
                "stdout_matches" => CheckKind::StdoutMatches(arg.to_string()),
                "file_exists" => CheckKind::FileExists(arg.to_string()),
                "file_matches" => {
                    let (path, regex) = path_and("REGEX")?;
                    CheckKind::FileMatches { path, regex }
                }
                "file_sha256" => {
                    let (path, sha256) = path_and("HEX")?;
                    CheckKind::FileSha256 { path, sha256 }
                }
                "file_json_schema" => {
                    let (path, schema) = path_and("@SCHEMA_FILE")?;
                    let schema = String::from_utf8(text_or_file(&schema)?)
                        .context("the schema is not UTF-8")?;
                    CheckKind::FileJsonSchema { path, schema }
                }
                other => bail!(
                    "unknown check kind `{other}`: expected exit_code, stdout_equals, stdout_matches, file_exists, \
                     file_matches, file_sha256 or file_json_schema"
                ),
            };
            out.push(Check {
                name: String::new(),
                kind,
            });
        }
        for spec in &self.expect_files {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("--expect-file `{spec}` is not NAME=PATH"))?;
            let content: bytes::Bytes = std::fs::read(path)
                .with_context(|| format!("failed to read expected file `{path}`"))?
                .into();
            let path_s = name.to_string();
            let kind = match Path::new(name).extension().and_then(|e| e.to_str()) {
                Some("json") => CheckKind::FileJsonEquals {
                    path: path_s,
                    content,
                },
                Some("csv") => CheckKind::FileCsvEquals {
                    path: path_s,
                    content,
                    ignore_row_order: false,
                },
                _ => CheckKind::FileEquals {
                    path: path_s,
                    content,
                },
            };
            out.push(Check {
                name: String::new(),
                kind,
            });
        }
        if let Some(p) = &self.expect_stdout {
            let content =
                std::fs::read(p).with_context(|| format!("failed to read `{}`", p.display()))?;
            out.push(Check {
                name: String::new(),
                kind: CheckKind::StdoutEquals(content.into()),
            });
        }
        Ok(out)
    }
}

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
    pub fn config(&self) -> crate::generate::ModelConfig {
        let mut c = crate::generate::ModelConfig::default();
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

/// `stepbox import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A ChatGPT shared-link page (.html), its __NEXT_DATA__ JSON, or a conversations.json export.
    pub file: PathBuf,
    /// For conversations.json: the id or title of the conversation.
    #[arg(long = "conversation", value_name = "ID|TITLE")]
    pub select: Option<String>,
    /// Write the step's program here.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print everything (summary, cells, program) as JSON.
    #[arg(long)]
    pub json: bool,
    /// When the step imports modules the runtime lacks, ask the model to port it to the standard
    /// library, verified on --input files against the conversation's recorded outputs.
    #[arg(long)]
    pub port: bool,
    /// The conversation's input files, for --port.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// Most model calls for --port.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// The model to ask for --port.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `stepbox serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:50051; port 0 picks a free one).
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// The configuration file (stepbox.toml; see `stepbox config check`). STEPBOX_* variables
    /// override its keys and these flags override both.
    #[arg(long, env = "STEPBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Jobs that run at once (default: the number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Jobs that may wait for a slot; past it, RESOURCE_EXHAUSTED (default: 4 x cores).
    #[arg(long)]
    pub queue: Option<usize>,
    /// Largest request accepted (default 64MiB).
    #[arg(long)]
    pub max_message_size: Option<ByteSize>,
    /// How long in-flight jobs may finish after SIGTERM/SIGINT before they are cancelled (default 10s).
    #[arg(long)]
    pub grace_period: Option<Millis>,
}

/// `stepbox config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file plus STEPBOX_* variables) and print it, secrets masked.
    Check {
        /// The file (default: $STEPBOX_CONFIG, or none: defaults and variables only).
        #[arg(long, env = "STEPBOX_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the `sha256:` form of a bearer token for a tenant's `tokens` (reads stdin when absent).
    HashToken {
        /// The token.
        token: Option<String>,
    },
}

impl ConfigCommand {
    fn execute(self) -> anyhow::Result<()> {
        match self {
            ConfigCommand::Check { config } => {
                let c = crate::config::Config::load(config.as_deref(), std::env::vars())?;
                for w in &c.warnings {
                    eprintln!("stepbox: warning: {w}");
                }
                crate::tenancy::Tenants::from_config(&c.tenants)?;
                if let Some(dir) = &c.policies_dir {
                    PolicySet::load_dir(dir)?;
                }
                print!("{}", c.masked_toml());
                eprintln!("stepbox: configuration OK");
            }
            ConfigCommand::HashToken { token } => {
                let token = match token {
                    Some(t) => t,
                    None => std::io::read_to_string(std::io::stdin())?,
                };
                if token.trim().is_empty() {
                    bail!("the token is empty");
                }
                println!("{}", crate::config::hash_token(&token));
            }
        }
        Ok(())
    }
}

/// `stepbox policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List the policies with their descriptions.
    List,
    /// Print one policy's defaults and maximums as JSON.
    Show {
        /// Policy name.
        name: String,
    },
    /// Check a policy file and print it as JSON.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the JSON Schema of policy files.
    Schema,
}

impl GlobalArgs {
    fn policies(&self) -> anyhow::Result<PolicySet> {
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
        Ok(c)
    }
}

impl Cli {
    /// Logs and traces: `STEPBOX_LOG` wins as the filter; `serve` takes the format, filter and
    /// trace export from its configuration (`[log]`, `[telemetry]`); other commands log text.
    /// A configuration that does not load gives the defaults here; `serve` then reports it.
    pub fn telemetry_settings(&self) -> crate::telemetry::TelemetrySettings {
        let mut s = crate::telemetry::TelemetrySettings {
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
        };
        match result {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                use crate::generate::GenerateError;
                let code = match (
                    e.downcast_ref::<JobError>(),
                    e.downcast_ref::<GenerateError>(),
                ) {
                    (Some(j), _) | (_, Some(GenerateError::Job(j))) if !j.is_caller_error() => {
                        EXIT_HOST_ERROR
                    }
                    (_, Some(GenerateError::Model(_))) => EXIT_HOST_ERROR,
                    _ => EXIT_BAD_REQUEST,
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

impl PolicyCommand {
    fn execute(self, global: &GlobalArgs) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        match self {
            PolicyCommand::List => {
                for p in global.policies()?.iter() {
                    writeln!(out, "{:<16} {}", p.name, p.file.description)?;
                }
            }
            PolicyCommand::Show { name } => {
                let set = global.policies()?;
                let p = set.get(&name).with_context(|| {
                    format!(
                        "unknown policy `{name}`: expected one of {}",
                        set.names().join(", ")
                    )
                })?;
                writeln!(out, "{}", serde_json::to_string_pretty(p.as_ref())?)?;
            }
            PolicyCommand::Check { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("failed to read `{}`", file.display()))?;
                let name = file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                let p = crate::policy::Policy::parse(name, &text, &file.display().to_string())?;
                writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
            }
            PolicyCommand::Schema => write!(out, "{}", crate::policy::json_schema())?,
        }
        Ok(())
    }
}

/// Reads the inputs of `--input-dir` (relative paths kept) and of each `--input` (by file name).
fn read_inputs(dir: Option<&Path>, files: &[PathBuf]) -> anyhow::Result<Vec<InputFile>> {
    let mut inputs = match dir {
        Some(d) => read_input_dir(d)?,
        None => Vec::new(),
    };
    for path in files {
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .with_context(|| format!("input `{}` has no UTF-8 file name", path.display()))?;
        let content = std::fs::read(path)
            .with_context(|| format!("failed to read input `{}`", path.display()))?;
        inputs.push(InputFile {
            path: name.to_string(),
            content: content.into(),
        });
    }
    Ok(inputs)
}

/// Reads every regular file under `dir` (symlinks are refused, not followed) with relative paths.
fn read_input_dir(dir: &Path) -> anyhow::Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry =
            entry.with_context(|| format!("failed to read input directory `{}`", dir.display()))?;
        if entry.file_type().is_dir() {
            continue;
        }
        if !entry.file_type().is_file() {
            bail!(
                "input `{}` is not a regular file (symlinks are not followed)",
                entry.path().display()
            );
        }
        let rel = entry.path().strip_prefix(dir)?;
        let path = rel
            .to_str()
            .with_context(|| format!("input path `{}` is not UTF-8", rel.display()))?
            .to_string();
        let content = std::fs::read(entry.path())
            .with_context(|| format!("failed to read `{}`", entry.path().display()))?;
        files.push(InputFile {
            path,
            content: content.into(),
        });
    }
    Ok(files)
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
        if let Some(stdin) = &self.stdin {
            job.stdin = std::fs::read(stdin)
                .with_context(|| format!("failed to read stdin file `{}`", stdin.display()))?
                .into();
        }
        for pair in &self.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env `{pair}` is not KEY=VALUE"))?;
            job.env.insert(k.to_string(), v.to_string());
        }
        job.args = self.args.clone();
        Ok(job)
    }

    async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let executor = Executor::new(global.executor_config()?)?;
        let mut checks = self.checks.checks()?;
        let base = match &self.from_conversation {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("failed to read `{}`", path.display()))?;
                let imported =
                    crate::conversation::import(&executor, &bytes, self.select.as_deref()).await?;
                for u in &imported.unsupported_imports {
                    eprintln!(
                        "stepbox: warning: cell {} imports `{}`, which the python runtime does not have",
                        u.cell, u.module
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
        if global.verbose {
            let u = &result.usage;
            eprintln!(
                "stepbox: {} in {:.1} ms (compile/load {:.1} ms from {:?}, instantiate {:.2} ms, peak memory {} KiB{})",
                result.status,
                u.wall_time_us as f64 / 1000.0,
                u.compile_us as f64 / 1000.0,
                u.compile_cache,
                u.instantiate_us as f64 / 1000.0,
                u.peak_memory_bytes / 1024,
                u.fuel_consumed
                    .map(|f| format!(", fuel {f}"))
                    .unwrap_or_default()
            );
        }
        if let Some(dir) = &self.output_dir {
            write_outputs(dir, &result)?;
        }
        if self.json {
            let mut out = std::io::stdout().lock();
            let mut value = serde_json::to_value(&result)?;
            value["check_results"] = serde_json::to_value(&verdicts)?;
            serde_json::to_writer_pretty(&mut out, &value)?;
            writeln!(out)?;
        } else {
            std::io::stdout().lock().write_all(&result.stdout)?;
            std::io::stderr().lock().write_all(&result.stderr)?;
            for v in verdicts.iter().filter(|v| !v.passed || global.verbose) {
                eprintln!(
                    "stepbox: check {}: {}{}",
                    v.name,
                    if v.passed { "passed" } else { "FAILED" },
                    if v.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", v.detail)
                    }
                );
            }
            if result.status != Status::Succeeded && !self.quiet {
                eprintln!("stepbox: {}: {}", result.status, result.message);
            }
        }
        Ok(result.status.exit_code())
    }
}

/// Writes the result's files under `dir`. Names come from the guest, so each is re-checked as a
/// safe relative path; symlinks are reported on stderr and not recreated.
pub fn write_outputs(dir: &Path, result: &RunResult) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("failed to create output directory `{}`", dir.display()))?;
    for o in &result.outputs {
        let rel = check_relative_path("output", &o.path)?;
        match &o.kind {
            OutputKind::File => {
                let path = dir.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, &o.content)
                    .with_context(|| format!("failed to write `{}`", path.display()))?;
            }
            OutputKind::Symlink { target } => {
                eprintln!(
                    "stepbox: output `{}` is a symlink to `{target}`; not written",
                    o.path
                );
            }
        }
    }
    Ok(())
}

impl ServeArgs {
    /// The configuration: the file (or defaults), `STEPBOX_*` overrides, then these flags.
    pub fn config(&self) -> anyhow::Result<crate::config::Config> {
        let mut c = crate::config::Config::load(self.config.as_deref(), std::env::vars())?;
        if let Some(a) = self.addr {
            c.server.addr = a;
        }
        if let Some(n) = self.concurrency {
            c.server.concurrency = Some(n);
        }
        if let Some(n) = self.queue {
            c.server.queue = Some(n);
        }
        if let Some(s) = self.max_message_size {
            c.server.max_message_size = s;
        }
        if let Some(g) = self.grace_period {
            c.server.grace_period = g;
        }
        c.check()?;
        Ok(c)
    }

    async fn execute(self, mut global: GlobalArgs) -> anyhow::Result<()> {
        let config = self.config()?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        global.work_root = global.work_root.or(config.work_root.clone());
        global.cache_dir = global.cache_dir.or(config.cache_dir.clone());
        global.policies_dir = global.policies_dir.or(config.policies_dir.clone());
        global.python_component = global.python_component.or(config.python_component.clone());
        let mut options = crate::server::ServerOptions::default();
        if let Some(n) = config.server.concurrency {
            options.concurrency = n;
        }
        if let Some(n) = config.server.queue {
            options.queue = n;
        }
        options.max_message_bytes =
            usize::try_from(config.server.max_message_size.0).unwrap_or(usize::MAX);
        options.grace = config.server.grace_period.0;
        options.model = config.model.clone();
        options.tls = config.tls.clone();
        options.run_history = config.server.run_history;
        options.tenants =
            std::sync::Arc::new(crate::tenancy::Tenants::from_config(&config.tenants)?);
        let addr = config.server.addr;
        if !options.tenants.required() {
            if addr.ip().is_loopback() {
                tracing::info!("no tenants configured: serving unauthenticated on loopback");
            } else {
                tracing::warn!(%addr, "serving WITHOUT authentication on a non-loopback address (server.allow_unauthenticated = true)");
                eprintln!(
                    "stepbox: warning: serving without authentication on {addr}: anyone who can connect may run code"
                );
            }
        }

        let executor = std::sync::Arc::new(Executor::new(global.executor_config()?)?);
        if let Err(e) = executor.warm_up().await {
            tracing::warn!(error = %e, "the python runtime is not ready; python jobs will be refused");
        }
        if let Some(m) = &config.metrics {
            let listener = tokio::net::TcpListener::bind(m.addr)
                .await
                .with_context(|| format!("failed to listen for metrics on {}", m.addr))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            tokio::spawn(crate::metrics::serve_metrics(
                options.metrics.clone(),
                listener,
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr}"))?;
        let local = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}")?;
            out.flush()?;
        }
        tracing::info!(addr = %local, concurrency = options.concurrency, queue = options.queue, tls = options.tls.is_some(), "serving");
        if options.tls.is_some() {
            let reload = options.reload.clone();
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the TLS certificate and key");
                    reload.notify_one();
                }
            });
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        crate::server::serve(executor, listener, options, shutdown).await?;
        tracing::info!("stopped");
        Ok(())
    }
}

impl GenerateArgs {
    async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        use crate::generate::{GenerateEvent, GenerateRequest, Generator, Verdict};
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

impl ImportArgs {
    async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("failed to read `{}`", self.file.display()))?;
        let executor = std::sync::Arc::new(Executor::new(global.executor_config()?)?);
        let mut imported =
            crate::conversation::import(&executor, &bytes, self.select.as_deref()).await?;
        let mut ported = None;
        if self.port && !imported.unsupported_imports.is_empty() {
            ported = Some(self.port_step(&executor, &mut imported).await?);
        }
        if let Some(path) = &self.output {
            std::fs::write(path, &imported.source)
                .with_context(|| format!("failed to write `{}`", path.display()))?;
        }
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &imported)?;
            writeln!(out)?;
            return Ok(0);
        }
        let ex = &imported.extracted;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "Title:    {}{}",
            ex.title,
            if ex.conversation_id.is_empty() {
                String::new()
            } else {
                format!(" ({})", ex.conversation_id)
            }
        )?;
        writeln!(out, "Cells:    {}", ex.cells.len())?;
        let inputs: Vec<String> = ex
            .inputs
            .iter()
            .map(|i| {
                format!(
                    "{}{}",
                    i.name,
                    i.size.map(|s| format!(" ({s} bytes)")).unwrap_or_default()
                )
            })
            .collect();
        writeln!(
            out,
            "Inputs:   {}",
            if inputs.is_empty() {
                "none".into()
            } else {
                inputs.join(", ")
            }
        )?;
        writeln!(
            out,
            "Outputs:  {}",
            if ex.outputs.is_empty() {
                "none".into()
            } else {
                ex.outputs.join(", ")
            }
        )?;
        let unsupported: Vec<String> = imported
            .unsupported_imports
            .iter()
            .map(|u| format!("{} (cell {})", u.module, u.cell))
            .collect();
        writeln!(
            out,
            "Unsupported imports: {}",
            if unsupported.is_empty() {
                "none".into()
            } else {
                unsupported.join(", ")
            }
        )?;
        match &imported.expected_stdout {
            Some(s) => writeln!(out, "Expected stdout (on the conversation's inputs): {s:?}")?,
            None => writeln!(out, "Expected stdout: unknown (see notes)")?,
        }
        for n in &imported.notes {
            writeln!(out, "Note:     {n}")?;
        }
        if let Some(p) = ported {
            writeln!(out, "Ported:   {p}")?;
        }
        let inputs_flags: String = ex
            .inputs
            .iter()
            .map(|i| format!(" --input {}", i.name))
            .collect();
        let select_flag = self
            .select
            .as_ref()
            .map(|s| format!(" --conversation {s:?}"))
            .unwrap_or_default();
        match &self.output {
            Some(path) => writeln!(
                out,
                "Program:  written to {} (run it: stepbox run --layout mnt-data{inputs_flags} {})",
                path.display(),
                path.display()
            )?,
            None => writeln!(
                out,
                "Run it:   stepbox run --from-conversation {}{select_flag}{inputs_flags}",
                self.file.display()
            )?,
        }
        Ok(0)
    }

    /// Asks the model to port the imported step to the standard library, verified on the inputs.
    async fn port_step(
        &self,
        executor: &std::sync::Arc<Executor>,
        imported: &mut crate::conversation::ImportedStep,
    ) -> anyhow::Result<String> {
        use crate::generate::{GenerateRequest, Generator, Verdict};
        if self.inputs.is_empty() {
            bail!(
                "--port needs the conversation's input files (--input PATH) to verify the ported step on"
            );
        }
        let missing: Vec<String> = imported
            .unsupported_imports
            .iter()
            .map(|u| u.module.clone())
            .collect();
        let mut requirements = format!(
            "Port this program, written in ChatGPT's Code Interpreter, so that it runs with only the Python standard \
             library (the sandbox does not have: {}). Keep its behaviour: write the same files to /mnt/data and print the same \
             output. Do not print values the notebook merely displayed.\n",
            missing.join(", ")
        );
        for r in &imported.extracted.requests {
            requirements.push_str(&format!("\nThe user had asked: {r}\n"));
        }
        requirements.push_str(&format!(
            "\nThe program:\n```python\n{}\n```\n",
            imported.source
        ));
        let mut req = GenerateRequest::new(requirements);
        req.layout = Layout::MntData;
        req.max_attempts = self.max_attempts;
        req.checks = imported.recorded_checks();
        req.inputs = read_inputs(None, &self.inputs)?;
        let generator = Generator::new(executor.clone(), self.model.config())?;
        eprintln!(
            "stepbox: porting away from {} with {}",
            missing.join(", "),
            generator.config().model
        );
        let outcome = generator.generate(req, None).await?;
        match (outcome.verdict, outcome.source) {
            (Verdict::Verified | Verdict::Unverified, Some(source)) => {
                imported.source = source;
                imported.unsupported_imports.clear();
                Ok(format!(
                    "{:?} in {} attempts: {}",
                    outcome.verdict,
                    outcome.attempts.len(),
                    outcome.stopped
                ))
            }
            _ => bail!(
                "porting failed: {} (the unported step is unchanged)",
                outcome.stopped
            ),
        }
    }
}
