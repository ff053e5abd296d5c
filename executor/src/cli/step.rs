//! `stepbox step`: the step catalog from the command line: publish a `step.toml`, list, show,
//! promote, read the promotion history, and run a published step by reference.
//!
//! By default every subcommand works on the embedded catalog: the database of `--catalog`,
//! `STEPBOX_CATALOG_DATABASE`, the configuration's `[catalog] database` (`--config`,
//! `STEPBOX_CONFIG`), else `~/.local/share/stepbox/catalog.db` (`$XDG_DATA_HOME`), the file a
//! `stepbox serve` without configuration uses too, with the configuration's stages. The audit
//! trail names the caller `local:$USER` (`local` when `USER` is unset). With `--server URL`
//! (`STEPBOX_SERVER`) they go to a `stepbox serve` over gRPC instead ([`crate::cli::remote`]),
//! with the bearer token of `STEPBOX_TOKEN`; both doors print the same.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::Executor;
use crate::catalog::{
    CaseCheck, CaseResult, Catalog, CatalogError, Selector, StepDefinition, StepRef, Version,
};
use crate::cli::GlobalArgs;
use crate::cli::io::{Finished, Presentation, present, read_inputs, read_stdin};
use crate::cli::remote::Remote;
use crate::service::config::Config;

/// `stepbox step ...`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Which catalog: local or a server.
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: StepCommand,
}

/// Where the catalog is: a database this process opens, or a server.
#[derive(Debug, Clone, Default, Args)]
pub struct CatalogArgs {
    /// The catalog database, `sqlite://PATH` or `postgres://USER:PASSWORD@HOST/DB` (default: the
    /// configuration's `[catalog] database`, else `~/.local/share/stepbox/catalog.db`).
    #[arg(
        long = "catalog",
        global = true,
        value_name = "URL",
        env = "STEPBOX_CATALOG_DATABASE"
    )]
    pub database: Option<String>,
    /// The configuration file whose `[catalog]` section (database, stages) applies.
    #[arg(long, global = true, value_name = "FILE", env = "STEPBOX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Use this `stepbox serve` (`http://HOST:PORT`, or `https://` for TLS) instead of a local
    /// catalog; the bearer token comes from STEPBOX_TOKEN.
    #[arg(long, global = true, value_name = "URL", env = "STEPBOX_SERVER")]
    pub server: Option<String>,
    /// With an `https://` server: a PEM file of the CA that signed its certificate (default: the
    /// web's public roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
}

/// `stepbox step ...` subcommands.
#[derive(Debug, Subcommand)]
pub enum StepCommand {
    /// Run a step.toml's cases and store it as a version: verified when all pass (exit 1 when a
    /// case fails and --unverified is not given).
    Publish(PublishArgs),
    /// List published steps with their newest version.
    List(ListArgs),
    /// A step's versions, stages and case verdicts, or one version (NAME@REF) in detail.
    Show(ShowArgs),
    /// Re-run a version's cases under a stage's policy and point the stage at it if all pass
    /// (exit 1 when refused).
    Promote(PromoteArgs),
    /// A step's promotion audit trail, newest first: accepted and refused attempts.
    History(HistoryArgs),
    /// Run a published step by reference, exactly like `stepbox run` (output, files, exit codes).
    Run(StepRunArgs),
    /// Print the JSON Schema of `step.toml`.
    Schema,
}

/// `stepbox step publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The step file.
    #[arg(default_value = "step.toml")]
    pub file: PathBuf,
    /// Store the version as unverified when a case fails (it may then only enter the first stage).
    #[arg(long)]
    pub unverified: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `stepbox step list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only steps whose name or description contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    /// Print the steps as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `stepbox step show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// `NAME`, or one version: `NAME@STAGE`, `NAME@vN`, `NAME@sha256:HEX`.
    #[arg(value_name = "NAME[@REF]")]
    pub reference: String,
    /// Print as JSON (definitions included).
    #[arg(long)]
    pub json: bool,
}

/// `stepbox step promote`.
#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The version: `NAME@vN`, `NAME@sha256:HEX`, `NAME@STAGE` or `NAME` (newest verified).
    #[arg(value_name = "NAME@REF")]
    pub reference: String,
    /// The stage to point at it.
    #[arg(long = "to", value_name = "STAGE")]
    pub stage: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `stepbox step history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The step's name.
    pub name: String,
    /// Most records.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Print the records as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `stepbox step run`.
#[derive(Debug, Args)]
pub struct StepRunArgs {
    /// `NAME@STAGE`, `NAME@vN`, `NAME@sha256:HEX`, or `NAME` (newest verified version).
    #[arg(value_name = "NAME@REF")]
    pub reference: String,
    /// An input file, placed in the data directory under its file name.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// A directory of inputs, placed in the data directory keeping relative paths.
    #[arg(long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// Where to write the step's output files (keeping relative paths).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// A file whose bytes become the step's stdin.
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Print the whole result as JSON on stdout instead of passing the step's output through.
    #[arg(long)]
    pub json: bool,
    /// Don't print the status line on stderr when the step does not succeed.
    #[arg(short, long)]
    pub quiet: bool,
    /// Arguments for the step (after `--`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// The name the audit trail gives this process: `local:$USER`, or `local`.
pub fn local_tenant() -> String {
    match std::env::var("USER") {
        Ok(u) if !u.is_empty() => format!("local:{u}"),
        _ => "local".into(),
    }
}

/// One case's verdicts, as both doors report them.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CaseView {
    pub case: String,
    pub status: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub policy: String,
    pub checks: Vec<CaseCheck>,
    pub manifest_digest: String,
}

impl CaseView {
    fn passed(&self) -> bool {
        self.status == "SUCCEEDED"
    }
}

impl From<&CaseResult> for CaseView {
    fn from(c: &CaseResult) -> CaseView {
        CaseView {
            case: c.case.clone(),
            status: c.status.clone(),
            message: c.message.clone(),
            policy: c.policy.clone(),
            checks: c.checks.clone(),
            manifest_digest: c.manifest_digest.clone(),
        }
    }
}

/// A version.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VersionView {
    pub name: String,
    pub number: i64,
    pub digest: String,
    pub verified: bool,
    pub description: String,
    pub created_by: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub cases: Vec<CaseView>,
    /// The whole definition (only where one version is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub definition: Option<StepDefinition>,
}

impl VersionView {
    fn local(v: &Version, with_definition: bool) -> VersionView {
        VersionView {
            name: v.name.clone(),
            number: v.number,
            digest: v.digest.clone(),
            verified: v.verified,
            description: v.definition.description.clone(),
            created_by: v.created_by.clone(),
            created_at: v.created_at,
            cases: v.cases.iter().map(CaseView::from).collect(),
            definition: with_definition.then(|| v.definition.clone()),
        }
    }

    fn label(&self) -> String {
        format!("{}@v{}", self.name, self.number)
    }
}

/// What a publication did.
#[derive(Debug, Serialize)]
pub(crate) struct PublishView {
    /// The stored version (None: refused).
    pub version: Option<VersionView>,
    pub created: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub refused_reason: String,
    pub cases: Vec<CaseView>,
}

/// One step in a listing.
#[derive(Debug, Serialize)]
pub(crate) struct SummaryView {
    pub name: String,
    pub description: String,
    pub latest_number: i64,
    pub latest_digest: String,
    pub latest_verified: bool,
    /// Unix milliseconds.
    pub updated_at: i64,
    pub versions: i64,
}

/// Where a stage points.
#[derive(Debug, Serialize)]
pub(crate) struct StageView {
    pub stage: String,
    /// The stage's own policy (None: each version's).
    pub policy: Option<String>,
    pub number: Option<i64>,
    pub digest: Option<String>,
    pub updated_at: Option<i64>,
    pub updated_by: Option<String>,
}

/// One step.
#[derive(Debug, Serialize)]
pub(crate) struct StepView {
    pub name: String,
    pub stages: Vec<StageView>,
    /// v1 first.
    pub versions: Vec<VersionView>,
    /// The version the reference selected (for a bare name: the newest verified one).
    pub selected: Option<VersionView>,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PromotionView {
    pub id: i64,
    pub stage: String,
    pub from_digest: Option<String>,
    pub from_number: Option<i64>,
    pub to_digest: String,
    pub to_number: Option<i64>,
    pub tenant: String,
    /// Unix milliseconds.
    pub at: i64,
    pub accepted: bool,
    pub reason: String,
    pub policy: String,
}

/// What a promotion did.
#[derive(Debug, Serialize)]
pub(crate) struct PromoteView {
    pub promoted: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub record: PromotionView,
    pub cases: Vec<CaseView>,
}

/// The catalog a command works on: opened here, or a server's.
#[derive(Debug)]
pub(crate) enum Door {
    /// A catalog this process opened, and the name its audit records carry.
    Local(Box<Catalog>, String),
    /// A `stepbox serve`.
    Remote(Remote),
}

impl CatalogArgs {
    /// Opens the catalog these options name. `global` gives the executor (policies, work root,
    /// cache, component), completed from the configuration file like `stepbox serve` does.
    pub(crate) async fn open(&self, global: &GlobalArgs) -> anyhow::Result<Door> {
        if let Some(url) = self.server.as_deref().filter(|s| !s.is_empty()) {
            return Ok(Door::Remote(
                Remote::connect(url, self.server_ca.as_deref()).await?,
            ));
        }
        let config = Config::load(self.config.as_deref(), std::env::vars())?;
        let url = match self.database.as_deref().filter(|s| !s.is_empty()) {
            Some(u) => u.to_string(),
            None => config.catalog.database_url()?,
        };
        let mut executor = global.executor_config()?;
        if global.policies_dir.is_none()
            && let Some(dir) = &config.policies_dir
        {
            executor.policies = crate::job::policy::PolicySet::load_dir(dir)?;
        }
        if global.work_root.is_none()
            && let Some(w) = &config.work_root
        {
            executor.work_root = w.clone();
        }
        if executor.cache_dir.is_none() {
            executor.cache_dir = config.cache_dir.clone();
        }
        if executor.python_component.is_none() {
            executor.python_component = config.python_component.clone();
        }
        let executor = Arc::new(Executor::new(executor)?);
        let store = stepbox_store::Store::open(&url).await?;
        let catalog = Catalog::new(store, executor, config.catalog.stages.clone(), None).await?;
        Ok(Door::Local(Box::new(catalog), local_tenant()))
    }
}

fn parse_ref(field: &str, s: &str) -> anyhow::Result<StepRef> {
    Ok(StepRef::parse(field, s).map_err(CatalogError::Invalid)?)
}

impl Door {
    /// Publishes a definition.
    pub(crate) async fn publish(
        &self,
        def: &StepDefinition,
        allow_unverified: bool,
    ) -> anyhow::Result<PublishView> {
        match self {
            Door::Local(catalog, tenant) => {
                let p = catalog.publish(def, tenant, allow_unverified).await?;
                let cases: Vec<CaseView> = p.cases.iter().map(CaseView::from).collect();
                let refused_reason = if p.version.is_some() {
                    String::new()
                } else {
                    refusal(&cases)
                };
                Ok(PublishView {
                    version: p.version.as_deref().map(|v| VersionView::local(v, false)),
                    created: p.created,
                    refused_reason,
                    cases,
                })
            }
            Door::Remote(r) => r.publish(def, allow_unverified).await,
        }
    }

    async fn list(&self, filter: Option<&str>) -> anyhow::Result<Vec<SummaryView>> {
        match self {
            Door::Local(catalog, _) => Ok(catalog
                .list(filter)
                .await?
                .into_iter()
                .map(|s| SummaryView {
                    name: s.name,
                    description: s.description,
                    latest_number: s.latest_number,
                    latest_digest: s.latest_digest,
                    latest_verified: s.latest_state == stepbox_store::VersionState::Verified,
                    updated_at: s.updated_at,
                    versions: s.versions,
                })
                .collect()),
            Door::Remote(r) => r.list(filter.unwrap_or_default()).await,
        }
    }

    async fn show(&self, reference: &str) -> anyhow::Result<StepView> {
        match self {
            Door::Local(catalog, _) => {
                let r = parse_ref("step_ref", reference)?;
                let o = catalog.overview(&r.name).await?;
                let selected = match catalog.resolve_uncached(&r).await {
                    Ok(res) => Some(VersionView::local(&res.version, true)),
                    Err(CatalogError::NotFound(_)) if r.selector == Selector::Latest => None,
                    Err(e) => return Err(e.into()),
                };
                let stages = o
                    .stages
                    .iter()
                    .map(|(name, row)| StageView {
                        stage: name.clone(),
                        policy: catalog
                            .stages()
                            .iter()
                            .find(|s| &s.name == name)
                            .and_then(|s| s.policy.clone()),
                        number: row.as_ref().map(|r| r.number),
                        digest: row.as_ref().map(|r| r.digest.clone()),
                        updated_at: row.as_ref().map(|r| r.updated_at),
                        updated_by: row.as_ref().map(|r| r.updated_by.clone()),
                    })
                    .collect();
                Ok(StepView {
                    name: o.name,
                    stages,
                    versions: o
                        .versions
                        .iter()
                        .map(|v| VersionView::local(v, false))
                        .collect(),
                    selected,
                })
            }
            Door::Remote(r) => r.show(reference).await,
        }
    }

    async fn promote(&self, reference: &str, stage: &str) -> anyhow::Result<PromoteView> {
        match self {
            Door::Local(catalog, tenant) => {
                let r = parse_ref("step_ref", reference)?;
                let p = catalog.promote(&r, stage, tenant).await?;
                let numbers = local_numbers(catalog, &r.name).await?;
                Ok(PromoteView {
                    promoted: p.promoted,
                    reason: p.reason,
                    record: promotion_view(&p.record, &numbers),
                    cases: p.cases.iter().map(CaseView::from).collect(),
                })
            }
            Door::Remote(rem) => rem.promote(reference, stage).await,
        }
    }

    async fn history(&self, name: &str, limit: u32) -> anyhow::Result<Vec<PromotionView>> {
        match self {
            Door::Local(catalog, _) => {
                let records = catalog.history(name, limit).await?;
                let numbers = local_numbers(catalog, name).await?;
                Ok(records
                    .iter()
                    .map(|r| promotion_view(r, &numbers))
                    .collect())
            }
            Door::Remote(r) => r.history(name, limit).await,
        }
    }

    async fn run(
        &self,
        reference: &str,
        inputs: Vec<crate::InputFile>,
        stdin: bytes::Bytes,
        args: Vec<String>,
    ) -> anyhow::Result<Finished> {
        match self {
            Door::Local(catalog, _) => {
                let r = parse_ref("step_ref", reference)?;
                let (result, verdicts, _) = catalog
                    .run(
                        &r,
                        inputs,
                        stdin,
                        args,
                        Vec::new(),
                        crate::RunOptions::default(),
                    )
                    .await?;
                Finished::local(result, verdicts)
            }
            Door::Remote(rem) => rem.run(reference, inputs, stdin, args).await,
        }
    }
}

/// Digest → version number, for a step's audit records.
async fn local_numbers(
    catalog: &Catalog,
    name: &str,
) -> anyhow::Result<std::collections::HashMap<String, i64>> {
    Ok(match catalog.overview(name).await {
        Ok(o) => o
            .versions
            .iter()
            .map(|v| (v.digest.clone(), v.number))
            .collect(),
        Err(CatalogError::NotFound(_)) => Default::default(),
        Err(e) => return Err(e.into()),
    })
}

fn promotion_view(
    r: &stepbox_store::PromotionRecord,
    numbers: &std::collections::HashMap<String, i64>,
) -> PromotionView {
    PromotionView {
        id: r.id,
        stage: r.stage.clone(),
        from_number: r.from_digest.as_ref().and_then(|d| numbers.get(d).copied()),
        from_digest: r.from_digest.clone(),
        to_number: numbers.get(&r.to_digest).copied(),
        to_digest: r.to_digest.clone(),
        tenant: r.tenant.clone(),
        at: r.at,
        accepted: r.accepted,
        reason: r.reason.clone(),
        policy: r
            .evidence
            .get("policy")
            .and_then(|p| p.as_str())
            .unwrap_or_default()
            .to_string(),
    }
}

/// Why a publication stored nothing.
fn refusal(cases: &[CaseView]) -> String {
    if cases.is_empty() {
        return "the step has no cases, so nothing shows that it works: add a case, or publish \
                with --unverified"
            .into();
    }
    let failed: Vec<&str> = cases
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.case.as_str())
        .collect();
    format!(
        "{} of {} cases failed: {}; nothing was stored (publish with --unverified to keep it \
         anyway)",
        failed.len(),
        cases.len(),
        failed.join(", ")
    )
}

/// `2026-11-27T06:40:00Z` of unix milliseconds.
fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn short(digest: &str) -> String {
    format!("sha256:{}", &digest[..digest.len().min(12)])
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints each case's verdict and the details of what failed.
fn print_cases(out: &mut impl Write, cases: &[CaseView], indent: &str) -> std::io::Result<()> {
    for c in cases {
        let passed = c.checks.iter().filter(|k| k.passed).count();
        writeln!(
            out,
            "{indent}case {}: {} ({}, {passed}/{} checks passed, policy {}, manifest {})",
            c.case,
            if c.passed() { "passed" } else { "FAILED" },
            c.status,
            c.checks.len(),
            c.policy,
            short(&c.manifest_digest)
        )?;
        if !c.passed() && !c.message.is_empty() {
            writeln!(out, "{indent}  {}", c.message)?;
        }
        for k in c.checks.iter().filter(|k| !k.passed) {
            writeln!(out, "{indent}  check {}: FAILED: {}", k.name, k.detail)?;
        }
    }
    Ok(())
}

impl PublishArgs {
    async fn execute(&self, door: &Door, def: &StepDefinition) -> anyhow::Result<u8> {
        let p = door.publish(def, self.unverified).await?;
        if self.json {
            print_json(&p)?;
        } else {
            print_publication(&p, &mut std::io::stdout().lock())?;
        }
        Ok(if p.version.is_some() { 0 } else { 1 })
    }
}

/// Publishes what another door (`generate`, `import`) made and reports it on `out`, one line per
/// case and one for the version; 0 when stored, 1 when its cases failed.
pub(crate) async fn publish_from_door(
    door: &Door,
    def: &StepDefinition,
    out: &mut impl Write,
) -> anyhow::Result<u8> {
    let p = door.publish(def, false).await?;
    print_publication(&p, out)?;
    Ok(if p.version.is_some() { 0 } else { 1 })
}

/// Prints a publication: the case verdicts, then the version (or why nothing was stored).
fn print_publication(p: &PublishView, out: &mut impl Write) -> anyhow::Result<()> {
    print_cases(out, &p.cases, "")?;
    match &p.version {
        Some(v) => writeln!(
            out,
            "{} sha256:{} ({}, {})",
            v.label(),
            v.digest,
            if v.verified { "verified" } else { "UNVERIFIED" },
            if p.created {
                "new"
            } else {
                "already published: nothing ran"
            }
        )?,
        None => writeln!(out, "not published: {}", p.refused_reason)?,
    }
    Ok(())
}

impl ListArgs {
    async fn execute(&self, door: &Door) -> anyhow::Result<u8> {
        let steps = door.list(self.filter.as_deref()).await?;
        if self.json {
            print_json(&steps)?;
            return Ok(0);
        }
        let mut out = std::io::stdout().lock();
        if steps.is_empty() {
            writeln!(out, "no steps")?;
        }
        for s in &steps {
            writeln!(
                out,
                "{:<32} v{:<4} {:<10} {:>3} version{}  {}  {}",
                s.name,
                s.latest_number,
                if s.latest_verified {
                    "verified"
                } else {
                    "unverified"
                },
                s.versions,
                if s.versions == 1 { " " } else { "s" },
                when(s.updated_at),
                s.description.lines().next().unwrap_or_default()
            )?;
        }
        Ok(0)
    }
}

impl ShowArgs {
    async fn execute(&self, door: &Door) -> anyhow::Result<u8> {
        let step = door.show(&self.reference).await?;
        if self.json {
            print_json(&step)?;
            return Ok(0);
        }
        let mut out = std::io::stdout().lock();
        let number = |digest: &str| {
            step.versions
                .iter()
                .find(|v| v.digest == digest)
                .map(|v| format!("v{}", v.number))
                .unwrap_or_else(|| short(digest))
        };
        let detail = self.reference.contains('@');
        if !detail {
            writeln!(out, "{}", step.name)?;
            if let Some(v) = step.versions.last() {
                writeln!(out, "  {}", v.description)?;
            }
            writeln!(out, "stages:")?;
            for s in &step.stages {
                let policy = match &s.policy {
                    Some(p) => format!("policy {p}"),
                    None => "the version's policy".into(),
                };
                match (&s.digest, s.updated_at) {
                    (Some(d), Some(at)) => writeln!(
                        out,
                        "  {:<10} -> {:<4} {}  ({policy}; since {} by {})",
                        s.stage,
                        number(d),
                        short(d),
                        when(at),
                        s.updated_by.as_deref().unwrap_or_default()
                    )?,
                    _ => writeln!(out, "  {:<10} -> (unset)  ({policy})", s.stage)?,
                }
            }
            writeln!(out, "versions:")?;
            for v in step.versions.iter().rev() {
                let passed = v.cases.iter().filter(|c| c.passed()).count();
                writeln!(
                    out,
                    "  v{:<4} {}  {:<10} {}/{} cases passed  {} by {}",
                    v.number,
                    short(&v.digest),
                    if v.verified { "verified" } else { "unverified" },
                    passed,
                    v.cases.len(),
                    when(v.created_at),
                    v.created_by
                )?;
                print_cases(&mut out, &v.cases, "    ")?;
            }
            match &step.selected {
                Some(v) => writeln!(out, "latest verified: {}", v.label())?,
                None => writeln!(out, "latest verified: none")?,
            }
            return Ok(0);
        }
        let Some(v) = &step.selected else {
            anyhow::bail!("no version `{}`", self.reference);
        };
        writeln!(out, "{}  sha256:{}", v.label(), v.digest)?;
        writeln!(
            out,
            "state:       {}",
            if v.verified { "verified" } else { "unverified" }
        )?;
        writeln!(out, "description: {}", v.description)?;
        writeln!(
            out,
            "published:   {} by {}",
            when(v.created_at),
            v.created_by
        )?;
        let stages: Vec<&str> = step
            .stages
            .iter()
            .filter(|s| s.digest.as_deref() == Some(v.digest.as_str()))
            .map(|s| s.stage.as_str())
            .collect();
        writeln!(
            out,
            "stages:      {}",
            if stages.is_empty() {
                "none".into()
            } else {
                stages.join(", ")
            }
        )?;
        if let Some(d) = &v.definition {
            writeln!(
                out,
                "runs:        {} {}, layout {}, policy {}",
                d.runtime,
                d.filename.as_deref().unwrap_or("step.py"),
                d.layout,
                d.policy
            )?;
            writeln!(out, "origin:      {}", origin(&d.origin))?;
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            writeln!(out, "inputs:      {}", list(d.declared_inputs()))?;
            writeln!(out, "outputs:     {}", list(d.declared_outputs()))?;
            writeln!(
                out,
                "contract:    {}",
                list(d.contract.iter().map(describe_check).collect())
            )?;
        }
        writeln!(out, "cases:")?;
        print_cases(&mut out, &v.cases, "  ")?;
        Ok(0)
    }
}

fn origin(o: &crate::catalog::Origin) -> String {
    use crate::catalog::Origin;
    match o {
        Origin::File { path } => format!("file {path}"),
        Origin::Api => "sent inline over the API".into(),
        Origin::Generated { model, .. } => {
            format!("generated by {model} (transcript kept in the version)")
        }
        Origin::Conversation {
            title,
            conversation_id,
        } => format!("conversation {title:?} ({conversation_id})"),
    }
}

fn describe_check(c: &crate::catalog::CheckSpec) -> String {
    if !c.name.is_empty() {
        return c.name.clone();
    }
    match &c.path {
        Some(p) => format!("{} {p}", c.kind),
        None => c.kind.clone(),
    }
}

impl PromoteArgs {
    async fn execute(&self, door: &Door) -> anyhow::Result<u8> {
        let p = door.promote(&self.reference, &self.stage).await?;
        if self.json {
            print_json(&p)?;
        } else {
            let mut out = std::io::stdout().lock();
            print_cases(&mut out, &p.cases, "")?;
            let to = label(&p.record.to_number, &p.record.to_digest);
            let from = match (&p.record.from_number, &p.record.from_digest) {
                (n, Some(d)) => label(n, d),
                (_, None) => "(unset)".into(),
            };
            if p.promoted {
                writeln!(
                    out,
                    "promoted {}@{to} to {} (was {from}; policy {})",
                    name_of(&self.reference),
                    p.record.stage,
                    p.record.policy
                )?;
            } else {
                writeln!(
                    out,
                    "refused: {}@{to} to {}: {}",
                    name_of(&self.reference),
                    p.record.stage,
                    p.reason
                )?;
            }
        }
        Ok(if p.promoted { 0 } else { 1 })
    }
}

fn name_of(reference: &str) -> &str {
    reference.split('@').next().unwrap_or(reference)
}

fn label(number: &Option<i64>, digest: &str) -> String {
    match number {
        Some(n) => format!("v{n}"),
        None => short(digest),
    }
}

impl HistoryArgs {
    async fn execute(&self, door: &Door) -> anyhow::Result<u8> {
        let records = door.history(&self.name, self.limit).await?;
        if self.json {
            print_json(&records)?;
            return Ok(0);
        }
        let mut out = std::io::stdout().lock();
        if records.is_empty() {
            writeln!(out, "no promotions of `{}`", self.name)?;
        }
        for r in &records {
            let from = match &r.from_digest {
                Some(d) => label(&r.from_number, d),
                None => "(unset)".into(),
            };
            writeln!(
                out,
                "{}  {:<10} {from} -> {}  {}  by {}: {}",
                when(r.at),
                r.stage,
                label(&r.to_number, &r.to_digest),
                if r.accepted { "accepted" } else { "REFUSED" },
                r.tenant,
                r.reason
            )?;
        }
        Ok(0)
    }
}

impl StepRunArgs {
    async fn execute(&self, door: &Door, verbose: bool) -> anyhow::Result<u8> {
        let inputs = read_inputs(self.input_dir.as_deref(), &self.inputs)?;
        let stdin = read_stdin(self.stdin.as_deref())?;
        let finished = door
            .run(&self.reference, inputs, stdin, self.args.clone())
            .await?;
        present(
            &finished,
            &Presentation {
                output_dir: self.output_dir.as_deref(),
                json: self.json,
                quiet: self.quiet,
                verbose,
            },
        )
    }
}

impl StepArgs {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        if let StepCommand::Schema = self.command {
            write!(
                std::io::stdout().lock(),
                "{}",
                crate::catalog::stepfile::json_schema()
            )?;
            return Ok(0);
        }
        // A malformed step.toml is reported before any database is opened.
        let def = match &self.command {
            StepCommand::Publish(p) => Some(crate::catalog::stepfile::load(&p.file)?),
            _ => None,
        };
        let door = self.catalog.open(global).await?;
        match &self.command {
            StepCommand::Publish(a) => a.execute(&door, def.as_ref().expect("loaded above")).await,
            StepCommand::List(a) => a.execute(&door).await,
            StepCommand::Show(a) => a.execute(&door).await,
            StepCommand::Promote(a) => a.execute(&door).await,
            StepCommand::History(a) => a.execute(&door).await,
            StepCommand::Run(a) => a.execute(&door, global.verbose).await,
            StepCommand::Schema => unreachable!("handled above"),
        }
    }
}

/// Exit code of a catalog error: 2 for refusals (bad names, refs, stages; not found), 10 when the
/// database or host failed.
pub(crate) fn exit_code(e: &CatalogError) -> u8 {
    match e {
        CatalogError::Invalid(_) | CatalogError::NotFound(_) => crate::cli::EXIT_BAD_REQUEST,
        CatalogError::Job(j) if j.is_caller_error() => crate::cli::EXIT_BAD_REQUEST,
        _ => crate::cli::EXIT_HOST_ERROR,
    }
}
