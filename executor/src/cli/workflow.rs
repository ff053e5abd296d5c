//! `stepbox workflow`: check and run `workflow.toml` on the embedded catalog, with a live view
//! of the steps on a terminal and plain lines otherwise.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::catalog::Catalog;
use crate::cli::GlobalArgs;
use crate::workflow::model::WorkflowFile;
use crate::workflow::{StepState, WorkflowEvent, WorkflowRunRecord, Workflows};
use crate::{Executor, JobError};

/// Where the catalog is.
#[derive(Debug, Args, Default)]
pub struct CatalogArgs {
    /// The catalog database (`sqlite://PATH` or `postgres://...`; default: the configuration's
    /// `[catalog] database`, else `~/.local/share/stepbox/catalog.db`).
    #[arg(long, env = "STEPBOX_CATALOG_DATABASE")]
    pub catalog: Option<String>,
    /// The configuration file (for `[catalog]` stages and database, and the `[workflows]`
    /// artifact store and run limit).
    #[arg(long, env = "STEPBOX_CONFIG")]
    pub config: Option<PathBuf>,
}

impl CatalogArgs {
    /// Opens the catalog these flags name, on an executor from `global`.
    pub async fn open(&self, global: &GlobalArgs) -> anyhow::Result<Arc<Catalog>> {
        let config =
            crate::service::config::Config::load(self.config.as_deref(), std::env::vars())?;
        self.open_with(global, &config).await
    }

    /// The catalog, and a workflow runner on it running `concurrency` steps at once with the
    /// configuration's `[workflows]` artifact store and `artifact_limit`, as `stepbox serve`
    /// and `stepbox schedule` use them.
    pub async fn workflows(
        &self,
        global: &GlobalArgs,
        concurrency: usize,
    ) -> anyhow::Result<(Arc<Catalog>, Workflows)> {
        let config =
            crate::service::config::Config::load(self.config.as_deref(), std::env::vars())?;
        self.workflows_with(global, &config, concurrency).await
    }

    /// [`CatalogArgs::workflows`] with the configuration already loaded.
    pub async fn workflows_with(
        &self,
        global: &GlobalArgs,
        config: &crate::service::config::Config,
        concurrency: usize,
    ) -> anyhow::Result<(Arc<Catalog>, Workflows)> {
        let catalog = self.open_with(global, config).await?;
        let artifacts = Arc::new(crate::cli::serve::artifacts_for(&config.workflows)?);
        let runner = Workflows::new(catalog.clone(), artifacts, concurrency)
            .with_run_limit(config.workflows.artifact_limit.0)
            .with_run_retention(config.workflows.runs_kept());
        Ok((catalog, runner))
    }

    async fn open_with(
        &self,
        global: &GlobalArgs,
        config: &crate::service::config::Config,
    ) -> anyhow::Result<Arc<Catalog>> {
        let url = match &self.catalog {
            Some(u) => u.clone(),
            None => config.catalog.database_url()?,
        };
        let store = stepbox_store::Store::open(&url).await?;
        let executor = Arc::new(Executor::new(global.executor_config()?)?);
        let catalog = Catalog::new(store, executor, config.catalog.stages.clone(), None).await?;
        Ok(Arc::new(catalog))
    }
}

/// `stepbox workflow ...`.
#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Check a workflow file: its shape, its catalog references and its wires.
    Check {
        /// The workflow file.
        file: PathBuf,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Run a workflow file, or a published workflow (`NAME@STAGE`, `NAME@vN`, ...), now.
    Run(WorkflowRunArgs),
    /// Publish a workflow file: pin its step versions, run its cases, store a version.
    Publish {
        /// The workflow file.
        file: PathBuf,
        /// Store it even if it is not verified (it may then only enter the first stage).
        #[arg(long)]
        unverified: bool,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Promote a published workflow version to a stage (its cases re-run first).
    Promote {
        /// `NAME@vN`, `NAME@sha256:HEX`, `NAME@STAGE` or `NAME`.
        reference: String,
        /// The stage.
        #[arg(long = "to")]
        stage: String,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// Print a stored run record as JSON: every step, the outputs, what started it (`trigger`:
    /// `manual`, `api`, `schedule`) and what ran (`source`).
    Record {
        /// The run's id (printed by `workflow run`, listed by `schedule firings`).
        run_id: String,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// List the newest recorded runs (of every workflow, or of one): id, start time, workflow,
    /// status, what started it, and how many steps succeeded or were reused.
    Runs {
        /// Only this workflow's runs.
        name: Option<String>,
        /// Most runs listed.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
    /// List a published workflow's versions and stages, or every workflow.
    Show {
        /// The workflow's name (omit: list all).
        name: Option<String>,
        /// The catalog.
        #[command(flatten)]
        catalog: CatalogArgs,
    },
}

/// `stepbox workflow run`.
#[derive(Debug, Args)]
pub struct WorkflowRunArgs {
    /// The workflow file, or a published workflow's reference.
    pub file: PathBuf,
    /// A workflow input, `NAME=PATH`.
    #[arg(long = "input", value_name = "NAME=PATH")]
    pub inputs: Vec<String>,
    /// Where to write the workflow's outputs: each as its output name plus the file's extension
    /// (`report = "steps.summary.outputs.report.md"` is written as `report.md`).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Print the run record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Resume this failed run: steps whose version, policy and inputs are unchanged are reused.
    #[arg(long, value_name = "RUN_ID")]
    pub resume: Option<String>,
    /// Steps that run at once (default: the number of cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// The catalog.
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

/// The tenant name local runs are recorded under.
const LOCAL_TENANT: &str = "local";

impl WorkflowCommand {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        match self {
            WorkflowCommand::Check { file, catalog } => {
                let wf = WorkflowFile::load(&file).map_err(anyhow::Error::msg)?;
                let plan = wf.plan().map_err(|e| bad_file(&file, e))?;
                let (_, runner) = catalog.workflows(global, 1).await?;
                runner.check(&plan).await.map_err(invalid)?;
                println!(
                    "{}: workflow `{}` OK: {} steps, inputs: {}, outputs: {}",
                    file.display(),
                    plan.name,
                    plan.steps.len(),
                    plan.inputs.keys().cloned().collect::<Vec<_>>().join(", "),
                    plan.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                Ok(0)
            }
            WorkflowCommand::Run(args) => args.execute(global).await,
            WorkflowCommand::Publish {
                file,
                unverified,
                catalog,
            } => {
                let wf = WorkflowFile::load(&file).map_err(anyhow::Error::msg)?;
                let cases = crate::workflow::publish::load_cases(&file, &wf)
                    .map_err(|e| anyhow::Error::new(JobError::invalid("cases", e)))?;
                let (_, runner) = catalog.workflows(global, 2).await?;
                let p = runner
                    .publish(&wf, cases, LOCAL_TENANT, unverified)
                    .await
                    .map_err(invalid)?;
                for c in &p.cases {
                    let verdict = if c.passed { "passed" } else { "FAILED" };
                    eprintln!("case `{}`: {verdict} {}", c.case, c.detail);
                }
                match &p.version {
                    Some(v) => {
                        println!(
                            "{}@v{} sha256:{} {}{}",
                            v.name,
                            v.number,
                            v.digest,
                            v.state,
                            if p.created {
                                ""
                            } else {
                                " (already published)"
                            }
                        );
                        for w in &p.unverified_because {
                            eprintln!("unverified: {w}");
                        }
                        Ok(0)
                    }
                    None => {
                        eprintln!(
                            "stepbox: not published: {} (use --unverified to store it anyway)",
                            p.unverified_because.join("; ")
                        );
                        Ok(1)
                    }
                }
            }
            WorkflowCommand::Promote {
                reference,
                stage,
                catalog,
            } => {
                let r = crate::catalog::StepRef::parse("reference", &reference)
                    .map_err(|e| anyhow::Error::new(JobError::invalid(e.field, e.reason)))?;
                let (_, runner) = catalog.workflows(global, 2).await?;
                let p = runner
                    .promote(&r, &stage, LOCAL_TENANT)
                    .await
                    .map_err(invalid)?;
                if p.promoted {
                    println!("{} -> {stage}", p.record.to_digest);
                    Ok(0)
                } else {
                    eprintln!("stepbox: promotion refused: {}", p.reason);
                    Ok(1)
                }
            }
            WorkflowCommand::Record { run_id, catalog } => {
                let catalog = catalog.open(global).await?;
                let record = catalog
                    .store()
                    .get_workflow_run(LOCAL_TENANT, &run_id)
                    .await?
                    .ok_or_else(|| {
                        anyhow::Error::new(JobError::invalid(
                            "run_id",
                            format!("no workflow run `{run_id}`"),
                        ))
                    })?;
                println!("{}", serde_json::to_string_pretty(&record)?);
                Ok(0)
            }
            WorkflowCommand::Runs {
                name,
                limit,
                catalog,
            } => {
                let catalog = catalog.open(global).await?;
                let runs = catalog
                    .store()
                    .list_workflow_runs(LOCAL_TENANT, name.as_deref(), limit)
                    .await?;
                let mut out = std::io::stdout().lock();
                for v in runs {
                    let Ok(r) = serde_json::from_value::<WorkflowRunRecord>(v) else {
                        continue;
                    };
                    let done = r
                        .steps
                        .iter()
                        .filter(|s| {
                            matches!(
                                s.state,
                                crate::workflow::StepState::Succeeded
                                    | crate::workflow::StepState::Reused
                            )
                        })
                        .count();
                    writeln!(
                        out,
                        "{}  {:<24}  {:<24} {:<9} {:<8} {done}/{} steps",
                        r.run_id,
                        r.started_at,
                        r.workflow,
                        r.status,
                        r.trigger.map_or("", |t| t.as_str()),
                        r.steps.len()
                    )?;
                }
                Ok(0)
            }
            WorkflowCommand::Show { name, catalog } => {
                let catalog = catalog.open(global).await?;
                let store = catalog.store();
                let mut out = std::io::stdout().lock();
                match name {
                    None => {
                        for n in store
                            .list_names(stepbox_store::Kind::Workflow, None)
                            .await?
                        {
                            writeln!(
                                out,
                                "{:<24} v{:<4} {}",
                                n.name, n.latest_number, n.description
                            )?;
                        }
                    }
                    Some(name) => {
                        let versions = store
                            .list_versions(stepbox_store::Kind::Workflow, &name)
                            .await?;
                        if versions.is_empty() {
                            return Err(anyhow::Error::new(JobError::invalid(
                                "name",
                                format!("no workflow `{name}`"),
                            )));
                        }
                        for v in &versions {
                            writeln!(
                                out,
                                "v{:<4} sha256:{} {} by {}",
                                v.number, v.digest, v.state, v.created_by
                            )?;
                        }
                        for s in store
                            .list_stages(stepbox_store::Kind::Workflow, &name)
                            .await?
                        {
                            writeln!(
                                out,
                                "{:<10} -> v{} (sha256:{})",
                                s.stage, s.number, s.digest
                            )?;
                        }
                    }
                }
                Ok(0)
            }
        }
    }
}

fn bad_file(file: &std::path::Path, e: crate::catalog::ModelError) -> anyhow::Error {
    anyhow::Error::new(JobError::invalid(
        e.field,
        format!("{} (in `{}`)", e.reason, file.display()),
    ))
}

/// Workflow refusals are bad requests (exit 2); the rest are host failures (exit 10).
fn invalid(e: crate::workflow::WorkflowError) -> anyhow::Error {
    use crate::workflow::WorkflowError as E;
    match e {
        E::Invalid { .. } | E::NoSuchRun(_) => {
            anyhow::Error::new(JobError::invalid("workflow", e.to_string()))
        }
        E::Catalog { ref error, .. }
            if matches!(
                error,
                crate::catalog::CatalogError::NotFound(_)
                    | crate::catalog::CatalogError::Invalid(_)
            ) =>
        {
            anyhow::Error::new(JobError::invalid("workflow", e.to_string()))
        }
        other => anyhow::Error::new(JobError::Internal(anyhow::anyhow!("{other}"))),
    }
}

impl WorkflowRunArgs {
    async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let concurrency = self
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let (catalog, runner) = self.catalog.workflows(global, concurrency).await?;
        let arg = self.file.to_string_lossy().into_owned();
        let (plan, source) = if !self.file.exists()
            && let Ok(r) = crate::catalog::StepRef::parse("workflow", &arg)
        {
            let (row, _, plan) = runner.resolve_workflow(&r).await.map_err(invalid)?;
            (plan, format!("{}@sha256:{}", row.name, row.digest))
        } else {
            let wf = WorkflowFile::load(&self.file).map_err(anyhow::Error::msg)?;
            (
                wf.plan().map_err(|e| bad_file(&self.file, e))?,
                String::new(),
            )
        };
        let mut inputs = BTreeMap::new();
        for spec in &self.inputs {
            let (name, path) = spec.split_once('=').with_context(|| {
                format!("--input `{spec}` is not NAME=PATH (e.g. sales=sales.csv)")
            })?;
            let bytes =
                std::fs::read(path).with_context(|| format!("failed to read input `{path}`"))?;
            if inputs
                .insert(name.to_string(), bytes::Bytes::from(bytes))
                .is_some()
            {
                bail!("--input `{name}` is given twice");
            }
        }
        let store = catalog.store().clone();
        let previous = match &self.resume {
            Some(id) => {
                let v = store
                    .get_workflow_run(LOCAL_TENANT, id)
                    .await?
                    .ok_or_else(|| {
                        invalid(crate::workflow::WorkflowError::NoSuchRun(id.clone()))
                    })?;
                Some(
                    serde_json::from_value::<WorkflowRunRecord>(v)
                        .context("the stored run record is unreadable")?,
                )
            }
            None => None,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ids: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
        let view = tokio::spawn(progress(
            ids,
            rx,
            std::io::stderr().is_terminal() && !self.json,
        ));
        let record = runner.run(&plan, inputs, previous.as_ref(), Some(tx)).await;
        let _ = view.await;
        let record = record
            .map_err(invalid)?
            .with_origin(crate::workflow::Trigger::Manual, source);
        runner.save_run(LOCAL_TENANT, &record).await?;
        if let Some(dir) = &self.output_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create `{}`", dir.display()))?;
            for (name, (file, _)) in &record.outputs {
                let ext = std::path::Path::new(file)
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(|e| format!(".{e}"))
                    .unwrap_or_default();
                let bytes = runner
                    .output(&record, name)
                    .context("an output's artifact is missing")?;
                let path = dir.join(format!("{name}{ext}"));
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("failed to write `{}`", path.display()))?;
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&record)?);
        } else {
            eprintln!(
                "workflow `{}` {} (run {}, manual; manifest {})",
                record.workflow, record.status, record.run_id, record.digest
            );
            if record.status != "succeeded" {
                eprintln!(
                    "resume it with: stepbox workflow run {} --resume {} ...",
                    self.file.display(),
                    record.run_id
                );
            }
        }
        Ok(if record.status == "succeeded" { 0 } else { 1 })
    }
}

/// Shows each step's state: redrawn in place on a terminal (waiting, running with elapsed time,
/// the end), one line per change otherwise.
async fn progress(
    ids: Vec<String>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<WorkflowEvent>,
    live: bool,
) {
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut ended: HashMap<String, String> = HashMap::new();
    let width = ids.iter().map(String::len).max().unwrap_or(4);
    let mut drawn = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let draw =
        |started: &HashMap<String, Instant>, ended: &HashMap<String, String>, drawn: &mut bool| {
            let mut err = std::io::stderr().lock();
            if *drawn {
                let _ = write!(err, "\x1b[{}A", ids.len());
            }
            for id in &ids {
                let state = match (ended.get(id), started.get(id)) {
                    (Some(e), _) => e.clone(),
                    (None, Some(t)) => format!("running {:.1}s", t.elapsed().as_secs_f64()),
                    (None, None) => "waiting".into(),
                };
                let _ = writeln!(err, "\x1b[2K  {id:<width$}  {state}");
            }
            *drawn = true;
        };
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let line = match &ev {
                    WorkflowEvent::Queued(_) => None,
                    WorkflowEvent::Started(id) => {
                        started.insert(id.clone(), Instant::now());
                        Some(format!("{id}: running"))
                    }
                    WorkflowEvent::Finished(r) => {
                        let took = started.get(&r.id).map(|t| format!(" in {:.1}s", t.elapsed().as_secs_f64())).unwrap_or_default();
                        let text = match r.state {
                            StepState::Succeeded => format!("succeeded{took}"),
                            StepState::Reused => "reused from the resumed run".to_string(),
                            StepState::Failed => format!("{}{took}: {}", r.status, r.message),
                            StepState::Skipped => r.message.clone(),
                        };
                        ended.insert(r.id.clone(), text.clone());
                        Some(format!("{}: {text}", r.id))
                    }
                };
                if live {
                    draw(&started, &ended, &mut drawn);
                } else if let Some(l) = line {
                    eprintln!("{l}");
                }
            }
            _ = tick.tick(), if live => draw(&started, &ended, &mut drawn),
        }
    }
    if live {
        draw(&started, &ended, &mut drawn);
    }
}
