//! Proto <-> workflow conversions: inline workflows (the toml and the files it names, never
//! written to disk), run records and their events, versions, schedules and firings, and the one
//! place a [`WorkflowError`] or [`ScheduleError`] becomes a gRPC status.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use stepbox_store::{FiringRow, VersionRow, VersionState};
use tonic::Status;

use crate::catalog::model::{Blob, Selector, StepRef};
use crate::catalog::{CatalogError, ModelError};
use crate::job::digest::sha256_hex;
use crate::job::request::check_relative_path;
use crate::pb;
use crate::service::catalog_convert::{catalog_status, timestamp};
use crate::service::convert::bad;
use crate::workflow::model::WorkflowFile;
use crate::workflow::publish::{WorkflowCase, WorkflowCaseResult, WorkflowDefinition};
use crate::workflow::schedule::{Overlap, Schedule, ScheduleError, ScheduleInputs};
use crate::workflow::{StepRecord, StepState, WorkflowError, WorkflowRunRecord};

/// The default bound of output bytes carried inline: what a gRPC client accepts by default
/// (4 MiB) less room for the rest of the message.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = (4 << 20) - (64 << 10);

/// `NOT_FOUND` for a workflow reference that selects nothing: the same words whether the
/// workflow does not exist or the tenant may not see it.
pub(crate) fn workflow_not_found(r: &StepRef) -> Status {
    Status::not_found(match &r.selector {
        Selector::Latest => format!("no verified version of workflow `{}`", r.name),
        Selector::Stage(s) => format!("no version of workflow `{}` in stage `{s}`", r.name),
        Selector::Number(_) | Selector::Digest(_) => format!("no workflow version `{r}`"),
    })
}

/// `NOT_FOUND` for a workflow run: the same words for one that does not exist and another
/// tenant's.
pub(crate) fn run_not_found(run_id: &str) -> Status {
    Status::not_found(format!("no workflow run `{run_id}`"))
}

/// `NOT_FOUND` for a schedule: the same words for one that does not exist and another
/// tenant's.
pub(crate) fn schedule_not_found(id: &str) -> Status {
    Status::not_found(format!("no schedule `{id}`"))
}

/// Maps a workflow error: a bad workflow or request is `INVALID_ARGUMENT` naming the field
/// (with `prefix`, e.g. `workflow.` for an inline workflow's model fields); a workflow
/// reference that selects nothing is [`workflow_not_found`] of `r`; a step reference that
/// selects nothing `NOT_FOUND` naming the step; a database that is down `UNAVAILABLE`.
pub(crate) fn workflow_status(e: WorkflowError, r: Option<&StepRef>) -> Status {
    match e {
        WorkflowError::Invalid { workflow, error } => bad(
            &error.field,
            format!("{} (workflow `{workflow}`)", error.reason),
        ),
        WorkflowError::Catalog {
            step,
            error: CatalogError::NotFound(what),
            ..
        } => match (step.is_empty(), r) {
            (true, Some(r)) => workflow_not_found(r),
            (true, None) => Status::not_found(what),
            (false, _) => Status::not_found(format!("step `{step}`: {what}")),
        },
        WorkflowError::Catalog {
            step,
            error: CatalogError::Invalid(m),
            workflow,
        } => {
            let field = if step.is_empty() || m.field.starts_with("steps.") {
                m.field.clone()
            } else {
                format!("steps.{step}.uses")
            };
            bad(&field, format!("{} (workflow `{workflow}`)", m.reason))
        }
        WorkflowError::Catalog { error, .. } => catalog_status(error, ""),
        WorkflowError::NoSuchRun(id) => run_not_found(&id),
        WorkflowError::Host(m) => {
            tracing::error!(error = %m, "workflow host error");
            Status::internal(m)
        }
    }
}

/// Maps a schedule error: bad fields and refused directories `INVALID_ARGUMENT` naming the
/// field, an unknown id [`schedule_not_found`], a store failure `UNAVAILABLE` or `INTERNAL`.
pub(crate) fn schedule_status(e: ScheduleError) -> Status {
    match e {
        ScheduleError::Invalid { ref field, .. } | ScheduleError::Refused { ref field, .. } => {
            let field = field.clone();
            let text = e.to_string();
            let reason = text
                .strip_prefix(&format!("invalid `{field}`: "))
                .unwrap_or(&text)
                .to_string();
            bad(&field, reason)
        }
        ScheduleError::NotFound(id) => schedule_not_found(&id),
        ScheduleError::Store(s) => catalog_status(s.into(), ""),
    }
}

/// An inline workflow: the toml parsed (errors name `{field}.toml`), each `program` and case
/// file taken from `files` by the path written in the toml (`./` ignored). Paths are checked as
/// relative paths and only looked up, never opened.
pub(crate) fn inline_from(
    field: &str,
    inline: Option<pb::InlineWorkflow>,
) -> Result<(WorkflowFile, Vec<WorkflowCase>), Status> {
    let inline = inline.ok_or_else(|| bad(field, "is missing: send the workflow.toml text"))?;
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for (i, f) in inline.files.into_iter().enumerate() {
        let at = format!("{field}.files[{i}].path");
        let key = normal(&f.path);
        check_relative_path(&at, &key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if files.insert(key, f.content).is_some() {
            return Err(bad(&at, format!("`{}` is sent twice", f.path)));
        }
    }
    let mut wf: WorkflowFile = toml::from_str(&inline.toml)
        .map_err(|e| bad(&format!("{field}.toml"), e.to_string().trim_end()))?;
    let take = |key: String, rel: &str| -> Result<Blob, Status> {
        files
            .get(&normal(rel))
            .map(|b| Blob::from_bytes(b))
            .ok_or_else(|| {
                bad(
                    &key,
                    format!("names the file `{rel}`, which is not among `{field}.files`"),
                )
            })
    };
    for s in &mut wf.steps {
        if let Some(p) = &s.program {
            if s.source.is_some() {
                return Err(bad(
                    &format!("steps.{}.program", s.id),
                    "give `program` or `source`, not both",
                ));
            }
            s.source = Some(take(format!("steps.{}.program", s.id), p)?);
        }
    }
    let cases = wf
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(WorkflowCase {
                name: c.name.clone(),
                inputs: c
                    .inputs
                    .iter()
                    .map(|(n, p)| Ok((n.clone(), take(format!("cases[{i}].inputs.{n}"), p)?)))
                    .collect::<Result<_, Status>>()?,
                expected_outputs: c
                    .expected_outputs
                    .iter()
                    .map(|(n, p)| {
                        Ok((
                            n.clone(),
                            take(format!("cases[{i}].expected_outputs.{n}"), p)?,
                        ))
                    })
                    .collect::<Result<_, Status>>()?,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok((wf, cases))
}

fn normal(path: &str) -> String {
    path.trim_start_matches("./").to_string()
}

/// Workflow inputs: one file per input, `path` its name; a name twice is refused.
pub(crate) fn inputs_from(
    field: &str,
    files: Vec<pb::File>,
) -> Result<BTreeMap<String, bytes::Bytes>, Status> {
    let mut out = BTreeMap::new();
    for (i, f) in files.into_iter().enumerate() {
        if f.path.is_empty() {
            return Err(bad(
                &format!("{field}[{i}].path"),
                "is empty: set it to the workflow input's name",
            ));
        }
        if out
            .insert(f.path.clone(), bytes::Bytes::from(f.content))
            .is_some()
        {
            return Err(bad(
                &format!("{field}[{i}].path"),
                format!("input `{}` is given twice", f.path),
            ));
        }
    }
    Ok(out)
}

fn state_to(s: &StepState) -> pb::WorkflowStepState {
    match s {
        StepState::Succeeded => pb::WorkflowStepState::Succeeded,
        StepState::Failed => pb::WorkflowStepState::Failed,
        StepState::Skipped => pb::WorkflowStepState::Skipped,
        StepState::Reused => pb::WorkflowStepState::Reused,
    }
}

/// One step's record as its message.
pub(crate) fn step_to(s: &StepRecord) -> pb::WorkflowStepResult {
    pb::WorkflowStepResult {
        id: s.id.clone(),
        state: state_to(&s.state) as i32,
        status: s.status.clone(),
        message: s.message.clone(),
        version: s.version.clone(),
        version_digest: s.version_digest.clone(),
        policy: s.policy.clone(),
        input_digests: s.inputs.clone().into_iter().collect(),
        stdin_digest: s.stdin.clone(),
        output_digests: s.outputs.clone().into_iter().collect(),
        checks: s
            .checks
            .iter()
            .map(|(name, passed, detail)| pb::WorkflowCheckVerdict {
                name: name.clone(),
                passed: *passed,
                detail: detail.clone(),
            })
            .collect(),
        manifest_digest: s.manifest_digest.clone(),
        run_id: s.run_id.clone(),
    }
}

/// A run record as its message; `output` fetches an output's bytes by name, carried while
/// their total stays within `max_output_bytes`.
pub(crate) fn run_to(
    r: &WorkflowRunRecord,
    max_output_bytes: u64,
    output: impl Fn(&str) -> Option<bytes::Bytes>,
) -> pb::WorkflowRun {
    let mut left = max_output_bytes;
    let outputs = r
        .outputs
        .iter()
        .map(|(name, (file, digest))| {
            let step = r
                .steps
                .iter()
                .find(|s| s.outputs.get(file) == Some(digest))
                .map(|s| s.id.clone())
                .unwrap_or_default();
            let bytes = output(name);
            let size = bytes.as_ref().map_or(0, |b| b.len() as u64);
            let (content, omitted) = match bytes {
                Some(b) if size <= left => {
                    left -= size;
                    (b.to_vec(), false)
                }
                _ => (Vec::new(), true),
            };
            pb::WorkflowOutput {
                name: name.clone(),
                step,
                file: file.clone(),
                sha256: digest.clone(),
                size,
                content,
                content_omitted: omitted,
            }
        })
        .collect();
    pb::WorkflowRun {
        run_id: r.run_id.clone(),
        workflow: r.workflow.clone(),
        source: r.source.clone(),
        resumed_from: r.resumed_from.clone(),
        status: r.status.clone(),
        trigger: r
            .trigger
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        input_digests: r.inputs.clone().into_iter().collect(),
        steps: r.steps.iter().map(step_to).collect(),
        outputs,
        manifest_digest: r.digest.clone(),
        started_at: r.started_at.clone(),
        finished_at: r.finished_at.clone(),
    }
}

/// A case verdict as its message.
pub(crate) fn case_to(c: &WorkflowCaseResult) -> pb::WorkflowCaseResult {
    pb::WorkflowCaseResult {
        name: c.case.clone(),
        passed: c.passed,
        detail: c.detail.clone(),
        run_digest: c.run_digest.clone(),
    }
}

/// A stored workflow version as its message.
pub(crate) fn version_to(v: &VersionRow) -> pb::WorkflowVersion {
    let def: Option<WorkflowDefinition> = serde_json::from_value(v.document.clone()).ok();
    let cases: Vec<WorkflowCaseResult> =
        serde_json::from_value(v.evidence.clone()).unwrap_or_default();
    let (inputs, outputs, steps) = match &def {
        Some(d) => (
            d.workflow.inputs.keys().cloned().collect(),
            d.workflow.outputs.keys().cloned().collect(),
            d.workflow
                .steps
                .iter()
                .map(|s| pb::WorkflowStepPin {
                    id: s.id.clone(),
                    uses: s.uses.clone().unwrap_or_default(),
                    resolved_from: d.resolved_from.get(&s.id).cloned().unwrap_or_default(),
                    program: if s.uses.is_none() {
                        s.program.clone().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    program_sha256: s
                        .source
                        .as_ref()
                        .and_then(|b| b.to_bytes("source").ok())
                        .map(|b| sha256_hex(&b))
                        .unwrap_or_default(),
                })
                .collect(),
        ),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    pb::WorkflowVersion {
        name: v.name.clone(),
        number: v.number,
        digest: v.digest.clone(),
        verified: v.state == VersionState::Verified,
        created_by: v.created_by.clone(),
        created_at: Some(timestamp(v.created_at)),
        description: v.description.clone(),
        inputs,
        outputs,
        steps,
        case_results: cases.iter().map(case_to).collect(),
    }
}

/// The overlap policy from its message (unspecified: skip).
pub(crate) fn overlap_from(v: i32) -> Result<Overlap, Status> {
    match pb::ScheduleOverlap::try_from(v) {
        Ok(pb::ScheduleOverlap::Unspecified | pb::ScheduleOverlap::Skip) => Ok(Overlap::Skip),
        Ok(pb::ScheduleOverlap::QueueOne) => Ok(Overlap::QueueOne),
        Ok(pb::ScheduleOverlap::Allow) => Ok(Overlap::Allow),
        Err(_) => Err(bad(
            "overlap",
            format!("{v} is not a ScheduleOverlap value"),
        )),
    }
}

fn overlap_to(o: Overlap) -> pb::ScheduleOverlap {
    match o {
        Overlap::Skip => pb::ScheduleOverlap::Skip,
        Overlap::QueueOne => pb::ScheduleOverlap::QueueOne,
        Overlap::Allow => pb::ScheduleOverlap::Allow,
    }
}

/// An absolute directory from a request (refused when relative: the roots check needs one).
pub(crate) fn dir_from(field: &str, dir: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(dir);
    if dir.is_empty() || !p.is_absolute() || dir.contains('\0') {
        return Err(bad(
            field,
            format!("`{dir}` is not an absolute directory path"),
        ));
    }
    Ok(p)
}

/// A schedule as its message.
pub(crate) fn schedule_to(s: &Schedule) -> pb::WorkflowSchedule {
    let (fixed_inputs, inbox) = match &s.inputs {
        ScheduleInputs::Fixed(m) => (m.clone().into_iter().collect(), None),
        ScheduleInputs::Inbox { dir, files } => (
            HashMap::new(),
            Some(pb::ScheduleInbox {
                dir: dir.display().to_string(),
                files: files.clone().into_iter().collect(),
            }),
        ),
    };
    pb::WorkflowSchedule {
        id: s.id.clone(),
        workflow: s.workflow.name.clone(),
        workflow_ref: s.workflow_ref.clone().unwrap_or_default(),
        cron: s.cron.clone(),
        timezone: s.timezone.clone(),
        fixed_inputs,
        inbox,
        outbox: s
            .outbox
            .as_ref()
            .map(|o| o.display().to_string())
            .unwrap_or_default(),
        overlap: overlap_to(s.overlap) as i32,
        catch_up_ms: u64::try_from(s.catch_up.0.as_millis()).unwrap_or(u64::MAX),
        paused: s.paused,
    }
}

/// A firing as its message.
pub(crate) fn firing_to(f: &FiringRow) -> pb::ScheduleFiring {
    pb::ScheduleFiring {
        fire_at: Some(timestamp(f.fire_at)),
        status: f.status.clone(),
        trigger: f.trigger.clone(),
        run_id: f.run_id.clone(),
        message: f.message.clone(),
        replica: f.replica.clone(),
    }
}

/// A model error as `INVALID_ARGUMENT` naming its field.
pub(crate) fn model_status(e: ModelError) -> Status {
    bad(&e.field, e.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &str, content: &str) -> pb::File {
        pb::File {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    const TOML: &str = "name = \"w\"\n[[steps]]\nid = \"a\"\nprogram = \"a.py\"\n";

    fn inline(files: Vec<pb::File>) -> Option<pb::InlineWorkflow> {
        Some(pb::InlineWorkflow {
            toml: TOML.into(),
            files,
        })
    }

    #[test]
    fn inline_files_are_looked_up_by_checked_relative_paths() {
        let (wf, _) = inline_from("inline", inline(vec![f("./a.py", "print(1)")])).unwrap();
        assert_eq!(
            wf.steps[0].source.as_ref().unwrap(),
            &Blob::Text("print(1)".into())
        );
        for (path, why) in [
            ("../a.py", "invalid `inline.files[0].path`"),
            ("/etc/passwd", "invalid `inline.files[0].path`"),
        ] {
            let e = inline_from("inline", inline(vec![f(path, "x")])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(why), "{path}: {}", e.message());
        }
        let e = inline_from("inline", inline(vec![f("a.py", "1"), f("./a.py", "2")])).unwrap_err();
        assert!(e.message().contains("is sent twice"), "{}", e.message());
        let e = inline_from("inline", inline(vec![])).unwrap_err();
        assert!(
            e.message()
                .starts_with("invalid `steps.a.program`: names the file `a.py`"),
            "{}",
            e.message()
        );
        let e = inline_from("inline", None).unwrap_err();
        assert!(
            e.message().starts_with("invalid `inline`"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn outputs_are_carried_inline_within_the_bound_only() {
        let step = StepRecord {
            id: "s".into(),
            state: StepState::Succeeded,
            status: "SUCCEEDED".into(),
            message: String::new(),
            version: "program".into(),
            version_digest: String::new(),
            policy: "default".into(),
            inputs: BTreeMap::new(),
            stdin: String::new(),
            outputs: BTreeMap::from([("a.txt".into(), "da".into()), ("b.txt".into(), "db".into())]),
            checks: Vec::new(),
            manifest_digest: String::new(),
            run_id: String::new(),
        };
        let record: WorkflowRunRecord = serde_json::from_value(serde_json::json!({
            "run_id": "r", "workflow": "w", "status": "succeeded", "inputs": {},
            "steps": [step], "wiring": {}, "digest": "",
            "outputs": {"a": ["a.txt", "da"], "b": ["b.txt", "db"]},
        }))
        .unwrap();
        let bytes = |name: &str| {
            Some(bytes::Bytes::from(if name == "a" {
                vec![b'a'; 6]
            } else {
                vec![b'b'; 5]
            }))
        };
        let run = run_to(&record, 10, bytes);
        let (a, b) = (&run.outputs[0], &run.outputs[1]);
        assert_eq!((a.size, a.content.len(), a.content_omitted), (6, 6, false));
        assert_eq!((b.size, b.content.len(), b.content_omitted), (5, 0, true));
        assert_eq!((a.step.as_str(), b.sha256.as_str()), ("s", "db"));
        let run = run_to(&record, 11, bytes);
        assert!(run.outputs.iter().all(|o| !o.content_omitted));
    }
}
