//! Repeated failed logins, per user name and per address, are slowed down and then refused for
//! a while. Kept in the database, so that every replica counts the same failures.

use crate::config::Web;
use crate::db::{Db, DbFailure, Query};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The address a request came from (its connection's peer), when the server knows it.
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state).await;
        Ok(Peer(peer.ok().map(|ConnectInfo(addr)| addr.ip())))
    }
}

/// Failures that cost no delay.
const FREE_FAILURES: i64 = 2;
/// The delay added per failure past those, and its cap.
const DELAY_STEP: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// What a login attempt is counted under: its user name (if any) and the caller's address.
pub struct Keys(Vec<String>);

impl Keys {
    pub fn new(user: &str, addr: Option<IpAddr>) -> Keys {
        let mut keys = Vec::new();
        if !user.is_empty() {
            keys.push(format!("user:{user}"));
        }
        if let Some(addr) = addr {
            keys.push(format!("addr:{addr}"));
        }
        Keys(keys)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Until when (unix ms) logins under `keys` are refused, if any is locked at `now`.
pub async fn locked_until(db: &Db, keys: &Keys, now: i64) -> Result<Option<i64>, DbFailure> {
    let mut until = None;
    for key in &keys.0 {
        let row = db
            .read()
            .fetch_optional(
                "SELECT locked_until FROM login_failures WHERE key = $1",
                &[key.as_str().into()],
            )
            .await?;
        if let Some(row) = row {
            let locked = row.int(0)?;
            if locked > now {
                until = Some(until.map_or(locked, |u: i64| u.max(locked)));
            }
        }
    }
    Ok(until)
}

/// Counts a failed login under `keys` at `now` (locking a key at the configured count); how
/// long to hold the answer back.
pub async fn failed(db: &Db, web: &Web, keys: &Keys, now: i64) -> Result<Duration, DbFailure> {
    let window = millis(web.login_lock_for.0);
    let lock_after = i64::from(web.failed_logins_before_lock.max(1));
    let keys = keys.0.clone();
    let worst = db
        .write(move |tx| {
            Box::pin(async move {
                let mut worst = 0;
                for key in &keys {
                    let row = tx
                        .fetch_optional(
                            "SELECT failures, first_at FROM login_failures WHERE key = $1",
                            &[key.into()],
                        )
                        .await?;
                    let failures = match row {
                        Some(row) if row.int(1)? > now - window => row.int(0)? + 1,
                        _ => 1,
                    };
                    let locked = if failures >= lock_after {
                        now + window
                    } else {
                        0
                    };
                    tx.execute(
                        "INSERT INTO login_failures (key, failures, first_at, locked_until) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE SET \
                         failures = excluded.failures, locked_until = excluded.locked_until, \
                         first_at = CASE WHEN excluded.failures = 1 THEN excluded.first_at \
                         ELSE login_failures.first_at END",
                        &[key.into(), failures.into(), now.into(), locked.into()],
                    )
                    .await?;
                    worst = worst.max(failures);
                }
                Ok::<_, DbFailure>(worst)
            })
        })
        .await?;
    let slowed = u32::try_from((worst - FREE_FAILURES).max(0)).unwrap_or(u32::MAX);
    Ok((DELAY_STEP * slowed).min(MAX_DELAY))
}

/// A login under `keys` succeeded: their failures are forgiven.
pub async fn succeeded(db: &Db, keys: &Keys) -> Result<(), DbFailure> {
    for key in &keys.0 {
        db.execute(
            "DELETE FROM login_failures WHERE key = $1",
            &[key.as_str().into()],
        )
        .await?;
    }
    Ok(())
}
