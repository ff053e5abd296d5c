//! Finished runs kept for the result page and downloads: per tenant, the newest `keep_runs`,
//! at most `keep_bytes` of outputs, none older than `keep_for`. A tenant's lookups search only
//! its own list, so another tenant's run is indistinguishable from one that never existed.
//!
//! Output files are written under names of our own (`<n>/<i>`), never the step's paths, in the
//! web door's private directory; a run whose outputs alone exceed `keep_bytes` is kept without
//! its files (the page says so). Previews (first CSV rows, pretty JSON) are made once, here.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::pb;

/// How often expired runs are dropped (they are also dropped when looked up).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Largest output previewed on the page.
pub const PREVIEW_MAX_BYTES: usize = 1 << 20;

/// Rows of a CSV preview.
pub const PREVIEW_ROWS: usize = 20;

/// How an output is shown on the page.
#[derive(Clone, Debug)]
pub enum Preview {
    /// Nothing to show (binary, too large, unknown kind).
    None,
    /// The first rows of a CSV (the header first) and whether there are more.
    Csv(Vec<Vec<String>>, bool),
    /// JSON, pretty-printed.
    Json(String),
    /// A raster image of this media type, shown inline.
    Image(&'static str),
}

/// One kept output.
#[derive(Debug)]
pub struct KeptFile {
    /// Its path in the step's data directory.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
    /// CRC-32, for the zip.
    pub crc32: u32,
    /// Set when the step left a symlink (never followed; nothing to download).
    pub symlink_target: String,
    /// Where its bytes are (None for symlinks and when the run's files were not kept).
    pub disk: Option<PathBuf>,
    /// How it is shown.
    pub preview: Preview,
}

/// One kept run.
#[derive(Debug)]
pub struct KeptRun {
    /// The run's id.
    pub run_id: String,
    /// What ran (`NAME@STAGE`, ...).
    pub step_ref: String,
    /// The result, without the outputs' bytes.
    pub response: pb::RunStepResponse,
    /// The outputs.
    pub files: Vec<KeptFile>,
    /// Whether the outputs were too large to keep.
    pub files_dropped: bool,
    /// For a workflow run: its record (steps, states, digests), outputs' bytes left out.
    pub workflow: Option<pb::WorkflowRun>,
    /// When it finished.
    pub finished: SystemTime,
    kept_at: Instant,
    bytes: u64,
    dir: PathBuf,
}

/// Every tenant's kept runs.
#[derive(Debug)]
pub struct Results {
    dir: PathBuf,
    keep_runs: usize,
    keep_bytes: u64,
    keep_for: Duration,
    next: AtomicU64,
    tenants: Mutex<HashMap<String, VecDeque<Arc<KeptRun>>>>,
}

fn preview_of(path: &str, content: &[u8]) -> Preview {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let image = match ext.as_str() {
        "png" => Some("image/png"),
        "jpg" | "jpeg" => Some("image/jpeg"),
        "gif" => Some("image/gif"),
        "webp" => Some("image/webp"),
        _ => None,
    };
    if let Some(mime) = image {
        return Preview::Image(mime);
    }
    if content.len() > PREVIEW_MAX_BYTES {
        return Preview::None;
    }
    match ext.as_str() {
        "csv" | "tsv" => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .from_reader(content);
            let mut rows = Vec::new();
            let mut more = false;
            for record in reader.records() {
                let Ok(record) = record else {
                    return Preview::None;
                };
                if rows.len() > PREVIEW_ROWS {
                    more = true;
                    break;
                }
                rows.push(record.iter().map(str::to_string).collect());
            }
            Preview::Csv(rows, more)
        }
        "json" => match serde_json::from_slice::<serde_json::Value>(content) {
            Ok(v) => Preview::Json(serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(_) => Preview::None,
        },
        _ => Preview::None,
    }
}

impl Results {
    /// Kept runs under `dir` (which must exist and be ours alone).
    pub fn new(dir: PathBuf, keep_runs: usize, keep_bytes: u64, keep_for: Duration) -> Results {
        Results {
            dir,
            keep_runs,
            keep_bytes,
            keep_for,
            next: AtomicU64::new(0),
            tenants: Mutex::default(),
        }
    }

    /// Keeps `response` (a finished run of `tenant`): writes its outputs to disk and drops the
    /// tenant's oldest runs past the bounds.
    pub async fn keep(
        &self,
        tenant: &str,
        step_ref: &str,
        response: pb::RunStepResponse,
    ) -> std::io::Result<Arc<KeptRun>> {
        self.keep_with(tenant, step_ref, response, None).await
    }

    /// [`Results::keep`] for a workflow run: `response` carries its outputs, `workflow` its
    /// record.
    pub async fn keep_with(
        &self,
        tenant: &str,
        step_ref: &str,
        mut response: pb::RunStepResponse,
        workflow: Option<pb::WorkflowRun>,
    ) -> std::io::Result<Arc<KeptRun>> {
        let outputs = std::mem::take(&mut response.outputs);
        let bytes: u64 = outputs.iter().map(|f| f.content.len() as u64).sum();
        let files_dropped = bytes > self.keep_bytes || self.keep_runs == 0;
        let dir = self
            .dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        let mut files = Vec::with_capacity(outputs.len());
        let mut writes = Vec::new();
        for (i, f) in outputs.into_iter().enumerate() {
            let symlink = !f.symlink_target.is_empty();
            let disk = (!symlink && !files_dropped).then(|| dir.join(i.to_string()));
            files.push(KeptFile {
                size: f.content.len() as u64,
                crc32: crc32fast::hash(&f.content),
                preview: if symlink {
                    Preview::None
                } else {
                    preview_of(&f.path, &f.content)
                },
                sha256: f.sha256,
                symlink_target: f.symlink_target,
                disk: disk.clone(),
                path: f.path,
            });
            if let Some(d) = disk {
                writes.push((d, f.content));
            }
        }
        let write_dir = dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir(&write_dir)?;
            for (path, content) in writes {
                std::fs::write(path, content)?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        let run = Arc::new(KeptRun {
            run_id: response.run_id.clone(),
            step_ref: step_ref.to_string(),
            response,
            files,
            files_dropped,
            workflow,
            finished: SystemTime::now(),
            kept_at: Instant::now(),
            bytes: if files_dropped { 0 } else { bytes },
            dir,
        });
        let mut evicted = Vec::new();
        {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            let runs = tenants.entry(tenant.to_string()).or_default();
            runs.push_back(run.clone());
            let mut total: u64 = runs.iter().map(|r| r.bytes).sum();
            while runs.len() > self.keep_runs.max(1) || total > self.keep_bytes {
                let Some(old) = runs.pop_front() else { break };
                total -= old.bytes;
                evicted.push(old);
            }
        }
        for old in evicted {
            let _ = std::fs::remove_dir_all(&old.dir);
        }
        Ok(run)
    }

    /// `tenant`'s kept run `run_id`, if it is still kept.
    pub fn get(&self, tenant: &str, run_id: &str) -> Option<Arc<KeptRun>> {
        self.prune_expired();
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(tenant)?
            .iter()
            .find(|r| r.run_id == run_id)
            .cloned()
    }

    /// Drops runs older than `keep_for`, with their files.
    pub fn prune_expired(&self) {
        let mut evicted = Vec::new();
        {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            for runs in tenants.values_mut() {
                while runs
                    .front()
                    .is_some_and(|r| r.kept_at.elapsed() >= self.keep_for)
                {
                    evicted.extend(runs.pop_front());
                }
            }
            tenants.retain(|_, runs| !runs.is_empty());
        }
        for old in evicted {
            let _ = std::fs::remove_dir_all(&old.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: &str, files: &[(&str, &[u8])]) -> pb::RunStepResponse {
        pb::RunStepResponse {
            run_id: id.into(),
            outputs: files
                .iter()
                .map(|(p, c)| pb::File {
                    path: p.to_string(),
                    content: c.to_vec(),
                    sha256: crate::job::digest::sha256_hex(c),
                    symlink_target: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn count_dirs(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn runs_are_kept_per_tenant_within_count_and_bytes() {
        let d = tempfile::tempdir().unwrap();
        let r = Results::new(d.path().into(), 2, 100, Duration::from_secs(60));
        let a1 = r
            .keep(
                "acme",
                "s@prod",
                response("a1", &[("out.csv", b"a,b\n1,2\n")]),
            )
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(a1.files[0].disk.as_ref().unwrap()).unwrap(),
            b"a,b\n1,2\n"
        );
        assert!(matches!(&a1.files[0].preview, Preview::Csv(rows, false) if rows.len() == 2));
        assert!(a1.response.outputs.is_empty(), "bytes live on disk only");
        r.keep("globex", "s@prod", response("g1", &[]))
            .await
            .unwrap();
        assert!(r.get("acme", "a1").is_some());
        assert!(
            r.get("globex", "a1").is_none(),
            "another tenant's run is not there"
        );
        // Count: a third run of acme pushes out its first (and its files).
        r.keep("acme", "s", response("a2", &[])).await.unwrap();
        r.keep("acme", "s", response("a3", &[])).await.unwrap();
        assert!(r.get("acme", "a1").is_none());
        assert!(r.get("acme", "a3").is_some() && r.get("globex", "g1").is_some());
        assert_eq!(count_dirs(d.path()), 3);
        // Bytes: 60 + 60 > 100 drops the older; a run over the bound alone keeps no files.
        r.keep("acme", "s", response("a4", &[("x.bin", &[0u8; 60])]))
            .await
            .unwrap();
        r.keep("acme", "s", response("a5", &[("y.bin", &[0u8; 60])]))
            .await
            .unwrap();
        assert!(r.get("acme", "a4").is_none() && r.get("acme", "a5").is_some());
        let big = r
            .keep("acme", "s", response("a6", &[("z.bin", &[0u8; 101])]))
            .await
            .unwrap();
        assert!(big.files_dropped && big.files[0].disk.is_none());
        assert_eq!(big.files[0].size, 101);
    }

    #[tokio::test]
    async fn runs_expire() {
        let d = tempfile::tempdir().unwrap();
        let r = Results::new(d.path().into(), 5, 1000, Duration::from_millis(100));
        r.keep("t", "s", response("r1", &[("a.json", b"{\"k\":[1,2]}")]))
            .await
            .unwrap();
        let kept = r.get("t", "r1").unwrap();
        assert!(matches!(&kept.files[0].preview, Preview::Json(s) if s.contains("\"k\": [")));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(r.get("t", "r1").is_none());
        assert_eq!(count_dirs(d.path()), 0, "expired files are deleted");
    }
}
