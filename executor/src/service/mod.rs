//! The gRPC services (`stepbox.v1.StepExecutor`, `stepbox.v1.StepCatalog`,
//! `stepbox.v1.StepWorkflows`): thin doors onto [`Executor::run_checked`], the
//! [`crate::catalog`] and [`crate::workflow`].
//!
//! It owns the service and the platform around it, and uses the core ([`crate::job`],
//! [`crate::sandbox`], [`crate::Executor`]), [`crate::catalog`] and [`crate::authoring`]; nothing
//! in the core uses it.
//!
//! - [`convert`] and [`catalog_convert`]: proto <-> core and catalog conversions, and the places
//!   errors become gRPC codes ([`status_of`], [`catalog_convert::catalog_status`]).
//! - [`admission`]: the bounded queue in front of the executor.
//! - One file per group of RPCs: [`run`] (`RunStep`, `RunStepStream`, inline or by `step_ref`),
//!   [`catalog`] (`StepCatalog`, and the lazily opened catalog), [`authoring`]
//!   (`GenerateStep`, `ImportConversation`), [`workflow`] (`StepWorkflows`: workflows, their
//!   runs and schedules; conversions in [`workflow_convert`]), [`history`] (`GetRun`,
//!   `ListRuns` and the run history itself, in memory or in the catalog store), [`info`]
//!   (`ListRuntimes`, `ListPolicies`).
//! - [`serve`]: the listener, health, reflection, TLS and graceful shutdown.
//! - The platform: [`config`] (`stepbox.toml`), [`tenancy`], [`tls`], [`metrics`], [`telemetry`].
//!
//! Admission is bounded: `concurrency` jobs run at once, `queue` more wait, and anything beyond
//! gets `RESOURCE_EXHAUSTED` at once. A client deadline stops the job and answers
//! `DEADLINE_EXCEEDED`. On shutdown the server stops accepting, lets in-flight jobs finish for a
//! grace period, then cancels them (their job directories are removed as they drop).

pub mod admission;
pub mod authoring;
pub mod catalog;
pub mod catalog_convert;
pub mod config;
pub mod convert;
pub mod history;
pub mod info;
pub mod metrics;
pub mod run;
pub mod serve;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod workflow;
pub mod workflow_convert;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::Executor;
use crate::authoring::generate::{GenerateError, Generator};
use crate::pb;
use crate::service::admission::{Admission, Ticket};
use crate::service::catalog::CatalogHandle;
use crate::service::history::{History, Retention, RunHistory, SharedHistory};
use crate::service::metrics::Metrics;
use crate::service::telemetry::record_status;
use crate::service::tenancy::{Tenant, Tenants};
use pb::step_executor_server::StepExecutor;

pub use crate::service::convert::{job_from_request, response_from, status_of};
pub use crate::service::serve::serve;

/// How the server admits and bounds work.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Jobs that run at once (default: the number of cores).
    pub concurrency: usize,
    /// Jobs that may wait for a slot; past it, `RESOURCE_EXHAUSTED`.
    pub queue: usize,
    /// Largest request accepted, in bytes (default 64 MiB).
    pub max_message_bytes: usize,
    /// How long in-flight jobs may finish after a shutdown signal before they are cancelled.
    pub grace: Duration,
    /// The model `GenerateStep` asks.
    pub model: crate::authoring::generate::ModelConfig,
    /// Who may call (default: anyone, as the tenant `local`).
    pub tenants: Arc<Tenants>,
    /// Where runs are counted.
    pub metrics: Arc<Metrics>,
    /// TLS for the listener.
    pub tls: Option<crate::service::config::TlsSection>,
    /// Notified to re-read the TLS files (SIGHUP in `stepbox serve`).
    pub reload: Arc<tokio::sync::Notify>,
    /// Finished runs kept per tenant for `GetRun`/`ListRuns` in memory (0: none); unused when
    /// `shared_runs` is set.
    pub run_history: usize,
    /// The step catalog (`StepCatalog`, runs by `step_ref`); None: those calls answer
    /// `UNAVAILABLE`.
    pub catalog: Option<Arc<CatalogHandle>>,
    /// Keep the run history in the catalog's store within these bounds (so every replica on
    /// one database finds every run), instead of in memory. Needs `catalog`.
    pub shared_runs: Option<Retention>,
    /// Workflows (`StepWorkflows`): their artifact store and whether schedules may be made;
    /// None: those calls answer `FAILED_PRECONDITION`.
    pub workflows: Option<crate::service::workflow::WorkflowOptions>,
    /// The web page, served on its own listener by the same service (None: off).
    pub web: Option<crate::web::WebServer>,
    /// The running jobs' slots, when something outside the service takes them too (`stepbox
    /// serve`'s scheduled firings); None: the service makes `concurrency` of its own.
    pub slots: Option<Arc<Semaphore>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ServerOptions {
            concurrency: cores,
            queue: 4 * cores,
            max_message_bytes: 64 << 20,
            grace: Duration::from_secs(10),
            model: crate::authoring::generate::ModelConfig::default(),
            tenants: Arc::new(Tenants::default()),
            metrics: Arc::new(Metrics::new()),
            tls: None,
            reload: Arc::new(tokio::sync::Notify::new()),
            run_history: 1000,
            catalog: None,
            shared_runs: None,
            workflows: None,
            web: None,
            slots: None,
        }
    }
}

/// The `StepExecutor` implementation.
#[derive(Debug, Clone)]
pub struct StepService {
    metrics: Arc<Metrics>,
    executor: Arc<Executor>,
    generator: Arc<Generator>,
    admission: Arc<Admission>,
    history: Arc<History>,
    catalog: Option<Arc<CatalogHandle>>,
    workflows: Option<Arc<crate::service::workflow::WorkflowsHandle>>,
    cancel: watch::Receiver<bool>,
}

/// Runs `call` inside `span` and records its gRPC status there.
async fn traced<T>(
    span: tracing::Span,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let result = call.instrument(span.clone()).await;
    record_status(&span, &result);
    result
}

/// The tenant the auth interceptor attached (anonymous when the service runs without one).
fn tenant_of<T>(req: &Request<T>) -> Arc<Tenant> {
    req.extensions()
        .get::<Arc<Tenant>>()
        .cloned()
        .unwrap_or_else(|| {
            Tenants::default()
                .authenticate(req.metadata())
                .expect("the anonymous tenant always authenticates")
        })
}

/// Resolves once the shutdown grace period is over (the watch turns true); never if the sender is
/// gone without having cancelled.
async fn cancelled(mut cancel: watch::Receiver<bool>) {
    while !*cancel.borrow_and_update() {
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Parses the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Resolves at our deadline for a request with the client's `deadline`, counted from now, when the
/// handler starts, rather than from the timer's first poll (a `select!` may poll the job first,
/// and under load its first poll can take longer than the margin below); never without one.
fn deadline_timer(deadline: Option<Duration>) -> impl Future<Output = ()> + Send + 'static {
    let at = deadline.map(|d| tokio::time::Instant::now() + our_deadline(d));
    async move {
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// Our deadline fires a little before tonic's own timeout layer would (which answers CANCELLED),
/// so the client hears DEADLINE_EXCEEDED from us. The margin covers the epoch tick (a running
/// guest yields to the timer once per tick) with room to spare.
fn our_deadline(d: Duration) -> Duration {
    d.saturating_sub((d / 5).min(crate::sandbox::engine::EPOCH_TICK * 5))
}

impl StepService {
    /// A service running jobs on `executor`; `cancel` turning true cancels in-flight jobs.
    pub fn new(
        executor: Arc<Executor>,
        options: &ServerOptions,
        cancel: watch::Receiver<bool>,
    ) -> Result<StepService, GenerateError> {
        let slots = options
            .slots
            .clone()
            .unwrap_or_else(|| Arc::new(Semaphore::new(options.concurrency.max(1))));
        Ok(StepService {
            metrics: options.metrics.clone(),
            generator: Arc::new(
                Generator::new(executor.clone(), options.model.clone())?.with_slots(slots.clone()),
            ),
            executor,
            admission: Arc::new(Admission {
                slots,
                capacity: options.concurrency.max(1) + options.queue,
                admitted: std::sync::atomic::AtomicUsize::new(0),
            }),
            history: Arc::new(match (&options.catalog, options.shared_runs) {
                (Some(catalog), Some(retention)) => {
                    History::Shared(SharedHistory::new(catalog.clone(), retention))
                }
                _ => History::Memory(RunHistory::new(options.run_history)),
            }),
            catalog: options.catalog.clone(),
            workflows: options
                .workflows
                .clone()
                .map(|w| Arc::new(crate::service::workflow::WorkflowsHandle::new(w))),
            cancel,
        })
    }

    /// The tenant's policy check, rate limit and quota, then the server's admission.
    fn admit(
        &self,
        tenant: &Tenant,
        policy: &str,
    ) -> Result<(crate::service::tenancy::TenantTicket, Ticket), Status> {
        tenant
            .check_policy(policy)
            .inspect_err(|_| self.metrics.reject("policy_denied"))?;
        let t = tenant
            .admit()
            .inspect_err(|_| self.metrics.reject("tenant_limit"))?;
        let a = self
            .admission
            .admit()
            .inspect_err(|_| self.metrics.reject("queue_full"))?;
        Ok((t, a))
    }
}

type GenerateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateStepEvent, Status>> + Send>>;

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RunStepEvent, Status>> + Send>>;

#[tonic::async_trait]
impl StepExecutor for StepService {
    async fn run_step(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<pb::RunStepResponse>, Status> {
        self.rpc_run_step(request).await
    }

    type RunStepStreamStream = EventStream;

    async fn run_step_stream(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.rpc_run_step_stream(request).await
    }

    type GenerateStepStream = GenerateStream;

    async fn generate_step(
        &self,
        request: Request<pb::GenerateStepRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        self.rpc_generate_step(request).await
    }

    async fn import_conversation(
        &self,
        request: Request<pb::ImportConversationRequest>,
    ) -> Result<Response<pb::ImportConversationResponse>, Status> {
        self.rpc_import_conversation(request).await
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunRecord>, Status> {
        self.rpc_get_run(request).await
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        self.rpc_list_runs(request).await
    }

    async fn list_runtimes(
        &self,
        request: Request<pb::ListRuntimesRequest>,
    ) -> Result<Response<pb::ListRuntimesResponse>, Status> {
        self.rpc_list_runtimes(request).await
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.rpc_list_policies(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut r = Request::new(());
        assert_eq!(grpc_timeout(&r), None);
        r.metadata_mut()
            .insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_millis(250)));
        r.metadata_mut()
            .insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&r), Some(Duration::from_secs(2)));
        r.metadata_mut()
            .insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&r), None);
    }
}
