//! Where statements run: a read on the pool ([`Reads`]) or a write's transaction ([`WriteTx`]),
//! both through [`Query`] with the same [`Arg`]s and [`Row`]s, so that a check a write makes in
//! its transaction and a read outside one are one function. On SQLite a write runs on the
//! writer thread (every call completes at once); on PostgreSQL it is a sqlx transaction.

use super::{Arg, Backend, Row};
use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use std::sync::Arc;

/// Why a statement or a write failed.
#[derive(Debug, thiserror::Error)]
pub enum DbFailure {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("column {0} is not {1}")]
    Column(usize, &'static str),
    /// The transaction this write shared with others failed: nothing of it was stored.
    #[error("the write transaction failed, so this write was not stored")]
    Batch(#[source] Arc<DbFailure>),
    #[error("a failed write made SQLite roll the whole transaction back")]
    RolledBack,
    #[error("cannot start the database writer")]
    Thread(#[source] std::io::Error),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("a write waited on something other than the database")]
    NotReady,
    #[error("a write panicked")]
    Panicked,
}

/// Something statements run on.
pub trait Query: Send {
    /// Runs a statement and returns its rows.
    fn fetch_all<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg<'a>],
    ) -> BoxFuture<'a, Result<Vec<Row>, DbFailure>>;

    /// Runs a statement and returns its first row, if any.
    fn fetch_optional<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg<'a>],
    ) -> BoxFuture<'a, Result<Option<Row>, DbFailure>> {
        Box::pin(async move { Ok(self.fetch_all(sql, args).await?.into_iter().next()) })
    }
}

/// Reads on the pool, outside any write ([`super::Db::read`]).
pub struct Reads<'p>(pub(super) &'p AnyPool);

impl Query for Reads<'_> {
    fn fetch_all<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg<'a>],
    ) -> BoxFuture<'a, Result<Vec<Row>, DbFailure>> {
        let pool = self.0;
        Box::pin(async move {
            Ok(bind_any(sqlx::query(sql), args)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(Row::Any)
                .collect())
        })
    }
}

/// The transaction a write runs in.
pub enum WriteTx {
    /// The writer thread's connection, inside its open transaction.
    Sqlite(rusqlite::Connection),
    Postgres(sqlx::Transaction<'static, sqlx::Any>),
}

impl WriteTx {
    pub fn backend(&self) -> Backend {
        match self {
            WriteTx::Sqlite(_) => Backend::Sqlite,
            WriteTx::Postgres(_) => Backend::Postgres,
        }
    }

    /// ` FOR UPDATE` where the database has it, to lock the rows a write reads until it ends;
    /// SQLite's writer is alone anyway.
    pub fn for_update(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Runs a statement; returns how many rows it changed.
    pub async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, DbFailure> {
        match self {
            WriteTx::Sqlite(conn) => {
                run_sqlite(conn, sql, args, |_| Ok(()))?;
                Ok(conn.changes())
            }
            WriteTx::Postgres(tx) => Ok(bind_any(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected()),
        }
    }
}

impl Query for WriteTx {
    fn fetch_all<'a>(
        &'a mut self,
        sql: &'a str,
        args: &'a [Arg<'a>],
    ) -> BoxFuture<'a, Result<Vec<Row>, DbFailure>> {
        Box::pin(async move {
            match self {
                WriteTx::Sqlite(conn) => {
                    let mut rows = Vec::new();
                    run_sqlite(conn, sql, args, |row| {
                        rows.push(Row::Sqlite(row));
                        Ok(())
                    })?;
                    Ok(rows)
                }
                WriteTx::Postgres(tx) => Ok(bind_any(sqlx::query(sql), args)
                    .fetch_all(&mut **tx)
                    .await?
                    .into_iter()
                    .map(Row::Any)
                    .collect()),
            }
        })
    }
}

fn bind_any<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &[Arg<'q>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for arg in args {
        query = match *arg {
            Arg::Int(v) => query.bind(v),
            Arg::Text(v) => query.bind(v),
            Arg::Blob(v) => query.bind(v),
        };
    }
    query
}

/// Runs `sql` on the writer's connection with its prepared statement cached; `$N` takes
/// `args[N - 1]` wherever it stands. Each row goes to `each` as owned values.
fn run_sqlite(
    conn: &rusqlite::Connection,
    sql: &str,
    args: &[Arg<'_>],
    mut each: impl FnMut(Vec<rusqlite::types::Value>) -> Result<(), DbFailure>,
) -> Result<(), DbFailure> {
    let mut stmt = conn.prepare_cached(sql)?;
    for index in 1..=stmt.parameter_count() {
        let n = stmt
            .parameter_name(index)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(index);
        let arg = n
            .checked_sub(1)
            .and_then(|i| args.get(i))
            .ok_or(rusqlite::Error::InvalidParameterCount(n, args.len()))?;
        match *arg {
            Arg::Int(v) => stmt.raw_bind_parameter(index, v)?,
            Arg::Text(v) => stmt.raw_bind_parameter(index, v)?,
            Arg::Blob(v) => stmt.raw_bind_parameter(index, v)?,
        }
    }
    let columns = stmt.column_count();
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        let values = (0..columns)
            .map(|i| row.get::<_, rusqlite::types::Value>(i))
            .collect::<Result<Vec<_>, _>>()?;
        each(values)?;
    }
    Ok(())
}
