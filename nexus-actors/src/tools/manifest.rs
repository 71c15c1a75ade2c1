//! A panel's manifest (`GET /manifest`), parsed and checked against the
//! panel contract (`panel-sdk-docs/README.md`). A manifest that breaks a
//! rule is refused whole, with an error naming the rule: half a manifest
//! registered would be worse than none. Fetching it is the sidecar's job.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::Value;

use super::prompts::Prompt;
use super::resources::PanelResource;
use super::{any_object_schema, is_valid_local_name, panel_tool_name, ToolOwner, ToolSpec};

/// Largest manifest body accepted.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Most tools one panel may expose.
pub const MAX_TOOLS: usize = 64;
/// Longest tool description.
pub const MAX_DESCRIPTION: usize = 1024;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// The body is over [`MAX_MANIFEST_BYTES`].
    #[error("the manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// The body's size in bytes.
        size: usize,
    },
    /// The body is not JSON of the manifest's shape; holds the parser's message.
    #[error("the manifest is not valid JSON of the expected shape: {0}")]
    Json(String),
    /// More than [`MAX_TOOLS`] tools.
    #[error("the manifest lists {count} tools; the limit is {MAX_TOOLS}")]
    TooManyTools {
        /// How many tools the manifest lists.
        count: usize,
    },
    /// A tool name that is not a valid local name (see [`is_valid_local_name`]).
    #[error("tool name {0:?} is not valid: it must match ^[A-Za-z][A-Za-z0-9_-]{{0,63}}$")]
    BadName(String),
    /// The named tool appears more than once.
    #[error("tool {0:?} is listed twice")]
    DuplicateName(String),
    /// The named tool's description is missing, blank or over [`MAX_DESCRIPTION`] characters.
    #[error("tool {0:?} needs a description (\"desc\") of 1 to {MAX_DESCRIPTION} characters")]
    BadDescription(String),
    /// A prompt breaks a rule (see [`super::prompts`]).
    #[error("prompt {prompt:?} is not valid: {reason}")]
    BadPrompt {
        /// The prompt's name (empty when the rule is about all of them).
        prompt: String,
        /// The broken rule.
        reason: String,
    },
    /// A resource breaks a rule (see [`super::resources`]).
    #[error("resource {uri:?} is not valid: {reason}")]
    BadResource {
        /// The resource's uri (empty when the rule is about all of them).
        uri: String,
        /// The broken rule.
        reason: String,
    },
    /// A tool's `input_schema` is not an object schema that compiles.
    #[error("input_schema of tool {tool:?} is not usable: {reason}")]
    BadSchema {
        /// The tool's name.
        tool: String,
        /// What is wrong with the schema.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
struct RawManifest {
    #[serde(default)]
    name: Option<String>,
    tools: Vec<RawTool>,
    #[serde(default)]
    prompts: Vec<Prompt>,
    #[serde(default)]
    resources: Vec<PanelResource>,
}

#[derive(Debug, Deserialize)]
struct RawTool {
    name: String,
    #[serde(alias = "description")]
    desc: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
}

/// A valid manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The panel's display name, if it gave one.
    pub name: Option<String>,
    /// Its tools, in the manifest's order (names unique).
    pub tools: Vec<ManifestTool>,
    /// Its prompts, in the manifest's order (names unique, templates compiled).
    pub prompts: Vec<Prompt>,
    /// Its read-only resources, in the manifest's order (uris unique).
    pub resources: Vec<PanelResource>,
}

/// One tool of a valid manifest, with its schema (`{"type":"object"}` if none).
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestTool {
    /// The name inside the panel (a valid local name).
    pub name: String,
    /// What the tool does, for people and the LLM (1 to [`MAX_DESCRIPTION`] characters).
    pub description: String,
    /// JSON Schema of the arguments (an object schema that compiles).
    pub input_schema: Value,
}

impl Manifest {
    /// Parses and checks the bytes of a `GET /manifest` answer.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { size: bytes.len() });
        }
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if raw.tools.len() > MAX_TOOLS {
            return Err(ManifestError::TooManyTools { count: raw.tools.len() });
        }
        let mut seen = HashSet::new();
        let mut tools = Vec::with_capacity(raw.tools.len());
        for tool in raw.tools {
            if !is_valid_local_name(&tool.name) {
                return Err(ManifestError::BadName(tool.name));
            }
            if !seen.insert(tool.name.clone()) {
                return Err(ManifestError::DuplicateName(tool.name));
            }
            let description = match tool.desc {
                Some(d) if !d.trim().is_empty() && d.chars().count() <= MAX_DESCRIPTION => d,
                _ => return Err(ManifestError::BadDescription(tool.name)),
            };
            let input_schema = match tool.input_schema {
                None => any_object_schema(),
                Some(schema) => check_schema(&tool.name, schema)?,
            };
            tools.push(ManifestTool { name: tool.name, description, input_schema });
        }
        let prompts = Prompt::check_all(raw.prompts)?;
        let resources = PanelResource::check_all(raw.resources)?;
        Ok(Manifest { name: raw.name, tools, prompts, resources })
    }

    /// The registry entries of this manifest's tools, for `panel` owned by `user`.
    pub fn specs(&self, panel: &str, user: &str) -> Vec<ToolSpec> {
        self.tools
            .iter()
            .map(|t| ToolSpec {
                name: panel_tool_name(panel, &t.name),
                description: t.description.clone(),
                input_schema: t.input_schema.clone(),
                owner: ToolOwner::Panel { panel: panel.to_owned(), user: user.to_owned() },
            })
            .collect()
    }
}

/// An input schema must be an object schema that compiles.
fn check_schema(tool: &str, schema: Value) -> Result<Value, ManifestError> {
    let bad = |reason: &str| ManifestError::BadSchema { tool: tool.to_owned(), reason: reason.to_owned() };
    let Some(object) = schema.as_object() else { return Err(bad("it must be a JSON object")) };
    if object.get("type").and_then(Value::as_str) != Some("object") {
        return Err(bad("it must have \"type\": \"object\" (tool arguments are a JSON object)"));
    }
    jsonschema::validator_for(&schema).map_err(|e| bad(&format!("not a valid JSON Schema: {e}")))?;
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(&serde_json::to_vec(&json).unwrap())
    }

    #[test]
    fn a_good_manifest_becomes_namespaced_specs() {
        let m = parse(serde_json::json!({"tools": [
            {"name": "word_count", "desc": "Counts words",
             "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}},
            {"name": "ping", "description": "Answers pong"}
        ]}))
        .unwrap();
        let specs = m.specs("p1", "ada");
        assert_eq!(specs[0].name, "p1.word_count");
        assert_eq!(specs[1].description, "Answers pong");
        assert_eq!(specs[1].input_schema, any_object_schema());
    }

    #[test]
    fn each_broken_rule_is_named() {
        let tool = |name: &str| serde_json::json!({"name": name, "desc": "d"});
        assert!(matches!(parse(serde_json::json!({})), Err(ManifestError::Json(_))));
        assert!(matches!(Manifest::parse(b"<html>"), Err(ManifestError::Json(_))));
        assert!(matches!(parse(serde_json::json!({"tools": [{"name": "x"}]})), Err(ManifestError::BadDescription(_))));
        assert!(matches!(parse(serde_json::json!({"tools": [tool("a b")]})), Err(ManifestError::BadName(_))));
        assert_eq!(
            parse(serde_json::json!({"tools": [tool("a"), tool("a")]})),
            Err(ManifestError::DuplicateName("a".into()))
        );
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| tool(&format!("t{i}"))).collect();
        assert!(matches!(parse(serde_json::json!({ "tools": many })), Err(ManifestError::TooManyTools { .. })));
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(Manifest::parse(&huge), Err(ManifestError::TooLarge { .. })));
        let schema = |s: Value| serde_json::json!({"tools": [{"name": "a", "desc": "d", "input_schema": s}]});
        assert!(matches!(parse(schema(serde_json::json!("object"))), Err(ManifestError::BadSchema { .. })));
        assert!(matches!(parse(schema(serde_json::json!({"type": "string"}))), Err(ManifestError::BadSchema { .. })));
        assert!(matches!(
            parse(schema(serde_json::json!({"type": "object", "properties": {"a": {"type": 7}}}))),
            Err(ManifestError::BadSchema { .. })
        ));
    }
}
