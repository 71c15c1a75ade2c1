//! The platform's own system prompts: a small fixed set, shipped in the
//! binary, for the LLM manager's contexts. A new context names one with
//! `system_prompt` (instead of writing its own `system`), and MCP clients
//! find them in `prompts/list` under their plain names, beside the
//! `<panel-id>.<name>` prompts of the caller's panels, as system tools sit
//! beside panel tools.
//!
//! This module owns the set. It does not render templates: a system
//! prompt takes no arguments, and its text is used as it is.

/// One system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemPrompt {
    /// Its name: no dot, so it never meets a panel's `<panel-id>.<name>`.
    pub name: &'static str,
    /// What it is for, for people choosing one.
    pub description: &'static str,
    /// The system prompt itself.
    pub text: &'static str,
}

/// Every system prompt, in the order they are listed.
pub const ALL: &[SystemPrompt] = &[
    SystemPrompt {
        name: "assistant",
        description: "A system prompt: a general assistant of a Nexus workspace that works through its tools.",
        text: "You are the assistant of a Nexus Graph Studio workspace, acting for one user: you see only \
               their documents and the tools of their own panels. Use the tools you are offered (system \
               tools such as `list_documents` and `read_document`, and panel tools named \
               `<panel-id>.<tool>`) rather than guessing what they would return. When a tool fails, say \
               which one and why, and do not make up its result. Answer briefly.",
    },
    SystemPrompt {
        name: "document_reader",
        description: "A system prompt: answers questions about the user's documents from what they hold now.",
        text: "You answer questions about the user's Nexus documents. A document is JSON, with an id and a \
               version that grows with every change. Before you answer, call `list_documents` to find the \
               document and `read_document` to read its current state, and say which version you read. \
               When a document is not found, say so: it may not exist, or not be the user's. Never answer \
               from memory what a document holds.",
    },
    SystemPrompt {
        name: "panel_operator",
        description: "A system prompt: runs the user's panels' tools, with the arguments their schemas ask for.",
        text: "You run the tools of the user's Nexus panels for them. A panel tool is named \
               `<panel-id>.<tool>`, and its input schema says which arguments it takes: give exactly \
               those, of the types the schema names, and ask the user for any you do not know. A tool may \
               take a while; wait for its result. When a tool answers with an error, report its code and \
               message as they are.",
    },
];

/// The system prompt named `name`.
pub fn find(name: &str) -> Option<&'static SystemPrompt> {
    ALL.iter().find(|prompt| prompt.name == name)
}

/// The names of every system prompt, for a message that lists them.
pub fn names() -> String {
    ALL.iter().map(|prompt| prompt.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::records::MAX_SYSTEM_BYTES;

    #[test]
    fn the_set_has_distinct_plain_names_and_texts_a_context_takes() {
        for (i, prompt) in ALL.iter().enumerate() {
            assert!(!prompt.name.is_empty() && !prompt.name.contains('.'), "{}", prompt.name);
            assert!(prompt.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", prompt.name);
            assert!(ALL[..i].iter().all(|other| other.name != prompt.name), "{} twice", prompt.name);
            assert!(!prompt.text.trim().is_empty() && prompt.text.len() <= MAX_SYSTEM_BYTES);
            assert!(!prompt.text.contains("  "), "{}: a line break left spaces in the text", prompt.name);
            assert_eq!(find(prompt.name), Some(prompt));
        }
        assert_eq!(find("nope"), None);
        assert!(names().contains("assistant"));
    }
}
