//! The wasmtime engines every run shares, their epoch ticker, and the compiled-artifact cache.
//!
//! Two engines: one with fuel metering and one without (fuel costs 1.35-1.6x on CPU-bound code, so
//! only runs that ask for fuel pay for it). Both use epoch interruption for wall time, ticked every
//! [`EPOCH_TICK`] by one background thread. Compiled artifacts of the built-in runtimes are
//! cached on disk in a private directory, keyed by the input's sha256, the wasmtime version and
//! the engine settings; only files this program wrote there are ever deserialised. Compiling a
//! runtime prunes the artifacts no load has used lately down to [`RUNTIME_CACHE_BYTES`] and
//! [`RUNTIME_CACHE_ENTRIES`] (an upgrade leaves the old ones behind). The in-memory
//! cache is the runtimes' ([`crate::sandbox::runtime`]), so a program is hashed once.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, Module, OptLevel};

pub use crate::job::outcome::CacheSource;

/// How often the epoch advances: the precision of wall-time limits and of the disk watch.
/// 10 ms keeps the ticker's own cost negligible while stopping a runaway step promptly.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Host stack a guest may use. CPython's C code recurses (deeply nested JSON, regexes), and
/// wasmtime's 512 KiB default turns Python-level `RecursionError`s into stack-overflow traps.
const MAX_WASM_STACK: usize = 4 << 20;

/// Bumped whenever the engine settings below change, so stale disk artifacts are never reused.
const ENGINE_SETTINGS_VERSION: &str = "stepbox-engine-1";

/// The wasmtime version this build links (kept equal to the `=48.0.8` pin in Cargo.toml; a test
/// checks Cargo.lock). Part of every cache key and of run manifests.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// A compiled module or component and how long it took to get it.
#[derive(Clone, Debug)]
pub struct Prepared<T> {
    /// The compiled artifact.
    pub artifact: T,
    /// Where it came from.
    pub source: CacheSource,
    /// Time spent compiling or loading it for this run.
    pub duration: Duration,
    /// Hex sha256 of the input it was compiled from.
    pub sha256: String,
}

/// How a run without fuel is stopped at its wall time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    /// Epoch checks compiled into the guest, ticked by a background thread: the guest can be
    /// stopped in this process, at a cost of about a quarter more instructions on Python code.
    Epochs,
    /// No checks in the guest code: its process is killed from outside. Only for a worker
    /// process ([`crate::sandbox::worker`]), whose parent enforces wall time and disk limits.
    External,
}

/// Both engines, the ticker that drives their epochs, and the on-disk artifact cache. The one
/// in-memory cache of compiled code is the runtimes' (linked, ready to instantiate).
pub struct Engines {
    unmetered: Engine,
    metered: Engine,
    /// With [`Interruption::External`] only: the engine for very large modules (the
    /// `python-data` snapshot, ~160 MB), without Cranelift inlining, which takes tens of GB of
    /// memory on such a module.
    large: Option<Engine>,
    interruption: Interruption,
    cache_dir: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

fn engine_config(fuel: bool, interruption: Interruption) -> Config {
    engine_config_inlining(fuel, interruption, true)
}

fn engine_config_inlining(fuel: bool, interruption: Interruption, inlining: bool) -> Config {
    let mut config = Config::new();
    // A metered run keeps its epochs: fuel is counted in the guest, so it stays in-process.
    let epochs = fuel || interruption == Interruption::Epochs;
    config
        .epoch_interruption(epochs)
        .consume_fuel(fuel)
        .cranelift_opt_level(OptLevel::Speed)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + (1 << 20));
    if !epochs && inlining {
        // About a tenth fewer instructions on the Python runtime (counted with cachegrind);
        // compiling takes longer, once per cache. (`table_lazy_init(false)` saved another 3%
        // but initialising CPython's function table eagerly added ~1 ms to every instantiation.)
        config.compiler_inlining(wasmtime::Inlining::Yes);
    }
    config
}

impl Engines {
    /// Builds both engines and starts the epoch ticker. `cache_dir` holds compiled runtime
    /// components across processes; `None` keeps them in memory only.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Engines> {
        Engines::with_interruption(cache_dir, Interruption::Epochs)
    }

    /// Builds both engines; runs without fuel are stopped as `interruption` says.
    pub fn with_interruption(
        cache_dir: Option<PathBuf>,
        interruption: Interruption,
    ) -> anyhow::Result<Engines> {
        let unmetered = Engine::new(&engine_config(false, interruption))
            .map_err(anyhow::Error::from)
            .context("failed to create the wasmtime engine")?;
        let metered = Engine::new(&engine_config(true, interruption))
            .map_err(anyhow::Error::from)
            .context("failed to create the metered wasmtime engine")?;
        let large = match interruption {
            Interruption::Epochs => None,
            Interruption::External => Some(
                Engine::new(&engine_config_inlining(false, interruption, false))
                    .map_err(anyhow::Error::from)
                    .context("failed to create the wasmtime engine for large modules")?,
            ),
        };
        if let Some(dir) = &cache_dir {
            prepare_private_dir(dir)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (a, b, stop) = (unmetered.weak(), metered.weak(), stop.clone());
            std::thread::Builder::new()
                .name("stepbox-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        for e in [&a, &b] {
                            if let Some(e) = e.upgrade() {
                                e.increment_epoch();
                            }
                        }
                    }
                })
                .context("failed to start the epoch ticker thread")?
        };
        Ok(Engines {
            unmetered,
            metered,
            large,
            interruption,
            cache_dir,
            stop,
            ticker: Some(ticker),
        })
    }

    /// The engine for runs with (`true`) or without fuel metering.
    pub fn engine(&self, fuel: bool) -> &Engine {
        if fuel { &self.metered } else { &self.unmetered }
    }

    /// The engine for a very large module (`python-data`): the unmetered engine without
    /// inlining in a worker process, else the same as [`Engines::engine`].
    pub fn large_engine(&self, fuel: bool) -> &Engine {
        match (&self.large, fuel) {
            (Some(large), false) => large,
            _ => self.engine(fuel),
        }
    }

    /// Whether runs on the engine for `fuel` are interrupted in-process (epochs).
    pub fn interrupts(&self, fuel: bool) -> bool {
        fuel || self.interruption == Interruption::Epochs
    }

    /// The directory holding compiled artifacts, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// A caller's core module (a wasm step) whose sha256 is `digest`, compiled, or loaded from
    /// the program cache ([`Engines::program`]).
    pub fn module(
        &self,
        wasm: &[u8],
        digest: &[u8; 32],
        fuel: bool,
    ) -> anyhow::Result<Prepared<Module>> {
        let engine = self.engine(fuel);
        self.program(
            wasm.len(),
            &artifact_key(engine, digest, fuel, "program"),
            digest,
            || Ok(engine.precompile_module(wasm)?),
            |path| {
                load_own(path, |path| {
                    // SAFETY: as for `load_own_artifact`.
                    #[allow(unsafe_code)]
                    Ok(unsafe { Module::deserialize_file(engine, path) }?)
                })
            },
            |bytes| deserialize_module(engine, bytes),
        )
    }

    /// A caller's component (a wasm step) whose sha256 is `digest`, compiled, or loaded from
    /// the program cache ([`Engines::program`]).
    pub fn program_component(
        &self,
        wasm: &[u8],
        digest: &[u8; 32],
        fuel: bool,
    ) -> anyhow::Result<Prepared<Component>> {
        let engine = self.engine(fuel);
        self.program(
            wasm.len(),
            &artifact_key(engine, digest, fuel, "program"),
            digest,
            || Ok(engine.precompile_component(wasm)?),
            |path| load_own_artifact(engine, path),
            |bytes| deserialize_component(engine, bytes),
        )
    }

    /// Compiles a caller's program, or loads it from `<cache>/programs/<key>.cwasm`. A program
    /// of at least [`PROGRAM_CACHE_MIN_BYTES`] is written there once compiled, so that the next
    /// process that runs it (a sandbox worker, a later `stepbox run`) maps it instead of compiling
    /// again (a 21 MB CPython module: 13 s each time here). The directory is kept to
    /// [`PROGRAM_CACHE_BYTES`] and [`PROGRAM_CACHE_ENTRIES`], least recently used (to the hour:
    /// [`renew`]) out first. Failing to write or prune it never fails a run.
    fn program<T>(
        &self,
        size: usize,
        key: &str,
        digest: &[u8; 32],
        compile: impl FnOnce() -> anyhow::Result<Vec<u8>>,
        load: impl Fn(&Path) -> anyhow::Result<Option<T>>,
        deserialize: impl FnOnce(&[u8]) -> anyhow::Result<T>,
    ) -> anyhow::Result<Prepared<T>> {
        let start = Instant::now();
        let done = |artifact: T, source: CacheSource| Prepared {
            artifact,
            source,
            duration: start.elapsed(),
            sha256: hex::encode(digest),
        };
        let dir = self
            .cache_dir
            .as_ref()
            .filter(|_| size >= PROGRAM_CACHE_MIN_BYTES)
            .map(|d| d.join("programs"));
        let path = dir.as_ref().map(|d| d.join(format!("{key}.cwasm")));
        if let Some(path) = &path
            && let Some(a) = load(path)?
        {
            renew(path);
            return Ok(done(a, CacheSource::Disk));
        }
        let bytes = compile()?;
        if let (Some(dir), Some(path)) = (&dir, &path) {
            let kept = prepare_private_dir(dir)
                .and_then(|()| write_private_file(path, &bytes))
                .and_then(|()| prune_lru(dir, PROGRAM_CACHE_BYTES, PROGRAM_CACHE_ENTRIES));
            if let Err(e) = kept {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache a compiled program");
            }
        }
        Ok(done(deserialize(&bytes)?, CacheSource::Compiled))
    }

    /// A compiled component for `wasm`: when `persist` is set and a cache directory is
    /// configured, loaded from or written to disk; otherwise compiled.
    pub fn component(
        &self,
        wasm: Wasm<'_>,
        fuel: bool,
        persist: bool,
    ) -> anyhow::Result<Prepared<Component>> {
        let engine = self.engine(fuel);
        let (digest, bytes) = self.identify(wasm)?;
        let disk = match (&self.cache_dir, persist) {
            (Some(dir), true) => {
                Some(dir.join(format!("{}.cwasm", artifact_key(engine, &digest, fuel, ""))))
            }
            _ => None,
        };
        cached(
            disk,
            &digest,
            |path| load_own_artifact(engine, path),
            || Ok(engine.precompile_component(&bytes.get(&digest)?)?),
            |bytes| deserialize_component(engine, bytes),
        )
    }

    /// The sha256 of `wasm`, and a way to its bytes. A file's digest is remembered in the cache
    /// directory under the file's identity (device, inode, size, modification and change times),
    /// so a file that has not changed is not read again when its artifact is in the cache: the
    /// Python component is 63 MB and `python-data` 160 MB, ~0.1-0.25 s to read and hash for
    /// every process (every sandbox worker) that loads them.
    fn identify<'a>(&self, wasm: Wasm<'a>) -> anyhow::Result<([u8; 32], Bytes<'a>)> {
        let path = match wasm {
            Wasm::Bytes(b, digest) => return Ok((digest, Bytes::Here(b))),
            Wasm::File(path) => path,
        };
        let read = || read_runtime_file(path);
        let Some(memo) = self
            .cache_dir
            .as_ref()
            .and_then(|dir| digest_memo(dir, path))
        else {
            let bytes = read()?;
            return Ok((crate::job::digest::sha256(&bytes), Bytes::Read(bytes)));
        };
        if let Some(digest) = load_digest(&memo) {
            return Ok((digest, Bytes::Later(path)));
        }
        let bytes = read()?;
        let digest = crate::job::digest::sha256(&bytes);
        if let Some(dir) = memo.parent()
            && let Err(e) = prepare_private_dir(dir)
                .and_then(|()| write_private_file(&memo, hex::encode(digest).as_bytes()))
        {
            tracing::warn!(path = %memo.display(), error = %format!("{e:#}"), "could not remember a file's digest");
        }
        Ok((digest, Bytes::Read(bytes)))
    }
}

/// A program to compile.
#[derive(Clone, Copy, Debug)]
pub enum Wasm<'a> {
    /// Bytes in memory, with their sha256.
    Bytes(&'a [u8], [u8; 32]),
    /// A file (a runtime): its sha256 is remembered in the cache directory by the file's identity.
    File(&'a Path),
}

/// The bytes of a [`Wasm`], read only when they are needed (to compile).
enum Bytes<'a> {
    Here(&'a [u8]),
    Read(Vec<u8>),
    Later(&'a Path),
}

impl Bytes<'_> {
    /// The bytes, checked against `digest` when they are read now.
    fn get(&self, digest: &[u8; 32]) -> anyhow::Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match self {
            Bytes::Here(b) => (*b).into(),
            Bytes::Read(b) => b.as_slice().into(),
            Bytes::Later(path) => {
                let b = read_runtime_file(path)?;
                if crate::job::digest::sha256(&b) != *digest {
                    bail!(
                        "`{}` changed while it was being loaded: try again",
                        path.display()
                    );
                }
                b.into()
            }
        })
    }
}

#[cfg(test)]
thread_local! {
    /// Runtime files read by this thread, for the tests of the digest memo.
    static FILE_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn read_runtime_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    #[cfg(test)]
    FILE_READS.with(|n| n.set(n.get() + 1));
    fs::read(path).with_context(|| format!("failed to read `{}`", path.display()))
}

/// Where the digest of the file at `path` is remembered: a name made of the file's identity.
/// `None` when the file cannot be inspected (reading it will say why).
fn digest_memo(cache_dir: &Path, path: &Path) -> Option<PathBuf> {
    let m = fs::metadata(path).ok()?;
    let identity = format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    Some(
        cache_dir
            .join("digests")
            .join(hex::encode(crate::job::digest::sha256(identity.as_bytes()))),
    )
}

/// A remembered digest, if the file is one this program wrote and holds one.
fn load_digest(memo: &Path) -> Option<[u8; 32]> {
    let text = load_own(memo, |p| Ok(fs::read_to_string(p)?)).ok()??;
    hex::decode(text.trim()).ok()?.try_into().ok()
}

/// The artifact at `disk` when this program wrote it there, else `compile`d (and written there).
/// One compile per artifact across processes: whoever holds the lock beside it compiles, the
/// others wait and then load what it wrote.
fn cached<T>(
    disk: Option<PathBuf>,
    digest: &[u8; 32],
    load: impl Fn(&Path) -> anyhow::Result<Option<T>>,
    compile: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    deserialize: impl FnOnce(&[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<Prepared<T>> {
    let start = Instant::now();
    let done = |artifact: T, source: CacheSource| Prepared {
        artifact,
        source,
        duration: start.elapsed(),
        sha256: hex::encode(digest),
    };
    let mut _lock = None;
    if let Some(path) = &disk {
        if let Some(a) = load(path)? {
            renew(path);
            return Ok(done(a, CacheSource::Disk));
        }
        _lock = Some(lock_artifact(path)?);
        if let Some(a) = load(path)? {
            renew(path);
            return Ok(done(a, CacheSource::Disk));
        }
    }
    let bytes = compile()?;
    if let Some(path) = &disk {
        // The cache is an optimisation: failing to write or prune it must not fail the run.
        if let Err(e) = write_private_file(path, &bytes) {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache a compiled artifact");
        } else if let Some(dir) = path.parent()
            && let Err(e) = prune_lru(dir, RUNTIME_CACHE_BYTES, RUNTIME_CACHE_ENTRIES)
        {
            tracing::warn!(dir = %dir.display(), error = %format!("{e:#}"), "could not prune the artifact cache");
        }
    }
    Ok(done(deserialize(&bytes)?, CacheSource::Compiled))
}

impl Engines {
    /// A compiled core module for `wasm` (whose sha256 is `digest`) on the engine for large
    /// modules ([`Engines::large_engine`]), loaded from or written to the disk cache when one is
    /// configured: the `python-data` runtime, ~160 MB, takes minutes to compile.
    pub fn module_persisted(&self, wasm: Wasm<'_>, fuel: bool) -> anyhow::Result<Prepared<Module>> {
        let engine = self.large_engine(fuel);
        let (digest, bytes) = self.identify(wasm)?;
        // The large engine differs from the others by a setting the compatibility hash may not
        // cover (inlining): its artifacts get keys of their own.
        let flavor = if self.large.is_some() && !fuel {
            "large"
        } else {
            ""
        };
        let disk = self.cache_dir.as_ref().map(|dir| {
            dir.join(format!(
                "{}.cwasm",
                artifact_key(engine, &digest, fuel, flavor)
            ))
        });
        cached(
            disk,
            &digest,
            |path| {
                load_own(path, |path| {
                    // SAFETY: as for `load_own_artifact`.
                    #[allow(unsafe_code)]
                    Ok(unsafe { Module::deserialize_file(engine, path) }?)
                })
            },
            || Ok(engine.precompile_module(&bytes.get(&digest)?)?),
            |bytes| deserialize_module(engine, bytes),
        )
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

/// The engine string recorded in run manifests.
pub fn engine_name() -> String {
    format!("wasmtime {WASMTIME_VERSION}")
}

/// The cache file name: the input's digest plus everything that makes an artifact incompatible.
fn artifact_key(engine: &Engine, digest: &[u8; 32], fuel: bool, flavor: &str) -> String {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let mut h = Sha256::new();
    h.update(digest);
    h.update(WASMTIME_VERSION.as_bytes());
    h.update(ENGINE_SETTINGS_VERSION.as_bytes());
    h.update([u8::from(fuel)]);
    h.update(compat.finish().to_le_bytes());
    if !flavor.is_empty() {
        h.update(flavor.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Caller programs (wasm steps) of at least this many bytes are kept in the program cache;
/// smaller ones compile in milliseconds.
pub const PROGRAM_CACHE_MIN_BYTES: usize = 64 << 10;
/// Most bytes of compiled caller programs kept in `<cache>/programs`.
pub const PROGRAM_CACHE_BYTES: u64 = 1 << 30;
/// Most compiled caller programs kept in `<cache>/programs`.
pub const PROGRAM_CACHE_ENTRIES: usize = 1024;

/// Most bytes of compiled runtimes (the Python and JavaScript components, `python-data`) kept at
/// the top of the cache directory. Each build of the runtimes or of wasmtime, and each engine
/// setting, makes new artifacts (the two `python-data` ones are ~380 MB); those of an upgraded
/// installation are never loaded again, so without a budget the directory only grows. The live
/// set is about 1 GB (both engines of every runtime).
pub const RUNTIME_CACHE_BYTES: u64 = 4 << 30;
/// Most compiled runtimes kept at the top of the cache directory (the live set is at most 8).
pub const RUNTIME_CACHE_ENTRIES: usize = 32;

/// A load renews an artifact's modification time (its place in [`prune_lru`]'s order) when it is
/// older than this: an artifact in use is renewed at most once an hour, not by every process.
const RENEW_AFTER: Duration = Duration::from_secs(3600);

/// The name prefix of an artifact being written ([`write_private_file`]).
const PARTIAL: &str = ".partial-";

/// A partial write this old was abandoned (writing one takes seconds).
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Marks the artifact at `path` as recently used. Best effort: a read-only cache still works.
fn renew(path: &Path) {
    let now = std::time::SystemTime::now();
    let stale = fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > RENEW_AFTER));
    if stale {
        let _ = fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(now));
    }
}

/// Removes the least recently used artifacts of `dir` (by modification time, which a load
/// renews) and their lock files until at most `max_bytes` and `max_entries` are left, and
/// partial writes abandoned over an hour ago.
/// Processes that have an artifact mapped keep it: removing the name does not unmap it.
fn prune_lru(dir: &Path, max_bytes: u64, max_entries: usize) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        let is_artifact = e.path().extension().is_some_and(|x| x == "cwasm");
        if meta.is_file() && is_artifact {
            entries.push((meta.modified()?, meta.len(), e.path()));
        }
        // A write that never finished (its process was killed: a worker past its wall time, a
        // server stopped): hundreds of MB that no rename will ever claim.
        let abandoned = meta
            .modified()?
            .elapsed()
            .is_ok_and(|age| age > ABANDONED_AFTER);
        if meta.is_file() && e.file_name().to_string_lossy().starts_with(PARTIAL) && abandoned {
            let _ = fs::remove_file(e.path());
        }
    }
    entries.sort();
    let mut bytes: u64 = entries.iter().map(|e| e.1).sum();
    let mut count = entries.len();
    for (_, len, path) in entries {
        if bytes <= max_bytes && count <= max_entries {
            break;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            // Another process pruned it first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let _ = fs::remove_file(path.with_extension("lock"));
        bytes -= len;
        count -= 1;
    }
    Ok(())
}

/// Takes the exclusive lock of the artifact at `path` (a `.lock` file beside it), waiting for a
/// process that holds it: on a cold cache, several processes starting at once (the workers of
/// several `stepbox run`s, a test suite) compile each artifact once instead of all together.
fn lock_artifact(path: &Path) -> anyhow::Result<fs::File> {
    let lock = path.with_extension("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock)
        .with_context(|| format!("failed to open the cache lock `{}`", lock.display()))?;
    file.lock()
        .with_context(|| format!("failed to lock `{}`", lock.display()))?;
    Ok(file)
}

/// Creates `dir` (mode 0700) if needed and checks that only we can write to it.
fn prepare_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("failed to create cache directory `{}`", dir.display()))?;
    let meta = fs::symlink_metadata(dir)
        .with_context(|| format!("failed to inspect `{}`", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "cache directory `{}` is not a directory (symlinks are refused)",
            dir.display()
        );
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        bail!(
            "cache directory `{}` belongs to another user: use a directory of your own",
            dir.display()
        );
    }
    if meta.mode() & 0o022 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| {
            format!(
                "cache directory `{}` is writable by others and could not be fixed",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file + rename) with mode 0600.
fn write_private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("cache path has no parent")?;
    let mut tmp = tempfile::Builder::new().prefix(PARTIAL).tempfile_in(dir)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o600))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

/// Loads an artifact only if it is a regular file we own that nobody else can write: anything
/// else in the cache directory is ignored (and recompiled over), never deserialised.
fn load_own_artifact(engine: &Engine, path: &Path) -> anyhow::Result<Option<Component>> {
    load_own(path, |path| {
        // SAFETY: `path` is a file of our private cache directory that passed `load_own`'s
        // ownership and mode checks, i.e. one this program wrote (and only ever replaces by
        // rename, never in place, so the mapping stays valid). wasmtime checks version and settings.
        #[allow(unsafe_code)]
        Ok(unsafe { Component::deserialize_file(engine, path) }?)
    })
}

/// [`load_own_artifact`] for any kind of artifact `deserialize` makes.
fn load_own<T>(
    path: &Path,
    deserialize: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file()
        || meta.uid() != rustix::process::geteuid().as_raw()
        || meta.mode() & 0o022 != 0
    {
        tracing::warn!(path = %path.display(), "ignoring a cached artifact this program did not write");
        return Ok(None);
    }
    // Mapped, not read: the code pages are shared with every other process (sandbox workers)
    // that maps the same file, and loading does not copy tens of megabytes.
    match deserialize(path) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "recompiling over an unusable cached artifact");
            Ok(None)
        }
    }
}

#[allow(unsafe_code)]
fn deserialize_component(engine: &Engine, bytes: &[u8]) -> anyhow::Result<Component> {
    // SAFETY: `bytes` is either the output of `precompile_component` on this engine just now, or a
    // file in our private cache directory that passed `load_own_artifact`'s ownership and mode
    // checks, i.e. one this program wrote. wasmtime additionally checks the version and settings.
    Ok(unsafe { Component::deserialize(engine, bytes) }?)
}

#[allow(unsafe_code)]
fn deserialize_module(engine: &Engine, bytes: &[u8]) -> anyhow::Result<Module> {
    // SAFETY: as for `deserialize_component`: our own `precompile_module` output, or a file of
    // our private cache directory that passed `load_own`'s ownership and mode checks.
    Ok(unsafe { Module::deserialize(engine, bytes) }?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::digest::sha256;

    const WAT: &str = r#"(component (core module (func (export "f"))))"#;

    #[test]
    fn wasmtime_version_matches_the_lock_file() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let needle = format!("name = \"wasmtime\"\nversion = \"{WASMTIME_VERSION}\"");
        assert!(
            lock.contains(&needle),
            "Cargo.lock does not pin wasmtime {WASMTIME_VERSION}"
        );
    }

    #[test]
    fn processes_starting_at_once_compile_an_artifact_once() {
        // Separate `Engines` stand for separate processes sharing one cache directory (the lock
        // is a file lock, which excludes other open files in this process too). Two at once on
        // the engine with epochs and the one without alike: exactly one compiles.
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = sha256(&wasm);
        for interruption in [Interruption::Epochs, Interruption::External] {
            let sources: Vec<CacheSource> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..4)
                    .map(|_| {
                        let (wasm, cache) = (&wasm, cache.clone());
                        s.spawn(move || {
                            let e = Engines::with_interruption(Some(cache), interruption).unwrap();
                            e.component(Wasm::Bytes(wasm, digest), false, true)
                                .unwrap()
                                .source
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            let compiled = sources
                .iter()
                .filter(|s| **s == CacheSource::Compiled)
                .count();
            assert_eq!(compiled, 1, "{interruption:?}: {sources:?}");
        }
    }

    #[test]
    fn a_runtime_file_is_read_again_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let file = dir.path().join("runtime.wasm");
        let wasm = wat::parse_str(WAT).unwrap();
        fs::write(&file, &wasm).unwrap();
        let engines = Engines::new(Some(cache.clone())).unwrap();
        let first = engines.component(Wasm::File(&file), false, true).unwrap();
        assert_eq!(first.source, CacheSource::Compiled);
        assert_eq!(first.sha256, hex::encode(sha256(&wasm)));
        let memo = digest_memo(&cache, &file).unwrap();
        assert_eq!(fs::read_to_string(&memo).unwrap(), first.sha256);
        assert_eq!(FILE_READS.with(|n| n.get()), 1);
        // Unchanged: the digest comes from the memo and the artifact from the disk, so the file
        // is not read at all.
        let again = engines.component(Wasm::File(&file), false, true).unwrap();
        assert_eq!(
            (again.source, &again.sha256),
            (CacheSource::Disk, &first.sha256)
        );
        assert_eq!(FILE_READS.with(|n| n.get()), 1, "read again");
        // Changed (another program, same size): a new identity, so it is read and hashed again.
        let other = wat::parse_str(WAT.replace("\"f\"", "\"g\"")).unwrap();
        assert_eq!(other.len(), wasm.len());
        fs::write(&file, &other).unwrap();
        let changed = engines.component(Wasm::File(&file), false, true).unwrap();
        assert_eq!(changed.sha256, hex::encode(sha256(&other)));
        assert_eq!(changed.source, CacheSource::Compiled);
        assert_eq!(FILE_READS.with(|n| n.get()), 2);
        // A memo this program did not write (writable by others) is not believed.
        let memo = digest_memo(&cache, &file).unwrap();
        fs::write(&memo, hex::encode([0u8; 32])).unwrap();
        fs::set_permissions(&memo, fs::Permissions::from_mode(0o666)).unwrap();
        let distrusted = engines.component(Wasm::File(&file), false, true).unwrap();
        assert_eq!(distrusted.sha256, hex::encode(sha256(&other)));
    }

    /// A module of `bytes` bytes (most of it a data segment) with a `_start`.
    fn module_of(bytes: usize) -> Vec<u8> {
        let data = "a".repeat(bytes);
        wat::parse_str(format!(
            r#"(module (memory 2) (data (i32.const 0) "{data}") (func (export "_start")))"#
        ))
        .unwrap()
    }

    #[test]
    fn big_caller_programs_are_compiled_once_per_cache_small_ones_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let big = module_of(PROGRAM_CACHE_MIN_BYTES);
        let small = module_of(100);
        let load = |wasm: &[u8]| {
            let engines = Engines::new(Some(cache.clone())).unwrap();
            let m = engines.module(wasm, &sha256(wasm), false).unwrap();
            assert!(m.artifact.get_export("_start").is_some());
            m.source
        };
        // Each `Engines` is a new process's worth: nothing is shared but the directory.
        assert_eq!(load(&big), CacheSource::Compiled);
        assert_eq!(load(&big), CacheSource::Disk);
        assert_eq!(load(&small), CacheSource::Compiled);
        assert_eq!(load(&small), CacheSource::Compiled);
        let kept: Vec<_> = fs::read_dir(cache.join("programs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        // The metered engine is another configuration: its own artifact.
        let engines = Engines::new(Some(cache.clone())).unwrap();
        let metered = engines.module(&big, &sha256(&big), true).unwrap();
        assert_eq!(metered.source, CacheSource::Compiled);
        // Components go the same way.
        let component = wat::parse_str(WAT).unwrap();
        let c = engines
            .program_component(&component, &sha256(&component), false)
            .unwrap();
        assert_eq!(c.source, CacheSource::Compiled);
        // Without a cache directory nothing is kept anywhere.
        let engines = Engines::new(None).unwrap();
        let m = engines.module(&big, &sha256(&big), false).unwrap();
        assert_eq!(m.source, CacheSource::Compiled);
    }

    #[test]
    fn the_program_cache_keeps_the_most_recently_used_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let put = |name: &str, len: usize, age_s: u64| {
            let p = dir.path().join(name);
            fs::write(&p, vec![0u8; len]).unwrap();
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(now - Duration::from_secs(age_s))
                .unwrap();
        };
        put("old.cwasm", 400, 30);
        put("old.lock", 0, 30);
        put("mid.cwasm", 400, 20);
        put("new.cwasm", 400, 10);
        put("notes.txt", 10_000, 40);
        put(".partial-abandoned", 10_000, 7200);
        put(".partial-being-written", 10_000, 5);
        let names = || {
            let mut v: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        // Within budget: no artifact goes; an abandoned partial write does.
        prune_lru(dir.path(), 1200, 3).unwrap();
        assert_eq!(
            names(),
            [
                ".partial-being-written",
                "mid.cwasm",
                "new.cwasm",
                "notes.txt",
                "old.cwasm",
                "old.lock"
            ]
        );
        // Over the byte budget: the oldest artifact and its lock go (other files are not counted).
        prune_lru(dir.path(), 1000, 3).unwrap();
        assert_eq!(
            names(),
            [
                ".partial-being-written",
                "mid.cwasm",
                "new.cwasm",
                "notes.txt"
            ]
        );
        // Over the entry budget.
        prune_lru(dir.path(), 1000, 1).unwrap();
        assert_eq!(
            names(),
            [".partial-being-written", "new.cwasm", "notes.txt"]
        );
    }

    #[test]
    fn components_are_cached_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = sha256(&wasm);
        let engines = Engines::new(Some(cache.clone())).unwrap();
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
        // No memory cache here (the runtimes keep the linked entries): the next load is the disk's.
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, true)
                .unwrap()
                .source,
            CacheSource::Disk
        );
        // Not persisted: compiled every time.
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, false)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
        // The metered engine is a different configuration: a separate artifact.
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), true, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
        let artifacts = fs::read_dir(&cache)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "cwasm")
            })
            .count();
        assert_eq!(artifacts, 2);
        drop(engines);

        let engines = Engines::new(Some(cache.clone())).unwrap();
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, true)
                .unwrap()
                .source,
            CacheSource::Disk
        );
    }

    /// Sets the modification time of `path` to `age` ago.
    fn age(path: &Path, age: Duration) {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - age)
            .unwrap();
    }

    #[test]
    fn compiling_a_runtime_prunes_artifacts_no_installation_loads_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        prepare_private_dir(&cache).unwrap();
        // What earlier builds left: a full budget of artifacts, the oldest first.
        let stale: Vec<PathBuf> = (0..RUNTIME_CACHE_ENTRIES)
            .map(|i| {
                let p = cache.join(format!("stale-{i:02}.cwasm"));
                write_private_file(&p, b"old code").unwrap();
                fs::write(p.with_extension("lock"), b"").unwrap();
                age(&p, Duration::from_secs(86_400 * 30 - i as u64 * 60));
                p
            })
            .collect();
        // A program in the program cache is on another budget.
        let program = cache.join("programs").join("p.cwasm");
        prepare_private_dir(program.parent().unwrap()).unwrap();
        write_private_file(&program, b"a program").unwrap();
        age(&program, Duration::from_secs(86_400 * 60));

        let wasm = wat::parse_str(WAT).unwrap();
        let engines = Engines::new(Some(cache.clone())).unwrap();
        let c = engines
            .component(Wasm::Bytes(&wasm, sha256(&wasm)), false, true)
            .unwrap();
        assert_eq!(c.source, CacheSource::Compiled);
        // One over the budget: the least recently used one and its lock went, nothing else.
        assert!(!stale[0].exists() && !stale[0].with_extension("lock").exists());
        assert!(stale[1..].iter().all(|p| p.exists()));
        assert!(stale[1].with_extension("lock").exists());
        assert!(program.exists());
        let artifacts = fs::read_dir(&cache)
            .unwrap()
            .filter(|e| {
                let p = e.as_ref().unwrap().path();
                p.is_file() && p.extension().is_some_and(|x| x == "cwasm")
            })
            .count();
        assert_eq!(artifacts, RUNTIME_CACHE_ENTRIES);
        // A load from the disk renews what it loads (once it is older than an hour), so the
        // artifacts in use are the last to go.
        let path = cache.join(format!(
            "{}.cwasm",
            artifact_key(engines.engine(false), &sha256(&wasm), false, "")
        ));
        age(&path, Duration::from_secs(7200));
        let c = engines
            .component(Wasm::Bytes(&wasm, sha256(&wasm)), false, true)
            .unwrap();
        assert_eq!(c.source, CacheSource::Disk);
        let age_now = |p: &Path| {
            std::time::SystemTime::now()
                .duration_since(fs::metadata(p).unwrap().modified().unwrap())
                .unwrap_or_default()
        };
        assert!(age_now(&path) < Duration::from_secs(600));
        // Recently renewed: not written again by the next load.
        age(&path, Duration::from_secs(1800));
        engines
            .component(Wasm::Bytes(&wasm, sha256(&wasm)), false, true)
            .unwrap();
        assert!(age_now(&path) > Duration::from_secs(1700));
    }

    #[test]
    fn artifacts_others_could_have_written_are_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = sha256(&wasm);
        let engines = Engines::new(Some(cache.clone())).unwrap();
        engines
            .component(Wasm::Bytes(&wasm, digest), false, true)
            .unwrap();
        let file = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        drop(engines);
        let engines = Engines::new(Some(cache.clone())).unwrap();
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );

        // Garbage in place of an artifact is recompiled over, not trusted.
        drop(engines);
        fs::write(&file, b"not an artifact").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let engines = Engines::new(Some(cache)).unwrap();
        assert_eq!(
            engines
                .component(Wasm::Bytes(&wasm, digest), false, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
    }
}
