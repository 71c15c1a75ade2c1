//! The activator: holds requests for an App scaled to zero while a panel
//! manager starts an instance, like Knative's activator.
//!
//! Each panel has a bounded queue ([`Activator::admit`] refuses past it).
//! The first request admitted starts one driver task per panel that
//! publishes [`Activate`] on [`channels::ACTIVATE`] and repeats it
//! every [`REPUBLISH_EVERY`] until the route has a usable endpoint
//! (recording the cold start), the route is gone, or nobody waits any
//! more. A request may also arrive with endpoints that refused it: the
//! gateway's route still named an instance that was scaled to zero under
//! it. Those addresses do not count as usable for that activation. Every held
//! request waits for the route on its own and is forwarded by its own
//! handler, so each is sent exactly once. Starting instances is the panel
//! manager's job; forwarding is the proxy's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::metrics::{ActivationOutcome, GatewayMetrics};
use super::routes::Routes;
use crate::envelope::Envelope;
use crate::instance::{Activate, PanelRoute};
use crate::kernel::lock;
use crate::platform::channels;

/// How often a held panel's activation is announced again: panel managers
/// may have missed it (pub/sub) or may have restarted.
pub(crate) const REPUBLISH_EVERY: Duration = Duration::from_secs(2);

/// Whether a held request can stop waiting: the route has an endpoint
/// other than the ones that `refused` it, is gone, or is no longer
/// activatable.
pub(crate) fn settled(route: Option<&PanelRoute>, refused: &[String]) -> bool {
    route.is_none_or(|r| usable(r, refused) || !r.activatable)
}

/// Whether `route` has an endpoint other than the `refused` addresses.
pub(crate) fn usable(route: &PanelRoute, refused: &[String]) -> bool {
    route.endpoints.iter().any(|e| !refused.contains(&e.addr))
}

/// Holds requests for Apps scaled to zero and asks for their activation.
pub(crate) struct Activator {
    pending: Mutex<HashMap<String, Pending>>,
    capacity: usize,
    routes: Routes,
    redis: ConnectionManager,
    node: String,
    metrics: GatewayMetrics,
    next_id: std::sync::atomic::AtomicU64,
}

/// One panel's activation in progress.
struct Pending {
    id: u64,
    queued: usize,
    /// Endpoint addresses that refused a request of this activation.
    refused: Vec<String>,
}

/// A place in a panel's queue, given back when dropped.
pub(crate) struct Slot {
    activator: Arc<Activator>,
    panel: String,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.activator.metrics.queued.dec();
        let mut pending = lock(&self.activator.pending);
        // The activation this slot belonged to may have ended and a new one
        // begun; only its own count is given back.
        if let Some(p) = pending.get_mut(&self.panel).filter(|p| p.id == self.id) {
            p.queued -= 1;
        }
    }
}

impl Activator {
    /// An activator holding at most `capacity` requests per panel.
    pub(crate) fn new(
        capacity: usize,
        routes: Routes,
        redis: ConnectionManager,
        node: String,
        metrics: GatewayMetrics,
    ) -> Arc<Self> {
        Arc::new(Activator {
            pending: Mutex::default(),
            capacity,
            routes,
            redis,
            node,
            metrics,
            next_id: Default::default(),
        })
    }

    /// A place in `panel`'s queue, or `None` when it is full. The first
    /// place of an activation starts its driver (on the current runtime).
    /// `refused` are endpoint addresses that refused this request: the
    /// activation is not over while the route names only those.
    pub(crate) fn admit(self: &Arc<Self>, panel: &str, refused: &[String]) -> Option<Slot> {
        let mut pending = lock(&self.pending);
        let p = match pending.get_mut(panel) {
            Some(p) => p,
            None => {
                let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let since = Instant::now();
                tracing::info!(panel, "activating a panel scaled to zero");
                tokio::spawn(self.clone().drive(panel.to_owned(), id, since));
                pending.entry(panel.to_owned()).or_insert(Pending { id, queued: 0, refused: Vec::new() })
            }
        };
        if p.queued >= self.capacity {
            return None;
        }
        for addr in refused {
            if !p.refused.contains(addr) {
                p.refused.push(addr.clone());
            }
        }
        p.queued += 1;
        self.metrics.queued.inc();
        Some(Slot { activator: self.clone(), panel: panel.to_owned(), id: p.id })
    }

    /// Announces the activation until it settles. See the module docs.
    async fn drive(self: Arc<Self>, panel: String, id: u64, since: Instant) {
        loop {
            self.publish(&panel).await;
            let until = tokio::time::Instant::now() + REPUBLISH_EVERY;
            // Read live: a request refused meanwhile adds its addresses.
            let route = self.routes.await_route(&panel, until, |r| settled(r, &self.refused(&panel, id))).await;
            let refused = self.refused(&panel, id);
            let mut pending = lock(&self.pending);
            let waiting = pending.get(&panel).filter(|p| p.id == id).map_or(0, |p| p.queued);
            let outcome = match route.as_deref() {
                Some(r) if usable(r, &refused) => ActivationOutcome::Ready,
                None => ActivationOutcome::Gone,
                Some(r) if !r.activatable => ActivationOutcome::Gone,
                Some(_) if waiting == 0 => ActivationOutcome::Abandoned,
                Some(_) => continue,
            };
            if pending.get(&panel).is_some_and(|p| p.id == id) {
                pending.remove(&panel);
            }
            drop(pending);
            self.metrics.activation(outcome, &panel, since.elapsed().as_secs_f64());
            return;
        }
    }

    /// The addresses that refused requests of activation `id` of `panel`.
    fn refused(&self, panel: &str, id: u64) -> Vec<String> {
        lock(&self.pending).get(panel).filter(|p| p.id == id).map(|p| p.refused.clone()).unwrap_or_default()
    }

    async fn publish(&self, panel: &str) {
        let envelope = Envelope::new(self.node.clone(), Activate { panel: panel.to_owned() });
        let mut conn = self.redis.clone();
        let sent: redis::RedisResult<u64> =
            redis::cmd("PUBLISH").arg(channels::ACTIVATE).arg(envelope.encode()).query_async(&mut conn).await;
        match sent {
            Ok(0) => tracing::warn!(panel, "activation announced but no panel manager listens"),
            Ok(_) => tracing::debug!(panel, "activation announced"),
            // The next announcement retries; held requests keep waiting.
            Err(error) => tracing::warn!(panel, %error, "could not announce an activation"),
        }
    }
}
