//! A job's log: chunks appended by its worker (deduplicated by sequence number), read whole,
//! from a byte offset, or live.

use crate::db::{Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::fence::{LeaseCall, live_job, refusal};
use crate::state::AppState;
use serde::Serialize;
use vmfarm_proto::JobState;
use vmfarm_proto::wire::{LogAppend, LogStream};

/// Most chunks in one append call.
pub const MAX_CHUNKS: usize = 1024;

/// A stored chunk, at its byte offset in the job's log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoredChunk {
    pub offset: i64,
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub ts_ms: i64,
    pub data: String,
}

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Console => "console",
        LogStream::Task => "task",
        LogStream::Farm => "farm",
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct AppendAck {
    pub seq: u64,
    /// False when `seq` had been stored already (a retry).
    pub stored: bool,
    pub log_size: i64,
}

/// Stores a worker's append under its lease.
pub async fn append(
    state: &AppState,
    call: &LeaseCall,
    append: &LogAppend,
) -> AppResult<AppendAck> {
    if append.chunks.len() > MAX_CHUNKS {
        return Err(AppError::BadRequest(format!(
            "{} chunks in one call; the limit is {MAX_CHUNKS}",
            append.chunks.len()
        )));
    }
    for chunk in &append.chunks {
        if chunk.task.as_ref().is_some_and(|t| t.len() > 64) {
            return Err(AppError::BadRequest(
                "a chunk's task name is longer than 64 bytes".into(),
            ));
        }
    }
    let seq =
        i64::try_from(append.seq).map_err(|_| AppError::BadRequest("seq is too large".into()))?;
    if seq < 1 {
        return Err(AppError::BadRequest("seq starts at 1".into()));
    }
    let limit = i64::try_from(state.config.limits.max_log_size.0).unwrap_or(i64::MAX);
    let cut_note = format!(
        "\n[vmfarm: log cut at the server's limit of {}]\n",
        state.config.limits.max_log_size
    );
    let call = call.clone();
    let append = append.clone();
    let (job_id, ack) = state
        .db
        .write(move |tx| {
            Box::pin(async move {
                let job_id = live_job(tx, &call).await?.id;
                let ack = store_chunks(tx, job_id, &call, &append, seq, limit, &cut_note).await?;
                Ok::<_, AppError>((job_id, ack))
            })
        })
        .await?;
    if ack.stored {
        state.events.job_changed(job_id);
    }
    Ok(ack)
}

/// Stores the chunks of append `seq` of a live lease's job, up to the log size `limit` (then
/// `cut_note` says so), unless that `seq` was stored already.
async fn store_chunks(
    tx: &mut WriteTx,
    job_id: i64,
    call: &LeaseCall,
    append: &LogAppend,
    seq: i64,
    limit: i64,
    cut_note: &str,
) -> AppResult<AppendAck> {
    let row = tx
        .fetch_optional(
            "UPDATE jobs SET log_seq = $1 WHERE id = $2 AND lease_id = $3 AND fence = $4 AND log_seq = $5 \
             RETURNING log_size",
            &[
                seq.into(),
                job_id.into(),
                (&call.lease_id).into(),
                call.fence.into(),
                (seq - 1).into(),
            ],
        )
        .await?;
    let Some(row) = row else {
        let current = tx
            .fetch_optional(
                "SELECT log_seq, log_size FROM jobs WHERE id = $1 AND lease_id = $2 AND fence = $3",
                &[job_id.into(), (&call.lease_id).into(), call.fence.into()],
            )
            .await?;
        let Some(current) = current else {
            return Err(refusal(tx, call).await);
        };
        let (last, log_size) = (current.int(0)?, current.int(1)?);
        return if seq <= last {
            Ok(AppendAck {
                seq: append.seq,
                stored: false,
                log_size,
            })
        } else {
            Err(AppError::Conflict(format!(
                "seq {seq} skips ahead: the next one expected is {}",
                last + 1
            )))
        };
    };
    let mut size = row.int(0)?;
    for chunk in &append.chunks {
        if size >= limit || chunk.data.is_empty() {
            continue;
        }
        let mut data = chunk.data.as_str();
        let mut truncated = false;
        if size + data.len() as i64 > limit {
            let mut cut = usize::try_from(limit - size).unwrap_or(0);
            while !data.is_char_boundary(cut) {
                cut -= 1;
            }
            data = &data[..cut];
            truncated = true;
        }
        let stored = Chunk {
            offset: size,
            stream: stream_name(chunk.stream),
            task: chunk.task.as_deref(),
            ts_ms: chunk.ts_ms,
            data,
        };
        stored.insert(tx, job_id).await?;
        size += data.len() as i64;
        if truncated {
            let note = Chunk {
                offset: size,
                stream: "farm",
                task: None,
                ts_ms: now_ms(),
                data: cut_note,
            };
            note.insert(tx, job_id).await?;
            size += cut_note.len() as i64;
        }
    }
    tx.execute(
        "UPDATE jobs SET log_size = $1 WHERE id = $2",
        &[size.into(), job_id.into()],
    )
    .await?;
    Ok(AppendAck {
        seq: append.seq,
        stored: true,
        log_size: size,
    })
}

/// A chunk about to be stored at `offset` of its job's log.
struct Chunk<'a> {
    offset: i64,
    stream: &'a str,
    task: Option<&'a str>,
    ts_ms: i64,
    data: &'a str,
}

impl Chunk<'_> {
    async fn insert(&self, tx: &mut WriteTx, job_id: i64) -> AppResult<()> {
        tx.execute(
            "INSERT INTO log_chunks (job_id, off, stream, task, ts_ms, len, data) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                job_id.into(),
                self.offset.into(),
                self.stream.into(),
                self.task.into(),
                self.ts_ms.into(),
                (self.data.len() as i64).into(),
                self.data.into(),
            ],
        )
        .await?;
        Ok(())
    }
}

/// Appends a line of the farm's own to a job's log, inside the caller's transaction. It starts
/// a line of its own even when the log so far ends in the middle of one.
pub async fn append_farm_line(tx: &mut WriteTx, job_id: i64, line: &str) -> AppResult<()> {
    let last = tx
        .fetch_optional(
            "SELECT data FROM log_chunks WHERE job_id = $1 ORDER BY off DESC LIMIT 1",
            &[job_id.into()],
        )
        .await?;
    let mid_line = match last {
        Some(row) => !row.text(0)?.ends_with('\n'),
        None => false,
    };
    let text = format!("{}[vmfarm] {line}\n", if mid_line { "\n" } else { "" });
    let row = tx
        .fetch_optional(
            "UPDATE jobs SET log_size = log_size + $1 WHERE id = $2 RETURNING log_size",
            &[(text.len() as i64).into(), job_id.into()],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {job_id}")))?;
    let chunk = Chunk {
        offset: row.int(0)? - text.len() as i64,
        stream: "farm",
        task: None,
        ts_ms: now_ms(),
        data: &text,
    };
    chunk.insert(tx, job_id).await
}

/// Chunks of a job's log from byte `from` on (the first one cut to start exactly there),
/// at most `max_bytes` of them (at least one chunk when any is there).
pub async fn read(db: &Db, job_id: i64, from: i64, max_bytes: i64) -> AppResult<Vec<StoredChunk>> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT off, stream, task, ts_ms, data FROM log_chunks WHERE job_id = $1 AND off + len > $2 \
             ORDER BY off LIMIT 512",
            &[job_id.into(), from.into()],
        )
        .await?;
    let mut out = Vec::new();
    let mut total = 0;
    for row in rows {
        let (offset, stream, task) = (row.int(0)?, row.text(1)?, row.opt_text(2)?);
        let (ts_ms, data) = (row.int(3)?, row.text(4)?);
        let (offset, data) = if offset < from {
            let skip = usize::try_from(from - offset).unwrap_or(0).min(data.len());
            // An offset inside a character starts at the next whole one.
            let mut at = skip;
            while !data.is_char_boundary(at) {
                at += 1;
            }
            (offset + at as i64, data[at..].to_owned())
        } else {
            (offset, data)
        };
        total += data.len() as i64;
        out.push(StoredChunk {
            offset,
            stream,
            task,
            ts_ms,
            data,
        });
        if total >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// The job's log size and state, to know when a reader has it all.
pub async fn progress(db: &Db, job_id: i64) -> AppResult<(i64, JobState)> {
    let row = db
        .read()
        .fetch_optional(
            "SELECT log_size, state FROM jobs WHERE id = $1",
            &[job_id.into()],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {job_id}")))?;
    Ok((row.int(0)?, row.parsed(1)?))
}
