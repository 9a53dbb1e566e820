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

/// A notification's payload: the sending replica, then `job ID` or `work`.
fn payload(replica: &str, news: News) -> String {
    match news {
        News::Job(id) => format!("{replica} job {id}"),
        News::Work => format!("{replica} work"),
    }
}

/// The news in a payload sent by another replica than `me`; `None` for our own and for
/// anything not of ours.
fn parse(me: &str, payload: &str) -> Option<News> {
    let mut words = payload.split(' ');
    let from = words.next()?;
    if from == me {
        return None;
    }
    let news = match (words.next()?, words.next()) {
        ("job", Some(id)) => News::Job(id.parse().ok()?),
        ("work", None) => News::Work,
        _ => return None,
    };
    words.next().is_none().then_some(news)
}

/// Sends this replica's news and hears the others' for as long as the server runs.
pub fn start(db: Db, url: String, events: &Events) {
    let me = crate::random::random_hex(8).unwrap_or_else(|_| format!("{}", std::process::id()));
    let (tx, rx) = mpsc::channel(BACKLOG);
    events.send_to_replicas(tx);
    tokio::spawn(send(db, me.clone(), rx));
    tokio::spawn(hear(url, me, events.clone()));
}

/// Notifies the other replicas of each news item, those that came together once each.
async fn send(db: Db, me: String, mut rx: mpsc::Receiver<News>) {
    while let Some(first) = rx.recv().await {
        let mut batch = BTreeSet::from([first]);
        while let Ok(more) = rx.try_recv() {
            batch.insert(more);
        }
        for news in batch {
            let sent = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload(&me, news))
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
        match parse(me, notification.payload()) {
            Some(News::Job(id)) => events.job_changed_here(id),
            Some(News::Work) => events.work_here(),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_payloads_round_trip_and_our_own_are_skipped() {
        for news in [News::Job(42), News::Work] {
            assert_eq!(parse("b", &payload("a", news)), Some(news));
            assert_eq!(parse("a", &payload("a", news)), None);
        }
        for bad in [
            "a job",
            "a job x",
            "a work 1",
            "a job 1 2",
            "a",
            "",
            "a jobs 1",
        ] {
            assert_eq!(parse("b", bad), None, "{bad}");
        }
    }
}
