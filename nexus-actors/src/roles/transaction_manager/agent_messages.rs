//! Panels' local agents talking to the global LLM: a panel posts
//! `{"channel": "context", "data": {"context": ID, "content": TEXT}}` to its
//! sidecar's `:3500/proxy`, which publishes it on the panel's own
//! `nexus:panel:{panel}:out:context`. This actor follows those channels,
//! checks that the panel's owner owns the context, and produces a
//! `nexus.context.agent_message` command for it.
//!
//! The panel id comes from the channel name, which only that panel's
//! sidecar can publish on; nothing in the message body is trusted for it.
//! Every transaction manager follows the channels, so a message is claimed
//! once in Redis (by its envelope id) before its command is produced.

use redis::AsyncCommands;
use serde::Deserialize;

use crate::bus::redis::{Subscribe, Topic};
use crate::bus::{BusEvent, BusMessage};
use crate::envelope::Envelope;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Link, Reply};
use crate::platform::store::Redis;
use crate::platform::PanelRecords;
use crate::semantic::commands::CommandSender;
use crate::semantic::directory::ContextDirectory;
use crate::semantic::records::{AgentMessage, MAX_MESSAGE_BYTES};

/// The sub-channel panels post context messages on.
pub const CONTEXT_CHANNEL: &str = "context";
/// How long a claimed message id is remembered (seconds).
const CLAIM_TTL: u64 = 3600;

/// What a panel sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PanelSays {
    context: String,
    content: String,
}

/// Why a panel's message was not passed on: the `outcome` label of
/// `nexus_agent_messages_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Accepted,
    Malformed,
    NotOwner,
    Duplicate,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Malformed => "malformed",
            Outcome::NotOwner => "not_owner",
            Outcome::Duplicate => "duplicate",
            Outcome::Failed => "failed",
        }
    }
}

/// The actor. See the module documentation.
pub struct AgentMessages {
    source: String,
    subscribe: Link<Subscribe>,
    commands: CommandSender,
    redis: Redis,
    panels: PanelRecords,
    directory: ContextDirectory,
    counter: prometheus::IntCounterVec,
}

/// What the actor needs.
pub struct AgentMessagesDeps {
    /// The node's name.
    pub source: String,
    /// The Redis bridge's subscriptions.
    pub subscribe: Link<Subscribe>,
    /// Produces and announces commands.
    pub commands: CommandSender,
    /// For claims.
    pub redis: Redis,
    /// Panel owners.
    pub panels: PanelRecords,
    /// Context owners.
    pub directory: ContextDirectory,
    /// `nexus_agent_messages_total{outcome}`.
    pub counter: prometheus::IntCounterVec,
}

impl AgentMessages {
    /// Actor kind in the mailbox graph.
    pub const KIND: &'static str = "agent_messages";

    /// Starts following every panel's context channel.
    pub fn spawn(kernel: &crate::kernel::Kernel, deps: AgentMessagesDeps) -> ActorRef<AgentMessages> {
        let AgentMessagesDeps { source, subscribe, commands, redis, panels, directory, counter } = deps;
        kernel.spawn("agent-messages", move || AgentMessages {
            source: source.clone(),
            subscribe: subscribe.clone(),
            commands: commands.clone(),
            redis: redis.clone(),
            panels: panels.clone(),
            directory: directory.clone(),
            counter: counter.clone(),
        })
    }

    fn take(&self, message: BusMessage) -> impl std::future::Future<Output = Outcome> + 'static {
        let (commands, redis, panels, directory, source) = (
            self.commands.clone(),
            self.redis.clone(),
            self.panels.clone(),
            self.directory.clone(),
            self.source.clone(),
        );
        async move {
            let Some(panel) = panel_of(&message.channel) else { return Outcome::Malformed };
            let Ok(says) = PanelSays::deserialize(&message.envelope.data) else { return Outcome::Malformed };
            if says.content.is_empty() || says.content.len() > MAX_MESSAGE_BYTES {
                return Outcome::Malformed;
            }
            let (owner, context) = match (panels.get(&panel).await, directory.get(&says.context).await) {
                (Ok(Some(p)), Ok(Some(c))) => (p.owner, c),
                (Ok(_), Ok(_)) => return Outcome::NotOwner,
                _ => return Outcome::Failed,
            };
            if context.owner != owner {
                return Outcome::NotOwner;
            }
            let claim = format!("nexus:agent-message:{}", message.envelope.id);
            let claimed: Result<bool, _> = redis
                .conn()
                .set_options(
                    claim,
                    1,
                    redis::SetOptions::default()
                        .conditional_set(redis::ExistenceCheck::NX)
                        .with_expiration(redis::SetExpiry::EX(CLAIM_TTL)),
                )
                .await;
            match claimed {
                Ok(true) => {}
                Ok(false) => return Outcome::Duplicate,
                Err(_) => return Outcome::Failed,
            }
            let command =
                AgentMessage { context: context.id.clone(), panel, content: says.content, command_offset: None };
            let envelope = Envelope::new(source, command).caused_by(&message.envelope).into_untyped();
            match commands.send(&context.id, envelope).await {
                Ok(_) => Outcome::Accepted,
                Err(_) => Outcome::Failed,
            }
        }
    }
}

/// The panel id in `nexus:panel:{id}:out:context`.
fn panel_of(channel: &str) -> Option<String> {
    let id = channel.strip_prefix("nexus:panel:")?.strip_suffix(&format!(":out:{CONTEXT_CHANNEL}"))?;
    crate::platform::panels::is_panel_id(id).then(|| id.to_owned())
}

impl Behaviour for AgentMessages {
    const KIND: &'static str = AgentMessages::KIND;

    fn started(&mut self, me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {
        let subscriber = me.link::<BusEvent>("redis-bridge");
        let subscribe = self.subscribe.clone();
        let topic = Topic::Pattern(crate::platform::channels::panel_out("*", CONTEXT_CHANNEL));
        actix::spawn(async move {
            if let Err(error) = subscribe.ask(Subscribe { topic, subscriber }).await {
                tracing::error!(?error, "agent messages: could not follow the panels' context channels");
            }
        });
    }
}

impl Handler<BusEvent> for AgentMessages {
    fn handle(&mut self, event: BusEvent, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let BusEvent::Message(message) = event else { return Reply::Now(()) };
        let (counter, channel) = (self.counter.clone(), message.channel.clone());
        let taken = self.take(std::sync::Arc::unwrap_or_clone(message));
        Reply::later(async move {
            let outcome = taken.await;
            counter.with_label_values(&[outcome.as_str()]).inc();
            match outcome {
                Outcome::Accepted | Outcome::Duplicate => {
                    tracing::debug!(%channel, outcome = outcome.as_str(), "nexus_agent_messages_total")
                }
                _ => tracing::warn!(%channel, outcome = outcome.as_str(), "nexus_agent_messages_total"),
            }
        })
    }
}
