//! The gateway's metric families, registered in the node's registry so the
//! node's `/metrics` shows them. Names are stable; this module only counts.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Outcomes of `nexus_gateway_requests_total{outcome}`.
pub const REQUEST_OUTCOMES: [&str; 13] = [
    "proxied",
    "not_found",
    "bad_gateway",
    "unavailable",
    "timeout",
    "too_large",
    "headers_too_large",
    "queue_full",
    "activation_timeout",
    "unauthorized",
    "forbidden",
    "client_error",
    "heartbeat",
];

/// Outcomes of `nexus_gateway_activations_total{outcome}`: an instance
/// appeared, every waiting request gave up, or the route went away.
pub const ACTIVATION_OUTCOMES: [&str; 3] = ["ready", "abandoned", "gone"];

#[derive(Clone)]
pub struct GatewayMetrics {
    /// `nexus_gateway_requests_total{outcome}`: requests by how they ended.
    pub requests: IntCounterVec,
    /// `nexus_gateway_activations_total{outcome}`: cold starts asked for.
    pub activations: IntCounterVec,
    /// `nexus_gateway_cold_start_seconds`: first queued request → endpoints.
    pub cold_start: Histogram,
    /// `nexus_gateway_queued_requests`: requests held by the activator now.
    pub queued: IntGauge,
    /// `nexus_gateway_last_request_writes_total`: traffic signals written.
    pub last_request_writes: IntCounterVec,
    /// `nexus_gateway_reactivations_total`: requests every instance of an
    /// App refused (scaled to zero under a stale route), held for a new one.
    pub reactivations: IntCounter,
    /// `requests{outcome="proxied"}`, resolved once: it is counted on every
    /// proxied request, where the label lookup (hash and lock) would cost.
    proxied: IntCounter,
}

impl GatewayMetrics {
    /// Registers the families; fails if a gateway already registered them
    /// in this registry (one gateway per node).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("nexus_gateway_requests_total", "Requests through the gateway, by outcome"),
            &["outcome"],
        )?;
        let activations = IntCounterVec::new(
            Opts::new("nexus_gateway_activations_total", "Cold starts of scaled-to-zero Apps, by outcome"),
            &["outcome"],
        )?;
        let cold_start = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_gateway_cold_start_seconds",
                "From the first request held for an App scaled to zero until it has an instance",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0]),
        )?;
        let queued = IntGauge::new("nexus_gateway_queued_requests", "Requests held while an App cold-starts")?;
        let last_request_writes = IntCounterVec::new(
            Opts::new("nexus_gateway_last_request_writes_total", "Writes of a panel's last-request key, by outcome"),
            &["outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(activations.clone()))?;
        registry.register(Box::new(cold_start.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        let reactivations = IntCounter::new(
            "nexus_gateway_reactivations_total",
            "Requests to an App whose every instance refused the connection, held for a new instance",
        )?;
        registry.register(Box::new(last_request_writes.clone()))?;
        registry.register(Box::new(reactivations.clone()))?;
        // Present from the start, so dashboards see zeros, not gaps.
        for outcome in REQUEST_OUTCOMES {
            requests.with_label_values(&[outcome]);
        }
        for outcome in ACTIVATION_OUTCOMES {
            activations.with_label_values(&[outcome]);
        }
        let proxied = requests.with_label_values(&["proxied"]);
        Ok(GatewayMetrics { requests, activations, cold_start, queued, last_request_writes, reactivations, proxied })
    }

    /// Counts one finished request.
    pub fn request(&self, outcome: &'static str, panel: &str) {
        match outcome {
            "proxied" => {
                self.proxied.inc();
                tracing::trace!(outcome, panel, "nexus_gateway_requests_total");
            }
            _ => {
                self.requests.with_label_values(&[outcome]).inc();
                tracing::info!(outcome, panel, "nexus_gateway_requests_total");
            }
        }
    }
}
