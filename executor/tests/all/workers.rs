//! Guests in worker processes (`Isolation::Workers`): compiled without epoch checks, stopped by
//! killing the worker. Every limit holds and is hit exactly as in-process; the wall time holds
//! for a Python loop, a loop in C, a catastrophic regex, a blocked host call and a bare wasm
//! loop; a dead or cancelled worker costs one job and nothing else.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use stepbox::executor::Isolation;
use stepbox::sandbox::outputs::DiskWatch;
use stepbox::sandbox::run::{RunMount, RunParts};
use stepbox::sandbox::worker::{WorkerConfig, WorkerJob, WorkerOptions, WorkerPool};
use stepbox::{Executor, ExecutorConfig, Limits, RunOptions, RuntimeKind, Status, StepJob};

use crate::common::*;

fn workers_executor_in(work_root: &Path, max_idle: usize) -> Executor {
    Executor::new(ExecutorConfig {
        work_root: work_root.to_path_buf(),
        cache_dir: Some(cache_dir()),
        python_component: Some(python_component()),
        isolation: Isolation::Workers(WorkerOptions {
            program: env!("CARGO_BIN_EXE_stepbox").into(),
            max_idle,
        }),
        ..ExecutorConfig::default()
    })
    .expect("executor builds")
}

/// The workers executor most tests here share.
fn workers() -> &'static Executor {
    static EXEC: OnceLock<(tempfile::TempDir, Executor)> = OnceLock::new();
    &EXEC
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let exec = workers_executor_in(dir.path(), 4);
            (dir, exec)
        })
        .1
}

async fn wrun(job: StepJob) -> stepbox::RunResult {
    workers().run(job).await.expect("job accepted")
}

#[tokio::test]
async fn a_step_runs_in_a_worker_like_in_process() {
    let src = "import os, sys\nprint('hello', sorted(os.environ))\nprint('to stderr', file=sys.stderr)\nsys.exit(3)\n";
    let w = wrun(py(src)).await;
    let here = run(py(src)).await;
    assert_status(&w, Status::Failed);
    assert_eq!(w.exit_code, Some(3));
    assert_eq!((out(&w), err(&w)), (out(&here), err(&here)));
    assert!(
        out(&w).starts_with("hello ['HOME', 'LANG', 'TMPDIR', 'TZ']"),
        "{}",
        out(&w)
    );
    assert!(w.usage.peak_memory_bytes > 0);
    assert_eq!(w.manifest.runtime_sha256, here.manifest.runtime_sha256);
    assert_eq!(w.manifest.stdout_sha256, here.manifest.stdout_sha256);

    // Inputs and outputs cross the process boundary intact (no fuel: it ran in a worker).
    let mut job = py(
        "data = open('/input/in.txt').read()\nopen('/output/out.txt', 'w').write(data.upper())\n",
    );
    job.inputs.push(input("in.txt", "abc"));
    let w = wrun(job).await;
    assert_status(&w, Status::Succeeded);
    assert_eq!(w.usage.fuel_consumed, None);
    assert_eq!(&w.output("out.txt").unwrap().content[..], b"ABC");

    // Output streams to a listener in order, and equals what the result keeps.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = workers()
        .run_with(
            py("import sys\nfor i in range(5):\n    print(i, flush=True)\n    print('e', i, file=sys.stderr, flush=True)\n"),
            RunOptions {
                listener: Some(tx),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    let mut streamed = Vec::new();
    while let Ok(c) = rx.try_recv() {
        if c.stream == stepbox::StreamKind::Stdout {
            streamed.extend_from_slice(&c.data);
        }
    }
    assert_eq!(streamed, r.stdout.to_vec());
    assert_eq!(out(&r), "0\n1\n2\n3\n4\n");

    // A run with fuel stays in-process (fuel is counted in the guest) and reports it; so does
    // every deterministic run (a deterministic policy must meter fuel).
    let f = wrun(with_limits(
        py("print(sum(range(1000)))"),
        &["fuel=5000000000"],
    ))
    .await;
    assert_status(&f, Status::Succeeded);
    assert!(f.usage.fuel_consumed.is_some_and(|n| n > 0));
}

#[tokio::test]
async fn memory_and_output_limits_hold_then_are_hit_in_a_worker() {
    let ok = wrun(with_limits(
        py("b = bytearray(40 * 1024 * 1024)\nprint(len(b))"),
        &["memory=128MiB"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);
    assert!(ok.usage.peak_memory_bytes > 40 << 20 && ok.usage.peak_memory_bytes <= 128 << 20);
    let hit = wrun(with_limits(
        py("b = bytearray(200 * 1024 * 1024)\nprint('unreachable')"),
        &["memory=128MiB"],
    ))
    .await;
    assert_status(&hit, Status::MemoryExceeded);
    assert!(
        hit.message.contains("the limit is 134217728 bytes"),
        "{}",
        hit.message
    );

    let ok = wrun(with_limits(py("print('x' * 1023)"), &["stdout=1KiB"])).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.stdout.len(), 1024);
    let hit = wrun(with_limits(
        py("while True:\n    print('y' * 100)\n"),
        &["stdout=1KiB"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert_eq!(hit.stdout.len(), 1024);
    assert!(
        hit.stdout_truncated && hit.message.contains("stdout"),
        "{}",
        hit.message
    );
    let hit = wrun(with_limits(
        py("import sys\nwhile True:\n    sys.stderr.write('e' * 100)\n"),
        &["stderr=1KiB"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert_eq!(hit.stderr.len(), 1024);

    let make = |n: usize| {
        py(&format!(
            "for i in range({n}):\n    open(f'/output/f{{i}}.txt', 'w').write(str(i))\n"
        ))
    };
    let ok = wrun(with_limits(make(3), &["output_files=3"])).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.outputs.len(), 3);
    let hit = wrun(with_limits(make(4), &["output_files=3"])).await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(hit.message.contains("output_files"), "{}", hit.message);

    // Writing forever: the parent's disk watch kills the worker near the limit.
    let r = wrun(with_limits(
        py("f = open('/tmp/big', 'wb')\nchunk = b'x' * 65536\nwhile True:\n    f.write(chunk)\n"),
        &["scratch_bytes=8MiB", "wall_time=60s"],
    ))
    .await;
    assert_status(&r, Status::OutputExceeded);
    assert!(
        r.message.contains("stopped while writing") && r.message.contains("scratch_bytes"),
        "{}",
        r.message
    );
    assert!(r.usage.scratch_bytes.saturating_sub(8 << 20) < 256 << 20);

    // Many temporary files: held under the default policy, the parent stops the step past
    // `scratch_files` while it runs (the files stay until the step ends).
    let make = |n: usize, sleep: f64| {
        py(&format!(
            "import os, tempfile, time\nd = tempfile.mkdtemp()\nfor i in range({n}):\n    open(os.path.join(d, f'f{{i}}'), 'w').close()\ntime.sleep({sleep})\nprint('made')\n"
        ))
    };
    let ok = wrun(make(2000, 0.0)).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.usage.scratch_files, 2000);
    let hit = wrun(with_limits(
        make(51, 30.0),
        &["scratch_files=50", "wall_time=60s"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(
        hit.message.contains("stopped while writing") && hit.message.contains("scratch_files"),
        "{}",
        hit.message
    );
    assert!(
        hit.usage.wall_time_us < 20_000_000,
        "stopped while it ran, not at its end"
    );
}

#[tokio::test]
async fn the_wall_time_holds_for_every_kind_of_guest_in_a_worker() {
    let ok = wrun(with_limits(
        py("import time\ntime.sleep(0.05)\nprint('done')"),
        &["wall_time=5s"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);

    let guests = [
        (
            "a Python loop",
            py("b = bytearray(64 << 20)\nwhile True:\n    pass\n"),
        ),
        ("a loop in C", py("print(sum(range(10**12)))\n")),
        (
            "a catastrophic regex",
            py("import re\nprint(re.match(r'(a+)+$', 'a' * 64 + 'b'))\n"),
        ),
        ("a blocked host call", py("import time\ntime.sleep(600)\n")),
        (
            "a bare wasm loop",
            wasm(r#"(module (memory (export "memory") 1) (func (export "_start") (loop br 0)))"#),
        ),
    ];
    let before = workers().workers().unwrap().spawned();
    let runs = guests.map(|(what, job)| async move {
        let t = Instant::now();
        let r = wrun(with_limits(job, &["wall_time=500ms"])).await;
        (what, r, t.elapsed())
    });
    for (what, r, took) in futures::future::join_all(runs).await {
        assert_status(&r, Status::TimedOut);
        assert!(
            r.message.contains("wall-time limit of 500ms"),
            "{what}: {}",
            r.message
        );
        // Killed at the limit, not at the worker's own 2 s backstop or never: a wide bound,
        // since this machine is shared.
        assert!(took < Duration::from_secs(20), "{what} took {took:?}");
        if what == "a Python loop" {
            // The worker reported each new peak before it was killed.
            assert!(
                r.usage.peak_memory_bytes > 64 << 20,
                "peak {}",
                r.usage.peak_memory_bytes
            );
        }
    }
    // Each killed worker was replaced, and the pool still runs steps.
    let after = wrun(py("print('still here')")).await;
    assert_status(&after, Status::Succeeded);
    assert!(workers().workers().unwrap().spawned() > before);
}

async fn busy_pid(exec: &Executor) -> u32 {
    for _ in 0..2000 {
        if let Some(p) = exec.workers().unwrap().busy_pids().first() {
            return *p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no worker became busy");
}

#[tokio::test]
async fn a_worker_that_dies_mid_run_ends_only_that_job() {
    let dir = tempfile::tempdir().unwrap();
    let exec = std::sync::Arc::new(workers_executor_in(dir.path(), 2));
    let e = exec.clone();
    let job = tokio::spawn(async move {
        e.run(py(
            "import time\nprint('started', flush=True)\ntime.sleep(60)\n",
        ))
        .await
        .unwrap()
    });
    let pid = busy_pid(&exec).await;
    // What the kernel's OOM killer would do.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let r = job.await.unwrap();
    assert_status(&r, Status::Trapped);
    assert!(
        r.message.contains("worker process died") && r.message.contains("signal: 9"),
        "{}",
        r.message
    );
    let next = exec.run(py("print('fine')")).await.unwrap();
    assert_status(&next, Status::Succeeded);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "job dirs removed"
    );
}

#[tokio::test]
async fn a_cancelled_run_kills_its_worker_and_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let exec = std::sync::Arc::new(workers_executor_in(dir.path(), 2));
    let e = exec.clone();
    let job = tokio::spawn(async move {
        e.run(py(
            "open('/output/partial.txt', 'w').write('x')\nwhile True:\n    pass\n",
        ))
        .await
    });
    let pid = busy_pid(&exec).await;
    job.abort();
    assert!(job.await.unwrap_err().is_cancelled());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the worker of a cancelled run is killed and reaped with it"
    );
    assert!(exec.workers().unwrap().busy_pids().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "job dir removed"
    );
}

#[tokio::test]
async fn a_worker_has_no_environment_no_new_privileges_and_a_seccomp_filter() {
    let pool = workers().workers().unwrap();
    pool.prewarm().await.unwrap();
    let pid = *pool.idle_pids().first().expect("an idle worker");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    // This test process has PATH, HOME, CARGO_* ...; the worker gets one variable of its own.
    assert!(std::env::var_os("PATH").is_some());
    assert!(
        vars.iter()
            .all(|v| v.starts_with("STEPBOX_PYTHON_DATA_DIR=")),
        "{vars:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, Path::new("/"));
    // A seccomp filter (mode 2), on every thread: the helper threads started before it was
    // installed too (TSYNC), not only the main thread that installed it.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    assert!(tasks.len() >= 3, "main thread and two helpers: {tasks:?}");
    for task in tasks {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(
            status.contains("Seccomp:\t2\n"),
            "{}: {status}",
            task.display()
        );
        let filters: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .unwrap_or_else(|| panic!("no Seccomp_filters line: {status}"))
            .trim()
            .parse()
            .unwrap();
        assert!(filters >= 1, "{}: {status}", task.display());
    }
}

/// Landlock: a worker reads and writes only beneath the work root and the artifact cache, and
/// reads the Python component. It applies the ruleset while it is its only thread (it refuses to
/// start otherwise), and Landlock confines the threads started after it, so every thread it has
/// (main, epoch ticker, helpers, tokio's blocking pool) is confined. Jobs still reach all their
/// files: inputs, outputs, `/tmp`, new directories, cross-directory renames, truncation.
#[tokio::test]
async fn a_worker_is_confined_by_landlock_and_jobs_still_reach_their_files() {
    let pool = workers().workers().unwrap();
    pool.prewarm().await.unwrap();
    // This kernel has Landlock ABI 7, and so has CI's: anything less fails here.
    assert_eq!(pool.landlock().as_deref(), Some("fully enforced"));
    let pid = *pool.idle_pids().first().expect("an idle worker");
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(threads >= 3, "main thread and two helpers: {threads}");

    let mut job = py(concat!(
        "import os, tempfile\n",
        "data = open('/input/in.txt').read()\n",
        "os.makedirs('/output/sub/deeper')\n",
        "open('/output/sub/deeper/a.txt', 'w').write(data * 2)\n",
        "os.rename('/output/sub/deeper/a.txt', '/output/moved.txt')\n",
        "os.truncate('/output/moved.txt', 3)\n",
        "with tempfile.NamedTemporaryFile('w', dir='/tmp', delete=False) as t:\n",
        "    t.write('scratch')\n",
        "os.rename(t.name, '/tmp/kept')\n",
        "os.removedirs('/output/sub/deeper')\n",
        "print(sorted(os.listdir('/output')), open('/tmp/kept').read())\n",
    ));
    job.inputs.push(input("in.txt", "abc"));
    let w = wrun(job.clone()).await;
    let here = run(job).await;
    assert_status(&w, Status::Succeeded);
    assert_eq!(out(&w), "['moved.txt'] scratch\n", "{}", err(&w));
    assert_eq!((out(&w), err(&w)), (out(&here), err(&here)));
    assert_eq!(&w.output("moved.txt").unwrap().content[..], b"abc");
}

/// Landlock, seen on the threads that meet files: a worker's main thread opens a job's
/// directories, and tokio's blocking pool, started long after the ruleset, reads the Python
/// component. A worker is refused by the kernel on both what its configuration does not grant,
/// though the files are there and its user may read them; granted, the same job runs.
#[tokio::test]
async fn a_worker_is_refused_what_it_was_not_granted_on_every_thread() {
    let root = tempfile::tempdir().unwrap();
    let (work, elsewhere) = (root.path().join("work"), root.path().join("elsewhere"));
    std::fs::create_dir_all(work.join("tmp")).unwrap();
    for dir in [&work, &elsewhere] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("in.txt"), "abc").unwrap();
    }
    let pool = |python_component: Option<PathBuf>, cache: PathBuf| {
        WorkerPool::new(
            WorkerOptions {
                program: env!("CARGO_BIN_EXE_stepbox").into(),
                max_idle: 1,
            },
            WorkerConfig {
                work_root: Some(work.clone()),
                cache_dir: Some(cache),
                // Without it the worker looks in the usual places, and finds the checkout's.
                python_component,
                ..WorkerConfig::default()
            },
        )
    };
    let limits = Limits {
        memory_bytes: 256 << 20,
        fuel: None,
        wall_time: Duration::from_secs(60),
        stdout_bytes: 1 << 20,
        stderr_bytes: 1 << 20,
        output_files: 100,
        output_bytes: 1 << 20,
        scratch_files: 100,
        scratch_bytes: 1 << 20,
    };
    let parts = |input: &Path| RunParts {
        argv0: "main.py".into(),
        args: Vec::new(),
        env: Default::default(),
        cwd: "/tmp".into(),
        mounts: vec![
            RunMount {
                host: input.to_path_buf(),
                guest: "/input".into(),
                writable: false,
            },
            RunMount {
                host: work.join("tmp"),
                guest: "/tmp".into(),
                writable: true,
            },
        ],
        deterministic: None,
    };
    let run = async |pool: &WorkerPool, input: &Path| {
        let parts = parts(input);
        pool.run(WorkerJob {
            runtime: RuntimeKind::Python,
            parts: &parts,
            limits: &limits,
            filename: "main.py",
            program: b"print(open('/input/in.txt').read())",
            stdin: b"",
            watch: DiskWatch::new(work.join("tmp"), work.join("tmp"), 0, 0, limits.clone()),
            listener: None,
        })
        .await
    };

    let granted = pool(Some(python_component()), cache_dir());
    let ok = run(&granted, &work).await.unwrap().ending;
    assert_eq!(
        (ok.status, &ok.stdout[..]),
        (Status::Succeeded, &b"abc\n"[..])
    );
    // A directory beside the work root, mounted as if a parent had gone wrong: the worker's main
    // thread is refused its file.
    let refused = run(&granted, &elsewhere).await.unwrap().ending;
    assert_eq!(refused.status, Status::Failed);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("PermissionError") && stderr.contains("/input/in.txt"),
        "{stderr}"
    );

    // The component not granted: its read, on the blocking pool, is refused. (A fresh cache, so
    // the worker has to read it: with its digest and artifact cached it would only stat it.)
    let fresh_cache = work.join("fresh-cache");
    let e = run(&pool(None, fresh_cache), &work)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Permission denied"), "{e}");
    assert!(e.contains("python-runtime.wasm"), "{e}");
}

#[tokio::test]
async fn jobs_run_side_by_side_in_separate_workers() {
    let dir = tempfile::tempdir().unwrap();
    let exec = workers_executor_in(dir.path(), 2);
    let job = |n: u32| {
        py(&format!(
            "import time\ntime.sleep(0.3)\nopen('/output/n.txt', 'w').write('{n}')\nprint({n})\n"
        ))
    };
    let (a, b) = tokio::join!(exec.run(job(1)), exec.run(job(2)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((out(&a), out(&b)), ("1\n".to_string(), "2\n".to_string()));
    assert_eq!(&a.output("n.txt").unwrap().content[..], b"1");
    assert_eq!(&b.output("n.txt").unwrap().content[..], b"2");
    let pool = exec.workers().unwrap();
    assert_eq!(pool.spawned(), 2, "two jobs at once, two workers");
    assert_eq!(pool.idle_pids().len(), 2, "both kept for the next jobs");
    // A refused program comes back as the same error as in-process, and keeps its worker.
    let e = exec.run(wasm("(module")).await.unwrap_err().to_string();
    assert!(e.contains("program"), "{e}");
    let e = exec
        .run(wasm("(module (func (export \"main\")))"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no `_start` export"), "{e}");
    assert_eq!(pool.spawned(), 2);
}

/// `python-data` (pandas) runs in a worker too, compiled on the workers' engine for large modules:
/// the same result as in-process, and its limits hold there.
#[tokio::test]
async fn a_pandas_step_runs_in_a_worker_like_in_process() {
    if !crate::python_data::present() {
        return;
    }
    let data = |src: &str| StepJob::new(stepbox::RuntimeKind::PythonData, src.to_string());
    let mut job = data(
        "import pandas as pd\ndf = pd.read_csv('/input/t.csv')\nprint(df.groupby('k')['v'].sum().to_dict())\ndf.to_csv('/output/o.csv', index=False)\n",
    );
    job.inputs = vec![input("t.csv", "k,v\na,1\nb,2\na,3\n")];
    let w = wrun(job.clone()).await;
    let here = run(job).await;
    assert_status(&w, Status::Succeeded);
    assert_eq!(out(&w), "{'a': 4, 'b': 2}\n");
    assert_eq!((out(&w), err(&w)), (out(&here), err(&here)));
    assert_eq!(
        w.output("o.csv").unwrap().content,
        here.output("o.csv").unwrap().content
    );

    // It is a worker that runs it: one is busy while the step sleeps.
    let exec = workers();
    let sleeper = exec.run(data("import time, numpy\ntime.sleep(1)\nprint('woke')"));
    let (r, pid) = tokio::join!(sleeper, busy_pid(exec));
    assert_status(&r.unwrap(), Status::Succeeded);
    assert!(pid > 0);

    let hit = wrun(with_limits(
        data("import numpy as np\na = np.ones(300_000_000, dtype=np.uint8)\nprint(a.sum())"),
        &["memory=256MiB"],
    ))
    .await;
    assert_status(&hit, Status::MemoryExceeded);
    let t = Instant::now();
    let hit = wrun(with_limits(
        data("import numpy as np\nwhile True:\n    np.sort(np.arange(100_000)[::-1])\n"),
        &["wall_time=1s"],
    ))
    .await;
    assert_status(&hit, Status::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// File streams do their I/O on the worker's guest thread, under its seccomp filter and Landlock
/// (`pwritev2` for appends included): the same probe as in-process.
#[tokio::test]
async fn file_reads_and_writes_in_a_worker_keep_posix_semantics() {
    assert_file_semantics(&wrun(file_semantics_job()).await);
}
