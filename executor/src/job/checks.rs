//! Verification checks on a run's result: what the caller expects, and why a result is not it.
//!
//! Checks are prepared (regexes compiled, schemas compiled, paths validated) before the step runs,
//! so a malformed check is refused as a bad request and costs no run. Each verdict says why it
//! failed: the first differing line, JSON path or CSV row, or the schema error's location.
//! Verifier steps (a second sandboxed step) are run by [`crate::Executor::run_checked`].

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::job::outcome::OutputKind;
use crate::job::outcome::RunResult;
use crate::job::request::{JobError, StepJob, check_relative_path};

/// Longest excerpt of a value quoted in a detail.
const EXCERPT: usize = 120;
/// Largest regex program accepted (the `regex` crate runs in linear time; this caps its memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One check a caller asks for.
#[derive(Clone, Debug)]
pub struct Check {
    /// Name echoed in the verdict; empty gets a generated one.
    pub name: String,
    /// What to check.
    pub kind: CheckKind,
}

/// The kinds of check.
#[derive(Clone, Debug)]
pub enum CheckKind {
    /// The exit code equals this.
    ExitCode(i32),
    /// stdout equals these bytes.
    StdoutEquals(bytes::Bytes),
    /// stdout matches this regex.
    StdoutMatches(String),
    /// An output exists at this path.
    FileExists(String),
    /// An output's bytes equal `content`.
    FileEquals {
        /// Output path.
        path: String,
        /// Expected bytes.
        content: bytes::Bytes,
    },
    /// An output's sha256 equals `sha256`.
    FileSha256 {
        /// Output path.
        path: String,
        /// Expected hex digest.
        sha256: String,
    },
    /// An output is JSON equal to `content`.
    FileJsonEquals {
        /// Output path.
        path: String,
        /// Expected JSON.
        content: bytes::Bytes,
    },
    /// An output is CSV equal to `content`.
    FileCsvEquals {
        /// Output path.
        path: String,
        /// Expected CSV.
        content: bytes::Bytes,
        /// Compare rows as a multiset.
        ignore_row_order: bool,
    },
    /// An output matches a regex.
    FileMatches {
        /// Output path.
        path: String,
        /// The pattern.
        regex: String,
    },
    /// An output is valid against a JSON Schema.
    FileJsonSchema {
        /// Output path.
        path: String,
        /// The schema as JSON text.
        schema: String,
    },
    /// A verifier step; its inputs are filled in from the checked run.
    Verifier(Box<StepJob>),
}

/// The verdict on one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Why not, or what was checked.
    pub detail: String,
}

/// A check ready to evaluate: everything parseable has been parsed.
#[derive(Debug)]
pub struct PreparedCheck {
    /// Name for the verdict.
    pub name: String,
    kind: Prepared,
}

#[derive(Debug)]
enum Prepared {
    ExitCode(i32),
    StdoutEquals(bytes::Bytes),
    StdoutMatches(regex::bytes::Regex),
    FileExists(String),
    FileEquals(String, bytes::Bytes),
    FileSha256(String, String),
    FileJsonEquals(String, Value),
    FileCsvEquals(String, Vec<Vec<String>>, bool),
    FileMatches(String, regex::bytes::Regex),
    FileJsonSchema(String, Box<jsonschema::Validator>),
    Verifier(Box<StepJob>),
}

fn excerpt(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s.chars().take(EXCERPT).collect();
    if s.chars().count() > EXCERPT {
        out.push('…');
    }
    format!("{out:?}")
}

fn compile_regex(field: &str, pattern: &str) -> Result<regex::bytes::Regex, JobError> {
    regex::bytes::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| JobError::invalid(field, format!("not a valid regular expression: {e}")))
}

fn parse_csv(bytes: &[u8]) -> Result<Vec<Vec<String>>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    reader
        .byte_records()
        .map(|r| {
            r.map(|rec| {
                rec.iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect()
            })
            .map_err(|e| format!("not valid CSV: {e}"))
        })
        .collect()
}

impl Check {
    /// Validates and compiles the check; `index` names it in errors (`checks[2]`).
    pub fn prepare(&self, index: usize) -> Result<PreparedCheck, JobError> {
        let field = |f: &str| format!("checks[{index}].{f}");
        let path = |p: &str| check_relative_path(&field("path"), p).map(|_| p.to_string());
        let (default_name, kind) = match &self.kind {
            CheckKind::ExitCode(c) => (format!("exit_code == {c}"), Prepared::ExitCode(*c)),
            CheckKind::StdoutEquals(b) => {
                ("stdout_equals".into(), Prepared::StdoutEquals(b.clone()))
            }
            CheckKind::StdoutMatches(r) => (
                format!("stdout_matches {r:?}"),
                Prepared::StdoutMatches(compile_regex(&field("stdout_matches"), r)?),
            ),
            CheckKind::FileExists(p) => {
                (format!("file_exists {p}"), Prepared::FileExists(path(p)?))
            }
            CheckKind::FileEquals { path: p, content } => (
                format!("file_equals {p}"),
                Prepared::FileEquals(path(p)?, content.clone()),
            ),
            CheckKind::FileSha256 { path: p, sha256 } => {
                let want = sha256.to_ascii_lowercase();
                if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(JobError::invalid(
                        field("sha256"),
                        "expected 64 hexadecimal digits",
                    ));
                }
                (
                    format!("file_sha256 {p}"),
                    Prepared::FileSha256(path(p)?, want),
                )
            }
            CheckKind::FileJsonEquals { path: p, content } => {
                let v = serde_json::from_slice(content).map_err(|e| {
                    JobError::invalid(
                        field("content"),
                        format!("the expected content is not JSON: {e}"),
                    )
                })?;
                (
                    format!("file_json_equals {p}"),
                    Prepared::FileJsonEquals(path(p)?, v),
                )
            }
            CheckKind::FileCsvEquals {
                path: p,
                content,
                ignore_row_order,
            } => {
                let rows =
                    parse_csv(content).map_err(|e| JobError::invalid(field("content"), e))?;
                if rows.is_empty() {
                    return Err(JobError::invalid(
                        field("content"),
                        "the expected CSV needs at least a header row",
                    ));
                }
                (
                    format!("file_csv_equals {p}"),
                    Prepared::FileCsvEquals(path(p)?, rows, *ignore_row_order),
                )
            }
            CheckKind::FileMatches { path: p, regex } => (
                format!("file_matches {p} {regex:?}"),
                Prepared::FileMatches(path(p)?, compile_regex(&field("regex"), regex)?),
            ),
            CheckKind::FileJsonSchema { path: p, schema } => {
                let schema: Value = serde_json::from_str(schema).map_err(|e| {
                    JobError::invalid(field("schema_json"), format!("the schema is not JSON: {e}"))
                })?;
                // Built without remote or file resolution (crate features off): a schema cannot make
                // the server fetch URLs or read its own files.
                let validator = jsonschema::validator_for(&schema).map_err(|e| {
                    JobError::invalid(
                        field("schema_json"),
                        format!("not a valid JSON Schema: {e}"),
                    )
                })?;
                (
                    format!("file_json_schema {p}"),
                    Prepared::FileJsonSchema(path(p)?, Box::new(validator)),
                )
            }
            CheckKind::Verifier(job) => {
                if job.program.is_empty() {
                    return Err(JobError::invalid(
                        field("verifier.step"),
                        "the verifier's program is empty",
                    ));
                }
                ("verifier".into(), Prepared::Verifier(job.clone()))
            }
        };
        let name = if self.name.is_empty() {
            default_name
        } else {
            self.name.clone()
        };
        Ok(PreparedCheck { name, kind })
    }
}

fn first_line_difference(want: &[u8], got: &[u8]) -> String {
    let (w, g): (Vec<_>, Vec<_>) = (
        want.split_inclusive(|b| *b == b'\n').collect(),
        got.split_inclusive(|b| *b == b'\n').collect(),
    );
    for (i, (a, b)) in w.iter().zip(&g).enumerate() {
        if a != b {
            return format!(
                "line {}: expected {}, got {}",
                i + 1,
                excerpt(a),
                excerpt(b)
            );
        }
    }
    match w.len().cmp(&g.len()) {
        std::cmp::Ordering::Greater => {
            format!("missing from line {}: {}", g.len() + 1, excerpt(w[g.len()]))
        }
        std::cmp::Ordering::Less => format!(
            "unexpected from line {}: {}",
            w.len() + 1,
            excerpt(g[w.len()])
        ),
        std::cmp::Ordering::Equal => "the bytes differ".into(),
    }
}

fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    a == b || matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

/// The first difference between two JSON values, by JSON path; `None` when equal.
pub fn json_difference(path: &str, want: &Value, got: &Value) -> Option<String> {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => return Some(format!("{p}: missing (expected {})", short(va))),
                    Some(vb) => {
                        if let Some(d) = json_difference(&p, va, vb) {
                            return Some(d);
                        }
                    }
                }
            }
            b.iter()
                .find(|(k, _)| !a.contains_key(*k))
                .map(|(k, v)| format!("{path}.{k}: unexpected key (value {})", short(v)))
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if let Some(d) = json_difference(&format!("{path}[{i}]"), x, y) {
                    return Some(d);
                }
            }
            (a.len() != b.len())
                .then(|| format!("{path}: expected {} items, got {}", a.len(), b.len()))
        }
        (Value::Number(a), Value::Number(b)) if numbers_equal(a, b) => None,
        _ if want == got => None,
        _ => Some(format!(
            "{path}: expected {}, got {}",
            short(want),
            short(got)
        )),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > EXCERPT {
        format!("{}…", s.chars().take(EXCERPT).collect::<String>())
    } else {
        s
    }
}

fn csv_difference(want: &[Vec<String>], got: &[Vec<String>], ignore_order: bool) -> Option<String> {
    let (wh, gh) = (&want[0], got.first());
    match gh {
        None => return Some("the file is empty: expected a header row".into()),
        Some(gh) if gh != wh => return Some(format!("header: expected {wh:?}, got {gh:?}")),
        _ => {}
    }
    let (mut w, mut g) = (want[1..].to_vec(), got[1..].to_vec());
    if ignore_order {
        w.sort();
        g.sort();
        // Report a row missing on one side rather than a position, which is meaningless unordered.
        let (mut i, mut j) = (0, 0);
        while i < w.len() || j < g.len() {
            match (w.get(i), g.get(j)) {
                (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) if a < b => {
                    return Some(format!("expected row {a:?} is missing"));
                }
                (Some(_), Some(b)) | (None, Some(b)) => {
                    return Some(format!("unexpected row {b:?}"));
                }
                (Some(a), None) => return Some(format!("expected row {a:?} is missing")),
                (None, None) => break,
            }
        }
        return None;
    }
    for (i, (a, b)) in w.iter().zip(&g).enumerate() {
        if a != b {
            return Some(format!(
                "row {} (line {}): expected {a:?}, got {b:?}",
                i + 1,
                i + 2
            ));
        }
    }
    (w.len() != g.len()).then(|| format!("expected {} data rows, got {}", w.len(), g.len()))
}

impl PreparedCheck {
    /// Whether this is a verifier step (evaluated by the executor, not here).
    pub fn verifier(&self) -> Option<&StepJob> {
        match &self.kind {
            Prepared::Verifier(job) => Some(job),
            _ => None,
        }
    }

    /// Evaluates the check against `result` (not for verifier steps).
    pub fn evaluate(&self, result: &RunResult) -> CheckResult {
        let verdict = |passed: bool, detail: String| CheckResult {
            name: self.name.clone(),
            passed,
            detail,
        };
        let file = |path: &str| -> Result<&[u8], String> {
            match result.output(path) {
                None => {
                    let mut listing = String::new();
                    for (i, o) in result.outputs.iter().take(10).enumerate() {
                        let _ = write!(listing, "{}{}", if i > 0 { ", " } else { "" }, o.path);
                    }
                    Err(format!(
                        "no output file `{path}` (outputs: {})",
                        if listing.is_empty() { "none" } else { &listing }
                    ))
                }
                Some(o) if matches!(o.kind, OutputKind::Symlink { .. }) => Err(format!(
                    "`{path}` is a symlink, not a file (links are never followed)"
                )),
                Some(o) => Ok(&o.content),
            }
        };
        let text_check = |path: &str, f: &dyn Fn(&[u8]) -> Option<String>| match file(path) {
            Err(e) => verdict(false, e),
            Ok(bytes) => match f(bytes) {
                None => verdict(true, String::new()),
                Some(why) => verdict(false, why),
            },
        };
        match &self.kind {
            Prepared::ExitCode(want) => match result.exit_code {
                Some(c) if c == *want => verdict(true, String::new()),
                Some(c) => verdict(false, format!("exit code {c}, expected {want}")),
                None => verdict(
                    false,
                    format!(
                        "the step did not exit ({}), expected exit code {want}",
                        result.status
                    ),
                ),
            },
            Prepared::StdoutEquals(want) => {
                if result.stdout == *want {
                    verdict(true, String::new())
                } else {
                    verdict(
                        false,
                        format!(
                            "stdout differs: {}",
                            first_line_difference(want, &result.stdout)
                        ),
                    )
                }
            }
            Prepared::StdoutMatches(re) => {
                if re.is_match(&result.stdout) {
                    verdict(true, String::new())
                } else {
                    verdict(false, format!("stdout does not match /{}/", re.as_str()))
                }
            }
            Prepared::FileExists(p) => match file(p) {
                Ok(_) => verdict(true, String::new()),
                Err(e) => verdict(false, e),
            },
            Prepared::FileEquals(p, want) => text_check(p, &|got| {
                (got != &want[..])
                    .then(|| format!("`{p}` differs: {}", first_line_difference(want, got)))
            }),
            Prepared::FileSha256(p, want) => text_check(p, &|got| {
                let digest = crate::job::digest::sha256_hex(got);
                (digest != *want).then(|| format!("`{p}` has sha256 {digest}, expected {want}"))
            }),
            Prepared::FileJsonEquals(p, want) => {
                text_check(p, &|got| match serde_json::from_slice::<Value>(got) {
                    Err(e) => Some(format!("`{p}` is not JSON: {e}")),
                    Ok(v) => {
                        json_difference("$", want, &v).map(|d| format!("`{p}` differs at {d}"))
                    }
                })
            }
            Prepared::FileCsvEquals(p, want, unordered) => {
                text_check(p, &|got| match parse_csv(got) {
                    Err(e) => Some(format!("`{p}` is {e}")),
                    Ok(rows) => csv_difference(want, &rows, *unordered)
                        .map(|d| format!("`{p}` differs: {d}")),
                })
            }
            Prepared::FileMatches(p, re) => text_check(p, &|got| {
                (!re.is_match(got)).then(|| format!("`{p}` does not match /{}/", re.as_str()))
            }),
            Prepared::FileJsonSchema(p, validator) => {
                text_check(p, &|got| match serde_json::from_slice::<Value>(got) {
                    Err(e) => Some(format!("`{p}` is not JSON: {e}")),
                    Ok(v) => {
                        let errors: Vec<String> = validator
                            .iter_errors(&v)
                            .take(3)
                            .map(|e| {
                                format!(
                                    "at `{}`: {e}",
                                    if e.instance_path().as_str().is_empty() {
                                        "/"
                                    } else {
                                        e.instance_path().as_str()
                                    }
                                )
                            })
                            .collect();
                        (!errors.is_empty()).then(|| {
                            format!("`{p}` does not match the schema: {}", errors.join("; "))
                        })
                    }
                })
            }
            Prepared::Verifier(_) => {
                verdict(false, "verifier steps are run by the executor".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_differences_name_the_path() {
        let want = json!({"a": [1, {"b": 2}], "c": "x"});
        assert_eq!(
            json_difference("$", &want, &json!({"c": "x", "a": [1.0, {"b": 2}]})),
            None
        );
        assert_eq!(
            json_difference("$", &want, &json!({"a": [1, {"b": 3}], "c": "x"})).unwrap(),
            "$.a[1].b: expected 2, got 3"
        );
        assert_eq!(
            json_difference("$", &want, &json!({"a": [1, {"b": 2}]})).unwrap(),
            "$.c: missing (expected \"x\")"
        );
        assert_eq!(
            json_difference("$", &want, &json!({"a": [1, {"b": 2}], "c": "x", "d": 0})).unwrap(),
            "$.d: unexpected key (value 0)"
        );
        assert_eq!(
            json_difference("$", &want, &json!({"a": [1], "c": "x"})).unwrap(),
            "$.a: expected 2 items, got 1"
        );
    }

    #[test]
    fn csv_differences_name_the_row() {
        let want = parse_csv(b"id,name\n1,a\n2,b\n").unwrap();
        assert_eq!(
            csv_difference(
                &want,
                &parse_csv(b"id,name\r\n1,a\r\n2,b\r\n").unwrap(),
                false
            ),
            None
        );
        assert_eq!(
            csv_difference(&want, &parse_csv(b"id,name\n1,a\n2,c\n").unwrap(), false).unwrap(),
            "row 2 (line 3): expected [\"2\", \"b\"], got [\"2\", \"c\"]"
        );
        assert_eq!(
            csv_difference(&want, &parse_csv(b"id,nom\n").unwrap(), false).unwrap(),
            "header: expected [\"id\", \"name\"], got [\"id\", \"nom\"]"
        );
        let swapped = parse_csv(b"id,name\n2,b\n1,a\n").unwrap();
        assert!(csv_difference(&want, &swapped, false).is_some());
        assert_eq!(csv_difference(&want, &swapped, true), None);
        assert_eq!(
            csv_difference(
                &want,
                &parse_csv(b"id,name\n2,b\n1,a\n3,c\n").unwrap(),
                true
            )
            .unwrap(),
            "unexpected row [\"3\", \"c\"]"
        );
    }

    #[test]
    fn line_differences_are_quoted() {
        assert_eq!(
            first_line_difference(b"a\nb\n", b"a\nc\n"),
            "line 2: expected \"b\\n\", got \"c\\n\""
        );
        assert_eq!(
            first_line_difference(b"a\nb\n", b"a\n"),
            "missing from line 2: \"b\\n\""
        );
        assert_eq!(
            first_line_difference(b"a\n", b"a\nz"),
            "unexpected from line 2: \"z\""
        );
    }

    #[test]
    fn malformed_checks_are_refused_naming_the_field() {
        let bad = [
            (
                CheckKind::StdoutMatches("(".into()),
                "checks[0].stdout_matches",
            ),
            (CheckKind::FileExists("../x".into()), "checks[0].path"),
            (
                CheckKind::FileSha256 {
                    path: "a".into(),
                    sha256: "xyz".into(),
                },
                "checks[0].sha256",
            ),
            (
                CheckKind::FileJsonEquals {
                    path: "a".into(),
                    content: "{".into(),
                },
                "checks[0].content",
            ),
            (
                CheckKind::FileJsonSchema {
                    path: "a".into(),
                    schema: "{\"type\": 5}".into(),
                },
                "checks[0].schema_json",
            ),
            (
                CheckKind::FileCsvEquals {
                    path: "a".into(),
                    content: "".into(),
                    ignore_row_order: false,
                },
                "checks[0].content",
            ),
        ];
        for (kind, field) in bad {
            let e = Check {
                name: String::new(),
                kind,
            }
            .prepare(0)
            .unwrap_err()
            .to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
