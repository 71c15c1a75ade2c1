//! The gateway's metric families, registered in the node's registry so the
//! node's `/metrics` shows them. Names are stable and every label value
//! comes from an enum here, so a misspelt outcome does not compile. This
//! module only counts (and logs what it counts); deciding outcomes is the
//! proxy's job.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// How a request through the gateway ended: the `outcome` of
/// `nexus_gateway_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestOutcome {
    /// An instance answered (whatever its status).
    Proxied,
    /// No such panel, or no such gateway path.
    NotFound,
    /// A path of the panel's tool interface (`/mcp/*`, `/manifest`), which
    /// only its sidecar reaches.
    ToolPath,
    /// The instance refused, failed or has a bad address.
    BadGateway,
    /// Nothing serves the panel and nothing can start (or the records
    /// could not be read).
    Unavailable,
    /// The instance took too long to answer.
    Timeout,
    /// The request body is over the limit.
    TooLarge,
    /// The request head is over the limit.
    HeadersTooLarge,
    /// The App is starting and its queue is full.
    QueueFull,
    /// A held request waited past the activation deadline.
    ActivationTimeout,
    /// No valid credential for a private panel.
    Unauthorized,
    /// A valid credential, of someone who may not open this panel.
    Forbidden,
    /// The client failed while its request was held.
    ClientError,
    /// A Studio heartbeat passed on to its watchdog.
    Heartbeat,
}

impl RequestOutcome {
    /// Every outcome, so each series exists from the start.
    pub(crate) const ALL: [RequestOutcome; 14] = [
        RequestOutcome::Proxied,
        RequestOutcome::NotFound,
        RequestOutcome::ToolPath,
        RequestOutcome::BadGateway,
        RequestOutcome::Unavailable,
        RequestOutcome::Timeout,
        RequestOutcome::TooLarge,
        RequestOutcome::HeadersTooLarge,
        RequestOutcome::QueueFull,
        RequestOutcome::ActivationTimeout,
        RequestOutcome::Unauthorized,
        RequestOutcome::Forbidden,
        RequestOutcome::ClientError,
        RequestOutcome::Heartbeat,
    ];

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            RequestOutcome::Proxied => "proxied",
            RequestOutcome::NotFound => "not_found",
            RequestOutcome::ToolPath => "tool_path",
            RequestOutcome::BadGateway => "bad_gateway",
            RequestOutcome::Unavailable => "unavailable",
            RequestOutcome::Timeout => "timeout",
            RequestOutcome::TooLarge => "too_large",
            RequestOutcome::HeadersTooLarge => "headers_too_large",
            RequestOutcome::QueueFull => "queue_full",
            RequestOutcome::ActivationTimeout => "activation_timeout",
            RequestOutcome::Unauthorized => "unauthorized",
            RequestOutcome::Forbidden => "forbidden",
            RequestOutcome::ClientError => "client_error",
            RequestOutcome::Heartbeat => "heartbeat",
        }
    }
}

/// How a cold start ended: the `outcome` of
/// `nexus_gateway_activations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActivationOutcome {
    /// An instance appeared.
    Ready,
    /// Every waiting request gave up.
    Abandoned,
    /// The route went away or can no longer start.
    Gone,
}

impl ActivationOutcome {
    /// Every outcome, so each series exists from the start.
    pub(crate) const ALL: [ActivationOutcome; 3] =
        [ActivationOutcome::Ready, ActivationOutcome::Abandoned, ActivationOutcome::Gone];

    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ActivationOutcome::Ready => "ready",
            ActivationOutcome::Abandoned => "abandoned",
            ActivationOutcome::Gone => "gone",
        }
    }
}

/// Whether a traffic signal reached Redis: the `outcome` of
/// `nexus_gateway_last_request_writes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// Written.
    Ok,
    /// Redis refused or could not be reached.
    Error,
}

impl WriteOutcome {
    /// The label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            WriteOutcome::Ok => "ok",
            WriteOutcome::Error => "error",
        }
    }
}

/// The gateway's metric families. Cheap to clone.
#[derive(Clone)]
pub(crate) struct GatewayMetrics {
    /// `nexus_gateway_requests_total{outcome}`: requests by how they ended.
    requests: IntCounterVec,
    /// `nexus_gateway_activations_total{outcome}`: cold starts asked for.
    activations: IntCounterVec,
    /// `nexus_gateway_cold_start_seconds`: first queued request → endpoints.
    pub(crate) cold_start: Histogram,
    /// `nexus_gateway_queued_requests`: requests held by the activator now.
    pub(crate) queued: IntGauge,
    /// `nexus_gateway_last_request_writes_total{outcome}`: traffic signals written.
    last_request_writes: IntCounterVec,
    /// `nexus_gateway_reactivations_total`: requests every instance of an
    /// App refused (scaled to zero under a stale route), held for a new one.
    pub(crate) reactivations: IntCounter,
    /// `requests{outcome="proxied"}`, resolved once: it is counted on every
    /// proxied request, where the label lookup (hash and lock) would cost.
    proxied: IntCounter,
}

impl GatewayMetrics {
    /// Registers the families; fails if a gateway already registered them
    /// in this registry (one gateway per node).
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
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
        let reactivations = IntCounter::new(
            "nexus_gateway_reactivations_total",
            "Requests to an App whose every instance refused the connection, held for a new instance",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(activations.clone()))?;
        registry.register(Box::new(cold_start.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(last_request_writes.clone()))?;
        registry.register(Box::new(reactivations.clone()))?;
        // Present from the start, so dashboards see zeros, not gaps.
        for outcome in RequestOutcome::ALL {
            requests.with_label_values(&[outcome.label()]);
        }
        for outcome in ActivationOutcome::ALL {
            activations.with_label_values(&[outcome.label()]);
        }
        let proxied = requests.with_label_values(&[RequestOutcome::Proxied.label()]);
        Ok(GatewayMetrics { requests, activations, cold_start, queued, last_request_writes, reactivations, proxied })
    }

    /// Counts one finished request.
    pub(crate) fn request(&self, outcome: RequestOutcome, panel: &str) {
        let label = outcome.label();
        match outcome {
            RequestOutcome::Proxied => {
                self.proxied.inc();
                tracing::trace!(outcome = label, panel, "nexus_gateway_requests_total");
            }
            _ => {
                self.requests.with_label_values(&[label]).inc();
                tracing::info!(outcome = label, panel, "nexus_gateway_requests_total");
            }
        }
    }

    /// Counts one finished activation that took `seconds`.
    pub(crate) fn activation(&self, outcome: ActivationOutcome, panel: &str, seconds: f64) {
        if outcome == ActivationOutcome::Ready {
            self.cold_start.observe(seconds);
        }
        self.activations.with_label_values(&[outcome.label()]).inc();
        tracing::info!(panel, outcome = outcome.label(), seconds, "nexus_gateway_activations_total");
    }

    /// Counts one write of a panel's traffic signal.
    pub(crate) fn last_request_write(&self, outcome: WriteOutcome) {
        self.last_request_writes.with_label_values(&[outcome.label()]).inc();
    }
}
