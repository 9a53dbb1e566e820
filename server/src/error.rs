//! What an API call answers when it fails: a status and a message that says what to do,
//! never the internals (those are logged).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use vmfarm_proto::ManifestErrors;
use vmfarm_proto::api::{ErrorBody, ManifestErrorView};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid manifest")]
    Manifest(ManifestErrors),
    #[error("missing or unknown token: send `Authorization: Bearer <token>`")]
    Unauthorized,
    /// A webhook call whose signature is missing or wrong.
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    TooMany(String),
    /// Something the server reaches on the caller's behalf (a repository) failed.
    #[error("{0}")]
    Upstream(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl AppError {
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        AppError::Internal(e.into())
    }

    fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) | AppError::Manifest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized | AppError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Upstream(_) => StatusCode::BAD_GATEWAY,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<crate::db::DbFailure> for AppError {
    fn from(e: crate::db::DbFailure) -> Self {
        AppError::internal(e)
    }
}

impl From<std::io::Error> for AppError {
    fn from(e: std::io::Error) -> Self {
        AppError::internal(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(cause) = &self {
            tracing::error!(error = %cause, "request failed");
        }
        let manifest_errors = match &self {
            AppError::Manifest(errors) => errors
                .0
                .iter()
                .cloned()
                .map(ManifestErrorView::from)
                .collect(),
            _ => Vec::new(),
        };
        let body = ErrorBody {
            error: self.to_string(),
            manifest_errors,
        };
        (self.status(), Json(body)).into_response()
    }
}

pub type AppResult<T> = Result<T, AppError>;
