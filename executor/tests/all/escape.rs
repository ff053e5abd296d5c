//! Escape attempts fail inside the guest and leak nothing; job directories never outlive jobs.

use std::io::Read;
use std::time::Duration;

use stepbox::Status;
use stepbox::job::outcome::OutputKind;

use crate::common::*;

#[tokio::test]
async fn host_files_are_invisible() {
    let src = r#"
import os
for attempt in [lambda: open('/etc/passwd').read(),
                lambda: open('/input/../../../etc/passwd').read(),
                lambda: open('../etc/passwd').read(),
                lambda: os.listdir('/'),
                lambda: os.listdir('/proc/self'),
                lambda: open('/output/../input/a.txt', 'w').write('x')]:
    try:
        attempt()
        print('ESCAPED')
    except OSError as e:
        print(type(e).__name__)
"#;
    let mut job = py(src);
    job.inputs = vec![input("a.txt", "secret-free")];
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    assert!(!out(&r).contains("ESCAPED"), "{}", out(&r));
    assert_eq!(out(&r).lines().count(), 6);
}

#[tokio::test]
async fn inputs_are_read_only() {
    let mut job = py(
        "import os\nprint(open('/input/a.txt').read())\ntry:\n    open('/input/a.txt', 'w').write('changed')\n    print('WROTE')\nexcept OSError as e:\n    print(type(e).__name__)\ntry:\n    os.remove('/input/a.txt')\n    print('REMOVED')\nexcept OSError as e:\n    print(type(e).__name__)\n",
    );
    job.inputs = vec![input("a.txt", "original")];
    let r = run(job).await;
    assert_status(&r, Status::Succeeded);
    assert!(
        !out(&r).contains("WROTE") && !out(&r).contains("REMOVED"),
        "{}",
        out(&r)
    );
    assert!(out(&r).starts_with("original\n"));
}

#[tokio::test]
async fn symlinks_out_of_the_sandbox_are_refused_and_links_are_never_followed() {
    let src = r#"
import os
try:
    os.symlink('/etc/passwd', '/output/passwd')
    print('LINKED')
except OSError as e:
    print('absolute link refused:', type(e).__name__)
try:
    os.symlink('../../../../etc/passwd', '/output/up')
    print(open('/output/up').read()[:10])
except OSError as e:
    print('escaping link unusable:', type(e).__name__)
open('/output/real.txt', 'w').write('data')
os.symlink('real.txt', '/output/alias')
"#;
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert!(
        !out(&r).contains("LINKED") && !out(&r).contains("root:"),
        "{}",
        out(&r)
    );
    let alias = r.output("alias").expect("the in-sandbox link is reported");
    assert_eq!(
        alias.kind,
        OutputKind::Symlink {
            target: "real.txt".into()
        }
    );
    assert!(
        alias.content.is_empty(),
        "links are reported, never followed"
    );
    if let Some(up) = r.output("up") {
        assert!(
            up.content.is_empty(),
            "an escaping link is reported, never followed"
        );
    }
}

#[tokio::test]
async fn no_network_even_to_a_listening_loopback_port() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let src = format!(
        r#"
import socket
for attempt in [lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1),
                lambda: socket.getaddrinfo('example.com', 80),
                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))]:
    try:
        attempt()
        print('CONNECTED')
    except OSError as e:
        print(type(e).__name__)
"#
    );
    let r = run(py(&src)).await;
    assert_status(&r, Status::Succeeded);
    assert!(!out(&r).contains("CONNECTED"), "{}", out(&r));
    std::thread::sleep(Duration::from_millis(50));
    match listener.accept() {
        Ok((mut s, _)) => {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            panic!("the guest reached the host's loopback port");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}

#[tokio::test]
async fn no_subprocesses() {
    let src = "import subprocess, os\nfor f in [lambda: subprocess.run(['ls']), lambda: os.system('ls'), lambda: os.fork()]:\n    try:\n        f()\n        print('SPAWNED')\n    except Exception as e:\n        print(type(e).__name__)\n";
    let r = run(py(src)).await;
    assert_status(&r, Status::Succeeded);
    assert!(!out(&r).contains("SPAWNED"), "{}", out(&r));
}

#[tokio::test]
async fn jobs_see_only_their_own_files_and_leave_none_behind() {
    let work = tempfile::tempdir().unwrap();
    let exec = new_executor(work.path());
    let mut a = py(
        "import time, os\nopen('/output/mine.txt', 'w').write('a')\ntime.sleep(0.3)\nprint(os.listdir('/input'))",
    );
    a.inputs = vec![input("a-only.csv", "1")];
    let b = py(
        "import os, time\ntime.sleep(0.1)\nprint(os.listdir('/input'), os.listdir('/output'), os.listdir('/tmp'))",
    );
    let (ra, rb) = tokio::join!(exec.run(a), exec.run(b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(out(&ra), "['a-only.csv']\n");
    assert_eq!(out(&rb), "[] [] []\n");
    // Every outcome removes its directory: success, failure, limit hits, refusal.
    for job in [
        py("print(1)"),
        py("raise SystemExit(2)"),
        with_limits(py("while True: pass"), &["wall_time=200ms"]),
        with_limits(
            py("open('/output/x','wb').write(b'x'*10000)"),
            &["output_bytes=10"],
        ),
    ] {
        exec.run(job).await.unwrap();
    }
    let mut bad = py("print(1)");
    bad.inputs = vec![input("../x", "")];
    assert!(exec.run(bad).await.is_err());
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "job directories left behind: {left:?}");
}

#[tokio::test]
async fn bad_input_paths_are_refused_before_anything_runs() {
    for path in ["/etc/passwd", "../escape", "a/../../b", "a\0b", ""] {
        let mut job = py("print(1)");
        job.inputs = vec![input(path, "x")];
        let e = executor().run(job).await.unwrap_err().to_string();
        assert!(
            e.starts_with("invalid `inputs[0].path`: path "),
            "{path:?}: {e}"
        );
    }
}
