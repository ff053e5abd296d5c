//! `stepbox policy`: list, show and check policies, and print their JSON Schema.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::cli::GlobalArgs;

/// `stepbox policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// List the policies with their descriptions.
    List,
    /// Print one policy's defaults and maximums as JSON.
    Show {
        /// Policy name.
        name: String,
    },
    /// Check a policy file and print it as JSON.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the JSON Schema of policy files.
    Schema,
}

impl PolicyCommand {
    pub(crate) fn execute(self, global: &GlobalArgs) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        match self {
            PolicyCommand::List => {
                for p in global.policies()?.iter() {
                    writeln!(out, "{:<16} {}", p.name, p.file.description)?;
                }
            }
            PolicyCommand::Show { name } => {
                let set = global.policies()?;
                let p = set.get(&name).with_context(|| {
                    format!(
                        "unknown policy `{name}`: expected one of {}",
                        set.names().join(", ")
                    )
                })?;
                writeln!(out, "{}", serde_json::to_string_pretty(p.as_ref())?)?;
            }
            PolicyCommand::Check { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("failed to read `{}`", file.display()))?;
                let name = file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                let p =
                    crate::job::policy::Policy::parse(name, &text, &file.display().to_string())?;
                writeln!(out, "{}", serde_json::to_string_pretty(&p)?)?;
            }
            PolicyCommand::Schema => write!(out, "{}", crate::job::policy::json_schema())?,
        }
        Ok(())
    }
}
