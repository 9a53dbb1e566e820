//! Tokens: workers have their own, API clients have scoped ones, the first start makes an admin
//! token. Only sha256 hashes of tokens are stored.

use crate::config::{Scope, ServerConfig};
use crate::db::{Db, DbFailure, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Worker { name: String },
    Api { name: String, scopes: Vec<Scope> },
}

impl Caller {
    /// Refuses a caller without `scope`; `admin` holds every scope, workers hold none.
    pub fn require(&self, scope: Scope) -> AppResult<()> {
        match self {
            Caller::Api { scopes, .. }
                if scopes.contains(&scope) || scopes.contains(&Scope::Admin) =>
            {
                Ok(())
            }
            Caller::Api { name, .. } => Err(AppError::Forbidden(format!(
                "token `{name}` lacks the `{}` scope",
                scope_name(scope)
            ))),
            Caller::Worker { .. } => Err(AppError::Forbidden(
                "a worker token cannot call the client API: use an API token".into(),
            )),
        }
    }

    /// The worker's name, or a refusal for API tokens.
    pub fn worker(&self) -> AppResult<&str> {
        match self {
            Caller::Worker { name } => Ok(name),
            Caller::Api { .. } => Err(AppError::Forbidden(
                "this call is for workers: use a worker token".into(),
            )),
        }
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Submit => "submit",
        Scope::Read => "read",
        Scope::Admin => "admin",
    }
}

/// The scopes of a comma-separated list as stored; unknown words are dropped.
pub fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split(',')
        .filter_map(|s| match s {
            "submit" => Some(Scope::Submit),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        })
        .collect()
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn new_token() -> Result<String, getrandom::Error> {
    Ok(format!("vmf_{}", crate::random::random_hex(24)?))
}

/// Tokens by hash, cached in memory; a miss asks the database (another replica may have made it).
#[derive(Default)]
pub struct TokenCache(RwLock<HashMap<String, Caller>>);

impl TokenCache {
    pub fn get(&self, hash: &str) -> Option<Caller> {
        self.0.read().ok()?.get(hash).cloned()
    }

    pub fn put(&self, hash: String, caller: Caller) {
        if let Ok(mut map) = self.0.write() {
            map.insert(hash, caller);
        }
    }
}

/// Stores a token (its hash) for a caller.
pub async fn store_token(db: &Db, token: &str, caller: &Caller) -> Result<(), DbFailure> {
    let hash = hash_token(token);
    let caller = caller.clone();
    db.write(move |tx| Box::pin(async move { store_token_in(tx, &hash, &caller).await }))
        .await
}

/// [`store_token`] in the caller's transaction, by the token's hash.
pub async fn store_token_in(
    tx: &mut WriteTx,
    hash: &str,
    caller: &Caller,
) -> Result<(), DbFailure> {
    let (name, kind, scopes) = match caller {
        Caller::Worker { name } => (name.as_str(), "worker", String::new()),
        Caller::Api { name, scopes } => (
            name.as_str(),
            "api",
            scopes
                .iter()
                .map(|s| scope_name(*s))
                .collect::<Vec<_>>()
                .join(","),
        ),
    };
    tx.execute("DELETE FROM tokens WHERE hash = $1", &[hash.into()])
        .await?;
    tx.execute(
        "INSERT INTO tokens (hash, name, kind, scopes, created_at) VALUES ($1, $2, $3, $4, $5)",
        &[
            hash.into(),
            name.into(),
            kind.into(),
            (&scopes).into(),
            now_ms().into(),
        ],
    )
    .await?;
    Ok(())
}

/// The caller a token's hash stands for, if it is on record.
pub async fn lookup(db: &Db, hash: &str) -> Result<Option<Caller>, DbFailure> {
    let Some(row) = db
        .read()
        .fetch_optional(
            "SELECT name, kind, scopes FROM tokens WHERE hash = $1",
            &[hash.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    let (name, kind) = (row.text(0)?, row.text(1)?);
    Ok(Some(match kind.as_str() {
        "worker" => Caller::Worker { name },
        _ => Caller::Api {
            name,
            scopes: parse_scopes(&row.text(2)?),
        },
    }))
}

/// At start: the config's tokens go into the database; with none configured and none stored,
/// an admin token is made and written to `<data dir>/admin-token` (mode 0600).
pub async fn bootstrap(
    db: &Db,
    config: &ServerConfig,
) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    for w in &config.workers {
        store_token(
            db,
            &w.token,
            &Caller::Worker {
                name: w.name.clone(),
            },
        )
        .await?;
    }
    for t in &config.tokens {
        let caller = Caller::Api {
            name: t.name.clone(),
            scopes: t.scopes.clone(),
        };
        store_token(db, &t.token, &caller).await?;
    }
    let path = config.data_dir.join("admin-token");
    if !config.workers.is_empty() || !config.tokens.is_empty() {
        return Ok(None);
    }
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if lookup(db, &hash_token(existing)).await?.is_some() {
            return Ok(None);
        }
    }
    let token = new_token()?;
    let admin = Caller::Api {
        name: "admin".into(),
        scopes: vec![Scope::Admin],
    };
    store_token(db, &token, &admin).await?;
    crate::files::write_secret_file(&path, &token)?;
    Ok(Some(token))
}
