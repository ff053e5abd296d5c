//! Named sandbox policies: TOML files in `sandbox-policies/`, one per policy, named by file stem.
//!
//! A policy sets each limit's default and maximum, the guest environment variables every step sees,
//! and whether runs are deterministic (fixed clocks, seeded randomness, fuel required). Unknown keys
//! and bad values are errors naming the file, the key and the reason. The shipped policies are
//! embedded in the binary, so `stepbox` works with no files at all; `--policies-dir` replaces them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::limits::{LimitError, LimitOverrides, LimitTable, Limits};

/// The policy a job gets when it names none.
pub const DEFAULT_POLICY: &str = "default";

/// The shipped policies, embedded at build time from `sandbox-policies/`.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "default",
        include_str!("../../../sandbox-policies/default.toml"),
    ),
    (
        "strict",
        include_str!("../../../sandbox-policies/strict.toml"),
    ),
    (
        "heavy",
        include_str!("../../../sandbox-policies/heavy.toml"),
    ),
    (
        "deterministic",
        include_str!("../../../sandbox-policies/deterministic.toml"),
    ),
];

/// The contents of one policy file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// One sentence saying what the policy is for.
    pub description: String,
    /// Defaults and maximums of every limit.
    pub limits: PolicyLimits,
    /// Environment variables every step sees (the job's own `env` is applied on top).
    /// The server's environment is never passed to a step.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Reproducible runs: the wall clock is fixed at 2000-01-01T00:00:00Z, the monotonic clock
    /// advances one microsecond per reading, randomness is seeded with `seed`, and fuel is required.
    #[serde(default)]
    pub deterministic: bool,
    /// Seed for the random sources when `deterministic` is on.
    #[serde(default)]
    pub seed: u64,
}

/// Defaults and maximums, as `[limits.default]` and `[limits.max]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyLimits {
    /// What a job gets when it asks for nothing.
    pub default: LimitTable,
    /// The most a job may ask for.
    pub max: LimitTable,
}

/// A loaded, checked policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The policy's name (its file stem).
    pub name: String,
    /// The parsed file.
    #[serde(flatten)]
    pub file: PolicyFile,
}

impl Policy {
    /// Parses and checks one policy; `origin` names the file in errors.
    pub fn parse(name: &str, text: &str, origin: &str) -> anyhow::Result<Policy> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            bail!(
                "policy file `{origin}`: the name `{name}` must be 1-64 characters of a-z, 0-9, `-` or `_`"
            );
        }
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            // toml's message names the key and the reason; add the file.
            anyhow::anyhow!("policy file `{origin}`: {}", e.to_string().trim_end())
        })?;
        let (d, m) = (&file.limits.default, &file.limits.max);
        if let Some(kind) = d.first_above(m) {
            if kind == crate::job::limits::LimitKind::Fuel && d.fuel.is_none() {
                bail!(
                    "policy file `{origin}`: key `limits.default.fuel` must be set because `limits.max.fuel` is"
                );
            }
            bail!(
                "policy file `{origin}`: key `limits.default.{kind}` is above `limits.max.{kind}`"
            );
        }
        if let Some(kind) = d.first_zero().or_else(|| m.first_zero()) {
            bail!("policy file `{origin}`: key `limits.*.{kind}` must be greater than zero");
        }
        if file.deterministic && d.fuel.is_none() {
            bail!(
                "policy file `{origin}`: `deterministic = true` needs `limits.default.fuel`, since only fuel \
                 bounds CPU reproducibly"
            );
        }
        for (k, v) in &file.env {
            check_env_var(k, v).map_err(|reason| {
                anyhow::anyhow!(
                    "policy file `{origin}`: key `env.{k}`: invalid `env.{k}`: {reason}"
                )
            })?;
        }
        Ok(Policy {
            name: name.to_string(),
            file,
        })
    }

    /// The limits for a job under this policy.
    pub fn limits_for(&self, asked: &LimitOverrides) -> Result<Limits, LimitError> {
        let l = &self.file.limits;
        let mut limits = Limits::resolve(&self.name, &l.default, &l.max, asked)?;
        if self.file.deterministic && limits.fuel.is_none() {
            limits.fuel = l.default.fuel;
        }
        Ok(limits)
    }
}

/// All the policies a server or CLI knows, by name.
#[derive(Clone, Debug)]
pub struct PolicySet {
    policies: BTreeMap<String, Arc<Policy>>,
}

impl PolicySet {
    /// The policies shipped with Stepbox.
    pub fn embedded() -> PolicySet {
        let policies = EMBEDDED
            .iter()
            .map(|(name, text)| {
                let origin = format!("sandbox-policies/{name}.toml (embedded)");
                let p = Policy::parse(name, text, &origin)
                    .expect("shipped policies are tested to parse");
                (name.to_string(), Arc::new(p))
            })
            .collect();
        PolicySet { policies }
    }

    /// Every `*.toml` file in `dir`, named by file stem. The directory must hold `default.toml`.
    pub fn load_dir(dir: &Path) -> anyhow::Result<PolicySet> {
        let mut policies = BTreeMap::new();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("failed to read policies directory `{}`", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("failed to read policy file `{}`", path.display()))?;
            let policy = Policy::parse(&name, &text, &path.display().to_string())?;
            policies.insert(name, Arc::new(policy));
        }
        if !policies.contains_key(DEFAULT_POLICY) {
            bail!(
                "policies directory `{}` has no `{DEFAULT_POLICY}.toml`: jobs that name no policy need one",
                dir.display()
            );
        }
        Ok(PolicySet { policies })
    }

    /// The policy called `name` (`""` means [`DEFAULT_POLICY`]).
    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        let name = if name.is_empty() {
            DEFAULT_POLICY
        } else {
            name
        };
        self.policies.get(name)
    }

    /// Every policy, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// The names, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.policies.keys().map(String::as_str).collect()
    }
}

/// The JSON Schema of policy files, as checked in at `sandbox-policies/policy.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(PolicyFile);
    serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
}

/// Checks one environment variable (a policy's `[env]` or a job's): a name of 1-1024 bytes
/// without `=` or NUL, a value of at most 32 KiB without NUL. `Err` says what is wrong.
pub fn check_env_var(key: &str, value: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 1024 || key.contains(['=', '\0']) {
        return Err("a variable name must be 1-1024 bytes with no `=` or NUL");
    }
    if value.len() > 32 * 1024 || value.contains('\0') {
        return Err("a value must be at most 32 KiB with no NUL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_policy_parses_from_disk_and_matches_the_embedded_copy() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sandbox-policies");
        let from_disk = PolicySet::load_dir(&dir).unwrap();
        let embedded = PolicySet::embedded();
        assert_eq!(from_disk.names(), embedded.names());
        for p in embedded.iter() {
            assert_eq!(Some(p), from_disk.get(&p.name), "{} differs", p.name);
        }
        for name in ["default", "strict", "heavy", "deterministic"] {
            assert!(embedded.get(name).is_some(), "{name} is shipped");
        }
        assert_eq!(embedded.get("").unwrap().name, "default");
    }

    #[test]
    fn checked_in_schema_is_current() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../sandbox-policies/policy.schema.json");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == json_schema(),
            "sandbox-policies/policy.schema.json is stale: regenerate with `stepbox policy schema > {}`",
            path.display()
        );
    }

    const GOOD: &str = r#"
        description = "t"
        [limits.default]
        memory = "64MiB"
        wall_time = "1s"
        stdout = "1KiB"
        stderr = "1KiB"
        output_files = 1
        output_bytes = 10
        [limits.max]
        memory = "128MiB"
        wall_time = "2s"
        stdout = "1KiB"
        stderr = "1KiB"
        output_files = 1
        output_bytes = 10
    "#;

    #[test]
    fn errors_name_the_file_key_and_reason() {
        assert!(Policy::parse("t", GOOD, "t.toml").is_ok());
        let unknown = GOOD.replace(
            "stdout = \"1KiB\"\n        stderr",
            "stdot = 1\n        stderr",
        );
        let e = format!("{:#}", Policy::parse("t", &unknown, "t.toml").unwrap_err());
        assert!(e.contains("t.toml") && e.contains("stdot"), "{e}");
        let bad_size = GOOD.replace("\"64MiB\"", "\"lots\"");
        let e = format!("{:#}", Policy::parse("t", &bad_size, "t.toml").unwrap_err());
        assert!(
            e.contains("`lots` is not a size") && e.contains("memory"),
            "{e}"
        );
        let above = GOOD.replace("\"64MiB\"", "\"1GiB\"");
        let e = format!("{:#}", Policy::parse("t", &above, "t.toml").unwrap_err());
        assert!(
            e.contains("limits.default.memory") && e.contains("above"),
            "{e}"
        );
        let det = GOOD.replace(
            "description = \"t\"",
            "description = \"t\"\ndeterministic = true",
        );
        let e = format!("{:#}", Policy::parse("t", &det, "t.toml").unwrap_err());
        assert!(e.contains("limits.default.fuel"), "{e}");
        let env = GOOD.replace(
            "description = \"t\"",
            "description = \"t\"\nenv = { \"A=B\" = \"x\" }",
        );
        let e = format!("{:#}", Policy::parse("t", &env, "t.toml").unwrap_err());
        assert!(e.contains("env.A=B"), "{e}");
        let e = format!(
            "{:#}",
            Policy::parse("Bad Name", GOOD, "x.toml").unwrap_err()
        );
        assert!(e.contains("Bad Name"), "{e}");
    }

    #[test]
    fn a_directory_without_default_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("only.toml"), GOOD).unwrap();
        let e = format!("{:#}", PolicySet::load_dir(dir.path()).unwrap_err());
        assert!(e.contains("no `default.toml`"), "{e}");
        std::fs::write(dir.path().join("default.toml"), GOOD).unwrap();
        assert_eq!(
            PolicySet::load_dir(dir.path()).unwrap().names(),
            ["default", "only"]
        );
    }
}
