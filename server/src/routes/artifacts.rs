//! Artifacts as users download them: a list, and each file with Range and ETag.

use crate::access;
use crate::auth::Caller;
use crate::config::Scope;
use crate::error::{AppError, AppResult};
use crate::job_views::parse_id;
use crate::routes::refusals::ReadRefusals;
use crate::state::AppState;
use crate::store::{self, Span};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use vmfarm_proto::api::{ArtifactView, ErrorBody};

#[utoipa::path(
    get, path = "/api/jobs/{id}/artifacts", tag = "jobs", params(("id" = String, Path, description = "The job's id")),
    operation_id = "list_artifacts",
    responses(
        (status = 200, description = "The job's artifacts", body = Vec<ArtifactView>),
        ReadRefusals,
        (status = 404, description = "No such job within the caller's reach", body = ErrorBody),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<Vec<ArtifactView>>> {
    let reach = caller.require(Scope::Read)?.reach();
    let job = parse_id(&id, "job")?;
    access::job(&state.db, &reach, job).await?;
    Ok(Json(store::list(&state.db, job).await?))
}

/// A single byte range of a `size`-byte file, from a `Range` header.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAsk {
    Whole,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        // Several ranges: answering with the whole file is allowed and simpler for everyone.
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        match b.parse::<u64>() {
            Ok(0) | Err(_) => return RangeAsk::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        }
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return RangeAsk::Whole;
        };
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(end) if end >= start => end.min(size.saturating_sub(1)),
                _ => return RangeAsk::Whole,
            }
        };
        (start, end)
    };
    if size == 0 || start >= size {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part { start, end }
}

#[utoipa::path(
    get, path = "/api/jobs/{id}/artifacts/{name}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), ("name" = String, Path, description = "The artifact's path, as listed")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The `Range` asked for", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "The `If-None-Match` ETag is the file's"),
        (status = 416, description = "A `Range` outside the file"),
        ReadRefusals,
        (status = 404, description = "No such job or artifact", body = ErrorBody),
    ),
)]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> AppResult<Response> {
    let reach = caller.require(Scope::Read)?.reach();
    let job = parse_id(&id, "job")?;
    access::job(&state.db, &reach, job).await?;
    let (artifact, place) = store::find(&state.db, job, &name).await?;
    let etag = format!("\"{}\"", artifact.sha256);
    let etag_value = HeaderValue::from_str(&etag).map_err(AppError::internal)?;
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*")) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    // If-Range with another validator: the client's copy is stale, send it all.
    let range_header = match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) if v.trim() != etag => None,
        _ => headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
    };
    let size = artifact.size;
    let file_name = name
        .rsplit('/')
        .next()
        .unwrap_or("artifact")
        .replace('"', "");
    let common = [
        (header::ETAG, etag_value),
        (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\""))
                .unwrap_or(HeaderValue::from_static("attachment")),
        ),
    ];
    match parse_range(range_header, size) {
        RangeAsk::Whole => {
            let body = Body::from_stream(state.store.read(&place, Span::Whole).await?);
            Ok((
                StatusCode::OK,
                common,
                [(header::CONTENT_LENGTH, size.to_string())],
                body,
            )
                .into_response())
        }
        RangeAsk::Part { start, end } => {
            let len = end - start + 1;
            let span = Span::Part { start, end };
            let body = Body::from_stream(state.store.read(&place, span).await?);
            Ok((
                StatusCode::PARTIAL_CONTENT,
                common,
                [
                    (header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                body,
            )
                .into_response())
        }
        RangeAsk::Unsatisfiable => Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{size}"))],
        )
            .into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_range_forms() {
        let cases = [
            (None, RangeAsk::Whole),
            (Some("bytes=0-9"), RangeAsk::Part { start: 0, end: 9 }),
            (Some("bytes=90-"), RangeAsk::Part { start: 90, end: 99 }),
            (Some("bytes=-10"), RangeAsk::Part { start: 90, end: 99 }),
            (Some("bytes=-500"), RangeAsk::Part { start: 0, end: 99 }),
            (Some("bytes=50-500"), RangeAsk::Part { start: 50, end: 99 }),
            (Some("bytes=100-"), RangeAsk::Unsatisfiable),
            (Some("bytes=-0"), RangeAsk::Unsatisfiable),
            (Some("bytes=0-1,5-6"), RangeAsk::Whole),
            (Some("bytes=9-3"), RangeAsk::Whole),
            (Some("items=0-1"), RangeAsk::Whole),
            (Some("bytes=x-1"), RangeAsk::Whole),
        ];
        for (header, want) in cases {
            assert_eq!(parse_range(header, 100), want, "{header:?}");
        }
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeAsk::Unsatisfiable);
    }
}
