//! The HTML pages (maud): a layout with the navigation, then one function per page. Pages take
//! plain data (the gRPC messages the core answered with, and kept runs); they never call the
//! core themselves. Everything text is escaped by maud.

use maud::{DOCTYPE, Markup, html};

use crate::pb;
use crate::web::results::{KeptRun, Preview};

/// Who is looking, for the navigation.
#[derive(Debug)]
pub struct Nav<'a> {
    /// The tenant's name.
    pub tenant: &'a str,
    /// The session's CSRF token (for the sign-out form).
    pub csrf: &'a str,
    /// Whether the server has tenants (else there is no sign-out).
    pub signed_in: bool,
}

/// The page around `body`.
pub fn layout(title: &str, nav: Option<&Nav<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Stepbox" }
                link rel="stylesheet" href=(crate::web::assets::style_url());
            }
            body {
                header.top {
                    a.brand href="/steps" { "Stepbox" }
                    @if let Some(nav) = nav {
                        nav {
                            a href="/steps" { "Catalog" }
                            a href="/runs" { "History" }
                            span.who { "Signed in as " strong { (nav.tenant) } }
                            @if nav.signed_in {
                                form method="post" action="/signout" {
                                    input type="hidden" name="csrf" value=(nav.csrf);
                                    button.link type="submit" { "Sign out" }
                                }
                            }
                        }
                    }
                }
                main { (body) }
                script src=(crate::web::assets::script_url()) defer {}
            }
        }
    }
}

/// The sign-in page.
pub fn signin(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p.lead { "Enter the access token you were given. It is checked once; this browser then stays signed in until you sign out or stop using it for a while." }
            @if let Some(e) = error { div.notice.error role="alert" id="signin-error" { (e) } }
            form.card method="post" action="/signin" {
                label for="token" { "Access token" }
                input type="password" id="token" name="token" autocomplete="off" required;
                p { button type="submit" id="signin" { "Sign in" } }
            }
        },
    )
}

/// Formats a timestamp as `2026-11-27 09:12 UTC`.
pub fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A size for people: `387 bytes`, `12.3 KiB`.
pub fn size(n: u64) -> String {
    if n < 1024 {
        return format!("{n} bytes");
    }
    let units = ["KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// A run's status in words, and whether it is good news.
pub fn status_text(status: i32, exit_code: i32) -> (String, bool) {
    match pb::Status::try_from(status).unwrap_or(pb::Status::Unspecified) {
        pb::Status::Succeeded => (
            "Succeeded: it ran to the end and every check passed".into(),
            true,
        ),
        pb::Status::ChecksFailed => ("Finished, but some checks failed".into(), false),
        pb::Status::Failed => (
            format!("Failed: the step stopped with exit code {exit_code}"),
            false,
        ),
        pb::Status::TimedOut => ("Stopped: it ran out of time".into(), false),
        pb::Status::FuelExhausted => ("Stopped: it used up its computation budget".into(), false),
        pb::Status::MemoryExceeded => (
            "Stopped: it needed more memory than it may use".into(),
            false,
        ),
        pb::Status::OutputExceeded => ("Stopped: it wrote more output than it may".into(), false),
        pb::Status::Trapped => (
            "Crashed: the program hit a fault and was stopped".into(),
            false,
        ),
        pb::Status::Unspecified => ("Unknown".into(), false),
    }
}

/// A kept run's status in words (a workflow's in its own words).
pub fn run_words(run: &KeptRun) -> (String, bool) {
    match &run.workflow {
        Some(w) if w.status == "succeeded" => (
            "Succeeded: every step ran and passed its checks".into(),
            true,
        ),
        Some(_) => (
            "Failed: a step did not succeed (see the steps)".into(),
            false,
        ),
        None => status_text(run.response.status, run.response.exit_code),
    }
}

/// One step in the catalog, as the core described it.
#[derive(Debug)]
pub struct StepCard {
    /// From `ListSteps`.
    pub summary: pb::StepSummary,
    /// From `GetStep` (stages and the newest verified version), when it answered.
    pub detail: Option<pb::GetStepResponse>,
}

fn verification(v: &pb::StepVersion) -> Markup {
    let passed = v
        .case_results
        .iter()
        .filter(|c| c.status == pb::Status::Succeeded as i32)
        .count();
    let policies: Vec<&str> = {
        let mut p: Vec<&str> = v.case_results.iter().map(|c| c.policy.as_str()).collect();
        p.sort();
        p.dedup();
        p
    };
    html! {
        @if v.verified {
            span.badge.ok { "verified" }
        } @else {
            span.badge.bad { "unverified" }
        }
        " "
        span.meta {
            (passed) " of " (v.case_results.len()) " cases passed"
            @if !policies.is_empty() { " under policy " (policies.join(", ")) }
            ", " (when(v.created_at.as_ref())) " (v" (v.number) ")"
        }
    }
}

fn stage_list(stages: &[pb::StageAlias]) -> Markup {
    html! {
        ul.stages {
            @for s in stages {
                li {
                    strong { (s.stage) }
                    " → "
                    @if s.set { "v" (s.number) } @else { span.meta { "not set" } }
                }
            }
        }
    }
}

/// One workflow in the catalog.
#[derive(Debug)]
pub struct WorkflowCard {
    /// From `ListWorkflows`.
    pub summary: pb::WorkflowSummary,
    /// From `GetWorkflow`, when it answered.
    pub detail: Option<pb::GetWorkflowResponse>,
}

fn workflow_verification(v: &pb::WorkflowVersion) -> Markup {
    let passed = v.case_results.iter().filter(|c| c.passed).count();
    html! {
        @if v.verified { span.badge.ok { "verified" } } @else { span.badge.bad { "unverified" } }
        " "
        span.meta {
            (passed) " of " (v.case_results.len()) " cases passed, "
            (v.steps.len()) " steps, " (when(v.created_at.as_ref())) " (v" (v.number) ")"
        }
    }
}

/// The catalog: every step and workflow the tenant may run, with a search box.
pub fn catalog(
    nav: &Nav<'_>,
    query: &str,
    cards: &[StepCard],
    workflows: &[WorkflowCard],
    notice: Option<&str>,
) -> Markup {
    layout(
        "Catalog",
        Some(nav),
        html! {
            h1 { "Steps you can run" }
            p.lead { "Pick a step, upload your file, and get a checked result." }
            @if let Some(n) = notice { div.notice.warn { (n) } }
            form.search method="get" action="/steps" role="search" {
                input type="search" name="q" value=(query) placeholder="Search by name or description" aria-label="Search";
                button type="submit" { "Search" }
            }
            @if cards.is_empty() {
                p.meta id="no-steps" {
                    @if query.is_empty() { "No steps are published for you yet." }
                    @else { "No step matches “" (query) "”." }
                }
            }
            div.steps {
                @for c in cards {
                    div.card.step data-step=(c.summary.name) {
                        h2 { a href={ "/steps/" (c.summary.name) } { (c.summary.name) } }
                        p { (c.summary.description) }
                        @if let Some(d) = &c.detail {
                            @if let Some(v) = &d.selected { p { (verification(v)) } }
                            @else { p { span.badge.bad { "no verified version" } } }
                            (stage_list(&d.stages))
                        }
                    }
                }
            }
            @if !workflows.is_empty() {
                h2 { "Workflows" }
                div.steps {
                    @for w in workflows {
                        div.card.workflow data-workflow=(w.summary.name) {
                            h2 { a href={ "/workflows/" (w.summary.name) } { (w.summary.name) } }
                            p { (w.summary.description) }
                            @if let Some(d) = &w.detail {
                                @if let Some(v) = &d.selected { p { (workflow_verification(v)) } }
                                (stage_list(&d.stages))
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The version picker: every set stage (`prod` first choice), then the newest verified.
fn version_select(stages: &[pb::StageAlias], newest: Option<i64>) -> Markup {
    let set: Vec<&pb::StageAlias> = stages.iter().filter(|s| s.set).collect();
    let default_stage = if set.iter().any(|s| s.stage == "prod") {
        "prod".to_string()
    } else {
        set.last().map(|s| s.stage.clone()).unwrap_or_default()
    };
    html! {
        label for="ref" { "Version" }
        select id="ref" name="ref" {
            @for s in &set {
                option value=(s.stage) selected[s.stage == default_stage] {
                    (s.stage) " (v" (s.number) ")"
                }
            }
            @if let Some(n) = newest {
                option value="" selected[set.is_empty()] { "newest verified (v" (n) ")" }
            }
        }
    }
}

/// The workflow page: its inputs, its steps as a graph whose nodes take their state live, and
/// the run form.
pub fn workflow(nav: &Nav<'_>, wf: &pb::GetWorkflowResponse, max_upload: u64) -> Markup {
    let selected = wf.selected.as_ref();
    let runnable = selected.is_some() || wf.stages.iter().any(|s| s.set);
    layout(
        &wf.name,
        Some(nav),
        html! {
            h1 { (wf.name) }
            p.lead { (selected.map(|v| v.description.as_str()).unwrap_or_default()) }
            div.card {
                @if let Some(v) = selected { p { (workflow_verification(v)) } }
                (stage_list(&wf.stages))
            }
            @if let Some(v) = selected {
                h2 { "Steps" }
                ol.graph id="graph" {
                    @for (i, step) in v.steps.iter().enumerate() {
                        @if i > 0 { li.edge aria-hidden="true" { "↓" } }
                        li.node data-node=(step.id) {
                            strong { (step.id) }
                            span.meta { " " (if step.resolved_from.is_empty() { step.program.as_str() } else { step.resolved_from.as_str() }) }
                            span.state { "waiting" }
                        }
                    }
                }
            }
            @if !runnable {
                div.notice.warn { "This workflow has no verified version and no stage yet: there is nothing to run." }
            } @else {
                form.card id="run-form" method="post" action={ "/workflows/" (wf.name) "/run" } enctype="multipart/form-data" {
                    input type="hidden" name="csrf" value=(nav.csrf);
                    h2 { "Your files" }
                    @for name in selected.map(|v| v.inputs.as_slice()).unwrap_or_default() {
                        label for={ "input-" (name) } { (name) }
                        div.drop {
                            input type="file" id={ "input-" (name) } name={ "input." (name) };
                            p.hint { "Drop the file for the workflow's input " code { (name) } " here or choose it." }
                            p.chosen {}
                        }
                    }
                    p.meta { "At most " (size(max_upload)) " in all." }
                    (version_select(&wf.stages, selected.map(|v| v.number)))
                    p { button type="submit" id="run" { "Run" } }
                }
                div.notice.error id="run-error" role="alert" hidden {}
                section.card id="live" hidden {
                    div.live-head {
                        h2 id="live-state" { "Running…" }
                        span.elapsed id="elapsed" { "0.0 s" }
                    }
                    pre id="live-stdout" {}
                    pre.stderr id="live-stderr" hidden {}
                }
            }
        },
    )
}

fn workflow_steps(run: &pb::WorkflowRun) -> Markup {
    html! {
        h2 { "Steps" }
        ol.graph id="graph" {
            @for (i, s) in run.steps.iter().enumerate() {
                @let state = pb::WorkflowStepState::try_from(s.state).unwrap_or(pb::WorkflowStepState::Unspecified);
                @let good = matches!(state, pb::WorkflowStepState::Succeeded | pb::WorkflowStepState::Reused);
                @if i > 0 { li.edge aria-hidden="true" { "↓" } }
                li.node.ok[good].bad[!good] data-node=(s.id) {
                    strong { (s.id) }
                    span.meta { " " (s.version) }
                    span.state { (state.as_str_name().trim_start_matches("WORKFLOW_STEP_STATE_").to_ascii_lowercase()) }
                    @if !s.message.is_empty() { span.detail { (s.message) } }
                }
            }
        }
    }
}

/// Input file names a step's cases use, in first-seen order.
pub fn expected_inputs(def: &pb::StepDefinition) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for case in &def.cases {
        for f in &case.inputs {
            if !names.contains(&f.path) {
                names.push(f.path.clone());
            }
        }
    }
    names
}

/// The step page: what it does, what it expects, and the run form.
pub fn step(nav: &Nav<'_>, step: &pb::GetStepResponse, max_upload: u64) -> Markup {
    let selected = step.selected.as_ref();
    let def = selected.and_then(|v| v.definition.as_ref());
    let inputs = def.map(expected_inputs).unwrap_or_default();
    let takes_stdin = def.is_some_and(|d| d.cases.iter().any(|c| !c.stdin.is_empty()));
    let takes_args = def.is_some_and(|d| d.cases.iter().any(|c| !c.args.is_empty()));
    let set: Vec<&pb::StageAlias> = step.stages.iter().filter(|s| s.set).collect();
    let default_stage = if set.iter().any(|s| s.stage == "prod") {
        "prod".to_string()
    } else {
        set.last().map(|s| s.stage.clone()).unwrap_or_default()
    };
    let description = selected
        .map(|v| v.description.clone())
        .or_else(|| step.versions.last().map(|v| v.description.clone()))
        .unwrap_or_default();
    layout(
        &step.name,
        Some(nav),
        html! {
            h1 { (step.name) }
            p.lead { (description) }
            div.card {
                @if let Some(v) = selected { p { (verification(v)) } }
                (stage_list(&step.stages))
            }
            @if set.is_empty() && selected.is_none() {
                div.notice.warn { "This step has no verified version and no stage yet: there is nothing to run." }
            } @else {
                form.card id="run-form" method="post" action={ "/steps/" (step.name) "/run" } enctype="multipart/form-data" {
                    input type="hidden" name="csrf" value=(nav.csrf);
                    h2 { "Your files" }
                    @if inputs.is_empty() {
                        p.meta { "Its examples use no input files; add any the step needs below." }
                    }
                    @for name in &inputs {
                        label for={ "input-" (name) } { (name) }
                        div.drop {
                            input type="file" id={ "input-" (name) } name={ "input." (name) };
                            p.hint { "Drop the file here or choose it; it is given to the step as " code { (name) } "." }
                            p.chosen {}
                        }
                    }
                    details {
                        summary { "Other files" }
                        div.drop {
                            input type="file" id="more-files" name="files" multiple;
                            p.hint { "Drop more files here; each keeps its own name." }
                            p.chosen {}
                        }
                    }
                    p.meta { "At most " (size(max_upload)) " in all." }
                    @if takes_stdin {
                        label for="stdin" { "Standard input" }
                        textarea id="stdin" name="stdin" {}
                    }
                    @if takes_args {
                        label for="args" { "Arguments (one per line)" }
                        textarea id="args" name="args" {}
                    }
                    label for="ref" { "Version" }
                    select id="ref" name="ref" {
                        @for s in &set {
                            option value=(s.stage) selected[s.stage == default_stage] {
                                (s.stage) " (v" (s.number) ")"
                            }
                        }
                        @if let Some(v) = selected {
                            option value="" selected[set.is_empty()] { "newest verified (v" (v.number) ")" }
                        }
                    }
                    p { button type="submit" id="run" { "Run" } }
                }
                div.notice.error id="run-error" role="alert" hidden {}
                section.card id="live" hidden {
                    div.live-head {
                        h2 id="live-state" { "Running…" }
                        span.elapsed id="elapsed" { "0.0 s" }
                    }
                    pre id="live-stdout" {}
                    pre.stderr id="live-stderr" hidden {}
                }
            }
        },
    )
}

fn checks(results: &[pb::CheckResult]) -> Markup {
    html! {
        @if results.is_empty() {
            p.meta { "No checks ran." }
        } @else {
            ul.checks id="checks" {
                @for c in results {
                    li.check data-passed=(c.passed) {
                        @if c.passed { span.mark.ok { "passed" } } @else { span.mark.bad { "FAILED" } }
                        (c.name)
                        @if !c.detail.is_empty() { span.detail { (c.detail) } }
                    }
                }
            }
        }
    }
}

fn output_preview(run: &KeptRun, i: usize, preview: &Preview) -> Markup {
    html! {
        @match preview {
            Preview::Csv(rows, more) => {
                div.scroll {
                    table.csv-preview {
                        @for (n, row) in rows.iter().enumerate() {
                            tr {
                                @for cell in row {
                                    @if n == 0 { th { (cell) } } @else { td { (cell) } }
                                }
                            }
                        }
                    }
                }
                @if *more { p.meta { "First rows only: download the file for the rest." } }
            }
            Preview::Json(text) => { pre { (text) } }
            Preview::Image(_) => {
                img.preview src={ "/runs/" (run.run_id) "/outputs/" (i) "?inline=1" } alt=(run.files[i].path);
            }
            Preview::None => {}
        }
    }
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The result of a kept run: status, checks, outputs with downloads and previews, manifest.
pub fn result(nav: &Nav<'_>, run: &KeptRun) -> Markup {
    let r = &run.response;
    let (words, good) = match &run.workflow {
        Some(w) if w.status == "succeeded" => (
            "Succeeded: every step ran and passed its checks".to_string(),
            true,
        ),
        Some(_) => (
            "Failed: a step did not succeed (see the steps below)".to_string(),
            false,
        ),
        None => status_text(r.status, r.exit_code),
    };
    let manifest = r.manifest.as_ref();
    let downloadable = run.files.iter().any(|f| f.disk.is_some());
    layout(
        "Result",
        Some(nav),
        html! {
            h1 { "Result of " (run.step_ref) }
            div.card {
                p.status.ok[good].bad[!good] id="status" { (words) }
                @if !r.message.is_empty() { p id="message" { (r.message) } }
                p.meta {
                    "Run " code { (r.run_id) }
                    @if let Some(u) = &r.usage { " · took " (format!("{:.2}", u.wall_time_us as f64 / 1e6)) " s" }
                    @if let Some(m) = manifest { @if m.step_version > 0 { " · " (m.step_name) " v" (m.step_version) } }
                }
            }
            @if let Some(w) = &run.workflow { (workflow_steps(w)) }
            h2 { "Output" }
            pre id="stdout" { (text_of(&r.stdout)) }
            @if r.stdout_truncated { p.meta { "(cut at its limit)" } }
            @if !r.stderr.is_empty() {
                h2 { "Messages (stderr)" }
                pre.stderr id="stderr" { (text_of(&r.stderr)) }
            }
            h2 { "Checks" }
            div.card { (checks(&r.check_results)) }
            h2 { "Files" }
            @if run.files.is_empty() {
                p.meta { "The step left no files." }
            } @else {
                @if run.files_dropped {
                    div.notice.warn { "These files were too large to keep for download on this server." }
                }
                @if downloadable {
                    p { a.button id="zip" href={ "/runs/" (r.run_id) "/outputs.zip" } { "Download all (zip)" } }
                }
                @for (i, f) in run.files.iter().enumerate() {
                    div.card.output {
                        p {
                            strong { (f.path) } " "
                            span.meta { (size(f.size)) }
                            " "
                            @if f.disk.is_some() {
                                a.download href={ "/runs/" (r.run_id) "/outputs/" (i) } download=(base_name(&f.path)) { "Download" }
                            }
                            @if !f.symlink_target.is_empty() { span.meta { " symlink to " code { (f.symlink_target) } " (not followed)" } }
                        }
                        @if f.disk.is_some() { (output_preview(run, i, &f.preview)) }
                    }
                }
            }
            h2 { "Proof" }
            div.card {
                p { "Manifest digest: " code id="manifest-digest" { (manifest.map(|m| m.digest.as_str()).unwrap_or("-")) } }
                @if let Some(m) = manifest { @if !m.step_digest.is_empty() {
                    p.meta { "Exact code that ran: " code { (m.step_digest) } }
                } }
            }
        },
    )
}

/// A run that is in the history but whose outputs are no longer kept.
pub fn record(nav: &Nav<'_>, r: &pb::RunRecord) -> Markup {
    let (words, good) = status_text(r.status, r.exit_code);
    let manifest = r.manifest.as_ref();
    layout(
        "Run",
        Some(nav),
        html! {
            h1 { "Run " (r.run_id) }
            div.card {
                p.status.ok[good].bad[!good] id="status" { (words) }
                @if !r.message.is_empty() { p { (r.message) } }
                p.meta { "Finished " (when(r.finished_at.as_ref())) }
            }
            div.notice.warn { "Its files are no longer kept on this server; this is its record." }
            h2 { "Checks" }
            div.card { (checks(&r.check_results)) }
            h2 { "Proof" }
            div.card {
                p { "Manifest digest: " code id="manifest-digest" { (manifest.map(|m| m.digest.as_str()).unwrap_or("-")) } }
                @if let Some(m) = manifest {
                    @if !m.outputs.is_empty() {
                        table { tr { th { "Output" } th { "sha256" } }
                            @for o in &m.outputs { tr { td { (o.path) } td.mono { (o.sha256) } } } }
                    }
                }
            }
        },
    )
}

/// The tenant's recent runs.
pub fn history(
    nav: &Nav<'_>,
    runs: &[pb::RunRecord],
    next_page_token: &str,
    kept: &dyn Fn(&str) -> bool,
) -> Markup {
    layout(
        "History",
        Some(nav),
        html! {
            h1 { "Your recent runs" }
            @if runs.is_empty() { p.meta id="no-runs" { "No runs yet." } }
            @else {
                div.scroll {
                    table id="runs" {
                        tr { th { "When" } th { "Step" } th { "Result" } th { "" } }
                        @for r in runs {
                            @let (words, good) = status_text(r.status, r.exit_code);
                            tr.run data-run=(r.run_id) {
                                td { (when(r.submitted_at.as_ref())) }
                                td {
                                    @match r.manifest.as_ref().filter(|m| m.step_version > 0) {
                                        Some(m) => { (m.step_name) " v" (m.step_version) }
                                        None => { span.meta { "inline step" } }
                                    }
                                }
                                td { span.badge.ok[good].bad[!good] { (words) } }
                                td {
                                    a href={ "/runs/" (r.run_id) } {
                                        @if kept(&r.run_id) { "Result and files" } @else { "Record" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if !next_page_token.is_empty() {
                    p { a href={ "/runs?page_token=" (next_page_token) } { "Older runs" } }
                }
            }
        },
    )
}

/// An error page: what happened, in words.
pub fn error(nav: Option<&Nav<'_>>, title: &str, message: &str) -> Markup {
    layout(
        title,
        nav,
        html! {
            h1 { (title) }
            div.notice.error role="alert" id="error" { (message) }
            p { a href="/steps" { "Back to the catalog" } }
        },
    )
}

/// The last component of a `/`-separated path.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
