//! Who may see and act on what: one place for the API and the web UI alike.
//!
//! | thing            | read                  | act (cancel, rerun, overwrite)      | use      |
//! |------------------|-----------------------|-------------------------------------|----------|
//! | job, its logs and artifacts, group | its owner, admins | its owner, admins (`submit` scope) | |
//! | schedule         | its owner, admins     | its owner, admins (`submit` scope)  |          |
//! | secret           | nobody through the API (`vmfarm server secret list`: names only) | the operator's CLI | jobs of its owner and of the users it is shared with |
//! | token, user      | the operator's CLI    | the operator's CLI                  |          |
//!
//! What a caller may not reach answers as if it did not exist (`404`, the same words as a
//! missing one), so that ids do not tell what exists.

use crate::db::{Arg, Db, Query};
use crate::error::{AppError, AppResult};

/// Whose things a caller reaches: everyone's (an admin) or its own user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    All,
    Own(String),
}

impl Reach {
    /// Whether a thing owned by `owner` is within reach.
    pub fn covers(&self, owner: &str) -> bool {
        match self {
            Reach::All => true,
            Reach::Own(user) => user == owner,
        }
    }

    /// A condition on the `owner` column limiting a query to what is within reach (its argument
    /// pushed on `args`), or `None` for everything.
    pub fn owner_clause<'a>(&'a self, column: &str, args: &mut Vec<Arg<'a>>) -> Option<String> {
        match self {
            Reach::All => None,
            Reach::Own(user) => {
                args.push(user.as_str().into());
                Some(format!("{column} = ${}", args.len()))
            }
        }
    }
}

/// Who a job being submitted belongs to, and the highest priority it may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitter {
    pub user: String,
    pub max_priority: Option<i64>,
}

/// Refuses job `id` when it does not exist or is out of `reach`, in the same words.
pub async fn job(db: &Db, reach: &Reach, id: i64) -> AppResult<()> {
    owned(db, reach, "SELECT owner FROM jobs WHERE id = $1", id, "job").await
}

/// Refuses group `id` when it does not exist or is out of `reach`, in the same words.
pub async fn group(db: &Db, reach: &Reach, id: i64) -> AppResult<()> {
    owned(
        db,
        reach,
        "SELECT owner FROM job_groups WHERE id = $1",
        id,
        "group",
    )
    .await
}

async fn owned(db: &Db, reach: &Reach, sql: &str, id: i64, what: &str) -> AppResult<()> {
    let row = db.read().fetch_optional(sql, &[id.into()]).await?;
    match row {
        Some(row) if reach.covers(&row.text(0)?) => Ok(()),
        _ => Err(AppError::NotFound(format!("no {what} {id}"))),
    }
}
