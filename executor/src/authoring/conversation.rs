//! Conversations as code: turn a ChatGPT Code Interpreter conversation into a runnable step.
//!
//! Reads both forms a conversation leaves ChatGPT in: the shared-link page (the JSON inside
//! `<script id="__NEXT_DATA__">`, at `props.pageProps.serverResponse.data`, or that JSON alone) and
//! the data export `conversations.json` (an array; one is selected by id or title). The
//! conversation is followed as the user last saw it, from `current_node` up the `parent` links, so
//! abandoned branches (regenerated replies) are ignored.
//!
//! The step is the Code Interpreter cells in order as one program (they shared one namespace), in
//! the `mnt-data` layout. A cell that ends in a bare expression stays silent: the notebook displayed
//! that value with IPython's pretty-printer, which the standard library cannot reproduce byte for
//! byte, and a step's stdout is a contract other services read, not a notebook view. The recorded
//! outputs of the cells that print become the expected stdout, and the files the conversation
//! offered for download (`sandbox:/mnt/data/...`) the expected outputs: the step's first checks.
//! Cells are analysed by CPython itself, inside the sandbox (`ast`, and the runtime's own module
//! table for imports it does not have).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::checks::{Check, CheckKind};
use crate::job::request::{JobError, Layout, RuntimeKind, StepJob};
use crate::{Executor, Status};

/// Most bytes of a conversation accepted (exports of long histories are large).
pub const MAX_CONVERSATION_BYTES: usize = 256 << 20;

/// A conversation could not be imported. Each message says what was missing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input is malformed or lacks what a conversation needs.
    #[error("{0}")]
    Malformed(String),
    /// The analysis step could not run.
    #[error(transparent)]
    Job(#[from] JobError),
}

fn malformed(msg: impl Into<String>) -> ImportError {
    ImportError::Malformed(msg.into())
}

/// A file the user attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpectedInput {
    /// File name (in `/mnt/data`).
    pub name: String,
    /// Size as recorded, when known.
    pub size: Option<u64>,
    /// MIME type as recorded, when known.
    pub mime_type: Option<String>,
}

/// One Code Interpreter cell on the conversation's path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// 1-based position among the cells.
    pub number: usize,
    /// The message's node id.
    pub node_id: String,
    /// The code.
    pub code: String,
    /// What the cell printed or evaluated to, as recorded.
    pub recorded_output: Option<String>,
    /// Whether the cell raised an exception in the conversation (left out of the program).
    pub failed: bool,
}

/// What the conversation holds, before analysis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Extracted {
    /// Title.
    pub title: String,
    /// Conversation id, when recorded.
    pub conversation_id: String,
    /// What the user asked, in order (the text of user messages on the path).
    pub requests: Vec<String>,
    /// The cells, in order.
    pub cells: Vec<Cell>,
    /// Files the user attached.
    pub inputs: Vec<ExpectedInput>,
    /// Files offered for download, relative to `/mnt/data`.
    pub outputs: Vec<String>,
}

/// An import the runtime does not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnsupportedImport {
    /// Top-level module name.
    pub module: String,
    /// The cell that imports it.
    pub cell: usize,
}

/// A conversation turned into a step.
#[derive(Clone, Debug, Serialize)]
pub struct ImportedStep {
    /// What was extracted.
    #[serde(flatten)]
    pub extracted: Extracted,
    /// The program: the cells in order.
    pub source: String,
    /// File name for tracebacks.
    pub filename: String,
    /// The runtime the step runs on: `python`, or `python-data` when the cells import what only
    /// it has (numpy, pandas, matplotlib, ...) and this executor has it.
    pub runtime: RuntimeKind,
    /// Imports the chosen runtime does not have, with the cell that needs each.
    pub unsupported_imports: Vec<UnsupportedImport>,
    /// What the step should print on the conversation's own inputs, when that can be known.
    pub expected_stdout: Option<String>,
    /// Decisions and caveats, in words.
    pub notes: Vec<String>,
}

impl ImportedStep {
    /// The step as a job in the `mnt-data` layout (inputs still to be added).
    pub fn job(&self) -> StepJob {
        let mut job = StepJob::new(self.runtime, self.source.clone());
        job.layout = Layout::MntData;
        job.filename = Some(self.filename.clone());
        job
    }

    /// Checks that hold on any input: each offered file is produced.
    pub fn output_checks(&self) -> Vec<Check> {
        self.extracted
            .outputs
            .iter()
            .map(|o| Check {
                name: format!("produces {o}"),
                kind: CheckKind::FileExists(o.clone()),
            })
            .collect()
    }

    /// Checks against the conversation's recorded outputs: valid on the conversation's own inputs.
    pub fn recorded_checks(&self) -> Vec<Check> {
        let mut checks = self.output_checks();
        if let Some(out) = &self.expected_stdout {
            checks.push(Check {
                name: "stdout as recorded in the conversation".into(),
                kind: CheckKind::StdoutEquals(out.clone().into()),
            });
        }
        checks
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .or_else(|| p.get("text").and_then(Value::as_str).map(str::to_string))
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Finds the conversation object in an HTML page, a `__NEXT_DATA__` document, an export array or a
/// bare conversation.
fn locate(bytes: &[u8], select: Option<&str>) -> Result<Value, ImportError> {
    if bytes.len() > MAX_CONVERSATION_BYTES {
        return Err(malformed(format!(
            "the conversation is {} bytes; at most {MAX_CONVERSATION_BYTES} are accepted",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| malformed(format!("the conversation is not UTF-8 text ({e})")))?;
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let doc: Value = if trimmed.starts_with('<') {
        let html = scraper::Html::parse_document(trimmed);
        let selector = scraper::Selector::parse("script#__NEXT_DATA__").expect("a valid selector");
        let script = html.select(&selector).next().ok_or_else(|| {
            malformed("the HTML page has no <script id=\"__NEXT_DATA__\">: is it a ChatGPT shared-link page (saved after it loaded)?")
        })?;
        let json: String = script.text().collect();
        serde_json::from_str(&json)
            .map_err(|e| malformed(format!("the page's __NEXT_DATA__ is not valid JSON: {e}")))?
    } else if trimmed.starts_with('{') || trimmed.starts_with('[') {
        serde_json::from_str(trimmed)
            .map_err(|e| malformed(format!("the conversation is not valid JSON: {e}")))?
    } else {
        return Err(malformed(
            "the input is neither an HTML page nor JSON: expected a ChatGPT shared-link page, its __NEXT_DATA__ JSON, or conversations.json",
        ));
    };
    match doc {
        Value::Array(list) => select_from_export(list, select),
        Value::Object(ref o) if o.contains_key("props") => {
            let data = doc.pointer("/props/pageProps/serverResponse/data").cloned().ok_or_else(|| {
                malformed("the __NEXT_DATA__ JSON has no `props.pageProps.serverResponse.data`: the page holds no conversation")
            })?;
            Ok(data)
        }
        Value::Object(_) => Ok(doc),
        _ => Err(malformed(
            "expected a JSON object (one conversation) or array (conversations.json)",
        )),
    }
}

fn select_from_export(list: Vec<Value>, select: Option<&str>) -> Result<Value, ImportError> {
    let describe = |c: &Value| {
        format!(
            "{:?} ({})",
            c.get("title").and_then(Value::as_str).unwrap_or("untitled"),
            c.get("id")
                .or_else(|| c.get("conversation_id"))
                .and_then(Value::as_str)
                .unwrap_or("no id")
        )
    };
    let listing = || list.iter().map(describe).collect::<Vec<_>>().join(", ");
    if list.is_empty() {
        return Err(malformed("conversations.json holds no conversations"));
    }
    let Some(sel) = select else {
        if list.len() == 1 {
            return Ok(list.into_iter().next().expect("one element"));
        }
        return Err(malformed(format!(
            "conversations.json holds {} conversations: choose one with --conversation ID|TITLE ({})",
            list.len(),
            listing()
        )));
    };
    let id_of = |c: &Value, key: &str| c.get(key).and_then(Value::as_str).map(str::to_string);
    if let Some(c) = list.iter().find(|c| {
        id_of(c, "id").as_deref() == Some(sel)
            || id_of(c, "conversation_id").as_deref() == Some(sel)
    }) {
        return Ok(c.clone());
    }
    let by_title: Vec<&Value> = list
        .iter()
        .filter(|c| {
            c.get("title")
                .and_then(Value::as_str)
                .is_some_and(|t| t == sel)
        })
        .collect();
    let by_title = if by_title.is_empty() {
        list.iter()
            .filter(|c| {
                c.get("title")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case(sel))
            })
            .collect()
    } else {
        by_title
    };
    match by_title.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(malformed(format!(
            "no conversation has the id or title {sel:?}; there are: {}",
            listing()
        ))),
        many => Err(malformed(format!(
            "{} conversations are titled {sel:?}: choose one by id ({})",
            many.len(),
            many.iter()
                .map(|c| describe(c))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn download_links(text: &str, into: &mut Vec<String>) {
    let re = regex::Regex::new(r#"sandbox:/mnt/data/([^)\s"'\]<>]+)"#).expect("a valid pattern");
    for c in re.captures_iter(text) {
        let name = c[1].trim_end_matches(['.', ',', ';']).to_string();
        if crate::job::request::check_relative_path("output", &name).is_ok()
            && !into.contains(&name)
        {
            into.push(name);
        }
    }
}

fn cell_failed(tool: &Value, output: &str) -> bool {
    let status = tool
        .pointer("/metadata/aggregate_result/status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    status.contains("exception")
        || status.contains("error")
        || output.contains("Traceback (most recent call last)")
}

/// Extracts the conversation's path, cells, inputs and offered outputs.
pub fn extract(bytes: &[u8], select: Option<&str>) -> Result<Extracted, ImportError> {
    let conv = locate(bytes, select)?;
    let title = conv
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or("untitled")
        .to_string();
    let conversation_id = conv
        .get("conversation_id")
        .or_else(|| conv.get("id"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mapping = conv
        .get("mapping")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            malformed(format!(
                "conversation {title:?} has no `mapping` of messages"
            ))
        })?;
    let current = conv
        .get("current_node")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            malformed(format!(
                "conversation {title:?} has no `current_node`: which branch the user saw is unknown"
            ))
        })?;

    // From current_node up to the root, refusing cycles and dangling links.
    let mut path = Vec::new();
    let mut seen = HashSet::new();
    let mut node_id = current.to_string();
    loop {
        if !seen.insert(node_id.clone()) {
            return Err(malformed(format!(
                "the parent links form a cycle at node {node_id}"
            )));
        }
        let node = mapping.get(&node_id).ok_or_else(|| {
            malformed(format!(
                "node {node_id} is referenced but not in the `mapping`"
            ))
        })?;
        path.push(node_id.clone());
        match node.get("parent").and_then(Value::as_str) {
            Some(parent) => node_id = parent.to_string(),
            None => break,
        }
    }
    path.reverse();

    let mut ex = Extracted {
        title,
        conversation_id,
        requests: Vec::new(),
        cells: Vec::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    let mut seen_inputs = HashSet::new();
    let messages: Vec<&Value> = path
        .iter()
        .filter_map(|id| mapping.get(id)?.get("message").filter(|m| !m.is_null()))
        .collect();
    for (i, msg) in messages.iter().enumerate() {
        let role = msg
            .pointer("/author/role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let content_type = msg
            .pointer("/content/content_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let recipient = msg
            .get("recipient")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match (role, content_type) {
            ("user", _) => {
                let text = text_of(msg.pointer("/content/parts").unwrap_or(&Value::Null));
                if !text.trim().is_empty() {
                    ex.requests.push(text);
                }
                for a in msg
                    .pointer("/metadata/attachments")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(name) = a.get("name").and_then(Value::as_str) else {
                        continue;
                    };
                    if seen_inputs.insert(name.to_string()) {
                        ex.inputs.push(ExpectedInput {
                            name: name.to_string(),
                            size: a.get("size").and_then(Value::as_u64),
                            mime_type: a
                                .get("mimeType")
                                .or_else(|| a.get("mime_type"))
                                .and_then(Value::as_str)
                                .map(str::to_string),
                        });
                    }
                }
            }
            ("assistant", "code") if recipient == "python" => {
                let code = msg
                    .pointer("/content/text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                // The cell's output is the next tool message, if it comes before the next cell.
                let tool = messages[i + 1..]
                    .iter()
                    .take_while(|m| {
                        m.pointer("/author/role").and_then(Value::as_str) != Some("assistant")
                    })
                    .find(|m| {
                        m.pointer("/content/content_type").and_then(Value::as_str)
                            == Some("execution_output")
                    });
                let recorded_output = tool
                    .and_then(|t| t.pointer("/content/text").and_then(Value::as_str))
                    .map(str::to_string);
                let failed = tool.is_some_and(|t| {
                    cell_failed(t, recorded_output.as_deref().unwrap_or_default())
                });
                ex.cells.push(Cell {
                    number: ex.cells.len() + 1,
                    node_id: msg
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    code,
                    recorded_output,
                    failed,
                });
            }
            ("assistant", _) | ("tool", _) => {
                let text = match content_type {
                    "text" => text_of(msg.pointer("/content/parts").unwrap_or(&Value::Null)),
                    _ => msg
                        .pointer("/content/text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                };
                download_links(&text, &mut ex.outputs);
            }
            _ => {}
        }
    }
    if ex.cells.is_empty() {
        return Err(malformed(format!(
            "conversation {:?} has no Code Interpreter cells (assistant messages with content_type `code` and recipient `python`)",
            ex.title
        )));
    }
    Ok(ex)
}

/// What CPython says about one cell.
#[derive(Clone, Debug, Default, Deserialize)]
struct CellInfo {
    ends_with_expression: bool,
    prints: bool,
    unavailable: Vec<String>,
    syntax_error: Option<String>,
}

/// Runs in the sandbox: parses each cell with `ast` and checks its imports against the modules the
/// runtime has: those in `sys.modules` (the `python` runtime preloads everything it has) or that
/// its importers can find (`python-data` imports from its stdlib zip on demand).
const ANALYSE_CELLS: &str = r#"
import ast, importlib.util, json, sys
def available(name):
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
out = []
for src in json.load(sys.stdin):
    info = {"ends_with_expression": False, "prints": False, "unavailable": [], "syntax_error": None}
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        info["syntax_error"] = f"line {e.lineno}: {e.msg}"
        out.append(info)
        continue
    def is_print(node):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not is_print(tree.body[-1].value):
        info["ends_with_expression"] = True
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif is_print(node):
            info["prints"] = True
    info["unavailable"] = sorted(n for n in names if not available(n))
    out.append(info)
print(json.dumps(out))
"#;

/// Runs [`ANALYSE_CELLS`] on `runtime` over the extracted cells.
async fn analyse(
    executor: &Executor,
    ex: &Extracted,
    runtime: RuntimeKind,
) -> Result<Vec<CellInfo>, ImportError> {
    let mut job = StepJob::new(runtime, ANALYSE_CELLS);
    job.filename = Some("analyse_cells.py".into());
    job.stdin = serde_json::to_vec(&ex.cells.iter().map(|c| c.code.as_str()).collect::<Vec<_>>())
        .expect("strings serialise")
        .into();
    job.limits.set_pair("wall_time=20s").expect("a valid limit");
    let r = executor.run(job).await?;
    if r.status != Status::Succeeded {
        return Err(ImportError::Job(JobError::Internal(anyhow::anyhow!(
            "the cell analysis step ({runtime}) ended with {}: {} {}",
            r.status,
            r.message,
            String::from_utf8_lossy(&r.stderr)
        ))));
    }
    serde_json::from_slice(&r.stdout).map_err(|e| {
        ImportError::Job(JobError::Internal(anyhow::anyhow!(
            "the cell analysis ({runtime}) printed no JSON: {e}"
        )))
    })
}

/// Extracts and analyses a conversation into a step, on the runtime that has its imports
/// (`python-data` when it has more of them than `python` and is installed). The analysis runs in
/// the sandbox.
pub async fn import(
    executor: &Executor,
    bytes: &[u8],
    select: Option<&str>,
) -> Result<ImportedStep, ImportError> {
    let ex = extract(bytes, select)?;
    let mut runtime = RuntimeKind::Python;
    let mut infos = analyse(executor, &ex, runtime).await?;
    let mut notes = Vec::new();
    let missing = |infos: &[CellInfo]| {
        infos
            .iter()
            .flat_map(|i| i.unavailable.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let in_python = missing(&infos);
    if !in_python.is_empty() {
        if executor
            .runtimes()
            .availability(RuntimeKind::PythonData)
            .is_ok()
        {
            let data = analyse(executor, &ex, RuntimeKind::PythonData).await?;
            let in_data = missing(&data);
            if in_data.len() < in_python.len() {
                let found: Vec<_> = in_python.difference(&in_data).cloned().collect();
                notes.push(format!(
                    "runs on the python-data runtime: the cells import {}, which it has and the \
                     python runtime does not",
                    found
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                runtime = RuntimeKind::PythonData;
                infos = data;
            }
        } else {
            notes.push(
                "the python-data runtime (numpy, pandas, matplotlib, ...) is not installed on \
                 this server: the step is checked against the python runtime only"
                    .into(),
            );
        }
    }

    let mut unsupported = Vec::new();
    let mut source = format!(
        "# Step imported by stepbox from the ChatGPT conversation {:?}{}.\n\
         # The {} Code Interpreter cells run in order in one namespace, in the mnt-data layout:\n\
         # inputs and outputs live in /mnt/data. Bare expressions at the end of a cell are silent here\n\
         # (the notebook displayed them).\n",
        ex.title,
        if ex.conversation_id.is_empty() {
            String::new()
        } else {
            format!(" ({})", ex.conversation_id)
        },
        ex.cells.len()
    );
    let mut expected = Some(String::new());
    let mut seen_modules = HashMap::new();
    for (cell, info) in ex
        .cells
        .iter()
        .zip(infos.iter().chain(std::iter::repeat(&CellInfo::default())))
    {
        let _ = std::fmt::Write::write_fmt(
            &mut source,
            format_args!("\n# --- cell {} ---\n", cell.number),
        );
        if cell.failed {
            notes.push(format!(
                "cell {} raised an exception in the conversation; it is kept as a comment, not run",
                cell.number
            ));
            for line in cell.code.lines() {
                source.push_str("# ");
                source.push_str(line);
                source.push('\n');
            }
            continue;
        }
        if let Some(err) = &info.syntax_error {
            notes.push(format!(
                "cell {} is not valid Python ({err}); the step will fail there until it is fixed",
                cell.number
            ));
        }
        source.push_str(cell.code.trim_end());
        source.push('\n');
        for m in &info.unavailable {
            if seen_modules.insert(m.clone(), cell.number).is_none() {
                unsupported.push(UnsupportedImport {
                    module: m.clone(),
                    cell: cell.number,
                });
            }
        }
        if info.ends_with_expression {
            notes.push(format!(
                "cell {} ends with a bare expression: silent in the step (the notebook displayed its value)",
                cell.number
            ));
            if info.prints {
                expected = None; // its recorded output mixes prints with the display
            }
        } else if let Some(e) = expected.as_mut() {
            e.push_str(cell.recorded_output.as_deref().unwrap_or_default());
        }
    }
    if expected.is_none() {
        notes.push("a cell both prints and ends with a displayed expression, so the expected stdout cannot be separated from the recording".into());
    }
    for u in &unsupported {
        notes.insert(
            0,
            format!(
                "cell {} imports `{}`, which the {runtime} runtime does not have",
                u.cell, u.module
            ),
        );
    }
    let filename = {
        let slug: String = ex
            .title
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
            .split('_')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("_");
        format!(
            "{}.py",
            if slug.is_empty() {
                "conversation".to_string()
            } else {
                slug.chars().take(60).collect()
            }
        )
    };
    Ok(ImportedStep {
        extracted: ex,
        source,
        filename,
        runtime,
        unsupported_imports: unsupported,
        expected_stdout: expected,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(mapping: Value, current: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({"title": "t", "mapping": mapping, "current_node": current}))
            .unwrap()
    }

    fn node(id: &str, parent: Option<&str>, message: Value) -> (String, Value) {
        (
            id.to_string(),
            json!({"id": id, "parent": parent, "children": [], "message": message}),
        )
    }

    fn code(id: &str, src: &str) -> Value {
        json!({"id": id, "author": {"role": "assistant"}, "recipient": "python", "content": {"content_type": "code", "text": src}})
    }

    #[test]
    fn malformed_inputs_name_what_is_missing() {
        let cases: [(&[u8], &str); 7] = [
            (b"hello", "neither an HTML page nor JSON"),
            (
                b"<html><body>no data</body></html>",
                "no <script id=\"__NEXT_DATA__\">",
            ),
            (
                b"{\"props\": {}}",
                "no `props.pageProps.serverResponse.data`",
            ),
            (b"{\"title\": \"x\"}", "has no `mapping`"),
            (
                b"{\"title\": \"x\", \"mapping\": {}}",
                "has no `current_node`",
            ),
            (b"{ not json", "not valid JSON"),
            (b"[]", "holds no conversations"),
        ];
        for (input, want) in cases {
            let e = extract(input, None).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn cycles_dangling_links_and_cell_less_conversations_are_refused() {
        let m: serde_json::Map<String, Value> = [
            node("a", Some("b"), Value::Null),
            node("b", Some("a"), Value::Null),
        ]
        .into_iter()
        .collect();
        let e = extract(&conv(Value::Object(m), "a"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cycle"), "{e}");
        let m: serde_json::Map<String, Value> =
            [node("a", Some("zzz"), Value::Null)].into_iter().collect();
        let e = extract(&conv(Value::Object(m), "a"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node zzz is referenced but not in the `mapping`"),
            "{e}"
        );
        let m: serde_json::Map<String, Value> = [node("a", None, json!({"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["hi"]}}))].into_iter().collect();
        let e = extract(&conv(Value::Object(m), "a"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Code Interpreter cells"), "{e}");
    }

    #[test]
    fn only_the_branch_the_user_saw_is_followed() {
        let m: serde_json::Map<String, Value> = [
            node("root", None, Value::Null),
            node("c1", Some("root"), code("c1", "x = 1")),
            node("dead", Some("c1"), code("dead", "x = 'abandoned'")),
            node("c2", Some("c1"), code("c2", "print(x)")),
        ]
        .into_iter()
        .collect();
        let ex = extract(&conv(Value::Object(m), "c2"), None).unwrap();
        let cells: Vec<_> = ex.cells.iter().map(|c| c.code.as_str()).collect();
        assert_eq!(cells, ["x = 1", "print(x)"]);
    }

    #[test]
    fn download_links_become_expected_outputs() {
        let mut out = Vec::new();
        download_links(
            "[a](sandbox:/mnt/data/report.csv) and sandbox:/mnt/data/sub/b.json. Also sandbox:/mnt/data/../etc/passwd",
            &mut out,
        );
        assert_eq!(out, ["report.csv", "sub/b.json"]);
    }
}
