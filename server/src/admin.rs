//! What `vmfarm server token ...` does to the database, with the server running or not.

use crate::auth::{Caller, TokenSource, check_token_owner, hash_token, new_token, store_token_in};
use crate::config::ServerConfig;
use crate::db::{Db, DbFailure, Query};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("database error")]
    Db(#[from] DbFailure),
    #[error("cannot make a random token")]
    Random(#[from] getrandom::Error),
}

/// Makes and stores a new token for `caller`; returns the token (shown once, stored hashed).
pub async fn create_token(
    db: &Db,
    config: &ServerConfig,
    caller: &Caller,
) -> Result<String, AdminError> {
    let name = match caller {
        Caller::Worker { name } => name,
        Caller::Api(api) => {
            check_token_owner(db, config, api)
                .await
                .map_err(AdminError::Invalid)?;
            &api.name
        }
    };
    if name.is_empty()
        || name.len() > 64
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(AdminError::Invalid(format!(
            "token name `{}` must be 1 to 64 characters without spaces",
            name.escape_debug()
        )));
    }
    let token = new_token()?;
    let hash = hash_token(&token);
    let caller = caller.clone();
    db.write(move |tx| {
        Box::pin(async move {
            match &caller {
                Caller::Worker { name } => {
                    // A worker has one token: a new one replaces the old.
                    tx.execute(
                        "DELETE FROM tokens WHERE kind = 'worker' AND name = $1",
                        &[name.into()],
                    )
                    .await?;
                }
                Caller::Api(api) => {
                    // API token names are unique, so that `token revoke NAME` revokes one.
                    let taken = tx
                        .fetch_optional(
                            "SELECT user_name FROM tokens WHERE kind = 'api' AND name = $1",
                            &[api.name.as_str().into()],
                        )
                        .await?;
                    if let Some(row) = taken {
                        return Err(AdminError::Invalid(format!(
                            "a token named `{}` exists (user `{}`): revoke it first, or choose another name",
                            api.name,
                            row.text(0)?
                        )));
                    }
                }
            }
            Ok(store_token_in(tx, &hash, &caller, TokenSource::Cli).await?)
        })
    })
    .await?;
    Ok(token)
}

/// A stored token, without the token itself (only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    pub name: String,
    /// `api` or `worker`.
    pub kind: String,
    pub user: String,
    pub scopes: String,
    pub max_priority: Option<i64>,
    /// `config` (the server's config file) or `cli`.
    pub source: String,
    pub created_at: i64,
}

/// Every stored token, by name.
pub async fn list_tokens(db: &Db) -> Result<Vec<TokenInfo>, DbFailure> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT name, kind, user_name, scopes, max_priority, source, created_at FROM tokens \
             ORDER BY name, created_at",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(TokenInfo {
                name: row.text(0)?,
                kind: row.text(1)?,
                user: row.text(2)?,
                scopes: row.text(3)?,
                max_priority: row.opt_int(4)?,
                source: row.text(5)?,
                created_at: row.int(6)?,
            })
        })
        .collect()
}

/// What `token revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub count: u64,
    /// One came from the server's config file: it comes back at the next start unless the file
    /// loses it too.
    pub from_config: bool,
}

/// Removes the tokens named `name` (one API token, or a worker's): the next call with one gets
/// `401`, on every replica, and the web sessions opened with one end (see
/// [`crate::web::session`]).
pub async fn revoke_token(db: &Db, name: &str) -> Result<Revoked, AdminError> {
    let name = name.to_owned();
    let revoked = db
        .write(move |tx| {
            Box::pin(async move {
                let from_config = tx
                    .fetch_optional(
                        "SELECT hash FROM tokens WHERE name = $1 AND source = 'config'",
                        &[(&name).into()],
                    )
                    .await?
                    .is_some();
                tx.execute(
                    "DELETE FROM web_sessions WHERE token_hash IN \
                     (SELECT hash FROM tokens WHERE name = $1)",
                    &[(&name).into()],
                )
                .await?;
                let count = tx
                    .execute("DELETE FROM tokens WHERE name = $1", &[(&name).into()])
                    .await?;
                Ok::<_, DbFailure>(Revoked { count, from_config })
            })
        })
        .await?;
    if revoked.count == 0 {
        return Err(AdminError::Invalid(
            "no token has that name: `vmfarm server token list` shows them".into(),
        ));
    }
    Ok(revoked)
}
