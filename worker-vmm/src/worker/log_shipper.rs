//! A job's log on its way to the server: chunks from the console, the tasks and the farm are
//! batched (flushed at least every 100 ms), masked of secrets (see [`super::log_masker`]),
//! numbered and sent in order, each batch retried until the server has it.

use super::log_masker::{Masker, StreamKey};
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use vmfarm_proto::wire::{LogAppend, LogChunk, LogStream};

/// Longest a chunk waits before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A batch is sent early once it holds this many bytes.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Bytes of the job's log that may wait for the server at once. A guest that writes faster
/// than its log is shipped waits for room (its output is held back), rather than growing the
/// worker's memory.
pub const BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// Room kept under the server's log limit for the farm's own lines after the guest's output
/// was cut.
const FARM_RESERVE: u64 = 64 * 1024;

/// Bytes of one stream as they were read.
struct Piece {
    key: StreamKey,
    ts_ms: i64,
    data: Vec<u8>,
    /// Its room in the buffer, given back once the piece is shipped.
    _room: Option<OwnedSemaphorePermit>,
}

/// How much of the guest's output the job keeps.
struct Kept {
    limit: u64,
    used: AtomicU64,
}

/// Where a job's parts write their log. Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::UnboundedSender<Piece>,
    room: Arc<Semaphore>,
    kept: Arc<Kept>,
}

impl LogSink {
    /// Queues output of the guest's once there is room for it: a writer faster than the
    /// shipping waits here. Past the job's log limit, output is dropped after one farm line
    /// that says where the log was cut.
    pub async fn write(&self, stream: LogStream, task: Option<&str>, data: &[u8]) {
        let (kept, cut) = self.keep(data);
        if !kept.is_empty() {
            let wanted = u32::try_from(kept.len().min(BUFFERED_BYTES)).unwrap_or(u32::MAX);
            // The semaphore is never closed while a sink exists.
            if let Ok(room) = self.room.clone().acquire_many_owned(wanted).await {
                self.send(stream, task, kept, Some(room));
            }
        }
        if cut {
            self.say_cut();
        }
    }

    /// Queues output of the guest's without waiting: the console before the agent is ready
    /// (the image's own boot, bounded by the boot timeout). Held to the log limit like the rest.
    pub fn write_now(&self, stream: LogStream, task: Option<&str>, data: &[u8]) {
        let (kept, cut) = self.keep(data);
        self.send(stream, task, kept, None);
        if cut {
            self.say_cut();
        }
    }

    /// A line of the farm's own (`[vmfarm] ...`), never held back or cut by the worker.
    pub fn farm(&self, line: &str) {
        let data = format!("[vmfarm] {line}\n");
        self.send(LogStream::Farm, None, data.as_bytes(), None);
    }

    /// The part of `data` the log keeps, and whether the log is cut right after it (true once,
    /// for the write that reaches the limit).
    fn keep<'d>(&self, data: &'d [u8]) -> (&'d [u8], bool) {
        if data.is_empty() {
            return (data, false);
        }
        let len = data.len() as u64;
        let before = self.kept.used.fetch_add(len, Ordering::SeqCst);
        let left = self.kept.limit.saturating_sub(before);
        if left >= len {
            return (data, false);
        }
        let cut = left > 0 || before == self.kept.limit;
        (&data[..usize::try_from(left).unwrap_or(0)], cut)
    }

    fn say_cut(&self) {
        self.farm(&format!(
            "the log is cut here: the guest's output reached {}, the most this job keeps; \
             the job goes on, its later output is not kept",
            vmfarm_proto::units::ByteSize(self.kept.limit)
        ));
    }

    fn send(
        &self,
        stream: LogStream,
        task: Option<&str>,
        data: &[u8],
        room: Option<OwnedSemaphorePermit>,
    ) {
        if data.is_empty() {
            return;
        }
        // After the shipper has stopped (lease lost) nothing more is wanted.
        let _ = self.tx.send(Piece {
            key: (stream, task.map(str::to_owned)),
            ts_ms: now_ms(),
            data: data.to_vec(),
            _room: room,
        });
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Starts shipping a log of at most `max_bytes` (the server's limit); the returned task ends
/// when every sink is dropped and all is sent, or with the first error that is final (a lost
/// lease, or a batch the server refused).
pub fn start(
    client: ServerClient,
    lease: LeaseHandle,
    secrets: Vec<Vec<u8>>,
    max_bytes: u64,
) -> (LogSink, tokio::task::JoinHandle<Result<(), ServerError>>) {
    let (sink, rx) = sink(max_bytes);
    (sink, tokio::spawn(ship(client, lease, secrets, rx)))
}

/// A sink for a log of at most `max_bytes`, and where its pieces arrive.
fn sink(max_bytes: u64) -> (LogSink, mpsc::UnboundedReceiver<Piece>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = LogSink {
        tx,
        room: Arc::new(Semaphore::new(BUFFERED_BYTES)),
        kept: Arc::new(Kept {
            limit: max_bytes.saturating_sub(FARM_RESERVE),
            used: AtomicU64::new(0),
        }),
    };
    (sink, rx)
}

async fn ship(
    client: ServerClient,
    lease: LeaseHandle,
    secrets: Vec<Vec<u8>>,
    mut rx: mpsc::UnboundedReceiver<Piece>,
) -> Result<(), ServerError> {
    let mut masker = Masker::new(secrets);
    let mut seq = 0u64;
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        let mut bytes = batch[0].data.len();
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while bytes < BATCH_BYTES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(piece)) => {
                    bytes += piece.data.len();
                    batch.push(piece);
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let mut chunks = Vec::with_capacity(batch.len());
        for piece in batch {
            if piece.key.0 != LogStream::Console {
                for (key, text) in masker.finish_tasks_other_than(&piece.key) {
                    chunks.push(chunk(key, piece.ts_ms, text));
                }
            }
            let text = masker.push(&piece.key, &piece.data);
            chunks.push(chunk(piece.key, piece.ts_ms, text));
        }
        if !open {
            let ts_ms = now_ms();
            for (key, text) in masker.finish() {
                chunks.push(chunk(key, ts_ms, text));
            }
        }
        let chunks = merge(chunks.into_iter().filter(|c| !c.data.is_empty()).collect());
        if chunks.is_empty() {
            continue;
        }
        seq += 1;
        client.log(&lease, &LogAppend { seq, chunks }).await?;
    }
    Ok(())
}

fn chunk((stream, task): StreamKey, ts_ms: i64, data: String) -> LogChunk {
    LogChunk {
        stream,
        task,
        ts_ms,
        data,
    }
}

/// Joins neighbouring chunks of the same stream and task, keeping the first timestamp.
fn merge(batch: Vec<LogChunk>) -> Vec<LogChunk> {
    let mut out: Vec<LogChunk> = Vec::with_capacity(batch.len());
    for chunk in batch {
        match out.last_mut() {
            Some(last) if last.stream == chunk.stream && last.task == chunk.task => {
                last.data.push_str(&chunk.data)
            }
            _ => out.push(chunk),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(rx: &mut mpsc::UnboundedReceiver<Piece>) -> Vec<(LogStream, String)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| (p.key.0, String::from_utf8_lossy(&p.data).into_owned()))
            .collect()
    }

    #[tokio::test]
    async fn test_a_writer_faster_than_the_shipping_waits_for_room() {
        let (log, mut rx) = sink(1 << 30);
        let block = vec![b'y'; BUFFERED_BYTES / 4];
        for _ in 0..4 {
            log.write(LogStream::Task, Some("t"), &block).await;
        }
        let next = log.write(LogStream::Task, Some("t"), b"more\n");
        tokio::pin!(next);
        assert!(
            futures_util::poll!(&mut next).is_pending(),
            "the buffer is full"
        );
        // The farm's own lines are never held back.
        log.farm("still said");
        drop(rx.recv().await);
        next.await;
        let rest = texts(&mut rx);
        assert_eq!(rest.len(), 5);
        assert_eq!(rest[3], (LogStream::Farm, "[vmfarm] still said\n".into()));
        assert_eq!(rest[4], (LogStream::Task, "more\n".into()));
    }

    #[tokio::test]
    async fn test_the_log_is_cut_once_at_its_limit() {
        let (log, mut rx) = sink(FARM_RESERVE + 10);
        log.write(LogStream::Task, Some("t"), b"12345678").await;
        log.write(LogStream::Task, Some("t"), b"abcdef").await;
        log.write(LogStream::Task, Some("t"), b"dropped").await;
        log.write_now(LogStream::Console, None, b"dropped too");
        log.farm("after the cut");
        let got = texts(&mut rx);
        assert_eq!(got[0], (LogStream::Task, "12345678".into()));
        assert_eq!(got[1], (LogStream::Task, "ab".into()));
        assert_eq!(got[2].0, LogStream::Farm);
        assert!(got[2].1.contains("the log is cut here"), "{got:?}");
        assert_eq!(got[3], (LogStream::Farm, "[vmfarm] after the cut\n".into()));
        assert_eq!(got.len(), 4, "{got:?}");
    }

    fn chunk(stream: LogStream, task: Option<&str>, data: &str) -> LogChunk {
        LogChunk {
            stream,
            task: task.map(str::to_owned),
            ts_ms: 1,
            data: data.into(),
        }
    }

    #[test]
    fn test_merge_keeps_order_and_streams_apart() {
        let merged = merge(vec![
            chunk(LogStream::Console, None, "a"),
            chunk(LogStream::Console, None, "b"),
            chunk(LogStream::Task, Some("t"), "c"),
            chunk(LogStream::Task, Some("u"), "d"),
            chunk(LogStream::Task, Some("u"), "e"),
            chunk(LogStream::Console, None, "f"),
        ]);
        let got: Vec<_> = merged
            .iter()
            .map(|c| (c.stream, c.task.as_deref(), c.data.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (LogStream::Console, None, "ab"),
                (LogStream::Task, Some("t"), "c"),
                (LogStream::Task, Some("u"), "de"),
                (LogStream::Console, None, "f"),
            ]
        );
    }
}
