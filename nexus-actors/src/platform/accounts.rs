//! User accounts: who may log in, with which role, and which of their
//! tokens still count.
//!
//! Key: `nexus:user:{name}`, a hash of `password_hash` (Argon2 PHC
//! string), `role` (`admin` or `user`; absent means `user`) and `gen`, the
//! token generation: a token is valid only while it carries the user's
//! current generation, so bumping it revokes every token issued before.
//!
//! This module reads and writes accounts; who may create or revoke them is
//! decided by the API, and passwords are hashed by [`super::auth`].

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::store::{Redis, StoreError};

/// What a user may do beyond their own panels and documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    /// Creates users, revokes anyone's tokens, reads the mailbox graph.
    Admin,
    /// Reaches only their own panels and documents.
    User,
}

impl UserRole {
    /// The name stored in Redis and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::User => "user",
        }
    }

    fn parse(stored: Option<&str>) -> UserRole {
        match stored {
            Some("admin") => UserRole::Admin,
            _ => UserRole::User,
        }
    }
}

/// What a token is checked against: the user's role and token generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The user's role now (a demoted admin loses it at once).
    pub role: UserRole,
    /// Tokens carrying an older generation are revoked.
    pub generation: u64,
}

/// Largest username.
pub const MAX_USERNAME: usize = 64;

/// Why a username is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// Empty or longer than [`MAX_USERNAME`].
    #[error("username must be 1 to {MAX_USERNAME} characters")]
    Length,
    /// A character outside letters, digits, `.`, `_` and `-`.
    #[error("username may hold letters, digits, '.', '_' and '-'")]
    Characters,
}

/// Checks a username: it becomes part of Redis keys and channel names, so
/// it holds no `:`, `*` or spaces.
pub fn check_username(name: &str) -> Result<(), UsernameError> {
    if name.is_empty() || name.len() > MAX_USERNAME {
        return Err(UsernameError::Length);
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(UsernameError::Characters);
    }
    Ok(())
}

fn user_key(name: &str) -> String {
    format!("nexus:user:{name}")
}

/// Creates the user only if the name is free.
const CREATE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'password_hash', ARGV[1], 'role', ARGV[2], 'gen', 0)
return 1
";

/// Bumps the token generation of an existing user; nil when there is none.
const REVOKE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'gen', 1)
";

/// The accounts in Redis. Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    redis: Redis,
}

impl Accounts {
    /// Accounts over an existing connection.
    pub fn new(redis: Redis) -> Self {
        Accounts { redis }
    }

    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Accounts::new(Redis::connect(url).await?))
    }

    /// Creates a user unless the name is taken; false when it is.
    pub async fn create(&self, name: &str, password_hash: &str, role: UserRole) -> Result<bool, StoreError> {
        let created: i64 = redis::Script::new(CREATE_SCRIPT)
            .key(user_key(name))
            .arg(password_hash)
            .arg(role.as_str())
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(created == 1)
    }

    /// Creates a user or sets their password and role (an operator's
    /// first user). Tokens issued before stay valid.
    pub async fn set(&self, name: &str, password_hash: &str, role: UserRole) -> Result<(), StoreError> {
        let () = self
            .redis
            .conn()
            .hset_multiple(user_key(name), &[("password_hash", password_hash), ("role", role.as_str())])
            .await?;
        Ok(())
    }

    /// The user's password hash, if the user exists.
    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.redis.read(|mut c| async move { c.hget(user_key(name), "password_hash").await }).await
    }

    /// The user's role and token generation, if the user exists.
    pub async fn standing(&self, name: &str) -> Result<Option<Standing>, StoreError> {
        let (hash, role, generation): (Option<String>, Option<String>, Option<u64>) = self
            .redis
            .read(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(user_key(name))
                    .arg("password_hash")
                    .arg("role")
                    .arg("gen")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(hash.map(|_| Standing { role: UserRole::parse(role.as_deref()), generation: generation.unwrap_or(0) }))
    }

    /// Revokes every token of `name` issued so far; the new generation, or
    /// `None` when there is no such user.
    pub async fn revoke(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let generation: Option<u64> =
            redis::Script::new(REVOKE_SCRIPT).key(user_key(name)).invoke_async(&mut self.redis.conn()).await?;
        Ok(generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_safe_in_keys_and_channels() {
        assert_eq!(check_username("ada.lovelace-1_"), Ok(()));
        assert_eq!(check_username(""), Err(UsernameError::Length));
        assert_eq!(check_username(&"a".repeat(MAX_USERNAME + 1)), Err(UsernameError::Length));
        for bad in ["a:b", "a*", "a b", "ü", "a/b"] {
            assert_eq!(check_username(bad), Err(UsernameError::Characters), "{bad}");
        }
    }

    #[test]
    fn an_unknown_stored_role_is_a_plain_user() {
        assert_eq!(UserRole::parse(Some("admin")), UserRole::Admin);
        assert_eq!(UserRole::parse(Some("root")), UserRole::User);
        assert_eq!(UserRole::parse(None), UserRole::User);
    }
}
