//! One run of one guest: the Store, its WASI context, its limits, and the classification of how it
//! ended into exactly one [`Status`].
//!
//! The guest sees only the job directory's mounts, an environment built from the policy and the
//! job, its stdin bytes, and capped stdout/stderr pipes. No sockets, no host environment. Memory is
//! capped by a [`ResourceLimiter`] that records refusals, CPU by fuel (when metered), wall time and
//! disk use by an epoch callback that runs every [`EPOCH_TICK`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::job::limits::{LimitKind, Limits};
use crate::job::outcome::Status;
use crate::job::request::ValidJob;
use crate::sandbox::engine::{EPOCH_TICK, Engines};
use crate::sandbox::jobdir::{JobDir, Mount};
use crate::sandbox::outputs::DiskWatch;
use crate::sandbox::pipe::{LimitedPipe, OutputChunk, StreamKind};

/// Most table elements a guest may hold. CPython's function table has ~20k entries; a table of
/// millions is only ever an attempt to exhaust host memory outside the linear-memory limit.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Caps all of a store's linear memories together and records the first refusal.
pub struct MemoryLimiter {
    cap: u64,
    total: u64,
    peak: u64,
    refused: Option<String>,
    /// Told every new peak (a worker passes it to its parent, which keeps it if it kills the run).
    on_peak: Option<Box<dyn FnMut(u64) + Send>>,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("cap", &self.cap)
            .field("total", &self.total)
            .field("peak", &self.peak)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl MemoryLimiter {
    fn new(cap: u64) -> MemoryLimiter {
        MemoryLimiter {
            cap,
            total: 0,
            peak: 0,
            refused: None,
            on_peak: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false); // the module's own declared maximum, not ours: grow returns -1
        }
        let total = self.total - current as u64 + desired as u64;
        if total > self.cap {
            let msg = format!(
                "the step asked for {total} bytes of memory in total; the limit is {} bytes",
                self.cap
            );
            self.refused = Some(msg.clone());
            // Trap at once: a -1 from memory.grow ends as a guest-specific crash or MemoryError
            // that cannot be told apart from a bug, and Python may swallow it.
            return Err(wasmtime::format_err!("{msg}"));
        }
        self.total = total;
        if total > self.peak {
            self.peak = total;
            if let Some(f) = &mut self.on_peak {
                f(total);
            }
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            let msg = format!(
                "the step asked for a table of {desired} elements; the limit is {MAX_TABLE_ELEMENTS}"
            );
            self.refused = Some(msg.clone());
            return Err(wasmtime::format_err!("{msg}"));
        }
        Ok(true)
    }
}

/// Why the host stopped a running guest.
#[derive(Clone, Debug)]
enum Stop {
    WallTime,
    Disk(LimitKind, String),
}

/// The data of one run's Store.
pub struct StepState {
    wasi: WasiP1Ctx,
    /// Preview-1 directory listings ([`crate::sandbox::wasi_readdir`]).
    dirs: crate::sandbox::wasi_readdir::DirListings,
    limiter: MemoryLimiter,
    deadline: Instant,
    limits: Limits,
    /// The disk watch the epoch callback runs; `None` in a worker process, whose parent watches.
    watch: Option<DiskWatch>,
    stop: Option<Stop>,
}

impl std::fmt::Debug for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepState")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

impl StepState {
    /// The preview-1 context, for `wasmtime_wasi::p1::add_to_linker_async`.
    pub fn p1(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }

    /// The preview-1 context and its directory listings, for
    /// [`crate::sandbox::wasi_readdir::shadow_fd_readdir`].
    pub fn p1_dirs(
        &mut self,
    ) -> (
        &mut WasiP1Ctx,
        &mut crate::sandbox::wasi_readdir::DirListings,
    ) {
        (&mut self.wasi, &mut self.dirs)
    }
}

/// A wall clock fixed at 2000-01-01T00:00:00Z, for deterministic runs.
struct FixedWallClock;
impl wasmtime_wasi::HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(946_684_800)
    }
}

/// A monotonic clock that advances 1 µs per reading, for deterministic runs.
#[derive(Default)]
struct CountingClock(std::sync::atomic::AtomicU64);
impl wasmtime_wasi::HostMonotonicClock for CountingClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.0
            .fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
            + 1_000
    }
}

/// A directory the guest sees, as it crosses the worker boundary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunMount {
    /// Host directory.
    pub host: PathBuf,
    /// Path the guest sees.
    pub guest: String,
    /// Whether the guest may write.
    pub writable: bool,
}

/// Everything a Store takes from a job and its directory, in a form that can cross into a
/// worker process ([`crate::sandbox::worker`]). Limits travel separately.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunParts {
    /// `argv[0]`.
    pub argv0: String,
    /// `argv[1..]`.
    pub args: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// The working directory inside the guest.
    pub cwd: String,
    /// Preopened directories, in order.
    pub mounts: Vec<RunMount>,
    /// The seed of a deterministic run (fixed clocks, seeded randomness).
    pub deterministic: Option<u64>,
}

impl RunParts {
    /// The parts of `job` in `dir`; `mounts` replaces `dir.mounts` when given.
    pub fn of(job: &ValidJob, dir: &JobDir, mounts: Option<&[Mount]>, argv0: &str) -> RunParts {
        let policy = &job.policy.file;
        RunParts {
            argv0: argv0.to_string(),
            args: job.job.args.clone(),
            env: job.env.clone(),
            cwd: dir.cwd.to_string(),
            mounts: mounts
                .unwrap_or(&dir.mounts)
                .iter()
                .map(|m| RunMount {
                    host: m.host.clone(),
                    guest: m.guest.to_string(),
                    writable: m.writable,
                })
                .collect(),
            deterministic: policy.deterministic.then_some(policy.seed),
        }
    }
}

/// The disk watch of `dir`'s writable directories (output and scratch) under `limits`.
pub fn disk_watch(dir: &JobDir, limits: &Limits) -> DiskWatch {
    DiskWatch::new(
        dir.data_dir.clone(),
        dir.scratch_dir.clone(),
        dir.preexisting.0,
        dir.preexisting.1,
        limits.clone(),
    )
}

/// The message of a run stopped at its wall-time limit.
pub fn timed_out_message(limits: &Limits) -> String {
    format!(
        "the step ran past its wall-time limit of {}",
        humantime::format_duration(limits.wall_time)
    )
}

/// The message of a run stopped for what it wrote to disk.
pub fn disk_message(kind: LimitKind, msg: &str) -> String {
    format!("{msg} (limit `{kind}`); the step was stopped while writing")
}

/// What the guest's entry point returned.
pub type GuestExit = wasmtime::Result<i32>;

/// A prepared store plus the pipes and timers of one run.
pub struct Run {
    /// The store, ready to instantiate into.
    pub store: Store<StepState>,
    stdout: LimitedPipe,
    stderr: LimitedPipe,
    fuel: Option<u64>,
    started: Instant,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("fuel", &self.fuel)
            .finish_non_exhaustive()
    }
}

/// How a run ended, before outputs are collected.
#[derive(Debug)]
pub struct Ending {
    /// The status.
    pub status: Status,
    /// The exit code, when the guest exited.
    pub exit_code: Option<i32>,
    /// Why, in words (empty for success).
    pub message: String,
    /// stdout kept.
    pub stdout: bytes::Bytes,
    /// stderr kept.
    pub stderr: bytes::Bytes,
    /// Whether stdout passed its cap.
    pub stdout_truncated: bool,
    /// Whether stderr passed its cap.
    pub stderr_truncated: bool,
    /// Fuel used, when metered.
    pub fuel_consumed: Option<u64>,
    /// Highest total memory.
    pub peak_memory: u64,
    /// Time the guest ran.
    pub wall_time: Duration,
}

impl Run {
    /// Builds the store for `job` in `dir`: WASI context, limits, epoch callback. `mounts`
    /// replaces `dir.mounts` as the preopens when given (the `python-data` runtime's fixed set).
    pub fn new(
        engines: &Engines,
        engine: &wasmtime::Engine,
        job: &ValidJob,
        dir: &JobDir,
        mounts: Option<&[Mount]>,
        argv0: &str,
        listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    ) -> anyhow::Result<Run> {
        let parts = RunParts::of(job, dir, mounts, argv0);
        let watch = disk_watch(dir, &job.limits);
        Run::with_parts(
            engines,
            engine,
            &parts,
            &job.limits,
            job.job.stdin.clone(),
            Some(watch),
            listener,
        )
    }

    /// Builds the store from `parts` on `engine` (the one the entry to run was compiled on). With
    /// `watch`, and on an engine with epochs, the epoch callback enforces the wall time and the
    /// disk limits; without, whoever runs the store enforces them from outside (a worker's parent
    /// kills the process).
    pub fn with_parts(
        engines: &Engines,
        engine: &wasmtime::Engine,
        parts: &RunParts,
        limits: &Limits,
        stdin: bytes::Bytes,
        watch: Option<DiskWatch>,
        listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    ) -> anyhow::Result<Run> {
        let stdout = LimitedPipe::new(StreamKind::Stdout, limits.stdout_bytes, listener.clone());
        let stderr = LimitedPipe::new(StreamKind::Stderr, limits.stderr_bytes, listener);

        let fuel = limits.fuel.is_some();
        let interrupts = engines.interrupts(fuel);
        let mut b = WasiCtxBuilder::new();
        // The guest's file calls run on its own thread instead of hopping to tokio's blocking
        // pool and back (tens of microseconds per `stat`, which a step walking thousands of files
        // pays thousands of times). In a worker the thread is the guest's alone; in-process the
        // guest already holds its runtime thread for a whole epoch tick while it computes, and a
        // file call on a job's own regular files is far shorter. Set before the preopens: each
        // preopened directory takes the setting when it is added.
        b.allow_blocking_current_thread(true);
        b.stdin(MemoryInputPipe::new(stdin))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg(&parts.argv0)
            .args(&parts.args)
            .envs(&parts.env.iter().collect::<Vec<_>>())
            .initial_cwd(&parts.cwd)
            // No network of any kind: these are wasmtime-wasi's defaults, stated so they stay so.
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        for m in &parts.mounts {
            let perms = if m.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            b.preopened_dir(&m.host, &m.guest, perms)?;
        }
        if let Some(seed) = parts.deterministic {
            b.secure_random(rand::rngs::StdRng::seed_from_u64(seed))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1)))
                .insecure_random_seed(u128::from(seed))
                .wall_clock(FixedWallClock)
                .monotonic_clock(CountingClock::default());
        }

        let state = StepState {
            wasi: b.build_p1(),
            dirs: Default::default(),
            limiter: MemoryLimiter::new(limits.memory_bytes),
            deadline: Instant::now() + limits.wall_time,
            limits: limits.clone(),
            watch,
            stop: None,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        if let Some(fuel) = limits.fuel {
            store.set_fuel(fuel)?;
        }
        if interrupts {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|mut ctx| {
                let state = ctx.data_mut();
                if Instant::now() >= state.deadline {
                    state.stop = Some(Stop::WallTime);
                    return Ok(UpdateDeadline::Interrupt);
                }
                if let Some((kind, msg)) = state.watch.as_mut().and_then(DiskWatch::check) {
                    state.stop = Some(Stop::Disk(kind, msg));
                    return Ok(UpdateDeadline::Interrupt);
                }
                // Yield through tokio's `yield_now`, which defers the wake-up until the runtime
                // has polled its timers and I/O: other jobs, deadlines and cancellation (a
                // dropped future) get their turn once per tick even while this guest computes.
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            });
        }
        Ok(Run {
            store,
            stdout,
            stderr,
            fuel: limits.fuel,
            started: Instant::now(),
        })
    }

    /// Calls `f` with every new peak of the guest's memory, as it grows.
    pub fn on_memory_peak(&mut self, f: impl FnMut(u64) + Send + 'static) {
        self.store.data_mut().limiter.on_peak = Some(Box::new(f));
    }

    /// Restarts the wall clock: call right before the guest starts running.
    pub fn start_clock(&mut self, wall_time: Duration) {
        self.started = Instant::now();
        self.store.data_mut().deadline = self.started + wall_time;
    }

    /// Classifies how the guest ended. `exit` is `None` when the host's backstop timer fired
    /// (the guest was blocked in a host call past its wall time).
    pub fn finish(self, exit: Option<GuestExit>) -> Ending {
        let wall_time = self.started.elapsed();
        let fuel_consumed = self
            .fuel
            .map(|f| f.saturating_sub(self.store.get_fuel().unwrap_or(0)));
        let state = self.store.into_data();
        let limits = &state.limits;

        let (stdout_truncated, stderr_truncated) =
            (self.stdout.overflowed(), self.stderr.overflowed());
        let exit_code = match &exit {
            Some(Ok(code)) => Some(*code),
            Some(Err(e)) => e.downcast_ref::<I32Exit>().map(|e| e.0),
            None => None,
        };
        let trap = match &exit {
            Some(Err(e)) => e.downcast_ref::<Trap>().copied(),
            _ => None,
        };
        // Host-side signals first: they explain the trap or failure that followed them.
        let (status, message) = if matches!(state.stop, Some(Stop::WallTime)) || exit.is_none() {
            (Status::TimedOut, timed_out_message(limits))
        } else if stdout_truncated {
            (
                Status::OutputExceeded,
                format!("stdout exceeded its limit of {} bytes", limits.stdout_bytes),
            )
        } else if stderr_truncated {
            (
                Status::OutputExceeded,
                format!("stderr exceeded its limit of {} bytes", limits.stderr_bytes),
            )
        } else if let Some(Stop::Disk(kind, msg)) = &state.stop {
            (Status::OutputExceeded, disk_message(*kind, msg))
        } else if let Some(msg) = &state.limiter.refused {
            (Status::MemoryExceeded, msg.clone())
        } else if let Some(code) = exit_code {
            if code == 0 {
                (Status::Succeeded, String::new())
            } else {
                (Status::Failed, format!("the step exited with code {code}"))
            }
        } else if trap == Some(Trap::OutOfFuel) {
            (
                Status::FuelExhausted,
                format!(
                    "the step used its whole fuel budget of {}",
                    self.fuel.unwrap_or(0)
                ),
            )
        } else if trap == Some(Trap::Interrupt) {
            (
                Status::TimedOut,
                "the step was interrupted (cancelled)".to_string(),
            )
        } else if let Some(trap) = trap {
            (Status::Trapped, format!("the step trapped: {trap}"))
        } else {
            let e = match exit {
                Some(Err(e)) => e,
                _ => unreachable!("every other case has an exit code or a trap"),
            };
            // Not a wasm trap: a host function failed on the guest's behalf (or a guest that
            // panicked inside the runtime). Report it as a trap with the whole chain.
            (
                Status::Trapped,
                format!("the step stopped with an error: {e:#}"),
            )
        };
        Ending {
            status,
            exit_code,
            message,
            stdout: self.stdout.contents(),
            stderr: self.stderr.contents(),
            stdout_truncated,
            stderr_truncated,
            fuel_consumed,
            peak_memory: state.limiter.peak,
            wall_time,
        }
    }
}

/// Runs `guest` on `run`'s store with the wall-time backstop: if the guest is blocked in a host
/// call (sleeping, waiting on stdin) the epoch callback cannot fire, so a timer two ticks past the
/// limit drops the future, which stops the guest.
pub async fn with_backstop<F>(wall_time: Duration, guest: F) -> Option<GuestExit>
where
    F: std::future::Future<Output = GuestExit>,
{
    tokio::time::timeout(wall_time + 2 * EPOCH_TICK, guest)
        .await
        .ok()
}
