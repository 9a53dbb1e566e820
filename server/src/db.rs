//! The database: SQLite (one file, WAL) by default, PostgreSQL for several replicas.
//! Queries are written once, in the subset both understand, and run through [`Query`] with
//! [`Arg`]s and [`Row`]s: reads on the pool ([`Db::read`]), writes in a transaction
//! ([`Db::write`]).

mod args;
mod query;
mod row;
mod sqlite_writer;

pub use args::Arg;
pub use query::{DbFailure, Query, Reads, WriteTx};
pub use row::Row;
pub use sqlite_writer::SqliteWriter;

use args::OwnedArg;

use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use std::str::FromStr;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// How a SQLite commit is made durable (`PRAGMA synchronous`, the server's `sqlite_synchronous`).
/// `Full`: the WAL is synced at every commit (one sync per group of writes the writer commits
/// together), so an acknowledged write survives power loss. `Normal`: synced at checkpoints only,
/// so it survives the process being killed but not the machine losing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    #[default]
    Full,
    Normal,
}

impl SqliteSync {
    fn pragma(self) -> &'static str {
        match self {
            SqliteSync::Full => "PRAGMA synchronous = FULL",
            SqliteSync::Normal => "PRAGMA synchronous = NORMAL",
        }
    }
}

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
    #[error("cannot create the database file {0}")]
    File(String, #[source] std::io::Error),
    #[error("cannot open the database for writing")]
    Writer(#[source] DbFailure),
    #[error("cannot migrate the database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// The database: reads through [`Db::read`]; writes through [`Db::write`].
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    writes: Writes,
}

/// Where writes go. SQLite has one writer at a time anyway: one thread writes, committing the
/// writes waiting for it together, which is far cheaper than connections competing for the
/// lock (SQLite's busy-waiting sleeps). PostgreSQL: a transaction of the pool per write.
#[derive(Clone)]
enum Writes {
    Sqlite(SqliteWriter),
    Postgres(AnyPool),
}

impl Db {
    /// Opens (creating a SQLite file if needed, its commits made durable as `sync` says) and
    /// migrates.
    pub async fn open(url: &str, sync: SqliteSync) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let db = if let Some(path) = url.strip_prefix("sqlite://") {
            // Readable by its owner only; SQLite gives its WAL and shared-memory files the
            // database file's mode.
            crate::files::private_file(std::path::Path::new(path))
                .map_err(|e| DbError::File(path.to_owned(), e))?;
            // The writer first: it switches the file to WAL.
            let writer = SqliteWriter::open(path, sync).map_err(DbError::Writer)?;
            let url = format!("sqlite://{path}?mode=rwc");
            let options = AnyConnectOptions::from_str(&url).map_err(DbError::Connect)?;
            let pool = AnyPoolOptions::new()
                .max_connections(8)
                // A local file has no connection that silently dies: a ping before each use
                // would only cost a round trip to the connection's thread.
                .test_before_acquire(false)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            sync.pragma(),
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA foreign_keys = ON",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                })
                .connect_with(options)
                .await
                .map_err(DbError::Connect)?;
            Db {
                pool,
                writes: Writes::Sqlite(writer),
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = AnyConnectOptions::from_str(url).map_err(DbError::Connect)?;
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .connect_with(options)
                .await
                .map_err(DbError::Connect)?;
            Db {
                pool: pool.clone(),
                writes: Writes::Postgres(pool),
            }
        } else {
            return Err(DbError::Scheme(url.to_owned()));
        };
        let migrator = match db.backend() {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&db.pool).await.map_err(DbError::Migrate)?;
        Ok(db)
    }

    /// Runs `op` in a write transaction: committed when it returns `Ok`, undone when it
    /// returns `Err`; the result comes back once the commit is done.
    pub async fn write<T, E, F>(&self, op: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbFailure> + Send + 'static,
        F: for<'t> FnOnce(&'t mut WriteTx) -> BoxFuture<'t, Result<T, E>> + Send + 'static,
    {
        match &self.writes {
            Writes::Sqlite(writer) => writer.write(op).await,
            Writes::Postgres(pool) => {
                let mut tx = WriteTx::Postgres(pool.begin().await.map_err(DbFailure::from)?);
                let result = op(&mut tx).await;
                if let WriteTx::Postgres(tx) = tx {
                    match &result {
                        Ok(_) => tx.commit().await.map_err(DbFailure::from)?,
                        // Rolling back is what dropping it would do, only sooner.
                        Err(_) => {
                            let _ = tx.rollback().await;
                        }
                    }
                }
                result
            }
        }
    }

    /// Reads outside any write: each statement sees what is committed.
    pub fn read(&self) -> Reads<'_> {
        Reads(&self.pool)
    }

    /// The pool itself, for references measured beside the server's own paths (`vmfarm bench
    /// queue` times bare sqlx transactions on it); the server reads through [`Db::read`].
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Runs one statement as a write of its own; returns how many rows it changed.
    pub async fn execute(&self, sql: &'static str, args: &[Arg<'_>]) -> Result<u64, DbFailure> {
        let owned: Vec<OwnedArg> = args.iter().map(OwnedArg::new).collect();
        self.write(move |tx| {
            Box::pin(async move {
                let args: Vec<Arg<'_>> = owned.iter().map(OwnedArg::arg).collect();
                tx.execute(sql, &args).await
            })
        })
        .await
    }

    pub fn backend(&self) -> Backend {
        match self.writes {
            Writes::Sqlite(_) => Backend::Sqlite,
            Writes::Postgres(_) => Backend::Postgres,
        }
    }

    /// `FOR UPDATE` where the database has it: a row read to decide a write stays as read until
    /// the transaction ends; SQLite serializes writers anyway.
    pub fn for_update(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `FOR UPDATE SKIP LOCKED` where the database has it; SQLite serializes writers anyway.
    pub fn skip_locked(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// `WHERE` and `clauses` joined by `AND`, or nothing when there is none.
pub fn where_all(clauses: &[String]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix time in microseconds, where two events a millisecond apart must not tie.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod upgrade_tests {
    use crate::db::Query;
    use crate::test_utils::{
        ADMIN, ALICE, Database, TestApp, fresh_database_url, on_both_databases,
    };
    use axum::http::StatusCode;
    use sqlx::migrate::Migrator;

    on_both_databases!(test_a_database_from_before_owners_is_upgraded_in_place);

    /// The migrations that made the schema before owners (0001 to 0003), as they were.
    async fn migrate_before_owners(url: &str, database: Database) {
        let from = match database {
            Database::Sqlite => "migrations/sqlite",
            Database::Postgres => "migrations/postgres",
        };
        let old = tempfile::tempdir().unwrap();
        for entry in
            std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(from)).unwrap()
        {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.as_str() < "0004" {
                std::fs::copy(&path, old.path().join(&name)).unwrap();
            }
        }
        sqlx::any::install_default_drivers();
        let url = match database {
            Database::Sqlite => format!("{url}?mode=rwc"),
            Database::Postgres => url.to_owned(),
        };
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        Migrator::new(old.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        // A job, its group and a secret as the old server stored them.
        for sql in [
            "INSERT INTO job_groups (id, created_at) VALUES (7, 1)",
            "INSERT INTO jobs (id, group_id, image, state, priority, manifest, tags, secrets, \
             timeout_ms, created_at) VALUES (41, 7, 'a', 'succeeded', 0, 'image = \"a\"', '[]', \
             '[\"old-key\"]', 60000, 1)",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        sqlx::query("INSERT INTO secrets (name, value, updated_at) VALUES ('old-key', $1, 1)")
            .bind(b"plain-old-value".to_vec())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    async fn test_a_database_from_before_owners_is_upgraded_in_place(db: Database) {
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_database_url(db, dir.path()).await;
        migrate_before_owners(&url, db).await;
        let app = TestApp::on(dir, url, |_| {}).await;
        let job = app.job(41).await;
        assert_eq!(
            (&job["owner"], &job["state"]),
            (&"admin".into(), &"succeeded".into())
        );
        assert_eq!(
            app.get("/api/jobs/41", ALICE).await.status,
            StatusCode::NOT_FOUND
        );
        let group = app.get("/api/groups/7", ADMIN).await;
        assert_eq!(group.body["owner"], "admin", "{:?}", group.body);

        let sealed = crate::secrets::seal_stored(&app.state.db, &app.state.secret_key)
            .await
            .unwrap();
        assert_eq!(sealed, 1, "the value stored in the clear is sealed");
        let row = app
            .state
            .db
            .read()
            .fetch_optional(
                "SELECT value, owner FROM secrets WHERE name = 'old-key'",
                &[],
            )
            .await
            .unwrap()
            .unwrap();
        let value = row.blob(0).unwrap();
        assert!(!value.windows(15).any(|w| w == b"plain-old-value"));
        assert_eq!(row.text(1).unwrap(), "admin");
        let manifest =
            "secrets = [\"old-key\"]\nimage = \"a\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        app.submit(manifest).await;
        let lease = app.lease("w0", "a").await;
        use base64::Engine;
        let opened = base64::engine::general_purpose::STANDARD
            .decode(&lease.secrets["old-key"])
            .unwrap();
        assert_eq!(
            opened, b"plain-old-value",
            "and it still reaches the admin's jobs"
        );
    }
}
