//! Folding a context's journal into its [`Transcript`]: the conversation
//! as it stood after any record, what each step took, and the turn that
//! is still open. The LLM manager folds to know what to send next and what
//! is already done; the API folds to answer `transcript?at=`. Folding calls
//! no model and reads nothing: it is a pure function of the records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::chat::{ChatMessage, MessageToolCall, Role};
use super::records::{
    AgentMessage, ContextCreated, ForkPoint, LlmResponse, RequestedCall, Snapshot, StepFailed, ThoughtDelta,
    TurnCompleted, TurnOutcome, Usage, UserMessage,
};
use crate::envelope::{Envelope, Payload};
use crate::tools::protocol::{Outcome, ToolCalled, ToolFinished};

/// A message of the conversation with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TranscriptMessage {
    /// The journal offset of the record that made it.
    pub offset: i64,
    /// When that record was made.
    #[schema(value_type = String, format = DateTime)]
    pub time: DateTime<Utc>,
    /// The context whose journal holds it (a fork's parent, for inherited history).
    pub context: String,
    /// The message.
    #[serde(flatten)]
    pub message: ChatMessage,
    /// For a tool message: the callable tool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// For a user message from a panel's agent: the panel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panel: Option<String>,
}

/// What one step of a turn took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepTiming {
    /// The command whose turn it belongs to.
    pub command_offset: i64,
    /// `model`, `tool` or `failed`.
    pub kind: String,
    /// The model call number within the turn.
    pub step: u32,
    /// The model or the tool.
    pub name: String,
    /// The journal offset of the record that ended it.
    pub offset: i64,
    /// When it ended.
    #[schema(value_type = String, format = DateTime)]
    pub time: DateTime<Utc>,
    /// Time to the first token (model steps), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// `ok`, or an error code.
    pub outcome: String,
}

/// The turn still running at the end of what was folded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpenTurn {
    /// The command it answers.
    pub command_offset: i64,
    /// The next model call's number.
    pub next_step: u32,
    /// Model calls failed and recorded since the last answer of this turn.
    pub failures: u32,
    /// Tool calls of the last model response, in its order.
    pub calls: Vec<RequestedCall>,
    /// Their outcomes so far, by call id.
    #[schema(value_type = Object)]
    pub finished: BTreeMap<String, Value>,
    /// Tokens used so far.
    pub usage: Usage,
    /// The last text the model wrote in this turn.
    #[serde(default)]
    pub last_text: Option<String>,
    /// Text streamed in the step under way, not yet a response.
    #[serde(default)]
    pub streaming: String,
}

impl OpenTurn {
    /// Tool calls of the last response without a recorded outcome, in call order.
    pub fn unfinished_calls(&self) -> impl Iterator<Item = &RequestedCall> {
        self.calls.iter().filter(|c| !self.finished.contains_key(&c.call_id))
    }
}

/// A context's folded state. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Transcript {
    /// The context id.
    pub context: String,
    /// Its owner.
    pub owner: String,
    /// The model asked for at creation.
    pub model: Option<String>,
    /// The system prompt.
    pub system: Option<String>,
    /// The tools offered to the model.
    pub tools: Vec<String>,
    /// Where it was forked from, if it was.
    pub parent: Option<ForkPoint>,
    /// The conversation.
    pub messages: Vec<TranscriptMessage>,
    /// What each step took, in order.
    pub steps: Vec<StepTiming>,
    /// Commands answered (command offset → how).
    #[schema(value_type = Object)]
    pub answered: BTreeMap<i64, TurnOutcome>,
    /// The turn under way, if any.
    pub open: Option<OpenTurn>,
    /// The last journal offset folded in (of this context's journal).
    pub last_offset: i64,
    /// How many of this context's records were folded in.
    pub records: u64,
    /// Tokens used by every turn.
    pub usage: Usage,
    /// How many records the latest snapshot folded.
    #[serde(default)]
    pub snapshot_records: u64,
}

/// A journal record: its offset and envelope.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its offset in the context's partition of `semantic.events`.
    pub offset: i64,
    /// The record.
    pub envelope: Envelope<Value>,
}

impl Transcript {
    /// Whether the command at `command_offset` already has its answer.
    pub fn is_answered(&self, command_offset: i64) -> bool {
        self.answered.contains_key(&command_offset)
    }

    /// Whether the command at `command_offset` was accepted (its turn started).
    pub fn has_started(&self, command_offset: i64) -> bool {
        self.is_answered(command_offset) || self.open.as_ref().is_some_and(|t| t.command_offset == command_offset)
    }

    /// The conversation as the model is sent it: the system prompt, then every message.
    pub fn chat(&self) -> Vec<ChatMessage> {
        let system = self.system.iter().map(|s| ChatMessage::text(Role::System, s.clone()));
        system.chain(self.messages.iter().map(|m| m.message.clone())).collect()
    }

    /// This history as a fork starts from it: closed, without the turn
    /// under way; the child's own creation record then names the child.
    pub fn inherit(mut self) -> Transcript {
        self.open = None;
        self.records = 0;
        self
    }

    /// Folds one record of this context in. Records of other types (and
    /// ones that do not decode) only advance the offset.
    pub fn apply(&mut self, entry: &Entry) {
        let Entry { offset, envelope } = entry;
        let (offset, time) = (*offset, envelope.time);
        self.last_offset = self.last_offset.max(offset);
        self.records += 1;
        let data = &envelope.data;
        match envelope.kind.as_str() {
            ContextCreated::TYPE => {
                if let Ok(c) = decode::<ContextCreated>(data) {
                    self.context = c.context;
                    self.owner = c.owner;
                    self.model = c.model;
                    self.system = c.system;
                    self.tools = c.tools;
                    self.parent = c.parent;
                }
            }
            UserMessage::TYPE => {
                if let Ok(m) = decode::<UserMessage>(data) {
                    self.start_turn(m.command_offset, offset);
                    self.push(offset, time, ChatMessage::text(Role::User, m.content), None, None);
                }
            }
            AgentMessage::TYPE => {
                if let Ok(m) = decode::<AgentMessage>(data) {
                    self.start_turn(m.command_offset, offset);
                    self.push(offset, time, ChatMessage::text(Role::User, m.content), None, Some(m.panel));
                }
            }
            ThoughtDelta::TYPE => {
                if let (Ok(d), Some(open)) = (decode::<ThoughtDelta>(data), self.open.as_mut()) {
                    if d.step == open.next_step {
                        open.streaming.push_str(&d.text);
                    }
                }
            }
            LlmResponse::TYPE => {
                if let Ok(r) = decode::<LlmResponse>(data) {
                    self.apply_response(offset, time, r);
                }
            }
            ToolFinished::TYPE => {
                if let Ok(f) = decode::<ToolFinished>(data) {
                    self.apply_tool(offset, time, f);
                }
            }
            StepFailed::TYPE => {
                if let Ok(f) = decode::<StepFailed>(data) {
                    if let Some(open) = self.open.as_mut().filter(|t| t.command_offset == f.command_offset) {
                        open.failures += 1;
                        open.streaming.clear();
                    }
                    self.steps.push(StepTiming {
                        command_offset: f.command_offset,
                        kind: "failed".into(),
                        step: f.step,
                        name: f.endpoint.unwrap_or_default(),
                        offset,
                        time,
                        ttft_ms: None,
                        duration_ms: 0,
                        outcome: f.code,
                    });
                }
            }
            TurnCompleted::TYPE => {
                if let Ok(t) = decode::<TurnCompleted>(data) {
                    if self.open.as_ref().is_some_and(|o| o.command_offset == t.command_offset) {
                        self.open = None;
                    }
                    self.usage.input_tokens += t.usage.input_tokens;
                    self.usage.output_tokens += t.usage.output_tokens;
                    self.answered.insert(t.command_offset, t.outcome);
                }
            }
            Snapshot::TYPE => {
                if let Ok(s) = decode::<Snapshot>(data) {
                    self.snapshot_records = s.records;
                }
            }
            // Called records say what is about to run; only outcomes change the conversation.
            ToolCalled::TYPE => {}
            _ => {}
        }
    }

    fn start_turn(&mut self, command_offset: Option<i64>, offset: i64) {
        let command_offset = command_offset.unwrap_or(offset);
        self.open = Some(OpenTurn {
            command_offset,
            next_step: 0,
            failures: 0,
            calls: Vec::new(),
            finished: BTreeMap::new(),
            usage: Usage::default(),
            last_text: None,
            streaming: String::new(),
        });
    }

    fn push(
        &mut self,
        offset: i64,
        time: DateTime<Utc>,
        message: ChatMessage,
        tool: Option<String>,
        panel: Option<String>,
    ) {
        let context = self.context.clone();
        self.messages.push(TranscriptMessage { offset, time, context, message, tool, panel });
    }

    fn apply_response(&mut self, offset: i64, time: DateTime<Utc>, r: LlmResponse) {
        self.steps.push(StepTiming {
            command_offset: r.command_offset,
            kind: "model".into(),
            step: r.step,
            name: r.model.clone(),
            offset,
            time,
            ttft_ms: Some(r.ttft_ms),
            duration_ms: r.latency_ms,
            outcome: "ok".into(),
        });
        let tool_calls = r
            .tool_calls
            .iter()
            .map(|c| MessageToolCall { id: c.id.clone(), name: c.name.clone(), arguments: c.arguments.clone() })
            .collect();
        let message = ChatMessage { role: Role::Assistant, content: r.content.clone(), tool_calls, tool_call_id: None };
        self.push(offset, time, message, None, None);
        if let Some(open) = self.open.as_mut().filter(|t| t.command_offset == r.command_offset) {
            open.next_step = r.step + 1;
            open.failures = 0;
            open.calls = r.tool_calls;
            open.finished.clear();
            open.usage.input_tokens += r.usage.input_tokens;
            open.usage.output_tokens += r.usage.output_tokens;
            open.streaming.clear();
            if r.content.is_some() {
                open.last_text = r.content;
            }
        }
    }

    fn apply_tool(&mut self, offset: i64, time: DateTime<Utc>, f: ToolFinished) {
        let Some(open) = self.open.as_mut() else { return };
        let Some(call) = open.calls.iter().find(|c| c.call_id == f.call_id).cloned() else { return };
        if open.finished.contains_key(&f.call_id) {
            return;
        }
        let (content, outcome) = match &f.outcome {
            Outcome::Result(value) => (value.clone(), "ok".to_owned()),
            Outcome::Error(error) => {
                (serde_json::json!({ "error": error.code(), "message": error.to_string() }), error.code().to_owned())
            }
        };
        open.finished.insert(f.call_id.clone(), content.clone());
        let command_offset = open.command_offset;
        self.steps.push(StepTiming {
            command_offset,
            kind: "tool".into(),
            step: open.next_step.saturating_sub(1),
            name: f.tool.clone(),
            offset,
            time,
            ttft_ms: None,
            duration_ms: f.duration_ms,
            outcome,
        });
        let text = match content {
            Value::String(s) => s,
            other => other.to_string(),
        };
        let message = ChatMessage {
            role: Role::Tool,
            content: Some(text),
            tool_calls: Vec::new(),
            tool_call_id: Some(call.id.clone()),
        };
        self.push(offset, time, message, Some(call.name), None);
    }
}

fn decode<T: Payload>(data: &Value) -> Result<T, serde_json::Error> {
    T::deserialize(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::protocol::ToolError;

    const CTX: &str = "0190c0de-0000-7000-8000-000000000001";

    fn entry<T: Payload>(offset: i64, data: T) -> Entry {
        Entry { offset, envelope: Envelope::new("test", data).into_untyped() }
    }

    fn created() -> ContextCreated {
        ContextCreated {
            context: CTX.into(),
            owner: "ada".into(),
            model: None,
            system: Some("be brief".into()),
            tools: vec!["t".into()],
            parent: None,
            command_offset: Some(0),
        }
    }

    fn response(step: u32, content: Option<&str>, calls: Vec<RequestedCall>) -> LlmResponse {
        LlmResponse {
            context: CTX.into(),
            command_offset: 7,
            step,
            content: content.map(str::to_owned),
            tool_calls: calls,
            finish_reason: None,
            usage: Usage { input_tokens: 10, output_tokens: 2 },
            model: "m".into(),
            endpoint: "e".into(),
            ttft_ms: 1,
            latency_ms: 3,
        }
    }

    fn call(index: usize) -> RequestedCall {
        RequestedCall {
            id: format!("c{index}"),
            call_id: super::super::records::call_id(CTX, 7, 0, index),
            name: "t".into(),
            arguments: "{}".into(),
        }
    }

    fn user(offset: i64) -> Entry {
        entry(
            offset,
            UserMessage { context: CTX.into(), user: "ada".into(), content: "hi".into(), command_offset: Some(7) },
        )
    }

    fn finished(index: usize, outcome: Outcome) -> ToolFinished {
        ToolFinished { call_id: call(index).call_id, tool: "t".into(), outcome, duration_ms: 4 }
    }

    #[test]
    fn a_turn_with_tools_folds_into_the_chat_a_model_expects() {
        let mut t = Transcript::default();
        t.apply(&entry(1, created()));
        t.apply(&user(2));
        assert!(t.has_started(7) && !t.is_answered(7));
        t.apply(&entry(3, response(0, None, vec![call(0), call(1)])));
        t.apply(&entry(4, finished(1, Outcome::Result(serde_json::json!({"n": 1})))));
        let open = t.open.as_ref().unwrap();
        let unfinished: Vec<_> = open.unfinished_calls().map(|c| c.id.clone()).collect();
        assert_eq!(unfinished, ["c0"], "only the call without an outcome is left");
        t.apply(&entry(5, finished(0, Outcome::Error(ToolError::failed("boom")))));
        t.apply(&entry(6, response(1, Some("done"), vec![])));
        let done = TurnCompleted {
            context: CTX.into(),
            command_offset: 7,
            outcome: TurnOutcome::Completed,
            answer: Some("done".into()),
            steps: 2,
            usage: Usage { input_tokens: 20, output_tokens: 4 },
        };
        t.apply(&entry(8, done));
        assert!(t.is_answered(7) && t.open.is_none());
        let roles: Vec<Role> = t.chat().iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Tool, Role::Assistant]);
        assert_eq!(t.chat()[3].tool_call_id.as_deref(), Some("c1"), "results in the order they were recorded");
        assert!(t.chat()[4].content.as_deref().unwrap().contains("boom"));
        assert_eq!(t.steps.iter().filter(|s| s.kind == "tool").count(), 2);
        assert_eq!(t.usage.output_tokens, 4);
    }

    #[test]
    fn a_repeated_outcome_or_one_for_an_unknown_call_changes_nothing() {
        let mut t = Transcript::default();
        t.apply(&entry(1, created()));
        t.apply(&user(2));
        t.apply(&entry(3, response(0, None, vec![call(0)])));
        t.apply(&entry(4, finished(0, Outcome::Result(Value::Null))));
        let before = t.messages.len();
        t.apply(&entry(5, finished(0, Outcome::Result(Value::Null))));
        t.apply(&entry(6, finished(9, Outcome::Result(Value::Null))));
        assert_eq!(t.messages.len(), before);
    }

    #[test]
    fn streamed_text_shows_mid_step_and_a_fork_closes_the_open_turn() {
        let mut t = Transcript::default();
        t.apply(&entry(1, created()));
        t.apply(&user(2));
        let delta = |text: &str| ThoughtDelta { context: CTX.into(), command_offset: 7, step: 0, text: text.into() };
        t.apply(&entry(3, delta("hel")));
        t.apply(&entry(4, delta("lo")));
        assert_eq!(t.open.as_ref().unwrap().streaming, "hello");
        let mut child = t.inherit();
        let mut child_created = created();
        child_created.context = "child".into();
        child.apply(&entry(1, child_created));
        assert!(child.open.is_none());
        assert_eq!(child.context, "child");
        assert_eq!(child.messages.len(), 1, "the child keeps the history, not the turn under way");
        assert_eq!(child.messages[0].context, CTX, "inherited messages say whose journal holds them");
    }

    #[test]
    fn records_that_do_not_decode_only_advance_the_offset() {
        let mut t = Transcript::default();
        let mut bad = entry(9, created());
        bad.envelope.data = serde_json::json!({"context": 1});
        t.apply(&bad);
        assert_eq!((t.last_offset, t.owner.as_str()), (9, ""));
    }
}
