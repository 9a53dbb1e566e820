//! One write transaction, on either database: statements with `$N` parameters, rows read by
//! column index. On SQLite it runs on the writer thread (every call completes at once); on
//! PostgreSQL it is a sqlx transaction of the pool.

use super::Backend;
use sqlx::Row as _;
use sqlx::any::AnyRow;
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

/// A value bound to a statement. NULLs keep their type: PostgreSQL needs it.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Blob(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(v)
    }
}

/// An owned [`Arg`], for a statement that is a write of its own ([`super::Db::execute`]).
#[derive(Debug, Clone)]
pub enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

impl Param {
    pub fn arg(&self) -> Arg<'_> {
        match self {
            Param::Int(v) => Arg::Int(*v),
            Param::Text(v) => Arg::Text(v.as_deref()),
        }
    }
}

impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::Int(Some(v))
    }
}

impl From<Option<i64>> for Param {
    fn from(v: Option<i64>) -> Self {
        Param::Int(v)
    }
}

impl From<String> for Param {
    fn from(v: String) -> Self {
        Param::Text(Some(v))
    }
}

impl From<&str> for Param {
    fn from(v: &str) -> Self {
        Param::Text(Some(v.to_owned()))
    }
}

/// A row a write read back.
pub enum Row {
    Sqlite(Vec<rusqlite::types::Value>),
    Any(AnyRow),
}

impl Row {
    pub fn int(&self, i: usize) -> Result<i64, DbFailure> {
        self.opt_int(i)?.ok_or(DbFailure::Column(i, "an integer"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, DbFailure> {
        use rusqlite::types::Value;
        match self {
            Row::Sqlite(values) => match values.get(i) {
                Some(Value::Integer(v)) => Ok(Some(*v)),
                Some(Value::Null) => Ok(None),
                _ => Err(DbFailure::Column(i, "an integer")),
            },
            Row::Any(row) => Ok(row.try_get(i)?),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, DbFailure> {
        self.opt_text(i)?.ok_or(DbFailure::Column(i, "text"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbFailure> {
        use rusqlite::types::Value;
        match self {
            Row::Sqlite(values) => match values.get(i) {
                Some(Value::Text(v)) => Ok(Some(v.clone())),
                Some(Value::Null) => Ok(None),
                _ => Err(DbFailure::Column(i, "text")),
            },
            Row::Any(row) => Ok(row.try_get(i)?),
        }
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, DbFailure> {
        use rusqlite::types::Value;
        match self {
            Row::Sqlite(values) => match values.get(i) {
                Some(Value::Blob(v)) => Ok(v.clone()),
                _ => Err(DbFailure::Column(i, "bytes")),
            },
            Row::Any(row) => Ok(row.try_get(i)?),
        }
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

    /// Runs a statement and returns its first row, if any.
    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<Row>, DbFailure> {
        Ok(self.fetch_all(sql, args).await?.into_iter().next())
    }

    /// Runs a statement and returns its rows.
    pub async fn fetch_all(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, DbFailure> {
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
