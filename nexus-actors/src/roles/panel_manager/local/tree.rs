//! File trees walked by file descriptor, never by path: every entry is
//! opened relative to its parent directory's descriptor with `O_NOFOLLOW`,
//! so a directory that a panel swaps for a symlink between two steps is
//! never followed out of its tree. Root uses this for everything it does in
//! a tree a panel can write (its volume, an App's scratch copy): it must
//! never read, chown, chmod or delete a host file through a panel's symlink.
//!
//! A file (not a directory or symlink) with more than one link that the
//! tree's owner does not own is a hard link into the tree of a file from
//! elsewhere: copies refuse it ([`ForeignLink`]) and chowns leave it alone,
//! so a host file never ends up in a snapshot or owned by a panel.
//!
//! It copies, chowns, marks read-only and removes trees; it knows nothing
//! about panels, snapshots or who may write where (the caller decides).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Deeper trees are refused rather than walked: a panel must not be able
/// to exhaust the walker's stack or file descriptors.
const MAX_DEPTH: usize = 128;

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
/// `O_NONBLOCK`: opening a FIFO the panel left must not hang the walk.
const ENTRY_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

/// A hard link in a tree to a file its owner does not own.
#[derive(Debug, thiserror::Error)]
#[error("{0}: a hard link to a file from outside the panel's files, which is neither copied nor given to the panel; remove it")]
pub(super) struct ForeignLink(pub(super) String);

/// Whether `stat` is of a file (not a directory or symlink) linked from
/// elsewhere too and not `owner`'s. It relies on the kernel's
/// `fs.protected_hardlinks` for links whose other names are gone.
pub(super) fn foreign_link(stat: &libc::stat, owner: u32) -> bool {
    let kind = stat.st_mode & libc::S_IFMT;
    kind != libc::S_IFDIR && kind != libc::S_IFLNK && stat.st_nlink > 1 && stat.st_uid != owner
}

/// Warns (as root) when the kernel lets users hard-link files they do not
/// own: [`foreign_link`] cannot see such a link once the file's other names
/// are gone.
pub(super) fn warn_if_hard_links_unprotected() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() != "1") {
        tracing::warn!(
            "fs.protected_hardlinks is off: a panel may hard-link files it does not own into its tree; \
             set it to 1 (sysctl -w fs.protected_hardlinks=1)"
        );
    }
}

/// How [`copy`] makes what it creates.
#[derive(Debug, Clone, Copy)]
pub(super) struct CopyAs<'a> {
    /// Owner (uid = gid) of everything created; `None` keeps the caller's.
    pub owner: Option<u32>,
    /// Nobody may write the copy (snapshots); else its owner may.
    pub read_only: bool,
    /// Files become hard links to objects of this store
    /// ([`super::objects`]), made read-only; else they are copied.
    pub store: Option<&'a Dir>,
}

/// Copies the tree at `from` into the new directory `to`: directories,
/// regular files (permission bits only: no setuid, setgid or sticky) and
/// symlinks as symlinks (their targets are never opened); other file types
/// are skipped. `to` stays `0700` and the caller's until everything in it
/// is done, so nobody else can reach into the copy while it is made.
pub(super) fn copy(from: &Path, to: &Path, how: CopyAs<'_>) -> io::Result<()> {
    let target_path = c_path(to)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::mkdir(target_path.as_ptr(), 0o700) })?;
    copy_into(from, to, how)
}

/// [`copy`] into `to`, an empty directory that already exists and is
/// `0700` the caller's (one a sandbox has mounted before it had code).
pub(super) fn copy_into(from: &Path, to: &Path, how: CopyAs<'_>) -> io::Result<()> {
    let source = Dir::open(from)?;
    let target = Dir::open(to)?;
    let owner = fstat(source.fd())?.st_uid;
    copy_entries(&source, &target, how, owner, 0)?;
    let top = match (how.read_only, how.owner) {
        (true, _) => 0o555,
        (false, Some(_)) => 0o700,
        (false, None) => 0o700,
    };
    finish(target.fd(), how.owner, top)
}

fn copy_entries(source: &Dir, target: &Dir, how: CopyAs<'_>, owner: u32, depth: usize) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    for name in source.entries()? {
        let entry = match source.open_entry(&name) {
            Ok(entry) => entry,
            // A symlink (now): copied as the link it is, never followed.
            Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
                copy_symlink(source, target, &name, how)?;
                continue;
            }
            // Gone meanwhile, or a socket: nothing to copy.
            Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => continue,
            Err(error) => return Err(error),
        };
        let stat = fstat(entry.as_raw_fd())?;
        let bits = stat.st_mode & 0o777;
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                // SAFETY: valid descriptor and NUL-terminated name.
                check(unsafe { libc::mkdirat(target.fd(), name.as_ptr(), 0o700) })?;
                let child = target.child(&name)?;
                copy_entries(&Dir(entry), &child, how, owner, depth + 1)?;
                finish(child.fd(), how.owner, if how.read_only { 0o555 } else { 0o755 })?;
            }
            libc::S_IFREG if foreign_link(&stat, owner) => {
                let name = String::from_utf8_lossy(name.to_bytes()).into_owned();
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, ForeignLink(name)));
            }
            libc::S_IFREG if how.store.is_some() => {
                let store = how.store.ok_or_else(|| invalid("no store"))?;
                super::objects::link(store, File::from(entry), target, &name, bits & 0o555)?;
            }
            libc::S_IFREG => {
                let mut copied = target.create_file(&name)?;
                io::copy(&mut File::from(entry), &mut copied)?;
                let mode = if how.read_only { bits & 0o555 } else { bits | 0o200 };
                finish(copied.as_raw_fd(), how.owner, mode)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn copy_symlink(source: &Dir, target: &Dir, name: &CStr, how: CopyAs<'_>) -> io::Result<()> {
    let Ok(buffer) = source.read_link(name) else {
        // No longer a symlink (swapped again): skipped, never followed.
        return Ok(());
    };
    let link = CString::new(buffer).map_err(|_| invalid("a symlink with a NUL"))?;
    // SAFETY: valid descriptor and NUL-terminated strings.
    check(unsafe { libc::symlinkat(link.as_ptr(), target.fd(), name.as_ptr()) })?;
    if let Some(owner) = how.owner {
        // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
        check(unsafe { libc::fchownat(target.fd(), name.as_ptr(), owner, owner, libc::AT_SYMLINK_NOFOLLOW) })?;
    }
    Ok(())
}

/// Gives the tree at `dir` to `uid` (uid = gid): every entry itself, never
/// what a symlink points to; then `dir` gets `top_mode`.
pub(super) fn chown(dir: &Path, uid: u32, top_mode: u32) -> io::Result<()> {
    fn walk(dir: &Dir, uid: u32, depth: usize) -> io::Result<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        for name in dir.entries()? {
            // What is checked is what is changed: the entry itself is opened
            // (O_PATH: never followed, never opened for reading, so a FIFO or
            // device is not touched), checked and changed by its descriptor.
            let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid descriptor and NUL-terminated name.
            let fd = match check(unsafe { libc::openat(dir.fd(), name.as_ptr(), flags) }) {
                // SAFETY: openat returned a fresh descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(error) => return Err(error),
            };
            let stat = fstat(fd.as_raw_fd())?;
            if foreign_link(&stat, uid) {
                tracing::warn!(name = %name.to_string_lossy(), "a hard link to a file from elsewhere is left to its owner");
                continue;
            }
            let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
            // SAFETY: a valid descriptor and the empty path AT_EMPTY_PATH asks for.
            check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, uid, flags) })?;
            if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                // SAFETY: valid descriptor and NUL-terminated name.
                let child = check(unsafe { libc::openat(fd.as_raw_fd(), c".".as_ptr(), DIR_FLAGS) })?;
                // SAFETY: openat returned a fresh descriptor that nothing else owns.
                walk(&Dir(unsafe { OwnedFd::from_raw_fd(child) }), uid, depth + 1)?;
            }
        }
        Ok(())
    }
    let top = Dir::open(dir)?;
    walk(&top, uid, 0)?;
    finish(top.fd(), Some(uid), top_mode)
}

/// Files lose every write bit, directories become `0555`.
pub(super) fn make_read_only(dir: &Path) -> io::Result<()> {
    fn walk(dir: &Dir, depth: usize) -> io::Result<()> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        for name in dir.entries()? {
            let entry = match dir.open_entry(&name) {
                Ok(entry) => entry,
                Err(error) if matches!(error.raw_os_error(), Some(libc::ELOOP | libc::ENOENT | libc::ENXIO)) => {
                    continue
                }
                Err(error) => return Err(error),
            };
            let stat = fstat(entry.as_raw_fd())?;
            match stat.st_mode & libc::S_IFMT {
                libc::S_IFDIR => walk(&Dir(entry), depth + 1)?,
                libc::S_IFREG => finish(entry.as_raw_fd(), None, stat.st_mode & 0o555)?,
                _ => {}
            }
        }
        finish(dir.fd(), None, 0o555)
    }
    walk(&Dir::open(dir)?, 0)
}

/// Removes the tree at `path` if it exists, read-only directories included
/// (without root, a `0555` directory must be opened up before its entries
/// can go).
pub(super) fn remove(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(invalid("cannot remove a root directory"));
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    // The parent is the driver's own directory, symlinked or not.
    let parent = match Dir::open_with(parent, DIR_FLAGS & !libc::O_NOFOLLOW) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        opened => opened?,
    };
    remove_entry(&parent, &CString::new(name.as_bytes()).map_err(|_| invalid("a path with a NUL"))?, 0)
}

/// Removes the entry `name` of `parent` and, when it is a directory,
/// everything in it; a symlink is removed, never followed.
pub(super) fn remove_entry(parent: &Dir, name: &CStr, depth: usize) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    match parent.child(name) {
        Ok(dir) => {
            let mode = fstat(dir.fd())?.st_mode & 0o777;
            if mode & 0o700 != 0o700 {
                finish(dir.fd(), None, mode | 0o700)?;
            }
            for entry in dir.entries()? {
                remove_entry(&dir, &entry, depth + 1)?;
            }
            unlink(parent, name, libc::AT_REMOVEDIR)
        }
        // Not a directory (a symlink is removed, never followed).
        Err(error) if matches!(error.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => unlink(parent, name, 0),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(error) => Err(error),
    }
}

pub(super) fn unlink(parent: &Dir, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    match check(unsafe { libc::unlinkat(parent.fd(), name.as_ptr(), flags) }) {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        done => done.map(drop),
    }
}

/// An open directory (never a symlink to one).
#[derive(Debug)]
pub(super) struct Dir(pub(super) OwnedFd);

impl Dir {
    /// The directory at `path`. Only its last component is opened with
    /// `O_NOFOLLOW`: the parents are the driver's own directories.
    pub(super) fn open(path: &Path) -> io::Result<Dir> {
        Dir::open_with(path, DIR_FLAGS)
    }

    fn open_with(path: &Path, flags: libc::c_int) -> io::Result<Dir> {
        let path = c_path(path)?;
        // SAFETY: a valid NUL-terminated path.
        let fd = check(unsafe { libc::open(path.as_ptr(), flags) })?;
        // SAFETY: open returned a fresh descriptor that nothing else owns.
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// The subdirectory `name`; ENOTDIR or ELOOP when it is not one.
    pub(super) fn child(&self, name: &CStr) -> io::Result<Dir> {
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(self.fd(), name.as_ptr(), DIR_FLAGS) })?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The entry `name` opened for reading; ELOOP when it is a symlink.
    pub(super) fn open_entry(&self, name: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(self.fd(), name.as_ptr(), ENTRY_FLAGS) })?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The entry `name` itself (a symlink is not followed); `None` when
    /// there is none.
    pub(super) fn stat_at(&self, name: &CStr) -> io::Result<Option<libc::stat>> {
        // SAFETY: an all-zero stat is a valid value; fstatat fills it.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name and a stat to write to.
        match check(unsafe { libc::fstatat(self.fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) }) {
            Ok(_) => Ok(Some(stat)),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// A new file `name`, opened for writing: never over an entry, never
    /// through a symlink, `0600` until its maker gives it its mode.
    pub(super) fn create_file(&self, name: &CStr) -> io::Result<File> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(self.fd(), name.as_ptr(), flags, 0o600) })?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// What the symlink `name` holds, as written (its target is never opened).
    pub(super) fn read_link(&self, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: the buffer is as long as we say; readlinkat reads the
        // link itself, never its target.
        let len = unsafe { libc::readlinkat(self.fd(), name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
        let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
        buffer.truncate(len);
        Ok(buffer)
    }

    /// The names in the directory, without `.` and `..`.
    pub(super) fn entries(&self) -> io::Result<Vec<CString>> {
        self.entries_up_to(usize::MAX).map(|(names, _)| names)
    }

    /// At most `max` of the names in the directory, and whether they are
    /// all: a directory of millions of names is not read to its end.
    pub(super) fn entries_up_to(&self, max: usize) -> io::Result<(Vec<CString>, bool)> {
        // SAFETY: fcntl on a valid descriptor; the duplicate is handed to
        // fdopendir, which owns it from then on (closedir closes it).
        let dup = check(unsafe { libc::fcntl(self.fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: dup is a valid directory descriptor.
        let stream = unsafe { libc::fdopendir(dup) };
        if stream.is_null() {
            let error = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so dup is still ours to close.
            unsafe { libc::close(dup) };
            return Err(error);
        }
        let mut names = Vec::new();
        let mut complete = true;
        // SAFETY: stream is a valid DIR*, used by this thread only and
        // closed exactly once below; every dirent is read before the next
        // readdir call. errno is cleared so an end and an error differ.
        let result = unsafe {
            // The duplicate shares the offset: start from the beginning.
            libc::rewinddir(stream);
            loop {
                *libc::__errno_location() = 0;
                let entry = libc::readdir(stream);
                if entry.is_null() {
                    let errno = *libc::__errno_location();
                    break if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(errno)) };
                }
                let name = CStr::from_ptr((*entry).d_name.as_ptr());
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    if names.len() == max {
                        complete = false;
                        break Ok(());
                    }
                    names.push(name.to_owned());
                }
            }
        };
        // SAFETY: stream is valid and not used after this.
        unsafe { libc::closedir(stream) };
        result.map(|()| (names, complete))
    }
}

/// Sets the owner (when given) and then the mode of an open file, so a
/// chown cannot clear bits after they are set.
pub(super) fn finish(fd: RawFd, owner: Option<u32>, mode: libc::mode_t) -> io::Result<()> {
    if let Some(owner) = owner {
        // SAFETY: fchown on a valid descriptor.
        check(unsafe { libc::fchown(fd, owner, owner) })?;
    }
    // SAFETY: fchmod on a valid descriptor.
    check(unsafe { libc::fchmod(fd, mode) })?;
    Ok(())
}

pub(super) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value; fstat fills it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and a stat to write to.
    check(unsafe { libc::fstat(fd, &mut stat) })?;
    Ok(stat)
}

pub(super) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid("a path with a NUL"))
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.to_owned())
}

fn too_deep() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the tree is more than {MAX_DEPTH} directories deep"))
}
