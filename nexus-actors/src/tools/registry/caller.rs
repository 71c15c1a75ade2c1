//! One call's journey outside the registry actor, so calls overlap: the
//! name resolved and the arguments checked, the call run here or sent on
//! the bus and waited for, its progress handed on, its cancellation passed
//! to the tool's server, its outcome counted and recorded.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::{
    run_system, CallToolWatched, Pending, RegistryDeps, Resolved, Shared, MAX_LABEL, NAMING_WAIT, REPLY_GRACE,
    RESOLVE_CACHE_PRUNE_AT, RESOLVE_TTL,
};
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::kernel::lock;
use crate::platform::channels;
use crate::tools::protocol::{
    encoded_len, outcome_label, Outcome, ToolCall, ToolCalled, ToolCancel, ToolError, ToolFinished, ToolRequest,
    ToolResult, MAX_PAYLOAD_BYTES,
};
use crate::tools::recorder::Recorder;
use crate::tools::store::ToolStore;
use crate::tools::{ToolAddress, ToolOwner};

/// One call's journey, run outside the actor so calls overlap.
pub(super) struct Caller {
    pub(super) deps: RegistryDeps,
    pub(super) shared: Arc<Shared>,
    pub(super) publish: Publisher,
    pub(super) reply_channel: String,
    pub(super) recorder: Option<Recorder>,
}

impl Caller {
    pub(super) async fn call(self, watched: CallToolWatched, span: tracing::Span) -> ToolResult {
        let call = &watched.call;
        let started = Instant::now();
        let called = self.record(call, Envelope::new(self.deps.kernel.node(), ToolCalled { call: call.clone() }));
        let (label, result) = match self.resolve(call).await {
            Ok(resolved) => (resolved.spec.metric_label().to_owned(), self.dispatch(&watched, &resolved).await),
            Err((label, error)) => (label, Err(error)),
        };
        let finished = ToolFinished {
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            outcome: Outcome::from(result.clone()),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        self.record(call, Envelope::new(self.deps.kernel.node(), finished).caused_by(&called));
        let outcome = outcome_label(&result);
        let metrics = self.deps.kernel.metrics();
        metrics.mcp_exec.with_label_values(&[&label, outcome]).inc();
        metrics.tool_call_seconds.with_label_values(&[&label]).observe(started.elapsed().as_secs_f64());
        span.record("outcome", outcome);
        match &result {
            Ok(_) => tracing::debug!(tool = %call.tool, outcome, "nexus_mcp_exec_total"),
            Err(error) => tracing::info!(tool = %call.tool, outcome, %error, "nexus_mcp_exec_total"),
        }
        result
    }

    /// The tool behind the name, if the caller may use it, with its schema
    /// compiled; the arguments checked against it. A refusal comes with the
    /// metric label of the tool (`unknown` when there is none).
    async fn resolve(&self, call: &ToolCall) -> Result<Arc<Resolved>, (String, ToolError)> {
        let resolved = self.lookup(call).await.map_err(|e| ("unknown".to_owned(), e))?;
        let label = || resolved.spec.metric_label().to_owned();
        if !call.arguments.is_object() {
            let message = "arguments must be a JSON object".to_owned();
            return Err((label(), ToolError::InvalidArguments { message }));
        }
        let problems: Vec<String> = resolved
            .validator
            .iter_errors(&call.arguments)
            .take(5)
            .map(|e| match e.instance_path().as_str() {
                "" => e.to_string(),
                path => format!("{path}: {e}"),
            })
            .collect();
        if !problems.is_empty() {
            return Err((label(), ToolError::InvalidArguments { message: problems.join("; ") }));
        }
        Ok(resolved)
    }

    /// The tool behind the name, if the caller may use it.
    async fn lookup(&self, call: &ToolCall) -> Result<Arc<Resolved>, ToolError> {
        let not_found = || ToolError::NotFound { tool: call.tool.clone() };
        let size = encoded_len(&call.arguments);
        if size > MAX_PAYLOAD_BYTES {
            return Err(ToolError::TooLarge { what: "arguments".into(), size, limit: MAX_PAYLOAD_BYTES });
        }
        let address = ToolAddress::parse(&call.tool).ok_or_else(not_found)?;
        let cached = lock(&self.shared.resolved)
            .get(&call.tool)
            .filter(|(at, _)| at.elapsed() < RESOLVE_TTL)
            .map(|(_, r)| r.clone());
        let resolved = match cached {
            Some(resolved) => resolved,
            None => {
                let spec = self.deps.store.find(&address).await.map_err(ToolError::internal)?.ok_or_else(not_found)?;
                let validator = jsonschema::validator_for(&spec.input_schema)
                    .map_err(|e| ToolError::internal(format_args!("the tool's schema does not compile: {e}")))?;
                let resolved = Arc::new(Resolved { spec, validator });
                let mut cache = lock(&self.shared.resolved);
                if cache.len() >= RESOLVE_CACHE_PRUNE_AT {
                    cache.retain(|_, (at, _)| at.elapsed() < RESOLVE_TTL);
                }
                cache.insert(call.tool.clone(), (Instant::now(), resolved.clone()));
                resolved
            }
        };
        if !resolved.spec.visible_to(&call.caller) {
            return Err(not_found());
        }
        Ok(resolved)
    }

    async fn dispatch(&self, watched: &CallToolWatched, resolved: &Resolved) -> ToolResult {
        let call = &watched.call;
        let request = ToolRequest {
            call_id: call.call_id.clone(),
            tool: resolved.spec.local_name().to_owned(),
            arguments: call.arguments.clone(),
            caller: call.caller.clone(),
            deadline: call.deadline,
            idempotency_key: call.idempotency_key.clone().unwrap_or_else(|| call.call_id.clone()),
            keep_result: call.idempotency_key.is_some(),
            reply_to: self.reply_channel.clone(),
            resource: None,
        };
        let channel = match &resolved.spec.owner {
            ToolOwner::System => {
                let local = lock(&self.shared.system).get(&request.tool).cloned();
                if let Some(tool) = local {
                    let (tx, rx) = oneshot::channel();
                    let run = run_system(&self.deps.store, &tool, &request, |result| {
                        let _ = tx.send(result);
                        async {}
                    });
                    tokio::select! {
                        () = run => {}
                        () = watched.cancel.cancelled() => return Err(ToolError::Cancelled),
                    }
                    return rx.await.unwrap_or_else(|_| Err(ToolError::internal("the call was claimed twice")));
                }
                channels::system_tool(&request.tool)
            }
            ToolOwner::Panel { panel, .. } => channels::panel_calls(panel),
        };
        let owner = match &resolved.spec.owner {
            ToolOwner::System => format!("system tool {}", call.tool),
            ToolOwner::Panel { panel, .. } => format!("panel {panel}"),
        };
        self.send(watched, request, channel, owner).await
    }

    /// Sends `request` on `channel` (served by `owner`) and waits for its
    /// answer, its progress going to the caller, until the deadline or the
    /// caller's cancellation.
    pub(super) async fn send(
        &self,
        watched: &CallToolWatched,
        request: ToolRequest,
        channel: String,
        owner: String,
    ) -> ToolResult {
        let call = &watched.call;
        let wait = call.remaining() + REPLY_GRACE;
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            reply: tx,
            caller: call.caller.clone(),
            progress: watched.progress.clone(),
            cancel: watched.cancel.clone(),
        };
        lock(&self.shared.pending).insert(call.call_id.clone(), pending);
        let forget = || lock(&self.shared.pending).remove(&call.call_id);
        let _named = self.name(watched).await;
        if watched.cancel.is_cancelled() {
            forget();
            return Err(ToolError::Cancelled);
        }
        let envelope = Envelope::new(self.deps.kernel.node(), request).into_untyped();
        let published = match tokio::time::timeout(wait, self.publish.publish(channel.clone(), envelope)).await {
            Ok(Ok(0)) => Err(ToolError::PanelUnavailable { owner, message: "no sidecar is listening".into() }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(ToolError::PanelUnavailable { owner, message: format!("bus: {error}") }),
            Err(_) => Err(ToolError::Timeout { timeout_ms: wait.as_millis() as u64 }),
        };
        if let Err(error) = published {
            forget();
            return Err(error);
        }
        let answered = tokio::select! {
            // An answer that is there wins over a cancellation that is too.
            biased;
            answered = tokio::time::timeout(call.remaining() + REPLY_GRACE, rx) => answered,
            () = watched.cancel.cancelled() => {
                forget();
                let cancel = ToolCancel { call_id: call.call_id.clone(), caller: call.caller.clone() };
                let envelope = Envelope::new(self.deps.kernel.node(), cancel).into_untyped();
                if let Err(error) = self.publish.publish(channel, envelope).await {
                    tracing::warn!(%error, "could not tell the tool's server to stop a cancelled call");
                }
                return Err(ToolError::Cancelled);
            }
        };
        match answered {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ToolError::internal("the registry restarted during the call")),
            Err(_) => {
                forget();
                Err(ToolError::Timeout { timeout_ms: wait.as_millis() as u64 })
            }
        }
    }

    /// Makes a named call findable by [`CancelCall`] until the returned
    /// guard drops. Without Redis it still runs; it just cannot be
    /// cancelled from another node.
    async fn name(&self, watched: &CallToolWatched) -> Option<Named> {
        let label = watched.label.as_ref().filter(|l| l.len() <= MAX_LABEL)?;
        let call = &watched.call;
        let ttl = call.remaining() + REPLY_GRACE;
        let noted = self.deps.store.note_cancellable(&call.caller, label, &self.reply_channel, &call.call_id, ttl);
        match tokio::time::timeout(NAMING_WAIT, noted).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "a call could not be made cancellable from other nodes");
                return None;
            }
            Err(_) => {
                tracing::warn!("Redis was too slow to make a call cancellable from other nodes");
                return None;
            }
        }
        let entry = (call.caller.clone(), label.clone(), self.reply_channel.clone(), call.call_id.clone());
        Some(Named { store: self.deps.store.clone(), entry })
    }

    /// Records an event of this call on `semantic.events`, without waiting.
    fn record<T: Payload + Clone + 'static>(&self, call: &ToolCall, envelope: Envelope<T>) -> Envelope<T> {
        if let Some(recorder) = self.recorder.as_ref().filter(|_| !call.journaled_by_caller) {
            let key = call.context.clone().unwrap_or_else(|| call.call_id.clone());
            recorder.record(key, envelope.clone().into_untyped());
        }
        envelope
    }
}

/// A named call's entry for [`CancelCall`]; removed (without waiting) when
/// the call ends.
struct Named {
    store: ToolStore,
    /// Caller, label, reply channel and call id.
    entry: (String, String, String, String),
}

impl Drop for Named {
    fn drop(&mut self) {
        let store = self.store.clone();
        let (caller, label, reply_to, call_id) = std::mem::take(&mut self.entry);
        actix::spawn(async move {
            let _ = store.forget_cancellable(&caller, &label, &reply_to, &call_id).await;
        });
    }
}
