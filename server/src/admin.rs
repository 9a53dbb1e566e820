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
            if let Caller::Worker { name } = &caller {
                // A worker has one token: a new one replaces the old.
                tx.execute(
                    "DELETE FROM tokens WHERE kind = 'worker' AND name = $1",
                    &[name.into()],
                )
                .await?;
            }
            store_token_in(tx, &hash, &caller, TokenSource::Cli).await
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

/// Removes every token named `name`: the next call with one gets `401`, on every replica, and
/// the web sessions opened with one end (see [`crate::web::session`]). Returns how many.
pub async fn revoke_token(db: &Db, name: &str) -> Result<u64, AdminError> {
    let name = name.to_owned();
    let removed = db
        .write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "DELETE FROM web_sessions WHERE token_hash IN \
                     (SELECT hash FROM tokens WHERE name = $1)",
                    &[(&name).into()],
                )
                .await?;
                tx.execute("DELETE FROM tokens WHERE name = $1", &[(&name).into()])
                    .await
            })
        })
        .await?;
    if removed == 0 {
        return Err(AdminError::Invalid(
            "no token has that name: `vmfarm server token list` shows them".into(),
        ));
    }
    Ok(removed)
}
