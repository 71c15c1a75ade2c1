//! Authentication at the edge of a request: actix-web extractors that run
//! before a handler ([`Caller`], [`Admin`]), and the header parsing the
//! hyper-based gateway shares with them.
//!
//! A handler that takes a [`Caller`] is authenticated: a request without a
//! valid `Authorization: Bearer` API token gets 401 before it runs (503
//! while the accounts cannot be read).

use actix_web::{web, FromRequest, HttpRequest};
use futures::future::LocalBoxFuture;

use super::super::accounts::UserRole;
use super::super::error::ApiError;
use super::{Audience, Auth, AuthError, Identity};

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization?.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty())
}

/// The value of cookie `name` among `Cookie` header values.
pub fn cookie<'a>(headers: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v.trim_matches('"')))
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(e) => e.into(),
            AuthError::NoSigningKey => ApiError::Internal(e.to_string()),
            AuthError::Invalid | AuthError::Revoked | AuthError::UnknownUser => ApiError::Unauthorized,
        }
    }
}

/// The authenticated user of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The username.
    pub user: String,
    /// Their role.
    pub role: UserRole,
}

impl Caller {
    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == UserRole::Admin
    }
}

impl From<Identity> for Caller {
    fn from(id: Identity) -> Self {
        Caller { user: id.user, role: id.role }
    }
}

/// Authenticates `req` by its bearer token.
pub async fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    let auth = req.app_data::<web::Data<Auth>>().ok_or(ApiError::Unauthorized)?;
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = bearer(header).ok_or(ApiError::Unauthorized)?;
    Ok(auth.verify(token, &Audience::Api).await?.into())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move { authenticate(&req).await })
    }
}

/// An authenticated admin: 401 without a token, 403 for anyone else.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let caller = authenticate(&req).await?;
            if !caller.is_admin() {
                return Err(ApiError::NotAdmin);
            }
            Ok(Admin(caller))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_cookie_values_are_found_and_nothing_else() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
        let headers = ["a=1; nexus_panel=tok; b=2", "c=3"];
        assert_eq!(cookie(headers, "nexus_panel"), Some("tok"));
        assert_eq!(cookie(headers, "c"), Some("3"));
        assert_eq!(cookie(headers, "nexus"), None);
    }
}
