//! Reading what a step left behind, treating every byte and every name as hostile.
//!
//! Directories are walked without following symlinks; a symlink the step created is reported with
//! its target text and never followed; files are opened with `O_NOFOLLOW`. [`DiskWatch`] measures
//! the writable directories while the step runs so a step that writes forever is stopped near the
//! output and scratch limits, not after it filled the disk.
//!
//! Outputs (`/output` or `/mnt/data`) and scratch (`/tmp`) are counted apart: outputs are returned
//! to the caller and held to `output_files`/`output_bytes`; scratch is never returned and is held
//! to `scratch_files`/`scratch_bytes` (a step may use many temporary files, as `tempfile` users do).

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// Output files (and symlinks) that count as the step's: new or changed files in the output
    /// directory.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files (and symlinks) in `/tmp`.
    pub scratch_files: u64,
    /// Their bytes.
    pub scratch_bytes: u64,
    /// The first limit passed, with a description.
    pub exceeded: Option<(LimitKind, String)>,
}

/// What one directory is held to: the output limits or the scratch limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    Output,
    Scratch,
}

fn check(
    area: Area,
    files: u64,
    bytes: u64,
    too_deep: bool,
    limits: &Limits,
) -> Option<(LimitKind, String)> {
    let (kind_files, max_files, kind_bytes, max_bytes, place) = match area {
        Area::Output => (
            LimitKind::OutputFiles,
            limits.output_files,
            LimitKind::OutputBytes,
            limits.output_bytes,
            "",
        ),
        Area::Scratch => (
            LimitKind::ScratchFiles,
            limits.scratch_files,
            LimitKind::ScratchBytes,
            limits.scratch_bytes,
            " in /tmp",
        ),
    };
    if too_deep {
        return Some((
            kind_files,
            format!("the step nested directories{place} deeper than {MAX_DEPTH} levels"),
        ));
    }
    if files > u64::from(max_files) {
        return Some((
            kind_files,
            format!("the step left {files} files{place}; the limit is {max_files}"),
        ));
    }
    if bytes > max_bytes {
        return Some((
            kind_bytes,
            format!("the step wrote {bytes} bytes{place}; the limit is {max_bytes}"),
        ));
    }
    None
}

/// A walk may take at most this share of the time between walks: a step with thousands of
/// temporary files is walked less often rather than slowed down (1/20 = 5% of one core).
const WALK_SHARE: u32 = 20;

/// Watches the writable directories during a run. Cheap enough to call every epoch tick: it walks
/// the directory entries (never file contents) and stops at the first limit passed. When a walk
/// gets long (many files), the next one waits [`WALK_SHARE`] times as long as it took.
#[derive(Debug)]
pub struct DiskWatch {
    output: PathBuf,
    scratch: PathBuf,
    /// Bytes and files that were in the output directory before the step started (inputs in
    /// `mnt-data`).
    allowance_bytes: u64,
    allowance_files: u64,
    limits: Limits,
    /// No walk before this instant.
    next_walk: Option<Instant>,
}

impl DiskWatch {
    /// Watches the `output` and `scratch` directories (the same directory is walked once),
    /// discounting what was in `output` at the start.
    pub fn new(
        output: PathBuf,
        scratch: PathBuf,
        allowance_files: u64,
        allowance_bytes: u64,
        limits: Limits,
    ) -> DiskWatch {
        DiskWatch {
            output,
            scratch,
            allowance_bytes,
            allowance_files,
            limits,
            next_walk: None,
        }
    }

    /// The limits watched.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The first limit passed so far, if any. Returns `None` without walking while the previous
    /// walk's pause lasts.
    pub fn check(&mut self) -> Option<(LimitKind, String)> {
        let start = Instant::now();
        if self.next_walk.is_some_and(|t| start < t) {
            return None;
        }
        let found = self.check_now();
        let took = start.elapsed();
        self.next_walk = (took > Duration::from_micros(500)).then(|| start + took * WALK_SHARE);
        found
    }

    /// Walks now, whatever the pause.
    pub fn check_now(&self) -> Option<(LimitKind, String)> {
        let out = walk(&self.output);
        let bytes = out.entries.iter().map(|(_, m)| m.len()).sum::<u64>();
        check(
            Area::Output,
            (out.entries.len() as u64).saturating_sub(self.allowance_files),
            bytes.saturating_sub(self.allowance_bytes),
            out.too_deep,
            &self.limits,
        )
        .or_else(|| {
            let tmp = walk(&self.scratch);
            check(
                Area::Scratch,
                tmp.entries.len() as u64,
                tmp.entries.iter().map(|(_, m)| m.len()).sum(),
                tmp.too_deep,
                &self.limits,
            )
        })
    }
}

fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Reads a regular file without following a symlink at its final component.
fn read_nofollow(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_nofollow(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// The sha256 of a file too large to load (an input past the byte budget), read in pieces.
fn hash_nofollow(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = open_nofollow(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Collects the outputs of `data_dir` and measures `scratch_dir` against the scratch limits. With
/// a `baseline` (the `mnt-data` layout), files whose content still matches it are not outputs.
pub fn collect(
    data_dir: &Path,
    scratch_dir: &Path,
    baseline: Option<&Baseline>,
    limits: &Limits,
) -> (Vec<OutputFile>, OutputScan) {
    let data = walk(data_dir);
    let scratch = walk(scratch_dir);
    let mut outputs = Vec::new();
    let scratch_bytes = scratch.entries.iter().map(|(_, m)| m.len()).sum::<u64>();
    let scratch_files = scratch.entries.len() as u64;
    let (mut files, mut bytes) = (0u64, 0u64);
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
            let loaded = content.len() as u64 == meta.len();
            let digest = sha256_hex(&content);
            if let Some(was) = baseline.and_then(|b| b.get(rel)) {
                // An input past the budget is hashed in pieces rather than taken for a change.
                let now = if loaded {
                    Some(digest.clone())
                } else {
                    hash_nofollow(&full).ok()
                };
                if now.as_ref() == Some(was) {
                    continue; // an input the step did not change
                }
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
    let output_exceeded = check(Area::Output, files, bytes, data.too_deep, limits);
    let keep_all = output_exceeded.is_none();
    let exceeded = output_exceeded.or_else(|| {
        check(
            Area::Scratch,
            scratch_files,
            scratch_bytes,
            scratch.too_deep,
            limits,
        )
    });
    if !keep_all {
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
            scratch_files,
            scratch_bytes,
            exceeded,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(files: u32, bytes: u64) -> Limits {
        scratch_limits(files, bytes, 1000, 1 << 20)
    }

    fn scratch_limits(files: u32, bytes: u64, scratch_files: u32, scratch_bytes: u64) -> Limits {
        Limits {
            memory_bytes: 1 << 20,
            fuel: None,
            wall_time: Duration::from_secs(1),
            stdout_bytes: 10,
            stderr_bytes: 10,
            output_files: files,
            output_bytes: bytes,
            scratch_files,
            scratch_bytes,
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
    fn outputs_count_only_changed_inputs_and_scratch_has_limits_of_its_own() {
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
        // One output of 4 bytes; the 8 scratch bytes count against the scratch limits only.
        let (outs, scan) = collect(&data, &tmp, Some(&baseline), &scratch_limits(1, 4, 1, 8));
        assert_eq!(
            outs.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(),
            ["changed.csv"]
        );
        assert_eq!((scan.files, scan.bytes), (1, 4));
        assert_eq!((scan.scratch_files, scan.scratch_bytes), (1, 8));
        assert!(scan.exceeded.is_none(), "{:?}", scan.exceeded);
        let (_, scan) = collect(&data, &tmp, Some(&baseline), &scratch_limits(1, 3, 1, 8));
        assert_eq!(scan.exceeded.unwrap().0, LimitKind::OutputBytes);
        assert_eq!(
            scan.files, 1,
            "an unchanged input too large for the byte budget is hashed, not taken for an output"
        );
        let (_, scan) = collect(&data, &tmp, Some(&baseline), &scratch_limits(1, 4, 1, 7));
        let (kind, msg) = scan.exceeded.unwrap();
        assert_eq!(kind, LimitKind::ScratchBytes);
        assert_eq!(msg, "the step wrote 8 bytes in /tmp; the limit is 7");
        std::fs::write(tmp.join("second"), b"").unwrap();
        let (outs, scan) = collect(&data, &tmp, Some(&baseline), &scratch_limits(1, 4, 1, 8));
        assert_eq!(scan.exceeded.unwrap().0, LimitKind::ScratchFiles);
        assert_eq!(outs.len(), 1, "outputs within their limits are all kept");
        std::fs::write(data.join("another.csv"), b"").unwrap();
        let (_, scan) = collect(
            &data,
            &tmp,
            Some(&baseline),
            &scratch_limits(1, 100, 10, 100),
        );
        assert_eq!(scan.exceeded.unwrap().0, LimitKind::OutputFiles);
    }

    #[test]
    fn disk_watch_discounts_the_starting_files() {
        let d = tempfile::tempdir().unwrap();
        let (data, tmp) = (d.path().join("data"), d.path().join("tmp"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(data.join("input"), vec![0; 100]).unwrap();
        let mut w = DiskWatch::new(
            data.clone(),
            tmp.clone(),
            1,
            100,
            scratch_limits(1, 10, 2, 5),
        );
        assert!(w.check().is_none());
        std::fs::write(tmp.join("a"), vec![0; 5]).unwrap();
        assert!(w.check().is_none());
        std::fs::write(tmp.join("b"), vec![0; 1]).unwrap();
        assert_eq!(w.check().unwrap().0, LimitKind::ScratchBytes);
        std::fs::remove_file(tmp.join("b")).unwrap();
        std::fs::write(data.join("out"), vec![0; 11]).unwrap();
        assert_eq!(w.check().unwrap().0, LimitKind::OutputBytes);
    }

    #[test]
    fn a_long_walk_pauses_the_watch_but_check_now_always_walks() {
        let d = tempfile::tempdir().unwrap();
        let (data, tmp) = (d.path().join("data"), d.path().join("tmp"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        let mut w = DiskWatch::new(data, tmp.clone(), 0, 0, scratch_limits(1, 10, 10, 1 << 20));
        assert!(w.check().is_none());
        // Pretend the last walk was long: the next check is skipped until the pause ends.
        w.next_walk = Some(Instant::now() + Duration::from_secs(3600));
        for i in 0..11 {
            std::fs::write(tmp.join(format!("f{i}")), b"x").unwrap();
        }
        assert!(w.check().is_none(), "paused");
        assert_eq!(w.check_now().unwrap().0, LimitKind::ScratchFiles);
        w.next_walk = Some(Instant::now());
        assert_eq!(w.check().unwrap().0, LimitKind::ScratchFiles);
    }
}
