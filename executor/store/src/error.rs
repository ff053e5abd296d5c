//! The store's one error type: callers branch on [`StoreError::Unavailable`] (gRPC `UNAVAILABLE`),
//! [`StoreError::NotFound`] and [`StoreError::InvalidArgument`]; every message names the database
//! with its password masked.

/// Everything a [`Store`](crate::Store) operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or used right now (down, refused, timed out, locked, out of
    /// connections, authentication refused). Retrying later may succeed; steps given inline do not
    /// need the store and keep running.
    #[error("database {database} is unavailable: {reason}")]
    Unavailable {
        /// The database URL, password masked ([`Store::describe`](crate::Store::describe)).
        database: String,
        /// What failed, e.g. "connection refused" or "no connection within 5s".
        reason: String,
    },
    /// The URL names no backend this store has, or cannot be parsed.
    #[error(
        "bad catalog database URL `{url}`: {reason} (expected sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    )]
    InvalidUrl {
        /// The URL as given, password masked.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The schema could not be brought up to date (e.g. an applied migration was edited).
    #[error("schema migration of database {database} failed: {reason}")]
    Migration {
        /// The database URL, password masked.
        database: String,
        /// What the migrator said.
        reason: String,
    },
    /// A version (or other row) the operation needs does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. "step `csv-check` version sha256:ab12…".
        what: String,
    },
    /// An argument the store itself checks (digest format, page size) is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored row cannot be decoded (e.g. a document that is not JSON).
    #[error("database {database} holds a malformed {what}: {reason}")]
    Corrupt {
        /// The database URL, password masked.
        database: String,
        /// Which value, e.g. "document of step `x` v3".
        what: String,
        /// The decoding error.
        reason: String,
    },
    /// Any other database error (a bug or a constraint the store did not expect).
    #[error("database {database}: {source}")]
    Database {
        /// The database URL, password masked.
        database: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

/// Shorthand for results of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// True for [`StoreError::Unavailable`]: the caller should answer `UNAVAILABLE`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Fills in the database name of errors built by `From<sqlx::Error>` inside an operation.
    pub(crate) fn named(mut self, name: &str) -> Self {
        match &mut self {
            StoreError::Unavailable { database, .. }
            | StoreError::Migration { database, .. }
            | StoreError::Corrupt { database, .. }
            | StoreError::Database { database, .. }
                if database.is_empty() =>
            {
                name.clone_into(database)
            }
            _ => {}
        }
        self
    }

    /// The driver's unique-constraint error, which publishing retries on.
    pub(crate) fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database {
                source: sqlx::Error::Database(e),
                ..
            } => e.is_unique_violation(),
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    /// Classifies a driver error; the database name is filled in by [`StoreError::named`].
    fn from(e: sqlx::Error) -> Self {
        match unavailable_reason(&e) {
            Some(reason) => StoreError::Unavailable {
                database: String::new(),
                reason,
            },
            None => StoreError::Database {
                database: String::new(),
                source: e,
            },
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(e)
            | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => match unavailable_reason(&e) {
                Some(reason) => StoreError::Unavailable {
                    database: String::new(),
                    reason,
                },
                None => StoreError::Migration {
                    database: String::new(),
                    reason: e.to_string(),
                },
            },
            other => StoreError::Migration {
                database: String::new(),
                reason: other.to_string(),
            },
        }
    }
}

/// Why `e` means "the database cannot be used now", or None for other errors.
fn unavailable_reason(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Io(io) => Some(io.to_string()),
        sqlx::Error::Tls(tls) => Some(format!("TLS: {tls}")),
        sqlx::Error::PoolTimedOut => Some(
            "no connection within the acquire timeout (is the server running and reachable?)"
                .into(),
        ),
        sqlx::Error::PoolClosed => Some("the connection pool is closed".into()),
        sqlx::Error::WorkerCrashed => Some("the database worker stopped".into()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            let unavailable = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite primary result codes (sqlx reports extended codes; the primary code is
                // the low byte): 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL, 14 CANTOPEN.
                code.parse::<i64>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
            } else {
                // PostgreSQL SQLSTATE: class 08 connection exception, 28 invalid authorization,
                // 3D000 no such database, 53 insufficient resources, 57P0x shutting down.
                code.starts_with("08")
                    || code.starts_with("28")
                    || code == "3D000"
                    || code.starts_with("53")
                    || code.starts_with("57P0")
            };
            unavailable.then(|| db.message().to_string())
        }
        _ => None,
    }
}
