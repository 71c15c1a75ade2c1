//! The transaction manager's system tools: what the LLM (or any caller)
//! may do with the caller's own documents, and `llm_ask`, which makes the
//! LLM manager usable from any MCP client. Registered on every node that
//! runs the role; each call runs as the calling user, who reaches only
//! their own documents and contexts.
//!
//! `llm_ask` posts a message and waits for its turn's
//! `nexus.context.turn_completed`: live on the context's Redis channel
//! (subscribed before the message is produced, so the answer cannot come
//! first), and, since pub/sub may drop a message, by reading the journal
//! every [`ASK_POLL`] as well.

use std::time::Duration;

use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::contexts::{check_message, ContextError, ContextsApi, NewContext};
use super::documents::Documents;
use crate::envelope::Envelope;
use crate::platform::channels;
use crate::semantic::records::{Journaled, TurnCompleted, TurnOutcome, UserMessage};
use crate::tools::protocol::{remaining_until, ToolError};
use crate::tools::system::CallContext;
use crate::tools::SystemTool;

/// How often `llm_ask` reads the journal in case the live record was dropped.
pub const ASK_POLL: Duration = Duration::from_secs(2);
/// Time `llm_ask` keeps before its call's deadline to say where the turn goes on.
const ASK_MARGIN: Duration = Duration::from_millis(250);
/// Records one journal read of `llm_ask` looks at.
const ASK_SCAN: usize = 1000;

/// `list_documents` takes no arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// Arguments of `read_document`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadDocument {
    /// The document's id.
    pub id: String,
}

/// Arguments of `llm_ask`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmAsk {
    /// One of your contexts to continue; omitted: a new context.
    #[serde(default)]
    pub context: Option<String>,
    /// What to say to the model.
    pub message: String,
    /// For a new context: the model to ask (default: the first configured endpoint's).
    #[serde(default)]
    pub model: Option<String>,
    /// For a new context: one of the platform's system prompts, by name
    /// (`assistant`, `document_reader`, `panel_operator`).
    #[serde(default)]
    pub system_prompt: Option<String>,
}

/// What `llm_ask` answers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct LlmAnswer {
    /// The context the turn ran in (new or given).
    pub context: String,
    /// The model's final text, if any.
    pub answer: Option<String>,
    /// How the turn ended.
    pub outcome: TurnOutcome,
    /// Model calls the turn made.
    pub steps: u32,
}

/// The role's tools, bound to its stores; `llm_ask` when the node serves contexts.
pub fn tools(store: &Documents, contexts: Option<&ContextsApi>) -> Vec<SystemTool> {
    let mut tools = document_tools(store);
    if let Some(contexts) = contexts {
        let contexts = contexts.clone();
        tools.push(SystemTool::new(
            "llm_ask",
            "Asks the LLM: posts a message into one of the caller's contexts (or a new one) and returns the \
             model's answer when its turn completes: {context, answer, outcome, steps}.",
            move |args: LlmAsk, cx| ask(contexts.clone(), args, cx),
        ));
    }
    tools
}

async fn ask(contexts: ContextsApi, args: LlmAsk, cx: CallContext) -> Result<LlmAnswer, ToolError> {
    contexts.need_model()?;
    check_message(&args.message)?;
    let info = match args.context {
        Some(id) => {
            if args.model.is_some() || args.system_prompt.is_some() {
                let message =
                    "model and system_prompt apply to a new context only: a context keeps what it was made with";
                return Err(ToolError::InvalidArguments { message: message.into() });
            }
            // A turn of this very context calling the tool would wait for itself.
            if cx.call_id.starts_with(&format!("{id}/")) {
                return Err(ToolError::failed("a context cannot ask itself: its turn would wait for its own answer"));
            }
            contexts.visible(&id, &cx.caller, false).await?
        }
        None => {
            let spec = NewContext { model: args.model, system_prompt: args.system_prompt, ..NewContext::default() };
            contexts.create(&cx.caller, spec, None).await?
        }
    };
    // The turn's records come after everything journaled so far (a read starts at the first record at least).
    let scan_from = info.last_offset.map_or(0, |o| o + 1);
    let context = info.id;
    let mut live = contexts.redis.get_async_pubsub().await.map_err(ToolError::internal)?;
    live.subscribe(channels::context(&context)).await.map_err(ToolError::internal)?;
    let message =
        UserMessage { context: context.clone(), user: cx.caller.clone(), content: args.message, command_offset: None };
    let accepted = contexts.command(&context, message).await?;
    let wait = remaining_until(cx.deadline).saturating_sub(ASK_MARGIN);
    let target = TurnOf { command: accepted.id, offset: accepted.offset };
    let turn = tokio::time::timeout(wait, completion(&contexts, &context, target, live, scan_from)).await;
    match turn {
        Ok(done) => {
            let done = done?;
            Ok(LlmAnswer { context, answer: done.answer, outcome: done.outcome, steps: done.steps })
        }
        Err(_) => Err(ToolError::failed(format!(
            "no answer within the call's deadline; the turn goes on in context {context}: \
             read it at GET /api/contexts/{context}/transcript"
        ))),
    }
}

/// Waits for the `turn_completed` of the command `target`.
async fn completion(
    contexts: &ContextsApi,
    context: &str,
    mut target: TurnOf,
    live: redis::aio::PubSub,
    mut scan_from: i64,
) -> Result<TurnCompleted, ContextError> {
    let mut live = Some(live.into_on_message());
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + ASK_POLL, ASK_POLL);
    loop {
        let next = async {
            match live.as_mut() {
                Some(messages) => messages.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = next => match message {
                Some(message) => {
                    let journaled = Envelope::decode(message.get_payload_bytes()).ok()
                        .and_then(|e| e.typed::<Journaled>().ok())
                        .map(|e| e.data);
                    let Some(Journaled { offset, record, .. }) = journaled else { continue };
                    if let Some(done) = target.completed_by(record) {
                        // Live frames are not fenced (a frozen machine's late write
                        // may be one): the answer is the one the journal keeps.
                        if kept(contexts, context, offset).await {
                            return Ok(done);
                        }
                    }
                }
                // The connection dropped: the journal still has it.
                None => live = None,
            },
            _ = poll.tick() => {
                let Some(info) = contexts.directory.get(context).await? else { return Err(ContextError::NotFound) };
                match contexts.events(&info, scan_from, ASK_SCAN).await {
                    Ok(entries) => {
                        for entry in entries {
                            scan_from = entry.offset + 1;
                            if let Some(done) = target.completed_by(entry.envelope) {
                                return Ok(done);
                            }
                        }
                    }
                    Err(error) => tracing::debug!(context, %error, "journal not read; trying again"),
                }
            }
        }
    }
}

/// Whether the journal of `context` keeps the record at `offset` (every
/// reader leaves out a fenced-off writer's).
async fn kept(contexts: &ContextsApi, context: &str, offset: i64) -> bool {
    let Ok(Some(info)) = contexts.directory.get(context).await else { return false };
    contexts.events(&info, offset, 1).await.is_ok_and(|found| found.first().is_some_and(|e| e.offset == offset))
}

/// The turn `llm_ask` waits for: its command's offset, or, when the broker
/// acknowledged the command without one, the command's id, which the
/// journal copy of the message carries as its cause (with the offset).
#[derive(Debug)]
struct TurnOf {
    command: String,
    offset: Option<i64>,
}

impl TurnOf {
    /// `record` as the answer to the command, if it is that; learns the
    /// command's offset from the message's journal copy when needed.
    fn completed_by(&mut self, record: Envelope<Value>) -> Option<TurnCompleted> {
        if self.offset.is_none() && record.causationid.as_deref() == Some(self.command.as_str()) {
            self.offset = record.data.get("command_offset").and_then(Value::as_i64);
        }
        let done = record.typed::<TurnCompleted>().ok()?.data;
        (Some(done.command_offset) == self.offset).then_some(done)
    }
}

fn document_tools(store: &Documents) -> Vec<SystemTool> {
    let list_store = store.clone();
    let read_store = store.clone();
    vec![
        SystemTool::new(
            "list_documents",
            "Lists the caller's documents: their ids and current versions.",
            move |_: NoArguments, cx| {
                let store = list_store.clone();
                async move {
                    let docs = store.of(&cx.caller).await.map_err(ToolError::internal)?;
                    let docs: Vec<Value> = docs.iter().map(|d| json!({"id": d.id, "version": d.version})).collect();
                    Ok(json!({ "documents": docs }))
                }
            },
        ),
        SystemTool::new(
            "read_document",
            "Reads one of the caller's documents: its current version and state (JSON).",
            move |args: ReadDocument, cx| {
                let store = read_store.clone();
                async move {
                    let doc = store.get(&args.id).await.map_err(ToolError::internal)?;
                    match doc {
                        Some(doc) if doc.owner == cx.caller => {
                            Ok(json!({"id": doc.id, "version": doc.version, "state": doc.state}))
                        }
                        _ => Err(ToolError::failed(format!("you have no document {:?}", args.id))),
                    }
                }
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::records::Usage;

    fn completed(command_offset: i64) -> Envelope<Value> {
        let done = TurnCompleted {
            context: "c".into(),
            command_offset,
            outcome: TurnOutcome::Completed,
            answer: Some("yes".into()),
            steps: 1,
            usage: Usage::default(),
        };
        Envelope::new("llm", done).into_untyped()
    }

    fn message(command_offset: Option<i64>) -> UserMessage {
        UserMessage { context: "c".into(), user: "ada".into(), content: "hi".into(), command_offset }
    }

    #[test]
    fn a_turn_is_found_by_its_command_offset() {
        let mut turn = TurnOf { command: "cmd".into(), offset: Some(7) };
        assert!(turn.completed_by(completed(6)).is_none());
        assert_eq!(turn.completed_by(completed(7)).map(|d| d.command_offset), Some(7));
    }

    #[test]
    fn without_an_offset_the_turn_is_found_through_the_copy_of_its_message() {
        let command = Envelope::new("node", message(None)).into_untyped();
        let mut turn = TurnOf { command: command.id.clone(), offset: None };
        // Another message's turn, ending before ours is known, is not ours.
        assert!(turn.completed_by(completed(3)).is_none());
        let other = Envelope::new("node", message(None)).into_untyped();
        let theirs = message(Some(3));
        assert!(turn.completed_by(Envelope::new("llm", theirs).caused_by(&other).into_untyped()).is_none());
        let ours = message(Some(9));
        assert!(turn.completed_by(Envelope::new("llm", ours).caused_by(&command).into_untyped()).is_none());
        assert!(turn.completed_by(completed(3)).is_none());
        assert_eq!(turn.completed_by(completed(9)).map(|d| d.command_offset), Some(9));
    }
}
