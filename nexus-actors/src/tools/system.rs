//! The Rust tool API: a system service registers a tool with a name, a
//! description, an argument type (its JSON Schema is derived with
//! `schemars`) and an async handler — the counterpart of the seed's
//! `@service.register_mcp_tool("resize_image", "Resizes an image to WxH")`:
//!
//! ```ignore
//! #[derive(Deserialize, JsonSchema)]
//! struct Resize { width: u32, height: u32 }
//!
//! registry.register(SystemTool::new("resize_image", "Resizes an image to WxH",
//!     |args: Resize, _cx| async move { Ok(json!({"w": args.width, "h": args.height})) }));
//! ```
//!
//! Arguments are checked against the schema before the handler runs.

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::protocol::{ToolError, ToolResult};
use super::{ToolOwner, ToolSpec};

/// What a handler knows about the call it serves.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The call's id (see [`ToolCall::call_id`](super::ToolCall::call_id)).
    pub call_id: String,
    /// The user on whose behalf the call is made.
    pub caller: String,
    /// When the caller stops waiting; the handler is cancelled then.
    pub deadline: DateTime<Utc>,
}

type Handler = Arc<dyn Fn(Value, CallContext) -> BoxFuture<'static, ToolResult> + Send + Sync>;

/// A system tool: its listing and its handler.
#[derive(Clone)]
pub struct SystemTool {
    /// How it is listed; its owner must be [`ToolOwner::System`] (the registry refuses others).
    pub spec: ToolSpec,
    handler: Handler,
}

impl SystemTool {
    /// A tool whose arguments are an `A` and whose result serializes from `R`.
    pub fn new<A, R, F, Fut>(name: &str, description: &str, handler: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        R: Serialize,
        F: Fn(A, CallContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ToolError>> + Send + 'static,
    {
        let mut input_schema =
            serde_json::to_value(schemars::schema_for!(A)).unwrap_or_else(|_| super::any_object_schema());
        if let Some(object) = input_schema.as_object_mut() {
            object.remove("$schema");
            object.entry("type").or_insert_with(|| Value::from("object"));
        }
        let handler = Arc::new(handler);
        SystemTool {
            spec: ToolSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                input_schema,
                owner: ToolOwner::System,
            },
            handler: Arc::new(move |arguments, cx| {
                let handler = handler.clone();
                Box::pin(async move {
                    let args: A = serde_json::from_value(arguments)
                        .map_err(|e| ToolError::InvalidArguments { message: e.to_string() })?;
                    let result = handler(args, cx).await?;
                    serde_json::to_value(result).map_err(ToolError::internal)
                })
            }),
        }
    }

    /// Runs the handler on arguments already checked against the schema.
    pub fn run(&self, arguments: Value, cx: CallContext) -> BoxFuture<'static, ToolResult> {
        (self.handler)(arguments, cx)
    }
}

impl std::fmt::Debug for SystemTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemTool").field("spec", &self.spec).finish_non_exhaustive()
    }
}
