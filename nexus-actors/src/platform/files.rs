//! Files that hold secrets or private data: created with their final
//! permissions from the first byte, never widened afterwards.
//!
//! A secret file is written to a temporary file opened `0600` with
//! `O_EXCL` beside it and renamed over the target, so no reader ever sees a
//! partly written or world-readable secret. Data directories are `0700`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) if missing and makes it `0700`, so
/// that other local users, panel uids among them, cannot read inside.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    dir_with_mode(dir, 0o700)
}

/// Creates `dir` if missing and makes it `0711`: others may pass through
/// to what lies below (a panel's own volume) but not list or read it.
pub fn passable_dir(dir: &Path) -> std::io::Result<()> {
    dir_with_mode(dir, 0o711)
}

/// Creates `dir` with `mode`, its missing parents as `create_dir_all`
/// makes them: a private directory must not make its parents private
/// too, or a panel's uid could no longer pass through to its volume
/// beside it.
fn dir_with_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        created => created?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Writes `bytes` to `path`, readable and writable by the owner only,
/// atomically: the file is complete and `0600` from the moment it exists.
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("secret");
    let temporary = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nexus-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn secrets_are_0600_and_directories_0700_even_under_a_wide_umask() {
        let dir = scratch("modes");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        private_dir(&dir.join("data")).expect("dir");
        write_secret(&dir.join("data/secret"), b"s3cret").expect("secret");
        unsafe { libc::umask(old) };
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("data")), 0o700);
        private_dir(&dir.join("fresh/redis")).expect("nested");
        assert_eq!(mode(&dir.join("fresh/redis")), 0o700);
        assert_ne!(mode(&dir.join("fresh")), 0o700, "parents stay passable for a panel's volume beside");
        assert_eq!(mode(&dir.join("data/secret")), 0o600);
        assert_eq!(std::fs::read(dir.join("data/secret")).expect("read"), b"s3cret");
        write_secret(&dir.join("data/secret"), b"again").expect("overwrite");
        assert_eq!(std::fs::read(dir.join("data/secret")).expect("read"), b"again");
        let leftovers = std::fs::read_dir(dir.join("data")).expect("list").count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
