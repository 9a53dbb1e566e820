//! `vmfarm server`: run the server, or administer its database (tokens, secrets).

use crate::cli::{SecretAction, ServerAction, ServerArgs, TokenAction, UserAction};
use anyhow::{Context, bail};
use std::io::Read;
use vmfarm_server::auth::Caller;
use vmfarm_server::config::{Scope, ServerConfig};
use vmfarm_server::db::Db;

/// The config file (or the defaults) with the flags laid over it.
pub fn load_config(args: &ServerArgs) -> anyhow::Result<ServerConfig> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
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
        ServerAction::Token(TokenAction::Create {
            worker,
            name,
            scopes,
        }) => {
            let caller = match (worker, name) {
                (Some(worker), _) => Caller::Worker { name: worker },
                (None, Some(name)) => Caller::Api {
                    name,
                    scopes: scopes
                        .iter()
                        .map(|s| parse_scope(s))
                        .collect::<anyhow::Result<_>>()?,
                },
                (None, None) => bail!(
                    "say whose token it is: --worker NAME, or --name NAME --scopes submit,read"
                ),
            };
            println!(
                "{}",
                vmfarm_server::admin::create_token(&db, &caller).await?
            );
        }
        ServerAction::Secret(SecretAction::Set {
            name,
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
            vmfarm_server::admin::set_secret(&db, &name, &value).await?;
            println!("secret {name} stored ({} bytes)", value.len());
        }
        ServerAction::User(UserAction::Add { name }) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']);
            vmfarm_server::web::session::add_user(&db, &name, password).await?;
            println!("user {name} can log in to the web UI");
        }
    }
    Ok(())
}

fn parse_scope(s: &str) -> anyhow::Result<Scope> {
    match s.trim() {
        "submit" => Ok(Scope::Submit),
        "read" => Ok(Scope::Read),
        "admin" => Ok(Scope::Admin),
        other => bail!("unknown scope `{other}`: use submit, read or admin"),
    }
}
