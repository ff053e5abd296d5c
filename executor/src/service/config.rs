//! `stepbox.toml`: one file for the server, every key overridable by a `STEPBOX_*` variable.
//!
//! Defaults serve a single user on loopback with no setup at all. Unknown keys are errors naming
//! the key (in the file or in the variable). Overrides: `STEPBOX_<KEY>` for top-level keys
//! (`STEPBOX_WORK_ROOT`), `STEPBOX_<SECTION>_<KEY>` for sections (`STEPBOX_SERVER_ADDR`,
//! `STEPBOX_METRICS_ADDR`, `STEPBOX_MODEL_BASE_URL`); values are parsed as TOML, else taken as
//! strings. `STEPBOX_CONFIG` (the file), `STEPBOX_LOG` (the log filter) and `STEPBOX_MODEL` (the
//! default model name) keep their own meanings. `STEPBOX_TENANTS` replaces the whole tenant list with
//! a TOML array of inline tables (`[{ name = "a", tokens_file = "/run/secrets/a" }]`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::authoring::generate::ModelConfig;
use crate::job::limits::{ByteSize, Millis};

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Parent of job directories (default: `stepbox-work` under the temp dir).
    pub work_root: Option<PathBuf>,
    /// Compiled-artifact cache (default: `$XDG_CACHE_HOME/stepbox`).
    pub cache_dir: Option<PathBuf>,
    /// Policies directory (default: the embedded policies).
    pub policies_dir: Option<PathBuf>,
    /// The Python runtime component (default: searched next to the binary).
    pub python_component: Option<PathBuf>,
    /// The gRPC listener and its bounds.
    pub server: ServerSection,
    /// TLS for the gRPC listener (off when absent).
    pub tls: Option<TlsSection>,
    /// Prometheus metrics (off when absent).
    pub metrics: Option<MetricsSection>,
    /// Logging.
    pub log: LogSection,
    /// OpenTelemetry trace export (off when absent).
    pub telemetry: Option<TelemetrySection>,
    /// The model `GenerateStep` asks.
    pub model: ModelConfig,
    /// The step catalog: where it is stored and its stages.
    pub catalog: CatalogSection,
    /// Workflow schedules: the inbox/outbox roots and the artifact store.
    pub workflows: crate::workflow::schedule::WorkflowsSection,
    /// The web page for people (off when absent; `STEPBOX_WEB_ADDR` or `stepbox serve --web`
    /// turn it on).
    pub web: Option<WebSection>,
    /// Who may call, and within which quotas. None: no authentication (loopback only, unless
    /// `server.allow_unauthenticated`).
    pub tenants: Vec<TenantConfig>,
    /// `STEPBOX_*` variables that name no key (other tools share the prefix, so these are reported,
    /// not fatal; a variable naming a known section with an unknown key is an error).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Listen address.
    pub addr: SocketAddr,
    /// Jobs that run at once (default: the number of cores).
    pub concurrency: Option<usize>,
    /// Jobs that may wait (default: 4 x cores).
    pub queue: Option<usize>,
    /// Largest request.
    pub max_message_size: ByteSize,
    /// How long in-flight jobs may finish after SIGTERM/SIGINT.
    pub grace_period: Millis,
    /// Serve a non-loopback address without tenants (anyone who can connect may run code).
    pub allow_unauthenticated: bool,
    /// Finished runs kept per tenant for `GetRun`/`ListRuns` (in memory, this replica only);
    /// 0 keeps none. With `[catalog] database` set, the shared history in that database is used
    /// instead, bounded by `catalog.run_history` and `catalog.run_retention`.
    pub run_history: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            addr: ([127, 0, 0, 1], 50051).into(),
            concurrency: None,
            queue: None,
            max_message_size: ByteSize(64 << 20),
            grace_period: Millis(std::time::Duration::from_secs(10)),
            allow_unauthenticated: false,
            run_history: 1000,
        }
    }
}

/// `[tls]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9090`.
    pub addr: SocketAddr,
}

/// `[telemetry]`: spans exported to an OpenTelemetry collector over OTLP/gRPC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The collector, e.g. `http://otel-collector:4317`; `https://` uses TLS with the public
    /// (webpki) roots plus `ca_file`.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Fraction of new traces recorded (0 to 1); a caller's `traceparent` decision is followed.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// gRPC metadata sent with every export (e.g. a collector's API key); masked by
    /// `stepbox config check`.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// PEM CA bundle for an `https://` collector with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_service_name() -> String {
    "stepbox".into()
}

fn default_sample_ratio() -> f64 {
    1.0
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `stepbox=info` (`STEPBOX_LOG` wins).
    pub filter: Option<String>,
}

/// `[catalog]`: the step catalog's database and stages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSection {
    /// `sqlite://PATH` or `postgres://USER:PASSWORD@HOST/DB` (several replicas share one
    /// PostgreSQL). Default: the embedded SQLite file `$XDG_DATA_HOME/stepbox/catalog.db`
    /// (`~/.local/share/stepbox/catalog.db`), the same one the CLI uses.
    pub database: Option<String>,
    /// The stages, in order: the first is the only one an unverified version may enter.
    /// Default: `dev`, `staging`, `prod`, each running under the version's own policy.
    pub stages: Vec<crate::catalog::StageConfig>,
    /// How often a replica re-reads the catalog's change counter: the longest a stage reference
    /// keeps resolving to its previous version after another replica promoted (default 1s).
    pub refresh: Millis,
    /// Finished runs kept per tenant in the store's run history (default 1000; 0: none).
    pub run_history: usize,
    /// Finished runs older than this are dropped from the store's run history (default 30 days).
    pub run_retention: Millis,
}

impl Default for CatalogSection {
    fn default() -> Self {
        CatalogSection {
            database: None,
            stages: crate::catalog::default_stages(),
            refresh: Millis(crate::catalog::DEFAULT_REFRESH),
            run_history: 1000,
            run_retention: Millis(std::time::Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

impl CatalogSection {
    /// The database URL: the configured one, or the default SQLite file.
    pub fn database_url(&self) -> anyhow::Result<String> {
        match &self.database {
            Some(url) => Ok(url.clone()),
            None => stepbox_store::Store::default_sqlite_path()
                .map(|p| stepbox_store::Store::sqlite_url(&p))
                .context(
                    "no catalog database configured and no home directory for the default \
                     (set [catalog] database, STEPBOX_CATALOG_DATABASE or XDG_DATA_HOME)",
                ),
        }
    }
}

/// `[web]`: the web page and its JSON endpoint, on an address of their own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSection {
    /// Listen address (default `127.0.0.1:8080`). Session cookies are `Secure`: browsers keep
    /// them over plain HTTP only on loopback, so anything else needs TLS in front.
    pub addr: SocketAddr,
    /// Largest upload of one run, all files together, enforced while it arrives (default: the
    /// same as `server.max_message_size`, which bounds a gRPC run's inputs).
    pub max_upload_size: Option<ByteSize>,
    /// Most files one run may upload (default 32).
    pub max_upload_files: usize,
    /// Finished runs whose outputs are kept for download, per tenant (default 20).
    pub keep_runs: usize,
    /// Output bytes kept for download, per tenant (default 256MiB; the oldest go first).
    pub keep_bytes: ByteSize,
    /// How long outputs are kept for download (default 1h).
    pub keep_for: Millis,
    /// How long a sign-in lasts without use (default 8h).
    pub session_idle: Millis,
}

impl Default for WebSection {
    fn default() -> Self {
        WebSection {
            addr: ([127, 0, 0, 1], 8080).into(),
            max_upload_size: None,
            max_upload_files: 32,
            keep_runs: 20,
            keep_bytes: ByteSize(256 << 20),
            keep_for: Millis(std::time::Duration::from_secs(3600)),
            session_idle: Millis(std::time::Duration::from_secs(8 * 3600)),
        }
    }
}

/// What a tenant may do with the step catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogPermission {
    /// Run published steps by reference.
    Run,
    /// Publish new versions.
    Publish,
    /// Move stages (promote, roll back).
    Promote,
}

fn default_catalog_permissions() -> Vec<CatalogPermission> {
    vec![CatalogPermission::Run]
}

/// `[[tenants]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name (in logs and metrics).
    pub name: String,
    /// sha256 of each bearer token, as `sha256:<64 hex>` (`stepbox config hash-token` makes one).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// A file of plain bearer tokens, one per line (e.g. a mounted Kubernetes Secret); they are
    /// hashed at load and never logged.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// Policies the tenant may use; empty: all.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Jobs the tenant may run at once; 0: no quota beyond the server's.
    #[serde(default)]
    pub concurrency: usize,
    /// Requests per second, sustained; 0: no rate limit.
    #[serde(default)]
    pub rate_per_second: f64,
    /// Requests allowed in a burst above the rate (default: the rate, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// What the tenant may do with the catalog: `run`, `publish`, `promote` (default: `run`).
    #[serde(default = "default_catalog_permissions")]
    pub catalog: Vec<CatalogPermission>,
    /// Which published steps the tenant may see and run: names, or patterns with `*` (e.g.
    /// `billing-*`); empty: all. A step it may not see is `NOT_FOUND`, like one that does not
    /// exist.
    #[serde(default)]
    pub steps: Vec<String>,
}

/// The variables that are not overrides.
/// `STEPBOX_SERVER` and `STEPBOX_TOKEN` are the CLI's (`--server`, its bearer token);
/// `STEPBOX_ISOLATION` is `--isolation`'s.
const RESERVED: &[&str] = &[
    "STEPBOX_CONFIG",
    "STEPBOX_ISOLATION",
    "STEPBOX_LOG",
    "STEPBOX_MODEL",
    "STEPBOX_SERVER",
    "STEPBOX_TOKEN",
];
const SECTIONS: &[&str] = &[
    "server",
    "tls",
    "metrics",
    "log",
    "model",
    "telemetry",
    "catalog",
    "workflows",
    "web",
];
const TOP_LEVEL: &[&str] = &[
    "work_root",
    "cache_dir",
    "policies_dir",
    "python_component",
    "tenants",
];

fn parse_env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

impl Config {
    /// Loads `path` (or the defaults) and applies `vars` (usually `std::env::vars()`).
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("failed to read config `{}`", p.display()))?;
                Config::parse(&text, &p.display().to_string(), vars)
            }
            None => Config::parse("", "<defaults>", vars),
        }
    }

    /// Parses configuration text (`origin` names it in errors) and applies `vars`.
    pub fn parse(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("config `{origin}`: {}", e.to_string().trim_end()))?;
        // Deserialize once now so unknown keys are reported against the file.
        Config::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| anyhow::anyhow!("config `{origin}`: {}", e.to_string().trim_end()))?;
        let mut vars: Vec<_> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("STEPBOX_") && !RESERVED.contains(&k.as_str()))
            .collect();
        vars.sort();
        let mut warnings = Vec::new();
        for (var, raw) in vars {
            let rest = var["STEPBOX_".len()..].to_ascii_lowercase();
            let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_")))
            {
                Some(s) => (Some(*s), rest[s.len() + 1..].to_string()),
                None if TOP_LEVEL.contains(&rest.as_str()) => (None, rest),
                None => {
                    warnings.push(format!(
                        "environment variable {var} is not a configuration key (keys: STEPBOX_{{{}}} or STEPBOX_<{}>_<KEY>); ignored",
                        TOP_LEVEL.join(",").to_ascii_uppercase(),
                        SECTIONS.join("|").to_ascii_uppercase()
                    ));
                    continue;
                }
            };
            let value = parse_env_value(&raw);
            let target = match section {
                Some(s) => table
                    .entry(s)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .with_context(|| format!("{var}: `{s}` in the config file is not a table"))?,
                None => &mut table,
            };
            target.insert(key, value);
            Config::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                anyhow::anyhow!("environment variable {var}: {}", e.to_string().trim_end())
            })?;
        }
        let mut config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        config.warnings = warnings;
        config.check()?;
        Ok(config)
    }

    /// Checks what types cannot: token formats, tenant names, the unauthenticated-bind rule.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                bail!(
                    "tenants[{i}].name must be non-empty and unique (got {:?})",
                    t.name
                );
            }
            for (j, tok) in t.tokens.iter().enumerate() {
                let hex = tok.strip_prefix("sha256:").unwrap_or_default();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!(
                        "tenants[{i}].tokens[{j}] must be `sha256:` and 64 hex digits (make one with `stepbox config hash-token`); never put a plain token in the config"
                    );
                }
            }
            if t.tokens.is_empty() && t.tokens_file.is_none() {
                bail!(
                    "tenants[{i}] (`{}`) has no `tokens` or `tokens_file`: nobody could authenticate as it",
                    t.name
                );
            }
            if t.rate_per_second < 0.0 || !t.rate_per_second.is_finite() {
                bail!("tenants[{i}].rate_per_second must be a non-negative number");
            }
        }
        if let Some(t) = &self.telemetry {
            if !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://"))
            {
                bail!(
                    "telemetry.otlp_endpoint must be an http:// or https:// URL of an OTLP/gRPC collector \
                     (e.g. http://otel-collector:4317), got {:?}",
                    t.otlp_endpoint
                );
            }
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                bail!(
                    "telemetry.sample_ratio must be between 0 and 1, got {}",
                    t.sample_ratio
                );
            }
            for (k, v) in &t.headers {
                if tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()).is_err() {
                    bail!(
                        "telemetry.headers: {k:?} is not a valid gRPC metadata name (lowercase ASCII letters, digits, `-`, `_`, `.`)"
                    );
                }
                if v.parse::<tonic::metadata::AsciiMetadataValue>().is_err() {
                    bail!(
                        "telemetry.headers.{k}: the value must be visible ASCII (no control characters or newlines)"
                    );
                }
            }
        }
        self.workflows.roots().map_err(anyhow::Error::msg)?;
        if let Some(w) = &self.web {
            // The outputs zip is written without ZIP64 records: every size must fit 32 bits.
            if w.keep_bytes.0 >= 4 << 30 {
                bail!(
                    "web.keep_bytes must be less than 4GiB, got {}",
                    w.keep_bytes
                );
            }
            if w.max_upload_files == 0 {
                bail!("web.max_upload_files must be at least 1");
            }
            if self.tenants.is_empty()
                && !w.addr.ip().is_loopback()
                && !self.server.allow_unauthenticated
            {
                bail!(
                    "refusing to serve the web page on {} without authentication: configure \
                     [[tenants]] with tokens, or set server.allow_unauthenticated = true if the \
                     network is trusted",
                    w.addr
                );
            }
        }
        if self.tenants.is_empty()
            && !self.server.addr.ip().is_loopback()
            && !self.server.allow_unauthenticated
        {
            bail!(
                "refusing to serve {} without authentication: configure [[tenants]] with tokens, or set \
                 server.allow_unauthenticated = true if the network is trusted",
                self.server.addr
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, with token hashes and token files masked.
    pub fn masked_toml(&self) -> String {
        let mut c = self.clone();
        for t in &mut c.tenants {
            let n = t.tokens.len();
            t.tokens = if n == 0 {
                Vec::new()
            } else {
                vec![format!("<{n} hashed token(s)>")]
            };
        }
        if let Some(t) = &mut c.telemetry {
            for v in t.headers.values_mut() {
                *v = "<masked>".into();
            }
        }
        if let Some(url) = &mut c.catalog.database {
            *url = stepbox_store::mask_url(url);
        }
        let mut out = toml::to_string_pretty(&c).unwrap_or_default();
        out.push_str(&format!(
            "# model API key: read from ${} ({})\n",
            c.model.api_key_env,
            if std::env::var(&c.model.api_key_env).is_ok_and(|v| !v.is_empty()) {
                "set, not shown"
            } else {
                "not set"
            }
        ));
        out
    }
}

/// `sha256:<hex>` of a bearer token, as tenants' `tokens` hold them.
pub fn hash_token(token: &str) -> String {
    format!(
        "sha256:{}",
        crate::job::digest::sha256_hex(token.trim().as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_serve_loopback_without_setup() {
        let c = Config::load(None, vars(&[])).unwrap();
        assert_eq!(c.server.addr.to_string(), "127.0.0.1:50051");
        assert!(c.tenants.is_empty() && c.tls.is_none() && c.metrics.is_none());
    }

    #[test]
    fn environment_overrides_every_key_and_unknown_ones_are_named() {
        let c = Config::load(
            None,
            vars(&[
                ("STEPBOX_SERVER_ADDR", "127.0.0.1:6000"),
                ("STEPBOX_SERVER_CONCURRENCY", "3"),
                ("STEPBOX_METRICS_ADDR", "127.0.0.1:9100"),
                ("STEPBOX_WORK_ROOT", "/var/lib/stepbox"),
                ("STEPBOX_MODEL_BASE_URL", "http://127.0.0.1:8080/v1"),
                ("STEPBOX_LOG_FORMAT", "json"),
                ("STEPBOX_MODEL", "not-an-override"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.addr.port(), 6000);
        assert_eq!(c.server.concurrency, Some(3));
        assert_eq!(c.metrics.unwrap().addr.port(), 9100);
        assert_eq!(c.work_root.unwrap(), PathBuf::from("/var/lib/stepbox"));
        assert_eq!(c.model.base_url, "http://127.0.0.1:8080/v1");
        assert_eq!(c.log.format, LogFormat::Json);
        let e = Config::load(None, vars(&[("STEPBOX_SERVER_PORT", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("STEPBOX_SERVER_PORT") && e.contains("unknown field `port`"),
            "{e}"
        );
        // The tenant list as one variable.
        let c = Config::load(
            None,
            vars(&[(
                "STEPBOX_TENANTS",
                r#"[{ name = "a", tokens_file = "/run/secrets/a", concurrency = 2 }]"#,
            )]),
        )
        .unwrap();
        assert_eq!(
            (c.tenants[0].name.as_str(), c.tenants[0].concurrency),
            ("a", 2)
        );
        let e = Config::load(None, vars(&[("STEPBOX_TENANTS", r#"[{ name = "a" }]"#)]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tenants[0] (`a`) has no `tokens` or `tokens_file`"),
            "{e}"
        );
        // Other tools share the prefix: a variable that names no key is reported, not fatal.
        let c = Config::load(
            None,
            vars(&[
                ("STEPBOX_WORKROOT", "/x"),
                ("STEPBOX_BIN", "/bin/x"),
                ("STEPBOX_ISOLATION", "in-process"), // `--isolation`'s, not a key: no warning
            ]),
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 2);
        assert!(
            c.warnings[0].contains("STEPBOX_BIN is not a configuration key"),
            "{:?}",
            c.warnings
        );
        assert_eq!(c.work_root, None);
    }

    #[test]
    fn files_are_checked_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stepbox.toml");
        std::fs::write(&p, "[server]\nadress = \"0.0.0.0:1\"\n").unwrap();
        let e = Config::load(Some(&p), vars(&[])).unwrap_err().to_string();
        assert!(e.contains("stepbox.toml") && e.contains("adress"), "{e}");
        std::fs::write(&p, "[server]\naddr = \"0.0.0.0:50051\"\n").unwrap();
        let e = Config::load(Some(&p), vars(&[])).unwrap_err().to_string();
        assert!(
            e.contains("refusing to serve 0.0.0.0:50051 without authentication"),
            "{e}"
        );
        std::fs::write(
            &p,
            "[server]\naddr = \"0.0.0.0:50051\"\nallow_unauthenticated = true\n",
        )
        .unwrap();
        assert!(Config::load(Some(&p), vars(&[])).is_ok());
        std::fs::write(&p, "[[tenants]]\nname = \"a\"\ntokens = [\"hunter2\"]\n").unwrap();
        let e = Config::load(Some(&p), vars(&[])).unwrap_err().to_string();
        assert!(
            e.contains("tenants[0].tokens[0]") && e.contains("never put a plain token"),
            "{e}"
        );
    }

    #[test]
    fn workflow_roots_are_checked_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        let e = Config::parse(
            &format!(
                "[workflows]\noutput_roots = [{:?}]\n",
                missing.display().to_string()
            ),
            "t",
            vars(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workflows.output_roots[0]"), "{e}");
        let root = d.path().display().to_string();
        let c = Config::parse(
            "",
            "t",
            vars(&[("STEPBOX_WORKFLOWS_INPUT_ROOTS", &format!("[{root:?}]"))]),
        )
        .unwrap();
        assert_eq!(c.workflows.input_roots, vec![d.path().to_path_buf()]);
    }

    #[test]
    fn the_web_page_is_off_until_configured_and_checked() {
        assert_eq!(Config::parse("", "t", vars(&[])).unwrap().web, None);
        let c = Config::parse("", "t", vars(&[("STEPBOX_WEB_ADDR", "127.0.0.1:8081")])).unwrap();
        let web = c.web.unwrap();
        assert_eq!(web.addr, "127.0.0.1:8081".parse().unwrap());
        assert_eq!((web.max_upload_size, web.keep_runs), (None, 20));
        let c = Config::parse("[web]\nmax_upload_size = \"1MiB\"\n", "t", vars(&[])).unwrap();
        assert_eq!(c.web.unwrap().max_upload_size, Some(ByteSize(1 << 20)));
        for (text, wanted) in [
            (
                "[web]\naddr = \"0.0.0.0:8080\"\n",
                "refusing to serve the web page on 0.0.0.0:8080",
            ),
            (
                "[web]\nkeep_bytes = \"4GiB\"\n",
                "web.keep_bytes must be less than 4GiB",
            ),
            (
                "[web]\nmax_upload_files = 0\n",
                "web.max_upload_files must be at least 1",
            ),
            ("[web]\nport = 1\n", "unknown field `port`"),
        ] {
            let e = Config::parse(text, "t", vars(&[])).unwrap_err().to_string();
            assert!(e.contains(wanted), "{e}");
        }
    }

    #[test]
    fn telemetry_is_checked() {
        let ok = Config::load(
            None,
            vars(&[("STEPBOX_TELEMETRY_OTLP_ENDPOINT", "http://127.0.0.1:4317")]),
        )
        .unwrap();
        let t = ok.telemetry.unwrap();
        assert_eq!((t.service_name.as_str(), t.sample_ratio), ("stepbox", 1.0));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stepbox.toml");
        for (text, wanted) in [
            (
                "otlp_endpoint = \"collector:4317\"",
                "must be an http:// or https:// URL",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nsample_ratio = 1.5",
                "sample_ratio must be between 0 and 1",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nheaders = { \"Bad Key\" = \"v\" }",
                "not a valid gRPC metadata name",
            ),
            (
                "otlp_endpoint = \"http://c:4317\"\nheaders = { \"x-key\" = \"a\\nb\" }",
                "telemetry.headers.x-key: the value must be visible ASCII",
            ),
            (
                "otlp_endpont = \"http://c:4317\"",
                "unknown field `otlp_endpont`",
            ),
        ] {
            std::fs::write(&p, format!("[telemetry]\n{text}\n")).unwrap();
            let e = format!("{:#}", Config::load(Some(&p), vars(&[])).unwrap_err());
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }

    #[test]
    fn secrets_are_masked() {
        let c = Config {
            tenants: vec![TenantConfig {
                name: "acme".into(),
                tokens: vec![hash_token("s3cret")],
                tokens_file: None,
                policies: vec![],
                concurrency: 0,
                rate_per_second: 0.0,
                burst: None,
                catalog: vec![crate::service::config::CatalogPermission::Run],
                steps: Vec::new(),
            }],
            telemetry: Some(TelemetrySection {
                otlp_endpoint: "https://collector.example:4317".into(),
                service_name: default_service_name(),
                sample_ratio: 1.0,
                headers: [("x-api-key".to_string(), "collector-s3cret".to_string())].into(),
                ca_file: None,
            }),
            catalog: CatalogSection {
                database: Some("postgres://stepbox:db-s3cret@db:5432/stepbox".into()),
                ..CatalogSection::default()
            },
            ..Config::default()
        };
        let shown = c.masked_toml();
        assert!(
            !shown.contains(&hash_token("s3cret")[7..]) && shown.contains("<1 hashed token(s)>"),
            "{shown}"
        );
        assert!(
            !shown.contains("collector-s3cret") && shown.contains("x-api-key = \"<masked>\""),
            "{shown}"
        );
        assert!(
            !shown.contains("db-s3cret")
                && shown.contains("postgres://stepbox:***@db:5432/stepbox"),
            "{shown}"
        );
    }
}
