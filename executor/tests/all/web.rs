//! The web page and its JSON endpoint, against the real `stepbox serve --web` binary on
//! loopback: the example validator published and promoted to `prod`, two tenants (`ci` sees
//! every step; `other` only `other-*`), uploads limited to 64 KiB and 3 files, outputs kept for
//! the newest 2 runs per tenant.
//!
//! HTTP-level tests (hand-made requests, so every header is visible): the JSON endpoint with
//! bearer tokens and its downloads, the upload limits while the body arrives, sign-in cookies,
//! CSRF, and one tenant seeing no trace of another's steps, runs or files. Then a real browser:
//! headless Chromium driven over WebDriver (`chromedriver`, started here) signs in, uploads
//! `examples/bulk_edit.csv`, runs, reads the result and downloads the report, with screenshots in
//! `target/web-screenshots/`. Under `CI=true` a missing Chromium fails that test; elsewhere it is
//! skipped with a loud message.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const LIMIT: usize = 64 << 10;

/// A `stepbox serve --web` with the example published and promoted.
struct Server {
    child: std::process::Child,
    grpc: String,
    web: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(dir: &Path) -> std::process::Command {
    let mut c = stepbox_command(dir);
    c.env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env_remove("STEPBOX_CONFIG")
        .env_remove("STEPBOX_CATALOG_DATABASE")
        .env_remove("STEPBOX_SERVER")
        .env_remove("STEPBOX_TOKEN")
        .env_remove("STEPBOX_WEB_ADDR");
    c
}

#[track_caller]
fn ok(o: std::process::Output) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn examples() -> PathBuf {
    // Canonical: chromedriver refuses file paths with `..` in them.
    root().join("examples").canonicalize().unwrap()
}

fn expected_report() -> Vec<u8> {
    std::fs::read(examples().join("bulk-edit-validator/expected/bulk_edit_errors.csv")).unwrap()
}

impl Server {
    fn start() -> Server {
        use stepbox::service::config::hash_token;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let step = examples().join("bulk-edit-validator/step.toml");
        ok(command(dir)
            .args(["step", "publish"])
            .arg(&step)
            .output()
            .unwrap());
        for stage in ["staging", "prod"] {
            ok(command(dir)
                .args(["step", "promote", "bulk-edit-validator@v1", "--to", stage])
                .output()
                .unwrap());
        }
        let config = dir.join("stepbox.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\naddr = \"127.0.0.1:0\"\n\
                 [web]\naddr = \"127.0.0.1:0\"\nmax_upload_size = \"{LIMIT}\"\nmax_upload_files = 3\nkeep_runs = 2\n\
                 [[tenants]]\nname = \"ci\"\ntokens = [\"{}\"]\ncatalog = [\"run\", \"publish\", \"promote\"]\n\
                 [[tenants]]\nname = \"other\"\ntokens = [\"{}\"]\nsteps = [\"other-*\"]\n",
                hash_token("ci-token"),
                hash_token("other-token")
            ),
        )
        .unwrap();
        let mut child = command(dir)
            .args(["serve", "--config"])
            .arg(&config)
            .env("STEPBOX_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut lines = [String::new(), String::new()];
        for l in &mut lines {
            out.read_line(l).unwrap();
        }
        assert!(lines[0].starts_with("listening on "), "{lines:?}");
        let web = lines[1]
            .trim()
            .strip_prefix("web page on ")
            .unwrap_or_else(|| panic!("stepbox serve said {lines:?}"))
            .to_string();
        let grpc = format!(
            "http://{}",
            lines[0].trim().strip_prefix("listening on ").unwrap()
        );
        Server {
            child,
            grpc,
            web,
            dir: d,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.web)
    }

    /// Files left in the web door's upload directory (must be none between requests).
    fn leftover_uploads(&self) -> usize {
        let work = self.dir.path().join("work");
        std::fs::read_dir(&work)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("stepbox-web-"))
            .map(|e| std::fs::read_dir(e.path().join("uploads")).unwrap().count())
            .sum()
    }
}

/// A multipart body: (field, file name, bytes) parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "stepbox-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.text()))
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

async fn send(r: reqwest::RequestBuilder) -> Answer {
    let resp = r.send().await.expect("the server answers");
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp
            .bytes()
            .await
            .expect("the whole answer arrives")
            .to_vec(),
    }
}

async fn api_run(
    server: &Server,
    token: Option<&str>,
    spec: &str,
    parts: &[(&str, Option<&str>, &[u8])],
) -> Answer {
    let (kind, body) = multipart(parts);
    let mut r = client()
        .post(server.url(&format!("/api/v1/steps/{spec}")))
        .header("content-type", kind)
        .body(body);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    send(r).await
}

async fn get(server: &Server, path: &str, auth: &[(&str, &str)]) -> Answer {
    let mut r = client().get(server.url(path));
    for (k, v) in auth {
        r = r.header(*k, *v);
    }
    send(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_endpoint_runs_by_reference_with_bearer_tokens_and_limits_uploads() {
    let server = Server::start();
    let csv = std::fs::read(examples().join("bulk_edit.csv")).unwrap();
    let file = [("files", Some("bulk_edit.csv"), csv.as_slice())];

    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &file,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let j = a.json();
    assert_eq!(j["status"], "SUCCEEDED", "{j}");
    assert!(
        j["stdout"]
            .as_str()
            .unwrap()
            .starts_with("8 rows checked, 9 problems\n"),
        "{j}"
    );
    let checks = j["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 3, "the contract's three checks: {j}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{j}");
    assert_eq!(j["step"]["name"], "bulk-edit-validator");
    assert_eq!(j["step"]["version"], 1);
    assert_eq!(j["manifest_digest"].as_str().unwrap().len(), 64);
    let output = &j["outputs"][0];
    assert_eq!(output["path"], "bulk_edit_errors.csv");
    assert_eq!(output["size"], expected_report().len());
    let url = output["url"].as_str().unwrap().to_string();
    let run_id = j["run_id"].as_str().unwrap().to_string();

    // The download is the report, byte for byte, with the same token; the zip holds it too.
    let d = get(&server, &url, &[("authorization", "Bearer ci-token")]).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body, expected_report());
    assert!(
        d.header("content-disposition").contains("attachment"),
        "{:?}",
        d.headers
    );
    let z = get(
        &server,
        j["zip_url"].as_str().unwrap(),
        &[("authorization", "Bearer ci-token")],
    )
    .await;
    assert_eq!(z.status, 200);
    let zip_path = server.dir.path().join("outputs.zip");
    std::fs::write(&zip_path, &z.body).unwrap();
    let unzipped = std::process::Command::new("python3")
        .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; sys.stdout.buffer.write(z.read('bulk_edit_errors.csv'))"])
        .arg(&zip_path)
        .output()
        .unwrap();
    assert!(
        unzipped.status.success(),
        "{}",
        String::from_utf8_lossy(&unzipped.stderr)
    );
    assert_eq!(unzipped.stdout, expected_report());

    // No token, a wrong one: 401 naming what to send.
    let a = api_run(&server, None, "bulk-edit-validator@prod:run", &file).await;
    assert_eq!(a.status, 401, "{}", a.text());
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    assert_eq!(a.header("www-authenticate"), "Bearer");
    let a = api_run(&server, Some("nope"), "bulk-edit-validator@prod:run", &file).await;
    assert_eq!(
        (a.status, a.json()["error"].as_str().unwrap()),
        (401, "unknown bearer token")
    );
    let a = api_run(&server, Some("ci-token"), "bulk-edit-validator@prod", &file).await;
    assert_eq!(a.status, 404);
    assert!(a.text().contains("NAME@STAGE:run"), "{}", a.text());

    // Tenant `other` may not see the step: the very words of a step that does not exist, and
    // ci's files are not there for it either.
    let hidden = api_run(
        &server,
        Some("other-token"),
        "bulk-edit-validator@prod:run",
        &file,
    )
    .await;
    let missing = api_run(&server, Some("other-token"), "no-such-step@prod:run", &file).await;
    assert_eq!((hidden.status, missing.status), (404, 404));
    assert_eq!(
        hidden.json()["error"]
            .as_str()
            .unwrap()
            .replace("bulk-edit-validator", "X"),
        missing.json()["error"]
            .as_str()
            .unwrap()
            .replace("no-such-step", "X"),
    );
    let d = get(&server, &url, &[("authorization", "Bearer other-token")]).await;
    assert_eq!(d.status, 404, "{}", d.text());
    assert!(!d.text().contains("bulk_edit"), "{}", d.text());
    let mine = get(
        &server,
        &format!("/runs/{run_id}/outputs.zip"),
        &[("authorization", "Bearer other-token")],
    )
    .await;
    assert_eq!(mine.status, 404);

    // Limits while the body arrives: just under 64 KiB runs; one byte over is refused with a
    // complete answer (not a reset connection), and nothing is left on disk.
    let under = vec![b'x'; LIMIT - 16];
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &[("files", Some("bulk_edit.csv"), &under)],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let over = vec![b'x'; LIMIT + 1];
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &[("files", Some("bulk_edit.csv"), &over)],
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.text());
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("the upload is too large: more than 64KiB in all"),
        "{}",
        a.text()
    );
    // Far over (8 MiB): still a whole answer.
    let huge = vec![0u8; 8 << 20];
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &[("files", Some("big.bin"), &huge)],
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.text());
    // Split over two files, each under the limit, together over it.
    let half = vec![b'y'; LIMIT / 2 + 8];
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &[
            ("files", Some("a.csv"), &half),
            ("files", Some("b.csv"), &half),
        ],
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.text());
    // Three files are allowed, four are not.
    let three = [
        ("files", Some("a"), &b"1"[..]),
        ("files", Some("b"), b"2"),
        ("input.bulk_edit.csv", Some("x.csv"), &csv),
    ];
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &three,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let mut four = three.to_vec();
    four.push(("files", Some("c"), b"3"));
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &four,
    )
    .await;
    assert_eq!(
        (a.status, a.json()["error"].as_str().unwrap()),
        (400, "too many files: at most 3 per run")
    );
    // A path that would leave the data directory is refused, naming it.
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &[("input.../escape.csv", Some("x"), b"1")],
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.text());
    assert!(a.text().contains("`..`"), "{}", a.text());
    // Text fields are bounded too: 64 KiB of arguments pass, one byte more does not; stdin
    // counts toward the upload limit.
    let args = format!("{}\n", "a".repeat((64 << 10) - 1));
    let mut with_args = file.to_vec();
    with_args.push(("args", None, args.as_bytes()));
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &with_args,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let args = format!("{args}b");
    with_args.pop();
    with_args.push(("args", None, args.as_bytes()));
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &with_args,
    )
    .await;
    assert_eq!(
        (a.status, a.json()["error"].as_str().unwrap()),
        (400, "field `args` is longer than 64 KiB")
    );
    let stdin = vec![b's'; LIMIT - csv.len() + 1];
    let mut with_stdin = file.to_vec();
    with_stdin.push(("stdin", None, &stdin));
    let a = api_run(
        &server,
        Some("ci-token"),
        "bulk-edit-validator@prod:run",
        &with_stdin,
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.text());
    assert_eq!(
        server.leftover_uploads(),
        0,
        "uploads are removed whatever happened"
    );
}

/// The value of `name="csrf"` in a page.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("the page has a CSRF field")
        + 19;
    page[at..at + 64].to_string()
}

async fn sign_in(server: &Server, token: &str) -> String {
    let a = send(
        client()
            .post(server.url("/signin"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}")),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.text());
    let cookie = a.header("set-cookie");
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_sign_in_strict_cookies_and_csrf_tokens_and_hide_other_tenants() {
    let server = Server::start();
    // Not signed in: every page sends you to sign in.
    for path in ["/steps", "/steps/bulk-edit-validator", "/runs"] {
        let a = get(&server, path, &[]).await;
        assert_eq!(
            (a.status, a.header("location")),
            (303, "/signin".into()),
            "{path}"
        );
    }
    let bad = send(
        client()
            .post(server.url("/signin"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token=wrong"),
    )
    .await;
    assert_eq!(bad.status, 401);
    assert!(
        bad.text()
            .contains("That token is not valid on this server")
    );
    assert!(bad.header("set-cookie").is_empty());

    let a = send(
        client()
            .post(server.url("/signin"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token=ci-token"),
    )
    .await;
    let set = a.header("set-cookie");
    for attr in [
        "stepbox_session=",
        "; Secure",
        "; HttpOnly",
        "; SameSite=Strict",
        "; Path=/",
    ] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(
        !set.contains("ci-token"),
        "the token itself never goes into the cookie"
    );
    let ci = set.split(';').next().unwrap().to_string();
    let as_ci = [("cookie", ci.as_str())];

    let catalog = get(&server, "/steps", &as_ci).await;
    assert_eq!(catalog.status, 200);
    assert!(catalog.text().contains("data-step=\"bulk-edit-validator\""));
    assert!(
        catalog
            .header("content-security-policy")
            .contains("default-src 'none'")
    );
    let searched = get(&server, "/steps?q=nothing-matches-this", &as_ci).await;
    assert!(searched.text().contains("No step matches") && !searched.text().contains("data-step="));
    let page = get(&server, "/steps/bulk-edit-validator", &as_ci).await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("name=\"input.bulk_edit.csv\""),
        "the input its case uses"
    );
    let csrf = csrf_of(&page.text());

    let csv = std::fs::read(examples().join("bulk_edit.csv")).unwrap();
    let post = |cookie: String, csrf: Option<String>, origin: Option<&'static str>, live: bool| {
        let csv = csv.clone();
        let server_url = server.url("/steps/bulk-edit-validator/run");
        async move {
            let mut parts: Vec<(&str, Option<&str>, &[u8])> = Vec::new();
            if let Some(c) = &csrf {
                parts.push(("csrf", None, c.as_bytes()));
            }
            parts.push(("ref", None, b"prod"));
            parts.push(("input.bulk_edit.csv", Some("mine.csv"), &csv));
            let (kind, body) = multipart(&parts);
            let mut r = client()
                .post(server_url)
                .header("content-type", kind)
                .header("cookie", cookie)
                .body(body);
            if let Some(o) = origin {
                r = r.header("origin", o);
            }
            if live {
                r = r.header("accept", "application/x-ndjson");
            }
            send(r).await
        }
    };
    // Without the token, with a wrong one, or from another site: refused, nothing runs.
    let runs_before = get(&server, "/runs", &as_ci)
        .await
        .text()
        .matches("data-run=")
        .count();
    for (csrf, origin) in [
        (None, None),
        (Some("0".repeat(64)), None),
        (Some(csrf.clone()), Some("http://evil.example")),
    ] {
        let a = post(ci.clone(), csrf, origin, false).await;
        assert_eq!(a.status, 403, "{}", a.text());
        assert!(
            a.text().contains("security token does not match"),
            "{}",
            a.text()
        );
    }
    assert_eq!(
        get(&server, "/runs", &as_ci)
            .await
            .text()
            .matches("data-run=")
            .count(),
        runs_before
    );

    // With it: the live stream (stdout as it comes, then the result), then the result page.
    let a = post(ci.clone(), Some(csrf.clone()), None, true).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.header("content-type"), "application/x-ndjson");
    let events: Vec<Value> = a
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: String = events.iter().filter_map(|e| e["stdout"].as_str()).collect();
    assert!(
        streamed.starts_with("8 rows checked, 9 problems\n"),
        "{events:?}"
    );
    let done = &events.last().unwrap()["done"];
    assert_eq!(done["status"], "SUCCEEDED", "{events:?}");
    let page_url = done["page_url"].as_str().unwrap().to_string();
    let result = get(&server, &page_url, &as_ci).await;
    assert_eq!(result.status, 200);
    let html = result.text();
    assert!(html.contains("8 rows checked, 9 problems"));
    assert_eq!(html.matches("data-passed=\"true\"").count(), 3, "{html}");
    assert!(
        html.contains("class=\"csv-preview\"") && html.contains("<th>problem</th>"),
        "{html}"
    );
    assert!(html.contains(done["manifest_digest"].as_str().unwrap()));
    // Without a script: the form posts and the answer is the result page.
    let a = post(ci.clone(), Some(csrf.clone()), None, false).await;
    assert_eq!(a.status, 303, "{}", a.text());
    assert!(a.header("location").starts_with("/runs/"));
    let history = get(&server, "/runs", &as_ci).await.text();
    assert!(
        history.contains(&page_url[6..]),
        "the run is in the history"
    );
    // Outputs stay downloadable for the newest 2 runs (`keep_runs = 2`): after a third run the
    // first shows its record from the run history, and its files are gone.
    let a = post(ci.clone(), Some(csrf.clone()), None, false).await;
    assert_eq!(a.status, 303, "{}", a.text());
    let old = get(&server, &page_url, &as_ci).await;
    assert_eq!(old.status, 200);
    let old = old.text();
    assert!(
        old.contains("Its files are no longer kept") && old.contains("Succeeded"),
        "{old}"
    );
    let gone = get(&server, &format!("{page_url}/outputs/0"), &as_ci).await;
    assert_eq!(gone.status, 404, "{}", gone.text());

    // Tenant `other`: no trace of ci's step, runs or files.
    let other = sign_in(&server, "other-token").await;
    let as_other = [("cookie", other.as_str())];
    let catalog = get(&server, "/steps", &as_other).await.text();
    assert!(!catalog.contains("bulk-edit-validator"), "{catalog}");
    let hidden = get(&server, "/steps/bulk-edit-validator", &as_other).await;
    let missing = get(&server, "/steps/no-such-step", &as_other).await;
    assert_eq!((hidden.status, missing.status), (404, 404));
    assert_eq!(
        hidden.text().replace("bulk-edit-validator", "X"),
        missing.text().replace("no-such-step", "X")
    );
    let run = get(&server, &page_url, &as_other).await;
    assert_eq!(run.status, 404);
    assert!(!run.text().contains("bulk"), "{}", run.text());
    let history = get(&server, "/runs", &as_other).await.text();
    assert!(history.contains("No runs yet"), "{history}");
    let file = get(&server, &format!("{page_url}/outputs/0"), &as_other).await;
    assert_eq!(file.status, 404);
    // ci's CSRF token is worth nothing with other's cookie.
    let a = post(other.clone(), Some(csrf.clone()), None, false).await;
    assert_eq!(a.status, 403);

    // Sign-out needs the token too, then the cookie is gone and so is the session.
    let a = send(
        client()
            .post(server.url("/signout"))
            .header("cookie", ci.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body("csrf=wrong"),
    )
    .await;
    assert_eq!(a.status, 403);
    let a = send(
        client()
            .post(server.url("/signout"))
            .header("cookie", ci.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(a.status, 303);
    assert!(a.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(get(&server, "/steps", &as_ci).await.status, 303);
    assert_eq!(server.leftover_uploads(), 0);
}

/// chromedriver and chromium, or why not.
fn browser_binaries() -> Result<(PathBuf, PathBuf), String> {
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join(n))
                    .find(|p| p.is_file())
            })
        })
    };
    let driver = find(&["chromedriver"]).ok_or("chromedriver is not installed")?;
    let browser = find(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("chromium is not installed")?;
    Ok((driver, browser))
}

struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn shot(client: &fantoccini::Client, name: &str) {
    let dir = root().join("target/web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Waits for `css`; on timeout saves a screenshot `failed-<what>` and fails with the page.
async fn wait_for(c: &fantoccini::Client, css: &str, what: &str) -> fantoccini::elements::Element {
    match c
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(fantoccini::Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            shot(c, &format!("failed-{what}")).await;
            panic!(
                "{what}: no `{css}` ({e}) at {}:\n{}",
                c.current_url().await.unwrap(),
                c.source().await.unwrap_or_default()
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_runs_the_validator_in_a_real_browser() {
    use futures::FutureExt;
    let (driver, browser) = match browser_binaries() {
        Ok(b) => b,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "{why}: CI must run the browser test (scripts/setup.sh installs chromium and chromium-driver)"
            )
        }
        Err(why) => {
            eprintln!(
                "\n\n*** SKIPPED the real-browser test: {why} (apt-get install chromium chromium-driver, or run scripts/setup.sh) ***\n\n"
            );
            return;
        }
    };
    let server = Server::start();
    let port = free_port();
    let _driver = Driver(
        std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1700"],
        }),
    );
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut client = None;
    for _ in 0..100 {
        match fantoccini::ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let c = client.expect("chromedriver answers within 10 s");
    // Whatever happens, the session is closed (chromedriver then quits the browser it started;
    // killing chromedriver alone would leave Chromium running).
    let outcome = std::panic::AssertUnwindSafe(drive(&c, &server))
        .catch_unwind()
        .await;
    let _ = c.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(server.leftover_uploads(), 0);
}

/// The person's session in the browser: sign in, run, download, the limits, another tenant.
async fn drive(c: &fantoccini::Client, server: &Server) {
    use fantoccini::Locator;

    // Sign in.
    c.goto(&server.url("/steps")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/signin"));
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("ci-token")
        .await
        .unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let card = wait_for(
        c,
        "[data-step='bulk-edit-validator']",
        "[data-step='bulk-edit-validator']",
    )
    .await;
    let text = card.text().await.unwrap();
    assert!(
        text.contains("verified") && text.contains("prod → v1"),
        "{text}"
    );
    shot(c, "catalog").await;

    // The step page: upload the CSV into the input its case names, run.
    card.find(Locator::Css("h2 a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let input = wait_for(
        c,
        "input[name='input.bulk_edit.csv']",
        "input[name='input.bulk_edit.csv']",
    )
    .await;
    input
        .send_keys(examples().join("bulk_edit.csv").to_str().unwrap())
        .await
        .unwrap();
    shot(c, "step").await;
    c.find(Locator::Id("run"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let status = wait_for(c, "#status", "status").await;
    assert!(
        status.text().await.unwrap().starts_with("Succeeded"),
        "{}",
        status.text().await.unwrap()
    );
    let stdout = c
        .find(Locator::Id("stdout"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(stdout.starts_with("8 rows checked, 9 problems"), "{stdout}");
    let checks = c.find_all(Locator::Css("#checks li")).await.unwrap();
    assert_eq!(checks.len(), 3);
    for check in &checks {
        let t = check.text().await.unwrap();
        assert!(t.starts_with("passed"), "{t}");
    }
    let table = c
        .find(Locator::Css("table.csv-preview"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(table.contains("duplicate id"), "{table}");
    shot(c, "result").await;

    // Download the report the way the page links it, in the browser (its cookie), and compare.
    let href = c
        .find(Locator::Css("a.download"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    let bytes = c
        .execute_async(
            "const done = arguments[arguments.length - 1];\
             fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => done(Array.from(new Uint8Array(b))));",
            vec![Value::String(href.clone())],
        )
        .await
        .unwrap();
    let bytes: Vec<u8> = serde_json::from_value(bytes).unwrap();
    assert_eq!(bytes, expected_report());
    let run_url = c.current_url().await.unwrap().to_string();

    // On a phone-sized window the result page still fits its width (no sideways scrolling).
    c.set_window_size(390, 1700).await.unwrap();
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    shot(c, "result-phone").await;
    assert_eq!(
        fits,
        Value::Bool(true),
        "the result page scrolls sideways on a phone"
    );
    c.set_window_size(1100, 1700).await.unwrap();

    c.goto(&server.url("/runs")).await.unwrap();
    assert_eq!(c.find_all(Locator::Css("tr.run")).await.unwrap().len(), 1);
    shot(c, "history").await;

    // Too large: refused on the page with a message, nothing run.
    let big = server.dir.path().join("too-big.csv");
    std::fs::write(&big, vec![b'x'; LIMIT * 3]).unwrap();
    c.goto(&server.url("/steps/bulk-edit-validator"))
        .await
        .unwrap();
    let input = wait_for(
        c,
        "input[name='input.bulk_edit.csv']",
        "input[name='input.bulk_edit.csv']",
    )
    .await;
    input.send_keys(big.to_str().unwrap()).await.unwrap();
    c.find(Locator::Id("run"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut message = String::new();
    for _ in 0..600 {
        let e = c.find(Locator::Id("run-error")).await.unwrap();
        if e.is_displayed().await.unwrap() {
            message = e.text().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        message.starts_with("the upload is too large: more than 64KiB"),
        "{message:?}"
    );
    shot(c, "too-large").await;
    c.goto(&server.url("/runs")).await.unwrap();
    assert_eq!(
        c.find_all(Locator::Css("tr.run")).await.unwrap().len(),
        1,
        "nothing ran"
    );

    // A workflow around the validator: its step node turns green as the run goes.
    publish_workflow(server).await;
    c.goto(&server.url("/workflows/bulk-edit-check"))
        .await
        .unwrap();
    let input = wait_for(c, "input[name='input.edits']", "workflow page").await;
    input
        .send_keys(examples().join("bulk_edit.csv").to_str().unwrap())
        .await
        .unwrap();
    c.find(Locator::Id("run"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let status = wait_for(c, "#status", "workflow result").await;
    assert!(
        status.text().await.unwrap().starts_with("Succeeded"),
        "{}",
        status.text().await.unwrap()
    );
    let node = c
        .find(Locator::Css("[data-node='validate']"))
        .await
        .unwrap();
    assert!(node.attr("class").await.unwrap().unwrap().contains("ok"));
    shot(c, "workflow-result").await;

    // Another tenant: no trace of the step or the run.
    c.find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let token = wait_for(c, "#token", "token").await;
    token.send_keys("other-token").await.unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "#no-steps", "no-steps").await;
    assert!(!c.source().await.unwrap().contains("bulk-edit-validator"));
    shot(c, "other-tenant-catalog").await;
    c.goto(&run_url).await.unwrap();
    let e = c
        .find(Locator::Id("error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(e.starts_with("run_id: no run"), "{e}");
    c.goto(&server.url("/steps/bulk-edit-validator"))
        .await
        .unwrap();
    let e = c
        .find(Locator::Id("error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(e, "no step `bulk-edit-validator`");
}

/// A one-step workflow around the validator, with its case.
const WORKFLOW: &str = r#"
name = "bulk-edit-check"
description = "Validates a bulk edit and hands back the problems"
[inputs]
edits = "bulk_edit.csv"
[[steps]]
id = "validate"
uses = "bulk-edit-validator@prod"
inputs = { "bulk_edit.csv" = "inputs.edits" }
[outputs]
errors = "steps.validate.outputs.bulk_edit_errors.csv"
[[cases]]
name = "sample"
inputs = { edits = "cases/bulk_edit.csv" }
expected_outputs = { errors = "cases/errors.csv" }
"#;

/// Publishes [`WORKFLOW`] over gRPC as tenant `ci`.
async fn publish_workflow(server: &Server) {
    use stepbox::pb;
    let csv = std::fs::read(examples().join("bulk_edit.csv")).unwrap();
    let file = |path: &str, content: Vec<u8>| pb::File {
        path: path.into(),
        content,
        ..Default::default()
    };
    let mut workflows =
        pb::step_workflows_client::StepWorkflowsClient::connect(server.grpc.clone())
            .await
            .unwrap();
    let mut req = tonic::Request::new(pb::PublishWorkflowRequest {
        workflow: Some(pb::InlineWorkflow {
            toml: WORKFLOW.into(),
            files: vec![
                file("cases/bulk_edit.csv", csv.clone()),
                file("cases/errors.csv", expected_report()),
            ],
        }),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer ci-token".parse().unwrap());
    let published = workflows.publish_workflow(req).await.unwrap().into_inner();
    assert!(
        published.version.as_ref().is_some_and(|v| v.verified),
        "{published:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_runs_from_its_page_with_its_steps_taking_their_state_live() {
    let server = Server::start();
    publish_workflow(&server).await;
    let csv = std::fs::read(examples().join("bulk_edit.csv")).unwrap();

    let ci = sign_in(&server, "ci-token").await;
    let as_ci = [("cookie", ci.as_str())];
    let catalog = get(&server, "/steps", &as_ci).await.text();
    assert!(
        catalog.contains("data-workflow=\"bulk-edit-check\""),
        "{catalog}"
    );
    let page = get(&server, "/workflows/bulk-edit-check", &as_ci).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let html = page.text();
    assert!(html.contains("name=\"input.edits\"") && html.contains("data-node=\"validate\""));
    let csrf = csrf_of(&html);
    let (kind, body) = multipart(&[
        ("csrf", None, csrf.as_bytes()),
        ("input.edits", Some("mine.csv"), &csv),
    ]);
    let a = send(
        client()
            .post(server.url("/workflows/bulk-edit-check/run"))
            .header("content-type", kind)
            .header("cookie", ci.as_str())
            .header("accept", "application/x-ndjson")
            .body(body),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let events: Vec<Value> = a
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["node"]["id"] == "validate")
        .map(|e| e["node"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.last(), Some(&"succeeded"), "{events:?}");
    assert!(states.contains(&"running"), "{events:?}");
    let done = &events.last().unwrap()["done"];
    assert_eq!(done["status"], "SUCCEEDED", "{events:?}");
    assert_eq!(done["outputs"][0]["path"], "errors/bulk_edit_errors.csv");
    let url = done["outputs"][0]["url"].as_str().unwrap();
    assert_eq!(get(&server, url, &as_ci).await.body, expected_report());
    let result = get(&server, done["page_url"].as_str().unwrap(), &as_ci)
        .await
        .text();
    assert!(result.contains("Succeeded: every step ran"), "{result}");
    assert!(result.contains("data-node=\"validate\""), "{result}");

    // Tenant `other` sees no trace of it.
    let other = sign_in(&server, "other-token").await;
    let as_other = [("cookie", other.as_str())];
    assert!(
        !get(&server, "/steps", &as_other)
            .await
            .text()
            .contains("bulk-edit-check")
    );
    let hidden = get(&server, "/workflows/bulk-edit-check", &as_other).await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    assert_eq!(get(&server, url, &as_other).await.status, 404);
}
