//! Serving: the listener (plaintext or TLS with reload), health and reflection, authentication,
//! the services (`StepExecutor`, `StepCatalog`, `StepWorkflows`), the shared run history's
//! pruning, and graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

use super::{ServerOptions, StepService};
use crate::Executor;
use crate::pb;
use crate::service::history::{History, PRUNE_INTERVAL};
use pb::step_catalog_server::StepCatalogServer;
use pb::step_executor_server::StepExecutorServer;
use pb::step_workflows_server::StepWorkflowsServer;

/// Serves `executor` on `listener` until `shutdown` resolves; then stops accepting, waits up to
/// the grace period for in-flight jobs, and cancels the rest.
pub async fn serve(
    executor: Arc<Executor>,
    listener: tokio::net::TcpListener,
    mut options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let service = StepService::new(executor, &options, cancel_rx)?;
    let pruner = if let History::Shared(_) = service.history.as_ref() {
        let history = service.history.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let History::Shared(h) = history.as_ref() {
                    h.prune().await;
                }
            }
        }))
    } else {
        None
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<StepExecutorServer<StepService>>()
        .await;
    health.set_serving::<StepCatalogServer<StepService>>().await;
    health
        .set_serving::<StepWorkflowsServer<StepService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let grace = options.grace;
    let tenants = options.tenants.clone();
    let auth_metrics = options.metrics.clone();
    let authenticate = move |mut req: Request<()>| -> Result<Request<()>, Status> {
        let tenant = tenants
            .authenticate(req.metadata())
            .inspect_err(|_| auth_metrics.reject("unauthenticated"))?;
        req.extensions_mut().insert(tenant);
        Ok(req)
    };
    let tls = match &options.tls {
        Some(section) => {
            let tls = crate::service::tls::ReloadableTls::load(section)?;
            let (reloader, reload) = (tls.clone(), options.reload.clone());
            tokio::spawn(async move {
                loop {
                    reload.notified().await;
                    match reloader.reload() {
                        Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the previous certificate")
                        }
                    }
                }
            });
            Some(tls)
        }
        None => None,
    };
    // The web page stops accepting when the gRPC listener does; its runs are cancelled with
    // the rest at the end of the grace period. It is served with the same TLS (and reload).
    let (web_stop, web_stopping) = watch::channel(false);
    let _web = AbortOnDrop(match options.web.take() {
        Some(web) => Some(web.start(service.clone(), web_stopping, tls.clone())?),
        None => None,
    });
    let mut builder = tonic::transport::Server::builder();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = web_stop.send(true);
        tracing::info!(grace = ?grace, "shutting down: no new connections; in-flight jobs may finish");
        health
            .set_not_serving::<StepExecutorServer<StepService>>()
            .await;
        health
            .set_not_serving::<StepCatalogServer<StepService>>()
            .await;
        health
            .set_not_serving::<StepWorkflowsServer<StepService>>()
            .await;
        let _ = stopping_tx.send(());
    };
    tokio::spawn(async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
            let _ = cancel_tx.send(true);
        }
    });
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StepCatalogServer::new(service.clone())
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(usize::MAX),
            authenticate.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StepWorkflowsServer::new(service.clone())
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(usize::MAX),
            authenticate.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StepExecutorServer::new(service)
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(usize::MAX),
            authenticate,
        ));
    let _pruner = AbortOnDrop(pruner);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(
                    tls.incoming(listener, crate::service::tls::Door::Grpc),
                    signal,
                )
                .await?
        }
        None => {
            // Small requests and responses: without TCP_NODELAY, Nagle's algorithm and delayed
            // ACKs add ~40 ms to every call on loopback.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                if let Ok(stream) = &conn {
                    let _ = stream.set_nodelay(true);
                }
                conn
            });
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?
        }
    }
    Ok(())
}

/// Stops a background task when the server returns.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}
