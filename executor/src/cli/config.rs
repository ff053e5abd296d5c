//! `stepbox config`: check a configuration, or hash a bearer token for it.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;

use crate::job::policy::PolicySet;

/// `stepbox config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file plus STEPBOX_* variables) and print it, secrets masked.
    Check {
        /// The file (default: $STEPBOX_CONFIG, or none: defaults and variables only).
        #[arg(long, env = "STEPBOX_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the `sha256:` form of a bearer token for a tenant's `tokens` (reads stdin when absent).
    HashToken {
        /// The token.
        token: Option<String>,
    },
}

impl ConfigCommand {
    pub(crate) fn execute(self) -> anyhow::Result<()> {
        match self {
            ConfigCommand::Check { config } => {
                let c = crate::service::config::Config::load(config.as_deref(), std::env::vars())?;
                for w in &c.warnings {
                    eprintln!("stepbox: warning: {w}");
                }
                crate::service::tenancy::Tenants::from_config(&c.tenants)?;
                if let Some(dir) = &c.policies_dir {
                    PolicySet::load_dir(dir)?;
                }
                print!("{}", c.masked_toml());
                eprintln!("stepbox: configuration OK");
            }
            ConfigCommand::HashToken { token } => {
                let token = match token {
                    Some(t) => t,
                    None => std::io::read_to_string(std::io::stdin())?,
                };
                if token.trim().is_empty() {
                    bail!("the token is empty");
                }
                println!("{}", crate::service::config::hash_token(&token));
            }
        }
        Ok(())
    }
}
