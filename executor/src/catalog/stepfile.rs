//! `step.toml`: a step as code, kept in a repository next to its program.
//!
//! ```toml
//! name = "bulk-edit-validator"
//! description = "Checks a bulk-edit CSV and lists every problem"
//! program = "validator.py"          # relative to this file; runtime inferred from .py/.wasm/.wat
//! policy = "default"                # default: `default`
//!
//! [[cases]]
//! name = "sample"
//! inputs = { "bulk_edit.csv" = "bulk_edit.csv" }          # name under /input = file here
//! expected_stdout = "8 rows checked, 9 problems\n"        # or expected_stdout_file
//! expected_files = { "bulk_edit_errors.csv" = "expected/bulk_edit_errors.csv" }
//!
//! [[contract]]                      # checked on every run, on any input
//! kind = "file_exists"
//! path = "bulk_edit_errors.csv"
//! ```
//!
//! `expected_files` compare as CSV for `.csv`, as JSON for `.json`, byte for byte otherwise.
//! Checks (`[[cases.checks]]`, `[[contract]]`) take the fields of [`CheckSpec`]; `expected_file`,
//! `schema_file` and `program_file` name files relative to `step.toml`. Unknown keys are errors
//! naming the file and key. The JSON Schema is `docs/step.schema.json` (`stepbox step schema`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::catalog::model::{Blob, Case, CheckSpec, ModelError, Origin, StepDefinition};
use crate::job::request::RuntimeKind;

/// The `step.toml` format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepFile {
    /// The step's name: `^[a-z][a-z0-9-]{0,62}$`.
    pub name: String,
    /// What it does, for the people and services that call it.
    pub description: String,
    /// The program file, relative to `step.toml`.
    pub program: String,
    /// `python` or `wasm` (default: from the program's extension: .py, .wasm, .wat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The policy its cases and runs use (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `input-output` (default) or `mnt-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    /// The name tracebacks show (default: the program's file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Variables added to the policy's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Sample jobs with their expected results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<CaseFile>,
    /// Checks every run must pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contract: Vec<CheckSpec>,
}

/// One case in `step.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// The case's name.
    pub name: String,
    /// Input files: the name the step sees = a file relative to `step.toml`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
    /// A file whose bytes are the step's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_file: Option<String>,
    /// Arguments after the program name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The exact expected stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_stdout: Option<String>,
    /// A file holding the exact expected stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_stdout_file: Option<String>,
    /// Expected output files: output name = a file relative to `step.toml`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected_files: BTreeMap<String, String>,
    /// Further checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckSpec>,
}

/// A `step.toml` that cannot be used: the file, the key and why.
#[derive(Debug, thiserror::Error)]
#[error("`{file}`: {message}")]
pub struct StepFileError {
    /// The file.
    pub file: String,
    /// Which key is wrong and why (or the TOML parser's message, with line and column).
    pub message: String,
}

/// The JSON Schema of `step.toml`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(StepFile);
    serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
}

/// Reads `path` and everything it names into a definition ready to publish.
pub fn load(path: &Path) -> Result<StepDefinition, StepFileError> {
    let file = path.display().to_string();
    let err = |message: String| StepFileError {
        file: file.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot be read: {e}")))?;
    let parsed: StepFile =
        toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    resolve(&parsed, dir).map_err(|e| err(format!("key `{}`: {}", e.field, e.reason)))
}

fn read(dir: &Path, key: &str, rel: &str) -> Result<Vec<u8>, ModelError> {
    let p: PathBuf = dir.join(rel);
    std::fs::read(&p)
        .map_err(|e| ModelError::new(key, format!("file `{}` cannot be read: {e}", p.display())))
}

fn read_text(dir: &Path, key: &str, rel: &str) -> Result<String, ModelError> {
    String::from_utf8(read(dir, key, rel)?)
        .map_err(|_| ModelError::new(key, format!("file `{rel}` is not UTF-8 text")))
}

/// Resolves the files a check names (relative to `dir`) into its content.
fn resolve_check(dir: &Path, field: &str, c: &CheckSpec) -> Result<CheckSpec, ModelError> {
    let mut c = c.clone();
    if let Some(f) = c.expected_file.take() {
        if c.expected.is_some() {
            return Err(ModelError::new(
                format!("{field}.expected_file"),
                "give `expected` or `expected_file`, not both",
            ));
        }
        c.expected = Some(Blob::from_bytes(&read(
            dir,
            &format!("{field}.expected_file"),
            &f,
        )?));
    }
    if let Some(f) = c.schema_file.take() {
        if c.schema.is_some() {
            return Err(ModelError::new(
                format!("{field}.schema_file"),
                "give `schema` or `schema_file`, not both",
            ));
        }
        c.schema = Some(read_text(dir, &format!("{field}.schema_file"), &f)?);
    }
    if let Some(f) = c.program_file.take() {
        if c.program.is_some() {
            return Err(ModelError::new(
                format!("{field}.program_file"),
                "give `program` or `program_file`, not both",
            ));
        }
        c.program = Some(Blob::from_bytes(&read(
            dir,
            &format!("{field}.program_file"),
            &f,
        )?));
    }
    Ok(c)
}

/// Builds the definition from a parsed `step.toml` whose relative paths start at `dir`.
pub fn resolve(f: &StepFile, dir: &Path) -> Result<StepDefinition, ModelError> {
    let program = read(dir, "program", &f.program)?;
    let runtime = match &f.runtime {
        Some(r) => r.clone(),
        None => RuntimeKind::from_extension(Path::new(&f.program))
            .ok_or_else(|| {
                ModelError::new(
                    "runtime",
                    format!(
                        "cannot tell the runtime of `{}` from its extension: set `runtime = \
                         \"python\"` or `\"wasm\"`",
                        f.program
                    ),
                )
            })?
            .name()
            .to_string(),
    };
    let filename = f.filename.clone().or_else(|| {
        (runtime == "python")
            .then(|| {
                Path::new(&f.program)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
            })
            .flatten()
    });
    let mut cases = Vec::with_capacity(f.cases.len());
    for (i, c) in f.cases.iter().enumerate() {
        let field = format!("cases[{i}]");
        let mut inputs = BTreeMap::new();
        for (name, rel) in &c.inputs {
            inputs.insert(
                name.clone(),
                Blob::from_bytes(&read(dir, &format!("{field}.inputs.{name}"), rel)?),
            );
        }
        let stdin = match &c.stdin_file {
            Some(rel) => Some(Blob::from_bytes(&read(
                dir,
                &format!("{field}.stdin_file"),
                rel,
            )?)),
            None => None,
        };
        let mut checks = Vec::new();
        let stdout = match (&c.expected_stdout, &c.expected_stdout_file) {
            (Some(_), Some(_)) => {
                return Err(ModelError::new(
                    format!("{field}.expected_stdout_file"),
                    "give `expected_stdout` or `expected_stdout_file`, not both",
                ));
            }
            (Some(s), None) => Some(s.as_bytes().to_vec()),
            (None, Some(rel)) => Some(read(dir, &format!("{field}.expected_stdout_file"), rel)?),
            (None, None) => None,
        };
        if let Some(s) = stdout {
            checks.push(CheckSpec {
                kind: "stdout_equals".into(),
                expected: Some(Blob::from_bytes(&s)),
                ..CheckSpec::default()
            });
        }
        for (name, rel) in &c.expected_files {
            let content = read(dir, &format!("{field}.expected_files.{name}"), rel)?;
            let kind = match Path::new(name).extension().and_then(|e| e.to_str()) {
                Some("csv") => "file_csv_equals",
                Some("json") => "file_json_equals",
                _ => "file_equals",
            };
            checks.push(CheckSpec {
                kind: kind.into(),
                path: Some(name.clone()),
                expected: Some(Blob::from_bytes(&content)),
                ..CheckSpec::default()
            });
        }
        for (j, k) in c.checks.iter().enumerate() {
            checks.push(resolve_check(dir, &format!("{field}.checks[{j}]"), k)?);
        }
        cases.push(Case {
            name: c.name.clone(),
            inputs,
            stdin,
            args: c.args.clone(),
            checks,
        });
    }
    let contract = f
        .contract
        .iter()
        .enumerate()
        .map(|(j, k)| resolve_check(dir, &format!("contract[{j}]"), k))
        .collect::<Result<_, _>>()?;
    let def = StepDefinition {
        name: f.name.clone(),
        description: f.description.clone(),
        runtime,
        program: Blob::from_bytes(&program),
        filename,
        layout: f.layout.clone().unwrap_or_else(|| "input-output".into()),
        policy: f.policy.clone().unwrap_or_else(|| "default".into()),
        env: f.env.clone(),
        cases,
        contract,
        origin: Origin::File {
            path: f.program.clone(),
        },
    };
    def.canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_step_file_resolves_its_files() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "count.py", "print(1)\n");
        write(d.path(), "in.csv", "a\n1\n");
        write(d.path(), "expected/out.csv", "n\n1\n");
        write(
            d.path(),
            "step.toml",
            r#"
name = "count"
description = "Counts"
program = "count.py"
[[cases]]
name = "one"
inputs = { "in.csv" = "in.csv" }
expected_stdout = "1\n"
expected_files = { "out.csv" = "expected/out.csv" }
[[contract]]
kind = "file_exists"
path = "out.csv"
"#,
        );
        let def = load(&d.path().join("step.toml")).unwrap();
        assert_eq!(def.runtime, "python");
        assert_eq!(def.filename.as_deref(), Some("count.py"));
        assert_eq!(def.policy, "default");
        assert_eq!(def.cases[0].inputs["in.csv"], Blob::Text("a\n1\n".into()));
        let kinds: Vec<&str> = def.cases[0]
            .checks
            .iter()
            .map(|c| c.kind.as_str())
            .collect();
        assert_eq!(kinds, ["stdout_equals", "file_csv_equals"]);
        assert_eq!(def.declared_outputs(), ["out.csv"]);
        assert_eq!(def.declared_inputs(), ["in.csv"]);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "count.py", "print(1)\n");
        let path = d.path().join("step.toml");
        let cases = [
            (
                "name = \"count\"\ndescription = \"x\"\nprogram = \"count.py\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "name = \"count\"\ndescription = \"x\"\nprogram = \"missing.py\"\n",
                "key `program`: file",
            ),
            (
                "name = \"Count\"\ndescription = \"x\"\nprogram = \"count.py\"\n",
                "key `name`",
            ),
            (
                "name = \"count\"\ndescription = \"x\"\nprogram = \"count.py\"\n[[cases]]\nname = \"a\"\ninputs = { \"x\" = \"nope.csv\" }\n",
                "key `cases[0].inputs.x`",
            ),
            (
                "name = \"count\"\ndescription = \"x\"\nprogram = \"count.py\"\n[[contract]]\nkind = \"file_sha256\"\npath = \"o\"\n",
                "key `contract[0].sha256`",
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(e.starts_with(&format!("`{}`: ", path.display())), "{e}");
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn the_checked_in_schema_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/step.schema.json");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == json_schema(),
            "docs/step.schema.json is stale: regenerate with `stepbox step schema > {}`",
            path.display()
        );
    }
}
