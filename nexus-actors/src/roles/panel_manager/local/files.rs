//! The `local` driver's files: copying panel code without ever following
//! a symlink (a user's symlink to a host file stays a symlink and is never
//! read by us), making snapshots read-only, handing a code dir to the uid
//! its panel runs as, and the names derived from ids.
//!
//! It owns no layout decision beyond the helpers' contracts below; the
//! driver decides what lives where.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::super::driver::DriverError;

/// Panel and instance ids become paths and namespace names: only
/// `[A-Za-z0-9_-]`, 1 to 100 characters, so none can escape a directory.
pub(super) fn check_id(what: &str, id: &str) -> Result<(), DriverError> {
    let valid =
        !id.is_empty() && id.len() <= 100 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(DriverError::Io(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid {what} id {id:?}"))))
    }
}

/// The uid a panel's code runs as (root only): stable per panel so its
/// volume keeps its owner, far above any system or human uid.
pub(super) fn panel_uid(panel: &str) -> u32 {
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = panel.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    1_000_000_000 + hash % 100_000_000
}

/// Creates `dir` owned by root and traversable but not listable by others
/// (a sandboxed uid reaches its own code dir but cannot list its neighbours).
pub(super) fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    set_mode(dir, 0o711)
}

pub(super) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

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

/// Copies the tree at `from` to the new directory `to`: directories and
/// regular files; symlinks are recreated as symlinks (not followed); other
/// file types are skipped. `writable`: owner may write what is copied.
pub(super) fn copy_tree(from: &Path, to: &Path, writable: bool) -> Result<(), DriverError> {
    fs::create_dir(to)?;
    set_mode(to, 0o755)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&source, &target, writable)?;
        } else if kind.is_file() {
            fs::copy(&source, &target)?;
            if writable {
                let mode = fs::metadata(&target)?.permissions().mode();
                set_mode(&target, mode | 0o200)?;
            }
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
        }
    }
    Ok(())
}

/// Files `0444`, directories `0555`: nobody writes a snapshot, not even
/// through a bug (root still could, which is why instances get a copy).
pub(super) fn make_read_only(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            make_read_only(&entry.path())?;
        } else if kind.is_file() {
            set_mode(&entry.path(), 0o444)?;
        }
    }
    set_mode(dir, 0o555)
}

/// Gives the tree at `dir` to `uid` (symlinks themselves, not their
/// targets) and closes the top to everyone else.
pub(super) fn chown_tree(dir: &Path, uid: u32) -> Result<(), DriverError> {
    fn walk(path: &Path, uid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
        if fs::symlink_metadata(path)?.is_dir() {
            for entry in fs::read_dir(path)? {
                walk(&entry?.path(), uid)?;
            }
        }
        Ok(())
    }
    walk(dir, uid)?;
    set_mode(dir, 0o700)?;
    Ok(())
}

/// Removes the tree at `path` if it exists, read-only parts included.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    fn writable(path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            set_mode(path, meta.permissions().mode() | 0o700)?;
            for entry in fs::read_dir(path)? {
                writable(&entry?.path())?;
            }
        }
        Ok(())
    }
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
        Ok(meta) if meta.is_dir() => {
            writable(path)?;
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
    }
}

/// Replaces `to` with a writable copy of `from` (an App's scratch code).
pub(super) async fn fresh_copy(from: &Path, to: &Path) -> Result<(), DriverError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    blocking(move || {
        remove_tree(&to)?;
        copy_tree(&from, &to, true)
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
    let manifest = code.join("nexus-panel.json");
    // symlink_metadata: a symlink named nexus-panel.json is not followed.
    if fs::symlink_metadata(&manifest).is_ok_and(|m| m.is_file()) {
        #[derive(serde::Deserialize)]
        struct PanelFile {
            command: Vec<String>,
        }
        let bad = |why: String| DriverError::Io(io::Error::new(io::ErrorKind::InvalidData, why));
        let text = fs::read_to_string(&manifest)?;
        let file: PanelFile = serde_json::from_str(&text).map_err(|e| {
            bad(format!("nexus-panel.json: {e}; expected {{\"command\": [\"program\", \"arg\", ...]}}"))
        })?;
        if file.command.first().is_none_or(|program| program.is_empty()) {
            return Err(bad("nexus-panel.json: \"command\" must name a program".into()));
        }
        return Ok(file.command);
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
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}
