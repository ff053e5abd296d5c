//! `workflow.toml`: steps chained output to input.
//!
//! ```toml
//! name = "monthly-report"
//! [inputs]
//! sales = "sales.csv"            # a workflow input and the file name it usually has
//! [[steps]]
//! id = "pivot"
//! uses = "monthly-by-rep@prod"   # a catalog reference...
//! inputs = { "sales.csv" = "inputs.sales" }
//! [[steps]]
//! id = "summary"
//! program = "summary.py"         # ...or, for drafting, a program file next to workflow.toml
//! inputs = { "monthly_by_rep.csv" = "steps.pivot.outputs.monthly_by_rep.csv" }
//! [outputs]
//! report = "steps.summary.outputs.report.md"
//! ```
//!
//! A wire is `inputs.NAME` (a workflow input) or `steps.ID.outputs.FILE` (a file an earlier step
//! wrote). Each step's `inputs` maps the file name it sees under `/input` to a wire; `stdin` may
//! be a wire too; `args`, `policy` and `runtime` (program steps) are optional.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::catalog::model::{Blob, ModelError, StepRef, check_name};
use crate::job::request::{RuntimeKind, check_relative_path};

/// The `workflow.toml` format (and, with programs embedded, the stored definition).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowFile {
    /// The workflow's name: `^[a-z][a-z0-9-]{0,62}$`.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The files a caller provides: input name = the file name it usually has.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// The steps, in any order (they run as their wires allow).
    pub steps: Vec<WorkflowStep>,
    /// The workflow's results: output name = a wire to a step's output file.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Sample runs with expected outputs: the evidence a published workflow is verified by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<WorkflowCaseFile>,
}

/// A sample run in `workflow.toml`: input files and the outputs expected from them, as files
/// relative to `workflow.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowCaseFile {
    /// The case's name.
    pub name: String,
    /// Workflow input name = a file.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Workflow output name = a file holding its exact expected bytes.
    #[serde(default)]
    pub expected_outputs: BTreeMap<String, String>,
}

/// One step of a workflow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowStep {
    /// Unique within the workflow: `^[a-z][a-z0-9-]{0,62}$` (also `_`).
    pub id: String,
    /// A catalog reference (`NAME@STAGE`, `NAME@vN`, `NAME@sha256:HEX`, `NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<String>,
    /// A program file relative to `workflow.toml` (drafting; not for published workflows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// The program's content, once loaded (stored definitions carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Blob>,
    /// `python` or `wasm` for a program step (default: from the program's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The policy a program step runs under (default `default`; a catalog step's policy is its
    /// version's, or its stage's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Its input files: the name it sees under `/input` = a wire.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// A wire whose bytes become its stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Arguments after the program name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// Where a step's input comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wire {
    /// `inputs.NAME`.
    Input(String),
    /// `steps.ID.outputs.FILE`.
    Output {
        /// The producing step.
        step: String,
        /// The file it wrote (relative path).
        file: String,
    },
}

impl Wire {
    /// Parses `inputs.NAME` or `steps.ID.outputs.FILE`.
    pub fn parse(field: &str, s: &str) -> Result<Wire, ModelError> {
        if let Some(name) = s.strip_prefix("inputs.")
            && !name.is_empty()
        {
            return Ok(Wire::Input(name.to_string()));
        }
        if let Some(rest) = s.strip_prefix("steps.")
            && let Some((step, file)) = rest.split_once(".outputs.")
            && !step.is_empty()
            && !file.is_empty()
        {
            return Ok(Wire::Output {
                step: step.to_string(),
                file: file.to_string(),
            });
        }
        Err(ModelError::new(
            field,
            format!(
                "{s:?} is not a wire: expected `inputs.NAME` (a workflow input) or \
                 `steps.ID.outputs.FILE` (a file an earlier step wrote)"
            ),
        ))
    }
}

impl std::fmt::Display for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wire::Input(n) => write!(f, "inputs.{n}"),
            Wire::Output { step, file } => write!(f, "steps.{step}.outputs.{file}"),
        }
    }
}

/// What a step runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A catalog reference.
    Catalog(StepRef),
    /// A program (content loaded), its runtime, file name and policy.
    Program {
        /// The program's bytes.
        source: bytes::Bytes,
        /// Its runtime.
        runtime: RuntimeKind,
        /// The file name tracebacks show.
        filename: String,
        /// The policy it runs under.
        policy: String,
    },
}

/// A checked step: its kind and wires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedStep {
    /// The step's id.
    pub id: String,
    /// What it runs.
    pub kind: StepKind,
    /// Its input files: name under `/input` -> wire.
    pub inputs: BTreeMap<String, Wire>,
    /// Its stdin wire.
    pub stdin: Option<Wire>,
    /// Its arguments.
    pub args: Vec<String>,
    /// The ids of the steps it waits for.
    pub after: BTreeSet<String>,
}

/// A workflow checked for shape: every wire parses and names an input or an existing step,
/// there is no cycle, every workflow output is wired. Whether a step really writes a file is
/// checked against its catalog version by [`crate::workflow::Workflows::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The workflow's name.
    pub name: String,
    /// Its inputs.
    pub inputs: BTreeMap<String, String>,
    /// Its steps, in a topological order (each after all it waits for).
    pub steps: Vec<PlannedStep>,
    /// Its outputs: name -> wire (always `steps.ID.outputs.FILE`).
    pub outputs: BTreeMap<String, Wire>,
}

impl WorkflowFile {
    /// Reads `workflow.toml`, and every program file it names (relative to it).
    pub fn load(path: &Path) -> Result<WorkflowFile, String> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("`{origin}`: cannot be read: {e}"))?;
        let mut wf: WorkflowFile = toml::from_str(&text)
            .map_err(|e| format!("`{origin}`: {}", e.to_string().trim_end()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for (i, s) in wf.steps.iter_mut().enumerate() {
            if let Some(p) = &s.program {
                if s.source.is_some() {
                    return Err(format!(
                        "`{origin}`: step `{}` (steps[{i}]): give `program` or `source`, not both",
                        s.id
                    ));
                }
                let bytes = std::fs::read(dir.join(p)).map_err(|e| {
                    format!(
                        "`{origin}`: step `{}` (steps[{i}]): key `program`: file `{}` cannot be read: {e}",
                        s.id,
                        dir.join(p).display()
                    )
                })?;
                s.source = Some(Blob::from_bytes(&bytes));
            }
        }
        Ok(wf)
    }

    /// Checks the workflow's shape and orders its steps. Errors name the step and key.
    pub fn plan(&self) -> Result<Plan, ModelError> {
        check_name("name", &self.name)?;
        if self.steps.is_empty() {
            return Err(ModelError::new(
                "steps",
                "is empty: a workflow needs at least one step",
            ));
        }
        for name in self.inputs.keys() {
            check_id(&format!("inputs.{name}"), name)?;
        }
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}].id");
            check_id(&field, &s.id)?;
            if by_id.insert(&s.id, i).is_some() {
                return Err(ModelError::new(
                    field,
                    format!("step id `{}` is used twice", s.id),
                ));
            }
        }
        let mut planned = Vec::with_capacity(self.steps.len());
        for (i, s) in self.steps.iter().enumerate() {
            let at = |key: &str| format!("steps.{}.{key}", s.id);
            let kind = match (&s.uses, &s.source) {
                (Some(_), Some(_)) => {
                    return Err(ModelError::new(
                        at("uses"),
                        "give `uses` (a catalog step) or `program`, not both",
                    ));
                }
                (None, None) => {
                    return Err(ModelError::new(
                        at("uses"),
                        "is missing: give `uses = \"NAME@STAGE\"` or `program = \"FILE\"`",
                    ));
                }
                (Some(r), None) => {
                    for key in ["runtime", "policy"] {
                        let set = if key == "runtime" {
                            s.runtime.is_some()
                        } else {
                            s.policy.is_some()
                        };
                        if set {
                            return Err(ModelError::new(
                                at(key),
                                "applies to program steps only: a catalog step runs under its \
                                 version's (or stage's) settings",
                            ));
                        }
                    }
                    StepKind::Catalog(StepRef::parse(&at("uses"), r)?)
                }
                (None, Some(src)) => {
                    let source = src.to_bytes(&at("program"))?;
                    let program = s.program.clone().unwrap_or_else(|| "step.py".into());
                    let runtime = match &s.runtime {
                        Some(r) => r.parse().map_err(|e: String| ModelError::new(at("runtime"), e))?,
                        None => RuntimeKind::from_extension(Path::new(&program)).ok_or_else(|| {
                            ModelError::new(
                                at("runtime"),
                                format!(
                                    "cannot tell the runtime of `{program}` from its extension: \
                                     set `runtime`"
                                ),
                            )
                        })?,
                    };
                    let filename = Path::new(&program)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("step.py")
                        .to_string();
                    StepKind::Program {
                        source,
                        runtime,
                        filename,
                        policy: s.policy.clone().unwrap_or_else(|| "default".into()),
                    }
                }
            };
            let mut inputs = BTreeMap::new();
            let mut after = BTreeSet::new();
            let mut wire_of = |key: String, raw: &str| -> Result<Wire, ModelError> {
                let w = Wire::parse(&key, raw)?;
                match &w {
                    Wire::Input(n) if !self.inputs.contains_key(n) => {
                        return Err(ModelError::new(
                            key,
                            format!(
                                "`{raw}` names no workflow input; inputs are {}",
                                list(self.inputs.keys())
                            ),
                        ));
                    }
                    Wire::Output { step, file } => {
                        if step == &s.id {
                            return Err(ModelError::new(key, "a step cannot read its own output"));
                        }
                        if !by_id.contains_key(step.as_str()) {
                            return Err(ModelError::new(
                                key,
                                format!(
                                    "`{raw}` names no step `{step}`; steps are {}",
                                    list(self.steps.iter().map(|s| &s.id))
                                ),
                            ));
                        }
                        check_relative_path(&key, file)
                            .map_err(|e| ModelError::new(&key, e.to_string()))?;
                        after.insert(step.clone());
                    }
                    Wire::Input(_) => {}
                }
                Ok(w)
            };
            for (name, raw) in &s.inputs {
                let key = format!("steps.{}.inputs.{name}", s.id);
                check_relative_path(&key, name)
                    .map_err(|e| ModelError::new(&key, e.to_string()))?;
                inputs.insert(name.clone(), wire_of(key, raw)?);
            }
            let stdin = match &s.stdin {
                Some(raw) => Some(wire_of(at("stdin"), raw)?),
                None => None,
            };
            let _ = i;
            planned.push(PlannedStep {
                id: s.id.clone(),
                kind,
                inputs,
                stdin,
                args: s.args.clone(),
                after,
            });
        }
        let mut outputs = BTreeMap::new();
        for (name, raw) in &self.outputs {
            let key = format!("outputs.{name}");
            check_id(&key, name)?;
            let w = Wire::parse(&key, raw)?;
            match &w {
                Wire::Output { step, .. } if by_id.contains_key(step.as_str()) => {}
                Wire::Output { step, .. } => {
                    return Err(ModelError::new(
                        key,
                        format!("`{raw}`: no step produces it (there is no step `{step}`)"),
                    ));
                }
                Wire::Input(_) => {
                    return Err(ModelError::new(
                        key,
                        "a workflow output must be a step's output (`steps.ID.outputs.FILE`)",
                    ));
                }
            }
            outputs.insert(name.clone(), w);
        }
        let steps = topological(planned)?;
        Ok(Plan {
            name: self.name.clone(),
            inputs: self.inputs.clone(),
            steps,
            outputs,
        })
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Step ids, input and output names: a letter, then letters, digits, `-` or `_`.
fn check_id(field: &str, id: &str) -> Result<(), ModelError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ModelError::new(
            field,
            format!(
                "{id:?} is not a name: use 1-63 letters, digits, `-` or `_`, starting with a letter"
            ),
        ))
    }
}

/// Orders steps so each comes after those it waits for; a cycle is an error naming its steps.
fn topological(steps: Vec<PlannedStep>) -> Result<Vec<PlannedStep>, ModelError> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut left = steps;
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let (ready, rest): (Vec<_>, Vec<_>) = left
            .into_iter()
            .partition(|s| s.after.iter().all(|a| done.contains(a)));
        if ready.is_empty() {
            let ids: Vec<String> = rest.iter().map(|s| format!("`{}`", s.id)).collect();
            return Err(ModelError::new(
                "steps",
                format!(
                    "the wires form a cycle among {}: a step can only read earlier steps' outputs",
                    ids.join(", ")
                ),
            ));
        }
        for s in &ready {
            done.insert(s.id.clone());
        }
        out.extend(ready);
        left = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(text: &str) -> WorkflowFile {
        toml::from_str(text).unwrap()
    }

    const GOOD: &str = r#"
name = "monthly-report"
[inputs]
sales = "sales.csv"
[[steps]]
id = "summary"
source = "print(1)"
program = "summary.py"
inputs = { "monthly_by_rep.csv" = "steps.pivot.outputs.monthly_by_rep.csv" }
[[steps]]
id = "pivot"
uses = "monthly-by-rep@prod"
inputs = { "sales.csv" = "inputs.sales" }
[outputs]
report = "steps.summary.outputs.report.md"
"#;

    #[test]
    fn the_minimal_form_plans_in_dependency_order() {
        let plan = wf(GOOD).plan().unwrap();
        let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["pivot", "summary"]);
        assert_eq!(
            plan.steps[1].inputs["monthly_by_rep.csv"],
            Wire::Output {
                step: "pivot".into(),
                file: "monthly_by_rep.csv".into()
            }
        );
        assert!(
            matches!(&plan.steps[0].kind, StepKind::Catalog(r) if r.to_string() == "monthly-by-rep@prod")
        );
    }

    #[test]
    fn bad_shapes_name_the_step_and_key() {
        let cases = [
            (
                GOOD.replace("inputs.sales", "inputs.sale"),
                "steps.pivot.inputs.sales.csv",
                "names no workflow input",
            ),
            (
                GOOD.replace("steps.pivot.outputs.monthly", "steps.pivt.outputs.monthly"),
                "steps.summary.inputs.monthly_by_rep.csv",
                "no step `pivt`",
            ),
            (
                GOOD.replace(
                    "steps.summary.outputs.report.md",
                    "steps.sumary.outputs.report.md",
                ),
                "outputs.report",
                "no step produces it",
            ),
            (
                GOOD.replace("\"inputs.sales\"", "\"steps.summary.outputs.x.csv\""),
                "steps",
                "cycle",
            ),
            (
                GOOD.replace("monthly-by-rep@prod", "Monthly@prod"),
                "steps.pivot.uses",
                "not a step name",
            ),
            (
                GOOD.replace("id = \"pivot\"", "id = \"summary\""),
                "steps[1].id",
                "used twice",
            ),
            (
                GOOD.replace("\"inputs.sales\"", "\"sales\""),
                "steps.pivot.inputs.sales.csv",
                "not a wire",
            ),
        ];
        for (text, field, why) in cases {
            let e = wf(&text).plan().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }
}
