//! Who may open a panel through the gateway, decided before anything
//! happens on the request's behalf: no request is held, no activation
//! asked for and no traffic recorded for a request this module refuses.
//!
//! * A Studio instance, and a private App, are served to the panel's owner
//!   only. The owner proves it with the `nexus_panel` cookie (a token of
//!   [`Audience::Panel`] for this panel, which the API hands out at
//!   `POST /api/panels/{id}/access`) or, for scripts, with
//!   `Authorization: Bearer <API token>`. Tokens are checked with
//!   [`Auth::verify`], so a logout or revocation ends them.
//! * No valid credential: 401. A valid one of another user, or a cookie
//!   minted for another panel: 403. No panel record: 404.
//! * An App whose record says `public` is served to anyone, always with
//!   [`PUBLIC_APP_CSP`].
//!
//! Panel records are read through a small cache ([`RECORD_TTL`], at most
//! [`RECORD_ENTRIES`]), so the hot path does not wait on Redis for each
//! request: making an App private, or deleting a panel, takes up to
//! [`RECORD_TTL`] to reach a gateway. What reaches the panel of the
//! credentials is [`strip_credentials`]'s business; cookies themselves are
//! [`super::cookies`]'.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::HeaderMap;

use super::cookies::{panel_tokens, strip_panel_cookie};
use crate::instance::{InstanceMode, PanelRoute, SIDECAR_TOKEN_HEADER};
use crate::kernel::lock;
use crate::platform::auth::{extract, Audience, Auth, AuthError, Identity};
use crate::platform::{Panel, PanelRecords, StoreError};
use crate::watchdog::TOKEN_HEADER as WATCHDOG_TOKEN_HEADER;

/// Sent with every response of a public App.
///
/// Every panel is served from the gateway's one origin. A script of a
/// stranger's public App running in that origin could fetch the visitor's
/// own panels (`/p/<their-id>/`), with the visitor's cookies attached, and
/// read the answers: same origin. The `sandbox` directive without
/// `allow-same-origin` gives the App's document an opaque origin of its
/// own, so its requests to other panels are cross-origin (no cookies of a
/// `SameSite=Strict` kind, no readable answers) and it cannot touch the
/// gateway origin's storage. What an App needs to work (scripts, forms,
/// popups, dialogs, downloads) stays allowed.
pub(crate) const PUBLIC_APP_CSP: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// How long a panel record read from Redis is trusted.
pub(crate) const RECORD_TTL: Duration = Duration::from_secs(2);

/// Panel records remembered at once; past it the expired ones go, then
/// all of them.
pub(crate) const RECORD_ENTRIES: usize = 10_000;

/// A request that may go on to the panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Granted {
    /// Served as a public App (to anyone): answers carry [`PUBLIC_APP_CSP`].
    pub(crate) public: bool,
    /// The request's `Authorization` was one of the gateway's tokens: it
    /// must not reach the panel.
    pub(crate) bearer_used: bool,
}

/// Why a request may not open the panel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Denied {
    /// No panel record (unknown or deleted).
    #[error("no panel {0:?} here")]
    NotFound(String),
    /// No valid credential.
    #[error("this panel is private: open it from Nexus Studio, or send an API token as `Authorization: Bearer`")]
    Unauthorized,
    /// A valid credential of someone who may not open this panel.
    #[error("this panel belongs to someone else")]
    Forbidden,
    /// The records or accounts could not be read.
    #[error("the panel's access could not be checked now: {0}")]
    Unavailable(#[from] StoreError),
}

/// What one credential proved.
#[derive(Debug, PartialEq, Eq)]
enum Proof {
    /// The panel's owner, for this panel.
    Owner,
    /// Someone valid, but not the owner (or a cookie of another panel).
    Other,
    /// Nothing: not a token of ours, forged, expired or revoked.
    Nothing,
}

/// Decides access to panels. Cheap to share.
pub(crate) struct Gatekeeper {
    auth: Auth,
    records: RecordCache,
}

impl Gatekeeper {
    /// Checks tokens with `auth` against the owners in `records`.
    pub(crate) fn new(auth: Auth, records: PanelRecords) -> Self {
        Gatekeeper { auth, records: RecordCache::new(records) }
    }

    /// Whether the request with `headers` may open the panel `route`
    /// serves.
    pub(crate) async fn check(&self, route: &PanelRoute, headers: &HeaderMap) -> Result<Granted, Denied> {
        let panel = self.records.get(&route.panel).await?.ok_or_else(|| Denied::NotFound(route.panel.clone()))?;
        // A Studio instance is private whatever the record says.
        let public = panel.public && route.mode == InstanceMode::App;
        let mut proofs = Vec::new();
        let mut unavailable = None;
        for token in panel_tokens(headers) {
            match self.cookie(&panel, token).await {
                Ok(proof) => proofs.push(proof),
                Err(error) => unavailable = Some(error),
            }
            if proofs.last() == Some(&Proof::Owner) {
                break;
            }
        }
        let mut bearer_used = false;
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if let Some(token) = extract::bearer(authorization) {
            match self.auth.verify(token, &Audience::Api).await {
                Ok(identity) => {
                    bearer_used = true;
                    proofs.push(owner_or_other(&identity, &panel));
                }
                Err(AuthError::Store(error)) => {
                    // Perhaps ours: it must not reach the panel either way.
                    bearer_used = true;
                    unavailable = Some(error);
                }
                Err(_) => proofs.push(Proof::Nothing),
            }
        }
        if proofs.contains(&Proof::Owner) || public {
            return Ok(Granted { public, bearer_used });
        }
        if let Some(error) = unavailable {
            return Err(Denied::Unavailable(error));
        }
        match proofs.contains(&Proof::Other) {
            true => Err(Denied::Forbidden),
            false => Err(Denied::Unauthorized),
        }
    }

    /// What the `nexus_panel` cookie `token` proves for `panel`. A valid
    /// cookie minted for another panel is told apart (403) from garbage
    /// (401).
    async fn cookie(&self, panel: &Panel, token: &str) -> Result<Proof, StoreError> {
        match self.auth.verify_panel(token).await {
            Ok((opens, identity)) if opens == panel.id => Ok(owner_or_other(&identity, panel)),
            Ok(_) => Ok(Proof::Other),
            Err(AuthError::Store(error)) => Err(error),
            Err(_) => Ok(Proof::Nothing),
        }
    }
}

fn owner_or_other(identity: &Identity, panel: &Panel) -> Proof {
    match identity.user == panel.owner {
        true => Proof::Owner,
        false => Proof::Other,
    }
}

/// Takes the gateway's credentials out of a request before it goes to a
/// panel: the `nexus_panel` cookie always (the panel's own cookies stay),
/// `Authorization` when it was one of the gateway's tokens, and the
/// sidecar's and watchdog's secrets, which only the platform may send.
pub(crate) fn strip_credentials(headers: &mut HeaderMap, granted: Granted) {
    strip_panel_cookie(headers);
    if granted.bearer_used {
        headers.remove(header::AUTHORIZATION);
    }
    strip_platform_secrets(headers);
}

/// Takes the sidecar's and watchdog's secret headers out of a request.
pub(crate) fn strip_platform_secrets(headers: &mut HeaderMap) {
    headers.remove(HeaderName::from_static(SIDECAR_TOKEN_HEADER));
    headers.remove(HeaderName::from_static(WATCHDOG_TOKEN_HEADER));
}

/// A record as read (`None`: there is none), and when.
type Entry = (Option<Arc<Panel>>, Instant);

/// Panel records by id, each trusted for [`RECORD_TTL`].
struct RecordCache {
    records: PanelRecords,
    entries: Mutex<HashMap<String, Entry>>,
}

impl RecordCache {
    fn new(records: PanelRecords) -> Self {
        RecordCache { records, entries: Mutex::default() }
    }

    async fn get(&self, id: &str) -> Result<Option<Arc<Panel>>, StoreError> {
        if let Some((panel, at)) = lock(&self.entries).get(id) {
            if at.elapsed() < RECORD_TTL {
                return Ok(panel.clone());
            }
        }
        let panel = self.records.get(id).await?.map(Arc::new);
        let mut entries = lock(&self.entries);
        if entries.len() >= RECORD_ENTRIES {
            entries.retain(|_, (_, at)| at.elapsed() < RECORD_TTL);
            if entries.len() >= RECORD_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(id.to_owned(), (panel.clone(), Instant::now()));
        Ok(panel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_secrets_never_pass() {
        let mut h = HeaderMap::new();
        h.insert(SIDECAR_TOKEN_HEADER, "s".parse().unwrap());
        h.insert(WATCHDOG_TOKEN_HEADER, "w".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer panel-own".parse().unwrap());
        strip_credentials(&mut h, Granted { public: false, bearer_used: false });
        assert_eq!(h.len(), 1, "only the panel's own authorization stays: {h:?}");
        strip_credentials(&mut h, Granted { public: false, bearer_used: true });
        assert!(h.is_empty());
    }
}
