//! `stepbox import`: a ChatGPT Code Interpreter conversation as a step, summarised, optionally
//! ported to the standard library by the model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::Executor;
use crate::catalog::{Blob, Case, CheckSpec, Origin, StepDefinition};
use crate::cli::generate::ModelArgs;
use crate::cli::io::read_inputs;
use crate::cli::{CatalogArgs, GlobalArgs};
use crate::job::request::Layout;

/// `stepbox import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A ChatGPT shared-link page (.html), its __NEXT_DATA__ JSON, or a conversations.json export.
    pub file: PathBuf,
    /// For conversations.json: the id or title of the conversation.
    #[arg(long = "conversation", value_name = "ID|TITLE")]
    pub select: Option<String>,
    /// Write the step's program here.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print everything (summary, cells, program) as JSON.
    #[arg(long)]
    pub json: bool,
    /// When the step imports modules the runtime lacks, ask the model to port it to the standard
    /// library, verified on --input files against the conversation's recorded outputs.
    #[arg(long)]
    pub port: bool,
    /// The conversation's input files, for --port and --publish.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// Most model calls for --port.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// The model to ask for --port.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Publish the step to the step catalog under this name: its case is the --input files with
    /// the conversation's recorded stdout, its contract that the offered files are produced.
    #[arg(long, value_name = "NAME", requires = "inputs")]
    pub publish: Option<String>,
    /// The published step's description (default: the conversation's title).
    #[arg(long, requires = "publish")]
    pub description: Option<String>,
    /// The catalog --publish stores into.
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

impl ImportArgs {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("failed to read `{}`", self.file.display()))?;
        let door = match &self.publish {
            Some(name) => {
                crate::catalog::model::check_name("--publish", name)
                    .map_err(crate::catalog::CatalogError::Invalid)?;
                Some(self.catalog.open(global).await?)
            }
            None => None,
        };
        let executor = std::sync::Arc::new(Executor::new(global.executor_config()?)?);
        let mut imported =
            crate::authoring::conversation::import(&executor, &bytes, self.select.as_deref())
                .await?;
        let mut ported = None;
        if self.port && !imported.unsupported_imports.is_empty() {
            ported = Some(self.port_step(&executor, &mut imported).await?);
        }
        if let Some(path) = &self.output {
            std::fs::write(path, &imported.source)
                .with_context(|| format!("failed to write `{}`", path.display()))?;
        }
        // The publication's report: on stderr with --json (stdout carries the import alone),
        // after the summary otherwise.
        let published = match (&door, &self.publish) {
            (Some(door), Some(name)) => {
                let def = self.definition(name, &imported)?;
                let mut report = Vec::new();
                let code = crate::cli::step::publish_from_door(door, &def, &mut report).await?;
                Some((code, report))
            }
            _ => None,
        };
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &imported)?;
            writeln!(out)?;
            return Ok(match published {
                Some((code, report)) => {
                    std::io::stderr().lock().write_all(&report)?;
                    code
                }
                None => 0,
            });
        }
        let ex = &imported.extracted;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "Title:    {}{}",
            ex.title,
            if ex.conversation_id.is_empty() {
                String::new()
            } else {
                format!(" ({})", ex.conversation_id)
            }
        )?;
        writeln!(out, "Cells:    {}", ex.cells.len())?;
        let inputs: Vec<String> = ex
            .inputs
            .iter()
            .map(|i| {
                format!(
                    "{}{}",
                    i.name,
                    i.size.map(|s| format!(" ({s} bytes)")).unwrap_or_default()
                )
            })
            .collect();
        writeln!(
            out,
            "Inputs:   {}",
            if inputs.is_empty() {
                "none".into()
            } else {
                inputs.join(", ")
            }
        )?;
        writeln!(
            out,
            "Outputs:  {}",
            if ex.outputs.is_empty() {
                "none".into()
            } else {
                ex.outputs.join(", ")
            }
        )?;
        let unsupported: Vec<String> = imported
            .unsupported_imports
            .iter()
            .map(|u| format!("{} (cell {})", u.module, u.cell))
            .collect();
        writeln!(
            out,
            "Unsupported imports: {}",
            if unsupported.is_empty() {
                "none".into()
            } else {
                unsupported.join(", ")
            }
        )?;
        match &imported.expected_stdout {
            Some(s) => writeln!(out, "Expected stdout (on the conversation's inputs): {s:?}")?,
            None => writeln!(out, "Expected stdout: unknown (see notes)")?,
        }
        for n in &imported.notes {
            writeln!(out, "Note:     {n}")?;
        }
        if let Some(p) = ported {
            writeln!(out, "Ported:   {p}")?;
        }
        let inputs_flags: String = ex
            .inputs
            .iter()
            .map(|i| format!(" --input {}", i.name))
            .collect();
        let select_flag = self
            .select
            .as_ref()
            .map(|s| format!(" --conversation {s:?}"))
            .unwrap_or_default();
        match &self.output {
            Some(path) => writeln!(
                out,
                "Program:  written to {} (run it: stepbox run --layout mnt-data{inputs_flags} {})",
                path.display(),
                path.display()
            )?,
            None => writeln!(
                out,
                "Run it:   stepbox run --from-conversation {}{select_flag}{inputs_flags}",
                self.file.display()
            )?,
        }
        match published {
            Some((code, report)) => {
                writeln!(out, "Published:")?;
                out.write_all(&report)?;
                Ok(code)
            }
            None => Ok(0),
        }
    }

    /// The step to publish: the imported program, its case the --input files with the recorded
    /// stdout, its contract that the offered files are produced (true on any input).
    fn definition(
        &self,
        name: &str,
        imported: &crate::authoring::conversation::ImportedStep,
    ) -> anyhow::Result<StepDefinition> {
        let job = imported.job();
        let contract: Vec<CheckSpec> = imported
            .output_checks()
            .iter()
            .map(CheckSpec::from_check)
            .collect();
        let checks = imported
            .recorded_checks()
            .iter()
            .map(CheckSpec::from_check)
            .filter(|c| !contract.contains(c))
            .collect();
        let ex = &imported.extracted;
        Ok(StepDefinition {
            name: name.to_string(),
            description: self.description.clone().unwrap_or_else(|| {
                if ex.title.trim().is_empty() {
                    "Imported from a ChatGPT Code Interpreter conversation".into()
                } else {
                    ex.title.clone()
                }
            }),
            runtime: job.runtime.name().to_string(),
            program: Blob::from_bytes(&job.program),
            filename: job.filename.clone(),
            layout: job.layout.name().to_string(),
            policy: "default".into(),
            env: Default::default(),
            cases: vec![Case {
                name: "conversation".into(),
                inputs: read_inputs(None, &self.inputs)?
                    .into_iter()
                    .map(|i| (i.path, Blob::from_bytes(&i.content)))
                    .collect(),
                stdin: None,
                args: Vec::new(),
                checks,
            }],
            contract,
            origin: Origin::Conversation {
                title: ex.title.clone(),
                conversation_id: ex.conversation_id.clone(),
            },
        })
    }

    /// Asks the model to port the imported step to the standard library, verified on the inputs.
    async fn port_step(
        &self,
        executor: &std::sync::Arc<Executor>,
        imported: &mut crate::authoring::conversation::ImportedStep,
    ) -> anyhow::Result<String> {
        use crate::authoring::generate::{GenerateRequest, Generator, Verdict};
        if self.inputs.is_empty() {
            bail!(
                "--port needs the conversation's input files (--input PATH) to verify the ported step on"
            );
        }
        let missing: Vec<String> = imported
            .unsupported_imports
            .iter()
            .map(|u| u.module.clone())
            .collect();
        let mut requirements = format!(
            "Port this program, written in ChatGPT's Code Interpreter, so that it runs with only the Python standard \
             library (the sandbox does not have: {}). Keep its behaviour: write the same files to /mnt/data and print the same \
             output. Do not print values the notebook merely displayed.\n",
            missing.join(", ")
        );
        for r in &imported.extracted.requests {
            requirements.push_str(&format!("\nThe user had asked: {r}\n"));
        }
        requirements.push_str(&format!(
            "\nThe program:\n```python\n{}\n```\n",
            imported.source
        ));
        let mut req = GenerateRequest::new(requirements);
        req.layout = Layout::MntData;
        req.max_attempts = self.max_attempts;
        req.checks = imported.recorded_checks();
        req.inputs = read_inputs(None, &self.inputs)?;
        let generator = Generator::new(executor.clone(), self.model.config())?;
        eprintln!(
            "stepbox: porting away from {} with {}",
            missing.join(", "),
            generator.config().model
        );
        let outcome = generator.generate(req, None).await?;
        match (outcome.verdict, outcome.source) {
            (Verdict::Verified | Verdict::Unverified, Some(source)) => {
                imported.source = source;
                imported.unsupported_imports.clear();
                Ok(format!(
                    "{:?} in {} attempts: {}",
                    outcome.verdict,
                    outcome.attempts.len(),
                    outcome.stopped
                ))
            }
            _ => bail!(
                "porting failed: {} (the unported step is unchanged)",
                outcome.stopped
            ),
        }
    }
}
