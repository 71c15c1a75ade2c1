//! Authentication: password hashes (Argon2) and signed, expiring tokens
//! (JWT, HS256, with a secret shared by all nodes through Redis). The
//! [`Caller`] extractor makes a handler authenticated: a request without a
//! valid `Authorization: Bearer` token gets 401 before the handler runs.
//! Who may touch what is decided by the handlers, not here.

use std::future::{ready, Ready};
use std::time::Duration;

use actix_web::{web, FromRequest, HttpRequest};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::api::ApiError;

/// How long a token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

/// Issues and checks tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        Auth { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation }
    }

    /// A token for `user`, and when it expires (seconds since the epoch).
    pub fn issue(&self, user: &str) -> (String, u64) {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let exp = now + TOKEN_TTL.as_secs();
        let claims = Claims { sub: user.to_owned(), exp, iat: now };
        // Signing with an HMAC key cannot fail.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).unwrap_or_default();
        (token, exp)
    }

    /// The user a token was issued to, if it is valid and unexpired.
    pub fn verify(&self, token: &str) -> Option<String> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok().map(|d| d.claims.sub)
    }
}

pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_default()
}

pub fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let token = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let user = match (token, req.app_data::<web::Data<Auth>>()) {
            (Some(token), Some(auth)) => auth.verify(token),
            _ => None,
        };
        ready(user.map(Caller).ok_or(ApiError::Unauthorized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_the_same_secret() {
        let auth = Auth::new(b"secret-one");
        let (token, exp) = auth.issue("ada");
        assert!(exp > chrono::Utc::now().timestamp() as u64);
        assert_eq!(auth.verify(&token).as_deref(), Some("ada"));
        assert_eq!(Auth::new(b"secret-two").verify(&token), None);
        assert_eq!(auth.verify("not.a.token"), None);
        let mut tampered = token.clone();
        tampered.push('x');
        assert_eq!(auth.verify(&tampered), None);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let auth = Auth::new(b"s");
        let claims = Claims { sub: "ada".into(), exp: 1_000, iat: 900 };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &auth.encoding).unwrap();
        assert_eq!(auth.verify(&token), None);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse");
        assert!(password_matches("correct horse", &hash));
        assert!(!password_matches("wrong", &hash));
        assert!(!password_matches("correct horse", "garbage"));
    }
}
