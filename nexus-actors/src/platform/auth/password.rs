//! Password hashing (Argon2id) kept off the HTTP workers.
//!
//! Hashing is deliberately slow, so each hash runs on the blocking pool
//! behind a semaphore of [`Passwords::new`]'s `permits`, and at most
//! `max_waiting` requests wait for one; past that a login is refused with
//! [`PasswordError::Busy`] at once instead of queueing without bound. An
//! unknown user is checked against a decoy hash, so a login costs the same
//! work whether or not the user exists.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::Semaphore;

/// Why a password could not be checked or hashed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Too many hashes are waiting already.
    #[error("too many logins are being checked at once")]
    Busy,
    /// The blocking pool or the hasher failed.
    #[error("hashing failed: {0}")]
    Failed(String),
}

/// Hashes and checks passwords. Cheap to clone.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Hashes running or waiting.
    waiting: Arc<AtomicUsize>,
    /// Hashes that may run or wait at once.
    capacity: usize,
    decoy: Arc<str>,
}

/// Leaves the count of waiting hashes when dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hashes `password` with a fresh salt (slow: run it off async workers).
pub fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Failed(e.to_string()))
}

fn matches_blocking(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

impl Passwords {
    /// At most `permits` hashes at once and `max_waiting` waiting.
    pub fn new(permits: usize, max_waiting: usize) -> Self {
        let decoy = hash_blocking("a decoy nobody can log in with").unwrap_or_default();
        Passwords {
            permits: Arc::new(Semaphore::new(permits.max(1))),
            waiting: Arc::default(),
            capacity: permits.max(1) + max_waiting,
            decoy: decoy.into(),
        }
    }

    /// One hash at a time per core, but one core left to serve the API.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Passwords::new((cores / 2).max(1), 64)
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, PasswordError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(PasswordError::Busy);
        }
        let waiting = Waiting(self.waiting.clone());
        let _permit = self.permits.acquire().await.map_err(|e| PasswordError::Failed(e.to_string()))?;
        let result = actix_web::web::block(work).await.map_err(|e| PasswordError::Failed(e.to_string()));
        drop(waiting);
        result
    }

    /// Whether `password` matches `hash`; with no hash (no such user) the
    /// same work is done against the decoy and the answer is false.
    pub async fn matches(&self, password: &str, hash: Option<String>) -> Result<bool, PasswordError> {
        let (password, known) = (password.to_owned(), hash.is_some());
        let hash = hash.unwrap_or_else(|| self.decoy.to_string());
        let matched = self.run(move || matches_blocking(&password, &hash)).await?;
        Ok(known && matched)
    }

    /// A hash of `password` with a fresh salt.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let password = password.to_owned();
        self.run(move || hash_blocking(&password)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn passwords_hash_and_match_and_unknown_users_never_match() {
        let passwords = Passwords::new(1, 4);
        let hash = passwords.hash("correct horse").await.expect("hash");
        assert!(passwords.matches("correct horse", Some(hash.clone())).await.expect("check"));
        assert!(!passwords.matches("wrong", Some(hash)).await.expect("check"));
        assert!(!passwords.matches("a decoy nobody can log in with", None).await.expect("check"));
        assert!(!passwords.matches("x", Some("garbage".into())).await.expect("check"));
    }

    #[actix_rt::test]
    async fn past_the_waiting_room_a_hash_is_refused_at_once() {
        let passwords = Passwords::new(1, 1);
        let attempts = (0..8).map(|_| passwords.matches("guess", None));
        let outcomes = futures::future::join_all(attempts).await;
        let busy = outcomes.iter().filter(|o| matches!(o, Err(PasswordError::Busy))).count();
        assert!(busy >= 5, "one runs and one waits; the rest are refused, not queued: {busy} busy");
        assert_eq!(passwords.waiting.load(Ordering::SeqCst), 0, "every waiter left");
    }
}
