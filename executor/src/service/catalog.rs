//! `StepCatalog` (`PublishStep`, `GetStep`, `ListSteps`, `ListVersions`, `PromoteStep`,
//! `ListPromotions`) and the catalog handle that runs by `step_ref` share.
//!
//! The service is the same [`StepService`] as `StepExecutor`: one tenant extraction, one
//! admission (publishing and promoting run cases, so they take a queue place and a slot like a
//! run), one set of metrics. Permissions: `publish` and `promote` need the tenant's catalog
//! permission (`PERMISSION_DENIED`); a step outside the tenant's `steps` patterns is `NOT_FOUND`
//! with the very words a missing step gets, and is left out of `ListSteps`.
//!
//! The database is opened lazily ([`CatalogHandle`]): a database that is down when the server
//! starts does not stop it; inline steps keep running, and every catalog call (and run by
//! reference) tries to open it again, at most once per [`REOPEN_INTERVAL`], answering
//! `UNAVAILABLE` naming the database (password masked) until it works.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::{StepService, cancelled, deadline_timer, grpc_timeout, tenant_of, traced};
use crate::Executor;
use crate::catalog::model::{Selector, check_name};
use crate::catalog::{Catalog, CatalogError, StageConfig, StepRef};
use crate::pb;
use crate::service::catalog_convert::{
    case_to, catalog_status, definition_from, promotion_to, stages_to, timestamp, version_to,
};
use crate::service::config::CatalogPermission;
use crate::service::convert::bad;
use crate::service::history::Retention;
use crate::service::telemetry::rpc_span_of;
use crate::service::tenancy::Tenant;

/// The full name of the service, for spans.
const SERVICE: &str = "stepbox.v1.StepCatalog";

/// The shortest pause between two attempts to open a database that was down: calls in between
/// get the last failure at once instead of each waiting for the connection timeout.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Most promotion records one `ListPromotions` returns.
const MAX_PROMOTIONS: u32 = 1000;

/// The catalog a server uses, opened on first need: the database URL, the stages, and the
/// [`Catalog`] once the database answered.
pub struct CatalogHandle {
    url: String,
    database: String,
    executor: Arc<Executor>,
    stages: Vec<StageConfig>,
    refresh: Duration,
    ready: OnceLock<Arc<Catalog>>,
    /// Held while opening; the last failure and when it happened.
    opening: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl fmt::Debug for CatalogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL itself: it may carry a password.
        f.debug_struct("CatalogHandle")
            .field("database", &self.database)
            .field("stages", &self.stages)
            .field("refresh", &self.refresh)
            .field("open", &self.ready.get().is_some())
            .finish()
    }
}

impl CatalogHandle {
    /// A handle on an open catalog (tests, and callers that opened it themselves).
    pub fn ready(catalog: Arc<Catalog>) -> CatalogHandle {
        let handle = CatalogHandle {
            url: String::new(),
            database: catalog.store().describe().to_string(),
            executor: catalog.executor().clone(),
            stages: catalog.stages().to_vec(),
            refresh: crate::catalog::DEFAULT_REFRESH,
            ready: OnceLock::new(),
            opening: tokio::sync::Mutex::new(None),
        };
        let _ = handle.ready.set(catalog);
        handle
    }

    /// Opens the catalog at `url` now if it can: a database that is down is logged and retried
    /// on the next call that needs it. Anything else (a malformed URL, a failed migration, a bad
    /// stage list) is an error: the configuration is wrong, not the network.
    pub async fn open(
        url: &str,
        executor: Arc<Executor>,
        stages: Vec<StageConfig>,
        refresh: Duration,
    ) -> anyhow::Result<CatalogHandle> {
        crate::catalog::check_stages(&stages, &executor)
            .map_err(|e| anyhow::anyhow!("[catalog] {e}"))?;
        let handle = CatalogHandle {
            url: url.to_string(),
            database: stepbox_store::mask_url(url),
            executor,
            stages,
            refresh,
            ready: OnceLock::new(),
            opening: tokio::sync::Mutex::new(None),
        };
        match handle.get().await {
            Ok(_) => tracing::info!(database = %handle.database, "step catalog open"),
            Err(CatalogError::Unavailable(why)) => tracing::warn!(
                database = %handle.database,
                error = %why,
                "the catalog database is unavailable; serving inline steps, catalog calls answer \
                 UNAVAILABLE until it answers"
            ),
            Err(e) => anyhow::bail!("the step catalog at {} cannot open: {e}", handle.database),
        }
        Ok(handle)
    }

    /// The catalog `stepbox serve` uses, from `[catalog]`: the configured database, else the
    /// default SQLite file (the CLI's); and, when a database is configured explicitly (the
    /// server is one of several replicas), the bounds of the run history kept in it. Without
    /// a configured database and with no home directory for the default file, the server runs
    /// without a catalog (logged).
    pub async fn from_config(
        section: &crate::service::config::CatalogSection,
        executor: Arc<Executor>,
    ) -> anyhow::Result<(Option<Arc<CatalogHandle>>, Option<Retention>)> {
        let url = match section.database_url() {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "serving without a step catalog");
                return Ok((None, None));
            }
        };
        let handle =
            CatalogHandle::open(&url, executor, section.stages.clone(), section.refresh.0).await?;
        let shared = section.database.is_some().then_some(Retention {
            per_tenant: section.run_history,
            max_age: section.run_retention.0,
        });
        Ok((Some(Arc::new(handle)), shared))
    }

    /// The database, password masked.
    pub fn describe(&self) -> &str {
        &self.database
    }

    /// The catalog if it is open already (no attempt to open it).
    pub fn opened(&self) -> Option<Arc<Catalog>> {
        self.ready.get().cloned()
    }

    /// The catalog, opening the database if it is not open yet (at most one attempt per
    /// [`REOPEN_INTERVAL`]; calls in between get the last failure).
    pub async fn get(&self) -> Result<Arc<Catalog>, CatalogError> {
        if let Some(c) = self.ready.get() {
            return Ok(c.clone());
        }
        let mut last = self.opening.lock().await;
        if let Some(c) = self.ready.get() {
            return Ok(c.clone());
        }
        if let Some((at, why)) = last.as_ref()
            && at.elapsed() < REOPEN_INTERVAL
        {
            return Err(CatalogError::Unavailable(why.clone()));
        }
        let (url, executor, stages, refresh) = (
            self.url.clone(),
            self.executor.clone(),
            self.stages.clone(),
            self.refresh,
        );
        let opened = open_catalog(url, executor, stages, refresh).await;
        match opened {
            Ok(c) => {
                let c = Arc::new(c);
                let _ = self.ready.set(c.clone());
                *last = None;
                Ok(c)
            }
            Err(e) => {
                let why = e.to_string();
                *last = Some((Instant::now(), why.clone()));
                Err(match e {
                    CatalogError::Unavailable(_) => CatalogError::Unavailable(why),
                    other => other,
                })
            }
        }
    }
}

/// Opens the store and the catalog on it. sqlx's migrator future is not provably `Send` from
/// inside generic code (its `Acquire` bound trips rust-lang/rust#110338, "implementation of
/// `Acquire` is not general enough"), so the opening runs on a blocking thread of the same
/// runtime, where it need not be `Send`. It happens once per server (or once per
/// [`REOPEN_INTERVAL`] while the database is down).
async fn open_catalog(
    url: String,
    executor: Arc<Executor>,
    stages: Vec<StageConfig>,
    refresh: Duration,
) -> Result<Catalog, CatalogError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            let store = stepbox_store::Store::open(&url).await?;
            Catalog::new(store, executor, stages, Some(refresh)).await
        })
    })
    .await
    .unwrap_or_else(|e| {
        Err(CatalogError::Unavailable(format!(
            "opening the catalog failed: {e}"
        )))
    })
}

/// `NOT_FOUND` for a reference that selects nothing: the same words whether the step does not
/// exist or the tenant may not see it.
pub(crate) fn ref_not_found(r: &StepRef) -> Status {
    Status::not_found(match &r.selector {
        Selector::Latest => format!("no verified version of step `{}`", r.name),
        Selector::Stage(s) => format!("no version of step `{}` in stage `{s}`", r.name),
        Selector::Number(_) | Selector::Digest(_) => format!("no version `{r}`"),
    })
}

/// `NOT_FOUND` for a step name: the same words whether it does not exist or the tenant may not
/// see it.
pub(crate) fn step_not_found(name: &str) -> Status {
    Status::not_found(format!("no step `{name}`"))
}

/// Maps an error of a call about `r`: not-found as [`ref_not_found`], the rest as
/// [`catalog_status`].
fn ref_status(r: &StepRef) -> impl Fn(CatalogError) -> Status + '_ {
    move |e| match e {
        CatalogError::NotFound(_) => ref_not_found(r),
        other => catalog_status(other, ""),
    }
}

/// Refuses a `NAME@STAGE` reference to a stage the catalog does not have, naming `field`
/// (before anything is looked up, so visible and invisible steps answer alike).
fn check_ref_stage(catalog: &Catalog, r: &StepRef, field: &str) -> Result<(), Status> {
    match &r.selector {
        Selector::Stage(s) => check_stage(catalog, s, field),
        _ => Ok(()),
    }
}

fn check_stage(catalog: &Catalog, stage: &str, field: &str) -> Result<(), Status> {
    if catalog.stages().iter().any(|c| c.name == stage) {
        return Ok(());
    }
    Err(bad(
        field,
        format!(
            "unknown stage `{stage}`: this catalog's stages are {}",
            catalog
                .stages()
                .iter()
                .map(|s| format!("`{}`", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

impl StepService {
    /// The catalog, or `UNAVAILABLE` naming why not.
    pub(crate) async fn catalog(&self) -> Result<Arc<Catalog>, Status> {
        let handle = self.catalog.as_ref().ok_or_else(|| {
            Status::unavailable("this server has no step catalog configured ([catalog] database)")
        })?;
        handle.get().await.map_err(|e| catalog_status(e, ""))
    }

    /// A reference the tenant may run: parsed (naming `step_ref`), its stage known, the step
    /// visible to the tenant, resolved through the catalog's cache.
    pub(crate) async fn resolve_for(
        &self,
        tenant: &Tenant,
        step_ref: &str,
    ) -> Result<Arc<crate::catalog::Resolved>, Status> {
        let r = StepRef::parse("step_ref", step_ref).map_err(|e| bad(&e.field, e.reason))?;
        let catalog = self.catalog().await?;
        check_ref_stage(&catalog, &r, "step_ref")?;
        if !tenant.may_see(&r.name) {
            return Err(ref_not_found(&r));
        }
        catalog.resolve(&r).await.map_err(ref_status(&r))
    }

    /// Runs `work` (which runs cases) admitted like a run under `policy`: the tenant's policy
    /// check, rate and quota, a queue place and a slot; stopped by the client's deadline and by
    /// shutdown.
    pub(crate) async fn run_admitted<T>(
        &self,
        tenant: &Tenant,
        policy: &str,
        deadline: Option<Duration>,
        work: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let (_tenant_ticket, _ticket) = self.admit(tenant, policy)?;
        let _in_flight = self.metrics.in_flight();
        let work = async {
            let _slot = self
                .admission
                .slots
                .acquire()
                .await
                .map_err(|_| Status::unavailable("the server is shutting down"))?;
            work.await
        };
        let timer = deadline_timer(deadline);
        tokio::select! {
            r = work => r,
            () = timer => Err(Status::deadline_exceeded("the client's deadline passed; the cases were stopped and nothing was stored")),
            () = cancelled(self.cancel.clone()) => Err(Status::unavailable("the server is shutting down; the cases were stopped and nothing was stored")),
        }
    }

    pub(super) async fn rpc_publish_step(
        &self,
        request: Request<pb::PublishStepRequest>,
    ) -> Result<Response<pb::PublishStepResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "PublishStep", request.metadata(), &tenant.name);
        traced(span, async {
            tenant.require(CatalogPermission::Publish)?;
            let req = request.into_inner();
            let def = definition_from(req.step)?;
            check_name("step.name", &def.name).map_err(|e| bad(&e.field, e.reason))?;
            if !tenant.may_see(&def.name) {
                return Err(Status::permission_denied(format!(
                    "tenant `{}` may not publish step `{}`: the name is outside its `steps` patterns",
                    tenant.name, def.name
                )));
            }
            let catalog = self.catalog().await?;
            let policy = def.policy.clone();
            let publication = self
                .run_admitted(&tenant, &policy, deadline, async {
                    catalog.publish(&def, &tenant.name, req.allow_unverified).await
                        .map_err(|e| catalog_status(e, "step."))
                })
                .await?;
            let refused_reason = match &publication.version {
                Some(_) => String::new(),
                None if publication.cases.is_empty() => format!(
                    "step `{}` has no cases: a version is verified only by passing cases; add \
                     cases, or set allow_unverified to store it unverified",
                    def.name
                ),
                None => {
                    let failed: Vec<&str> = publication
                        .cases
                        .iter()
                        .filter(|c| !c.passed())
                        .map(|c| c.case.as_str())
                        .collect();
                    format!(
                        "{} of {} cases failed: {}; nothing was stored (set allow_unverified to \
                         store it unverified)",
                        failed.len(),
                        publication.cases.len(),
                        failed.join(", ")
                    )
                }
            };
            Ok(Response::new(pb::PublishStepResponse {
                version: publication
                    .version
                    .as_deref()
                    .map(|v| version_to(v, true))
                    .transpose()?,
                created: publication.created,
                refused_reason,
                case_results: publication.cases.iter().map(case_to).collect(),
            }))
        })
        .await
    }

    pub(super) async fn rpc_get_step(
        &self,
        request: Request<pb::GetStepRequest>,
    ) -> Result<Response<pb::GetStepResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "GetStep", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let r =
                StepRef::parse("step_ref", &req.step_ref).map_err(|e| bad(&e.field, e.reason))?;
            let catalog = self.catalog().await?;
            check_ref_stage(&catalog, &r, "step_ref")?;
            if !tenant.may_see(&r.name) {
                return Err(step_not_found(&r.name));
            }
            let overview = catalog.overview(&r.name).await.map_err(|e| match e {
                CatalogError::NotFound(_) => step_not_found(&r.name),
                other => catalog_status(other, ""),
            })?;
            let selected = match catalog.resolve_uncached(&r).await {
                Ok(resolved) => Some(version_to(&resolved.version, true)?),
                // A step with only unverified versions has no `latest`.
                Err(CatalogError::NotFound(_)) if r.selector == Selector::Latest => None,
                Err(e) => return Err(ref_status(&r)(e)),
            };
            let policies: HashMap<String, Option<String>> = catalog
                .stages()
                .iter()
                .map(|s| (s.name.clone(), s.policy.clone()))
                .collect();
            Ok(Response::new(pb::GetStepResponse {
                name: overview.name.clone(),
                versions: overview
                    .versions
                    .iter()
                    .map(|v| version_to(v, false))
                    .collect::<Result<_, _>>()?,
                stages: stages_to(&overview, &policies),
                selected,
            }))
        })
        .await
    }

    pub(super) async fn rpc_list_steps(
        &self,
        request: Request<pb::ListStepsRequest>,
    ) -> Result<Response<pb::ListStepsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListSteps", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let catalog = self.catalog().await?;
            let filter = (!req.filter.is_empty()).then_some(req.filter.as_str());
            let names = catalog
                .list(filter)
                .await
                .map_err(|e| catalog_status(e, ""))?;
            Ok(Response::new(pb::ListStepsResponse {
                steps: names
                    .into_iter()
                    .filter(|n| tenant.may_see(&n.name))
                    .map(|n| pb::StepSummary {
                        name: n.name,
                        description: n.description,
                        latest_number: n.latest_number,
                        latest_digest: n.latest_digest,
                        latest_verified: n.latest_state == stepbox_store::VersionState::Verified,
                        updated_at: Some(timestamp(n.updated_at)),
                        versions: n.versions,
                    })
                    .collect(),
            }))
        })
        .await
    }

    pub(super) async fn rpc_list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListVersions", request.metadata(), &tenant.name);
        traced(span, async {
            let name = request.into_inner().name;
            check_name("name", &name).map_err(|e| bad(&e.field, e.reason))?;
            let catalog = self.catalog().await?;
            if !tenant.may_see(&name) {
                return Err(step_not_found(&name));
            }
            let overview = catalog.overview(&name).await.map_err(|e| match e {
                CatalogError::NotFound(_) => step_not_found(&name),
                other => catalog_status(other, ""),
            })?;
            Ok(Response::new(pb::ListVersionsResponse {
                versions: overview
                    .versions
                    .iter()
                    .map(|v| version_to(v, false))
                    .collect::<Result<_, _>>()?,
            }))
        })
        .await
    }

    pub(super) async fn rpc_promote_step(
        &self,
        request: Request<pb::PromoteStepRequest>,
    ) -> Result<Response<pb::PromoteStepResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "PromoteStep", request.metadata(), &tenant.name);
        traced(span, async {
            tenant.require(CatalogPermission::Promote)?;
            let req = request.into_inner();
            let r =
                StepRef::parse("step_ref", &req.step_ref).map_err(|e| bad(&e.field, e.reason))?;
            let catalog = self.catalog().await?;
            check_ref_stage(&catalog, &r, "step_ref")?;
            check_stage(&catalog, &req.stage, "stage")?;
            if !tenant.may_see(&r.name) {
                return Err(ref_not_found(&r));
            }
            let resolved = catalog.resolve_uncached(&r).await.map_err(ref_status(&r))?;
            let policy = catalog
                .stages()
                .iter()
                .find(|s| s.name == req.stage)
                .and_then(|s| s.policy.clone())
                .unwrap_or_else(|| resolved.version.definition.policy.clone());
            let result = self
                .run_admitted(&tenant, &policy, deadline, async {
                    catalog
                        .promote(&r, &req.stage, &tenant.name)
                        .await
                        .map_err(ref_status(&r))
                })
                .await?;
            let numbers = self.version_numbers(&catalog, &r.name).await?;
            Ok(Response::new(pb::PromoteStepResponse {
                promoted: result.promoted,
                reason: result.reason,
                record: Some(promotion_to(&result.record, &numbers)),
                case_results: result.cases.iter().map(case_to).collect(),
            }))
        })
        .await
    }

    /// Version numbers of `name` by digest (for audit records, which hold digests).
    async fn version_numbers(
        &self,
        catalog: &Catalog,
        name: &str,
    ) -> Result<HashMap<String, i64>, Status> {
        let overview = catalog.overview(name).await.map_err(|e| match e {
            CatalogError::NotFound(_) => step_not_found(name),
            other => catalog_status(other, ""),
        })?;
        Ok(overview
            .versions
            .iter()
            .map(|v| (v.digest.clone(), v.number))
            .collect())
    }

    pub(super) async fn rpc_list_promotions(
        &self,
        request: Request<pb::ListPromotionsRequest>,
    ) -> Result<Response<pb::ListPromotionsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListPromotions", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            check_name("name", &req.name).map_err(|e| bad(&e.field, e.reason))?;
            let limit = match req.limit {
                0 => 100,
                n if n <= MAX_PROMOTIONS => n,
                n => {
                    return Err(bad(
                        "limit",
                        format!("{n} is more than {MAX_PROMOTIONS}; ask for 1 to {MAX_PROMOTIONS} (0 means 100)"),
                    ));
                }
            };
            let catalog = self.catalog().await?;
            if !tenant.may_see(&req.name) {
                return Err(step_not_found(&req.name));
            }
            let numbers = self.version_numbers(&catalog, &req.name).await?;
            let records = catalog.history(&req.name, limit).await
                .map_err(|e| catalog_status(e, ""))?;
            Ok(Response::new(pb::ListPromotionsResponse {
                promotions: records
                    .iter()
                    .map(|r| promotion_to(r, &numbers))
                    .collect(),
            }))
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::step_catalog_server::StepCatalog for StepService {
    async fn publish_step(
        &self,
        request: Request<pb::PublishStepRequest>,
    ) -> Result<Response<pb::PublishStepResponse>, Status> {
        self.rpc_publish_step(request).await
    }

    async fn get_step(
        &self,
        request: Request<pb::GetStepRequest>,
    ) -> Result<Response<pb::GetStepResponse>, Status> {
        self.rpc_get_step(request).await
    }

    async fn list_steps(
        &self,
        request: Request<pb::ListStepsRequest>,
    ) -> Result<Response<pb::ListStepsResponse>, Status> {
        self.rpc_list_steps(request).await
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        self.rpc_list_versions(request).await
    }

    async fn promote_step(
        &self,
        request: Request<pb::PromoteStepRequest>,
    ) -> Result<Response<pb::PromoteStepResponse>, Status> {
        self.rpc_promote_step(request).await
    }

    async fn list_promotions(
        &self,
        request: Request<pb::ListPromotionsRequest>,
    ) -> Result<Response<pb::ListPromotionsResponse>, Status> {
        self.rpc_list_promotions(request).await
    }
}
