//! Replacing a volume's entries with a staged tree, all or nothing: the
//! old entries move aside, the new ones move in (never over a name the
//! panel's code made meanwhile), and on any failure everything moves back.
//! Only renames within one file system: nothing is copied, and the volume
//! directory itself (which a running instance has open) stays the same.

use std::ffi::{CStr, CString};
use std::io;

use super::super::driver::DriverError;
use super::super::volume_files::FileError;
use super::tree::{check, Dir};

/// Moves `volume`'s entries into `old` and `new`'s into `volume`. When a
/// rename fails (the panel's code made a name there meanwhile), what moved
/// goes back and the volume is as it was: [`FileError::Busy`].
pub(super) fn replace_entries(volume: &Dir, new: &Dir, old: &Dir) -> Result<(), DriverError> {
    let mut moved_out = Vec::new();
    for name in volume.entries()? {
        if let Err(error) = rename(volume, &name, old) {
            put_back(old, volume, &moved_out);
            return Err(changed_meanwhile(error));
        }
        moved_out.push(name);
    }
    let mut moved_in = Vec::new();
    for name in new.entries()? {
        if let Err(error) = rename(new, &name, volume) {
            put_back(volume, new, &moved_in);
            put_back(old, volume, &moved_out);
            return Err(changed_meanwhile(error));
        }
        moved_in.push(name);
    }
    Ok(())
}

/// Moves `name` from `from` to `to`, never over an entry there.
fn rename(from: &Dir, name: &CStr, to: &Dir) -> io::Result<()> {
    // SAFETY: valid descriptors and NUL-terminated names.
    check(unsafe { libc::renameat2(from.fd(), name.as_ptr(), to.fd(), name.as_ptr(), libc::RENAME_NOREPLACE) })
        .map(drop)
}

fn put_back(from: &Dir, to: &Dir, names: &[CString]) {
    for name in names {
        if let Err(error) = rename(from, name, to) {
            // The panel's code took the name meanwhile: its entry stays,
            // and ours goes with the staging directory.
            tracing::warn!(name = %name.to_string_lossy(), %error, "an entry could not be moved back after a failed upload");
        }
    }
}

fn changed_meanwhile(error: io::Error) -> DriverError {
    match error.raw_os_error() {
        Some(libc::EEXIST | libc::ENOTEMPTY | libc::ENOENT) => FileError::Busy.into(),
        _ => error.into(),
    }
}
