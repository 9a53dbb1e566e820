//! SQLite's writer: one thread owns the connection that writes, and commits the writes that
//! wait for it together (group commit). Each write runs in a savepoint of the shared
//! transaction, so a write that fails is undone alone; its caller hears back only after the
//! COMMIT, so an acknowledged write is as durable as `synchronous` makes a commit. A write's
//! statements run on the thread with their prepared statements cached: no thread round trip
//! per statement, one per write, and one commit per batch.

use super::SqliteSync;
use super::query::{DbFailure, WriteTx};
use futures_util::future::BoxFuture;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Most writes committed together: bounds how long the first of them waits.
const MAX_BATCH: usize = 128;

/// What the connection is set to besides `synchronous`: WAL, so that readers never block the
/// writer.
const PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;";

#[derive(Clone)]
pub struct SqliteWriter {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl SqliteWriter {
    /// Opens (creating) the file at `path`, its commits made durable as `sync` says, and starts
    /// the thread; it ends when the last handle is dropped.
    pub fn open(path: &str, sync: SqliteSync) -> Result<SqliteWriter, DbFailure> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(PRAGMAS)?;
        conn.execute_batch(sync.pragma())?;
        conn.set_prepared_statement_cache_capacity(256);
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("vmfarm-db-writer".into())
            .spawn(move || serve(WriteTx::Sqlite(conn), &queue))
            .map_err(DbFailure::Thread)?;
        Ok(SqliteWriter { jobs })
    }

    /// Runs `op` in the next transaction; its result once that transaction has committed.
    pub async fn write<T, E, F>(&self, op: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbFailure> + Send + 'static,
        F: for<'t> FnOnce(&'t mut WriteTx) -> BoxFuture<'t, Result<T, E>> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Queued {
            op: Some(op),
            outcome: None,
            reply,
        };
        self.jobs
            .send(Box::new(job))
            .map_err(|_| DbFailure::WriterGone)?;
        answer.await.map_err(|_| DbFailure::WriterGone)?
    }
}

/// A write waiting in the queue, type-erased for the thread.
trait Job: Send {
    /// Runs the write in the open transaction; false when it failed and must be undone.
    fn run(&mut self, tx: &mut WriteTx) -> bool;
    /// Answers the caller once the transaction has ended: committed, or `failure`.
    fn answer(self: Box<Self>, failure: Option<&Arc<DbFailure>>);
}

struct Queued<T, E, F> {
    op: Option<F>,
    outcome: Option<Result<T, E>>,
    reply: tokio::sync::oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> Job for Queued<T, E, F>
where
    T: Send,
    E: From<DbFailure> + Send,
    F: for<'t> FnOnce(&'t mut WriteTx) -> BoxFuture<'t, Result<T, E>> + Send,
{
    fn run(&mut self, tx: &mut WriteTx) -> bool {
        let Some(op) = self.op.take() else {
            return false;
        };
        // Every statement of a SQLite write completes at once, so one poll finishes it.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            match op(tx)
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => Err(DbFailure::NotReady.into()),
            }
        }))
        .unwrap_or_else(|_| Err(DbFailure::Panicked.into()));
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn answer(self: Box<Self>, failure: Option<&Arc<DbFailure>>) {
        let result = match (failure, self.outcome) {
            (None, Some(outcome)) => outcome,
            // A write that failed by itself says why, whatever became of the others.
            (Some(_), Some(Err(own))) => Err(own),
            (Some(failure), _) => Err(DbFailure::Batch(failure.clone()).into()),
            (None, None) => Err(DbFailure::NotReady.into()),
        };
        // A caller that gave up is not waiting for the answer.
        let _ = self.reply.send(result);
    }
}

fn serve(mut tx: WriteTx, queue: &mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        let failure = run_batch(&mut tx, &mut batch).err().map(Arc::new);
        if let Some(failure) = &failure {
            tracing::error!(error = %failure, writes = batch.len(), "a write transaction failed");
        }
        for job in batch {
            job.answer(failure.as_ref());
        }
    }
}

/// One transaction for the whole batch, a savepoint for each write.
fn run_batch(tx: &mut WriteTx, batch: &mut [Box<dyn Job>]) -> Result<(), DbFailure> {
    control(tx, "BEGIN IMMEDIATE")?;
    let done = run_jobs(tx, batch).and_then(|()| control(tx, "COMMIT"));
    if done.is_err() && !autocommit(tx) {
        // Nothing of the batch is kept; the connection is ready for the next one.
        let _ = control(tx, "ROLLBACK");
    }
    done
}

fn run_jobs(tx: &mut WriteTx, batch: &mut [Box<dyn Job>]) -> Result<(), DbFailure> {
    for job in batch {
        control(tx, "SAVEPOINT write")?;
        if job.run(tx) {
            control(tx, "RELEASE write")?;
        } else if autocommit(tx) {
            // Some errors (a full disk, I/O) make SQLite roll the whole transaction back.
            return Err(DbFailure::RolledBack);
        } else {
            control(tx, "ROLLBACK TO write")?;
            control(tx, "RELEASE write")?;
        }
    }
    Ok(())
}

/// The writer's own statements: transaction and savepoint control.
fn control(tx: &WriteTx, sql: &str) -> Result<(), DbFailure> {
    connection(tx).prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn autocommit(tx: &WriteTx) -> bool {
    connection(tx).is_autocommit()
}

fn connection(tx: &WriteTx) -> &rusqlite::Connection {
    match tx {
        WriteTx::Sqlite(conn) => conn,
        WriteTx::Postgres(_) => unreachable!("the SQLite writer is only given a SQLite connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Query;

    async fn insert(writer: &SqliteWriter, id: i64) -> Result<u64, DbFailure> {
        writer
            .write(move |tx| {
                Box::pin(async move {
                    tx.execute("INSERT INTO t (id) VALUES ($1)", &[id.into()])
                        .await
                })
            })
            .await
    }

    async fn ids(writer: &SqliteWriter) -> Vec<i64> {
        writer
            .write(|tx| {
                Box::pin(async move {
                    let rows = tx.fetch_all("SELECT id FROM t ORDER BY id", &[]).await?;
                    rows.iter().map(|r| r.int(0)).collect()
                })
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn test_a_failed_write_among_many_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db").display().to_string();
        let writer = SqliteWriter::open(&path, SqliteSync::Full).unwrap();
        writer
            .write(|tx| {
                Box::pin(async move {
                    tx.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)", &[])
                        .await
                })
            })
            .await
            .unwrap();
        // Many writes at once share transactions; id 7 is written twice, so one of them fails.
        let results =
            futures_util::future::join_all((0..50).chain([7]).map(|id| insert(&writer, id))).await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        // A write that fails half-way leaves nothing behind.
        let half: Result<(), DbFailure> = writer
            .write(|tx| {
                Box::pin(async move {
                    tx.execute("INSERT INTO t (id) VALUES (100)", &[]).await?;
                    tx.execute("INSERT INTO t (id) VALUES (1)", &[]).await?;
                    Ok(())
                })
            })
            .await;
        assert!(half.is_err());
        assert_eq!(ids(&writer).await, (0..50).collect::<Vec<_>>());
        // What was acknowledged is in the file, for any other connection to read.
        let other = rusqlite::Connection::open(&path).unwrap();
        let count: i64 = other
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 50);
    }

    #[tokio::test]
    async fn test_a_panicking_write_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let writer = SqliteWriter::open(
            &dir.path().join("w.db").display().to_string(),
            SqliteSync::Full,
        )
        .unwrap();
        let panicked: Result<(), DbFailure> = writer
            .write(|_| Box::pin(async move { panic!("a bug in a write") }))
            .await;
        assert!(matches!(panicked, Err(DbFailure::Panicked)));
        let after: Result<u64, DbFailure> = writer
            .write(|tx| {
                Box::pin(async move { tx.execute("CREATE TABLE t (id INTEGER)", &[]).await })
            })
            .await;
        assert!(after.is_ok());
    }
}
