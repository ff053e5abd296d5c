//! Every limit has a run where it holds and a run where it is hit, with the exact status.

use stepbox::job::limits::{LimitError, LimitKind};
use stepbox::{JobError, Status};

use crate::common::*;

#[tokio::test]
async fn memory_holds_then_is_exceeded() {
    let ok = run(with_limits(
        py("b = bytearray(40 * 1024 * 1024)\nprint(len(b))"),
        &["memory=128MiB"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);
    assert!(ok.usage.peak_memory_bytes > 40 << 20 && ok.usage.peak_memory_bytes <= 128 << 20);

    let hit = run(with_limits(
        py("b = bytearray(200 * 1024 * 1024)\nprint('unreachable')"),
        &["memory=128MiB"],
    ))
    .await;
    assert_status(&hit, Status::MemoryExceeded);
    assert!(
        hit.message.contains("the limit is 134217728 bytes"),
        "{}",
        hit.message
    );
    assert_eq!(out(&hit), "");
    assert!(hit.usage.peak_memory_bytes <= 128 << 20);
}

#[tokio::test]
async fn memory_growth_that_python_might_swallow_still_ends_the_run() {
    // A step that catches MemoryError must not turn a refused grow into a success.
    let src = "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(8 << 20))\nexcept MemoryError:\n    print('caught')\n";
    let r = run(with_limits(py(src), &["memory=96MiB"])).await;
    assert_status(&r, Status::MemoryExceeded);
}

#[tokio::test]
async fn fuel_holds_then_is_exhausted() {
    let ok = run(with_limits(
        py("print(sum(range(10000)))"),
        &["fuel=5000000000"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);
    let used = ok.usage.fuel_consumed.expect("metered");
    assert!(used > 0 && used < 5_000_000_000);

    let hit = run(with_limits(
        py("while True:\n    pass\n"),
        &["fuel=300000000"],
    ))
    .await;
    assert_status(&hit, Status::FuelExhausted);
    assert_eq!(hit.usage.fuel_consumed, Some(300_000_000));
    assert_eq!(hit.exit_code, None);
}

#[tokio::test]
async fn unmetered_runs_report_no_fuel() {
    let r = run(py("print(1)")).await;
    assert_eq!(r.usage.fuel_consumed, None);
    assert_eq!(r.limits.fuel, None);
}

#[tokio::test]
async fn wall_time_holds_then_is_exceeded_while_computing() {
    let ok = run(with_limits(
        py("import time\ntime.sleep(0.05)\nprint('done')"),
        &["wall_time=5s"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);

    let hit = run(with_limits(
        py("while True:\n    pass\n"),
        &["wall_time=300ms"],
    ))
    .await;
    assert_status(&hit, Status::TimedOut);
    assert!(hit.message.contains("wall-time limit"), "{}", hit.message);
}

#[tokio::test]
async fn wall_time_is_exceeded_while_blocked_in_a_host_call() {
    // Sleeping is a host call: no epoch check runs, so the backstop timer must stop it.
    let hit = run(with_limits(
        py("import time\ntime.sleep(60)\n"),
        &["wall_time=300ms"],
    ))
    .await;
    assert_status(&hit, Status::TimedOut);
}

#[tokio::test]
async fn stdout_holds_then_is_exceeded() {
    let ok = run(with_limits(py("print('x' * 1023)"), &["stdout=1KiB"])).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.stdout.len(), 1024);
    assert!(!ok.stdout_truncated);

    let hit = run(with_limits(
        py("while True:\n    print('y' * 100)\n"),
        &["stdout=1KiB"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert_eq!(hit.stdout.len(), 1024);
    assert!(hit.stdout_truncated);
    assert!(hit.message.contains("stdout"), "{}", hit.message);
}

#[tokio::test]
async fn stderr_holds_then_is_exceeded() {
    let ok = run(with_limits(
        py("import sys\nsys.stderr.write('e' * 100)"),
        &["stderr=1KiB"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.stderr.len(), 100);

    let hit = run(with_limits(
        py("import sys\nwhile True:\n    sys.stderr.write('e' * 100)\n"),
        &["stderr=1KiB"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert_eq!(hit.stderr.len(), 1024);
    assert!(hit.stderr_truncated && !hit.stdout_truncated);
}

#[tokio::test]
async fn output_file_count_holds_then_is_exceeded() {
    let make = |n: usize| {
        py(&format!(
            "for i in range({n}):\n    open(f'/output/f{{i}}.txt', 'w').write(str(i))\n"
        ))
    };
    let ok = run(with_limits(make(3), &["output_files=3"])).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(ok.outputs.len(), 3);
    assert_eq!(&ok.output("f2.txt").unwrap().content[..], b"2");

    let hit = run(with_limits(make(4), &["output_files=3"])).await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(hit.message.contains("output_files"), "{}", hit.message);
    assert!(hit.outputs.len() <= 3);
}

#[tokio::test]
async fn output_and_scratch_bytes_hold_then_are_exceeded_each_on_its_own() {
    let src = "open('/output/a', 'wb').write(b'a' * 600_000)\nopen('/tmp/b', 'wb').write(b'b' * 400_000)\n";
    let ok = run(with_limits(
        py(src),
        &["output_bytes=600000", "scratch_bytes=400000"],
    ))
    .await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(
        (ok.usage.output_bytes, ok.usage.scratch_bytes),
        (600_000, 400_000)
    );
    assert_eq!(ok.outputs.len(), 1, "scratch files are not outputs");

    let hit = run(with_limits(
        py(src),
        &["output_bytes=599999", "scratch_bytes=400000"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(
        hit.message.contains("(limit `output_bytes`)"),
        "{}",
        hit.message
    );

    let hit = run(with_limits(
        py(src),
        &["output_bytes=600000", "scratch_bytes=399999"],
    ))
    .await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(
        hit.message.contains("400000 bytes in /tmp") && hit.message.contains("scratch_bytes"),
        "{}",
        hit.message
    );
    assert_eq!(
        hit.outputs.len(),
        1,
        "outputs within their own limits are kept"
    );
}

/// Temporary files are scratch, not outputs: a step may make thousands under the default policy
/// (pyperformance's `pathlib` makes 2000), and `scratch_files` still bounds them.
#[tokio::test]
async fn scratch_files_hold_then_are_exceeded() {
    let make = |n: usize| {
        py(&format!(
            "import os, tempfile\nd = tempfile.mkdtemp()\nfor i in range({n}):\n    open(os.path.join(d, f'f{{i}}'), 'w').close()\nprint(len(os.listdir(d)))\n"
        ))
    };
    let ok = run(make(2000)).await;
    assert_status(&ok, Status::Succeeded);
    assert_eq!(out(&ok), "2000\n");
    assert_eq!((ok.usage.scratch_files, ok.usage.output_files), (2000, 0));
    assert!(
        ok.limits.output_files < 2000,
        "the default output limit is lower"
    );

    let ok = run(with_limits(make(50), &["scratch_files=50"])).await;
    assert_status(&ok, Status::Succeeded);
    let hit = run(with_limits(make(51), &["scratch_files=50"])).await;
    assert_status(&hit, Status::OutputExceeded);
    assert!(
        hit.message.contains("files in /tmp") && hit.message.contains("scratch_files"),
        "{}",
        hit.message
    );
}

/// A step that writes forever is stopped near the limit while it runs, not when the disk is full.
#[tokio::test]
async fn writing_forever_is_stopped_near_the_limit() {
    for dir in ["/output", "/tmp"] {
        let src = format!(
            "f = open('{dir}/big', 'wb')\nchunk = b'x' * 65536\nwhile True:\n    f.write(chunk)\n"
        );
        let r = run(with_limits(
            py(&src),
            &["output_bytes=8MiB", "scratch_bytes=8MiB", "wall_time=60s"],
        ))
        .await;
        assert_status(&r, Status::OutputExceeded);
        assert!(r.message.contains("stopped while writing"), "{}", r.message);
        let written = r.usage.output_bytes + r.usage.scratch_bytes;
        let overshoot = written.saturating_sub(8 << 20);
        eprintln!("{dir}: stopped at {written} bytes, {overshoot} past the 8 MiB limit");
        // Bounded by what one 10 ms epoch tick of writing can add; far below filling a disk.
        assert!(overshoot < 256 << 20, "overshoot {overshoot}");
    }
}

#[tokio::test]
async fn asking_above_the_policy_maximum_is_refused_naming_the_limit() {
    let e = executor()
        .run(with_limits(py("print(1)"), &["wall_time=1h"]))
        .await
        .unwrap_err();
    match &e {
        JobError::Limit(LimitError::AboveMaximum { kind, max, .. }) => {
            assert_eq!(*kind, LimitKind::WallTime);
            assert_eq!(max, "5m");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.is_caller_error());
    let mut strict = with_limits(py("print(1)"), &["memory=1GiB"]);
    strict.policy = "strict".into();
    let e = executor().run(strict).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid `limits`: limit `memory` asks for 1GiB, above policy `strict`'s maximum of 512MiB"
    );
}

#[tokio::test]
async fn strict_policy_meters_every_run() {
    let mut job = py("print('metered')");
    job.policy = "strict".into();
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    assert!(r.usage.fuel_consumed.is_some());
    assert_eq!(r.policy, "strict");
}
