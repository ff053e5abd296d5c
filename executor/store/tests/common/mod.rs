//! The test harness both store test binaries share: one empty database per test (SQLite always,
//! PostgreSQL when `STEPBOX_TEST_POSTGRES_URL` is set; under `CI` its absence fails the
//! PostgreSQL tests), and `both_backends!` to run each case on both.

#![allow(dead_code)]

use sqlx::Connection;
use stepbox_store::{Backend, Store};

/// One empty database for one test: a file in a temporary directory, or a PostgreSQL database
/// created for it (dropped at the end of a passing test).
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the admin URL and the database to drop afterwards.
    drop_pg: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        // A parent directory that does not exist yet: open must create it.
        let path = dir.path().join("data/stepbox/catalog.db");
        TestDb {
            url: Store::sqlite_url(&path),
            backend: Backend::Sqlite,
            _dir: Some(dir),
            drop_pg: None,
        }
    }

    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin) = std::env::var("STEPBOX_TEST_POSTGRES_URL") else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "CI is set but STEPBOX_TEST_POSTGRES_URL is not: the PostgreSQL tests must run \
                     in CI (start a server with `eval \"$(scripts/postgres.sh start)\"`)"
                );
            }
            eprintln!(
                "skipped: PostgreSQL (set STEPBOX_TEST_POSTGRES_URL; see scripts/postgres.sh)"
            );
            return None;
        };
        let name = format!("stepbox_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to STEPBOX_TEST_POSTGRES_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE (the role needs CREATEDB)");
        conn.close().await.ok();
        Some(TestDb {
            url: with_database(&admin, &name),
            backend: Backend::Postgres,
            _dir: None,
            drop_pg: Some((admin, name)),
        })
    }

    pub async fn open(&self) -> Store {
        let store = Store::open(&self.url).await.expect("open the store");
        assert_eq!(store.backend(), self.backend);
        store
    }

    pub async fn finish(self) {
        if let Some((admin, name)) = &self.drop_pg {
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// `url` with its path (the database name) replaced, query kept.
pub fn with_database(url: &str, database: &str) -> String {
    let start = url.find("://").unwrap() + 3;
    let (head, rest) = url.split_at(start);
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map(|q| &tail[q..]).unwrap_or("");
    format!("{head}{authority}/{database}{query}")
}

/// Generates `sqlite::NAME` and `postgres::NAME` for every case in `cases`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::TestDb::sqlite();
                    super::cases::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::cases::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}
