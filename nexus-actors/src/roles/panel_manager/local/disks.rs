//! A Studio volume's own file system: a sparse ext4 image
//! (`volumes/.disks/<panel>.ext4`, root's only) loop-mounted on
//! `volumes/<panel>/`, so what a panel's code writes there (`pip install`,
//! build output, its own files) stops at the image's size with `ENOSPC`
//! and never fills the host's disk. The file system is mounted `nosuid`
//! and `nodev`: a set-uid binary or a device node the panel stores there
//! does nothing.
//!
//! It makes, mounts and unmounts images, and says whether one is mounted
//! or full; what goes in them is storage.rs's. A mount outlives a node that
//! crashed (the next one on the data directory finds it mounted and uses
//! it); a node that stops unmounts what it mounted.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

/// Makes an image of `bytes` at `image`: sparse, so only what is written
/// takes room on the host. Made under a temporary name, so a crash never
/// leaves half an image under the real one.
pub(super) fn make(image: &Path, bytes: u64) -> io::Result<()> {
    let fresh = image.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&fresh)?;
    file.set_len(bytes)?;
    drop(file);
    // No blocks kept for root (-m 0): the panel gets the size it was told.
    // The lazy inits leave inode tables and journal to the kernel: on a
    // sparse file their unwritten blocks already read as zeros.
    let made = run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-L", "nexus-volume"])
            .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&fresh),
        "mkfs.ext4 (e2fsprogs)",
    )
    .and_then(|()| std::fs::rename(&fresh, image));
    if made.is_err() {
        let _ = std::fs::remove_file(&fresh);
    }
    made
}

/// Mounts `image` on the directory `at`.
pub(super) fn mount(image: &Path, at: &Path) -> io::Result<()> {
    run(Command::new("mount").args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"]).arg(image).arg(at), "mount")
}

/// Whether something is mounted on `dir` (it is on another device than
/// its parent).
pub(super) fn is_mounted(dir: &Path) -> io::Result<bool> {
    let parent = dir.parent().ok_or_else(|| io::Error::other("a volume has a parent directory"))?;
    Ok(std::fs::symlink_metadata(dir)?.dev() != std::fs::metadata(parent)?.dev())
}

/// Unmounts what is mounted on `dir`, if anything. Detached: a process
/// still inside cannot keep it; the loop device goes with its last user.
pub(super) fn unmount(dir: &Path) -> io::Result<()> {
    let target =
        CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL"))?;
    // SAFETY: `target` is a valid NUL-terminated string.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        // Not a mount point, or not there: nothing to unmount.
        e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        e => Err(e),
    }
}

/// Whether the file system of `path` is full: what a panel ran into when
/// it ended. ext4 refuses a write with some room left (blocks it keeps for
/// the write's metadata), so "full" is less than 1 MiB or 1/64 left.
pub(super) fn is_full(path: &Path) -> bool {
    let Ok(target) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `target` is a valid path string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(target.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    let (available, total) = (stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize);
    available < (total / 64).max(1 << 20)
}

/// Whether an error is a full volume rather than a fault.
pub(super) fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

fn run(command: &mut Command, what: &str) -> io::Result<()> {
    let output = command
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{what} could not run (is it installed?): {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(io::Error::other(format!("{what} failed ({}): {}", output.status, stderr.trim())))
}
