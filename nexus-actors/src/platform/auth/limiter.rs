//! Failed-login limits, per client address and per username, shared by
//! every node through Redis so that spreading a guessing run over nodes
//! gains nothing.
//!
//! Keys: `nexus:login-failures:addr:{address}` and
//! `nexus:login-failures:user:{name}`, counters that expire one window
//! after the first failure in it; their number is bounded by the failures
//! of one window. An IPv6 client counts by its /64, since one host holds a
//! whole /64.
//!
//! The check runs before any password is hashed, so a refused attempt
//! costs one Redis round trip and no hashing.

use std::net::IpAddr;
use std::time::Duration;

use super::super::store::{Redis, StoreError};

/// How many failed logins are allowed per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures from one client address.
    pub per_address: u32,
    /// Failures for one username, from anywhere.
    pub per_user: u32,
    /// How long failures are counted.
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits { per_address: 20, per_user: 10, window: Duration::from_secs(60) }
    }
}

/// Counts failed logins and refuses attempts past the limits.
#[derive(Clone)]
pub struct LoginLimiter {
    redis: Redis,
    limits: LoginLimits,
}

/// The client is over a limit; it may try again in `retry_after` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Seconds until the counter that refused expires.
    pub retry_after: u64,
}

/// The address a client's failures count against.
fn address_key(addr: IpAddr) -> String {
    let counted = match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    };
    format!("nexus:login-failures:addr:{counted}")
}

fn user_key(name: &str) -> String {
    format!("nexus:login-failures:user:{name}")
}

impl LoginLimiter {
    /// A limiter over `redis`.
    pub fn new(redis: Redis, limits: LoginLimits) -> Self {
        LoginLimiter { redis, limits }
    }

    /// Refuses an attempt from `addr` for `user` when either is over its limit.
    pub async fn check(&self, addr: Option<IpAddr>, user: &str) -> Result<Result<(), Limited>, StoreError> {
        let mut pipe = redis::pipe();
        let address = addr.map(address_key);
        let user = user_key(user);
        pipe.cmd("GET").arg(&user).cmd("PTTL").arg(&user);
        if let Some(address) = &address {
            pipe.cmd("GET").arg(address).cmd("PTTL").arg(address);
        }
        let replies: Vec<Option<i64>> = self
            .redis
            .read(|mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let over = |count: Option<i64>, limit: u32| count.unwrap_or(0) >= i64::from(limit);
        let retry = |pttl: Option<i64>| Limited { retry_after: (pttl.unwrap_or(1000).max(1000) as u64).div_ceil(1000) };
        let (user_count, user_ttl) = (replies.first().copied().flatten(), replies.get(1).copied().flatten());
        if over(user_count, self.limits.per_user) {
            return Ok(Err(retry(user_ttl)));
        }
        let (addr_count, addr_ttl) = (replies.get(2).copied().flatten(), replies.get(3).copied().flatten());
        if over(addr_count, self.limits.per_address) {
            return Ok(Err(retry(addr_ttl)));
        }
        Ok(Ok(()))
    }

    /// Counts a failed attempt.
    pub async fn failed(&self, addr: Option<IpAddr>, user: &str) -> Result<(), StoreError> {
        let window = self.limits.window.as_secs().max(1);
        let mut pipe = redis::pipe();
        let mut count = |key: String| {
            pipe.cmd("INCR").arg(&key).ignore().cmd("EXPIRE").arg(&key).arg(window).arg("NX").ignore();
        };
        count(user_key(user));
        if let Some(addr) = addr {
            count(address_key(addr));
        }
        let () = pipe.query_async(&mut self.redis.conn()).await?;
        Ok(())
    }

    /// Forgets the failures of `user` after they logged in.
    pub async fn succeeded(&self, user: &str) -> Result<(), StoreError> {
        let () = redis::cmd("DEL").arg(user_key(user)).query_async(&mut self.redis.conn()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("v6");
        assert_eq!(address_key(a), address_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("mapped");
        assert_eq!(address_key(mapped), "nexus:login-failures:addr:10.0.0.1");
    }
}
