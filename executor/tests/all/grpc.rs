//! The gRPC service over real loopback connections, with tonic's generated client.

use std::sync::Arc;
use std::time::Duration;

use stepbox::pb::step_executor_client::StepExecutorClient;
use stepbox::pb::{self, check::Kind};
use stepbox::service::{ServerOptions, serve};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

struct TestServer {
    client: StepExecutorClient<Channel>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    work: tempfile::TempDir,
}

async fn start(options: ServerOptions) -> TestServer {
    let work = tempfile::tempdir().unwrap();
    let exec = Arc::new(new_executor(work.path()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(serve(exec, listener, options, async {
        let _ = rx.await;
    }));
    let client = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    TestServer {
        client,
        addr,
        stop: Some(tx),
        done,
        work,
    }
}

impl TestServer {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
        let left: Vec<_> = std::fs::read_dir(self.work.path()).unwrap().collect();
        assert!(left.is_empty(), "job directories left behind: {left:?}");
    }
}

fn python(source: &str) -> pb::RunStepRequest {
    pb::RunStepRequest {
        step: Some(pb::Step {
            runtime: "python".into(),
            source: source.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn check(kind: Kind) -> pb::Check {
    pb::Check {
        name: String::new(),
        kind: Some(kind),
    }
}

#[tokio::test]
async fn run_step_returns_status_outputs_usage_and_a_sealed_manifest() {
    let mut s = start(ServerOptions::default()).await;
    let mut req = python(
        "import sys\nprint(open('/input/a.txt').read().upper())\nopen('/output/r.json','w').write('{\"n\": 1}')",
    );
    req.inputs.push(pb::File {
        path: "a.txt".into(),
        content: b"abc".to_vec(),
        ..Default::default()
    });
    let r = s.client.run_step(req).await.unwrap().into_inner();
    assert_eq!(
        r.status(),
        pb::Status::Succeeded,
        "{} {}",
        r.message,
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stdout, b"ABC\n");
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].path, "r.json");
    let m = r.manifest.unwrap();
    assert_eq!(m.engine, "wasmtime 48.0.8");
    assert_eq!(m.inputs[0].path, "a.txt");
    assert_eq!(m.outputs[0].sha256, r.outputs[0].sha256);
    assert_eq!(m.digest.len(), 64);
    assert!(!m.runtime_sha256.is_empty());
    assert!(r.usage.unwrap().wall_time_us > 0);
    s.stop().await;
}

#[tokio::test]
async fn checks_pass_and_fail_with_reasons() {
    let mut s = start(ServerOptions::default()).await;
    let src = "import json, csv\nprint('total: 42')\njson.dump({'b': [1, 2], 'a': 'x'}, open('/output/r.json', 'w'))\nopen('/output/r.csv', 'w').write('id,v\\n2,b\\n1,a\\n')";
    let sha = stepbox::job::digest::sha256_hex(b"id,v\n2,b\n1,a\n");
    let passing = vec![
        check(Kind::ExitCode(0)),
        check(Kind::StdoutEquals(b"total: 42\n".to_vec())),
        check(Kind::StdoutMatches(r"total: \d+".into())),
        check(Kind::FileExists("r.json".into())),
        check(Kind::FileJsonEquals(pb::FileContent { path: "r.json".into(), content: br#"{"a":"x","b":[1,2.0]}"#.to_vec() })),
        check(Kind::FileCsvEquals(pb::FileCsvEquals { path: "r.csv".into(), content: b"id,v\n1,a\n2,b\n".to_vec(), ignore_row_order: true })),
        check(Kind::FileEquals(pb::FileContent { path: "r.csv".into(), content: b"id,v\n2,b\n1,a\n".to_vec() })),
        check(Kind::FileSha256(pb::FileSha256 { path: "r.csv".into(), sha256: sha })),
        check(Kind::FileMatches(pb::FileMatches { path: "r.csv".into(), regex: "^id,v".into() })),
        check(Kind::FileJsonSchema(pb::FileJsonSchema {
            path: "r.json".into(),
            schema_json: r#"{"type":"object","required":["a","b"],"properties":{"b":{"type":"array","items":{"type":"integer"}}}}"#.into(),
        })),
    ];
    let mut req = python(src);
    req.checks = passing;
    let r = s.client.run_step(req).await.unwrap().into_inner();
    assert_eq!(r.status(), pb::Status::Succeeded, "{:?}", r.check_results);
    assert!(
        r.check_results.iter().all(|c| c.passed),
        "{:?}",
        r.check_results
    );
    assert_eq!(r.check_results.len(), 10);

    let failing = vec![
        check(Kind::ExitCode(3)),
        check(Kind::StdoutEquals(b"total: 41\n".to_vec())),
        check(Kind::FileExists("missing.txt".into())),
        check(Kind::FileJsonEquals(pb::FileContent {
            path: "r.json".into(),
            content: br#"{"a":"x","b":[1,3]}"#.to_vec(),
        })),
        check(Kind::FileCsvEquals(pb::FileCsvEquals {
            path: "r.csv".into(),
            content: b"id,v\n1,a\n2,b\n".to_vec(),
            ignore_row_order: false,
        })),
        check(Kind::FileJsonSchema(pb::FileJsonSchema {
            path: "r.json".into(),
            schema_json:
                r#"{"type":"object","properties":{"b":{"type":"array","items":{"type":"string"}}}}"#
                    .into(),
        })),
    ];
    let mut req = python(src);
    req.checks = failing;
    let r = s.client.run_step(req).await.unwrap().into_inner();
    assert_eq!(r.status(), pb::Status::ChecksFailed);
    assert!(
        r.message.starts_with("6 of 6 checks failed"),
        "{}",
        r.message
    );
    let details: Vec<_> = r
        .check_results
        .iter()
        .map(|c| (c.passed, c.detail.as_str()))
        .collect();
    assert_eq!(details[0], (false, "exit code 0, expected 3"));
    assert_eq!(
        details[1],
        (
            false,
            "stdout differs: line 1: expected \"total: 41\\n\", got \"total: 42\\n\""
        )
    );
    assert_eq!(
        details[2],
        (
            false,
            "no output file `missing.txt` (outputs: r.csv, r.json)"
        )
    );
    assert_eq!(
        details[3],
        (false, "`r.json` differs at $.b[1]: expected 3, got 2")
    );
    assert_eq!(
        details[4],
        (
            false,
            "`r.csv` differs: row 1 (line 2): expected [\"1\", \"a\"], got [\"2\", \"b\"]"
        )
    );
    assert!(details[5].1.contains("at `/b/0`"), "{}", details[5].1);
    s.stop().await;
}

#[tokio::test]
async fn a_verifier_step_sees_outputs_inputs_and_stdout() {
    let mut s = start(ServerOptions::default()).await;
    let verifier = |src: &str| {
        check(Kind::Verifier(pb::VerifierStep {
            step: Some(pb::Step {
                runtime: "python".into(),
                source: src.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    };
    let mut req = python(
        "print('ok')\nopen('/output/n.txt','w').write(str(len(open('/input/in.txt').read())))",
    );
    req.inputs.push(pb::File {
        path: "in.txt".into(),
        content: b"12345".to_vec(),
        ..Default::default()
    });
    req.checks = vec![
        verifier(
            "import sys\nn = int(open('/input/outputs/n.txt').read())\nassert n == len(open('/input/inputs/in.txt').read())\nassert open('/input/stdout').read() == 'ok\\n'",
        ),
        verifier("import sys\nprint('n is wrong', file=sys.stderr)\nsys.exit(1)"),
    ];
    let r = s.client.run_step(req).await.unwrap().into_inner();
    assert_eq!(r.status(), pb::Status::ChecksFailed);
    assert!(r.check_results[0].passed, "{}", r.check_results[0].detail);
    assert!(!r.check_results[1].passed);
    assert!(
        r.check_results[1].detail.contains("FAILED")
            && r.check_results[1].detail.contains("n is wrong")
    );
    s.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    let mut s = start(ServerOptions::default()).await;
    let mut bad_path = python("print(1)");
    bad_path.inputs.push(pb::File {
        path: "../etc/passwd".into(),
        ..Default::default()
    });
    let mut bad_policy = python("print(1)");
    bad_policy.policy = "root".into();
    let mut too_much = python("print(1)");
    too_much.limits = Some(pb::Limits {
        memory_bytes: 64 << 30,
        ..Default::default()
    });
    let mut bad_regex = python("print(1)");
    bad_regex
        .checks
        .push(check(Kind::StdoutMatches("(".into())));
    let cases = [
        (python(""), "invalid `step.source`: the program is empty"),
        (bad_path, "invalid `inputs[0].path`"),
        (bad_policy, "invalid `policy`: unknown policy `root`"),
        (
            too_much,
            "invalid `limits.memory_bytes`: 64GiB is above policy `default`'s maximum of 2GiB",
        ),
        (bad_regex, "invalid `checks[0].stdout_matches`"),
        (pb::RunStepRequest::default(), "invalid `step`: is required"),
    ];
    for (req, msg) in cases {
        let e = s.client.run_step(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with(msg), "{msg}: {}", e.message());
    }
    // A step that fails is a response, not an error.
    let r = s
        .client
        .run_step(python("raise SystemExit(4)"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.status(), r.exit_code), (pb::Status::Failed, 4));
    s.stop().await;
}

#[tokio::test]
async fn streaming_delivers_output_before_the_result() {
    let mut s = start(ServerOptions::default()).await;
    let req = python(
        "import sys, time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.05)\nsys.stderr.write('done\\n')",
    );
    let mut stream = s.client.run_step_stream(req).await.unwrap().into_inner();
    let (mut out, mut err, mut chunks, mut last) = (Vec::new(), Vec::new(), 0, None);
    while let Some(ev) = stream.message().await.unwrap() {
        assert!(last.is_none(), "the response must be the last event");
        match ev.event.unwrap() {
            pb::run_step_event::Event::Stdout(b) => {
                chunks += 1;
                out.extend(b)
            }
            pb::run_step_event::Event::Stderr(b) => err.extend(b),
            pb::run_step_event::Event::Response(r) => last = Some(r),
        }
    }
    let r = last.expect("a final response");
    assert_eq!(r.status(), pb::Status::Succeeded);
    assert_eq!(out, r.stdout);
    assert_eq!(err, b"done\n");
    assert!(chunks >= 3, "stdout arrived in {chunks} chunks");
    s.stop().await;
}

#[tokio::test]
async fn runtimes_and_policies_are_listed() {
    let mut s = start(ServerOptions::default()).await;
    let r = s
        .client
        .list_runtimes(pb::ListRuntimesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = r
        .runtimes
        .iter()
        .map(|r| (r.name.as_str(), r.available))
        .collect();
    let data = executor()
        .runtimes()
        .availability(stepbox::RuntimeKind::PythonData)
        .is_ok();
    assert_eq!(
        names,
        [("python", true), ("wasm", true), ("python-data", data)]
    );
    let has = |r: &pb::Runtime, name: &str, version: &str| {
        r.packages
            .iter()
            .any(|p| p.name == name && p.version == version)
    };
    let python = &r.runtimes[0];
    assert_eq!(python.python_version, "3.14");
    assert!(has(python, "openpyxl", "3.1.5"), "{:?}", python.packages);
    assert!(r.runtimes[1].packages.is_empty());
    let python_data = &r.runtimes[2];
    if data {
        assert_eq!(python_data.python_version, "3.15.0");
        assert!(
            has(python_data, "pandas", "3.0.6"),
            "{:?}",
            python_data.packages
        );
        assert!(has(python_data, "numpy", "2.5.2"));
    } else {
        assert!(
            python_data
                .unavailable_reason
                .contains("python-data/build.sh")
        );
    }
    let p = s
        .client
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    let strict = p.policies.iter().find(|p| p.name == "strict").unwrap();
    assert_eq!(strict.max_limits.as_ref().unwrap().memory_bytes, 512 << 20);
    assert!(
        p.policies
            .iter()
            .any(|p| p.name == "deterministic" && p.deterministic)
    );
    s.stop().await;
}

#[tokio::test]
async fn overload_is_resource_exhausted() {
    let s = start(ServerOptions {
        concurrency: 1,
        queue: 0,
        ..ServerOptions::default()
    })
    .await;
    let mut a = s.client.clone();
    let slow = tokio::spawn(async move {
        a.run_step(python("import time\ntime.sleep(1)\nprint('slow')"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = s
        .client
        .clone()
        .run_step(python("print(1)"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let r = slow.await.unwrap().unwrap().into_inner();
    assert_eq!(r.stdout, b"slow\n");
    s.stop().await;
}

#[tokio::test]
async fn a_client_deadline_stops_the_job() {
    let s = start(ServerOptions::default()).await;
    let mut req = tonic::Request::new(python("while True:\n    pass\n"));
    req.set_timeout(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let e = s.client.clone().run_step(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(10));
    // The job was stopped, not left running: its directory is gone once the server stops.
    s.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_clearly() {
    let mut s = start(ServerOptions {
        max_message_bytes: 1 << 20,
        ..ServerOptions::default()
    })
    .await;
    let mut req = python("print(1)");
    req.inputs.push(pb::File {
        path: "big".into(),
        content: vec![0; 2 << 20],
        ..Default::default()
    });
    let e = s.client.run_step(req).await.unwrap_err();
    assert!(
        e.message().contains("message length too large"),
        "{:?}: {}",
        e.code(),
        e.message()
    );
    // The server is still fine.
    assert_eq!(
        s.client
            .run_step(python("print(1)"))
            .await
            .unwrap()
            .into_inner()
            .stdout,
        b"1\n"
    );
    s.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let s = start(ServerOptions::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "stepbox.v1.StepExecutor"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_jobs_finish_within_the_grace_period() {
    let s = start(ServerOptions {
        grace: Duration::from_secs(5),
        ..ServerOptions::default()
    })
    .await;
    let mut c = s.client.clone();
    let job = tokio::spawn(async move {
        c.run_step(python("import time\ntime.sleep(0.5)\nprint('finished')"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let TestServer {
        stop, done, work, ..
    } = s;
    let _ = stop.unwrap().send(());
    let r = job.await.unwrap().unwrap().into_inner();
    assert_eq!(r.stdout, b"finished\n");
    done.await.unwrap().unwrap();
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn shutdown_cancels_jobs_past_the_grace_period() {
    let s = start(ServerOptions {
        grace: Duration::from_millis(100),
        ..ServerOptions::default()
    })
    .await;
    let mut c = s.client.clone();
    let job = tokio::spawn(async move { c.run_step(python("while True:\n    pass\n")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let TestServer {
        stop, done, work, ..
    } = s;
    let _ = stop.unwrap().send(());
    let e = job.await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    done.await.unwrap().unwrap();
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn generate_step_streams_attempts_then_the_outcome() {
    use crate::generate::{Scripted, config, fake_model};
    let model = fake_model(vec![
        Scripted::Reply("```python\nprint(41)\n```".into()),
        Scripted::Reply("```python\nprint(42)\n```".into()),
    ])
    .await;
    let mut s = start(ServerOptions {
        model: config(&model.base_url),
        ..ServerOptions::default()
    })
    .await;
    let req = pb::GenerateStepRequest {
        requirements: "Print the answer.".into(),
        checks: vec![check(Kind::StdoutEquals(b"42\n".to_vec()))],
        ..Default::default()
    };
    let mut stream = s.client.generate_step(req).await.unwrap().into_inner();
    let mut kinds = Vec::new();
    let mut outcome = None;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            pb::generate_step_event::Event::AttemptStarted(n) => kinds.push(format!("start {n}")),
            pb::generate_step_event::Event::ModelReply(a) => {
                kinds.push(format!("reply {}", a.number))
            }
            pb::generate_step_event::Event::AttemptResult(a) => {
                kinds.push(format!("result {} {:?}", a.number, a.status()))
            }
            pb::generate_step_event::Event::Outcome(o) => outcome = Some(o),
        }
    }
    assert_eq!(
        kinds,
        [
            "start 1",
            "reply 1",
            "result 1 ChecksFailed",
            "start 2",
            "reply 2",
            "result 2 Succeeded"
        ]
    );
    let o = outcome.unwrap();
    assert_eq!(o.verdict(), pb::Verdict::Verified);
    assert_eq!(o.source, "print(42)\n");
    assert_eq!(o.attempts.len(), 2);
    let transcript: serde_json::Value = serde_json::from_str(&o.transcript_json).unwrap();
    assert_eq!(transcript["messages"].as_array().unwrap().len(), 5);

    // An endpoint that fails is UNAVAILABLE naming the URL and status.
    let failing = fake_model(vec![Scripted::Status(401, "bad key")]).await;
    let mut s2 = start(ServerOptions {
        model: config(&failing.base_url),
        ..ServerOptions::default()
    })
    .await;
    let mut stream = s2
        .client
        .generate_step(pb::GenerateStepRequest {
            requirements: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().contains("answered HTTP 401: bad key"),
        "{}",
        e.message()
    );
    s.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn import_conversation_returns_the_step_summary_and_checks() {
    let mut s = start(ServerOptions::default()).await;
    let page = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/conversations/bulk-edit-validator.share.html"),
    )
    .unwrap();
    let r = s
        .client
        .import_conversation(pb::ImportConversationRequest {
            conversation: page,
            select: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let summary = r.summary.unwrap();
    assert_eq!(
        (summary.title.as_str(), summary.cells),
        ("Bulk Edit CSV Validator", 3)
    );
    assert_eq!(summary.outputs, ["bulk_edit_errors.csv"]);
    assert_eq!(summary.expected_stdout, b"8 rows checked, 9 problems\n");
    let step = r.step.unwrap();
    assert_eq!(step.layout(), pb::FileLayout::MntData);
    // The returned step and checks run as they are.
    let csv = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/conversations/bulk_edit.csv"),
    )
    .unwrap();
    let run = s
        .client
        .run_step(pb::RunStepRequest {
            step: Some(step),
            inputs: vec![pb::File {
                path: "bulk_edit.csv".into(),
                content: csv,
                ..Default::default()
            }],
            checks: r.recorded_checks,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        run.status(),
        pb::Status::Succeeded,
        "{:?}",
        run.check_results
    );
    assert_eq!(run.check_results.len(), 2);

    let e = s
        .client
        .import_conversation(pb::ImportConversationRequest {
            conversation: b"<html></html>".to_vec(),
            select: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("invalid `conversation`: the HTML page has no"),
        "{}",
        e.message()
    );
    s.stop().await;
}
