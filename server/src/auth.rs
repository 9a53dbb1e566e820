//! Tokens: workers have their own, API clients have scoped ones, the first start makes an admin
//! token. Only sha256 hashes of tokens are stored.

use crate::access::{Reach, Submitter};
use crate::config::{Scope, ServerConfig};
use crate::db::{Db, DbFailure, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::users;
use sha2::{Digest, Sha256};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Worker { name: String },
    Api(ApiCaller),
}

/// An API token's holder (or a web session's): the user it acts for and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCaller {
    /// The token's name (a web session's user name for a password login).
    pub name: String,
    /// Whose jobs it submits and reads.
    pub user: String,
    /// The user is an admin: it reaches every user's things.
    pub admin: bool,
    pub scopes: Vec<Scope>,
    /// The highest priority its manifests may ask for (`None`: the manifest's limit).
    pub max_priority: Option<i64>,
}

impl Caller {
    /// Refuses a caller without `scope`; `admin` holds every scope, workers hold none.
    pub fn require(&self, scope: Scope) -> AppResult<&ApiCaller> {
        match self {
            Caller::Api(api)
                if api.scopes.contains(&scope) || api.scopes.contains(&Scope::Admin) =>
            {
                Ok(api)
            }
            Caller::Api(api) => Err(AppError::Forbidden(format!(
                "token `{}` lacks the `{}` scope",
                api.name,
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
            Caller::Api(_) => Err(AppError::Forbidden(
                "this call is for workers: use a worker token".into(),
            )),
        }
    }
}

impl ApiCaller {
    /// Whose things this caller sees and acts on.
    pub fn reach(&self) -> Reach {
        if self.admin {
            Reach::All
        } else {
            Reach::Own(self.user.clone())
        }
    }

    /// Who a job it submits belongs to, and what that job may ask for.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            user: self.user.clone(),
            max_priority: self.max_priority,
        }
    }
}

pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Submit => "submit",
        Scope::Read => "read",
        Scope::Admin => "admin",
        Scope::Metrics => "metrics",
    }
}

/// The scope a name stands for ([`scope_name`]'s inverse).
pub fn scope_by_name(name: &str) -> Option<Scope> {
    [Scope::Submit, Scope::Read, Scope::Admin, Scope::Metrics]
        .into_iter()
        .find(|s| scope_name(*s) == name)
}

/// The scopes of a comma-separated list as stored; unknown words are dropped.
pub fn parse_scopes(text: &str) -> Vec<Scope> {
    text.split(',').filter_map(scope_by_name).collect()
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn new_token() -> Result<String, getrandom::Error> {
    Ok(format!("vmf_{}", crate::random::random_hex(24)?))
}

/// Where a stored token came from: `Config` ones are dropped at start when the config no
/// longer has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Config,
    Cli,
}

/// Stores a token (its hash) for a caller.
pub async fn store_token(
    db: &Db,
    token: &str,
    caller: &Caller,
    source: TokenSource,
) -> Result<(), DbFailure> {
    let hash = hash_token(token);
    let caller = caller.clone();
    db.write(move |tx| Box::pin(async move { store_token_in(tx, &hash, &caller, source).await }))
        .await
}

/// [`store_token`] in the caller's transaction, by the token's hash.
pub async fn store_token_in(
    tx: &mut WriteTx,
    hash: &str,
    caller: &Caller,
    source: TokenSource,
) -> Result<(), DbFailure> {
    let (name, kind, scopes, user, max_priority) = match caller {
        Caller::Worker { name } => (name.as_str(), "worker", String::new(), users::ADMIN, None),
        Caller::Api(api) => (
            api.name.as_str(),
            "api",
            api.scopes
                .iter()
                .map(|s| scope_name(*s))
                .collect::<Vec<_>>()
                .join(","),
            api.user.as_str(),
            api.max_priority,
        ),
    };
    let source = match source {
        TokenSource::Config => "config",
        TokenSource::Cli => "cli",
    };
    tx.execute("DELETE FROM tokens WHERE hash = $1", &[hash.into()])
        .await?;
    tx.execute(
        "INSERT INTO tokens (hash, name, kind, scopes, created_at, user_name, max_priority, source) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            hash.into(),
            name.into(),
            kind.into(),
            (&scopes).into(),
            now_ms().into(),
            user.into(),
            max_priority.into(),
            source.into(),
        ],
    )
    .await?;
    Ok(())
}

/// The caller a token's hash stands for, if it is on record. Asked of the database at every
/// call, so that a token revoked (by any replica, or by `vmfarm server token revoke`) stops
/// working at once; it is one primary-key read.
pub async fn lookup(
    db: &Db,
    config: &ServerConfig,
    hash: &str,
) -> Result<Option<Caller>, DbFailure> {
    let Some(row) = db
        .read()
        .fetch_optional(
            "SELECT t.name, t.kind, t.scopes, t.user_name, t.max_priority, u.admin \
             FROM tokens t LEFT JOIN users u ON u.name = t.user_name WHERE t.hash = $1",
            &[hash.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    let (name, kind) = (row.text(0)?, row.text(1)?);
    if kind == "worker" {
        return Ok(Some(Caller::Worker { name }));
    }
    let user = row.text(3)?;
    let admin = users::is_admin(config, &user, row.opt_int(5)?);
    Ok(Some(Caller::Api(ApiCaller {
        name,
        admin,
        scopes: parse_scopes(&row.text(2)?),
        max_priority: row.opt_int(4)?,
        user,
    })))
}

/// At start: the config's tokens go into the database (and those it no longer has are
/// dropped); with none configured and none stored, an admin token is made and written to
/// `<data dir>/admin-token` (mode 0600).
pub async fn bootstrap(
    db: &Db,
    config: &ServerConfig,
) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    let configured: Vec<(&str, Caller)> = config
        .workers
        .iter()
        .map(|w| {
            (
                w.token.as_str(),
                Caller::Worker {
                    name: w.name.clone(),
                },
            )
        })
        .chain(config.tokens.iter().map(|t| {
            (
                t.token.as_str(),
                Caller::Api(ApiCaller {
                    name: t.name.clone(),
                    user: t.user.clone(),
                    admin: false,
                    scopes: t.scopes.clone(),
                    max_priority: t.max_priority,
                }),
            )
        }))
        .collect();
    for (token, caller) in &configured {
        if let Caller::Api(api) = caller {
            check_token_owner(db, config, api)
                .await
                .map_err(|e| format!("[[tokens]] `{}` in the server config: {e}", api.name))?;
        }
        store_token(db, token, caller, TokenSource::Config).await?;
    }
    let keep: Vec<String> = configured.iter().map(|(t, _)| hash_token(t)).collect();
    let dropped = db
        .write(move |tx| {
            Box::pin(async move {
                let stored = tx
                    .fetch_all("SELECT hash, name FROM tokens WHERE source = 'config'", &[])
                    .await?;
                let mut dropped = Vec::new();
                for row in stored {
                    let hash = row.text(0)?;
                    if !keep.contains(&hash) {
                        tx.execute("DELETE FROM tokens WHERE hash = $1", &[(&hash).into()])
                            .await?;
                        dropped.push(row.text(1)?);
                    }
                }
                Ok::<_, DbFailure>(dropped)
            })
        })
        .await?;
    for name in dropped {
        tracing::info!(token = %name, "token removed from the config: it no longer works");
    }
    let path = config.data_dir.join("admin-token");
    if !config.workers.is_empty() || !config.tokens.is_empty() {
        return Ok(None);
    }
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        if lookup(db, config, &hash_token(existing)).await?.is_some() {
            return Ok(None);
        }
    }
    let token = new_token()?;
    let admin = Caller::Api(ApiCaller {
        name: "admin".into(),
        user: users::ADMIN.into(),
        admin: true,
        scopes: vec![Scope::Admin],
        max_priority: None,
    });
    store_token(db, &token, &admin, TokenSource::Cli).await?;
    crate::files::write_secret_file(&path, &token)?;
    Ok(Some(token))
}

/// Refuses a token for a user that does not exist, and the `admin` scope for one that is not an
/// admin.
pub async fn check_token_owner(
    db: &Db,
    config: &ServerConfig,
    api: &ApiCaller,
) -> Result<(), String> {
    let known = users::find(db, config, &api.user)
        .await
        .map_err(|e| format!("cannot read the users: {e}"))?;
    let Some(known) = known else {
        return Err(format!(
            "there is no user `{}`: add it with `vmfarm server user add {}`",
            api.user, api.user
        ));
    };
    if api.scopes.contains(&Scope::Admin) && !known.admin {
        return Err(format!(
            "user `{}` is not an admin, so its tokens cannot have the `admin` scope",
            api.user
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiToken;
    use crate::test_utils::{Database, TestApp, on_both_databases};

    on_both_databases!(
        test_tokens_removed_from_the_config_stop_working_at_start,
        test_api_token_names_are_unique,
    );

    async fn test_api_token_names_are_unique(db: Database) {
        let app = TestApp::new(db).await;
        let ci = |user: &str| {
            Caller::Api(ApiCaller {
                name: "ci".into(),
                user: user.into(),
                admin: false,
                scopes: vec![Scope::Submit],
                max_priority: None,
            })
        };
        let config = &app.state.config;
        crate::admin::create_token(&app.state.db, config, &ci("admin"))
            .await
            .unwrap();
        let err = crate::admin::create_token(&app.state.db, config, &ci("admin"))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "a token named `ci` exists (user `admin`): revoke it first, or choose another name"
        );
        let revoked = crate::admin::revoke_token(&app.state.db, "ci")
            .await
            .unwrap();
        assert_eq!(revoked.count, 1);
        crate::admin::create_token(&app.state.db, config, &ci("admin"))
            .await
            .unwrap();
    }

    fn config_token(name: &str, user: &str, scopes: Vec<Scope>) -> ApiToken {
        ApiToken {
            name: name.into(),
            token: format!("{name}-secret"),
            scopes,
            user: user.into(),
            max_priority: Some(3),
        }
    }

    async fn test_tokens_removed_from_the_config_stop_working_at_start(db: Database) {
        let app = TestApp::new(db).await;
        let mut config = (*app.state.config).clone();
        config.tokens = vec![
            config_token("ci", "admin", vec![Scope::Submit]),
            config_token("nightly", "admin", vec![Scope::Read]),
        ];
        bootstrap(&app.state.db, &config).await.unwrap();
        let ci = lookup(&app.state.db, &config, &hash_token("ci-secret"))
            .await
            .unwrap();
        match ci {
            Some(Caller::Api(api)) => {
                assert_eq!(
                    (api.user.as_str(), api.max_priority, api.admin),
                    ("admin", Some(3), true)
                );
            }
            other => panic!("ci is not an API token: {other:?}"),
        }

        config.tokens.retain(|t| t.name == "nightly");
        bootstrap(&app.state.db, &config).await.unwrap();
        assert_eq!(
            lookup(&app.state.db, &config, &hash_token("ci-secret"))
                .await
                .unwrap(),
            None,
            "gone with the config's line"
        );
        assert!(
            lookup(&app.state.db, &config, &hash_token("nightly-secret"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            lookup(
                &app.state.db,
                &config,
                &hash_token(crate::test_utils::ADMIN)
            )
            .await
            .unwrap()
            .is_some(),
            "tokens made with the CLI stay"
        );

        config.tokens = vec![config_token("x", "nobody", vec![Scope::Read])];
        let err = bootstrap(&app.state.db, &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("there is no user `nobody`"), "{err}");
        config.tokens = vec![config_token("x", "alice", vec![Scope::Admin])];
        config.users = vec![crate::config::User {
            name: "alice".into(),
            password_hash: String::new(),
            admin: false,
        }];
        let err = bootstrap(&app.state.db, &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("user `alice` is not an admin"), "{err}");
    }
}
