//! The wasmtime engines every run shares, their epoch ticker, and the compiled-artifact cache.
//!
//! Two engines: one with fuel metering and one without (fuel costs 1.35-1.6x on CPU-bound code, so
//! only runs that ask for fuel pay for it). Both use epoch interruption for wall time, ticked every
//! [`EPOCH_TICK`] by one background thread. Compiled artifacts of the built-in runtimes are
//! cached on disk in a private directory, keyed by the input's sha256, the wasmtime version and
//! the engine settings; only files this program wrote there are ever deserialised. The in-memory
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

    /// Compiles a core module from `wasm` (binary or WAT) whose sha256 is `digest`.
    pub fn module(
        &self,
        wasm: &[u8],
        digest: &[u8; 32],
        fuel: bool,
    ) -> anyhow::Result<Prepared<Module>> {
        let start = Instant::now();
        let m = Module::new(self.engine(fuel), wasm)?;
        Ok(Prepared {
            artifact: m,
            source: CacheSource::Compiled,
            duration: start.elapsed(),
            sha256: hex::encode(digest),
        })
    }

    /// A compiled component for `wasm` (whose sha256 is `digest`): when `persist` is set and a
    /// cache directory is configured, loaded from or written to disk; otherwise compiled.
    pub fn component(
        &self,
        wasm: &[u8],
        digest: &[u8; 32],
        fuel: bool,
        persist: bool,
    ) -> anyhow::Result<Prepared<Component>> {
        let engine = self.engine(fuel);
        let disk = match (&self.cache_dir, persist) {
            (Some(dir), true) => {
                Some(dir.join(format!("{}.cwasm", artifact_key(engine, digest, fuel, ""))))
            }
            _ => None,
        };
        cached(
            disk,
            digest,
            |path| load_own_artifact(engine, path),
            || Ok(engine.precompile_component(wasm)?),
            |bytes| deserialize_component(engine, bytes),
        )
    }
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
            return Ok(done(a, CacheSource::Disk));
        }
        _lock = Some(lock_artifact(path)?);
        if let Some(a) = load(path)? {
            return Ok(done(a, CacheSource::Disk));
        }
    }
    let bytes = compile()?;
    if let Some(path) = &disk
        && let Err(e) = write_private_file(path, &bytes)
    {
        // The cache is an optimisation: failing to write it must not fail the run.
        tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache a compiled artifact");
    }
    Ok(done(deserialize(&bytes)?, CacheSource::Compiled))
}

impl Engines {
    /// A compiled core module for `wasm` (whose sha256 is `digest`) on the engine for large
    /// modules ([`Engines::large_engine`]), loaded from or written to the disk cache when one is
    /// configured: the `python-data` runtime, ~160 MB, takes minutes to compile.
    pub fn module_persisted(
        &self,
        wasm: &[u8],
        digest: &[u8; 32],
        fuel: bool,
    ) -> anyhow::Result<Prepared<Module>> {
        let engine = self.large_engine(fuel);
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
                artifact_key(engine, digest, fuel, flavor)
            ))
        });
        cached(
            disk,
            digest,
            |path| {
                load_own(path, |path| {
                    // SAFETY: as for `load_own_artifact`.
                    #[allow(unsafe_code)]
                    Ok(unsafe { Module::deserialize_file(engine, path) }?)
                })
            },
            || Ok(engine.precompile_module(wasm)?),
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
    let mut tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(dir)?;
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
                            e.component(wasm, &digest, false, true).unwrap().source
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
    fn components_are_cached_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = sha256(&wasm);
        let engines = Engines::new(Some(cache.clone())).unwrap();
        assert_eq!(
            engines
                .component(&wasm, &digest, false, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
        // No memory cache here (the runtimes keep the linked entries): the next load is the disk's.
        assert_eq!(
            engines
                .component(&wasm, &digest, false, true)
                .unwrap()
                .source,
            CacheSource::Disk
        );
        // Not persisted: compiled every time.
        assert_eq!(
            engines
                .component(&wasm, &digest, false, false)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
        // The metered engine is a different configuration: a separate artifact.
        assert_eq!(
            engines
                .component(&wasm, &digest, true, true)
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
                .component(&wasm, &digest, false, true)
                .unwrap()
                .source,
            CacheSource::Disk
        );
    }

    #[test]
    fn artifacts_others_could_have_written_are_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = sha256(&wasm);
        let engines = Engines::new(Some(cache.clone())).unwrap();
        engines.component(&wasm, &digest, false, true).unwrap();
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
                .component(&wasm, &digest, false, true)
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
                .component(&wasm, &digest, false, true)
                .unwrap()
                .source,
            CacheSource::Compiled
        );
    }
}
