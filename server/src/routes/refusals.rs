//! The refusals that many routes share, each set described once for the OpenAPI description
//! (`responses(..., ReadRefusals)`).

use utoipa::IntoResponses;
use vmfarm_proto::api::ErrorBody;

/// A call that needs an API token of the `read` scope.
#[derive(IntoResponses)]
pub enum ReadRefusals {
    #[response(status = 401, description = "No token, or an unknown one")]
    NoToken(ErrorBody),
    #[response(status = 403, description = "The token lacks the `read` scope")]
    NoScope(ErrorBody),
}

/// A call that needs an API token of the `submit` scope.
#[derive(IntoResponses)]
pub enum SubmitRefusals {
    #[response(status = 401, description = "No token, or an unknown one")]
    NoToken(ErrorBody),
    #[response(status = 403, description = "The token lacks the `submit` scope")]
    NoScope(ErrorBody),
}

/// A worker's call under one of its leases, with the lease's fence.
#[derive(IntoResponses)]
pub enum LeaseRefusals {
    #[response(status = 400, description = "No fence, or not a number")]
    NoFence(ErrorBody),
    #[response(status = 401, description = "No worker token")]
    NoToken(ErrorBody),
    #[response(status = 403, description = "An API token, or another worker's lease")]
    NotTheWorker(ErrorBody),
    #[response(status = 404, description = "No such lease")]
    NoLease(ErrorBody),
    #[response(
        status = 409,
        description = "The lease is not live (expired, or taken again: a newer fence)"
    )]
    NotLive(ErrorBody),
}
