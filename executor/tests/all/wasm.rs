//! The `wasm` runtime: preview-1 modules, preview-2 command components and WAT, with traps and
//! limits classified from wasmtime's own signals.

use stepbox::job::outcome::CacheSource;
use stepbox::{JobError, Status};

use crate::common::*;

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

fn start(body: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (table 1 funcref)
  (func $recurse (call $recurse))
  (func (export "_start") {body}))"#
    )
}

#[tokio::test]
async fn a_preview1_module_writes_stdout() {
    let r = run(wasm(HELLO)).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(out(&r), "hello from wasm\n");
    // The same module is compiled once: the second run finds it in memory.
    let again = run(wasm(wat::parse_str(HELLO).unwrap())).await;
    assert_eq!(again.usage.compile_cache, Some(CacheSource::Memory));
}

#[tokio::test]
async fn proc_exit_codes_pass_through() {
    let r = run(wasm(start("(call $exit (i32.const 7))"))).await;
    assert_status(&r, Status::Failed);
    assert_eq!(r.exit_code, Some(7));
    let r = run(wasm(start("(call $exit (i32.const 0))"))).await;
    assert_status(&r, Status::Succeeded);
}

#[tokio::test]
async fn a_preview2_command_component_runs() {
    let component = |ret: u32| {
        format!(
            r#"(component
  (core module $m (func (export "run") (result i32) (i32.const {ret})))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $inst (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $inst)))"#
        )
    };
    let ok = run(wasm(component(0))).await;
    assert_status(&ok, Status::Succeeded);
    let failed = run(wasm(component(1))).await;
    assert_status(&failed, Status::Failed);
    assert_eq!(failed.exit_code, Some(1));
}

#[tokio::test]
async fn traps_are_trapped() {
    let r = run(wasm(start("unreachable"))).await;
    assert_status(&r, Status::Trapped);
    assert!(r.message.contains("unreachable"), "{}", r.message);
    let r = run(wasm(start("(call $recurse)"))).await;
    assert_status(&r, Status::Trapped);
    assert!(r.message.contains("call stack exhausted"), "{}", r.message);
    let r = run(wasm(start("(drop (i32.load (i32.const 70000)))"))).await;
    assert_status(&r, Status::Trapped);
    assert!(r.message.contains("out of bounds"), "{}", r.message);
}

#[tokio::test]
async fn fuel_and_wall_time_stop_an_infinite_loop() {
    let forever = start("(loop $l (br $l))");
    let r = run(with_limits(wasm(forever.clone()), &["fuel=10000000"])).await;
    assert_status(&r, Status::FuelExhausted);
    let r = run(with_limits(wasm(forever), &["wall_time=200ms"])).await;
    assert_status(&r, Status::TimedOut);
}

#[tokio::test]
async fn memory_growth_is_capped() {
    let grow = start("(loop $l (drop (memory.grow (i32.const 16))) (br $l))");
    let r = run(with_limits(wasm(grow), &["memory=64MiB"])).await;
    assert_status(&r, Status::MemoryExceeded);
    assert!(r.usage.peak_memory_bytes <= 64 << 20);
    let small = start("(drop (memory.grow (i32.const 16)))");
    let r = run(with_limits(wasm(small), &["memory=64MiB"])).await;
    assert_status(&r, Status::Succeeded);
    assert_eq!(r.usage.peak_memory_bytes, 17 * 65536);
}

#[tokio::test]
async fn huge_tables_are_refused() {
    let grow = start("(drop (table.grow (ref.null func) (i32.const 100000000)))");
    let r = run(wasm(grow)).await;
    assert_status(&r, Status::MemoryExceeded);
    assert!(r.message.contains("table"), "{}", r.message);
}

#[tokio::test]
async fn malformed_programs_are_refused_naming_the_program() {
    let cases: [(&[u8], &str); 5] = [
        (b"\0asm\x01\0\0\0garbage", "does not compile"),
        (b"(module", "nor valid WAT"),
        (b"\xff\xfe\x00binary junk", "nor valid WAT"),
        (b"(module (func (export \"main\")))", "no `_start` export"),
        (
            b"(module (import \"env\" \"evil\" (func)) (func (export \"_start\")))",
            "imports",
        ),
    ];
    for (program, why) in cases {
        let e = executor().run(wasm(program.to_vec())).await.unwrap_err();
        assert!(
            matches!(e, JobError::Invalid { ref field, .. } if field == "program"),
            "{e}"
        );
        assert!(e.to_string().contains(why), "{why}: {e}");
    }
}

#[tokio::test]
async fn random_bytes_never_panic_the_host() {
    // A cheap deterministic byte soup: every outcome must be a refusal or a result, never a panic.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in [0usize, 1, 8, 9, 64, 1000] {
        let mut bytes = b"\0asm\x01\0\0\0".to_vec();
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        let _ = executor().run(wasm(bytes.clone())).await;
        let _ = executor().run(wasm(bytes[8..].to_vec())).await;
    }
}
