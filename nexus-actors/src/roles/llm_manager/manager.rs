//! `LlmManager`: routes each command to its context's [`LlmContext`]
//! actor, starting one (rebuilt from the journal) when there is none,
//! stops a revoked partition's contexts, and stops contexts idle for
//! longer than the idle timeout. It does not run turns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::context::{Activity, ContextDeps, LlmContext};
use crate::bus::kafka::Nack;
use crate::envelope::Envelope;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Message, Reply};

/// One command for a context, from the inbox. Reply `Ok` once it is done:
/// its turn (or its creation) is on the journal.
#[derive(Debug, Clone)]
pub struct Command {
    /// The context id (the record key).
    pub context: String,
    /// Its partition of `semantic.commands`.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The command.
    pub envelope: Envelope<Value>,
}

impl Message for Command {
    type Reply = Result<(), Nack>;

    fn trace_context(&self) -> Option<crate::telemetry::TraceContext> {
        Some(self.envelope.trace_context())
    }
}

/// These partitions moved to another node: stop their contexts.
pub struct PartitionsRevoked(pub Vec<i32>);

impl Message for PartitionsRevoked {
    type Reply = ();
}

/// Stops contexts idle for longer than the idle timeout (sent by a timer).
struct Sweep;

impl Message for Sweep {
    type Reply = ();
}

/// Stops every context (the node is stopping).
pub struct StopContexts;

impl Message for StopContexts {
    type Reply = ();
}

/// How many contexts the manager runs now.
pub struct CountContexts;

impl Message for CountContexts {
    type Reply = usize;
}

struct Running {
    actor: ActorRef<LlmContext>,
    partition: i32,
    activity: Arc<Activity>,
}

/// The manager actor. See the module documentation.
pub struct LlmManager {
    deps: ContextDeps,
    idle: Duration,
    contexts: HashMap<String, Running>,
}

impl LlmManager {
    /// Actor kind in the mailbox graph.
    pub const KIND: &'static str = "llm_manager";

    /// A manager whose contexts share `deps` and stop after `idle` without work.
    pub fn new(deps: ContextDeps, idle: Duration) -> Self {
        LlmManager { deps, idle, contexts: HashMap::new() }
    }

    fn stop(&mut self, id: &str) {
        if let Some(running) = self.contexts.remove(id) {
            // At once, not when the actor gets to stopping: a turn under way
            // must write nothing more once its partition may be another's.
            running.activity.halt.raise();
            running.actor.stop();
        }
        self.deps.metrics.contexts.set(self.contexts.len() as i64);
    }
}

impl Behaviour for LlmManager {
    const KIND: &'static str = LlmManager::KIND;
    const MAILBOX: usize = 8192;

    fn started(&mut self, me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {
        // Contexts outlive nothing: after a restart they are rebuilt on demand.
        for (_, running) in self.contexts.drain() {
            running.activity.halt.raise();
            running.actor.stop();
        }
        let sweep = me.link::<Sweep>(LlmManager::KIND);
        let every = (self.idle / 4).clamp(Duration::from_millis(200), Duration::from_secs(10));
        actix::spawn(async move {
            loop {
                actix::clock::sleep(every).await;
                if sweep.ask(Sweep).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl Handler<Command> for LlmManager {
    fn handle(&mut self, command: Command, _ctx: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        let alive = self.contexts.get(&command.context).is_some_and(|r| r.actor.is_alive());
        if !alive {
            if let Some(gone) = self.contexts.get(&command.context) {
                // Its worker may still be finishing a turn: it starts no more
                // writes (one under way may land: the next worker's fence
                // comes after it, and folds it in).
                gone.activity.halt.raise();
            }
            let activity = Arc::new(Activity::default());
            let deps = self.deps.clone();
            let (id, a) = (command.context.clone(), activity.clone());
            let actor = self
                .deps
                .kernel
                .spawn(format!("llm-context-{id}"), move || LlmContext::new(id.clone(), deps.clone(), a.clone()));
            let running = Running { actor, partition: command.partition, activity };
            self.contexts.insert(command.context.clone(), running);
            self.deps.metrics.contexts.set(self.contexts.len() as i64);
        }
        let Some(running) = self.contexts.get(&command.context) else {
            return Reply::Now(Err(Nack("context not started".into())));
        };
        running.activity.touch();
        let link = running.actor.link::<Command>(LlmManager::KIND);
        Reply::later(async move {
            match link.ask(command).await {
                Ok(result) => result,
                Err(error) => Err(Nack(format!("context: {error:?}"))),
            }
        })
    }
}

impl Handler<PartitionsRevoked> for LlmManager {
    fn handle(&mut self, PartitionsRevoked(partitions): PartitionsRevoked, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let moved: Vec<String> =
            self.contexts.iter().filter(|(_, r)| partitions.contains(&r.partition)).map(|(id, _)| id.clone()).collect();
        for id in &moved {
            self.stop(id);
        }
        tracing::info!(contexts = moved.len(), ?partitions, "llm manager: stopped the contexts of revoked partitions");
        Reply::Now(())
    }
}

impl Handler<Sweep> for LlmManager {
    fn handle(&mut self, _: Sweep, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let idle: Vec<String> = self
            .contexts
            .iter()
            .filter(|(_, r)| !r.actor.is_alive() || r.activity.idle_for() >= self.idle)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            self.stop(id);
        }
        if !idle.is_empty() {
            tracing::debug!(stopped = idle.len(), "llm manager: idle contexts stopped");
        }
        Reply::Now(())
    }
}

impl Handler<StopContexts> for LlmManager {
    fn handle(&mut self, _: StopContexts, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let all: Vec<String> = self.contexts.keys().cloned().collect();
        for id in &all {
            self.stop(id);
        }
        Reply::Now(())
    }
}

impl Handler<CountContexts> for LlmManager {
    fn handle(&mut self, _: CountContexts, _ctx: &mut Ctx<Self>) -> Reply<usize> {
        Reply::Now(self.contexts.len())
    }
}
