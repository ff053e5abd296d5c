//! Logs and traces: one tracing subscriber for the process.
//!
//! Logs go to stderr as text or, when asked (`[log] format = "json"`), one JSON object per line.
//! When `[telemetry] otlp_endpoint` is set, `stepbox` spans (`rpc` per gRPC call, `run` per step
//! run) are also exported to an OpenTelemetry collector over OTLP/gRPC in batches; a caller's W3C
//! `traceparent` header makes the call's span a child of the caller's trace. Without the section
//! nothing is exported and no propagator is installed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::metadata::MetadataMap;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::service::config::{LogFormat, TelemetrySection};

/// What the subscriber writes and exports.
#[derive(Clone, Debug, Default)]
pub struct TelemetrySettings {
    /// Log lines as text or JSON.
    pub format: LogFormat,
    /// The log filter (`STEPBOX_LOG` syntax), e.g. `stepbox=info`.
    pub filter: String,
    /// Span export, when configured.
    pub otlp: Option<TelemetrySection>,
}

/// The installed subscriber's exporter; [`Telemetry::shutdown`] flushes spans still batched.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Spans exported: the `stepbox` crate's at info and above, whatever the log filter says.
const EXPORT_FILTER: &str = "stepbox=info";

/// Whether spans are exported (then call spans carry the OpenTelemetry RPC attributes; otherwise
/// log lines stay short).
static EXPORTING: AtomicBool = AtomicBool::new(false);

impl Telemetry {
    /// Installs the global subscriber. With OTLP configured this must run inside a Tokio runtime
    /// (the exporter's gRPC channel lives on it); the connection is made lazily, so an unreachable
    /// collector does not stop the server (exports fail and are logged by the SDK).
    pub fn init(settings: &TelemetrySettings) -> anyhow::Result<Telemetry> {
        let logs = match settings.format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr)
                .boxed(),
        };
        let mut filter = settings.filter.clone();
        if settings.otlp.is_some() && !filter.contains("opentelemetry") {
            // Export failures (unreachable collector, refused batch) are the SDK's own warnings;
            // a filter that names the opentelemetry crates itself decides instead.
            filter.push_str(",opentelemetry_sdk=warn,opentelemetry-otlp=warn");
        }
        let filter = tracing_subscriber::EnvFilter::try_new(&filter)
            .with_context(|| format!("invalid log filter {filter:?}"))?;
        let logs = logs.with_filter(filter);
        let (provider, traces) = match &settings.otlp {
            Some(t) => {
                let provider = tracer_provider(t)?;
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("stepbox"))
                    .with_filter(tracing_subscriber::EnvFilter::new(EXPORT_FILTER))
                    .boxed();
                opentelemetry::global::set_text_map_propagator(
                    opentelemetry_sdk::propagation::TraceContextPropagator::new(),
                );
                EXPORTING.store(true, Ordering::Relaxed);
                (Some(provider), Some(layer))
            }
            None => (None, None),
        };
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .try_init()
            .context("a tracing subscriber is already installed")?;
        if let Some(t) = &settings.otlp {
            tracing::info!(endpoint = %t.otlp_endpoint, service = %t.service_name, "exporting traces over OTLP");
        }
        Ok(Telemetry { provider })
    }

    /// Exports the spans still batched and stops the exporter (bounded by the export timeout).
    /// Blocks: call it outside async code, with the runtime still alive.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("stepbox: warning: flushing traces at exit failed: {e}");
        }
    }
}

fn tracer_provider(t: &TelemetrySection) -> anyhow::Result<SdkTracerProvider> {
    let mut metadata = MetadataMap::new();
    for (k, v) in &t.headers {
        let key = tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes())
            .with_context(|| format!("telemetry.headers: invalid name {k:?}"))?;
        let value = v
            .parse()
            .with_context(|| format!("telemetry.headers.{k}: not a valid header value"))?;
        metadata.insert(key, value);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(t.otlp_endpoint.clone())
        .with_timeout(Duration::from_secs(10))
        .with_metadata(metadata);
    if t.otlp_endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = &t.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("telemetry.ca_file: failed to read `{}`", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build().with_context(|| {
        format!(
            "telemetry: failed to set up the OTLP exporter for {}",
            t.otlp_endpoint
        )
    })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            t.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(t.service_name.clone())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build())
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The span of one gRPC call, a child of the caller's trace when the request carries one (only
/// when trace export is on: otherwise the global propagator is a no-op).
pub fn rpc_span(method: &'static str, metadata: &MetadataMap, tenant: &str) -> tracing::Span {
    rpc_span_of("stepbox.v1.StepExecutor", method, metadata, tenant)
}

/// [`rpc_span`] for a method of `service` (its full name, e.g. `stepbox.v1.StepCatalog`).
pub fn rpc_span_of(
    service: &'static str,
    method: &'static str,
    metadata: &MetadataMap,
    tenant: &str,
) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !EXPORTING.load(Ordering::Relaxed) {
        return tracing::info_span!(
            "rpc",
            method,
            tenant,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        tenant = tenant,
    );
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(parent);
    span
}

/// Records a call's gRPC status on its span.
pub fn record_status<T>(span: &tracing::Span, result: &Result<T, tonic::Status>) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_extractor_reads_ascii_keys() {
        let mut m = MetadataMap::new();
        m.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        m.insert_bin("blob-bin", tonic::metadata::MetadataValue::from_bytes(b"x"));
        let e = MetadataExtractor(&m);
        use opentelemetry::propagation::Extractor;
        assert_eq!(
            e.get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(e.keys(), vec!["traceparent"]);
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry::trace::TraceContextExt;
        let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&e);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }
}
