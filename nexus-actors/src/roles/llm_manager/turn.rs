//! One turn: model calls and tool runs until the model answers without
//! tools, each step journaled before the next relies on it, so a turn cut
//! off anywhere resumes from its last recorded step. A step whose
//! `nexus.llm.response` is on the journal is never sent to a model again;
//! a tool call whose `nexus.tool.finished` is there never runs again (and
//! one that was running when the turn was cut off runs again under the
//! same idempotency key, which the tool's server honours). Every turn ends
//! with exactly one `nexus.context.turn_completed`.
//!
//! A new turn's message is journaled while its first model call starts
//! (see [`Start`]): the call's text waits for the message's record, so the
//! journal order is the same as if the call had waited, but the model's
//! time to first token and the append overlap.

use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::context::ContextDeps;
use super::model::{Aliases, Completion, ModelError, ModelRequest};
use super::writer::WriteError;
use crate::envelope::Envelope;
use crate::semantic::chat::{ChatMessage, ToolOffer};
use crate::semantic::fold::Transcript;
use crate::semantic::records::{
    call_id, LlmResponse, RequestedCall, StepFailed, ThoughtDelta, TurnCompleted, TurnOutcome,
};
use crate::tools::protocol::{Outcome, ToolCall, ToolCalled, ToolError, ToolFinished};
use crate::tools::registry::{CallTool, ListTools};

/// What bounds a turn.
#[derive(Debug, Clone, Copy)]
pub struct TurnLimits {
    /// Most model calls in one turn (default 8).
    pub max_steps: u32,
    /// Failed model calls after which the turn fails (default 2).
    pub max_failures: u32,
    /// Longest a turn may take (default 5 minutes).
    pub deadline: Duration,
    /// Longest one tool call may take (default 60 s).
    pub tool_timeout: Duration,
    /// How long streamed text gathers before it is journaled (default 50 ms).
    pub coalesce: Duration,
}

impl Default for TurnLimits {
    fn default() -> Self {
        TurnLimits {
            max_steps: 8,
            max_failures: 2,
            deadline: Duration::from_secs(300),
            tool_timeout: Duration::from_secs(60),
            coalesce: Duration::from_millis(50),
        }
    }
}

/// A new turn's message, not journaled yet.
#[derive(Debug)]
pub struct Start {
    /// Its journal copy.
    pub copy: Envelope<Value>,
    /// The message as the model is sent it.
    pub message: ChatMessage,
}

/// Which model call a step is.
#[derive(Clone, Copy)]
struct StepAt<'a> {
    context: &'a str,
    command_offset: i64,
    step: u32,
}

/// Runs or resumes the turn of `command_offset` until its `turn_completed`
/// is journaled: a new turn from `start`, one already started from what is
/// folded into `t`. Fails only when the journal cannot be written, or the
/// context's actor stopped under it (its partition moved, or the node is
/// stopping); the command is then delivered again and the turn resumes
/// from what was recorded.
pub async fn run(
    deps: &ContextDeps,
    t: &mut Transcript,
    command_offset: i64,
    mut cancel: watch::Receiver<u64>,
    start: Option<Start>,
) -> Result<(), WriteError> {
    let deadline = Instant::now() + deps.limits.deadline;
    let offers = offers(deps, t).await;
    let aliases = Aliases::new(&offers.iter().map(|o| o.tool.clone()).collect::<Vec<_>>());
    let offers: Vec<ToolOffer> = offers
        .into_iter()
        .map(|o| ToolOffer { alias: aliases.alias_of(&o.tool).unwrap_or(&o.tool).to_owned(), ..o })
        .collect();
    let mut cancelled = false;
    // The first model call's outcome, when it ran beside the message's append.
    let mut first = None;
    if let Some(Start { copy, message }) = start {
        let (model, messages) = (t.model.clone(), chat(t, &aliases, Some(message)));
        let request = ModelRequest { model: model.as_deref(), messages: &messages, tools: &offers, deadline };
        first = first_step(deps, t, command_offset, copy, request, &mut cancel).await?;
        cancelled = first.is_none();
    }
    loop {
        let Some(open) = t.open.clone().filter(|o| o.command_offset == command_offset) else { return Ok(()) };
        if let Some(outcome) = first.take() {
            if record(deps, t, command_offset, open.next_step, outcome, &aliases).await? {
                return finish(deps, t, command_offset, TurnOutcome::Failed, "", "").await;
            }
            continue;
        }
        if cancelled || cancel.has_changed().unwrap_or(false) {
            return finish(deps, t, command_offset, TurnOutcome::Cancelled, "cancelled", "the turn was cancelled")
                .await;
        }
        if Instant::now() >= deadline {
            let reason = format!("the turn took longer than its deadline of {:?}", deps.limits.deadline);
            return finish(deps, t, command_offset, TurnOutcome::Failed, "deadline", &reason).await;
        }
        let unfinished: Vec<RequestedCall> = open.unfinished_calls().cloned().collect();
        if !unfinished.is_empty() {
            let run = run_tools(deps, t, &unfinished, &offers);
            let results = tokio::select! {
                results = run => results,
                changed = cancel.changed() => {
                    changed.map_err(|_| WriteError::Stopped)?;
                    cancelled = true;
                    None
                }
            };
            match results {
                Some(results) => {
                    for (call, outcome, duration_ms) in results {
                        let finished = ToolFinished {
                            call_id: call.call_id.clone(),
                            tool: call.name.clone(),
                            outcome,
                            duration_ms,
                        };
                        let entry = deps.writer.append(&t.context, finished).await?;
                        t.apply(&entry);
                    }
                }
                None => continue,
            }
            continue;
        }
        if open.next_step > 0 && open.calls.is_empty() && last_step_answered(t, command_offset) {
            return finish(deps, t, command_offset, TurnOutcome::Completed, "", "").await;
        }
        if open.next_step >= deps.limits.max_steps {
            let reason = format!("the model asked for tools {} times in one turn, the limit", deps.limits.max_steps);
            return finish(deps, t, command_offset, TurnOutcome::Failed, "step_limit", &reason).await;
        }
        if open.failures >= deps.limits.max_failures {
            return finish(deps, t, command_offset, TurnOutcome::Failed, "", "").await;
        }
        let step = open.next_step;
        let messages = chat(t, &aliases, None);
        let request = ModelRequest { model: t.model.as_deref(), messages: &messages, tools: &offers, deadline };
        let call = call_model(deps, request, StepAt { context: &t.context, command_offset, step }, None);
        let outcome = tokio::select! {
            outcome = call => outcome?,
            changed = cancel.changed() => {
                changed.map_err(|_| WriteError::Stopped)?;
                cancelled = true;
                continue;
            }
        };
        if record(deps, t, command_offset, step, outcome, &aliases).await? {
            return finish(deps, t, command_offset, TurnOutcome::Failed, "", "").await;
        }
    }
}

/// Journals the turn's message while its first model call runs, and folds
/// it in: the call's text is journaled only after the message, and its
/// outcome is returned to be recorded after it. `None` when the turn was
/// cancelled meanwhile.
async fn first_step(
    deps: &ContextDeps,
    t: &mut Transcript,
    command_offset: i64,
    copy: Envelope<Value>,
    request: ModelRequest<'_>,
    cancel: &mut watch::Receiver<u64>,
) -> Result<Option<Result<Completion, ModelError>>, WriteError> {
    let context = t.context.clone();
    let (journaled, gate) = oneshot::channel();
    let copy = async {
        let entry = deps.writer.append_envelope(&context, copy).await;
        if entry.is_ok() {
            let _ = journaled.send(());
        }
        entry
    };
    let call = call_model(deps, request, StepAt { context: &context, command_offset, step: 0 }, Some(gate));
    tokio::pin!(copy, call);
    // The message is folded in as soon as it is journaled: whatever happens
    // to the call after that, the transcript holds what the journal does.
    let mut copied = false;
    let outcome = loop {
        tokio::select! {
            // The copy first: its produce is handed to the bridge before the
            // request is built, and the text waits for its acknowledgement.
            biased;
            entry = &mut copy, if !copied => {
                t.apply(&entry?);
                copied = true;
            }
            outcome = &mut call => break Some(outcome?),
            changed = cancel.changed() => {
                changed.map_err(|_| WriteError::Stopped)?;
                break None;
            }
        }
    };
    if !copied {
        t.apply(&copy.await?);
    }
    Ok(outcome)
}

/// Journals the outcome of model call `step`; true when the turn cannot go
/// on (no endpoint, or past its deadline).
async fn record(
    deps: &ContextDeps,
    t: &mut Transcript,
    command_offset: i64,
    step: u32,
    outcome: Result<Completion, ModelError>,
    aliases: &Aliases,
) -> Result<bool, WriteError> {
    match outcome {
        Ok(completion) => {
            for error in &completion.failed_attempts {
                let failed = failed_step(t, command_offset, step, error);
                let entry = deps.writer.append(&t.context.clone(), failed).await?;
                t.apply(&entry);
            }
            let response = response(t, command_offset, step, completion, aliases);
            let entry = deps.writer.append(&t.context.clone(), response).await?;
            t.apply(&entry);
            Ok(false)
        }
        Err(error) => {
            let failed = failed_step(t, command_offset, step, &error);
            tracing::warn!(context = %t.context, step, code = error.code(), %error, "model step failed");
            let entry = deps.writer.append(&t.context.clone(), failed).await?;
            t.apply(&entry);
            Ok(matches!(error, ModelError::Deadline | ModelError::NoEndpoint))
        }
    }
}

/// The record of a failed model call.
fn failed_step(t: &Transcript, command_offset: i64, step: u32, error: &ModelError) -> StepFailed {
    StepFailed {
        context: t.context.clone(),
        command_offset,
        step,
        code: error.code().to_owned(),
        reason: error.to_string(),
        endpoint: error.endpoint().map(str::to_owned),
    }
}

/// Whether the last model response of the turn came after its last failure.
fn last_step_answered(t: &Transcript, command_offset: i64) -> bool {
    t.steps
        .iter()
        .rev()
        .find(|s| s.command_offset == command_offset && s.kind != "tool")
        .is_some_and(|s| s.kind == "model")
}

/// Journals the end of the turn (after a failed step saying why, if `code` is set).
async fn finish(
    deps: &ContextDeps,
    t: &mut Transcript,
    command_offset: i64,
    outcome: TurnOutcome,
    code: &str,
    reason: &str,
) -> Result<(), WriteError> {
    let Some(open) = t.open.clone() else { return Ok(()) };
    if !code.is_empty() {
        let failed = StepFailed {
            context: t.context.clone(),
            command_offset,
            step: open.next_step,
            code: code.to_owned(),
            reason: reason.to_owned(),
            endpoint: None,
        };
        let entry = deps.writer.append(&t.context.clone(), failed).await?;
        t.apply(&entry);
    }
    let answer = if outcome == TurnOutcome::Completed { open.last_text.clone() } else { None };
    let completed = TurnCompleted {
        context: t.context.clone(),
        command_offset,
        outcome,
        answer,
        steps: open.next_step,
        usage: open.usage,
    };
    let entry = deps.writer.append(&t.context.clone(), completed).await?;
    t.apply(&entry);
    tracing::info!(context = %t.context, command_offset, ?outcome, steps = open.next_step, "turn completed");
    Ok(())
}

/// The tools the context offers, as the owner may call them now.
async fn offers(deps: &ContextDeps, t: &Transcript) -> Vec<ToolOffer> {
    if t.tools.is_empty() {
        return Vec::new();
    }
    let specs = match deps.list_tools.ask(ListTools { user: t.owner.clone() }).await {
        Ok(Ok(specs)) => specs,
        other => {
            tracing::warn!(context = %t.context, ?other, "could not list tools; the model gets none this turn");
            return Vec::new();
        }
    };
    specs
        .into_iter()
        .filter(|s| t.tools.contains(&s.name))
        .map(|s| ToolOffer {
            alias: s.name.clone(),
            tool: s.name,
            description: s.description,
            parameters: s.input_schema,
        })
        .collect()
}

/// The conversation as the model is sent it, with `next` (a message not
/// folded in yet) last, tool names as aliases.
fn chat(t: &Transcript, aliases: &Aliases, next: Option<ChatMessage>) -> Vec<ChatMessage> {
    t.chat()
        .into_iter()
        .chain(next)
        .map(|mut m| {
            for call in &mut m.tool_calls {
                if let Some(alias) = aliases.alias_of(&call.name) {
                    call.name = alias.to_owned();
                }
            }
            m
        })
        .collect()
}

/// One model call, its streamed text journaled as coalesced deltas; with
/// a `gate`, none before it opens (and none at all if it closes).
async fn call_model(
    deps: &ContextDeps,
    request: ModelRequest<'_>,
    at: StepAt<'_>,
    mut gate: Option<oneshot::Receiver<()>>,
) -> Result<Result<Completion, ModelError>, WriteError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let model = async move {
        let mut on_text = |text: &str| {
            let _ = tx.send(text.to_owned());
        };
        deps.model.complete(request, &mut on_text).await
    };
    let StepAt { context, command_offset, step } = at;
    let pump = async {
        let mut pending = String::new();
        let mut flush_at: Option<Instant> = None;
        let mut first = true;
        loop {
            let received = match flush_at {
                Some(at) => tokio::time::timeout_at(at, rx.recv()).await,
                None => Ok(rx.recv().await),
            };
            if let Ok(Some(text)) = &received {
                pending.push_str(text);
                // The first text of a step goes out at once (time to first
                // token); what follows gathers for the coalescing window.
                if !first {
                    flush_at.get_or_insert(Instant::now() + deps.limits.coalesce);
                    continue;
                }
            }
            first = false;
            if !pending.is_empty() {
                if let Some(gate) = gate.take() {
                    if gate.await.is_err() {
                        return Ok(());
                    }
                }
                let text = std::mem::take(&mut pending);
                let delta = ThoughtDelta { context: context.to_owned(), command_offset, step, text };
                deps.writer.append_delta(context, delta).await?;
            }
            flush_at = None;
            if matches!(received, Ok(None)) {
                return Ok::<(), WriteError>(());
            }
        }
    };
    let (completion, pumped) = futures::join!(model, pump);
    pumped?;
    Ok(completion)
}

/// The journal record of a finished model call: names back from aliases,
/// ids made up where the model gave none or repeated one.
fn response(t: &Transcript, command_offset: i64, step: u32, c: Completion, aliases: &Aliases) -> LlmResponse {
    let mut seen = std::collections::HashSet::new();
    let tool_calls = c
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            let id = call.id.filter(|id| !id.is_empty() && seen.insert(id.clone())).unwrap_or_else(|| {
                let made = format!("call_{step}_{index}");
                seen.insert(made.clone());
                made
            });
            let name = aliases.tool_of(&call.name).map_or(call.name.clone(), str::to_owned);
            // Arguments are kept as the model wrote them, valid or not: running
            // the call reports invalid ones back to the model as an error.
            RequestedCall {
                id,
                call_id: call_id(&t.context, command_offset, step, index),
                name,
                arguments: call.arguments,
            }
        })
        .collect();
    LlmResponse {
        context: t.context.clone(),
        command_offset,
        step,
        content: c.content,
        tool_calls,
        finish_reason: c.finish_reason,
        usage: c.usage,
        model: c.model,
        endpoint: c.endpoint,
        ttft_ms: c.ttft.as_millis() as u64,
        latency_ms: c.latency.as_millis() as u64,
    }
}

/// Runs `calls` concurrently as the owner; outcomes in call order. The
/// `called` records are journaled first, in call order.
async fn run_tools(
    deps: &ContextDeps,
    t: &Transcript,
    calls: &[RequestedCall],
    offers: &[ToolOffer],
) -> Option<Vec<(RequestedCall, Outcome, u64)>> {
    let mut prepared = Vec::with_capacity(calls.len());
    for call in calls {
        let arguments: Result<Value, ToolError> = match serde_json::from_str::<Value>(&call.arguments) {
            Ok(Value::Object(map)) => Ok(Value::Object(map)),
            Ok(_) | Err(_) if call.arguments.trim().is_empty() => Ok(Value::Object(Default::default())),
            Ok(_) => Err(ToolError::InvalidArguments { message: "the arguments must be a JSON object".into() }),
            Err(e) => Err(ToolError::InvalidArguments { message: format!("the arguments are not valid JSON: {e}") }),
        };
        let mut tool_call = ToolCall::new(call.name.clone(), arguments.clone().unwrap_or(Value::Null), t.owner.clone())
            .with_timeout(deps.limits.tool_timeout)
            .with_idempotency_key(call.call_id.clone())
            .with_context(t.context.clone());
        // A fresh call id per attempt, the same idempotency key: a tool's
        // server takes a second delivery of one call id for a duplicate and
        // stays silent, but answers a retry with the first outcome.
        tool_call.journaled_by_caller = true;
        let called = Envelope::new(deps.writer.source.clone(), ToolCalled { call: tool_call.clone() }).into_untyped();
        if deps.writer.append_envelope(&t.context, called).await.is_err() {
            return None;
        }
        let offered = offers.iter().any(|o| o.tool == call.name);
        prepared.push((call.clone(), tool_call, arguments, offered));
    }
    let runs = prepared.into_iter().map(|(call, tool_call, arguments, offered)| async move {
        let started = Instant::now();
        let outcome = match (arguments, offered) {
            (_, false) => Outcome::Error(ToolError::NotFound { tool: call.name.clone() }),
            (Err(error), true) => Outcome::Error(error),
            (Ok(_), true) => match deps.tools.ask(CallTool(tool_call)).await {
                Ok(result) => Outcome::from(result),
                Err(error) => Outcome::Error(ToolError::internal(format_args!("tool registry: {error:?}"))),
            },
        };
        (call, outcome, started.elapsed().as_millis() as u64)
    });
    Some(join_all(runs).await)
}
