//! What `vmfarm server token|secret ...` does to the database, with the server running or not.

use crate::auth::{Caller, hash_token, new_token, store_token_in};
use crate::db::{Db, now_ms};
use vmfarm_proto::names::{NameKind, check_name};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("database error")]
    Db(#[from] crate::db::DbFailure),
    #[error("cannot make a random token")]
    Random(#[from] getrandom::Error),
}

/// Largest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Makes and stores a new token for `caller`; returns the token (shown once, stored hashed).
pub async fn create_token(db: &Db, caller: &Caller) -> Result<String, AdminError> {
    let name = match caller {
        Caller::Worker { name } | Caller::Api { name, .. } => name,
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
            store_token_in(tx, &hash, &caller).await
        })
    })
    .await?;
    Ok(token)
}

/// Stores (or replaces) a secret.
pub async fn set_secret(db: &Db, name: &str, value: &[u8]) -> Result<(), AdminError> {
    check_name(NameKind::Secret, name).map_err(|e| AdminError::Invalid(e.to_string()))?;
    if value.is_empty() || value.len() > MAX_SECRET_BYTES {
        return Err(AdminError::Invalid(format!(
            "secret `{name}` is {} bytes; it must be 1 to {MAX_SECRET_BYTES}",
            value.len()
        )));
    }
    let name = name.to_owned();
    let value = value.to_vec();
    db.write(move |tx| {
        Box::pin(async move {
            tx.execute("DELETE FROM secrets WHERE name = $1", &[(&name).into()])
                .await?;
            tx.execute(
                "INSERT INTO secrets (name, value, updated_at) VALUES ($1, $2, $3)",
                &[(&name).into(), value.as_slice().into(), now_ms().into()],
            )
            .await?;
            Ok::<_, AdminError>(())
        })
    })
    .await?;
    Ok(())
}
