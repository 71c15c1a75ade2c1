//! Tokens whose signature this node has already checked, so that a token
//! sent with every request (a panel's cookie at the gateway, an API
//! bearer) is parsed and its HMAC computed once rather than per request.
//!
//! Only what the signature proved is remembered: the claims, and the key
//! that signed them. Everything that can change is checked again on every
//! use by [`super::Auth`]: expiry, the audience asked for, the key still
//! verifying (with the same secret), and the user's standing (so a logout
//! or a revocation counts as before). A token is found only by its exact
//! bytes: a forged or altered one is never a hit, and refused tokens are
//! never stored, so garbage cannot fill the memory. Bounded by
//! [`MAX_VERIFIED`]: past it the expired entries go, then all of them.

use std::collections::HashMap;
use std::sync::Mutex;

use super::keys::KeySet;
use super::{Audience, Claims, LEEWAY};
use crate::kernel::lock;

/// Tokens remembered at once.
pub(super) const MAX_VERIFIED: usize = 10_000;

/// What a checked signature proved.
#[derive(Clone)]
struct Proved {
    claims: Claims,
    kid: String,
    secret: Vec<u8>,
}

/// Tokens already verified. Shared by the clones of an [`super::Auth`].
#[derive(Default)]
pub(super) struct Verified {
    entries: Mutex<HashMap<String, Proved>>,
}

impl Verified {
    /// The claims of `token` if its signature was checked before and it is
    /// still good at `now` for `audience` (any, when `None`) under `keys`.
    /// `None` when it must be checked in full.
    pub(super) fn claims(&self, token: &str, audience: Option<&Audience>, keys: &KeySet, now: u64) -> Option<Claims> {
        let proved = lock(&self.entries).get(token).cloned()?;
        let unexpired = proved.claims.exp + LEEWAY >= now;
        let for_audience = audience.is_none_or(|a| a.claim() == proved.claims.aud);
        let key_verifies = keys.verifying(&proved.kid, now).is_some_and(|key| key.secret == proved.secret);
        (unexpired && for_audience && key_verifies).then_some(proved.claims)
    }

    /// Remembers that `token`'s signature by the key `kid` (whose secret
    /// is `secret`) proved `claims`.
    pub(super) fn insert(&self, token: &str, claims: &Claims, kid: &str, secret: &[u8], now: u64) {
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_VERIFIED {
            entries.retain(|_, p| p.claims.exp + LEEWAY >= now);
            if entries.len() >= MAX_VERIFIED {
                entries.clear();
            }
        }
        let proved = Proved { claims: claims.clone(), kid: kid.to_owned(), secret: secret.to_vec() };
        entries.insert(token.to_owned(), proved);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::auth::keys::unix_now;

    fn claims(aud: &str, exp: u64) -> Claims {
        Claims { sub: "ada".into(), aud: aud.into(), exp, iat: exp - 60, generation: 1 }
    }

    #[test]
    fn a_remembered_token_counts_only_while_unexpired_for_its_audience_under_the_same_key() {
        let mut keys = KeySet::generate();
        let key = keys.keys[0].clone();
        let now = unix_now();
        let verified = Verified::default();
        verified.insert("t", &claims("nexus-api", now + 60), &key.kid, &key.secret, now);
        assert!(verified.claims("t", Some(&Audience::Api), &keys, now).is_some());
        assert!(verified.claims("t", None, &keys, now).is_some());
        assert!(verified.claims("other bytes", Some(&Audience::Api), &keys, now).is_none());
        assert!(verified.claims("t", Some(&Audience::Panel("p".into())), &keys, now).is_none(), "another audience");
        assert!(verified.claims("t", Some(&Audience::Api), &keys, now + 60 + LEEWAY + 1).is_none(), "expired");
        keys.keys[0].secret = vec![0; 32];
        assert!(verified.claims("t", Some(&Audience::Api), &keys, now).is_none(), "the key's secret changed");
        keys.keys[0] = key.clone();
        keys.keys[0].verify_until = Some(now);
        assert!(verified.claims("t", Some(&Audience::Api), &keys, now).is_none(), "the key retired");
    }

    #[test]
    fn the_memory_is_bounded() {
        let keys = KeySet::generate();
        let key = &keys.keys[0];
        let now = unix_now();
        let verified = Verified::default();
        for i in 0..MAX_VERIFIED {
            verified.insert(
                &format!("expired-{i}"),
                &claims("nexus-api", now - LEEWAY - 1),
                &key.kid,
                &key.secret,
                now,
            );
        }
        verified.insert("fresh", &claims("nexus-api", now + 60), &key.kid, &key.secret, now);
        assert_eq!(verified.len(), 1, "the expired ones went first");
        for i in 0..MAX_VERIFIED {
            verified.insert(&format!("live-{i}"), &claims("nexus-api", now + 60), &key.kid, &key.secret, now);
        }
        assert!(verified.len() <= MAX_VERIFIED);
        assert!(verified.claims(&format!("live-{}", MAX_VERIFIED - 1), None, &keys, now).is_some());
    }
}
