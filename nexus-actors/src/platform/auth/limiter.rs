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
//! costs one Redis round trip and no hashing; it counts the attempt at the
//! same time (taken back when the login succeeds), so a burst of parallel
//! attempts gets no more through than the limit.

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

    /// Admits an attempt from `addr` for `user`, counting it as a failure
    /// until [`LoginLimiter::succeeded`] says otherwise, or refuses it when
    /// either is over its limit. Counting before the password is checked,
    /// in one script, means a burst of concurrent attempts cannot all pass
    /// the check while the first ones are still being hashed.
    pub async fn admit(&self, addr: Option<IpAddr>, user: &str) -> Result<Result<(), Limited>, StoreError> {
        let script = redis::Script::new(ADMIT_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation.key(user_key(user));
        if let Some(addr) = addr {
            invocation.key(address_key(addr));
        }
        let (admitted, pttl): (i64, i64) = invocation
            .arg(self.limits.per_user)
            .arg(self.limits.per_address)
            .arg(self.limits.window.as_secs().max(1))
            .invoke_async(&mut self.redis.conn())
            .await?;
        if admitted == 1 {
            return Ok(Ok(()));
        }
        Ok(Err(Limited { retry_after: (pttl.max(1000) as u64).div_ceil(1000) }))
    }

    /// Takes back the attempt of a user who logged in: their failures are
    /// forgotten, and the attempt does not count against the address.
    pub async fn succeeded(&self, addr: Option<IpAddr>, user: &str) -> Result<(), StoreError> {
        let script = redis::Script::new(SUCCEEDED_SCRIPT);
        let mut invocation = script.prepare_invoke();
        invocation.key(user_key(user));
        if let Some(addr) = addr {
            invocation.key(address_key(addr));
        }
        let () = invocation.invoke_async(&mut self.redis.conn()).await?;
        Ok(())
    }
}

/// KEYS: the user's counter, then the address's (optional). ARGV: the
/// user limit, the address limit, the window in seconds. Returns
/// `{1, 0}` and counts the attempt, or `{0, pttl}` of the counter that is
/// over its limit and counts nothing.
const ADMIT_SCRIPT: &str = r"
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= limits[i] then
    return {0, redis.call('PTTL', key)}
  end
end
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[3], 'NX')
end
return {1, 0}
";

/// KEYS: the user's counter, then the address's (optional).
const SUCCEEDED_SCRIPT: &str = r"
redis.call('DEL', KEYS[1])
if KEYS[2] and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
  redis.call('DECR', KEYS[2])
end
return 0
";

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
