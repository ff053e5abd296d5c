//! Proto <-> catalog conversions: step definitions both ways (every check kind, through
//! [`CheckSpec::from_check`] and [`CheckSpec::to_check`]), versions, stages, case results and
//! promotion records, and the one place a [`CatalogError`] becomes a gRPC status
//! ([`catalog_status`]).

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

use crate::catalog::model::Case;
use crate::catalog::{
    Blob, CaseResult, CatalogError, CheckSpec, Origin, StepDefinition, StepOverview, Version,
};
use crate::job::request::Layout;
use crate::pb;
use crate::service::convert::{bad, check_at, check_to, layout_from, status_of};

/// Maps a catalog error to its gRPC status: a bad field is `INVALID_ARGUMENT` naming it (with
/// `prefix` before model fields, e.g. `step.` for a published definition), a missing step or
/// version `NOT_FOUND`, a database that is down `UNAVAILABLE` naming it (password masked), a
/// refused job as [`status_of`] says.
pub fn catalog_status(e: CatalogError, prefix: &str) -> Status {
    match e {
        CatalogError::Invalid(m) => bad(&format!("{prefix}{}", m.field), m.reason),
        CatalogError::NotFound(what) => Status::not_found(what),
        CatalogError::Unavailable(what) => Status::unavailable(what),
        CatalogError::Job(e) => status_of(e, None),
        e @ (CatalogError::Store(_) | CatalogError::Corrupt(..)) => {
            tracing::error!(error = %e, "catalog store error");
            Status::internal(e.to_string())
        }
    }
}

/// Unix milliseconds as a timestamp.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A status name as the catalog stores it (`SUCCEEDED`) as the proto enum.
fn status_named(name: &str) -> pb::Status {
    pb::Status::from_str_name(&format!("STATUS_{name}")).unwrap_or(pb::Status::Unspecified)
}

/// Converts a check of a published definition; `field` names it in errors. A verifier takes its
/// runtime, program and policy only: a published step stores nothing else of it.
fn spec_from(field: &str, c: pb::Check) -> Result<CheckSpec, Status> {
    if let Some(pb::check::Kind::Verifier(v)) = &c.kind {
        let at = |what: &str| format!("{field}.verifier.{what}");
        let unsupported = |what: &str| {
            bad(
                &at(what),
                "a published step's verifier takes its runtime, program (`source` or `module`) \
                 and policy only; leave it empty",
            )
        };
        if v.limits
            .as_ref()
            .is_some_and(|l| *l != pb::Limits::default())
        {
            return Err(unsupported("limits"));
        }
        if !v.args.is_empty() {
            return Err(unsupported("args"));
        }
        if let Some(s) = &v.step {
            if !s.filename.is_empty() {
                return Err(unsupported("step.filename"));
            }
            if s.layout == pb::FileLayout::MntData as i32 {
                return Err(unsupported("step.layout"));
            }
        }
    }
    Ok(CheckSpec::from_check(&check_at(field, c)?))
}

/// Converts one check spec back into its message.
fn spec_to(field: &str, s: &CheckSpec) -> Result<pb::Check, Status> {
    let check = s
        .to_check(field)
        .map_err(|e| catalog_status(e.into(), ""))?;
    Ok(check_to(&check))
}

fn files_from(field: &str, files: Vec<pb::File>) -> Result<BTreeMap<String, Blob>, Status> {
    let mut out = BTreeMap::new();
    for (j, f) in files.into_iter().enumerate() {
        let blob = Blob::from_bytes(&f.content);
        if out.insert(f.path.clone(), blob).is_some() {
            return Err(bad(
                &format!("{field}[{j}].path"),
                format!("{:?} names two inputs; give each file its own path", f.path),
            ));
        }
    }
    Ok(out)
}

/// Converts a definition message (a `PublishStepRequest.step`); errors name `step.*` fields.
/// The catalog then checks everything else (names, runtime, paths, check fields).
pub fn definition_from(step: Option<pb::StepDefinition>) -> Result<StepDefinition, Status> {
    let s = step.ok_or_else(|| bad("step", "is required"))?;
    let layout = layout_from(s.layout, "step.layout")?;
    let cases = s
        .cases
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("step.cases[{i}]");
            Ok(Case {
                name: c.name,
                inputs: files_from(&format!("{field}.inputs"), c.inputs)?,
                stdin: (!c.stdin.is_empty()).then(|| Blob::from_bytes(&c.stdin)),
                args: c.args,
                checks: c
                    .checks
                    .into_iter()
                    .enumerate()
                    .map(|(j, k)| spec_from(&format!("{field}.checks[{j}]"), k))
                    .collect::<Result<_, Status>>()?,
            })
        })
        .collect::<Result<_, Status>>()?;
    let contract = s
        .contract
        .into_iter()
        .enumerate()
        .map(|(j, k)| spec_from(&format!("step.contract[{j}]"), k))
        .collect::<Result<_, Status>>()?;
    let origin = match s.origin.and_then(|o| o.source) {
        None | Some(pb::step_origin::Source::Api(_)) => Origin::Api,
        Some(pb::step_origin::Source::File(f)) => Origin::File { path: f.path },
        Some(pb::step_origin::Source::Generated(g)) => Origin::Generated {
            model: g.model,
            transcript: if g.transcript_json.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&g.transcript_json).map_err(|e| {
                    bad(
                        "step.origin.generated.transcript_json",
                        format!("is not JSON: {e}"),
                    )
                })?
            },
        },
        Some(pb::step_origin::Source::Conversation(c)) => Origin::Conversation {
            title: c.title,
            conversation_id: c.conversation_id,
        },
    };
    Ok(StepDefinition {
        name: s.name,
        description: s.description,
        runtime: s.runtime,
        program: Blob::from_bytes(&s.program),
        filename: (!s.filename.is_empty()).then_some(s.filename),
        layout: layout.name().to_string(),
        policy: if s.policy.is_empty() {
            crate::job::policy::DEFAULT_POLICY.to_string()
        } else {
            s.policy
        },
        env: s.env.into_iter().collect(),
        cases,
        contract,
        origin,
    })
}

/// Converts a stored definition into its message.
pub fn definition_to(d: &StepDefinition) -> Result<pb::StepDefinition, Status> {
    let bytes = |b: &Blob, field: &str| {
        b.to_bytes(field)
            .map(|b| b.to_vec())
            .map_err(|e| catalog_status(e.into(), ""))
    };
    let cases = d
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("cases[{i}]");
            Ok(pb::StepCase {
                name: c.name.clone(),
                inputs: c
                    .inputs
                    .iter()
                    .map(|(path, b)| {
                        Ok(pb::File {
                            path: path.clone(),
                            content: bytes(b, &format!("{field}.inputs.{path}"))?,
                            ..Default::default()
                        })
                    })
                    .collect::<Result<_, Status>>()?,
                stdin: match &c.stdin {
                    Some(b) => bytes(b, &format!("{field}.stdin"))?,
                    None => Vec::new(),
                },
                args: c.args.clone(),
                checks: c
                    .checks
                    .iter()
                    .enumerate()
                    .map(|(j, k)| spec_to(&format!("{field}.checks[{j}]"), k))
                    .collect::<Result<_, Status>>()?,
            })
        })
        .collect::<Result<_, Status>>()?;
    let source = match &d.origin {
        Origin::Api => pb::step_origin::Source::Api(pb::ApiOrigin {}),
        Origin::File { path } => {
            pb::step_origin::Source::File(pb::FileOrigin { path: path.clone() })
        }
        Origin::Generated { model, transcript } => {
            pb::step_origin::Source::Generated(pb::GeneratedOrigin {
                model: model.clone(),
                transcript_json: if transcript.is_null() {
                    String::new()
                } else {
                    transcript.to_string()
                },
            })
        }
        Origin::Conversation {
            title,
            conversation_id,
        } => pb::step_origin::Source::Conversation(pb::ConversationOrigin {
            title: title.clone(),
            conversation_id: conversation_id.clone(),
        }),
    };
    Ok(pb::StepDefinition {
        name: d.name.clone(),
        description: d.description.clone(),
        runtime: d.runtime.clone(),
        program: bytes(&d.program, "program")?,
        filename: d.filename.clone().unwrap_or_default(),
        layout: match d.layout.parse::<Layout>() {
            Ok(Layout::MntData) => pb::FileLayout::MntData,
            _ => pb::FileLayout::InputOutput,
        } as i32,
        policy: d.policy.clone(),
        env: d.env.clone().into_iter().collect(),
        cases,
        contract: d
            .contract
            .iter()
            .enumerate()
            .map(|(j, k)| spec_to(&format!("contract[{j}]"), k))
            .collect::<Result<_, Status>>()?,
        origin: Some(pb::StepOrigin {
            source: Some(source),
        }),
    })
}

/// One case result as its message.
pub fn case_to(c: &CaseResult) -> pb::CaseResult {
    pb::CaseResult {
        name: c.case.clone(),
        status: status_named(&c.status) as i32,
        message: c.message.clone(),
        policy: c.policy.clone(),
        check_results: c
            .checks
            .iter()
            .map(|k| pb::CheckResult {
                name: k.name.clone(),
                passed: k.passed,
                detail: k.detail.clone(),
            })
            .collect(),
        manifest_digest: c.manifest_digest.clone(),
        manifest_json: if c.manifest.is_null() {
            String::new()
        } else {
            c.manifest.to_string()
        },
    }
}

/// A version as its message; with `definition`, the whole definition too.
pub fn version_to(v: &Version, definition: bool) -> Result<pb::StepVersion, Status> {
    Ok(pb::StepVersion {
        name: v.name.clone(),
        number: v.number,
        digest: v.digest.clone(),
        verified: v.verified,
        created_by: v.created_by.clone(),
        created_at: Some(timestamp(v.created_at)),
        case_results: v.cases.iter().map(case_to).collect(),
        description: v.definition.description.clone(),
        definition: if definition {
            Some(definition_to(&v.definition)?)
        } else {
            None
        },
    })
}

/// Where each configured stage of `overview` points, with its policy (`policies` by stage).
pub fn stages_to(
    overview: &StepOverview,
    policies: &HashMap<String, Option<String>>,
) -> Vec<pb::StageAlias> {
    overview
        .stages
        .iter()
        .map(|(stage, row)| pb::StageAlias {
            stage: stage.clone(),
            policy: policies.get(stage).cloned().flatten().unwrap_or_default(),
            set: row.is_some(),
            number: row.as_ref().map_or(0, |r| r.number),
            digest: row.as_ref().map(|r| r.digest.clone()).unwrap_or_default(),
            updated_at: row.as_ref().map(|r| timestamp(r.updated_at)),
            updated_by: row
                .as_ref()
                .map(|r| r.updated_by.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// An audit record as its message; `numbers` maps the step's digests to version numbers.
pub fn promotion_to(
    r: &stepbox_store::PromotionRecord,
    numbers: &HashMap<String, i64>,
) -> pb::Promotion {
    let evidence = &r.evidence;
    pb::Promotion {
        id: r.id,
        name: r.name.clone(),
        stage: r.stage.clone(),
        from_digest: r.from_digest.clone().unwrap_or_default(),
        from_number: r
            .from_digest
            .as_ref()
            .and_then(|d| numbers.get(d).copied())
            .unwrap_or(0),
        to_digest: r.to_digest.clone(),
        to_number: numbers.get(&r.to_digest).copied().unwrap_or(0),
        tenant: r.tenant.clone(),
        at: Some(timestamp(r.at)),
        accepted: r.accepted,
        reason: r.reason.clone(),
        policy: evidence["policy"].as_str().unwrap_or_default().to_string(),
        cases: evidence["cases"]
            .as_array()
            .map(|cases| {
                cases
                    .iter()
                    .map(|c| pb::CaseEvidence {
                        name: c["case"].as_str().unwrap_or_default().to_string(),
                        status: status_named(c["status"].as_str().unwrap_or_default()) as i32,
                        manifest_digest: c["manifest_digest"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::check::Kind;

    fn check(kind: Kind) -> pb::Check {
        pb::Check {
            name: String::new(),
            kind: Some(kind),
        }
    }

    fn every_check() -> Vec<pb::Check> {
        vec![
            check(Kind::ExitCode(0)),
            check(Kind::StdoutEquals(b"x\n".to_vec())),
            check(Kind::StdoutMatches("^x".into())),
            check(Kind::FileExists("a".into())),
            check(Kind::FileEquals(pb::FileContent {
                path: "a".into(),
                content: vec![0, 159, 146, 150],
            })),
            check(Kind::FileSha256(pb::FileSha256 {
                path: "a".into(),
                sha256: "ab".repeat(32),
            })),
            check(Kind::FileJsonEquals(pb::FileContent {
                path: "a.json".into(),
                content: b"{}".to_vec(),
            })),
            check(Kind::FileCsvEquals(pb::FileCsvEquals {
                path: "a.csv".into(),
                content: b"a\n1\n".to_vec(),
                ignore_row_order: true,
            })),
            check(Kind::FileMatches(pb::FileMatches {
                path: "a".into(),
                regex: "x".into(),
            })),
            check(Kind::FileJsonSchema(pb::FileJsonSchema {
                path: "a.json".into(),
                schema_json: "{}".into(),
            })),
            pb::Check {
                name: "verify".into(),
                kind: Some(Kind::Verifier(pb::VerifierStep {
                    step: Some(pb::Step {
                        runtime: "python".into(),
                        source: "print(1)".into(),
                        layout: pb::FileLayout::InputOutput as i32,
                        ..Default::default()
                    }),
                    policy: "strict".into(),
                    limits: Some(pb::Limits::default()),
                    args: vec![],
                })),
            },
        ]
    }

    fn definition() -> pb::StepDefinition {
        pb::StepDefinition {
            name: "count-rows".into(),
            description: "Counts rows".into(),
            runtime: "python".into(),
            program: b"print(1)".to_vec(),
            layout: pb::FileLayout::InputOutput as i32,
            policy: "default".into(),
            cases: vec![pb::StepCase {
                name: "one".into(),
                inputs: vec![pb::File {
                    path: "in.csv".into(),
                    content: b"a\n".to_vec(),
                    ..Default::default()
                }],
                stdin: b"in".to_vec(),
                args: vec!["-v".into()],
                checks: every_check(),
            }],
            contract: vec![check(Kind::ExitCode(0))],
            origin: Some(pb::StepOrigin {
                source: Some(pb::step_origin::Source::Generated(pb::GeneratedOrigin {
                    model: "m".into(),
                    transcript_json: r#"{"messages":[]}"#.into(),
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn definitions_round_trip_with_every_check_kind() {
        let msg = definition();
        let def = definition_from(Some(msg.clone())).unwrap();
        let canonical = def.canonical().unwrap();
        assert_eq!(canonical.cases[0].checks.len(), 11);
        assert_eq!(canonical.cases[0].checks[10].kind, "verifier");
        let back = definition_to(&canonical).unwrap();
        assert_eq!(back, msg);
        assert_eq!(
            definition_from(Some(back)).unwrap().canonical().unwrap(),
            canonical
        );
    }

    #[test]
    fn bad_definitions_name_proto_fields() {
        let mut d = definition();
        d.cases[0].checks.push(pb::Check::default());
        assert_eq!(
            definition_from(Some(d)).unwrap_err().message(),
            "invalid `step.cases[0].checks[11].kind`: is not set"
        );
        let mut d = definition();
        let again = d.cases[0].inputs[0].clone();
        d.cases[0].inputs.push(again);
        assert!(
            definition_from(Some(d))
                .unwrap_err()
                .message()
                .starts_with("invalid `step.cases[0].inputs[1].path`")
        );
        let mut d = definition();
        d.contract.push(pb::Check {
            name: String::new(),
            kind: Some(Kind::Verifier(pb::VerifierStep {
                step: Some(pb::Step {
                    runtime: "python".into(),
                    source: "print(1)".into(),
                    ..Default::default()
                }),
                args: vec!["x".into()],
                ..Default::default()
            })),
        });
        assert!(
            definition_from(Some(d))
                .unwrap_err()
                .message()
                .starts_with("invalid `step.contract[1].verifier.args`")
        );
        let e = catalog_status(
            CatalogError::Invalid(crate::catalog::ModelError::new("name", "bad")),
            "step.",
        );
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "invalid `step.name`: bad")
        );
    }
}
