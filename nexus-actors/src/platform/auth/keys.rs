//! Token-signing keys: a key file the operator provides, with key ids and
//! rotation. No node ever makes up a key by itself: every node of a
//! deployment reads the same file (a Kubernetes Secret, say), so they
//! always agree.
//!
//! The file is JSON, `0600`:
//! `{"keys": [{"kid": "…", "secret": "<hex>", "sign_from": 1700000000, "verify_until": null}]}`.
//! Tokens are signed with the newest key whose `sign_from` has passed and
//! name it in their `kid`; any listed key verifies until its
//! `verify_until`. [`KeySet::rotate`] adds a key that signs only after
//! [`PROPAGATION`], so every node has reloaded the file before a token
//! signed with it arrives, and retires the old key once the tokens it
//! signed have expired. [`KeyRing::watch`] reloads the file when it
//! changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::platform::files::write_secret;

/// How long a rotated-in key waits before it signs: well above how often
/// nodes look at the file ([`RELOAD_EVERY`]).
pub const PROPAGATION: Duration = Duration::from_secs(60);

/// How often a node checks its key file for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Bytes of a generated secret.
const SECRET_BYTES: usize = 32;

/// Why a key file was not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a key set.
    #[error("{path}: not a key file: {reason}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No key of the file may sign now.
    #[error("{path}: no key may sign now (run `nexus keys rotate {path}` or `nexus keys generate`)")]
    NoSigningKey {
        /// The key file.
        path: PathBuf,
    },
}

/// One HMAC key.
#[derive(Clone, Serialize, Deserialize)]
pub struct SigningKey {
    /// Its id, named in the header of every token it signs.
    pub kid: String,
    /// The secret, hex-encoded in the file.
    #[serde(with = "hex_bytes")]
    pub secret: Vec<u8>,
    /// Seconds since the epoch from which it signs.
    pub sign_from: u64,
    /// Seconds since the epoch after which it verifies nothing; never
    /// while `None`.
    #[serde(default)]
    pub verify_until: Option<u64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("sign_from", &self.sign_from)
            .field("verify_until", &self.verify_until)
            .finish_non_exhaustive()
    }
}

/// The keys of a deployment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeySet {
    /// Every key that may still sign or verify.
    pub keys: Vec<SigningKey>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn fresh_key(sign_from: u64) -> SigningKey {
    let secret: [u8; SECRET_BYTES] = rand::random();
    let kid: [u8; 6] = rand::random();
    SigningKey { kid: hex_bytes::encode(&kid), secret: secret.to_vec(), sign_from, verify_until: None }
}

impl KeySet {
    /// A set of one new key that signs at once.
    pub fn generate() -> Self {
        KeySet { keys: vec![fresh_key(unix_now())] }
    }

    /// Adds a key that signs from `now + PROPAGATION`; each key without an
    /// end verifies until the tokens it signs before then have expired
    /// (`token_ttl`), and keys past their end are dropped.
    pub fn rotate(&mut self, now: u64, token_ttl: Duration) {
        let next = fresh_key(now + PROPAGATION.as_secs());
        let retire = next.sign_from + token_ttl.as_secs();
        self.keys.retain(|k| k.verify_until.is_none_or(|until| until > now));
        for key in &mut self.keys {
            key.verify_until = Some(key.verify_until.map_or(retire, |until| until.min(retire)));
        }
        self.keys.push(next);
    }

    /// The key that signs at `now`: the newest one whose time has come.
    pub fn signing(&self, now: u64) -> Option<&SigningKey> {
        self.keys
            .iter()
            .filter(|k| k.sign_from <= now && k.verify_until.is_none_or(|until| until > now))
            .max_by_key(|k| k.sign_from)
    }

    /// The key `kid`, if it still verifies at `now`.
    pub fn verifying(&self, kid: &str, now: u64) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid && k.verify_until.is_none_or(|until| until > now))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        let set: KeySet = serde_json::from_str(&text)
            .map_err(|e| KeyError::Malformed { path: path.to_owned(), reason: e.to_string() })?;
        if set.keys.iter().any(|k| k.secret.len() < 16) {
            return Err(KeyError::Malformed { path: path.to_owned(), reason: "a secret is under 16 bytes".into() });
        }
        if set.signing(unix_now()).is_none() {
            return Err(KeyError::NoSigningKey { path: path.to_owned() });
        }
        Ok(set)
    }

    /// Writes a key file, `0600`, atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| KeyError::Malformed { path: path.to_owned(), reason: e.to_string() })?;
        write_secret(path, &json).map_err(|source| KeyError::Io { path: path.to_owned(), source })
    }

    /// The key file at `path`, generated there first if there is none
    /// (`nexus dev`).
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return KeySet::load(path);
        }
        let set = KeySet::generate();
        set.save(path)?;
        tracing::info!(path = %path.display(), "generated a token-signing key file");
        Ok(set)
    }
}

/// The current keys of a node, shared by everything that signs or checks
/// tokens, and replaced when the key file changes.
#[derive(Clone)]
pub struct KeyRing {
    keys: Arc<RwLock<KeySet>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with(|set| f.debug_tuple("KeyRing").field(set).finish())
    }
}

impl KeyRing {
    /// A ring holding `keys`.
    pub fn new(keys: KeySet) -> Self {
        KeyRing { keys: Arc::new(RwLock::new(keys)) }
    }

    /// Runs `f` on the current keys.
    pub fn with<T>(&self, f: impl FnOnce(&KeySet) -> T) -> T {
        f(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, keys: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Reloads `path` on the current tokio runtime whenever its
    /// modification time changes, every [`RELOAD_EVERY`], for as long as
    /// the ring is in use. A file that does not load is logged and the
    /// keys in use stay.
    pub fn watch(&self, path: PathBuf) {
        let ring = Arc::downgrade(&self.keys);
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen = modified(&path);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(keys) = ring.upgrade() else { return };
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match KeySet::load(&path) {
                    Ok(set) => {
                        let kids: Vec<String> = set.keys.iter().map(|k| k.kid.clone()).collect();
                        KeyRing { keys }.replace(set);
                        tracing::info!(path = %path.display(), ?kids, "token-signing keys reloaded");
                    }
                    Err(error) => tracing::error!(%error, "token-signing keys not reloaded; the old ones stay"),
                }
            }
        });
    }
}

/// Hex encoding of the secrets in the key file.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(serde::de::Error::custom("a hex secret has an even number of digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                text.get(i..i + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(|| serde::de::Error::custom("the secret is not hex"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(12 * 3600);

    #[test]
    fn a_rotated_key_signs_after_propagation_and_the_old_one_verifies_until_its_tokens_expire() {
        let mut set = KeySet::generate();
        let now = unix_now();
        let old = set.keys[0].kid.clone();
        set.rotate(now, TTL);
        let new = set.keys[1].kid.clone();
        assert_eq!(set.signing(now).map(|k| k.kid.as_str()), Some(old.as_str()), "the old key signs meanwhile");
        let switch = now + PROPAGATION.as_secs();
        assert_eq!(set.signing(switch).map(|k| k.kid.as_str()), Some(new.as_str()));
        assert!(set.verifying(&new, now).is_some(), "nodes accept the new key before anyone signs with it");
        let last_old_token_expires = switch + TTL.as_secs();
        assert!(set.verifying(&old, last_old_token_expires - 1).is_some());
        assert!(set.verifying(&old, last_old_token_expires).is_none());
        set.rotate(last_old_token_expires + 1, TTL);
        assert!(set.keys.iter().all(|k| k.kid != old), "retired keys are dropped on the next rotation");
    }

    #[test]
    fn key_files_round_trip_and_refuse_garbage() {
        let dir = std::env::temp_dir().join(format!("nexus-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.json");
        let set = KeySet::load_or_generate(&path).expect("generated");
        let again = KeySet::load(&path).expect("loads");
        assert_eq!(again.keys[0].secret, set.keys[0].secret);
        std::fs::write(&path, "{\"keys\": [{\"kid\": \"a\", \"secret\": \"zz\", \"sign_from\": 0}]}").expect("write");
        assert!(matches!(KeySet::load(&path), Err(KeyError::Malformed { .. })));
        std::fs::write(&path, "{\"keys\": []}").expect("write");
        assert!(matches!(KeySet::load(&path), Err(KeyError::NoSigningKey { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let set = KeySet::generate();
        let secret = hex_bytes::encode(&set.keys[0].secret);
        assert!(!format!("{set:?}").contains(&secret));
    }
}
