//! An App instance's scratch space: `scratch/<instance>/`, a tmpfs of its
//! own (root only) capped at the instance's disk limit, with the instance's
//! copy of its snapshot in `code/`. What the App writes there counts
//! against that cap (and, being memory, against its memory limit), never
//! against the host's disk, and is gone with the instance.
//!
//! It mounts and unmounts; what goes in `code/` is the caller's.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::files::remove_tree;

/// Makes `dir` (gone first, with anything a crash left mounted there) and,
/// with `cap`, mounts a tmpfs of that many bytes on it; returns where the
/// code goes.
pub(super) fn prepare(dir: &Path, cap: Option<u64>) -> io::Result<PathBuf> {
    release(dir)?;
    std::fs::create_dir(dir)?;
    if let Some(bytes) = cap {
        // The instance's uid must pass through, not list: 0711 root.
        let options = format!("size={bytes},mode=0711,nr_inodes={}", (bytes / 4096).max(1024));
        let (source, target, fstype, data) =
            (c("tmpfs")?, c(dir.as_os_str().as_bytes())?, c("tmpfs")?, c(options.as_bytes())?);
        let flags = libc::MS_NOSUID | libc::MS_NODEV;
        // SAFETY: every pointer is a valid NUL-terminated string that
        // outlives the call.
        let mounted =
            unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
        if mounted != 0 {
            let error = io::Error::last_os_error();
            let _ = std::fs::remove_dir(dir);
            return Err(error);
        }
    }
    Ok(dir.join("code"))
}

/// Unmounts `dir` if something is mounted there and deletes it.
pub(super) fn release(dir: &Path) -> io::Result<()> {
    let target = c(dir.as_os_str().as_bytes())?;
    // Detached: a process still inside cannot keep it from going.
    // SAFETY: `target` is a valid NUL-terminated string.
    let _ = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    remove_tree(dir)
}

fn c(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}
