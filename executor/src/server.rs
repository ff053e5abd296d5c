//! The gRPC service (`stepbox.v1.StepExecutor`): a thin door onto [`Executor::run_checked`].
//!
//! Requests are converted to jobs here and errors mapped to gRPC codes in one place
//! ([`status_of`]). Admission is bounded: `concurrency` jobs run at once, `queue` more wait, and
//! anything beyond gets `RESOURCE_EXHAUSTED` at once. A client deadline stops the job and answers
//! `DEADLINE_EXCEEDED`. On shutdown the server stops accepting, lets in-flight jobs finish for a
//! grace period, then cancels them (their job directories are removed as they drop).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Semaphore, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::checks::{Check, CheckKind, CheckResult};
use crate::generate::{
    Attempt, GenerateError, GenerateEvent, GenerateOutcome, GenerateRequest, Generator, TokenUsage,
    Verdict,
};
use crate::limits::{ByteSize, LimitError, LimitKind, LimitOverrides, Limits, Millis};
use crate::metrics::Metrics;
use crate::outcome::{RunResult, Status as RunStatus};
use crate::outputs::OutputKind;
use crate::request::{InputFile, JobError, Layout, RuntimeKind, StepJob};
use crate::runs::RunHistory;
use crate::telemetry::{record_status, rpc_span};
use crate::tenancy::{Tenant, Tenants};
use crate::{Executor, OutputChunk, RunOptions, StreamKind};

/// Generated protobuf and gRPC types for `stepbox.v1`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("stepbox.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("stepbox_descriptor");
}

use pb::step_executor_server::{StepExecutor, StepExecutorServer};

/// How the server admits and bounds work.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Jobs that run at once (default: the number of cores).
    pub concurrency: usize,
    /// Jobs that may wait for a slot; past it, `RESOURCE_EXHAUSTED`.
    pub queue: usize,
    /// Largest request accepted, in bytes (default 64 MiB).
    pub max_message_bytes: usize,
    /// How long in-flight jobs may finish after a shutdown signal before they are cancelled.
    pub grace: Duration,
    /// The model `GenerateStep` asks.
    pub model: crate::generate::ModelConfig,
    /// Who may call (default: anyone, as the tenant `local`).
    pub tenants: Arc<Tenants>,
    /// Where runs are counted.
    pub metrics: Arc<Metrics>,
    /// TLS for the listener.
    pub tls: Option<crate::config::TlsSection>,
    /// Notified to re-read the TLS files (SIGHUP in `stepbox serve`).
    pub reload: Arc<tokio::sync::Notify>,
    /// Finished runs kept per tenant for `GetRun`/`ListRuns` (0: none).
    pub run_history: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ServerOptions {
            concurrency: cores,
            queue: 4 * cores,
            max_message_bytes: 64 << 20,
            grace: Duration::from_secs(10),
            model: crate::generate::ModelConfig::default(),
            tenants: Arc::new(Tenants::default()),
            metrics: Arc::new(Metrics::new()),
            tls: None,
            reload: Arc::new(tokio::sync::Notify::new()),
            run_history: 1000,
        }
    }
}

/// Bounded admission: at most `capacity` jobs admitted (running or waiting), `slots` running.
#[derive(Debug)]
struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    admitted: AtomicUsize,
}

/// Holds one admitted place; dropping it frees the place.
#[derive(Debug)]
struct Ticket(Arc<Admission>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    fn admit(self: &Arc<Self>) -> Result<Ticket, Status> {
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(format!(
                "the server is at capacity ({} jobs running or queued); retry later",
                self.capacity
            )));
        }
        Ok(Ticket(self.clone()))
    }
}

/// The `StepExecutor` implementation.
#[derive(Debug, Clone)]
pub struct StepService {
    metrics: Arc<Metrics>,
    executor: Arc<Executor>,
    generator: Arc<Generator>,
    admission: Arc<Admission>,
    history: Arc<RunHistory>,
    cancel: watch::Receiver<bool>,
}

/// The gRPC name of a limit field.
fn proto_limit_field(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::Memory => "memory_bytes",
        LimitKind::Fuel => "fuel",
        LimitKind::WallTime => "wall_time_ms",
        LimitKind::Stdout => "max_stdout_bytes",
        LimitKind::Stderr => "max_stderr_bytes",
        LimitKind::OutputFiles => "max_output_files",
        LimitKind::OutputBytes => "max_output_bytes",
    }
}

/// Maps a refused job to its gRPC status, naming the request field.
pub fn status_of(e: JobError, runtime: Option<RuntimeKind>) -> Status {
    match e {
        JobError::Invalid { field, reason } => {
            let field = match (field.as_str(), runtime) {
                ("program", Some(RuntimeKind::Python)) => "step.source".to_string(),
                ("program", _) => "step.module".to_string(),
                ("filename", _) => "step.filename".to_string(),
                _ => field,
            };
            Status::invalid_argument(format!("invalid `{field}`: {reason}"))
        }
        JobError::Limit(LimitError::AboveMaximum {
            kind,
            asked,
            max,
            policy,
        }) => Status::invalid_argument(format!(
            "invalid `limits.{}`: {asked} is above policy `{policy}`'s maximum of {max}",
            proto_limit_field(kind)
        )),
        JobError::Limit(LimitError::Zero { kind }) => Status::invalid_argument(format!(
            "invalid `limits.{}`: must be greater than zero",
            proto_limit_field(kind)
        )),
        e @ JobError::RuntimeUnavailable { .. } => Status::unavailable(e.to_string()),
        JobError::Internal(e) => {
            tracing::error!(error = %format!("{e:#}"), "host error");
            Status::internal(format!("the host failed: {e:#}"))
        }
    }
}

fn bad(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid `{field}`: {reason}"))
}

fn limits_from(l: Option<pb::Limits>) -> LimitOverrides {
    let l = l.unwrap_or_default();
    let nz = |v: u64| (v != 0).then_some(v);
    LimitOverrides {
        memory: nz(l.memory_bytes).map(ByteSize),
        fuel: nz(l.fuel),
        wall_time: nz(l.wall_time_ms).map(|ms| Millis(Duration::from_millis(ms))),
        stdout: nz(l.max_stdout_bytes).map(ByteSize),
        stderr: nz(l.max_stderr_bytes).map(ByteSize),
        output_files: (l.max_output_files != 0).then_some(l.max_output_files),
        output_bytes: nz(l.max_output_bytes).map(ByteSize),
    }
}

fn limits_to(l: &Limits) -> pb::Limits {
    pb::Limits {
        memory_bytes: l.memory_bytes,
        fuel: l.fuel.unwrap_or(0),
        wall_time_ms: u64::try_from(l.wall_time.as_millis()).unwrap_or(u64::MAX),
        max_stdout_bytes: l.stdout_bytes,
        max_output_bytes: l.output_bytes,
        max_output_files: l.output_files,
        max_stderr_bytes: l.stderr_bytes,
    }
}

fn layout_from(value: i32, field: &str) -> Result<Layout, Status> {
    match pb::FileLayout::try_from(value) {
        Ok(pb::FileLayout::Unspecified | pb::FileLayout::InputOutput) => Ok(Layout::InputOutput),
        Ok(pb::FileLayout::MntData) => Ok(Layout::MntData),
        Err(_) => Err(bad(
            field,
            format!(
                "unknown layout value {value}: expected FILE_LAYOUT_INPUT_OUTPUT or FILE_LAYOUT_MNT_DATA"
            ),
        )),
    }
}

/// Converts a `Step` (for the job or a verifier) into a job without inputs.
fn job_from_step(step: Option<pb::Step>, field: &str) -> Result<StepJob, Status> {
    let step = step.ok_or_else(|| bad(field, "is required"))?;
    let runtime: RuntimeKind = step
        .runtime
        .parse()
        .map_err(|e| bad(&format!("{field}.runtime"), e))?;
    let program: bytes::Bytes = match runtime {
        RuntimeKind::Python => {
            if !step.module.is_empty() {
                return Err(bad(
                    &format!("{field}.module"),
                    "is for the `wasm` runtime; put Python in `source`",
                ));
            }
            if step.source.is_empty() {
                return Err(bad(&format!("{field}.source"), "the program is empty"));
            }
            step.source.into()
        }
        RuntimeKind::Wasm => match (step.module.is_empty(), step.source.is_empty()) {
            (false, true) => step.module.into(),
            (true, false) => step.source.into(),
            (true, true) => {
                return Err(bad(
                    &format!("{field}.module"),
                    "the program is empty: set `module` (binary) or `source` (WAT)",
                ));
            }
            (false, false) => {
                return Err(bad(
                    &format!("{field}.source"),
                    "set either `module` or `source`, not both",
                ));
            }
        },
    };
    let layout = layout_from(step.layout, &format!("{field}.layout"))?;
    let mut job = StepJob::new(runtime, program);
    job.layout = layout;
    job.filename = (!step.filename.is_empty()).then_some(step.filename);
    Ok(job)
}

fn check_from(i: usize, c: pb::Check) -> Result<Check, Status> {
    use pb::check::Kind;
    let kind = match c
        .kind
        .ok_or_else(|| bad(&format!("checks[{i}].kind"), "is not set"))?
    {
        Kind::ExitCode(code) => CheckKind::ExitCode(code),
        Kind::StdoutEquals(b) => CheckKind::StdoutEquals(b.into()),
        Kind::StdoutMatches(r) => CheckKind::StdoutMatches(r),
        Kind::FileExists(p) => CheckKind::FileExists(p),
        Kind::FileEquals(f) => CheckKind::FileEquals {
            path: f.path,
            content: f.content.into(),
        },
        Kind::FileSha256(f) => CheckKind::FileSha256 {
            path: f.path,
            sha256: f.sha256,
        },
        Kind::FileJsonEquals(f) => CheckKind::FileJsonEquals {
            path: f.path,
            content: f.content.into(),
        },
        Kind::FileCsvEquals(f) => CheckKind::FileCsvEquals {
            path: f.path,
            content: f.content.into(),
            ignore_row_order: f.ignore_row_order,
        },
        Kind::FileMatches(f) => CheckKind::FileMatches {
            path: f.path,
            regex: f.regex,
        },
        Kind::FileJsonSchema(f) => CheckKind::FileJsonSchema {
            path: f.path,
            schema: f.schema_json,
        },
        Kind::Verifier(v) => {
            let mut job = job_from_step(v.step, &format!("checks[{i}].verifier.step"))?;
            job.policy = v.policy;
            job.limits = limits_from(v.limits);
            job.args = v.args;
            CheckKind::Verifier(Box::new(job))
        }
    };
    Ok(Check { name: c.name, kind })
}

/// Converts a check back into its message (verifier steps are not converted).
fn check_to(c: &Check) -> Option<pb::Check> {
    use pb::check::Kind;
    let kind = match &c.kind {
        CheckKind::ExitCode(code) => Kind::ExitCode(*code),
        CheckKind::StdoutEquals(b) => Kind::StdoutEquals(b.to_vec()),
        CheckKind::StdoutMatches(r) => Kind::StdoutMatches(r.clone()),
        CheckKind::FileExists(p) => Kind::FileExists(p.clone()),
        CheckKind::FileEquals { path, content } => Kind::FileEquals(pb::FileContent {
            path: path.clone(),
            content: content.to_vec(),
        }),
        CheckKind::FileSha256 { path, sha256 } => Kind::FileSha256(pb::FileSha256 {
            path: path.clone(),
            sha256: sha256.clone(),
        }),
        CheckKind::FileJsonEquals { path, content } => Kind::FileJsonEquals(pb::FileContent {
            path: path.clone(),
            content: content.to_vec(),
        }),
        CheckKind::FileCsvEquals {
            path,
            content,
            ignore_row_order,
        } => Kind::FileCsvEquals(pb::FileCsvEquals {
            path: path.clone(),
            content: content.to_vec(),
            ignore_row_order: *ignore_row_order,
        }),
        CheckKind::FileMatches { path, regex } => Kind::FileMatches(pb::FileMatches {
            path: path.clone(),
            regex: regex.clone(),
        }),
        CheckKind::FileJsonSchema { path, schema } => Kind::FileJsonSchema(pb::FileJsonSchema {
            path: path.clone(),
            schema_json: schema.clone(),
        }),
        CheckKind::Verifier(_) => return None,
    };
    Some(pb::Check {
        name: c.name.clone(),
        kind: Some(kind),
    })
}

fn inputs_from(files: Vec<pb::File>) -> Vec<InputFile> {
    files
        .into_iter()
        .map(|f| InputFile {
            path: f.path,
            content: f.content.into(),
        })
        .collect()
}

/// Converts a request into a job and its checks.
pub fn job_from_request(req: pb::RunStepRequest) -> Result<(StepJob, Vec<Check>), Status> {
    let mut job = job_from_step(req.step, "step")?;
    job.inputs = inputs_from(req.inputs);
    job.policy = req.policy;
    job.limits = limits_from(req.limits);
    job.stdin = req.stdin.into();
    job.args = req.args;
    job.env = req.env.into_iter().collect();
    let checks = req
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, c)| check_from(i, c))
        .collect::<Result<_, _>>()?;
    Ok((job, checks))
}

fn status_to(s: RunStatus) -> pb::Status {
    match s {
        RunStatus::Succeeded => pb::Status::Succeeded,
        RunStatus::Failed => pb::Status::Failed,
        RunStatus::TimedOut => pb::Status::TimedOut,
        RunStatus::FuelExhausted => pb::Status::FuelExhausted,
        RunStatus::MemoryExceeded => pb::Status::MemoryExceeded,
        RunStatus::OutputExceeded => pb::Status::OutputExceeded,
        RunStatus::Trapped => pb::Status::Trapped,
        RunStatus::ChecksFailed => pb::Status::ChecksFailed,
    }
}

/// Converts a result and its verdicts into the response message.
pub fn response_from(
    r: RunResult,
    verdicts: Vec<CheckResult>,
    queue_wait: Duration,
) -> pb::RunStepResponse {
    let m = &r.manifest;
    let digests = |d: &[crate::manifest::FileDigest]| {
        d.iter()
            .map(|f| pb::FileDigest {
                path: f.path.clone(),
                sha256: f.sha256.clone(),
            })
            .collect()
    };
    let manifest = pb::Manifest {
        version: m.version,
        program_sha256: m.program_sha256.clone(),
        runtime: m.runtime.clone(),
        runtime_sha256: m.runtime_sha256.clone(),
        engine: m.engine.clone(),
        policy: m.policy.clone(),
        policy_sha256: m.policy_sha256.clone(),
        deterministic: m.deterministic,
        limits: Some(limits_to(&m.limits)),
        layout: m.layout.clone(),
        inputs: digests(&m.inputs),
        stdin_sha256: m.stdin_sha256.clone(),
        args: m.args.clone(),
        env: m.env.clone().into_iter().collect(),
        status: status_to(m.status) as i32,
        exit_code: m.exit_code.unwrap_or(-1),
        stdout_sha256: m.stdout_sha256.clone(),
        stderr_sha256: m.stderr_sha256.clone(),
        outputs: digests(&m.outputs),
        digest: m.digest.clone(),
    };
    let u = &r.usage;
    pb::RunStepResponse {
        run_id: r.run_id,
        status: status_to(r.status) as i32,
        exit_code: r.exit_code.unwrap_or(-1),
        stdout: r.stdout.to_vec(),
        stderr: r.stderr.to_vec(),
        outputs: r
            .outputs
            .into_iter()
            .map(|o| pb::File {
                path: o.path,
                content: o.content.to_vec(),
                sha256: o.sha256,
                symlink_target: match o.kind {
                    OutputKind::Symlink { target } => target,
                    OutputKind::File => String::new(),
                },
            })
            .collect(),
        check_results: verdicts
            .into_iter()
            .map(|v| pb::CheckResult {
                name: v.name,
                passed: v.passed,
                detail: v.detail,
            })
            .collect(),
        usage: Some(pb::Usage {
            wall_time_us: u.wall_time_us,
            fuel_consumed: u.fuel_consumed.unwrap_or(0),
            fuel_metered: u.fuel_consumed.is_some(),
            peak_memory_bytes: u.peak_memory_bytes,
            compile_us: u.compile_us,
            compile_cache: u
                .compile_cache
                .map(|c| {
                    serde_json::to_value(c)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                })
                .unwrap_or_default(),
            instantiate_us: u.instantiate_us,
            output_files: u.output_files,
            output_bytes: u.output_bytes,
            queue_wait_us: u64::try_from(queue_wait.as_micros()).unwrap_or(u64::MAX),
        }),
        message: r.message,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        manifest: Some(manifest),
    }
}

/// What the run history keeps of a response (no stdout, stderr or files).
fn record_from(r: &pb::RunStepResponse, tenant: &str, submitted_at: SystemTime) -> pb::RunRecord {
    pb::RunRecord {
        run_id: r.run_id.clone(),
        tenant: tenant.to_string(),
        submitted_at: Some(submitted_at.into()),
        finished_at: Some(SystemTime::now().into()),
        status: r.status,
        exit_code: r.exit_code,
        message: r.message.clone(),
        check_results: r.check_results.clone(),
        usage: r.usage.clone(),
        manifest: r.manifest.clone(),
        stdout_bytes: r.stdout.len() as u64,
        stderr_bytes: r.stderr.len() as u64,
    }
}

/// Runs `call` inside `span` and records its gRPC status there.
async fn traced<T>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let result = call.instrument(span.clone()).await;
    record_status(&span, &result);
    result
}

/// The tenant the auth interceptor attached (anonymous when the service runs without one).
fn tenant_of<T>(req: &Request<T>) -> Arc<Tenant> {
    req.extensions()
        .get::<Arc<Tenant>>()
        .cloned()
        .unwrap_or_else(|| {
            Tenants::default()
                .authenticate(req.metadata())
                .expect("the anonymous tenant always authenticates")
        })
}

/// Resolves once the shutdown grace period is over (the watch turns true); never if the sender is
/// gone without having cancelled.
async fn cancelled(mut cancel: watch::Receiver<bool>) {
    while !*cancel.borrow_and_update() {
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Parses the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Our deadline fires a little before tonic's own timeout layer would (which answers CANCELLED),
/// so the client hears DEADLINE_EXCEEDED from us. The margin covers the epoch tick (a running
/// guest yields to the timer once per tick) with room to spare.
fn our_deadline(d: Duration) -> Duration {
    d.saturating_sub((d / 5).min(crate::engine::EPOCH_TICK * 5))
}

impl StepService {
    /// A service running jobs on `executor`; `cancel` turning true cancels in-flight jobs.
    pub fn new(
        executor: Arc<Executor>,
        options: &ServerOptions,
        cancel: watch::Receiver<bool>,
    ) -> Result<StepService, GenerateError> {
        let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
        Ok(StepService {
            metrics: options.metrics.clone(),
            generator: Arc::new(
                Generator::new(executor.clone(), options.model.clone())?.with_slots(slots.clone()),
            ),
            executor,
            admission: Arc::new(Admission {
                slots,
                capacity: options.concurrency.max(1) + options.queue,
                admitted: AtomicUsize::new(0),
            }),
            history: Arc::new(RunHistory::new(options.run_history)),
            cancel,
        })
    }

    /// The tenant's policy check, rate limit and quota, then the server's admission.
    fn admit(
        &self,
        tenant: &Tenant,
        policy: &str,
    ) -> Result<(crate::tenancy::TenantTicket, Ticket), Status> {
        tenant
            .check_policy(policy)
            .inspect_err(|_| self.metrics.reject("policy_denied"))?;
        let t = tenant
            .admit()
            .inspect_err(|_| self.metrics.reject("tenant_limit"))?;
        let a = self
            .admission
            .admit()
            .inspect_err(|_| self.metrics.reject("queue_full"))?;
        Ok((t, a))
    }

    /// Admits, waits for a slot, runs, with deadline and shutdown cancellation.
    async fn execute(
        &self,
        tenant: Arc<Tenant>,
        job: StepJob,
        checks: Vec<Check>,
        deadline: Option<Duration>,
        listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<pb::RunStepResponse, Status> {
        let runtime = job.runtime;
        let submitted_at = SystemTime::now();
        let (_tenant_ticket, ticket) = self.admit(&tenant, &job.policy)?;
        let _in_flight = self.metrics.in_flight();
        let started = Instant::now();
        let work = async {
            let _slot = self
                .admission
                .slots
                .acquire()
                .await
                .map_err(|_| Status::unavailable("the server is shutting down"))?;
            let queue_wait = started.elapsed();
            let (result, verdicts) = self
                .executor
                .run_checked(job, &checks, RunOptions { listener })
                .await
                .map_err(|e| status_of(e, Some(runtime)))?;
            self.metrics.record_run(&tenant.name, &result, queue_wait);
            let response = response_from(result, verdicts, queue_wait);
            self.history.record(
                &tenant.name,
                record_from(&response, &tenant.name, submitted_at),
            );
            Ok(response)
        };
        let cancelled = cancelled(self.cancel.clone());
        let deadline = deadline.map(our_deadline);
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let out = tokio::select! {
            r = work => r,
            () = timer => Err(Status::deadline_exceeded("the client's deadline passed; the job was stopped")),
            () = cancelled => Err(Status::unavailable("the server is shutting down; the job was cancelled")),
        };
        drop(ticket);
        out
    }

    /// `ImportConversation` after authentication.
    async fn import(
        &self,
        tenant: Arc<Tenant>,
        req: pb::ImportConversationRequest,
    ) -> Result<pb::ImportConversationResponse, Status> {
        let (_tenant_ticket, _ticket) = self.admit(&tenant, "")?;
        let select = (!req.select.is_empty()).then_some(req.select.as_str());
        let imported = crate::conversation::import(&self.executor, &req.conversation, select)
            .await
            .map_err(|e| match e {
                crate::conversation::ImportError::Malformed(msg) => bad("conversation", msg),
                crate::conversation::ImportError::Job(e) => status_of(e, Some(RuntimeKind::Python)),
            })?;
        let ex = &imported.extracted;
        let summary = pb::ConversationSummary {
            title: ex.title.clone(),
            conversation_id: ex.conversation_id.clone(),
            cells: u32::try_from(ex.cells.len()).unwrap_or(u32::MAX),
            inputs: ex
                .inputs
                .iter()
                .map(|i| pb::ExpectedInput {
                    name: i.name.clone(),
                    size: i.size.unwrap_or(0),
                    mime_type: i.mime_type.clone().unwrap_or_default(),
                })
                .collect(),
            outputs: ex.outputs.clone(),
            unsupported_imports: imported
                .unsupported_imports
                .iter()
                .map(|u| pb::UnsupportedImport {
                    module: u.module.clone(),
                    cell: u32::try_from(u.cell).unwrap_or(u32::MAX),
                })
                .collect(),
            notes: imported.notes.clone(),
            has_expected_stdout: imported.expected_stdout.is_some(),
            expected_stdout: imported
                .expected_stdout
                .clone()
                .unwrap_or_default()
                .into_bytes(),
        };
        let step = pb::Step {
            runtime: "python".into(),
            source: imported.source.clone(),
            module: Vec::new(),
            layout: pb::FileLayout::MntData as i32,
            filename: imported.filename.clone(),
        };
        let recorded_checks = imported
            .recorded_checks()
            .iter()
            .filter_map(check_to)
            .collect();
        Ok(pb::ImportConversationResponse {
            step: Some(step),
            summary: Some(summary),
            recorded_checks,
        })
    }
}

fn tokens_to(t: TokenUsage) -> pb::TokenUsage {
    pb::TokenUsage {
        prompt: t.prompt,
        completion: t.completion,
        total: t.total,
    }
}

fn attempt_to(a: &Attempt) -> pb::GenerationAttempt {
    pb::GenerationAttempt {
        number: a.number,
        reply: a.reply.clone(),
        code: a.code.clone().unwrap_or_default(),
        status: a.status.map_or(pb::Status::Unspecified, status_to) as i32,
        message: a.message.clone(),
        stderr_tail: a.stderr_tail.clone(),
        check_results: a
            .check_results
            .iter()
            .map(|v| pb::CheckResult {
                name: v.name.clone(),
                passed: v.passed,
                detail: v.detail.clone(),
            })
            .collect(),
        tokens: Some(tokens_to(a.tokens)),
        model_ms: a.model_ms,
    }
}

fn outcome_to(o: &GenerateOutcome) -> pb::GenerateOutcome {
    pb::GenerateOutcome {
        verdict: match o.verdict {
            Verdict::Verified => pb::Verdict::Verified,
            Verdict::Unverified => pb::Verdict::Unverified,
            Verdict::Failed => pb::Verdict::Failed,
        } as i32,
        runtime: o.runtime.name().to_string(),
        source: o.source.clone().unwrap_or_default(),
        stopped: o.stopped.clone(),
        attempts: o.attempts.iter().map(attempt_to).collect(),
        tokens: Some(tokens_to(o.tokens)),
        transcript_json: serde_json::to_string(&o.transcript).unwrap_or_default(),
    }
}

fn generate_status(e: GenerateError) -> Status {
    match e {
        GenerateError::Invalid { field, reason } => bad(&field, reason),
        GenerateError::Model(msg) => Status::unavailable(msg),
        GenerateError::Job(e) => status_of(e, Some(RuntimeKind::Python)),
    }
}

/// Converts a generation request.
pub fn generate_request_from(req: pb::GenerateStepRequest) -> Result<GenerateRequest, Status> {
    let mut g = GenerateRequest::new(req.requirements);
    if !req.runtime.is_empty() {
        g.runtime = req.runtime.parse().map_err(|e| bad("runtime", e))?;
    }
    g.layout = layout_from(req.layout, "layout")?;
    g.inputs = inputs_from(req.inputs);
    g.checks = req
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, c)| check_from(i, c))
        .collect::<Result<_, _>>()?;
    g.policy = req.policy;
    g.limits = limits_from(req.limits);
    g.args = req.args;
    if req.max_attempts != 0 {
        g.max_attempts = req.max_attempts;
    }
    if req.deadline_ms != 0 {
        g.deadline = Duration::from_millis(req.deadline_ms);
    }
    Ok(g)
}

type GenerateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateStepEvent, Status>> + Send>>;

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RunStepEvent, Status>> + Send>>;

#[tonic::async_trait]
impl StepExecutor for StepService {
    async fn run_step(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<pb::RunStepResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("RunStep", request.metadata(), &tenant.name);
        traced(span, async {
            let (job, checks) = job_from_request(request.into_inner())?;
            self.execute(tenant, job, checks, deadline, None).await
        })
        .await
        .map(Response::new)
    }

    type RunStepStreamStream = EventStream;

    async fn run_step_stream(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("RunStepStream", request.metadata(), &tenant.name);
        let (job, checks) = traced(span.clone(), async {
            let (job, checks) = job_from_request(request.into_inner())?;
            // Refuse at once when not allowed or full, rather than after opening the stream.
            tenant.check_policy(&job.policy)?;
            drop(self.admission.admit()?);
            Ok((job, checks))
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RunStepEvent, Status>>(64);
        let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::unbounded_channel::<OutputChunk>();
        let service = self.clone();
        tokio::spawn(async move {
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(chunk) = chunk_rx.recv().await {
                        let event = match chunk.stream {
                            StreamKind::Stdout => {
                                pb::run_step_event::Event::Stdout(chunk.data.to_vec())
                            }
                            StreamKind::Stderr => {
                                pb::run_step_event::Event::Stderr(chunk.data.to_vec())
                            }
                        };
                        if tx
                            .send(Ok(pb::RunStepEvent { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            let run = service
                .execute(tenant, job, checks, deadline, Some(chunk_tx))
                .instrument(span.clone());
            let closed = tx.closed();
            // A client that goes away cancels the job: dropping `run` stops the guest.
            let result = tokio::select! {
                (r, ()) = async { tokio::join!(run, forward) } => r,
                () = closed => {
                    record_status::<()>(&span, &Err(Status::cancelled("the client went away")));
                    return;
                }
            };
            record_status(&span, &result);
            let last = result.map(|r| pb::RunStepEvent {
                event: Some(pb::run_step_event::Event::Response(r)),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GenerateStepStream = GenerateStream;

    async fn generate_step(
        &self,
        request: Request<pb::GenerateStepRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("GenerateStep", request.metadata(), &tenant.name);
        let (req, (tenant_ticket, ticket)) = traced(span.clone(), async {
            let mut req = generate_request_from(request.into_inner())?;
            if let Some(d) = deadline {
                req.deadline = req.deadline.min(our_deadline(d));
            }
            let tickets = self.admit(&tenant, &req.policy)?;
            Ok((req, tickets))
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::GenerateStepEvent, Status>>(64);
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<GenerateEvent>();
        let generator = self.generator.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _tickets = (tenant_ticket, ticket);
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(ev) = ev_rx.recv().await {
                        use pb::generate_step_event::Event;
                        let event = match ev {
                            GenerateEvent::AttemptStarted { number } => {
                                Event::AttemptStarted(number)
                            }
                            GenerateEvent::ModelReply {
                                number,
                                reply,
                                code,
                                tokens,
                            } => Event::ModelReply(pb::GenerationAttempt {
                                number,
                                reply,
                                code: code.unwrap_or_default(),
                                tokens: Some(tokens_to(tokens)),
                                ..Default::default()
                            }),
                            GenerateEvent::AttemptResult(a) => Event::AttemptResult(attempt_to(&a)),
                        };
                        if tx
                            .send(Ok(pb::GenerateStepEvent { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            let work = async { tokio::join!(generator.generate(req, Some(ev_tx)), forward).0 }
                .instrument(span.clone());
            let cancelled = cancelled(cancel);
            let closed = tx.closed();
            let last = tokio::select! {
                r = work => r
                    .map(|o| pb::GenerateStepEvent { event: Some(pb::generate_step_event::Event::Outcome(outcome_to(&o))) })
                    .map_err(generate_status),
                () = cancelled => Err(Status::unavailable("the server is shutting down; generation was cancelled")),
                () = closed => {
                    record_status::<()>(&span, &Err(Status::cancelled("the client went away")));
                    return;
                }
            };
            record_status(&span, &last);
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import_conversation(
        &self,
        request: Request<pb::ImportConversationRequest>,
    ) -> Result<Response<pb::ImportConversationResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("ImportConversation", request.metadata(), &tenant.name);
        traced(span, self.import(tenant, request.into_inner()))
            .await
            .map(Response::new)
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunRecord>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("GetRun", request.metadata(), &tenant.name);
        let run_id = request.into_inner().run_id;
        traced(span, async {
            if run_id.is_empty() {
                return Err(bad(
                    "run_id",
                    "is empty; pass the run_id of a RunStepResponse",
                ));
            }
            let record = self.history.get(&tenant.name, &run_id).ok_or_else(|| {
                Status::not_found(format!(
                    "run_id: no run {run_id:?} among this tenant's recent runs on this server"
                ))
            })?;
            Ok(Response::new(pb::RunRecord::clone(&record)))
        })
        .await
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("ListRuns", request.metadata(), &tenant.name);
        let req = request.into_inner();
        traced(span, async {
            let status = match pb::Status::try_from(req.status) {
                Ok(pb::Status::Unspecified) => None,
                Ok(s) => Some(s),
                Err(_) => {
                    return Err(bad(
                        "status",
                        format!(
                            "{} is not a Status; pass STATUS_UNSPECIFIED (0) for all runs or one of STATUS_SUCCEEDED (1) to STATUS_CHECKS_FAILED (8)",
                            req.status
                        ),
                    ));
                }
            };
            let page = self
                .history
                .list(&tenant.name, req.page_size, &req.page_token, status)?;
            Ok(Response::new(pb::ListRunsResponse {
                runs: page.runs.iter().map(|r| pb::RunRecord::clone(r)).collect(),
                next_page_token: page.next_page_token,
            }))
        })
        .await
    }

    async fn list_runtimes(
        &self,
        _request: Request<pb::ListRuntimesRequest>,
    ) -> Result<Response<pb::ListRuntimesResponse>, Status> {
        let runtimes = RuntimeKind::ALL
            .into_iter()
            .map(|r| {
                let available = self.executor.runtimes().availability(r);
                pb::Runtime {
                    name: r.name().to_string(),
                    description: match r {
                        RuntimeKind::Python => "CPython 3.14 (componentize-py, WASI 0.2) with the standard library".into(),
                        RuntimeKind::Wasm => "A WASI preview-1 command module, preview-2 command component, or WAT text".into(),
                    },
                    available: available.is_ok(),
                    unavailable_reason: available.err().unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListRuntimesResponse { runtimes }))
    }

    async fn list_policies(
        &self,
        _request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let policies = self
            .executor
            .policies()
            .iter()
            .map(|p| pb::Policy {
                name: p.name.clone(),
                description: p.file.description.clone(),
                deterministic: p.file.deterministic,
                default_limits: Some(limits_to(&p.file.limits.default.to_limits())),
                max_limits: Some(limits_to(&p.file.limits.max.to_limits())),
            })
            .collect();
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }
}

/// Serves `executor` on `listener` until `shutdown` resolves; then stops accepting, waits up to
/// the grace period for in-flight jobs, and cancels the rest.
pub async fn serve(
    executor: Arc<Executor>,
    listener: tokio::net::TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let service = StepService::new(executor, &options, cancel_rx)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<StepExecutorServer<StepService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let grace = options.grace;
    let tenants = options.tenants.clone();
    let auth_metrics = options.metrics.clone();
    let authenticate = move |mut req: Request<()>| -> Result<Request<()>, Status> {
        let tenant = tenants
            .authenticate(req.metadata())
            .inspect_err(|_| auth_metrics.reject("unauthenticated"))?;
        req.extensions_mut().insert(tenant);
        Ok(req)
    };
    let tls = match &options.tls {
        Some(section) => {
            let tls = crate::tls::ReloadableTls::load(section)?;
            let (reloader, reload) = (tls.clone(), options.reload.clone());
            tokio::spawn(async move {
                loop {
                    reload.notified().await;
                    match reloader.reload() {
                        Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the previous certificate")
                        }
                    }
                }
            });
            Some(tls)
        }
        None => None,
    };
    let mut builder = tonic::transport::Server::builder();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!(grace = ?grace, "shutting down: no new connections; in-flight jobs may finish");
        health
            .set_not_serving::<StepExecutorServer<StepService>>()
            .await;
        let _ = stopping_tx.send(());
    };
    tokio::spawn(async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
            let _ = cancel_tx.send(true);
        }
    });
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StepExecutorServer::new(service)
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(usize::MAX),
            authenticate,
        ));
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), signal)
                .await?
        }
        None => {
            // Small requests and responses: without TCP_NODELAY, Nagle's algorithm and delayed
            // ACKs add ~40 ms to every call on loopback.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                if let Ok(stream) = &conn {
                    let _ = stream.set_nodelay(true);
                }
                conn
            });
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut r = Request::new(());
        assert_eq!(grpc_timeout(&r), None);
        r.metadata_mut()
            .insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_millis(250)));
        r.metadata_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_secs(2)));
        r.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&r), None);
    }

    #[test]
    fn requests_are_checked_naming_fields() {
        let e = job_from_request(pb::RunStepRequest::default()).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "invalid `step`: is required")
        );
        let step = |runtime: &str, source: &str| pb::RunStepRequest {
            step: Some(pb::Step {
                runtime: runtime.into(),
                source: source.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = job_from_request(step("ruby", "x")).unwrap_err();
        assert!(
            e.message()
                .starts_with("invalid `step.runtime`: unknown runtime `ruby`"),
            "{}",
            e.message()
        );
        let e = job_from_request(step("python", "")).unwrap_err();
        assert_eq!(e.message(), "invalid `step.source`: the program is empty");
        let mut r = step("python", "print(1)");
        r.checks.push(pb::Check::default());
        assert_eq!(
            job_from_request(r).unwrap_err().message(),
            "invalid `checks[0].kind`: is not set"
        );
        let mut r = step("python", "print(1)");
        r.step.as_mut().unwrap().layout = 9;
        assert!(
            job_from_request(r)
                .unwrap_err()
                .message()
                .contains("step.layout")
        );
    }

    #[test]
    fn limit_errors_name_the_proto_field() {
        let s = status_of(
            JobError::Limit(LimitError::AboveMaximum {
                kind: LimitKind::Memory,
                asked: "4GiB".into(),
                max: "2GiB".into(),
                policy: "default".into(),
            }),
            None,
        );
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "invalid `limits.memory_bytes`: 4GiB is above policy `default`'s maximum of 2GiB"
        );
    }

    #[tokio::test]
    async fn admission_is_bounded() {
        let a = Arc::new(Admission {
            slots: Arc::new(Semaphore::new(1)),
            capacity: 2,
            admitted: AtomicUsize::new(0),
        });
        let (t1, t2) = (a.admit().unwrap(), a.admit().unwrap());
        assert_eq!(
            a.admit().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(t1);
        let _t3 = a.admit().unwrap();
        drop(t2);
    }
}
