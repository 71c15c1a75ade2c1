//! Telemetry: Prometheus metrics of a node, `tracing` set-up with optional
//! OTLP export, and W3C trace-context propagation across buses.
//!
//! It owns metric names (stable, `nexus_<thing>_total`) and the conversion
//! between spans and `traceparent` strings; it does not decide what to count.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::bus::{Bus, BusErrorKind};

/// The metric families of one node. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `nexus_actor_messages_total{actor}`: messages handled, by actor kind.
    pub actor_messages: IntCounterVec,
    /// `nexus_actor_restarts_total{actor}`: actor restarts after a panicking handler.
    pub actor_restarts: IntCounterVec,
    /// `nexus_actor_panics_total{actor}`: panics in handlers and their reply futures.
    pub actor_panics: IntCounterVec,
    /// `nexus_mailbox_depth{actor}`: messages waiting, summed by actor kind; set fresh on each
    /// [`crate::kernel::Kernel::render_metrics`].
    pub mailbox_depth: IntGaugeVec,
    /// `nexus_mailbox_dropped_total{actor}`: messages refused by a full mailbox.
    pub mailbox_dropped: IntCounterVec,
    /// `nexus_bus_published_total{bus,topic}`: messages published; `bus` is [`Bus::as_str`],
    /// `topic` a Kafka topic or a Redis channel cut to its first two segments.
    pub bus_published: IntCounterVec,
    /// `nexus_bus_received_total{bus,topic}`: messages received, labelled as `bus_published`.
    pub bus_received: IntCounterVec,
    /// `nexus_bus_errors_total{bus,kind}`: bus errors; count them with [`Metrics::bus_error`].
    pub bus_errors: IntCounterVec,
    /// `nexus_bus_redelivered_total{bus,topic}`: deliveries retried after a subscriber did not acknowledge.
    pub bus_redelivered: IntCounterVec,
    /// `nexus_sessions_too_slow_total`: WebSocket clients disconnected for not reading.
    pub sessions_too_slow: prometheus::IntCounter,
    /// `nexus_mcp_listens_too_slow_total`: MCP listens dropped for not reading.
    pub mcp_listens_too_slow: prometheus::IntCounter,
    /// `nexus_mcp_sessions_too_slow_total`: MCP sessions ended because their client did not read.
    pub mcp_sessions_too_slow: prometheus::IntCounter,
    /// `nexus_mcp_sessions_evicted_total`: MCP sessions ended to make way for a new one of their user.
    pub mcp_sessions_evicted: prometheus::IntCounter,
    /// `nexus_mcp_sessions`: MCP sessions the node holds.
    pub mcp_sessions: prometheus::IntGauge,
    /// `nexus_redis_subscriptions`: channels and patterns the node's Redis bridge holds.
    pub redis_subscriptions: prometheus::IntGauge,
    /// `nexus_mcp_exec_total{tool,outcome}`: tool calls by tool and outcome.
    pub mcp_exec: IntCounterVec,
    /// `nexus_tool_call_duration_seconds{tool}`: tool call latency, caller side.
    pub tool_call_seconds: HistogramVec,
    /// `nexus_sidecar_calls_total{outcome}`: calls a sidecar passed to its panel.
    pub sidecar_calls: IntCounterVec,
    /// `nexus_sidecar_manifest_total{outcome}`: manifest reads by outcome.
    pub sidecar_manifest: IntCounterVec,
    /// `nexus_sidecar_published_total`: panel messages published through the proxy.
    pub sidecar_published: prometheus::IntCounter,
    /// `nexus_tool_records_dropped_total`: tool call records not produced to
    /// Kafka because the recorder's queue was full (none expected).
    pub tool_records_dropped: prometheus::IntCounter,
    /// `nexus_sidecar_refused_total{reason}`: panel messages the proxy refused.
    pub sidecar_refused: IntCounterVec,
    /// `nexus_tool_late_answers_total{at}`: answers that came after their
    /// call had ended (cancelled or timed out) and were dropped, at the
    /// `caller` node or the panel's `sidecar`.
    pub tool_late_answers: IntCounterVec,
    /// `nexus_watchdog_heartbeats_total`: heartbeats a watchdog received.
    pub watchdog_heartbeats: prometheus::IntCounter,
    /// `nexus_watchdog_expiries_total`: instances a watchdog found without heartbeats for too long.
    pub watchdog_expiries: prometheus::IntCounter,
    /// `nexus_panel_instances{mode,state}`: live panel instances on this node.
    pub panel_instances: IntGaugeVec,
    /// `nexus_panel_instance_restarts_total`: user processes restarted after a crash.
    pub panel_instance_restarts: prometheus::IntCounter,
    /// `nexus_panel_instance_failures_total`: instances that ended in `failed`.
    pub panel_instance_failures: prometheus::IntCounter,
    /// `nexus_panel_resyncs_total`: times a panel manager wrote its routes
    /// and statuses to Redis again.
    pub panel_resyncs: prometheus::IntCounter,
    /// `nexus_kube_api_retries_total`: Kubernetes API calls of the
    /// `kubernetes` driver tried again (5xx, 429, timeouts, quota).
    pub kube_api_retries: prometheus::IntCounter,
    /// `nexus_kube_watch_events_total{kind}`: Pod and Knative Service
    /// changes the `kubernetes` driver's watches saw.
    pub kube_watch_events: prometheus::IntCounterVec,
    /// `nexus_panel_instance_start_seconds{mode}`: from start to the first ready.
    pub panel_instance_start_seconds: HistogramVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once per registry");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered in a registry of their own (one per kernel).
    pub fn new() -> Self {
        let registry = Registry::new();
        let sessions_too_slow = prometheus::IntCounter::new(
            "nexus_sessions_too_slow_total",
            "WebSocket clients disconnected for not reading",
        )
        .expect("valid metric definition");
        registry.register(Box::new(sessions_too_slow.clone())).expect("metric registered once");
        let mcp_listens_too_slow = prometheus::IntCounter::new(
            "nexus_mcp_listens_too_slow_total",
            "MCP subscriptions/listen requests dropped because their client did not read",
        )
        .expect("valid metric definition");
        registry.register(Box::new(mcp_listens_too_slow.clone())).expect("metric registered once");
        let mcp_sessions_too_slow = prometheus::IntCounter::new(
            "nexus_mcp_sessions_too_slow_total",
            "MCP sessions ended because their client did not read its streams",
        )
        .expect("valid metric definition");
        registry.register(Box::new(mcp_sessions_too_slow.clone())).expect("metric registered once");
        let mcp_sessions_evicted = prometheus::IntCounter::new(
            "nexus_mcp_sessions_evicted_total",
            "MCP sessions ended because their user began more than a node keeps",
        )
        .expect("valid metric definition");
        registry.register(Box::new(mcp_sessions_evicted.clone())).expect("metric registered once");
        let mcp_sessions = prometheus::IntGauge::new("nexus_mcp_sessions", "MCP sessions the node holds")
            .expect("valid metric definition");
        registry.register(Box::new(mcp_sessions.clone())).expect("metric registered once");
        let redis_subscriptions = prometheus::IntGauge::new(
            "nexus_redis_subscriptions",
            "Channels and patterns the node's Redis bridge subscribes to",
        )
        .expect("valid metric definition");
        registry.register(Box::new(redis_subscriptions.clone())).expect("metric registered once");
        let mailbox_depth = IntGaugeVec::new(
            Opts::new("nexus_mailbox_depth", "Messages waiting in mailboxes, by actor kind"),
            &["actor"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(mailbox_depth.clone())).expect("metric registered once");
        let tool_call_seconds = HistogramVec::new(
            HistogramOpts::new("nexus_tool_call_duration_seconds", "Tool call latency seen by the caller").buckets(
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            &["tool"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(tool_call_seconds.clone())).expect("metric registered once");
        let tool_records_dropped = prometheus::IntCounter::new(
            "nexus_tool_records_dropped_total",
            "Tool call records dropped because the queue to Kafka was full",
        )
        .expect("valid metric definition");
        registry.register(Box::new(tool_records_dropped.clone())).expect("metric registered once");
        let sidecar_published =
            prometheus::IntCounter::new("nexus_sidecar_published_total", "Panel messages published through the proxy")
                .expect("valid metric definition");
        registry.register(Box::new(sidecar_published.clone())).expect("metric registered once");
        let watchdog_heartbeats =
            prometheus::IntCounter::new("nexus_watchdog_heartbeats_total", "Heartbeats a watchdog received")
                .expect("valid metric definition");
        registry.register(Box::new(watchdog_heartbeats.clone())).expect("metric registered once");
        let watchdog_expiries = prometheus::IntCounter::new(
            "nexus_watchdog_expiries_total",
            "Times a watchdog asked to delete its instance after no heartbeat (once per expiry)",
        )
        .expect("valid metric definition");
        registry.register(Box::new(watchdog_expiries.clone())).expect("metric registered once");
        let panel_instances = IntGaugeVec::new(
            Opts::new("nexus_panel_instances", "Live panel instances on this node, by mode and state"),
            &["mode", "state"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(panel_instances.clone())).expect("metric registered once");
        let panel_instance_restarts = prometheus::IntCounter::new(
            "nexus_panel_instance_restarts_total",
            "Panel user processes restarted after they crashed",
        )
        .expect("valid metric definition");
        registry.register(Box::new(panel_instance_restarts.clone())).expect("metric registered once");
        let panel_instance_failures =
            prometheus::IntCounter::new("nexus_panel_instance_failures_total", "Panel instances that ended failed")
                .expect("valid metric definition");
        registry.register(Box::new(panel_instance_failures.clone())).expect("metric registered once");
        let panel_resyncs = prometheus::IntCounter::new(
            "nexus_panel_resyncs_total",
            "Times a panel manager wrote its routes and instance statuses to Redis again",
        )
        .expect("valid metric definition");
        registry.register(Box::new(panel_resyncs.clone())).expect("metric registered once");
        let kube_api_retries = prometheus::IntCounter::new(
            "nexus_kube_api_retries_total",
            "Kubernetes API calls of the kubernetes driver tried again",
        )
        .expect("valid metric definition");
        registry.register(Box::new(kube_api_retries.clone())).expect("metric registered once");
        let panel_instance_start_seconds = HistogramVec::new(
            HistogramOpts::new("nexus_panel_instance_start_seconds", "Panel instance start to first ready")
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
            &["mode"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(panel_instance_start_seconds.clone())).expect("metric registered once");
        Metrics {
            panel_instances,
            panel_instance_restarts,
            panel_instance_failures,
            panel_resyncs,
            panel_instance_start_seconds,
            kube_api_retries,
            kube_watch_events: counter(
                &registry,
                "nexus_kube_watch_events_total",
                "Pod and Knative Service changes seen by the kubernetes driver's watches",
                &["kind"],
            ),
            mcp_exec: counter(
                &registry,
                "nexus_mcp_exec_total",
                "Tool calls by tool and outcome",
                &["tool", "outcome"],
            ),
            sidecar_calls: counter(
                &registry,
                "nexus_sidecar_calls_total",
                "Tool calls a sidecar passed to its panel, by outcome",
                &["outcome"],
            ),
            sidecar_manifest: counter(
                &registry,
                "nexus_sidecar_manifest_total",
                "Manifest reads by a sidecar, by outcome",
                &["outcome"],
            ),
            sidecar_refused: counter(
                &registry,
                "nexus_sidecar_refused_total",
                "Panel messages the sidecar's proxy refused, by reason",
                &["reason"],
            ),
            tool_late_answers: counter(
                &registry,
                "nexus_tool_late_answers_total",
                "Tool answers dropped because their call had ended (cancelled or timed out), by where",
                &["at"],
            ),
            watchdog_heartbeats,
            watchdog_expiries,
            tool_call_seconds,
            sidecar_published,
            tool_records_dropped,
            actor_messages: counter(
                &registry,
                "nexus_actor_messages_total",
                "Messages handled, by actor kind",
                &["actor"],
            ),
            actor_restarts: counter(
                &registry,
                "nexus_actor_restarts_total",
                "Actor restarts after a panicking handler",
                &["actor"],
            ),
            actor_panics: counter(
                &registry,
                "nexus_actor_panics_total",
                "Panics in handlers and their reply futures",
                &["actor"],
            ),
            mailbox_dropped: counter(
                &registry,
                "nexus_mailbox_dropped_total",
                "Messages refused by a full mailbox",
                &["actor"],
            ),
            bus_published: counter(
                &registry,
                "nexus_bus_published_total",
                "Messages published to a bus",
                &["bus", "topic"],
            ),
            bus_received: counter(
                &registry,
                "nexus_bus_received_total",
                "Messages received from a bus",
                &["bus", "topic"],
            ),
            bus_errors: counter(&registry, "nexus_bus_errors_total", "Bus errors by kind", &["bus", "kind"]),
            bus_redelivered: counter(
                &registry,
                "nexus_bus_redelivered_total",
                "Deliveries retried after a handler did not acknowledge",
                &["bus", "topic"],
            ),
            mailbox_depth,
            sessions_too_slow,
            mcp_listens_too_slow,
            mcp_sessions_too_slow,
            mcp_sessions_evicted,
            mcp_sessions,
            redis_subscriptions,
            registry,
        }
    }

    /// Counts one bus error in `nexus_bus_errors_total{bus,kind}` and emits
    /// the matching `tracing` event, with `detail` saying what failed.
    pub fn bus_error(&self, bus: Bus, kind: BusErrorKind, detail: &dyn std::fmt::Display) {
        let (bus, kind) = (bus.as_str(), kind.as_str());
        self.bus_errors.with_label_values(&[bus, kind]).inc();
        tracing::warn!(bus, kind, %detail, "nexus_bus_errors_total");
    }

    /// The node's registry, for roles that register metric families of
    /// their own (they then show on the node's `/metrics`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Current value of a counter, for tests and diagnostics.
    pub fn counter_value(family: &IntCounterVec, labels: &[&str]) -> u64 {
        family.with_label_values(labels).get()
    }
}

/// W3C trace context as it travels in an envelope or in message headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The W3C `traceparent` (`00-<trace id>-<span id>-<flags>`); `None`: not traced.
    pub traceparent: Option<String>,
    /// The W3C `tracestate` vendor data; `None` when absent or empty.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of the current `tracing` span (empty when no
    /// OpenTelemetry layer is installed).
    pub fn current() -> Self {
        let cx = tracing::Span::current().context();
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        TraceContext {
            traceparent: carrier.remove("traceparent"),
            tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
        }
    }

    /// Whether there is no context to continue (no `traceparent`).
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none()
    }

    /// Makes `span` a child of this remote context (a no-op when empty).
    pub fn set_as_parent_of(&self, span: &tracing::Span) {
        let Some(traceparent) = &self.traceparent else { return };
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_owned(), traceparent.clone());
        if let Some(state) = &self.tracestate {
            carrier.insert("tracestate".to_owned(), state.clone());
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(parent);
    }
}

/// Keeps the OTLP pipeline alive; flushes spans when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process-wide `tracing` subscriber: human-readable logs
/// filtered by `RUST_LOG` (default `info`), span ids for trace propagation
/// always, and OTLP/HTTP span export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service_name: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let exported = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| otlp_provider(service_name));
    let exporting = exported.is_some();
    // Without an exporter spans still get ids, so every record on the buses
    // carries a `traceparent` and logs and records correlate.
    let provider = exported.unwrap_or_else(|| opentelemetry_sdk::trace::SdkTracerProvider::builder().build());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("nexus"));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    if exporting {
        tracing::info!("exporting spans over OTLP");
    }
    TelemetryGuard { provider: Some(provider) }
}

fn otlp_provider(service_name: &str) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTLP exporter disabled: {error}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build();
    Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}
