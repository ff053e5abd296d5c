//! Files passed between workflow steps, kept content-addressed on disk (`sha256/ab/abcd...`)
//! under the data directory, never in the database: a resumed run finds them by digest, and a
//! file two steps produce identically is stored once. Written atomically with mode 0600 in a
//! private directory; read back only after checking the digest.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
        Ok(bytes.into())
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
}
