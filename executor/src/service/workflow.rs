//! `StepWorkflows`: publish, promote, list and run workflows (`RunWorkflow`,
//! `ResumeWorkflowRun` streamed, `GetWorkflowRun`), and their schedules.
//!
//! The service is the same [`StepService`]: one tenant extraction, one admission, one catalog.
//! Tenancy: a workflow outside the tenant's `steps` name patterns, and a workflow using a step
//! outside them, is `NOT_FOUND` worded like a missing one; runs and schedules are the tenant's
//! own (another tenant's id is `NOT_FOUND`, worded alike). Permissions: publishing needs
//! `publish`, promoting `promote`, running anything that uses the catalog `run`; every step's
//! policy must be one the tenant may use.
//!
//! Admission: a run, publication or promotion takes one queue place of the tenant and of the
//! server for its whole length, and each of its steps one of the server's slots while it runs
//! (up to the workflow concurrency at once), so workflow steps and single runs share one bound.
//! The client's deadline, the client going away and shutdown stop a run; nothing is recorded
//! then.
//! A recorded run's inputs and inline definition are kept as artifacts, so it resumes by id
//! alone; nothing is kept for a request that is refused or stopped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{StepService, cancelled, deadline_timer, grpc_timeout, tenant_of, traced};
use crate::catalog::Catalog;
use crate::catalog::model::StepRef;
use crate::catalog::model::check_name;
use crate::pb;
use crate::service::catalog::ref_not_found;
use crate::service::catalog_convert::{catalog_status, promotion_to, timestamp};
use crate::service::config::CatalogPermission;
use crate::service::convert::bad;
use crate::service::telemetry::{record_status, rpc_span_of};
use crate::service::tenancy::Tenant;
use crate::service::workflow_convert::{
    DEFAULT_MAX_OUTPUT_BYTES, case_to, dir_from, firing_to, inline_from, inputs_from, model_status,
    overlap_from, run_not_found, run_to, schedule_not_found, schedule_status, schedule_to, step_to,
    version_to, workflow_not_found, workflow_status,
};
use crate::workflow::artifacts::Artifacts;
use crate::workflow::model::{Plan, StepKind, WorkflowFile};
use crate::workflow::schedule::{
    RootKind, Schedule, ScheduleInputs, Scheduler, SchedulerOptions, SystemClock, WorkflowsSection,
};
use crate::workflow::{Trigger, WorkflowEvent, WorkflowRunRecord, Workflows};

/// The full name of the service, for spans.
const SERVICE: &str = "stepbox.v1.StepWorkflows";

/// Most firings one `ListFirings` returns.
const MAX_FIRINGS: u32 = 1000;

/// Most runs one `ListWorkflowRuns` returns.
const MAX_RUNS_LISTED: u32 = 500;

/// Workflows on a server: where their files are kept and whether schedules may be made.
#[derive(Clone, Debug)]
pub struct WorkflowOptions {
    /// `[workflows]`: roots for inboxes and outboxes, the per-run limit, firing retention.
    pub section: WorkflowsSection,
    /// The artifact store (files between steps, workflow inputs, inline definitions).
    pub artifacts: Arc<Artifacts>,
    /// Steps of one run that run at once.
    pub concurrency: usize,
    /// Whether schedules may be created: true only when something fires them (a configured
    /// `[catalog] database`, shared by every replica); otherwise schedule calls answer
    /// `FAILED_PRECONDITION`.
    pub schedules: bool,
}

/// The workflow runner and scheduler of a server, made once the catalog is open.
#[derive(Debug)]
pub struct WorkflowsHandle {
    options: WorkflowOptions,
    ready: tokio::sync::OnceCell<(Workflows, Scheduler)>,
}

impl WorkflowsHandle {
    /// A handle with these options.
    pub fn new(options: WorkflowOptions) -> WorkflowsHandle {
        WorkflowsHandle {
            options,
            ready: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(
        &self,
        catalog: Arc<Catalog>,
        slots: Arc<tokio::sync::Semaphore>,
        metrics: Arc<crate::service::metrics::Metrics>,
    ) -> Result<&(Workflows, Scheduler), Status> {
        self.ready
            .get_or_try_init(|| async {
                let o = &self.options;
                let workflows = Workflows::new(catalog.clone(), o.artifacts.clone(), o.concurrency)
                    .with_run_limit(o.section.artifact_limit.0)
                    .with_run_retention(o.section.runs_kept())
                    .with_slots(slots)
                    .with_run_observer(crate::service::metrics::workflow_run_observer(metrics));
                let scheduler = Scheduler::new(
                    catalog.store().clone(),
                    workflows.clone(),
                    o.artifacts.clone(),
                    &o.section,
                    Arc::new(SystemClock),
                    SchedulerOptions::default(),
                )
                .map_err(|e| Status::failed_precondition(format!("[workflows]: {e}")))?;
                Ok((workflows, scheduler))
            })
            .await
    }
}

/// What a run runs: its plan and its `source` for the record.
struct Target {
    plan: Plan,
    source: String,
    /// The reference, for not-found wording.
    r: Option<StepRef>,
    /// An inline definition to keep (as an artifact, once the run is recorded).
    keep: Option<Vec<u8>>,
}

impl StepService {
    /// The catalog for workflow calls: `FAILED_PRECONDITION` when the server has none.
    async fn workflow_catalog(&self) -> Result<Arc<Catalog>, Status> {
        if self.catalog.is_none() {
            return Err(Status::failed_precondition(
                "this server has no step catalog ([catalog] database): workflows need one for \
                 their versions and run records",
            ));
        }
        self.catalog().await
    }

    /// The runner, the scheduler and the artifacts.
    async fn workflows(&self) -> Result<(&Workflows, &Scheduler, &WorkflowOptions), Status> {
        let catalog = self.workflow_catalog().await?;
        let handle = self.workflows.as_ref().ok_or_else(|| {
            Status::failed_precondition("this server has no [workflows] artifact store configured")
        })?;
        let (w, s) = handle
            .get(catalog, self.admission.slots.clone(), self.metrics.clone())
            .await?;
        Ok((w, s, &handle.options))
    }

    /// Checks the tenant may run `plan`: every catalog step visible (else `NOT_FOUND` worded
    /// like a missing step, naming the step), the `run` permission when it uses the catalog,
    /// and every step's policy allowed.
    async fn vet(&self, tenant: &Tenant, plan: &Plan) -> Result<(), Status> {
        let catalog = self.workflow_catalog().await?;
        let mut uses_catalog = false;
        for s in &plan.steps {
            let policy = match &s.kind {
                StepKind::Catalog(r) => {
                    uses_catalog = true;
                    if !tenant.may_see(&r.name) {
                        let e = ref_not_found(r);
                        return Err(Status::not_found(format!(
                            "step `{}`: {}",
                            s.id,
                            e.message()
                        )));
                    }
                    match catalog.resolve(r).await {
                        Ok(resolved) => resolved.policy.clone(),
                        Err(crate::catalog::CatalogError::NotFound(_)) => {
                            let e = ref_not_found(r);
                            return Err(Status::not_found(format!(
                                "step `{}`: {}",
                                s.id,
                                e.message()
                            )));
                        }
                        Err(e) => return Err(catalog_status(e, "")),
                    }
                }
                StepKind::Program { policy, .. } => policy.clone(),
            };
            tenant.check_policy(&policy)?;
        }
        if uses_catalog {
            tenant.require(CatalogPermission::Run)?;
        }
        Ok(())
    }

    /// A published workflow the tenant may see, resolved.
    async fn resolve_target(
        &self,
        tenant: &Tenant,
        raw: &str,
        field: &str,
    ) -> Result<Target, Status> {
        let r = StepRef::parse(field, raw).map_err(model_status)?;
        let (w, _, _) = self.workflows().await?;
        if !tenant.may_see(&r.name) {
            return Err(workflow_not_found(&r));
        }
        let (row, _, plan) = w
            .resolve_workflow(&r)
            .await
            .map_err(|e| workflow_status(e, Some(&r)))?;
        Ok(Target {
            plan,
            source: format!("{}@sha256:{}", row.name, row.digest),
            r: Some(r),
            keep: None,
        })
    }

    /// An inline workflow, planned; its definition is kept as an artifact once its run is
    /// recorded (for resumes by id).
    async fn inline_target(
        &self,
        tenant: &Tenant,
        inline: Option<pb::InlineWorkflow>,
        field: &str,
    ) -> Result<Target, Status> {
        let (wf, _) = inline_from(field, inline)?;
        // FAILED_PRECONDITION first when the server cannot run workflows at all.
        self.workflows().await?;
        let plan = wf.plan().map_err(model_status)?;
        if !tenant.may_see(&plan.name) {
            return Err(Status::permission_denied(format!(
                "tenant `{}` may not run workflow `{}`: the name is outside its `steps` patterns",
                tenant.name, plan.name
            )));
        }
        let json = serde_json::to_vec(&wf).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Target {
            plan,
            source: format!("inline:sha256:{}", crate::job::digest::sha256_hex(&json)),
            r: None,
            keep: Some(json),
        })
    }

    /// The target a run record's `source` names.
    async fn source_target(
        &self,
        tenant: &Tenant,
        rec: &WorkflowRunRecord,
    ) -> Result<Target, Status> {
        let (_, _, o) = self.workflows().await?;
        if let Some(digest) = rec.source.strip_prefix("inline:sha256:") {
            let bytes = o.artifacts.get(digest).map_err(|e| {
                Status::failed_precondition(format!(
                    "the definition of run `{}` is no longer kept ({e}): run it again with \
                     RunWorkflow",
                    rec.run_id
                ))
            })?;
            let wf: WorkflowFile = serde_json::from_slice(&bytes)
                .map_err(|e| Status::internal(format!("a kept definition is unreadable: {e}")))?;
            let plan = wf.plan().map_err(model_status)?;
            return Ok(Target {
                plan,
                source: rec.source.clone(),
                r: None,
                keep: None,
            });
        }
        if rec.source.is_empty() {
            return Err(Status::failed_precondition(format!(
                "run `{}` was of a workflow file: resume it where it ran, with `stepbox workflow \
                 run FILE --resume {}`",
                rec.run_id, rec.run_id
            )));
        }
        self.resolve_target(tenant, &rec.source, "run_id").await
    }

    /// Runs `target` on `inputs` as a stream: admitted, bounded by the deadline, stopped when
    /// the client goes away or the server shuts down; the record is stored, then sent last.
    #[allow(clippy::too_many_arguments)]
    async fn stream_run(
        &self,
        tenant: Arc<Tenant>,
        span: tracing::Span,
        target: Target,
        inputs: BTreeMap<String, bytes::Bytes>,
        resume: Option<WorkflowRunRecord>,
        deadline: Option<Duration>,
        max_output_bytes: u64,
    ) -> Result<Response<WorkflowStream>, Status> {
        self.vet(&tenant, &target.plan).await?;
        let (workflows, _, o) = self.workflows().await?;
        let workflows = workflows.clone();
        let artifacts = o.artifacts.clone();
        // Refuse at once when full, rather than after opening the stream.
        let (tenant_ticket, ticket) = self.place(&tenant)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::WorkflowRunEvent, Status>>(64);
        let service = self.clone();
        tokio::spawn(async move {
            let _tickets = (tenant_ticket, ticket);
            let _in_flight = service.metrics.in_flight();
            let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<WorkflowEvent>();
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(ev) = ev_rx.recv().await {
                        let event = match ev {
                            WorkflowEvent::Queued(id) => pb::workflow_run_event::Event::Queued(id),
                            WorkflowEvent::Started(id) => {
                                pb::workflow_run_event::Event::Started(id)
                            }
                            WorkflowEvent::Finished(r) => {
                                pb::workflow_run_event::Event::Finished(step_to(&r))
                            }
                        };
                        if tx
                            .send(Ok(pb::WorkflowRunEvent { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            let run = async {
                let record = workflows
                    .run(&target.plan, inputs.clone(), resume.as_ref(), Some(ev_tx))
                    .await
                    .map_err(|e| workflow_status(e, target.r.as_ref()))?
                    .with_origin(Trigger::Api, target.source.clone());
                // Kept only for runs that are recorded: what a resume by id reads back.
                for (name, b) in &inputs {
                    artifacts
                        .put(b)
                        .map_err(|e| Status::internal(format!("input `{name}`: {e}")))?;
                }
                if let Some(def) = &target.keep {
                    artifacts.put(def).map_err(Status::internal)?;
                }
                workflows
                    .save_run(&tenant.name, &record)
                    .await
                    .map_err(|e| catalog_status(e.into(), ""))?;
                Ok::<_, Status>(record)
            };
            let timer = deadline_timer(deadline);
            let closed = tx.closed();
            // A client that goes away cancels the run: dropping `run` stops its steps.
            let result = tokio::select! {
                (r, ()) = async { tokio::join!(run, forward) } => r,
                () = timer => Err(Status::deadline_exceeded("the client's deadline passed; the workflow run was stopped and not recorded")),
                () = cancelled(service.cancel.clone()) => Err(Status::unavailable("the server is shutting down; the workflow run was stopped and not recorded")),
                () = closed => {
                    record_status::<()>(&span, &Err(Status::cancelled("the client went away")));
                    return;
                }
            };
            record_status(&span, &result);
            let last = result.map(|record| pb::WorkflowRunEvent {
                event: Some(pb::workflow_run_event::Event::Result(run_to(
                    &record,
                    max_output_bytes,
                    |name| workflows.output(&record, name),
                ))),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// A queue place of the tenant and of the server (no slot: each step takes its own).
    fn place(
        &self,
        tenant: &Tenant,
    ) -> Result<
        (
            crate::service::tenancy::TenantTicket,
            crate::service::admission::Ticket,
        ),
        Status,
    > {
        let t = tenant
            .admit()
            .inspect_err(|_| self.metrics.reject("tenant_limit"))?;
        let a = self
            .admission
            .admit()
            .inspect_err(|_| self.metrics.reject("queue_full"))?;
        Ok((t, a))
    }

    /// Runs `work` (publishing or promoting: it runs cases, whose steps take slots themselves)
    /// with a queue place, stopped by the client's deadline and by shutdown.
    async fn with_place<T>(
        &self,
        tenant: &Tenant,
        deadline: Option<Duration>,
        work: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let _place = self.place(tenant)?;
        let _in_flight = self.metrics.in_flight();
        let timer = deadline_timer(deadline);
        tokio::select! {
            r = work => r,
            () = timer => Err(Status::deadline_exceeded("the client's deadline passed; the cases were stopped and nothing was stored")),
            () = cancelled(self.cancel.clone()) => Err(Status::unavailable("the server is shutting down; the cases were stopped and nothing was stored")),
        }
    }

    pub(super) async fn rpc_run_workflow(
        &self,
        request: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<WorkflowStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "RunWorkflow", request.metadata(), &tenant.name);
        let req = request.into_inner();
        let prepared = traced(span.clone(), async {
            let target = match req.workflow {
                Some(pb::run_workflow_request::Workflow::WorkflowRef(r)) => {
                    self.resolve_target(&tenant, &r, "workflow_ref").await?
                }
                Some(pb::run_workflow_request::Workflow::Inline(w)) => {
                    self.inline_target(&tenant, Some(w), "inline").await?
                }
                None => {
                    return Err(bad(
                        "workflow",
                        "is missing: set `workflow_ref` (a published workflow) or `inline`",
                    ));
                }
            };
            let inputs = inputs_from("inputs", req.inputs)?;
            Ok((target, inputs))
        })
        .await?;
        let (target, inputs) = prepared;
        let max = output_bound(req.max_output_bytes);
        self.stream_run(tenant, span, target, inputs, None, deadline, max)
            .instrument(tracing::Span::current())
            .await
    }

    pub(super) async fn rpc_resume_workflow_run(
        &self,
        request: Request<pb::ResumeWorkflowRunRequest>,
    ) -> Result<Response<WorkflowStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(
            SERVICE,
            "ResumeWorkflowRun",
            request.metadata(),
            &tenant.name,
        );
        let req = request.into_inner();
        let prepared = traced(span.clone(), async {
            let previous = self.stored_run(&tenant, &req.run_id).await?;
            let target = self.source_target(&tenant, &previous).await?;
            let (_, _, o) = self.workflows().await?;
            let mut inputs = BTreeMap::new();
            for (name, digest) in &previous.inputs {
                if let Ok(b) = o.artifacts.get(digest) {
                    inputs.insert(name.clone(), b);
                }
            }
            let replaced = inputs_from("inputs", req.inputs)?;
            inputs.extend(replaced);
            if let Some(name) = previous.inputs.keys().find(|n| !inputs.contains_key(*n)) {
                return Err(Status::failed_precondition(format!(
                    "input `{name}` of run `{}` is no longer kept (artifact retention): send it \
                     again in `inputs`",
                    previous.run_id
                )));
            }
            Ok((previous, target, inputs))
        })
        .await?;
        let (previous, target, inputs) = prepared;
        let max = output_bound(req.max_output_bytes);
        self.stream_run(tenant, span, target, inputs, Some(previous), deadline, max)
            .await
    }

    /// The tenant's stored run `run_id` (`NOT_FOUND` alike for missing and others').
    async fn stored_run(&self, tenant: &Tenant, run_id: &str) -> Result<WorkflowRunRecord, Status> {
        if run_id.is_empty() {
            return Err(bad("run_id", "is empty"));
        }
        let catalog = self.workflow_catalog().await?;
        let value = catalog
            .store()
            .get_workflow_run(&tenant.name, run_id)
            .await
            .map_err(|e| catalog_status(e.into(), ""))?
            .ok_or_else(|| run_not_found(run_id))?;
        serde_json::from_value(value)
            .map_err(|e| Status::internal(format!("run `{run_id}`'s record is unreadable: {e}")))
    }

    pub(super) async fn rpc_get_workflow_run(
        &self,
        request: Request<pb::GetWorkflowRunRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "GetWorkflowRun", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let record = self.stored_run(&tenant, &req.run_id).await?;
            let (w, _, _) = self.workflows().await?;
            Ok(Response::new(run_to(
                &record,
                DEFAULT_MAX_OUTPUT_BYTES,
                |name| w.output(&record, name),
            )))
        })
        .await
    }

    pub(super) async fn rpc_list_workflow_runs(
        &self,
        request: Request<pb::ListWorkflowRunsRequest>,
    ) -> Result<Response<pb::ListWorkflowRunsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(
            SERVICE,
            "ListWorkflowRuns",
            request.metadata(),
            &tenant.name,
        );
        traced(span, async {
            let req = request.into_inner();
            if !req.workflow.is_empty() {
                check_name("workflow", &req.workflow).map_err(model_status)?;
            }
            let limit = match req.limit {
                0 => 20,
                n => n.min(MAX_RUNS_LISTED),
            };
            let catalog = self.workflow_catalog().await?;
            let values = catalog
                .store()
                .list_workflow_runs(
                    &tenant.name,
                    Some(req.workflow.as_str()).filter(|w| !w.is_empty()),
                    limit,
                )
                .await
                .map_err(|e| catalog_status(e.into(), ""))?;
            let runs = values
                .into_iter()
                .filter_map(|v| serde_json::from_value::<WorkflowRunRecord>(v).ok())
                .map(|r| run_to(&r, 0, |_| None))
                .collect();
            Ok(Response::new(pb::ListWorkflowRunsResponse { runs }))
        })
        .await
    }

    pub(super) async fn rpc_publish_workflow(
        &self,
        request: Request<pb::PublishWorkflowRequest>,
    ) -> Result<Response<pb::PublishWorkflowResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "PublishWorkflow", request.metadata(), &tenant.name);
        traced(span, async {
            tenant.require(CatalogPermission::Publish)?;
            let req = request.into_inner();
            let (wf, cases) = inline_from("workflow", req.workflow)?;
            check_name("name", &wf.name).map_err(model_status)?;
            if !tenant.may_see(&wf.name) {
                return Err(Status::permission_denied(format!(
                    "tenant `{}` may not publish workflow `{}`: the name is outside its `steps` \
                     patterns",
                    tenant.name, wf.name
                )));
            }
            let plan = wf.plan().map_err(model_status)?;
            self.vet(&tenant, &plan).await?;
            let (w, _, _) = self.workflows().await?;
            let p = self
                .with_place(&tenant, deadline, async {
                    w.publish(&wf, cases, &tenant.name, req.allow_unverified)
                        .await
                        .map_err(|e| workflow_status(e, None))
                })
                .await?;
            let refused_reason = match &p.version {
                Some(_) => String::new(),
                None => format!(
                    "not verified: {}; nothing was stored (set allow_unverified to store it \
                     unverified)",
                    p.unverified_because.join("; ")
                ),
            };
            Ok(Response::new(pb::PublishWorkflowResponse {
                version: p.version.as_ref().map(version_to),
                created: p.created,
                refused_reason,
                case_results: p.cases.iter().map(case_to).collect(),
                unverified_because: p.unverified_because.clone(),
            }))
        })
        .await
    }

    pub(super) async fn rpc_get_workflow(
        &self,
        request: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::GetWorkflowResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "GetWorkflow", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let r = StepRef::parse("workflow_ref", &req.workflow_ref).map_err(model_status)?;
            let (w, _, _) = self.workflows().await?;
            if !tenant.may_see(&r.name) {
                return Err(workflow_not_found(&r));
            }
            let (selected, _, _) = w
                .resolve_workflow(&r)
                .await
                .map_err(|e| workflow_status(e, Some(&r)))?;
            let catalog = self.workflow_catalog().await?;
            let store = catalog.store();
            let versions = store
                .list_versions(stepbox_store::Kind::Workflow, &r.name)
                .await
                .map_err(|e| catalog_status(e.into(), ""))?;
            let set = store
                .list_stages(stepbox_store::Kind::Workflow, &r.name)
                .await
                .map_err(|e| catalog_status(e.into(), ""))?;
            let stages = catalog
                .stages()
                .iter()
                .map(|c| {
                    let row = set.iter().find(|s| s.stage == c.name);
                    pb::StageAlias {
                        stage: c.name.clone(),
                        policy: c.policy.clone().unwrap_or_default(),
                        set: row.is_some(),
                        number: row.map_or(0, |s| s.number),
                        digest: row.map(|s| s.digest.clone()).unwrap_or_default(),
                        updated_at: row.map(|s| timestamp(s.updated_at)),
                        updated_by: row.map(|s| s.updated_by.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            Ok(Response::new(pb::GetWorkflowResponse {
                name: r.name.clone(),
                versions: versions.iter().map(version_to).collect(),
                stages,
                selected: Some(version_to(&selected)),
            }))
        })
        .await
    }

    pub(super) async fn rpc_list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListWorkflows", request.metadata(), &tenant.name);
        traced(span, async {
            let catalog = self.workflow_catalog().await?;
            let names = catalog
                .store()
                .list_names(stepbox_store::Kind::Workflow, None)
                .await
                .map_err(|e| catalog_status(e.into(), ""))?;
            Ok(Response::new(pb::ListWorkflowsResponse {
                workflows: names
                    .into_iter()
                    .filter(|n| tenant.may_see(&n.name))
                    .map(|n| pb::WorkflowSummary {
                        name: n.name,
                        description: n.description,
                        latest_number: n.latest_number,
                        latest_digest: n.latest_digest,
                    })
                    .collect(),
            }))
        })
        .await
    }

    pub(super) async fn rpc_promote_workflow(
        &self,
        request: Request<pb::PromoteWorkflowRequest>,
    ) -> Result<Response<pb::PromoteWorkflowResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "PromoteWorkflow", request.metadata(), &tenant.name);
        traced(span, async {
            tenant.require(CatalogPermission::Promote)?;
            let req = request.into_inner();
            let r = StepRef::parse("workflow_ref", &req.workflow_ref).map_err(model_status)?;
            let (w, _, _) = self.workflows().await?;
            if !tenant.may_see(&r.name) {
                return Err(workflow_not_found(&r));
            }
            let (_, _, plan) = w
                .resolve_workflow(&r)
                .await
                .map_err(|e| workflow_status(e, Some(&r)))?;
            self.vet(&tenant, &plan).await?;
            let p = self
                .with_place(&tenant, deadline, async {
                    w.promote(&r, &req.stage, &tenant.name)
                        .await
                        .map_err(|e| workflow_status(e, Some(&r)))
                })
                .await?;
            let catalog = self.workflow_catalog().await?;
            let numbers = catalog
                .store()
                .list_versions(stepbox_store::Kind::Workflow, &r.name)
                .await
                .map_err(|e| catalog_status(e.into(), ""))?
                .into_iter()
                .map(|v| (v.digest, v.number))
                .collect();
            let cases: Vec<crate::workflow::publish::WorkflowCaseResult> =
                serde_json::from_value(p.record.evidence["cases"].clone()).unwrap_or_default();
            Ok(Response::new(pb::PromoteWorkflowResponse {
                promoted: p.promoted,
                reason: p.reason.clone(),
                record: Some(promotion_to(&p.record, &numbers)),
                case_results: cases.iter().map(case_to).collect(),
            }))
        })
        .await
    }

    /// The scheduler, or `FAILED_PRECONDITION` when this server would never fire a schedule.
    async fn scheduler(&self) -> Result<&Scheduler, Status> {
        let (_, s, o) = self.workflows().await?;
        if !o.schedules {
            return Err(Status::failed_precondition(
                "schedules need a configured `[catalog] database` (shared by every replica): \
                 without one, no server fires them",
            ));
        }
        Ok(s)
    }

    pub(super) async fn rpc_create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::WorkflowSchedule>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "CreateSchedule", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let scheduler = self.scheduler().await?;
            let (_, _, o) = self.workflows().await?;
            let (workflow, workflow_ref, plan) = match req.workflow {
                Some(pb::create_schedule_request::Workflow::WorkflowRef(raw)) => {
                    let t = self.resolve_target(&tenant, &raw, "workflow_ref").await?;
                    (WorkflowFile::default(), Some(raw), t.plan)
                }
                Some(pb::create_schedule_request::Workflow::Inline(w)) => {
                    let (wf, _) = inline_from("inline", Some(w))?;
                    let plan = wf.plan().map_err(model_status)?;
                    if !tenant.may_see(&plan.name) {
                        return Err(Status::permission_denied(format!(
                            "tenant `{}` may not schedule workflow `{}`: the name is outside its \
                             `steps` patterns",
                            tenant.name, plan.name
                        )));
                    }
                    (wf, None, plan)
                }
                None => {
                    return Err(bad(
                        "workflow",
                        "is missing: set `workflow_ref` (a published workflow) or `inline`",
                    ));
                }
            };
            self.vet(&tenant, &plan).await?;
            let inputs = match req.inputs {
                Some(pb::create_schedule_request::Inputs::Fixed(f)) => {
                    let files = inputs_from("fixed.files", f.files)?;
                    let mut fixed = BTreeMap::new();
                    for (name, b) in files {
                        let d = o.artifacts.put(&b).map_err(Status::internal)?;
                        fixed.insert(name, d);
                    }
                    ScheduleInputs::Fixed(fixed)
                }
                Some(pb::create_schedule_request::Inputs::Inbox(i)) => {
                    let dir = dir_from("inbox.dir", &i.dir)?;
                    tenant_dir(o, RootKind::Input, "inbox.dir", &dir, &tenant.name)?;
                    ScheduleInputs::Inbox {
                        dir,
                        files: i.files.into_iter().collect(),
                    }
                }
                None => ScheduleInputs::Fixed(BTreeMap::new()),
            };
            let mut schedule = Schedule {
                id: String::new(),
                tenant: String::new(),
                workflow,
                workflow_ref,
                cron: req.cron,
                timezone: if req.timezone.is_empty() {
                    "UTC".into()
                } else {
                    req.timezone
                },
                inputs,
                outbox: if req.outbox.is_empty() {
                    None
                } else {
                    let dir = dir_from("outbox", &req.outbox)?;
                    tenant_dir(o, RootKind::Output, "outbox", &dir, &tenant.name)?;
                    Some(dir)
                },
                overlap: overlap_from(req.overlap)?,
                catch_up: crate::job::limits::Millis(Duration::from_secs(3600)),
                paused: req.paused,
            };
            if req.catch_up_ms > 0 {
                schedule.catch_up =
                    crate::job::limits::Millis(Duration::from_millis(req.catch_up_ms));
            }
            let s = scheduler
                .create(&tenant.name, schedule)
                .await
                .map_err(schedule_status)?;
            Ok(Response::new(schedule_to(&s)))
        })
        .await
    }

    pub(super) async fn rpc_list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListSchedules", request.metadata(), &tenant.name);
        traced(span, async {
            let scheduler = self.scheduler().await?;
            let list = scheduler
                .list(&tenant.name)
                .await
                .map_err(schedule_status)?;
            Ok(Response::new(pb::ListSchedulesResponse {
                schedules: list.iter().map(schedule_to).collect(),
            }))
        })
        .await
    }

    pub(super) async fn rpc_set_paused(
        &self,
        request: Request<pb::ScheduleRequest>,
        paused: bool,
    ) -> Result<Response<pb::WorkflowSchedule>, Status> {
        let tenant = tenant_of(&request);
        let method = if paused {
            "PauseSchedule"
        } else {
            "ResumeSchedule"
        };
        let span = rpc_span_of(SERVICE, method, request.metadata(), &tenant.name);
        traced(span, async {
            let id = request.into_inner().schedule_id;
            let scheduler = self.scheduler().await?;
            scheduler
                .set_paused(&tenant.name, &id, paused)
                .await
                .map_err(schedule_status)?;
            let s = scheduler
                .get(&tenant.name, &id)
                .await
                .map_err(schedule_status)?;
            Ok(Response::new(schedule_to(&s)))
        })
        .await
    }

    pub(super) async fn rpc_delete_schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "DeleteSchedule", request.metadata(), &tenant.name);
        traced(span, async {
            let id = request.into_inner().schedule_id;
            let scheduler = self.scheduler().await?;
            scheduler
                .delete(&tenant.name, &id)
                .await
                .map_err(schedule_status)?;
            Ok(Response::new(pb::DeleteScheduleResponse {}))
        })
        .await
    }

    pub(super) async fn rpc_list_firings(
        &self,
        request: Request<pb::ListFiringsRequest>,
    ) -> Result<Response<pb::ListFiringsResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span_of(SERVICE, "ListFirings", request.metadata(), &tenant.name);
        traced(span, async {
            let req = request.into_inner();
            let scheduler = self.scheduler().await?;
            scheduler
                .get(&tenant.name, &req.schedule_id)
                .await
                .map_err(|_| schedule_not_found(&req.schedule_id))?;
            let limit = match req.limit {
                0 => 20,
                n => n.min(MAX_FIRINGS),
            };
            let firings = scheduler
                .firings(&tenant.name, &req.schedule_id, limit)
                .await
                .map_err(schedule_status)?;
            Ok(Response::new(pb::ListFiringsResponse {
                firings: firings.iter().map(firing_to).collect(),
            }))
        })
        .await
    }
}

/// Over gRPC a schedule's inbox and outbox must lie in the tenant's own directory under a root
/// (`ROOT/TENANT/...`), so one tenant never reads another's inbox nor writes into its outbox.
/// (The CLI's schedules belong to the local operator and may use any directory under a root.)
fn tenant_dir(
    o: &WorkflowOptions,
    kind: RootKind,
    field: &str,
    dir: &std::path::Path,
    tenant: &str,
) -> Result<(), Status> {
    let roots = o
        .section
        .roots()
        .map_err(|e| Status::failed_precondition(format!("[workflows]: {e}")))?;
    let allowed = roots.resolve(kind, field, dir).map_err(schedule_status)?;
    match allowed.below().components().next() {
        Some(std::path::Component::Normal(first)) if first == std::ffi::OsStr::new(tenant) => {
            Ok(())
        }
        _ => Err(bad(
            field,
            format!(
                "`{}` is not in tenant `{tenant}`'s own directory: over gRPC an inbox or outbox \
                 must lie under `ROOT/{tenant}/`, ROOT being one of `[workflows] {}`",
                dir.display(),
                match kind {
                    RootKind::Input => "input_roots",
                    RootKind::Output => "output_roots",
                }
            ),
        )),
    }
}

/// The bound of inline output bytes a request asks for (0: the default).
fn output_bound(requested: u64) -> u64 {
    if requested == 0 {
        DEFAULT_MAX_OUTPUT_BYTES
    } else {
        requested
    }
}

/// The stream `RunWorkflow` and `ResumeWorkflowRun` answer with.
pub type WorkflowStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WorkflowRunEvent, Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::step_workflows_server::StepWorkflows for StepService {
    async fn publish_workflow(
        &self,
        request: Request<pb::PublishWorkflowRequest>,
    ) -> Result<Response<pb::PublishWorkflowResponse>, Status> {
        self.rpc_publish_workflow(request).await
    }

    async fn get_workflow(
        &self,
        request: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::GetWorkflowResponse>, Status> {
        self.rpc_get_workflow(request).await
    }

    async fn list_workflows(
        &self,
        request: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        self.rpc_list_workflows(request).await
    }

    async fn promote_workflow(
        &self,
        request: Request<pb::PromoteWorkflowRequest>,
    ) -> Result<Response<pb::PromoteWorkflowResponse>, Status> {
        self.rpc_promote_workflow(request).await
    }

    type RunWorkflowStream = WorkflowStream;

    async fn run_workflow(
        &self,
        request: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<WorkflowStream>, Status> {
        self.rpc_run_workflow(request).await
    }

    type ResumeWorkflowRunStream = WorkflowStream;

    async fn resume_workflow_run(
        &self,
        request: Request<pb::ResumeWorkflowRunRequest>,
    ) -> Result<Response<WorkflowStream>, Status> {
        self.rpc_resume_workflow_run(request).await
    }

    async fn get_workflow_run(
        &self,
        request: Request<pb::GetWorkflowRunRequest>,
    ) -> Result<Response<pb::WorkflowRun>, Status> {
        self.rpc_get_workflow_run(request).await
    }

    async fn list_workflow_runs(
        &self,
        request: Request<pb::ListWorkflowRunsRequest>,
    ) -> Result<Response<pb::ListWorkflowRunsResponse>, Status> {
        self.rpc_list_workflow_runs(request).await
    }

    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::WorkflowSchedule>, Status> {
        self.rpc_create_schedule(request).await
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        self.rpc_list_schedules(request).await
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::WorkflowSchedule>, Status> {
        self.rpc_set_paused(request, true).await
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::WorkflowSchedule>, Status> {
        self.rpc_set_paused(request, false).await
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        self.rpc_delete_schedule(request).await
    }

    async fn list_firings(
        &self,
        request: Request<pb::ListFiringsRequest>,
    ) -> Result<Response<pb::ListFiringsResponse>, Status> {
        self.rpc_list_firings(request).await
    }
}
