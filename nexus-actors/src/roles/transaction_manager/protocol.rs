//! The WebSocket protocol between a browser and its `Session`: JSON text
//! frames with a `type` field. Decoding never panics; every bad frame is a
//! [`FrameError`] the session reports back without closing the connection.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instance::InstanceStatus;

/// Largest frame a client may send (64 KiB); larger ones close the
/// connection with code 1009.
pub const MAX_FRAME: usize = 64 * 1024;

/// What a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Follow a document. `version` is the last one the client has: the
    /// session sends what came after it, or a snapshot.
    Subscribe {
        doc: String,
        #[serde(default)]
        version: Option<u64>,
        /// Take part in presence and cursors (the default). Followers of a
        /// busy document turn it off: presence costs every participant a
        /// frame per join, leave and cursor move.
        #[serde(default = "default_presence")]
        presence: bool,
    },
    Unsubscribe {
        doc: String,
    },
    /// Follow changes to this user's panel records and the states of
    /// their instances.
    SubscribePanels,
    /// Where this user's cursor is in a followed document (any JSON up to
    /// [`MAX_CURSOR`] bytes; the editor decides its meaning).
    Cursor {
        doc: String,
        position: Value,
    },
}

fn default_presence() -> bool {
    true
}

const CLIENT_TYPES: [&str; 4] = ["subscribe", "unsubscribe", "cursor", "subscribe_panels"];

/// Largest cursor position, encoded.
pub const MAX_CURSOR: usize = 1024;

/// Someone following a document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Participant {
    pub session: String,
    pub user: String,
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of a connection: who the client is.
    Welcome {
        session: String,
        user: String,
    },
    /// The whole document at `version`.
    Snapshot {
        doc: String,
        version: u64,
        state: Value,
    },
    /// The merge patch that made `version`; versions arrive without gaps.
    Change {
        doc: String,
        version: u64,
        patch: Value,
    },
    /// A panel record was created or changed (`panel`), or deleted (null).
    Panel {
        id: String,
        panel: Option<Value>,
    },
    /// One of the user's panel instances changed state, as the panel
    /// manager announced it (`subscribe_panels` follows these too).
    Instance {
        status: InstanceStatus,
    },
    /// Everyone following `doc` now.
    Presence {
        doc: String,
        present: Vec<Participant>,
    },
    /// Another participant's cursor moved.
    Cursor {
        doc: String,
        session: String,
        user: String,
        position: Value,
    },
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    BadJson(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("frame does not fit its type: {0}")]
    BadShape(String),
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::BadJson(_) => "bad_json",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::BadShape(_) => "bad_frame",
        }
    }
}

/// Decodes one client text frame.
pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError::BadJson(e.to_string()))?;
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| FrameError::BadShape("no \"type\"".into()))?;
    if !CLIENT_TYPES.contains(&kind) {
        return Err(FrameError::UnknownType(kind.chars().take(64).collect()));
    }
    serde_json::from_value(value).map_err(|e| FrameError::BadShape(e.to_string()))
}

impl ServerFrame {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_frames_and_names_what_is_wrong() {
        assert_eq!(
            decode(r#"{"type":"subscribe","doc":"d1","version":3}"#),
            Ok(ClientFrame::Subscribe { doc: "d1".into(), version: Some(3), presence: true })
        );
        assert_eq!(decode(r#"{"type":"unsubscribe","doc":"d1"}"#), Ok(ClientFrame::Unsubscribe { doc: "d1".into() }));
        assert_eq!(
            decode(r#"{"type":"subscribe","doc":"d1","presence":false}"#),
            Ok(ClientFrame::Subscribe { doc: "d1".into(), version: None, presence: false })
        );
        assert_eq!(decode("{nope").unwrap_err().code(), "bad_json");
        assert_eq!(decode(r#"{"type":"dance"}"#).unwrap_err().code(), "unknown_type");
        assert_eq!(decode(r#"{"doc":"d1"}"#).unwrap_err().code(), "bad_frame");
        assert_eq!(decode(r#"{"type":"subscribe","doc":7}"#).unwrap_err().code(), "bad_frame");
        assert_eq!(decode(r#"[1,2]"#).unwrap_err().code(), "bad_frame");
        assert_eq!(
            decode(r#"{"type":"cursor","doc":"d1","position":{"line":3}}"#),
            Ok(ClientFrame::Cursor { doc: "d1".into(), position: serde_json::json!({"line": 3}) })
        );
    }

    #[test]
    fn an_instance_frame_carries_the_status_as_the_panel_manager_reports_it() {
        use crate::instance::{InstanceMode, InstanceState, Isolation};
        let status = InstanceStatus {
            instance: "i1".into(),
            panel: "p1".into(),
            owner: "ada".into(),
            mode: InstanceMode::Studio,
            state: InstanceState::Failed,
            isolation: Isolation::None,
            reason: Some("crashed 5 times".into()),
            log_tail: vec!["Traceback".into()],
            restarts: 5,
            since_ms: 1700000000000,
        };
        let frame: Value = serde_json::from_str(&ServerFrame::Instance { status }.encode()).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type": "instance", "status": {
                "instance": "i1", "panel": "p1", "owner": "ada", "mode": "studio", "state": "failed",
                "isolation": "none", "reason": "crashed 5 times", "log_tail": ["Traceback"], "restarts": 5,
                "since_ms": 1700000000000u64,
            }})
        );
    }
}
