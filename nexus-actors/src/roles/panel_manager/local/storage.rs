//! The `local` driver's data directory: its layout and modes (see the
//! driver's documentation), Studio volumes made from templates and edited
//! through the API ([`super::workspace`], [`super::archive`]), read-only
//! snapshots taken by descriptor from a volume, and their deletion.
//!
//! A volume is the directory `volumes/<panel>/`: as root, the mount point
//! of its own capped file system ([`disks`]); its tree is `home/` in it,
//! beside (on the same file system) the staging directories of uploads.
//! A volume of the layout before that (its tree the directory itself) is
//! moved into `home/` when first opened.
//!
//! It runs nothing; the driver decides when these are made. Changes to one
//! panel's files through the API go one at a time: a second is refused
//! ([`FileError::Busy`]) rather than queued. Uploads unpack two at a time
//! node-wide (an unpacking holds a buffer or a long name in memory); the
//! rest wait their turn. What a crash left of uploads and volumes being made
//! is swept when the driver first lays out its directories.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::super::driver::{DriverError, Snapshot, Volume};
use super::super::templates;
use super::super::volume_files::{FileError, FileList, FilePath};
use super::files::{blocking, check_id, copy_tree, last_version, make_read_only, remove_tree};
use super::tree::{self, CopyAs};
use super::LocalDriver;
use super::{archive, disks, objects, workspace};
use crate::platform::files::{passable_dir, private_dir};

/// The snapshots' object store, beside the panels' snapshot directories
/// (a dot name: never a panel id).
const OBJECTS: &str = ".objects";
/// How long a deploy waits for a change to the panel's files to finish.
const EDIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Snapshots kept per panel: the newest, for a restarting App instance of
/// an earlier deploy still draining, and to look back.
const KEEP_SNAPSHOTS: u64 = 5;

/// Deletes a panel's snapshots older than the last [`KEEP_SNAPSHOTS`] up
/// to `newest` in `dir`, then the objects no snapshot links to any more.
fn prune(dir: &std::path::Path, newest: u64, store: &std::path::Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let version = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
        if version.is_some_and(|v| v + KEEP_SNAPSHOTS <= newest) {
            remove_tree(&entry.path())?;
        }
    }
    let deleted = objects::collect(&tree::Dir::open(store)?)?;
    tracing::debug!(deleted, "snapshot objects collected");
    Ok(())
}

/// Infixes of the dot names beside a volume's tree: an upload's staging
/// directory, a tree being made.
const STAGING: &str = ".upload-";
const MAKING: &str = ".new-";
/// A volume's tree, in its directory.
const HOME: &str = "home";
/// Beside it: says the directory is a volume of this layout.
const MARKER: &str = ".nexus-volume";
/// The volumes' disk images, beside them (a dot name: never a panel id).
const DISKS: &str = ".disks";

/// Removes what a crash left of uploads and trees being made in `dir`.
fn sweep_unfinished(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(STAGING) || name.contains(MAKING)) {
            match remove_tree(&entry.path()) {
                Ok(()) => tracing::info!(name, "an unfinished upload or volume removed"),
                Err(error) => tracing::warn!(name, %error, "an unfinished upload or volume could not be removed"),
            }
        }
    }
}

/// One panel's files being changed through the API; dropped, they are
/// free. It moves into the blocking work, so a request dropped midway (its
/// client gone) keeps the panel held until the work is done.
pub(super) struct Editing {
    editing: Arc<Mutex<HashSet<String>>>,
    panel: String,
}

impl Drop for Editing {
    fn drop(&mut self) {
        self.editing.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.panel);
    }
}

impl LocalDriver {
    /// Gives the data directories their modes (module documentation),
    /// once per driver; an older layout's wider modes are narrowed.
    pub(super) async fn layout(&self) -> Result<(), DriverError> {
        let data = self.config.data_dir.clone();
        self.layout
            .get_or_try_init(|| {
                blocking(move || {
                    passable_dir(&data)?;
                    passable_dir(&data.join("volumes"))?;
                    private_dir(&data.join("volumes").join(DISKS))?;
                    passable_dir(&data.join("scratch"))?;
                    private_dir(&data.join("snapshots"))?;
                    private_dir(&data.join("instances"))?;
                    sweep_unfinished(&data.join("volumes"));
                    tree::warn_if_hard_links_unprotected();
                    Ok(())
                })
            })
            .await?;
        Ok(())
    }

    /// Where volumes live; the staging directories of uploads and the
    /// volumes being made from templates sit beside them (dot names).
    pub(super) fn volumes(&self) -> PathBuf {
        self.config.data_dir.join("volumes")
    }

    /// The snapshots' object store ([`objects`]).
    fn object_store(&self) -> PathBuf {
        self.config.data_dir.join("snapshots").join(OBJECTS)
    }

    pub(super) fn snapshots_of(&self, panel: &str) -> PathBuf {
        self.config.data_dir.join("snapshots").join(panel)
    }

    /// The panel's volume, made from `source` when it has none, and ready
    /// to use: mounted, and swept of what a crash left in it, the first
    /// time this driver uses it.
    pub(super) async fn create_volume(&self, panel: &str, source: &str) -> Result<Volume, DriverError> {
        check_id("panel", panel)?;
        templates::files(source)?;
        self.layout().await?;
        let root = self.volumes().join(panel);
        let volume = Volume { panel: panel.to_owned(), location: root.join(HOME).into() };
        if self.opened.lock().unwrap_or_else(|e| e.into_inner()).contains(panel) {
            return Ok(volume);
        }
        // One opening of a volume at a time: two would mount its disk twice.
        let lock = self.opening_lock(panel);
        let _opening = lock.lock().await;
        if self.opened.lock().unwrap_or_else(|e| e.into_inner()).contains(panel) {
            return Ok(volume);
        }
        let legacy = self.volumes().join(format!(".{panel}.legacy"));
        let disk = self.disk_size().map(|bytes| (self.image_of(panel), bytes));
        let source = source.to_owned();
        blocking(move || open_volume(&root, &legacy, disk, |tree| templates::write(&source, tree))).await?;
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).insert(panel.to_owned());
        tracing::debug!(panel, volume = %volume.location, "volume open");
        Ok(volume)
    }

    /// The lock held while the panel's volume is opened or let go of.
    fn opening_lock(&self, panel: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        // Locks nobody holds or waits for go, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(panel.to_owned()).or_default().clone()
    }

    /// Where the panel's volume's disk image is.
    fn image_of(&self, panel: &str) -> PathBuf {
        self.volumes().join(DISKS).join(format!("{panel}.ext4"))
    }

    /// Whether the panel has a volume (made, not necessarily open).
    fn has_volume(&self, panel: &str) -> bool {
        self.opened.lock().unwrap_or_else(|e| e.into_inner()).contains(panel)
            || self.image_of(panel).exists()
            || self.volumes().join(panel).exists()
    }

    /// The size of a volume's own file system: as root, the configured
    /// one; without root there is no mounting, and a volume is a plain
    /// directory (only the API's limits hold it).
    fn disk_size(&self) -> Option<u64> {
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } == 0).then_some(self.config.limits.volume)
    }

    /// Unmounts the volumes this driver opened (their disks stay): once its
    /// instances are stopped, as the node stops.
    pub(super) async fn release_volumes(&self) {
        let opened: Vec<String> = self.opened.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        for panel in opened {
            let lock = self.opening_lock(&panel);
            let _opening = lock.lock().await;
            self.opened.lock().unwrap_or_else(|e| e.into_inner()).remove(&panel);
            let root = self.volumes().join(&panel);
            if let Err(error) = blocking(move || Ok(disks::unmount(&root)?)).await {
                tracing::warn!(panel, %error, "a volume could not be unmounted");
            }
        }
    }

    pub(super) async fn create_snapshot(&self, panel: &str, source: &str) -> Result<Snapshot, DriverError> {
        check_id("panel", panel)?;
        templates::files(source)?;
        self.layout().await?;
        // A change through the API finishes first (an upload halfway through
        // its swap would give a mixed snapshot), and none starts meanwhile.
        let _editing = self.edit_when_free(panel).await?;
        // A panel without a volume (an App never edited) deploys its template.
        let volume = match self.has_volume(panel) {
            true => Some(self.create_volume(panel, source).await?.location.path().to_owned()),
            false => None,
        };
        let _numbering = self.snapshots.lock().await;
        let dir = self.snapshots_of(panel);
        // Only root reads snapshots; instances get a copy.
        private_dir(&dir)?;
        let version = last_version(&dir)? + 1;
        let location = dir.join(version.to_string());
        let fresh = dir.join(format!(".{version}.new"));
        let _ = remove_tree(&fresh);
        let store = self.object_store();
        private_dir(&store)?;
        // The volume is the panel's (its code may be changing it right now):
        // copied by descriptor, root-owned and read-only as it is made, its
        // files linked to the objects of their content.
        let made = match volume {
            Some(volume) => {
                let (to, objects) = (fresh.clone(), store.clone());
                blocking(move || {
                    let objects = tree::Dir::open(&objects)?;
                    copy_tree(&volume, &to, CopyAs { owner: None, read_only: true, store: Some(&objects) })
                })
                .await
            }
            None => std::fs::create_dir_all(&fresh)
                .map_err(DriverError::from)
                .and_then(|()| templates::write(source, &fresh))
                .and_then(|()| Ok(make_read_only(&fresh)?)),
        };
        let made = made.and_then(|()| Ok(std::fs::rename(&fresh, &location)?));
        if made.is_err() {
            let _ = remove_tree(&fresh);
        }
        made?;
        tracing::info!(panel, version, snapshot = %location.display(), "snapshot taken");
        let pruned = blocking(move || Ok(prune(&dir, version, &store)?)).await;
        if let Err(error) = pruned {
            tracing::warn!(panel, %error, "old snapshots not pruned; the next deploy tries again");
        }
        Ok(Snapshot { panel: panel.to_owned(), version, location: location.into() })
    }

    /// Every entry of the panel's volume.
    pub(super) async fn list_volume(&self, panel: &str, source: &str) -> Result<FileList, DriverError> {
        let volume = self.create_volume(panel, source).await?.location.path().to_owned();
        let limits = self.file_limits;
        blocking(move || workspace::list(&volume, limits)).await
    }

    /// One file of the panel's volume.
    pub(super) async fn read_volume_file(
        &self,
        panel: &str,
        source: &str,
        path: FilePath,
    ) -> Result<Vec<u8>, DriverError> {
        let volume = self.create_volume(panel, source).await?.location.path().to_owned();
        let limits = self.file_limits;
        blocking(move || workspace::read(&volume, &path, limits)).await
    }

    /// Saves one file of the panel's volume; true when it is new.
    pub(super) async fn write_volume_file(
        &self,
        panel: &str,
        source: &str,
        path: FilePath,
        bytes: bytes::Bytes,
    ) -> Result<bool, DriverError> {
        let volume = self.create_volume(panel, source).await?.location.path().to_owned();
        let editing = self.edit(panel)?;
        let limits = self.file_limits;
        let written = blocking(move || {
            let _editing = editing;
            workspace::write(&volume, &path, &bytes, limits)
        })
        .await;
        written.map_err(|e| self.full_volume(panel, e))
    }

    /// Deletes a file, symlink or directory of the panel's volume.
    pub(super) async fn delete_volume_file(
        &self,
        panel: &str,
        source: &str,
        path: FilePath,
    ) -> Result<(), DriverError> {
        let volume = self.create_volume(panel, source).await?.location.path().to_owned();
        let editing = self.edit(panel)?;
        blocking(move || {
            let _editing = editing;
            workspace::delete(&volume, &path)
        })
        .await
    }

    /// Replaces the panel's volume's tree with the archive's.
    pub(super) async fn replace_volume(
        &self,
        panel: &str,
        source: &str,
        archive: bytes::Bytes,
    ) -> Result<FileList, DriverError> {
        let volume = self.create_volume(panel, source).await?.location.path().to_owned();
        let editing = self.edit(panel)?;
        let staging = self.volumes().join(panel).join(format!("{STAGING}{:08x}", rand::random::<u32>()));
        let limits = self.file_limits;
        // Unpacking holds a long name or a file's buffer in memory: a few at
        // a time node-wide, the rest wait their turn.
        let _turn = self.unpacking.acquire().await.map_err(io::Error::other)?;
        let usage = {
            let volume = volume.clone();
            blocking(move || {
                let _editing = editing;
                archive::replace(&volume, &staging, &archive, limits)
            })
            .await
            .map_err(|e| self.full_volume(panel, e))?
        };
        tracing::info!(panel, entries = usage.entries, bytes = usage.bytes, "volume replaced by an upload");
        blocking(move || workspace::list(&volume, limits)).await
    }

    /// A write that found the volume's own disk full, as the quota it is
    /// (without a disk, a full host is a fault, not the user's quota).
    fn full_volume(&self, panel: &str, error: DriverError) -> DriverError {
        match error {
            DriverError::Io(e) if disks::is_no_space(&e) && self.disk_size().is_some() => {
                let limit = std::fs::metadata(self.image_of(panel)).map_or(0, |m| m.len());
                FileError::Quota { what: "bytes: its volume is full", limit }.into()
            }
            other => other,
        }
    }

    /// Marks the panel's files as being changed once no other change is
    /// (waiting [`EDIT_WAIT`] at most).
    async fn edit_when_free(&self, panel: &str) -> Result<Editing, DriverError> {
        let deadline = tokio::time::Instant::now() + EDIT_WAIT;
        loop {
            match self.edit(panel) {
                Err(DriverError::File(FileError::Busy)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                held => return held,
            }
        }
    }

    /// Marks the panel's files as being changed, or says they already are.
    pub(super) fn edit(&self, panel: &str) -> Result<Editing, DriverError> {
        let mut editing = self.editing.lock().unwrap_or_else(|e| e.into_inner());
        if !editing.insert(panel.to_owned()) {
            return Err(FileError::Busy.into());
        }
        Ok(Editing { editing: self.editing.clone(), panel: panel.to_owned() })
    }

    pub(super) async fn forget_panel(&self, panel: &str) -> Result<(), DriverError> {
        check_id("panel", panel)?;
        {
            let lock = self.opening_lock(panel);
            let _opening = lock.lock().await;
            self.opened.lock().unwrap_or_else(|e| e.into_inner()).remove(panel);
            let root = self.volumes().join(panel);
            let image = self.image_of(panel);
            blocking(move || {
                disks::unmount(&root)?;
                remove_tree(&root)?;
                match std::fs::remove_file(&image) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                }
            })
            .await?;
        }
        // A deploy of another panel may be linking objects right now.
        let _numbering = self.snapshots.lock().await;
        remove_tree(&self.snapshots_of(panel))?;
        let store = self.object_store();
        if let Err(error) = tree::Dir::open(&store).and_then(|store| objects::collect(&store)) {
            tracing::warn!(panel, %error, "the panel's snapshot objects not collected; the next deploy does");
        }
        if let Err(error) = self.uids.forget(panel).await {
            // Harmless: the uid is never handed to another panel anyway.
            tracing::warn!(panel, %error, "the panel's uid could not be forgotten");
        }
        tracing::info!(panel, "volume and snapshots deleted");
        Ok(())
    }
}

/// Makes the volume at `root` ready to use: its disk made and mounted when
/// `disk` (image, size) is given, what a crash left in it swept, and its
/// tree made when missing, from a volume of an earlier layout (moved aside
/// to `legacy` first) or by `fill`.
fn open_volume(
    root: &Path,
    legacy: &Path,
    disk: Option<(PathBuf, u64)>,
    fill: impl FnOnce(&Path) -> Result<(), DriverError>,
) -> Result<(), DriverError> {
    let mounted = match &disk {
        Some((image, _)) => disks::is_mounted(root, image)?,
        None => false,
    };
    // A volume of an earlier layout: its tree is the directory itself, or
    // (a plain directory made without root) in home/ beside the marker.
    // A disk's unmounted mount point is empty.
    if !mounted && !is_empty_dir(root)? {
        let plain = std::fs::symlink_metadata(root.join(MARKER)).is_ok();
        match &disk {
            Some((image, _)) if image.exists() => {
                let why = format!("{} is not empty: its disk is not mounted over it", root.display());
                return Err(io::Error::other(why).into());
            }
            None if plain => {}
            _ => {
                std::fs::rename(root, legacy)?;
                tracing::info!(volume = %root.display(), "a volume of an earlier layout is moved into its own");
            }
        }
    }
    passable_dir(root)?;
    if let Some((image, bytes)) = &disk {
        if !mounted {
            if !image.exists() {
                disks::make(image, *bytes)?;
            }
            disks::mount(image, root)?;
        }
        // The file system's root is root's; the panel's uid passes through.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    }
    if std::fs::symlink_metadata(root.join(MARKER)).is_err() {
        std::fs::write(root.join(MARKER), b"")?;
    }
    sweep_unfinished(root);
    let home = root.join(HOME);
    if std::fs::symlink_metadata(&home).is_err() {
        let fresh = root.join(format!("{MAKING}{:08x}", rand::random::<u32>()));
        let old_tree = match std::fs::symlink_metadata(legacy.join(MARKER)) {
            Ok(_) => legacy.join(HOME),
            Err(_) => legacy.to_owned(),
        };
        // Private from the start (root's until a start hands it to the
        // panel's uid).
        let filled = match legacy.exists() {
            true => copy_tree(&old_tree, &fresh, CopyAs { owner: None, read_only: false, store: None })
                .and_then(|()| Ok(private_dir(&fresh)?)),
            false => private_dir(&fresh).map_err(DriverError::from).and_then(|()| fill(&fresh)),
        };
        let filled = filled.and_then(|()| Ok(std::fs::rename(&fresh, &home)?));
        if filled.is_err() {
            let _ = remove_tree(&fresh);
        }
        filled?;
        tracing::info!(volume = %home.display(), "volume created");
    }
    if legacy.exists() {
        remove_tree(legacy)?;
    }
    Ok(())
}

/// Whether `dir` is missing or holds nothing.
fn is_empty_dir(dir: &Path) -> io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}
