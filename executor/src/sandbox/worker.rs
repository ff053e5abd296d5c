//! Worker processes: guests compiled without epoch checks, run in long-lived child processes,
//! stopped from outside.
//!
//! Epoch interruption costs Python code about a quarter more instructions (every loop back-edge
//! and function entry checks the epoch), and wasmtime has no cheaper way to stop a guest in its
//! own process. So a run without fuel goes to a worker: a `stepbox` process started with
//! [`WORKER_ARG`] that loads the cached compiled runtimes once and then runs one job at a time on
//! an engine with no interruption checks at all. The parent holds every limit a guest cannot be
//! trusted with from inside: at the wall time, or when the job directory passes its file limits
//! (checked every [`EPOCH_TICK`]), it kills the worker with `SIGKILL`, reaps it, and starts
//! another; the other workers carry on. Memory and stdout/stderr caps stay in the worker (a
//! `ResourceLimiter` and capped pipes), as in-process. Runs that ask for fuel stay in-process:
//! fuel is counted in the guest anyway.
//!
//! The worker is a second wall around wasmtime: it starts with an empty environment and no
//! new privileges, in `/`, with only the protocol pipes; first thing, while it has one thread, it
//! confines itself with Landlock to the work root, the artifact cache and the Python component
//! (no other path on the host: see [`crate::sandbox::landlock`]), and before it says READY it
//! installs a seccomp filter on all its threads (no sockets, programs, processes, ptrace or
//! mounts: see [`crate::sandbox::seccomp`]); a crash in it (a wasmtime bug, the kernel's OOM
//! killer) ends that one job as `TRAPPED` instead of the server.
//!
//! The protocol is length-prefixed frames over the worker's stdin and stdout: `[u32 LE length]
//! [u8 tag][payload]`. The parent sends `JOB`; the worker answers `READY` once at start, then per
//! job `STARTED` (or `REFUSED`), any number of `CHUNK`s (stdout/stderr as the guest writes them),
//! and `DONE`. Inside the worker fd 0 and 1 are moved out of the way, so nothing but the protocol
//! writer can reach the parent's pipe.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
#[cfg(target_os = "linux")]
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc::UnboundedSender;

use crate::job::limits::Limits;
use crate::job::outcome::{CacheSource, Status};
use crate::job::request::{JobError, RuntimeKind};
use crate::sandbox::engine::{EPOCH_TICK, Engines, Interruption};
use crate::sandbox::outputs::DiskWatch;
use crate::sandbox::pipe::{OutputChunk, StreamKind};
use crate::sandbox::run::{Ending, Run, RunParts, disk_message, timed_out_message};
use crate::sandbox::runtime::{PythonCall, Runtimes};

/// The hidden first argument that makes the `stepbox` binary a worker (see `main.rs`).
pub const WORKER_ARG: &str = "__sandbox-worker";

const JOB: u8 = 1;
const READY: u8 = 2;
const STARTED: u8 = 3;
const CHUNK: u8 = 4;
const DONE: u8 = 5;
const REFUSED: u8 = 6;
/// A new peak of the guest's memory (u64, little-endian), so a killed run still reports it.
const MEMORY: u8 = 7;

/// Largest frame either side accepts (a program or stdin of a job).
const MAX_FRAME: usize = 1 << 30;

/// Jobs one worker runs before it is replaced: bounds whatever a long life might accumulate.
const JOBS_PER_WORKER: u32 = 1000;

/// How long a new worker may take to load (or, on a cold cache, compile) the Python runtime.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

/// How long the worker lets a job run past its wall time before it ends itself, in case the
/// parent is gone (the parent kills it at the wall time).
const SELF_KILL_GRACE: Duration = Duration::from_secs(2);

/// What a worker needs to find the runtimes: the parent's resolved paths.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// The parent of every job directory: the worker reads and writes beneath it, and (with the
    /// cache) nowhere else.
    #[serde(default)]
    pub work_root: Option<PathBuf>,
    /// The compiled-artifact cache the parent uses.
    pub cache_dir: Option<PathBuf>,
    /// The Python component.
    pub python_component: Option<PathBuf>,
    /// The `python-data` runtime's directory, when the parent has one.
    #[serde(default)]
    pub python_data_dir: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct JobHeader {
    runtime: String,
    parts: RunParts,
    memory_bytes: u64,
    wall_time_ms: u64,
    stdout_bytes: u64,
    stderr_bytes: u64,
    filename: String,
    program_len: usize,
    stdin_len: usize,
}

#[derive(Serialize, Deserialize)]
struct ReadyFrame {
    pid: u32,
    python: Option<String>,
    /// How far the kernel enforces the worker's Landlock ruleset.
    #[serde(default)]
    landlock: String,
}

#[derive(Serialize, Deserialize)]
struct StartedFrame {
    cache: CacheSource,
    compile_us: u64,
    runtime_sha256: String,
}

#[derive(Serialize, Deserialize)]
struct DoneFrame {
    status: String,
    exit_code: Option<i32>,
    message: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    peak_memory: u64,
    wall_time_us: u64,
    instantiate_us: u64,
}

#[derive(Serialize, Deserialize)]
struct RefusedFrame {
    kind: String,
    field: String,
    reason: String,
    runtime: String,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn frame(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut v = Vec::with_capacity(4 + len);
    v.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    v.push(tag);
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn json_frame<T: Serialize>(tag: u8, value: &T) -> Vec<u8> {
    frame(tag, &[&serde_json::to_vec(value).unwrap_or_default()])
}

// ---------------------------------------------------------------------------------------------
// The worker side.

/// Runs a worker on this process's stdin/stdout until the parent closes its pipe. `config` is
/// the JSON [`WorkerConfig`]. Returns the process exit code.
pub fn main(config: &str) -> u8 {
    match serve(config) {
        Ok(()) => 0,
        // The parent went away (it exited, or dropped this worker): nothing left to do.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            0
        }
        Err(e) => {
            eprintln!("stepbox sandbox worker: {e:#}");
            1
        }
    }
}

/// Moves the protocol off fd 0/1: the pipes get fresh close-on-exec descriptors, fd 0 reads
/// `/dev/null` and fd 1 goes to stderr, so a stray print can never corrupt a frame.
fn take_stdio() -> anyhow::Result<(std::fs::File, std::fs::File)> {
    let input = rustix::io::fcntl_dupfd_cloexec(std::io::stdin(), 3)?;
    let output = rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3)?;
    let null = std::fs::File::open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(std::io::stderr())?;
    Ok((input.into(), output.into()))
}

fn read_frame(r: &mut impl Read) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        bail!("a frame of {len} bytes: the parent and worker disagree on the protocol");
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let tag = buf[0];
    buf.remove(0);
    Ok(Some((tag, buf)))
}

type Out = Arc<Mutex<std::fs::File>>;

fn send(out: &Out, bytes: &[u8]) -> std::io::Result<()> {
    out.lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_all(bytes)
}

fn serve(config: &str) -> anyhow::Result<()> {
    let config: WorkerConfig =
        serde_json::from_str(config).context("the worker configuration is not valid JSON")?;
    rustix::thread::set_no_new_privs(true).context("failed to set no_new_privs")?;
    let (mut input, output) = take_stdio().context("failed to take the protocol pipes")?;
    // Landlock next, while this is the worker's only thread: it confines the calling thread and
    // the threads it starts from then on, so the async runtime, the engines' ticker, the helpers,
    // tokio's blocking pool and wasmtime's compiler threads all start confined.
    #[cfg(target_os = "linux")]
    let landlock = confine(&config)
        .context("failed to confine the worker with landlock")?
        .to_string();
    #[cfg(not(target_os = "linux"))]
    let landlock = String::from("not enforced (not Linux)");
    let out: Out = Arc::new(Mutex::new(output));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let engines = Arc::new(Engines::with_interruption(
        config.cache_dir,
        Interruption::External,
    )?);
    let mut runtimes = Runtimes::new(engines.clone(), config.python_component)?;
    runtimes.set_python_data_dir(config.python_data_dir.as_deref());
    // Load the Python runner before saying ready, so no job pays for it.
    let (mut loaded, python) = match rt.block_on(runtimes.python(false)) {
        Ok(p) => (Some((p.cache, p.duration)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let helpers = Helpers::start(&out)?;
    // Everything the worker opens or starts for itself is open or started: from here on no thread
    // of it may open a socket, run a program or start a process (see `seccomp`). A worker that
    // cannot install the filter never says READY, and the parent reports its start as failed.
    #[cfg(target_os = "linux")]
    crate::sandbox::seccomp::install_worker_filter()
        .context("failed to install the worker's seccomp filter")?;
    send(
        &out,
        &json_frame(
            READY,
            &ReadyFrame {
                pid: std::process::id(),
                python,
                landlock,
            },
        ),
    )?;
    while let Some((tag, payload)) = read_frame(&mut input)? {
        if tag != JOB {
            bail!("unexpected frame tag {tag} from the parent");
        }
        rt.block_on(run_job(
            &engines,
            &runtimes,
            &helpers,
            &out,
            payload,
            &mut loaded,
        ))?;
    }
    Ok(())
}

/// Confines this worker with Landlock (see [`crate::sandbox::landlock`]): it may read and write
/// beneath the work root and the artifact cache, and read the Python component. Refused while
/// the worker has another thread, which the ruleset would not reach.
#[cfg(target_os = "linux")]
fn confine(config: &WorkerConfig) -> anyhow::Result<crate::sandbox::landlock::LandlockStatus> {
    use crate::sandbox::landlock;
    let threads = landlock::threads()?;
    anyhow::ensure!(
        threads == 1,
        "the worker has {threads} threads before its landlock ruleset, which would leave all but \
         one unconfined"
    );
    // A rule needs its directory: the parent makes the work root at its first job and the
    // engines make the cache, so make them now, as those would.
    let mut rw = Vec::new();
    for dir in [&config.work_root, &config.cache_dir].into_iter().flatten() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create `{}`", dir.display()))?;
        rw.push(dir.as_path());
    }
    // Read-only. One that is missing is not granted: loading it fails as it would anyway.
    let ro: Vec<&Path> = [
        config.python_component.as_deref(),
        // The `python-data` runtime: its snapshot, and the directories its runs mount read-only.
        config.python_data_dir.as_deref(),
    ]
    .into_iter()
    .flatten()
    .filter(|p| p.exists())
    .collect();
    landlock::confine_worker(&rw, &ro)
}

fn decode_job(payload: &[u8]) -> anyhow::Result<(JobHeader, Bytes, Bytes)> {
    let mut p = payload;
    anyhow::ensure!(p.len() >= 4, "a job frame without a header");
    let hlen = p.get_u32_le() as usize;
    anyhow::ensure!(p.len() >= hlen, "a job frame shorter than its header");
    let header: JobHeader = serde_json::from_slice(&p[..hlen])?;
    p = &p[hlen..];
    anyhow::ensure!(
        p.len() == header.program_len + header.stdin_len,
        "a job frame whose program and stdin do not add up"
    );
    let program = Bytes::copy_from_slice(&p[..header.program_len]);
    let stdin = Bytes::copy_from_slice(&p[header.program_len..]);
    Ok((header, program, stdin))
}

fn refused_frame(e: &JobError) -> RefusedFrame {
    let (kind, field, reason, runtime) = match e {
        JobError::Invalid { field, reason } => ("invalid", field.clone(), reason.clone(), ""),
        JobError::RuntimeUnavailable { runtime, reason } => {
            ("unavailable", String::new(), reason.clone(), runtime.name())
        }
        other => ("internal", String::new(), format!("{other}"), ""),
    };
    RefusedFrame {
        kind: kind.into(),
        field,
        reason,
        runtime: runtime.into(),
    }
}

/// The worker's two long-lived helper threads: one forwards each job's output to the parent, one
/// ends the process if a job runs well past its wall time (the parent is gone, or stuck).
struct Helpers {
    forward: std::sync::mpsc::Sender<(
        tokio::sync::mpsc::UnboundedReceiver<OutputChunk>,
        std::sync::mpsc::Sender<()>,
    )>,
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Helpers {
    fn start(out: &Out) -> anyhow::Result<Helpers> {
        let (forward, jobs) = std::sync::mpsc::channel::<(
            tokio::sync::mpsc::UnboundedReceiver<OutputChunk>,
            std::sync::mpsc::Sender<()>,
        )>();
        let out = out.clone();
        std::thread::Builder::new()
            .name("stepbox-worker-out".into())
            .spawn(move || {
                for (mut rx, drained) in jobs {
                    let mut broken = false;
                    while let Some(c) = rx.blocking_recv() {
                        let kind = [u8::from(c.stream == StreamKind::Stderr)];
                        if !broken && send(&out, &frame(CHUNK, &[&kind, &c.data])).is_err() {
                            broken = true; // the parent is gone; keep draining
                        }
                    }
                    let _ = drained.send(());
                }
            })?;
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
        let watched = deadline.clone();
        std::thread::Builder::new()
            .name("stepbox-worker-watchdog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let d = *watched.lock().unwrap_or_else(|e| e.into_inner());
                    if d.is_some_and(|d| Instant::now() > d) {
                        eprintln!("stepbox sandbox worker: job past its wall time; exiting");
                        std::process::exit(3);
                    }
                }
            })?;
        Ok(Helpers { forward, deadline })
    }

    fn arm(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }
}

async fn run_job(
    engines: &Engines,
    runtimes: &Runtimes,
    helpers: &Helpers,
    out: &Out,
    payload: Vec<u8>,
    loaded: &mut Option<(CacheSource, Duration)>,
) -> anyhow::Result<()> {
    let (header, program, stdin) = decode_job(&payload)?;
    drop(payload);
    let runtime: RuntimeKind = header
        .runtime
        .parse()
        .map_err(|e| anyhow::anyhow!("unknown runtime from the parent: {e}"))?;
    let prepared = match runtime {
        RuntimeKind::Python => runtimes.python(false).await,
        // Loaded (or compiled, on the engine for large modules) at the first such job.
        RuntimeKind::PythonData => runtimes.python_data(false).await,
        RuntimeKind::Wasm => runtimes.wasm(&program, false).await,
    };
    let mut prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            send(out, &json_frame(REFUSED, &refused_frame(&e)))?;
            return Ok(());
        }
    };
    let wall_time = Duration::from_millis(header.wall_time_ms);
    let limits = Limits {
        memory_bytes: header.memory_bytes,
        fuel: None,
        wall_time,
        stdout_bytes: header.stdout_bytes,
        stderr_bytes: header.stderr_bytes,
        // Disk limits are the parent's: it watches the job directory.
        output_files: u32::MAX,
        output_bytes: u64::MAX,
        scratch_files: u32::MAX,
        scratch_bytes: u64::MAX,
    };
    // The first Python job reports how the runtime was loaded at the worker's start.
    if runtime == RuntimeKind::Python
        && let Some((cache, duration)) = loaded.take()
    {
        (prepared.cache, prepared.duration) = (cache, duration);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<OutputChunk>();
    let mut run = match Run::with_parts(
        engines,
        prepared.entry.engine(),
        &header.parts,
        &limits,
        stdin,
        None,
        Some(tx),
    ) {
        Ok(r) => r,
        Err(e) => {
            let e = JobError::Internal(e.context("failed to set up the run"));
            send(out, &json_frame(REFUSED, &refused_frame(&e)))?;
            return Ok(());
        }
    };
    // Chunks go out from the forwarder thread: the guest runs on this one without yielding.
    let (drained_tx, drained) = std::sync::mpsc::channel();
    helpers
        .forward
        .send((rx, drained_tx))
        .map_err(|_| anyhow::anyhow!("the output forwarder thread is gone"))?;
    send(
        out,
        &json_frame(
            STARTED,
            &StartedFrame {
                cache: prepared.cache,
                compile_us: micros(prepared.duration),
                runtime_sha256: prepared.runtime_sha256.clone(),
            },
        ),
    )?;
    // The parent kills this process at the wall time; if the parent is gone, end ourselves.
    helpers.arm(Some(Instant::now() + wall_time + SELF_KILL_GRACE));
    let source = match runtime {
        RuntimeKind::Python | RuntimeKind::PythonData => {
            std::str::from_utf8(&program).unwrap_or_default()
        }
        RuntimeKind::Wasm => "",
    };
    let call = PythonCall {
        source,
        filename: &header.filename,
        cwd: &header.parts.cwd,
        args: &header.parts.args,
        env: &header.parts.env,
    };
    let mut instantiate = Duration::ZERO;
    let peak_out = out.clone();
    run.on_memory_peak(move |peak| {
        let _ = send(&peak_out, &frame(MEMORY, &[&peak.to_le_bytes()]));
    });
    run.start_clock(wall_time);
    let exit = prepared
        .entry
        .run(&mut run.store, &call, &mut instantiate)
        .await;
    let ending = run.finish(Some(exit));
    helpers.arm(None);
    // `finish` dropped the store and its pipes, so the forwarder sees the channel close once it
    // has sent every chunk.
    let _ = drained.recv();
    send(
        out,
        &json_frame(
            DONE,
            &DoneFrame {
                status: ending.status.name().into(),
                exit_code: ending.exit_code,
                message: ending.message,
                stdout_truncated: ending.stdout_truncated,
                stderr_truncated: ending.stderr_truncated,
                peak_memory: ending.peak_memory,
                wall_time_us: micros(ending.wall_time),
                instantiate_us: micros(instantiate),
            },
        ),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent side.

/// Reads frames from a worker; cancel-safe (the only await is `read_buf`), so it can sit in a
/// `select!` next to the deadline.
struct FrameReader {
    rx: pipe::Receiver,
    buf: BytesMut,
}

impl FrameReader {
    async fn next(&mut self) -> std::io::Result<Option<(u8, Bytes)>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
                if len == 0 || len > MAX_FRAME {
                    return Err(std::io::Error::other(format!(
                        "the worker sent a frame of {len} bytes"
                    )));
                }
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let mut f = self.buf.split_to(len).freeze();
                    let tag = f.get_u8();
                    return Ok(Some((tag, f)));
                }
            }
            if self.rx.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// One worker process. Its pipes are plain descriptors while it is idle and are registered
/// with the current tokio runtime only for a job ([`Worker::attach`]): a pool may outlive the
/// runtime that started a worker (tests run one runtime per test).
struct Worker {
    /// `None` only while [`Worker::kill`] hands it to a blocking thread.
    child: Option<Child>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    /// Bytes read past the last frame (none between jobs, in a healthy worker).
    buf: BytesMut,
    jobs: u32,
}

/// A worker's pipes on the current runtime.
struct Attached {
    tx: pipe::Sender,
    reader: FrameReader,
}

impl Worker {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn attach(&mut self) -> std::io::Result<Attached> {
        let (Some(i), Some(o)) = (self.stdin.take(), self.stdout.take()) else {
            return Err(std::io::Error::other("the worker's pipes are gone"));
        };
        Ok(Attached {
            tx: pipe::Sender::from_owned_fd(i)?,
            reader: FrameReader {
                rx: pipe::Receiver::from_owned_fd(o)?,
                buf: std::mem::take(&mut self.buf),
            },
        })
    }

    fn detach(&mut self, a: Attached) -> std::io::Result<()> {
        self.buf = a.reader.buf;
        self.stdin = Some(a.tx.into_nonblocking_fd()?);
        self.stdout = Some(a.reader.rx.into_nonblocking_fd()?);
        Ok(())
    }

    /// Kills and reaps the process off the async threads; returns how it ended.
    async fn kill(mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already reaped".into();
        };
        drop(self);
        tokio::task::spawn_blocking(move || {
            let _ = child.kill();
            match child.wait() {
                Ok(s) => s.to_string(),
                Err(e) => format!("could not be reaped: {e}"),
            }
        })
        .await
        .unwrap_or_else(|e| format!("could not be reaped: {e}"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker dropped mid-job (its run was cancelled) must be gone before the job
        // directory is removed: kill and reap it here. A SIGKILLed process is reaped in ms.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How to start workers and how many to keep.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The `stepbox` binary (it becomes a worker when its first argument is [`WORKER_ARG`]).
    pub program: PathBuf,
    /// Idle workers kept for the next jobs (more run at once when more jobs come).
    pub max_idle: usize,
}

impl WorkerOptions {
    /// Workers from this very binary, keeping one idle per core.
    pub fn current_exe() -> anyhow::Result<WorkerOptions> {
        Ok(WorkerOptions {
            program: std::env::current_exe()
                .context("cannot find this program to start sandbox workers from")?,
            max_idle: std::thread::available_parallelism().map_or(2, usize::from),
        })
    }
}

/// What one job gives a worker.
#[derive(Debug)]
pub struct WorkerJob<'a> {
    /// Which runtime.
    pub runtime: RuntimeKind,
    /// The Store's parts.
    pub parts: &'a RunParts,
    /// The limits.
    pub limits: &'a Limits,
    /// The name tracebacks show.
    pub filename: &'a str,
    /// The program (Python source or wasm).
    pub program: &'a [u8],
    /// stdin.
    pub stdin: &'a [u8],
    /// The job directory's disk watch.
    pub watch: DiskWatch,
    /// Receives output as it comes.
    pub listener: Option<UnboundedSender<OutputChunk>>,
}

/// How a job in a worker ended.
#[derive(Debug)]
pub struct WorkerOutcome {
    /// The ending, classified as in-process.
    pub ending: Ending,
    /// Instantiation time.
    pub instantiate: Duration,
    /// Where the worker's compiled code came from.
    pub cache: CacheSource,
    /// Time the worker spent compiling or loading for this job.
    pub compile: Duration,
    /// sha256 of the runtime (Python), empty for caller programs.
    pub runtime_sha256: String,
}

/// Worker processes of one executor.
#[derive(Debug)]
pub struct WorkerPool {
    options: WorkerOptions,
    config: WorkerConfig,
    idle: Mutex<Vec<Worker>>,
    warm: tokio::sync::Mutex<()>,
    warmed: AtomicBool,
    spawned: AtomicU64,
    busy: Mutex<Vec<u32>>,
    landlock: Mutex<Option<String>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("pid", &self.pid())
            .field("jobs", &self.jobs)
            .finish_non_exhaustive()
    }
}

/// Lists a worker as busy for as long as its job runs (also when the run is cancelled).
struct Busy<'a> {
    pool: &'a WorkerPool,
    pid: u32,
}

impl Busy<'_> {
    fn set(&mut self, pid: u32) {
        self.pid = pid;
        self.pool
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pid);
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.pid != 0 {
            let mut b = self.pool.busy.lock().unwrap_or_else(|e| e.into_inner());
            b.retain(|p| *p != self.pid);
        }
    }
}

/// Collected stdout/stderr of a job in a worker, capped again on this side.
struct Collected {
    stdout: BytesMut,
    stderr: BytesMut,
}

impl WorkerPool {
    /// A pool starting `options.program` with `config`. No process starts until a job or
    /// [`WorkerPool::prewarm`].
    pub fn new(options: WorkerOptions, config: WorkerConfig) -> WorkerPool {
        WorkerPool {
            options,
            config,
            idle: Mutex::new(Vec::new()),
            warm: tokio::sync::Mutex::new(()),
            warmed: AtomicBool::new(false),
            spawned: AtomicU64::new(0),
            busy: Mutex::new(Vec::new()),
            landlock: Mutex::new(None),
        }
    }

    /// How far the kernel enforces the workers' Landlock ruleset ("fully enforced", "partially
    /// enforced", "not enforced (kernel without landlock)"), as the last worker to start said;
    /// `None` before one has.
    pub fn landlock(&self) -> Option<String> {
        self.landlock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many worker processes this pool has started.
    pub fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }

    /// The process ids of the idle workers.
    pub fn idle_pids(&self) -> Vec<u32> {
        self.lock_idle().iter().map(Worker::pid).collect()
    }

    /// The process ids of the workers running a job now.
    pub fn busy_pids(&self) -> Vec<u32> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one worker now (it loads the Python runtime) and keeps it idle.
    pub async fn prewarm(&self) -> anyhow::Result<()> {
        let w = self.take().await?;
        self.give_back(w);
        Ok(())
    }

    async fn spawn(&self) -> anyhow::Result<Worker> {
        let mut cmd = Command::new(&self.options.program);
        cmd.arg(WORKER_ARG)
            .arg(serde_json::to_string(&self.config)?)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The worker does not search for `python-data`: the configuration names the parent's.
        cmd.env(crate::sandbox::data::PYTHON_DATA_DIR_ENV, "");
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "failed to start a sandbox worker `{}`",
                self.options.program.display()
            )
        })?;
        self.spawned.fetch_add(1, Ordering::Relaxed);
        let stdin = OwnedFd::from(child.stdin.take().context("worker stdin")?);
        let stdout = OwnedFd::from(child.stdout.take().context("worker stdout")?);
        let mut w = Worker {
            child: Some(child),
            stdin: Some(stdin),
            stdout: Some(stdout),
            buf: BytesMut::new(),
            jobs: 0,
        };
        let mut io = w.attach()?;
        let ready = tokio::time::timeout(READY_TIMEOUT, io.reader.next()).await;
        match ready {
            Ok(Ok(Some((READY, payload)))) => {
                w.detach(io)?;
                let ready: ReadyFrame = serde_json::from_slice(&payload)?;
                if let Some(e) = ready.python {
                    tracing::debug!(error = %e, "sandbox worker has no Python runtime");
                }
                tracing::debug!(pid = ready.pid, "sandbox worker ready");
                let first = self
                    .landlock
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(ready.landlock.clone())
                    .is_none();
                if first {
                    tracing::info!(landlock = %ready.landlock, "sandbox workers' file access (landlock)");
                }
                Ok(w)
            }
            Ok(Ok(Some((tag, _)))) => bail!("a new sandbox worker sent frame {tag} before READY"),
            Ok(Ok(None)) | Ok(Err(_)) => {
                drop(io);
                let how = w.kill().await;
                bail!("a new sandbox worker exited before it was ready ({how})")
            }
            Err(_) => {
                drop(io);
                w.kill().await;
                bail!("a new sandbox worker was not ready within {READY_TIMEOUT:?}")
            }
        }
    }

    /// An idle worker, or a new one. Until one worker has started, starts are one at a time, so
    /// a cold artifact cache is filled once rather than by every worker at once.
    async fn take(&self) -> anyhow::Result<Worker> {
        if let Some(w) = self.lock_idle().pop() {
            return Ok(w);
        }
        if !self.warmed.load(Ordering::Acquire) {
            let _gate = self.warm.lock().await;
            if let Some(w) = self.lock_idle().pop() {
                return Ok(w);
            }
            let w = self.spawn().await?;
            self.warmed.store(true, Ordering::Release);
            return Ok(w);
        }
        self.spawn().await
    }

    fn give_back(&self, mut w: Worker) {
        w.jobs += 1;
        let mut idle = self.lock_idle();
        if w.jobs < JOBS_PER_WORKER && idle.len() < self.options.max_idle {
            idle.push(w);
        } else {
            drop(idle);
            // Surplus or worn out: the drop kills and reaps it.
            drop(w);
        }
    }

    /// Runs `job` in a worker, holding its wall time and disk limits from here.
    pub async fn run(&self, job: WorkerJob<'_>) -> Result<WorkerOutcome, JobError> {
        let mut busy = Busy { pool: self, pid: 0 };
        self.run_tracked(job, &mut busy).await
    }

    async fn run_tracked(
        &self,
        mut job: WorkerJob<'_>,
        busy: &mut Busy<'_>,
    ) -> Result<WorkerOutcome, JobError> {
        let header = JobHeader {
            runtime: job.runtime.name().to_string(),
            parts: job.parts.clone(),
            memory_bytes: job.limits.memory_bytes,
            wall_time_ms: u64::try_from(job.limits.wall_time.as_millis()).unwrap_or(u64::MAX),
            stdout_bytes: job.limits.stdout_bytes,
            stderr_bytes: job.limits.stderr_bytes,
            filename: job.filename.to_string(),
            program_len: job.program.len(),
            stdin_len: job.stdin.len(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| JobError::Internal(e.into()))?;
        let hlen = u32::try_from(header.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes();
        let request = frame(JOB, &[&hlen, &header, job.program, job.stdin]);
        if request.len() > MAX_FRAME {
            return Err(JobError::invalid(
                "program",
                format!(
                    "the program and stdin together are {} bytes; at most {MAX_FRAME} can be run",
                    request.len()
                ),
            ));
        }
        // An idle worker may have died since its last job (the OOM killer, say): one retry
        // with a fresh worker, as long as nothing of the job has run.
        let mut attempt = 0;
        let (mut worker, mut io, started) = loop {
            attempt += 1;
            let mut w = self.take().await.map_err(JobError::Internal)?;
            // The job sent and the worker's first answer, or why there is none (it is gone).
            let answer = async {
                let mut io = w.attach()?;
                io.tx.write_all(&request).await?;
                match io.reader.next().await? {
                    Some(frame) => Ok((io, frame)),
                    None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                }
            }
            .await;
            match answer {
                Ok((io, (STARTED, p))) => {
                    let s: StartedFrame =
                        serde_json::from_slice(&p).map_err(|e| JobError::Internal(e.into()))?;
                    busy.set(w.pid());
                    break (w, io, s);
                }
                Ok((io, (REFUSED, p))) => {
                    if w.detach(io).is_ok() {
                        self.give_back(w);
                    }
                    let r: RefusedFrame =
                        serde_json::from_slice(&p).map_err(|e| JobError::Internal(e.into()))?;
                    return Err(match r.kind.as_str() {
                        "invalid" => JobError::Invalid {
                            field: r.field,
                            reason: r.reason,
                        },
                        "unavailable" => JobError::RuntimeUnavailable {
                            runtime: r.runtime.parse().unwrap_or(job.runtime),
                            reason: r.reason,
                        },
                        _ => JobError::Internal(anyhow::anyhow!("{}", r.reason)),
                    });
                }
                Ok((io, (tag, _))) => {
                    drop(io);
                    w.kill().await;
                    return Err(JobError::Internal(anyhow::anyhow!(
                        "the sandbox worker sent frame {tag} instead of STARTED"
                    )));
                }
                Err(_) => {
                    let how = w.kill().await;
                    if attempt < 2 {
                        tracing::warn!(how = %how, "sandbox worker gone before its job started; retrying with a new one");
                        continue;
                    }
                    return Err(JobError::Internal(anyhow::anyhow!(
                        "the sandbox worker exited while preparing the job ({how})"
                    )));
                }
            }
        };

        let limits = job.limits;
        let start = Instant::now();
        let deadline = tokio::time::sleep(limits.wall_time);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(EPOCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut got = Collected {
            stdout: BytesMut::new(),
            stderr: BytesMut::new(),
        };
        // The guest's peak memory as the worker reports it: kept if the run is killed.
        let mut peak_memory = 0u64;
        let stop = loop {
            tokio::select! {
                biased;
                f = io.reader.next() => match f {
                    Ok(Some((MEMORY, p))) if p.len() == 8 => {
                        peak_memory = peak_memory.max(u64::from_le_bytes(p[..].try_into().unwrap_or_default()));
                    }
                    Ok(Some((CHUNK, mut p))) if !p.is_empty() => {
                        let stream = if p.get_u8() == 1 { StreamKind::Stderr } else { StreamKind::Stdout };
                        let (buf, cap) = match stream {
                            StreamKind::Stdout => (&mut got.stdout, limits.stdout_bytes),
                            StreamKind::Stderr => (&mut got.stderr, limits.stderr_bytes),
                        };
                        let room = usize::try_from(cap).unwrap_or(usize::MAX).saturating_sub(buf.len());
                        let data = p.slice(..p.len().min(room));
                        buf.extend_from_slice(&data);
                        if let Some(l) = &job.listener && !data.is_empty() {
                            let _ = l.send(OutputChunk { stream, data });
                        }
                    }
                    Ok(Some((DONE, p))) => {
                        let d: DoneFrame = serde_json::from_slice(&p).map_err(|e| JobError::Internal(e.into()))?;
                        if worker.detach(io).is_ok() {
                            self.give_back(worker);
                        }
                        let status = Status::ALL.into_iter().find(|s| s.name() == d.status).unwrap_or(Status::Trapped);
                        return Ok(WorkerOutcome {
                            ending: Ending {
                                status,
                                exit_code: d.exit_code,
                                message: d.message,
                                stdout: got.stdout.freeze(),
                                stderr: got.stderr.freeze(),
                                stdout_truncated: d.stdout_truncated,
                                stderr_truncated: d.stderr_truncated,
                                fuel_consumed: None,
                                peak_memory: d.peak_memory,
                                wall_time: Duration::from_micros(d.wall_time_us),
                            },
                            instantiate: Duration::from_micros(d.instantiate_us),
                            cache: started.cache,
                            compile: Duration::from_micros(started.compile_us),
                            runtime_sha256: started.runtime_sha256,
                        });
                    }
                    Ok(Some((tag, _))) => break (Status::Trapped, format!("the sandbox worker sent an unexpected frame {tag}")),
                    Ok(None) | Err(_) => break (Status::Trapped, String::new()),
                },
                () = &mut deadline => break (Status::TimedOut, timed_out_message(limits)),
                _ = tick.tick() => {
                    if let Some((kind, msg)) = job.watch.check() {
                        break (Status::OutputExceeded, disk_message(kind, &msg));
                    }
                }
            }
        };
        let wall_time = start.elapsed();
        drop(io);
        let how = worker.kill().await;
        let (status, message) = match stop {
            (Status::Trapped, m) if m.is_empty() => (
                Status::Trapped,
                format!("the sandbox worker process died during the run ({how})"),
            ),
            other => other,
        };
        Ok(WorkerOutcome {
            ending: Ending {
                status,
                exit_code: None,
                message,
                stdout: got.stdout.freeze(),
                stderr: got.stderr.freeze(),
                stdout_truncated: false,
                stderr_truncated: false,
                fuel_consumed: None,
                // The last peak the worker reported before it was killed.
                peak_memory,
                wall_time,
            },
            instantiate: Duration::ZERO,
            cache: started.cache,
            compile: Duration::from_micros(started.compile_us),
            runtime_sha256: started.runtime_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let f = frame(CHUNK, &[&[1], b"hello"]);
        let mut r = &f[..];
        let (tag, payload) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((tag, payload.as_slice()), (CHUNK, &b"\x01hello"[..]));
        assert!(
            read_frame(&mut r).unwrap().is_none(),
            "clean EOF between frames"
        );
        let zero = 0u32.to_le_bytes();
        assert!(read_frame(&mut &zero[..]).is_err());
        let huge = u32::MAX.to_le_bytes();
        let e = read_frame(&mut &huge[..]).unwrap_err().to_string();
        assert!(e.contains("disagree on the protocol"), "{e}");
    }

    #[test]
    fn a_job_frame_decodes_to_what_was_sent() {
        let parts = RunParts {
            argv0: "step.py".into(),
            args: vec!["a".into()],
            env: [("K".to_string(), "V".to_string())].into(),
            cwd: "/".into(),
            mounts: Vec::new(),
            deterministic: Some(7),
        };
        let header = JobHeader {
            runtime: "python".into(),
            parts,
            memory_bytes: 1,
            wall_time_ms: 2,
            stdout_bytes: 3,
            stderr_bytes: 4,
            filename: "step.py".into(),
            program_len: 5,
            stdin_len: 2,
        };
        let h = serde_json::to_vec(&header).unwrap();
        let hl = (h.len() as u32).to_le_bytes();
        let f = frame(JOB, &[&hl, &h, b"print", b"in"]);
        let (_, payload) = read_frame(&mut &f[..]).unwrap().unwrap();
        let (h, program, stdin) = decode_job(&payload).unwrap();
        assert_eq!((&program[..], &stdin[..]), (&b"print"[..], &b"in"[..]));
        assert_eq!(h.parts.env["K"], "V");
        assert_eq!(h.parts.deterministic, Some(7));
        // A frame whose blobs do not add up is refused, not misread.
        let short = frame(JOB, &[&hl, &serde_json::to_vec(&header).unwrap(), b"prin"]);
        let (_, payload) = read_frame(&mut &short[..]).unwrap().unwrap();
        assert!(decode_job(&payload).is_err());
    }
}
