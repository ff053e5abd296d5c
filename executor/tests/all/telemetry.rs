//! `stepbox serve` as a platform team runs it: JSON logs, and spans exported to a real OTLP/gRPC
//! collector (an in-process `TraceService` server on loopback) with the caller's trace context.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use stepbox::pb::step_executor_client::StepExecutorClient;
use stepbox::pb::{self, RunStepRequest, Step};

use crate::common::*;

/// Spans received, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((service.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match v.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// Starts `stepbox serve` on a free port with extra environment; returns it and its address.
fn serve(dir: &std::path::Path, env: &[(&str, String)]) -> (Child, std::net::SocketAddr) {
    let mut cmd = stepbox_command(dir);
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env_remove("STEPBOX_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// SIGTERM, then the exit status and stderr (blocking: the caller's clients must be dropped, or
/// the server's graceful shutdown waits for their connections).
fn stop(mut child: Child) -> (std::process::ExitStatus, String) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (child.wait().unwrap(), stderr)
}

fn python(source: &str) -> RunStepRequest {
    RunStepRequest {
        step: Some(Step {
            runtime: "python".into(),
            source: source.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_spans_to_an_otlp_collector_under_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = serve(
        dir.path(),
        &[
            ("STEPBOX_TELEMETRY_OTLP_ENDPOINT", format!("http://{otlp}")),
            ("STEPBOX_TELEMETRY_SERVICE_NAME", "stepbox-test".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    let mut c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(python("print('traced')"));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let r = c.run_step(req).await.unwrap().into_inner();
    assert_eq!(r.stdout, b"traced\n");
    let bad = c.run_step(python("")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // Exports are batched every 100 ms here; wait for both calls' spans (the server keeps running).
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.0.lock().unwrap().clone();
        let rpcs = spans
            .iter()
            .filter(|(_, s)| s.name == "stepbox.v1.StepExecutor/RunStep")
            .count();
        if rpcs >= 2 && spans.iter().any(|(_, s)| s.name == "run") {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "the collector got {} spans: {:?}",
            spans.len(),
            spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hex = |b: &[u8]| hex::encode(b);
    let (service, rpc) = spans
        .iter()
        .find(|(_, s)| s.name == "stepbox.v1.StepExecutor/RunStep" && hex(&s.trace_id) == trace_id)
        .expect("the traced call's span");
    assert_eq!(service, "stepbox-test");
    assert_eq!(hex(&rpc.parent_span_id), caller_span);
    assert_eq!(rpc.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(&rpc.attributes, "tenant").as_deref(), Some("local"));
    assert_eq!(
        attr(&rpc.attributes, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    let (_, run) = spans
        .iter()
        .find(|(_, s)| s.name == "run")
        .expect("the run span");
    assert_eq!(hex(&run.trace_id), trace_id);
    assert_eq!(run.parent_span_id, rpc.span_id);
    assert_eq!(attr(&run.attributes, "run_id"), Some(r.run_id.clone()));
    assert_eq!(
        attr(&run.attributes, "status").as_deref(),
        Some("SUCCEEDED")
    );
    assert_eq!(attr(&run.attributes, "runtime").as_deref(), Some("python"));
    // The refused call is its own trace, marked as an error with its gRPC code.
    let (_, refused) = spans
        .iter()
        .find(|(_, s)| s.name == "stepbox.v1.StepExecutor/RunStep" && hex(&s.trace_id) != trace_id)
        .expect("the refused call's span");
    assert!(refused.parent_span_id.is_empty());
    assert_eq!(
        attr(&refused.attributes, "rpc.grpc.status_code").as_deref(),
        Some("3")
    );
    assert_eq!(
        refused.status.as_ref().map(|s| s.code),
        Some(2),
        "STATUS_CODE_ERROR"
    );

    drop(c);
    let (status, stderr) = tokio::task::spawn_blocking(|| stop(child)).await.unwrap();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(stderr.contains("exporting traces over OTLP"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_lines_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = serve(dir.path(), &[("STEPBOX_LOG_FORMAT", "json".into())]);
    let mut c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = c.run_step(python("print(1)")).await.unwrap().into_inner();
    assert_eq!(r.status(), pb::Status::Succeeded);
    drop(c);
    let (status, stderr) = tokio::task::spawn_blocking(|| stop(child)).await.unwrap();
    assert!(status.success(), "{status}\n{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "serving" && l["level"] == "INFO"),
        "{stderr}"
    );
    // A run's log line carries its span's fields.
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "run finished" && l["span"]["run_id"] == r.run_id.as_str()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_stops_the_server() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = serve(
        dir.path(),
        &[
            (
                "STEPBOX_TELEMETRY_OTLP_ENDPOINT",
                format!("http://{closed}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    let mut c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for _ in 0..3 {
        let r = c.run_step(python("print(1)")).await.unwrap().into_inner();
        assert_eq!(r.status(), pb::Status::Succeeded);
    }
    drop(c);
    let (status, stderr) = tokio::task::spawn_blocking(|| stop(child)).await.unwrap();
    assert!(status.success(), "{status}\n{stderr}");
    // The operator hears about it in the log.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("opentelemetry")),
        "{stderr}"
    );
}
