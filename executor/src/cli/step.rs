//! `stepbox step`: the step catalog from the command line.

use std::io::Write;

use clap::Subcommand;

/// `stepbox step ...`.
#[derive(Debug, Subcommand)]
pub enum StepCommand {
    /// Print the JSON Schema of `step.toml`.
    Schema,
}

impl StepCommand {
    pub(crate) async fn execute(self) -> anyhow::Result<u8> {
        match self {
            StepCommand::Schema => {
                write!(
                    std::io::stdout().lock(),
                    "{}",
                    crate::catalog::stepfile::json_schema()
                )?;
                Ok(0)
            }
        }
    }
}
