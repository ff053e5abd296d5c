//! The step catalog: verified steps kept as immutable versions, deployed to stages and called by
//! reference, as single-task services.
//!
//! It owns the definition of a published step and its digest ([`model`]), the `step.toml` file
//! a repository keeps next to a program ([`stepfile`]), and the [`Catalog`]: publishing (every
//! case run in the sandbox; `verified` only when all pass), promotion to a stage (the cases re-run
//! under the stage's policy; the alias moves only if all pass; every attempt audited), and
//! resolving references for runs, with a cache that a replica revalidates against the store's
//! change counter. Storage is [`stepbox_store`] (embedded SQLite by default, PostgreSQL for
//! replicas).
//!
//! It uses the core ([`crate::Executor`], [`crate::job`]) and the store; it knows nothing of
//! proto, the CLI, tenants' tokens or HTTP: callers pass the tenant's name for the audit trail.

pub mod model;
pub mod stepfile;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stepbox_store::{
    Kind, NewVersion, Promotion, PromotionOutcome, PromotionRecord, Store, StoreError, VersionRow,
    VersionState,
};

use crate::Executor;
pub use crate::catalog::model::{
    Blob, Case, CheckSpec, ModelError, Origin, Selector, StepDefinition, StepRef,
};
use crate::executor::{RunOptions, StepVersionRef};
use crate::job::checks::{Check, CheckResult};
use crate::job::outcome::{RunResult, Status};
use crate::job::request::{InputFile, JobError, StepJob};

/// How often a catalog re-reads the store's change counter, which bounds how long a replica
/// keeps serving a stage or `latest` reference after another replica moved it. One indexed
/// single-row read per second per replica is negligible for any database.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

/// Most resolved references kept in memory.
const CACHE_ENTRIES: usize = 1024;

/// One stage: a named alias with the policy its runs use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The stage's name, e.g. `prod`.
    pub name: String,
    /// The policy runs of `NAME@STAGE` and promotions to it use; absent: the version's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// The default stages: `dev`, `staging`, `prod`, each running under the version's own policy.
pub fn default_stages() -> Vec<StageConfig> {
    ["dev", "staging", "prod"]
        .into_iter()
        .map(|name| StageConfig {
            name: name.into(),
            policy: None,
        })
        .collect()
}

/// Why a catalog operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A field of the request is wrong.
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// The step, version or stage does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The job could not run (refused by validation, or the host failed).
    #[error(transparent)]
    Job(#[from] JobError),
    /// The database is down or unreachable (the message names it, password masked).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else the store reported.
    #[error("the catalog store failed: {0}")]
    Store(StoreError),
    /// A stored document this build cannot read.
    #[error("stored version {0} cannot be read: {1}")]
    Corrupt(String, String),
}

impl From<StoreError> for CatalogError {
    fn from(e: StoreError) -> CatalogError {
        if e.is_unavailable() {
            CatalogError::Unavailable(e.to_string())
        } else if let StoreError::InvalidArgument { .. } = e {
            CatalogError::Invalid(ModelError::new("request", e.to_string()))
        } else {
            CatalogError::Store(e)
        }
    }
}

/// The result of one case: how it ended, each check's verdict, and its sealed manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The case's name.
    pub case: String,
    /// How the run ended (after checks).
    pub status: String,
    /// Why, when it did not succeed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The policy it ran under.
    pub policy: String,
    /// Verdicts of the case's checks and the contract's.
    pub checks: Vec<CaseCheck>,
    /// The run manifest's digest.
    pub manifest_digest: String,
    /// The run manifest.
    pub manifest: serde_json::Value,
}

/// One check's verdict within a case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseCheck {
    /// The check's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl CaseResult {
    /// Whether the case passed: the run succeeded and every check passed.
    pub fn passed(&self) -> bool {
        self.status == Status::Succeeded.name()
    }

    fn from_run(case: &str, result: &RunResult, verdicts: &[CheckResult]) -> CaseResult {
        CaseResult {
            case: case.to_string(),
            status: result.status.name().to_string(),
            message: result.message.clone(),
            policy: result.policy.clone(),
            checks: verdicts
                .iter()
                .map(|v| CaseCheck {
                    name: v.name.clone(),
                    passed: v.passed,
                    detail: if v.passed {
                        String::new()
                    } else {
                        v.detail.clone()
                    },
                })
                .collect(),
            manifest_digest: result.manifest.digest.clone(),
            manifest: serde_json::to_value(&result.manifest).unwrap_or_default(),
        }
    }
}

/// A stored version, decoded.
#[derive(Clone, Debug)]
pub struct Version {
    /// The step's name.
    pub name: String,
    /// `N` of `vN`.
    pub number: i64,
    /// Hex sha256 of the canonical definition.
    pub digest: String,
    /// Whether its cases all passed at publication.
    pub verified: bool,
    /// The definition.
    pub definition: StepDefinition,
    /// The case results of the publication.
    pub cases: Vec<CaseResult>,
    /// Who published it.
    pub created_by: String,
    /// When, unix milliseconds.
    pub created_at: i64,
}

impl Version {
    fn from_row(row: VersionRow) -> Result<Version, CatalogError> {
        let definition: StepDefinition = serde_json::from_value(row.document).map_err(|e| {
            CatalogError::Corrupt(format!("{}@v{}", row.name, row.number), e.to_string())
        })?;
        let cases: Vec<CaseResult> = serde_json::from_value(row.evidence).unwrap_or_default();
        Ok(Version {
            name: row.name,
            number: row.number,
            digest: row.digest,
            verified: row.state == VersionState::Verified,
            definition,
            cases,
            created_by: row.created_by,
            created_at: row.created_at,
        })
    }

    /// `NAME@vN`.
    pub fn label(&self) -> String {
        format!("{}@v{}", self.name, self.number)
    }

    /// What run manifests record of it.
    pub fn manifest_ref(&self) -> StepVersionRef {
        StepVersionRef {
            name: self.name.clone(),
            version: self.number,
            digest: self.digest.clone(),
        }
    }
}

/// What a publication did.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The stored version; `None` when its cases failed and unverified versions were not allowed.
    pub version: Option<Arc<Version>>,
    /// False when the same content was already published (nothing was run or stored).
    pub created: bool,
    /// The case results (of this publication, or the stored ones when not created).
    pub cases: Vec<CaseResult>,
}

/// What a promotion did. Every promotion, accepted or refused, leaves an audit record.
#[derive(Clone, Debug)]
pub struct PromotionResult {
    /// Whether the stage now points at the version.
    pub promoted: bool,
    /// Why it was refused (empty when promoted).
    pub reason: String,
    /// The audit record.
    pub record: PromotionRecord,
    /// The cases re-run under the stage's policy (empty when refused before running them).
    pub cases: Vec<CaseResult>,
}

impl PromotionResult {
    /// The result of what the store did with a promotion, with the cases re-run for it.
    pub fn from_outcome(outcome: &PromotionOutcome, cases: Vec<CaseResult>) -> PromotionResult {
        let (promoted, reason) = match outcome {
            PromotionOutcome::Promoted(_) => (true, String::new()),
            PromotionOutcome::Refused(r) => (false, r.reason.clone()),
            PromotionOutcome::Conflict { record, .. } => (false, record.reason.clone()),
        };
        PromotionResult {
            promoted,
            reason,
            record: outcome.record().clone(),
            cases,
        }
    }
}

/// A step's overview.
#[derive(Clone, Debug)]
pub struct StepOverview {
    /// The step's name.
    pub name: String,
    /// Every version, oldest first.
    pub versions: Vec<Arc<Version>>,
    /// Where each configured stage points (in configuration order; `None`: unset).
    pub stages: Vec<(String, Option<stepbox_store::StageRow>)>,
}

/// A reference resolved to a version, and the policy its runs use.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The version.
    pub version: Arc<Version>,
    /// The stage, for `NAME@STAGE` references.
    pub stage: Option<String>,
    /// The policy runs use: the stage's, else the version's.
    pub policy: String,
}

impl Resolved {
    /// The job for a run on caller-supplied inputs, and the checks it must pass: the contract's,
    /// then `extra`.
    pub fn job(
        &self,
        inputs: Vec<InputFile>,
        stdin: bytes::Bytes,
        args: Vec<String>,
        extra: Vec<Check>,
    ) -> Result<(StepJob, Vec<Check>), CatalogError> {
        let def = &self.version.definition;
        let mut job = def.base_job()?;
        job.policy = self.policy.clone();
        job.inputs = inputs;
        job.stdin = stdin;
        job.args = args;
        let mut checks = def.contract_checks()?;
        checks.extend(extra);
        Ok((job, checks))
    }
}

#[derive(Debug, Default)]
struct Cache {
    /// Stage and `latest` references: valid while the generation they were read at is current.
    moving: HashMap<StepRef, (i64, Arc<Resolved>)>,
    /// Versions by (name, digest) and (name, number): immutable, valid forever.
    by_digest: HashMap<(String, String), Arc<Version>>,
    by_number: HashMap<(String, i64), Arc<Version>>,
}

/// The catalog: a store, the executor that runs cases, and the configured stages.
#[derive(Debug)]
pub struct Catalog {
    store: Store,
    executor: Arc<Executor>,
    stages: Vec<StageConfig>,
    /// The store's change counter as last read.
    generation: Arc<AtomicI64>,
    cache: Mutex<Cache>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        if let Some(r) = &self.refresher {
            r.abort();
        }
    }
}

impl Catalog {
    /// A catalog on `store` with `stages` (validated: at least one, unique names, known
    /// policies). `refresh` is how often the change counter is re-read (None: never, for a
    /// one-shot process such as the CLI); it must be called inside a tokio runtime then.
    pub async fn new(
        store: Store,
        executor: Arc<Executor>,
        stages: Vec<StageConfig>,
        refresh: Option<Duration>,
    ) -> Result<Catalog, CatalogError> {
        check_stages(&stages, &executor)?;
        let generation = Arc::new(AtomicI64::new(store.catalog_generation().await?));
        let refresher = refresh.map(|every| {
            let (store, generation) = (store.clone(), generation.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match store.catalog_generation().await {
                        Ok(g) => {
                            generation.fetch_max(g, Ordering::AcqRel);
                        }
                        Err(e) => tracing::warn!(error = %e, "catalog refresh failed"),
                    }
                }
            })
        });
        Ok(Catalog {
            store,
            executor,
            stages,
            generation,
            cache: Mutex::default(),
            refresher,
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The executor cases and runs use.
    pub fn executor(&self) -> &Arc<Executor> {
        &self.executor
    }

    /// The configured stages, in order (the first is where unverified versions may go).
    pub fn stages(&self) -> &[StageConfig] {
        &self.stages
    }

    fn stage(&self, name: &str) -> Result<&StageConfig, CatalogError> {
        self.stages.iter().find(|s| s.name == name).ok_or_else(|| {
            CatalogError::Invalid(ModelError::new(
                "stage",
                format!(
                    "unknown stage `{name}`: this catalog's stages are {}",
                    self.stage_names()
                ),
            ))
        })
    }

    fn stage_names(&self) -> String {
        self.stages
            .iter()
            .map(|s| format!("`{}`", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Runs `definition`'s cases and stores it as a version of its name: `verified` when every
    /// case passes; when not, stored `unverified` only if `allow_unverified`. Publishing content
    /// that is already stored returns that version without running anything.
    pub async fn publish(
        &self,
        definition: &StepDefinition,
        tenant: &str,
        allow_unverified: bool,
    ) -> Result<Publication, CatalogError> {
        let def = definition.canonical()?;
        if self.executor.policies().get(&def.policy).is_none() {
            return Err(CatalogError::Invalid(ModelError::new(
                "policy",
                format!(
                    "unknown policy `{}`: expected one of {}",
                    def.policy,
                    self.executor.policies().names().join(", ")
                ),
            )));
        }
        let digest = def.digest();
        if let Some(row) = self
            .store
            .get_version_by_digest(Kind::Step, &def.name, &digest)
            .await?
        {
            let v = Arc::new(Version::from_row(row)?);
            return Ok(Publication {
                cases: v.cases.clone(),
                version: Some(v),
                created: false,
            });
        }
        let cases = self.run_cases(&def, &def.policy).await?;
        let verified = !cases.is_empty() && cases.iter().all(CaseResult::passed);
        if !verified && !allow_unverified {
            return Ok(Publication {
                version: None,
                created: false,
                cases,
            });
        }
        let (row, created) = self
            .store
            .publish_version(&NewVersion {
                kind: Kind::Step,
                name: def.name.clone(),
                digest,
                state: if verified {
                    VersionState::Verified
                } else {
                    VersionState::Unverified
                },
                description: def.description.clone(),
                document: serde_json::to_value(&def).expect("a definition serialises"),
                evidence: serde_json::to_value(&cases).expect("case results serialise"),
                created_by: tenant.to_string(),
            })
            .await?;
        self.refresh_now().await;
        let version = Arc::new(Version::from_row(row)?);
        Ok(Publication {
            cases: if created {
                cases
            } else {
                version.cases.clone()
            },
            version: Some(version),
            created,
        })
    }

    /// Runs every case of `def` under `policy`.
    async fn run_cases(
        &self,
        def: &StepDefinition,
        policy: &str,
    ) -> Result<Vec<CaseResult>, CatalogError> {
        let mut out = Vec::with_capacity(def.cases.len());
        for (i, case) in def.cases.iter().enumerate() {
            let (job, checks) = def.case_job(i, policy)?;
            let (result, verdicts) =
                self.executor
                    .run_checked(job, &checks, RunOptions::default())
                    .await
                    .map_err(|e| match e {
                        JobError::Invalid { field, reason } => CatalogError::Invalid(
                            ModelError::new(format!("cases[{i}].{field}"), reason),
                        ),
                        other => CatalogError::Job(other),
                    })?;
            out.push(CaseResult::from_run(&case.name, &result, &verdicts));
        }
        Ok(out)
    }

    /// Resolves `r` through the cache: versions by digest or number are immutable and cached for
    /// good; stage and `latest` references are cached until the store's change counter moves
    /// (re-read every refresh interval, and at once after this catalog's own writes).
    pub async fn resolve(&self, r: &StepRef) -> Result<Arc<Resolved>, CatalogError> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(hit) = self.cached(r, generation) {
            return Ok(hit);
        }
        let resolved = Arc::new(self.resolve_uncached(r).await?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.moving.len() + cache.by_digest.len() + cache.by_number.len() >= CACHE_ENTRIES {
            *cache = Cache::default();
        }
        let v = &resolved.version;
        cache
            .by_digest
            .insert((v.name.clone(), v.digest.clone()), v.clone());
        cache
            .by_number
            .insert((v.name.clone(), v.number), v.clone());
        if matches!(r.selector, Selector::Stage(_) | Selector::Latest) {
            cache
                .moving
                .insert(r.clone(), (generation, resolved.clone()));
        }
        Ok(resolved)
    }

    fn cached(&self, r: &StepRef, generation: i64) -> Option<Arc<Resolved>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let version = match &r.selector {
            Selector::Stage(_) | Selector::Latest => {
                return cache
                    .moving
                    .get(r)
                    .filter(|(g, _)| *g == generation)
                    .map(|(_, res)| res.clone());
            }
            Selector::Digest(d) => cache.by_digest.get(&(r.name.clone(), d.clone()))?,
            Selector::Number(n) => cache.by_number.get(&(r.name.clone(), *n))?,
        };
        Some(Arc::new(Resolved {
            policy: version.definition.policy.clone(),
            version: version.clone(),
            stage: None,
        }))
    }

    /// Resolves `r` from the store.
    pub async fn resolve_uncached(&self, r: &StepRef) -> Result<Resolved, CatalogError> {
        let not_found = |what: String| CatalogError::NotFound(what);
        let (row, stage) = match &r.selector {
            Selector::Latest => (
                self.store
                    .latest_verified(Kind::Step, &r.name)
                    .await?
                    .ok_or_else(|| {
                        not_found(format!("step `{}` has no verified version", r.name))
                    })?,
                None,
            ),
            Selector::Number(n) => (
                self.store
                    .get_version_by_number(Kind::Step, &r.name, *n)
                    .await?
                    .ok_or_else(|| not_found(format!("no version `{r}`")))?,
                None,
            ),
            Selector::Digest(d) => (
                self.store
                    .get_version_by_digest(Kind::Step, &r.name, d)
                    .await?
                    .ok_or_else(|| not_found(format!("no version `{r}`")))?,
                None,
            ),
            Selector::Stage(s) => {
                let stage = self.stage(s)?;
                let at = self
                    .store
                    .get_stage(Kind::Step, &r.name, s)
                    .await?
                    .ok_or_else(|| {
                        not_found(format!("step `{}` has no version in stage `{s}`", r.name))
                    })?;
                let row = self
                    .store
                    .get_version_by_digest(Kind::Step, &r.name, &at.digest)
                    .await?
                    .ok_or_else(|| not_found(format!("no version `{r}`")))?;
                (row, Some(stage.clone()))
            }
        };
        let version = Arc::new(Version::from_row(row)?);
        let policy = stage
            .as_ref()
            .and_then(|s| s.policy.clone())
            .unwrap_or_else(|| version.definition.policy.clone());
        Ok(Resolved {
            version,
            stage: stage.map(|s| s.name),
            policy,
        })
    }

    /// Re-reads the change counter now (after this catalog's own writes).
    async fn refresh_now(&self) {
        if let Ok(g) = self.store.catalog_generation().await {
            self.generation.fetch_max(g, Ordering::AcqRel);
        }
    }

    /// Promotes the version `r` selects to `stage`: refused if the stage does not exist, if the
    /// version is unverified and `stage` is not the first stage, or if any case fails when re-run
    /// under the stage's policy (an unverified version entering the first stage is not gated: its
    /// cases are re-run for the audit record only). Two promotions of one stage at once: one wins, the other is
    /// refused as a conflict; both are audited.
    pub async fn promote(
        &self,
        r: &StepRef,
        stage: &str,
        tenant: &str,
    ) -> Result<PromotionResult, CatalogError> {
        let stage_cfg = self.stage(stage)?.clone();
        let resolved = self.resolve_uncached(r).await?;
        let version = &resolved.version;
        let current = self
            .store
            .get_stage(Kind::Step, &version.name, stage)
            .await?
            .map(|s| s.digest);
        let first = self.stages.first().map(|s| s.name.as_str()) == Some(stage);
        let policy = stage_cfg
            .policy
            .clone()
            .unwrap_or_else(|| version.definition.policy.clone());
        let (cases, refusal) = if !version.verified && !first {
            (
                Vec::new(),
                Some(format!(
                    "{} is unverified: unverified versions may only go to the first stage (`{}`); \
                     publish a version whose cases pass",
                    version.label(),
                    self.stages[0].name
                )),
            )
        } else if version.definition.cases.is_empty() && !first {
            (
                Vec::new(),
                Some(format!(
                    "{} has no cases to re-run under `{policy}`",
                    version.label()
                )),
            )
        } else {
            let cases = self.run_cases(&version.definition, &policy).await?;
            let failed: Vec<&str> = cases
                .iter()
                .filter(|c| !c.passed())
                .map(|c| c.case.as_str())
                .collect();
            // The first stage is where drafts live: an unverified version may enter it with its
            // cases failing (they are re-run for the record); a verified one is gated everywhere.
            let gated = version.verified || !first;
            let refusal = (gated && !failed.is_empty()).then(|| {
                format!(
                    "{} of {} cases failed under policy `{policy}`: {}",
                    failed.len(),
                    cases.len(),
                    failed.join(", ")
                )
            });
            (cases, refusal)
        };
        let evidence = serde_json::json!({
            "policy": policy,
            "cases": cases
                .iter()
                .map(|c| serde_json::json!({
                    "case": c.case,
                    "status": c.status,
                    "manifest_digest": c.manifest_digest,
                }))
                .collect::<Vec<_>>(),
        });
        let outcome = self
            .store
            .promote(&Promotion {
                kind: Kind::Step,
                name: version.name.clone(),
                stage: stage.to_string(),
                expected_current: current,
                to_digest: version.digest.clone(),
                tenant: tenant.to_string(),
                accepted: refusal.is_none(),
                reason: refusal.clone().unwrap_or_else(|| {
                    format!("{} passed its cases under `{policy}`", version.label())
                }),
                evidence,
            })
            .await?;
        self.refresh_now().await;
        Ok(PromotionResult::from_outcome(&outcome, cases))
    }

    /// Every step name, with its newest version; `filter` matches names and descriptions.
    pub async fn list(
        &self,
        filter: Option<&str>,
    ) -> Result<Vec<stepbox_store::NameSummary>, CatalogError> {
        Ok(self.store.list_names(Kind::Step, filter).await?)
    }

    /// A step's versions and stages.
    pub async fn overview(&self, name: &str) -> Result<StepOverview, CatalogError> {
        model::check_name("name", name)?;
        let versions = self
            .store
            .list_versions(Kind::Step, name)
            .await?
            .into_iter()
            .map(|r| Version::from_row(r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if versions.is_empty() {
            return Err(CatalogError::NotFound(format!("no step `{name}`")));
        }
        let rows = self.store.list_stages(Kind::Step, name).await?;
        let stages = self
            .stages
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    rows.iter().find(|r| r.stage == s.name).cloned(),
                )
            })
            .collect();
        Ok(StepOverview {
            name: name.to_string(),
            versions,
            stages,
        })
    }

    /// The promotion audit trail of a step, newest first.
    pub async fn history(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<PromotionRecord>, CatalogError> {
        model::check_name("name", name)?;
        Ok(self.store.list_promotions(Kind::Step, name, limit).await?)
    }

    /// Runs the version `r` selects on caller inputs, with its contract checks and `extra`; the
    /// manifest records the exact version.
    pub async fn run(
        &self,
        r: &StepRef,
        inputs: Vec<InputFile>,
        stdin: bytes::Bytes,
        args: Vec<String>,
        extra: Vec<Check>,
        mut options: RunOptions,
    ) -> Result<(RunResult, Vec<CheckResult>, Arc<Resolved>), CatalogError> {
        let resolved = self.resolve(r).await?;
        let (job, checks) = resolved.job(inputs, stdin, args, extra)?;
        options.step_version = Some(resolved.version.manifest_ref());
        let (result, verdicts) = self.executor.run_checked(job, &checks, options).await?;
        Ok((result, verdicts, resolved))
    }
}

/// Checks a stage list: at least one stage, unique names, known policies (errors name
/// `catalog.stages[i]`).
pub fn check_stages(stages: &[StageConfig], executor: &Executor) -> Result<(), CatalogError> {
    if stages.is_empty() {
        return Err(CatalogError::Invalid(ModelError::new(
            "catalog.stages",
            "is empty: configure at least one stage, e.g. `dev`",
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, s) in stages.iter().enumerate() {
        model::check_name(&format!("catalog.stages[{i}].name"), &s.name)?;
        if !seen.insert(&s.name) {
            return Err(CatalogError::Invalid(ModelError::new(
                format!("catalog.stages[{i}].name"),
                format!("stage `{}` is configured twice", s.name),
            )));
        }
        if let Some(p) = &s.policy
            && executor.policies().get(p).is_none()
        {
            return Err(CatalogError::Invalid(ModelError::new(
                format!("catalog.stages[{i}].policy"),
                format!(
                    "unknown policy `{p}`: expected one of {}",
                    executor.policies().names().join(", ")
                ),
            )));
        }
    }
    Ok(())
}
