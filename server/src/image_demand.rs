//! Queued jobs seen by image, for whoever can make an image that no worker offers yet (`vmfarm
//! up` builds a recipe's image on demand): which images queued jobs name, a line of the farm's
//! in each such job's log, and the end of those jobs when their image cannot be had.

use crate::db::{Query, now_ms};
use crate::error::AppResult;
use crate::job_end::{End, EndedBy, Seen, end_job};
use crate::logs::append_farm_line;
use crate::state::AppState;
use vmfarm_proto::JobState;

/// The images that queued jobs name, sorted, each once.
pub async fn queued_images(state: &AppState) -> AppResult<Vec<String>> {
    state
        .db
        .read()
        .fetch_all(
            "SELECT DISTINCT image FROM jobs WHERE state = 'queued' ORDER BY image",
            &[],
        )
        .await?
        .iter()
        .map(|row| Ok(row.text(0)?))
        .collect()
}

/// The ids of the jobs of `image` queued now, oldest first.
async fn queued_of(state: &AppState, image: &str) -> AppResult<Vec<i64>> {
    state
        .db
        .read()
        .fetch_all(
            "SELECT id FROM jobs WHERE state = 'queued' AND image = $1 ORDER BY id",
            &[image.into()],
        )
        .await?
        .iter()
        .map(|row| Ok(row.int(0)?))
        .collect()
}

/// Writes `line` in the log of each job of `image` still queued; returns how many got it.
pub async fn tell_queued(state: &AppState, image: &str, line: &str) -> AppResult<usize> {
    let mut told = 0;
    for id in queued_of(state, image).await? {
        let line = line.to_owned();
        let still_queued = state
            .db
            .write(move |tx| {
                Box::pin(async move {
                    if Seen::read(tx, id).await?.state != JobState::Queued {
                        return Ok(false);
                    }
                    append_farm_line(tx, id, &line).await?;
                    AppResult::Ok(true)
                })
            })
            .await?;
        if still_queued {
            told += 1;
            state.events.job_changed(id);
        }
    }
    Ok(told)
}

/// Ends each job of `image` still queued in `error`, with `reason` (also in its log): its image
/// cannot be had. Returns how many ended.
pub async fn end_queued(state: &AppState, image: &str, reason: &str) -> AppResult<usize> {
    let mut ended = 0;
    for id in queued_of(state, image).await? {
        let reason = reason.to_owned();
        let now = now_ms();
        let moved = state
            .db
            .write(move |tx| {
                Box::pin(async move {
                    let seen = Seen::read(tx, id).await?;
                    if seen.state != JobState::Queued {
                        return AppResult::Ok(None);
                    }
                    let end = End {
                        state: JobState::Error,
                        reason: Some(&reason),
                        by: EndedBy::Farm,
                        now,
                    };
                    end_job(tx, &seen, &end).await
                })
            })
            .await?;
        if let Some(moved) = moved {
            ended += 1;
            crate::job_end::ended(state, &moved);
            state.events.job_changed(id);
        }
    }
    Ok(ended)
}
