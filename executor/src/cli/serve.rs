//! `stepbox serve`: the gRPC service (and metrics) with the configuration from `stepbox.toml`,
//! `STEPBOX_*` variables and flags.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use clap::Args;

use crate::Executor;
use crate::cli::GlobalArgs;
use crate::job::limits::{ByteSize, Millis};
use crate::service::config::Config;

/// `stepbox serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:50051; port 0 picks a free one).
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// The configuration file (stepbox.toml; see `stepbox config check`). STEPBOX_* variables
    /// override its keys and these flags override both.
    #[arg(long, env = "STEPBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Jobs that run at once (default: the number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Jobs that may wait for a slot; past it, RESOURCE_EXHAUSTED (default: 4 x cores).
    #[arg(long)]
    pub queue: Option<usize>,
    /// Largest request accepted (default 64MiB).
    #[arg(long)]
    pub max_message_size: Option<ByteSize>,
    /// How long in-flight jobs may finish after SIGTERM/SIGINT before they are cancelled (default 10s).
    #[arg(long)]
    pub grace_period: Option<Millis>,
    /// Also serve the web page (and its JSON endpoint) on this address, e.g. 127.0.0.1:8080
    /// (port 0 picks a free one); the same as `[web] addr`.
    #[arg(long, value_name = "ADDR")]
    pub web: Option<std::net::SocketAddr>,
    /// The configuration once loaded (for the log settings, before the command runs), so it is
    /// read once.
    #[arg(skip)]
    loaded: OnceLock<Box<Config>>,
}

impl ServeArgs {
    /// The configuration: the file (or defaults), `STEPBOX_*` overrides, then these flags.
    /// Loaded once: later calls return the same configuration.
    pub fn config(&self) -> anyhow::Result<Config> {
        if let Some(c) = self.loaded.get() {
            return Ok(Config::clone(c));
        }
        let mut c = Config::load(self.config.as_deref(), std::env::vars())?;
        if let Some(a) = self.addr {
            c.server.addr = a;
        }
        if let Some(n) = self.concurrency {
            c.server.concurrency = Some(n);
        }
        if let Some(n) = self.queue {
            c.server.queue = Some(n);
        }
        if let Some(s) = self.max_message_size {
            c.server.max_message_size = s;
        }
        if let Some(g) = self.grace_period {
            c.server.grace_period = g;
        }
        if let Some(a) = self.web {
            c.web.get_or_insert_default().addr = a;
        }
        c.check()?;
        Ok(Config::clone(self.loaded.get_or_init(|| Box::new(c))))
    }

    pub(crate) async fn execute(self, mut global: GlobalArgs) -> anyhow::Result<()> {
        let config = self.config()?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        global.work_root = global.work_root.or(config.work_root.clone());
        global.cache_dir = global.cache_dir.or(config.cache_dir.clone());
        global.policies_dir = global.policies_dir.or(config.policies_dir.clone());
        global.python_component = global.python_component.or(config.python_component.clone());
        let mut options = crate::service::ServerOptions::default();
        if let Some(n) = config.server.concurrency {
            options.concurrency = n;
        }
        if let Some(n) = config.server.queue {
            options.queue = n;
        }
        options.max_message_bytes =
            usize::try_from(config.server.max_message_size.0).unwrap_or(usize::MAX);
        options.grace = config.server.grace_period.0;
        options.model = config.model.clone();
        options.tls = config.tls.clone();
        options.run_history = config.server.run_history;
        options.tenants = std::sync::Arc::new(crate::service::tenancy::Tenants::from_config(
            &config.tenants,
        )?);
        let addr = config.server.addr;
        if !options.tenants.required() {
            if addr.ip().is_loopback() {
                tracing::info!("no tenants configured: serving unauthenticated on loopback");
            } else {
                tracing::warn!(%addr, "serving WITHOUT authentication on a non-loopback address (server.allow_unauthenticated = true)");
                eprintln!(
                    "stepbox: warning: serving without authentication on {addr}: anyone who can connect may run code"
                );
            }
        }

        let mut executor_config = global.executor_config()?;
        if let crate::executor::Isolation::Workers(w) = &mut executor_config.isolation {
            // One idle worker per concurrent run: a burst up to the limit starts none.
            w.max_idle = options.concurrency;
        }
        let executor = std::sync::Arc::new(Executor::new(executor_config)?);
        if let Err(e) = executor.warm_up().await {
            tracing::warn!(error = %e, "the python runtime is not ready; python jobs will be refused");
        }
        (options.catalog, options.shared_runs) =
            crate::service::catalog::CatalogHandle::from_config(&config.catalog, executor.clone())
                .await?;
        // Workflows over gRPC (`StepWorkflows`); schedules only where something fires them.
        options.workflows = match artifacts_for(&config.workflows) {
            Ok(a) => Some(crate::service::workflow::WorkflowOptions {
                section: config.workflows.clone(),
                artifacts: std::sync::Arc::new(a),
                concurrency: workflow_concurrency(&config),
                schedules: config.catalog.database.is_some(),
            }),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "workflow calls are off");
                None
            }
        };
        if let Some(m) = &config.metrics {
            let listener = tokio::net::TcpListener::bind(m.addr)
                .await
                .with_context(|| format!("failed to listen for metrics on {}", m.addr))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            tokio::spawn(crate::service::metrics::serve_metrics(
                options.metrics.clone(),
                listener,
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr}"))?;
        let local = listener.local_addr()?;
        let web = match &config.web {
            Some(section) => {
                let web = tokio::net::TcpListener::bind(section.addr)
                    .await
                    .with_context(|| {
                        format!("failed to listen for the web page on {}", section.addr)
                    })?;
                let web_addr = web.local_addr()?;
                if config.tls.is_none() && !web_addr.ip().is_loopback() {
                    tracing::warn!(addr = %web_addr, "the web page is served over plain HTTP on a non-loopback address: browsers keep its Secure sign-in cookie only over HTTPS, so put a TLS proxy in front or configure [tls]");
                }
                let parent = global
                    .work_root
                    .clone()
                    .unwrap_or_else(crate::default_work_root);
                options.web = Some(crate::web::WebServer::new(
                    web,
                    crate::web::WebOptions::from_section(
                        section,
                        config.server.max_message_size.0,
                        options.tenants.clone(),
                        parent,
                    ),
                ));
                Some(web_addr)
            }
            None => None,
        };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}")?;
            if let Some(w) = web {
                let scheme = if options.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                writeln!(out, "web page on {scheme}://{w}")?;
            }
            out.flush()?;
        }
        tracing::info!(addr = %local, concurrency = options.concurrency, queue = options.queue, tls = options.tls.is_some(), "serving");
        if options.tls.is_some() {
            let reload = options.reload.clone();
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the TLS certificate and key");
                    reload.notify_one();
                }
            });
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Scheduled firings' steps take the same slots as every other job, so a schedule never
        // runs more than `concurrency` steps alongside the gRPC and web ones.
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
        options.slots = Some(slots.clone());
        let scheduler = match (&config.catalog.database, &options.catalog) {
            (Some(_), Some(handle)) => Some(tokio::spawn(run_scheduler(
                handle.clone(),
                config.workflows.clone(),
                workflow_concurrency(&config),
                slots,
                options.metrics.clone(),
                options.grace,
                stop_rx,
            ))),
            _ => None,
        };
        let shutdown = async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            let _ = stop_tx.send(true);
        };
        crate::service::serve(executor, listener, options, shutdown).await?;
        if let Some(s) = scheduler {
            let _ = s.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Workflow steps a scheduled run starts at once: `[server] concurrency`, else the cores.
fn workflow_concurrency(config: &Config) -> usize {
    config
        .server
        .concurrency
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// This replica's name in firing records: `$HOSTNAME` (a pod's name), else the host name, with
/// the process id.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "stepbox".into());
    format!("{host}:{}", std::process::id())
}

/// The workflow scheduler of a server with a configured `[catalog] database`: it waits for the
/// database (retrying like the catalog handle, so a database down at start does not stop the
/// server), then fires schedules until shutdown, and lets running firings finish within the
/// grace period. Each firing's steps take `slots`, the server's; its runs are counted in
/// `metrics`.
async fn run_scheduler(
    handle: std::sync::Arc<crate::service::catalog::CatalogHandle>,
    section: crate::workflow::schedule::WorkflowsSection,
    concurrency: usize,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    metrics: std::sync::Arc<crate::service::metrics::Metrics>,
    grace: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::workflow::schedule::{Scheduler, SchedulerOptions, SystemClock};
    let stopped = |stop: &tokio::sync::watch::Receiver<bool>| {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut warned = false;
    let catalog = loop {
        match handle.get().await {
            Ok(c) => break c,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "workflow schedules wait for the catalog database");
                    warned = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(crate::service::catalog::REOPEN_INTERVAL) => {}
                    () = stopped(&stop) => return,
                }
            }
        }
    };
    let artifacts = match artifacts_for(&section) {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "workflow schedules are off");
            return;
        }
    };
    let pruner = tokio::spawn(prune_artifacts(
        artifacts.clone(),
        section.artifact_retention.0,
    ));
    let workflows =
        crate::workflow::Workflows::new(catalog.clone(), artifacts.clone(), concurrency)
            .with_run_limit(section.artifact_limit.0)
            .with_run_retention(section.runs_kept())
            .with_slots(slots)
            .with_run_observer(crate::service::metrics::workflow_run_observer(metrics));
    let options = SchedulerOptions {
        replica: replica_name(),
        ..SchedulerOptions::default()
    };
    let scheduler = match Scheduler::new(
        catalog.store().clone(),
        workflows,
        artifacts,
        &section,
        std::sync::Arc::new(SystemClock),
        options,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "workflow schedules are off");
            return;
        }
    };
    tracing::info!("workflow schedules running");
    scheduler.run_forever(stopped(&stop)).await;
    if tokio::time::timeout(grace, scheduler.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "scheduled runs still going at the end of the grace period");
    }
    pruner.abort();
}

/// How often `serve` deletes artifacts past `[workflows] artifact_retention`.
const ARTIFACT_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes artifacts unused for `retention`, at start and then every hour.
async fn prune_artifacts(
    artifacts: std::sync::Arc<crate::workflow::artifacts::Artifacts>,
    retention: std::time::Duration,
) {
    let mut tick = tokio::time::interval(ARTIFACT_PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = artifacts.clone();
        match tokio::task::spawn_blocking(move || a.prune(retention)).await {
            Ok(Ok(p)) if p.files > 0 => {
                tracing::info!(
                    files = p.files,
                    bytes = p.bytes,
                    "pruned workflow artifacts"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning workflow artifacts failed"),
            Err(e) => tracing::warn!(error = %e, "pruning workflow artifacts panicked"),
        }
    }
}

/// The artifact store of `[workflows]`: `artifacts`, else the default directory.
pub(crate) fn artifacts_for(
    section: &crate::workflow::schedule::WorkflowsSection,
) -> anyhow::Result<crate::workflow::artifacts::Artifacts> {
    use crate::workflow::artifacts::Artifacts;
    let dir = match &section.artifacts {
        Some(d) => d.clone(),
        None => Artifacts::default_dir().context(
            "no home directory for the artifact store (set [workflows] artifacts or XDG_DATA_HOME)",
        )?,
    };
    Artifacts::open(&dir).map_err(|e| anyhow::anyhow!("`workflows.artifacts`: {e}"))
}
