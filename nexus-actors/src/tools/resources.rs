//! Read-only resources that panels declare in their manifest: MCP
//! resources offered to the panel's owner as
//! `nexus://panels/<panel-id>/<uri>`, whose content the panel serves at
//! `GET /mcp/resources/<uri>` and the sidecar fetches when one is read.
//!
//! A declared `uri` is a relative path of plain characters, so it can
//! neither leave the panel's namespace nor the path it is fetched from.
//! This module parses and checks; storing is [`super::store`]'s job, reading
//! the panel's the sidecar's, and speaking MCP the transaction manager's.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::manifest::{ManifestError, MAX_DESCRIPTION};

/// Most resources one panel may declare.
pub const MAX_RESOURCES: usize = 32;
/// Longest declared `uri`.
pub const MAX_URI: usize = 256;
/// Longest `name` or `mimeType`.
pub const MAX_NAME: usize = 128;
/// Where a panel's resources live, before `<panel-id>/<uri>`.
pub const PANEL_PREFIX: &str = "nexus://panels/";

/// A resource of a valid manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PanelResource {
    /// Its path inside the panel (see [`is_valid_uri`]).
    pub uri: String,
    /// A name for people.
    pub name: String,
    /// Its media type; `text/plain` when the manifest gives none.
    #[serde(default = "text_plain")]
    pub mime_type: String,
    /// What it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn text_plain() -> String {
    "text/plain".into()
}

/// Whether `uri` is a declared resource's path: segments of
/// `[A-Za-z0-9._~-]` joined by `/`, none of them `.` or `..`, at most
/// [`MAX_URI`] bytes.
pub fn is_valid_uri(uri: &str) -> bool {
    uri.len() <= MAX_URI
        && uri.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
        })
}

/// The MCP URI of `panel`'s resource `uri`.
pub fn mcp_uri(panel: &str, uri: &str) -> String {
    format!("{PANEL_PREFIX}{panel}/{uri}")
}

/// The panel and path an MCP URI names, if it names a panel's resource.
pub fn parse_mcp_uri(mcp_uri: &str) -> Option<(&str, &str)> {
    let (panel, uri) = mcp_uri.strip_prefix(PANEL_PREFIX)?.split_once('/')?;
    // The panel part becomes part of Redis keys: only a real panel id.
    (crate::platform::panels::is_panel_id(panel) && is_valid_uri(uri)).then_some((panel, uri))
}

impl PanelResource {
    /// Checks the resources of a manifest.
    pub fn check_all(resources: Vec<PanelResource>) -> Result<Vec<PanelResource>, ManifestError> {
        let bad = |uri: &str, reason: String| ManifestError::BadResource { uri: uri.to_owned(), reason };
        if resources.len() > MAX_RESOURCES {
            return Err(bad(
                "",
                format!("the manifest lists {} resources; the limit is {MAX_RESOURCES}", resources.len()),
            ));
        }
        let mut seen = HashSet::new();
        for resource in &resources {
            let uri = resource.uri.as_str();
            if !is_valid_uri(uri) {
                let rule =
                    "its uri must be a relative path of [A-Za-z0-9._~-] segments (no . or ..), at most 256 bytes";
                return Err(bad(uri, rule.into()));
            }
            if !seen.insert(uri) {
                return Err(bad(uri, "it is listed twice".into()));
            }
            let fits = |text: &str| !text.trim().is_empty() && text.chars().count() <= MAX_NAME;
            if !fits(&resource.name) || !fits(&resource.mime_type) {
                return Err(bad(uri, format!("its name and mimeType must be 1 to {MAX_NAME} characters")));
            }
            if resource.description.as_ref().is_some_and(|d| d.chars().count() > MAX_DESCRIPTION) {
                return Err(bad(uri, format!("its description is over {MAX_DESCRIPTION} characters")));
            }
        }
        Ok(resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: serde_json::Value) -> Result<Vec<PanelResource>, ManifestError> {
        PanelResource::check_all(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn declared_uris_stay_inside_the_panel() {
        for good in ["stats", "notes/today.md", "a-b_c~d/e.json"] {
            assert!(is_valid_uri(good), "{good}");
        }
        for bad in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a?b", "a b", "a%2e", "a\\b", "é", &"a".repeat(257)]
        {
            assert!(!is_valid_uri(bad), "{bad:?}");
        }
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(parse_mcp_uri(&mcp_uri(&id, "notes/today.md")), Some((id.as_str(), "notes/today.md")));
        let forged = format!("nexus://panels/{id}:x/notes");
        for bad in [
            "nexus://panels/p1",
            "nexus://panels//x",
            &format!("nexus://panels/{id}/../x"),
            "nexus://documents/x",
            &forged,
        ] {
            assert_eq!(parse_mcp_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_broken_rule_refuses_the_resources() {
        let ok = check(json!([{"uri": "stats", "name": "Stats"}])).unwrap();
        assert_eq!(ok[0].mime_type, "text/plain");
        assert!(check(json!([{"uri": "../x", "name": "x"}])).is_err());
        assert!(check(json!([{"uri": "a", "name": " "}])).is_err());
        assert!(check(json!([{"uri": "a", "name": "a"}, {"uri": "a", "name": "b"}])).is_err());
        let many: Vec<_> = (0..=MAX_RESOURCES).map(|i| json!({"uri": format!("r{i}"), "name": "r"})).collect();
        assert!(check(serde_json::Value::Array(many)).is_err());
    }
}
