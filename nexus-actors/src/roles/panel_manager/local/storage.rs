//! The `local` driver's data directory: its layout and modes (see the
//! driver's documentation), Studio volumes made from templates, read-only
//! snapshots taken by descriptor from a volume, and their deletion.
//!
//! It runs nothing; the driver decides when these are made.

use std::path::PathBuf;

use super::super::driver::{DriverError, Snapshot, Volume};
use super::files::{blocking, check_id, copy_tree, last_version, make_read_only, remove_tree};
use super::templates;
use super::tree::{self, CopyAs};
use super::LocalDriver;
use crate::platform::files::{passable_dir, private_dir};

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
                    passable_dir(&data.join("scratch"))?;
                    private_dir(&data.join("snapshots"))?;
                    private_dir(&data.join("instances"))?;
                    tree::warn_if_hard_links_unprotected();
                    Ok(())
                })
            })
            .await?;
        Ok(())
    }

    pub(super) fn volumes(&self) -> PathBuf {
        self.config.data_dir.join("volumes")
    }

    pub(super) fn snapshots_of(&self, panel: &str) -> PathBuf {
        self.config.data_dir.join("snapshots").join(panel)
    }

    pub(super) async fn create_volume(&self, panel: &str, source: &str) -> Result<Volume, DriverError> {
        check_id("panel", panel)?;
        templates::files(source)?;
        self.layout().await?;
        let location = self.volumes().join(panel);
        if !location.exists() {
            let fresh = self.volumes().join(format!(".{panel}.new-{}", rand::random::<u32>()));
            // Private from the start; a start hands it to the panel's uid.
            private_dir(&fresh)?;
            let written = templates::write(source, &fresh).and_then(|()| Ok(std::fs::rename(&fresh, &location)?));
            if written.is_err() {
                let _ = remove_tree(&fresh);
            }
            written?;
            tracing::info!(panel, source, volume = %location.display(), "volume created");
        }
        Ok(Volume { panel: panel.to_owned(), location })
    }

    pub(super) async fn create_snapshot(&self, panel: &str, source: &str) -> Result<Snapshot, DriverError> {
        check_id("panel", panel)?;
        templates::files(source)?;
        self.layout().await?;
        let _numbering = self.snapshots.lock().await;
        let dir = self.snapshots_of(panel);
        // Only root reads snapshots; instances get a copy.
        private_dir(&dir)?;
        let version = last_version(&dir)? + 1;
        let location = dir.join(version.to_string());
        let fresh = dir.join(format!(".{version}.new"));
        let _ = remove_tree(&fresh);
        let volume = self.volumes().join(panel);
        // The volume is the panel's (its code may be changing it right now):
        // copied by descriptor, root-owned and read-only as it is made.
        let made = if volume.is_dir() {
            let (from, to) = (volume.clone(), fresh.clone());
            blocking(move || copy_tree(&from, &to, CopyAs { owner: None, read_only: true })).await
        } else {
            std::fs::create_dir_all(&fresh)
                .map_err(DriverError::from)
                .and_then(|()| templates::write(source, &fresh))
                .and_then(|()| Ok(make_read_only(&fresh)?))
        };
        let made = made.and_then(|()| Ok(std::fs::rename(&fresh, &location)?));
        if made.is_err() {
            let _ = remove_tree(&fresh);
        }
        made?;
        tracing::info!(panel, version, snapshot = %location.display(), "snapshot taken");
        Ok(Snapshot { panel: panel.to_owned(), version, location })
    }

    pub(super) async fn forget_panel(&self, panel: &str) -> Result<(), DriverError> {
        check_id("panel", panel)?;
        remove_tree(&self.volumes().join(panel))?;
        remove_tree(&self.snapshots_of(panel))?;
        tracing::info!(panel, "volume and snapshots deleted");
        Ok(())
    }
}
