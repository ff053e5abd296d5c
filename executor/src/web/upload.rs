//! Multipart uploads for a run, streamed to disk with the limits enforced while they arrive.
//!
//! Fields: `csrf` (the session's token; pages put it first), `ref` (a stage, or empty for the
//! newest verified version), `stdin` (text), `args` (one argument per line, or one per field),
//! `input.PATH` (a file placed at `PATH` in the step's data directory) and `files` (files placed
//! at their own names). Each file goes to a temporary directory under a name of our own (its
//! index), never the client's; the path it gets inside the sandbox is checked like any job path.
//!
//! The limits: all files and stdin together at most `max_bytes`, at most `max_files` files,
//! other fields at most [`MAX_FIELD_BYTES`]. Past a limit the rest of the request is read and
//! thrown away (up to [`DRAIN_LIMIT`]), so the browser gets the answer instead of a reset
//! connection; nothing of it is kept. The temporary directory is removed when [`Received`] drops,
//! whatever happened.

use std::path::PathBuf;

use axum::extract::Multipart;
use tokio::io::AsyncWriteExt;

use crate::job::request::check_relative_path;

/// Largest non-file field (the CSRF token, the stage, one argument list).
pub const MAX_FIELD_BYTES: usize = 64 << 10;

/// Most bytes read and discarded after a refusal before the connection is simply closed: a
/// refused 2 GiB upload still gets its answer; an endless one does not keep the server reading.
pub const DRAIN_LIMIT: u64 = 4 << 30;

/// What the limits are.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// All files and stdin together.
    pub max_bytes: u64,
    /// Most files.
    pub max_files: usize,
}

/// One received file.
#[derive(Debug)]
pub struct UploadedFile {
    /// Where it goes in the step's data directory.
    pub path: String,
    /// Where it is on disk now.
    pub disk: PathBuf,
    /// Its size.
    pub size: u64,
}

/// A received upload: its files on disk (removed on drop) and its other fields.
#[derive(Debug)]
pub struct Received {
    /// The temporary directory holding the files.
    pub dir: tempfile::TempDir,
    /// The files, in the order they came.
    pub files: Vec<UploadedFile>,
    /// The stage asked for (`ref`), if any.
    pub stage: Option<String>,
    /// Bytes for stdin.
    pub stdin: Vec<u8>,
    /// Arguments.
    pub args: Vec<String>,
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Over the byte limit.
    #[error(
        "the upload is too large: more than {limit} in all (files and stdin together); send smaller files (this server's [web] max_upload_size)"
    )]
    TooLarge {
        /// The limit, for people.
        limit: crate::job::limits::ByteSize,
    },
    /// Over the file count.
    #[error("too many files: at most {limit} per run")]
    TooManyFiles {
        /// The limit.
        limit: usize,
    },
    /// A field is malformed (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// The CSRF token is missing or wrong.
    #[error(
        "this form is out of date or came from another site (its security token does not match your session); reload the page and try again"
    )]
    Csrf,
    /// The request body broke off or is not multipart.
    #[error("the upload could not be read: {0}")]
    Broken(String),
    /// Writing to disk failed.
    #[error("the server could not store the upload: {0}")]
    Disk(String),
}

impl UploadError {
    /// The HTTP status for it.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::Csrf => StatusCode::FORBIDDEN,
            UploadError::Disk(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads `multipart` into a new temporary directory under `parent`. `csrf`: the session's token
/// when the request did not carry it in a header; then the first field must be `csrf` and
/// match, before any file byte is accepted.
pub async fn receive(
    mut multipart: Multipart,
    parent: &std::path::Path,
    limits: Limits,
    csrf: Option<&str>,
) -> Result<Received, UploadError> {
    let result = receive_inner(&mut multipart, parent, limits, csrf).await;
    if result.is_err() {
        drain(&mut multipart).await;
    }
    result
}

async fn receive_inner(
    multipart: &mut Multipart,
    parent: &std::path::Path,
    limits: Limits,
    mut csrf: Option<&str>,
) -> Result<Received, UploadError> {
    let dir = tempfile::Builder::new()
        .prefix("upload-")
        .tempdir_in(parent)
        .map_err(|e| UploadError::Disk(e.to_string()))?;
    let mut received = Received {
        dir,
        files: Vec::new(),
        stage: None,
        stdin: Vec::new(),
        args: Vec::new(),
    };
    let mut total: u64 = 0;
    let too_large = || UploadError::TooLarge {
        limit: crate::job::limits::ByteSize(limits.max_bytes),
    };
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| UploadError::Broken(e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        if let Some(expected) = csrf {
            if name != "csrf" {
                return Err(UploadError::Csrf);
            }
            let token = small_field(&mut field, "csrf").await?;
            if !crate::web::session::same(expected, &token) {
                return Err(UploadError::Csrf);
            }
            csrf = None;
            continue;
        }
        let file_name = field.file_name().map(str::to_string);
        let path = match (name.as_str(), &file_name) {
            (n, Some(f)) if n.starts_with("input.") => {
                if f.is_empty() {
                    // A file input left empty.
                    continue;
                }
                n["input.".len()..].to_string()
            }
            ("files", Some(f)) => {
                if f.is_empty() {
                    continue;
                }
                // Browsers send a base name; some old ones a whole client path: keep the last part.
                f.rsplit(['/', '\\']).next().unwrap_or_default().to_string()
            }
            ("csrf", None) => {
                small_field(&mut field, "csrf").await?;
                continue;
            }
            ("ref", None) => {
                let stage = small_field(&mut field, "ref").await?;
                received.stage = Some(stage.trim().to_string()).filter(|s| !s.is_empty());
                continue;
            }
            ("args", None) => {
                let text = small_field(&mut field, "args").await?;
                received.args.extend(
                    text.lines()
                        .map(|l| l.trim_end_matches('\r'))
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
                continue;
            }
            ("stdin", None) => {
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| UploadError::Broken(e.body_text()))?
                {
                    total += chunk.len() as u64;
                    if total > limits.max_bytes {
                        return Err(too_large());
                    }
                    received.stdin.extend_from_slice(&chunk);
                }
                continue;
            }
            (other, _) => {
                return Err(UploadError::Invalid(format!(
                    "unexpected form field {other:?}: expected `input.PATH` or `files` (files), \
                     `stdin`, `args`, `ref` or `csrf`"
                )));
            }
        };
        let field_label = if name == "files" {
            format!("file {path:?}")
        } else {
            format!("field {name:?}")
        };
        check_relative_path(&field_label, &path)
            .map_err(|e| UploadError::Invalid(e.to_string()))?;
        if received.files.iter().any(|f| f.path == path) {
            return Err(UploadError::Invalid(format!(
                "two files would be placed at {path:?}: give each a different name"
            )));
        }
        if received.files.len() >= limits.max_files {
            return Err(UploadError::TooManyFiles {
                limit: limits.max_files,
            });
        }
        let disk = received.dir.path().join(received.files.len().to_string());
        let mut out = tokio::fs::File::create(&disk)
            .await
            .map_err(|e| UploadError::Disk(e.to_string()))?;
        let mut size = 0u64;
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| UploadError::Broken(e.body_text()))?
        {
            size += chunk.len() as u64;
            total += chunk.len() as u64;
            if total > limits.max_bytes {
                return Err(too_large());
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| UploadError::Disk(e.to_string()))?;
        }
        out.flush()
            .await
            .map_err(|e| UploadError::Disk(e.to_string()))?;
        received.files.push(UploadedFile { path, disk, size });
    }
    if csrf.is_some() {
        return Err(UploadError::Csrf);
    }
    Ok(received)
}

/// A text field of at most [`MAX_FIELD_BYTES`].
async fn small_field(
    field: &mut axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, UploadError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| UploadError::Broken(e.body_text()))?
    {
        if buf.len() + chunk.len() > MAX_FIELD_BYTES {
            return Err(UploadError::Invalid(format!(
                "field `{name}` is longer than {} KiB",
                MAX_FIELD_BYTES >> 10
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map_err(|_| UploadError::Invalid(format!("field `{name}` is not UTF-8 text")))
}

/// Reads and discards the rest of the request (up to [`DRAIN_LIMIT`]).
async fn drain(multipart: &mut Multipart) {
    let mut seen = 0u64;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            _ => return,
        };
        while let Ok(Some(c)) = field.chunk().await {
            seen += c.len() as u64;
            if seen > DRAIN_LIMIT {
                return;
            }
        }
    }
}
