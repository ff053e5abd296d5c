//! The Python runtime: real CPython semantics for argv, stdin, env, exit codes and tracebacks.

use stepbox::Status;

use crate::common::*;

#[tokio::test]
async fn hello_world_succeeds_with_exact_stdout() {
    let r = run(py("print('hello, world')")).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "hello, world\n");
    assert_eq!(r.exit_code, Some(0));
    assert!(r.message.is_empty());
    assert!(r.usage.peak_memory_bytes > 0);
}

#[tokio::test]
async fn argv_stdin_env_and_cwd_come_from_the_job() {
    let mut job = py(
        "import sys, os\nprint(sys.argv)\nprint(sys.stdin.read().upper())\nprint(os.environ.get('MODE'), os.environ.get('LANG'))\nprint(os.getcwd())\nprint(__name__, __file__)",
    );
    job.args = vec!["--flag".into(), "two words".into()];
    job.stdin = bytes::Bytes::from_static(b"piped in");
    job.env.insert("MODE".into(), "strict".into());
    job.filename = Some("tool.py".into());
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "['tool.py', '--flag', 'two words']\nPIPED IN\nstrict C.UTF-8\n/output\n__main__ tool.py\n"
    );
}

#[tokio::test]
async fn the_hosts_environment_never_reaches_the_step() {
    // The test process certainly has PATH; the guest must see only the policy's and job's variables.
    assert!(std::env::var_os("PATH").is_some());
    let r = run(py("import os\nprint(sorted(os.environ))")).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "['HOME', 'LANG', 'TMPDIR', 'TZ']\n");
}

#[tokio::test]
async fn uncaught_exception_fails_with_a_normal_traceback() {
    let r = run(py("def f():\n    raise ValueError('boom')\n\nf()\n")).await;
    assert_status(&r, Status::Failed);
    assert_eq!(r.exit_code, Some(1));
    let e = err(&r);
    assert!(e.starts_with("Traceback (most recent call last):\n"), "{e}");
    assert!(
        e.contains("File \"step.py\", line 4, in <module>\n    f()"),
        "{e}"
    );
    assert!(
        e.contains("line 2, in f\n    raise ValueError('boom')"),
        "{e}"
    );
    assert!(e.ends_with("ValueError: boom\n"), "{e}");
    assert!(
        !e.contains("stepbox_runner"),
        "the runner's own frame is hidden: {e}"
    );
}

#[tokio::test]
async fn sys_exit_codes_pass_through() {
    for (src, status, code, stderr) in [
        ("import sys; sys.exit(3)", Status::Failed, 3, ""),
        ("import sys; sys.exit(0)", Status::Succeeded, 0, ""),
        ("import sys; sys.exit()", Status::Succeeded, 0, ""),
        (
            "import sys; sys.exit('bad input')",
            Status::Failed,
            1,
            "bad input\n",
        ),
        ("raise SystemExit(255)", Status::Failed, 255, ""),
        // os._exit bypasses the runner and ends through WASI p2's `exit`, which carries only
        // success or failure: the code becomes 1.
        ("import os; os._exit(4)", Status::Failed, 1, ""),
        ("import os; os._exit(0)", Status::Succeeded, 0, ""),
    ] {
        let r = run(py(src)).await;
        assert_status(&r, status);
        assert_eq!(r.exit_code, Some(code), "{src}");
        assert_eq!(err(&r), stderr, "{src}");
    }
}

#[tokio::test]
async fn syntax_errors_fail_with_the_location() {
    let r = run(py("x = (1,\nprint(x)\n")).await;
    assert_status(&r, Status::Failed);
    let e = err(&r);
    assert!(
        e.contains("File \"step.py\", line 1") && e.contains("SyntaxError"),
        "{e}"
    );
}

#[tokio::test]
async fn output_printed_before_a_crash_is_kept() {
    let r = run(py(
        "import sys\nprint('partial')\nsys.stdout.flush()\n1/0\n",
    ))
    .await;
    assert_status(&r, Status::Failed);
    assert_eq!(out(&r), "partial\n");
    assert!(err(&r).contains("ZeroDivisionError"));
}

/// The whole practical standard library is importable; what is missing is exactly what cannot work
/// on WASI (no C library support, no processes, no terminals) or was left out on purpose.
#[tokio::test]
async fn standard_library_is_complete_except_what_wasi_cannot_support() {
    let src = r#"
import sys, importlib
names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
missing = [n for n in names if n not in sys.modules]
print(" ".join(missing))
for m in ["csv", "json", "re", "datetime", "_strptime", "statistics", "zipfile", "gzip", "zlib",
          "hashlib", "hmac", "decimal", "fractions", "sqlite3", "asyncio", "http.client",
          "email.mime.text", "xml.etree.ElementTree", "html.parser", "urllib.parse", "tomllib",
          "encodings.utf_8", "encodings.latin_1", "encodings.cp1252", "encodings.utf_16",
          "encodings.idna", "unicodedata", "difflib", "textwrap", "dataclasses", "typing",
          "argparse", "logging", "pathlib", "shutil", "tempfile", "uuid", "secrets", "base64",
          "struct", "array", "heapq", "bisect", "itertools", "functools", "collections", "queue",
          "configparser", "platform", "mimetypes", "graphlib", "contextvars", "pickle", "copy",
          "pprint", "string", "locale", "calendar", "ipaddress", "concurrent.futures", "zoneinfo"]:
    importlib.import_module(m)
print("ok")
"#;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "antigravity bz2 ctypes curses ensurepip fcntl grp idlelib lzma mmap msvcrt nt pty pwd \
         pydoc_data readline resource ssl syslog termios this tkinter tty turtle turtledemo venv \
         winreg winsound\nok\n"
    );
}

#[tokio::test]
async fn a_module_that_does_not_exist_fails_like_python() {
    let r = run(py("import pandas")).await;
    assert_status(&r, Status::Failed);
    assert!(
        err(&r).contains("ModuleNotFoundError: No module named 'pandas'"),
        "{}",
        err(&r)
    );
}

#[tokio::test]
async fn nothing_survives_from_one_run_to_the_next() {
    let first = run(py(
        "import json\njson.leak = 1\nopen('/tmp/x', 'w').write('x')\nprint('set')",
    ))
    .await;
    assert_status(&first, Status::Succeeded);
    let second = run(py(
        "import json, os\nprint(hasattr(json, 'leak'), os.listdir('/tmp'), os.listdir('/output'))",
    ))
    .await;
    assert_status(&second, Status::Succeeded);
    assert_eq!(out(&second), "False [] []\n");
}

#[tokio::test]
async fn randomness_differs_between_runs_unless_the_policy_is_deterministic() {
    let src = "import random, os, time\nprint(random.random(), os.urandom(4).hex(), time.time())";
    let (a, b) = (run(py(src)).await, run(py(src)).await);
    assert_ne!(
        out(&a),
        out(&b),
        "the snapshot's PRNG state must be reseeded per run"
    );

    let det = |src: &str| {
        let mut j = py(src);
        j.policy = "deterministic".into();
        j
    };
    let (a, b) = (run(det(src)).await, run(det(src)).await);
    assert_status(&a, Status::Succeeded);
    assert_eq!(out(&a), out(&b));
    assert!(
        out(&a).ends_with(" 946684800.0\n"),
        "fixed clock: {}",
        out(&a)
    );
    assert_eq!(
        a.usage.fuel_consumed, b.usage.fuel_consumed,
        "fuel is deterministic too"
    );
}

#[tokio::test]
async fn deep_python_recursion_is_a_recursion_error_not_a_trap() {
    let r = run(py("def f(n):\n    return f(n + 1)\nf(0)\n")).await;
    assert_status(&r, Status::Failed);
    assert!(err(&r).contains("RecursionError"), "{}", err(&r));
}

#[tokio::test]
async fn mnt_data_layout_reports_new_and_changed_files_only() {
    let mut job = py(
        "import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('changed.csv','a').write('x\\n')\nopen('new.txt','w').write('n')\n",
    );
    job.layout = stepbox::Layout::MntData;
    job.inputs = vec![input("same.csv", "a\n"), input("changed.csv", "b\n")];
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "/mnt/data ['changed.csv', 'same.csv']\n");
    let paths: Vec<_> = r
        .outputs
        .iter()
        .map(|o| (o.path.as_str(), &o.content[..]))
        .collect();
    assert_eq!(
        paths,
        [("changed.csv", &b"b\nx\n"[..]), ("new.txt", &b"n"[..])]
    );
}

#[tokio::test]
async fn deterministic_time_is_virtual_but_sleep_and_wall_time_are_real() {
    let det = |src: &str, pairs: &[&str]| {
        let mut j = with_limits(py(src), pairs);
        j.policy = "deterministic".into();
        j
    };
    // The monotonic clock advances per reading, not with real time: a sleep returns, and the step
    // sees the same few microseconds pass on every run.
    let src = "import time\nt0 = time.monotonic()\ntime.sleep(0.05)\nt1 = time.monotonic()\nprint(repr(t1 - t0))";
    let (a, b) = (run(det(src, &[])).await, run(det(src, &[])).await);
    assert_status(&a, Status::Succeeded);
    assert_eq!(out(&a), out(&b));
    let elapsed: f64 = out(&a).trim().parse().unwrap();
    assert!(elapsed > 0.0 && elapsed < 0.001, "{}", out(&a));
    // The wall-time limit is real time: a long sleep is stopped.
    let r = run(det("import time\ntime.sleep(30)", &["wall_time=300ms"])).await;
    assert_status(&r, Status::TimedOut);
}

/// asyncio's event loop works without sockets: on WASI the runner gives the selector loop no
/// self-pipe (a socket pair that only serves wake-ups from other threads and signal handlers,
/// neither of which exist there), while opening a socket is still refused.
#[tokio::test]
async fn asyncio_event_loops_run_without_sockets() {
    let src = ASYNCIO_PROBE;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(
        out(&r),
        "gather [0, 1, 4, 9, 16]\nasync generator [0, 1, 4, 9]\ntask group [36, 49]\n\
         wait_for timed out\nslept 0.2 s True\nno signal handlers\nnew loop 9\n\
         socket refused PermissionError EACCES\n"
    );
    assert_eq!(err(&r), "");
}

/// File reads and writes go through `sandbox::wasi_files` (streams that do the I/O on the guest's
/// thread): positions, seeks, appends, multi-megabyte reads and writes, and the errors a step
/// sees, exactly as CPython on Linux has them. (The same probe runs in a worker, under seccomp, in
/// `workers.rs`.)
#[tokio::test]
async fn file_reads_and_writes_keep_posix_semantics() {
    assert_file_semantics(&run(file_semantics_job()).await);
}
