//! Workflow schedules: a workflow fired by a cron expression in an IANA time zone, its inputs
//! taken from fixed artifacts or the newest files of an inbox directory, its outputs delivered
//! to an outbox directory, each firing recorded once with how it ended.
//!
//! - **What runs**: a [`Schedule`] of a workflow file holds a frozen copy of the definition
//!   ([`WorkflowFile`] with every program's source embedded, as [`WorkflowFile::load`] reads it),
//!   so every replica runs the same thing without sharing the file system; its catalog steps
//!   (`uses = "NAME@STAGE"`) resolve at each firing, as with `stepbox workflow run`. A schedule
//!   of a published workflow (`workflow_ref`) resolves it at each firing through
//!   [`Workflows::resolve_workflow`]: `NAME@vN` is stored as `NAME@sha256:DIGEST` at creation
//!   (that version, always); `NAME@STAGE` (and `NAME`, the newest verified) **follows the
//!   stage**, so promoting the workflow changes what the next firing runs. Either way its steps
//!   are the step versions that workflow version pinned: promoting a step never changes a
//!   scheduled run.
//! - **When**: `cron` has 5 or 6 fields (seconds optional, e.g. `*/10 * * * * *`), evaluated in
//!   `timezone` by [croner] (Vixie cron / OCPS rules) on [chrono_tz]'s compiled-in IANA
//!   database. DST: a fixed-time firing (`0 30 2 * * *`) whose local time does not exist on a
//!   spring-forward day fires **once, at the first instant after the gap** (03:00 local),
//!   never skipped; on a fall-back day it fires **once**, at the first of the two 02:30s.
//!   Interval patterns (`*/15` minutes, `*` hours) follow real time: none inside the gap, both
//!   passes of the repeated hour.
//! - **Exactly once without a leader**: every occurrence is claimed in the database by an
//!   insert on a unique `(schedule, occurrence)` key ([`stepbox_store::Store::claim_firing`]);
//!   only the replica whose row landed runs it. The overlap policy ([`Overlap`]: `skip` by
//!   default, `queue_one`, `allow`) is decided in that same transaction.
//! - **Missed firings** (no replica was up): the newest one that is at most `catch_up` late
//!   (default 1 h) runs once; every other missed occurrence is recorded `skipped_missed`, none
//!   silently dropped (past 1000 in a row, the rest are summarised in one row). An occurrence
//!   at most 5 s late is on time, not missed.
//! - **Files**: inbox and outbox directories must lie under `[workflows] input_roots` /
//!   `output_roots` ([`WorkflowsSection`]); they are canonicalised and refused when outside
//!   (symlinks included) at creation, checked again at every firing, and read and written
//!   through a capability handle on the root (`cap-std`), so nothing outside a root is ever
//!   read or written even if the tree changes later. Inbox entries that are symlinks are
//!   ignored. Outputs land as `OUTPUT-YYYYMMDDTHHMMSSZ.EXT` (the occurrence in UTC: unique even
//!   when fall-back repeats local times), written to a temporary name and renamed.
//! - **Firing records** are pruned by the scheduler once an hour: of each schedule, those past
//!   the newest `[workflows] firing_history` (default 1000) and those older than
//!   `firing_retention` (default 90 days); running and queued ones, and the newest firing of
//!   its cron (where a restarted replica resumes), are kept.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};
use stepbox_store::{Claim, FiringRow, FiringStatus, ScheduleRow, Store, StoreError, Trigger};
use tokio::task::JoinSet;

pub use stepbox_store::Overlap;

use crate::catalog::model::{Selector, StepRef};
use crate::job::limits::{ByteSize, Millis};
use crate::workflow::artifacts::Artifacts;
use crate::workflow::model::WorkflowFile;
use crate::workflow::{WorkflowRunRecord, Workflows};

/// `[workflows]` in `stepbox.toml`. Defaults: no roots (inbox and outbox directories are
/// refused), artifacts under the data directory, `artifact_limit` 256 MiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowsSection {
    /// Directories under which schedules may read inbox directories.
    #[serde(default)]
    pub input_roots: Vec<PathBuf>,
    /// Directories under which schedules may write outbox directories.
    #[serde(default)]
    pub output_roots: Vec<PathBuf>,
    /// Where files between steps are kept (default `$XDG_DATA_HOME/stepbox/artifacts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<PathBuf>,
    /// Most bytes one workflow run may hold: its inputs plus every file its steps write (so
    /// also most it reads from an inbox and delivers to an outbox).
    #[serde(default = "default_artifact_limit")]
    pub artifact_limit: ByteSize,
    /// Firing records kept per schedule (the newest; older ones are deleted).
    #[serde(default = "default_firing_history")]
    pub firing_history: u32,
    /// Firing records older than this are deleted.
    #[serde(default = "default_firing_retention")]
    pub firing_retention: Millis,
    /// Artifacts not stored or read for this long are deleted (default 7 days); a resume of
    /// an older run re-runs the steps whose files are gone.
    #[serde(default = "default_artifact_retention")]
    pub artifact_retention: Millis,
    /// Workflow run records kept per tenant and workflow (the newest; older ones are deleted).
    #[serde(default = "default_firing_history")]
    pub run_history: u32,
    /// Workflow run records older than this are deleted.
    #[serde(default = "default_firing_retention")]
    pub run_retention: Millis,
}

impl WorkflowsSection {
    /// The run records a runner keeps ([`crate::workflow::Workflows::with_run_retention`]).
    pub fn runs_kept(&self) -> crate::workflow::RunRetention {
        crate::workflow::RunRetention {
            per_workflow: self.run_history,
            max_age: self.run_retention.0,
        }
    }
}

/// 7 days: a failed weekend run can still be resumed on Monday.
fn default_artifact_retention() -> Millis {
    Millis(Duration::from_secs(7 * 86_400))
}

/// 1000: a per-minute schedule's last 16 hours, a daily one's last three years.
fn default_firing_history() -> u32 {
    1000
}

/// 90 days: a quarter's firings stay answerable ("did the report run on the 3rd?").
fn default_firing_retention() -> Millis {
    Millis(Duration::from_secs(90 * 86_400))
}

/// 256 MiB: far above the spreadsheets and exports a step reads, small enough that a stray
/// multi-gigabyte file in an inbox is refused rather than read into memory.
fn default_artifact_limit() -> ByteSize {
    ByteSize(256 << 20)
}

impl Default for WorkflowsSection {
    fn default() -> Self {
        WorkflowsSection {
            input_roots: Vec::new(),
            output_roots: Vec::new(),
            artifacts: None,
            artifact_limit: default_artifact_limit(),
            firing_history: default_firing_history(),
            firing_retention: default_firing_retention(),
            artifact_retention: default_artifact_retention(),
            run_history: default_firing_history(),
            run_retention: default_firing_retention(),
        }
    }
}

impl WorkflowsSection {
    /// The roots, canonicalised: each must be an existing directory given as an absolute path.
    pub fn roots(&self) -> Result<Roots, String> {
        let canon = |key: &str, list: &[PathBuf]| -> Result<Vec<PathBuf>, String> {
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    let field = format!("workflows.{key}[{i}]");
                    if !p.is_absolute() {
                        return Err(format!("`{field}`: `{}` is not absolute", p.display()));
                    }
                    let c = std::fs::canonicalize(p)
                        .map_err(|e| format!("`{field}`: `{}`: {e}", p.display()))?;
                    if !c.is_dir() {
                        return Err(format!("`{field}`: `{}` is not a directory", p.display()));
                    }
                    Ok(c)
                })
                .collect()
        };
        Ok(Roots {
            input: canon("input_roots", &self.input_roots)?,
            output: canon("output_roots", &self.output_roots)?,
        })
    }
}

/// Canonical `[workflows]` roots ([`WorkflowsSection::roots`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    input: Vec<PathBuf>,
    output: Vec<PathBuf>,
}

/// Which roots a directory must lie under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// `[workflows] input_roots` (inboxes).
    Input,
    /// `[workflows] output_roots` (outboxes).
    Output,
}

impl RootKind {
    fn key(self) -> &'static str {
        match self {
            RootKind::Input => "input_roots",
            RootKind::Output => "output_roots",
        }
    }
}

/// A directory checked to lie under a root: the canonical root and the path below it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedDir {
    root: PathBuf,
    below: PathBuf,
}

impl AllowedDir {
    /// The directory's canonical path.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.below)
    }

    /// The path below its root (empty for the root itself).
    pub fn below(&self) -> &Path {
        &self.below
    }

    /// Opens it through a handle on its root: a component replaced by a symlink leading out of
    /// the root since the check is refused by `cap-std`, not followed.
    fn open(&self) -> std::io::Result<Dir> {
        // The root was canonical when configured: a root since replaced by a link is refused.
        if std::fs::symlink_metadata(&self.root)?.is_symlink() {
            return Err(std::io::Error::other(format!(
                "the root `{}` has become a symlink",
                self.root.display()
            )));
        }
        let root = Dir::open_ambient_dir(&self.root, ambient_authority())?;
        if self.below.as_os_str().is_empty() {
            Ok(root)
        } else {
            root.open_dir(&self.below)
        }
    }
}

impl Roots {
    /// Roots from already canonical paths (tests, or a caller that checked them).
    pub fn new(input: Vec<PathBuf>, output: Vec<PathBuf>) -> Roots {
        Roots { input, output }
    }

    /// Checks that `dir` (absolute, existing) lies under one of `kind`'s roots after resolving
    /// every symlink and `..`; `field` names it in the refusal.
    pub fn resolve(
        &self,
        kind: RootKind,
        field: &str,
        dir: &Path,
    ) -> Result<AllowedDir, ScheduleError> {
        let refuse = |reason: String| ScheduleError::Refused {
            field: field.to_string(),
            path: dir.to_path_buf(),
            reason,
        };
        let roots = match kind {
            RootKind::Input => &self.input,
            RootKind::Output => &self.output,
        };
        if roots.is_empty() {
            return Err(refuse(format!(
                "no `[workflows] {}` are configured, so no directory is allowed",
                kind.key()
            )));
        }
        if !dir.is_absolute() {
            return Err(refuse("is not an absolute path".into()));
        }
        if dir.components().any(|c| c == Component::ParentDir) {
            return Err(refuse("contains `..`".into()));
        }
        let canon =
            std::fs::canonicalize(dir).map_err(|e| refuse(format!("cannot be resolved: {e}")))?;
        if !canon.is_dir() {
            return Err(refuse("is not a directory".into()));
        }
        for root in roots {
            if let Ok(below) = canon.strip_prefix(root) {
                return Ok(AllowedDir {
                    root: root.clone(),
                    below: below.to_path_buf(),
                });
            }
        }
        let list = roots
            .iter()
            .map(|r| format!("`{}`", r.display()))
            .collect::<Vec<_>>()
            .join(", ");
        Err(refuse(if canon != dir {
            format!(
                "resolves to `{}` (through a symlink), outside every `[workflows] {}` ({list})",
                canon.display(),
                kind.key()
            )
        } else {
            format!("is outside every `[workflows] {}` ({list})", kind.key())
        }))
    }
}

/// Why a schedule was refused or could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A field is wrong (gRPC `INVALID_ARGUMENT` naming the field).
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field, e.g. `cron`, `inputs.sales`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A directory lies outside the allowed roots, or cannot be used (`INVALID_ARGUMENT`).
    #[error("invalid `{field}`: `{}` {reason}", path.display())]
    Refused {
        /// The field, `inputs.dir` or `outbox`.
        field: String,
        /// The path as given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No such schedule of this tenant (`NOT_FOUND`).
    #[error("no schedule `{0}`")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a schedule's workflow inputs come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleInputs {
    /// Fixed files uploaded when the schedule was made: input name = sha256 in the artifact
    /// store ([`Artifacts::put`]).
    Fixed(BTreeMap<String, String>),
    /// At each firing, per input the newest regular file (by modification time, then name) in
    /// `dir` whose name matches its pattern (`*` any run of characters, `?` one; no `/`).
    Inbox {
        /// An absolute directory under `[workflows] input_roots`.
        dir: PathBuf,
        /// Input name = file name pattern, e.g. `sales = "sales-*.csv"`.
        files: BTreeMap<String, String>,
    },
}

/// A workflow schedule. Defaults: `timezone` UTC, `overlap` skip, `catch_up` 1 h, no outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Assigned at creation (a UUID).
    #[serde(default)]
    pub id: String,
    /// The tenant that owns it (assigned at creation from the caller).
    #[serde(default)]
    pub tenant: String,
    /// The workflow, frozen with its programs' sources (for a published workflow: the
    /// version it resolved to at creation, for checks and listings).
    pub workflow: WorkflowFile,
    /// A published workflow, resolved at each firing: `NAME@sha256:DIGEST` (one version),
    /// `NAME@STAGE` or `NAME` (follows the stage). None: `workflow` runs as frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<String>,
    /// 5 fields (`m h dom mon dow`) or 6 with seconds first.
    pub cron: String,
    /// IANA zone the cron expression is read in, e.g. `Europe/Berlin`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Where its inputs come from.
    pub inputs: ScheduleInputs,
    /// A directory under `[workflows] output_roots` that receives the workflow's outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<PathBuf>,
    /// When a run outlasts the interval.
    #[serde(default)]
    pub overlap: Overlap,
    /// How late a missed occurrence may still run (once) after downtime.
    #[serde(default = "default_catch_up")]
    pub catch_up: Millis,
    /// Paused schedules do not fire.
    #[serde(default)]
    pub paused: bool,
}

fn utc() -> String {
    "UTC".into()
}

/// 1 h: a restart or short outage still delivers the missed report; a day-old occurrence is
/// recorded as missed instead of running at a surprising time.
fn default_catch_up() -> Millis {
    Millis(Duration::from_secs(3600))
}

/// A schedule's parsed cron expression and zone.
#[derive(Clone, Debug)]
pub struct Timing {
    cron: Cron,
    tz: Tz,
}

impl Timing {
    /// Parses `cron` (5 or 6 fields) and the IANA zone `timezone`.
    pub fn parse(cron: &str, timezone: &str) -> Result<Timing, ScheduleError> {
        let c = Cron::from_str(cron).map_err(|e| ScheduleError::Invalid {
            field: "cron".into(),
            reason: format!("`{cron}`: {e}"),
        })?;
        let tz = Tz::from_str(timezone).map_err(|_| ScheduleError::Invalid {
            field: "timezone".into(),
            reason: format!("`{timezone}` is not an IANA time zone (e.g. `Europe/Berlin`, `UTC`)"),
        })?;
        Ok(Timing { cron: c, tz })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last occurrence at or before `t`.
    pub fn last_until(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last occurrence strictly before `t`.
    fn last_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

impl Schedule {
    /// Checks everything that can be checked without running: the cron expression and zone,
    /// the workflow's shape, inputs that match the workflow's, digests and patterns, and the
    /// inbox and outbox directories against the roots.
    pub fn check(&self, roots: &Roots) -> Result<Timing, ScheduleError> {
        let timing = Timing::parse(&self.cron, &self.timezone)?;
        let plan = self.workflow.plan().map_err(|e| ScheduleError::Invalid {
            field: "workflow".into(),
            reason: e.to_string(),
        })?;
        let given: Vec<&String> = match &self.inputs {
            ScheduleInputs::Fixed(m) => {
                for (name, d) in m {
                    if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(ScheduleError::Invalid {
                            field: format!("inputs.{name}"),
                            reason: format!("`{d}` is not a sha256 digest"),
                        });
                    }
                }
                m.keys().collect()
            }
            ScheduleInputs::Inbox { dir, files } => {
                for (name, pattern) in files {
                    if pattern.is_empty()
                        || pattern.contains(['/', '\0'])
                        || pattern == "."
                        || pattern == ".."
                    {
                        return Err(ScheduleError::Invalid {
                            field: format!("inputs.files.{name}"),
                            reason: format!(
                                "`{pattern}` is not a file name pattern (`*` and `?` within one name, no `/`)"
                            ),
                        });
                    }
                }
                roots.resolve(RootKind::Input, "inputs.dir", dir)?;
                files.keys().collect()
            }
        };
        let wanted: Vec<&String> = plan.inputs.keys().collect();
        if given != wanted {
            return Err(ScheduleError::Invalid {
                field: "inputs".into(),
                reason: format!(
                    "give exactly the workflow's inputs ({}); given: {}",
                    wanted
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    given
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        if let Some(out) = &self.outbox {
            roots.resolve(RootKind::Output, "outbox", out)?;
        }
        Ok(timing)
    }
}

/// `*` and `?` wildcards over one file name.
fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The newest regular file in `dir` matching `pattern` (modification time, then name), read
/// whole if at most `limit` bytes. Symlinks and other non-files are ignored.
pub fn newest_in_inbox(
    dir: &AllowedDir,
    pattern: &str,
    limit: u64,
) -> Result<(String, Vec<u8>), String> {
    let shown = dir.path().display().to_string();
    let d = dir
        .open()
        .map_err(|e| format!("inbox `{shown}` cannot be opened: {e}"))?;
    let mut best: Option<(std::time::SystemTime, String)> = None;
    for entry in d
        .entries()
        .map_err(|e| format!("inbox `{shown}` cannot be listed: {e}"))?
    {
        let entry = entry.map_err(|e| format!("inbox `{shown}`: {e}"))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !glob_match(pattern, &name) {
            continue;
        }
        // `DirEntry::metadata` does not follow symlinks: links are never candidates.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let modified = meta
            .modified()
            .map(|t| t.into_std())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best
            .as_ref()
            .is_none_or(|(m, n)| (modified, &name) > (*m, n))
        {
            best = Some((modified, name));
        }
    }
    let (_, name) =
        best.ok_or_else(|| format!("inbox `{shown}` has no file matching `{pattern}`"))?;
    let file = d
        .open(&name)
        .map_err(|e| format!("inbox file `{shown}/{name}` cannot be opened: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("inbox file `{shown}/{name}` cannot be read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "inbox file `{shown}/{name}` is larger than `[workflows] artifact_limit` ({})",
            ByteSize(limit)
        ));
    }
    Ok((name, bytes))
}

/// Writes `files` (name, bytes) into `dir`: each to a temporary name, then renamed.
fn deliver(dir: &AllowedDir, files: &[(String, bytes::Bytes)]) -> Result<Vec<PathBuf>, String> {
    let shown = dir.path().display().to_string();
    let d = dir
        .open()
        .map_err(|e| format!("outbox `{shown}` cannot be opened: {e}"))?;
    let mut written = Vec::new();
    for (name, bytes) in files {
        let tmp = format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple());
        let write = || -> std::io::Result<()> {
            let mut opts = cap_std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            let mut f = d.open_with(&tmp, &opts)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            d.rename(&tmp, &d, name)
        };
        if let Err(e) = write() {
            let _ = d.remove_file(&tmp);
            return Err(format!(
                "outbox file `{shown}/{name}` cannot be written: {e}"
            ));
        }
        written.push(dir.path().join(name));
    }
    Ok(written)
}

/// Where "now" comes from: the system clock in the server, a hand-moved one in tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: DateTime<Utc>) -> ManualClock {
        ManualClock(Mutex::new(t))
    }

    /// Sets it to `t`.
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// Moves it forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g += chrono::Duration::from_std(d).unwrap_or_default();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a [`Scheduler`] behaves. `SchedulerOptions::default()`:
/// - `replica`: a random id (recorded with each firing it claims).
/// - `lease`: 60 s. A running firing without a heartbeat for this long is taken as dead (its
///   replica stopped) and failed, so a `skip` schedule does not stay blocked forever.
/// - `heartbeat`: 10 s. How often a running firing says it is alive (a sixth of the lease).
/// - `on_time`: 5 s. An occurrence at most this late is on time, not missed (a slow tick).
/// - `max_sleep`: 1 s. Longest sleep of [`Scheduler::run_forever`], so new and resumed
///   schedules are seen within about a second.
/// - `max_missed_recorded`: 1000 missed occurrences recorded one by one per tick; the rest in
///   one summary row (a per-second cron after a day of downtime must not write 86 400 rows).
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// This replica's name.
    pub replica: String,
    /// See above.
    pub lease: Duration,
    /// See above.
    pub heartbeat: Duration,
    /// See above.
    pub on_time: Duration,
    /// See above.
    pub max_sleep: Duration,
    /// See above.
    pub max_missed_recorded: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            replica: format!("replica-{}", uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            on_time: Duration::from_secs(5),
            max_sleep: Duration::from_secs(1),
            max_missed_recorded: 1000,
        }
    }
}

/// What one [`Scheduler::tick`] did with an occurrence (only those this replica recorded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fired {
    /// The schedule.
    pub schedule_id: String,
    /// The occurrence.
    pub fire_at: DateTime<Utc>,
    /// How it was recorded: `Running` (started now), `Queued`, `SkippedOverlap`,
    /// `SkippedMissed`.
    pub status: FiringStatus,
}

/// How often a running scheduler prunes firing records: old rows cost a little disk, so an
/// hour's delay does not matter, and the delete is one statement over an indexed table.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Fires due schedules on a store, runs their workflows, records every firing.
#[derive(Clone, Debug)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    workflows: Workflows,
    artifacts: Arc<Artifacts>,
    roots: Roots,
    artifact_limit: u64,
    /// Firing records kept per schedule, and the age past which they go.
    firing_history: u32,
    firing_retention: Duration,
    /// When firing records were last pruned.
    last_prune: Mutex<Option<DateTime<Utc>>>,
    clock: Arc<dyn Clock>,
    options: SchedulerOptions,
    /// Per schedule, the newest occurrence this replica handled (unix ms).
    cursors: Mutex<HashMap<String, i64>>,
    /// The earliest next occurrence seen by the last tick.
    next_due: Mutex<Option<DateTime<Utc>>>,
    runs: Mutex<JoinSet<()>>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

impl Scheduler {
    /// A scheduler on `store` running workflows with `workflows` (whose artifact store is
    /// `artifacts`), checking directories against `config`'s roots, taking time from `clock`.
    pub fn new(
        store: Store,
        workflows: Workflows,
        artifacts: Arc<Artifacts>,
        config: &WorkflowsSection,
        clock: Arc<dyn Clock>,
        options: SchedulerOptions,
    ) -> Result<Scheduler, String> {
        Ok(Scheduler {
            inner: Arc::new(Inner {
                store,
                workflows,
                artifacts,
                roots: config.roots()?,
                artifact_limit: config.artifact_limit.0,
                firing_history: config.firing_history,
                firing_retention: config.firing_retention.0,
                last_prune: Mutex::new(None),
                clock,
                options,
                cursors: Mutex::new(HashMap::new()),
                next_due: Mutex::new(None),
                runs: Mutex::new(JoinSet::new()),
            }),
        })
    }

    /// Checks and stores `schedule` for `tenant` (a new id is assigned); occurrences after now
    /// are due.
    pub async fn create(
        &self,
        tenant: &str,
        mut schedule: Schedule,
    ) -> Result<Schedule, ScheduleError> {
        if let Some(raw) = &schedule.workflow_ref {
            let (r, def) = self.resolve_ref(raw).await?;
            schedule.workflow_ref = Some(r);
            schedule.workflow = def;
        }
        schedule.check(&self.inner.roots)?;
        if let ScheduleInputs::Fixed(m) = &schedule.inputs {
            for (name, d) in m {
                self.inner
                    .artifacts
                    .get(d)
                    .map_err(|e| ScheduleError::Invalid {
                        field: format!("inputs.{name}"),
                        reason: format!("{e} (upload the file first)"),
                    })?;
            }
        }
        schedule.id = uuid::Uuid::new_v4().to_string();
        schedule.tenant = tenant.to_string();
        let now = ms(self.inner.clock.now());
        let row = ScheduleRow {
            id: schedule.id.clone(),
            tenant: tenant.to_string(),
            name: schedule.workflow.name.clone(),
            created_at: now,
            updated_at: now,
            active_from: now,
            paused: schedule.paused,
            definition: serde_json::to_value(&schedule).map_err(|e| ScheduleError::Invalid {
                field: "schedule".into(),
                reason: e.to_string(),
            })?,
        };
        self.inner.store.create_schedule(&row).await?;
        Ok(schedule)
    }

    /// Resolves a published workflow's reference now: the reference to store (`NAME@vN`
    /// becomes `NAME@sha256:DIGEST`) and the version's definition. Errors name `workflow_ref`.
    async fn resolve_ref(&self, raw: &str) -> Result<(String, WorkflowFile), ScheduleError> {
        let r = StepRef::parse("workflow_ref", raw).map_err(|e| ScheduleError::Invalid {
            field: e.field,
            reason: e.reason,
        })?;
        let (row, def, _) = self
            .inner
            .workflows
            .resolve_workflow(&r)
            .await
            .map_err(|e| ScheduleError::Invalid {
                field: "workflow_ref".into(),
                reason: e.to_string(),
            })?;
        let stored = match r.selector {
            Selector::Number(_) | Selector::Digest(_) => {
                format!("{}@sha256:{}", row.name, row.digest)
            }
            Selector::Stage(_) | Selector::Latest => raw.to_string(),
        };
        Ok((stored, def.workflow))
    }

    /// `tenant`'s schedules.
    pub async fn list(&self, tenant: &str) -> Result<Vec<Schedule>, ScheduleError> {
        let rows = self.inner.store.list_schedules(Some(tenant)).await?;
        Ok(rows.into_iter().filter_map(|r| decode(&r)).collect())
    }

    /// Schedule `id` of `tenant`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Schedule, ScheduleError> {
        self.inner
            .store
            .get_schedule(tenant, id)
            .await?
            .as_ref()
            .and_then(decode)
            .ok_or_else(|| ScheduleError::NotFound(id.to_string()))
    }

    /// Pauses (true) or resumes (false) schedule `id`; occurrences during a pause are neither
    /// run nor recorded as missed.
    pub async fn set_paused(
        &self,
        tenant: &str,
        id: &str,
        paused: bool,
    ) -> Result<(), ScheduleError> {
        let now = ms(self.inner.clock.now());
        if self
            .inner
            .store
            .set_schedule_paused(tenant, id, paused, now)
            .await?
        {
            Ok(())
        } else {
            Err(ScheduleError::NotFound(id.to_string()))
        }
    }

    /// Deletes schedule `id` and its firing records (workflow run records stay).
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ScheduleError> {
        if self.inner.store.delete_schedule(tenant, id).await? {
            Ok(())
        } else {
            Err(ScheduleError::NotFound(id.to_string()))
        }
    }

    /// The newest `limit` firings of schedule `id`.
    pub async fn firings(
        &self,
        tenant: &str,
        id: &str,
        limit: u32,
    ) -> Result<Vec<FiringRow>, ScheduleError> {
        Ok(self.inner.store.list_firings(tenant, id, limit).await?)
    }

    /// Fires schedule `id` now ("run now"), under its overlap policy; returns how the firing
    /// was recorded (`Running` when it started).
    pub async fn fire_now(
        &self,
        tenant: &str,
        id: &str,
        trigger: Trigger,
    ) -> Result<FiringStatus, ScheduleError> {
        let s = self.get(tenant, id).await?;
        let now = self.inner.clock.now();
        let claim = self.claim(&s, ms(now), trigger, ms(now));
        let status = self
            .inner
            .store
            .claim_firing(&claim)
            .await?
            .ok_or_else(|| ScheduleError::Invalid {
                field: "schedule_id".into(),
                reason: "fired at this very millisecond already; try again".into(),
            })?;
        if status == FiringStatus::Running {
            self.spawn_run(s, ms(now), trigger);
        }
        Ok(status)
    }

    fn claim<'a>(&'a self, s: &'a Schedule, fire_at: i64, trigger: Trigger, now: i64) -> Claim<'a> {
        Claim {
            schedule_id: &s.id,
            tenant: &s.tenant,
            fire_at,
            trigger,
            overlap: s.overlap,
            replica: &self.inner.options.replica,
            now,
            lease_ms: i64::try_from(self.inner.options.lease.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Handles every occurrence due at `now`: claims it (once across replicas), applies the
    /// overlap policy and the catch-up window, starts the runs it won (in the background; see
    /// [`Scheduler::wait_idle`]), and starts queued firings whose predecessor ended. Returns
    /// what this replica recorded.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Vec<Fired>, ScheduleError> {
        let inner = &self.inner;
        self.prune_if_due(now).await;
        let rows = inner.store.list_schedules(None).await?;
        let mut fired = Vec::new();
        let mut next_due: Option<DateTime<Utc>> = None;
        for row in &rows {
            let Some(s) = decode(row) else {
                tracing::warn!(schedule = %row.id, "schedule definition is unreadable; not fired");
                continue;
            };
            let timing = match Timing::parse(&s.cron, &s.timezone) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(schedule = %row.id, error = %e, "schedule not fired");
                    continue;
                }
            };
            if let Err(e) = self.tick_one(&s, row, &timing, now, &mut fired).await {
                tracing::warn!(schedule = %row.id, error = %e, "schedule tick failed; retried next tick");
            }
            if let Some(n) = timing.next_after(now) {
                next_due = Some(next_due.map_or(n, |d| d.min(n)));
            }
        }
        *inner.next_due.lock().unwrap_or_else(|e| e.into_inner()) = next_due;
        Ok(fired)
    }

    async fn tick_one(
        &self,
        s: &Schedule,
        row: &ScheduleRow,
        timing: &Timing,
        now: DateTime<Utc>,
        fired: &mut Vec<Fired>,
    ) -> Result<(), ScheduleError> {
        let inner = &self.inner;
        let now_ms = ms(now);
        let known = inner
            .cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&s.id)
            .copied();
        let known = match known {
            Some(c) => Some(c),
            None => inner.store.last_scheduled_firing(&s.id).await?,
        };
        let cursor = from_ms(known.unwrap_or(row.active_from).max(row.active_from));

        // Due occurrences, newest first: those on time, then the newest late one.
        let on_time_limit = chrono::Duration::from_std(inner.options.on_time).unwrap_or_default();
        let mut on_time = Vec::new();
        let mut newest_late = None;
        let mut at = timing.last_until(now);
        while let Some(t) = at {
            if t <= cursor {
                break;
            }
            if now - t <= on_time_limit {
                on_time.push(t);
                at = timing.last_before(t);
            } else {
                newest_late = Some(t);
                break;
            }
        }
        on_time.reverse();
        let catch_up = chrono::Duration::from_std(s.catch_up.0).unwrap_or_default();
        let mut to_run = on_time.clone();
        let mut missed_until = None;
        let mut why = "";
        if let Some(late) = newest_late {
            if on_time.is_empty() && now - late <= catch_up {
                to_run.insert(0, late);
                missed_until = timing.last_before(late);
                why = "missed while no replica ran it; the newest missed occurrence ran instead";
            } else {
                missed_until = Some(late);
                why = if on_time.is_empty() {
                    "missed while no replica ran it, longer ago than the catch-up window"
                } else {
                    "missed while no replica ran it; a newer occurrence ran on time"
                };
            }
        }
        // Record the missed ones, oldest first, one by one up to the cap; past it, one row at
        // the newest missed occurrence stands for the rest (so a restarted replica, which
        // resumes after the newest recorded occurrence, does not record them again).
        if let Some(until) = missed_until.filter(|u| *u > cursor) {
            let cap = inner.options.max_missed_recorded;
            let mut at = timing.next_after(cursor);
            let mut n = 0;
            while let Some(mut t) = at.filter(|t| *t <= until) {
                let mut message = why.to_string();
                if n == cap && t < until {
                    message = format!(
                        "{why}; so was every occurrence from {} to here (not recorded one by one)",
                        t.with_timezone(&timing.tz)
                    );
                    t = until;
                }
                let claim = self.claim(s, ms(t), Trigger::Schedule, now_ms);
                if inner
                    .store
                    .record_skipped_firing(&claim, FiringStatus::SkippedMissed, &message)
                    .await?
                {
                    fired.push(Fired {
                        schedule_id: s.id.clone(),
                        fire_at: t,
                        status: FiringStatus::SkippedMissed,
                    });
                }
                n += 1;
                at = timing.next_after(t);
            }
            self.advance(&s.id, ms(until));
        }
        for t in to_run {
            let claim = self.claim(s, ms(t), Trigger::Schedule, now_ms);
            if let Some(status) = inner.store.claim_firing(&claim).await? {
                fired.push(Fired {
                    schedule_id: s.id.clone(),
                    fire_at: t,
                    status,
                });
                if status == FiringStatus::Running {
                    self.spawn_run(s.clone(), ms(t), Trigger::Schedule);
                }
            }
            self.advance(&s.id, ms(t));
        }
        if s.overlap == Overlap::QueueOne {
            let lease = i64::try_from(inner.options.lease.as_millis()).unwrap_or(i64::MAX);
            if let Some(fire_at) = inner
                .store
                .start_queued_firing(&s.id, &inner.options.replica, now_ms, lease)
                .await?
            {
                fired.push(Fired {
                    schedule_id: s.id.clone(),
                    fire_at: from_ms(fire_at),
                    status: FiringStatus::Running,
                });
                self.spawn_run(s.clone(), fire_at, Trigger::Schedule);
            }
        }
        Ok(())
    }

    /// Deletes old firing records now (see the module's doc): those past the newest
    /// `firing_history` per schedule and those last changed before `now - firing_retention`.
    /// Returns how many went.
    pub async fn prune_firings(&self, now: DateTime<Utc>) -> Result<u64, ScheduleError> {
        let inner = &self.inner;
        let cutoff = now - chrono::Duration::from_std(inner.firing_retention).unwrap_or_default();
        Ok(inner
            .store
            .prune_firings(inner.firing_history, ms(cutoff))
            .await?)
    }

    /// Prunes at the first tick and then once per [`PRUNE_EVERY`] of the scheduler's clock;
    /// a failure is logged and retried at the next tick.
    async fn prune_if_due(&self, now: DateTime<Utc>) {
        {
            let mut last = self
                .inner
                .last_prune
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|l| (now - l).to_std().unwrap_or_default() < PRUNE_EVERY) {
                return;
            }
            *last = Some(now);
        }
        match self.prune_firings(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned old schedule firings"),
            Err(e) => {
                *self
                    .inner
                    .last_prune
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                tracing::warn!(error = %e, "pruning schedule firings failed");
            }
        }
    }

    fn advance(&self, id: &str, to: i64) {
        let mut c = self.inner.cursors.lock().unwrap_or_else(|e| e.into_inner());
        let e = c.entry(id.to_string()).or_insert(to);
        *e = (*e).max(to);
    }

    fn spawn_run(&self, s: Schedule, fire_at: i64, trigger: Trigger) {
        let me = self.clone();
        let mut runs = self.inner.runs.lock().unwrap_or_else(|e| e.into_inner());
        while runs.try_join_next().is_some() {}
        runs.spawn(async move { me.run_firing(s, fire_at, trigger).await });
    }

    /// Runs one claimed firing to its end and records it.
    async fn run_firing(&self, s: Schedule, fire_at: i64, trigger: Trigger) {
        let inner = &self.inner;
        let beat = {
            let store = inner.store.clone();
            let clock = inner.clock.clone();
            let every = inner.options.heartbeat;
            let id = s.id.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = store.heartbeat_firing(&id, fire_at, ms(clock.now())).await {
                        tracing::warn!(schedule = %id, error = %e, "heartbeat failed");
                    }
                }
            })
        };
        let (status, run_id, message) = match self.execute(&s, fire_at, trigger).await {
            Ok((record, note)) => {
                let ok = record.status == "succeeded";
                let failed_step = record
                    .steps
                    .iter()
                    .find(|st| !st.message.is_empty() && st.status != "SUCCEEDED")
                    .map(|st| format!("step `{}`: {}", st.id, st.message));
                let message = match (note, failed_step) {
                    (Err(e), _) => e,
                    (Ok(_), Some(m)) if !ok => m,
                    (Ok(_), _) => String::new(),
                };
                let status = if ok && message.is_empty() {
                    FiringStatus::Succeeded
                } else {
                    FiringStatus::Failed
                };
                (status, record.run_id, message)
            }
            Err(e) => (FiringStatus::Failed, String::new(), e),
        };
        beat.abort();
        let now = ms(inner.clock.now());
        if let Err(e) = inner
            .store
            .finish_firing(&s.id, fire_at, status, &run_id, &message, now)
            .await
        {
            tracing::error!(schedule = %s.id, error = %e, "could not record a firing's end");
        }
        tracing::info!(schedule = %s.id, fire_at, status = status.as_str(), run_id, "schedule fired");
    }

    /// Gathers the inputs, runs the workflow, stores its record, delivers its outputs. The
    /// inner result is the delivery's.
    async fn execute(
        &self,
        s: &Schedule,
        fire_at: i64,
        trigger: Trigger,
    ) -> Result<(WorkflowRunRecord, Result<Vec<PathBuf>, String>), String> {
        let inner = &self.inner;
        let (plan, source) = match &s.workflow_ref {
            Some(raw) => {
                let r = StepRef::parse("workflow_ref", raw).map_err(|e| e.to_string())?;
                let (row, _, plan) = inner
                    .workflows
                    .resolve_workflow(&r)
                    .await
                    .map_err(|e| format!("workflow `{raw}`: {e}"))?;
                (plan, format!("{}@sha256:{}", row.name, row.digest))
            }
            None => (
                s.workflow.plan().map_err(|e| format!("workflow: {e}"))?,
                String::new(),
            ),
        };
        let mut inputs = BTreeMap::new();
        match &s.inputs {
            ScheduleInputs::Fixed(m) => {
                for (name, d) in m {
                    let b = inner
                        .artifacts
                        .get(d)
                        .map_err(|e| format!("input `{name}`: {e}"))?;
                    inputs.insert(name.clone(), b);
                }
            }
            ScheduleInputs::Inbox { dir, files } => {
                let allowed = inner
                    .roots
                    .resolve(RootKind::Input, "inputs.dir", dir)
                    .map_err(|e| e.to_string())?;
                let mut left = inner.artifact_limit;
                for (name, pattern) in files {
                    let (_, bytes) = newest_in_inbox(&allowed, pattern, left)
                        .map_err(|e| format!("input `{name}`: {e}"))?;
                    left -= bytes.len() as u64;
                    inputs.insert(name.clone(), bytes::Bytes::from(bytes));
                }
            }
        }
        let record = inner
            .workflows
            .run(&plan, inputs, None, None)
            .await
            .map_err(|e| e.to_string())?
            .with_origin(trigger, source);
        inner
            .workflows
            .save_run(&s.tenant, &record)
            .await
            .map_err(|e| format!("the run record could not be stored: {e}"))?;
        let delivered = match &s.outbox {
            Some(out) if !record.outputs.is_empty() => self.deliver(out, &record, fire_at),
            _ => Ok(Vec::new()),
        };
        Ok((record, delivered))
    }

    fn deliver(
        &self,
        out: &Path,
        record: &WorkflowRunRecord,
        fire_at: i64,
    ) -> Result<Vec<PathBuf>, String> {
        let inner = &self.inner;
        let allowed = inner
            .roots
            .resolve(RootKind::Output, "outbox", out)
            .map_err(|e| e.to_string())?;
        let stamp = from_ms(fire_at).format("%Y%m%dT%H%M%SZ");
        let mut files = Vec::new();
        let mut total = 0u64;
        for (name, (file, _)) in &record.outputs {
            let bytes = inner
                .workflows
                .output(record, name)
                .ok_or_else(|| format!("output `{name}`: its artifact is missing"))?;
            total += bytes.len() as u64;
            if total > inner.artifact_limit {
                return Err(format!(
                    "outputs are larger than `[workflows] artifact_limit` ({}); nothing delivered",
                    ByteSize(inner.artifact_limit)
                ));
            }
            let ext = Path::new(file)
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| format!(".{e}"))
                .unwrap_or_default();
            files.push((format!("{name}-{stamp}{ext}"), bytes));
        }
        deliver(&allowed, &files)
    }

    /// Waits until every run started so far (and any started meanwhile) has ended.
    pub async fn wait_idle(&self) {
        loop {
            let mut set =
                std::mem::take(&mut *self.inner.runs.lock().unwrap_or_else(|e| e.into_inner()));
            if set.is_empty() {
                return;
            }
            while set.join_next().await.is_some() {}
        }
    }

    /// Ticks until `shutdown` completes: after each tick it sleeps until the next occurrence,
    /// at most `max_sleep` (so new schedules are seen). Runs still going at shutdown keep
    /// running; await [`Scheduler::wait_idle`] (with the grace period) to let them finish.
    pub async fn run_forever(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let now = self.inner.clock.now();
            if let Err(e) = self.tick(now).await {
                tracing::warn!(error = %e, "scheduler tick failed");
            }
            let next = *self
                .inner
                .next_due
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let max = self.inner.options.max_sleep;
            let sleep = next
                .and_then(|n| (n - self.inner.clock.now()).to_std().ok())
                .map_or(max, |d| (d + Duration::from_millis(1)).min(max));
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = &mut shutdown => return,
            }
        }
    }
}

fn decode(row: &ScheduleRow) -> Option<Schedule> {
    let mut s: Schedule = serde_json::from_value(row.definition.clone()).ok()?;
    s.id = row.id.clone();
    s.tenant = row.tenant.clone();
    s.paused = row.paused;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn series(t: &Timing, from: &str, n: usize) -> Vec<String> {
        let mut at = utc(from);
        (0..n)
            .map(|_| {
                at = t.next_after(at).unwrap();
                at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            })
            .collect()
    }

    #[test]
    fn spring_forward_runs_a_fixed_time_once_right_after_the_gap() {
        // Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let t = Timing::parse("0 30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            series(&t, "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST, the first instant after the gap
                "2026-03-30T00:30:00Z", // 02:30 CEST
            ]
        );
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT.
        let t = Timing::parse("30 2 * * *", "America/New_York").unwrap();
        assert_eq!(
            series(&t, "2026-03-07T00:00:00Z", 3),
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:00:00Z", // 03:00 EDT
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ]
        );
        // Interval patterns follow real time: nothing in the gap, nothing doubled.
        let t = Timing::parse("0 */30 * * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            series(&t, "2026-03-29T00:15:00Z", 3),
            [
                "2026-03-29T00:30:00Z", // 01:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST
                "2026-03-29T01:30:00Z", // 03:30 CEST
            ]
        );
    }

    #[test]
    fn fall_back_runs_a_fixed_time_once() {
        // Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let t = Timing::parse("0 30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            series(&t, "2026-10-24T12:00:00Z", 2),
            [
                "2026-10-25T00:30:00Z", // the first 02:30 (CEST) only
                "2026-10-26T01:30:00Z", // 02:30 CET the next day
            ]
        );
        // New York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let t = Timing::parse("30 1 * * *", "America/New_York").unwrap();
        assert_eq!(
            series(&t, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
        // Interval patterns run through both passes of the repeated hour.
        let t = Timing::parse("0 */30 * * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            series(&t, "2026-10-24T23:50:00Z", 5),
            [
                "2026-10-25T00:00:00Z", // 02:00 CEST
                "2026-10-25T00:30:00Z", // 02:30 CEST
                "2026-10-25T01:00:00Z", // 02:00 CET
                "2026-10-25T01:30:00Z", // 02:30 CET
                "2026-10-25T02:00:00Z", // 03:00 CET
            ]
        );
        // Backward searches (the catch-up looks back from now) agree.
        assert_eq!(
            t.last_until(utc("2026-10-25T01:45:00Z")),
            Some(utc("2026-10-25T01:30:00Z"))
        );
        assert_eq!(
            t.last_before(utc("2026-10-25T01:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        let daily = Timing::parse("0 30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            daily.last_until(utc("2026-10-25T12:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            daily.last_until(utc("2026-03-29T12:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
    }

    #[test]
    fn bad_cron_and_zone_are_refused_by_field() {
        let e = Timing::parse("61 * * * *", "UTC").unwrap_err();
        assert!(e.to_string().starts_with("invalid `cron`"), "{e}");
        let e = Timing::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert!(e.to_string().contains("`timezone`"), "{e}");
        assert!(Timing::parse("*/5 * * * * *", "UTC").is_ok());
    }

    #[test]
    fn globs() {
        assert!(glob_match("sales-*.csv", "sales-2026-01.csv"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("sales-*.csv", "sales-2026-01.csv.tmp"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.*", "a.b.c"));
    }

    fn roots(dir: &Path) -> Roots {
        let input = dir.join("in");
        let output = dir.join("out");
        std::fs::create_dir_all(input.join("sub")).unwrap();
        std::fs::create_dir_all(&output).unwrap();
        WorkflowsSection {
            input_roots: vec![input],
            output_roots: vec![output],
            ..WorkflowsSection::default()
        }
        .roots()
        .unwrap()
    }

    #[test]
    fn directories_outside_the_roots_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        let inside = d.path().join("in/sub");
        assert!(r.resolve(RootKind::Input, "inputs.dir", &inside).is_ok());
        assert!(
            r.resolve(RootKind::Input, "inputs.dir", &d.path().join("in"))
                .is_ok()
        );
        let refused = |kind, p: &Path| r.resolve(kind, "inputs.dir", p).unwrap_err().to_string();
        // The other kind's root, a sibling, the parent, relative, `..`, missing, a file.
        assert!(refused(RootKind::Input, &d.path().join("out")).contains("outside every"));
        assert!(
            refused(RootKind::Output, &inside).contains("outside every `[workflows] output_roots`")
        );
        assert!(refused(RootKind::Input, d.path()).contains("outside"));
        assert!(refused(RootKind::Input, Path::new("in/sub")).contains("not an absolute path"));
        assert!(refused(RootKind::Input, &d.path().join("in/sub/../../out")).contains("`..`"));
        assert!(refused(RootKind::Input, &d.path().join("in/nope")).contains("cannot be resolved"));
        std::fs::write(d.path().join("in/f"), b"x").unwrap();
        assert!(refused(RootKind::Input, &d.path().join("in/f")).contains("not a directory"));
        // A symlink inside the root that leads out of it.
        std::os::unix::fs::symlink(d.path().join("out"), d.path().join("in/escape")).unwrap();
        let e = refused(RootKind::Input, &d.path().join("in/escape"));
        assert!(e.contains("through a symlink"), "{e}");
        // No roots at all.
        let none = Roots::default();
        let e = none
            .resolve(RootKind::Output, "outbox", &inside)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no `[workflows] output_roots` are configured"),
            "{e}"
        );
        // Roots themselves must be absolute, existing directories.
        let bad = WorkflowsSection {
            input_roots: vec!["relative".into()],
            ..WorkflowsSection::default()
        };
        assert!(
            bad.roots()
                .unwrap_err()
                .contains("workflows.input_roots[0]")
        );
    }

    #[test]
    fn inbox_takes_the_newest_regular_file_and_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let r = roots(d.path());
        let inbox = d.path().join("in/sub");
        let at = |name: &str, body: &str, secs: u64| {
            let p = inbox.join(name);
            std::fs::write(&p, body).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .unwrap();
        };
        at("sales-01.csv", "old", 1_000);
        at("sales-02.csv", "new", 2_000);
        at("other.csv", "newest but not matching", 3_000);
        std::fs::write(d.path().join("secret.csv"), "outside").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret.csv"), inbox.join("sales-99.csv"))
            .unwrap();
        let allowed = r.resolve(RootKind::Input, "inputs.dir", &inbox).unwrap();
        let (name, bytes) = newest_in_inbox(&allowed, "sales-*.csv", 100).unwrap();
        assert_eq!((name.as_str(), &bytes[..]), ("sales-02.csv", &b"new"[..]));
        let e = newest_in_inbox(&allowed, "sales-*.csv", 2).unwrap_err();
        assert!(
            e.contains("larger than `[workflows] artifact_limit`"),
            "{e}"
        );
        let e = newest_in_inbox(&allowed, "*.xlsx", 100).unwrap_err();
        assert!(e.contains("no file matching `*.xlsx`"), "{e}");

        // Checked, then swapped for a symlink leading out of the root before the read: the
        // handle on the root refuses to follow it.
        std::fs::rename(&inbox, d.path().join("in/old")).unwrap();
        std::fs::create_dir_all(d.path().join("elsewhere")).unwrap();
        std::fs::write(d.path().join("elsewhere/sales-1.csv"), "outside").unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &inbox).unwrap();
        let e = newest_in_inbox(&allowed, "sales-*.csv", 100).unwrap_err();
        assert!(e.contains("cannot be opened"), "{e}");
        std::fs::create_dir_all(d.path().join("out/box")).unwrap();
        let sub = r
            .resolve(RootKind::Output, "outbox", &d.path().join("out/box"))
            .unwrap();
        let root = r
            .resolve(RootKind::Output, "outbox", &d.path().join("out"))
            .unwrap();
        let x = [("r.md".to_string(), bytes::Bytes::from_static(b"x"))];
        deliver(&sub, &x).unwrap();
        assert_eq!(std::fs::read(d.path().join("out/box/r.md")).unwrap(), b"x");
        std::fs::rename(d.path().join("out/box"), d.path().join("out/old")).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), d.path().join("out/box")).unwrap();
        let e = deliver(&sub, &x).unwrap_err();
        assert!(e.contains("cannot be opened"), "{e}");
        // The root itself replaced by a link.
        std::fs::rename(d.path().join("out"), d.path().join("out-old")).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), d.path().join("out")).unwrap();
        let e = deliver(&root, &x).unwrap_err();
        assert!(e.contains("has become a symlink"), "{e}");
        assert!(!d.path().join("elsewhere/r.md").exists());
    }
}
