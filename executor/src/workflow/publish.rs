//! Published workflows: immutable versions that pin every step version they use, with stages
//! and the same audit trail as steps.
//!
//! Publishing resolves each `uses` reference (e.g. `validator@prod`) to the exact version it
//! names now and stores the workflow with `uses = "NAME@sha256:DIGEST"`, so a later promotion of a
//! step never changes a published (or scheduled) workflow version. Its identity is
//! `sha256("stepbox.workflow.v1\n" + canonical JSON)` of that pinned definition (same canonical
//! form as steps). It is `verified` when every pinned step version is verified and every case
//! (sample inputs with expected outputs) passes; promotion past the first stage needs a verified
//! version, re-checks that its pinned versions still exist and re-runs its cases.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use stepbox_store::{Kind, NewVersion, Promotion, VersionRow, VersionState};

use crate::catalog::model::{Blob, ModelError, Selector, StepRef};
use crate::catalog::{CatalogError, PromotionResult};
use crate::job::digest::sha256_hex;
use crate::workflow::model::{Plan, StepKind, WorkflowFile};
use crate::workflow::{WorkflowError, Workflows};

/// A sample run with its inputs and expected outputs, loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowCase {
    /// The case's name.
    pub name: String,
    /// Workflow input name -> bytes.
    pub inputs: BTreeMap<String, Blob>,
    /// Workflow output name -> exact expected bytes.
    pub expected_outputs: BTreeMap<String, Blob>,
}

/// What a workflow version is: everything its digest covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowDefinition {
    /// The workflow with programs embedded and every `uses` pinned to `NAME@sha256:DIGEST`.
    pub workflow: WorkflowFile,
    /// Step id -> the reference as written (`validator@prod`), for people reading it.
    pub resolved_from: BTreeMap<String, String>,
    /// The cases, loaded.
    pub cases: Vec<WorkflowCase>,
}

impl WorkflowDefinition {
    /// The version digest.
    pub fn digest(&self) -> String {
        let value = serde_json::to_value(self).expect("a workflow definition serialises");
        let mut bytes = b"stepbox.workflow.v1\n".to_vec();
        crate::catalog::model::write_canonical(&value, &mut bytes);
        sha256_hex(&bytes)
    }
}

/// One case's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowCaseResult {
    /// The case.
    pub case: String,
    /// Whether the run succeeded and every expected output matched.
    pub passed: bool,
    /// Why not.
    #[serde(default)]
    pub detail: String,
    /// The run record's digest.
    pub run_digest: String,
}

/// A publication's outcome.
#[derive(Clone, Debug)]
pub struct WorkflowPublication {
    /// The stored version (`None`: not verified and unverified versions were not allowed).
    pub version: Option<VersionRow>,
    /// False when the same content was already stored.
    pub created: bool,
    /// The case verdicts.
    pub cases: Vec<WorkflowCaseResult>,
    /// Why it is not verified (empty when verified).
    pub unverified_because: Vec<String>,
}

/// Reads the case files of a workflow (relative to `path`'s directory).
pub fn load_cases(path: &Path, wf: &WorkflowFile) -> Result<Vec<WorkflowCase>, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let origin = path.display();
    let read = |key: String, rel: &str| -> Result<Blob, String> {
        std::fs::read(dir.join(rel))
            .map(|b| Blob::from_bytes(&b))
            .map_err(|e| format!("`{origin}`: key `{key}`: file `{rel}` cannot be read: {e}"))
    };
    wf.cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(WorkflowCase {
                name: c.name.clone(),
                inputs: c
                    .inputs
                    .iter()
                    .map(|(n, p)| Ok((n.clone(), read(format!("cases[{i}].inputs.{n}"), p)?)))
                    .collect::<Result<_, String>>()?,
                expected_outputs: c
                    .expected_outputs
                    .iter()
                    .map(|(n, p)| {
                        Ok((
                            n.clone(),
                            read(format!("cases[{i}].expected_outputs.{n}"), p)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            })
        })
        .collect()
}

impl Workflows {
    fn catalog_err(&self, workflow: &str, step: &str, error: CatalogError) -> WorkflowError {
        WorkflowError::Catalog {
            workflow: workflow.to_string(),
            step: step.to_string(),
            error,
        }
    }

    /// Pins every `uses` of `wf` to the version it resolves to now. Returns the pinned workflow,
    /// what each was resolved from, and the steps whose versions are unverified.
    async fn pin(
        &self,
        wf: &WorkflowFile,
    ) -> Result<(WorkflowFile, BTreeMap<String, String>, Vec<String>), WorkflowError> {
        let mut pinned = wf.clone();
        let mut from = BTreeMap::new();
        let mut unverified = Vec::new();
        for s in &mut pinned.steps {
            // Drafting paths are not part of a published workflow: the source is.
            if s.source.is_some() {
                s.program = s
                    .program
                    .as_ref()
                    .and_then(|p| Path::new(p).file_name())
                    .and_then(|n| n.to_str())
                    .map(str::to_string);
            }
            let Some(raw) = s.uses.clone() else { continue };
            let r = StepRef::parse(&format!("steps.{}.uses", s.id), &raw).map_err(|error| {
                WorkflowError::Invalid {
                    workflow: wf.name.clone(),
                    error,
                }
            })?;
            let resolved = self
                .catalog
                .resolve(&r)
                .await
                .map_err(|e| self.catalog_err(&wf.name, &s.id, e))?;
            let v = &resolved.version;
            if !v.verified {
                unverified.push(format!("step `{}` uses unverified {}", s.id, v.label()));
            }
            s.uses = Some(format!("{}@sha256:{}", v.name, v.digest));
            from.insert(s.id.clone(), raw);
        }
        Ok((pinned, from, unverified))
    }

    /// Runs every case of `def`; a case passes when the run succeeds and each expected output
    /// equals the one produced, byte for byte.
    async fn run_cases(
        &self,
        plan: &Plan,
        def: &WorkflowDefinition,
    ) -> Result<Vec<WorkflowCaseResult>, WorkflowError> {
        let mut out = Vec::new();
        for (i, case) in def.cases.iter().enumerate() {
            let inputs = case
                .inputs
                .iter()
                .map(|(n, b)| {
                    b.to_bytes(&format!("cases[{i}].inputs.{n}"))
                        .map(|b| (n.clone(), b))
                })
                .collect::<Result<BTreeMap<_, _>, ModelError>>()
                .map_err(|error| WorkflowError::Invalid {
                    workflow: plan.name.clone(),
                    error,
                })?;
            let record = self.run(plan, inputs, None, None).await?;
            let mut problems = Vec::new();
            if record.status != "succeeded" {
                for s in record
                    .steps
                    .iter()
                    .filter(|s| !s.message.is_empty() || !s.status.is_empty())
                {
                    if s.status != "SUCCEEDED" {
                        problems.push(format!("step `{}`: {} {}", s.id, s.status, s.message));
                    }
                }
            }
            for (name, expected) in &case.expected_outputs {
                let want = expected.to_bytes("expected").unwrap_or_default();
                match self.output(&record, name) {
                    Some(got) if got == want => {}
                    Some(got) => problems.push(format!(
                        "output `{name}` differs: expected {} bytes (sha256 {}), got {} bytes (sha256 {})",
                        want.len(),
                        &sha256_hex(&want)[..12],
                        got.len(),
                        &sha256_hex(&got)[..12]
                    )),
                    None => problems.push(format!("output `{name}` was not produced")),
                }
            }
            out.push(WorkflowCaseResult {
                case: case.name.clone(),
                passed: problems.is_empty(),
                detail: problems.join("; "),
                run_digest: record.digest.clone(),
            });
        }
        Ok(out)
    }

    /// Publishes `wf` with its loaded `cases`: pins its step versions, runs its cases, and stores
    /// it `verified` (every pinned step version verified, at least one case, all cases passing)
    /// or, only with `allow_unverified`, `unverified`.
    pub async fn publish(
        &self,
        wf: &WorkflowFile,
        cases: Vec<WorkflowCase>,
        tenant: &str,
        allow_unverified: bool,
    ) -> Result<WorkflowPublication, WorkflowError> {
        wf.plan().map_err(|error| WorkflowError::Invalid {
            workflow: wf.name.clone(),
            error,
        })?;
        let (pinned, resolved_from, mut why) = self.pin(wf).await?;
        let def = WorkflowDefinition {
            workflow: pinned,
            resolved_from,
            cases,
        };
        let digest = def.digest();
        let store = self.catalog.store();
        let host = |e: stepbox_store::StoreError| self.catalog_err(&wf.name, "", e.into());
        if let Some(row) = store
            .get_version_by_digest(Kind::Workflow, &wf.name, &digest)
            .await
            .map_err(host)?
        {
            let cases = serde_json::from_value(row.evidence.clone()).unwrap_or_default();
            return Ok(WorkflowPublication {
                version: Some(row),
                created: false,
                cases,
                unverified_because: Vec::new(),
            });
        }
        let plan = def
            .workflow
            .plan()
            .map_err(|error| WorkflowError::Invalid {
                workflow: wf.name.clone(),
                error,
            })?;
        let results = self.run_cases(&plan, &def).await?;
        if def.cases.is_empty() {
            why.push("it has no cases".into());
        }
        why.extend(
            results
                .iter()
                .filter(|c| !c.passed)
                .map(|c| format!("case `{}` failed: {}", c.case, c.detail)),
        );
        if !why.is_empty() && !allow_unverified {
            return Ok(WorkflowPublication {
                version: None,
                created: false,
                cases: results,
                unverified_because: why,
            });
        }
        let (row, created) = store
            .publish_version(&NewVersion {
                kind: Kind::Workflow,
                name: wf.name.clone(),
                digest,
                state: if why.is_empty() {
                    VersionState::Verified
                } else {
                    VersionState::Unverified
                },
                description: wf.description.clone(),
                document: serde_json::to_value(&def).expect("a definition serialises"),
                evidence: serde_json::to_value(&results).expect("results serialise"),
                created_by: tenant.to_string(),
            })
            .await
            .map_err(host)?;
        Ok(WorkflowPublication {
            version: Some(row),
            created,
            cases: results,
            unverified_because: why,
        })
    }

    /// The stored workflow version `r` selects, and its plan.
    pub async fn resolve_workflow(
        &self,
        r: &StepRef,
    ) -> Result<(VersionRow, WorkflowDefinition, Plan), WorkflowError> {
        let store = self.catalog.store();
        let host = |e: stepbox_store::StoreError| self.catalog_err(&r.name, "", e.into());
        let nf = |what: String| self.catalog_err(&r.name, "", CatalogError::NotFound(what));
        let row = match &r.selector {
            Selector::Latest => store
                .latest_verified(Kind::Workflow, &r.name)
                .await
                .map_err(host)?
                .ok_or_else(|| nf(format!("workflow `{}` has no verified version", r.name)))?,
            Selector::Number(n) => store
                .get_version_by_number(Kind::Workflow, &r.name, *n)
                .await
                .map_err(host)?
                .ok_or_else(|| nf(format!("no workflow version `{r}`")))?,
            Selector::Digest(d) => store
                .get_version_by_digest(Kind::Workflow, &r.name, d)
                .await
                .map_err(host)?
                .ok_or_else(|| nf(format!("no workflow version `{r}`")))?,
            Selector::Stage(s) => {
                if !self.catalog.stages().iter().any(|c| &c.name == s) {
                    return Err(self.catalog_err(
                        &r.name,
                        "",
                        CatalogError::Invalid(ModelError::new(
                            "stage",
                            format!("unknown stage `{s}`"),
                        )),
                    ));
                }
                let at = store
                    .get_stage(Kind::Workflow, &r.name, s)
                    .await
                    .map_err(host)?
                    .ok_or_else(|| {
                        nf(format!(
                            "workflow `{}` has no version in stage `{s}`",
                            r.name
                        ))
                    })?;
                store
                    .get_version_by_digest(Kind::Workflow, &r.name, &at.digest)
                    .await
                    .map_err(host)?
                    .ok_or_else(|| nf(format!("no workflow version `{r}`")))?
            }
        };
        let def: WorkflowDefinition =
            serde_json::from_value(row.document.clone()).map_err(|e| {
                WorkflowError::Host(format!(
                    "stored workflow {}@v{} is unreadable: {e}",
                    row.name, row.number
                ))
            })?;
        let plan = def
            .workflow
            .plan()
            .map_err(|error| WorkflowError::Invalid {
                workflow: r.name.clone(),
                error,
            })?;
        Ok((row, def, plan))
    }

    /// Promotes the workflow version `r` selects to `stage`: refused when the stage is unknown,
    /// when the version is unverified and the stage is not the first, when a pinned step version
    /// is gone, or when a case fails again. Every attempt is audited.
    pub async fn promote(
        &self,
        r: &StepRef,
        stage: &str,
        tenant: &str,
    ) -> Result<PromotionResult, WorkflowError> {
        let stages = self.catalog.stages();
        if !stages.iter().any(|s| s.name == stage) {
            return Err(self.catalog_err(
                &r.name,
                "",
                CatalogError::Invalid(ModelError::new(
                    "stage",
                    format!(
                        "unknown stage `{stage}`: stages are {}",
                        stages
                            .iter()
                            .map(|s| format!("`{}`", s.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            ));
        }
        let (row, def, plan) = self.resolve_workflow(r).await?;
        let store = self.catalog.store();
        let host = |e: stepbox_store::StoreError| self.catalog_err(&r.name, "", e.into());
        let current = store
            .get_stage(Kind::Workflow, &row.name, stage)
            .await
            .map_err(host)?
            .map(|s| s.digest);
        let first = stages[0].name == stage;
        let label = format!("{}@v{}", row.name, row.number);
        let mut refusal = None;
        let mut results = Vec::new();
        if row.state != VersionState::Verified && !first {
            refusal = Some(format!(
                "{label} is unverified: unverified versions may only go to the first stage (`{}`)",
                stages[0].name
            ));
        } else {
            // Re-resolve: every pinned step version must still exist (they are immutable, so
            // this catches a different or restored database).
            for s in &plan.steps {
                if let StepKind::Catalog(sr) = &s.kind
                    && let Err(e) = self.catalog.resolve(sr).await
                {
                    refusal = Some(format!("step `{}`: {e}", s.id));
                    break;
                }
            }
            if refusal.is_none() {
                results = self.run_cases(&plan, &def).await?;
                let failed: Vec<String> = results
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| format!("`{}` ({})", c.case, c.detail))
                    .collect();
                if !failed.is_empty() {
                    refusal = Some(format!("cases failed again: {}", failed.join(", ")));
                }
            }
        }
        let outcome = store
            .promote(&Promotion {
                kind: Kind::Workflow,
                name: row.name.clone(),
                stage: stage.to_string(),
                expected_current: current,
                to_digest: row.digest.clone(),
                tenant: tenant.to_string(),
                accepted: refusal.is_none(),
                reason: refusal
                    .clone()
                    .unwrap_or_else(|| format!("{label} passed its cases")),
                evidence: serde_json::json!({ "cases": results }),
            })
            .await
            .map_err(host)?;
        Ok(PromotionResult::from_outcome(&outcome, Vec::new()))
    }
}
