//! The body type of the proxy's answers: a stream from the origin, from the cache, or a short
//! message of the proxy's own.

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every answer's body: streamed, never collected.
pub(super) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub(super) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// An answer of the proxy's own: `status` and `message` as plain text.
pub(super) fn message(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
