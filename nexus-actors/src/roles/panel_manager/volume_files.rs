//! A Studio volume as its owner edits it through the API: the paths a
//! request may name ([`FilePath`]), what a listing reports ([`FileList`]),
//! the limits every write is held to ([`VolumeLimits`]) and why a file
//! operation is refused ([`FileError`]).
//!
//! It checks names and carries results; it touches no file. How a volume
//! is read and written is the driver's (`local/workspace.rs`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest path a request may name, in bytes.
pub const MAX_PATH: usize = 1024;
/// Longest name of one file or directory, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Deepest path a request may name, in directories.
pub const MAX_DEPTH: usize = 32;

/// A path inside a volume, checked: relative, made of plain names only (no
/// `.`, `..`, empty names or NUL), at most [`MAX_PATH`] bytes and
/// [`MAX_DEPTH`] deep. A symlink on the way is not refused here (it cannot
/// be seen from a name) but by the walk, which never follows one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePath {
    text: String,
}

impl FilePath {
    /// Checks `path` as a request names it.
    pub fn parse(path: &str) -> Result<FilePath, FileError> {
        let bad = |why: &str| FileError::BadPath { path: path.chars().take(MAX_PATH).collect(), why: why.to_owned() };
        if path.is_empty() {
            return Err(bad("empty"));
        }
        if path.len() > MAX_PATH {
            return Err(bad(&format!("longer than {MAX_PATH} bytes")));
        }
        if path.starts_with('/') {
            return Err(bad("absolute; paths are relative to the panel's files"));
        }
        if path.contains('\0') {
            return Err(bad("contains NUL"));
        }
        let names: Vec<&str> = path.split('/').collect();
        if names.len() > MAX_DEPTH {
            return Err(bad(&format!("more than {MAX_DEPTH} levels deep")));
        }
        for name in &names {
            match *name {
                "" => return Err(bad("an empty name (`//` or a trailing `/`)")),
                "." | ".." => return Err(bad("`.` and `..` are not allowed")),
                name if name.len() > MAX_NAME => return Err(bad(&format!("a name longer than {MAX_NAME} bytes"))),
                _ => {}
            }
        }
        Ok(FilePath { text: path.to_owned() })
    }

    /// The names from the top down.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.text.split('/')
    }

    /// The path as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for FilePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What one volume may hold, through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VolumeLimits {
    /// Bytes in all files together.
    pub max_bytes: u64,
    /// Files, directories and symlinks together.
    pub max_entries: usize,
    /// Bytes in one file.
    pub max_file_bytes: u64,
}

impl Default for VolumeLimits {
    /// Room for a panel's source and a few assets; dependencies a panel
    /// installs itself (`pip`, `npm`) are not written through the API.
    fn default() -> Self {
        VolumeLimits { max_bytes: 64 << 20, max_entries: 4096, max_file_bytes: 16 << 20 }
    }
}

/// What an entry of a volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink (never followed by the platform).
    Symlink,
}

/// One entry of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    /// Its path from the volume's top, `/`-separated.
    pub path: String,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Bytes (0 for directories; the target's length for symlinks).
    pub size: u64,
    /// Whether its owner may execute it (files only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
    /// Where a symlink points, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `GET /api/panels/{id}/files`: every entry, parents before children, in
/// name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// The entries.
    pub entries: Vec<FileEntry>,
    /// Bytes in all files together.
    pub bytes: u64,
    /// Set when the volume holds more entries than a listing returns
    /// ([`VolumeLimits::max_entries`]: the panel's own code wrote them).
    pub truncated: bool,
    /// What the volume may hold.
    pub limits: VolumeLimits,
}

/// Why a file operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not one a request may name (400).
    #[error("invalid path {path:?}: {why}")]
    BadPath {
        /// The path as given (cut at [`MAX_PATH`]).
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// Nothing by that name (404).
    #[error("no file {0}")]
    NotFound(String),
    /// The path or one of its parents is not what the operation needs: a
    /// directory where a file is read or written, a file where a directory
    /// is passed through, a symlink anywhere on the way, a special file (409).
    #[error("{path}: {why}")]
    WrongKind {
        /// The path as given.
        path: String,
        /// What it is.
        why: &'static str,
    },
    /// A file over [`VolumeLimits::max_file_bytes`] (413).
    #[error("{path} would be {bytes} bytes; a file may have at most {limit}")]
    FileTooLarge {
        /// The path.
        path: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The volume would hold more than its limits (403 `quota_exceeded`).
    #[error("the panel's files would exceed {limit} {what}")]
    Quota {
        /// `bytes` or `entries`.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// An upload that is not an archive this API takes, or holds an entry
    /// it refuses (400). Nothing was changed.
    #[error("archive: {0}")]
    BadArchive(String),
    /// Another change to this panel's files is in progress (409).
    #[error("another change to this panel's files is in progress; try again")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_are_taken_and_their_names_kept() {
        let path = FilePath::parse("src/app/main.py").expect("a plain path");
        assert_eq!(path.names().collect::<Vec<_>>(), ["src", "app", "main.py"]);
        assert!(FilePath::parse(".env").is_ok(), "a dot file is a plain name");
        assert!(FilePath::parse("a..b").is_ok(), "dots inside a name are a plain name");
    }

    #[test]
    fn paths_that_could_leave_the_volume_or_name_nothing_are_refused() {
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let long_name = "n".repeat(MAX_NAME + 1);
        let long = format!("{}/x", "d/".repeat(MAX_PATH / 2));
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/./b",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            &deep,
            &long_name,
            &long,
        ] {
            let refused = FilePath::parse(bad);
            assert!(matches!(refused, Err(FileError::BadPath { .. })), "{bad:?}: {refused:?}");
        }
    }
}
