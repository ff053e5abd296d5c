//! Shared helpers: one executor per test process, and job builders.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use stepbox::{Executor, ExecutorConfig, InputFile, RunResult, RuntimeKind, Status, StepJob};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The on-disk artifact cache shared by every test run.
pub fn cache_dir() -> PathBuf {
    root().join("target/test-cache")
}

/// The Python component, which must have been built.
pub fn python_component() -> PathBuf {
    let p = root().join("target/guest/python-runtime.wasm");
    assert!(
        p.is_file(),
        "{} is missing: build it with guest-runtime/python/build.sh before running the tests",
        p.display()
    );
    p
}

/// A fresh executor with its own work root (which the caller may inspect).
pub fn new_executor(work_root: &Path) -> Executor {
    Executor::new(ExecutorConfig {
        work_root: work_root.to_path_buf(),
        cache_dir: Some(cache_dir()),
        python_component: Some(python_component()),
        ..ExecutorConfig::default()
    })
    .expect("executor builds")
}

/// The executor most tests share (its work root is a directory of its own).
pub fn executor() -> &'static Executor {
    static EXEC: OnceLock<(tempfile::TempDir, Executor)> = OnceLock::new();
    &EXEC
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let exec = new_executor(dir.path());
            (dir, exec)
        })
        .1
}

/// A Python job.
pub fn py(source: &str) -> StepJob {
    StepJob::new(RuntimeKind::Python, source.to_string())
}

/// A wasm job from WAT or binary.
pub fn wasm(program: impl Into<bytes::Bytes>) -> StepJob {
    StepJob::new(RuntimeKind::Wasm, program)
}

/// An input file.
pub fn input(path: &str, content: impl Into<bytes::Bytes>) -> InputFile {
    InputFile {
        path: path.to_string(),
        content: content.into(),
    }
}

/// Runs a job that must be accepted.
pub async fn run(job: StepJob) -> RunResult {
    executor().run(job).await.expect("job accepted")
}

/// Sets limits from `KEY=VALUE` pairs.
pub fn with_limits(mut job: StepJob, pairs: &[&str]) -> StepJob {
    for p in pairs {
        job.limits.set_pair(p).unwrap();
    }
    job
}

/// stdout as text.
pub fn out(r: &RunResult) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// stderr as text.
pub fn err(r: &RunResult) -> String {
    String::from_utf8_lossy(&r.stderr).into_owned()
}

/// Asserts the status, showing the whole result when it differs.
#[track_caller]
pub fn assert_status(r: &RunResult, status: Status) {
    assert_eq!(
        r.status,
        status,
        "message: {}\nstdout: {}\nstderr: {}\nusage: {:?}",
        r.message,
        out(r),
        err(r),
        r.usage
    );
}

/// The `stepbox` binary, run in `dir` with this suite's cache, component, a work root in `dir`,
/// and `dir/data` as its data directory (so the default catalog file is the test's own, never
/// the user's).
pub fn stepbox_command(dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_stepbox"));
    c.current_dir(dir)
        .env("STEPBOX_CACHE_DIR", cache_dir())
        .env("STEPBOX_PYTHON_COMPONENT", python_component())
        .env("STEPBOX_WORK_ROOT", dir.join("work"))
        .env("XDG_DATA_HOME", dir.join("data"));
    c
}

/// Runs `cmd` to the end: its exit code, stdout and stderr (lossy UTF-8).
pub fn outcome(cmd: &mut std::process::Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A step that runs asyncio event loops (gather, an async generator, a TaskGroup, a wait_for
/// timeout, a real sleep, a fresh loop) and then tries a socket, for each Python runtime.
pub const ASYNCIO_PROBE: &str = r#"
import asyncio, errno, socket, time

async def squares(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i * i

async def square(x):
    await asyncio.sleep(0.01)
    return x * x

async def main():
    print("gather", await asyncio.gather(*(square(i) for i in range(5))))
    print("async generator", [v async for v in squares(4)])
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(square(i)) for i in (6, 7)]
    print("task group", [t.result() for t in tasks])
    try:
        await asyncio.wait_for(asyncio.sleep(10), timeout=0.05)
    except TimeoutError:
        print("wait_for timed out")
    start = time.monotonic()
    await asyncio.sleep(0.2)
    print("slept 0.2 s", time.monotonic() - start >= 0.2)
    try:
        asyncio.get_running_loop().add_signal_handler(2, print)
    except NotImplementedError:
        print("no signal handlers")

asyncio.run(main())
loop = asyncio.new_event_loop()
print("new loop", loop.run_until_complete(square(3)))
loop.close()
try:
    socket.socket()
except OSError as exc:
    print("socket refused", type(exc).__name__, errno.errorcode[exc.errno])
"#;

/// A step exercising file streams (`sandbox::wasi_files`): a 5 MiB write read back, reads at
/// positions and after seeks, a positioned write, append mode, pwrite/pread, and the errors for a
/// read-only input, a directory and a missing file. Check its result with `assert_file_semantics`.
pub fn file_semantics_job() -> StepJob {
    let src = r#"
import hashlib, os
big = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB + 1792 bytes: several stream chunks
with open('/output/big.bin', 'wb') as f:
    f.write(big)
with open('/output/big.bin', 'rb') as f:
    back = f.read()
    print('big', len(back), back == big, f.read() == b'')
with open('/input/in.txt', 'rb') as f:
    print('head', f.read(5))
    f.seek(7)
    print('seek', f.read(5))
    print('tell', f.tell())
    print('rest', f.read())
with open('/output/p.txt', 'w') as f:
    f.write('0123456789')
with open('/output/p.txt', 'r+') as f:
    f.seek(2)
    f.write('ab')
with open('/output/p.txt', 'a') as f:
    f.write('XY')
    f.seek(0)
    f.write('Z')  # append mode: still at the end
fd = os.open('/output/p.txt', os.O_RDWR)
print('pwrite', os.pwrite(fd, b'!', 1), 'pread', os.pread(fd, 4, 0))
os.close(fd)
print('p', open('/output/p.txt').read())
for attempt in [lambda: open('/input/in.txt', 'w'), lambda: open('/input', 'rb').read(), lambda: open('/input/missing')]:
    try:
        attempt()
        print('no error')
    except OSError as e:
        print(type(e).__name__)
print('sha', hashlib.sha256(open('/output/big.bin', 'rb').read()).hexdigest()[:16])
"#;
    let mut job = py(src);
    job.inputs = vec![input("in.txt", "hello, world\n")];
    job
}

/// What `file_semantics_job` must print and leave, as CPython on Linux would.
pub fn assert_file_semantics(r: &RunResult) {
    use sha2::Digest as _;
    assert_status(r, Status::Succeeded);
    let big: Vec<u8> = (0..=255u8).cycle().take(256 * (5 * 4096 + 7)).collect();
    let sha = hex::encode(sha2::Sha256::digest(&big));
    assert_eq!(
        out(r),
        format!(
            "big {} True True\nhead b'hello'\nseek b'world'\ntell 12\nrest b'\\n'\n\
             pwrite 1 pread b'0!ab'\np 0!ab456789XYZ\n\
             PermissionError\nIsADirectoryError\nFileNotFoundError\nsha {}\n",
            big.len(),
            &sha[..16]
        )
    );
    let files: Vec<_> = r.outputs.iter().map(|o| o.path.as_str()).collect();
    assert_eq!(files, ["big.bin", "p.txt"]);
    assert_eq!(&r.outputs[0].content[..], &big[..]);
}
