//! Resource limits: the typed values a policy sets and a job may tighten.
//!
//! Every run has one [`Limits`]: memory, optional fuel, wall time, stdout/stderr bytes, output file
//! count and bytes, and scratch (`/tmp`) file count and bytes. A policy gives a default and a maximum for each; a job's
//! [`LimitOverrides`] may ask for any value up to the maximum ([`Limits::resolve`]).
//! Sizes and durations accept human-friendly strings (`"256MiB"`, `"10s"`) as well as integers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes: an integer, or a string such as `"256MiB"`, `"64 KiB"` or `"1GB"`.
///
/// ```
/// use stepbox::job::limits::ByteSize;
/// assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
/// assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
/// assert_eq!(ByteSize(64 << 10).to_string(), "64KiB");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(n) = t.parse::<u64>() {
            return Ok(ByteSize(n));
        }
        t.parse::<bytesize::ByteSize>()
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|_| {
                format!("`{s}` is not a size: write bytes as an integer or like \"256MiB\"")
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// A duration: an integer number of milliseconds, or a string such as `"10s"`, `"500ms"`, `"2m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub Duration);

impl FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Millis(Duration::from_millis(n)));
        }
        humantime::parse_duration(t).map(Millis).map_err(|_| {
            format!("`{s}` is not a duration: write milliseconds as an integer or like \"10s\"")
        })
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// Deserialises from an integer or a string parsed by `FromStr`.
fn int_or_string<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String> + From<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a non-negative integer or a string such as \"256MiB\" or \"10s\"",
        )
    })? {
        Raw::Int(n) => Ok(T::from(n)),
        Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

impl From<u64> for ByteSize {
    fn from(n: u64) -> Self {
        ByteSize(n)
    }
}
impl From<u64> for Millis {
    fn from(n: u64) -> Self {
        Millis(Duration::from_millis(n))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_string(d)
    }
}
impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_string(d)
    }
}
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}
impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX))
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Bytes: an integer, or a string with a unit such as \"256MiB\" or \"1GB\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*([KMGTP]i?B|[kKMGTP]|B)?\\s*$" }
            ]
        })
    }
}
impl JsonSchema for Millis {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: integer milliseconds, or a string such as \"500ms\", \"10s\" or \"2m\".",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "minLength": 2 }
            ]
        })
    }
}

/// One kind of limit. Its name is the key used in policy files and `--limit KEY=VALUE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Linear memory of all the guest's memories together.
    Memory,
    /// Deterministic CPU budget in wasmtime fuel units (about one per wasm instruction).
    Fuel,
    /// Wall-clock time of the run.
    WallTime,
    /// Bytes the step may write to stdout.
    Stdout,
    /// Bytes the step may write to stderr.
    Stderr,
    /// Number of files the step may leave in its output directory (`/output` or `/mnt/data`).
    OutputFiles,
    /// Bytes the step may leave in its output directory.
    OutputBytes,
    /// Number of files the step may keep in its scratch directory `/tmp` at once (never returned).
    ScratchFiles,
    /// Bytes the step may keep in its scratch directory `/tmp` at once.
    ScratchBytes,
}

impl LimitKind {
    /// Every kind, in the order they are documented.
    pub const ALL: [LimitKind; 9] = [
        LimitKind::Memory,
        LimitKind::Fuel,
        LimitKind::WallTime,
        LimitKind::Stdout,
        LimitKind::Stderr,
        LimitKind::OutputFiles,
        LimitKind::OutputBytes,
        LimitKind::ScratchFiles,
        LimitKind::ScratchBytes,
    ];

    /// The key used in policy files and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Fuel => "fuel",
            LimitKind::WallTime => "wall_time",
            LimitKind::Stdout => "stdout",
            LimitKind::Stderr => "stderr",
            LimitKind::OutputFiles => "output_files",
            LimitKind::OutputBytes => "output_bytes",
            LimitKind::ScratchFiles => "scratch_files",
            LimitKind::ScratchBytes => "scratch_bytes",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for LimitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().replace('-', "_");
        LimitKind::ALL
            .into_iter()
            .find(|k| k.key() == norm)
            .ok_or_else(|| {
                let keys: Vec<_> = LimitKind::ALL.iter().map(|k| k.key()).collect();
                format!("unknown limit `{s}`: expected one of {}", keys.join(", "))
            })
    }
}

/// The limits one run is held to. Built by [`Limits::resolve`] from a policy and a job's requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Total bytes of linear memory across all of the guest's memories.
    pub memory_bytes: u64,
    /// Fuel budget; `None` runs without fuel metering (faster: epochs still bound wall time).
    pub fuel: Option<u64>,
    /// Wall-clock budget, enforced by epoch interruption at a tick of [`crate::sandbox::engine::EPOCH_TICK`].
    #[serde(serialize_with = "ser_ms")]
    pub wall_time: Duration,
    /// Bytes kept from stdout; one more byte stops the step with `OUTPUT_EXCEEDED`.
    pub stdout_bytes: u64,
    /// Bytes kept from stderr; one more byte stops the step with `OUTPUT_EXCEEDED`.
    pub stderr_bytes: u64,
    /// Files the step may leave in its output directory.
    pub output_files: u32,
    /// Bytes the step may leave in its output directory.
    pub output_bytes: u64,
    /// Files the step may keep in `/tmp` at once.
    pub scratch_files: u32,
    /// Bytes the step may keep in `/tmp` at once.
    pub scratch_bytes: u64,
}

fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    Millis(*d).serialize(s)
}

/// What a job asks for; `None` takes the policy default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Memory cap, e.g. `"512MiB"`.
    pub memory: Option<ByteSize>,
    /// Fuel budget (wasm instructions, roughly). Asking for fuel turns metering on.
    pub fuel: Option<u64>,
    /// Wall-time cap, e.g. `"30s"`.
    pub wall_time: Option<Millis>,
    /// Stdout cap, e.g. `"1MiB"`.
    pub stdout: Option<ByteSize>,
    /// Stderr cap, e.g. `"1MiB"`.
    pub stderr: Option<ByteSize>,
    /// Output file count cap.
    pub output_files: Option<u32>,
    /// Output bytes cap, e.g. `"64MiB"`.
    pub output_bytes: Option<ByteSize>,
    /// Scratch (`/tmp`) file count cap.
    #[serde(default)]
    pub scratch_files: Option<u32>,
    /// Scratch (`/tmp`) bytes cap, e.g. `"1GiB"`.
    #[serde(default)]
    pub scratch_bytes: Option<ByteSize>,
}

impl LimitOverrides {
    /// Sets one limit from its key and a textual value, as `--limit KEY=VALUE` does.
    pub fn set(&mut self, kind: LimitKind, value: &str) -> Result<(), String> {
        let bad = |e: String| format!("limit `{kind}`: {e}");
        match kind {
            LimitKind::Memory => self.memory = Some(value.parse().map_err(bad)?),
            LimitKind::Stdout => self.stdout = Some(value.parse().map_err(bad)?),
            LimitKind::Stderr => self.stderr = Some(value.parse().map_err(bad)?),
            LimitKind::OutputBytes => self.output_bytes = Some(value.parse().map_err(bad)?),
            LimitKind::ScratchBytes => self.scratch_bytes = Some(value.parse().map_err(bad)?),
            LimitKind::WallTime => self.wall_time = Some(value.parse().map_err(bad)?),
            LimitKind::Fuel => {
                self.fuel =
                    Some(value.trim().replace('_', "").parse().map_err(|_| {
                        bad(format!("`{value}` is not a whole number of fuel units"))
                    })?)
            }
            LimitKind::OutputFiles | LimitKind::ScratchFiles => {
                let n = value.trim().replace('_', "").parse().map_err(|_| {
                    bad(format!(
                        "`{value}` is not a whole number of files (at most {})",
                        u32::MAX
                    ))
                })?;
                if kind == LimitKind::OutputFiles {
                    self.output_files = Some(n);
                } else {
                    self.scratch_files = Some(n);
                }
            }
        }
        Ok(())
    }

    /// Parses `KEY=VALUE`.
    pub fn set_pair(&mut self, pair: &str) -> Result<(), String> {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not KEY=VALUE (for example memory=256MiB)"))?;
        self.set(k.parse()?, v)
    }
}

/// A job asked for more than its policy allows, or for nothing at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The request exceeds the policy maximum.
    #[error("limit `{kind}` asks for {asked}, above policy `{policy}`'s maximum of {max}")]
    AboveMaximum {
        /// Which limit.
        kind: LimitKind,
        /// What was asked, human-readable.
        asked: String,
        /// The policy maximum, human-readable.
        max: String,
        /// The policy's name.
        policy: String,
    },
    /// A limit of zero would stop every step before it starts.
    #[error("limit `{kind}` must be greater than zero (leave it unset for the policy default)")]
    Zero {
        /// Which limit.
        kind: LimitKind,
    },
}

/// A policy's default and maximum values for every limit, as they appear in policy files.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitTable {
    /// Total linear memory, e.g. `"256MiB"`.
    pub memory: ByteSize,
    /// Fuel budget. Omit to run without fuel metering (about 1.4x faster on CPU-bound steps).
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Wall-clock time, e.g. `"10s"`.
    pub wall_time: Millis,
    /// Stdout bytes kept.
    pub stdout: ByteSize,
    /// Stderr bytes kept.
    pub stderr: ByteSize,
    /// Files left in the output directory.
    pub output_files: u32,
    /// Bytes left in the output directory.
    pub output_bytes: ByteSize,
    /// Files kept in `/tmp` at once. Omitted: the same as `output_files` (a policy written before
    /// scratch had limits of its own keeps its meaning, or is stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_files: Option<u32>,
    /// Bytes kept in `/tmp` at once. Omitted: the same as `output_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_bytes: Option<ByteSize>,
}

impl LimitTable {
    /// The scratch file limit, `output_files` when the table has none of its own.
    pub fn scratch_files(&self) -> u32 {
        self.scratch_files.unwrap_or(self.output_files)
    }

    /// The scratch bytes limit, `output_bytes` when the table has none of its own.
    pub fn scratch_bytes(&self) -> ByteSize {
        self.scratch_bytes.unwrap_or(self.output_bytes)
    }

    /// The defaults as effective limits.
    pub fn to_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory.0,
            fuel: self.fuel,
            wall_time: self.wall_time.0,
            stdout_bytes: self.stdout.0,
            stderr_bytes: self.stderr.0,
            output_files: self.output_files,
            output_bytes: self.output_bytes.0,
            scratch_files: self.scratch_files(),
            scratch_bytes: self.scratch_bytes().0,
        }
    }

    /// The first limit in `self` that is above the same limit in `max`, if any.
    pub fn first_above(&self, max: &LimitTable) -> Option<LimitKind> {
        let checks = [
            (LimitKind::Memory, self.memory.0 > max.memory.0),
            (
                LimitKind::Fuel,
                match (self.fuel, max.fuel) {
                    (Some(d), Some(m)) => d > m,
                    (None, Some(_)) => true,
                    _ => false,
                },
            ),
            (LimitKind::WallTime, self.wall_time > max.wall_time),
            (LimitKind::Stdout, self.stdout > max.stdout),
            (LimitKind::Stderr, self.stderr > max.stderr),
            (LimitKind::OutputFiles, self.output_files > max.output_files),
            (LimitKind::OutputBytes, self.output_bytes > max.output_bytes),
            (
                LimitKind::ScratchFiles,
                self.scratch_files() > max.scratch_files(),
            ),
            (
                LimitKind::ScratchBytes,
                self.scratch_bytes() > max.scratch_bytes(),
            ),
        ];
        checks.into_iter().find(|(_, above)| *above).map(|(k, _)| k)
    }

    /// The first limit set to zero, if any: zero limits make every step fail before it starts.
    pub fn first_zero(&self) -> Option<LimitKind> {
        [
            (LimitKind::Memory, self.memory.0 == 0),
            (LimitKind::Fuel, self.fuel == Some(0)),
            (LimitKind::WallTime, self.wall_time.0.is_zero()),
        ]
        .into_iter()
        .find(|(_, zero)| *zero)
        .map(|(k, _)| k)
    }
}

impl Limits {
    /// The limits for a job: the policy's defaults, tightened or raised by `asked` up to `max`.
    pub fn resolve(
        policy: &str,
        default: &LimitTable,
        max: &LimitTable,
        asked: &LimitOverrides,
    ) -> Result<Limits, LimitError> {
        fn pick<T: PartialOrd + Copy + fmt::Display>(
            policy: &str,
            kind: LimitKind,
            asked: Option<T>,
            default: T,
            max: T,
            is_zero: impl Fn(T) -> bool,
        ) -> Result<T, LimitError> {
            match asked {
                None => Ok(default),
                Some(v) if is_zero(v) => Err(LimitError::Zero { kind }),
                Some(v) if v > max => Err(LimitError::AboveMaximum {
                    kind,
                    asked: v.to_string(),
                    max: max.to_string(),
                    policy: policy.to_string(),
                }),
                Some(v) => Ok(v),
            }
        }
        let fuel = match (asked.fuel, max.fuel) {
            (Some(0), _) => {
                return Err(LimitError::Zero {
                    kind: LimitKind::Fuel,
                });
            }
            (Some(v), Some(m)) if v > m => {
                return Err(LimitError::AboveMaximum {
                    kind: LimitKind::Fuel,
                    asked: v.to_string(),
                    max: m.to_string(),
                    policy: policy.to_string(),
                });
            }
            (Some(v), _) => Some(v),
            (None, _) => default.fuel,
        };
        Ok(Limits {
            memory_bytes: pick(
                policy,
                LimitKind::Memory,
                asked.memory,
                default.memory,
                max.memory,
                |v| v.0 == 0,
            )?
            .0,
            fuel,
            wall_time: pick(
                policy,
                LimitKind::WallTime,
                asked.wall_time,
                default.wall_time,
                max.wall_time,
                |v| v.0.is_zero(),
            )?
            .0,
            stdout_bytes: pick(
                policy,
                LimitKind::Stdout,
                asked.stdout,
                default.stdout,
                max.stdout,
                |_| false,
            )?
            .0,
            stderr_bytes: pick(
                policy,
                LimitKind::Stderr,
                asked.stderr,
                default.stderr,
                max.stderr,
                |_| false,
            )?
            .0,
            output_files: pick(
                policy,
                LimitKind::OutputFiles,
                asked.output_files,
                default.output_files,
                max.output_files,
                |_| false,
            )?,
            output_bytes: pick(
                policy,
                LimitKind::OutputBytes,
                asked.output_bytes,
                default.output_bytes,
                max.output_bytes,
                |_| false,
            )?
            .0,
            scratch_files: pick(
                policy,
                LimitKind::ScratchFiles,
                asked.scratch_files,
                default.scratch_files(),
                max.scratch_files(),
                |_| false,
            )?,
            scratch_bytes: pick(
                policy,
                LimitKind::ScratchBytes,
                asked.scratch_bytes,
                default.scratch_bytes(),
                max.scratch_bytes(),
                |_| false,
            )?
            .0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(mem: u64, fuel: Option<u64>) -> LimitTable {
        LimitTable {
            memory: ByteSize(mem),
            fuel,
            wall_time: Millis(Duration::from_secs(10)),
            stdout: ByteSize(1024),
            stderr: ByteSize(1024),
            output_files: 10,
            output_bytes: ByteSize(4096),
            scratch_files: None,
            scratch_bytes: None,
        }
    }

    #[test]
    fn sizes_and_durations_parse_from_humans() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("1 KiB".parse::<ByteSize>().unwrap(), ByteSize(1024));
        assert_eq!("1000".parse::<ByteSize>().unwrap(), ByteSize(1000));
        assert!(
            "lots"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("`lots` is not a size")
        );
        assert_eq!(
            "10s".parse::<Millis>().unwrap(),
            Millis(Duration::from_secs(10))
        );
        assert_eq!(
            "250".parse::<Millis>().unwrap(),
            Millis(Duration::from_millis(250))
        );
        assert!("soon".parse::<Millis>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn overrides_tighten_and_may_not_exceed_the_maximum() {
        let (d, m) = (table(100, None), table(1000, Some(50)));
        let mut asked = LimitOverrides::default();
        assert_eq!(
            Limits::resolve("p", &d, &m, &asked).unwrap().memory_bytes,
            100
        );
        asked.set_pair("memory=500").unwrap();
        asked.set_pair("fuel=50").unwrap();
        let l = Limits::resolve("p", &d, &m, &asked).unwrap();
        assert_eq!((l.memory_bytes, l.fuel), (500, Some(50)));
        asked.set_pair("memory=1001").unwrap();
        let err = Limits::resolve("p", &d, &m, &asked).unwrap_err();
        assert_eq!(
            err.to_string(),
            "limit `memory` asks for 1001 B, above policy `p`'s maximum of 1000 B"
        );
        asked.memory = None;
        asked.set_pair("fuel=51").unwrap();
        assert!(matches!(
            Limits::resolve("p", &d, &m, &asked),
            Err(LimitError::AboveMaximum {
                kind: LimitKind::Fuel,
                ..
            })
        ));
        asked.set_pair("fuel=0").unwrap();
        assert_eq!(
            Limits::resolve("p", &d, &m, &asked),
            Err(LimitError::Zero {
                kind: LimitKind::Fuel
            })
        );
    }

    #[test]
    fn limit_keys_are_checked() {
        let mut o = LimitOverrides::default();
        assert!(
            o.set_pair("cpu=3")
                .unwrap_err()
                .contains("unknown limit `cpu`")
        );
        assert!(o.set_pair("memory").unwrap_err().contains("KEY=VALUE"));
        assert!(o.set_pair("wall-time=2s").is_ok());
        assert_eq!(o.wall_time, Some(Millis(Duration::from_secs(2))));
        assert!(
            o.set_pair("output_files=-1")
                .unwrap_err()
                .contains("output_files")
        );
    }

    #[test]
    fn scratch_limits_fall_back_to_the_output_limits_and_resolve_on_their_own() {
        // A policy written before scratch had limits of its own: scratch takes the output limits.
        let (d, m) = (table(100, None), table(100, None));
        let l = Limits::resolve("p", &d, &m, &LimitOverrides::default()).unwrap();
        assert_eq!((l.scratch_files, l.scratch_bytes), (10, 4096));
        // With its own values, scratch resolves apart from outputs.
        let mut m = m;
        m.scratch_files = Some(5000);
        m.scratch_bytes = Some(ByteSize(1 << 20));
        let mut asked = LimitOverrides::default();
        asked.set_pair("scratch_files=2_000").unwrap();
        asked.set_pair("scratch-bytes=1MiB").unwrap();
        let l = Limits::resolve("p", &d, &m, &asked).unwrap();
        assert_eq!((l.output_files, l.output_bytes), (10, 4096));
        assert_eq!((l.scratch_files, l.scratch_bytes), (2000, 1 << 20));
        asked.set_pair("scratch_files=5001").unwrap();
        assert_eq!(
            Limits::resolve("p", &d, &m, &asked)
                .unwrap_err()
                .to_string(),
            "limit `scratch_files` asks for 5001, above policy `p`'s maximum of 5000"
        );
        // A default above its maximum is found like any other limit.
        let mut d = d;
        d.scratch_files = Some(6000);
        assert_eq!(d.first_above(&m), Some(LimitKind::ScratchFiles));
    }

    #[test]
    fn table_comparison_finds_the_first_offender() {
        assert_eq!(table(100, None).first_above(&table(1000, None)), None);
        assert_eq!(
            table(2000, None).first_above(&table(1000, None)),
            Some(LimitKind::Memory)
        );
        assert_eq!(
            table(1, None).first_above(&table(1, Some(5))),
            Some(LimitKind::Fuel)
        );
        assert_eq!(table(0, None).first_zero(), Some(LimitKind::Memory));
    }
}
