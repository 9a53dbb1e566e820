//! `vmfarm server`: run the server, or administer its database (tokens, secrets, users).

use crate::cli::{SecretAction, ServerAction, ServerArgs, TokenAction, UserAction};
use anyhow::{Context, bail};
use std::io::Read;
use vmfarm_proto::units::ByteSize;
use vmfarm_server::admin;
use vmfarm_server::auth::{ApiCaller, Caller};
use vmfarm_server::config::{Scope, ServerConfig};
use vmfarm_server::db::Db;
use vmfarm_server::retention;
use vmfarm_server::secrets::{self, NewSecret, SecretKey};
use vmfarm_server::store::ArtifactStore;

/// The config file (or the defaults) with the flags laid over it.
pub fn load_config(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
    let mut config = match crate::config_file::chosen(args.config.as_deref(), "server.toml") {
        Some(path) => ServerConfig::load(&path)?,
        None => ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data) = &args.data {
        config.data_dir = data.clone();
    }
    if let Some(url) = &args.database_url {
        config.database_url = url.clone();
    }
    Ok(config)
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    match args.action {
        None => serve(config).await,
        Some(action) => admin(config, action).await,
    }
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let token_path = config.data_dir.join("admin-token");
    let running = vmfarm_server::serve::start(config).await?;
    println!("vmfarm server listening on http://{}", running.addr);
    // Under systemd (Type=notify): ready now that it listens. Elsewhere there is no one to tell.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that the server is ready");
    }
    if running.admin_token_created {
        println!(
            "admin token written to {} (mode 0600)",
            token_path.display()
        );
    }
    running.wait().await?;
    Ok(())
}

async fn admin(config: ServerConfig, action: ServerAction) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    let db = Db::open(&config.database_url(), config.sqlite_synchronous).await?;
    match action {
        ServerAction::Token(action) => token(&db, &config, action).await?,
        ServerAction::Gc { dry_run, json } => gc(&db, &config, dry_run, json).await?,
        ServerAction::Secret(SecretAction::Set {
            name,
            user,
            share_with,
            file,
            value_stdin,
        }) => {
            let value = match (file, value_stdin) {
                (Some(path), _) => {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, true) => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the secret from stdin")?;
                    buf
                }
                (None, false) => bail!("give the value with --file F or --value-stdin"),
            };
            for who in std::iter::once(&user).chain(&share_with) {
                if vmfarm_server::users::find(&db, &config, who)
                    .await?
                    .is_none()
                {
                    bail!("there is no user `{who}`: add it with `vmfarm server user add {who}`");
                }
            }
            let key = SecretKey::load(&config.data_dir, false)?;
            let new = NewSecret {
                name: &name,
                owner: &user,
                shared_with: &share_with,
                value: &value,
            };
            secrets::set(&db, &key, &new).await?;
            println!(
                "secret {name} stored ({} bytes, sealed), owned by {user}",
                value.len()
            );
        }
        ServerAction::Secret(SecretAction::List { json }) => {
            let list = secrets::list(&db).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<24} {:<16} SHARED WITH", "NAME", "OWNER");
                for s in list {
                    println!("{:<24} {:<16} {}", s.name, s.owner, s.shared_with.join(","));
                }
            }
        }
        ServerAction::User(UserAction::Add { name, admin }) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']);
            vmfarm_server::users::add(&db, &name, password, admin).await?;
            let role = if admin { " (an admin)" } else { "" };
            println!("user {name}{role} can log in to the web UI");
        }
    }
    Ok(())
}

/// `vmfarm server gc [--dry-run] [--json]`.
async fn gc(db: &Db, config: &ServerConfig, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let now = vmfarm_server::db::now_ms();
    let retention = &config.retention;
    if !retention.is_set() && !json {
        println!(
            "no retention is configured ([retention] keep_for or max_artifact_store in the server config): no job expires"
        );
    }
    let plan = retention::plan(db, retention, now).await?;
    let verb = if dry_run { "would expire" } else { "expires" };
    let mut expiring = Vec::new();
    for e in &plan {
        if json {
            expiring.push(serde_json::json!({
                "job": e.job.to_string(), "reason": e.reason, "artifact_bytes": e.artifact_bytes,
            }));
        } else {
            println!(
                "job {} {verb}: {} ({} of artifacts)",
                e.job,
                e.reason,
                ByteSize(e.artifact_bytes)
            );
        }
    }
    let mut out = serde_json::json!({ "dry_run": dry_run, "expiring": expiring });
    let bytes: u64 = plan.iter().map(|e| e.artifact_bytes).sum();
    if dry_run {
        if !json {
            println!(
                "{} jobs would expire, {} of artifacts (dry run: nothing deleted)",
                plan.len(),
                ByteSize(bytes)
            );
        }
    } else {
        let store = ArtifactStore::open(config).await?;
        let swept = retention::sweep(db, &store, &plan, now).await?;
        if !json {
            println!(
                "{} jobs expired, {} purged, {} files no row pointed at removed",
                swept.expired, swept.purged, swept.orphans
            );
        }
        out["expired"] = swept.expired.into();
        out["purged"] = swept.purged.into();
        out["orphans"] = swept.orphans.into();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

async fn token(db: &Db, config: &ServerConfig, action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::Create {
            worker,
            name,
            scopes,
            user,
            max_priority,
        } => {
            let caller = match (worker, name, user) {
                (Some(worker), _, _) => Caller::Worker { name: worker },
                (None, Some(name), Some(user)) => Caller::Api(ApiCaller {
                    name,
                    user,
                    admin: false,
                    scopes: scopes
                        .iter()
                        .map(|s| parse_scope(s))
                        .collect::<anyhow::Result<_>>()?,
                    max_priority,
                }),
                _ => bail!(
                    "say whose token it is: --worker NAME, or --name NAME --user USER --scopes submit,read"
                ),
            };
            println!("{}", admin::create_token(db, config, &caller).await?);
        }
        TokenAction::List { json } => {
            let list = admin::list_tokens(db).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20} {:<7} {:<16} {:<18} {:<9} SOURCE",
                    "NAME", "KIND", "USER", "SCOPES", "MAX PRIO"
                );
                for t in list {
                    let (user, cap) = match t.kind.as_str() {
                        "worker" => ("-".to_owned(), "-".to_owned()),
                        _ => (
                            t.user,
                            t.max_priority.map_or("-".to_owned(), |p| p.to_string()),
                        ),
                    };
                    println!(
                        "{:<20} {:<7} {:<16} {:<18} {:<9} {}",
                        t.name, t.kind, user, t.scopes, cap, t.source
                    );
                }
            }
        }
        TokenAction::Revoke { name } => {
            let revoked = admin::revoke_token(db, &name).await?;
            println!("revoked {} token(s) named {name}", revoked.count);
            if revoked.from_config {
                println!(
                    "it is in the server's config file: remove it there too, or it comes back at the next start"
                );
            }
        }
    }
    Ok(())
}

fn parse_scope(s: &str) -> anyhow::Result<Scope> {
    let name = s.trim();
    vmfarm_server::auth::scope_by_name(name)
        .with_context(|| format!("unknown scope `{name}`: use submit, read, metrics or admin"))
}
