//! `--check`, `--expect-file`, `--expect-stdout`: checks on a run's result, as flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::cli::io::text_or_file;
use crate::job::checks::{Check, CheckKind};

/// Checks on a run's result, as flags.
#[derive(Debug, Args, Default)]
pub struct CheckArgs {
    /// A check, `KIND=ARG`: exit_code=N, stdout_equals=TEXT|@FILE, stdout_matches=REGEX,
    /// file_exists=NAME, file_matches=NAME:REGEX, file_sha256=NAME:HEX,
    /// file_json_schema=NAME:@SCHEMA_FILE.
    #[arg(long = "check", value_name = "KIND=ARG")]
    pub checks: Vec<String>,
    /// An expected output file, `NAME=PATH`: compared as JSON for .json, as CSV for .csv, byte for
    /// byte otherwise.
    #[arg(long = "expect-file", value_name = "NAME=PATH")]
    pub expect_files: Vec<String>,
    /// A file holding the exact expected stdout.
    #[arg(long, value_name = "PATH")]
    pub expect_stdout: Option<PathBuf>,
}

impl CheckArgs {
    /// The checks these flags describe.
    pub fn checks(&self) -> anyhow::Result<Vec<Check>> {
        let mut out = Vec::new();
        for spec in &self.checks {
            let (kind, arg) = spec.split_once('=').with_context(|| {
                format!("--check `{spec}` is not KIND=ARG (for example exit_code=0)")
            })?;
            let path_and = |what: &str| {
                arg.split_once(':')
                    .map(|(p, r)| (p.to_string(), r.to_string()))
                    .with_context(|| format!("--check {kind}: expected NAME:{what}, got `{arg}`"))
            };
            let kind = match kind {
                "exit_code" => CheckKind::ExitCode(
                    arg.parse()
                        .with_context(|| format!("--check exit_code: `{arg}` is not an integer"))?,
                ),
                "stdout_equals" => CheckKind::StdoutEquals(text_or_file(arg)?.into()),
                "stdout_matches" => CheckKind::StdoutMatches(arg.to_string()),
                "file_exists" => CheckKind::FileExists(arg.to_string()),
                "file_matches" => {
                    let (path, regex) = path_and("REGEX")?;
                    CheckKind::FileMatches { path, regex }
                }
                "file_sha256" => {
                    let (path, sha256) = path_and("HEX")?;
                    CheckKind::FileSha256 { path, sha256 }
                }
                "file_json_schema" => {
                    let (path, schema) = path_and("@SCHEMA_FILE")?;
                    let schema = String::from_utf8(text_or_file(&schema)?)
                        .context("the schema is not UTF-8")?;
                    CheckKind::FileJsonSchema { path, schema }
                }
                other => bail!(
                    "unknown check kind `{other}`: expected exit_code, stdout_equals, stdout_matches, file_exists, \
                     file_matches, file_sha256 or file_json_schema"
                ),
            };
            out.push(Check {
                name: String::new(),
                kind,
            });
        }
        for spec in &self.expect_files {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("--expect-file `{spec}` is not NAME=PATH"))?;
            let content: bytes::Bytes = std::fs::read(path)
                .with_context(|| format!("failed to read expected file `{path}`"))?
                .into();
            let path_s = name.to_string();
            let kind = match Path::new(name).extension().and_then(|e| e.to_str()) {
                Some("json") => CheckKind::FileJsonEquals {
                    path: path_s,
                    content,
                },
                Some("csv") => CheckKind::FileCsvEquals {
                    path: path_s,
                    content,
                    ignore_row_order: false,
                },
                _ => CheckKind::FileEquals {
                    path: path_s,
                    content,
                },
            };
            out.push(Check {
                name: String::new(),
                kind,
            });
        }
        if let Some(p) = &self.expect_stdout {
            let content =
                std::fs::read(p).with_context(|| format!("failed to read `{}`", p.display()))?;
            out.push(Check {
                name: String::new(),
                kind: CheckKind::StdoutEquals(content.into()),
            });
        }
        Ok(out)
    }
}
