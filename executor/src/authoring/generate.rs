//! Generate verified steps from plain-language requirements with any OpenAI-compatible model.
//!
//! The loop: requirements + sample inputs + checks → the model writes a program → it runs in the
//! sandbox → the checks judge it → what went wrong goes back to the model → repeat until verified,
//! out of attempts, or past the deadline. The outcome keeps every attempt and the whole exchange as
//! a transcript (OpenAI chat messages as JSON) that can be reviewed, replayed and re-imported.
//!
//! The model is reached with `async-openai` chat completions at any base URL (OpenAI, Azure OpenAI,
//! vLLM, llama.cpp's server, Ollama). Defaults follow the usual variables: `OPENAI_BASE_URL`,
//! `OPENAI_API_KEY` (the key is read from the variable named in [`ModelConfig::api_key_env`] and
//! never logged), and `STEPBOX_MODEL` or `OPENAI_MODEL` for the model name.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequestArgs,
};
use serde::{Deserialize, Serialize};

use crate::job::checks::{Check, CheckKind, CheckResult};
use crate::job::limits::LimitOverrides;
use crate::job::outcome::Status;
use crate::job::request::{InputFile, JobError, Layout, RuntimeKind, StepJob};
use crate::{Executor, RunOptions};

/// Lines of each text input shown to the model.
const PREVIEW_LINES: usize = 20;
/// Bytes of each text input shown to the model at most.
const PREVIEW_BYTES: usize = 2000;
/// Bytes of stderr fed back after a failed attempt.
const STDERR_TAIL: usize = 2000;
/// Bytes of expected content quoted when describing a check.
const CHECK_QUOTE: usize = 500;

/// Where and how to reach the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the API key (the key itself is never stored).
    pub api_key_env: String,
    /// Model name.
    pub model: String,
    /// Sampling temperature.
    pub temperature: f32,
    /// Timeout of one request.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Retries after a timeout, connection failure, 429 or 5xx (4xx other than 429 are final).
    pub retries: u32,
    /// First backoff between retries; doubles each time.
    #[serde(with = "humantime_serde_compat")]
    pub backoff: Duration,
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let m: crate::job::limits::Millis = Deserialize::deserialize(d)?;
        Ok(m.0)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ModelConfig {
            base_url: env("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into()),
            api_key_env: "OPENAI_API_KEY".into(),
            model: env("STEPBOX_MODEL")
                .or_else(|| env("OPENAI_MODEL"))
                .unwrap_or_else(|| "gpt-4o-mini".into()),
            temperature: 0.2,
            request_timeout: Duration::from_secs(120),
            retries: 2,
            backoff: Duration::from_millis(500),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The requirements, in plain language.
    pub requirements: String,
    /// The runtime the program is for (only `python` is generated).
    pub runtime: RuntimeKind,
    /// File layout the program will run in.
    pub layout: Layout,
    /// Sample inputs: the program runs on them, and the model sees a preview of each.
    pub inputs: Vec<InputFile>,
    /// Checks the program must pass; none means the result is unverified.
    pub checks: Vec<Check>,
    /// Policy the attempts run under.
    pub policy: String,
    /// Limits for the attempts.
    pub limits: LimitOverrides,
    /// Arguments for the program.
    pub args: Vec<String>,
    /// Most attempts (model calls) before giving up.
    pub max_attempts: u32,
    /// Deadline for the whole loop.
    pub deadline: Duration,
}

impl GenerateRequest {
    /// A request with the defaults: python, input-output layout, default policy, 4 attempts, 5 min.
    pub fn new(requirements: impl Into<String>) -> GenerateRequest {
        GenerateRequest {
            requirements: requirements.into(),
            runtime: RuntimeKind::Python,
            layout: Layout::InputOutput,
            inputs: Vec::new(),
            checks: Vec::new(),
            policy: String::new(),
            limits: LimitOverrides::default(),
            args: Vec::new(),
            max_attempts: 4,
            deadline: Duration::from_secs(300),
        }
    }
}

/// Tokens used, as the endpoint reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Total tokens.
    pub total: u64,
}

impl std::ops::AddAssign for TokenUsage {
    fn add_assign(&mut self, o: TokenUsage) {
        self.prompt += o.prompt;
        self.completion += o.completion;
        self.total += o.total;
    }
}

/// One attempt: the model's reply, the program taken from it, and how it fared.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// The model's whole reply.
    pub reply: String,
    /// The program from the reply's fenced code block, if there was one.
    pub code: Option<String>,
    /// The run's status (none when there was no program to run).
    pub status: Option<Status>,
    /// What went wrong, in words.
    pub message: String,
    /// The end of the run's stderr.
    pub stderr_tail: String,
    /// Verdicts on the checks.
    pub check_results: Vec<CheckResult>,
    /// Tokens this attempt's model call used.
    pub tokens: TokenUsage,
    /// Time the model took, in milliseconds.
    pub model_ms: u64,
}

impl Attempt {
    /// Whether the program ran and every check passed.
    pub fn passed(&self) -> bool {
        self.status == Some(Status::Succeeded)
    }
}

/// How generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// A program passed every check.
    Verified,
    /// No checks were given: a program ran successfully, but nothing says its output is right.
    Unverified,
    /// No program passed within the attempts or the deadline.
    Failed,
}

/// One message of the exchange with the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The whole exchange, in OpenAI's chat message format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    /// The model asked.
    pub model: String,
    /// The endpoint asked.
    pub base_url: String,
    /// Every message sent and received, in order.
    pub messages: Vec<ChatMessage>,
}

/// The result of generation.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutcome {
    /// Verified, unverified or failed.
    pub verdict: Verdict,
    /// The runtime of `source`.
    pub runtime: RuntimeKind,
    /// The program that passed (or, unverified, ran); none when generation failed.
    pub source: Option<String>,
    /// Why the loop stopped, in words.
    pub stopped: String,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Tokens over all attempts.
    pub tokens: TokenUsage,
    /// The exchange with the model.
    pub transcript: Transcript,
}

/// Progress, as it happens.
#[derive(Clone, Debug)]
pub enum GenerateEvent {
    /// An attempt begins (the model is being asked).
    AttemptStarted {
        /// 1-based.
        number: u32,
    },
    /// The model replied.
    ModelReply {
        /// 1-based.
        number: u32,
        /// The reply.
        reply: String,
        /// The program taken from it.
        code: Option<String>,
        /// Tokens used.
        tokens: TokenUsage,
    },
    /// The attempt's program ran (or there was none).
    AttemptResult(Box<Attempt>),
}

/// Generation could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A field of the request is malformed.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What was wrong.
        reason: String,
    },
    /// The model endpoint failed (after retries where retrying made sense).
    #[error("{0}")]
    Model(String),
    /// A job could not be built or run.
    #[error(transparent)]
    Job(#[from] JobError),
}

/// Runs the generate → run → verify → repair loop.
#[derive(Debug)]
pub struct Generator {
    executor: Arc<Executor>,
    client: Client<OpenAIConfig>,
    config: ModelConfig,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// The program in the reply's fenced code block: the first block tagged `python`/`py`, else the
/// first untagged one.
pub fn extract_code(reply: &str) -> Option<String> {
    let fence = regex::Regex::new(r"(?s)```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```")
        .expect("a valid pattern");
    let blocks: Vec<(String, String)> = fence
        .captures_iter(reply)
        .map(|c| (c[1].to_ascii_lowercase(), c[2].to_string()))
        .collect();
    blocks
        .iter()
        .find(|(tag, _)| tag == "python" || tag == "py" || tag == "python3")
        .or_else(|| blocks.iter().find(|(tag, _)| tag.is_empty()))
        .map(|(_, code)| code.clone())
        .filter(|code| !code.trim().is_empty())
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn kind_of_binary(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x50, 0x4b, 0x03, 0x04, ..] => "a ZIP archive (or an .xlsx/.docx file)",
        [0x1f, 0x8b, ..] => "gzip-compressed data",
        [0x25, 0x50, 0x44, 0x46, ..] => "a PDF document",
        [0x89, b'P', b'N', b'G', ..] => "a PNG image",
        [0xff, 0xd8, 0xff, ..] => "a JPEG image",
        _ => "binary data",
    }
}

/// A bounded preview of one input: the head of a text file, or the size and type of a binary one.
pub fn preview(file: &InputFile) -> String {
    let size = file.content.len();
    match std::str::from_utf8(&file.content) {
        Ok(text) if !file.content.contains(&0) => {
            let head: Vec<&str> = text.lines().take(PREVIEW_LINES).collect();
            let mut shown = head.join("\n");
            let truncated = shown.len() > PREVIEW_BYTES || text.lines().count() > PREVIEW_LINES;
            shown = truncate_utf8(&shown, PREVIEW_BYTES).to_string();
            let lines = text.lines().count();
            format!(
                "`{}` ({size} bytes, {lines} lines){}:\n```\n{shown}\n```",
                file.path,
                if truncated {
                    format!(", first {} lines", head.len().min(PREVIEW_LINES))
                } else {
                    String::new()
                }
            )
        }
        _ => format!(
            "`{}` ({size} bytes): {}; not shown",
            file.path,
            kind_of_binary(&file.content)
        ),
    }
}

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let t = truncate_utf8(&text, CHECK_QUOTE);
    if t.len() < text.len() {
        format!(
            "```\n{t}\n```\n(first {CHECK_QUOTE} bytes of {})",
            text.len()
        )
    } else {
        format!("```\n{t}\n```")
    }
}

/// A check in words, for the prompt.
pub fn describe_check(check: &Check) -> String {
    match &check.kind {
        CheckKind::ExitCode(c) => format!("The program must exit with code {c}."),
        CheckKind::StdoutEquals(b) => format!("Standard output must be exactly:\n{}", quote(b)),
        CheckKind::StdoutMatches(r) => {
            format!("Standard output must match the regular expression `{r}`.")
        }
        CheckKind::FileExists(p) => format!("The program must write the output file `{p}`."),
        CheckKind::FileEquals { path, content } => format!(
            "Output file `{path}` must contain exactly:\n{}",
            quote(content)
        ),
        CheckKind::FileSha256 { path, sha256 } => {
            format!("Output file `{path}` must have sha256 {sha256}.")
        }
        CheckKind::FileJsonEquals { path, content } => {
            format!(
                "Output file `{path}` must be JSON equal to (key order and spacing do not matter):\n{}",
                quote(content)
            )
        }
        CheckKind::FileCsvEquals {
            path,
            content,
            ignore_row_order,
        } => format!(
            "Output file `{path}` must be a CSV with this header and these rows{}:\n{}",
            if *ignore_row_order {
                " (in any order)"
            } else {
                ", in this order"
            },
            quote(content)
        ),
        CheckKind::FileMatches { path, regex } => {
            format!("Output file `{path}` must match the regular expression `{regex}`.")
        }
        CheckKind::FileJsonSchema { path, schema } => {
            format!(
                "Output file `{path}` must be JSON valid against this JSON Schema:\n{}",
                quote(schema.as_bytes())
            )
        }
        CheckKind::Verifier(_) => "A separate verifier program will inspect the outputs.".into(),
    }
}

impl Generator {
    /// A generator running attempts on `executor` and asking the model described by `config`.
    pub fn new(executor: Arc<Executor>, config: ModelConfig) -> Result<Generator, GenerateError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| GenerateError::Model(format!("failed to build the HTTP client: {e}")))?;
        let key = std::env::var(&config.api_key_env).unwrap_or_default();
        if key.is_empty() {
            tracing::debug!(var = %config.api_key_env, "no API key set; sending none (fine for local servers)");
        }
        let openai = OpenAIConfig::new()
            .with_api_base(config.base_url.trim_end_matches('/'))
            .with_api_key(key);
        // Plain transport without async-openai's own retry layer: the retry policy (which errors,
        // how often, how long between) is ours, so the error the caller sees names every try.
        let client = Client::with_config(openai)
            .with_http_client(http.clone())
            .with_http_service(async_openai::middleware::ReqwestService::new(http));
        Ok(Generator {
            executor,
            client,
            config,
            slots: None,
        })
    }

    /// Runs each attempt's program only while holding one of `slots` (the server's run slots), so
    /// generation shares the server's concurrency bound; model calls hold no slot.
    pub fn with_slots(mut self, slots: Arc<tokio::sync::Semaphore>) -> Generator {
        self.slots = Some(slots);
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn system_prompt(&self, req: &GenerateRequest) -> String {
        let limits = self
            .executor
            .policies()
            .get(&req.policy)
            .and_then(|p| p.limits_for(&req.limits).ok());
        let (data, outputs) = match req.layout {
            Layout::InputOutput => (
                "Input files are in `/input` (read-only).",
                "Write every output file into `/output` (empty at the start; it is also the working directory). `/tmp` is scratch space.",
            ),
            Layout::MntData => (
                "Input files are in `/mnt/data` (also the working directory).",
                "Write output files into `/mnt/data`: new or changed files there are the outputs. `/tmp` is scratch space.",
            ),
        };
        let packages: Vec<String> = crate::sandbox::runtime::python_packages()
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        let mut s = String::from(
            "You write one complete Python program (a \"step\") that turns the user's input files into the outputs they describe.\n\
             It runs in a sandbox with these rules:\n",
        );
        let data_runtime = self
            .executor
            .runtimes()
            .python_data_dir()
            .map(|d| d.manifest());
        match (req.runtime, data_runtime) {
            (RuntimeKind::PythonData, Some(Ok((version, list)))) => {
                let _ = writeln!(
                    s,
                    "- Python {version} (WebAssembly, wasm32) with its standard library and these packages: {}. \
                     Nothing else is installed (no requests, pyarrow, polars, torch, ...). Save charts with matplotlib's Agg \
                     backend to files. numpy's default integer is 32-bit here: give `dtype=np.int64` where values may pass 2**31. \
                     Unavailable: threads and processes, ctypes, mmap, sockets, ssl.",
                    list.iter()
                        .map(|(n, v)| format!("{n} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "- Python 3.14 with its standard library and these packages: {}. Nothing else is installed \
                     (no pandas, numpy, requests, lxml, ...). zoneinfo and dateutil know every IANA time zone. \
                     Unavailable even from the standard library: bz2, lzma, ssl, ctypes, curses, fcntl, grp, pwd, mmap, pty, readline, resource, \
                     syslog, termios, tty, tkinter.",
                    packages.join(", ")
                );
            }
        }
        s.push_str("- No network, no subprocesses, no threads.\n");
        let _ = writeln!(s, "- {data} {outputs}");
        let _ = writeln!(
            s,
            "- Arguments arrive in `sys.argv[1:]`; standard input is empty unless stated."
        );
        if let Some(l) = limits {
            let _ = writeln!(
                s,
                "- Limits: {} of memory, {} of wall time, {} of standard output, at most {} output files.",
                crate::job::limits::ByteSize(l.memory_bytes),
                humantime::format_duration(l.wall_time),
                crate::job::limits::ByteSize(l.stdout_bytes),
                l.output_files
            );
        }
        s.push_str(
            "- Exit with status 0 when done; an uncaught exception fails the step.\n\
             Reply with the whole program in one fenced ```python code block. Keep explanations short.",
        );
        s
    }

    fn first_user_message(req: &GenerateRequest) -> String {
        let mut s = format!("Requirements:\n{}\n", req.requirements.trim());
        if req.inputs.is_empty() {
            s.push_str("\nThere are no input files.\n");
        } else {
            s.push_str("\nSample input files (previews):\n");
            for f in &req.inputs {
                let _ = writeln!(s, "{}", preview(f));
            }
        }
        if !req.args.is_empty() {
            let _ = writeln!(s, "\nArguments: {:?}", req.args);
        }
        if req.checks.is_empty() {
            s.push_str("\nNo automatic checks are given; follow the requirements exactly.\n");
        } else {
            s.push_str("\nYour program will be run on these inputs and must pass these checks:\n");
            for c in &req.checks {
                let _ = writeln!(s, "- {}", describe_check(c));
            }
        }
        s
    }

    fn feedback(attempt: &Attempt) -> String {
        let Some(status) = attempt.status else {
            return "Your reply had no fenced code block, so nothing could run. Reply with the complete program in one ```python code block.".into();
        };
        let mut s = format!(
            "That program did not pass (attempt {}).\nStatus: {status}",
            attempt.number
        );
        if !attempt.message.is_empty() {
            let _ = write!(s, ": {}", attempt.message);
        }
        s.push('\n');
        if !attempt.stderr_tail.trim().is_empty() {
            let _ = writeln!(
                s,
                "End of stderr:\n```\n{}\n```",
                attempt.stderr_tail.trim_end()
            );
        }
        let failed: Vec<_> = attempt.check_results.iter().filter(|c| !c.passed).collect();
        if !failed.is_empty() {
            s.push_str("Failed checks:\n");
            for c in failed {
                let _ = writeln!(s, "- {}: {}", c.name, c.detail);
            }
        }
        s.push_str("Fix the program and reply with the whole corrected program in one ```python code block.");
        s
    }

    fn model_error(&self, e: &OpenAIError) -> (String, bool) {
        let url = &self.config.base_url;
        match e {
            OpenAIError::ApiError(r) => {
                let status = r.status_code.as_u16();
                let retry = status == 429 || r.status_code.is_server_error();
                let msg = truncate_utf8(&r.api_error.message, 300).to_string();
                (
                    format!("model endpoint {url} answered HTTP {status}: {msg}"),
                    retry,
                )
            }
            OpenAIError::Reqwest(e) if e.is_timeout() => (
                format!(
                    "model endpoint {url} did not answer within {}",
                    humantime::format_duration(self.config.request_timeout)
                ),
                true,
            ),
            OpenAIError::Reqwest(e) if e.is_connect() => (
                format!("could not connect to model endpoint {url}: {e}"),
                true,
            ),
            OpenAIError::Reqwest(e) => {
                (format!("request to model endpoint {url} failed: {e}"), true)
            }
            OpenAIError::JSONDeserialize(e, body) => (
                format!(
                    "model endpoint {url} sent a reply that is not a chat completion ({e}); it began: {:?}",
                    truncate_utf8(body, 200)
                ),
                false,
            ),
            other => (format!("model endpoint {url}: {other}"), false),
        }
    }

    async fn ask(&self, messages: &[ChatMessage]) -> Result<(String, TokenUsage), GenerateError> {
        let mut request_messages: Vec<ChatCompletionRequestMessage> =
            Vec::with_capacity(messages.len());
        for m in messages {
            request_messages.push(match m.role.as_str() {
                "system" => ChatCompletionRequestSystemMessage::from(m.content.as_str()).into(),
                "assistant" => ChatCompletionRequestAssistantMessageArgs::default()
                    .content(m.content.as_str())
                    .build()
                    .map_err(|e| GenerateError::Model(e.to_string()))?
                    .into(),
                _ => ChatCompletionRequestUserMessage::from(m.content.as_str()).into(),
            });
        }
        let request = CreateChatCompletionRequestArgs::default()
            .model(self.config.model.as_str())
            .temperature(self.config.temperature)
            .messages(request_messages)
            .build()
            .map_err(|e| GenerateError::Model(format!("failed to build the chat request: {e}")))?;
        let mut backoff = self.config.backoff;
        let mut tries = 0;
        loop {
            match self.client.chat().create(request.clone()).await {
                Ok(response) => {
                    let tokens = response
                        .usage
                        .as_ref()
                        .map_or_else(TokenUsage::default, |u| TokenUsage {
                            prompt: u64::from(u.prompt_tokens),
                            completion: u64::from(u.completion_tokens),
                            total: u64::from(u.total_tokens),
                        });
                    let text = response
                        .choices
                        .into_iter()
                        .next()
                        .and_then(|c| c.message.content.or(c.message.refusal))
                        .unwrap_or_default();
                    return Ok((text, tokens));
                }
                Err(e) => {
                    let (msg, retry) = self.model_error(&e);
                    if !retry || tries >= self.config.retries {
                        let after = if tries > 0 {
                            format!(" (after {} tries)", tries + 1)
                        } else {
                            String::new()
                        };
                        return Err(GenerateError::Model(format!("{msg}{after}")));
                    }
                    tracing::warn!(error = %msg, retry_in = ?backoff, "model call failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    tries += 1;
                }
            }
        }
    }

    /// Runs the loop. `events` receives progress as it happens. An endpoint that cannot be
    /// reached or keeps failing ends generation with [`GenerateError::Model`].
    pub async fn generate(
        &self,
        req: GenerateRequest,
        events: Option<tokio::sync::mpsc::UnboundedSender<GenerateEvent>>,
    ) -> Result<GenerateOutcome, GenerateError> {
        match req.runtime {
            RuntimeKind::Python => {}
            RuntimeKind::PythonData => {
                if let Err(reason) = self.executor.runtimes().availability(req.runtime) {
                    return Err(GenerateError::Invalid {
                        field: "runtime".into(),
                        reason,
                    });
                }
            }
            RuntimeKind::Wasm => {
                return Err(GenerateError::Invalid {
                    field: "runtime".into(),
                    reason: "only `python` and `python-data` steps can be generated".into(),
                });
            }
        }
        if req.requirements.trim().is_empty() {
            return Err(GenerateError::Invalid {
                field: "requirements".into(),
                reason: "the requirements are empty".into(),
            });
        }
        if req.max_attempts == 0 || req.max_attempts > 20 {
            return Err(GenerateError::Invalid {
                field: "max_attempts".into(),
                reason: "must be between 1 and 20".into(),
            });
        }
        // Refuse malformed checks and jobs before spending a model call on them.
        for (i, c) in req.checks.iter().enumerate() {
            c.prepare(i)?;
        }
        let mut probe = StepJob::new(req.runtime, "pass");
        probe.inputs = req.inputs.clone();
        probe.policy = req.policy.clone();
        probe.limits = req.limits.clone();
        probe.validate(self.executor.policies())?;

        let send = |e: GenerateEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(e);
            }
        };
        let started = Instant::now();
        let mut transcript = Transcript {
            model: self.config.model.clone(),
            base_url: self.config.base_url.clone(),
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: self.system_prompt(&req),
                },
                ChatMessage {
                    role: "user".into(),
                    content: Self::first_user_message(&req),
                },
            ],
        };
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut tokens = TokenUsage::default();
        let mut stopped = format!("no program passed in {} attempts", req.max_attempts);
        for number in 1..=req.max_attempts {
            let Some(remaining) = req.deadline.checked_sub(started.elapsed()) else {
                stopped = format!(
                    "the deadline of {} passed",
                    humantime::format_duration(req.deadline)
                );
                break;
            };
            send(GenerateEvent::AttemptStarted { number });
            let asked = Instant::now();
            let (reply, used) =
                match tokio::time::timeout(remaining, self.ask(&transcript.messages)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        stopped = format!(
                            "the deadline of {} passed while the model was answering",
                            humantime::format_duration(req.deadline)
                        );
                        break;
                    }
                };
            let model_ms = u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
            tokens += used;
            transcript.messages.push(ChatMessage {
                role: "assistant".into(),
                content: reply.clone(),
            });
            let code = extract_code(&reply);
            send(GenerateEvent::ModelReply {
                number,
                reply: reply.clone(),
                code: code.clone(),
                tokens: used,
            });
            let mut attempt = Attempt {
                number,
                reply,
                code: code.clone(),
                status: None,
                message: "the reply had no fenced code block".into(),
                stderr_tail: String::new(),
                check_results: Vec::new(),
                tokens: used,
                model_ms,
            };
            if let Some(code) = code {
                let mut job = StepJob::new(req.runtime, code);
                job.layout = req.layout;
                job.inputs = req.inputs.clone();
                job.policy = req.policy.clone();
                job.limits = req.limits.clone();
                job.args = req.args.clone();
                let remaining = req.deadline.saturating_sub(started.elapsed());
                let run = async {
                    let _slot =
                        match &self.slots {
                            Some(s) => Some(s.acquire().await.map_err(|_| {
                                JobError::Internal(anyhow::anyhow!("shutting down"))
                            })?),
                            None => None,
                        };
                    self.executor
                        .run_checked(job, &req.checks, RunOptions::default())
                        .await
                };
                match tokio::time::timeout(remaining, run).await {
                    Ok(Ok((result, verdicts))) => {
                        let tail_start = result.stderr.len().saturating_sub(STDERR_TAIL);
                        attempt.status = Some(result.status);
                        attempt.message = result.message;
                        attempt.stderr_tail =
                            String::from_utf8_lossy(&result.stderr[tail_start..]).into_owned();
                        attempt.check_results = verdicts;
                    }
                    Ok(Err(JobError::Invalid { field, reason })) => {
                        // The program itself was refused (e.g. not UTF-8): the model's fault.
                        attempt.status = Some(Status::Failed);
                        attempt.message =
                            format!("the program was refused: invalid `{field}`: {reason}");
                    }
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        attempt.status = Some(Status::TimedOut);
                        attempt.message =
                            "the generation deadline passed while the program ran".into();
                    }
                }
            }
            send(GenerateEvent::AttemptResult(Box::new(attempt.clone())));
            let passed = attempt.passed();
            if !passed {
                transcript.messages.push(ChatMessage {
                    role: "user".into(),
                    content: Self::feedback(&attempt),
                });
            }
            attempts.push(attempt);
            if passed {
                let verdict = if req.checks.is_empty() {
                    Verdict::Unverified
                } else {
                    Verdict::Verified
                };
                let stopped = match verdict {
                    Verdict::Verified => format!("attempt {number} passed every check"),
                    _ => format!(
                        "attempt {number} ran successfully, but no checks were given: the result is unverified"
                    ),
                };
                let source = attempts.last().and_then(|a| a.code.clone());
                return Ok(GenerateOutcome {
                    verdict,
                    runtime: req.runtime,
                    source,
                    stopped,
                    attempts,
                    tokens,
                    transcript,
                });
            }
        }
        Ok(GenerateOutcome {
            verdict: Verdict::Failed,
            runtime: req.runtime,
            source: None,
            stopped,
            attempts,
            tokens,
            transcript,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_taken_from_the_python_fence() {
        let reply = "Here:\n```text\nnot this\n```\n```python\nprint('hi')\n```\nand\n```\nprint('other')\n```";
        assert_eq!(extract_code(reply).unwrap(), "print('hi')\n");
        assert_eq!(extract_code("```\nx = 1\n```").unwrap(), "x = 1\n");
        assert_eq!(
            extract_code("```py title=step.py\nx = 2\n```").unwrap(),
            "x = 2\n"
        );
        assert_eq!(extract_code("no code here"), None);
        assert_eq!(extract_code("```python\n\n```"), None);
    }

    #[test]
    fn previews_are_bounded() {
        let long = (0..100)
            .map(|i| format!("row{i},x"))
            .collect::<Vec<_>>()
            .join("\n");
        let p = preview(&InputFile {
            path: "a.csv".into(),
            content: long.into(),
        });
        assert!(
            p.contains("first 20 lines") && p.contains("row19,x") && !p.contains("row20,x"),
            "{p}"
        );
        let p = preview(&InputFile {
            path: "b.xlsx".into(),
            content: vec![0x50, 0x4b, 3, 4, 0, 0].into(),
        });
        assert_eq!(
            p,
            "`b.xlsx` (6 bytes): a ZIP archive (or an .xlsx/.docx file); not shown"
        );
    }
}
