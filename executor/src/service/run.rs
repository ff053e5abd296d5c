//! `RunStep` and `RunStepStream`: admit, wait for a slot, run with checks, answer; the stream
//! forwards stdout/stderr as the step writes them. A request names its program inline (`step`)
//! or a published step (`step_ref`, resolved through the catalog's cache); runs by reference
//! are admitted and counted exactly like inline runs, and their manifest records the version.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{EventStream, StepService, cancelled, deadline_timer, grpc_timeout, tenant_of, traced};
use crate::executor::StepVersionRef;
use crate::job::checks::Check;
use crate::job::request::StepJob;
use crate::pb;
use crate::service::catalog_convert::catalog_status;
use crate::service::config::CatalogPermission;
use crate::service::convert::{
    bad, check_from, inputs_from, job_from_request, limits_from, record_from, response_from,
    status_of,
};
use crate::service::telemetry::{record_status, rpc_span};
use crate::service::tenancy::Tenant;
use crate::{OutputChunk, RunOptions, StreamKind};

/// A request made ready to run: the job, its checks, and the published version it is.
pub(crate) struct Prepared {
    job: StepJob,
    checks: Vec<Check>,
    step_version: Option<StepVersionRef>,
}

impl StepService {
    /// Turns a request into a job: inline (`step`), or a published step (`step_ref`: the
    /// tenant's `run` permission, the reference parsed, visible and resolved; its contract
    /// checks first, then the request's).
    pub(crate) async fn prepare(
        &self,
        tenant: &Tenant,
        mut req: pb::RunStepRequest,
    ) -> Result<Prepared, Status> {
        if req.step_ref.is_empty() {
            let (job, checks) = job_from_request(req)?;
            return Ok(Prepared {
                job,
                checks,
                step_version: None,
            });
        }
        if req.step.is_some() {
            return Err(bad(
                "step_ref",
                "is set together with `step`: set exactly one, `step` (a program) or `step_ref` \
                 (a published step)",
            ));
        }
        tenant.require(CatalogPermission::Run)?;
        let resolved = self.resolve_for(tenant, &req.step_ref).await?;
        if !req.policy.is_empty() && req.policy != resolved.policy {
            return Err(bad(
                "policy",
                format!(
                    "must be empty with `step_ref`: `{}` runs under policy `{}` (its stage's, \
                     else its own)",
                    req.step_ref, resolved.policy
                ),
            ));
        }
        let extra = std::mem::take(&mut req.checks)
            .into_iter()
            .enumerate()
            .map(|(i, c)| check_from(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut job, checks) = resolved
            .job(inputs_from(req.inputs), req.stdin.into(), req.args, extra)
            .map_err(|e| catalog_status(e, ""))?;
        job.limits = limits_from(req.limits);
        job.env.extend(req.env);
        Ok(Prepared {
            job,
            checks,
            step_version: Some(resolved.version.manifest_ref()),
        })
    }

    /// Admits, waits for a slot, runs, with deadline and shutdown cancellation.
    pub(crate) async fn execute(
        &self,
        tenant: Arc<Tenant>,
        prepared: Prepared,
        deadline: Option<Duration>,
        listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<pb::RunStepResponse, Status> {
        let Prepared {
            job,
            checks,
            step_version,
        } = prepared;
        let runtime = job.runtime;
        let submitted_at = SystemTime::now();
        let (_tenant_ticket, ticket) = self.admit(&tenant, &job.policy)?;
        let _in_flight = self.metrics.in_flight();
        let started = Instant::now();
        let work = async {
            let _slot = self
                .admission
                .slots
                .acquire()
                .await
                .map_err(|_| Status::unavailable("the server is shutting down"))?;
            let queue_wait = started.elapsed();
            let (result, verdicts) = self
                .executor
                .run_checked(
                    job,
                    &checks,
                    RunOptions {
                        listener,
                        step_version,
                    },
                )
                .await
                .map_err(|e| status_of(e, Some(runtime)))?;
            self.metrics.record_run(&tenant.name, &result, queue_wait);
            let response = response_from(result, verdicts, queue_wait);
            self.history
                .record(
                    &tenant.name,
                    record_from(&response, &tenant.name, submitted_at),
                )
                .await;
            Ok(response)
        };
        let cancelled = cancelled(self.cancel.clone());
        let timer = deadline_timer(deadline);
        let out = tokio::select! {
            r = work => r,
            () = timer => Err(Status::deadline_exceeded("the client's deadline passed; the job was stopped")),
            () = cancelled => Err(Status::unavailable("the server is shutting down; the job was cancelled")),
        };
        drop(ticket);
        out
    }

    pub(super) async fn rpc_run_step(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<pb::RunStepResponse>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("RunStep", request.metadata(), &tenant.name);
        traced(span, async {
            let prepared = self.prepare(&tenant, request.into_inner()).await?;
            self.execute(tenant, prepared, deadline, None).await
        })
        .await
        .map(Response::new)
    }

    pub(super) async fn rpc_run_step_stream(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("RunStepStream", request.metadata(), &tenant.name);
        let prepared = traced(span.clone(), async {
            let prepared = self.prepare(&tenant, request.into_inner()).await?;
            // Refuse at once when not allowed or full, rather than after opening the stream.
            tenant.check_policy(&prepared.job.policy)?;
            drop(self.admission.admit()?);
            Ok(prepared)
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RunStepEvent, Status>>(64);
        let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::unbounded_channel::<OutputChunk>();
        let service = self.clone();
        tokio::spawn(async move {
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(chunk) = chunk_rx.recv().await {
                        let event = match chunk.stream {
                            StreamKind::Stdout => {
                                pb::run_step_event::Event::Stdout(chunk.data.to_vec())
                            }
                            StreamKind::Stderr => {
                                pb::run_step_event::Event::Stderr(chunk.data.to_vec())
                            }
                        };
                        if tx
                            .send(Ok(pb::RunStepEvent { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            let run = service
                .execute(tenant, prepared, deadline, Some(chunk_tx))
                .instrument(span.clone());
            let closed = tx.closed();
            // A client that goes away cancels the job: dropping `run` stops the guest.
            let result = tokio::select! {
                (r, ()) = async { tokio::join!(run, forward) } => r,
                () = closed => {
                    record_status::<()>(&span, &Err(Status::cancelled("the client went away")));
                    return;
                }
            };
            record_status(&span, &result);
            let last = result.map(|r| pb::RunStepEvent {
                event: Some(pb::run_step_event::Event::Response(r)),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
