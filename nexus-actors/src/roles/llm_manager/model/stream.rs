//! What an OpenAI-compatible endpoint streams back, and the assembly of it
//! into one answer: text, tool calls, finish reason, usage. It reads parsed
//! chunks only; the SSE framing and the HTTP are the client's.
//!
//! Parsing is tolerant, because local servers differ: unknown fields are
//! ignored, `id`/`created`/`object`/`model` may be missing, any field may be
//! `null`, usage may come in a last chunk with no choices (or never), a
//! non-streamed body (`message` instead of `delta`) reads the same way, and
//! tool-call arguments may be a JSON text (OpenAI) or an object (some
//! Ollama versions).
//!
//! Tool-call deltas are assembled by their `index`:
//! * a repeated `id` is ignored; a different one for the same index too
//!   (the first one stays);
//! * a name may come once, repeated whole in later deltas (ignored) or
//!   split (appended while no argument has come);
//! * arguments are appended wherever they were split;
//! * a delta without `index` continues the call last touched, unless it
//!   starts another: there is none yet, it brings an `id` other than that
//!   call's, or (no `id`) a name while that call has its name and
//!   arguments already. A new call takes the next index.

use serde::Deserialize;
use serde_json::Value;

use crate::semantic::records::Usage;

/// Most tool calls one answer may hold; more is a broken stream, not a plan.
const MAX_TOOL_CALLS: usize = 128;

/// One `data:` payload of the stream (or a whole non-streamed body).
#[derive(Debug, Default, Deserialize)]
pub(super) struct ChatChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Some servers report a failure mid-stream as a chunk of its own.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Default, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Default, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// One tool call of an answer, assembled from its deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembledCall {
    /// Its index among the answer's calls, as the model gave it (or assigned, see the module doc).
    pub index: usize,
    /// The id the model gave it, if any (the caller makes one up when missing or repeated).
    pub id: Option<String>,
    /// The function name as the model wrote it (an alias, or something invented).
    pub name: String,
    /// The arguments as the model wrote them: a JSON text, maybe invalid.
    pub arguments: String,
    /// Whether `arguments` is a JSON object (empty counts as `{}`).
    pub arguments_valid: bool,
}

/// Why a chunk cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fault {
    /// The endpoint sent an error object in the stream.
    Reported(String),
    /// More tool calls than [`MAX_TOOL_CALLS`].
    TooManyCalls,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Reported(error) => write!(f, "the endpoint reported an error in the stream: {error}"),
            Fault::TooManyCalls => write!(f, "more than {MAX_TOOL_CALLS} tool calls in one answer"),
        }
    }
}

#[derive(Debug, Default)]
struct PartialCall {
    index: usize,
    id: Option<String>,
    name: String,
    arguments: String,
}

/// An answer being assembled from its chunks.
#[derive(Debug, Default)]
pub(super) struct Assembler {
    content: String,
    has_content: bool,
    calls: Vec<PartialCall>,
    /// The position in `calls` of the call last touched.
    last: Option<usize>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    model: Option<String>,
}

/// What the chunks assembled into.
#[derive(Debug, Default)]
pub(super) struct Assembled {
    pub(super) content: Option<String>,
    pub(super) tool_calls: Vec<AssembledCall>,
    pub(super) finish_reason: Option<String>,
    pub(super) usage: Usage,
    pub(super) model: Option<String>,
}

impl Assembler {
    /// Takes one chunk in.
    pub(super) fn push(&mut self, chunk: ChatChunk) -> Result<(), Fault> {
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_owned);
            return Err(Fault::Reported(message));
        }
        if self.model.is_none() {
            self.model = chunk.model.filter(|m| !m.is_empty());
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(Usage {
                input_tokens: usage.prompt_tokens.unwrap_or(0),
                output_tokens: usage.completion_tokens.unwrap_or(0),
            });
        }
        // One answer asked for (`n` = 1): other choices are not ours.
        for choice in chunk.choices.unwrap_or_default().into_iter().filter(|c| c.index.unwrap_or(0) == 0) {
            if let Some(delta) = choice.delta.or(choice.message) {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.content.push_str(&text);
                    self.has_content = true;
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.push_call(call)?;
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish_reason = Some(reason);
            }
        }
        Ok(())
    }

    fn push_call(&mut self, delta: ToolCallDelta) -> Result<(), Fault> {
        let function = delta.function.unwrap_or_default();
        let name = function.name.filter(|n| !n.is_empty());
        let id = delta.id.filter(|i| !i.is_empty());
        let position = match delta.index {
            Some(index) => self.calls.iter().position(|c| c.index == index).map_or_else(|| self.open(index), Ok)?,
            None => match self.last.and_then(|at| self.calls.get(at).map(|call| (at, call))) {
                Some((at, call)) if !starts_another(call, id.as_deref(), name.as_deref()) => at,
                _ => {
                    let next = self.calls.iter().map(|c| c.index + 1).max().unwrap_or(0);
                    self.open(next)?
                }
            },
        };
        self.last = Some(position);
        let Some(call) = self.calls.get_mut(position) else { return Ok(()) };
        if call.id.is_none() {
            call.id = id;
        }
        if let Some(name) = name {
            if call.name.is_empty() || name.starts_with(call.name.as_str()) {
                call.name = name;
            } else if call.arguments.is_empty() {
                call.name.push_str(&name);
            }
        }
        match function.arguments {
            Some(Value::String(piece)) => call.arguments.push_str(&piece),
            Some(Value::Null) | None => {}
            Some(other) => call.arguments.push_str(&other.to_string()),
        }
        Ok(())
    }

    fn open(&mut self, index: usize) -> Result<usize, Fault> {
        if self.calls.len() >= MAX_TOOL_CALLS {
            return Err(Fault::TooManyCalls);
        }
        self.calls.push(PartialCall { index, ..PartialCall::default() });
        Ok(self.calls.len() - 1)
    }

    /// The text so far.
    pub(super) fn content(&self) -> &str {
        &self.content
    }

    /// Whether a first token (text or a tool-call delta) has come.
    pub(super) fn has_token(&self) -> bool {
        self.has_content || !self.calls.is_empty()
    }

    /// Whether the model said why it stopped: the answer is whole even if
    /// the stream ends without `[DONE]`.
    pub(super) fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// The answer, its calls in index order with their arguments checked.
    pub(super) fn finish(self) -> Assembled {
        let mut calls = self.calls;
        calls.sort_by_key(|c| c.index);
        let tool_calls = calls
            .into_iter()
            .map(|c| {
                let arguments_valid = c.arguments.trim().is_empty()
                    || serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object());
                AssembledCall { index: c.index, id: c.id, name: c.name, arguments: c.arguments, arguments_valid }
            })
            .collect();
        Assembled {
            content: self.has_content.then_some(self.content),
            tool_calls,
            finish_reason: self.finish_reason,
            usage: self.usage.unwrap_or_default(),
            model: self.model,
        }
    }
}

/// Whether a delta without `index` starts a call after `last` (see the module doc).
fn starts_another(last: &PartialCall, id: Option<&str>, name: Option<&str>) -> bool {
    match (id, &last.id) {
        (Some(id), Some(last_id)) => id != last_id,
        (Some(_), None) => !last.name.is_empty() || !last.arguments.is_empty(),
        (None, _) => name.is_some() && !last.name.is_empty() && !last.arguments.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn assemble(chunks: &[Value]) -> Assembled {
        let mut assembler = Assembler::default();
        for chunk in chunks {
            assembler.push(serde_json::from_value(chunk.clone()).unwrap()).unwrap();
        }
        assembler.finish()
    }

    fn call(index: Option<usize>, id: Option<&str>, name: Option<&str>, arguments: Option<&str>) -> Value {
        let mut call = json!({"function": {}});
        if let Some(index) = index {
            call["index"] = json!(index);
        }
        if let Some(id) = id {
            call["id"] = json!(id);
            call["type"] = json!("function");
        }
        if let Some(name) = name {
            call["function"]["name"] = json!(name);
        }
        if let Some(arguments) = arguments {
            call["function"]["arguments"] = json!(arguments);
        }
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    }

    #[test]
    fn text_usage_and_model_from_a_minimal_stream() {
        let a = assemble(&[
            json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "system_fingerprint": null,
                   "choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": null, "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}),
        ]);
        assert_eq!(a.content.as_deref(), Some("Hello"));
        assert_eq!(a.finish_reason.as_deref(), Some("stop"));
        assert_eq!(a.usage, Usage { input_tokens: 7, output_tokens: 2 });
        assert_eq!(a.model.as_deref(), Some("m"));
        assert!(a.tool_calls.is_empty());
    }

    #[test]
    fn nulls_everywhere_are_fine_and_no_text_is_no_content() {
        let a = assemble(&[
            json!({"model": null, "choices": null, "usage": null}),
            json!({"choices": [{"delta": {"content": null, "tool_calls": null}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
        ]);
        assert_eq!(a.content, None);
        assert_eq!(a.usage, Usage::default());
        assert_eq!(a.model, None);
    }

    #[test]
    fn arguments_split_mid_token_are_joined_by_index() {
        let a = assemble(&[
            call(Some(0), Some("call_a"), Some("search"), Some("")),
            call(Some(0), None, None, Some("{\"qu")),
            call(Some(0), None, None, Some("ery\": \"ca")),
            call(Some(0), None, None, Some("ts\"}")),
            json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
        ]);
        assert_eq!(a.tool_calls.len(), 1);
        let c = &a.tool_calls[0];
        assert_eq!((c.index, c.id.as_deref(), c.name.as_str()), (0, Some("call_a"), "search"));
        assert_eq!(c.arguments, r#"{"query": "cats"}"#);
        assert!(c.arguments_valid);
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn interleaved_parallel_calls_come_out_in_index_order() {
        let a = assemble(&[
            call(Some(1), Some("b"), Some("two"), Some("{\"y\":")),
            call(Some(0), Some("a"), Some("one"), Some("{\"x\":")),
            call(Some(1), None, None, Some("2}")),
            call(Some(0), None, None, Some("1}")),
        ]);
        let got: Vec<_> = a.tool_calls.iter().map(|c| (c.index, c.name.as_str(), c.arguments.as_str())).collect();
        assert_eq!(got, vec![(0, "one", "{\"x\":1}"), (1, "two", "{\"y\":2}")]);
    }

    #[test]
    fn repeated_ids_and_names_are_not_appended_and_a_split_name_is() {
        let a = assemble(&[
            call(Some(0), Some("id0"), Some("get_"), None),
            call(Some(0), Some("id0"), Some("weather"), Some("{")),
            call(Some(0), Some("other"), Some("get_weather"), Some("}")),
            call(Some(1), None, Some("x"), None),
            call(Some(1), None, Some("x"), Some("{}")),
        ]);
        assert_eq!(a.tool_calls[0].id.as_deref(), Some("id0"));
        assert_eq!(a.tool_calls[0].name, "get_weather");
        assert_eq!(a.tool_calls[0].arguments, "{}");
        assert_eq!((a.tool_calls[1].id.as_deref(), a.tool_calls[1].name.as_str()), (None, "x"));
    }

    #[test]
    fn deltas_without_index_continue_or_start_calls() {
        let a = assemble(&[
            call(None, Some("a"), Some("one"), Some("{\"x\"")),
            call(None, None, None, Some(":1}")),
            call(None, Some("b"), Some("two"), Some("{}")),
            call(None, None, Some("three"), Some("")),
            call(None, None, None, Some("[1]")),
        ]);
        let got: Vec<_> =
            a.tool_calls.iter().map(|c| (c.index, c.name.as_str(), c.arguments.as_str(), c.arguments_valid)).collect();
        assert_eq!(got, vec![(0, "one", "{\"x\":1}", true), (1, "two", "{}", true), (2, "three", "[1]", false)]);
    }

    #[test]
    fn arguments_are_checked_as_a_json_object() {
        let a = assemble(&[
            call(Some(0), None, Some("empty"), Some("")),
            call(Some(1), None, Some("cut"), Some("{\"a\": 1")),
            call(Some(2), None, Some("array"), Some("[]")),
            call(Some(3), None, Some("text"), Some("not json")),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 4, "function": {"name": "obj", "arguments": {"k": 1}}}]}}]}),
        ]);
        let valid: Vec<_> = a.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments_valid)).collect();
        assert_eq!(valid, vec![("empty", true), ("cut", false), ("array", false), ("text", false), ("obj", true)]);
        assert_eq!(a.tool_calls[4].arguments, r#"{"k":1}"#);
    }

    #[test]
    fn a_whole_message_reads_like_deltas() {
        let a = assemble(&[json!({
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "a", "type": "function", "function": {"name": "one", "arguments": "{}"}},
                               {"id": "b", "type": "function", "function": {"name": "two", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2}
        })]);
        let names: Vec<_> = a.tool_calls.iter().map(|c| (c.index, c.name.as_str())).collect();
        assert_eq!(names, vec![(0, "one"), (1, "two")]);
        assert_eq!(a.usage.output_tokens, 2);
    }

    #[test]
    fn other_choices_are_ignored_and_errors_and_floods_are_faults() {
        let a =
            assemble(&[json!({"choices": [{"index": 1, "delta": {"content": "no"}}, {"delta": {"content": "yes"}}]})]);
        assert_eq!(a.content.as_deref(), Some("yes"));

        let mut assembler = Assembler::default();
        let error = serde_json::from_value(json!({"error": {"message": "out of memory"}})).unwrap();
        assert_eq!(assembler.push(error), Err(Fault::Reported("out of memory".to_owned())));

        let mut assembler = Assembler::default();
        let flood: Vec<Value> = (0..=MAX_TOOL_CALLS).map(|i| json!({"index": i, "function": {"name": "f"}})).collect();
        let chunk = serde_json::from_value(json!({"choices": [{"delta": {"tool_calls": flood}}]})).unwrap();
        assert_eq!(assembler.push(chunk), Err(Fault::TooManyCalls));
    }

    #[test]
    fn the_first_token_and_the_finish_are_seen() {
        let mut assembler = Assembler::default();
        assert!(!assembler.has_token());
        assembler.push(serde_json::from_value(call(Some(0), Some("a"), Some("f"), None)).unwrap()).unwrap();
        assert!(assembler.has_token() && !assembler.finished());
        let stop = serde_json::from_value(json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})).unwrap();
        assembler.push(stop).unwrap();
        assert!(assembler.finished());
        assert_eq!(assembler.content(), "");
    }
}
