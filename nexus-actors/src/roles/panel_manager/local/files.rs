//! The `local` driver's files: copying panel code without ever following
//! a symlink (a user's symlink to a host file stays a symlink and is never
//! read by us; the walking itself is [`super::tree`]'s), making snapshots
//! read-only, handing a code dir to the uid its panel runs as, reading the
//! panel's command, and the names derived from ids.
//!
//! It owns no layout decision beyond the helpers' contracts below; the
//! driver decides what lives where.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::super::driver::{DriverError, PanelFileError};
use super::tree::{self, CopyAs};

/// A `nexus-panel.json` larger than this is refused unread.
const MAX_MANIFEST: u64 = 64 * 1024;

/// Panel and instance ids become paths and namespace names: only
/// `[A-Za-z0-9_-]`, 1 to 100 characters, so none can escape a directory.
pub(super) use super::super::driver::check_id;

/// The highest numbered entry of `dir` (0 when none).
pub(super) fn last_version(dir: &Path) -> io::Result<u64> {
    let mut last = 0;
    for entry in fs::read_dir(dir)? {
        if let Some(version) = entry?.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
            last = last.max(version);
        }
    }
    Ok(last)
}

/// Copies the panel's tree at `from` to the new directory `to` (see
/// [`tree::copy`]: symlinks stay symlinks, nothing is followed).
pub(super) fn copy_tree(from: &Path, to: &Path, how: CopyAs<'_>) -> Result<(), DriverError> {
    tree::copy(from, to, how).map_err(copy_error)
}

/// A refused hard link is its own error; anything else is I/O.
fn copy_error(error: io::Error) -> DriverError {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<tree::ForeignLink>()) {
        Some(link) => DriverError::ForeignLink(link.to_string()),
        None => DriverError::Io(error),
    }
}

/// Files lose their write bits, directories become `0555`: nobody writes
/// a snapshot, not even through a bug (root still could, which is why
/// instances get a copy).
pub(super) fn make_read_only(dir: &Path) -> io::Result<()> {
    tree::make_read_only(dir)
}

/// Gives the tree at `dir` to `uid` (symlinks themselves, not their
/// targets) and closes the top to everyone else.
pub(super) fn chown_tree(dir: &Path, uid: u32) -> Result<(), DriverError> {
    Ok(tree::chown(dir, uid, 0o700)?)
}

/// Removes the tree at `path` if it exists, read-only parts included,
/// without following a symlink in it.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    tree::remove(path)
}

/// Replaces `to` with a writable copy of `from` (an App's scratch code),
/// owned by `owner` when given. The copy is made as root's and handed over
/// only when complete, so no panel process can reach into it meanwhile.
pub(super) async fn fresh_copy(from: &Path, to: &Path, owner: Option<u32>) -> Result<(), DriverError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    blocking(move || {
        remove_tree(&to)?;
        copy_tree(&from, &to, CopyAs { owner, read_only: false, store: None })
    })
    .await
}

/// Copies `from` into `to`, an empty `0700` directory of root's that a
/// warm sandbox already has mounted (so it must stay the same directory),
/// handed to `owner` when complete.
pub(super) async fn copy_into_mounted(from: &Path, to: &Path, owner: u32) -> Result<(), DriverError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    blocking(move || {
        tree::copy_into(&from, &to, CopyAs { owner: Some(owner), read_only: false, store: None }).map_err(copy_error)
    })
    .await
}

/// Runs file work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| DriverError::Io(io::Error::other(e)))?
}

/// The command in the code dir's `nexus-panel.json`, else `python3
/// server.py` when there is a server.py.
pub(super) fn read_command(code: &Path) -> Result<Vec<String>, DriverError> {
    // O_NOFOLLOW, and the checks on what was opened: root reads this file
    // from a directory the panel writes, so a symlink (or a FIFO) swapped
    // in under this name is refused, never followed.
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(code.join("nexus-panel.json"));
    match opened {
        Ok(file) => {
            #[derive(serde::Deserialize)]
            struct PanelFile {
                command: Vec<String>,
            }
            let meta = file.metadata()?;
            if !meta.is_file() || meta.len() > MAX_MANIFEST {
                return Err(PanelFileError::NotARegularFile { max: MAX_MANIFEST }.into());
            }
            let mut text = String::new();
            file.take(MAX_MANIFEST).read_to_string(&mut text)?;
            let file: PanelFile = serde_json::from_str(&text).map_err(PanelFileError::Json)?;
            if file.command.first().is_none_or(|program| program.is_empty()) {
                return Err(PanelFileError::NoProgram.into());
            }
            return Ok(file.command);
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(PanelFileError::NotARegularFile { max: MAX_MANIFEST }.into())
        }
        Err(error) => return Err(error.into()),
    }
    if fs::symlink_metadata(code.join("server.py")).is_ok_and(|m| m.is_file()) {
        return Ok(vec!["python3".into(), "server.py".into()]);
    }
    Err(DriverError::NoCommand)
}

/// The network namespace of an instance (`/run/netns/<name>`).
pub fn netns_name(instance: &str) -> String {
    format!("nexus-{instance}")
}

pub(super) fn path_string(path: &Path) -> String {
    path.display().to_string()
}

/// Opens a log for appending: writers from several processes (and from
/// inside gVisor, which writes at its own offsets) never overwrite. Only
/// root reads it: another panel's sandboxed uid must not.
pub(super) fn open_log(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nexus-local-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("a scratch dir");
        dir
    }

    #[test]
    fn ids_that_could_leave_a_directory_are_refused() {
        assert!(check_id("panel", "0191f3c2-7d1e-7a2b-9c1d-5e6f7a8b9c0d").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "a b", "ü", &"a".repeat(101)] {
            let refused = check_id("panel", bad);
            assert!(matches!(refused, Err(DriverError::InvalidId { what: "panel", .. })), "{bad:?}: {refused:?}");
        }
    }

    #[test]
    fn a_panel_file_is_read_without_following_symlinks_and_its_faults_are_typed() {
        let dir = scratch("command");
        assert!(matches!(read_command(&dir), Err(DriverError::NoCommand)));
        fs::write(dir.join("server.py"), "").expect("write");
        assert_eq!(read_command(&dir).expect("the default"), ["python3", "server.py"]);
        let file = dir.join("nexus-panel.json");
        fs::write(&file, r#"{"command": ["node", "main.js"]}"#).expect("write");
        assert_eq!(read_command(&dir).expect("the command"), ["node", "main.js"]);
        fs::write(&file, r#"{"command": [""]}"#).expect("write");
        assert!(matches!(read_command(&dir), Err(DriverError::PanelFile(PanelFileError::NoProgram))));
        fs::write(&file, "not json").expect("write");
        assert!(matches!(read_command(&dir), Err(DriverError::PanelFile(PanelFileError::Json(_)))));
        fs::remove_file(&file).expect("remove");
        std::os::unix::fs::symlink(dir.join("server.py"), &file).expect("symlink");
        let followed = read_command(&dir);
        assert!(
            matches!(followed, Err(DriverError::PanelFile(PanelFileError::NotARegularFile { .. }))),
            "{followed:?}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
