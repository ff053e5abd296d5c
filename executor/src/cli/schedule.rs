//! `stepbox schedule`: workflow schedules on the local catalog database (the one `stepbox
//! workflow` uses), tenant `local`. `stepbox serve` with a configured `[catalog] database` fires
//! them; inbox and outbox directories must lie under the configuration's `[workflows]` roots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;
use crate::cli::workflow::CatalogArgs;
use crate::job::limits::Millis;
use crate::service::config::Config;
use crate::workflow::model::WorkflowFile;
use crate::workflow::schedule::{
    Overlap, Schedule, ScheduleError, ScheduleInputs, Scheduler, SchedulerOptions, SystemClock,
};

/// The tenant local schedules belong to (as local workflow runs).
const LOCAL_TENANT: &str = "local";

/// `stepbox schedule ...`.
// One value per process: boxing `Create` would only make the clap derive harder to read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Schedule a workflow file or a published workflow: fired by `stepbox serve` on the same
    /// catalog database.
    Create(CreateArgs),
    /// List the schedules.
    List {
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Pause a schedule: its occurrences are neither run nor recorded as missed.
    Pause {
        /// The schedule's id.
        id: String,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Resume a paused schedule.
    Resume {
        /// The schedule's id.
        id: String,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Delete a schedule and its firing records.
    Delete {
        /// The schedule's id.
        id: String,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// A schedule's newest firings and how each ended.
    Firings {
        /// The schedule's id.
        id: String,
        /// How many (newest first).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
}

/// `stepbox schedule create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The workflow file (frozen into the schedule with its programs' sources).
    #[arg(required_unless_present = "workflow", conflicts_with = "workflow")]
    pub file: Option<PathBuf>,
    /// A published workflow instead of a file: `NAME@vN` or `NAME@sha256:HEX` runs that
    /// version always; `NAME@STAGE` (or `NAME`) follows the stage at each firing. Its steps
    /// are always the step versions that workflow version pinned.
    #[arg(long, value_name = "NAME@REF")]
    pub workflow: Option<String>,
    /// Cron expression: 5 fields, or 6 with seconds first.
    #[arg(long)]
    pub cron: String,
    /// IANA time zone the expression is read in.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// A fixed input, `NAME=PATH` (stored in the artifact store now).
    #[arg(long = "input", value_name = "NAME=PATH", conflicts_with = "inbox")]
    pub inputs: Vec<String>,
    /// A directory under `[workflows] input_roots`: each firing takes the newest matching files.
    #[arg(long, value_name = "DIR", requires = "files")]
    pub inbox: Option<PathBuf>,
    /// An inbox input, `NAME=PATTERN` (`*` and `?`).
    #[arg(long = "file", value_name = "NAME=PATTERN", requires = "inbox")]
    pub files: Vec<String>,
    /// A directory under `[workflows] output_roots` that receives the outputs.
    #[arg(long, value_name = "DIR")]
    pub outbox: Option<PathBuf>,
    /// When a run outlasts the interval: `skip`, `queue-one` or `allow`.
    #[arg(long, default_value = "skip")]
    pub overlap: String,
    /// How late a missed occurrence may still run, once (e.g. `1h`).
    #[arg(long, value_name = "DURATION")]
    pub catch_up: Option<Millis>,
    /// The catalog.
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

/// A scheduler on the catalog `args` name, with the configuration's `[workflows]`.
async fn open(args: &CatalogArgs, global: &GlobalArgs) -> anyhow::Result<Scheduler> {
    let config = Config::load(args.config.as_deref(), std::env::vars())?;
    let (catalog, workflows) = args.workflows_with(global, &config, 1).await?;
    let artifacts = workflows.artifacts().clone();
    Scheduler::new(
        catalog.store().clone(),
        workflows,
        artifacts,
        &config.workflows,
        Arc::new(SystemClock),
        SchedulerOptions::default(),
    )
    .map_err(anyhow::Error::msg)
}

/// The flag a schedule field came from.
fn flag_of(field: &str) -> String {
    match field {
        "outbox" => "--outbox".into(),
        "inputs.dir" => "--inbox".into(),
        "cron" => "--cron".into(),
        "timezone" => "--timezone".into(),
        "catch_up" => "--catch-up".into(),
        "workflow_ref" => "--workflow".into(),
        f => match f.strip_prefix("inputs.") {
            Some(name) => format!("--input/--file `{name}`"),
            None => format!("`{f}`"),
        },
    }
}

/// Refusals name the flag (exit 2); a store failure keeps its own exit code.
fn refused(e: ScheduleError) -> anyhow::Error {
    match e {
        ScheduleError::Store(s) => anyhow::Error::new(s),
        ScheduleError::Invalid { ref field, .. } | ScheduleError::Refused { ref field, .. } => {
            anyhow::anyhow!("{}: {e}", flag_of(field))
        }
        ScheduleError::NotFound(_) => anyhow::anyhow!("{e}"),
    }
}

fn name_value<'a>(flag: &str, s: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    s.split_once('=')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .with_context(|| format!("{flag}: expected NAME=VALUE, got `{s}`"))
}

fn utc(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

impl CreateArgs {
    async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let workflow = match &self.file {
            Some(file) => {
                WorkflowFile::load(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            }
            // Filled in from the published version by `Scheduler::create`.
            None => WorkflowFile::default(),
        };
        let overlap: Overlap =
            serde_json::from_value(serde_json::Value::String(self.overlap.replace('-', "_")))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--overlap: expected `skip`, `queue-one` or `allow`, got `{}`",
                        self.overlap
                    )
                })?;
        let absolute = |flag: &str, p: &PathBuf| -> anyhow::Result<PathBuf> {
            std::path::absolute(p).with_context(|| format!("{flag}: `{}`", p.display()))
        };
        let scheduler = open(&self.catalog, global).await?;
        let inputs = match &self.inbox {
            Some(dir) => {
                let mut files = BTreeMap::new();
                for f in &self.files {
                    let (n, pattern) = name_value("--file", f)?;
                    files.insert(n.to_string(), pattern.to_string());
                }
                ScheduleInputs::Inbox {
                    dir: absolute("--inbox", dir)?,
                    files,
                }
            }
            None => {
                let config = Config::load(self.catalog.config.as_deref(), std::env::vars())?;
                let artifacts = crate::cli::serve::artifacts_for(&config.workflows)?;
                let mut fixed = BTreeMap::new();
                for i in &self.inputs {
                    let (n, path) = name_value("--input", i)?;
                    let bytes = std::fs::read(path)
                        .with_context(|| format!("--input `{n}`: cannot read `{path}`"))?;
                    let digest = artifacts.put(&bytes).map_err(anyhow::Error::msg)?;
                    fixed.insert(n.to_string(), digest);
                }
                ScheduleInputs::Fixed(fixed)
            }
        };
        let mut schedule = Schedule {
            id: String::new(),
            tenant: String::new(),
            workflow,
            workflow_ref: self.workflow.clone(),
            cron: self.cron,
            timezone: self.timezone,
            inputs,
            outbox: self
                .outbox
                .as_ref()
                .map(|o| absolute("--outbox", o))
                .transpose()?,
            overlap,
            catch_up: Millis(std::time::Duration::from_secs(3600)),
            paused: false,
        };
        if let Some(c) = self.catch_up {
            schedule.catch_up = c;
        }
        let s = scheduler
            .create(LOCAL_TENANT, schedule)
            .await
            .map_err(refused)?;
        println!("{}", s.id);
        eprintln!(
            "schedule {} of workflow `{}`{}: `{}` in {}",
            s.id,
            s.workflow.name,
            s.workflow_ref
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            s.cron,
            s.timezone
        );
        Ok(0)
    }
}

impl ScheduleCommand {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        match self {
            ScheduleCommand::Create(args) => args.execute(global).await,
            ScheduleCommand::List { catalog } => {
                let scheduler = open(&catalog, global).await?;
                for s in scheduler.list(LOCAL_TENANT).await.map_err(refused)? {
                    println!(
                        "{}  {}  `{}` {}  {}{}",
                        s.id,
                        s.workflow_ref.as_deref().unwrap_or(&s.workflow.name),
                        s.cron,
                        s.timezone,
                        if s.paused { "paused" } else { "active" },
                        s.outbox
                            .map(|o| format!("  -> {}", o.display()))
                            .unwrap_or_default()
                    );
                }
                Ok(0)
            }
            ScheduleCommand::Pause { id, catalog } => {
                let scheduler = open(&catalog, global).await?;
                scheduler
                    .set_paused(LOCAL_TENANT, &id, true)
                    .await
                    .map_err(refused)?;
                println!("{id} paused");
                Ok(0)
            }
            ScheduleCommand::Resume { id, catalog } => {
                let scheduler = open(&catalog, global).await?;
                scheduler
                    .set_paused(LOCAL_TENANT, &id, false)
                    .await
                    .map_err(refused)?;
                println!("{id} resumed");
                Ok(0)
            }
            ScheduleCommand::Delete { id, catalog } => {
                let scheduler = open(&catalog, global).await?;
                scheduler.delete(LOCAL_TENANT, &id).await.map_err(refused)?;
                println!("{id} deleted");
                Ok(0)
            }
            ScheduleCommand::Firings { id, limit, catalog } => {
                let scheduler = open(&catalog, global).await?;
                scheduler.get(LOCAL_TENANT, &id).await.map_err(refused)?;
                for f in scheduler
                    .firings(LOCAL_TENANT, &id, limit)
                    .await
                    .map_err(refused)?
                {
                    println!(
                        "{}  {}  {}  {}{}",
                        utc(f.fire_at),
                        f.status,
                        f.trigger,
                        if f.run_id.is_empty() { "-" } else { &f.run_id },
                        if f.message.is_empty() {
                            String::new()
                        } else {
                            format!("  {}", f.message)
                        }
                    );
                }
                Ok(0)
            }
        }
    }
}
