//! The database: SQLite (one file, WAL) by default, PostgreSQL for several replicas.
//! Queries are written once, in the subset both understand, through sqlx's `Any` driver.

use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use std::str::FromStr;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database is behind the pool; a few statements differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://...")]
    Scheme(String),
    #[error("cannot open the database")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// The pools and what they talk to. Reads use `pool`; writes use `writer`, which for SQLite is
/// one connection: SQLite has one writer at a time anyway, and queueing in the pool is far
/// cheaper than SQLite's busy-waiting (sleeps) between competing connections.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub writer: AnyPool,
    pub backend: Backend,
}

impl Db {
    /// Opens (creating a SQLite file if needed) and migrates.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(path) = url.strip_prefix("sqlite://") {
            // WAL: readers never block the writer; NORMAL sync: a committed write survives the
            // process being killed (the WAL is in the OS), which is the durability promised.
            let url = format!("sqlite://{path}?mode=rwc");
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(DbError::Scheme(url.to_owned()));
        };
        let options = AnyConnectOptions::from_str(&url).map_err(DbError::Connect)?;
        let sqlite_pool = |connections: u32| {
            AnyPoolOptions::new()
                .max_connections(connections)
                // A local file has no connection that silently dies: a ping before each use
                // would only cost a round trip to the connection's thread.
                .test_before_acquire(false)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA foreign_keys = ON",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                })
        };
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                // The writer first: it creates the file and switches it to WAL.
                let writer = sqlite_pool(1)
                    .connect_with(options.clone())
                    .await
                    .map_err(DbError::Connect)?;
                let pool = sqlite_pool(8)
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                (pool, writer)
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                (pool.clone(), pool)
            }
        };
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&writer).await.map_err(DbError::Migrate)?;
        Ok(Db {
            pool,
            writer,
            backend,
        })
    }

    /// `FOR UPDATE SKIP LOCKED` where the database has it; SQLite serializes writers anyway.
    pub fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
