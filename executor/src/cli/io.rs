//! Files in and out of the CLI: inputs read from disk, outputs written under `--output-dir`
//! (names from the guest re-checked; symlinks never recreated), and a finished run handed over
//! the way `stepbox run` does it, whether it ran here or on a server ([`Finished`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::job::checks::CheckResult;
use crate::job::outcome::{OutputFile, OutputKind, RunResult, Status};
use crate::job::request::{InputFile, check_relative_path};

/// `TEXT`, or the bytes of `@FILE`.
pub(crate) fn text_or_file(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("failed to read `{path}`")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// Reads the inputs of `--input-dir` (relative paths kept) and of each `--input` (by file name).
pub(crate) fn read_inputs(dir: Option<&Path>, files: &[PathBuf]) -> anyhow::Result<Vec<InputFile>> {
    let mut inputs = match dir {
        Some(d) => read_input_dir(d)?,
        None => Vec::new(),
    };
    for path in files {
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .with_context(|| format!("input `{}` has no UTF-8 file name", path.display()))?;
        let content = std::fs::read(path)
            .with_context(|| format!("failed to read input `{}`", path.display()))?;
        inputs.push(InputFile {
            path: name.to_string(),
            content: content.into(),
        });
    }
    Ok(inputs)
}

/// Reads every regular file under `dir` (symlinks are refused, not followed) with relative paths.
fn read_input_dir(dir: &Path) -> anyhow::Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry =
            entry.with_context(|| format!("failed to read input directory `{}`", dir.display()))?;
        if entry.file_type().is_dir() {
            continue;
        }
        if !entry.file_type().is_file() {
            bail!(
                "input `{}` is not a regular file (symlinks are not followed)",
                entry.path().display()
            );
        }
        let rel = entry.path().strip_prefix(dir)?;
        let path = rel
            .to_str()
            .with_context(|| format!("input path `{}` is not UTF-8", rel.display()))?
            .to_string();
        let content = std::fs::read(entry.path())
            .with_context(|| format!("failed to read `{}`", entry.path().display()))?;
        files.push(InputFile {
            path,
            content: content.into(),
        });
    }
    Ok(files)
}

/// Reads `--stdin FILE`.
pub(crate) fn read_stdin(path: Option<&Path>) -> anyhow::Result<bytes::Bytes> {
    match path {
        Some(p) => Ok(std::fs::read(p)
            .with_context(|| format!("failed to read stdin file `{}`", p.display()))?
            .into()),
        None => Ok(bytes::Bytes::new()),
    }
}

/// Writes a run's files under `dir`. Names come from the guest, so each is re-checked as a
/// safe relative path; symlinks are reported on stderr and not recreated.
pub fn write_outputs(dir: &Path, outputs: &[OutputFile]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("failed to create output directory `{}`", dir.display()))?;
    for o in outputs {
        let rel = check_relative_path("output", &o.path)?;
        match &o.kind {
            OutputKind::File => {
                let path = dir.join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, &o.content)
                    .with_context(|| format!("failed to write `{}`", path.display()))?;
            }
            OutputKind::Symlink { target } => {
                eprintln!(
                    "stepbox: output `{}` is a symlink to `{target}`; not written",
                    o.path
                );
            }
        }
    }
    Ok(())
}

/// A finished run as the CLI hands it over: from this process's executor
/// ([`Finished::local`]) or from a server's response.
#[derive(Debug)]
pub(crate) struct Finished {
    /// How it ended (after checks).
    pub status: Status,
    /// Why, when it did not succeed.
    pub message: String,
    /// The step's stdout.
    pub stdout: bytes::Bytes,
    /// The step's stderr.
    pub stderr: bytes::Bytes,
    /// The files it left.
    pub outputs: Vec<OutputFile>,
    /// The checks' verdicts.
    pub verdicts: Vec<CheckResult>,
    /// What `--json` prints: the whole result with `check_results`.
    pub json: serde_json::Value,
    /// What `-v` prints: timings and usage in one line.
    pub timings: String,
}

impl Finished {
    /// A run of this process's executor.
    pub(crate) fn local(result: RunResult, verdicts: Vec<CheckResult>) -> anyhow::Result<Finished> {
        let mut json = serde_json::to_value(&result)?;
        json["check_results"] = serde_json::to_value(&verdicts)?;
        let u = &result.usage;
        let timings = format!(
            "{} in {:.1} ms (compile/load {:.1} ms from {:?}, instantiate {:.2} ms, peak memory {} KiB{})",
            result.status,
            u.wall_time_us as f64 / 1000.0,
            u.compile_us as f64 / 1000.0,
            u.compile_cache,
            u.instantiate_us as f64 / 1000.0,
            u.peak_memory_bytes / 1024,
            u.fuel_consumed
                .map(|f| format!(", fuel {f}"))
                .unwrap_or_default()
        );
        Ok(Finished {
            status: result.status,
            message: result.message,
            stdout: result.stdout,
            stderr: result.stderr,
            outputs: result.outputs,
            verdicts,
            json,
            timings,
        })
    }
}

/// How a finished run is handed over (the flags `stepbox run` and `stepbox step run` share).
#[derive(Debug, Default)]
pub(crate) struct Presentation<'a> {
    /// `--output-dir`.
    pub output_dir: Option<&'a Path>,
    /// `--json`.
    pub json: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-v`.
    pub verbose: bool,
}

/// Hands a finished run over: output files into `--output-dir`; then either the whole result as
/// JSON on stdout, or the step's stdout and stderr byte for byte followed by failed checks and one
/// `stepbox: STATUS: message` line. Returns the status's exit code.
pub(crate) fn present(f: &Finished, p: &Presentation<'_>) -> anyhow::Result<u8> {
    if p.verbose {
        eprintln!("stepbox: {}", f.timings);
    }
    if let Some(dir) = p.output_dir {
        write_outputs(dir, &f.outputs)?;
    }
    if p.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &f.json)?;
        writeln!(out)?;
    } else {
        std::io::stdout().lock().write_all(&f.stdout)?;
        std::io::stderr().lock().write_all(&f.stderr)?;
        for v in f.verdicts.iter().filter(|v| !v.passed || p.verbose) {
            eprintln!(
                "stepbox: check {}: {}{}",
                v.name,
                if v.passed { "passed" } else { "FAILED" },
                if v.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", v.detail)
                }
            );
        }
        if f.status != Status::Succeeded && !p.quiet {
            eprintln!("stepbox: {}: {}", f.status, f.message);
        }
    }
    Ok(f.status.exit_code())
}
