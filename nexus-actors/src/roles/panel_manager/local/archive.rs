//! An uploaded tar.gz or zip that replaces a Studio volume's tree.
//!
//! The archive is unpacked into a private staging directory, every entry
//! checked on the way: its path as a request's ([`FilePath`], a leading
//! `./` aside), only files, directories and symlinks that stay inside the
//! tree (no hard links, devices or FIFOs), each name once, and the
//! [`VolumeLimits`] counted on the bytes actually unpacked, never on what
//! a header claims. Only a complete, valid tree replaces the volume's
//! entries; a refused upload leaves the volume as it was.
//!
//! When everything in the archive lies in one top directory (a folder
//! zipped as is, a GitHub download), that directory's content is the tree.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use super::super::driver::DriverError;
use super::super::volume_files::{FileError, FilePath, VolumeLimits};
use super::tree::{check, finish, fstat, remove_entry, Dir};
use super::workspace::{descend, make_dir, Usage};
use crate::platform::files::private_dir;

/// Longest symlink target an archive may hold.
const MAX_LINK: usize = 1024;

/// The archive formats taken, told by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    TarGz,
    Zip,
}

impl Format {
    fn of(bytes: &[u8]) -> Option<Format> {
        match bytes {
            [0x1f, 0x8b, ..] => Some(Format::TarGz),
            [b'P', b'K', 3, 4, ..] | [b'P', b'K', 5, 6, ..] => Some(Format::Zip),
            _ => None,
        }
    }
}

/// Replaces the entries of the volume at `volume` with the tree in
/// `archive`, unpacked first into the new directory `staging` (on the same
/// file system), which is gone afterwards. What it now holds.
pub(super) fn replace(
    volume: &Path,
    staging: &Path,
    archive: &[u8],
    limits: VolumeLimits,
) -> Result<Usage, DriverError> {
    let format = Format::of(archive)
        .ok_or_else(|| FileError::BadArchive("not a tar.gz or zip archive (told by its first bytes)".into()))?;
    let top = Dir::open(volume)?;
    let owner = fstat(top.fd())?.st_uid;
    private_dir(staging)?;
    let unpacked = Dir::open(staging).map_err(DriverError::from).and_then(|stage| {
        let mut unpacker = Unpacker { top: stage, owner, limits, usage: Usage::default() };
        match format {
            Format::TarGz => unpacker.tar_gz(archive)?,
            Format::Zip => unpacker.zip(archive)?,
        }
        let root = unpacker.single_top_dir()?;
        swap(&root, &top)?;
        Ok(unpacker.usage)
    });
    let cleaned = super::tree::remove(staging);
    let usage = unpacked?;
    cleaned?;
    Ok(usage)
}

/// Moves every entry of `from` into `to`, after removing `to`'s own.
fn swap(from: &Dir, to: &Dir) -> io::Result<()> {
    for name in to.entries()? {
        remove_entry(to, &name, 0)?;
    }
    for name in from.entries()? {
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe { libc::renameat(from.fd(), name.as_ptr(), to.fd(), name.as_ptr()) })?;
    }
    Ok(())
}

/// Writes checked entries into a staging tree and counts them.
struct Unpacker {
    top: Dir,
    owner: u32,
    limits: VolumeLimits,
    usage: Usage,
}

impl Unpacker {
    fn tar_gz(&mut self, archive: &[u8]) -> Result<(), DriverError> {
        // Headers and long names are unpacked too: capped with the rest, so
        // a small archive cannot make this read gigabytes of zeros.
        let cap = self.limits.max_bytes + self.limits.max_entries as u64 * 4096;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive).take(cap));
        for entry in tar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mode = entry.header().mode().unwrap_or(0o644);
            use tar::EntryType as T;
            match entry.header().entry_type() {
                T::Regular | T::Continuous => self.file(&name, entry, mode)?,
                T::Directory => self.dir(&name)?,
                T::Symlink => {
                    let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned());
                    self.symlink(&name, &target.unwrap_or_default())?
                }
                T::XGlobalHeader | T::XHeader => {}
                T::Link => return Err(refused(&name, "a hard link; archive the file itself")),
                other => {
                    return Err(refused(&name, &format!("a {other:?} entry; only files, directories and symlinks")))
                }
            }
        }
        Ok(())
    }

    fn zip(&mut self, archive: &[u8]) -> Result<(), DriverError> {
        let mut zip = zip::ZipArchive::new(io::Cursor::new(archive)).map_err(bad)?;
        if zip.len() > self.limits.max_entries {
            return Err(FileError::Quota { what: "entries", limit: self.limits.max_entries as u64 }.into());
        }
        for index in 0..zip.len() {
            let mut entry = zip.by_index(index).map_err(bad)?;
            let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
            if entry.is_dir() {
                self.dir(&name)?;
            } else if entry.is_symlink() {
                let mut target = String::new();
                (&mut entry).take(MAX_LINK as u64 + 1).read_to_string(&mut target).map_err(bad)?;
                self.symlink(&name, &target)?;
            } else {
                let mode = entry.unix_mode().unwrap_or(0o644);
                self.file(&name, entry, mode)?;
            }
        }
        Ok(())
    }

    /// An archive's name as a path in the tree; `None` for its top itself.
    fn path(name: &str) -> Result<Option<FilePath>, DriverError> {
        let mut rest = name.trim_end_matches('/');
        while let Some(stripped) = rest.strip_prefix("./") {
            rest = stripped;
        }
        if rest.is_empty() || rest == "." {
            return Ok(None);
        }
        FilePath::parse(rest).map(Some).map_err(|error| refused(name, &error.to_string()))
    }

    fn count(&mut self) -> Result<(), DriverError> {
        self.usage.entries += 1;
        if self.usage.entries > self.limits.max_entries {
            return Err(FileError::Quota { what: "entries", limit: self.limits.max_entries as u64 }.into());
        }
        Ok(())
    }

    fn dir(&mut self, name: &str) -> Result<(), DriverError> {
        let Some(path) = Self::path(name)? else { return Ok(()) };
        let (parent, last) = self.parent_of(name, &path)?;
        if !exists(&parent, &last)? {
            self.count()?;
            make_dir(&parent, &last, self.owner).map_err(|e| in_archive(name, e))?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mut content: impl Read, mode: u32) -> Result<(), DriverError> {
        let Some(path) = Self::path(name)? else { return Err(refused(name, "a file at the archive's top")) };
        self.count()?;
        let (parent, last) = self.parent_of(name, &path)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = check(unsafe { libc::openat(parent.fd(), last.as_ptr(), flags, 0o600) })
            .map_err(|e| in_archive(name, e))?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        let room = self.limits.max_file_bytes.min(self.limits.max_bytes - self.usage.bytes);
        let copied = io::copy(&mut (&mut content).take(room + 1), &mut file).map_err(bad)?;
        if copied > self.limits.max_file_bytes {
            let limit = self.limits.max_file_bytes;
            return Err(FileError::FileTooLarge { path: path.to_string(), bytes: copied, limit }.into());
        }
        self.usage.bytes += copied;
        if copied > room {
            return Err(FileError::Quota { what: "bytes", limit: self.limits.max_bytes }.into());
        }
        let mode = if mode & 0o100 != 0 { 0o755 } else { 0o644 };
        finish(file.as_raw_fd(), Some(self.owner), mode)?;
        Ok(())
    }

    fn symlink(&mut self, name: &str, target: &str) -> Result<(), DriverError> {
        let Some(path) = Self::path(name)? else { return Err(refused(name, "a symlink at the archive's top")) };
        if !stays_inside(&path, target) {
            return Err(refused(name, &format!("a symlink to {target:?}, outside the panel's files")));
        }
        self.count()?;
        let (parent, last) = self.parent_of(name, &path)?;
        let target = CString::new(target).map_err(|_| refused(name, "a symlink target with a NUL"))?;
        // SAFETY: valid descriptor and NUL-terminated strings.
        check(unsafe { libc::symlinkat(target.as_ptr(), parent.fd(), last.as_ptr()) })
            .map_err(|e| in_archive(name, e))?;
        let flags = libc::AT_SYMLINK_NOFOLLOW;
        // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
        check(unsafe { libc::fchownat(parent.fd(), last.as_ptr(), self.owner, self.owner, flags) })?;
        Ok(())
    }

    /// The staging directory that holds `path`, its missing parents made
    /// (and counted).
    fn parent_of(&mut self, name: &str, path: &FilePath) -> Result<(Dir, CString), DriverError> {
        let names: Vec<&str> = path.names().collect();
        let mut so_far = String::new();
        for parent in &names[..names.len() - 1] {
            so_far = if so_far.is_empty() { (*parent).to_owned() } else { format!("{so_far}/{parent}") };
            let dir_path = FilePath::parse(&so_far).map_err(|e| refused(name, &e.to_string()))?;
            let (holder, last) = descend(&self.top, &dir_path, None).map_err(|e| in_tree(name, e))?;
            if !exists(&holder, &last)? {
                self.count()?;
                make_dir(&holder, &last, self.owner).map_err(|e| in_archive(name, e))?;
            }
        }
        descend(&self.top, path, None).map_err(|e| in_tree(name, e))
    }

    /// The directory whose content is the tree: the only entry at the top
    /// when that is a directory, else the top itself.
    fn single_top_dir(&self) -> io::Result<Dir> {
        let names = self.top.entries()?;
        if let [only] = names.as_slice() {
            if let Ok(dir) = self.top.child(only) {
                return Ok(dir);
            }
        }
        Ok(Dir(self.top.0.try_clone()?))
    }
}

/// Whether `target`, a symlink at `path`, names something inside the tree
/// (relative, never climbing above the top).
fn stays_inside(path: &FilePath, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.len() > MAX_LINK || target.contains('\0') {
        return false;
    }
    let mut depth = path.names().count() as i64 - 1;
    for name in target.split('/') {
        match name {
            "" | "." => {}
            ".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fn exists(dir: &Dir, name: &CStr) -> io::Result<bool> {
    // SAFETY: an all-zero stat is a valid value; fstatat fills it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated name and a stat to write to.
    match check(unsafe { libc::fstatat(dir.fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(error) => Err(error),
    }
}

fn bad(error: impl std::fmt::Display) -> DriverError {
    FileError::BadArchive(format!("unreadable: {error}")).into()
}

fn refused(name: &str, why: &str) -> DriverError {
    FileError::BadArchive(format!("{name:?}: {why}")).into()
}

/// A staging write that failed because of what the archive holds.
fn in_archive(name: &str, error: io::Error) -> DriverError {
    match error.raw_os_error() {
        Some(libc::EEXIST) => refused(name, "appears twice, or beside a directory of that name"),
        Some(libc::ELOOP | libc::ENOTDIR) => refused(name, "lies below a symlink or a file of the archive"),
        _ => error.into(),
    }
}

/// A walk of the staging tree that failed because of what the archive holds.
fn in_tree(name: &str, error: DriverError) -> DriverError {
    match error {
        DriverError::File(FileError::WrongKind { .. }) => {
            refused(name, "lies below a symlink or a file of the archive")
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_may_point_within_the_tree_only() {
        let at = |p: &str| FilePath::parse(p).expect("a path");
        assert!(stays_inside(&at("a"), "b"));
        assert!(stays_inside(&at("d/a"), "../b"));
        assert!(stays_inside(&at("d/e/a"), "../../b/./c"));
        for (path, target) in
            [("a", "../b"), ("d/a", "../../b"), ("a", "/etc/passwd"), ("a", ""), ("d/a", "x/../../..")]
        {
            assert!(!stays_inside(&at(path), target), "{path} -> {target}");
        }
    }

    #[test]
    fn formats_are_told_by_their_first_bytes() {
        assert_eq!(Format::of(&[0x1f, 0x8b, 8]), Some(Format::TarGz));
        assert_eq!(Format::of(b"PK\x03\x04rest"), Some(Format::Zip));
        assert_eq!(Format::of(b"PK\x05\x06"), Some(Format::Zip));
        assert_eq!(Format::of(b"{\"json\": true}"), None);
        assert_eq!(Format::of(b""), None);
    }
}
