//! The executor: one job's straight path through the core. A [`StepJob`] is validated against its
//! [`Policy`] (`job`), gets a job directory, a cached compiled runtime and a fresh Store
//! (`sandbox`), ends with one [`Status`], has its outputs collected without following symlinks,
//! is judged by its checks and sealed in a manifest (`job`). The CLI and the gRPC service are thin
//! doors onto [`Executor::run_checked`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::job::limits::Limits;
use crate::job::outcome::{RunResult, Status, Usage};
use crate::job::policy::{self, PolicySet};
use crate::job::request::{self, InputFile, JobError, RuntimeKind, StepJob};
use crate::sandbox::pipe::OutputChunk;

use crate::job::checks::{Check, CheckResult};
use crate::job::digest::sha256_hex;
pub use crate::job::manifest::StepVersionRef;
use crate::job::manifest::{FileDigest, Manifest};
use crate::job::outcome::{OutputFile, OutputKind};
use crate::sandbox::engine::{self, Engines};
use crate::sandbox::jobdir::JobDir;
use crate::sandbox::run::{Run, RunParts, disk_watch, with_backstop};
use crate::sandbox::runtime::{PythonCall, Runtimes};
use crate::sandbox::worker::{WorkerConfig, WorkerJob, WorkerOptions, WorkerPool};

/// Where guests run.
#[derive(Clone, Debug, Default)]
pub enum Isolation {
    /// In this process, stopped at their wall time by epoch checks compiled into the guest.
    #[default]
    InProcess,
    /// Runs without fuel go to worker processes compiled without those checks (about a fifth
    /// faster on Python code) and are stopped by killing the worker
    /// ([`crate::sandbox::worker`]); runs with fuel, and `python-data` runs, stay in this process.
    Workers(WorkerOptions),
}

/// Where one run goes: a worker, or this process with its runtime prepared.
enum Place<'a> {
    Worker(&'a WorkerPool),
    Here(crate::sandbox::runtime::PreparedEntry),
}

/// How to build an [`Executor`].
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Parent of every job directory.
    pub work_root: PathBuf,
    /// Where compiled runtime components are cached across processes (`None`: memory only).
    pub cache_dir: Option<PathBuf>,
    /// The policies jobs may name.
    pub policies: PolicySet,
    /// The Python runtime component; `None` searches the usual places
    /// ([`runtime::python_component_candidates`]).
    pub python_component: Option<PathBuf>,
    /// Where guests run.
    pub isolation: Isolation,
}

/// The default work root: `stepbox-work` under the system temp directory.
pub fn default_work_root() -> PathBuf {
    std::env::temp_dir().join("stepbox-work")
}

/// The default artifact cache: `$XDG_CACHE_HOME/stepbox`, `~/.cache/stepbox`, or under the temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("stepbox");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".cache/stepbox");
    }
    std::env::temp_dir().join("stepbox-cache")
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            work_root: default_work_root(),
            cache_dir: Some(default_cache_dir()),
            policies: PolicySet::embedded(),
            python_component: None,
            isolation: Isolation::InProcess,
        }
    }
}

/// Per-run options that are not part of the job itself.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Receives stdout/stderr chunks as the step writes them.
    pub listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    /// The catalog version this job is, recorded in its manifest.
    pub step_version: Option<StepVersionRef>,
}

/// Runs step jobs. Cheap to share behind an `Arc`; every run gets its own Store and job directory.
#[derive(Debug)]
pub struct Executor {
    engines: Arc<Engines>,
    runtimes: Runtimes,
    policies: PolicySet,
    work_root: PathBuf,
    workers: Option<WorkerPool>,
}

impl Executor {
    /// Builds the engines, the epoch ticker and the runtimes. Nothing is compiled yet.
    pub fn new(config: ExecutorConfig) -> anyhow::Result<Executor> {
        let engines = Arc::new(Engines::new(config.cache_dir)?);
        let runtimes = Runtimes::new(engines.clone(), config.python_component)?;
        let workers = match config.isolation {
            Isolation::InProcess => None,
            Isolation::Workers(options) => Some(WorkerPool::new(
                options,
                WorkerConfig {
                    work_root: Some(config.work_root.clone()),
                    cache_dir: engines.cache_dir().map(PathBuf::from),
                    python_component: runtimes.python_component().map(PathBuf::from),
                    python_data_dir: runtimes.python_data_dir().map(|d| d.root().to_path_buf()),
                },
            )),
        };
        Ok(Executor {
            engines,
            runtimes,
            policies: config.policies,
            work_root: config.work_root,
            workers,
        })
    }

    /// The policies jobs may name.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The runtimes.
    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    /// Compiles or loads the Python runtime now rather than on the first job (with workers:
    /// starts one worker, which loads it).
    pub async fn warm_up(&self) -> Result<(), JobError> {
        match &self.workers {
            Some(pool) => {
                self.runtimes
                    .availability(RuntimeKind::Python)
                    .map_err(|reason| JobError::RuntimeUnavailable {
                        runtime: RuntimeKind::Python,
                        reason,
                    })?;
                pool.prewarm().await.map_err(JobError::Internal)
            }
            None => self.runtimes.python(false).await.map(|_| ()),
        }
    }

    /// The worker processes, when guests run in them.
    pub fn workers(&self) -> Option<&WorkerPool> {
        self.workers.as_ref()
    }

    /// Runs one job with default options.
    pub async fn run(&self, job: StepJob) -> Result<RunResult, JobError> {
        self.run_with(job, RunOptions::default()).await
    }

    /// Runs one job. `Err` means the job was refused or the host failed; a step that runs and
    /// fails is an `Ok` result with its status.
    pub async fn run_with(&self, job: StepJob, options: RunOptions) -> Result<RunResult, JobError> {
        let run_id = uuid::Uuid::new_v4().to_string();
        let span = tracing::info_span!(
            "run",
            run_id = %run_id,
            runtime = %job.runtime,
            policy = %if job.policy.is_empty() { policy::DEFAULT_POLICY } else { &job.policy },
            status = tracing::field::Empty,
            wall_us = tracing::field::Empty,
        );
        async move {
            let result = self.run_inner(run_id, job, options).await;
            match &result {
                Ok(r) => {
                    tracing::Span::current().record("status", r.status.name());
                    tracing::Span::current().record("wall_us", r.usage.wall_time_us);
                    tracing::info!(status = r.status.name(), "run finished");
                }
                Err(e) => tracing::info!(error = %e, "run refused"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn run_inner(
        &self,
        run_id: String,
        job: StepJob,
        options: RunOptions,
    ) -> Result<RunResult, JobError> {
        let job = job.validate(&self.policies)?;
        let limits = job.limits.clone();
        let fuel = limits.fuel.is_some();
        // Fuel is counted in the guest: metered runs stay in-process, with epochs.
        let in_worker = !fuel;
        let place = match (self.workers.as_ref().filter(|_| in_worker), job.job.runtime) {
            // The worker prepares; refuse here what it could only refuse later.
            (Some(pool), kind) => {
                self.runtimes.availability(kind).map_err(|reason| {
                    JobError::RuntimeUnavailable {
                        runtime: kind,
                        reason,
                    }
                })?;
                Place::Worker(pool)
            }
            (None, RuntimeKind::Python) => Place::Here(self.runtimes.python(fuel).await?),
            (None, RuntimeKind::PythonData) => Place::Here(self.runtimes.python_data(fuel).await?),
            (None, RuntimeKind::Wasm) => {
                Place::Here(self.runtimes.wasm(&job.job.program, fuel).await?)
            }
        };
        let dir = JobDir::create(&self.work_root, &job)?;
        let argv0 = match job.job.runtime {
            RuntimeKind::Python | RuntimeKind::PythonData => job.filename.clone(),
            RuntimeKind::Wasm => "step.wasm".to_string(),
        };
        let mounts = match (job.job.runtime, self.runtimes.python_data_dir()) {
            (RuntimeKind::PythonData, Some(d)) => Some(dir.python_data_mounts(d.runtime_dirs())?),
            _ => None,
        };
        let step_version = options.step_version;
        let (mut ending, instantiate, cache, compile, runtime_sha256) = match place {
            Place::Worker(pool) => {
                let parts = RunParts::of(&job, &dir, mounts.as_deref(), &argv0);
                let o = pool
                    .run(WorkerJob {
                        runtime: job.job.runtime,
                        parts: &parts,
                        limits: &limits,
                        filename: &job.filename,
                        program: &job.job.program,
                        stdin: &job.job.stdin,
                        watch: disk_watch(&dir, &limits),
                        listener: options.listener,
                    })
                    .await?;
                (
                    o.ending,
                    o.instantiate,
                    o.cache,
                    o.compile,
                    o.runtime_sha256,
                )
            }
            Place::Here(prepared) => {
                let mut run = Run::new(
                    &self.engines,
                    prepared.entry.engine(),
                    &job,
                    &dir,
                    mounts.as_deref(),
                    &argv0,
                    options.listener,
                )?;
                let source = match job.job.runtime {
                    RuntimeKind::Python | RuntimeKind::PythonData => {
                        std::str::from_utf8(&job.job.program).unwrap_or_default()
                    }
                    RuntimeKind::Wasm => "",
                };
                let call = PythonCall {
                    source,
                    filename: &job.filename,
                    cwd: dir.cwd,
                    args: &job.job.args,
                    env: &job.env,
                };
                let mut instantiate = Duration::ZERO;
                run.start_clock(limits.wall_time);
                let exit = with_backstop(
                    limits.wall_time,
                    prepared.entry.run(&mut run.store, &call, &mut instantiate),
                )
                .await;
                (
                    run.finish(exit),
                    instantiate,
                    prepared.cache,
                    prepared.duration,
                    prepared.runtime_sha256,
                )
            }
        };

        let (outputs, scan) = crate::sandbox::outputs::collect(
            &dir.data_dir,
            &dir.scratch_dir,
            dir.baseline.as_ref(),
            &limits,
        );
        if let Some((kind, msg)) = &scan.exceeded
            && matches!(ending.status, Status::Succeeded | Status::Failed)
        {
            ending.status = Status::OutputExceeded;
            ending.message = format!("{msg} (limit `{kind}`)");
        }
        let mut manifest = build_manifest(&job, &runtime_sha256, &ending, &outputs, &limits);
        if step_version.is_some() {
            manifest.step = step_version;
            manifest = manifest.seal();
        }
        if let Err(e) = dir.remove() {
            tracing::error!(error = %format!("{e:#}"), "job directory left behind");
        }
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Ok(RunResult {
            run_id,
            status: ending.status,
            exit_code: ending.exit_code,
            message: ending.message,
            stdout: ending.stdout,
            stderr: ending.stderr,
            stdout_truncated: ending.stdout_truncated,
            stderr_truncated: ending.stderr_truncated,
            outputs,
            usage: Usage {
                wall_time_us: micros(ending.wall_time),
                fuel_consumed: ending.fuel_consumed,
                peak_memory_bytes: ending.peak_memory,
                compile_us: micros(compile),
                compile_cache: Some(cache),
                instantiate_us: micros(instantiate),
                output_files: scan.files,
                output_bytes: scan.bytes,
                scratch_files: scan.scratch_files,
                scratch_bytes: scan.scratch_bytes,
            },
            limits,
            policy: job.policy.name.clone(),
            runtime: job.job.runtime.name().to_string(),
            manifest,
        })
    }

    /// Runs one job and evaluates `checks` on its result. Malformed checks are refused before the
    /// step runs. A `SUCCEEDED` run with a failed check becomes `CHECKS_FAILED`; other statuses
    /// stay (the checks are still evaluated, for their details, but verifier steps are not run).
    pub async fn run_checked(
        &self,
        job: StepJob,
        checks: &[Check],
        options: RunOptions,
    ) -> Result<(RunResult, Vec<CheckResult>), JobError> {
        let prepared = checks
            .iter()
            .enumerate()
            .map(|(i, c)| c.prepare(i))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, p) in prepared.iter().enumerate() {
            if let Some(v) = p.verifier() {
                let mut v = v.clone();
                if v.policy.is_empty() {
                    v.policy = job.policy.clone();
                }
                v.validate(&self.policies)
                    .map_err(|e| prefix_field(e, &format!("checks[{i}].verifier.")))?;
            }
        }
        let (inputs, policy) = (job.inputs.clone(), job.policy.clone());
        let mut result = self.run_with(job, options).await?;
        let mut verdicts = Vec::with_capacity(prepared.len());
        for p in &prepared {
            let verdict = match p.verifier() {
                None => p.evaluate(&result),
                Some(v) => {
                    self.run_verifier(&p.name, v, &result, &inputs, &policy)
                        .await
                }
            };
            verdicts.push(verdict);
        }
        let failed: Vec<&str> = verdicts
            .iter()
            .filter(|v| !v.passed)
            .map(|v| v.name.as_str())
            .collect();
        if result.status == Status::Succeeded && !failed.is_empty() {
            result.status = Status::ChecksFailed;
            result.message = format!(
                "{} of {} checks failed: {}",
                failed.len(),
                verdicts.len(),
                failed.join(", ")
            );
        }
        Ok((result, verdicts))
    }

    /// Runs a verifier step over `result`: outputs under `outputs/`, the original inputs under
    /// `inputs/`, stdout as `stdout`. It passes when it succeeds.
    async fn run_verifier(
        &self,
        name: &str,
        verifier: &StepJob,
        result: &RunResult,
        inputs: &[InputFile],
        policy: &str,
    ) -> CheckResult {
        let verdict = |passed, detail| CheckResult {
            name: name.to_string(),
            passed,
            detail,
        };
        if result.status != Status::Succeeded {
            return verdict(
                false,
                format!("not run: the step ended with {}", result.status),
            );
        }
        let mut job = verifier.clone();
        if job.policy.is_empty() {
            job.policy = policy.to_string();
        }
        job.inputs = result
            .outputs
            .iter()
            .filter(|o| o.kind == OutputKind::File)
            .map(|o| InputFile {
                path: format!("outputs/{}", o.path),
                content: o.content.clone(),
            })
            .chain(inputs.iter().map(|i| InputFile {
                path: format!("inputs/{}", i.path),
                content: i.content.clone(),
            }))
            .chain(std::iter::once(InputFile {
                path: "stdout".into(),
                content: result.stdout.clone(),
            }))
            .collect();
        match Box::pin(self.run(job)).await {
            Ok(r) if r.status == Status::Succeeded => verdict(true, String::new()),
            Ok(r) => {
                let tail = String::from_utf8_lossy(&r.stderr[r.stderr.len().saturating_sub(500)..])
                    .into_owned();
                let msg = if r.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.message)
                };
                verdict(
                    false,
                    format!(
                        "the verifier ended with {}{msg}: {}",
                        r.status,
                        tail.trim_end()
                    ),
                )
            }
            Err(e) => verdict(false, format!("the verifier could not run: {e}")),
        }
    }
}

fn prefix_field(e: JobError, prefix: &str) -> JobError {
    match e {
        JobError::Invalid { field, reason } => JobError::Invalid {
            field: format!("{prefix}{field}"),
            reason,
        },
        JobError::Limit(l) => JobError::invalid(format!("{prefix}limits"), l.to_string()),
        other => other,
    }
}

fn build_manifest(
    job: &request::ValidJob,
    runtime_sha256: &str,
    ending: &crate::sandbox::run::Ending,
    outputs: &[OutputFile],
    limits: &Limits,
) -> Manifest {
    let mut inputs: Vec<FileDigest> = job
        .job
        .inputs
        .iter()
        .map(|i| FileDigest {
            path: i.path.clone(),
            sha256: sha256_hex(&i.content),
        })
        .collect();
    inputs.sort_by(|a, b| a.path.cmp(&b.path));
    Manifest {
        version: crate::job::manifest::MANIFEST_VERSION,
        program_sha256: sha256_hex(&job.job.program),
        runtime: job.job.runtime.name().to_string(),
        runtime_sha256: runtime_sha256.to_string(),
        engine: engine::engine_name(),
        policy: job.policy.name.clone(),
        policy_sha256: sha256_hex(&serde_json::to_vec(&job.policy.file).unwrap_or_default()),
        deterministic: job.policy.file.deterministic,
        limits: limits.clone(),
        layout: job.job.layout.name().to_string(),
        inputs,
        stdin_sha256: sha256_hex(&job.job.stdin),
        args: job.job.args.clone(),
        env: job.env.clone(),
        status: ending.status,
        exit_code: ending.exit_code,
        stdout_sha256: sha256_hex(&ending.stdout),
        stderr_sha256: sha256_hex(&ending.stderr),
        outputs: output_digests(outputs),
        step: None,
        digest: String::new(),
    }
    .seal()
}

/// Digests of outputs as recorded in manifests (a symlink: the digest of `symlink:` + target).
fn output_digests(outputs: &[OutputFile]) -> Vec<FileDigest> {
    outputs
        .iter()
        .map(|o| FileDigest {
            path: o.path.clone(),
            sha256: match &o.kind {
                OutputKind::File => o.sha256.clone(),
                OutputKind::Symlink { target } => {
                    sha256_hex(format!("symlink:{target}").as_bytes())
                }
            },
        })
        .collect()
}
