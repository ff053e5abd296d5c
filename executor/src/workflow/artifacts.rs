//! Files passed between workflow steps, kept content-addressed on disk (`sha256/ab/abcd...`)
//! under the data directory, never in the database: a resumed run finds them by digest, and a
//! file two steps produce identically is stored once. Written atomically with mode 0600 in a
//! private directory; read back only after checking the digest.
//!
//! Retention is by last use: storing or reading a file refreshes its modification time, and
//! [`Artifacts::prune`] deletes files not used within the retention period (and partial writes
//! left by a crash). A resume whose earlier outputs were pruned re-runs those steps.
//!
//! Several replicas share artifacts by pointing `[workflows] artifacts` at one shared
//! filesystem (a ReadWriteMany volume, NFS, EFS): writes are atomic renames of content-named
//! files, so concurrent writers of the same digest agree, and pruning tolerates races.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::job::digest::sha256_hex;

/// A content-addressed file store.
#[derive(Debug)]
pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// Artifacts under `dir` (created, mode 0700).
    pub fn open(dir: &Path) -> Result<Artifacts, String> {
        fs::create_dir_all(dir)
            .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("artifact directory `{}`: {e}", dir.display()))?;
        Ok(Artifacts {
            dir: dir.to_path_buf(),
        })
    }

    /// The default directory: `$XDG_DATA_HOME/stepbox/artifacts` (`~/.local/share/...`).
    pub fn default_dir() -> Option<PathBuf> {
        stepbox_store::Store::default_sqlite_path()
            .and_then(|p| p.parent().map(|d| d.join("artifacts")))
    }

    fn path(&self, digest: &str) -> Result<PathBuf, String> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{digest}` is not a sha256 digest"));
        }
        Ok(self.dir.join("sha256").join(&digest[..2]).join(digest))
    }

    /// Stores `bytes`; returns their sha256.
    pub fn put(&self, bytes: &[u8]) -> Result<String, String> {
        let digest = sha256_hex(bytes);
        let path = self.path(&digest)?;
        if path.is_file() {
            touch(&path);
            return Ok(digest);
        }
        let parent = path.parent().expect("artifact paths have a parent");
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(parent)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".partial-")
                .tempfile_in(parent)?;
            tmp.as_file()
                .set_permissions(fs::Permissions::from_mode(0o600))?;
            tmp.write_all(bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|e| format!("cannot store artifact {digest}: {e}"))?;
        Ok(digest)
    }

    /// The bytes stored under `digest` (checked against it).
    pub fn get(&self, digest: &str) -> Result<bytes::Bytes, String> {
        let path = self.path(digest)?;
        let bytes = fs::read(&path).map_err(|e| format!("artifact {digest}: {e}"))?;
        if sha256_hex(&bytes) != digest {
            return Err(format!(
                "artifact {digest} is corrupt (its content has another digest)"
            ));
        }
        touch(&path);
        Ok(bytes.into())
    }

    /// Deletes artifacts not stored or read within `retention`, and partial writes older than
    /// an hour. Only regular files named like artifacts are touched; symlinks and anything
    /// else found in the tree are left alone and counted as `foreign`.
    pub fn prune(&self, retention: Duration) -> Result<Pruned, String> {
        let now = SystemTime::now();
        let old = |m: &fs::Metadata, age: Duration| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|a| a > age)
        };
        let mut pruned = Pruned::default();
        let root = self.dir.join("sha256");
        let shards = match fs::read_dir(&root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pruned),
            Err(e) => return Err(format!("artifact directory `{}`: {e}", root.display())),
        };
        for shard in shards.flatten() {
            let Ok(kind) = shard.file_type() else {
                continue;
            };
            let name = shard.file_name();
            let name = name.to_string_lossy();
            if !kind.is_dir() || name.len() != 2 {
                pruned.foreign += 1;
                continue;
            }
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Ok(meta) = f.path().symlink_metadata() else {
                    continue;
                };
                let fname = f.file_name();
                let fname = fname.to_string_lossy();
                let is_artifact = self.path(&fname).is_ok() && fname.starts_with(&*name);
                let partial = fname.starts_with(".partial-");
                if !meta.file_type().is_file() || !(is_artifact || partial) {
                    pruned.foreign += 1;
                    continue;
                }
                let limit = if partial {
                    PARTIAL_AGE.min(retention)
                } else {
                    retention
                };
                if old(&meta, limit) && fs::remove_file(f.path()).is_ok() {
                    pruned.files += 1;
                    pruned.bytes += meta.len();
                }
            }
        }
        Ok(pruned)
    }
}

/// A partial write this old belongs to a crashed writer.
const PARTIAL_AGE: Duration = Duration::from_secs(3600);

/// What [`Artifacts::prune`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Files deleted.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Entries that are not artifacts (left alone).
    pub foreign: u64,
}

/// Marks `path` as used now (best effort: retention is approximate by design).
fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_round_trip_and_refuse_tampering() {
        let d = tempfile::tempdir().unwrap();
        let a = Artifacts::open(d.path()).unwrap();
        let digest = a.put(b"hello").unwrap();
        assert_eq!(digest, sha256_hex(b"hello"));
        assert_eq!(&a.get(&digest).unwrap()[..], b"hello");
        assert_eq!(a.put(b"hello").unwrap(), digest);
        fs::write(a.path(&digest).unwrap(), b"jello").unwrap();
        assert!(a.get(&digest).unwrap_err().contains("corrupt"));
        assert!(a.get("../../etc/passwd").is_err());
    }

    fn age(path: &Path, by: Duration) {
        let f = fs::File::options().append(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn prune_removes_only_unused_artifacts_and_old_partials() {
        let d = tempfile::tempdir().unwrap();
        let a = Artifacts::open(d.path()).unwrap();
        let day = Duration::from_secs(86_400);
        let stale = a.put(b"stale").unwrap();
        let fresh = a.put(b"fresh").unwrap();
        let reused = a.put(b"reused").unwrap();
        for digest in [&stale, &fresh, &reused] {
            age(&a.path(digest).unwrap(), 2 * day);
        }
        // Storing again or reading counts as a use.
        a.put(b"fresh").unwrap();
        a.get(&reused).unwrap();
        let shard = a.path(&stale).unwrap().parent().unwrap().to_path_buf();
        let partial = shard.join(".partial-crashed");
        fs::write(&partial, b"half").unwrap();
        age(&partial, Duration::from_secs(7200));
        let young_partial = shard.join(".partial-writing");
        fs::write(&young_partial, b"half").unwrap();
        // Something that is not ours, and a symlink to a victim: never deleted or followed.
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        age(&victim, 2 * day);
        let mut fake = stale.clone();
        fake.replace_range(63.., if stale.ends_with('0') { "1" } else { "0" });
        let link = shard.join(&fake);
        std::os::unix::fs::symlink(&victim, &link).unwrap();

        let pruned = a.prune(day).unwrap();
        assert_eq!(pruned.files, 2, "{pruned:?}");
        assert_eq!(pruned.bytes, 5 + 4);
        assert!(a.get(&stale).is_err(), "unused for two days: pruned");
        assert_eq!(&a.get(&fresh).unwrap()[..], b"fresh");
        assert_eq!(&a.get(&reused).unwrap()[..], b"reused");
        assert!(!partial.exists() && young_partial.exists());
        assert!(victim.exists() && link.symlink_metadata().is_ok());
        assert_eq!(pruned.foreign, 1);
        // Nothing old is left: a second prune removes nothing.
        assert_eq!(a.prune(day).unwrap().files, 0);
    }
}
