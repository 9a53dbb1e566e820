//! What handlers take from a request before they run: who calls ([`Caller`], from the bearer
//! token), and for the worker's lease-scoped routes, which lease they speak for ([`LeaseCall`]).

use crate::auth::{Caller, hash_token, lookup};
use crate::error::AppError;
use crate::fence::LeaseRef;
use crate::state::AppState;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use vmfarm_proto::wire::FENCE_HEADER;

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AppError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AppError::Unauthorized)?;
        let hash = hash_token(token);
        if let Some(caller) = state.tokens.get(&hash) {
            return Ok(caller);
        }
        let caller = lookup(&state.db, &hash)
            .await?
            .ok_or(AppError::Unauthorized)?;
        state.tokens.put(hash, caller.clone());
        Ok(caller)
    }
}

/// A worker's call under one of its leases: the worker (from its token), the lease (the `{id}`
/// of the route) and its fence (the [`FENCE_HEADER`] header). Whether the lease is live is
/// checked by the write itself, in its transaction ([`crate::fence::live_job`]).
#[derive(Debug, Clone)]
pub struct LeaseCall {
    pub worker: String,
    pub lease: LeaseRef,
}

impl FromRequestParts<AppState> for LeaseCall {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let worker = Caller::from_request_parts(parts, state)
            .await?
            .worker()?
            .to_owned();
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| AppError::BadRequest(e.body_text()))?;
        let id = params
            .iter()
            .find_map(|(name, value)| (name == "id").then(|| value.to_owned()))
            .ok_or_else(|| AppError::internal("a lease route without an {id}"))?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AppError::NotFound(format!(
                "no lease `{}`",
                id.escape_debug()
            )));
        }
        let fence = parts
            .headers
            .get(FENCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                AppError::BadRequest(format!(
                    "send the lease's fence in the {FENCE_HEADER} header"
                ))
            })?;
        Ok(LeaseCall {
            worker,
            lease: LeaseRef {
                lease_id: id,
                fence,
            },
        })
    }
}
