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
//! Symlinks are checked once that tree is known: resolved from where they
//! sit, through real directories only, they must stay inside it.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::super::driver::DriverError;
use super::super::volume_files::{FileError, FilePath, VolumeLimits};
use super::tree::{check, finish, fstat, Dir};
use super::workspace::{descend, make_dir, Usage};
use crate::platform::files::private_dir;

/// Longest symlink target an archive may hold.
const MAX_LINK: usize = 1024;
/// Longest path an archive may name (a request's limit).
const MAX_PATH: usize = super::super::volume_files::MAX_PATH;

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
    let replaced = Dir::open(staging).map_err(DriverError::from).and_then(|stage| {
        if fstat(stage.fd())?.st_dev != fstat(top.fd())?.st_dev {
            return Err(io::Error::other("the volume is not on the file system of its staging directory").into());
        }
        make_dir(&stage, c"new", 0)?;
        make_dir(&stage, c"old", 0)?;
        let mut unpacker =
            Unpacker { top: stage.child(c"new")?, owner, limits, usage: Usage::default(), links: Vec::new() };
        match format {
            Format::TarGz => unpacker.tar_gz(archive)?,
            Format::Zip => unpacker.zip(archive)?,
        }
        if unpacker.usage.entries == 0 {
            return Err(FileError::BadArchive("it holds no files; delete files one by one instead".into()).into());
        }
        let (root, prefix) = unpacker.single_top_dir()?;
        unpacker.check_links(&root, prefix.as_deref())?;
        super::swap::replace_entries(&top, &root, &stage.child(c"old")?)?;
        // A start may have given the volume to the panel meanwhile.
        let now = fstat(top.fd())?.st_uid;
        if now != owner {
            super::tree::chown(volume, now, 0o700)?;
        }
        Ok(unpacker.usage)
    });
    let cleaned = super::tree::remove(staging);
    let usage = replaced?;
    cleaned?;
    Ok(usage)
}

/// Writes checked entries into a staging tree and counts them.
struct Unpacker {
    top: Dir,
    owner: u32,
    limits: VolumeLimits,
    usage: Usage,
    /// Every symlink made (its path and target), checked once the tree's
    /// top is known.
    links: Vec<(String, String)>,
}

impl Unpacker {
    fn tar_gz(&mut self, archive: &[u8]) -> Result<(), DriverError> {
        // Headers and long names are unpacked too: capped with the rest, so
        // a small archive cannot make this read gigabytes of zeros.
        let cap = self.limits.max_bytes.saturating_add(self.limits.max_entries as u64 * 1024);
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive).take(cap));
        for entry in tar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let name = checked_name(&entry.path_bytes(), MAX_PATH)?;
            let mode = entry.header().mode().unwrap_or(0o644);
            use tar::EntryType as T;
            match entry.header().entry_type() {
                T::Regular | T::Continuous => self.file(&name, entry, mode)?,
                T::Directory => self.dir(&name)?,
                T::Symlink => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    let target = checked_name(&target, MAX_LINK)?;
                    self.symlink(&name, &target)?
                }
                T::XGlobalHeader | T::XHeader => {}
                T::Link => return Err(refused(&name, "a hard link; archive the file itself")),
                other => {
                    return Err(refused(&name, &format!("a {other:?} entry; only files, directories and symlinks")))
                }
            }
        }
        // To its end: the gzip trailer's checksum is checked there, and an
        // archive cut at the cap is not taken for a whole one.
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(bad)?;
        if rest.limit() == 0 {
            return Err(FileError::Quota { what: "bytes", limit: self.limits.max_bytes }.into());
        }
        Ok(())
    }

    fn zip(&mut self, archive: &[u8]) -> Result<(), DriverError> {
        // Counted before the central directory is parsed (and held in memory).
        if zip_entries(archive).is_some_and(|n| n > self.limits.max_entries) {
            return Err(FileError::Quota { what: "entries", limit: self.limits.max_entries as u64 }.into());
        }
        let mut zip = zip::ZipArchive::new(io::Cursor::new(archive)).map_err(bad)?;
        if zip.len() > self.limits.max_entries {
            return Err(FileError::Quota { what: "entries", limit: self.limits.max_entries as u64 }.into());
        }
        for index in 0..zip.len() {
            let mut entry = zip.by_index(index).map_err(bad)?;
            let name = checked_name(entry.name_raw(), MAX_PATH)?;
            if entry.is_dir() {
                self.dir(&name)?;
            } else if entry.is_symlink() {
                let mut target = String::new();
                (&mut entry).take(MAX_LINK as u64 + 1).read_to_string(&mut target).map_err(bad)?;
                let target = checked_name(target.as_bytes(), MAX_LINK)?;
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
        if parent.stat_at(&last)?.is_none() {
            self.count()?;
            make_dir(&parent, &last, self.owner).map_err(|e| in_archive(name, e))?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mut content: impl Read, mode: u32) -> Result<(), DriverError> {
        let Some(path) = Self::path(name)? else { return Err(refused(name, "a file at the archive's top")) };
        self.count()?;
        let (parent, last) = self.parent_of(name, &path)?;
        let mut file = parent.create_file(&last).map_err(|e| in_archive(name, e))?;
        let room = self.limits.max_file_bytes.min(self.limits.max_bytes - self.usage.bytes);
        // A full volume is not a bad archive (the caller says what it is).
        let copied = io::copy(&mut (&mut content).take(room + 1), &mut file).map_err(|e| {
            if super::disks::is_no_space(&e) {
                e.into()
            } else {
                bad(e)
            }
        })?;
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
        if target.is_empty() || target.starts_with('/') {
            return Err(refused(name, &format!("a symlink to {target:?}, outside the panel's files")));
        }
        self.count()?;
        let (parent, last) = self.parent_of(name, &path)?;
        let c_target = CString::new(target).map_err(|_| refused(name, "a symlink target with a NUL"))?;
        // SAFETY: valid descriptor and NUL-terminated strings.
        check(unsafe { libc::symlinkat(c_target.as_ptr(), parent.fd(), last.as_ptr()) })
            .map_err(|e| in_archive(name, e))?;
        let flags = libc::AT_SYMLINK_NOFOLLOW;
        // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
        check(unsafe { libc::fchownat(parent.fd(), last.as_ptr(), self.owner, self.owner, flags) })?;
        self.links.push((path.to_string(), target.to_owned()));
        Ok(())
    }

    /// Refuses any symlink that, resolved from where it sits below `root`
    /// (`prefix` is the top directory stripped off the archive's paths),
    /// leaves the tree or passes through another symlink.
    fn check_links(&self, root: &Dir, prefix: Option<&str>) -> Result<(), DriverError> {
        for (path, target) in &self.links {
            let inside = match prefix {
                Some(prefix) => path.strip_prefix(prefix).and_then(|p| p.strip_prefix('/')),
                None => Some(path.as_str()),
            };
            if !inside.is_some_and(|inside| resolves_inside(root, inside, target)) {
                return Err(refused(path, &format!("a symlink to {target:?}, outside the panel's files")));
            }
        }
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
            if holder.stat_at(&last)?.is_none() {
                self.count()?;
                make_dir(&holder, &last, self.owner).map_err(|e| in_archive(name, e))?;
            }
        }
        descend(&self.top, path, None).map_err(|e| in_tree(name, e))
    }

    /// The directory whose content is the tree, and the name it strips:
    /// the only entry at the top when that is a directory, else the top.
    fn single_top_dir(&self) -> io::Result<(Dir, Option<String>)> {
        let names = self.top.entries()?;
        if let [only] = names.as_slice() {
            if let Ok(dir) = self.top.child(only) {
                return Ok((dir, Some(only.to_string_lossy().into_owned())));
            }
        }
        Ok((Dir(self.top.0.try_clone()?), None))
    }
}

/// Whether `target`, a symlink at `path` below `root`, resolves inside
/// the tree, followed step by step as the kernel would: `..` never climbs
/// above `root`, and every directory passed through is a real one, not
/// another symlink (whose target this walk would not see). A target that
/// meets a missing name or a file on the way resolves to nothing: harmless.
fn resolves_inside(root: &Dir, path: &str, target: &str) -> bool {
    let Ok(top) = root.0.try_clone() else { return false };
    let mut dirs = vec![Dir(top)];
    let child = |dirs: &[Dir], name: &str| {
        let name = CString::new(name).map_err(io::Error::other)?;
        dirs.last().ok_or_else(|| io::Error::other("no directory"))?.child(&name)
    };
    // The link's parents: real directories, made by the unpacking.
    let mut parents: Vec<&str> = path.split('/').collect();
    parents.pop();
    for name in parents {
        match child(&dirs, name) {
            Ok(dir) => dirs.push(dir),
            Err(_) => return false,
        }
    }
    let names: Vec<&str> = target.split('/').filter(|n| !n.is_empty() && *n != ".").collect();
    let Some((last, through)) = names.split_last() else { return true };
    for name in through {
        if *name == ".." {
            if dirs.len() == 1 {
                return false;
            }
            dirs.pop();
            continue;
        }
        match child(&dirs, name) {
            Ok(dir) => dirs.push(dir),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return true,
            // Not a directory: a file ends the resolution (harmlessly), a
            // symlink (ENOTDIR too, under O_DIRECTORY) is refused.
            Err(error) if error.raw_os_error() == Some(libc::ENOTDIR) => {
                let Ok(name) = CString::new(*name) else { return false };
                let stat = dirs.last().and_then(|dir| dir.stat_at(&name).ok().flatten());
                return stat.is_some_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFREG);
            }
            Err(_) => return false,
        }
    }
    // The last name may be anything (a file, a directory, a symlink that is
    // checked on its own, nothing), but `..` must not climb out either.
    *last != ".." || dirs.len() > 1
}

/// How many entries a zip's end-of-central-directory record says it
/// holds; `None` when the record is not found (the parser then refuses it).
fn zip_entries(archive: &[u8]) -> Option<usize> {
    const RECORD: usize = 22;
    let earliest = archive.len().saturating_sub(RECORD + u16::MAX as usize);
    let at =
        (earliest..=archive.len().checked_sub(RECORD)?).rev().find(|&at| archive[at..].starts_with(b"PK\x05\x06"))?;
    Some(u16::from_le_bytes([archive[at + 10], archive[at + 11]]) as usize)
}

/// An archive's name or link target as text, refused unread past `max`
/// bytes so a long name cannot grow in memory or in the error message.
fn checked_name(bytes: &[u8], max: usize) -> Result<String, DriverError> {
    if bytes.len() > max {
        let start = String::from_utf8_lossy(&bytes[..64.min(bytes.len())]).into_owned();
        return Err(refused(&format!("{start}…"), &format!("a name or link of {} bytes; at most {max}", bytes.len())));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn bad(error: impl std::fmt::Display) -> DriverError {
    FileError::BadArchive(format!("unreadable: {error}")).into()
}

fn refused(name: &str, why: &str) -> DriverError {
    let shown: String = name.chars().take(200).collect();
    FileError::BadArchive(format!("{shown:?}: {why}")).into()
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
    fn a_zip_is_counted_from_its_end_record() {
        let mut archive = b"PK\x03\x04 entries".to_vec();
        archive.extend_from_slice(b"PK\x05\x06\0\0\0\0\x07\0\x07\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(zip_entries(&archive), Some(7));
        assert_eq!(zip_entries(b"PK\x03\x04 no end record"), None);
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
