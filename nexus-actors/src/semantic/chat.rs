//! The conversation as a model sees it: OpenAI chat messages, built by
//! folding a journal (see [`super::fold`]), and the tools offered with it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Who speaks in a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The system prompt.
    System,
    /// The owner, or a panel's agent.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// A tool call inside an assistant message, as sent back to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageToolCall {
    /// The id the model gave it; the tool message answering it repeats it.
    pub id: String,
    /// The tool name as offered to the model (its alias).
    pub name: String,
    /// The arguments as the model wrote them.
    pub arguments: String,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// The text, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// For an assistant message: the tools it called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageToolCall>,
    /// For a tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text only.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: Some(content.into()), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A tool offered to a model: its alias (fits `^[a-zA-Z0-9_-]{1,64}$`),
/// what it does and its argument schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolOffer {
    /// The name the model sees.
    pub alias: String,
    /// The callable name behind the alias.
    pub tool: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub parameters: Value,
}
