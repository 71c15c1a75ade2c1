//! A Studio volume's own file system: a sparse ext4 image
//! (`volumes/.disks/<panel>.ext4`, root's only) loop-mounted on
//! `volumes/<panel>/`, so what a panel's code writes there (`pip install`,
//! build output, its own files) stops at the image's size with `ENOSPC`
//! and never fills the host's disk. The file system is mounted `nosuid`
//! and `nodev`: a set-uid binary or a device node the panel stores there
//! does nothing.
//!
//! Images are thin: one is made only when the host has its size free, but
//! together they may promise more than the host has. Mounted with
//! `discard`, what a panel deletes goes back to the host;
//! `errors=remount-ro` stops writes to a damaged file system, and
//! `e2fsck -p` repairs what a crash left before each mount.
//!
//! It makes, mounts and unmounts images, and says whether one is mounted
//! or full; what goes in them is storage.rs's. A mount outlives a node that
//! crashed (the next one on the data directory finds its image mounted
//! and uses it); a node that stops unmounts what it mounted. util-linux's
//! `mount` (Debian's) is relied on to mount an image whose detached mount
//! is still in use through the same loop device, never a second time.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

/// Makes an image of `bytes` at `image`: sparse, so only what is written
/// takes room on the host. Made under a temporary name, so a crash never
/// leaves half an image under the real one.
pub(super) fn make(image: &Path, bytes: u64) -> io::Result<()> {
    let dir = image.parent().ok_or_else(|| io::Error::other("an image has a directory"))?;
    let free = space(dir)?;
    if free < bytes {
        let why = format!("the host has {} MiB free, less than a volume's {} MiB", free >> 20, bytes >> 20);
        return Err(io::Error::new(io::ErrorKind::StorageFull, why));
    }
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
            .args(["-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1", "--"])
            .arg(&fresh),
        "mkfs.ext4 (e2fsprogs)",
    )
    .and_then(|()| std::fs::rename(&fresh, image));
    if made.is_err() {
        let _ = std::fs::remove_file(&fresh);
    }
    made
}

/// Checks `image` (repairing what a crash left) and mounts it on the
/// directory `at`.
pub(super) fn mount(image: &Path, at: &Path) -> io::Result<()> {
    let checked = Command::new("e2fsck")
        .args(["-p", "--"])
        .arg(image)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("e2fsck (e2fsprogs) could not run: {e}")))?;
    // 0: clean; 1: errors corrected. Anything else needs a person.
    if !matches!(checked.status.code(), Some(0 | 1)) {
        let said = String::from_utf8_lossy(&checked.stdout);
        return Err(io::Error::other(format!("e2fsck {} ({}): {}", image.display(), checked.status, said.trim())));
    }
    let options = "loop,nosuid,nodev,noatime,discard,errors=remount-ro";
    run(Command::new("mount").args(["-t", "ext4", "-o", options, "--"]).arg(image).arg(at), "mount")
}

/// Whether `image` is mounted on `dir`. Something else mounted there is an
/// error: it is neither taken for the volume nor mounted over.
pub(super) fn is_mounted(dir: &Path, image: &Path) -> io::Result<bool> {
    let Some(source) = mount_source(dir)? else { return Ok(false) };
    let backing = source
        .strip_prefix("/dev/")
        .and_then(|device| std::fs::read_to_string(format!("/sys/block/{device}/loop/backing_file")).ok());
    match backing {
        Some(file) if Path::new(file.trim()) == std::fs::canonicalize(image)?.as_path() => Ok(true),
        _ => Err(io::Error::other(format!("{source} is mounted on {}, not the volume's image", dir.display()))),
    }
}

/// What is mounted on `dir` (its source), if anything.
pub(super) fn mount_source(dir: &Path) -> io::Result<Option<String>> {
    let dir = match std::fs::canonicalize(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        dir => dir?,
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    // The last mount on a point is the one seen there.
    Ok(table.lines().rev().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let point = unescape(fields.split(' ').nth(4)?);
        if Path::new(&point) != dir {
            return None;
        }
        rest.split(' ').nth(1).map(unescape)
    }))
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts what is mounted on `dir`, if anything. Detached: a process
/// still inside cannot keep it; the loop device goes with its last user.
pub(super) fn unmount(dir: &Path) -> io::Result<()> {
    let target = c_path(dir)?;
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
/// it ended. A tmpfs fills to its last byte; ext4 refuses a write with a
/// little room left (what it keeps for the write's metadata): less than
/// 1 MiB and a thousandth of its size.
pub(super) fn is_full(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(target) = c_path(path) else { return false };
    // SAFETY: statfs is plain data, for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `target` is a valid path string and `stat` a valid out-pointer.
    if unsafe { libc::statfs(target.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    let block = stat.f_bsize as u64;
    let (available, total) = (stat.f_bavail * block, stat.f_blocks * block);
    match stat.f_type as i64 == TMPFS_MAGIC {
        true => available == 0,
        false => available < (1 << 20) + total / 1024,
    }
}

/// Whether an error is a full volume rather than a fault.
pub(super) fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Bytes free to anyone on the file system of `path`.
fn space(path: &Path) -> io::Result<u64> {
    let target = c_path(path)?;
    // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `target` is a valid path string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(target.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail * stat.f_frsize)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL"))
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
