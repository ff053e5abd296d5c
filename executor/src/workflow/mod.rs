//! Workflows: steps chained output to input, run as a DAG, resumable where they failed.
//!
//! It owns the `workflow.toml` format and its shape checks ([`model`]), the content-addressed
//! files passed between steps ([`artifacts`]), and [`Workflows::run`]: steps whose inputs are
//! ready run at once (bounded), a failed step stops its successors while independent branches
//! finish, and the result carries every step's status, the workflow's outputs and one manifest
//! over the step manifests and the wiring. A failed run resumes from its record: every step
//! whose version (or program), policy and input digests are unchanged is reused, not re-run.
//!
//! It uses the catalog ([`crate::catalog::Catalog`]) for `uses` steps and the executor for
//! program steps; it knows nothing of proto, the CLI or tenants' tokens.

pub mod artifacts;
pub mod model;
pub mod publish;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};

pub use stepbox_store::Trigger;

use crate::catalog::model::ModelError;
use crate::catalog::{Catalog, CatalogError};
use crate::executor::{RunOptions, StepVersionRef};
use crate::job::digest::sha256_hex;
use crate::job::outcome::{OutputKind, RunResult, Status};
use crate::job::request::{InputFile, StepJob};
use crate::workflow::artifacts::Artifacts;
use crate::workflow::model::{Plan, PlannedStep, StepKind, Wire};

/// Why a workflow could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The workflow or the request is wrong (the message names the step and key).
    #[error("workflow `{workflow}`: {error}")]
    Invalid {
        /// The workflow's name.
        workflow: String,
        /// What is wrong.
        error: ModelError,
    },
    /// A catalog reference could not be resolved, or the catalog is down.
    #[error("workflow `{workflow}`: {}{error}", step_label(.step))]
    Catalog {
        /// The workflow's name.
        workflow: String,
        /// The step (empty when the failure is the workflow's own, e.g. an unknown version).
        step: String,
        /// The catalog's answer.
        error: CatalogError,
    },
    /// The run to resume does not exist (or is another tenant's).
    #[error("no workflow run `{0}` to resume")]
    NoSuchRun(String),
    /// Artifacts or the store failed.
    #[error("{0}")]
    Host(String),
}

fn step_label(step: &str) -> String {
    if step.is_empty() {
        String::new()
    } else {
        format!("step `{step}`: ")
    }
}

/// How one step of a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and did not succeed (see `status`).
    Failed,
    /// It did not run: an upstream step failed, or a wired file was missing.
    Skipped,
    /// A resumed run reused its earlier result.
    Reused,
}

/// One step's record within a workflow run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's id.
    pub id: String,
    /// How it ended.
    pub state: StepState,
    /// The run's status (`SUCCEEDED`, `CHECKS_FAILED`, ...); empty when it did not run.
    #[serde(default)]
    pub status: String,
    /// Why it failed or was skipped.
    #[serde(default)]
    pub message: String,
    /// `NAME@vN` for a catalog step, `program` otherwise.
    pub version: String,
    /// The version's digest, or the program's sha256.
    pub version_digest: String,
    /// The policy it ran under.
    pub policy: String,
    /// sha256 of each input file, by the name the step saw.
    pub inputs: BTreeMap<String, String>,
    /// sha256 of its stdin.
    pub stdin: String,
    /// Its output files: path -> sha256 (artifacts).
    pub outputs: BTreeMap<String, String>,
    /// Check verdicts: name -> (passed, detail).
    #[serde(default)]
    pub checks: Vec<(String, bool, String)>,
    /// Its run manifest's digest (empty when it did not run).
    #[serde(default)]
    pub manifest_digest: String,
    /// Its run id (empty when it did not run).
    #[serde(default)]
    pub run_id: String,
}

impl StepRecord {
    /// The key that decides whether a resumed run may reuse this step.
    fn reuse_key(&self) -> String {
        sha256_hex(
            serde_json::to_string(&(
                &self.version_digest,
                &self.policy,
                &self.inputs,
                &self.stdin,
            ))
            .unwrap_or_default()
            .as_bytes(),
        )
    }
}

/// A workflow run's record: what [`Workflows::run`] returns and the store keeps for resumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowRunRecord {
    /// The run's id.
    pub run_id: String,
    /// The workflow's name.
    pub workflow: String,
    /// The run it resumed, if any.
    #[serde(default)]
    pub resumed_from: String,
    /// What started it: `manual` (the CLI), `api` (gRPC) or `schedule`; absent in records
    /// written before triggers were recorded. Set by the caller ([`WorkflowRunRecord::with_origin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// What ran: `NAME@sha256:HEX` (a published version), `inline:sha256:HEX` (an inline
    /// definition kept as an artifact, so the run can be resumed by id), empty for a file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// `succeeded` when every step succeeded or was reused, else `failed`.
    pub status: String,
    /// sha256 of each workflow input.
    pub inputs: BTreeMap<String, String>,
    /// Every step, in plan order.
    pub steps: Vec<StepRecord>,
    /// Workflow outputs: name -> (step file, sha256); absent when its step did not produce it.
    pub outputs: BTreeMap<String, (String, String)>,
    /// The wiring: step id -> input name -> wire.
    pub wiring: BTreeMap<String, BTreeMap<String, String>>,
    /// When the run started (RFC 3339, UTC, milliseconds); empty in records written before
    /// times were recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    /// When it ended, as `started_at`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub finished_at: String,
    /// sha256 over all of the above (canonical JSON, `digest` empty).
    pub digest: String,
}

/// Now, as run records write times.
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl WorkflowRunRecord {
    fn seal(mut self) -> WorkflowRunRecord {
        self.digest = String::new();
        self.digest = sha256_hex(&serde_json::to_vec(&self).unwrap_or_default());
        self
    }

    /// The record with what started it and what ran, sealed again.
    pub fn with_origin(mut self, trigger: Trigger, source: impl Into<String>) -> WorkflowRunRecord {
        self.trigger = Some(trigger);
        self.source = source.into();
        self.seal()
    }

    /// Whether `digest` matches the other fields.
    pub fn verify(&self) -> bool {
        self.clone().seal().digest == self.digest
    }
}

/// Progress of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkflowEvent {
    /// The step's inputs are ready; it waits for a slot.
    Queued(String),
    /// The step is running.
    Started(String),
    /// The step ended (its record).
    Finished(Box<StepRecord>),
}

/// Runs workflows on a catalog (for `uses` steps) and its executor.
#[derive(Debug, Clone)]
pub struct Workflows {
    catalog: Arc<Catalog>,
    artifacts: Arc<Artifacts>,
    /// Steps that run at once.
    pub concurrency: usize,
    /// Shared with a server's admission: each step holds one while it runs, so workflow steps
    /// count against the server's concurrency like any job (None: only `concurrency` bounds).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Most bytes one run may hold: its inputs plus every file its steps write
    /// (`[workflows] artifact_limit`).
    pub run_limit: u64,
    /// How many run records are kept, and for how long ([`Workflows::save_run`]).
    retention: RunRetention,
    /// When this runner last deleted old run records.
    last_prune: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Told of every run record [`Workflows::save_run`] stores.
    observer: Option<RunObserver>,
}

/// What a [`RunObserver`] calls: with the tenant and the record stored.
pub type ObserveRun = dyn Fn(&str, &WorkflowRunRecord) + Send + Sync;

/// Told of every run record a runner stores, with its tenant (a server counts them).
#[derive(Clone)]
pub struct RunObserver(pub Arc<ObserveRun>);

impl std::fmt::Debug for RunObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunObserver")
    }
}

/// Which workflow run records [`Workflows::save_run`] keeps: the newest `per_workflow` of each
/// tenant's workflow, none older than `max_age` (`[workflows] run_history`, `run_retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRetention {
    /// Records kept per tenant and workflow.
    pub per_workflow: u32,
    /// Records older than this are deleted.
    pub max_age: std::time::Duration,
}

impl Default for RunRetention {
    /// 1000 per workflow, 90 days: as schedule firings are kept.
    fn default() -> Self {
        RunRetention {
            per_workflow: 1000,
            max_age: std::time::Duration::from_secs(90 * 86_400),
        }
    }
}

/// How often one runner deletes old run records (at its first save, then at most this often).
pub const RUN_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The default [`Workflows::run_limit`]: `[workflows] artifact_limit`'s default.
pub const DEFAULT_RUN_LIMIT: u64 = 256 << 20;

/// A workflow input or step output as it moves between steps.
type Files = HashMap<Wire, bytes::Bytes>;

impl Workflows {
    /// Workflows on `catalog`, keeping files between steps in `artifacts`.
    pub fn new(catalog: Arc<Catalog>, artifacts: Arc<Artifacts>, concurrency: usize) -> Workflows {
        Workflows {
            catalog,
            artifacts,
            concurrency: concurrency.max(1),
            slots: None,
            run_limit: DEFAULT_RUN_LIMIT,
            retention: RunRetention::default(),
            last_prune: Arc::default(),
            observer: None,
        }
    }

    /// The same runner telling `observer` of every run record it stores.
    pub fn with_run_observer(mut self, observer: RunObserver) -> Workflows {
        self.observer = Some(observer);
        self
    }

    /// The same runner keeping run records within `retention`.
    pub fn with_run_retention(mut self, retention: RunRetention) -> Workflows {
        self.retention = retention;
        self
    }

    /// Stores `record` as a run of `tenant` in the catalog's database (what `workflow record`,
    /// `GetWorkflowRun` and a resume read). At the runner's first save, and then at most once
    /// per [`RUN_PRUNE_EVERY`], it also deletes the run records past its [`RunRetention`]
    /// (a per-minute schedule records half a million runs a year); a failed deletion is logged
    /// and tried again at the next save.
    pub async fn save_run(
        &self,
        tenant: &str,
        record: &WorkflowRunRecord,
    ) -> Result<(), stepbox_store::StoreError> {
        let value = serde_json::to_value(record).map_err(|e| {
            stepbox_store::StoreError::InvalidArgument {
                field: "record",
                reason: e.to_string(),
            }
        })?;
        let store = self.catalog.store();
        store
            .save_workflow_run(
                tenant,
                &record.run_id,
                &record.workflow,
                &record.status,
                &value,
            )
            .await?;
        if let Some(o) = &self.observer {
            (o.0)(tenant, record);
        }
        let due = {
            let mut last = self.last_prune.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= RUN_PRUNE_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            let RunRetention {
                per_workflow,
                max_age,
            } = self.retention;
            match store.prune_workflow_runs(per_workflow, max_age).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "pruned old workflow run records"),
                Err(e) => {
                    *self.last_prune.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    tracing::warn!(error = %e, "pruning workflow run records failed");
                }
            }
        }
        Ok(())
    }

    /// Where it keeps files between steps.
    pub fn artifacts(&self) -> &Arc<Artifacts> {
        &self.artifacts
    }

    /// The same runner with at most `bytes` held per run (inputs plus step outputs); a step
    /// whose outputs would pass it fails with `OUTPUT_EXCEEDED` and its successors are skipped.
    pub fn with_run_limit(mut self, bytes: u64) -> Workflows {
        self.run_limit = bytes;
        self
    }

    /// The same runner whose steps each take one of `slots` while they run (a server's
    /// admission); a step's `Started` event comes once it has one.
    pub fn with_slots(mut self, slots: Arc<tokio::sync::Semaphore>) -> Workflows {
        self.slots = Some(slots);
        self
    }

    /// Checks what the plan's shape cannot: every catalog reference resolves, and every wire
    /// from a catalog step names a file its version's cases show it writes.
    pub async fn check(&self, plan: &Plan) -> Result<(), WorkflowError> {
        let mut declared: HashMap<&str, Option<Vec<String>>> = HashMap::new();
        for s in &plan.steps {
            let outs =
                match &s.kind {
                    StepKind::Catalog(r) => {
                        let resolved = self.catalog.resolve(r).await.map_err(|error| {
                            WorkflowError::Catalog {
                                workflow: plan.name.clone(),
                                step: s.id.clone(),
                                error,
                            }
                        })?;
                        Some(resolved.version.definition.declared_outputs())
                    }
                    StepKind::Program { .. } => None,
                };
            declared.insert(&s.id, outs);
        }
        let wires = plan
            .steps
            .iter()
            .flat_map(|s| {
                s.inputs
                    .iter()
                    .map(move |(name, w)| (format!("steps.{}.inputs.{name}", s.id), w))
                    .chain(
                        s.stdin
                            .iter()
                            .map(move |w| (format!("steps.{}.stdin", s.id), w)),
                    )
            })
            .chain(
                plan.outputs
                    .iter()
                    .map(|(n, w)| (format!("outputs.{n}"), w)),
            );
        for (key, w) in wires {
            if let Wire::Output { step, file } = w
                && let Some(Some(outs)) = declared.get(step.as_str())
                && !outs.contains(file)
            {
                return Err(WorkflowError::Invalid {
                    workflow: plan.name.clone(),
                    error: ModelError::new(
                        key,
                        format!(
                            "step `{step}` does not write `{file}` (its version's cases show: {})",
                            if outs.is_empty() {
                                "no output files".to_string()
                            } else {
                                outs.join(", ")
                            }
                        ),
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs `plan` on `inputs` (one file per workflow input). With `resume`, steps whose
    /// version, policy and input digests match that run's successful record are reused.
    pub async fn run(
        &self,
        plan: &Plan,
        inputs: BTreeMap<String, bytes::Bytes>,
        resume: Option<&WorkflowRunRecord>,
        events: Option<tokio::sync::mpsc::UnboundedSender<WorkflowEvent>>,
    ) -> Result<WorkflowRunRecord, WorkflowError> {
        let started_at = now_rfc3339();
        let invalid = |error: ModelError| WorkflowError::Invalid {
            workflow: plan.name.clone(),
            error,
        };
        for name in plan.inputs.keys() {
            if !inputs.contains_key(name) {
                return Err(invalid(ModelError::new(
                    format!("inputs.{name}"),
                    "was not provided: pass every workflow input (e.g. `--input NAME=PATH`)",
                )));
            }
        }
        for name in inputs.keys() {
            if !plan.inputs.contains_key(name) {
                return Err(invalid(ModelError::new(
                    format!("inputs.{name}"),
                    format!(
                        "is not an input of this workflow; its inputs are {}",
                        plan.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )));
            }
        }
        let input_bytes: u64 = inputs.values().map(|b| b.len() as u64).sum();
        if input_bytes > self.run_limit {
            return Err(invalid(ModelError::new(
                "inputs",
                format!(
                    "are {input_bytes} bytes together, more than this server's per-run limit of \
                     {} bytes (`[workflows] artifact_limit`); send smaller files or raise the limit",
                    self.run_limit
                ),
            )));
        }
        let held = AtomicU64::new(input_bytes);
        self.check(plan).await?;
        let send = |e: WorkflowEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(e);
            }
        };
        let mut files: Files = inputs
            .iter()
            .map(|(n, b)| (Wire::Input(n.clone()), b.clone()))
            .collect();
        let previous: HashMap<&str, &StepRecord> = resume
            .map(|r| r.steps.iter().map(|s| (s.id.as_str(), s)).collect())
            .unwrap_or_default();
        let mut records: HashMap<String, StepRecord> = HashMap::new();
        let mut pending: Vec<&PlannedStep> = plan.steps.iter().collect();
        let mut running = FuturesUnordered::new();
        loop {
            // Start every step whose upstream is done, within the concurrency bound; skip those
            // whose upstream failed.
            let mut i = 0;
            while i < pending.len() {
                let s = pending[i];
                let ups: Vec<&StepRecord> = s.after.iter().filter_map(|a| records.get(a)).collect();
                if ups.len() < s.after.len() {
                    i += 1;
                    continue;
                }
                if let Some(bad) = ups
                    .iter()
                    .find(|u| !matches!(u.state, StepState::Succeeded | StepState::Reused))
                {
                    let rec =
                        self.skipped(s, format!("not run: step `{}` did not succeed", bad.id));
                    send(WorkflowEvent::Finished(Box::new(rec.clone())));
                    records.insert(s.id.clone(), rec);
                    pending.remove(i);
                    continue;
                }
                if running.len() >= self.concurrency {
                    break;
                }
                pending.remove(i);
                let prepared = self.prepare(&plan.name, s, &files).await;
                match prepared {
                    Err(PrepareError::Missing(msg)) => {
                        let rec = self.skipped(s, msg);
                        send(WorkflowEvent::Finished(Box::new(rec.clone())));
                        records.insert(s.id.clone(), rec);
                    }
                    Err(PrepareError::Fatal(e)) => return Err(*e),
                    Ok(p) => {
                        if let Some(prev) = previous.get(s.id.as_str())
                            && matches!(prev.state, StepState::Succeeded | StepState::Reused)
                            && prev.reuse_key() == p.record.reuse_key()
                            && let Ok(outs) = self.load_outputs(prev)
                        {
                            let mut rec = (*prev).clone();
                            rec.state = StepState::Reused;
                            let n: u64 = outs.iter().map(|(_, b)| b.len() as u64).sum();
                            held.fetch_add(n, Ordering::SeqCst);
                            for (file, bytes) in outs {
                                files.insert(
                                    Wire::Output {
                                        step: s.id.clone(),
                                        file,
                                    },
                                    bytes,
                                );
                            }
                            send(WorkflowEvent::Finished(Box::new(rec.clone())));
                            records.insert(s.id.clone(), rec);
                            continue;
                        }
                        send(WorkflowEvent::Queued(s.id.clone()));
                        running.push(self.execute(p, &held, events.as_ref()));
                    }
                }
            }
            let Some(done) = running.next().await else {
                if pending.is_empty() {
                    break;
                }
                // Plans are topologically ordered, so the first pending step is always ready
                // once nothing runs: reaching here is a bug, not a state to wait in.
                return Err(WorkflowError::Host(format!(
                    "workflow `{}`: steps {} can never start",
                    plan.name,
                    pending
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let (rec, outs) = done?;
            for (file, bytes) in outs {
                files.insert(
                    Wire::Output {
                        step: rec.id.clone(),
                        file,
                    },
                    bytes,
                );
            }
            send(WorkflowEvent::Finished(Box::new(rec.clone())));
            records.insert(rec.id.clone(), rec);
        }
        let steps: Vec<StepRecord> = plan
            .steps
            .iter()
            .filter_map(|s| records.remove(&s.id))
            .collect();
        let ok = steps
            .iter()
            .all(|s| matches!(s.state, StepState::Succeeded | StepState::Reused));
        let outputs = plan
            .outputs
            .iter()
            .filter_map(|(name, w)| {
                let Wire::Output { step, file } = w else {
                    return None;
                };
                let rec = steps.iter().find(|s| &s.id == step)?;
                let digest = rec.outputs.get(file)?;
                Some((name.clone(), (file.clone(), digest.clone())))
            })
            .collect();
        let wiring = plan
            .steps
            .iter()
            .map(|s| {
                let mut m: BTreeMap<String, String> = s
                    .inputs
                    .iter()
                    .map(|(n, w)| (n.clone(), w.to_string()))
                    .collect();
                if let Some(w) = &s.stdin {
                    m.insert("<stdin>".into(), w.to_string());
                }
                (s.id.clone(), m)
            })
            .collect();
        Ok(WorkflowRunRecord {
            run_id: uuid::Uuid::new_v4().to_string(),
            workflow: plan.name.clone(),
            resumed_from: resume.map(|r| r.run_id.clone()).unwrap_or_default(),
            trigger: None,
            source: String::new(),
            status: if ok { "succeeded" } else { "failed" }.into(),
            inputs: inputs
                .iter()
                .map(|(n, b)| (n.clone(), sha256_hex(b)))
                .collect(),
            steps,
            outputs,
            wiring,
            started_at,
            finished_at: now_rfc3339(),
            digest: String::new(),
        }
        .seal())
    }

    /// The bytes of a workflow output of a finished run.
    pub fn output(&self, record: &WorkflowRunRecord, name: &str) -> Option<bytes::Bytes> {
        let (_, digest) = record.outputs.get(name)?;
        self.artifacts.get(digest).ok()
    }

    fn load_outputs(&self, rec: &StepRecord) -> Result<Vec<(String, bytes::Bytes)>, String> {
        rec.outputs
            .iter()
            .map(|(f, d)| Ok((f.clone(), self.artifacts.get(d)?)))
            .collect()
    }

    fn skipped(&self, s: &PlannedStep, message: String) -> StepRecord {
        StepRecord {
            id: s.id.clone(),
            state: StepState::Skipped,
            status: String::new(),
            message,
            version: String::new(),
            version_digest: String::new(),
            policy: String::new(),
            inputs: BTreeMap::new(),
            stdin: String::new(),
            outputs: BTreeMap::new(),
            checks: Vec::new(),
            manifest_digest: String::new(),
            run_id: String::new(),
        }
    }

    /// Resolves the step and gathers its inputs; a wired file its upstream did not write is
    /// `Missing` (the step is skipped with that message).
    async fn prepare(
        &self,
        workflow: &str,
        s: &PlannedStep,
        files: &Files,
    ) -> Result<Prepared, PrepareError> {
        let get = |w: &Wire| -> Result<bytes::Bytes, PrepareError> {
            files.get(w).cloned().ok_or_else(|| {
                PrepareError::Missing(match w {
                    Wire::Output { step, file } => format!(
                        "not run: step `{step}` did not write `{file}`, which `{}` reads",
                        s.id
                    ),
                    Wire::Input(n) => format!("not run: workflow input `{n}` is missing"),
                })
            })
        };
        let mut inputs = Vec::new();
        let mut input_digests = BTreeMap::new();
        for (name, w) in &s.inputs {
            let b = get(w)?;
            input_digests.insert(name.clone(), sha256_hex(&b));
            inputs.push(InputFile {
                path: name.clone(),
                content: b,
            });
        }
        let stdin = match &s.stdin {
            Some(w) => get(w)?,
            None => bytes::Bytes::new(),
        };
        let (job, checks, version, step_version) = match &s.kind {
            StepKind::Catalog(r) => {
                let resolved = self.catalog.resolve(r).await.map_err(|error| {
                    PrepareError::Fatal(Box::new(WorkflowError::Catalog {
                        workflow: workflow.to_string(),
                        step: s.id.clone(),
                        error,
                    }))
                })?;
                let (job, checks) = resolved
                    .job(inputs, stdin.clone(), s.args.clone(), Vec::new())
                    .map_err(|error| {
                        PrepareError::Fatal(Box::new(WorkflowError::Catalog {
                            workflow: workflow.to_string(),
                            step: s.id.clone(),
                            error,
                        }))
                    })?;
                let v = resolved.version.manifest_ref();
                (job, checks, resolved.version.label(), Some(v))
            }
            StepKind::Program {
                source,
                runtime,
                filename,
                policy,
            } => {
                let mut job = StepJob::new(*runtime, source.clone());
                job.filename = Some(filename.clone());
                job.policy = policy.clone();
                job.inputs = inputs;
                job.stdin = stdin.clone();
                job.args = s.args.clone();
                (job, Vec::new(), "program".to_string(), None)
            }
        };
        let record = StepRecord {
            id: s.id.clone(),
            state: StepState::Skipped,
            status: String::new(),
            message: String::new(),
            version,
            version_digest: step_version
                .as_ref()
                .map(|v| v.digest.clone())
                .unwrap_or_else(|| sha256_hex(&job.program)),
            policy: job.policy.clone(),
            inputs: input_digests,
            stdin: sha256_hex(&stdin),
            outputs: BTreeMap::new(),
            checks: Vec::new(),
            manifest_digest: String::new(),
            run_id: String::new(),
        };
        Ok(Prepared {
            job,
            checks,
            step_version,
            record,
        })
    }

    /// Runs a prepared step and stores its output files as artifacts.
    async fn execute(
        &self,
        p: Prepared,
        held: &AtomicU64,
        events: Option<&tokio::sync::mpsc::UnboundedSender<WorkflowEvent>>,
    ) -> Result<(StepRecord, Vec<(String, bytes::Bytes)>), WorkflowError> {
        let _slot = match &self.slots {
            Some(s) => Some(s.clone().acquire_owned().await.map_err(|_| {
                WorkflowError::Host("the server is shutting down; the step did not start".into())
            })?),
            None => None,
        };
        if let Some(tx) = events {
            let _ = tx.send(WorkflowEvent::Started(p.record.id.clone()));
        }
        let mut rec = p.record;
        let options = RunOptions {
            step_version: p.step_version,
            ..RunOptions::default()
        };
        let outcome = self
            .catalog
            .executor()
            .run_checked(p.job, &p.checks, options)
            .await;
        let (result, verdicts): (RunResult, _) = match outcome {
            Ok(r) => r,
            Err(e) => {
                rec.state = StepState::Failed;
                rec.message = format!("refused: {e}");
                return Ok((rec, Vec::new()));
            }
        };
        rec.status = result.status.name().to_string();
        rec.message = result.message.clone();
        rec.run_id = result.run_id.clone();
        rec.manifest_digest = result.manifest.digest.clone();
        rec.checks = verdicts
            .iter()
            .map(|v| (v.name.clone(), v.passed, v.detail.clone()))
            .collect();
        rec.state = if result.status == Status::Succeeded {
            StepState::Succeeded
        } else {
            StepState::Failed
        };
        let mut outs = Vec::new();
        let files = || result.outputs.iter().filter(|o| o.kind == OutputKind::File);
        let bytes: u64 = files().map(|o| o.content.len() as u64).sum();
        if rec.state == StepState::Succeeded
            && held
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                    h.checked_add(bytes).filter(|t| *t <= self.run_limit)
                })
                .is_err()
        {
            rec.state = StepState::Failed;
            rec.status = Status::OutputExceeded.name().to_string();
            rec.message = format!(
                "its output files ({bytes} bytes) would take this workflow run past its limit of \
                 {} bytes held per run (inputs plus every step's files, `[workflows] \
                 artifact_limit`); they were not kept",
                self.run_limit
            );
        }
        if rec.state == StepState::Succeeded {
            for o in files() {
                let digest = self
                    .artifacts
                    .put(&o.content)
                    .map_err(|e| WorkflowError::Host(format!("step `{}`: {e}", rec.id)))?;
                rec.outputs.insert(o.path.clone(), digest);
                outs.push((o.path.clone(), o.content.clone()));
            }
        }
        Ok((rec, outs))
    }
}

struct Prepared {
    job: StepJob,
    checks: Vec<crate::job::checks::Check>,
    step_version: Option<StepVersionRef>,
    record: StepRecord,
}

enum PrepareError {
    Missing(String),
    Fatal(Box<WorkflowError>),
}
