//! Server replicas on one PostgreSQL hear each other's news through `LISTEN`/`NOTIFY`: a job's
//! new log lines or state (for live-log readers and heartbeats on another replica) and new work
//! (for workers long-polling another replica). Each replica sends what happens through it on
//! [`CHANNEL`] and passes on what the others send to its own in-process [`Events`]; its own
//! notifications come back to it and are skipped. Readers still look again every second, so a
//! lost connection delays news, and loses none.

use crate::db::Db;
use crate::state::{Events, News};
use sqlx::postgres::PgListener;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc;

/// The PostgreSQL notification channel of a farm's replicas.
pub const CHANNEL: &str = "vmfarm_events";

/// News waiting to be sent, at most: past it a replica drops news (readers poll anyway).
pub const BACKLOG: usize = 4096;

/// Most bytes of news in one notification (PostgreSQL takes up to 8000).
const MAX_PAYLOAD: usize = 7000;

/// The notifications' payloads for `news`: the sending replica, then words `jID` (job ID
/// changed) and `w` (new work), as many as fit.
fn payloads(replica: &str, news: &BTreeSet<News>) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = replica.to_owned();
    for item in news {
        let word = match item {
            News::Job(id) => format!("j{id}"),
            News::Work => "w".to_owned(),
        };
        if current.len() + 1 + word.len() > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut current, replica.to_owned()));
        }
        current.push(' ');
        current.push_str(&word);
    }
    if current.len() > replica.len() {
        out.push(current);
    }
    out
}

/// The news in a payload sent by another replica than `me`: none for our own, and none of
/// words that are not ours.
fn parse(me: &str, payload: &str) -> Vec<News> {
    let mut words = payload.split(' ');
    if words.next().is_none_or(|from| from == me) {
        return Vec::new();
    }
    words
        .filter_map(|word| match word.split_at_checked(1)? {
            ("w", "") => Some(News::Work),
            ("j", id) => id.parse().ok().map(News::Job),
            _ => None,
        })
        .collect()
}

/// Sends this replica's news and hears the others' for as long as the server runs.
pub fn start(db: Db, url: String, events: &Events) {
    let me = crate::random::random_hex(8).unwrap_or_else(|_| format!("{}", std::process::id()));
    let (tx, rx) = mpsc::channel(BACKLOG);
    events.send_to_replicas(tx);
    tokio::spawn(send(db, me.clone(), rx));
    tokio::spawn(hear(url, me, events.clone()));
}

/// Notifies the other replicas: what came while the last notification was sent goes in one
/// (a busy replica sends one statement at a time, not one per log append).
async fn send(db: Db, me: String, mut rx: mpsc::Receiver<News>) {
    while let Some(first) = rx.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(more) = rx.try_recv() {
            batch.insert(more);
        }
        for payload in payloads(&me, &batch) {
            let sent = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(db.pool())
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot notify the other replicas; they will see it at their next look");
            }
        }
    }
}

/// Listens on [`CHANNEL`], connecting again a second after a failure.
async fn hear(url: String, me: String, events: Events) {
    loop {
        if let Err(e) = listen(&url, &me, &events).await {
            tracing::warn!(error = %e, "not hearing the other replicas; listening again in 1s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen(url: &str, me: &str, events: &Events) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    loop {
        let notification = listener.recv().await?;
        for news in parse(me, notification.payload()) {
            match news {
                News::Job(id) => events.job_changed_here(id),
                News::Work => events.work_here(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_payloads_round_trip_and_our_own_are_skipped() {
        let news: BTreeSet<News> = (0..3000).map(News::Job).chain([News::Work]).collect();
        let sent = payloads("a", &news);
        assert!(sent.len() > 1, "split: {}", sent.len());
        assert!(sent.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let heard: BTreeSet<News> = sent.iter().flat_map(|p| parse("b", p)).collect();
        assert_eq!(heard, news);
        assert!(sent.iter().all(|p| parse("a", p).is_empty()));
        assert!(payloads("a", &BTreeSet::new()).is_empty());
        for (bad, want) in [
            ("a jx w", vec![News::Work]),
            ("a j12 x j 7", vec![News::Job(12)]),
            ("a wj1", vec![]),
            ("", vec![]),
        ] {
            assert_eq!(parse("b", bad), want, "{bad}");
        }
    }
}
