//! The request body of an OpenAI-compatible streamed chat completion,
//! built from our messages and tool offers. Shapes only; no I/O.
//!
//! The body is written straight from borrowed messages: a long context's
//! history is serialized once per endpoint and never copied into
//! intermediate JSON values on the way.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

use crate::semantic::chat::{ChatMessage, MessageToolCall, Role, ToolOffer};

/// The body for one endpoint: its `model` (and `max_tokens`), the
/// streaming options, the messages and, when there are any, the tools.
pub(super) fn body(model: &str, max_tokens: Option<u32>, messages: &[ChatMessage], tools: &[ToolOffer]) -> Vec<u8> {
    let body = Body {
        model,
        max_tokens,
        stream: true,
        stream_options: StreamOptions { include_usage: true },
        messages: Each(messages, WireMessage),
        // Some servers refuse an empty `tools` array.
        tools: (!tools.is_empty()).then_some(Each(tools, tool)),
    };
    serde_json::to_vec(&body).expect("a chat body of strings and JSON values always serializes")
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
    stream_options: StreamOptions,
    messages: Each<'a, ChatMessage, WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Each<'a, ToolOffer, Tool<'a>>>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// A slice written as a JSON array of its items' wire shapes.
struct Each<'a, T, W>(&'a [T], fn(&'a T) -> W);

impl<'a, T, W: Serialize> Serialize for Each<'a, T, W> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(self.1))
    }
}

struct WireMessage<'a>(&'a ChatMessage);

impl Serialize for WireMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut out = serializer.serialize_map(None)?;
        out.serialize_entry("role", role)?;
        // An assistant message that only calls tools has `content: null`;
        // elsewhere some servers insist on a string.
        match (&m.content, m.role) {
            (Some(text), _) => out.serialize_entry("content", text)?,
            (None, Role::Assistant) if !m.tool_calls.is_empty() => out.serialize_entry("content", &())?,
            (None, _) => out.serialize_entry("content", "")?,
        }
        if !m.tool_calls.is_empty() {
            out.serialize_entry("tool_calls", &Each(&m.tool_calls, call))?;
        }
        if let Some(id) = &m.tool_call_id {
            out.serialize_entry("tool_call_id", id)?;
        }
        out.end()
    }
}

#[derive(Serialize)]
struct Call<'a> {
    id: &'a str,
    r#type: &'static str,
    function: CalledFunction<'a>,
}

#[derive(Serialize)]
struct CalledFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

fn call(c: &MessageToolCall) -> Call<'_> {
    Call { id: &c.id, r#type: "function", function: CalledFunction { name: &c.name, arguments: &c.arguments } }
}

#[derive(Serialize)]
struct Tool<'a> {
    r#type: &'static str,
    function: OfferedFunction<'a>,
}

#[derive(Serialize)]
struct OfferedFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

fn tool(o: &ToolOffer) -> Tool<'_> {
    let function = OfferedFunction { name: &o.alias, description: &o.description, parameters: &o.parameters };
    Tool { r#type: "function", function }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn messages_and_tools_take_the_openai_shape() {
        let messages = vec![
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage::text(Role::User, "hi"),
            ChatMessage {
                role: Role::Assistant,
                content: None,
                tool_calls: vec![MessageToolCall { id: "c1".into(), name: "p_search".into(), arguments: "{}".into() }],
                tool_call_id: None,
            },
            ChatMessage {
                role: Role::Tool,
                content: Some("found".into()),
                tool_calls: vec![],
                tool_call_id: Some("c1".into()),
            },
            ChatMessage { role: Role::User, content: None, tool_calls: vec![], tool_call_id: None },
        ];
        let tools = vec![ToolOffer {
            alias: "p_search".into(),
            tool: "p.search".into(),
            description: "search".into(),
            parameters: json!({"type": "object"}),
        }];
        let sent: Value = serde_json::from_slice(&body("m", Some(64), &messages, &tools)).unwrap();
        assert_eq!(sent["model"], "m");
        assert_eq!(sent["max_tokens"], 64);
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            sent["messages"][2],
            json!({"role": "assistant", "content": null,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "p_search", "arguments": "{}"}}]})
        );
        assert_eq!(sent["messages"][3], json!({"role": "tool", "content": "found", "tool_call_id": "c1"}));
        assert_eq!(sent["messages"][4], json!({"role": "user", "content": ""}));
        assert_eq!(
            sent["tools"],
            json!([{"type": "function", "function": {"name": "p_search", "description": "search", "parameters": {"type": "object"}}}])
        );
        let bare: Value = serde_json::from_slice(&body("m", None, &messages, &[])).unwrap();
        assert!(bare.get("tools").is_none());
        assert!(bare.get("max_tokens").is_none());
        assert_eq!(bare["messages"], sent["messages"]);
    }
}
