//! The traffic signal: `nexus:panel:{id}:last-request`, which panel
//! managers read to scale idle Apps to zero. Written at most once per
//! [`TOUCH_EVERY`] per panel, off the request path. Only requests the
//! access check let through are traffic; this module does not decide that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use super::metrics::{GatewayMetrics, WriteOutcome};
use crate::instance::last_request_key;
use crate::kernel::lock;

/// How long a panel's traffic signal is not written again.
pub(crate) const TOUCH_EVERY: Duration = Duration::from_secs(1);

/// Panels whose last signal is remembered; past it the memory is cleared
/// (the worst case is one extra write per panel).
const REMEMBERED: usize = 100_000;

/// Writes the traffic signal of panels.
pub(crate) struct Traffic {
    redis: ConnectionManager,
    last: Mutex<HashMap<String, Instant>>,
    runtime: tokio::runtime::Handle,
    metrics: GatewayMetrics,
}

impl Traffic {
    /// Writes through `redis`, from tasks on `runtime`.
    pub(crate) fn new(redis: ConnectionManager, runtime: tokio::runtime::Handle, metrics: GatewayMetrics) -> Arc<Self> {
        Arc::new(Traffic { redis, last: Mutex::default(), runtime, metrics })
    }

    /// Records traffic for `panel` now, unless it was recorded lately.
    /// Returns when it was last recorded (now, or the recent time that
    /// made this call skip it).
    pub(crate) fn touch(&self, panel: &str) -> Instant {
        let now = Instant::now();
        {
            let mut last = lock(&self.last);
            match last.get_mut(panel) {
                Some(at) if now.duration_since(*at) < TOUCH_EVERY => return *at,
                Some(at) => *at = now,
                None => {
                    if last.len() >= REMEMBERED {
                        last.clear();
                    }
                    last.insert(panel.to_owned(), now);
                }
            }
        }
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (mut conn, key, metrics) = (self.redis.clone(), last_request_key(panel), self.metrics.clone());
        let panel = panel.to_owned();
        // Spawned on the proxy's runtime by handle: a body may be dropped
        // after it stopped, and then the write is simply skipped.
        self.runtime.spawn(async move {
            let written: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg(ms).query_async(&mut conn).await;
            match written {
                Ok(()) => metrics.last_request_write(WriteOutcome::Ok),
                Err(error) => {
                    metrics.last_request_write(WriteOutcome::Error);
                    tracing::warn!(panel, %error, "nexus_gateway_last_request_writes_total");
                }
            }
        });
        now
    }
}
