//! `--server URL`: the `stepbox step` commands against a `stepbox serve`, over gRPC
//! (`stepbox.v1.StepCatalog`, and `StepExecutor.RunStep` with `step_ref`). The bearer token comes
//! from `STEPBOX_TOKEN`; an `https://` URL uses TLS (the web's public roots, or `--server-ca`).
//! Answers are turned into the same views the local catalog gives, so both doors print the same.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::catalog::CaseCheck;
use crate::cli::io::Finished;
use crate::cli::step::{
    CaseView, PromoteView, PromotionView, PublishView, StageView, StepView, SummaryView,
    VersionView,
};
use crate::job::checks::CheckResult;
use crate::job::limits::Limits;
use crate::job::manifest::{FileDigest, Manifest, StepVersionRef};
use crate::job::outcome::{CacheSource, OutputFile, OutputKind, RunResult, Status, Usage};
use crate::pb;
use crate::pb::step_catalog_client::StepCatalogClient;
use crate::pb::step_executor_client::StepExecutorClient;
use crate::service::catalog_convert::{definition_from, definition_to};

/// A gRPC error from the server, with the exit code it maps to: 2 when the request was refused
/// (bad argument, not found, no permission or token), 10 when the server or the connection failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(String, u8);

impl RemoteError {
    /// The exit code.
    pub fn exit_code(&self) -> u8 {
        self.1
    }

    fn from_status(server: &str, s: tonic::Status) -> RemoteError {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange => crate::cli::EXIT_BAD_REQUEST,
            _ => crate::cli::EXIT_HOST_ERROR,
        };
        RemoteError(format!("{server}: {:?}: {}", s.code(), s.message()), code)
    }
}

/// A connection to a server's `StepCatalog` and `StepExecutor`.
#[derive(Debug)]
pub(crate) struct Remote {
    url: String,
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Remote {
    /// Connects to `url` (`http://` or `https://`); `ca` is a PEM CA for a private certificate.
    pub(crate) async fn connect(url: &str, ca: Option<&Path>) -> anyhow::Result<Remote> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| {
                format!("--server `{url}` is not a URL such as http://127.0.0.1:50051")
            })?
            .connect_timeout(Duration::from_secs(10));
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("failed to read --server-ca `{}`", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            RemoteError(
                format!("cannot reach the server at {url}: {e}"),
                crate::cli::EXIT_HOST_ERROR,
            )
        })?;
        let token = match std::env::var("STEPBOX_TOKEN") {
            Ok(t) if !t.is_empty() => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("STEPBOX_TOKEN is not a valid header value")?,
            ),
            _ => None,
        };
        Ok(Remote {
            url: url.to_string(),
            channel,
            token,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    fn catalog(&self) -> StepCatalogClient<Channel> {
        StepCatalogClient::new(self.channel.clone()).max_decoding_message_size(usize::MAX)
    }

    fn err(&self, s: tonic::Status) -> anyhow::Error {
        RemoteError::from_status(&self.url, s).into()
    }

    pub(crate) async fn publish(
        &self,
        def: &crate::catalog::StepDefinition,
        allow_unverified: bool,
    ) -> anyhow::Result<PublishView> {
        let step = definition_to(def).map_err(|s| self.err(s))?;
        let r = self
            .catalog()
            .publish_step(self.request(pb::PublishStepRequest {
                step: Some(step),
                allow_unverified,
            }))
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(PublishView {
            version: r.version.map(version_view).transpose()?,
            created: r.created,
            refused_reason: r.refused_reason,
            cases: r.case_results.into_iter().map(case_view).collect(),
        })
    }

    pub(crate) async fn list(&self, filter: &str) -> anyhow::Result<Vec<SummaryView>> {
        let r = self
            .catalog()
            .list_steps(self.request(pb::ListStepsRequest {
                filter: filter.to_string(),
            }))
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(r.steps
            .into_iter()
            .map(|s| SummaryView {
                name: s.name,
                description: s.description,
                latest_number: s.latest_number,
                latest_digest: s.latest_digest,
                latest_verified: s.latest_verified,
                updated_at: millis(s.updated_at),
                versions: s.versions,
            })
            .collect())
    }

    pub(crate) async fn show(&self, reference: &str) -> anyhow::Result<StepView> {
        let r = self
            .catalog()
            .get_step(self.request(pb::GetStepRequest {
                step_ref: reference.to_string(),
            }))
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(StepView {
            name: r.name,
            stages: r
                .stages
                .into_iter()
                .map(|s| StageView {
                    policy: (!s.policy.is_empty()).then_some(s.policy),
                    number: s.set.then_some(s.number),
                    digest: s.set.then_some(s.digest),
                    updated_at: s.set.then(|| millis(s.updated_at)),
                    updated_by: s.set.then_some(s.updated_by),
                    stage: s.stage,
                })
                .collect(),
            versions: r
                .versions
                .into_iter()
                .map(version_view)
                .collect::<anyhow::Result<_>>()?,
            selected: r.selected.map(version_view).transpose()?,
        })
    }

    pub(crate) async fn promote(
        &self,
        reference: &str,
        stage: &str,
    ) -> anyhow::Result<PromoteView> {
        let r = self
            .catalog()
            .promote_step(self.request(pb::PromoteStepRequest {
                step_ref: reference.to_string(),
                stage: stage.to_string(),
            }))
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(PromoteView {
            promoted: r.promoted,
            reason: r.reason,
            record: promotion_view(r.record.unwrap_or_default()),
            cases: r.case_results.into_iter().map(case_view).collect(),
        })
    }

    pub(crate) async fn history(
        &self,
        name: &str,
        limit: u32,
    ) -> anyhow::Result<Vec<PromotionView>> {
        let r = self
            .catalog()
            .list_promotions(self.request(pb::ListPromotionsRequest {
                name: name.to_string(),
                limit,
            }))
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(r.promotions.into_iter().map(promotion_view).collect())
    }

    pub(crate) async fn run(
        &self,
        reference: &str,
        inputs: Vec<crate::InputFile>,
        stdin: bytes::Bytes,
        args: Vec<String>,
    ) -> anyhow::Result<Finished> {
        let r = StepExecutorClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
            .run_step(
                self.request(pb::RunStepRequest {
                    step_ref: reference.to_string(),
                    inputs: inputs
                        .into_iter()
                        .map(|i| pb::File {
                            path: i.path,
                            content: i.content.to_vec(),
                            ..Default::default()
                        })
                        .collect(),
                    stdin: stdin.to_vec(),
                    args,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        let verdicts = r
            .check_results
            .iter()
            .map(|c| CheckResult {
                name: c.name.clone(),
                passed: c.passed,
                detail: c.detail.clone(),
            })
            .collect();
        Finished::local(run_result(r)?, verdicts)
    }
}

fn millis(t: Option<prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn status(value: i32) -> anyhow::Result<Status> {
    Ok(match pb::Status::try_from(value) {
        Ok(pb::Status::Succeeded) => Status::Succeeded,
        Ok(pb::Status::Failed) => Status::Failed,
        Ok(pb::Status::TimedOut) => Status::TimedOut,
        Ok(pb::Status::FuelExhausted) => Status::FuelExhausted,
        Ok(pb::Status::MemoryExceeded) => Status::MemoryExceeded,
        Ok(pb::Status::OutputExceeded) => Status::OutputExceeded,
        Ok(pb::Status::Trapped) => Status::Trapped,
        Ok(pb::Status::ChecksFailed) => Status::ChecksFailed,
        _ => anyhow::bail!("the server sent an unknown status {value}"),
    })
}

fn status_name(value: i32) -> String {
    status(value).map_or_else(|_| format!("STATUS_{value}"), |s| s.name().to_string())
}

fn case_view(c: pb::CaseResult) -> CaseView {
    CaseView {
        case: c.name,
        status: status_name(c.status),
        message: c.message,
        policy: c.policy,
        checks: c
            .check_results
            .into_iter()
            .map(|k| CaseCheck {
                name: k.name,
                passed: k.passed,
                detail: if k.passed { String::new() } else { k.detail },
            })
            .collect(),
        manifest_digest: c.manifest_digest,
    }
}

fn version_view(v: pb::StepVersion) -> anyhow::Result<VersionView> {
    let definition = match v.definition {
        Some(d) => Some(definition_from(Some(d)).map_err(|s| {
            anyhow::anyhow!(
                "the server sent a definition this CLI cannot read: {}",
                s.message()
            )
        })?),
        None => None,
    };
    Ok(VersionView {
        name: v.name,
        number: v.number,
        digest: v.digest,
        verified: v.verified,
        description: v.description,
        created_by: v.created_by,
        created_at: millis(v.created_at),
        cases: v.case_results.into_iter().map(case_view).collect(),
        definition,
    })
}

fn promotion_view(p: pb::Promotion) -> PromotionView {
    PromotionView {
        id: p.id,
        stage: p.stage,
        from_number: (p.from_number != 0).then_some(p.from_number),
        from_digest: (!p.from_digest.is_empty()).then_some(p.from_digest),
        to_number: (p.to_number != 0).then_some(p.to_number),
        to_digest: p.to_digest,
        tenant: p.tenant,
        at: millis(p.at),
        accepted: p.accepted,
        reason: p.reason,
        policy: p.policy,
    }
}

/// The server's answer as the result a local run gives (for the same printing and JSON).
fn run_result(r: pb::RunStepResponse) -> anyhow::Result<RunResult> {
    let m = r.manifest.unwrap_or_default();
    let l = m.limits.unwrap_or_default();
    let limits = Limits {
        memory_bytes: l.memory_bytes,
        fuel: (l.fuel != 0).then_some(l.fuel),
        wall_time: Duration::from_millis(l.wall_time_ms),
        stdout_bytes: l.max_stdout_bytes,
        stderr_bytes: l.max_stderr_bytes,
        output_files: l.max_output_files,
        output_bytes: l.max_output_bytes,
        scratch_files: l.max_scratch_files,
        scratch_bytes: l.max_scratch_bytes,
    };
    let digests = |d: Vec<pb::FileDigest>| {
        d.into_iter()
            .map(|f| FileDigest {
                path: f.path,
                sha256: f.sha256,
            })
            .collect()
    };
    let exit_code = |c: i32| (c >= 0).then_some(c);
    let manifest = Manifest {
        version: m.version,
        program_sha256: m.program_sha256,
        runtime: m.runtime.clone(),
        runtime_sha256: m.runtime_sha256,
        engine: m.engine,
        policy: m.policy.clone(),
        policy_sha256: m.policy_sha256,
        deterministic: m.deterministic,
        limits: limits.clone(),
        layout: m.layout,
        inputs: digests(m.inputs),
        stdin_sha256: m.stdin_sha256,
        args: m.args,
        env: m.env.into_iter().collect(),
        status: status(m.status).unwrap_or(Status::Failed),
        exit_code: exit_code(m.exit_code),
        stdout_sha256: m.stdout_sha256,
        stderr_sha256: m.stderr_sha256,
        outputs: digests(m.outputs),
        step: (!m.step_name.is_empty()).then_some(StepVersionRef {
            name: m.step_name,
            version: m.step_version,
            digest: m.step_digest,
        }),
        digest: m.digest,
    };
    let u = r.usage.unwrap_or_default();
    Ok(RunResult {
        run_id: r.run_id,
        status: status(r.status)?,
        exit_code: exit_code(r.exit_code),
        message: r.message,
        stdout: r.stdout.into(),
        stderr: r.stderr.into(),
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        outputs: r
            .outputs
            .into_iter()
            .map(|f| OutputFile {
                size: f.content.len() as u64,
                kind: if f.symlink_target.is_empty() {
                    OutputKind::File
                } else {
                    OutputKind::Symlink {
                        target: f.symlink_target,
                    }
                },
                path: f.path,
                sha256: f.sha256,
                content: f.content.into(),
            })
            .collect(),
        usage: Usage {
            wall_time_us: u.wall_time_us,
            fuel_consumed: u.fuel_metered.then_some(u.fuel_consumed),
            peak_memory_bytes: u.peak_memory_bytes,
            compile_us: u.compile_us,
            compile_cache: match u.compile_cache.as_str() {
                "memory" => Some(CacheSource::Memory),
                "disk" => Some(CacheSource::Disk),
                "compiled" => Some(CacheSource::Compiled),
                _ => None,
            },
            instantiate_us: u.instantiate_us,
            output_files: u.output_files,
            output_bytes: u.output_bytes,
            scratch_files: u.scratch_files,
            scratch_bytes: u.scratch_bytes,
        },
        limits,
        policy: m.policy,
        runtime: m.runtime,
        manifest,
    })
}
