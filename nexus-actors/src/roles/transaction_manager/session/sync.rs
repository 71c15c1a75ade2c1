//! How a session brings its client to a document's current version: the
//! access check that comes before any subscription, and the fetch of what
//! the client lacks (the changes from the history, or a snapshot).
//!
//! These run in tasks off the session's actor and never touch its state;
//! the session decides what to do with the outcome (an error is final
//! unless [`SyncError::is_unavailable`]).

use crate::platform::StoreError;
use crate::roles::transaction_manager::documents::Documents;
use crate::roles::transaction_manager::protocol::{ErrorCode, ServerFrame};

/// A client further behind than this many changes gets a snapshot: one
/// frame instead of a replay, and a bounded history read.
pub(crate) const MAX_CATCH_UP: u64 = 1000;

/// Why a client could not be brought to a document's version.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    /// No such document (or it was deleted).
    #[error("document {0} not found")]
    NotFound(String),
    /// Another user's document.
    #[error("document {0} belongs to another user")]
    Forbidden(String),
    /// Redis failed: unreachable (worth a retry) or refusing (final).
    #[error("document {doc}: {source}")]
    Store {
        /// The document.
        doc: String,
        /// What Redis said.
        source: StoreError,
    },
}

impl SyncError {
    fn store(doc: &str) -> impl FnOnce(StoreError) -> SyncError + '_ {
        move |source| SyncError::Store { doc: doc.to_owned(), source }
    }

    /// Whether Redis was unreachable: the only error worth a retry.
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(self, SyncError::Store { source, .. } if source.is_unavailable())
    }

    /// The code of the error frame that reports it.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            SyncError::NotFound(_) => ErrorCode::NotFound,
            SyncError::Forbidden(_) => ErrorCode::Forbidden,
            SyncError::Store { .. } if self.is_unavailable() => ErrorCode::Unavailable,
            SyncError::Store { .. } => ErrorCode::Internal,
        }
    }
}

/// What brings a client to `version`.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// The version the client is at after `frames`.
    pub(crate) version: u64,
    /// Changes in order, or one snapshot; none when it is up to date.
    pub(crate) frames: Vec<ServerFrame>,
}

/// How to bring a client from `since` to `current`.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    UpToDate,
    /// Read this many changes from the history.
    History(u64),
    Snapshot,
}

fn plan(since: Option<u64>, current: u64) -> Plan {
    match since {
        Some(since) if since == current => Plan::UpToDate,
        Some(since) if since < current && current - since <= MAX_CATCH_UP => Plan::History(current - since),
        // Nothing yet, too far behind, or ahead of the server (a document
        // deleted and made again): the whole state.
        _ => Plan::Snapshot,
    }
}

/// Whether `versions` are exactly `since + 1 ..= current`: a history
/// trimmed past `since` starts later.
fn complete(since: u64, current: u64, versions: impl ExactSizeIterator<Item = u64>) -> bool {
    versions.len() as u64 == current - since && versions.zip(since + 1..).all(|(v, expected)| v == expected)
}

/// Whether `user` may follow `doc`: it exists and is theirs. Reads the
/// owner only.
pub(crate) async fn check_access(documents: &Documents, user: &str, doc: &str) -> Result<(), SyncError> {
    match documents.owner(doc).await.map_err(SyncError::store(doc))? {
        None => Err(SyncError::NotFound(doc.to_owned())),
        Some(owner) if owner != user => Err(SyncError::Forbidden(doc.to_owned())),
        Some(_) => Ok(()),
    }
}

/// What `user`'s client lacks of `doc` after `since` (the last version it
/// has): the changes when the history has every one of them and they are
/// few enough, else a snapshot.
pub(crate) async fn fetch(
    documents: &Documents,
    user: &str,
    doc: &str,
    since: Option<u64>,
) -> Result<Fetched, SyncError> {
    let current = documents.get(doc).await.map_err(SyncError::store(doc))?;
    let current = current.ok_or_else(|| SyncError::NotFound(doc.to_owned()))?;
    if current.owner != user {
        return Err(SyncError::Forbidden(doc.to_owned()));
    }
    let version = current.version;
    let snapshot =
        |state| Fetched { version, frames: vec![ServerFrame::Snapshot { doc: doc.to_owned(), version, state }] };
    match (plan(since, version), since) {
        (Plan::UpToDate, _) => Ok(Fetched { version, frames: Vec::new() }),
        (Plan::History(count), Some(since)) => {
            // At most `count`: what was written after the read above comes
            // announced, and the session catches up again for it.
            let changes = documents.history(doc, since, count as usize).await.map_err(SyncError::store(doc))?;
            if !complete(since, version, changes.iter().map(|c| c.version)) {
                return Ok(snapshot(current.state));
            }
            let frames = changes
                .into_iter()
                .map(|c| ServerFrame::Change { doc: doc.to_owned(), version: c.version, patch: c.patch })
                .collect();
            Ok(Fetched { version, frames })
        }
        _ => Ok(snapshot(current.state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_changes_only_when_it_is_not_too_far_behind() {
        assert_eq!(plan(None, 7), Plan::Snapshot);
        assert_eq!(plan(Some(7), 7), Plan::UpToDate);
        assert_eq!(plan(Some(6), 7), Plan::History(1));
        assert_eq!(plan(Some(1), 1 + MAX_CATCH_UP), Plan::History(MAX_CATCH_UP));
        assert_eq!(plan(Some(1), 2 + MAX_CATCH_UP), Plan::Snapshot);
        assert_eq!(plan(Some(9), 7), Plan::Snapshot, "ahead of the server");
    }

    #[test]
    fn a_history_with_a_hole_or_trimmed_past_since_is_not_complete() {
        assert!(complete(3, 6, [4, 5, 6].into_iter()));
        assert!(!complete(3, 6, [5, 6].into_iter()), "trimmed");
        assert!(!complete(3, 6, [4, 6].into_iter()), "a hole");
        assert!(!complete(3, 6, [4, 5].into_iter()), "short");
        assert!(!complete(3, 6, [5, 6, 7].into_iter()), "shifted");
    }

    #[test]
    fn only_an_unreachable_redis_is_worth_a_retry() {
        let io = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        let wrongtype = redis::RedisError::from((redis::ErrorKind::Extension, "WRONGTYPE"));
        let store = |source| SyncError::Store { doc: "d".into(), source };
        assert!(store(StoreError::Redis(io)).is_unavailable());
        assert_eq!(store(StoreError::Redis(wrongtype)).code(), ErrorCode::Internal);
        assert_eq!(store(StoreError::Corrupt("x".into())).code(), ErrorCode::Internal);
        assert!(!SyncError::NotFound("d".into()).is_unavailable());
    }
}
