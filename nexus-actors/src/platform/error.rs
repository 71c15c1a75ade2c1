//! The errors of every `/api` route, one variant per reason, each with a
//! status and a stable `error` code in a JSON body ([`ErrorBody`]). Roles
//! convert their own errors into these; nothing else writes error JSON.

use actix_web::error::JsonPayloadError;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::store::StoreError;

/// Largest JSON body the API accepts.
pub const MAX_BODY: usize = 1 << 20;

/// What a failed request gets: a status and a JSON body saying why.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// No valid token (or cookie) came with the request.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// A login with a wrong username or password.
    #[error("wrong username or password")]
    BadCredentials,
    /// The thing belongs to another user.
    #[error("this belongs to another user")]
    NotOwner,
    /// Only an admin may do this.
    #[error("only an admin may do this")]
    NotAdmin,
    /// The request's `Host` or `Origin` is not this node's (DNS rebinding).
    #[error(transparent)]
    ForeignOrigin(#[from] super::origin::OriginError),
    /// No such thing (named).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request body is over [`MAX_BODY`].
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A write would make a document larger than allowed.
    #[error("the document would be {bytes} bytes, over the limit of {limit}")]
    DocumentTooLarge {
        /// What it would be.
        bytes: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A message larger than a context takes.
    #[error("the message is {bytes} bytes, over the limit of {limit}")]
    MessageTooLarge {
        /// What it is.
        bytes: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A versioned write against a version that is no longer current.
    #[error("document is at version {current}, the patch was made against {seen}")]
    StaleVersion {
        /// The version the document is at.
        current: u64,
        /// The version the writer saw.
        seen: u64,
    },
    /// Something in the request is larger than allowed; the message says what.
    #[error("{0}")]
    TooLarge(String),
    /// A write would take the user past a limit; the message says which.
    #[error("{0}")]
    OverQuota(String),
    /// The request conflicts with the current state; the message says how.
    #[error("{0}")]
    Conflict(String),
    /// The user has as many of something as they may.
    #[error("you have {limit} {what} already, the most allowed")]
    Quota {
        /// What is counted (`panels`, `documents`, `running instances`).
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Too many attempts; try again after `retry_after` seconds.
    #[error("too many attempts; try again in {retry_after} s")]
    RateLimited {
        /// Seconds until an attempt is taken again.
        retry_after: u64,
    },
    /// The node is saturated; try again after `retry_after` seconds.
    #[error("the server is busy; try again in {retry_after} s")]
    Busy {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// No model can answer: none is configured, or this node serves no
    /// contexts; the message says which. Not worth retrying as is.
    #[error("{0}")]
    LlmUnavailable(&'static str),
    /// A store the request needs cannot be reached.
    #[error("{0} is unavailable; try again shortly")]
    Unavailable(&'static str),
    /// Anything else; logged where it happened.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `stale_version`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// For `stale_version`: the version the document is at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl ApiError {
    /// The stable code in [`ErrorBody::error`].
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadCredentials => "bad_credentials",
            ApiError::NotOwner | ApiError::NotAdmin => "forbidden",
            ApiError::ForeignOrigin(_) => "forbidden_origin",
            ApiError::NotFound(_) => "not_found",
            ApiError::BodyTooLarge { .. }
            | ApiError::DocumentTooLarge { .. }
            | ApiError::MessageTooLarge { .. }
            | ApiError::TooLarge(_) => "too_large",
            ApiError::StaleVersion { .. } => "stale_version",
            ApiError::Conflict(_) => "conflict",
            ApiError::Quota { .. } | ApiError::OverQuota(_) => "quota_exceeded",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Busy { .. } => "busy",
            ApiError::LlmUnavailable(_) => "llm_unavailable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Busy { retry_after } => Some(*retry_after),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::NotOwner
            | ApiError::NotAdmin
            | ApiError::ForeignOrigin(_)
            | ApiError::Quota { .. }
            | ApiError::OverQuota(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge { .. }
            | ApiError::DocumentTooLarge { .. }
            | ApiError::MessageTooLarge { .. }
            | ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StaleVersion { .. } | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Busy { .. } | ApiError::Unavailable(_) | ApiError::LlmUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let current_version = match self {
            ApiError::StaleVersion { current, .. } => Some(*current),
            _ => None,
        };
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let Some(secs) = self.retry_after() {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(ErrorBody { error: self.code().to_owned(), message: self.to_string(), current_version })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "redis unavailable");
            return ApiError::Unavailable("redis");
        }
        tracing::error!(error = %e, "store error");
        ApiError::Internal(e.to_string())
    }
}

/// The JSON body settings of every `/api` route: bodies up to
/// [`MAX_BODY`], malformed JSON as `bad_request`.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().limit(MAX_BODY).error_handler(|err, _| {
        match err {
            JsonPayloadError::Overflow { limit } => ApiError::BodyTooLarge { limit },
            JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::BodyTooLarge { limit },
            err => ApiError::BadRequest(format!("invalid JSON body: {err}")),
        }
        .into()
    })
}

/// Path parameters that do not parse are `bad_request`.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err, _| ApiError::BadRequest(err.to_string()).into())
}

/// Query strings that do not parse are `bad_request`.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| ApiError::BadRequest(err.to_string()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_status_and_code() {
        let cases = [
            (ApiError::NotAdmin, 403, "forbidden"),
            (ApiError::Quota { what: "panels", limit: 3 }, 403, "quota_exceeded"),
            (ApiError::RateLimited { retry_after: 5 }, 429, "rate_limited"),
            (ApiError::StaleVersion { current: 4, seen: 3 }, 409, "stale_version"),
            (ApiError::DocumentTooLarge { bytes: 2, limit: 1 }, 413, "too_large"),
            (ApiError::Unavailable("redis"), 503, "unavailable"),
            (ApiError::LlmUnavailable("no model"), 503, "llm_unavailable"),
            (ApiError::MessageTooLarge { bytes: 2, limit: 1 }, 413, "too_large"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status_code().as_u16(), status, "{error}");
            assert_eq!(error.code(), code);
        }
        let response = ApiError::RateLimited { retry_after: 7 }.error_response();
        assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
    }
}
