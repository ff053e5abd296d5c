//! Load test: N concurrent gRPC clients over loopback run python hello-world steps for a while and
//! report throughput, latency percentiles, errors by code, and the server's memory.
//!
//! ```text
//! cargo bench --bench load -- [--concurrency 1,8,32] [--seconds 10] [--queue 64] [--addr HOST:PORT]
//!                             [--traces] [--by-ref] [--workers]
//! ```
//! Without `--addr` the server runs in this process (its RSS is reported at the start and end of
//! each level); with `--addr` it drives a running `stepbox serve`. Concurrency above the server's
//! slots plus queue shows overload handling: the only acceptable error is RESOURCE_EXHAUSTED.
//! `--traces` (in-process server only) runs every level a second time with OTLP trace export on,
//! to an in-process collector on loopback that counts the spans it receives, so the cost of
//! tracing is a ratio within one run.
//! `--by-ref` (in-process server only) publishes the same hello step to a catalog on a temporary
//! SQLite file, promotes it to `prod`, and at every level runs it inline and then by reference
//! (`step_ref = "hello@prod"`), so the cost of a run by reference (the cached stage resolution,
//! the job built from the stored definition, the version in the manifest) is a ratio within one
//! run.
//! `--workers` (in-process server only) runs the steps in sandbox worker processes, as
//! `stepbox serve` does by default; without it they run in the server's process with epoch checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use stepbox::pb::step_executor_client::StepExecutorClient;
use stepbox::pb::{self, RunStepRequest, Step};
use stepbox::service::catalog::CatalogHandle;
use stepbox::service::{ServerOptions, serve};
use stepbox::{Executor, ExecutorConfig};

struct Args {
    levels: Vec<usize>,
    seconds: u64,
    queue: usize,
    addr: Option<SocketAddr>,
    traces: bool,
    by_ref: bool,
    workers: bool,
}

fn args() -> Args {
    let mut a = Args {
        levels: vec![1, 8],
        seconds: 10,
        queue: 64,
        addr: None,
        traces: false,
        by_ref: false,
        workers: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--concurrency" => {
                a.levels = value()
                    .split(',')
                    .map(|s| s.parse().expect("--concurrency N[,N...]"))
                    .collect()
            }
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--queue" => a.queue = value().parse().expect("--queue N"),
            "--addr" => a.addr = Some(value().parse().expect("--addr HOST:PORT")),
            "--traces" => {
                a.traces = true;
                i += 1;
                continue;
            }
            "--by-ref" => {
                a.by_ref = true;
                i += 1;
                continue;
            }
            "--workers" => {
                a.workers = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1; // `--bench` and anything else cargo passes
                continue;
            }
        }
        i += 2;
    }
    a
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn hello() -> RunStepRequest {
    RunStepRequest {
        step: Some(Step {
            runtime: "python".into(),
            source: "print('hello, world')".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Makes one request of a mode.
type Request = fn() -> RunStepRequest;

/// The same step, published: `hello@prod`.
fn hello_by_ref() -> RunStepRequest {
    RunStepRequest {
        step_ref: "hello@prod".into(),
        ..Default::default()
    }
}

/// Publishes the hello step (one case: it prints `hello, world`) to a catalog on a SQLite file in
/// `dir` and promotes it to `prod`.
async fn hello_catalog(exec: Arc<Executor>, dir: &Path) -> Arc<CatalogHandle> {
    use stepbox::catalog::model::Case;
    use stepbox::catalog::{Blob, Catalog, CheckSpec, Origin, StepDefinition, StepRef};
    let store =
        stepbox_store::Store::open(&stepbox_store::Store::sqlite_url(&dir.join("catalog.db")))
            .await
            .expect("catalog store");
    let catalog = Catalog::new(
        store,
        exec,
        stepbox::catalog::default_stages(),
        Some(stepbox::catalog::DEFAULT_REFRESH),
    )
    .await
    .expect("catalog");
    let def = StepDefinition {
        name: "hello".into(),
        description: "Prints hello, world".into(),
        runtime: "python".into(),
        program: Blob::Text("print('hello, world')".into()),
        filename: None,
        layout: "input-output".into(),
        policy: "default".into(),
        env: Default::default(),
        cases: vec![Case {
            name: "prints".into(),
            checks: vec![CheckSpec {
                kind: "stdout_equals".into(),
                expected: Some(Blob::Text("hello, world\n".into())),
                ..CheckSpec::default()
            }],
            ..Case::default()
        }],
        contract: Vec::new(),
        origin: Origin::Api,
    };
    let published = catalog
        .publish(&def, "bench", false)
        .await
        .expect("publish");
    assert!(
        published.version.is_some_and(|v| v.verified),
        "{:?}",
        published.cases
    );
    let promoted = catalog
        .promote(&StepRef::parse("ref", "hello@v1").unwrap(), "prod", "bench")
        .await
        .expect("promote");
    assert!(promoted.promoted, "{}", promoted.reason);
    Arc::new(CatalogHandle::ready(Arc::new(catalog)))
}

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    wrong: u64,
}

async fn drive(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    request: Request,
) -> (Stats, Duration) {
    let end = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut client = StepExecutorClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let mut s = Stats::default();
            while Instant::now() < end {
                let t = Instant::now();
                match client.run_step(request()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.status() != pb::Status::Succeeded || r.stdout != b"hello, world\n" {
                            s.wrong += 1;
                        }
                        s.latencies.push(t.elapsed());
                    }
                    Err(e) => {
                        *s.errors.entry(format!("{:?}", e.code())).or_default() += 1;
                        if e.code() == tonic::Code::ResourceExhausted {
                            tokio::time::sleep(Duration::from_millis(5)).await; // a polite client backs off
                        }
                    }
                }
            }
            s
        }));
    }
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await.expect("client task");
        all.latencies.extend(s.latencies);
        all.wrong += s.wrong;
        for (k, v) in s.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    (all, start.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// An OTLP/gRPC trace collector that counts spans.
#[derive(Clone, Default)]
struct Collector(Arc<std::sync::atomic::AtomicU64>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a collector on loopback and exports this process's spans to it.
async fn export_traces() -> (Collector, stepbox::service::telemetry::Telemetry) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry = stepbox::service::telemetry::Telemetry::init(
        &stepbox::service::telemetry::TelemetrySettings {
            filter: "off".into(),
            otlp: Some(stepbox::service::config::TelemetrySection {
                otlp_endpoint: format!("http://{addr}"),
                service_name: "stepbox-load".into(),
                sample_ratio: 1.0,
                headers: Default::default(),
                ca_file: None,
            }),
            ..Default::default()
        },
    )
    .expect("telemetry");
    (collector, telemetry)
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let catalog_dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let addr = match a.addr {
            Some(addr) => addr,
            None => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let exec = Executor::new(ExecutorConfig {
                    cache_dir: Some(root.join("target/bench-cache")),
                    python_component: Some(root.join("target/guest/python-runtime.wasm")),
                    isolation: if a.workers {
                        stepbox::executor::Isolation::Workers(
                            stepbox::sandbox::worker::WorkerOptions {
                                program: env!("CARGO_BIN_EXE_stepbox").into(),
                                max_idle: ServerOptions::default().concurrency,
                            },
                        )
                    } else {
                        stepbox::executor::Isolation::InProcess
                    },
                    ..ExecutorConfig::default()
                })
                .expect("executor");
                exec.warm_up()
                    .await
                    .expect("python runtime (build it with guest-runtime/python/build.sh)");
                let exec = Arc::new(exec);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let options = ServerOptions {
                    queue: a.queue,
                    catalog: if a.by_ref {
                        Some(hello_catalog(exec.clone(), catalog_dir.path()).await)
                    } else {
                        None
                    },
                    ..ServerOptions::default()
                };
                println!(
                    "in-process server on {addr}: concurrency {} queue {}",
                    options.concurrency, options.queue
                );
                tokio::spawn(serve(exec, listener, options, std::future::pending()));
                addr
            }
        };
        // Warm the connection path and the runtime's caches.
        drive(addr, 1, Duration::from_millis(500), hello).await;
        if a.by_ref {
            drive(addr, 1, Duration::from_millis(500), hello_by_ref).await;
        }
        println!(
            "{:>6} {:>6} {:>5} {:>9} {:>10} {:>8} {:>8} {:>8} {:>12} {:>12}  errors",
            "mode",
            "traces",
            "conc",
            "requests",
            "steps/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "rss start",
            "rss end"
        );
        levels(addr, &a, "off").await;
        if a.traces && a.addr.is_none() {
            let (collector, telemetry) = export_traces().await;
            levels(addr, &a, "otlp").await;
            tokio::task::spawn_blocking(move || telemetry.shutdown())
                .await
                .unwrap();
            println!(
                "the collector received {} spans",
                collector.0.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    });
}

async fn levels(addr: SocketAddr, a: &Args, traces: &str) {
    let mut modes: Vec<(&str, Request)> = vec![("inline", hello)];
    if a.by_ref && a.addr.is_none() {
        modes.push(("by-ref", hello_by_ref));
    }
    for &c in &a.levels {
        for &(mode, request) in &modes {
            level(addr, a, traces, c, mode, request).await;
        }
    }
}

async fn level(addr: SocketAddr, a: &Args, traces: &str, c: usize, mode: &str, request: Request) {
    let rss0 = rss_kib();
    let (mut s, took) = drive(addr, c, Duration::from_secs(a.seconds), request).await;
    let rss1 = rss_kib();
    s.latencies.sort();
    let n = s.latencies.len();
    println!(
        "{mode:>6} {traces:>6} {c:>5} {n:>9} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>9} KiB {:>9} KiB  {:?}{}",
        n as f64 / took.as_secs_f64(),
        pct(&s.latencies, 0.5),
        pct(&s.latencies, 0.99),
        pct(&s.latencies, 1.0),
        rss0,
        rss1,
        s.errors,
        if s.wrong > 0 {
            format!(" WRONG RESULTS: {}", s.wrong)
        } else {
            String::new()
        }
    );
}
