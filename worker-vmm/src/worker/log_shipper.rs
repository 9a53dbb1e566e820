//! A job's log on its way to the server: chunks from the console, the tasks and the farm are
//! batched (flushed at least every 100 ms), numbered, masked of secrets and sent in order,
//! each batch retried until the server has it.

use super::server_client::{LeaseHandle, ServerClient, ServerError};
use std::time::Duration;
use tokio::sync::mpsc;
use vmfarm_proto::wire::{LogAppend, LogChunk, LogStream};

/// Longest a chunk waits before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A batch is sent early once it holds this many bytes.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Where a job's parts write their log. Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::UnboundedSender<LogChunk>,
}

impl LogSink {
    pub fn write(&self, stream: LogStream, task: Option<&str>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // After the shipper has stopped (lease lost) nothing more is wanted.
        let _ = self.tx.send(LogChunk {
            stream,
            task: task.map(str::to_owned),
            ts_ms: now_ms(),
            data: String::from_utf8_lossy(data).into_owned(),
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

/// Replaces every secret value in `text` with `***`.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

/// Starts shipping; the returned task ends when every sink is dropped and all is sent, or with
/// the first error that is final (a lost lease).
pub fn start(
    client: ServerClient,
    lease: LeaseHandle,
    secrets: Vec<String>,
) -> (LogSink, tokio::task::JoinHandle<Result<(), ServerError>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(ship(client, lease, secrets, rx));
    (LogSink { tx }, task)
}

async fn ship(
    client: ServerClient,
    lease: LeaseHandle,
    secrets: Vec<String>,
    mut rx: mpsc::UnboundedReceiver<LogChunk>,
) -> Result<(), ServerError> {
    let mut seq = 0u64;
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        let mut bytes = batch[0].data.len();
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while bytes < BATCH_BYTES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(chunk)) => {
                    bytes += chunk.data.len();
                    batch.push(chunk);
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        seq += 1;
        let chunks = merge(batch)
            .into_iter()
            .map(|mut c| {
                c.data = mask(&c.data, &secrets);
                c
            })
            .collect();
        client.log(&lease, &LogAppend { seq, chunks }).await?;
    }
    Ok(())
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

    #[test]
    fn test_mask_hides_every_secret() {
        let secrets = vec!["hunter2".to_owned(), "tok".to_owned(), String::new()];
        assert_eq!(mask("pw=hunter2 tok tok", &secrets), "pw=*** *** ***");
        assert_eq!(mask("nothing here", &secrets), "nothing here");
    }
}
