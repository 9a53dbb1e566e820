//! Repeated failed logins, per user name and per address (the connection's: behind a reverse
//! proxy, the proxy's, so one client's failures lock out everyone's web logins through it), are
//! slowed down and then refused for a while. Kept in the database, so that every replica counts
//! the same failures.

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
    /// The address first (a locked address counts nothing more), then the user name when it
    /// can be one (`users::check_name`: at most 64 characters), so that what a request sends
    /// does not size the rows it writes.
    pub fn new(user: &str, addr: Option<IpAddr>) -> Keys {
        let mut keys = Vec::new();
        if let Some(addr) = addr {
            keys.push(format!("addr:{addr}"));
        }
        if crate::users::check_name(user).is_ok() {
            keys.push(format!("user:{user}"));
        }
        Keys(keys)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What a login attempt may do.
pub enum Attempt {
    /// Check the password; on a failure, hold the answer back this long.
    Allowed { delay_on_failure: Duration },
    /// Refused without a check until this time (unix ms).
    Locked { until: i64 },
}

/// Counts a login attempt under `keys` at `now`, before its password is checked (a success
/// forgives it: [`succeeded`]). Past `failed_logins_before_lock` attempts within
/// `login_lock_for` under any key, the attempt is refused until that window ends.
pub async fn attempt(db: &Db, web: &Web, keys: &Keys, now: i64) -> Result<Attempt, DbFailure> {
    let window = millis(web.login_lock_for.0);
    let lock_after = i64::from(web.failed_logins_before_lock.max(1));
    let keys = keys.0.clone();
    let counts = db
        .write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "DELETE FROM login_failures WHERE first_at <= $1",
                    &[(now - window).into()],
                )
                .await?;
                let mut counts = Vec::with_capacity(keys.len());
                for key in &keys {
                    let row = tx
                        .fetch_optional(
                            "INSERT INTO login_failures (key, failures, first_at) VALUES ($1, 1, $2) \
                             ON CONFLICT (key) DO UPDATE SET \
                             failures = CASE WHEN login_failures.first_at > $3 \
                                        THEN login_failures.failures + 1 ELSE 1 END, \
                             first_at = CASE WHEN login_failures.first_at > $3 \
                                        THEN login_failures.first_at ELSE $2 END \
                             RETURNING failures, first_at",
                            &[key.into(), now.into(), (now - window).into()],
                        )
                        .await?;
                    if let Some(row) = row {
                        let (count, first_at) = (row.int(0)?, row.int(1)?);
                        counts.push((count, first_at));
                        if count > lock_after {
                            break; // locked: the later keys are not counted
                        }
                    }
                }
                Ok::<_, DbFailure>(counts)
            })
        })
        .await?;
    if let Some(until) = counts
        .iter()
        .filter(|(count, _)| *count > lock_after)
        .map(|(_, first_at)| first_at + window)
        .max()
    {
        return Ok(Attempt::Locked { until });
    }
    let worst = counts.iter().map(|(count, _)| *count).max().unwrap_or(0);
    let slowed = u32::try_from((worst - FREE_FAILURES).max(0)).unwrap_or(u32::MAX);
    Ok(Attempt::Allowed {
        delay_on_failure: (DELAY_STEP * slowed).min(MAX_DELAY),
    })
}

/// A login under `keys` succeeded: their attempts are forgiven.
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
