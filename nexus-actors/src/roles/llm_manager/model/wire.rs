//! The request body of an OpenAI-compatible streamed chat completion,
//! built from our messages and tool offers. Shapes only; no I/O.

use serde_json::{json, Map, Value};

use crate::semantic::chat::{ChatMessage, Role, ToolOffer};

/// The body for one endpoint: its `model` (and `max_tokens`) plus the
/// fields every endpoint shares.
pub(super) fn body(model: &str, max_tokens: Option<u32>, shared: &Map<String, Value>) -> Vec<u8> {
    let mut body = shared.clone();
    body.insert("model".to_owned(), Value::String(model.to_owned()));
    if let Some(max_tokens) = max_tokens {
        body.insert("max_tokens".to_owned(), json!(max_tokens));
    }
    Value::Object(body).to_string().into_bytes()
}

/// The fields of the body that do not depend on the endpoint.
pub(super) fn shared(messages: &[ChatMessage], tools: &[ToolOffer]) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("stream".to_owned(), Value::Bool(true));
    body.insert("stream_options".to_owned(), json!({"include_usage": true}));
    body.insert("messages".to_owned(), messages.iter().map(message).collect());
    // Some servers refuse an empty `tools` array.
    if !tools.is_empty() {
        body.insert("tools".to_owned(), tools.iter().map(tool).collect());
    }
    body
}

fn message(message: &ChatMessage) -> Value {
    let role = match message.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut out = Map::new();
    out.insert("role".to_owned(), json!(role));
    // An assistant message that only calls tools has `content: null`;
    // elsewhere some servers insist on a string.
    let content = match (&message.content, message.role) {
        (Some(text), _) => json!(text),
        (None, Role::Assistant) if !message.tool_calls.is_empty() => Value::Null,
        (None, _) => json!(""),
    };
    out.insert("content".to_owned(), content);
    if !message.tool_calls.is_empty() {
        let calls = message
            .tool_calls
            .iter()
            .map(|call| json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}))
            .collect();
        out.insert("tool_calls".to_owned(), Value::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".to_owned(), json!(id));
    }
    Value::Object(out)
}

fn tool(offer: &ToolOffer) -> Value {
    json!({
        "type": "function",
        "function": {"name": offer.alias, "description": offer.description, "parameters": offer.parameters},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::chat::MessageToolCall;

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
        ];
        let tools = vec![ToolOffer {
            alias: "p_search".into(),
            tool: "p.search".into(),
            description: "search".into(),
            parameters: json!({"type": "object"}),
        }];
        let sent: Value = serde_json::from_slice(&body("m", None, &shared(&messages, &tools))).unwrap();
        assert_eq!(sent["model"], "m");
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(
            sent["messages"][2],
            json!({"role": "assistant", "content": null,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "p_search", "arguments": "{}"}}]})
        );
        assert_eq!(sent["messages"][3], json!({"role": "tool", "content": "found", "tool_call_id": "c1"}));
        assert_eq!(
            sent["tools"],
            json!([{"type": "function", "function": {"name": "p_search", "description": "search", "parameters": {"type": "object"}}}])
        );
        let bare: Value = serde_json::from_slice(&body("m", None, &shared(&messages, &[]))).unwrap();
        assert!(bare.get("tools").is_none());
    }
}
