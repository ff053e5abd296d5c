//! The sandbox workers' seccomp filter: a second wall around wasmtime.
//!
//! A guest reaches the kernel only through wasmtime and the WASI calls the run grants it, so
//! these rules never see a guest's own requests. They are for the day a guest escapes wasmtime (a
//! miscompilation, a bug in a host call): the worker process it would then own still cannot open
//! a socket, run a program, start a process, trace or read another process, or reach the parts
//! of the kernel a sandbox never needs. [`install_worker_filter`] installs it on every thread of
//! the worker (`SECCOMP_FILTER_FLAG_TSYNC`) once the worker has loaded its runtimes and started
//! its helper threads; the threads started later (tokio's blocking pool, wasmtime's compiler
//! threads) inherit it, and it cannot be removed.
//!
//! It is a deny-list, with every other system call allowed: wasmtime, tokio and glibc between
//! them use too many calls (mmap, mprotect, madvise, signals to themselves, futexes, new threads)
//! for an allow-list to stay right across their releases. Denied, each with `EPERM`:
//!
//! - the network: `socket`, `socketpair`, `connect`, `bind`, `listen`, `accept`, `accept4`,
//!   `sendto`, `sendmsg`, `sendmmsg`, `recvfrom`, `recvmsg`, `recvmmsg` (the worker talks to its
//!   parent over the pipes it was started with, opened before the filter);
//! - new programs and processes: `execve`, `execveat`, `fork`, `vfork` (x86_64 has them), and
//!   `clone` without `CLONE_THREAD`: new threads still start, new processes do not. `clone3`
//!   fails with `ENOSYS` instead, as on a kernel without it, so glibc falls back to `clone`, whose
//!   flags a filter can read (`clone3`'s sit behind a pointer);
//! - other processes: `ptrace`, `process_vm_readv`, `process_vm_writev`, `process_madvise`,
//!   `pidfd_getfd` (signals stay allowed: wasmtime and std signal their own threads);
//! - the file system's shape: `mount`, `umount2`, `pivot_root`, `chroot`, and the new mount API
//!   (`open_tree`, `move_mount`, `fsopen`, `fsconfig`, `fsmount`, `fspick`, `mount_setattr`);
//!   `open_by_handle_at` and `name_to_handle_at`, which open files by handle around the paths;
//! - namespaces: `setns`, `unshare`;
//! - the kernel: `bpf`, `perf_event_open`, `userfaultfd`, the keyring (`keyctl`, `add_key`,
//!   `request_key`), modules (`init_module`, `finit_module`, `delete_module`), `kexec_load`,
//!   `kexec_file_load`, `reboot`, `swapon`, `swapoff`, and io_uring (`io_uring_setup`,
//!   `io_uring_enter`, `io_uring_register`: it would make all of the above without a system
//!   call a filter sees).
//!
//! On x86_64 every x32 system call (numbers with `__X32_SYSCALL_BIT`) fails with `EPERM` too:
//! they share the x86_64 architecture value, so a deny-list by number would not see `socket`
//! called by its x32 number. A call made as another architecture (32-bit `int 0x80`) kills the
//! process: seccompiler checks the architecture first.
//!
//! The kernel runs every installed filter and takes the strictest answer; no call is denied by
//! more than one of the filters here, so each denied call gets its own filter's errno.

use std::collections::BTreeMap;

use anyhow::Context;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// System calls that fail whatever their arguments.
const DENIED: &[libc::c_long] = &[
    // The network.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    // New programs and processes (`clone` has a rule of its own; aarch64 has no fork or vfork).
    libc::SYS_execve,
    libc::SYS_execveat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
    // Other processes.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_pidfd_getfd,
    // The file system's shape.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Namespaces.
    libc::SYS_setns,
    libc::SYS_unshare,
    // The kernel.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The filters, in the order they are installed: the deny-list (each call in [`DENIED`], and
/// `clone` without `CLONE_THREAD`, fails with `errno`), `clone3` failing with `ENOSYS`, and on
/// x86_64 the x32 calls failing with `errno`. The worker's `errno` is `EPERM`; the tests also
/// build them with an errno no unfiltered call returns, to tell the filter's answer from the
/// kernel's.
fn programs(errno: i32) -> anyhow::Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .with_context(|| format!("no seccomp filter for {}", std::env::consts::ARCH))?;
    let errno = u32::try_from(errno).context("a negative errno")?;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // A new process is a `clone` without `CLONE_THREAD` (glibc's fork and posix_spawn are both
    // `clone`s); a thread has it. The flags are the first argument on x86_64 and aarch64 alike.
    let without_thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )?;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![without_thread])?],
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch,
    )?;

    // `clone3` in a filter of its own: seccompiler gives one filter one match action.
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;

    let mut programs = vec![deny.try_into()?, clone3.try_into()?];
    if arch == TargetArch::x86_64 {
        programs.push(x32_program(errno));
    }
    Ok(programs)
}

/// Fails every x32 system call on x86_64 with `errno`. seccompiler matches numbers only, so this
/// one is written out: `__X32_SYSCALL_BIT` and above is x32.
fn x32_program(errno: u32) -> BpfProgram {
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_DATA_NR: u32 = 0;
    const SECCOMP_DATA_ARCH: u32 = 4;
    let op = |code: u32| u16::try_from(code).unwrap_or(u16::MAX);
    let stmt = |code: u32, k: u32| sock_filter {
        code: op(code),
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: op(code),
        jt,
        jf,
        k,
    };
    vec![
        stmt(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            SECCOMP_DATA_ARCH,
        ),
        // Another architecture: the deny-list's filter kills the process.
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            0,
            3,
        ),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, SECCOMP_DATA_NR),
        jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            X32_SYSCALL_BIT,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | (errno & libc::SECCOMP_RET_DATA),
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the filter on every thread of this process, for good (see the module's doc). Also
/// sets `no_new_privs`, which a filter needs without `CAP_SYS_ADMIN`.
pub fn install_worker_filter() -> anyhow::Result<()> {
    for program in programs(libc::EPERM)? {
        seccompiler::apply_filter_all_threads(&program)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    /// Installs the filters built with `errno` on the calling thread only (and so on the threads
    /// it starts), leaving the rest of the test process alone.
    fn install_on_this_thread(errno: i32) {
        for program in programs(errno).unwrap() {
            seccompiler::apply_filter(&program).unwrap();
        }
    }

    /// Runs `f` on a new thread under the filters built with `errno`.
    fn filtered<T: Send + 'static>(errno: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            install_on_this_thread(errno);
            f()
        })
        .join()
        .unwrap()
    }

    /// The result of a raw system call and its errno.
    fn raw(nr: libc::c_long, args: [libc::c_long; 6]) -> (libc::c_long, i32) {
        let [a, b, c, d, e, f] = args;
        // SAFETY: only called with numbers and arguments a failed call cannot harm us with
        // (`fork`'s child leaves at once, below).
        let r = unsafe { libc::syscall(nr, a, b, c, d, e, f) };
        (r, errno())
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Leaves at once if this is the child of a `fork` the filter failed to stop.
    fn exit_if_child(r: libc::c_long) {
        if r == 0 {
            // SAFETY: `_exit` in a forked child of a multi-threaded process is allowed.
            unsafe { libc::_exit(0) };
        }
    }

    fn is_vfork(nr: libc::c_long) -> bool {
        #[cfg(target_arch = "x86_64")]
        return nr == libc::SYS_vfork;
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// An errno no call below returns by itself, so a call failing with it was stopped by the
    /// filter and not by the kernel's own checks (which might say `EPERM` to a user without
    /// privileges).
    const MARK: i32 = libc::EHWPOISON;

    #[test]
    fn every_denied_call_is_stopped_by_the_filter() {
        let stopped = filtered(MARK, || {
            DENIED
                .iter()
                // A `vfork` child let through would share this stack: never risk it.
                .filter(|&&nr| !is_vfork(nr))
                .map(|&nr| {
                    // Invalid everything: had the filter let one through, it fails (EBADF,
                    // EFAULT, EINVAL, ESRCH...), except fork, whose child leaves at once.
                    let (r, e) = raw(nr, [-1; 6]);
                    exit_if_child(r);
                    (nr, r, e)
                })
                .collect::<Vec<_>>()
        });
        let through: Vec<_> = stopped
            .iter()
            .filter(|(_, r, e)| !(*r == -1 && *e == MARK))
            .collect();
        assert!(
            through.is_empty(),
            "not stopped (number, result, errno): {through:?}"
        );
        assert_eq!(
            stopped.len(),
            DENIED.iter().filter(|&&nr| !is_vfork(nr)).count()
        );
        assert!(stopped.len() >= 50);
    }

    #[test]
    fn sockets_fail_with_eperm() {
        let (inet, unix) = filtered(libc::EPERM, || {
            // SAFETY: plain calls; a socket that opened anyway is closed at the test's end.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let inet = (inet, errno());
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            (inet, (unix, errno()))
        });
        assert_eq!(inet, (-1, libc::EPERM));
        assert_eq!(unix, (-1, libc::EPERM));
        // The same calls unfiltered succeed: the filter made the difference.
        // SAFETY: as above; both closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0, "errno {}", errno());
        unsafe { libc::close(fd) };
    }

    #[test]
    fn no_new_process_or_program() {
        let (fork, raw_clone, command, exec) = filtered(libc::EPERM, || {
            // glibc's fork is a `clone` without CLONE_THREAD.
            // SAFETY: a child, if the filter failed, leaves at once.
            let fork = unsafe { libc::fork() };
            let fork = (fork, errno());
            exit_if_child(fork.0.into());
            let raw_clone = raw(libc::SYS_clone, [libc::SIGCHLD.into(), 0, 0, 0, 0, 0]);
            exit_if_child(raw_clone.0);
            let command = std::process::Command::new("/bin/true").status();
            // A path that does not exist: unfiltered, ENOENT.
            let exec = raw(
                libc::SYS_execve,
                [
                    c"/nonexistent/stepbox".as_ptr() as libc::c_long,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
            );
            (fork, raw_clone, command, exec)
        });
        assert_eq!(fork, (-1, libc::EPERM));
        assert_eq!(raw_clone, (-1, libc::EPERM));
        assert!(command.is_err(), "/bin/true ran: {command:?}");
        assert_eq!(exec, (-1, libc::EPERM));
        // Unfiltered, the same command runs.
        assert!(
            std::process::Command::new("/bin/true")
                .status()
                .unwrap()
                .success()
        );
    }

    #[test]
    fn clone3_fails_with_enosys_so_glibc_falls_back_to_clone() {
        let filtered_clone3 = filtered(libc::EPERM, || raw(libc::SYS_clone3, [0; 6]));
        assert_eq!(filtered_clone3, (-1, libc::ENOSYS));
        // Unfiltered, a null `clone_args` is the kernel's EINVAL: ENOSYS came from the filter.
        assert_eq!(raw(libc::SYS_clone3, [0; 6]), (-1, libc::EINVAL));
    }

    #[test]
    fn threads_files_and_the_rest_still_work() {
        let (thread, inherited, file, pid) = filtered(libc::EPERM, || {
            // A thread is a `clone` with CLONE_THREAD (after `clone3`'s ENOSYS).
            let thread = std::thread::spawn(|| 1).join().unwrap();
            // It inherits the filter.
            let inherited = std::thread::spawn(|| {
                // SAFETY: a plain call; see `sockets_fail_with_eperm`.
                let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                (fd, errno())
            })
            .join()
            .unwrap();
            let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
                .map(|s| s.contains("stepbox-executor"));
            (thread, inherited, file.unwrap(), std::process::id())
        });
        assert_eq!(thread, 1);
        assert_eq!(inherited, (-1, libc::EPERM));
        assert!(file);
        assert_eq!(pid, std::process::id());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_calls_fail_too() {
        let x32_socket = libc::SYS_socket | 0x4000_0000;
        let filtered_socket = filtered(libc::EPERM, move || {
            raw(
                x32_socket,
                [libc::AF_UNIX.into(), libc::SOCK_STREAM.into(), 0, 0, 0, 0],
            )
        });
        assert_eq!(filtered_socket, (-1, libc::EPERM));
    }

    #[test]
    fn the_worker_filter_builds_for_this_machine() {
        let programs = programs(libc::EPERM).unwrap();
        let expected = if cfg!(target_arch = "x86_64") { 3 } else { 2 };
        assert_eq!(programs.len(), expected);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
