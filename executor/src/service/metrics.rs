//! Prometheus metrics, served on their own HTTP port (`GET /metrics`, OpenMetrics text).
//!
//! `stepbox_runs_total{runtime,policy,tenant,status}`, `stepbox_run_duration_seconds{runtime}`,
//! `stepbox_queue_wait_seconds`, `stepbox_limit_hits_total{kind}`,
//! `stepbox_compile_cache_total{source}`, `stepbox_in_flight_jobs`,
//! `stepbox_rejected_total{reason}`, `stepbox_workflow_runs_total{tenant,trigger,status}`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::job::outcome::{RunResult, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    runtime: String,
    policy: String,
    tenant: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeLabel {
    runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowRunLabels {
    tenant: String,
    trigger: String,
    status: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    duration: Family<RuntimeLabel, Histogram>,
    queue_wait: Histogram,
    limit_hits: Family<KindLabel, Counter>,
    compile_cache: Family<SourceLabel, Counter>,
    in_flight: Gauge,
    rejected: Family<ReasonLabel, Counter>,
    workflow_runs: Family<WorkflowRunLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stepbox");
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Runs by runtime, policy, tenant and status",
            runs.clone(),
        );
        // 1 ms .. ~33 min, doubling.
        let duration = Family::<RuntimeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 22))
        });
        registry.register(
            "run_duration_seconds",
            "Guest wall time of runs",
            duration.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "queue_wait_seconds",
            "Time jobs waited for a run slot",
            queue_wait.clone(),
        );
        let limit_hits = Family::<KindLabel, Counter>::default();
        registry.register(
            "limit_hits",
            "Runs stopped by a limit, by kind",
            limit_hits.clone(),
        );
        let compile_cache = Family::<SourceLabel, Counter>::default();
        registry.register(
            "compile_cache",
            "Where each run's compiled program came from",
            compile_cache.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_jobs",
            "Jobs running or waiting for a slot",
            in_flight.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rejected",
            "Requests refused before running, by reason",
            rejected.clone(),
        );
        let workflow_runs = Family::<WorkflowRunLabels, Counter>::default();
        registry.register(
            "workflow_runs",
            "Workflow runs recorded, by tenant, what started them and how they ended",
            workflow_runs.clone(),
        );
        Metrics {
            registry,
            runs,
            duration,
            queue_wait,
            limit_hits,
            compile_cache,
            in_flight,
            rejected,
            workflow_runs,
        }
    }

    /// Counts a job as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Records a finished run.
    pub fn record_run(&self, tenant: &str, r: &RunResult, queue_wait: Duration) {
        self.runs
            .get_or_create(&RunLabels {
                runtime: r.runtime.clone(),
                policy: r.policy.clone(),
                tenant: tenant.to_string(),
                status: r.status.name().to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&RuntimeLabel {
                runtime: r.runtime.clone(),
            })
            .observe(r.usage.wall_time_us as f64 / 1e6);
        self.queue_wait.observe(queue_wait.as_secs_f64());
        let kind = match r.status {
            Status::TimedOut => Some("wall_time"),
            Status::FuelExhausted => Some("fuel"),
            Status::MemoryExceeded => Some("memory"),
            Status::OutputExceeded => Some("output"),
            _ => None,
        };
        if let Some(kind) = kind {
            self.limit_hits
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc();
        }
        if let Some(c) = r.usage.compile_cache {
            let source = serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            self.compile_cache
                .get_or_create(&SourceLabel { source })
                .inc();
        }
    }

    /// Counts a recorded workflow run of `tenant` by what started it (`api`, `schedule`,
    /// `manual`) and how it ended (`succeeded`, `failed`).
    pub fn record_workflow_run(&self, tenant: &str, trigger: &str, status: &str) {
        self.workflow_runs
            .get_or_create(&WorkflowRunLabels {
                tenant: tenant.to_string(),
                trigger: trigger.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts a refused request (`queue_full`, `rate_limited`, `unauthenticated`, ...).
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An observer counting the run records a workflow runner stores in `metrics`
/// (`stepbox_workflow_runs_total`).
pub fn workflow_run_observer(metrics: Arc<Metrics>) -> crate::workflow::RunObserver {
    crate::workflow::RunObserver(Arc::new(move |tenant, record| {
        let trigger = record.trigger.map_or("", |t| t.as_str());
        metrics.record_workflow_run(tenant, trigger, &record.status);
    }))
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve_metrics(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
