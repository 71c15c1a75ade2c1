//! Tools: what system services and panels expose for users and the LLM to
//! call, and how a call reaches them.
//!
//! * [`ToolSpec`] and [`ToolOwner`]: what a tool is and who serves it.
//! * [`protocol`]: the typed call, its reply and the error codes callers see,
//!   as they travel on the transactional bus.
//! * [`manifest`]: a panel's `GET /manifest`, parsed and validated.
//! * [`prompts`]: the prompt templates a manifest declares, checked and rendered.
//! * [`resources`]: the read-only resources a manifest declares.
//! * [`store`]: the shared listing of every tool in Redis, and the
//!   idempotency claims that make a call run once.
//! * [`registry`]: the `ToolRegistry` actor of a node: system tools served
//!   here, calls to any tool, their metrics and their record on Kafka.
//!
//! Executing a panel tool over HTTP is the sidecar's job, not this module's.

pub mod manifest;
pub mod prompts;
pub mod protocol;
pub mod recorder;
pub mod registry;
pub mod resources;
pub mod store;
pub mod system;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use protocol::{ToolCall, ToolError};
pub use registry::ToolRegistry;
pub use system::SystemTool;

/// The longest name a tool may have inside its owner (a panel or the system).
pub const MAX_LOCAL_NAME: usize = 64;

/// Whether `name` is a valid tool name inside its owner:
/// `^[A-Za-z][A-Za-z0-9_-]{0,63}$`. Dots are reserved for namespacing.
pub fn is_valid_local_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && name.len() <= MAX_LOCAL_NAME
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Who serves a tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToolOwner {
    /// Built into Nexus nodes; every logged-in user may call it.
    System,
    /// Exposed by a panel through its sidecar; only the panel's owner may call it.
    Panel {
        /// The panel's id.
        panel: String,
        /// The panel's owner, the only user who sees and may call the tool.
        user: String,
    },
}

/// A tool as the registry lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolSpec {
    /// The name callers use: `resize_image` for a system tool,
    /// `<panel-id>.resize_image` for a panel's tool.
    pub name: String,
    /// What the tool does, for people and the LLM.
    pub description: String,
    /// JSON Schema of the arguments (always an object schema).
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// Who serves it, and so who may call it.
    pub owner: ToolOwner,
}

impl ToolSpec {
    /// The name inside its owner (`resize_image` in `<panel>.resize_image`).
    pub fn local_name(&self) -> &str {
        match &self.owner {
            ToolOwner::System => &self.name,
            ToolOwner::Panel { panel, .. } => self.name.strip_prefix(panel.as_str()).map_or(&self.name, |n| &n[1..]),
        }
    }

    /// Whether `user` may see and call it: anyone for a system tool, only
    /// the panel's owner for a panel's tool.
    pub fn visible_to(&self, user: &str) -> bool {
        match &self.owner {
            ToolOwner::System => true,
            ToolOwner::Panel { user: owner, .. } => owner == user,
        }
    }

    /// The bounded `tool` label of metrics: a system tool's name, or `panel`
    /// (panel tool names are chosen by users and would grow without bound).
    pub fn metric_label(&self) -> &str {
        match &self.owner {
            ToolOwner::System => &self.name,
            ToolOwner::Panel { .. } => "panel",
        }
    }
}

/// Where a tool name points: a system tool, or a tool of one panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolAddress<'a> {
    /// A system tool, by name.
    System(&'a str),
    /// A tool of one panel (`<panel>.<tool>`).
    Panel {
        /// The panel part of the name (before the last dot), meant to be its id.
        panel: &'a str,
        /// The tool's name inside the panel.
        tool: &'a str,
    },
}

impl<'a> ToolAddress<'a> {
    /// Splits a callable name; `None` when it cannot name any tool.
    pub fn parse(name: &'a str) -> Option<Self> {
        match name.rsplit_once('.') {
            None => is_valid_local_name(name).then_some(ToolAddress::System(name)),
            Some((panel, tool)) => (!panel.is_empty()
                && panel.len() <= 128
                && panel.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && is_valid_local_name(tool))
            .then_some(ToolAddress::Panel { panel, tool }),
        }
    }
}

/// The namespaced name of a panel's tool.
pub fn panel_tool_name(panel: &str, tool: &str) -> String {
    format!("{panel}.{tool}")
}

/// The object schema that accepts any arguments.
pub fn any_object_schema() -> Value {
    serde_json::json!({ "type": "object" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_namespaced() {
        assert!(is_valid_local_name("resize_image"));
        assert!(is_valid_local_name("a-1"));
        assert!(!is_valid_local_name(""));
        assert!(!is_valid_local_name("1abc"));
        assert!(!is_valid_local_name("a.b"));
        assert!(!is_valid_local_name("a b"));
        assert!(!is_valid_local_name(&"a".repeat(65)));
        assert_eq!(ToolAddress::parse("resize_image"), Some(ToolAddress::System("resize_image")));
        assert_eq!(
            ToolAddress::parse("0190-ab.resize_image"),
            Some(ToolAddress::Panel { panel: "0190-ab", tool: "resize_image" })
        );
        assert_eq!(ToolAddress::parse(".x"), None);
        assert_eq!(ToolAddress::parse("p:1.x"), None);
        assert_eq!(ToolAddress::parse("p.1x"), None);
        let spec = ToolSpec {
            name: panel_tool_name("p1", "resize_image"),
            description: String::new(),
            input_schema: any_object_schema(),
            owner: ToolOwner::Panel { panel: "p1".into(), user: "ada".into() },
        };
        assert_eq!(spec.local_name(), "resize_image");
        assert!(spec.visible_to("ada") && !spec.visible_to("bob"));
        assert_eq!(spec.metric_label(), "panel");
    }
}
