//! TLS for the gRPC listener and the web page's (rustls), reloadable without a restart.
//!
//! The certificate, key and optional client CA are read into rustls `ServerConfig`s, one per
//! door (they differ only in ALPN: `h2` for gRPC, `http/1.1` for the web page); each new
//! connection is accepted with the config current at that moment, so a reload (SIGHUP in
//! `stepbox serve`) changes what new connections get while open ones keep theirs. A reload that
//! fails (a missing or malformed file) keeps the previous config and is logged.

use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::service::config::TlsSection;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS configuration in force, and where to reload it from.
#[derive(Debug)]
pub struct ReloadableTls {
    section: TlsSection,
    current: RwLock<Configs>,
}

/// The configuration of each door, from the same files.
#[derive(Clone, Debug)]
struct Configs {
    grpc: Arc<rustls::ServerConfig>,
    web: Arc<rustls::ServerConfig>,
}

/// Which listener a connection arrives on: what it may negotiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// The web page: HTTP/1.1 (what its server speaks).
    Web,
}

fn configs(section: &TlsSection) -> anyhow::Result<Configs> {
    let base = build(section)?;
    let mut grpc = base.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut web = base;
    web.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Configs {
        grpc: Arc::new(grpc),
        web: Arc::new(web),
    })
}

fn build(section: &TlsSection) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&section.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .with_context(|| {
            format!(
                "failed to read TLS certificate `{}`",
                section.cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "TLS certificate `{}` holds no PEM certificate",
        section.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&section.key)
        .with_context(|| format!("failed to read TLS key `{}`", section.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &section.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("failed to read client CA `{}`", ca.display()))?
            {
                roots.add(cert.with_context(|| {
                    format!("malformed certificate in client CA `{}`", ca.display())
                })?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("client CA `{}` cannot verify clients", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "TLS key `{}` does not match certificate `{}`",
            section.key.display(),
            section.cert.display()
        )
    })
}

impl ReloadableTls {
    /// Reads the files now; an error names the file.
    pub fn load(section: &TlsSection) -> anyhow::Result<Arc<ReloadableTls>> {
        Ok(Arc::new(ReloadableTls {
            current: RwLock::new(configs(section)?),
            section: section.clone(),
        }))
    }

    /// Re-reads the files; on failure the previous configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let configs = configs(&self.section)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = configs;
        Ok(())
    }

    fn current(&self, door: Door) -> Arc<rustls::ServerConfig> {
        let configs = self.current.read().unwrap_or_else(|e| e.into_inner());
        match door {
            Door::Grpc => configs.grpc.clone(),
            Door::Web => configs.web.clone(),
        }
    }

    /// Accepts TCP connections on `listener` and completes their TLS handshakes concurrently; a
    /// slow or failing handshake never holds up the others.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        door: Door,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current(door));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
