//! Prompts that panels declare in their manifest: MCP prompt templates,
//! offered to the panel's owner as `<panel-id>.<name>` next to its tools.
//!
//! A prompt is a list of messages whose text is a minijinja template of the
//! prompt's arguments. The manifest is untrusted, so templates are compiled
//! when it is read (a bad one refuses the manifest), and rendered with a
//! fuel budget and an output limit, so no template can spin or swell. This
//! module parses, checks and renders; storing is [`super::store`]'s job, and
//! speaking MCP is the transaction manager's.

use std::collections::HashSet;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
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
/// Instructions one rendering may spend: plenty for substitutions and
/// small loops, too little for a template that would spin.
const FUEL: u64 = 50_000;

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
    /// A minijinja template of the prompt's arguments.
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
    /// The template failed (ran out of fuel, or its output is too large).
    #[error("the prompt's template failed: {0}")]
    Template(String),
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
        let env = environment();
        for message in &self.messages {
            if message.text.len() > MAX_TEMPLATE {
                return Err(self.bad(format!("a message is over {MAX_TEMPLATE} bytes")));
            }
            env.template_from_str(&message.text).map_err(|e| self.bad(format!("a message does not compile: {e}")))?;
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
        let env = environment();
        let context = minijinja::Value::from_serialize(&values);
        self.messages
            .iter()
            .map(|message| {
                let failed = |e: minijinja::Error| PromptError::Template(e.to_string());
                let text = env.template_from_str(&message.text).map_err(failed)?.render(&context).map_err(failed)?;
                if text.len() > MAX_RENDERED {
                    return Err(PromptError::Template(format!("a message came out over {MAX_RENDERED} bytes")));
                }
                Ok((message.role, text))
            })
            .collect()
    }
}

/// Text in, text out: no escaping, no loader, undefined names render empty,
/// and a fuel budget.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_fuel(Some(FUEL));
    env
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
            "messages": [{"role": "user", "text": "Review this{% if focus %}, for {{ focus }}{% endif %}:\n{{ code }}"},
                         {"role": "assistant", "text": "Reading it."}]}]))
        .unwrap();
        let args = |v: Value| v.as_object().unwrap().clone();
        let out = prompts[0].render(&args(json!({"code": "<b>x</b>", "other": 1}))).unwrap();
        assert_eq!(out[0], (PromptRole::User, "Review this:\n<b>x</b>".to_owned()), "no escaping, unknown ignored");
        assert_eq!(out[1].0, PromptRole::Assistant);
        let out = prompts[0].render(&args(json!({"code": "x", "focus": "speed"}))).unwrap();
        assert_eq!(out[0].1, "Review this, for speed:\nx");
        assert_eq!(prompts[0].render(&args(json!({}))), Err(PromptError::Missing("code".into())));
        assert_eq!(prompts[0].render(&args(json!({"code": 7}))), Err(PromptError::BadArgument("code".into())));
        let huge = "x".repeat(MAX_ARGUMENT_VALUE + 1);
        assert_eq!(prompts[0].render(&args(json!({"code": huge}))), Err(PromptError::BadArgument("code".into())));
    }

    #[test]
    fn a_template_cannot_spin_or_swell() {
        let spin = prompt(json!([{"name": "spin", "messages": [{"role": "user",
            "text": "{% for a in range(1000) %}{% for b in range(1000) %}.{% endfor %}{% endfor %}"}]}]))
        .unwrap();
        assert!(matches!(spin[0].render(&Map::new()), Err(PromptError::Template(_))));
        let swell = prompt(json!([{"name": "swell", "arguments": [{"name": "t"}],
            "messages": [{"role": "user", "text": "{{ t }}{{ t }}{{ t }}{{ t }}{{ t }}"}]}]))
        .unwrap();
        let big = json!({"t": "x".repeat(MAX_ARGUMENT_VALUE)});
        assert!(matches!(swell[0].render(big.as_object().unwrap()), Err(PromptError::Template(_))));
    }

    #[test]
    fn each_broken_rule_refuses_the_prompts() {
        let one = |p: Value| prompt(json!([p]));
        let msg = json!([{"role": "user", "text": "hi"}]);
        assert!(one(json!({"name": "ok", "messages": msg})).is_ok());
        assert!(one(json!({"name": "a b", "messages": msg})).is_err());
        assert!(one(json!({"name": "none", "messages": []})).is_err());
        assert!(one(json!({"name": "bad", "messages": [{"role": "user", "text": "{% if %}"}]})).is_err());
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
