//! End-to-end step runs through the library with a warm cache: what a caller waits for per job
//! (validation, job directory, instantiation, run, output collection, cleanup).
//!
//! `cargo bench --bench steps`. Needs the Python component (`guest-runtime/python/build.sh`);
//! the `python-data` cases run when that runtime is built (`guest-runtime/python-data/build.sh`).
//! `*_worker` cases run the same steps in sandbox worker processes (`Isolation::Workers`, what
//! `stepbox run` and `serve` use): no epoch checks, plus one round trip over the worker's pipes.
//! Compare with native python3 in one run with `benches/compare_native.py`.

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use stepbox::executor::Isolation;
use stepbox::sandbox::worker::WorkerOptions;
use stepbox::{Executor, ExecutorConfig, RuntimeKind, Status, StepJob};

fn executor(isolation: Isolation) -> Executor {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Executor::new(ExecutorConfig {
        cache_dir: Some(root.join("target/bench-cache")),
        python_component: Some(root.join("target/guest/python-runtime.wasm")),
        isolation,
        ..ExecutorConfig::default()
    })
    .expect("executor builds (is the Python component built?)")
}

fn step(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../benches/steps")
            .join(name),
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let exec = executor(Isolation::InProcess);
    let workers = executor(Isolation::Workers(WorkerOptions {
        program: env!("CARGO_BIN_EXE_stepbox").into(),
        max_idle: 2,
    }));
    let run_on = |exec: &Executor, runtime: RuntimeKind, program: &[u8]| {
        let r = rt
            .block_on(exec.run(StepJob::new(runtime, program.to_vec())))
            .expect("accepted");
        assert_eq!(
            r.status,
            Status::Succeeded,
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
    };
    let run = |runtime: RuntimeKind, program: &[u8]| run_on(&exec, runtime, program);
    let in_worker = |runtime: RuntimeKind, program: &[u8]| run_on(&workers, runtime, program);
    let (hello, heavy, tiny) = (step("hello.py"), step("cpu_heavy.py"), step("tiny.wat"));
    // Warm the caches: the first run compiles or loads the artifacts.
    run(RuntimeKind::Python, &hello);
    run(RuntimeKind::Wasm, &tiny);
    in_worker(RuntimeKind::Python, &hello);

    let mut g = c.benchmark_group("step");
    g.bench_function("python_hello", |b| {
        b.iter(|| run(RuntimeKind::Python, &hello))
    });
    g.bench_function("python_hello_worker", |b| {
        b.iter(|| in_worker(RuntimeKind::Python, &hello))
    });
    g.bench_function("wasm_tiny", |b| b.iter(|| run(RuntimeKind::Wasm, &tiny)));
    // A step that prints `pandas.__version__`: numpy and pandas come from the snapshot.
    let pandas = b"import pandas\nprint(pandas.__version__)\n";
    let data = exec
        .runtimes()
        .availability(RuntimeKind::PythonData)
        .is_ok();
    if data {
        run(RuntimeKind::PythonData, pandas);
        g.bench_function("python_data_pandas_version", |b| {
            b.iter(|| run(RuntimeKind::PythonData, pandas))
        });
    }
    g.sample_size(10);
    g.bench_function("python_cpu_heavy", |b| {
        b.iter(|| run(RuntimeKind::Python, &heavy))
    });
    g.bench_function("python_cpu_heavy_worker", |b| {
        b.iter(|| in_worker(RuntimeKind::Python, &heavy))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
