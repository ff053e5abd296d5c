//! The `stepbox` binary: pass-through output, exit codes per status, JSON, output files, errors.

use std::path::Path;
use std::process::Output;

use crate::common::*;

fn stepbox(args: &[&str], dir: &Path) -> Output {
    stepbox_command(dir)
        .args(args)
        .output()
        .expect("stepbox runs")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn stdout_and_stderr_pass_through_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "s.py",
        "import sys\nsys.stdout.write('out \\u00e9\\n')\nsys.stderr.write('err\\n')\n",
    );
    let o = stepbox(&["run", "s.py"], d.path());
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(o.stdout, "out é\n".as_bytes());
    assert_eq!(o.stderr, b"err\n");
}

#[test]
fn each_status_has_its_own_exit_code() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("ok.py", "print(1)", &[][..], 0),
        ("fail.py", "raise SystemExit(9)", &[][..], 1),
        (
            "slow.py",
            "while True: pass",
            &["--limit", "wall_time=200ms"][..],
            3,
        ),
        (
            "fuel.py",
            "while True: pass",
            &["--limit", "fuel=100000000"][..],
            4,
        ),
        (
            "mem.py",
            "b = bytearray(300 << 20)",
            &["--limit", "memory=128MiB"][..],
            5,
        ),
        (
            "loud.py",
            "while True: print('x')",
            &["--limit", "stdout=100"][..],
            6,
        ),
    ];
    for (name, src, extra, code) in cases {
        write(d.path(), name, src);
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.push(name);
        let o = stepbox(&args, d.path());
        assert_eq!(
            o.status.code(),
            Some(code),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    write(
        d.path(),
        "trap.wat",
        "(module (memory (export \"memory\") 1) (func (export \"_start\") unreachable))",
    );
    let o = stepbox(&["run", "trap.wat"], d.path());
    assert_eq!(o.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&o.stderr).contains("stepbox: TRAPPED: the step trapped"));
}

#[test]
fn bad_requests_exit_2_with_a_message_naming_what_was_wrong() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "s.py", "print(1)");
    write(d.path(), "s.txt", "print(1)");
    for (args, msg) in [
        (
            &["run", "--limit", "memory=lots", "s.py"][..],
            "`lots` is not a size",
        ),
        (
            &["run", "--limit", "wall_time=2h", "s.py"][..],
            "above policy `default`'s maximum of 5m",
        ),
        (
            &["run", "--policy", "nope", "s.py"][..],
            "unknown policy `nope`",
        ),
        (
            &["run", "s.txt"][..],
            "pass --runtime python or --runtime wasm",
        ),
        (
            &["run", "missing.py"][..],
            "failed to read step `missing.py`",
        ),
    ] {
        let o = stepbox(args, d.path());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(msg), "{args:?}: {stderr}");
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn inputs_outputs_args_and_json() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("in/sub")).unwrap();
    write(d.path(), "in/sub/b.txt", "bee");
    write(d.path(), "a.csv", "x,y\n1,2\n");
    write(
        d.path(),
        "s.py",
        "import os, sys\nos.makedirs('/output/r', exist_ok=True)\nopen('/output/r/out.txt','w').write(open('/input/a.csv').read() + open('/input/sub/b.txt').read() + ' '.join(sys.argv[1:]))\nprint('done')\n",
    );
    let o = stepbox(
        &[
            "run",
            "--input",
            "a.csv",
            "--input-dir",
            "in",
            "--output-dir",
            "results",
            "s.py",
            "--",
            "one",
            "two",
        ],
        d.path(),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.stdout, b"done\n");
    assert_eq!(
        std::fs::read_to_string(d.path().join("results/r/out.txt")).unwrap(),
        "x,y\n1,2\nbeeone two"
    );

    let o = stepbox(
        &[
            "run",
            "--json",
            "--input",
            "a.csv",
            "--input-dir",
            "in",
            "s.py",
        ],
        d.path(),
    );
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(v["status"], "SUCCEEDED");
    assert_eq!(v["stdout"], "done\n");
    assert_eq!(v["outputs"][0]["path"], "r/out.txt");
    assert_eq!(v["outputs"][0]["size"], 11);
    assert_eq!(v["limits"]["memory_bytes"], 512 << 20);
    assert!(v["usage"]["wall_time_us"].as_u64().unwrap() > 0);
    let left: Vec<_> = std::fs::read_dir(d.path().join("work")).unwrap().collect();
    assert!(left.is_empty(), "job directories left behind");
}

#[test]
fn policy_subcommands() {
    let d = tempfile::tempdir().unwrap();
    let o = stepbox(&["policy", "list"], d.path());
    let s = String::from_utf8_lossy(&o.stdout);
    for name in ["default", "strict", "heavy", "deterministic"] {
        assert!(s.lines().any(|l| l.starts_with(name)), "{s}");
    }
    write(d.path(), "bad.toml", "description = 'x'\nnetwork = true\n");
    let o = stepbox(&["policy", "check", "bad.toml"], d.path());
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.toml") && e.contains("network"), "{e}");
}

#[tokio::test]
async fn generate_writes_the_verified_program_and_reports_progress() {
    use crate::generate::{Scripted, fake_model};
    let model = fake_model(vec![
        Scripted::Reply("```python\nraise SystemExit(1)\n```".into()),
        Scripted::Reply("```python\nprint(open('/input/in.txt').read().strip()[::-1])\n```".into()),
    ])
    .await;
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "in.txt", "abc\n");
    write(d.path(), "want.txt", "cba\n");
    let url = model.base_url.clone();
    let dir = d.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        stepbox_command(&dir)
            .args([
                "generate",
                "--requirements",
                "Reverse the text of in.txt.",
                "--input",
                "in.txt",
            ])
            .args([
                "--expect-stdout",
                "want.txt",
                "--transcript",
                "t.json",
                "-o",
                "step.py",
                "--model",
                "m",
            ])
            .env("OPENAI_BASE_URL", &url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("attempt 1: FAILED")
            && stderr.contains("attempt 2: SUCCEEDED, 1/1 checks passed"),
        "{stderr}"
    );
    assert!(o.stdout.is_empty());
    assert_eq!(
        std::fs::read_to_string(d.path().join("step.py")).unwrap(),
        "print(open('/input/in.txt').read().strip()[::-1])\n"
    );
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("t.json")).unwrap()).unwrap();
    assert_eq!(t["model"], "m");
    assert_eq!(model.requests().len(), 2);
}

/// A wasm step of some size is compiled by the first process that runs it and mapped from the
/// cache's `programs/` by the next (each `stepbox run` starts its own sandbox worker): a 21 MB
/// CPython module took ~7 s to compile on every run before.
#[test]
fn a_big_wasm_step_is_compiled_once_per_cache() {
    let d = tempfile::tempdir().unwrap();
    let data = "a".repeat(stepbox::sandbox::engine::PROGRAM_CACHE_MIN_BYTES);
    write(
        d.path(),
        "big.wat",
        &format!(
            r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "\08\00\00\00\03\00\00\00ok\n")
  (data (i32.const 16) "{data}")
  (func (export "_start") (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))"#
        ),
    );
    let cache = d.path().join("cache");
    let run = || {
        let o = stepbox_command(d.path())
            .env("STEPBOX_CACHE_DIR", &cache)
            .args(["run", "--json", "big.wat"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
        assert_eq!(v["status"], "SUCCEEDED", "{v}");
        assert_eq!(v["stdout"], "ok\n", "{v}");
        v["usage"]["compile_cache"].as_str().unwrap().to_string()
    };
    assert_eq!(run(), "compiled");
    assert_eq!(run(), "disk");
    assert_eq!(
        std::fs::read_dir(cache.join("programs")).unwrap().count(),
        1
    );
}
