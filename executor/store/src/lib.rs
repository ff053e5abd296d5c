//! Stepbox's catalog and run-history store: immutable versions, stage aliases, the promotion
//! audit trail, a change counter for replica caches, and the shared run history.
//!
//! Two backends behind one [`Store`]: an embedded SQLite file (the default,
//! [`Store::default_sqlite_path`]) and PostgreSQL, which several `stepbox serve` replicas share.
//! The schema is migrated at [`Store::open`] (one migration directory per backend). Every write
//! is one transaction; content is opaque JSON that the caller (the executor's catalog module)
//! defines and digests.
//!
//! Replicas cache resolved references and revalidate them against [`Store::catalog_generation`]
//! (one primary-key read, bumped by every catalog write). The run history is bounded by
//! [`Store::prune_runs`]. Workflow schedules fire each occurrence exactly once across replicas
//! by a unique key on `(schedule, occurrence)` (see [`Store::claim_firing`]). Tests run on
//! SQLite always and on PostgreSQL when `STEPBOX_TEST_POSTGRES_URL` is set:
//! `eval "$(scripts/postgres.sh start)"` starts a throwaway server.
//!
//! ```no_run
//! # async fn demo() -> stepbox_store::Result<()> {
//! use stepbox_store::{Kind, Store};
//! let store = Store::open("sqlite:///tmp/catalog.db").await?;
//! let latest = store.latest_verified(Kind::Step, "csv-check").await?;
//! # let _ = latest; Ok(()) }
//! ```

#![warn(missing_docs)]

mod catalog;
mod error;
mod runs;
mod schedules;
mod types;
mod workflows;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

pub use error::{Result, StoreError};
pub use schedules::{Claim, FiringRow, FiringStatus, Overlap, ScheduleRow, Trigger};
pub use types::{
    Kind, NameSummary, NewVersion, Promotion, PromotionOutcome, PromotionRecord, RunEntry, RunPage,
    StageRow, VersionRow, VersionState,
};

// Migrations must stay additive (new tables, nullable or defaulted columns): with
// `ignore_missing`, a replica still running the previous release keeps opening a database that
// a newer replica has already migrated, which is what a rolling upgrade needs.

/// SQLite schema, `migrations/sqlite`.
static SQLITE_MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("migrations/sqlite")
};
/// PostgreSQL schema, `migrations/postgres`.
static POSTGRES_MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("migrations/postgres")
};

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (one process, or several on one machine).
    Sqlite,
    /// A PostgreSQL server shared by replicas.
    Postgres,
}

/// Connection settings for [`Store::open_with`]. `StoreOptions::default()`:
/// - `acquire_timeout`: 5 s. Longest wait for a connection (including connecting to a server
///   that does not answer) before an operation fails with [`StoreError::Unavailable`]; short,
///   because a caller is waiting and a down database should be reported, not waited out.
/// - `max_connections`: 8. Pool size per store. PostgreSQL's default server limit is 100, so 8
///   leaves room for a dozen replicas; SQLite serialises writers anyway.
/// - `busy_timeout`: 5 s. How long a SQLite writer waits for another writer's lock.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Longest wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// Pool size.
    pub max_connections: u32,
    /// SQLite only: wait for a locked database this long before giving up.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            acquire_timeout: Duration::from_secs(5),
            max_connections: 8,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The backend's connection pool.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` once per backend with `$pool` bound to that backend's pool and `$begin` to the
/// statement that opens a write transaction: SQLite's `BEGIN IMMEDIATE` takes the write lock at
/// once (a deferred transaction that reads first cannot wait for the lock later, it fails with
/// SQLITE_BUSY); PostgreSQL's `BEGIN` is read committed, and writers serialise on the
/// generation row they update first. The SQL is shared: SQLite accepts `$N` placeholders.
macro_rules! with_pool {
    ($store:expr, |$pool:ident, $begin:ident| $body:expr) => {
        match &$store.pool {
            $crate::Pool::Sqlite($pool) => {
                #[allow(unused_variables)]
                let $begin = "BEGIN IMMEDIATE";
                $body
            }
            $crate::Pool::Postgres($pool) => {
                #[allow(unused_variables)]
                let $begin = "BEGIN";
                $body
            }
        }
    };
}
pub(crate) use with_pool;

/// A handle on the catalog database; cheap to clone (a pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// The URL with its password masked.
    database: Arc<str>,
}

impl Store {
    /// Opens (creating if needed) the database at `url` with [`StoreOptions::default`] and brings
    /// its schema up to date.
    ///
    /// - `sqlite://PATH` (`sqlite:///abs/path` or `sqlite://relative/path`, `sqlite:PATH` too):
    ///   creates the file and its parent directories; WAL journal, busy timeout, foreign keys on.
    /// - `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`): the database must
    ///   exist; no TLS.
    ///
    /// A database that cannot be reached is [`StoreError::Unavailable`] within the acquire
    /// timeout (5 s).
    pub async fn open(url: &str) -> Result<Store> {
        Store::open_with(url, &StoreOptions::default()).await
    }

    /// [`Store::open`] with explicit connection settings.
    pub async fn open_with(url: &str, options: &StoreOptions) -> Result<Store> {
        let database = mask_url(url);
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: database.clone(),
            reason,
        };
        let pool = if let Some(path) = sqlite_path(url) {
            if path.as_os_str().is_empty() {
                return Err(invalid("no file path after `sqlite://`".into()));
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| StoreError::Unavailable {
                        database: database.clone(),
                        reason: format!("cannot create directory {}: {e}", parent.display()),
                    })?;
            }
            let connect = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(options.busy_timeout)
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_with(connect)
                .await
                .map_err(|e| StoreError::from(e).named(&database))?;
            migrate_sqlite(&pool)
                .await
                .map_err(|e| StoreError::from(e).named(&database))?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let connect = PgConnectOptions::from_str(url)
                .map_err(|e| invalid(e.to_string()))?
                .application_name("stepbox");
            // One direct connection first: it fails fast with the real reason (connection
            // refused, authentication, no such database) where the pool would retry until its
            // timeout and report only that. The migrator runs on it (holding an advisory lock,
            // so replicas starting together migrate once); the pool then connects on demand.
            let mut conn = tokio::time::timeout(
                options.acquire_timeout,
                PgConnection::connect_with(&connect),
            )
            .await
            .map_err(|_| StoreError::Unavailable {
                database: database.clone(),
                reason: format!(
                    "no answer within {:?} (is the server running and reachable?)",
                    options.acquire_timeout
                ),
            })?
            .map_err(|e| StoreError::from(e).named(&database))?;
            POSTGRES_MIGRATOR
                .run(&mut conn)
                .await
                .map_err(|e| StoreError::from(e).named(&database))?;
            conn.close().await.ok();
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(connect);
            Pool::Postgres(pool)
        } else {
            return Err(invalid("unknown scheme".into()));
        };
        Ok(Store {
            pool,
            database: database.into(),
        })
    }

    /// The default embedded catalog: `$XDG_DATA_HOME/stepbox/catalog.db` when `XDG_DATA_HOME` is
    /// an absolute path, else `$HOME/.local/share/stepbox/catalog.db`; None when neither is set.
    pub fn default_sqlite_path() -> Option<PathBuf> {
        let env = |key| {
            std::env::var_os(key)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let data = env("XDG_DATA_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| env("HOME").map(|home| home.join(".local/share")))?;
        Some(data.join("stepbox").join("catalog.db"))
    }

    /// `sqlite://` URL of `path`, for [`Store::open`].
    pub fn sqlite_url(path: &Path) -> String {
        format!("sqlite://{}", path.display())
    }

    /// The database URL with any password masked (`postgres://user:***@host/db`), for messages.
    pub fn describe(&self) -> &str {
        &self.database
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Closes the pool, waiting for connections in use to come back. Clones of this store
    /// then fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        with_pool!(self, |pool, _begin| pool.close().await)
    }

    /// The change counter: increases in every transaction that publishes a version or records
    /// a promotion (accepted or not), never decreases. A replica caches resolved references
    /// together with the generation it read them at and polls this (one primary-key read) to
    /// revalidate: with the executor's 1 s poll, another replica's promotion is seen within about
    /// a second plus one query.
    pub async fn catalog_generation(&self) -> Result<i64> {
        let value = with_pool!(self, |pool, _begin| {
            sqlx::query_scalar::<_, i64>("SELECT value FROM catalog_generation WHERE id = 1")
                .fetch_one(pool)
                .await
        });
        value.map_err(|e| StoreError::from(e).named(&self.database))
    }

    /// Wraps an operation's error with this store's database name.
    pub(crate) fn name_err(&self, e: StoreError) -> StoreError {
        e.named(&self.database)
    }
}

/// Applies the SQLite migrations. SQLite's migrator takes no lock, so two processes opening a
/// new file at once (a CLI command while `stepbox serve` starts) can both try migration 1; the
/// loser's transaction fails and rolls back, and running again after a pause finds it applied.
async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), sqlx::migrate::MigrateError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match SQLITE_MIGRATOR.run(pool).await {
            Err(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) if attempt < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "SQLite migration failed, retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The file path of a `sqlite:` URL (query string dropped), or None for other schemes.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    Some(PathBuf::from(path))
}

/// `url` with the password of its user-info and of a `password=` query parameter replaced by
/// `***`.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{host}", &userinfo[..colon]),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Now, unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("postgres://u:secret@127.0.0.1:1/db"),
            "postgres://u:***@127.0.0.1:1/db"
        );
        assert_eq!(mask_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            mask_url("postgresql://u:p:q@h:5432/db?sslmode=disable&password=x"),
            "postgresql://u:***@h:5432/db?sslmode=disable&password=***"
        );
        assert_eq!(mask_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }

    #[test]
    fn sqlite_urls() {
        assert_eq!(sqlite_path("sqlite:///a/b.db"), Some("/a/b.db".into()));
        assert_eq!(sqlite_path("sqlite://b.db?mode=rwc"), Some("b.db".into()));
        assert_eq!(sqlite_path("sqlite:b.db"), Some("b.db".into()));
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
