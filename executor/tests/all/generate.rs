//! The generate → run → verify → repair loop against a real HTTP server on loopback that speaks the
//! chat-completions API with scripted replies. No test calls a hosted model.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use stepbox::Status;
use stepbox::authoring::generate::{
    GenerateError, GenerateRequest, Generator, ModelConfig, Verdict,
};
use stepbox::job::checks::{Check, CheckKind};

use crate::common::*;

#[derive(Clone, Debug)]
pub enum Scripted {
    Reply(String),
    Status(u16, &'static str),
    Garbage,
    Slow(Duration),
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Scripted>,
    requests: Vec<Value>,
    auth: Vec<Option<String>>,
}

pub struct FakeModel {
    pub base_url: String,
    script: Arc<Mutex<Script>>,
}

impl FakeModel {
    pub fn requests(&self) -> Vec<Value> {
        self.script.lock().unwrap().requests.clone()
    }
}

async fn chat(
    State(script): State<Arc<Mutex<Script>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    let parsed: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")).into_response(),
    };
    let next = {
        let mut s = script.lock().unwrap();
        s.requests.push(parsed.clone());
        s.auth.push(
            headers
                .get("authorization")
                .map(|v| v.to_str().unwrap_or_default().to_string()),
        );
        s.replies.pop_front()
    };
    let reply = |text: String| {
        axum::Json(json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000, "model": parsed["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
        }))
        .into_response()
    };
    match next {
        Some(Scripted::Reply(text)) => reply(text),
        Some(Scripted::Status(code, message)) => (
            StatusCode::from_u16(code).unwrap(),
            axum::Json(json!({"error": {"message": message, "type": "test_error", "param": null, "code": null}})),
        )
            .into_response(),
        Some(Scripted::Garbage) => (StatusCode::OK, "<html>this is not an API</html>").into_response(),
        Some(Scripted::Slow(d)) => {
            tokio::time::sleep(d).await;
            reply("```python\nprint('late')\n```".into())
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response(),
    }
}

pub async fn fake_model(replies: Vec<Scripted>) -> FakeModel {
    let script = Arc::new(Mutex::new(Script {
        replies: replies.into(),
        ..Default::default()
    }));
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeModel {
        base_url: format!("http://{addr}/v1"),
        script,
    }
}

pub fn config(base_url: &str) -> ModelConfig {
    ModelConfig {
        base_url: base_url.to_string(),
        api_key_env: "STEPBOX_TEST_API_KEY".into(),
        model: "test-model".into(),
        temperature: 0.0,
        request_timeout: Duration::from_secs(5),
        retries: 0,
        backoff: Duration::from_millis(10),
    }
}

fn generator(base_url: &str) -> Generator {
    let work = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    Generator::new(Arc::new(new_executor(work.path())), config(base_url)).unwrap()
}

fn code(src: &str) -> Scripted {
    Scripted::Reply(format!("Here is the program:\n\n```python\n{src}\n```\n"))
}

fn sum_request() -> GenerateRequest {
    let mut req = GenerateRequest::new("Print the sum of column b of n.csv.");
    req.inputs = vec![input("n.csv", "a,b\nx,1\ny,2\nz,3\n")];
    req.checks = vec![Check {
        name: "sum".into(),
        kind: CheckKind::StdoutEquals("6\n".into()),
    }];
    req
}

fn last_user(request: &Value) -> String {
    let msgs = request["messages"].as_array().unwrap();
    msgs.iter().rev().find(|m| m["role"] == "user").unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn crash_then_wrong_output_then_a_verified_step() {
    let good = "import csv\nprint(sum(int(r['b']) for r in csv.DictReader(open('/input/n.csv'))))";
    let model = fake_model(vec![
        code("raise ValueError('boom')"),
        code("print(5)"),
        code(good),
    ])
    .await;
    let outcome = generator(&model.base_url)
        .generate(sum_request(), None)
        .await
        .unwrap();
    assert_eq!(outcome.verdict, Verdict::Verified, "{}", outcome.stopped);
    assert_eq!(
        outcome.source.as_deref(),
        Some(format!("{good}\n").as_str())
    );
    let statuses: Vec<_> = outcome.attempts.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [
            Some(Status::Failed),
            Some(Status::ChecksFailed),
            Some(Status::Succeeded)
        ]
    );
    assert_eq!(outcome.tokens.total, 360);

    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["model"], "test-model");
    let system = requests[0]["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("`/input` (read-only)")
            && system.contains("standard library and these packages: openpyxl 3.1.5")
            && system.contains("no pandas")
            && system.contains("No network")
    );
    let first = last_user(&requests[0]);
    assert!(
        first.contains("Print the sum of column b")
            && first.contains("`n.csv` (16 bytes, 4 lines)")
            && first.contains("y,2"),
        "{first}"
    );
    assert!(
        first.contains("Standard output must be exactly:\n```\n6\n\n```"),
        "{first}"
    );
    let second = last_user(&requests[1]);
    assert!(
        second.contains("Status: FAILED") && second.contains("ValueError: boom"),
        "{second}"
    );
    let third = last_user(&requests[2]);
    assert!(
        third.contains("CHECKS_FAILED")
            && third.contains("sum: stdout differs: line 1: expected \"6\\n\", got \"5\\n\""),
        "{third}"
    );
    // The transcript is the whole exchange, replayable as chat messages.
    let roles: Vec<_> = outcome
        .transcript
        .messages
        .iter()
        .map(|m| m.role.as_str())
        .collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant"
        ]
    );
    assert_eq!(
        serde_json::to_value(&outcome.transcript.messages).unwrap(),
        {
            let mut sent = requests[2]["messages"].as_array().unwrap().clone();
            sent.push(json!({"role": "assistant", "content": outcome.attempts[2].reply}));
            Value::Array(
                sent.into_iter()
                    .map(|m| json!({"role": m["role"], "content": m["content"]}))
                    .collect(),
            )
        }
    );
}

#[tokio::test]
async fn a_model_that_never_passes_ends_failed_with_every_attempt_kept() {
    let model = fake_model(vec![code("print(1)"), code("print(2)")]).await;
    let mut req = sum_request();
    req.max_attempts = 2;
    let outcome = generator(&model.base_url)
        .generate(req, None)
        .await
        .unwrap();
    assert_eq!(outcome.verdict, Verdict::Failed);
    assert_eq!(outcome.source, None);
    assert_eq!(outcome.attempts.len(), 2);
    assert_eq!(outcome.stopped, "no program passed in 2 attempts");
    assert_eq!(model.requests().len(), 2);
}

#[tokio::test]
async fn a_reply_without_a_code_block_is_a_failed_attempt_fed_back() {
    let model = fake_model(vec![
        Scripted::Reply("I would use pandas for this.".into()),
        code("print(6)"),
    ])
    .await;
    let outcome = generator(&model.base_url)
        .generate(sum_request(), None)
        .await
        .unwrap();
    assert_eq!(outcome.verdict, Verdict::Verified);
    assert_eq!(outcome.attempts[0].status, None);
    assert_eq!(outcome.attempts[0].code, None);
    assert!(last_user(&model.requests()[1]).contains("no fenced code block"));
}

#[tokio::test]
async fn without_checks_the_result_is_unverified() {
    let model = fake_model(vec![code("print('hello')")]).await;
    let outcome = generator(&model.base_url)
        .generate(GenerateRequest::new("Say hello."), None)
        .await
        .unwrap();
    assert_eq!(outcome.verdict, Verdict::Unverified);
    assert!(outcome.stopped.contains("unverified"));
    assert!(last_user(&model.requests()[0]).contains("No automatic checks"));
}

async fn model_error(replies: Vec<Scripted>, retries: u32, timeout: Duration) -> (String, usize) {
    let model = fake_model(replies).await;
    let mut c = config(&model.base_url);
    c.retries = retries;
    c.request_timeout = timeout;
    let work = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    let g = Generator::new(Arc::new(new_executor(work.path())), c).unwrap();
    let e = g.generate(sum_request(), None).await.unwrap_err();
    assert!(matches!(e, GenerateError::Model(_)), "{e:?}");
    (e.to_string(), model.requests().len())
}

#[tokio::test]
async fn endpoint_errors_are_clear_and_name_the_url_and_status() {
    let (e, n) = model_error(
        vec![Scripted::Status(401, "Incorrect API key provided")],
        2,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        e.contains("/v1 answered HTTP 401: Incorrect API key provided"),
        "{e}"
    );
    assert_eq!(n, 1, "a 401 is not retried");

    let (e, n) = model_error(
        vec![
            Scripted::Status(500, "overloaded"),
            Scripted::Status(500, "overloaded"),
        ],
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        e.contains("answered HTTP 500") && e.contains("(after 2 tries)"),
        "{e}"
    );
    assert_eq!(n, 2, "a 500 is retried");

    let (e, _) = model_error(vec![Scripted::Garbage], 0, Duration::from_secs(5)).await;
    assert!(
        e.contains("sent a reply that is not a chat completion"),
        "{e}"
    );

    let (e, _) = model_error(
        vec![Scripted::Slow(Duration::from_secs(3))],
        0,
        Duration::from_millis(300),
    )
    .await;
    assert!(e.contains("did not answer within 300ms"), "{e}");
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_fast_naming_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let e = generator(&url)
        .generate(sum_request(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("could not connect to model endpoint {url}")),
        "{e}"
    );
}

#[tokio::test]
async fn malformed_requests_are_refused_before_calling_the_model() {
    let model = fake_model(vec![]).await;
    let g = generator(&model.base_url);
    let mut req = sum_request();
    req.checks.push(Check {
        name: String::new(),
        kind: CheckKind::StdoutMatches("(".into()),
    });
    let e = g.generate(req, None).await.unwrap_err().to_string();
    assert!(e.contains("checks[1].stdout_matches"), "{e}");
    let mut req = sum_request();
    req.inputs.push(input("../x", ""));
    assert!(
        g.generate(req, None)
            .await
            .unwrap_err()
            .to_string()
            .contains("inputs[1].path")
    );
    assert!(
        g.generate(GenerateRequest::new("  "), None)
            .await
            .unwrap_err()
            .to_string()
            .contains("requirements")
    );
    assert!(model.requests().is_empty());
}
