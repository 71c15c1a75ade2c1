//! The records of the semantic bus, one payload type per intent.
//!
//! * Commands, on `semantic.commands` (the inbox of the LLM manager, keyed
//!   by context id): [`ContextCreated`], [`UserMessage`], [`AgentMessage`],
//!   [`Cancel`].
//! * The journal, on `semantic.events` (keyed by context id): each accepted
//!   command is copied there once, with its command offset, then what the
//!   turn did: [`ThoughtDelta`], [`LlmResponse`], the tool registry's
//!   [`ToolCalled`](crate::tools::protocol::ToolCalled) and
//!   [`ToolFinished`](crate::tools::protocol::ToolFinished),
//!   [`StepFailed`], [`TurnCompleted`] and an occasional [`Snapshot`];
//!   [`ContextFenced`] where a writer takes the context over.
//!
//! Each record holds only what is new: the conversation sent to a model is
//! rebuilt by folding the journal ([`super::fold`]), never stored again.
//! This module defines shapes; it sends and reads nothing.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::envelope::Payload;

/// Largest message a user or a panel's agent may post (64 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest system prompt (32 KiB).
pub const MAX_SYSTEM_BYTES: usize = 32 * 1024;
/// Most tools one context may offer its model.
pub const MAX_TOOLS: usize = 128;

/// A command that is copied to the journal once accepted, stamped with
/// its offset on `semantic.commands`.
pub trait JournaledCommand: Payload + for<'de> Deserialize<'de> {
    /// The journal copy of the command read at `offset`.
    fn at_offset(self, offset: i64) -> Self;
}

macro_rules! journaled_command {
    ($($t:ty),*) => {$(
        impl JournaledCommand for $t {
            fn at_offset(mut self, offset: i64) -> Self {
                self.command_offset = Some(offset);
                self
            }
        }
    )*};
}

journaled_command!(ContextCreated, UserMessage, AgentMessage);

/// Where a forked context branches off its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkPoint {
    /// The parent context's id.
    pub context: String,
    /// The parent's journal offset: its records up to and including this one are the child's history.
    pub offset: i64,
}

/// `nexus.context.created`: a new context. On the journal it is the first record of the context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContextCreated {
    /// The context id (a UUID), also the record key.
    pub context: String,
    /// The user who owns it: the caller of its tools; the only user (with admins) who sees it.
    pub owner: String,
    /// The model asked for; `None`: the first configured endpoint's.
    #[serde(default)]
    pub model: Option<String>,
    /// The system prompt, if any.
    #[serde(default)]
    pub system: Option<String>,
    /// Tools the model is offered (callable names, `<panel-id>.<tool>` or a system tool). Empty: none.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Set when the context is a fork: the parent and the offset it branches at.
    #[serde(default)]
    pub parent: Option<ForkPoint>,
    /// The offset of the command on `semantic.commands`; set on the journal copy.
    #[serde(default)]
    pub command_offset: Option<i64>,
}

impl Payload for ContextCreated {
    const TYPE: &'static str = "nexus.context.created";
}

/// `nexus.context.user_message`: the owner says something; the model answers in a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserMessage {
    /// The context id.
    pub context: String,
    /// The user who sent it (the owner or an admin).
    pub user: String,
    /// What they said.
    pub content: String,
    /// The offset of the command on `semantic.commands`; set on the journal copy.
    #[serde(default)]
    pub command_offset: Option<i64>,
}

impl Payload for UserMessage {
    const TYPE: &'static str = "nexus.context.user_message";
}

/// `nexus.context.agent_message`: a panel's local agent says something
/// into a context its owner owns; the model answers in a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentMessage {
    /// The context id.
    pub context: String,
    /// The panel whose agent sent it.
    pub panel: String,
    /// What it said.
    pub content: String,
    /// The offset of the command on `semantic.commands`; set on the journal copy.
    #[serde(default)]
    pub command_offset: Option<i64>,
}

impl Payload for AgentMessage {
    const TYPE: &'static str = "nexus.context.agent_message";
}

/// `nexus.context.cancel`: stop the turn that is running, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cancel {
    /// The context id.
    pub context: String,
    /// Who asked.
    pub user: String,
}

impl Payload for Cancel {
    const TYPE: &'static str = "nexus.context.cancel";
}

/// `nexus.thought.delta`: streamed text of a model call, coalesced to about 50 ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ThoughtDelta {
    /// The context id.
    pub context: String,
    /// The command whose turn this belongs to.
    pub command_offset: i64,
    /// The model call within the turn (0, 1, …).
    pub step: u32,
    /// The text since the previous delta of this step.
    pub text: String,
}

impl Payload for ThoughtDelta {
    const TYPE: &'static str = "nexus.thought.delta";
}

/// A tool call the model asked for, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequestedCall {
    /// The id the model gave it (or one made up when it gave none or repeated one); the tool result answers it.
    pub id: String,
    /// Our call id: `<context>/<command offset>/<step>.<index>`, also the idempotency key.
    pub call_id: String,
    /// The callable tool name (alias resolved), or the name the model invented.
    pub name: String,
    /// The arguments as the model wrote them (a JSON text, maybe invalid).
    pub arguments: String,
}

/// Tokens a model call used, as the endpoint reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
}

/// `nexus.llm.response`: one finished model call: the assistant message
/// with its tool calls, usage, model, endpoint and latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LlmResponse {
    /// The context id.
    pub context: String,
    /// The command whose turn this belongs to.
    pub command_offset: i64,
    /// The model call within the turn (0, 1, …).
    pub step: u32,
    /// The assistant's text, if any.
    #[serde(default)]
    pub content: Option<String>,
    /// The tools it asked to call, in its order.
    #[serde(default)]
    pub tool_calls: Vec<RequestedCall>,
    /// Why the model stopped (`stop`, `tool_calls`, `length`).
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Tokens used.
    #[serde(default)]
    pub usage: Usage,
    /// The model that answered.
    pub model: String,
    /// The endpoint that answered (its configured name).
    pub endpoint: String,
    /// Time to the first token, in milliseconds.
    pub ttft_ms: u64,
    /// Time to the whole answer, in milliseconds.
    pub latency_ms: u64,
}

impl Payload for LlmResponse {
    const TYPE: &'static str = "nexus.llm.response";
}

/// `nexus.context.failed`: a step that failed, with a clear reason. The
/// turn may go on (a retried step) or end with [`TurnCompleted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepFailed {
    /// The context id.
    pub context: String,
    /// The command whose turn this belongs to.
    pub command_offset: i64,
    /// The model call within the turn.
    pub step: u32,
    /// A stable code: `model_http`, `model_timeout`, `model_stream`, `deadline`, `step_limit`, `cancelled`, `no_endpoint`, `journal`.
    pub code: String,
    /// What happened, for people.
    pub reason: String,
    /// The endpoint involved, if any.
    #[serde(default)]
    pub endpoint: Option<String>,
}

impl Payload for StepFailed {
    const TYPE: &'static str = "nexus.context.failed";
}

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnOutcome {
    /// The model answered.
    Completed,
    /// It could not finish (see the [`StepFailed`] before it).
    Failed,
    /// Someone cancelled it.
    Cancelled,
}

/// `nexus.context.turn_completed`: the one answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TurnCompleted {
    /// The context id.
    pub context: String,
    /// The command this answers.
    pub command_offset: i64,
    /// How it ended.
    pub outcome: TurnOutcome,
    /// The final assistant text, if any.
    #[serde(default)]
    pub answer: Option<String>,
    /// Model calls made.
    pub steps: u32,
    /// Tokens used by the turn.
    #[serde(default)]
    pub usage: Usage,
}

impl Payload for TurnCompleted {
    const TYPE: &'static str = "nexus.context.turn_completed";
}

/// `nexus.context.snapshot`: the folded state of a context up to `at`, so a
/// rebuild reads only what follows. Written at geometric record counts
/// (256, 512, 1024, …), so all of a context's snapshots together are at
/// most about twice its journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The context id.
    pub context: String,
    /// The last journal offset the state includes.
    pub at: i64,
    /// The records of the context the state includes.
    pub records: u64,
    /// The folded state (see [`super::fold::Transcript`]).
    pub state: Value,
}

impl Payload for Snapshot {
    const TYPE: &'static str = "nexus.context.snapshot";
}

/// `nexus.context.fenced`: from here on the context is `writer`'s, the
/// first record a writer (an LLM manager process, its lease member) puts
/// on a context's journal when it takes the context up, before it folds
/// the journal. Records of a writer fenced off this way that land later
/// (written before a pause, acknowledged after it) are not the context's:
/// readers drop them ([`super::directory::Fences`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextFenced {
    /// The writer that takes the context up.
    pub writer: String,
}

impl Payload for ContextFenced {
    const TYPE: &'static str = "nexus.context.fenced";
}

/// The types a context's journal holds, besides the tool registry's.
pub const JOURNAL_TYPES: [&str; 9] = [
    ContextCreated::TYPE,
    UserMessage::TYPE,
    AgentMessage::TYPE,
    ThoughtDelta::TYPE,
    LlmResponse::TYPE,
    StepFailed::TYPE,
    TurnCompleted::TYPE,
    Snapshot::TYPE,
    ContextFenced::TYPE,
];

/// `<context>/<command offset>/<step>.<index>`: a tool call's id and idempotency key.
pub fn call_id(context: &str, command_offset: i64, step: u32, index: usize) -> String {
    format!("{context}/{command_offset}/{step}.{index}")
}

/// Whether `id` is a context id: a UUID in its hyphenated form.
pub fn is_context_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::parse_str(id).is_ok()
}

/// What the LLM manager publishes on Redis `nexus:context:{id}` for each
/// record it journals, so browsers following the context see it live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journaled {
    /// The context id.
    pub context: String,
    /// The record's offset in the context's partition of `semantic.events`.
    pub offset: i64,
    /// The record.
    pub record: crate::envelope::Envelope<Value>,
}

impl Payload for Journaled {
    const TYPE: &'static str = "nexus.context.journaled";
}
