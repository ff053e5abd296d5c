//! What a published step is: its definition (everything a version's digest covers), its cases
//! and contract checks, references to versions, and the canonical form that is digested.
//!
//! ## Canonical form and digest
//! A version's identity is `sha256("stepbox.step.v1\n" + canonical JSON of its StepDefinition)`:
//! the definition serialised as JSON with object keys sorted by their UTF-8 bytes, no
//! insignificant whitespace, absent optional fields left out, bytes that are valid UTF-8 as a JSON
//! string and any other bytes as `{"base64": "..."}` (standard alphabet, padded). The name,
//! description, runtime, program, file name, layout, policy, environment, cases, contract checks
//! and origin are all covered; publishing the same content twice gives the same digest, so the
//! same version.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::checks::{Check, CheckKind};
use crate::job::digest::sha256_hex;
use crate::job::request::{InputFile, Layout, RuntimeKind, StepJob};

/// Prefix of the digested bytes: bump it if the canonical form ever changes.
const DIGEST_DOMAIN: &str = "stepbox.step.v1\n";

/// A step name: `^[a-z][a-z0-9-]{0,62}$`.
pub fn check_name(field: &str, name: &str) -> Result<(), ModelError> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ModelError::new(
            field,
            format!(
                "{name:?} is not a step name: use 1-63 characters, lowercase letters, digits and \
                 `-`, starting with a letter (e.g. `bulk-edit-validator`)"
            ),
        ))
    }
}

/// A field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct ModelError {
    /// The field, as the caller names it (`cases[0].checks[1].path`).
    pub field: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl ModelError {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> ModelError {
        ModelError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Bytes as stored: a string when they are UTF-8, else `{ base64 = "..." }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Blob {
    /// UTF-8 text.
    Text(String),
    /// Any bytes, base64 (standard alphabet, padded).
    Base64 {
        /// The encoded bytes.
        base64: String,
    },
}

impl Blob {
    /// The canonical blob of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Blob {
        match std::str::from_utf8(bytes) {
            Ok(s) => Blob::Text(s.to_string()),
            Err(_) => Blob::Base64 {
                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
        }
    }

    /// The bytes; `field` names the blob in errors.
    pub fn to_bytes(&self, field: &str) -> Result<bytes::Bytes, ModelError> {
        match self {
            Blob::Text(s) => Ok(bytes::Bytes::from(s.clone().into_bytes())),
            Blob::Base64 { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map(bytes::Bytes::from)
                .map_err(|e| ModelError::new(field, format!("is not valid base64: {e}"))),
        }
    }

    /// The canonical form of the same bytes (base64 of UTF-8 text becomes text).
    fn canonical(&self, field: &str) -> Result<Blob, ModelError> {
        Ok(Blob::from_bytes(&self.to_bytes(field)?))
    }
}

/// One check, flat: `kind` says which fields it needs.
///
/// | kind | fields |
/// |---|---|
/// | `exit_code` | `code` |
/// | `stdout_equals` | `expected` |
/// | `stdout_matches` | `regex` |
/// | `file_exists` | `path` |
/// | `file_equals`, `file_json_equals` | `path`, `expected` |
/// | `file_csv_equals` | `path`, `expected`, `ignore_row_order` (optional) |
/// | `file_sha256` | `path`, `sha256` |
/// | `file_matches` | `path`, `regex` |
/// | `file_json_schema` | `path`, `schema` (JSON text) |
/// | `verifier` | `runtime`, `program`, `policy` (optional) |
///
/// In a `step.toml`, `expected_file`, `schema_file` and `program_file` name files relative to
/// it instead; they are read at publication and never stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Name shown in verdicts (default: generated from the kind and path).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The kind of check (see the table).
    pub kind: String,
    /// Expected exit code (`exit_code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Output path, relative (`file_*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Expected bytes (`stdout_equals`, `file_equals`, `file_json_equals`, `file_csv_equals`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Blob>,
    /// `step.toml` only: a file holding `expected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_file: Option<String>,
    /// A regular expression (`stdout_matches`, `file_matches`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Expected hex sha256 (`file_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A JSON Schema as JSON text (`file_json_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// `step.toml` only: a file holding `schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_file: Option<String>,
    /// Compare CSV rows as a multiset (`file_csv_equals`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_row_order: bool,
    /// The verifier's runtime (`verifier`): `python` or `wasm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The verifier's program (`verifier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<Blob>,
    /// `step.toml` only: a file holding `program`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_file: Option<String>,
    /// The verifier's policy (`verifier`; default: the checked run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Every check kind, as `kind` spells it.
pub const CHECK_KINDS: [&str; 11] = [
    "exit_code",
    "stdout_equals",
    "stdout_matches",
    "file_exists",
    "file_equals",
    "file_sha256",
    "file_json_equals",
    "file_csv_equals",
    "file_matches",
    "file_json_schema",
    "verifier",
];

impl CheckSpec {
    /// The job model's check; `field` names this check in errors (`cases[0].checks[2]`).
    pub fn to_check(&self, field: &str) -> Result<Check, ModelError> {
        let need = |what: &str, v: Option<&str>| {
            v.map(str::to_string).ok_or_else(|| {
                ModelError::new(
                    format!("{field}.{what}"),
                    format!("a `{}` check needs `{what}`", self.kind),
                )
            })
        };
        let path = || need("path", self.path.as_deref());
        let expected = || {
            self.expected
                .as_ref()
                .ok_or_else(|| {
                    ModelError::new(
                        format!("{field}.expected"),
                        format!("a `{}` check needs `expected`", self.kind),
                    )
                })?
                .to_bytes(&format!("{field}.expected"))
        };
        let kind = match self.kind.as_str() {
            "exit_code" => CheckKind::ExitCode(self.code.ok_or_else(|| {
                ModelError::new(format!("{field}.code"), "an `exit_code` check needs `code`")
            })?),
            "stdout_equals" => CheckKind::StdoutEquals(expected()?),
            "stdout_matches" => CheckKind::StdoutMatches(need("regex", self.regex.as_deref())?),
            "file_exists" => CheckKind::FileExists(path()?),
            "file_equals" => CheckKind::FileEquals {
                path: path()?,
                content: expected()?,
            },
            "file_sha256" => CheckKind::FileSha256 {
                path: path()?,
                sha256: need("sha256", self.sha256.as_deref())?,
            },
            "file_json_equals" => CheckKind::FileJsonEquals {
                path: path()?,
                content: expected()?,
            },
            "file_csv_equals" => CheckKind::FileCsvEquals {
                path: path()?,
                content: expected()?,
                ignore_row_order: self.ignore_row_order,
            },
            "file_matches" => CheckKind::FileMatches {
                path: path()?,
                regex: need("regex", self.regex.as_deref())?,
            },
            "file_json_schema" => CheckKind::FileJsonSchema {
                path: path()?,
                schema: need("schema", self.schema.as_deref())?,
            },
            "verifier" => {
                let runtime: RuntimeKind = need("runtime", self.runtime.as_deref())?
                    .parse()
                    .map_err(|e: String| ModelError::new(format!("{field}.runtime"), e))?;
                let program = self
                    .program
                    .as_ref()
                    .ok_or_else(|| {
                        ModelError::new(
                            format!("{field}.program"),
                            "a `verifier` check needs `program`",
                        )
                    })?
                    .to_bytes(&format!("{field}.program"))?;
                let mut job = StepJob::new(runtime, program);
                job.policy = self.policy.clone().unwrap_or_default();
                CheckKind::Verifier(Box::new(job))
            }
            other => {
                return Err(ModelError::new(
                    format!("{field}.kind"),
                    format!(
                        "unknown check kind `{other}`: expected one of {}",
                        CHECK_KINDS.join(", ")
                    ),
                ));
            }
        };
        Ok(Check {
            name: self.name.clone(),
            kind,
        })
    }

    /// The spec of a job-model check (what a door such as `generate` publishes).
    pub fn from_check(check: &Check) -> CheckSpec {
        let mut s = CheckSpec {
            name: check.name.clone(),
            ..CheckSpec::default()
        };
        let (kind, path) = match &check.kind {
            CheckKind::ExitCode(c) => {
                s.code = Some(*c);
                ("exit_code", None)
            }
            CheckKind::StdoutEquals(b) => {
                s.expected = Some(Blob::from_bytes(b));
                ("stdout_equals", None)
            }
            CheckKind::StdoutMatches(r) => {
                s.regex = Some(r.clone());
                ("stdout_matches", None)
            }
            CheckKind::FileExists(p) => ("file_exists", Some(p)),
            CheckKind::FileEquals { path, content } => {
                s.expected = Some(Blob::from_bytes(content));
                ("file_equals", Some(path))
            }
            CheckKind::FileSha256 { path, sha256 } => {
                s.sha256 = Some(sha256.clone());
                ("file_sha256", Some(path))
            }
            CheckKind::FileJsonEquals { path, content } => {
                s.expected = Some(Blob::from_bytes(content));
                ("file_json_equals", Some(path))
            }
            CheckKind::FileCsvEquals {
                path,
                content,
                ignore_row_order,
            } => {
                s.expected = Some(Blob::from_bytes(content));
                s.ignore_row_order = *ignore_row_order;
                ("file_csv_equals", Some(path))
            }
            CheckKind::FileMatches { path, regex } => {
                s.regex = Some(regex.clone());
                ("file_matches", Some(path))
            }
            CheckKind::FileJsonSchema { path, schema } => {
                s.schema = Some(schema.clone());
                ("file_json_schema", Some(path))
            }
            CheckKind::Verifier(job) => {
                s.runtime = Some(job.runtime.name().to_string());
                s.program = Some(Blob::from_bytes(&job.program));
                s.policy = (!job.policy.is_empty()).then(|| job.policy.clone());
                ("verifier", None)
            }
        };
        s.kind = kind.to_string();
        s.path = path.cloned();
        s
    }

    fn canonical(&self, field: &str) -> Result<CheckSpec, ModelError> {
        for (key, set) in [
            ("expected_file", self.expected_file.is_some()),
            ("schema_file", self.schema_file.is_some()),
            ("program_file", self.program_file.is_some()),
        ] {
            if set {
                return Err(ModelError::new(
                    format!("{field}.{key}"),
                    "file references are read by `step.toml` loading; send the content in \
                     `expected`, `schema` or `program` instead",
                ));
            }
        }
        // Refuses what would not run: unknown kinds, missing fields, bad base64.
        self.to_check(field)?;
        let mut c = self.clone();
        if let Some(b) = &c.expected {
            c.expected = Some(b.canonical(&format!("{field}.expected"))?);
        }
        if let Some(b) = &c.program {
            c.program = Some(b.canonical(&format!("{field}.program"))?);
        }
        Ok(c)
    }
}

/// A sample job with its expected results: the evidence that the step does what it says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The case's name (unique within the step).
    pub name: String,
    /// Input files by relative path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, Blob>,
    /// Bytes on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Blob>,
    /// Arguments after the program name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// What the result must satisfy (the contract checks apply too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckSpec>,
}

/// Where a version came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Origin {
    /// A program file (with its `step.toml`, if any).
    File {
        /// The program's path as given at publication (informational).
        path: String,
    },
    /// Sent inline by a caller (gRPC).
    Api,
    /// Written by a model through `stepbox generate`.
    Generated {
        /// The model's name.
        model: String,
        /// The exchange, as OpenAI chat messages (JSON).
        transcript: Value,
    },
    /// Imported from a ChatGPT Code Interpreter conversation.
    Conversation {
        /// The conversation's title.
        title: String,
        /// Its id.
        conversation_id: String,
    },
}

/// Everything a version's digest covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    /// The step's name.
    pub name: String,
    /// What it does, for the people and services that call it.
    pub description: String,
    /// `python` or `wasm`.
    pub runtime: String,
    /// The program: Python source, or a wasm binary / WAT text.
    pub program: Blob,
    /// The name tracebacks show (Python; default `step.py`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// `input-output` or `mnt-data`.
    pub layout: String,
    /// The policy its cases run under at publication, and its runs by version reference.
    pub policy: String,
    /// Variables added to the policy's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Sample jobs with expected results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<Case>,
    /// Checks every run of the step must pass, on any input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contract: Vec<CheckSpec>,
    /// Where it came from.
    pub origin: Origin,
}

impl StepDefinition {
    /// Checks every field and returns the canonical form (what is stored and digested).
    pub fn canonical(&self) -> Result<StepDefinition, ModelError> {
        check_name("name", &self.name)?;
        if self.description.trim().is_empty() {
            return Err(ModelError::new(
                "description",
                "is empty: say in a sentence what the step does and for whom",
            ));
        }
        let runtime: RuntimeKind = self
            .runtime
            .parse()
            .map_err(|e: String| ModelError::new("runtime", e))?;
        let layout: Layout = self
            .layout
            .parse()
            .map_err(|e: String| ModelError::new("layout", e))?;
        if self.policy.is_empty() {
            return Err(ModelError::new(
                "policy",
                "is empty: name a policy, e.g. `default`",
            ));
        }
        let program = self.program.canonical("program")?;
        if program.to_bytes("program")?.is_empty() {
            return Err(ModelError::new("program", "the program is empty"));
        }
        if runtime == RuntimeKind::Python && matches!(program, Blob::Base64 { .. }) {
            return Err(ModelError::new("program", "Python source must be UTF-8"));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut cases = Vec::with_capacity(self.cases.len());
        for (i, case) in self.cases.iter().enumerate() {
            let field = format!("cases[{i}]");
            if case.name.is_empty() {
                return Err(ModelError::new(format!("{field}.name"), "is empty"));
            }
            if !names.insert(case.name.as_str()) {
                return Err(ModelError::new(
                    format!("{field}.name"),
                    format!("{:?} names two cases; give each its own name", case.name),
                ));
            }
            let mut c = case.clone();
            for (path, blob) in &mut c.inputs {
                crate::job::request::check_relative_path(&format!("{field}.inputs"), path)
                    .map_err(|e| ModelError::new(format!("{field}.inputs"), e.to_string()))?;
                *blob = blob.canonical(&format!("{field}.inputs.{path}"))?;
            }
            if let Some(s) = &c.stdin {
                c.stdin = Some(s.canonical(&format!("{field}.stdin"))?);
            }
            c.checks = c
                .checks
                .iter()
                .enumerate()
                .map(|(j, k)| k.canonical(&format!("{field}.checks[{j}]")))
                .collect::<Result<_, _>>()?;
            cases.push(c);
        }
        let contract = self
            .contract
            .iter()
            .enumerate()
            .map(|(j, k)| k.canonical(&format!("contract[{j}]")))
            .collect::<Result<_, _>>()?;
        for (k, v) in &self.env {
            crate::job::policy::check_env_var(k, v)
                .map_err(|r| ModelError::new(format!("env.{k}"), r))?;
        }
        Ok(StepDefinition {
            name: self.name.clone(),
            description: self.description.trim().to_string(),
            runtime: runtime.name().to_string(),
            program,
            filename: self.filename.clone().filter(|f| !f.is_empty()),
            layout: layout.name().to_string(),
            policy: self.policy.clone(),
            env: self.env.clone(),
            cases,
            contract,
            origin: self.origin.clone(),
        })
    }

    /// The hex sha256 of the canonical form (call on a canonical definition).
    pub fn digest(&self) -> String {
        let value = serde_json::to_value(self).expect("a step definition serialises");
        let mut bytes = DIGEST_DOMAIN.as_bytes().to_vec();
        write_canonical(&value, &mut bytes);
        sha256_hex(&bytes)
    }

    /// The job a run of this step starts from: program, runtime, layout, policy and environment;
    /// no inputs, stdin or arguments yet.
    pub fn base_job(&self) -> Result<StepJob, ModelError> {
        let runtime: RuntimeKind = self
            .runtime
            .parse()
            .map_err(|e: String| ModelError::new("runtime", e))?;
        let mut job = StepJob::new(runtime, self.program.to_bytes("program")?);
        job.filename = self.filename.clone();
        job.layout = self
            .layout
            .parse()
            .map_err(|e: String| ModelError::new("layout", e))?;
        job.policy = self.policy.clone();
        job.env = self.env.clone();
        Ok(job)
    }

    /// The contract checks as job-model checks.
    pub fn contract_checks(&self) -> Result<Vec<Check>, ModelError> {
        self.contract
            .iter()
            .enumerate()
            .map(|(i, c)| c.to_check(&format!("contract[{i}]")))
            .collect()
    }

    /// Case `i`'s job under `policy` and its checks (the case's, then the contract's).
    pub fn case_job(&self, i: usize, policy: &str) -> Result<(StepJob, Vec<Check>), ModelError> {
        let case = &self.cases[i];
        let field = format!("cases[{i}]");
        let mut job = self.base_job()?;
        job.policy = policy.to_string();
        for (path, blob) in &case.inputs {
            job.inputs.push(InputFile {
                path: path.clone(),
                content: blob.to_bytes(&format!("{field}.inputs.{path}"))?,
            });
        }
        if let Some(s) = &case.stdin {
            job.stdin = s.to_bytes(&format!("{field}.stdin"))?;
        }
        job.args = case.args.clone();
        let mut checks = case
            .checks
            .iter()
            .enumerate()
            .map(|(j, c)| c.to_check(&format!("{field}.checks[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        checks.extend(self.contract_checks()?);
        Ok((job, checks))
    }

    /// The output files its cases show it writes (for workflows and the web page), sorted.
    pub fn declared_outputs(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .cases
            .iter()
            .flat_map(|c| c.checks.iter())
            .chain(self.contract.iter())
            .filter(|c| c.kind.starts_with("file_"))
            .filter_map(|c| c.path.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The input file names its cases use, sorted.
    pub fn declared_inputs(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .cases
            .iter()
            .flat_map(|c| c.inputs.keys().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Writes `v` as canonical JSON: keys sorted by their bytes, no whitespace.
pub(crate) fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serialises"));
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend(serde_json::to_vec(other).expect("a JSON value serialises")),
    }
}

/// Which version a reference selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Bare `NAME`: the newest verified version.
    Latest,
    /// `NAME@STAGE`.
    Stage(String),
    /// `NAME@vN`.
    Number(i64),
    /// `NAME@sha256:HEX`.
    Digest(String),
}

/// A reference to a version: `NAME`, `NAME@STAGE`, `NAME@vN` or `NAME@sha256:HEX`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepRef {
    /// The step's name.
    pub name: String,
    /// Which of its versions.
    pub selector: Selector,
}

impl StepRef {
    /// Parses a reference; errors name `field`.
    pub fn parse(field: &str, s: &str) -> Result<StepRef, ModelError> {
        let (name, sel) = match s.split_once('@') {
            Some((n, sel)) => (n, Some(sel)),
            None => (s, None),
        };
        check_name(field, name)?;
        let bad = |why: &str| {
            ModelError::new(
                field,
                format!(
                    "{s:?} {why}; expected NAME, NAME@STAGE, NAME@vN or NAME@sha256:HEX (e.g. \
                     `bulk-edit-validator@prod`)"
                ),
            )
        };
        let selector = match sel {
            None => Selector::Latest,
            Some("") => return Err(bad("has nothing after `@`")),
            Some(sel) => {
                if let Some(hex) = sel.strip_prefix("sha256:") {
                    if hex.len() != 64
                        || !hex
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    {
                        return Err(bad("has a digest that is not 64 lowercase hex digits"));
                    }
                    Selector::Digest(hex.to_string())
                } else if let Some(n) = sel.strip_prefix('v')
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                {
                    let n: i64 = n
                        .parse()
                        .map_err(|_| bad("has a version number too large"))?;
                    if n == 0 {
                        return Err(bad("names v0; versions start at v1"));
                    }
                    Selector::Number(n)
                } else {
                    check_name(field, sel).map_err(|_| bad("has a stage that is not a name"))?;
                    Selector::Stage(sel.to_string())
                }
            }
        };
        Ok(StepRef {
            name: name.to_string(),
            selector,
        })
    }
}

impl FromStr for StepRef {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<StepRef, ModelError> {
        StepRef::parse("step_ref", s)
    }
}

impl fmt::Display for StepRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Latest => write!(f, "{}", self.name),
            Selector::Stage(s) => write!(f, "{}@{s}", self.name),
            Selector::Number(n) => write!(f, "{}@v{n}", self.name),
            Selector::Digest(d) => write!(f, "{}@sha256:{d}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> StepDefinition {
        StepDefinition {
            name: "count-rows".into(),
            description: "Counts rows".into(),
            runtime: "python".into(),
            program: Blob::Text("print(1)".into()),
            filename: None,
            layout: "input-output".into(),
            policy: "default".into(),
            env: BTreeMap::new(),
            cases: vec![Case {
                name: "one".into(),
                inputs: BTreeMap::from([("a.csv".into(), Blob::Text("x\n".into()))]),
                checks: vec![CheckSpec {
                    kind: "stdout_equals".into(),
                    expected: Some(Blob::Text("1\n".into())),
                    ..CheckSpec::default()
                }],
                ..Case::default()
            }],
            contract: vec![],
            origin: Origin::Api,
        }
    }

    #[test]
    fn digest_is_stable_and_covers_content() {
        let a = def().canonical().unwrap();
        // Base64 of UTF-8 text is the same bytes: the same canonical form and digest.
        let mut b = def();
        b.program = Blob::Base64 {
            base64: "cHJpbnQoMSk=".into(),
        };
        assert_eq!(a.digest(), b.canonical().unwrap().digest());
        assert_eq!(a.digest().len(), 64);
        let mut c = def();
        c.cases[0].checks[0].expected = Some(Blob::Text("2\n".into()));
        assert_ne!(a.digest(), c.canonical().unwrap().digest());
        let mut d = def();
        d.description = "Counts the rows".into();
        assert_ne!(a.digest(), d.canonical().unwrap().digest());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let mut out = Vec::new();
        write_canonical(
            &serde_json::json!({"b": 1, "a": [true, {"d": null, "c": "é"}]}),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":[true,{"c":"é","d":null}],"b":1}"#
        );
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let mut d = def();
        d.name = "Count".into();
        assert_eq!(d.canonical().unwrap_err().field, "name");
        let mut d = def();
        d.cases[0].checks[0].kind = "stdout_contains".into();
        let e = d.canonical().unwrap_err();
        assert_eq!(e.field, "cases[0].checks[0].kind");
        assert!(e.reason.contains("stdout_equals"), "{}", e.reason);
        let mut d = def();
        d.cases[0].checks[0].expected = None;
        assert_eq!(
            d.canonical().unwrap_err().field,
            "cases[0].checks[0].expected"
        );
        let mut d = def();
        d.cases.push(d.cases[0].clone());
        assert_eq!(d.canonical().unwrap_err().field, "cases[1].name");
        let mut d = def();
        d.cases[0]
            .inputs
            .insert("../x".into(), Blob::Text(String::new()));
        assert_eq!(d.canonical().unwrap_err().field, "cases[0].inputs");
        let mut d = def();
        d.runtime = "ruby".into();
        assert_eq!(d.canonical().unwrap_err().field, "runtime");
    }

    #[test]
    fn checks_round_trip_through_specs() {
        let spec = CheckSpec {
            kind: "file_csv_equals".into(),
            path: Some("out.csv".into()),
            expected: Some(Blob::Text("a\n".into())),
            ignore_row_order: true,
            ..CheckSpec::default()
        };
        let check = spec.to_check("c").unwrap();
        assert_eq!(CheckSpec::from_check(&check), spec);
    }

    #[test]
    fn refs_parse() {
        let r = |s: &str| StepRef::parse("ref", s);
        assert_eq!(r("a-b").unwrap().selector, Selector::Latest);
        assert_eq!(
            r("a@prod").unwrap().selector,
            Selector::Stage("prod".into())
        );
        assert_eq!(r("a@v12").unwrap().selector, Selector::Number(12));
        let hex = "ab".repeat(32);
        assert_eq!(
            r(&format!("a@sha256:{hex}")).unwrap().selector,
            Selector::Digest(hex.clone())
        );
        assert_eq!(
            r(&format!("a@sha256:{hex}")).unwrap().to_string(),
            format!("a@sha256:{hex}")
        );
        for bad in [
            "",
            "A",
            "a@",
            "a@v0",
            "a@sha256:xyz",
            "a@Prod",
            "-a",
            "a@b@c",
        ] {
            let e = r(bad).unwrap_err();
            assert_eq!(e.field, "ref", "{bad}");
        }
    }
}
