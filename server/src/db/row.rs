//! A row a statement returned, read by column index, on either database.

use super::DbFailure;
use rusqlite::types::Value;
use sqlx::Row as _;
use sqlx::any::AnyRow;

/// A row of a read (sqlx's pool) or of a write (the SQLite writer's own connection).
pub enum Row {
    Sqlite(Vec<Value>),
    Any(AnyRow),
}

impl Row {
    pub fn int(&self, i: usize) -> Result<i64, DbFailure> {
        self.opt_int(i)?.ok_or(DbFailure::Column(i, "an integer"))
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, DbFailure> {
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
        match self {
            Row::Sqlite(values) => match values.get(i) {
                Some(Value::Blob(v)) => Ok(v.clone()),
                _ => Err(DbFailure::Column(i, "bytes")),
            },
            Row::Any(row) => Ok(row.try_get(i)?),
        }
    }

    /// Column `i` parsed from its text (a state, say); a value that does not parse is the
    /// database's fault, not the caller's.
    pub fn parsed<T: std::str::FromStr>(&self, i: usize) -> Result<T, DbFailure> {
        self.text(i)?
            .parse()
            .map_err(|_| DbFailure::Column(i, std::any::type_name::<T>()))
    }
}
