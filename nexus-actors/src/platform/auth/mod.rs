//! Authentication: signed, expiring tokens (JWT, HS256) under the keys of
//! [`keys`], checked against the user's role and token generation in
//! [`Accounts`] so that a logout or an admin's revocation ends every
//! token issued before it.
//!
//! A token has an audience: [`Audience::Api`] for `Authorization: Bearer`
//! on the API, [`Audience::Panel`] for the cookie that opens one panel at
//! the gateway. One is never accepted as the other.
//!
//! [`extract`] turns this into actix-web extractors ([`Caller`],
//! [`Admin`]) and header helpers for hyper. Who may touch what is decided
//! by the handlers, not here. A token's signature is checked once per node
//! ([`verified`]); its expiry, key and user are checked on every use.

pub mod extract;
pub mod keys;
pub mod limiter;
pub mod password;
mod verified;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub use self::extract::{Admin, Caller};
use self::keys::{unix_now, KeyRing};
use self::verified::Verified;
use super::accounts::{Accounts, Standing, UserRole};
use super::store::StoreError;

/// How long a token is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// Seconds a token is still taken past its expiry (clocks differ).
const LEEWAY: u64 = 5;

/// How long a node trusts what it last read of a user's standing. A
/// revocation made through another node takes this long to reach it; one
/// made through this node counts at once.
pub const STANDING_TTL: Duration = Duration::from_secs(1);

/// Users whose standing a node remembers at once; past it the memory is
/// cleared, so a flood of names cannot grow it.
const STANDING_CACHE: usize = 10_000;

/// The cookie that opens one panel at the traffic gateway.
pub const PANEL_COOKIE: &str = "nexus_panel";

/// The path a panel is served under at the gateway, and its cookie's path.
pub fn panel_path(panel: &str) -> String {
    format!("/p/{panel}/")
}

/// The `Set-Cookie` value that gives `token` (of [`Audience::Panel`]) to
/// the browser for `panel`'s path only, out of reach of scripts
/// (`HttpOnly`) and of other sites (`SameSite=Strict`).
pub fn panel_set_cookie(panel: &str, token: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{PANEL_COOKIE}={token}; Path={}; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        panel_path(panel),
        TOKEN_TTL.as_secs()
    )
}

/// What a token opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// The API, the WebSocket and the MCP endpoint.
    Api,
    /// One panel at the traffic gateway (the cookie of `/p/<id>/`).
    Panel(String),
}

impl Audience {
    fn claim(&self) -> String {
        match self {
            Audience::Api => API_AUDIENCE.to_owned(),
            Audience::Panel(id) => format!("{PANEL_AUDIENCE}{id}"),
        }
    }

    /// The audience a token's `aud` claim names, if it is one of ours.
    fn from_claim(claim: &str) -> Option<Audience> {
        match claim.strip_prefix(PANEL_AUDIENCE) {
            Some(id) => Some(Audience::Panel(id.to_owned())),
            None => (claim == API_AUDIENCE).then_some(Audience::Api),
        }
    }
}

const API_AUDIENCE: &str = "nexus-api";
const PANEL_AUDIENCE: &str = "nexus-panel:";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    /// The user's token generation when it was issued.
    #[serde(rename = "gen")]
    generation: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not a token, a forged one, an expired one, one for another
    /// audience, or one signed by a retired key.
    #[error("the token is not valid")]
    Invalid,
    /// The user logged out or was revoked since it was issued.
    #[error("the token was revoked")]
    Revoked,
    /// The user it names does not exist.
    #[error("the token names no user")]
    UnknownUser,
    /// No key may sign now.
    #[error("no token-signing key is active")]
    NoSigningKey,
    /// The accounts could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    /// Why a token that verified once no longer holds, for a connection
    /// that re-checks it (a WebSocket session, an MCP listen); `None` when
    /// it could not be checked now (Redis down, say) and is tried again.
    pub fn ended(&self) -> Option<&'static str> {
        match self {
            AuthError::Revoked => Some("token revoked (logged out)"),
            AuthError::UnknownUser => Some("user removed"),
            // It verified before: now expired, or its key retired.
            AuthError::Invalid => Some("token expired"),
            AuthError::NoSigningKey | AuthError::Store(_) => None,
        }
    }
}

/// A user as a request proves to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The username.
    pub user: String,
    /// Their role now.
    pub role: UserRole,
}

/// Issues and checks tokens. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    keys: KeyRing,
    accounts: Accounts,
    standing: Arc<Mutex<HashMap<String, (Standing, Instant)>>>,
    verified: Arc<Verified>,
}

impl Auth {
    /// Tokens under `keys`, checked against `accounts`.
    pub fn new(keys: KeyRing, accounts: Accounts) -> Self {
        Auth { keys, accounts, standing: Arc::default(), verified: Arc::default() }
    }

    /// The accounts tokens are checked against.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// A token for `user` at their current token generation, for
    /// `audience`, and when it expires (seconds since the epoch).
    pub async fn issue(&self, user: &str, audience: &Audience) -> Result<(String, u64), AuthError> {
        let standing = self.standing(user, true).await?.ok_or(AuthError::UnknownUser)?;
        self.sign(user, standing.generation, audience)
    }

    /// Signs a token for `user` at token generation `generation`.
    pub fn sign(&self, user: &str, generation: u64, audience: &Audience) -> Result<(String, u64), AuthError> {
        let now = unix_now();
        let exp = now + TOKEN_TTL.as_secs();
        let claims = Claims { sub: user.to_owned(), aud: audience.claim(), exp, iat: now, generation };
        self.keys.with(|set| {
            let key = set.signing(now).ok_or(AuthError::NoSigningKey)?;
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(key.kid.clone());
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.secret))
                .map(|token| (token, exp))
                .map_err(|_| AuthError::Invalid)
        })
    }

    /// The user a token was issued to, if it is valid for `audience`,
    /// unexpired, signed by a key still in use and not revoked.
    pub async fn verify(&self, token: &str, audience: &Audience) -> Result<Identity, AuthError> {
        let claims = self.decode(token, Some(audience))?;
        self.identity(claims).await
    }

    /// The panel a panel token opens and who holds it, whichever panel it
    /// was issued for, checked like [`Auth::verify`]: the gateway tells a
    /// valid cookie of another panel (403) from garbage (401).
    pub async fn verify_panel(&self, token: &str) -> Result<(String, Identity), AuthError> {
        let claims = self.decode(token, None)?;
        let Some(Audience::Panel(panel)) = Audience::from_claim(&claims.aud) else { return Err(AuthError::Invalid) };
        Ok((panel, self.identity(claims).await?))
    }

    /// Who the verified `claims` name, if their token generation is still
    /// the user's.
    async fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        let standing = self.standing(&claims.sub, false).await?.ok_or(AuthError::UnknownUser)?;
        if standing.generation != claims.generation {
            return Err(AuthError::Revoked);
        }
        Ok(Identity { user: claims.sub, role: standing.role })
    }

    /// The claims of a token signed by a key in use, unexpired, for
    /// `audience` (or any audience, left to the caller to check).
    fn decode(&self, token: &str, audience: Option<&Audience>) -> Result<Claims, AuthError> {
        let now = unix_now();
        if let Some(claims) = self.keys.with(|set| self.verified.claims(token, audience, set, now)) {
            return Ok(claims);
        }
        let kid = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?.kid.ok_or(AuthError::Invalid)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY;
        match audience {
            Some(audience) => validation.set_audience(&[audience.claim()]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        self.keys.with(|set| {
            let key = set.verifying(&kid, now).ok_or(AuthError::Invalid)?;
            let claims = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&key.secret), &validation)
                .map(|data| data.claims)
                .map_err(|_| AuthError::Invalid)?;
            self.verified.insert(token, &claims, &kid, &key.secret, now);
            Ok(claims)
        })
    }

    /// Revokes every token of `user` issued so far; false when there is
    /// no such user.
    pub async fn revoke(&self, user: &str) -> Result<bool, AuthError> {
        let revoked = self.accounts.revoke(user).await?.is_some();
        self.lock().remove(user);
        Ok(revoked)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Standing, Instant)>> {
        self.standing.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn standing(&self, user: &str, fresh: bool) -> Result<Option<Standing>, StoreError> {
        if !fresh {
            if let Some((standing, at)) = self.lock().get(user) {
                if at.elapsed() < STANDING_TTL {
                    return Ok(Some(*standing));
                }
            }
        }
        let standing = self.accounts.standing(user).await?;
        let mut cache = self.lock();
        match standing {
            Some(standing) => {
                if cache.len() >= STANDING_CACHE {
                    cache.clear();
                }
                cache.insert(user.to_owned(), (standing, Instant::now()));
            }
            None => {
                cache.remove(user);
            }
        }
        Ok(standing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_round_trip_through_their_claims() {
        for audience in [Audience::Api, Audience::Panel("0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11".into())] {
            assert_eq!(Audience::from_claim(&audience.claim()), Some(audience));
        }
        assert_eq!(Audience::from_claim("nexus-apix"), None);
        assert_eq!(Audience::from_claim("someone-else"), None);
    }
}
