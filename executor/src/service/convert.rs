//! Proto <-> core conversions, in one place: requests become jobs and checks, results become
//! responses and run records, and a refused job becomes its gRPC status naming the field
//! ([`status_of`]).

use std::time::{Duration, SystemTime};

use tonic::Status;

use crate::authoring::generate::{
    Attempt, GenerateError, GenerateOutcome, GenerateRequest, TokenUsage, Verdict,
};
use crate::job::checks::{Check, CheckKind, CheckResult};
use crate::job::limits::{ByteSize, LimitError, LimitKind, LimitOverrides, Limits, Millis};
use crate::job::outcome::{OutputKind, RunResult, Status as RunStatus};
use crate::job::request::{InputFile, JobError, Layout, RuntimeKind, StepJob};
use crate::pb;

/// The gRPC name of a limit field.
pub(crate) fn proto_limit_field(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::Memory => "memory_bytes",
        LimitKind::Fuel => "fuel",
        LimitKind::WallTime => "wall_time_ms",
        LimitKind::Stdout => "max_stdout_bytes",
        LimitKind::Stderr => "max_stderr_bytes",
        LimitKind::OutputFiles => "max_output_files",
        LimitKind::OutputBytes => "max_output_bytes",
        LimitKind::ScratchFiles => "max_scratch_files",
        LimitKind::ScratchBytes => "max_scratch_bytes",
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

pub(crate) fn bad(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid `{field}`: {reason}"))
}

pub(crate) fn limits_from(l: Option<pb::Limits>) -> LimitOverrides {
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
        scratch_files: (l.max_scratch_files != 0).then_some(l.max_scratch_files),
        scratch_bytes: nz(l.max_scratch_bytes).map(ByteSize),
    }
}

pub(crate) fn limits_to(l: &Limits) -> pb::Limits {
    pb::Limits {
        memory_bytes: l.memory_bytes,
        fuel: l.fuel.unwrap_or(0),
        wall_time_ms: u64::try_from(l.wall_time.as_millis()).unwrap_or(u64::MAX),
        max_stdout_bytes: l.stdout_bytes,
        max_output_bytes: l.output_bytes,
        max_output_files: l.output_files,
        max_stderr_bytes: l.stderr_bytes,
        max_scratch_files: l.scratch_files,
        max_scratch_bytes: l.scratch_bytes,
    }
}

pub(crate) fn layout_from(value: i32, field: &str) -> Result<Layout, Status> {
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
pub(crate) fn job_from_step(step: Option<pb::Step>, field: &str) -> Result<StepJob, Status> {
    let step = step.ok_or_else(|| bad(field, "is required"))?;
    let runtime: RuntimeKind = step
        .runtime
        .parse()
        .map_err(|e| bad(&format!("{field}.runtime"), e))?;
    let program: bytes::Bytes = match runtime {
        RuntimeKind::Python | RuntimeKind::PythonData => {
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

pub(crate) fn check_from(i: usize, c: pb::Check) -> Result<Check, Status> {
    check_at(&format!("checks[{i}]"), c)
}

/// Converts a check; `field` names it in errors (`checks[2]`, `step.cases[0].checks[1]`).
pub(crate) fn check_at(field: &str, c: pb::Check) -> Result<Check, Status> {
    use pb::check::Kind;
    let kind = match c
        .kind
        .ok_or_else(|| bad(&format!("{field}.kind"), "is not set"))?
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
            let mut job = job_from_step(v.step, &format!("{field}.verifier.step"))?;
            job.policy = v.policy;
            job.limits = limits_from(v.limits);
            job.args = v.args;
            CheckKind::Verifier(Box::new(job))
        }
    };
    Ok(Check { name: c.name, kind })
}

/// The limits message of a job's overrides (0: not overridden), the inverse of [`limits_from`].
pub(crate) fn overrides_to(l: &LimitOverrides) -> pb::Limits {
    pb::Limits {
        memory_bytes: l.memory.map_or(0, |b| b.0),
        fuel: l.fuel.unwrap_or(0),
        wall_time_ms: l
            .wall_time
            .map_or(0, |m| u64::try_from(m.0.as_millis()).unwrap_or(u64::MAX)),
        max_stdout_bytes: l.stdout.map_or(0, |b| b.0),
        max_output_bytes: l.output_bytes.map_or(0, |b| b.0),
        max_output_files: l.output_files.unwrap_or(0),
        max_stderr_bytes: l.stderr.map_or(0, |b| b.0),
        max_scratch_files: l.scratch_files.unwrap_or(0),
        max_scratch_bytes: l.scratch_bytes.map_or(0, |b| b.0),
    }
}

/// The `Step` message of a job's program: Python and WAT as `source`, wasm binaries as `module`.
pub(crate) fn step_to(job: &StepJob) -> pb::Step {
    let binary = job.runtime == RuntimeKind::Wasm && job.program.starts_with(b"\0asm");
    let (source, module) = if binary {
        (String::new(), job.program.to_vec())
    } else {
        (
            String::from_utf8_lossy(&job.program).into_owned(),
            Vec::new(),
        )
    };
    pb::Step {
        runtime: job.runtime.name().to_string(),
        source,
        module,
        layout: match job.layout {
            Layout::InputOutput => pb::FileLayout::InputOutput,
            Layout::MntData => pb::FileLayout::MntData,
        } as i32,
        filename: job.filename.clone().unwrap_or_default(),
    }
}

/// Converts a check back into its message (every kind, verifier steps included).
pub(crate) fn check_to(c: &Check) -> pb::Check {
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
        CheckKind::Verifier(job) => Kind::Verifier(pb::VerifierStep {
            step: Some(step_to(job)),
            policy: job.policy.clone(),
            limits: Some(overrides_to(&job.limits)),
            args: job.args.clone(),
        }),
    };
    pb::Check {
        name: c.name.clone(),
        kind: Some(kind),
    }
}

pub(crate) fn inputs_from(files: Vec<pb::File>) -> Vec<InputFile> {
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
    if req.step.is_none() {
        return Err(bad(
            "step",
            "is required: set `step` (a program) or `step_ref` (a published step)",
        ));
    }
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

pub(crate) fn status_to(s: RunStatus) -> pb::Status {
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
    let digests = |d: &[crate::job::manifest::FileDigest]| {
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
        step_name: m.step.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        step_version: m.step.as_ref().map_or(0, |s| s.version),
        step_digest: m
            .step
            .as_ref()
            .map(|s| s.digest.clone())
            .unwrap_or_default(),
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
            scratch_files: u.scratch_files,
            scratch_bytes: u.scratch_bytes,
            queue_wait_us: u64::try_from(queue_wait.as_micros()).unwrap_or(u64::MAX),
        }),
        message: r.message,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        manifest: Some(manifest),
    }
}

/// What the run history keeps of a response (no stdout, stderr or files).
pub(crate) fn record_from(
    r: &pb::RunStepResponse,
    tenant: &str,
    submitted_at: SystemTime,
) -> pb::RunRecord {
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

pub(crate) fn tokens_to(t: TokenUsage) -> pb::TokenUsage {
    pb::TokenUsage {
        prompt: t.prompt,
        completion: t.completion,
        total: t.total,
    }
}

pub(crate) fn attempt_to(a: &Attempt) -> pb::GenerationAttempt {
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

pub(crate) fn outcome_to(o: &GenerateOutcome) -> pb::GenerateOutcome {
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

pub(crate) fn generate_status(e: GenerateError) -> Status {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_naming_fields() {
        let e = job_from_request(pb::RunStepRequest::default()).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::InvalidArgument,
                "invalid `step`: is required: set `step` (a program) or `step_ref` (a published step)"
            )
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
}
