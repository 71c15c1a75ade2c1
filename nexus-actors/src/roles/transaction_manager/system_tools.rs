//! The transaction manager's system tools: what the LLM (or any caller)
//! may do with the caller's own documents. Registered on every node that
//! runs the role; each call runs as the calling user, who reaches only
//! their own documents.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::documents::Documents;
use crate::tools::protocol::ToolError;
use crate::tools::SystemTool;

/// `list_documents` takes no arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// Arguments of `read_document`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadDocument {
    /// The document's id.
    pub id: String,
}

/// The role's tools, bound to its store.
pub fn tools(store: &Documents) -> Vec<SystemTool> {
    let list_store = store.clone();
    let read_store = store.clone();
    vec![
        SystemTool::new(
            "list_documents",
            "Lists the caller's documents: their ids and current versions.",
            move |_: NoArguments, cx| {
                let store = list_store.clone();
                async move {
                    let docs = store.of(&cx.caller).await.map_err(ToolError::internal)?;
                    let docs: Vec<Value> = docs.iter().map(|d| json!({"id": d.id, "version": d.version})).collect();
                    Ok(json!({ "documents": docs }))
                }
            },
        ),
        SystemTool::new(
            "read_document",
            "Reads one of the caller's documents: its current version and state (JSON).",
            move |args: ReadDocument, cx| {
                let store = read_store.clone();
                async move {
                    let doc = store.get(&args.id).await.map_err(ToolError::internal)?;
                    match doc {
                        Some(doc) if doc.owner == cx.caller => {
                            Ok(json!({"id": doc.id, "version": doc.version, "state": doc.state}))
                        }
                        _ => Err(ToolError::failed(format!("you have no document {:?}", args.id))),
                    }
                }
            },
        ),
    ]
}
