//! Per-job directories under the work root: created before a run, removed when it ends.
//!
//! Each job gets `<work_root>/job-<random>/` (mode 0700) holding the directories its layout maps
//! into the guest. The directory is removed on drop, whatever the outcome; paths joined under it
//! were validated by [`crate::job::request::check_relative_path`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::job::digest::sha256_hex;
use crate::job::request::{Layout, ValidJob};
use crate::sandbox::outputs::Baseline;

/// A guest path and the host directory behind it.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Host directory.
    pub host: PathBuf,
    /// Path the guest sees.
    pub guest: &'static str,
    /// Whether the guest may write.
    pub writable: bool,
}

/// A job's directory tree; removed when dropped.
#[derive(Debug)]
pub struct JobDir {
    root: tempfile::TempDir,
    /// What the guest sees, in preopen order.
    pub mounts: Vec<Mount>,
    /// The host directory whose files are the step's outputs.
    pub data_dir: PathBuf,
    /// The host scratch directory (counts against the limits, never returned).
    pub scratch_dir: PathBuf,
    /// The guest's working directory.
    pub cwd: &'static str,
    /// Inputs as written (only for `mnt-data`, where changed inputs are outputs).
    pub baseline: Option<Baseline>,
    /// Files and bytes written before the step started that live in writable directories.
    pub preexisting: (u64, u64),
}

impl JobDir {
    /// Creates the tree for `job` under `work_root` and writes its inputs.
    pub fn create(work_root: &Path, job: &ValidJob) -> anyhow::Result<JobDir> {
        std::fs::create_dir_all(work_root)
            .with_context(|| format!("failed to create work root `{}`", work_root.display()))?;
        let root = tempfile::Builder::new()
            .prefix("job-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(work_root)
            .with_context(|| {
                format!(
                    "failed to create a job directory in `{}`",
                    work_root.display()
                )
            })?;
        let dir = |name: &str| -> anyhow::Result<PathBuf> {
            let p = root.path().join(name);
            std::fs::create_dir(&p)
                .with_context(|| format!("failed to create `{}`", p.display()))?;
            Ok(p)
        };
        let scratch = dir("tmp")?;
        let (mounts, data_dir, input_dir, cwd) = match job.job.layout {
            Layout::InputOutput => {
                let (input, output) = (dir("input")?, dir("output")?);
                let mounts = vec![
                    Mount {
                        host: input.clone(),
                        guest: "/input",
                        writable: false,
                    },
                    Mount {
                        host: output.clone(),
                        guest: "/output",
                        writable: true,
                    },
                    Mount {
                        host: scratch.clone(),
                        guest: "/tmp",
                        writable: true,
                    },
                ];
                (mounts, output, input, "/output")
            }
            Layout::MntData => {
                let data = dir("data")?;
                let mounts = vec![
                    Mount {
                        host: data.clone(),
                        guest: "/mnt/data",
                        writable: true,
                    },
                    Mount {
                        host: scratch.clone(),
                        guest: "/tmp",
                        writable: true,
                    },
                ];
                (mounts, data.clone(), data, "/mnt/data")
            }
        };
        let mut baseline = (job.job.layout == Layout::MntData).then(Baseline::new);
        let mut preexisting = (0, 0);
        for (file, rel) in job.job.inputs.iter().zip(&job.input_paths) {
            let path = input_dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("failed to create `{}`", parent.display()))?;
            }
            std::fs::write(&path, &file.content)
                .with_context(|| format!("failed to write input `{}`", file.path))?;
            if let Some(b) = &mut baseline {
                b.insert(rel.clone(), sha256_hex(&file.content));
                preexisting.0 += 1;
                preexisting.1 += file.content.len() as u64;
            }
        }
        Ok(JobDir {
            root,
            mounts,
            data_dir,
            scratch_dir: scratch,
            cwd,
            baseline,
            preexisting,
        })
    }

    /// The job directory itself.
    /// The preopens of a `python-data` run: the runtime's two read-only directories, then
    /// `/input`, `/output`, `/tmp` and `/mnt/data` in that fixed order (the snapshot's preopen
    /// table, [`crate::sandbox::data::GUEST_DIRS`]). A place this job's layout does not use is an
    /// empty read-only directory inside the job directory, so the step sees nothing there.
    pub fn python_data_mounts(&self, runtime_dirs: [PathBuf; 2]) -> anyhow::Result<Vec<Mount>> {
        let guests = crate::sandbox::data::GUEST_DIRS;
        let [lib, mpl] = runtime_dirs;
        let mut mounts = vec![
            Mount {
                host: lib,
                guest: guests[0],
                writable: false,
            },
            Mount {
                host: mpl,
                guest: guests[1],
                writable: false,
            },
        ];
        let empty = self.root.path().join("empty");
        for guest in &guests[2..] {
            match self.mounts.iter().find(|m| m.guest == *guest) {
                Some(m) => mounts.push(m.clone()),
                None => {
                    if !empty.exists() {
                        std::fs::create_dir(&empty)
                            .with_context(|| format!("failed to create `{}`", empty.display()))?;
                    }
                    mounts.push(Mount {
                        host: empty.clone(),
                        guest,
                        writable: false,
                    });
                }
            }
        }
        Ok(mounts)
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Removes the tree now, reporting failure (dropping also removes it, silently).
    pub fn remove(self) -> anyhow::Result<()> {
        let path = self.root.path().to_path_buf();
        self.root
            .close()
            .with_context(|| format!("failed to remove job directory `{}`", path.display()))
    }
}
