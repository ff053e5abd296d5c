//! The handlers. Each one finds the tenant (session cookie, bearer token, or the local user),
//! calls the [`StepService`] through its gRPC trait methods with that tenant attached, and
//! renders what the core answered. Core errors keep their words; their gRPC code becomes the
//! HTTP status ([`http_status`]).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Form, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::pb;
use crate::pb::step_catalog_server::StepCatalog;
use crate::pb::step_executor_server::StepExecutor;
use crate::pb::step_workflows_server::StepWorkflows;
use crate::service::StepService;
use crate::service::config::CatalogPermission;
use crate::service::tenancy::{Tenant, Tenants};
use crate::web::WebOptions;
use crate::web::pages::{self, Nav, StepCard, WorkflowCard};
use crate::web::results::{KeptRun, Preview, Results};
use crate::web::session::{Session, Sessions, same_origin};
use crate::web::upload::{self, UploadError};

/// The media type of the live event stream.
const NDJSON: &str = "application/x-ndjson";

/// Bytes read from disk per chunk of a download.
const CHUNK: usize = 64 << 10;

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct App {
    service: StepService,
    tenants: Arc<Tenants>,
    sessions: Arc<Sessions>,
    /// The kept runs.
    pub results: Arc<Results>,
    options: WebOptions,
    uploads: PathBuf,
    /// The private directory (uploads and kept outputs); removed when the last handle drops.
    _dir: Arc<tempfile::TempDir>,
}

impl App {
    /// The handlers' state on `service`: makes the private directory under
    /// `options.parent_dir`.
    pub fn new(service: StepService, options: WebOptions) -> anyhow::Result<App> {
        use anyhow::Context;
        std::fs::create_dir_all(&options.parent_dir).with_context(|| {
            format!(
                "failed to create the web directory's parent `{}`",
                options.parent_dir.display()
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("stepbox-web-")
            .tempdir_in(&options.parent_dir)
            .with_context(|| {
                format!(
                    "failed to create the web directory under `{}`",
                    options.parent_dir.display()
                )
            })?;
        let uploads = dir.path().join("uploads");
        let kept = dir.path().join("results");
        std::fs::create_dir(&uploads)?;
        std::fs::create_dir(&kept)?;
        Ok(App {
            service,
            tenants: options.tenants.clone(),
            sessions: Arc::new(Sessions::new(options.session_idle)),
            results: Arc::new(Results::new(
                kept,
                options.keep_runs,
                options.keep_bytes,
                options.keep_for,
            )),
            uploads,
            options,
            _dir: Arc::new(dir),
        })
    }

    fn local(&self) -> Option<Arc<Tenant>> {
        (!self.tenants.required())
            .then(|| {
                self.tenants
                    .authenticate(&tonic::metadata::MetadataMap::new())
            })
            .and_then(Result::ok)
    }

    fn upload_limits(&self) -> upload::Limits {
        upload::Limits {
            max_bytes: self.options.max_upload_bytes,
            max_files: self.options.max_upload_files,
        }
    }
}

/// The routes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/steps") }))
        .route("/assets/{version}/{file}", get(asset))
        .route("/signin", get(signin_form).post(signin))
        .route("/signout", post(signout))
        .route("/steps", get(catalog))
        .route("/steps/{name}", get(step_page))
        .route(
            "/steps/{name}/run",
            post(run_from_page).layer(DefaultBodyLimit::disable()),
        )
        .route("/workflows/{name}", get(workflow_page))
        .route(
            "/workflows/{name}/run",
            post(run_workflow_from_page).layer(DefaultBodyLimit::disable()),
        )
        .route("/runs", get(history))
        .route("/runs/{id}", get(run_page))
        .route("/runs/{id}/outputs.zip", get(download_zip))
        .route("/runs/{id}/outputs/{n}", get(download))
        .route(
            "/api/v1/steps/{spec}",
            post(api_run).layer(DefaultBodyLimit::disable()),
        )
        .fallback(not_found)
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

/// Headers every answer carries: no framing, no sniffing, no referrer to other sites, and a content policy
/// that allows only this server's own script, style and images.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // `same-origin`, not `no-referrer`: under `no-referrer` browsers send `Origin: null` on form
    // posts, which the origin check must refuse (sandboxed frames send it too).
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// A request to the core on behalf of `tenant`, as the gRPC interceptor would make it.
fn core_request<T>(tenant: &Arc<Tenant>, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(tenant.clone());
    r
}

/// The HTTP status for a core error.
pub fn http_status(s: &Status) -> StatusCode {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A signed-in browser (or the local user's session).
struct Ctx {
    session: Arc<Session>,
    set_cookie: Option<HeaderValue>,
    signed_in: bool,
}

impl Ctx {
    fn tenant(&self) -> &Arc<Tenant> {
        &self.session.tenant
    }

    fn nav(&self) -> Nav<'_> {
        Nav {
            tenant: &self.session.tenant.name,
            csrf: &self.session.csrf,
            signed_in: self.signed_in,
        }
    }

    /// An HTML answer, with the new session's cookie when there is one.
    fn page(&self, status: StatusCode, markup: Markup) -> Response {
        let mut r = html(status, markup);
        if let Some(c) = &self.set_cookie {
            r.headers_mut().insert(header::SET_COOKIE, c.clone());
        }
        r
    }

    fn core_error(&self, s: &Status) -> Response {
        let title = match http_status(s) {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::TOO_MANY_REQUESTS => "Busy",
            StatusCode::SERVICE_UNAVAILABLE => "Unavailable",
            StatusCode::BAD_REQUEST => "Cannot do that",
            _ => "Something went wrong",
        };
        self.page(
            http_status(s),
            pages::error(Some(&self.nav()), title, s.message()),
        )
    }
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

/// The page's session: the cookie's, else (no tenants) a new one for the local user, else the
/// sign-in page.
fn page_ctx(app: &App, headers: &HeaderMap) -> Result<Ctx, Redirect> {
    let signed_in = app.tenants.required();
    if let Some(session) = app.sessions.get(headers) {
        return Ok(Ctx {
            session,
            set_cookie: None,
            signed_in,
        });
    }
    match app.local() {
        Some(local) => {
            let (id, session) = app.sessions.create(local);
            Ok(Ctx {
                session,
                set_cookie: Some(app.sessions.set_cookie(&id)),
                signed_in,
            })
        }
        None => Err(Redirect::to("/signin")),
    }
}

/// The tenant of a script's request: its bearer token, else (no tenants) the local user.
fn bearer_tenant(app: &App, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, Status> {
    if headers.contains_key(header::AUTHORIZATION) {
        let md = tonic::metadata::MetadataMap::from_headers(headers.clone());
        return app.tenants.authenticate(&md).map(Some);
    }
    Ok(None)
}

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let mut r = (
        status,
        axum::Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn asset(Path((version, file)): Path<(String, String)>) -> Response {
    use crate::web::assets::{APP_JS, STYLE_CSS, VERSION};
    let (body, kind) = match file.as_str() {
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let cache = if version == *VERSION {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)],
        body,
    )
        .into_response()
}

async fn not_found(State(app): State<App>, headers: HeaderMap) -> Response {
    let session = app.sessions.get(&headers);
    let nav = session.as_ref().map(|s| Nav {
        tenant: &s.tenant.name,
        csrf: &s.csrf,
        signed_in: app.tenants.required(),
    });
    html(
        StatusCode::NOT_FOUND,
        pages::error(nav.as_ref(), "Not found", "There is no such page."),
    )
}

async fn signin_form(State(app): State<App>) -> Response {
    if !app.tenants.required() {
        return Redirect::to("/steps").into_response();
    }
    html(StatusCode::OK, pages::signin(None))
}

#[derive(Deserialize)]
struct SigninForm {
    token: String,
}

async fn signin(State(app): State<App>, headers: HeaderMap, form: Form<SigninForm>) -> Response {
    if !same_origin(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            pages::signin(Some(
                "This sign-in came from another site; use this page to sign in.",
            )),
        );
    }
    if !app.tenants.required() {
        return Redirect::to("/steps").into_response();
    }
    let mut md = tonic::metadata::MetadataMap::new();
    let value = format!("Bearer {}", form.token.trim());
    let tenant = value.parse().ok().and_then(|v| {
        md.insert("authorization", v);
        app.tenants.authenticate(&md).ok()
    });
    let Some(tenant) = tenant else {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::signin(Some(
                "That token is not valid on this server. Check it and try again, or ask whoever gave it to you.",
            )),
        );
    };
    let (id, _) = app.sessions.create(tenant);
    let mut r = Redirect::to("/steps").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, app.sessions.set_cookie(&id));
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn signout(State(app): State<App>, headers: HeaderMap, form: Form<CsrfForm>) -> Response {
    let Some(session) = app.sessions.get(&headers) else {
        return Redirect::to("/signin").into_response();
    };
    if !same_origin(&headers) || !session.csrf_ok(&form.csrf) {
        return html(
            StatusCode::FORBIDDEN,
            pages::error(None, "Not signed out", &UploadError::Csrf.to_string()),
        );
    }
    app.sessions.remove(&headers);
    let mut r = Redirect::to(if app.tenants.required() {
        "/signin"
    } else {
        "/steps"
    })
    .into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, Sessions::clear_cookie());
    r
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    q: String,
}

async fn catalog(
    State(app): State<App>,
    headers: HeaderMap,
    Query(search): Query<Search>,
) -> Response {
    let ctx = match page_ctx(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let tenant = ctx.tenant().clone();
    if !tenant.may(CatalogPermission::Run) {
        return ctx.page(
            StatusCode::OK,
            pages::catalog(
                &ctx.nav(),
                &search.q,
                &[],
                &[],
                Some("Your access does not include running published steps."),
            ),
        );
    }
    let q = search.q.trim().to_string();
    let list = match app
        .service
        .list_steps(core_request(
            &tenant,
            pb::ListStepsRequest { filter: q.clone() },
        ))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return ctx.core_error(&s),
    };
    let mut cards = Vec::with_capacity(list.steps.len());
    for summary in list.steps {
        let detail = app
            .service
            .get_step(core_request(
                &tenant,
                pb::GetStepRequest {
                    step_ref: summary.name.clone(),
                },
            ))
            .await
            .ok()
            .map(|r| r.into_inner());
        cards.push(StepCard { summary, detail });
    }
    // Workflows, when the server has them (else the call answers FAILED_PRECONDITION and the
    // catalog shows steps only); the search applies to them as well.
    let mut workflows = Vec::new();
    if let Ok(list) = app
        .service
        .list_workflows(core_request(&tenant, pb::ListWorkflowsRequest {}))
        .await
    {
        let needle = q.to_lowercase();
        for summary in list.into_inner().workflows {
            if !needle.is_empty()
                && !summary.name.to_lowercase().contains(&needle)
                && !summary.description.to_lowercase().contains(&needle)
            {
                continue;
            }
            let detail = app
                .service
                .get_workflow(core_request(
                    &tenant,
                    pb::GetWorkflowRequest {
                        workflow_ref: summary.name.clone(),
                    },
                ))
                .await
                .ok()
                .map(|r| r.into_inner());
            workflows.push(WorkflowCard { summary, detail });
        }
    }
    ctx.page(
        StatusCode::OK,
        pages::catalog(&ctx.nav(), &q, &cards, &workflows, None),
    )
}

async fn step_page(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let ctx = match page_ctx(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    if name.contains('@') {
        return ctx.core_error(&Status::not_found(format!("no step `{name}`")));
    }
    match app
        .service
        .get_step(core_request(
            ctx.tenant(),
            pb::GetStepRequest { step_ref: name },
        ))
        .await
    {
        Ok(step) => ctx.page(
            StatusCode::OK,
            pages::step(&ctx.nav(), step.get_ref(), app.options.max_upload_bytes),
        ),
        Err(s) => ctx.core_error(&s),
    }
}

async fn workflow_page(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let ctx = match page_ctx(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    if name.contains('@') {
        return ctx.core_error(&Status::not_found(format!("no workflow `{name}`")));
    }
    match app
        .service
        .get_workflow(core_request(
            ctx.tenant(),
            pb::GetWorkflowRequest { workflow_ref: name },
        ))
        .await
    {
        Ok(wf) => ctx.page(
            StatusCode::OK,
            pages::workflow(&ctx.nav(), wf.get_ref(), app.options.max_upload_bytes),
        ),
        Err(s) => ctx.core_error(&s),
    }
}

/// A workflow run as a step run's response, so the result page, downloads and the zip serve
/// both: its outputs (`NAME/FILE`), every step's checks (`STEP: CHECK`), a summary of the steps
/// as stdout, and its manifest digest. The record itself is kept beside it.
fn workflow_response(run: &mut pb::WorkflowRun) -> pb::RunStepResponse {
    let mut stdout = String::new();
    let mut checks = Vec::new();
    for s in &run.steps {
        let state = pb::WorkflowStepState::try_from(s.state)
            .unwrap_or(pb::WorkflowStepState::Unspecified)
            .as_str_name()
            .trim_start_matches("WORKFLOW_STEP_STATE_")
            .to_ascii_lowercase();
        stdout.push_str(&format!("{}: {state}", s.id));
        if !s.status.is_empty() {
            stdout.push_str(&format!(" ({})", s.status));
        }
        if !s.message.is_empty() {
            stdout.push_str(&format!(": {}", s.message));
        }
        stdout.push('\n');
        checks.extend(s.checks.iter().map(|c| pb::CheckResult {
            name: format!("{}: {}", s.id, c.name),
            passed: c.passed,
            detail: c.detail.clone(),
        }));
    }
    let outputs = run
        .outputs
        .iter_mut()
        .filter(|o| !o.content_omitted)
        .map(|o| pb::File {
            path: format!("{}/{}", o.name, pages::base_name(&o.file)),
            content: std::mem::take(&mut o.content),
            sha256: o.sha256.clone(),
            ..Default::default()
        })
        .collect();
    let succeeded = run.status == "succeeded";
    pb::RunStepResponse {
        run_id: run.run_id.clone(),
        status: if succeeded {
            pb::Status::Succeeded
        } else {
            pb::Status::Failed
        } as i32,
        exit_code: if succeeded { 0 } else { -1 },
        stdout: stdout.into_bytes(),
        outputs,
        check_results: checks,
        manifest: Some(pb::Manifest {
            digest: run.manifest_digest.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A workflow event as a live event for the page's graph.
fn node_event(event: pb::workflow_run_event::Event) -> Option<serde_json::Value> {
    use pb::workflow_run_event::Event;
    let (id, state, class) = match event {
        Event::Queued(id) => (id, "queued".to_string(), ""),
        Event::Started(id) => (id, "running".to_string(), "running"),
        Event::Finished(s) => {
            let state = pb::WorkflowStepState::try_from(s.state)
                .unwrap_or(pb::WorkflowStepState::Unspecified);
            let good = matches!(
                state,
                pb::WorkflowStepState::Succeeded | pb::WorkflowStepState::Reused
            );
            (
                s.id,
                state
                    .as_str_name()
                    .trim_start_matches("WORKFLOW_STEP_STATE_")
                    .to_ascii_lowercase(),
                if good { "ok" } else { "bad" },
            )
        }
        Event::Result(_) => return None,
    };
    Some(serde_json::json!({ "node": { "id": id, "state": state, "class": class } }))
}

/// A run form posted from a page: whether the browser follows it live (NDJSON) or waits for the
/// result page, and the signed-in session if any. Refusals answer in the same form.
struct PageForm {
    live: bool,
    session: Option<Arc<Session>>,
}

impl PageForm {
    fn new(app: &App, headers: &HeaderMap) -> PageForm {
        PageForm {
            live: headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains(NDJSON)),
            session: app.sessions.get(headers),
        }
    }

    /// `message` as JSON for a live page, else as an error page.
    fn refuse(&self, app: &App, status: StatusCode, message: String) -> Response {
        if self.live {
            return json_error(status, message);
        }
        let nav = self.session.as_ref().map(|s| Nav {
            tenant: &s.tenant.name,
            csrf: &s.csrf,
            signed_in: app.tenants.required(),
        });
        html(status, pages::error(nav.as_ref(), "Not run", &message))
    }

    /// Streams the upload to disk within the limits, checking the CSRF token first; answers
    /// the session and what was received, or the refusal to send.
    async fn receive(
        &self,
        app: &App,
        headers: &HeaderMap,
        multipart: Result<Multipart, MultipartRejection>,
    ) -> Result<(Arc<Session>, upload::Received), Response> {
        let multipart =
            multipart.map_err(|e| self.refuse(app, StatusCode::BAD_REQUEST, e.body_text()))?;
        // Without a session no token can match: a random one stands in, so the upload is still
        // read (and thrown away) and the answer arrives intact.
        let expected = match &self.session {
            Some(s) if same_origin(headers) => s.csrf.clone(),
            _ => crate::web::session::random_token(),
        };
        let received = upload::receive(
            multipart,
            &app.uploads,
            app.upload_limits(),
            Some(&expected),
        )
        .await
        .map_err(|e| self.refuse(app, e.status(), e.to_string()))?;
        let Some(session) = self.session.clone() else {
            return Err(self.refuse(app, StatusCode::FORBIDDEN, UploadError::Csrf.to_string()));
        };
        Ok((session, received))
    }
}

async fn run_workflow_from_page(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let form = PageForm::new(&app, &headers);
    let refuse = |status: StatusCode, message: String| form.refuse(&app, status, message);
    let live = form.live;
    let (session, received) = match form.receive(&app, &headers, multipart).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let tenant = session.tenant.clone();
    let workflow_ref = match &received.stage {
        Some(stage) => format!("{name}@{stage}"),
        None => name.clone(),
    };
    // A workflow's inputs are named (`rows`), not paths: each file goes to its input.
    let step_like = match run_request(workflow_ref.clone(), received).await {
        Ok(r) => r,
        Err(e) => return refuse(e.status(), e.to_string()),
    };
    let request = pb::RunWorkflowRequest {
        workflow: Some(pb::run_workflow_request::Workflow::WorkflowRef(
            workflow_ref.clone(),
        )),
        inputs: step_like.inputs,
        max_output_bytes: app.options.keep_bytes,
    };
    let mut events = match app
        .service
        .run_workflow(core_request(&tenant, request))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return refuse(http_status(&s), s.message().to_string()),
    };
    let results = app.results.clone();
    let keep = move |mut run: pb::WorkflowRun| {
        let results = results.clone();
        let tenant = tenant.name.clone();
        let workflow_ref = workflow_ref.clone();
        async move {
            let response = workflow_response(&mut run);
            results
                .keep_with(&tenant, &workflow_ref, response, Some(run))
                .await
        }
    };
    if !live {
        while let Some(event) = events.next().await {
            match event {
                Ok(pb::WorkflowRunEvent {
                    event: Some(pb::workflow_run_event::Event::Result(run)),
                }) => {
                    return match keep(run).await {
                        Ok(kept) => Redirect::to(&format!("/runs/{}", kept.run_id)).into_response(),
                        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    };
                }
                Ok(_) => {}
                Err(s) => return refuse(http_status(&s), s.message().to_string()),
            }
        }
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the run ended without a result".into(),
        );
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let line = match event {
                Ok(pb::WorkflowRunEvent {
                    event: Some(pb::workflow_run_event::Event::Result(run)),
                }) => match keep(run).await {
                    Ok(kept) => serde_json::json!({ "done": result_json(&kept) }),
                    Err(e) => serde_json::json!({
                        "error": format!("the result could not be kept: {e}")
                    }),
                },
                Ok(pb::WorkflowRunEvent { event: Some(e) }) => match node_event(e) {
                    Some(v) => v,
                    None => continue,
                },
                Ok(pb::WorkflowRunEvent { event: None }) => continue,
                Err(s) => serde_json::json!({ "error": s.message() }),
            };
            if tx.send(ndjson_line(line)).await.is_err() {
                return;
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response()
}

/// Reads the received files into a run request for `step_ref`; the temporary directory goes
/// when `received` drops here, before the run starts.
async fn run_request(
    step_ref: String,
    received: upload::Received,
) -> Result<pb::RunStepRequest, UploadError> {
    let mut inputs = Vec::with_capacity(received.files.len());
    for f in &received.files {
        let content = tokio::fs::read(&f.disk)
            .await
            .map_err(|e| UploadError::Disk(e.to_string()))?;
        inputs.push(pb::File {
            path: f.path.clone(),
            content,
            ..Default::default()
        });
    }
    Ok(pb::RunStepRequest {
        step_ref,
        inputs,
        stdin: received.stdin,
        args: received.args,
        ..Default::default()
    })
}

/// A run's result as JSON (the API's answer and the live stream's last event).
pub fn result_json(run: &KeptRun) -> serde_json::Value {
    let r = &run.response;
    let (status_text, _) = pages::run_words(run);
    let status = pb::Status::try_from(r.status).unwrap_or(pb::Status::Unspecified);
    let manifest = r.manifest.as_ref();
    let page_url = format!("/runs/{}", r.run_id);
    serde_json::json!({
        "run_id": r.run_id,
        "step_ref": run.step_ref,
        "status": status.as_str_name().trim_start_matches("STATUS_"),
        "status_text": status_text,
        "exit_code": r.exit_code,
        "message": r.message,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
        "stdout_truncated": r.stdout_truncated,
        "stderr_truncated": r.stderr_truncated,
        "checks": r.check_results.iter().map(|c| serde_json::json!({
            "name": c.name, "passed": c.passed, "detail": c.detail,
        })).collect::<Vec<_>>(),
        "outputs": run.files.iter().enumerate().map(|(i, f)| serde_json::json!({
            "path": f.path,
            "size": f.size,
            "sha256": f.sha256,
            "symlink_target": f.symlink_target,
            "url": f.disk.as_ref().map(|_| format!("{page_url}/outputs/{i}")),
        })).collect::<Vec<_>>(),
        "outputs_kept": !run.files_dropped,
        "zip_url": format!("{page_url}/outputs.zip"),
        "page_url": page_url,
        "manifest_digest": manifest.map(|m| m.digest.as_str()).unwrap_or_default(),
        "step": manifest.filter(|m| m.step_version > 0).map(|m| serde_json::json!({
            "name": m.step_name, "version": m.step_version, "digest": m.step_digest,
        })),
        "wall_time_ms": r.usage.as_ref().map_or(0, |u| u.wall_time_us / 1000),
    })
}

/// Decodes a byte stream as UTF-8 across chunk boundaries (an incomplete character waits for
/// the next chunk; invalid bytes become U+FFFD).
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let keep = match std::str::from_utf8(&self.0) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() => self.0.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.0.split_off(self.0.len() - keep);
        let text = String::from_utf8_lossy(&self.0).into_owned();
        self.0 = tail;
        text
    }
}

fn ndjson_line(v: serde_json::Value) -> Result<Bytes, Infallible> {
    let mut line = v.to_string();
    line.push('\n');
    Ok(Bytes::from(line))
}

async fn run_from_page(
    State(app): State<App>,
    headers: HeaderMap,
    Path(name): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let form = PageForm::new(&app, &headers);
    let refuse = |status: StatusCode, message: String| form.refuse(&app, status, message);
    let live = form.live;
    let (session, received) = match form.receive(&app, &headers, multipart).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let tenant = session.tenant.clone();
    let step_ref = match &received.stage {
        Some(stage) => format!("{name}@{stage}"),
        None => name.clone(),
    };
    let request = match run_request(step_ref.clone(), received).await {
        Ok(r) => r,
        Err(e) => return refuse(e.status(), e.to_string()),
    };
    let mut events = match app
        .service
        .run_step_stream(core_request(&tenant, request))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return refuse(http_status(&s), s.message().to_string()),
    };
    if !live {
        // No script: wait for the end, then show the result page.
        while let Some(event) = events.next().await {
            match event {
                Ok(pb::RunStepEvent {
                    event: Some(pb::run_step_event::Event::Response(r)),
                }) => {
                    return match app.results.keep(&tenant.name, &step_ref, r).await {
                        Ok(kept) => Redirect::to(&format!("/runs/{}", kept.run_id)).into_response(),
                        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    };
                }
                Ok(_) => {}
                Err(s) => return refuse(http_status(&s), s.message().to_string()),
            }
        }
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the run ended without a result".into(),
        );
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let results = app.results.clone();
    tokio::spawn(async move {
        let (mut out, mut err) = (Utf8Carry::default(), Utf8Carry::default());
        // Dropping `events` (the browser went away: a send fails) cancels the run.
        while let Some(event) = events.next().await {
            let line = match event {
                Ok(pb::RunStepEvent { event: Some(e) }) => match e {
                    pb::run_step_event::Event::Stdout(b) => {
                        serde_json::json!({ "stdout": out.push(&b) })
                    }
                    pb::run_step_event::Event::Stderr(b) => {
                        serde_json::json!({ "stderr": err.push(&b) })
                    }
                    pb::run_step_event::Event::Response(r) => {
                        match results.keep(&tenant.name, &step_ref, r).await {
                            Ok(kept) => serde_json::json!({ "done": result_json(&kept) }),
                            Err(e) => serde_json::json!({
                                "error": format!("the result could not be kept: {e}")
                            }),
                        }
                    }
                },
                Ok(pb::RunStepEvent { event: None }) => continue,
                Err(s) => serde_json::json!({ "error": s.message() }),
            };
            if tx.send(ndjson_line(line)).await.is_err() {
                return;
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response()
}

async fn api_run(
    State(app): State<App>,
    headers: HeaderMap,
    Path(spec): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let Some(step_ref) = spec.strip_suffix(":run").map(str::to_string) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!(
                "no endpoint /api/v1/steps/{spec}: runs are POST /api/v1/steps/NAME@STAGE:run \
                 (or NAME:run for the newest verified version)"
            ),
        );
    };
    let tenant = match bearer_tenant(&app, &headers) {
        Ok(Some(t)) => t,
        Ok(None) => match app.local() {
            // The local user's API is for scripts on this machine: a page on another site
            // must not drive it from a browser.
            Some(local) if same_origin(&headers) => local,
            Some(_) => {
                return json_error(
                    StatusCode::FORBIDDEN,
                    "cross-site requests are refused: call the API from a script, not a page on another site",
                );
            }
            None => {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer <token>` header",
                );
            }
        },
        Err(s) => return json_error(http_status(&s), s.message()),
    };
    let multipart = match multipart {
        Ok(m) => m,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}: send the files as multipart/form-data (curl -F files=@data.csv)",
                    e.body_text()
                ),
            );
        }
    };
    let received = match upload::receive(multipart, &app.uploads, app.upload_limits(), None).await {
        Ok(r) => r,
        Err(e) => return json_error(e.status(), e),
    };
    if received.stage.is_some() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "field `ref`: the version is part of the URL (NAME@STAGE:run); leave `ref` out",
        );
    }
    let request = match run_request(step_ref.clone(), received).await {
        Ok(r) => r,
        Err(e) => return json_error(e.status(), e),
    };
    match app.service.run_step(core_request(&tenant, request)).await {
        Ok(r) => match app
            .results
            .keep(&tenant.name, &step_ref, r.into_inner())
            .await
        {
            Ok(kept) => axum::Json(result_json(&kept)).into_response(),
            Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        Err(s) => json_error(http_status(&s), s.message()),
    }
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    page_token: String,
}

async fn history(State(app): State<App>, headers: HeaderMap, Query(page): Query<Page>) -> Response {
    let ctx = match page_ctx(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let tenant = ctx.tenant().clone();
    match app
        .service
        .list_runs(core_request(
            &tenant,
            pb::ListRunsRequest {
                page_size: 50,
                page_token: page.page_token,
                status: 0,
            },
        ))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let kept = |id: &str| app.results.get(&tenant.name, id).is_some();
            ctx.page(
                StatusCode::OK,
                pages::history(&ctx.nav(), &r.runs, &r.next_page_token, &kept),
            )
        }
        Err(s) => ctx.core_error(&s),
    }
}

async fn run_page(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let ctx = match page_ctx(&app, &headers) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    if let Some(kept) = app.results.get(&ctx.tenant().name, &id) {
        return ctx.page(StatusCode::OK, pages::result(&ctx.nav(), &kept));
    }
    match app
        .service
        .get_run(core_request(ctx.tenant(), pb::GetRunRequest { run_id: id }))
        .await
    {
        Ok(r) => ctx.page(StatusCode::OK, pages::record(&ctx.nav(), r.get_ref())),
        Err(s) => ctx.core_error(&s),
    }
}

/// The tenant of a download: a bearer token (scripts), else the session, else the local user.
fn download_tenant(app: &App, headers: &HeaderMap) -> Result<Arc<Tenant>, Box<Response>> {
    match bearer_tenant(app, headers) {
        Ok(Some(t)) => return Ok(t),
        Ok(None) => {}
        Err(s) => return Err(Box::new(json_error(http_status(&s), s.message()))),
    }
    if let Some(s) = app.sessions.get(headers) {
        return Ok(s.tenant.clone());
    }
    app.local().ok_or_else(|| {
        Box::new(json_error(
            StatusCode::UNAUTHORIZED,
            "sign in, or send `Authorization: Bearer <token>`",
        ))
    })
}

fn no_such_output(id: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no kept outputs of run {id:?} among your recent runs"),
    )
}

/// Streams chunks sent on a channel from a task that reads files.
fn streamed(
    kind: &'static str,
    disposition: String,
    length: Option<u64>,
    parts: Vec<Part>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for part in parts {
            match part {
                Part::Bytes(b) => {
                    if tx.send(Ok(Bytes::from(b))).await.is_err() {
                        return;
                    }
                }
                Part::File(path) => {
                    let mut file = match tokio::fs::File::open(&path).await {
                        Ok(f) => f,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        match file.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                if tx
                                    .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    let mut r = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(n) = length {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    r
}

enum Part {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// `attachment; filename="..."` with the name reduced to safe ASCII.
fn attachment(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("attachment; filename=\"{safe}\"")
}

#[derive(Deserialize)]
struct Inline {
    #[serde(default)]
    inline: Option<String>,
}

async fn download(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, usize)>,
    Query(inline): Query<Inline>,
) -> Response {
    let tenant = match download_tenant(&app, &headers) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let Some(run) = app.results.get(&tenant.name, &id) else {
        return no_such_output(&id);
    };
    let Some((file, disk)) = run
        .files
        .get(n)
        .and_then(|f| f.disk.as_ref().map(|d| (f, d.clone())))
    else {
        return no_such_output(&id);
    };
    let name = pages::base_name(&file.path);
    match (&file.preview, inline.inline.is_some()) {
        // Only raster images are shown inline, as exactly their type.
        (Preview::Image(mime), true) => streamed(
            mime,
            "inline".into(),
            Some(file.size),
            vec![Part::File(disk)],
        ),
        _ => streamed(
            "application/octet-stream",
            attachment(name),
            Some(file.size),
            vec![Part::File(disk)],
        ),
    }
}

async fn download_zip(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let tenant = match download_tenant(&app, &headers) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let Some(run) = app.results.get(&tenant.name, &id) else {
        return no_such_output(&id);
    };
    let mut parts = Vec::new();
    let mut entries = Vec::new();
    let mut length = 0u64;
    for f in &run.files {
        let Some(disk) = &f.disk else { continue };
        let entry = crate::web::zip::Entry {
            name: f.path.clone(),
            crc32: f.crc32,
            size: u32::try_from(f.size).unwrap_or(u32::MAX),
        };
        let header = crate::web::zip::local_header(&entry);
        length += header.len() as u64 + f.size;
        parts.push(Part::Bytes(header));
        parts.push(Part::File(disk.clone()));
        entries.push(entry);
    }
    if entries.is_empty() {
        return no_such_output(&id);
    }
    let directory = crate::web::zip::central_directory(&entries);
    length += directory.len() as u64;
    parts.push(Part::Bytes(directory));
    let step = run.step_ref.split('@').next().unwrap_or("outputs");
    streamed(
        "application/zip",
        attachment(&format!("{step}-{}.zip", &id[..id.len().min(8)])),
        Some(length),
        parts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_decoded_across_chunks() {
        let mut c = Utf8Carry::default();
        let text = "héllo ✓";
        let bytes = text.as_bytes();
        let (a, b) = bytes.split_at(2); // inside `é`
        let mut got = c.push(a);
        got.push_str(&c.push(b));
        assert_eq!(got, text);
        assert_eq!(Utf8Carry::default().push(b"\xffok"), "\u{fffd}ok");
    }

    #[test]
    fn attachment_names_are_plain_ascii() {
        assert_eq!(
            attachment("a\"b;c\r\n.csv"),
            "attachment; filename=\"a_b_c__.csv\""
        );
    }

    #[test]
    fn core_codes_become_http_statuses() {
        assert_eq!(http_status(&Status::not_found("x")), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(&Status::resource_exhausted("x")),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(&Status::invalid_argument("x")),
            StatusCode::BAD_REQUEST
        );
    }
}
