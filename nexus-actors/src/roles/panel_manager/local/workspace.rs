//! A Studio volume edited through the API: listing, reading, saving and
//! deleting one file, walked by descriptor ([`super::tree`]) so no symlink
//! on the way is ever followed, held to the [`VolumeLimits`].
//!
//! The volume is a tree the panel's own code writes at the same time, so
//! nothing here trusts what a name was a moment ago: a symlink or a
//! special file where a file is read or saved is refused; a save writes a
//! new file beside the old one and renames it over, so a hard link the
//! panel planted there is replaced, never written through; a hard link to
//! a file from elsewhere is never read. What is created is given to the
//! volume's owner (the panel's uid once a Studio instance ran).
//!
//! It decides nothing about who may edit which panel: the API checked that.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::super::driver::DriverError;
use super::super::volume_files::{FileEntry, FileError, FileKind, FileList, FilePath, VolumeLimits};
use super::tree::{check, finish, foreign_link, fstat, remove_entry, Dir};

/// Files and directories made here: readable by everyone who may enter the
/// volume (only its owner: the top is `0700`).
const FILE_MODE: libc::mode_t = 0o644;
const DIR_MODE: libc::mode_t = 0o755;

/// Entries and bytes counted in a volume.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Usage {
    /// Files, directories and symlinks.
    pub entries: usize,
    /// Bytes in files.
    pub bytes: u64,
}

/// Every entry of the volume at `volume`, at most `limits.max_entries`.
pub(super) fn list(volume: &Path, limits: VolumeLimits) -> Result<FileList, DriverError> {
    let top = Dir::open(volume)?;
    let mut entries = Vec::new();
    let mut usage = Usage::default();
    let complete = walk(&top, "", 0, limits.max_entries, &mut usage, &mut |entry| entries.push(entry))?;
    Ok(FileList { entries, bytes: usage.bytes, truncated: !complete, limits })
}

/// What the volume holds, counted up to one entry past `max_entries`
/// (more need not be counted to refuse a write).
pub(super) fn usage(top: &Dir, max_entries: usize) -> io::Result<Usage> {
    let mut usage = Usage::default();
    walk(top, "", 0, max_entries.saturating_add(1), &mut usage, &mut |_| {})?;
    Ok(usage)
}

/// Visits the entries below `dir` (named from `prefix`), parents before
/// children, in name order, until `max` were seen: false when it stopped
/// there. Every name counts, sockets and FIFOs the panel made included
/// (they are not shown), and no directory is read past the budget, so a
/// panel cannot make a listing or a save's count arbitrarily expensive.
fn walk(
    dir: &Dir,
    prefix: &str,
    depth: usize,
    max: usize,
    usage: &mut Usage,
    visit: &mut dyn FnMut(FileEntry),
) -> io::Result<bool> {
    if depth > super::super::volume_files::MAX_DEPTH {
        return Ok(false);
    }
    let (mut names, complete) = dir.entries_up_to(max.saturating_sub(usage.entries))?;
    names.sort();
    for name in names {
        let Some(stat) = dir.stat_at(&name)? else { continue };
        usage.entries += 1;
        let path = format!("{prefix}{}", name.to_string_lossy());
        let (kind, size, target) = match stat.st_mode & libc::S_IFMT {
            libc::S_IFDIR => (FileKind::Dir, 0, None),
            libc::S_IFREG => (FileKind::File, stat.st_size as u64, None),
            libc::S_IFLNK => {
                let target = dir.read_link(&name).map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
                (FileKind::Symlink, target.len() as u64, Some(target))
            }
            // Sockets and FIFOs the panel made: nothing to edit.
            _ => continue,
        };
        usage.bytes = usage.bytes.saturating_add(if kind == FileKind::File { size } else { 0 });
        let executable = kind == FileKind::File && stat.st_mode & 0o100 != 0;
        visit(FileEntry { path: path.clone(), kind, size, executable, target });
        if kind == FileKind::Dir {
            // Swapped for something else since the stat: skipped.
            let Ok(child) = dir.child(&name) else { continue };
            if !walk(&child, &format!("{path}/"), depth + 1, max, usage, visit)? {
                return Ok(false);
            }
        }
    }
    Ok(complete)
}

/// The file at `path`, at most `limits.max_file_bytes` of it.
pub(super) fn read(volume: &Path, path: &FilePath, limits: VolumeLimits) -> Result<Vec<u8>, DriverError> {
    let top = Dir::open(volume)?;
    let owner = fstat(top.fd())?.st_uid;
    let (parent, name) = descend(&top, path, None)?;
    let opened = match parent.open_entry(&name) {
        Ok(fd) => File::from(fd),
        Err(error) => return Err(entry_error(path, error)),
    };
    let stat = fstat(opened.as_raw_fd())?;
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG if foreign_link(&stat, owner) => {
            return Err(wrong(path, "a hard link to a file from outside the panel's files, which is not read").into())
        }
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(wrong(path, "a directory").into()),
        _ => return Err(wrong(path, "a special file").into()),
    }
    let size = stat.st_size as u64;
    if size > limits.max_file_bytes {
        return Err(too_large(path, size, limits).into());
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // It may grow meanwhile: never more than the limit is read.
    opened.take(limits.max_file_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(too_large(path, bytes.len() as u64, limits).into());
    }
    Ok(bytes)
}

/// Saves `bytes` as the file at `path`, making missing parents: true when
/// the file is new. An existing file keeps its permission bits.
pub(super) fn write(volume: &Path, path: &FilePath, bytes: &[u8], limits: VolumeLimits) -> Result<bool, DriverError> {
    let size = bytes.len() as u64;
    if size > limits.max_file_bytes {
        return Err(too_large(path, size, limits).into());
    }
    let top = Dir::open(volume)?;
    let owner = fstat(top.fd())?.st_uid;
    let used = usage(&top, limits.max_entries)?;
    let names: Vec<&str> = path.names().collect();
    let missing = missing_parents(&top, path, &names)?;
    let (old_size, old_mode) = match missing {
        0 => {
            let (parent, name) = descend(&top, path, None)?;
            match parent.stat_at(&name)? {
                None => (None, FILE_MODE),
                Some(stat) => match stat.st_mode & libc::S_IFMT {
                    libc::S_IFREG => (Some(stat.st_size as u64), stat.st_mode & 0o777),
                    libc::S_IFDIR => return Err(wrong(path, "a directory").into()),
                    libc::S_IFLNK => return Err(wrong(path, "a symlink, which is never written through").into()),
                    _ => return Err(wrong(path, "a special file").into()),
                },
            }
        }
        _ => (None, FILE_MODE),
    };
    let new_entries = missing + usize::from(old_size.is_none());
    if used.entries + new_entries > limits.max_entries {
        return Err(FileError::Quota { what: "entries", limit: limits.max_entries as u64 }.into());
    }
    if (used.bytes - old_size.unwrap_or(0).min(used.bytes)).saturating_add(size) > limits.max_bytes {
        return Err(FileError::Quota { what: "bytes", limit: limits.max_bytes }.into());
    }
    let (parent, name) = descend(&top, path, Some(owner))?;
    save(&parent, &name, bytes, owner, old_mode)?;
    Ok(old_size.is_none())
}

/// Deletes the file, symlink or directory (with everything in it) at `path`.
pub(super) fn delete(volume: &Path, path: &FilePath) -> Result<(), DriverError> {
    let top = Dir::open(volume)?;
    let (parent, name) = descend(&top, path, None)?;
    if parent.stat_at(&name)?.is_none() {
        return Err(FileError::NotFound(path.to_string()).into());
    }
    remove_entry(&parent, &name, 0)?;
    Ok(())
}

/// Writes a new file beside `name` in `parent` and renames it over `name`.
pub(super) fn save(parent: &Dir, name: &CStr, bytes: &[u8], owner: u32, mode: libc::mode_t) -> io::Result<()> {
    let temporary = CString::new(format!(".nexus-save-{:016x}", rand::random::<u64>())).map_err(io::Error::other)?;
    let mut file = parent.create_file(&temporary)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| finish(file.as_raw_fd(), Some(owner), mode & 0o777))
        .and_then(|()| file.sync_all())
        // SAFETY: valid descriptors and NUL-terminated names.
        .and_then(|()| {
            check(unsafe { libc::renameat(parent.fd(), temporary.as_ptr(), parent.fd(), name.as_ptr()) }).map(drop)
        });
    if written.is_err() {
        // SAFETY: valid descriptor and NUL-terminated name.
        unsafe { libc::unlinkat(parent.fd(), temporary.as_ptr(), 0) };
    }
    written
}

/// The directory holding `path`'s last name, and that name. With `create`
/// (the owner to give them), missing directories on the way are made.
pub(super) fn descend(top: &Dir, path: &FilePath, create: Option<u32>) -> Result<(Dir, CString), DriverError> {
    let names: Vec<&str> = path.names().collect();
    let (last, parents) = names.split_last().ok_or_else(|| FileError::NotFound(path.to_string()))?;
    let mut dir = Dir(top.0.try_clone()?);
    for name in parents {
        let name = c_name(name)?;
        dir = match (dir.child(&name), create) {
            (Ok(child), _) => child,
            (Err(error), Some(owner)) if error.raw_os_error() == Some(libc::ENOENT) => {
                make_dir(&dir, &name, owner)?;
                dir.child(&name)?
            }
            (Err(error), _) => return Err(entry_error(path, error)),
        };
    }
    Ok((dir, c_name(last)?))
}

/// Makes the directory `name` in `parent`, given to `owner`; one that
/// exists already is fine.
pub(super) fn make_dir(parent: &Dir, name: &CStr, owner: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    match check(unsafe { libc::mkdirat(parent.fd(), name.as_ptr(), 0o700) }) {
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
        made => made?,
    };
    let child = parent.child(name)?;
    finish(child.fd(), Some(owner), DIR_MODE)
}

/// How many of `path`'s parent directories do not exist yet.
fn missing_parents(top: &Dir, path: &FilePath, names: &[&str]) -> Result<usize, DriverError> {
    let mut dir = Dir(top.0.try_clone()?);
    let parents = names.len().saturating_sub(1);
    for (at, name) in names[..parents].iter().enumerate() {
        dir = match dir.child(&c_name(name)?) {
            Ok(child) => child,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(parents - at),
            Err(error) => return Err(entry_error(path, error)),
        };
    }
    Ok(0)
}

fn c_name(name: &str) -> Result<CString, DriverError> {
    // FilePath refused NULs already.
    CString::new(name).map_err(|_| DriverError::Io(io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a name")))
}

/// What an `openat` failure on the way to or at `path` means to the user.
fn entry_error(path: &FilePath, error: io::Error) -> DriverError {
    match error.raw_os_error() {
        Some(libc::ENOENT) => FileError::NotFound(path.to_string()).into(),
        Some(libc::ELOOP) => wrong(path, "a symlink on the way or at the end; symlinks are never followed").into(),
        Some(libc::ENOTDIR) => wrong(path, "a file on the way where a directory should be").into(),
        Some(libc::ENXIO) => wrong(path, "a special file").into(),
        _ => error.into(),
    }
}

fn wrong(path: &FilePath, why: &'static str) -> FileError {
    FileError::WrongKind { path: path.to_string(), why }
}

fn too_large(path: &FilePath, bytes: u64, limits: VolumeLimits) -> FileError {
    FileError::FileTooLarge { path: path.to_string(), bytes, limit: limits.max_file_bytes }
}
