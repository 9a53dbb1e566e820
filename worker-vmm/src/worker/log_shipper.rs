//! A job's log on its way to the server: chunks from the console, the tasks and the farm are
//! batched (flushed at least every 100 ms), masked of secrets (see [`super::log_masker`]),
//! numbered and sent in order, each batch retried until the server has it.

use super::log_masker::{Masker, StreamKey};
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use std::time::Duration;
use tokio::sync::mpsc;
use vmfarm_proto::wire::{LogAppend, LogChunk, LogStream};

/// Longest a chunk waits before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A batch is sent early once it holds this many bytes.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Bytes of one stream as they were read.
struct Piece {
    key: StreamKey,
    ts_ms: i64,
    data: Vec<u8>,
}

/// Where a job's parts write their log. Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::UnboundedSender<Piece>,
}

impl LogSink {
    pub fn write(&self, stream: LogStream, task: Option<&str>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // After the shipper has stopped (lease lost) nothing more is wanted.
        let _ = self.tx.send(Piece {
            key: (stream, task.map(str::to_owned)),
            ts_ms: now_ms(),
            data: data.to_vec(),
        });
    }

    /// A line of the farm's own (`[vmfarm] ...`).
    pub fn farm(&self, line: &str) {
        self.write(
            LogStream::Farm,
            None,
            format!("[vmfarm] {line}\n").as_bytes(),
        );
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Starts shipping; the returned task ends when every sink is dropped and all is sent, or with
/// the first error that is final (a lost lease).
pub fn start(
    client: ServerClient,
    lease: LeaseHandle,
    secrets: Vec<Vec<u8>>,
) -> (LogSink, tokio::task::JoinHandle<Result<(), ServerError>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(ship(client, lease, secrets, rx));
    (LogSink { tx }, task)
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
