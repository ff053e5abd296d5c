//! Reading what a step left behind, treating every byte and every name as hostile.
//!
//! Directories are walked without following symlinks; a symlink the step created is reported with
//! its target text and never followed; files are opened with `O_NOFOLLOW`. [`DiskWatch`] measures
//! the writable directories while the step runs so a step that writes forever is stopped near the
//! output limits, not after it filled the disk.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::job::digest::sha256_hex;
use crate::job::limits::{LimitKind, Limits};
pub use crate::job::outcome::{OutputFile, OutputKind};

/// Deepest directory nesting walked; deeper entries count as limit violations (`output_files`).
const MAX_DEPTH: usize = 64;

/// The files of a directory that count against the limits, as a walk found them.
#[derive(Debug, Default)]
struct Walk {
    entries: Vec<(PathBuf, std::fs::Metadata)>,
    too_deep: bool,
}

fn walk(root: &Path) -> Walk {
    let mut out = Walk::default();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .max_depth(MAX_DEPTH + 1)
    {
        let Ok(entry) = entry else { continue };
        if entry.file_type().is_dir() {
            continue;
        }
        if entry.depth() > MAX_DEPTH {
            out.too_deep = true;
            continue;
        }
        if let Ok(meta) = entry.metadata() {
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap_or(entry.path())
                .to_path_buf();
            out.entries.push((rel, meta));
        }
    }
    out
}

/// Identity of an input file as it was written, to tell changed files from untouched ones in the
/// `mnt-data` layout.
pub type Baseline = HashMap<PathBuf, String>;

/// Counts and limits what the step left in its writable directories.
#[derive(Clone, Debug)]
pub struct OutputScan {
    /// Files (and symlinks) that count as the step's: everything in `/tmp`, new or changed files in
    /// the data directory.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The first limit passed, with a description.
    pub exceeded: Option<(LimitKind, String)>,
}

fn check(files: u64, bytes: u64, too_deep: bool, limits: &Limits) -> Option<(LimitKind, String)> {
    if too_deep {
        return Some((
            LimitKind::OutputFiles,
            format!("the step nested directories deeper than {MAX_DEPTH} levels"),
        ));
    }
    if files > u64::from(limits.output_files) {
        return Some((
            LimitKind::OutputFiles,
            format!(
                "the step left {files} files; the limit is {}",
                limits.output_files
            ),
        ));
    }
    if bytes > limits.output_bytes {
        return Some((
            LimitKind::OutputBytes,
            format!(
                "the step wrote {bytes} bytes; the limit is {}",
                limits.output_bytes
            ),
        ));
    }
    None
}

/// Watches the writable directories during a run. Cheap enough to call every epoch tick: it walks
/// the directory entries (never file contents) and stops at the first limit passed.
#[derive(Debug)]
pub struct DiskWatch {
    dirs: Vec<PathBuf>,
    /// Bytes and files that were there before the step started (inputs in `mnt-data`).
    allowance_bytes: u64,
    allowance_files: u64,
    limits: Limits,
}

impl DiskWatch {
    /// Watches `dirs`, discounting what was there at the start.
    pub fn new(
        dirs: Vec<PathBuf>,
        allowance_files: u64,
        allowance_bytes: u64,
        limits: Limits,
    ) -> DiskWatch {
        DiskWatch {
            dirs,
            allowance_bytes,
            allowance_files,
            limits,
        }
    }

    /// The limits watched.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The first limit passed so far, if any.
    pub fn check(&self) -> Option<(LimitKind, String)> {
        let (mut files, mut bytes, mut deep) = (0u64, 0u64, false);
        for dir in &self.dirs {
            let w = walk(dir);
            deep |= w.too_deep;
            files += w.entries.len() as u64;
            bytes += w.entries.iter().map(|(_, m)| m.len()).sum::<u64>();
        }
        check(
            files.saturating_sub(self.allowance_files),
            bytes.saturating_sub(self.allowance_bytes),
            deep,
            &self.limits,
        )
    }
}

/// Reads a regular file without following a symlink at its final component.
fn read_nofollow(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut buf = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Collects the outputs of `data_dir` and measures `scratch_dir` against the limits. With a
/// `baseline` (the `mnt-data` layout), files whose content still matches it are not outputs.
pub fn collect(
    data_dir: &Path,
    scratch_dir: &Path,
    baseline: Option<&Baseline>,
    limits: &Limits,
) -> (Vec<OutputFile>, OutputScan) {
    let data = walk(data_dir);
    let scratch = walk(scratch_dir);
    let mut outputs = Vec::new();
    let mut bytes = scratch.entries.iter().map(|(_, m)| m.len()).sum::<u64>();
    let mut files = scratch.entries.len() as u64;
    let mut budget = limits.output_bytes;
    for (rel, meta) in &data.entries {
        let path = rel.to_string_lossy().replace('\\', "/");
        let full = data_dir.join(rel);
        let ft = meta.file_type();
        let out = if ft.is_symlink() {
            let target = std::fs::read_link(&full)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            OutputFile {
                path,
                kind: OutputKind::Symlink { target },
                size: 0,
                sha256: sha256_hex(b""),
                content: bytes::Bytes::new(),
            }
        } else if ft.is_file() {
            // Read at most what the byte budget allows: a file past it is not loaded into memory.
            let content = if meta.len() <= budget {
                read_nofollow(&full, budget).unwrap_or_default()
            } else {
                Vec::new()
            };
            let digest = sha256_hex(&content);
            if baseline
                .and_then(|b| b.get(rel))
                .is_some_and(|d| *d == digest && meta.len() == content.len() as u64)
            {
                continue; // an input the step did not change
            }
            budget = budget.saturating_sub(meta.len());
            OutputFile {
                path,
                kind: OutputKind::File,
                size: meta.len(),
                sha256: digest,
                content: content.into(),
            }
        } else {
            continue; // WASI cannot make fifos or sockets; ignore anything else that appears
        };
        bytes += out.size;
        files += 1;
        outputs.push(out);
    }
    outputs.sort_by(|a, b| a.path.cmp(&b.path));
    let exceeded = check(files, bytes, data.too_deep || scratch.too_deep, limits);
    if exceeded.is_some() {
        // Keep what fits: the first files by path, within the count and byte limits.
        let (mut n, mut b) = (0u64, 0u64);
        outputs.retain(|o| {
            n += 1;
            b += o.size;
            n <= u64::from(limits.output_files)
                && b <= limits.output_bytes
                && o.content.len() as u64 == o.size
        });
    }
    (
        outputs,
        OutputScan {
            files,
            bytes,
            exceeded,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(files: u32, bytes: u64) -> Limits {
        Limits {
            memory_bytes: 1 << 20,
            fuel: None,
            wall_time: Duration::from_secs(1),
            stdout_bytes: 10,
            stderr_bytes: 10,
            output_files: files,
            output_bytes: bytes,
        }
    }

    #[test]
    fn symlinks_are_reported_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (data, tmp) = (d.path().join("out"), d.path().join("tmp"));
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(data.join("sub/a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", data.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", data.join("dirlink")).unwrap();
        let (outs, scan) = collect(&data, &tmp, None, &limits(10, 100));
        assert!(scan.exceeded.is_none());
        let paths: Vec<_> = outs.iter().map(|o| (o.path.as_str(), o.size)).collect();
        assert_eq!(paths, [("dirlink", 0), ("link", 0), ("sub/a.txt", 5)]);
        assert_eq!(
            outs[1].kind,
            OutputKind::Symlink {
                target: "/etc/passwd".into()
            }
        );
        assert!(outs[1].content.is_empty());
        assert_eq!(&outs[2].content[..], b"hello");
    }

    #[test]
    fn limits_count_scratch_too_and_only_changed_inputs() {
        let d = tempfile::tempdir().unwrap();
        let (data, tmp) = (d.path().join("data"), d.path().join("tmp"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(data.join("in.csv"), b"same").unwrap();
        std::fs::write(data.join("changed.csv"), b"new!").unwrap();
        std::fs::write(tmp.join("scratch"), b"12345678").unwrap();
        let baseline: Baseline = [
            (PathBuf::from("in.csv"), sha256_hex(b"same")),
            (PathBuf::from("changed.csv"), sha256_hex(b"old")),
        ]
        .into();
        let (outs, scan) = collect(&data, &tmp, Some(&baseline), &limits(10, 12));
        assert_eq!(
            outs.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(),
            ["changed.csv"]
        );
        assert_eq!((scan.files, scan.bytes), (2, 12));
        assert!(scan.exceeded.is_none());
        let (_, scan) = collect(&data, &tmp, Some(&baseline), &limits(10, 11));
        assert_eq!(scan.exceeded.unwrap().0, LimitKind::OutputBytes);
        let (_, scan) = collect(&data, &tmp, Some(&baseline), &limits(1, 100));
        assert_eq!(scan.exceeded.unwrap().0, LimitKind::OutputFiles);
    }

    #[test]
    fn disk_watch_discounts_the_starting_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("input"), vec![0; 100]).unwrap();
        let w = DiskWatch::new(vec![d.path().to_path_buf()], 1, 100, limits(1, 10));
        assert!(w.check().is_none());
        std::fs::write(d.path().join("out"), vec![0; 11]).unwrap();
        assert_eq!(w.check().unwrap().0, LimitKind::OutputBytes);
    }
}
