//! The sandbox workers' Landlock ruleset: a second wall around wasmtime, for files.
//!
//! A guest reaches files only through wasmtime and the directories its run preopens (inside its
//! job directory), so these rules never see a guest's own requests. They are for the day a guest
//! escapes wasmtime (a miscompilation, a bug in a host call): the worker process it would then own
//! may still only read and write beneath the work root (the job directories) and the artifact
//! cache, and read the Python component and the `python-data` runtime's directory (its snapshot,
//! and the library directories its runs mount read-only). Every other path on the host (`/etc`, `/root`, the
//! server's configuration and keys, other users' files, `/proc/<another pid>`) is refused by the
//! kernel with `EACCES`, whatever the worker's user may do. Files opened before the ruleset (the
//! protocol pipes, `/dev/null`) stay open; metadata (`stat`, `readlink`) is not Landlock's.
//!
//! Every file system right of [`LANDLOCK_ABI`] is handled, so whatever is not granted below is
//! denied. Beneath the read-write directories a worker may read, write, truncate, make and remove
//! files, directories and symlinks, and rename or link them across directories; never execute
//! (seccomp refuses `execve` too), make devices, sockets or fifos, or send device ioctls. A
//! read-only file may only be read.
//!
//! Landlock confines the thread that calls [`confine_worker`] and the threads it starts from then
//! on, not threads already running (Landlock ABI 8 can confine all of them, which the kernels here
//! lack): so the worker confines itself first thing, while it is its only thread ([`threads`]),
//! before its async runtime, the engines' ticker, its helpers and, later, tokio's blocking pool and
//! wasmtime's compiler threads exist, and grants what it loads after that (the Python component,
//! `python-data`).
//!
//! Compatibility is best effort: a kernel with an older Landlock enforces the rights it knows
//! ("partially enforced"; before ABI 2, renames and links across directories are refused), one
//! without Landlock none ("not enforced"); the worker runs either way and says which in its
//! READY frame. It cannot be undone, and a worker that fails to apply it for any other reason
//! never becomes ready.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus,
};
use serde::{Deserialize, Serialize};

/// The Landlock ABI whose file system rights are handled: 7, the newest every machine this project
/// runs on (developers' and CI's) has, so the tests see it fully enforced. ABI 8 and 10 add no
/// file system right; ABI 9's `ResolveUnix` (connecting to named Unix sockets) is left out while
/// those kernels lack it: seccomp refuses every socket anyway.
pub const LANDLOCK_ABI: ABI = ABI::V7;

/// What a worker may do beneath a read-write directory.
fn read_write() -> BitFlags<AccessFs> {
    AccessFs::ReadFile
        | AccessFs::ReadDir
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::MakeSym
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::Refer
}

/// How far the kernel enforces the ruleset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LandlockStatus {
    /// Every handled right is enforced.
    #[serde(rename = "fully enforced")]
    FullyEnforced,
    /// The kernel's Landlock is older than [`LANDLOCK_ABI`]: the rights it knows are enforced.
    #[serde(rename = "partially enforced")]
    PartiallyEnforced,
    /// No Landlock in this kernel (not built in, or not enabled at boot).
    #[serde(rename = "not enforced (kernel without landlock)")]
    NotEnforced,
}

impl LandlockStatus {
    /// The status as the READY frame and the logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            LandlockStatus::FullyEnforced => "fully enforced",
            LandlockStatus::PartiallyEnforced => "partially enforced",
            LandlockStatus::NotEnforced => "not enforced (kernel without landlock)",
        }
    }
}

impl fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule granting `access` beneath `path`, which must exist (a missing path would be a silent
/// gap in what the worker needs, found only when a job fails).
fn beneath(path: &Path, access: BitFlags<AccessFs>) -> anyhow::Result<PathBeneath<PathFd>> {
    let fd = PathFd::new(path)
        .with_context(|| format!("cannot open `{}` for a landlock rule", path.display()))?;
    Ok(PathBeneath::new(fd, access))
}

/// Confines the calling thread, and every thread it starts from now on, to reading and writing
/// beneath the directories `rw` and reading `ro` (files, or directories to list and read
/// beneath), for good (see the module's doc). Every path must exist. Also sets `no_new_privs`,
/// which Landlock needs without `CAP_SYS_ADMIN`.
pub fn confine_worker(rw: &[&Path], ro: &[&Path]) -> anyhow::Result<LandlockStatus> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .create()?;
    for dir in rw {
        anyhow::ensure!(
            dir.is_dir(),
            "`{}` is not a directory to read and write beneath",
            dir.display()
        );
        ruleset = ruleset.add_rule(beneath(dir, read_write())?)?;
    }
    for path in ro {
        // Directory rights on a file are an error to the kernel (the crate would narrow them and
        // call the result "partially enforced").
        let read = if path.is_dir() {
            AccessFs::ReadFile | AccessFs::ReadDir
        } else {
            AccessFs::ReadFile.into()
        };
        ruleset = ruleset.add_rule(beneath(path, read)?)?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced,
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced,
    })
}

/// How many threads this process has now (`/proc/self/task`): a worker confines itself only
/// while it has one, so that no thread escapes the ruleset.
pub fn threads() -> anyhow::Result<usize> {
    let tasks =
        std::fs::read_dir("/proc/self/task").context("cannot list this process's threads")?;
    Ok(tasks.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    fn denied<T: fmt::Debug>(what: &str, r: std::io::Result<T>) {
        match r {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
            other => panic!("{what}: expected EACCES, got {other:?}"),
        }
    }

    /// Runs `f` on a new thread confined to `rw` and `ro`, leaving the rest of the test process
    /// (its other threads) as it was.
    fn confined<T: Send + 'static>(
        rw: Vec<std::path::PathBuf>,
        ro: Vec<std::path::PathBuf>,
        f: impl FnOnce(LandlockStatus) -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            let rw: Vec<&Path> = rw.iter().map(|p| p.as_path()).collect();
            let ro: Vec<&Path> = ro.iter().map(|p| p.as_path()).collect();
            let status = confine_worker(&rw, &ro).unwrap();
            f(status)
        })
        .join()
        .unwrap()
    }

    /// What a confined thread may and may not do; `tag` names the thread in failures.
    fn check_confined(tag: &str, rw: &Path, ro: &Path, other: &Path) {
        // Read and write, make and remove beneath the read-write directory.
        let file = rw.join(format!("{tag}.txt"));
        std::fs::write(&file, tag).unwrap_or_else(|e| panic!("{tag}: write: {e}"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), tag);
        let sub = rw.join(format!("{tag}-dir"));
        std::fs::create_dir(&sub).unwrap_or_else(|e| panic!("{tag}: mkdir: {e}"));
        std::fs::write(sub.join("f"), "x").unwrap();
        std::fs::rename(&file, sub.join("moved")).unwrap_or_else(|e| panic!("{tag}: rename: {e}"));
        std::fs::remove_dir_all(&sub).unwrap_or_else(|e| panic!("{tag}: remove: {e}"));
        assert!(!sub.exists());
        // Read the read-only file, never write it.
        assert_eq!(std::fs::read_to_string(ro).unwrap(), "component");
        denied(
            &format!("{tag}: write the read-only file"),
            std::fs::OpenOptions::new().append(true).open(ro),
        );
        // Nothing else: not the host's files, not `/`, not another directory made before.
        for host in ["/etc/passwd", "/etc/hostname"] {
            denied(&format!("{tag}: read {host}"), std::fs::read(host));
        }
        denied(&format!("{tag}: list /"), std::fs::read_dir("/"));
        denied(
            &format!("{tag}: write elsewhere"),
            std::fs::write(other.join("f"), "x"),
        );
        denied(
            &format!("{tag}: another process"),
            std::fs::read("/proc/1/environ"),
        );
    }

    #[test]
    fn a_confined_thread_reaches_only_its_directories_and_the_file_it_reads() {
        let rw = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let ro_dir = tempfile::tempdir().unwrap();
        let ro = ro_dir.path().join("python-runtime.wasm");
        std::fs::write(&ro, "component").unwrap();
        // Unconfined, this thread reaches them all.
        assert!(std::fs::read("/etc/passwd").is_ok());
        assert!(std::fs::read_dir("/").is_ok());

        let (rw_path, ro_path, other_path) = (
            rw.path().to_path_buf(),
            ro.clone(),
            other.path().to_path_buf(),
        );
        let status = confined(
            vec![rw_path.clone()],
            vec![ro_path.clone()],
            move |status| {
                check_confined("confined", &rw_path, &ro_path, &other_path);
                // A thread it starts is confined too, and one that thread starts.
                std::thread::spawn(move || {
                    check_confined("child", &rw_path, &ro_path, &other_path);
                    std::thread::spawn(move || {
                        check_confined("grandchild", &rw_path, &ro_path, &other_path)
                    })
                    .join()
                    .unwrap();
                })
                .join()
                .unwrap();
                status
            },
        );
        // This kernel has Landlock ABI 7, and so has CI's: anything less is a failure here, never
        // a silent pass.
        assert_eq!(status, LandlockStatus::FullyEnforced);

        // The rest of the test process was never confined.
        assert!(std::fs::read("/etc/passwd").is_ok());
        std::fs::write(other.path().join("f"), "x").unwrap();
        std::fs::write(&ro, "still writable here").unwrap();
    }

    #[test]
    fn threads_the_worker_starts_later_are_confined_tokio_blocking_pool_too() {
        let rw = tempfile::tempdir().unwrap();
        let path = rw.path().to_path_buf();
        let (main, blocking, std_thread, rw_ok) = confined(vec![path.clone()], vec![], move |_| {
            // As in a worker: the async runtime comes after the ruleset, and its blocking pool
            // (where the worker reads the Python component and writes the cache) later still.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let probe = || std::fs::read("/etc/passwd").map(|_| ());
            let main = probe();
            let blocking = rt.block_on(rt.spawn_blocking(probe)).unwrap();
            let std_thread = std::thread::spawn(probe).join().unwrap();
            let rw_ok = rt
                .block_on(rt.spawn_blocking(move || std::fs::write(path.join("cached.cwasm"), "x")))
                .unwrap();
            (main, blocking, std_thread, rw_ok)
        });
        denied("main", main);
        denied("blocking pool", blocking);
        denied("std thread", std_thread);
        rw_ok.unwrap();
    }

    #[test]
    fn a_thread_started_before_the_ruleset_is_not_confined() {
        // Why a worker confines itself while it has one thread: Landlock (before ABI 8) confines
        // the calling thread and its later children, never a sibling already running.
        let rw = tempfile::tempdir().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let sibling = std::thread::spawn(move || {
            wait.recv().unwrap();
            std::fs::read("/etc/passwd").map(|_| ())
        });
        let inside = confined(vec![rw.path().to_path_buf()], vec![], move |_| {
            let inside = std::fs::read("/etc/passwd").map(|_| ());
            go.send(()).unwrap();
            inside
        });
        denied("the confined thread", inside);
        sibling
            .join()
            .unwrap()
            .expect("the sibling is not confined");
    }

    #[test]
    fn a_missing_path_is_an_error_not_a_silent_gap() {
        let rw = tempfile::tempdir().unwrap();
        let missing = rw.path().join("missing");
        let err =
            std::thread::spawn(move || confine_worker(&[&missing], &[]).unwrap_err().to_string())
                .join()
                .unwrap();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn the_status_reads_the_same_in_json_and_in_logs() {
        for s in [
            LandlockStatus::FullyEnforced,
            LandlockStatus::PartiallyEnforced,
            LandlockStatus::NotEnforced,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<LandlockStatus>(&json).unwrap(), s);
        }
    }

    #[test]
    fn threads_are_counted() {
        // This test's thread (the harness's main one, or one of its own) and one more.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || wait.recv().unwrap());
        assert!(threads().unwrap() >= 2);
        go.send(()).unwrap();
        t.join().unwrap();
    }
}
