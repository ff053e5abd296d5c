//! `stepbox import`: a ChatGPT Code Interpreter conversation as a step, summarised, optionally
//! ported to the standard library by the model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::Executor;
use crate::cli::GlobalArgs;
use crate::cli::generate::ModelArgs;
use crate::cli::io::read_inputs;
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
    /// The conversation's input files, for --port.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,
    /// Most model calls for --port.
    #[arg(long, default_value_t = 4)]
    pub max_attempts: u32,
    /// The model to ask for --port.
    #[command(flatten)]
    pub model: ModelArgs,
}

impl ImportArgs {
    pub(crate) async fn execute(self, global: &GlobalArgs) -> anyhow::Result<u8> {
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("failed to read `{}`", self.file.display()))?;
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
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &imported)?;
            writeln!(out)?;
            return Ok(0);
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
        Ok(0)
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
