//! `RunStep` and `RunStepStream`: admit, wait for a slot, run with checks, answer; the stream
//! forwards stdout/stderr as the step writes them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{EventStream, StepService, cancelled, grpc_timeout, our_deadline, tenant_of, traced};
use crate::job::checks::Check;
use crate::job::request::StepJob;
use crate::pb;
use crate::service::convert::{job_from_request, record_from, response_from, status_of};
use crate::service::telemetry::{record_status, rpc_span};
use crate::service::tenancy::Tenant;
use crate::{OutputChunk, RunOptions, StreamKind};

impl StepService {
    /// Admits, waits for a slot, runs, with deadline and shutdown cancellation.
    /// Admits, waits for a slot, runs, with deadline and shutdown cancellation.
    pub(crate) async fn execute(
        &self,
        tenant: Arc<Tenant>,
        job: StepJob,
        checks: Vec<Check>,
        deadline: Option<Duration>,
        listener: Option<tokio::sync::mpsc::UnboundedSender<OutputChunk>>,
    ) -> Result<pb::RunStepResponse, Status> {
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
                .run_checked(job, &checks, RunOptions {
                    listener,
                    ..RunOptions::default()
                })
                .await
                .map_err(|e| status_of(e, Some(runtime)))?;
            self.metrics.record_run(&tenant.name, &result, queue_wait);
            let response = response_from(result, verdicts, queue_wait);
            self.history.record(
                &tenant.name,
                record_from(&response, &tenant.name, submitted_at),
            );
            Ok(response)
        };
        let cancelled = cancelled(self.cancel.clone());
        let deadline = deadline.map(our_deadline);
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
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
            let (job, checks) = job_from_request(request.into_inner())?;
            self.execute(tenant, job, checks, deadline, None).await
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
        let (job, checks) = traced(span.clone(), async {
            let (job, checks) = job_from_request(request.into_inner())?;
            // Refuse at once when not allowed or full, rather than after opening the stream.
            tenant.check_policy(&job.policy)?;
            drop(self.admission.admit()?);
            Ok((job, checks))
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
                .execute(tenant, job, checks, deadline, Some(chunk_tx))
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
