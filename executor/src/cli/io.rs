//! Files in and out of the CLI: inputs read from disk, outputs written under `--output-dir`
//! (names from the guest re-checked; symlinks never recreated).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::job::outcome::{OutputKind, RunResult};
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

/// Writes the result's files under `dir`. Names come from the guest, so each is re-checked as a
/// safe relative path; symlinks are reported on stderr and not recreated.
pub fn write_outputs(dir: &Path, result: &RunResult) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("failed to create output directory `{}`", dir.display()))?;
    for o in &result.outputs {
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
