//! `ToolRegistry`: a node's door to every tool.
//!
//! * [`RegisterTool`] makes a [`SystemTool`] served by this node: listed in
//!   Redis for every node, and callable over the bus on its call channel.
//! * [`CallTool`] calls any tool the caller may use: the name is resolved
//!   through the shared listing, the arguments are checked against the
//!   schema, and the call runs here (a system tool this node serves) or
//!   travels as a [`ToolRequest`] on the owner's Redis channel, its
//!   [`ToolResponse`] coming back on this registry's reply channel. Every
//!   call counts in `nexus_mcp_exec_total{tool,outcome}`, runs in a
//!   `nexus.tool.call` span, and is recorded with its outcome on Kafka
//!   `semantic.events`.
//! * [`CallToolWatched`] calls one as [`CallTool`] does, handing the
//!   tool's progress ([`ToolProgress`]) to the caller and stopping the call
//!   when the caller cancels it: the owner's channel then gets a
//!   [`ToolCancel`], and an answer that still comes is dropped and counted
//!   (`nexus_tool_late_answers_total`). [`CancelCall`] cancels a caller's
//!   call by the caller's own name for it, from any node.
//! * [`ListTools`] lists what one user may call; [`ListPrompts`] and
//!   [`GetPrompt`] list and render the prompts of the user's panels;
//!   [`ListPanelResources`] and [`ReadPanelResource`] list their declared
//!   resources and read one through the panel's sidecar.
//!
//! Talking HTTP to panels is the sidecar's job; this actor never does it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::protocol::{ToolCall, ToolCancel, ToolError, ToolProgress, ToolRequest, ToolResponse, ToolResult};
use super::store::ToolStore;
use super::system::{CallContext, SystemTool};
use super::{is_valid_local_name, ToolOwner, ToolSpec};
use crate::bus::kafka::Produce;
use crate::bus::redis::{Publisher, Subscribe, Topic};
use crate::bus::{Bus, BusErrorKind, BusEvent};
use crate::envelope::{Envelope, Payload};
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply};
use crate::platform::channels;
use crate::tools::recorder::Recorder;

mod caller;
mod prompts;
mod resources;

use caller::Caller;
pub use prompts::{GetPrompt, GetPromptError, ListPrompts, RenderedPrompt};
pub use resources::{ListPanelResources, ReadPanelResource, ReadResourceError};

/// How long a resolved tool (its spec and compiled schema) is reused before
/// the listing is read again.
const RESOLVE_TTL: Duration = Duration::from_secs(2);
/// Size of the resolve cache at which expired entries are dropped.
const RESOLVE_CACHE_PRUNE_AT: usize = 1024;
/// How much longer than the deadline a caller waits for the tool's server,
/// which enforces the deadline itself and says why it stopped.
const REPLY_GRACE: Duration = Duration::from_millis(500);
/// How long a call waits for Redis to note its name before it goes out
/// without one (it can then be cancelled only by its own caller's node).
const NAMING_WAIT: Duration = Duration::from_millis(500);

/// Makes a system tool served by this node.
pub struct RegisterTool(pub SystemTool);

/// Why a system tool could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The name is not a valid local name, or the tool's owner is not [`ToolOwner::System`].
    #[error("tool name {0:?} is not valid: it must match ^[A-Za-z][A-Za-z0-9_-]{{0,63}}$")]
    BadName(String),
    /// Writing the tool's spec to the Redis listing failed; holds the store's message.
    #[error("listing the tool failed: {0}")]
    Store(String),
    /// Subscribing to the tool's call channel failed (or the registry has not started yet).
    #[error("subscribing to the tool's call channel failed: {0}")]
    Subscribe(String),
}

impl Message for RegisterTool {
    type Reply = Result<(), RegisterError>;
}

/// Calls a tool on behalf of `call.caller`.
pub struct CallTool(pub ToolCall);

impl Message for CallTool {
    type Reply = ToolResult;
}

/// Calls a tool as [`CallTool`] does, for a caller that follows it.
pub struct CallToolWatched {
    /// The call.
    pub call: ToolCall,
    /// Where the tool's progress goes; a report that finds it full is dropped.
    pub progress: Option<mpsc::Sender<ToolProgress>>,
    /// Once cancelled, the call stops and ends `cancelled`.
    pub cancel: CancellationToken,
    /// The caller's own name for the call (an MCP request id), by which
    /// [`CancelCall`] finds it from any node; at most [`MAX_LABEL`] bytes.
    pub label: Option<String>,
}

impl Message for CallToolWatched {
    type Reply = ToolResult;
}

/// Longest [`CallToolWatched::label`]; a call with a longer one cannot be
/// cancelled by name.
pub const MAX_LABEL: usize = 128;

/// Cancels `caller`'s running call named `label`, on whichever node waits
/// for it. Answers how many calls were told to stop: none when none runs,
/// and none when the caller runs several of that name, since which one was
/// meant cannot be told.
pub struct CancelCall {
    /// The caller; only their calls are found.
    pub caller: String,
    /// Their name for the call.
    pub label: String,
}

impl Message for CancelCall {
    type Reply = Result<usize, ToolError>;
}

/// The tools `user` may call.
pub struct ListTools {
    /// The user whose tools are listed.
    pub user: String,
}

impl Message for ListTools {
    type Reply = Result<Vec<ToolSpec>, ToolError>;
}

/// A tool name resolved to its spec and compiled argument schema.
struct Resolved {
    spec: ToolSpec,
    validator: jsonschema::Validator,
}

/// A call sent over the bus, waiting for its answer.
struct Pending {
    reply: oneshot::Sender<ToolResult>,
    caller: String,
    progress: Option<mpsc::Sender<ToolProgress>>,
    cancel: CancellationToken,
}

/// What outlives restarts of the registry actor.
#[derive(Default)]
struct Shared {
    system: Mutex<HashMap<String, SystemTool>>,
    pending: Mutex<HashMap<String, Pending>>,
    resolved: Mutex<HashMap<String, (Instant, Arc<Resolved>)>>,
}

/// Wiring of a registry.
#[derive(Clone)]
pub struct RegistryDeps {
    /// The node's kernel: spawns the actor, names the node, holds the metrics.
    pub kernel: Kernel,
    /// The shared tool listing and idempotency claims.
    pub store: ToolStore,
    /// The node's Redis bridge, which carries calls and replies.
    pub redis: crate::bus::redis::RedisBus,
    /// Where calls are recorded (through a [`Recorder`]); `None` records
    /// nothing (no Kafka here).
    pub kafka: Option<Link<Produce>>,
}

/// The registry actor of a node. See the module documentation.
pub struct ToolRegistry {
    deps: RegistryDeps,
    shared: Arc<Shared>,
    publish: Publisher,
    subscribe: Link<Subscribe>,
    reply_channel: String,
    recorder: Option<Recorder>,
    me: Option<ActorRef<ToolRegistry>>,
}

impl ToolRegistry {
    /// Actor kind: the `actor` label of its metrics and its kind in the graph.
    pub const KIND: &'static str = "tool_registry";

    /// Spawns the registry on the current arbiter.
    pub fn spawn(deps: RegistryDeps) -> ActorRef<ToolRegistry> {
        let shared = Arc::new(Shared::default());
        let reply_channel = channels::tool_replies(deps.kernel.node(), &uuid::Uuid::now_v7().simple().to_string());
        let id = format!("tool-registry-{}", &reply_channel[reply_channel.len() - 8..]);
        let kernel = deps.kernel.clone();
        let (publish, subscribe) = (deps.redis.publisher.clone(), deps.redis.link(&id));
        let recorder = deps.kafka.clone().map(|kafka| Recorder::spawn(kafka, kernel.metrics()));
        kernel.spawn(id, move || ToolRegistry {
            deps: deps.clone(),
            shared: shared.clone(),
            publish: publish.clone(),
            subscribe: subscribe.clone(),
            reply_channel: reply_channel.clone(),
            recorder: recorder.clone(),
            me: None,
        })
    }

    /// What one call needs of the registry, to run outside it.
    fn caller(&self) -> Caller {
        Caller {
            deps: self.deps.clone(),
            shared: self.shared.clone(),
            publish: self.publish.clone(),
            reply_channel: self.reply_channel.clone(),
            recorder: self.recorder.clone(),
        }
    }

    fn subscribe_to(&self, topic: Topic) -> impl std::future::Future<Output = Result<(), RegisterError>> + 'static {
        let link = self.subscribe.clone();
        let me = self.me.clone();
        async move {
            let Some(me) = me else { return Err(RegisterError::Subscribe("registry not started".into())) };
            let subscriber = me.link::<BusEvent>("redis-bridge");
            match link.ask(Subscribe { topic, subscriber }).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RegisterError::Subscribe(e.to_string())),
                Err(e) => Err(RegisterError::Subscribe(e.to_string())),
            }
        }
    }

    /// A request for a system tool this node serves, from the bus.
    fn serve_request(&self, envelope: Envelope<Value>) {
        let request = match envelope.clone().typed::<ToolRequest>() {
            Ok(r) => r.data,
            Err(error) => {
                self.deps.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::ToolRequest, &error);
                return;
            }
        };
        let Some(tool) = lock(&self.shared.system).get(&request.tool).cloned() else { return };
        let (store, publish, source) =
            (self.deps.store.clone(), self.publish.clone(), self.deps.kernel.node().to_owned());
        let span = tracing::info_span!("nexus.tool.serve", tool = %request.tool, call_id = %request.call_id);
        envelope.trace_context().set_as_parent_of(&span);
        actix::spawn(
            async move {
                let answer = |result: ToolResult| async {
                    let response = ToolResponse { call_id: request.call_id.clone(), outcome: result.into() };
                    let envelope = Envelope::new(source, response).into_untyped();
                    let channel = request.reply_to.clone();
                    if let Err(error) = publish.publish(channel, envelope).await {
                        tracing::warn!(%error, "could not send a tool response");
                    }
                };
                run_system(&store, &tool, &request, answer).await;
            }
            .instrument(span),
        );
    }

    /// A message on this registry's reply channel: the answer to one of
    /// its calls, a call's progress, or a cancellation taken by a node.
    fn complete(&self, envelope: Envelope<Value>) {
        let metrics = self.deps.kernel.metrics();
        match envelope.kind.as_str() {
            ToolProgress::TYPE => match envelope.typed::<ToolProgress>() {
                Ok(progress) => {
                    let pending = lock(&self.shared.pending);
                    if let Some(to) = pending.get(&progress.data.call_id).and_then(|p| p.progress.as_ref()) {
                        let _ = to.try_send(progress.data);
                    }
                }
                Err(error) => metrics.bus_error(Bus::Redis, BusErrorKind::ToolResponse, &error),
            },
            ToolCancel::TYPE => match envelope.typed::<ToolCancel>() {
                Ok(cancel) => {
                    let pending = lock(&self.shared.pending);
                    if let Some(call) = pending.get(&cancel.data.call_id).filter(|p| p.caller == cancel.data.caller) {
                        call.cancel.cancel();
                    }
                }
                Err(error) => metrics.bus_error(Bus::Redis, BusErrorKind::ToolResponse, &error),
            },
            _ => match envelope.typed::<ToolResponse>() {
                Ok(response) => {
                    let response = response.data;
                    match lock(&self.shared.pending).remove(&response.call_id) {
                        Some(waiter) => {
                            let _ = waiter.reply.send(response.outcome.into());
                        }
                        None => {
                            metrics.tool_late_answers.with_label_values(&["caller"]).inc();
                            tracing::info!(call_id = %response.call_id, "nexus_tool_late_answers_total");
                        }
                    }
                }
                Err(error) => metrics.bus_error(Bus::Redis, BusErrorKind::ToolResponse, &error),
            },
        }
    }
}

/// Runs a system tool once per idempotency key, within the deadline, and
/// hands the outcome to `answer` (see [`ToolStore::run_once`]).
async fn run_system<A: std::future::Future<Output = ()>>(
    store: &ToolStore,
    tool: &SystemTool,
    request: &ToolRequest,
    answer: impl FnOnce(ToolResult) -> A,
) {
    let cx =
        CallContext { call_id: request.call_id.clone(), caller: request.caller.clone(), deadline: request.deadline };
    let remaining = super::protocol::remaining_until(request.deadline);
    let work = tokio::time::timeout(remaining, tool.run(request.arguments.clone(), cx))
        .map(move |r| r.unwrap_or(Err(ToolError::Timeout { timeout_ms: remaining.as_millis() as u64 })));
    store.run_once(&tool.spec.name, request, work, answer).await
}

impl Behaviour for ToolRegistry {
    const KIND: &'static str = ToolRegistry::KIND;

    fn started(&mut self, me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {
        self.me = Some(me.clone());
        let replies = self.subscribe_to(Topic::Channel(self.reply_channel.clone()));
        let systems: Vec<String> = lock(&self.shared.system).keys().cloned().collect();
        let resubscribe: Vec<_> =
            systems.into_iter().map(|name| self.subscribe_to(Topic::Channel(channels::system_tool(&name)))).collect();
        actix::spawn(async move {
            if let Err(error) = replies.await {
                tracing::error!(%error, "tool registry could not subscribe to its replies");
            }
            for subscription in resubscribe {
                let _ = subscription.await;
            }
        });
    }
}

impl Handler<RegisterTool> for ToolRegistry {
    fn handle(&mut self, RegisterTool(tool): RegisterTool, _: &mut Ctx<Self>) -> Reply<Result<(), RegisterError>> {
        let name = tool.spec.name.clone();
        if !is_valid_local_name(&name) || tool.spec.owner != ToolOwner::System {
            return Reply::Now(Err(RegisterError::BadName(name)));
        }
        let spec = tool.spec.clone();
        lock(&self.shared.system).insert(name.clone(), tool);
        lock(&self.shared.resolved).remove(&name);
        let store = self.deps.store.clone();
        let subscribed = self.subscribe_to(Topic::Channel(channels::system_tool(&name)));
        Reply::later(async move {
            store.put_system(&spec).await.map_err(|e| RegisterError::Store(e.to_string()))?;
            subscribed.await?;
            tracing::info!(tool = %name, "system tool registered");
            Ok(())
        })
    }
}

impl Handler<ListTools> for ToolRegistry {
    fn handle(&mut self, msg: ListTools, _: &mut Ctx<Self>) -> Reply<Result<Vec<ToolSpec>, ToolError>> {
        let store = self.deps.store.clone();
        Reply::later(async move { store.list_for(&msg.user).await.map_err(ToolError::internal) })
    }
}

impl Handler<BusEvent> for ToolRegistry {
    fn handle(&mut self, event: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
        match event {
            BusEvent::Message(m) if m.channel == self.reply_channel => {
                self.complete(std::sync::Arc::unwrap_or_clone(m).envelope)
            }
            // System tools stop only with their own caller (see CallToolWatched).
            BusEvent::Message(m) if m.envelope.kind == ToolCancel::TYPE => {}
            BusEvent::Message(m) => self.serve_request(std::sync::Arc::unwrap_or_clone(m).envelope),
            BusEvent::Up(_) => {
                // Redis may have come back empty: list our system tools again.
                let specs: Vec<ToolSpec> = lock(&self.shared.system).values().map(|t| t.spec.clone()).collect();
                let store = self.deps.store.clone();
                actix::spawn(async move {
                    for spec in specs {
                        let _ = store.put_system(&spec).await;
                    }
                });
            }
            BusEvent::Down(_) => {}
        }
        Reply::Now(())
    }
}

impl Handler<CallTool> for ToolRegistry {
    fn handle(&mut self, CallTool(call): CallTool, ctx: &mut Ctx<Self>) -> Reply<ToolResult> {
        let watched = CallToolWatched { call, progress: None, cancel: CancellationToken::new(), label: None };
        <Self as Handler<CallToolWatched>>::handle(self, watched, ctx)
    }
}

impl Handler<CancelCall> for ToolRegistry {
    fn handle(&mut self, msg: CancelCall, _: &mut Ctx<Self>) -> Reply<Result<usize, ToolError>> {
        let (store, publish, source) =
            (self.deps.store.clone(), self.publish.clone(), self.deps.kernel.node().to_owned());
        Reply::later(async move {
            let calls = store.cancellable(&msg.caller, &msg.label).await.map_err(ToolError::internal)?;
            let [(reply_to, call_id)] = calls.as_slice() else {
                if calls.len() > 1 {
                    tracing::info!(caller = %msg.caller, label = %msg.label, "several calls have this name; none cancelled");
                }
                return Ok(0);
            };
            let cancel = ToolCancel { call_id: call_id.clone(), caller: msg.caller };
            let envelope = Envelope::new(source, cancel).into_untyped();
            let heard = publish.publish(reply_to.clone(), envelope).await.map_err(ToolError::internal)?;
            // Nobody listening: the node that waited for it is gone.
            Ok(heard.min(1) as usize)
        })
    }
}

impl Handler<CallToolWatched> for ToolRegistry {
    fn handle(&mut self, watched: CallToolWatched, _: &mut Ctx<Self>) -> Reply<ToolResult> {
        let call = &watched.call;
        let span = tracing::info_span!(
            "nexus.tool.call",
            tool = %call.tool,
            call_id = %call.call_id,
            caller = %call.caller,
            outcome = tracing::field::Empty,
        );
        Reply::later(self.caller().call(watched, span.clone()).instrument(span))
    }
}
