//! The read-only resources of a user's panels, through the registry:
//! [`ListPanelResources`] lists them, [`ReadPanelResource`] reads one by
//! asking the panel's sidecar, which fetches it from the panel, the way a
//! tool call goes. Who owns a resource is the panel record's word.

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{CallToolWatched, ToolRegistry};
use crate::kernel::{Ctx, Handler, Message, Reply};
use crate::platform::channels;
use crate::tools::protocol::{ToolCall, ToolError, ToolRequest};
use crate::tools::resources::PanelResource;

/// The resources `user`'s panels declare, as `(panel, resource)`.
pub struct ListPanelResources {
    /// The user whose panels' resources are listed.
    pub user: String,
}

impl Message for ListPanelResources {
    type Reply = Result<Vec<(String, PanelResource)>, ToolError>;
}

/// Reads `user`'s panel `panel`'s resource `uri`.
pub struct ReadPanelResource {
    /// The caller; only their panels' resources are found.
    pub user: String,
    /// The panel's id.
    pub panel: String,
    /// The declared path.
    pub uri: String,
    /// Once cancelled, the read stops (its caller went away).
    pub cancel: CancellationToken,
}

/// Why [`ReadPanelResource`] read nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadResourceError {
    /// No such resource for this user (another user's looks the same).
    #[error("no such resource is available to you")]
    NotFound,
    /// The panel could not serve it.
    #[error(transparent)]
    Panel(#[from] ToolError),
}

impl Message for ReadPanelResource {
    type Reply = Result<(PanelResource, String), ReadResourceError>;
}

impl Handler<ListPanelResources> for ToolRegistry {
    fn handle(
        &mut self,
        msg: ListPanelResources,
        _: &mut Ctx<Self>,
    ) -> Reply<Result<Vec<(String, PanelResource)>, ToolError>> {
        let store = self.deps.store.clone();
        Reply::later(async move { store.resources_for(&msg.user).await.map_err(ToolError::internal) })
    }
}

impl Handler<ReadPanelResource> for ToolRegistry {
    fn handle(
        &mut self,
        msg: ReadPanelResource,
        _: &mut Ctx<Self>,
    ) -> Reply<Result<(PanelResource, String), ReadResourceError>> {
        let (store, caller) = (self.deps.store.clone(), self.caller());
        Reply::later(async move {
            let found = store.resource(&msg.user, &msg.panel, &msg.uri).await.map_err(ToolError::internal)?;
            let resource = found.ok_or(ReadResourceError::NotFound)?;
            let call = ToolCall::new(format!("{}/{}", msg.panel, msg.uri), Value::Null, msg.user);
            let request = ToolRequest {
                call_id: call.call_id.clone(),
                tool: String::new(),
                arguments: Value::Null,
                caller: call.caller.clone(),
                deadline: call.deadline,
                idempotency_key: call.call_id.clone(),
                keep_result: false,
                reply_to: caller.reply_channel.clone(),
                resource: Some(msg.uri),
            };
            let watched = CallToolWatched { call, progress: None, cancel: msg.cancel, label: None };
            let (channel, owner) = (channels::panel_calls(&msg.panel), format!("panel {}", msg.panel));
            let answer = caller.send(&watched, request, channel, owner).await?;
            match answer.get("text").and_then(Value::as_str) {
                Some(text) => Ok((resource, text.to_owned())),
                None => Err(ToolError::InvalidResponse { message: "the sidecar answered no text".into() }.into()),
            }
        })
    }
}
