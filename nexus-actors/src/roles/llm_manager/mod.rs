//! The `llm-manager` role: LLM contexts sharded over the partitions of
//! `semantic.commands`. Each node runs one
//! `LlmContext` actor per context of its partitions, journals every step
//! of every turn on `semantic.events`, and hands a partition's unfinished
//! turns to its next owner through that journal.
//!
//! * [`lease`]: which node owns which partition (leases in Redis), and how far each is done.
//! * [`inbox`]: the owned partitions' commands, offsets stored after turns;
//!   a partition read to its end is fetched again when a command may wait ([`inbox::wake`]).
//! * [`dead_letter`]: refused commands, counted and copied to `semantic.dlq`.
//! * [`manager`]: routes commands to context actors; idle and revoked contexts stop.
//! * [`context`]: one context's queue of commands.
//! * [`turn`]: model calls and tool runs until the answer.
//! * [`model`]: OpenAI-compatible endpoints, retries and fail-over.
//! * [`writer`]: appends to the journal and fans records out to followers.
//!
//! Reading journals back (transcripts, replay, forks) is
//! [`crate::semantic`]'s, shared with the transaction manager's API.

pub mod context;
pub mod dead_letter;
pub mod inbox;
pub mod lease;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod turn;
pub mod writer;

use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::bus::kafka::{ensure_topics, KafkaBridge, KafkaConfig, SEMANTIC_COMMANDS};
use crate::bus::redis::RedisBus;
use crate::bus::tap::Tap;
use crate::kernel::{ActorRef, Kernel};
use crate::platform::store::Redis;
use crate::semantic::directory::ContextDirectory;
use crate::semantic::journal::Journal;
use crate::tools::ToolRegistry;
use context::ContextDeps;
use dead_letter::DLQ;
use inbox::wake::HintRelay;
use inbox::{Inbox, InboxDeps};
use manager::LlmManager;
use metrics::LlmMetrics;
use model::{ModelClient, ModelConfig};
use turn::TurnLimits;
use writer::JournalWriter;

/// How the role runs.
#[derive(Debug, Clone)]
pub struct LlmManagerConfig {
    /// The model endpoints.
    pub model: ModelConfig,
    /// What bounds a turn.
    pub limits: TurnLimits,
    /// A context without work for this long is stopped (default 5 minutes).
    pub idle: Duration,
}

impl Default for LlmManagerConfig {
    /// No endpoint (the role does not start), default limits, 5 minutes idle.
    fn default() -> Self {
        LlmManagerConfig {
            model: ModelConfig::default(),
            limits: TurnLimits::default(),
            idle: Duration::from_secs(300),
        }
    }
}

/// Why the role did not start.
#[derive(Debug, thiserror::Error)]
pub enum LlmManagerError {
    /// The dead-letter topic could not be made, or the consumer not created.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The model configuration is not usable.
    #[error("model endpoints: {0}")]
    Model(#[from] model::ConfigError),
}

/// What the role needs from the node.
pub struct LlmManagerDeps {
    /// The node's kernel.
    pub kernel: Kernel,
    /// The brokers (the inbox's consumer and journal reads).
    pub kafka_config: KafkaConfig,
    /// The node's Kafka bridge (journal writes, dead letters).
    pub kafka: ActorRef<KafkaBridge>,
    /// The node's Redis bridge (live fan-out).
    pub redis: RedisBus,
    /// The node's Redis connection for records (the context directory).
    pub store: Redis,
    /// The node's tool registry.
    pub registry: ActorRef<ToolRegistry>,
}

/// A running LLM manager.
pub struct LlmManagerHandle {
    inbox: Inbox,
    manager: ActorRef<LlmManager>,
    hints: ActorRef<HintRelay>,
}

impl LlmManagerHandle {
    /// The manager actor (to count its contexts).
    pub fn manager(&self) -> &ActorRef<LlmManager> {
        &self.manager
    }

    /// Gives its partitions and lease up (what is done committed) and stops every context.
    pub async fn stop(self) {
        self.drain(Duration::ZERO).await;
    }

    /// Takes no new commands, lets the turns in flight finish for up to
    /// `within`, then stops as [`LlmManagerHandle::stop`] does: a turn still
    /// running then is resumed from its journal by the partition's next owner.
    pub async fn drain(mut self, within: Duration) {
        self.inbox.stop(within).await;
        self.hints.stop();
        let _ = self.manager.link::<manager::StopContexts>("llm-manager-handle").ask(manager::StopContexts).await;
        self.manager.stop();
    }
}

/// Starts the role: its metrics, the dead-letter topic, the manager and the inbox.
pub async fn start(deps: LlmManagerDeps, config: LlmManagerConfig) -> Result<LlmManagerHandle, LlmManagerError> {
    let LlmManagerDeps { kernel, kafka_config, kafka, redis, store, registry } = deps;
    let metrics = LlmMetrics::new(kernel.metrics().registry())?;
    ensure_topics(&kafka_config, &[DLQ]).await?;
    let model = ModelClient::new(config.model.clone(), metrics.clone())?;
    let lease = lease::Lease::new(store.clone(), kernel.node());
    let directory = ContextDirectory::new(store);
    let id = LlmManager::KIND;
    let writer = JournalWriter::new(
        lease.member().to_owned(),
        kafka.link(id),
        redis.publisher.clone(),
        directory.clone(),
        metrics.clone(),
        lease.clone(),
    );
    let context_deps = ContextDeps {
        kernel: kernel.clone(),
        journal: Journal::new(kafka_config.clone(), directory),
        writer,
        model,
        tools: registry.link(id),
        list_tools: registry.link(id),
        produce: kafka.link(id),
        limits: config.limits,
        metrics: metrics.clone(),
    };
    let idle = config.idle;
    let manager = kernel.spawn("llm-manager", move || LlmManager::new(context_deps.clone(), idle));
    let tap = match kafka.link::<Tap>(id).ask(Tap { topic: SEMANTIC_COMMANDS.to_owned() }).await {
        Ok(tap) => Some(tap),
        Err(error) => {
            tracing::warn!(?error, "llm manager: no tap on the kafka bridge; commands come by the broker only");
            None
        }
    };
    let (hints, hinted) = HintRelay::spawn(&kernel, redis.link(HintRelay::KIND), metrics.clone());
    let inbox = Inbox::start(InboxDeps {
        kafka: kafka_config,
        manager: manager.link("llm-inbox"),
        revoked: manager.link("llm-inbox"),
        produce: kafka.link("llm-inbox"),
        metrics,
        source: kernel.node().to_owned(),
        lease,
        tap,
        hints: Some(hinted),
    })
    .inspect_err(|_| hints.stop())?;
    tracing::info!("llm manager taking its share of semantic.commands");
    Ok(LlmManagerHandle { inbox, manager, hints })
}
