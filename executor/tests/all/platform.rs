//! Operating on a shared network: tenants and quotas, metrics, TLS.

use std::sync::Arc;
use std::time::Duration;

use stepbox::pb::step_executor_client::StepExecutorClient;
use stepbox::pb::{self, RunStepRequest, Step};
use stepbox::service::config::{TenantConfig, TlsSection, hash_token};
use stepbox::service::metrics::{Metrics, serve_metrics};
use stepbox::service::tenancy::Tenants;
use stepbox::service::{ServerOptions, serve};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_types::StatusExt;

use crate::common::*;

fn python(source: &str, policy: &str) -> RunStepRequest {
    RunStepRequest {
        step: Some(Step {
            runtime: "python".into(),
            source: source.into(),
            ..Default::default()
        }),
        policy: policy.into(),
        ..Default::default()
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn start(
    options: ServerOptions,
    tls: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
) {
    let work = tempfile::tempdir().unwrap();
    let exec = Arc::new(new_executor(work.path()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(exec, listener, options, async {
        let _ = rx.await;
    }));
    if !tls {
        // Wait until it accepts.
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (addr, tx, work)
}

#[tokio::test]
async fn tenants_authenticate_and_stay_within_policies_quotas_and_rates() {
    let tenants = Tenants::from_config(&[
        TenantConfig {
            name: "acme".into(),
            tokens: vec![hash_token("acme-token")],
            tokens_file: None,
            policies: vec!["default".into()],
            concurrency: 1,
            rate_per_second: 0.0,
            burst: None,
            catalog: vec![stepbox::service::config::CatalogPermission::Run],
            steps: Vec::new(),
        },
        TenantConfig {
            name: "slow".into(),
            tokens: vec![hash_token("slow-token")],
            tokens_file: None,
            policies: vec![],
            concurrency: 0,
            rate_per_second: 0.5,
            burst: Some(1),
            catalog: vec![stepbox::service::config::CatalogPermission::Run],
            steps: Vec::new(),
        },
    ])
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let (addr, stop, _work) = start(
        ServerOptions {
            tenants: Arc::new(tenants),
            metrics: metrics.clone(),
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let mut c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let e = c.run_step(python("print(1)", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    let e = c
        .run_step(authed(python("print(1)", ""), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let r = c
        .run_step(authed(python("print('hi')", ""), "acme-token"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"hi\n");
    let e = c
        .run_step(authed(python("print(1)", "heavy"), "acme-token"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            "tenant `acme` may not use policy `heavy` (allowed: default)"
        )
    );

    // acme's quota is one job at a time.
    let mut c2 = c.clone();
    let slow = tokio::spawn(async move {
        c2.run_step(authed(
            python("import time\ntime.sleep(1)", ""),
            "acme-token",
        ))
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c
        .run_step(authed(python("print(1)", ""), "acme-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("quota of 1 jobs"), "{}", e.message());
    slow.await.unwrap().unwrap();

    // slow's rate is one request per two seconds: the second is refused with retry info.
    c.run_step(authed(python("print(1)", ""), "slow-token"))
        .await
        .unwrap();
    let e = c
        .run_step(authed(python("print(1)", ""), "slow-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let retry = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(2),
        "{retry:?}"
    );

    // Health stays open for probes.
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    assert!(
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_ok()
    );

    let text = metrics.encode();
    assert!(
        text.contains(r#"stepbox_rejected_total{reason="unauthenticated"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"stepbox_rejected_total{reason="policy_denied"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"tenant="acme",status="SUCCEEDED"} 2"#),
        "{text}"
    );
    let _ = stop.send(());
}

#[tokio::test]
async fn metrics_are_served_over_http() {
    let metrics = Arc::new(Metrics::new());
    let (addr, stop, _work) = start(
        ServerOptions {
            metrics: metrics.clone(),
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let mut c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.run_step(python("print(1)", "")).await.unwrap();
    let mut limited = python("while True: pass", "");
    limited.limits = Some(pb::Limits {
        wall_time_ms: 100,
        ..Default::default()
    });
    assert_eq!(
        c.run_step(limited).await.unwrap().into_inner().status(),
        pb::Status::TimedOut
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = listener.local_addr().unwrap();
    tokio::spawn(serve_metrics(metrics, listener));
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(maddr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for want in [
        r#"stepbox_runs_total{runtime="python",policy="default",tenant="local",status="SUCCEEDED"} 1"#,
        r#"stepbox_runs_total{runtime="python",policy="default",tenant="local",status="TIMED_OUT"} 1"#,
        r#"stepbox_limit_hits_total{kind="wall_time"} 1"#,
        "stepbox_run_duration_seconds_bucket",
        "stepbox_queue_wait_seconds_count 2",
        "stepbox_in_flight_jobs 0",
        r#"stepbox_compile_cache_total{source="memory"}"#,
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
    let _ = stop.send(());
}

#[tokio::test]
async fn tls_with_client_certificates() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(vec!["localhost".into()]);
    let (client_cert, client_key) = issue(vec!["client".into()]);
    let d = tempfile::tempdir().unwrap();
    let w = |n: &str, s: &str| {
        std::fs::write(d.path().join(n), s).unwrap();
        d.path().join(n)
    };
    let tls = TlsSection {
        cert: w("s.crt", &server_cert),
        key: w("s.key", &server_key),
        client_ca: Some(w("ca.crt", &ca.pem())),
    };
    let (addr, stop, _work) = start(
        ServerOptions {
            tls: Some(tls),
            ..ServerOptions::default()
        },
        true,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let connect = |identity: bool| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem()))
            .domain_name("localhost");
        if identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &client_cert,
                &client_key,
            ));
        }
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        async move { endpoint.connect().await }
    };
    let channel: Channel = connect(true).await.expect("mutual TLS connects");
    let r = StepExecutorClient::new(channel)
        .run_step(python("print('over tls')", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout, b"over tls\n");
    // Without a client certificate the handshake or the first call fails.
    match connect(false).await {
        Err(_) => {}
        Ok(ch) => assert!(
            StepExecutorClient::new(ch)
                .run_step(python("print(1)", ""))
                .await
                .is_err()
        ),
    }
    let _ = stop.send(());
}

#[tokio::test]
async fn the_web_page_is_served_over_the_servers_tls_and_reloads_with_it() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Two CAs: the certificate in force before the reload and the one after.
    let authority = || {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    };
    let (ca1, cert1, key1) = authority();
    let (ca2, cert2, key2) = authority();
    let d = tempfile::tempdir().unwrap();
    let (cert, key) = (d.path().join("s.crt"), d.path().join("s.key"));
    std::fs::write(&cert, &cert1).unwrap();
    std::fs::write(&key, &key1).unwrap();
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web.local_addr().unwrap();
    let options = ServerOptions {
        tls: Some(TlsSection {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        }),
        web: Some(stepbox::web::WebServer::new(
            web,
            stepbox::web::WebOptions::from_section(
                &stepbox::service::config::WebSection::default(),
                64 << 20,
                Arc::new(Tenants::default()),
                d.path().join("web"),
            ),
        )),
        ..ServerOptions::default()
    };
    let reload = options.reload.clone();
    let (_addr, stop, _work) = start(options, true).await;

    // A new client (no pooled connection) trusting only `ca`.
    let get = |ca: &str| {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
            .resolve("localhost", web_addr)
            .build()
            .unwrap();
        async move {
            let r = client
                .get(format!("https://localhost:{}/runs", web_addr.port()))
                .send()
                .await?;
            let status = r.status();
            Ok::<_, reqwest::Error>((status, r.text().await?))
        }
    };
    let mut answer = None;
    for _ in 0..50 {
        match get(&ca1).await {
            Ok(a) => {
                answer = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let (status, body) = answer.expect("the web page answers over TLS");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<title>History · Stepbox</title>"), "{body}");
    // Not over plain HTTP on the same port.
    let plain = reqwest::Client::new()
        .get(format!("http://{web_addr}/runs"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A certificate from the other CA is refused until the files change and are reloaded.
    assert!(get(&ca2).await.is_err());
    std::fs::write(&cert, &cert2).unwrap();
    std::fs::write(&key, &key2).unwrap();
    reload.notify_one();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, _) = loop {
        match get(&ca2).await {
            Ok(a) => break a,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the web page still serves the old certificate: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(status, 200);
    assert!(get(&ca1).await.is_err());
    let _ = stop.send(());
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_runs() {
    let tenant = |name: &str| TenantConfig {
        name: name.into(),
        tokens: vec![hash_token(&format!("{name}-token"))],
        tokens_file: None,
        policies: vec![],
        concurrency: 0,
        rate_per_second: 0.0,
        burst: None,
        catalog: vec![stepbox::service::config::CatalogPermission::Run],
        steps: Vec::new(),
    };
    let tenants = Tenants::from_config(&[tenant("acme"), tenant("globex")]).unwrap();
    let (addr, stop, _work) = start(
        ServerOptions {
            tenants: Arc::new(tenants),
            run_history: 3,
            ..ServerOptions::default()
        },
        false,
    )
    .await;
    let c = StepExecutorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let run = |c: &StepExecutorClient<Channel>, source: &str, token: &str| {
        let mut c = c.clone();
        let req = authed(python(source, ""), token);
        async move { c.run_step(req).await.unwrap().into_inner() }
    };
    let a1 = run(&c, "print('a1')", "acme-token").await;
    let g1 = run(&c, "raise SystemExit(3)", "globex-token").await;
    assert_eq!(g1.status(), pb::Status::Failed);

    // The owner gets the record: how it ended and its manifest, not its output.
    let rec = c
        .clone()
        .get_run(authed(
            pb::GetRunRequest {
                run_id: a1.run_id.clone(),
            },
            "acme-token",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rec.run_id.as_str(), rec.tenant.as_str(), rec.status()),
        (a1.run_id.as_str(), "acme", pb::Status::Succeeded)
    );
    assert_eq!(rec.stdout_bytes, 3);
    assert_eq!(rec.manifest, a1.manifest);
    assert!(rec.submitted_at.unwrap().seconds <= rec.finished_at.unwrap().seconds);

    // Another tenant cannot tell it from a run that never existed.
    let lookup = |run_id: &str, token: &str| {
        let mut c = c.clone();
        let req = authed(
            pb::GetRunRequest {
                run_id: run_id.into(),
            },
            token,
        );
        async move { c.get_run(req).await.unwrap_err() }
    };
    let theirs = lookup(&a1.run_id, "globex-token").await;
    let unknown = lookup("00000000-0000-0000-0000-000000000000", "globex-token").await;
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        theirs.message().replace(&a1.run_id, "ID"),
        unknown
            .message()
            .replace("00000000-0000-0000-0000-000000000000", "ID")
    );
    assert_eq!(
        lookup(&a1.run_id, "nobody").await.code(),
        Code::Unauthenticated
    );
    assert_eq!(lookup("", "acme-token").await.code(), Code::InvalidArgument);

    let list = |token: &str, page_token: String, status: pb::Status| {
        let mut c = c.clone();
        let req = authed(
            pb::ListRunsRequest {
                page_size: 2,
                page_token,
                status: status as i32,
            },
            token,
        );
        async move { c.list_runs(req).await.map(|r| r.into_inner()) }
    };
    let ids = |l: &pb::ListRunsResponse| -> Vec<String> {
        l.runs.iter().map(|r| r.run_id.clone()).collect()
    };
    let g = list("globex-token", String::new(), pb::Status::Unspecified)
        .await
        .unwrap();
    assert_eq!(ids(&g), std::slice::from_ref(&g1.run_id));
    assert!(g.next_page_token.is_empty());

    // acme runs three more: its history keeps the newest three, paged two at a time.
    let mut newest = Vec::new();
    for i in 2..5 {
        newest.push(run(&c, &format!("print({i})"), "acme-token").await.run_id);
    }
    let p1 = list("acme-token", String::new(), pb::Status::Unspecified)
        .await
        .unwrap();
    assert_eq!(ids(&p1), [newest[2].clone(), newest[1].clone()]);
    let p2 = list(
        "acme-token",
        p1.next_page_token.clone(),
        pb::Status::Unspecified,
    )
    .await
    .unwrap();
    assert_eq!(ids(&p2), [newest[0].clone()]);
    assert!(p2.next_page_token.is_empty());
    assert_eq!(
        lookup(&a1.run_id, "acme-token").await.code(),
        Code::NotFound
    );
    // Filtering by status; globex's failure never shows up in acme's list.
    let failed = list("acme-token", String::new(), pb::Status::Failed)
        .await
        .unwrap();
    assert!(failed.runs.is_empty());
    // A page token from another listing position that this server never gave is refused.
    let e = list("acme-token", "r1.999999".into(), pb::Status::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("page_token"), "{}", e.message());
    let e = c
        .clone()
        .list_runs(authed(
            pb::ListRunsRequest {
                status: 99,
                ..Default::default()
            },
            "acme-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("status") && e.message().contains("99 is not a Status"),
        "{}",
        e.message()
    );
    let _ = stop.send(());
}
