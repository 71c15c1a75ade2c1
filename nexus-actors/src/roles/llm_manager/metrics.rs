//! The LLM manager's metric families, registered in the node's registry so
//! the node's `/metrics` shows them. Names are stable. This module only
//! counts (and logs what it counts); deciding outcomes is the model
//! client's and the contexts' job.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::semantic::records::Usage;

/// The `outcome` of a model request that succeeded; a failed one is
/// labelled with its [`ModelError::code`](super::model::ModelError::code).
pub const OUTCOME_OK: &str = "ok";

/// The LLM manager's metric families. Cloning shares them.
#[derive(Clone)]
pub struct LlmMetrics {
    /// `nexus_llm_requests_total{endpoint,outcome}`: model requests by endpoint and how they ended.
    requests: IntCounterVec,
    /// `nexus_llm_tokens_total{kind}`: tokens the endpoints reported, `input` or `output`.
    tokens: IntCounterVec,
    /// `nexus_llm_time_to_first_token_seconds`: from the call to the first text or tool-call delta.
    ttft: Histogram,
    /// `nexus_llm_request_seconds`: from the call to the whole answer, retries included.
    request_seconds: Histogram,
    /// `nexus_llm_contexts`: context actors alive on this node.
    pub contexts: IntGauge,
    /// `nexus_llm_replays_total`: transcripts rebuilt from the journal.
    pub replays: IntCounter,
    /// `nexus_semantic_dead_letters_total{reason}`: commands copied to `semantic.dlq`.
    pub dead_letters: IntCounterVec,
    /// `nexus_llm_consume_errors_total`: failed polls of `semantic.commands` and offset stores.
    pub consume_errors: IntCounter,
    /// `nexus_llm_journal_append_seconds`: from handing a record to the Kafka bridge to its acknowledgement.
    pub journal_append_seconds: Histogram,
    /// `nexus_llm_command_delay_seconds`: from a command's making (its envelope's time) to the inbox taking it.
    pub command_delay_seconds: Histogram,
    /// `nexus_llm_commands_tapped_total`: commands taken from this node's own
    /// producer as the broker acknowledged them, before a fetch brought them.
    pub commands_tapped: IntCounter,
    /// `nexus_llm_commands_refetched_total`: commands a fetch brought that
    /// were taken already (tapped, or sent again), skipped; the consumer is
    /// moved past each tapped one, so few are expected.
    pub commands_refetched: IntCounter,
    /// `nexus_llm_drain_commands_total{outcome}`: commands in flight when the
    /// node drained, `finished` on it or `left` to the partition's next owner.
    pub drain_commands: IntCounterVec,
    /// `nexus_llm_inbox_wakes_total{cause}`: paused partitions fetched again,
    /// for a `hint`, the `tap` or a `check` of their ends.
    pub inbox_wakes: IntCounterVec,
    /// `nexus_llm_inbox_paused_partitions`: owned partitions read to their end, not fetched.
    pub inbox_paused: IntGauge,
    /// `nexus_llm_command_hints_total{outcome}`: command hints from Redis,
    /// `relayed` to the inbox, `dropped` (its queue full) or `malformed`.
    pub command_hints: IntCounterVec,
}

impl LlmMetrics {
    /// Registers the families in `registry`; fails if they are registered
    /// there already (one LLM manager per node).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("nexus_llm_requests_total", "Model requests, by endpoint and outcome"),
            &["endpoint", "outcome"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("nexus_llm_tokens_total", "Tokens the model endpoints reported, by kind (input, output)"),
            &["kind"],
        )?;
        // Local models on a few cores answer in seconds, remote ones in fractions.
        let buckets = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_llm_time_to_first_token_seconds",
                "From a model call to its first streamed text or tool-call delta",
            )
            .buckets(buckets.clone()),
        )?;
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new("nexus_llm_request_seconds", "From a model call to its whole answer, retries included")
                .buckets(buckets),
        )?;
        let contexts = IntGauge::new("nexus_llm_contexts", "LLM context actors alive on this node")?;
        let replays = IntCounter::new("nexus_llm_replays_total", "Transcripts rebuilt by folding the journal")?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "nexus_semantic_dead_letters_total",
                "Semantic commands copied to the dead-letter topic, by reason",
            ),
            &["reason"],
        )?;
        let consume_errors = IntCounter::new(
            "nexus_llm_consume_errors_total",
            "Failed polls of semantic.commands and failed offset stores",
        )?;
        let journal_append_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_llm_journal_append_seconds",
                "From handing a record to the Kafka bridge to the broker's acknowledgement",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        )?;
        let command_delay_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_llm_command_delay_seconds",
                "From a command's making (its envelope's time) to the LLM manager's inbox taking it",
            )
            .buckets(vec![0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        )?;
        let commands_tapped = IntCounter::new(
            "nexus_llm_commands_tapped_total",
            "Commands taken from this node's own producer as the broker acknowledged them, before a fetch brought them",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(contexts.clone()))?;
        registry.register(Box::new(replays.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(consume_errors.clone()))?;
        registry.register(Box::new(journal_append_seconds.clone()))?;
        registry.register(Box::new(command_delay_seconds.clone()))?;
        let drain_commands = IntCounterVec::new(
            Opts::new(
                "nexus_llm_drain_commands_total",
                "Commands in flight when the node drained: finished on it, or left to the partition's next owner",
            ),
            &["outcome"],
        )?;
        let commands_refetched = IntCounter::new(
            "nexus_llm_commands_refetched_total",
            "Commands a fetch brought that were taken already (from the tap, or sent again), skipped",
        )?;
        registry.register(Box::new(commands_tapped.clone()))?;
        registry.register(Box::new(commands_refetched.clone()))?;
        registry.register(Box::new(drain_commands.clone()))?;
        let inbox_wakes = IntCounterVec::new(
            Opts::new("nexus_llm_inbox_wakes_total", "Paused partitions of semantic.commands fetched again, by cause"),
            &["cause"],
        )?;
        let inbox_paused = IntGauge::new(
            "nexus_llm_inbox_paused_partitions",
            "Owned partitions of semantic.commands read to their end and not fetched until a command may wait",
        )?;
        let command_hints = IntCounterVec::new(
            Opts::new("nexus_llm_command_hints_total", "Command hints received from Redis, by outcome"),
            &["outcome"],
        )?;
        registry.register(Box::new(inbox_wakes.clone()))?;
        registry.register(Box::new(inbox_paused.clone()))?;
        registry.register(Box::new(command_hints.clone()))?;
        // Present from the start, so dashboards see zeros, not gaps.
        for kind in ["input", "output"] {
            tokens.with_label_values(&[kind]);
        }
        for outcome in ["finished", "left"] {
            drain_commands.with_label_values(&[outcome]);
        }
        for cause in ["hint", "tap", "check"] {
            inbox_wakes.with_label_values(&[cause]);
        }
        for outcome in ["relayed", "dropped", "malformed"] {
            command_hints.with_label_values(&[outcome]);
        }
        Ok(LlmMetrics {
            requests,
            tokens,
            ttft,
            request_seconds,
            contexts,
            replays,
            dead_letters,
            consume_errors,
            journal_append_seconds,
            command_delay_seconds,
            commands_tapped,
            commands_refetched,
            drain_commands,
            inbox_wakes,
            inbox_paused,
            command_hints,
        })
    }

    /// Makes the `endpoint`'s series with `outcomes` exist before its first request.
    pub fn endpoint(&self, endpoint: &str, outcomes: &[&str]) {
        for outcome in outcomes {
            self.requests.with_label_values(&[endpoint, outcome]);
        }
    }

    /// Counts one model request to `endpoint` that ended with `outcome`
    /// ([`OUTCOME_OK`] or an error code).
    pub fn request(&self, endpoint: &str, outcome: &str) {
        self.requests.with_label_values(&[endpoint, outcome]).inc();
        if outcome == OUTCOME_OK {
            tracing::debug!(endpoint, outcome, "nexus_llm_requests_total");
        } else {
            tracing::info!(endpoint, outcome, "nexus_llm_requests_total");
        }
    }

    /// Records a finished model call: its tokens, time to first token and latency.
    pub fn answered(&self, usage: Usage, ttft: Duration, latency: Duration) {
        self.tokens.with_label_values(&["input"]).inc_by(usage.input_tokens);
        self.tokens.with_label_values(&["output"]).inc_by(usage.output_tokens);
        self.ttft.observe(ttft.as_secs_f64());
        self.request_seconds.observe(latency.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_every_family_once() {
        let registry = Registry::new();
        let metrics = LlmMetrics::new(&registry).unwrap();
        metrics.request("local", OUTCOME_OK);
        metrics.answered(
            Usage { input_tokens: 3, output_tokens: 5 },
            Duration::from_millis(1),
            Duration::from_millis(2),
        );
        metrics.contexts.inc();
        metrics.replays.inc();
        metrics.dead_letters.with_label_values(&["not_an_envelope"]).inc();
        metrics.consume_errors.inc();
        metrics.journal_append_seconds.observe(0.001);
        metrics.command_delay_seconds.observe(0.001);
        metrics.commands_tapped.inc();
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        for name in [
            "nexus_llm_requests_total",
            "nexus_llm_tokens_total",
            "nexus_llm_time_to_first_token_seconds",
            "nexus_llm_request_seconds",
            "nexus_llm_contexts",
            "nexus_llm_replays_total",
            "nexus_semantic_dead_letters_total",
            "nexus_llm_consume_errors_total",
            "nexus_llm_journal_append_seconds",
            "nexus_llm_command_delay_seconds",
            "nexus_llm_commands_tapped_total",
            "nexus_llm_inbox_wakes_total",
            "nexus_llm_inbox_paused_partitions",
            "nexus_llm_command_hints_total",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
        }
        assert!(LlmMetrics::new(&registry).is_err(), "a second registration is refused");
    }
}
