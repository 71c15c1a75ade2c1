//! The snapshots' object store: every file of every snapshot, stored once
//! per content and mode under `<sha256>-<mode>`, root's and read-only.
//! A snapshot's files are hard links to their objects, so an unchanged
//! file costs a deploy a read and a link, not a copy; an object no
//! snapshot links to any more (its link count back to one) is deleted.
//!
//! It stores, links and collects; which snapshots exist is the driver's.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};

use sha2::{Digest, Sha256};

use super::tree::{check, finish, unlink, Dir};

/// Links `file` (open for reading, with permission bits `mode`) as `name`
/// in `target`, through the object of its content and mode, stored first
/// when it is new.
pub(super) fn link(store: &Dir, mut file: File, target: &Dir, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    let mut key = object_name(&hash(&mut file, None)?, mode)?;
    if store.stat_at(&key)?.is_none() {
        file.rewind()?;
        // The panel may change the file meanwhile: what is stored is named
        // by what was read while storing it.
        key = store_object(store, &mut file, mode)?;
    }
    match link_at(store, &key, target, name) {
        // The object has as many links as the file system allows (one
        // content in very many files): this file is a copy of its own, so
        // no panel can use the limit up for another.
        Err(error) if error.raw_os_error() == Some(libc::EMLINK) => copy_object(store, &key, target, name, mode),
        linked => linked,
    }
}

fn copy_object(store: &Dir, key: &CStr, target: &Dir, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and NUL-terminated name.
    let fd = check(unsafe { libc::openat(store.fd(), key.as_ptr(), flags) })?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    let mut object = unsafe { File::from_raw_fd(fd) };
    let mut copy = target.create_file(name)?;
    io::copy(&mut object, &mut copy)?;
    finish(copy.as_raw_fd(), None, mode)
}

/// Deletes the objects no snapshot links to; how many went.
pub(super) fn collect(store: &Dir) -> io::Result<usize> {
    let mut deleted = 0;
    for name in store.entries()? {
        let Ok(Some(stat)) = store.stat_at(&name) else { continue };
        if stat.st_nlink <= 1 {
            unlink(store, &name, 0)?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The SHA-256 of what is read from `file` to its end, written to `copy`
/// on the way when given.
fn hash(file: &mut File, mut copy: Option<&mut File>) -> io::Result<Vec<u8>> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hasher.finalize().to_vec());
        }
        hasher.update(&buffer[..read]);
        if let Some(copy) = copy.as_deref_mut() {
            copy.write_all(&buffer[..read])?;
        }
    }
}

/// Copies `file` into a new object and names it by what was copied.
fn store_object(store: &Dir, file: &mut File, mode: libc::mode_t) -> io::Result<CString> {
    let temporary = CString::new(format!(".in-{:016x}", rand::random::<u64>())).map_err(io::Error::other)?;
    let mut object = store.create_file(&temporary)?;
    let stored = (|| {
        let digest = hash(file, Some(&mut object))?;
        finish(object.as_raw_fd(), None, mode)?;
        let key = object_name(&digest, mode)?;
        if store.stat_at(&key)?.is_some() {
            unlink(store, &temporary, 0)?;
        } else {
            // SAFETY: valid descriptors and NUL-terminated names.
            check(unsafe { libc::renameat(store.fd(), temporary.as_ptr(), store.fd(), key.as_ptr()) })?;
        }
        Ok(key)
    })();
    if stored.is_err() {
        let _ = unlink(store, &temporary, 0);
    }
    stored
}

fn object_name(digest: &[u8], mode: libc::mode_t) -> io::Result<CString> {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    CString::new(format!("{hex}-{:03o}", mode & 0o777)).map_err(io::Error::other)
}

fn link_at(store: &Dir, key: &CStr, target: &Dir, name: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names; no flags: the
    // object itself is linked (it is never a symlink).
    check(unsafe { libc::linkat(store.fd(), key.as_ptr(), target.fd(), name.as_ptr(), 0) }).map(drop)
}
