//! `stepbox step`: the catalog from the real binary, on a private default database (HOME and
//! XDG_DATA_HOME point into a temporary directory): publish, promote, run by reference with the
//! same output and exit codes as `stepbox run`, show, history, refusals, and the other doors
//! (`generate --publish`, `import --publish`).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::common::*;

/// `stepbox ARGS` in `dir` with the default catalog under `dir/data`.
fn stepbox(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().expect("stepbox runs")
}

fn command(dir: &Path) -> std::process::Command {
    let mut c = stepbox_command(dir);
    c.env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("USER", "tester")
        .env_remove("STEPBOX_CONFIG")
        .env_remove("STEPBOX_CATALOG_DATABASE")
        .env_remove("STEPBOX_SERVER")
        .env_remove("STEPBOX_TOKEN");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn examples() -> PathBuf {
    root().join("examples")
}

fn example_step() -> String {
    examples()
        .join("bulk-edit-validator/step.toml")
        .display()
        .to_string()
}

fn csv() -> String {
    examples().join("bulk_edit.csv").display().to_string()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&o.stdout), text(&o.stderr)))
}

#[test]
fn publish_promote_and_run_the_example_by_reference() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let example = example_step();

    let first = ok(&stepbox(dir, &["step", "publish", &example]));
    assert!(
        first.contains("case sample: passed (SUCCEEDED, 5/5 checks passed"),
        "{first}"
    );
    let digest = first
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("bulk-edit-validator@v1 sha256:"))
        .and_then(|l| l.strip_suffix(" (verified, new)"))
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    assert_eq!(digest.len(), 64);
    assert!(
        dir.join("data/stepbox/catalog.db").is_file(),
        "the default catalog lives under XDG_DATA_HOME"
    );

    // The same content again is the same version, and nothing runs.
    let again = ok(&stepbox(dir, &["step", "publish", &example]));
    assert!(
        again.ends_with(&format!(
            "bulk-edit-validator@v1 sha256:{digest} (verified, already published: nothing ran)\n"
        )),
        "{again}"
    );
    let j = json(&stepbox(dir, &["step", "publish", &example, "--json"]));
    assert_eq!(j["version"]["number"], 1);
    assert_eq!(j["version"]["digest"], digest.as_str());
    assert_eq!(j["created"], false);

    for stage in ["staging", "prod"] {
        let p = ok(&stepbox(
            dir,
            &["step", "promote", "bulk-edit-validator@v1", "--to", stage],
        ));
        assert!(
            p.contains(&format!(
                "promoted bulk-edit-validator@v1 to {stage} (was (unset); policy default)"
            )),
            "{p}"
        );
    }

    // By reference: byte for byte what `stepbox run` gives on the same program and input.
    let by_ref = stepbox(
        dir,
        &[
            "step",
            "run",
            "bulk-edit-validator@prod",
            "--input",
            &csv(),
            "--output-dir",
            "by-ref",
        ],
    );
    let program = examples().join("validate_bulk_edit.py");
    let inline = stepbox(
        dir,
        &[
            "run",
            "--input",
            &csv(),
            "--output-dir",
            "inline",
            program.to_str().unwrap(),
        ],
    );
    assert_eq!(ok(&by_ref), ok(&inline));
    assert_eq!(by_ref.stderr, inline.stderr);
    let report = std::fs::read(dir.join("by-ref/bulk_edit_errors.csv")).unwrap();
    assert_eq!(
        report,
        std::fs::read(dir.join("inline/bulk_edit_errors.csv")).unwrap()
    );
    assert_eq!(
        report,
        std::fs::read(examples().join("bulk-edit-validator/expected/bulk_edit_errors.csv"))
            .unwrap()
    );

    // A failing run: the same status, exit code and status line as `stepbox run`.
    std::fs::write(dir.join("other.csv"), "a,b\n1,2\n").unwrap();
    let by_ref = stepbox(
        dir,
        &[
            "step",
            "run",
            "bulk-edit-validator@prod",
            "--input",
            "other.csv",
        ],
    );
    let inline = stepbox(
        dir,
        &["run", "--input", "other.csv", program.to_str().unwrap()],
    );
    assert_eq!(inline.status.code(), Some(1), "{}", text(&inline.stderr));
    assert_eq!(by_ref.status.code(), inline.status.code());
    for o in [&by_ref, &inline] {
        let e = text(&o.stderr);
        assert!(
            e.contains("FileNotFoundError")
                && e.ends_with("stepbox: FAILED: the step exited with code 1\n"),
            "{e}"
        );
    }

    // --json: the manifest records exactly which version ran.
    let j = json(&stepbox(
        dir,
        &[
            "step",
            "run",
            "bulk-edit-validator",
            "--input",
            &csv(),
            "--json",
        ],
    ));
    assert_eq!(j["status"], "SUCCEEDED");
    assert_eq!(j["manifest"]["step"]["name"], "bulk-edit-validator");
    assert_eq!(j["manifest"]["step"]["version"], 1);
    assert_eq!(j["manifest"]["step"]["digest"], digest.as_str());
    let names: Vec<&str> = j["check_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["report written", "report header", "summary line"]);

    let list = ok(&stepbox(dir, &["step", "list"]));
    assert!(
        list.starts_with("bulk-edit-validator") && list.contains("v1") && list.contains("verified"),
        "{list}"
    );
    assert!(
        ok(&stepbox(
            dir,
            &["step", "list", "--filter", "nothing-like-it"]
        ))
        .contains("no steps")
    );

    let show = ok(&stepbox(dir, &["step", "show", "bulk-edit-validator"]));
    for want in [
        "dev        -> (unset)",
        "staging    -> v1",
        "prod       -> v1",
        "by local:tester",
        "verified   1/1 cases passed",
        "latest verified: bulk-edit-validator@v1",
    ] {
        assert!(show.contains(want), "{want:?} not in\n{show}");
    }
    let one = ok(&stepbox(dir, &["step", "show", "bulk-edit-validator@prod"]));
    for want in [
        format!("bulk-edit-validator@v1  sha256:{digest}").as_str(),
        "state:       verified",
        "stages:      staging, prod",
        "origin:      file ../validate_bulk_edit.py",
        "inputs:      bulk_edit.csv",
        "contract:    report written, report header, summary line",
        "case sample: passed",
    ] {
        assert!(one.contains(want), "{want:?} not in\n{one}");
    }
}

/// A copy of the example whose expected stdout is wrong: its case fails.
fn broken_example(dir: &Path) -> PathBuf {
    let src = examples().join("bulk-edit-validator");
    let dst = dir.join("broken");
    std::fs::create_dir_all(dst.join("expected")).unwrap();
    let toml = std::fs::read_to_string(src.join("step.toml"))
        .unwrap()
        .replace("../", &format!("{}/", examples().display()))
        .replace(
            "expected_stdout_file = \"expected/stdout.txt\"",
            "expected_stdout = \"8 rows checked, 0 problems\\n\"",
        );
    std::fs::write(dst.join("step.toml"), toml).unwrap();
    std::fs::copy(
        src.join("expected/bulk_edit_errors.csv"),
        dst.join("expected/bulk_edit_errors.csv"),
    )
    .unwrap();
    dst.join("step.toml")
}

#[test]
fn failing_cases_unverified_versions_and_refused_promotions() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let broken = broken_example(dir);
    let broken = broken.to_str().unwrap();

    // Cases fail: nothing is stored, exit 1, and the failing check says why.
    let o = stepbox(dir, &["step", "publish", broken]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("case sample: FAILED (CHECKS_FAILED")
            && out.contains("FAILED: ")
            && out.contains("not published: 1 of 1 cases failed: sample"),
        "{out}"
    );
    assert_eq!(
        stepbox(dir, &["step", "show", "bulk-edit-validator"])
            .status
            .code(),
        Some(2),
        "nothing was stored"
    );

    // --unverified keeps it, marked so.
    let out = ok(&stepbox(dir, &["step", "publish", broken, "--unverified"]));
    assert!(
        out.contains("bulk-edit-validator@v1 sha256:") && out.contains("(UNVERIFIED, new)"),
        "{out}"
    );
    // An unverified version may enter the first stage (a draft): its cases are re-run for the
    // record and still show the failure; past the first stage it is refused as unverified.
    let o = stepbox(
        dir,
        &["step", "promote", "bulk-edit-validator@v1", "--to", "dev"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("check stdout_equals: FAILED: stdout differs"),
        "{out}"
    );
    let o = stepbox(
        dir,
        &["step", "promote", "bulk-edit-validator@v1", "--to", "prod"],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(
        out.contains(
            "refused: bulk-edit-validator@v1 to prod: bulk-edit-validator@v1 is unverified"
        ),
        "{out}"
    );

    // The real example becomes v2 and passes its cases again on promotion.
    ok(&stepbox(dir, &["step", "publish", &example_step()]));
    ok(&stepbox(
        dir,
        &["step", "promote", "bulk-edit-validator@v2", "--to", "prod"],
    ));

    // Refusals of the request itself: exit 2, naming what is wrong.
    let o = stepbox(
        dir,
        &["step", "promote", "bulk-edit-validator@v2", "--to", "qa"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("unknown stage `qa`"),
        "{}",
        text(&o.stderr)
    );
    let o = stepbox(dir, &["step", "run", "bulk-edit-validator@v9"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("bulk-edit-validator@v9"),
        "{}",
        text(&o.stderr)
    );
    let o = stepbox(dir, &["step", "run", "Bulk@prod"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("invalid `step_ref`"),
        "{}",
        text(&o.stderr)
    );

    let history = ok(&stepbox(dir, &["step", "history", "bulk-edit-validator"]));
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}");
    assert!(
        lines[0].contains("prod       (unset) -> v2  accepted  by local:tester: "),
        "{history}"
    );
    assert!(
        lines[1].contains("prod       (unset) -> v1  REFUSED  by local:tester: ")
            && lines[1].contains("is unverified"),
        "{history}"
    );
    assert!(
        lines[2].contains("dev        (unset) -> v1  accepted  by local:tester: "),
        "{history}"
    );

    // The unverified version's failing check shows in `show`.
    let show = ok(&stepbox(dir, &["step", "show", "bulk-edit-validator@v1"]));
    assert!(
        show.contains("state:       unverified")
            && show.contains("stages:      dev")
            && show.contains("case sample: FAILED")
            && show.contains("check stdout_equals"),
        "{show}"
    );
}

#[test]
fn a_malformed_step_toml_exits_2_naming_the_file_key_and_reason() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::write(dir.join("s.py"), "print(1)\n").unwrap();
    let cases = [
        (
            "name = \"s\"\ndescription = \"d\"\nprogram = \"s.py\"\ncolour = \"red\"\n",
            &["unknown field `colour`"][..],
        ),
        (
            "name = \"s\"\ndescription = \"d\"\nprogram = \"s.py\"\n[[contract]]\nkind = \"file_size\"\n",
            &["key `contract[0].kind`", "unknown check kind `file_size`"][..],
        ),
        (
            "name = \"S s\"\ndescription = \"d\"\nprogram = \"s.py\"\n",
            &["key `name`", "is not a step name"][..],
        ),
    ];
    for (toml, wants) in cases {
        std::fs::write(dir.join("step.toml"), toml).unwrap();
        // The default file is ./step.toml.
        let o = stepbox(dir, &["step", "publish"]);
        assert_eq!(o.status.code(), Some(2));
        let e = text(&o.stderr);
        assert!(e.contains("`step.toml`: "), "{e}");
        for w in wants {
            assert!(e.contains(w), "{w:?} not in {e}");
        }
    }
    assert!(
        !dir.join("data/stepbox/catalog.db").exists(),
        "a malformed file is refused before the catalog is opened"
    );
}

#[test]
fn a_failed_contract_is_checks_failed_exit_8_like_stepbox_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::write(
        dir.join("echo.py"),
        "print(open('/input/in.txt').read().strip())\n",
    )
    .unwrap();
    std::fs::write(dir.join("in.txt"), "ok then\n").unwrap();
    std::fs::write(
        dir.join("step.toml"),
        r#"
name = "echo"
description = "Prints in.txt"
program = "echo.py"
[[cases]]
name = "ok"
inputs = { "in.txt" = "in.txt" }
expected_stdout = "ok then\n"
[[contract]]
kind = "stdout_matches"
regex = "^ok"
"#,
    )
    .unwrap();
    ok(&stepbox(dir, &["step", "publish"]));
    std::fs::create_dir(dir.join("bad")).unwrap();
    std::fs::write(dir.join("bad/in.txt"), "not ok\n").unwrap();
    let by_ref = stepbox(dir, &["step", "run", "echo@v1", "--input", "bad/in.txt"]);
    let inline = stepbox(
        dir,
        &[
            "run",
            "--input",
            "bad/in.txt",
            "--check",
            "stdout_matches=^ok",
            "echo.py",
        ],
    );
    assert_eq!(inline.status.code(), Some(8), "{}", text(&inline.stderr));
    assert_eq!(by_ref.status.code(), Some(8), "{}", text(&by_ref.stderr));
    assert_eq!(by_ref.stdout, b"not ok\n");
    assert_eq!(by_ref.stdout, inline.stdout);
    // The same verdict line and status line as `stepbox run --check`.
    let e = text(&by_ref.stderr);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].starts_with("stepbox: check ")
            && lines[0].contains(": FAILED: stdout does not match"),
        "{e}"
    );
    assert!(lines[1].starts_with("stepbox: CHECKS_FAILED: "), "{e}");
    let inline_e = text(&inline.stderr);
    assert_eq!(lines[1], inline_e.lines().last().unwrap(), "{inline_e}");
}

#[tokio::test]
async fn generate_publish_stores_the_verified_program_with_its_transcript() {
    use crate::generate::{Scripted, fake_model};
    let model = fake_model(vec![Scripted::Reply(
        "```python\nprint(open('/input/in.txt').read().strip()[::-1])\n```".into(),
    )])
    .await;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    std::fs::write(dir.join("in.txt"), "abc\n").unwrap();
    std::fs::write(dir.join("want.txt"), "cba\n").unwrap();
    let url = model.base_url.clone();
    let run = move |args: Vec<&'static str>| {
        let (dir, url) = (dir.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            command(&dir)
                .args(args)
                .env("OPENAI_BASE_URL", &url)
                .output()
                .unwrap()
        })
    };
    let generate = |extra: Vec<&'static str>| {
        let mut a = vec![
            "generate",
            "--requirements",
            "Reverse the text of in.txt.",
            "--input",
            "in.txt",
            "--model",
            "m",
            "-o",
            "step.py",
            "--publish",
            "reverser",
        ];
        a.extend(extra);
        a
    };
    // Without checks nothing could show that it works: refused before the model is asked.
    let o = run(generate(vec![])).await.unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--publish needs checks"));
    assert_eq!(model.requests().len(), 0);

    let o = run(generate(vec!["--expect-stdout", "want.txt"]))
        .await
        .unwrap();
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{e}");
    assert!(
        e.contains("case sample: passed") && e.contains("reverser@v1 sha256:"),
        "{e}"
    );
    assert!(e.contains("(verified, new)"), "{e}");

    let o = run(vec!["step", "show", "reverser@v1", "--json"])
        .await
        .unwrap();
    let j = json(&o);
    let def = &j["selected"]["definition"];
    assert_eq!(def["description"], "Reverse the text of in.txt.");
    assert_eq!(def["origin"]["type"], "generated");
    assert_eq!(def["origin"]["model"], "m");
    assert!(
        def["origin"]["transcript"]["messages"]
            .as_array()
            .is_some_and(|m| m.len() >= 3),
        "{def}"
    );
    assert_eq!(def["cases"][0]["inputs"]["in.txt"], "abc\n");
    assert_eq!(def["cases"][0]["checks"][0]["kind"], "stdout_equals");

    std::fs::create_dir(d.path().join("x")).unwrap();
    std::fs::write(d.path().join("x/in.txt"), "hello\n").unwrap();
    let o = run(vec!["step", "run", "reverser", "--input", "x/in.txt"])
        .await
        .unwrap();
    assert_eq!(ok(&o), "olleh\n");
}

#[test]
fn import_publish_keeps_the_conversation_with_its_recorded_outputs_as_the_case() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let fixtures = root().join("executor/tests/fixtures/conversations");
    let page = fixtures.join("bulk-edit-validator.share.html");
    let input = fixtures.join("bulk_edit.csv");
    let out = ok(&stepbox(
        dir,
        &[
            "import",
            page.to_str().unwrap(),
            "--publish",
            "bulk-edit-import",
            "--input",
            input.to_str().unwrap(),
        ],
    ));
    assert!(
        out.contains("Published:\ncase conversation: passed")
            && out.contains("bulk-edit-import@v1 sha256:")
            && out.contains("(verified, new)"),
        "{out}"
    );
    let j = json(&stepbox(
        dir,
        &["step", "show", "bulk-edit-import", "--json"],
    ));
    let def = &j["selected"]["definition"];
    assert_eq!(def["origin"]["type"], "conversation");
    assert_eq!(def["layout"], "mnt-data");
    assert_eq!(def["description"], def["origin"]["title"]);
    assert_eq!(def["contract"][0]["kind"], "file_exists");
    assert_eq!(def["contract"][0]["path"], "bulk_edit_errors.csv");
    assert_eq!(def["cases"][0]["checks"][0]["kind"], "stdout_equals");

    let o = stepbox(
        dir,
        &[
            "step",
            "run",
            "bulk-edit-import",
            "--input",
            input.to_str().unwrap(),
            "--output-dir",
            "out",
        ],
    );
    assert!(ok(&o).contains("8 rows checked, 9 problems"));
    assert!(dir.join("out/bulk_edit_errors.csv").is_file());

    // Without the conversation's inputs there is no case to publish.
    let o = stepbox(dir, &["import", page.to_str().unwrap(), "--publish", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--input"), "{}", text(&o.stderr));
}

/// A `stepbox serve` on `dir`'s default catalog, with a tenant `ci` that may publish and promote
/// (token `ci-token`) and a tenant `reader` that may only run (token `reader-token`).
struct Server {
    child: std::process::Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path) -> Server {
        use std::io::BufRead;
        use stepbox::service::config::hash_token;
        let config = dir.join("stepbox.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\naddr = \"127.0.0.1:0\"\n\
                 [[tenants]]\nname = \"ci\"\ntokens = [\"{}\"]\ncatalog = [\"run\", \"publish\", \"promote\"]\n\
                 [[tenants]]\nname = \"reader\"\ntokens = [\"{}\"]\n",
                hash_token("ci-token"),
                hash_token("reader-token")
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
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("stepbox serve said {line:?}"))
            .to_string();
        Server {
            child,
            url: format!("http://{addr}"),
        }
    }
}

#[test]
fn with_server_the_same_commands_go_to_stepbox_serve() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let server = Server::start(dir);
    let remote = |token: Option<&str>, args: &[&str]| {
        let mut c = command(dir);
        c.env("STEPBOX_SERVER", &server.url);
        if let Some(t) = token {
            c.env("STEPBOX_TOKEN", t);
        }
        c.args(args).output().unwrap()
    };
    let ci = |args: &[&str]| remote(Some("ci-token"), args);
    let example = example_step();

    let out = ok(&ci(&["step", "publish", &example]));
    assert!(
        out.starts_with("case sample: passed (SUCCEEDED, 5/5 checks passed, policy default")
            && out.contains("bulk-edit-validator@v1 sha256:")
            && out.ends_with(" (verified, new)\n"),
        "{out}"
    );
    // Locally, the same database shows what the server stored, published by tenant `ci`.
    let local = ok(&stepbox(dir, &["step", "publish", &example]));
    assert!(
        local.ends_with("(verified, already published: nothing ran)\n"),
        "{local}"
    );
    assert_eq!(
        json(&stepbox(
            dir,
            &["step", "show", "bulk-edit-validator@v1", "--json"]
        ))["selected"]["created_by"],
        "ci"
    );

    let p = ok(&ci(&[
        "step",
        "promote",
        "bulk-edit-validator@v1",
        "--to",
        "prod",
    ]));
    assert!(
        p.contains("promoted bulk-edit-validator@v1 to prod (was (unset); policy default)"),
        "{p}"
    );

    // A run by reference through the server: the same bytes and exit codes as `stepbox run`.
    let by_ref = ci(&[
        "step",
        "run",
        "bulk-edit-validator@prod",
        "--input",
        &csv(),
        "--output-dir",
        "remote-out",
    ]);
    let program = examples().join("validate_bulk_edit.py");
    let inline = stepbox(
        dir,
        &[
            "run",
            "--input",
            &csv(),
            "--output-dir",
            "inline-out",
            program.to_str().unwrap(),
        ],
    );
    assert_eq!(ok(&by_ref), ok(&inline));
    assert_eq!(
        std::fs::read(dir.join("remote-out/bulk_edit_errors.csv")).unwrap(),
        std::fs::read(dir.join("inline-out/bulk_edit_errors.csv")).unwrap()
    );
    std::fs::write(dir.join("other.csv"), "a,b\n1,2\n").unwrap();
    let failing = remote(
        Some("reader-token"),
        &[
            "step",
            "run",
            "bulk-edit-validator@prod",
            "--input",
            "other.csv",
        ],
    );
    assert_eq!(failing.status.code(), Some(1), "{}", text(&failing.stderr));
    assert!(
        text(&failing.stderr).ends_with("stepbox: FAILED: the step exited with code 1\n"),
        "{}",
        text(&failing.stderr)
    );
    let j = json(&ci(&[
        "step",
        "run",
        "bulk-edit-validator@prod",
        "--input",
        &csv(),
        "--json",
    ]));
    assert_eq!(j["status"], "SUCCEEDED");
    assert_eq!(j["manifest"]["step"]["name"], "bulk-edit-validator");
    assert_eq!(j["manifest"]["step"]["version"], 1);
    assert_eq!(j["outputs"][0]["path"], "bulk_edit_errors.csv");

    let show = ok(&ci(&["step", "show", "bulk-edit-validator"]));
    assert!(
        show.contains("prod       -> v1") && show.contains("by ci"),
        "{show}"
    );
    let one = ok(&ci(&["step", "show", "bulk-edit-validator@prod"]));
    assert!(
        one.contains("stages:      prod")
            && one.contains("contract:    report written, report header, summary line"),
        "{one}"
    );
    assert!(ok(&ci(&["step", "list", "--filter", "bulk-edit"])).starts_with("bulk-edit-validator"));
    let history = ok(&ci(&["step", "history", "bulk-edit-validator"]));
    assert!(
        history.contains("prod       (unset) -> v1  accepted  by ci: "),
        "{history}"
    );

    // Refusals come back as the server's words, exit 2.
    let o = remote(Some("reader-token"), &["step", "publish", &example]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("PermissionDenied")
            && text(&o.stderr).contains("tenant `reader` may not publish steps"),
        "{}",
        text(&o.stderr)
    );
    let o = remote(None, &["step", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("Unauthenticated"),
        "{}",
        text(&o.stderr)
    );
    let o = ci(&["step", "promote", "bulk-edit-validator@v1", "--to", "qa"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("unknown stage `qa`"),
        "{}",
        text(&o.stderr)
    );
    let o = ci(&["step", "run", "bulk-edit-validator@v7"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("NotFound"), "{}", text(&o.stderr));
}
