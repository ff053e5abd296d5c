//! The web page for people who run published steps from a browser, and its JSON endpoint for
//! scripts, served by `stepbox serve` on an address of its own (`[web] addr`, `--web ADDR`,
//! `STEPBOX_WEB_ADDR`; off unless configured).
//!
//! A third door onto the same core as gRPC: every page calls the [`StepService`] in-process
//! through its `StepExecutor`/`StepCatalog` methods, with the signed-in tenant attached to the
//! request exactly as the gRPC interceptor attaches it. Runs, checks, tenancy, admission and the
//! run history are the gRPC service's own; this module adds only what a browser needs.
//!
//! - [`session`]: sign-in with a tenant's bearer token, kept server-side behind a `Secure`,
//!   `HttpOnly`, `SameSite=Strict` cookie; a CSRF token per session for every state-changing
//!   request. Without tenants everyone is the single local user and needs no sign-in.
//! - [`upload`]: multipart uploads streamed to a temporary directory with the size and count
//!   limits enforced while they arrive; the directory goes whatever happens.
//! - [`results`]: finished runs' outputs kept for download, per tenant, bounded by count, bytes
//!   and age; [`zip`] streams all of a run's outputs as one archive.
//! - [`pages`]: the server-rendered HTML (maud) and [`assets`]: the stylesheet and the small
//!   script, compiled into the binary (no CDN, no build step).
//! - [`routes`]: the handlers: catalog, step, run (live events as NDJSON), result, history,
//!   downloads, and `POST /api/v1/steps/{name}@{ref}:run`.

pub mod assets;
pub mod pages;
pub mod results;
pub mod routes;
pub mod session;
pub mod upload;
pub mod zip;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::service::StepService;
use crate::service::config::WebSection;
use crate::service::tenancy::Tenants;
use crate::service::tls::{Door, ReloadableTls};

/// How the web door is bounded and where it keeps its files.
#[derive(Clone, Debug)]
pub struct WebOptions {
    /// Largest upload of one run, all files (and stdin) together.
    pub max_upload_bytes: u64,
    /// Most files one run may upload.
    pub max_upload_files: usize,
    /// Finished runs whose outputs are kept, per tenant.
    pub keep_runs: usize,
    /// Output bytes kept, per tenant.
    pub keep_bytes: u64,
    /// How long outputs are kept.
    pub keep_for: Duration,
    /// How long a sign-in lasts without use.
    pub session_idle: Duration,
    /// Who may sign in (the server's tenants).
    pub tenants: Arc<Tenants>,
    /// The directory under which a private directory for uploads and kept outputs is made
    /// (removed when the server stops).
    pub parent_dir: PathBuf,
}

impl WebOptions {
    /// Options from `[web]`: `max_upload_default` is the upload limit when the section sets none
    /// (the gRPC message limit).
    pub fn from_section(
        section: &WebSection,
        max_upload_default: u64,
        tenants: Arc<Tenants>,
        parent_dir: PathBuf,
    ) -> WebOptions {
        WebOptions {
            max_upload_bytes: section.max_upload_size.map_or(max_upload_default, |s| s.0),
            max_upload_files: section.max_upload_files,
            keep_runs: section.keep_runs,
            keep_bytes: section.keep_bytes.0,
            keep_for: section.keep_for.0,
            session_idle: section.session_idle.0,
            tenants,
            parent_dir,
        }
    }
}

/// A bound listener and the options of the web door, handed to [`crate::service::serve`] so the
/// page runs on the same [`StepService`] as gRPC.
#[derive(Clone, Debug)]
pub struct WebServer {
    listener: Arc<Mutex<Option<tokio::net::TcpListener>>>,
    options: WebOptions,
}

impl WebServer {
    /// The web door on `listener` (already bound, so the caller can print its address).
    pub fn new(listener: tokio::net::TcpListener, options: WebOptions) -> WebServer {
        WebServer {
            listener: Arc::new(Mutex::new(Some(listener))),
            options,
        }
    }

    /// Starts serving on the tokio runtime, over `tls` when given (the gRPC listener's: same
    /// certificate, same reload). When `stop` turns true the listener closes and requests in
    /// flight may finish; the task ends then, or when aborted (the gRPC server's end).
    pub fn start(
        self,
        service: StepService,
        mut stop: tokio::sync::watch::Receiver<bool>,
        tls: Option<Arc<ReloadableTls>>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| anyhow::anyhow!("the web listener was already used"))?;
        let app = routes::App::new(service, self.options)?;
        let pruner = app.results.clone();
        Ok(tokio::spawn(async move {
            let prune = tokio::spawn(async move {
                let mut tick = tokio::time::interval(results::PRUNE_INTERVAL);
                loop {
                    tick.tick().await;
                    pruner.prune_expired();
                }
            });
            let router = routes::router(app);
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let served = match tls {
                Some(tls) => {
                    let listener = TlsListener {
                        addr: listener.local_addr(),
                        incoming: tls.incoming(listener, Door::Web),
                    };
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stopped)
                        .await
                }
                None => {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stopped)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "the web server stopped");
            }
            prune.abort();
        }))
    }
}

/// The web page's listener over TLS: connections whose handshake has completed
/// ([`ReloadableTls::incoming`]).
struct TlsListener {
    addr: std::io::Result<std::net::SocketAddr>,
    incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr();
                    match peer {
                        Ok(peer) => return (stream, peer),
                        // Gone already.
                        Err(_) => continue,
                    }
                }
                // Failed handshakes are logged where they happen and never sent.
                Some(Err(_)) => continue,
                // The acceptor ended (it ends only with the listener): accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.addr {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}
