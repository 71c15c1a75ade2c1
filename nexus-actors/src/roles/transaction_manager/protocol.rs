//! The WebSocket protocol between a browser and its `Session`: JSON text
//! frames with a `type` field. Decoding never panics; every bad frame is a
//! [`FrameError`] the session reports back without closing the connection.
//! A frame that names a document or a context names it by its id (a
//! UUID): anything else is refused here, before it can reach a Redis key
//! or channel.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::documents::is_document_id;
use crate::instance::InstanceStatus;
use crate::semantic::records::is_context_id;

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
        /// The document's id.
        doc: String,
        /// The last version the client has; none for a snapshot.
        #[serde(default)]
        version: Option<u64>,
        /// Take part in presence and cursors (the default). Followers of a
        /// busy document turn it off: presence costs every participant a
        /// frame per join, leave and cursor move.
        #[serde(default = "default_presence")]
        presence: bool,
    },
    /// Stop following a document.
    Unsubscribe {
        /// The document's id.
        doc: String,
    },
    /// Follow changes to this user's panel records and the states of
    /// their instances.
    SubscribePanels,
    /// Where this user's cursor is in a followed document (any JSON up to
    /// [`MAX_CURSOR`] bytes; the editor decides its meaning).
    Cursor {
        /// The document's id.
        doc: String,
        /// Where the cursor is.
        position: Value,
    },
    /// Receive a context's records as they are journaled (`context_record`
    /// frames, after a `context_followed`).
    FollowContext {
        /// The context's id.
        context: String,
    },
    /// Stop receiving a context's records.
    UnfollowContext {
        /// The context's id.
        context: String,
    },
}

impl ClientFrame {
    /// The document the frame is about, if any.
    pub fn doc(&self) -> Option<&str> {
        match self {
            ClientFrame::Subscribe { doc, .. } | ClientFrame::Unsubscribe { doc } | ClientFrame::Cursor { doc, .. } => {
                Some(doc)
            }
            ClientFrame::SubscribePanels | ClientFrame::FollowContext { .. } | ClientFrame::UnfollowContext { .. } => {
                None
            }
        }
    }

    /// The context the frame is about, if any.
    pub fn context(&self) -> Option<&str> {
        match self {
            ClientFrame::FollowContext { context } | ClientFrame::UnfollowContext { context } => Some(context),
            _ => None,
        }
    }
}

fn default_presence() -> bool {
    true
}

const CLIENT_TYPES: [&str; 6] =
    ["subscribe", "unsubscribe", "cursor", "subscribe_panels", "follow_context", "unfollow_context"];

/// Largest cursor position, encoded.
pub const MAX_CURSOR: usize = 1024;

/// Someone following a document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Participant {
    /// The participant's session id.
    pub session: String,
    /// Its user.
    pub user: String,
}

/// What an error frame is about; its `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON.
    BadJson,
    /// The frame's `type` is none the server knows.
    UnknownType,
    /// The frame does not fit its type (a document id that is no UUID, a
    /// cursor position too large).
    BadFrame,
    /// No such document.
    NotFound,
    /// The document belongs to another user.
    Forbidden,
    /// The session follows as many documents as it may already.
    TooManyDocuments,
    /// The session follows as many contexts as it may already.
    TooManyContexts,
    /// A cursor in a document not followed with presence.
    NotFollowing,
    /// The document has as many participants as its presence lists; the
    /// session follows it without presence.
    PresenceFull,
    /// Redis is unreachable; the session resyncs when it is back.
    Unavailable,
    /// What Redis holds cannot be served (corrupt data, a refused
    /// command); the document is no longer followed.
    Internal,
}

/// What the server sends.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of a connection: who the client is.
    Welcome {
        /// The session's id (as presence lists it).
        session: String,
        /// The user.
        user: String,
    },
    /// The whole document at `version`.
    Snapshot {
        /// The document's id.
        doc: String,
        /// Its version.
        version: u64,
        /// Its state.
        state: Value,
    },
    /// The merge patch that made `version`; versions arrive without gaps.
    Change {
        /// The document's id.
        doc: String,
        /// The version the patch made.
        version: u64,
        /// The JSON merge patch.
        patch: Value,
    },
    /// A panel record was created or changed (`panel`), or deleted (null).
    Panel {
        /// The panel's id.
        id: String,
        /// The record, or null when it was deleted.
        panel: Option<Value>,
    },
    /// The session now receives `panel` and `instance` frames (sent again
    /// after the bus was down): what changed before is read again with
    /// `GET /api/panels`, so nothing between that read and this is missed.
    PanelsFollowed,
    /// One of the user's panel instances changed state, as the panel
    /// manager announced it (`subscribe_panels` follows these too).
    Instance {
        /// The instance's state.
        status: InstanceStatus,
    },
    /// Everyone following `doc` now.
    Presence {
        /// The document's id.
        doc: String,
        /// Who follows it.
        present: Vec<Participant>,
    },
    /// Another participant's cursor moved.
    Cursor {
        /// The document's id.
        doc: String,
        /// The participant's session.
        session: String,
        /// Its user.
        user: String,
        /// Where the cursor is.
        position: Value,
    },
    /// The session now receives `context`'s records as they are journaled
    /// (sent again after the bus was down): the client reads what it lacks
    /// from `GET /api/contexts/{id}/events?from=` and drops what it has by offset.
    ContextFollowed {
        /// The context's id.
        context: String,
    },
    /// A record journaled for a followed context.
    ContextRecord {
        /// The context's id.
        context: String,
        /// The record's offset in the context's partition of `semantic.events`.
        offset: i64,
        /// The record's envelope.
        record: Value,
    },
    /// Something the client asked for did not happen.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

/// Why a client frame was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON.
    #[error("frame is not valid JSON: {0}")]
    BadJson(String),
    /// A `type` the server does not know.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// JSON of the wrong shape for its type.
    #[error("frame does not fit its type: {0}")]
    BadShape(String),
    /// A document id that is not one (ids are UUIDs).
    #[error("{0:?} is not a document id")]
    BadDocument(String),
    /// A context id that is not one (ids are UUIDs).
    #[error("{0:?} is not a context id")]
    BadContext(String),
}

impl FrameError {
    /// The code of the error frame that reports it.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadJson(_) => ErrorCode::BadJson,
            FrameError::UnknownType(_) => ErrorCode::UnknownType,
            FrameError::BadShape(_) | FrameError::BadDocument(_) | FrameError::BadContext(_) => ErrorCode::BadFrame,
        }
    }
}

/// Longest piece of a client's text quoted back in an error.
const QUOTED: usize = 64;

/// Decodes one client text frame.
pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError::BadJson(e.to_string()))?;
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| FrameError::BadShape("no \"type\"".into()))?;
    if !CLIENT_TYPES.contains(&kind) {
        return Err(FrameError::UnknownType(kind.chars().take(QUOTED).collect()));
    }
    let frame: ClientFrame = serde_json::from_value(value).map_err(|e| FrameError::BadShape(e.to_string()))?;
    if let Some(doc) = frame.doc().filter(|doc| !is_document_id(doc)) {
        return Err(FrameError::BadDocument(doc.chars().take(QUOTED).collect()));
    }
    if let Some(context) = frame.context().filter(|context| !is_context_id(context)) {
        return Err(FrameError::BadContext(context.chars().take(QUOTED).collect()));
    }
    if let ClientFrame::Cursor { position, .. } = &frame {
        if position.to_string().len() > MAX_CURSOR {
            return Err(FrameError::BadShape(format!("a cursor position is at most {MAX_CURSOR} bytes")));
        }
    }
    Ok(frame)
}

impl ServerFrame {
    /// The frame as the client receives it.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11";

    fn code(text: &str) -> ErrorCode {
        decode(text).unwrap_err().code()
    }

    #[test]
    fn decodes_known_frames_and_names_what_is_wrong() {
        assert_eq!(
            decode(&format!(r#"{{"type":"subscribe","doc":"{DOC}","version":3}}"#)),
            Ok(ClientFrame::Subscribe { doc: DOC.into(), version: Some(3), presence: true })
        );
        assert_eq!(
            decode(&format!(r#"{{"type":"unsubscribe","doc":"{DOC}"}}"#)),
            Ok(ClientFrame::Unsubscribe { doc: DOC.into() })
        );
        assert_eq!(
            decode(&format!(r#"{{"type":"subscribe","doc":"{DOC}","presence":false}}"#)),
            Ok(ClientFrame::Subscribe { doc: DOC.into(), version: None, presence: false })
        );
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(&format!(r#"{{"doc":"{DOC}"}}"#)), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":"subscribe","doc":7}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"[1,2]"#), ErrorCode::BadFrame);
        assert_eq!(
            decode(&format!(r#"{{"type":"cursor","doc":"{DOC}","position":{{"line":3}}}}"#)),
            Ok(ClientFrame::Cursor { doc: DOC.into(), position: serde_json::json!({"line": 3}) })
        );
    }

    #[test]
    fn a_document_id_that_is_no_uuid_never_decodes() {
        for doc in [format!("{DOC}:log"), "x:log".into(), "*".into(), "nexus:doc:*".into(), String::new(), "d1".into()]
        {
            for frame in [
                serde_json::json!({"type": "subscribe", "doc": doc}),
                serde_json::json!({"type": "unsubscribe", "doc": doc}),
                serde_json::json!({"type": "cursor", "doc": doc, "position": 1}),
            ] {
                let error = decode(&frame.to_string()).unwrap_err();
                assert_eq!((error.code(), &error), (ErrorCode::BadFrame, &FrameError::BadDocument(doc.clone())));
            }
        }
        let long = "y".repeat(10_000);
        let error = decode(&serde_json::json!({"type": "subscribe", "doc": long}).to_string()).unwrap_err();
        assert!(error.to_string().len() < 200, "the id is not echoed whole: {error}");
    }

    #[test]
    fn a_context_frame_names_a_context_by_its_uuid() {
        assert_eq!(
            decode(&format!(r#"{{"type":"follow_context","context":"{DOC}"}}"#)),
            Ok(ClientFrame::FollowContext { context: DOC.into() })
        );
        assert_eq!(
            decode(&format!(r#"{{"type":"unfollow_context","context":"{DOC}"}}"#)),
            Ok(ClientFrame::UnfollowContext { context: DOC.into() })
        );
        for context in ["nexus:context:*", "*", "", "c1"] {
            let frame = serde_json::json!({"type": "follow_context", "context": context}).to_string();
            assert_eq!(decode(&frame), Err(FrameError::BadContext(context.into())));
        }
        assert_eq!(code(r#"{"type":"follow_context"}"#), ErrorCode::BadFrame);
        let record =
            ServerFrame::ContextRecord { context: DOC.into(), offset: 7, record: serde_json::json!({"id": "e"}) };
        assert_eq!(
            record.encode(),
            format!(r#"{{"type":"context_record","context":"{DOC}","offset":7,"record":{{"id":"e"}}}}"#)
        );
    }

    #[test]
    fn a_cursor_position_has_a_bound() {
        let at = |n: usize| serde_json::json!({"type": "cursor", "doc": DOC, "position": "x".repeat(n)}).to_string();
        assert!(decode(&at(MAX_CURSOR - 2)).is_ok(), "the quotes count");
        assert_eq!(code(&at(MAX_CURSOR - 1)), ErrorCode::BadFrame);
    }

    #[test]
    fn error_codes_are_snake_case_on_the_wire() {
        let frame = ServerFrame::Error { code: ErrorCode::TooManyDocuments, message: "m".into() };
        assert_eq!(frame.encode(), r#"{"type":"error","code":"too_many_documents","message":"m"}"#);
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
