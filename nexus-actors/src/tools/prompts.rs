//! Prompts that panels declare in their manifest: MCP prompt templates,
//! offered to the panel's owner as `<panel-id>.<name>` next to its tools.
//!
//! A prompt is a list of messages whose text holds `{{ name }}` placeholders
//! of the prompt's arguments, and nothing else: the manifest is untrusted,
//! and a template language (loops, string arithmetic, filters) would let it
//! spin or swell inside the node. Placeholders are checked when the
//! manifest is read (one naming no argument refuses it), and rendering
//! stops as soon as a message passes [`MAX_RENDERED`]. This module parses,
//! checks and renders; storing is [`super::store`]'s job, and speaking MCP
//! is the transaction manager's.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::is_valid_local_name;
use super::manifest::{ManifestError, MAX_DESCRIPTION};

/// Most prompts one panel may declare.
pub const MAX_PROMPTS: usize = 32;
/// Most arguments one prompt may take.
pub const MAX_ARGUMENTS: usize = 16;
/// Most messages one prompt may have.
pub const MAX_MESSAGES: usize = 16;
/// Longest message template, in bytes.
pub const MAX_TEMPLATE: usize = 16 * 1024;
/// Longest rendered message, in bytes.
pub const MAX_RENDERED: usize = 64 * 1024;
/// Longest argument value a caller may pass, in bytes.
pub const MAX_ARGUMENT_VALUE: usize = 16 * 1024;

/// One argument of a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptArgument {
    /// Its name, as the template uses it.
    pub name: String,
    /// What to pass, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether a caller must pass it.
    #[serde(default)]
    pub required: bool,
}

/// Who speaks a message of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptRole {
    /// The user.
    User,
    /// The assistant.
    Assistant,
}

/// One message of a prompt: who speaks, and the template of what is said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// Who speaks.
    pub role: PromptRole,
    /// The text, with `{{ name }}` where argument `name` goes.
    pub text: String,
}

/// A prompt of a valid manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// The name inside the panel (a valid local name).
    pub name: String,
    /// What the prompt is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What it takes.
    #[serde(default)]
    pub arguments: Vec<PromptArgument>,
    /// What it says (1 to [`MAX_MESSAGES`]).
    pub messages: Vec<PromptMessage>,
}

/// Why a prompt could not be rendered for a caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// A required argument is missing.
    #[error("the prompt needs argument {0:?}")]
    Missing(String),
    /// An argument is not a string, or is too long.
    #[error("argument {0:?} must be a string of at most {MAX_ARGUMENT_VALUE} bytes")]
    BadArgument(String),
    /// A message came out over [`MAX_RENDERED`].
    #[error("a message of the prompt comes out over {MAX_RENDERED} bytes")]
    TooLarge,
}

impl Prompt {
    /// Checks the prompts of a manifest, compiling every template.
    pub fn check_all(prompts: Vec<Prompt>) -> Result<Vec<Prompt>, ManifestError> {
        if prompts.len() > MAX_PROMPTS {
            return Err(ManifestError::BadPrompt {
                prompt: String::new(),
                reason: format!("the manifest lists {} prompts; the limit is {MAX_PROMPTS}", prompts.len()),
            });
        }
        let mut seen = HashSet::new();
        for prompt in &prompts {
            prompt.check()?;
            if !seen.insert(prompt.name.as_str()) {
                return Err(prompt.bad("it is listed twice"));
            }
        }
        Ok(prompts)
    }

    fn bad(&self, reason: impl Into<String>) -> ManifestError {
        ManifestError::BadPrompt { prompt: self.name.clone(), reason: reason.into() }
    }

    fn check(&self) -> Result<(), ManifestError> {
        if !is_valid_local_name(&self.name) {
            return Err(self.bad("its name must match ^[A-Za-z][A-Za-z0-9_-]{0,63}$"));
        }
        let long = |text: &Option<String>| text.as_ref().is_some_and(|d| d.chars().count() > MAX_DESCRIPTION);
        if long(&self.description) || self.arguments.iter().any(|a| long(&a.description)) {
            return Err(self.bad(format!("a description is over {MAX_DESCRIPTION} characters")));
        }
        if self.arguments.len() > MAX_ARGUMENTS {
            return Err(self.bad(format!("it takes more than {MAX_ARGUMENTS} arguments")));
        }
        let mut names = HashSet::new();
        for argument in &self.arguments {
            if !is_valid_local_name(&argument.name) || !names.insert(argument.name.as_str()) {
                return Err(self.bad(format!("argument name {:?} is not valid or is listed twice", argument.name)));
            }
        }
        if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES {
            return Err(self.bad(format!("it needs 1 to {MAX_MESSAGES} messages")));
        }
        for message in &self.messages {
            if message.text.len() > MAX_TEMPLATE {
                return Err(self.bad(format!("a message is over {MAX_TEMPLATE} bytes")));
            }
            for piece in pieces(&message.text) {
                match piece {
                    Piece::Argument(name) if names.contains(name) => {}
                    Piece::Argument(name) => {
                        return Err(self.bad(format!("a message names {{{{ {name} }}}}, which is no argument")))
                    }
                    Piece::Unclosed => return Err(self.bad("a message opens {{ and never closes it")),
                    Piece::Text(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The messages, rendered with the caller's `arguments` (strings; the
    /// ones the prompt does not take are ignored, the optional ones left
    /// out render empty).
    pub fn render(&self, arguments: &Map<String, Value>) -> Result<Vec<(PromptRole, String)>, PromptError> {
        let mut values = Map::new();
        for argument in &self.arguments {
            match arguments.get(&argument.name) {
                Some(Value::String(value)) if value.len() <= MAX_ARGUMENT_VALUE => {
                    values.insert(argument.name.clone(), Value::String(value.clone()));
                }
                Some(_) => return Err(PromptError::BadArgument(argument.name.clone())),
                None if argument.required => return Err(PromptError::Missing(argument.name.clone())),
                None => {}
            }
        }
        self.messages
            .iter()
            .map(|message| {
                let mut text = String::new();
                for piece in pieces(&message.text) {
                    let add = match piece {
                        Piece::Text(literal) => literal,
                        Piece::Argument(name) => values.get(name).and_then(Value::as_str).unwrap_or_default(),
                        // Refused when the manifest was read.
                        Piece::Unclosed => "",
                    };
                    if text.len() + add.len() > MAX_RENDERED {
                        return Err(PromptError::TooLarge);
                    }
                    text.push_str(add);
                }
                Ok((message.role, text))
            })
            .collect()
    }
}

/// A part of a message's text.
#[derive(Debug, PartialEq)]
enum Piece<'t> {
    /// Literal text.
    Text(&'t str),
    /// `{{ name }}`: the argument's value.
    Argument(&'t str),
    /// A `{{` that is never closed.
    Unclosed,
}

/// The parts of `text`, in order.
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        pieces.push(Piece::Text(&rest[..open]));
        let Some(close) = rest[open..].find("}}") else {
            pieces.push(Piece::Unclosed);
            return pieces;
        };
        pieces.push(Piece::Argument(rest[open + 2..open + close].trim()));
        rest = &rest[open + close + 2..];
    }
    pieces.push(Piece::Text(rest));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prompt(value: Value) -> Result<Vec<Prompt>, ManifestError> {
        Prompt::check_all(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn a_prompt_renders_its_arguments() {
        let prompts = prompt(json!([{"name": "review", "description": "Review code",
            "arguments": [{"name": "code", "required": true}, {"name": "focus"}],
            "messages": [{"role": "user", "text": "Review this, for {{ focus }}:\n{{code}}"},
                         {"role": "assistant", "text": "Reading it."}]}]))
        .unwrap();
        let args = |v: Value| v.as_object().unwrap().clone();
        let out = prompts[0].render(&args(json!({"code": "<b>{{x}}</b>", "other": 1}))).unwrap();
        assert_eq!(
            out[0],
            (PromptRole::User, "Review this, for :\n<b>{{x}}</b>".to_owned()),
            "values are not templates"
        );
        assert_eq!(out[1].0, PromptRole::Assistant);
        let out = prompts[0].render(&args(json!({"code": "x", "focus": "speed"}))).unwrap();
        assert_eq!(out[0].1, "Review this, for speed:\nx");
        assert_eq!(prompts[0].render(&args(json!({}))), Err(PromptError::Missing("code".into())));
        assert_eq!(prompts[0].render(&args(json!({"code": 7}))), Err(PromptError::BadArgument("code".into())));
        let huge = "x".repeat(MAX_ARGUMENT_VALUE + 1);
        assert_eq!(prompts[0].render(&args(json!({"code": huge}))), Err(PromptError::BadArgument("code".into())));
    }

    #[test]
    fn a_message_cannot_swell_or_hold_more_than_placeholders() {
        let swell = prompt(json!([{"name": "swell", "arguments": [{"name": "t"}],
            "messages": [{"role": "user", "text": "{{ t }}".repeat(10)}]}]))
        .unwrap();
        let big = json!({"t": "x".repeat(MAX_ARGUMENT_VALUE)});
        assert_eq!(swell[0].render(big.as_object().unwrap()), Err(PromptError::TooLarge));
        let one = |text: &str| {
            prompt(json!([{"name": "p", "arguments": [{"name": "t"}], "messages": [{"role": "user", "text": text}]}]))
        };
        for refused in [
            "{% for i in range(9) %}{{ t }}{% endfor %}{{ u }}",
            "{{ t * 100000000 }}",
            "{{ t|indent(9) }}",
            "open {{ t",
        ] {
            assert!(one(refused).is_err(), "{refused}");
        }
        assert!(one("{% not a placeholder %} {t} }} {{t}}").is_ok(), "only {{ }} is special");
    }

    #[test]
    fn each_broken_rule_refuses_the_prompts() {
        let one = |p: Value| prompt(json!([p]));
        let msg = json!([{"role": "user", "text": "hi"}]);
        assert!(one(json!({"name": "ok", "messages": msg})).is_ok());
        assert!(one(json!({"name": "a b", "messages": msg})).is_err());
        assert!(one(json!({"name": "none", "messages": []})).is_err());
        assert!(one(json!({"name": "bad", "messages": [{"role": "user", "text": "{{ nobody }}"}]})).is_err());
        assert!(
            one(json!({"name": "big", "messages": [{"role": "user", "text": "x".repeat(MAX_TEMPLATE + 1)}]})).is_err()
        );
        assert!(one(json!({"name": "twice", "arguments": [{"name": "a"}, {"name": "a"}], "messages": msg})).is_err());
        assert!(prompt(json!([{"name": "a", "messages": msg}, {"name": "a", "messages": msg}])).is_err());
        let many: Vec<Value> = (0..=MAX_PROMPTS).map(|i| json!({"name": format!("p{i}"), "messages": msg})).collect();
        assert!(prompt(Value::Array(many)).is_err());
        assert!(serde_json::from_value::<Prompt>(json!({"name": "r", "messages": [{"role": "system", "text": "x"}]}))
            .is_err());
    }
}
