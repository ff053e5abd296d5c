//! A workflow's overhead over running its steps one by one: a chain of three small Python steps
//! (each copies its input to its output) run as one workflow, against the same three jobs run
//! back to back through the executor with the files handed over by hand. The difference per
//! step is what the workflow adds (planning, wiring, artifact storage, the run record).
//!
//! `cargo bench --bench workflow`. Needs the Python component (`guest-runtime/python/build.sh`).
//! Target (issue 12): under 1 ms per step at p50.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use stepbox::catalog::Catalog;
use stepbox::workflow::Workflows;
use stepbox::workflow::artifacts::Artifacts;
use stepbox::workflow::model::WorkflowFile;
use stepbox::{Executor, ExecutorConfig, InputFile, RunOptions, RuntimeKind, Status, StepJob};

const COPY: &str = "open('/output/out.csv', 'w').write(open('/input/in.csv').read())\n";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let executor = Arc::new(
        Executor::new(ExecutorConfig {
            cache_dir: Some(root.join("target/bench-cache")),
            python_component: Some(root.join("target/guest/python-runtime.wasm")),
            work_root: dir.path().join("work"),
            ..ExecutorConfig::default()
        })
        .expect("executor builds (is the Python component built?)"),
    );
    let (runner, plan) = rt.block_on(async {
        let store = stepbox_store::Store::open(&stepbox_store::Store::sqlite_url(
            &dir.path().join("catalog.db"),
        ))
        .await
        .unwrap();
        let catalog = Catalog::new(
            store,
            executor.clone(),
            stepbox::catalog::default_stages(),
            None,
        )
        .await
        .unwrap();
        let artifacts = Artifacts::open(&dir.path().join("artifacts")).unwrap();
        let text = format!(
            r#"
name = "chain"
[inputs]
data = "in.csv"
[[steps]]
id = "a"
program = "a.py"
source = {COPY:?}
inputs = {{ "in.csv" = "inputs.data" }}
[[steps]]
id = "b"
program = "b.py"
source = {COPY:?}
inputs = {{ "in.csv" = "steps.a.outputs.out.csv" }}
[[steps]]
id = "c"
program = "c.py"
source = {COPY:?}
inputs = {{ "in.csv" = "steps.b.outputs.out.csv" }}
[outputs]
result = "steps.c.outputs.out.csv"
"#
        );
        let plan = toml::from_str::<WorkflowFile>(&text)
            .unwrap()
            .plan()
            .unwrap();
        (
            Workflows::new(Arc::new(catalog), Arc::new(artifacts), 2),
            plan,
        )
    });
    let data = bytes::Bytes::from("id,v\n".to_string() + &"1,x\n".repeat(1000));

    let separate = || {
        rt.block_on(async {
            let mut file = data.clone();
            for name in ["a.py", "b.py", "c.py"] {
                let mut job = StepJob::new(RuntimeKind::Python, COPY);
                job.filename = Some(name.into());
                job.inputs.push(InputFile {
                    path: "in.csv".into(),
                    content: file.clone(),
                });
                let (r, _) = executor
                    .run_checked(job, &[], RunOptions::default())
                    .await
                    .unwrap();
                assert_eq!(r.status, Status::Succeeded);
                file = r.outputs[0].content.clone();
            }
            assert_eq!(file, data);
        })
    };
    let workflow = || {
        rt.block_on(async {
            let inputs = BTreeMap::from([("data".to_string(), data.clone())]);
            let run = runner.run(&plan, inputs, None, None).await.unwrap();
            assert_eq!(run.status, "succeeded");
        })
    };
    // Warm the compiled-artifact cache.
    separate();
    workflow();

    let mut g = c.benchmark_group("three_steps");
    g.bench_function("separate_runs", |b| b.iter(separate));
    g.bench_function("workflow", |b| b.iter(workflow));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
