//! The prompts of a user's panels, through the registry: [`ListPrompts`]
//! lists them under their callable names, [`GetPrompt`] renders one. Who
//! owns a prompt is the panel record's word, read by the store.

use serde_json::Value;

use super::ToolRegistry;
use crate::kernel::{Ctx, Handler, Message, Reply};
use crate::tools::prompts::{Prompt, PromptError, PromptRole};
use crate::tools::{panel_tool_name, ToolAddress, ToolError};

/// The prompts of `user`'s panels, as `(<panel-id>.<name>, prompt)`.
pub struct ListPrompts {
    /// The user whose prompts are listed.
    pub user: String,
}

impl Message for ListPrompts {
    type Reply = Result<Vec<(String, Prompt)>, ToolError>;
}

/// Renders `user`'s prompt `name` (`<panel-id>.<name>`) with `arguments`.
pub struct GetPrompt {
    /// The caller; only their panels' prompts are found.
    pub user: String,
    /// The callable name.
    pub name: String,
    /// The caller's arguments (strings).
    pub arguments: serde_json::Map<String, Value>,
}

/// A rendered prompt: its description and messages.
pub type RenderedPrompt = (Option<String>, Vec<(PromptRole, String)>);

/// Why [`GetPrompt`] rendered nothing.
#[derive(Debug, thiserror::Error)]
pub enum GetPromptError {
    /// No such prompt for this user (another user's looks the same).
    #[error("no prompt named {0:?} is available to you")]
    NotFound(String),
    /// The arguments or the template failed.
    #[error(transparent)]
    Render(#[from] PromptError),
    /// The listing could not be read.
    #[error("{0}")]
    Store(String),
}

impl Message for GetPrompt {
    type Reply = Result<RenderedPrompt, GetPromptError>;
}

impl Handler<ListPrompts> for ToolRegistry {
    fn handle(&mut self, msg: ListPrompts, _: &mut Ctx<Self>) -> Reply<Result<Vec<(String, Prompt)>, ToolError>> {
        let store = self.deps.store.clone();
        Reply::later(async move {
            let prompts = store.prompts_for(&msg.user).await.map_err(ToolError::internal)?;
            Ok(prompts.into_iter().map(|(panel, prompt)| (panel_tool_name(&panel, &prompt.name), prompt)).collect())
        })
    }
}

impl Handler<GetPrompt> for ToolRegistry {
    fn handle(&mut self, msg: GetPrompt, _: &mut Ctx<Self>) -> Reply<Result<RenderedPrompt, GetPromptError>> {
        let store = self.deps.store.clone();
        Reply::later(async move {
            let not_found = || GetPromptError::NotFound(msg.name.clone());
            let Some(ToolAddress::Panel { panel, tool }) = ToolAddress::parse(&msg.name) else {
                return Err(not_found());
            };
            let prompt =
                store.prompt(&msg.user, panel, tool).await.map_err(|e| GetPromptError::Store(e.to_string()))?;
            let prompt = prompt.ok_or_else(not_found)?;
            Ok((prompt.description.clone(), prompt.render(&msg.arguments)?))
        })
    }
}
