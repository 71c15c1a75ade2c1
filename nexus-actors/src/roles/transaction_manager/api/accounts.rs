//! Login, logout and user management.
//!
//! `POST /api/login` is open, and guarded: failed attempts are limited per
//! client address and per username (429 with `Retry-After`) before any
//! hashing, hashing runs off the HTTP workers behind a bounded semaphore
//! (503 `busy` past it), and an unknown user costs the same work as a
//! known one. Users are created and revoked by admins only.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::TmState;
use crate::platform::accounts::{check_username, UserRole};
use crate::platform::auth::password::PasswordError;
use crate::platform::auth::Audience;
use crate::platform::error::ErrorBody;
use crate::platform::{Admin, ApiError, Caller};
use crate::roles::transaction_manager::metrics::LoginOutcome;

/// Longest password accepted; hashing is slow enough without megabytes.
const MAX_PASSWORD: usize = 1024;

/// Where failed logins with names no user can have are counted (not
/// itself a valid username).
const INVALID_NAMES: &str = "?invalid";

/// The body of `POST /api/login`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Login {
    /// The username.
    pub username: String,
    /// The password.
    pub password: String,
}

/// A token for the API.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Token {
    /// Send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

/// The body of `POST /api/users`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewUser {
    /// Letters, digits, `.`, `_` and `-`; at most 64.
    pub username: String,
    /// At least 8 characters.
    pub password: String,
    /// `user` unless said otherwise.
    #[serde(default = "plain_user")]
    pub role: UserRole,
}

fn plain_user() -> UserRole {
    UserRole::User
}

/// Who the caller is.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Me {
    /// The username.
    pub username: String,
    /// Their role.
    pub role: UserRole,
}

fn password_error(e: PasswordError) -> ApiError {
    match e {
        PasswordError::Busy => ApiError::Busy { retry_after: 1 },
        PasswordError::Failed(m) => ApiError::Internal(m),
    }
}

#[utoipa::path(post, path = "/api/login", request_body = Login,
    responses((status = 200, body = Token), (status = 401, body = ErrorBody),
        (status = 429, description = "too many failed logins from this address or for this user", body = ErrorBody),
        (status = 503, description = "too many logins being checked", body = ErrorBody)))]
/// Logs in: a token for the API.
pub async fn login(
    req: HttpRequest,
    state: web::Data<TmState>,
    body: web::Json<Login>,
) -> Result<HttpResponse, ApiError> {
    let Login { username, password } = body.into_inner();
    if password.len() > MAX_PASSWORD {
        return Err(ApiError::BadRequest(format!("a password is at most {MAX_PASSWORD} bytes")));
    }
    let addr = req.peer_addr().map(|a| a.ip());
    // Failures of names that cannot exist still count, under one name.
    let valid = check_username(&username).is_ok();
    let counted = if valid { username.as_str() } else { INVALID_NAMES };
    if let Err(limited) = state.limiter.admit(addr, counted).await? {
        state.metrics.login(LoginOutcome::RateLimited);
        tracing::info!(user = counted, ?addr, "nexus_logins_total: rate limited");
        return Err(ApiError::RateLimited { retry_after: limited.retry_after });
    }
    let hash = match valid {
        true => state.platform.accounts.password_hash(&username).await?,
        false => None,
    };
    let matched = match state.passwords.matches(&password, hash).await {
        Ok(matched) => matched,
        Err(e) => {
            state.metrics.login(LoginOutcome::Busy);
            return Err(password_error(e));
        }
    };
    if !matched {
        state.metrics.login(LoginOutcome::Refused);
        tracing::info!(user = counted, ?addr, "nexus_logins_total: refused");
        return Err(ApiError::BadCredentials);
    }
    state.limiter.succeeded(addr, counted).await?;
    let (token, expires_at) = state.platform.auth.issue(&username, &Audience::Api).await?;
    state.metrics.login(LoginOutcome::Ok);
    Ok(HttpResponse::Ok().json(Token { token, expires_at }))
}

#[utoipa::path(post, path = "/api/logout", security(("bearer" = [])),
    responses((status = 204, description = "every token of the caller is revoked"), (status = 401, body = ErrorBody)))]
/// Logs out everywhere: every token of the caller issued so far stops
/// working, WebSocket sessions included.
pub async fn logout(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    state.platform.auth.revoke(&caller.user).await?;
    tracing::info!(user = %caller.user, "logged out: tokens revoked");
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/me", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
/// Who the token belongs to.
pub async fn me(caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(Me { username: caller.user, role: caller.role })
}

#[utoipa::path(post, path = "/api/users", request_body = NewUser, security(("bearer" = [])),
    responses((status = 201), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "not an admin", body = ErrorBody), (status = 409, body = ErrorBody)))]
/// Creates a user (admins only).
pub async fn create_user(
    admin: Admin,
    state: web::Data<TmState>,
    body: web::Json<NewUser>,
) -> Result<HttpResponse, ApiError> {
    check_username(&body.username).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if body.password.len() < 8 || body.password.len() > MAX_PASSWORD {
        return Err(ApiError::BadRequest(format!("password must be 8 to {MAX_PASSWORD} characters")));
    }
    let hash = state.passwords.hash(&body.password).await.map_err(password_error)?;
    if !state.platform.accounts.create(&body.username, &hash, body.role).await? {
        return Err(ApiError::Conflict(format!("user {} exists", body.username)));
    }
    tracing::info!(by = %admin.0.user, user = %body.username, role = body.role.as_str(), "user created");
    Ok(HttpResponse::Created().json(json!({ "username": body.username, "role": body.role })))
}

#[utoipa::path(post, path = "/api/users/{name}/revoke", security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 204, description = "every token of the user is revoked"), (status = 401, body = ErrorBody),
        (status = 403, description = "not an admin", body = ErrorBody), (status = 404, body = ErrorBody)))]
/// Revokes every token of a user (admins only).
pub async fn revoke(
    admin: Admin,
    state: web::Data<TmState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if check_username(&name).is_err() || !state.platform.auth.revoke(&name).await? {
        return Err(ApiError::NotFound("user"));
    }
    tracing::info!(by = %admin.0.user, user = %name, "tokens revoked");
    Ok(HttpResponse::NoContent().finish())
}
