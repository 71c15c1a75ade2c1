//! A caller's documents as MCP resources: `nexus://documents/{id}`, read
//! as the document's JSON state, with its version in `_meta`. Listing
//! (paginated), reading and completing a template's `id` only ever see the
//! caller's own documents: any other URI, a foreign document's included, is
//! "resource not found" (-32002), worded exactly like one that never
//! existed, and answered from its owner alone before its state is read, so
//! a probe through `/mcp` learns nothing about documents that are not the
//! caller's.
//!
//! This module maps documents to MCP's resource types. It does not
//! authenticate: every request reaching it carries the user [`super`]
//! authenticated.

use rmcp::model::{
    CompleteRequestParams, CompleteResult, CompletionInfo, ListResourceTemplatesResult, ListResourcesResult,
    MetaObject, ReadResourceResult, Reference, Resource, ResourceContents, ResourceTemplate,
};
use rmcp::ErrorData as McpError;
use serde_json::json;

use crate::platform::store::StoreError;
use crate::roles::transaction_manager::documents::{is_document_id, Documents};

/// A document's URI is this followed by its id.
pub(super) const PREFIX: &str = "nexus://documents/";
/// The template of documents' URIs, for `resources/templates/list` and
/// `completion/complete`.
pub(super) const TEMPLATE: &str = "nexus://documents/{id}";
/// Resources per `resources/list` page.
pub(super) const PAGE: usize = 100;
const MIME: &str = "application/json";

/// The caller's documents, as resources. Cheap to clone.
#[derive(Clone)]
pub(super) struct DocumentResources {
    documents: Documents,
}

impl DocumentResources {
    pub(super) fn new(documents: Documents) -> Self {
        DocumentResources { documents }
    }

    /// The documents they are.
    pub(super) fn documents(&self) -> &Documents {
        &self.documents
    }

    /// One page of `user`'s documents, in id order. The cursor is the last
    /// id of the page before: a page never repeats or skips a document that
    /// stayed while the caller paged, whatever was created or deleted.
    pub(super) async fn list(&self, user: &str, cursor: Option<&str>) -> Result<ListResourcesResult, McpError> {
        if cursor.is_some_and(|c| !is_document_id(c)) {
            return Err(McpError::invalid_params("not a cursor of resources/list", None));
        }
        let ids = self.documents.ids_of(user).await.map_err(unavailable)?;
        let start = cursor.map_or(0, |after| ids.partition_point(|id| id.as_str() <= after));
        let page: Vec<Resource> = ids
            .iter()
            .skip(start)
            .take(PAGE)
            .map(|id| Resource::new(format!("{PREFIX}{id}"), id.clone()).with_mime_type(MIME))
            .collect();
        let end = start + page.len();
        let mut result = ListResourcesResult::with_all_items(page);
        result.next_cursor = (end < ids.len()).then(|| ids[end - 1].clone());
        Ok(result)
    }

    /// The one template: a document by id.
    pub(super) fn templates() -> ListResourceTemplatesResult {
        let template = ResourceTemplate::new(TEMPLATE, "document")
            .with_title("A Nexus document")
            .with_description("One of your documents, by id: its JSON state; its version is in _meta.version.")
            .with_mime_type(MIME);
        ListResourceTemplatesResult::with_all_items(vec![template])
    }

    /// The document `uri` names, if it is `user`'s.
    pub(super) async fn read(&self, user: &str, uri: &str) -> Result<ReadResourceResult, McpError> {
        let id = owned(&self.documents, user, uri).await?;
        let doc = self.documents.get(id).await.map_err(unavailable)?;
        let doc = doc.filter(|doc| doc.owner == user).ok_or_else(|| not_found(uri))?;
        let mut meta = MetaObject::default();
        meta.0.insert("version".into(), json!(doc.version));
        let contents = ResourceContents::text(doc.state.to_string(), uri).with_mime_type(MIME).with_meta(meta);
        Ok(ReadResourceResult::new(vec![contents]))
    }

    /// Completes the `id` of [`TEMPLATE`] from `user`'s document ids that
    /// start with what was typed (at most 100, with the total). Anything
    /// else (a prompt, another template or argument) has no completions, as
    /// the SDKs' servers answer where they offer none.
    pub(super) async fn complete(
        &self,
        user: &str,
        request: &CompleteRequestParams,
    ) -> Result<CompleteResult, McpError> {
        let ours = matches!(&request.r#ref, Reference::Resource(r) if r.uri == TEMPLATE);
        if !ours || request.argument.name != "id" {
            return Ok(CompleteResult::new(CompletionInfo::with_all_values(Vec::new()).unwrap_or_default()));
        }
        let typed = request.argument.value.as_str();
        let ids = self.documents.ids_of(user).await.map_err(unavailable)?;
        let matching: Vec<String> = ids.into_iter().filter(|id| id.starts_with(typed)).collect();
        let total = matching.len();
        let values: Vec<String> = matching.into_iter().take(CompletionInfo::MAX_VALUES).collect();
        let more = total > values.len();
        let completion = CompletionInfo::with_pagination(values, Some(total as u32), more)
            .map_err(|e| McpError::internal_error(e, None))?;
        Ok(CompleteResult::new(completion))
    }
}

/// The id of the document `uri` names, when it is `user`'s; else "resource
/// not found", alike for someone else's document, a missing one and any
/// other URI. Answered from the owner alone: someone else's document is
/// refused as fast as a missing one, its state never read.
pub(super) async fn owned<'u>(documents: &Documents, user: &str, uri: &'u str) -> Result<&'u str, McpError> {
    let id = document_id(uri).ok_or_else(|| not_found(uri))?;
    let owner = documents.owner(id).await.map_err(unavailable)?;
    match owner.as_deref() == Some(user) {
        true => Ok(id),
        false => Err(not_found(uri)),
    }
}

/// The document id a URI names, exactly as [`PREFIX`] and an id: no other
/// spelling of it.
pub(super) fn document_id(uri: &str) -> Option<&str> {
    uri.strip_prefix(PREFIX).filter(|id| is_document_id(id))
}

/// "Resource not found" for `uri`, the same words whatever the reason.
pub(super) fn not_found(uri: &str) -> McpError {
    McpError::resource_not_found(format!("no resource {:?} is available to you", shown(uri)), None)
}

/// At most the first 200 characters of `uri`: an error names what was
/// asked for without echoing a megabyte back.
fn shown(uri: &str) -> &str {
    uri.char_indices().nth(200).map_or(uri, |(at, _)| &uri[..at])
}

pub(super) fn unavailable(error: StoreError) -> McpError {
    tracing::warn!(%error, "nexus_mcp_resources: the documents could not be read");
    McpError::internal_error(format!("unavailable: the documents could not be read: {error}"), None)
}
