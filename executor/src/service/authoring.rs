//! `GenerateStep` (the generate→run→verify→repair loop, streamed) and `ImportConversation`.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{
    GenerateStream, StepService, cancelled, grpc_timeout, our_deadline, tenant_of, traced,
};
use crate::authoring::generate::GenerateEvent;
use crate::job::request::RuntimeKind;
use crate::pb;
use crate::service::convert::{
    attempt_to, bad, check_to, generate_request_from, generate_status, outcome_to, status_of,
    tokens_to,
};
use crate::service::telemetry::{record_status, rpc_span};
use crate::service::tenancy::Tenant;

impl StepService {
    /// `ImportConversation` after authentication.
    async fn import(
        &self,
        tenant: Arc<Tenant>,
        req: pb::ImportConversationRequest,
    ) -> Result<pb::ImportConversationResponse, Status> {
        let (_tenant_ticket, _ticket) = self.admit(&tenant, "")?;
        let select = (!req.select.is_empty()).then_some(req.select.as_str());
        let imported =
            crate::authoring::conversation::import(&self.executor, &req.conversation, select)
                .await
                .map_err(|e| match e {
                    crate::authoring::conversation::ImportError::Malformed(msg) => {
                        bad("conversation", msg)
                    }
                    crate::authoring::conversation::ImportError::Job(e) => {
                        status_of(e, Some(RuntimeKind::Python))
                    }
                })?;
        let ex = &imported.extracted;
        let summary = pb::ConversationSummary {
            title: ex.title.clone(),
            conversation_id: ex.conversation_id.clone(),
            cells: u32::try_from(ex.cells.len()).unwrap_or(u32::MAX),
            inputs: ex
                .inputs
                .iter()
                .map(|i| pb::ExpectedInput {
                    name: i.name.clone(),
                    size: i.size.unwrap_or(0),
                    mime_type: i.mime_type.clone().unwrap_or_default(),
                })
                .collect(),
            outputs: ex.outputs.clone(),
            unsupported_imports: imported
                .unsupported_imports
                .iter()
                .map(|u| pb::UnsupportedImport {
                    module: u.module.clone(),
                    cell: u32::try_from(u.cell).unwrap_or(u32::MAX),
                })
                .collect(),
            notes: imported.notes.clone(),
            has_expected_stdout: imported.expected_stdout.is_some(),
            expected_stdout: imported
                .expected_stdout
                .clone()
                .unwrap_or_default()
                .into_bytes(),
        };
        let step = pb::Step {
            runtime: imported.runtime.name().into(),
            source: imported.source.clone(),
            module: Vec::new(),
            layout: pb::FileLayout::MntData as i32,
            filename: imported.filename.clone(),
        };
        let recorded_checks = imported.recorded_checks().iter().map(check_to).collect();
        Ok(pb::ImportConversationResponse {
            step: Some(step),
            summary: Some(summary),
            recorded_checks,
        })
    }

    pub(super) async fn rpc_generate_step(
        &self,
        request: Request<pb::GenerateStepRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let deadline = grpc_timeout(&request);
        let tenant = tenant_of(&request);
        let span = rpc_span("GenerateStep", request.metadata(), &tenant.name);
        let (req, (tenant_ticket, ticket)) = traced(span.clone(), async {
            let mut req = generate_request_from(request.into_inner())?;
            if let Some(d) = deadline {
                req.deadline = req.deadline.min(our_deadline(d));
            }
            let tickets = self.admit(&tenant, &req.policy)?;
            Ok((req, tickets))
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::GenerateStepEvent, Status>>(64);
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<GenerateEvent>();
        let generator = self.generator.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let _tickets = (tenant_ticket, ticket);
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(ev) = ev_rx.recv().await {
                        use pb::generate_step_event::Event;
                        let event = match ev {
                            GenerateEvent::AttemptStarted { number } => {
                                Event::AttemptStarted(number)
                            }
                            GenerateEvent::ModelReply {
                                number,
                                reply,
                                code,
                                tokens,
                            } => Event::ModelReply(pb::GenerationAttempt {
                                number,
                                reply,
                                code: code.unwrap_or_default(),
                                tokens: Some(tokens_to(tokens)),
                                ..Default::default()
                            }),
                            GenerateEvent::AttemptResult(a) => Event::AttemptResult(attempt_to(&a)),
                        };
                        if tx
                            .send(Ok(pb::GenerateStepEvent { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            };
            let work = async { tokio::join!(generator.generate(req, Some(ev_tx)), forward).0 }
                .instrument(span.clone());
            let cancelled = cancelled(cancel);
            let closed = tx.closed();
            let last = tokio::select! {
                r = work => r
                    .map(|o| pb::GenerateStepEvent { event: Some(pb::generate_step_event::Event::Outcome(outcome_to(&o))) })
                    .map_err(generate_status),
                () = cancelled => Err(Status::unavailable("the server is shutting down; generation was cancelled")),
                () = closed => {
                    record_status::<()>(&span, &Err(Status::cancelled("the client went away")));
                    return;
                }
            };
            record_status(&span, &last);
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    pub(super) async fn rpc_import_conversation(
        &self,
        request: Request<pb::ImportConversationRequest>,
    ) -> Result<Response<pb::ImportConversationResponse>, Status> {
        let tenant = tenant_of(&request);
        let span = rpc_span("ImportConversation", request.metadata(), &tenant.name);
        traced(span, self.import(tenant, request.into_inner()))
            .await
            .map(Response::new)
    }
}
