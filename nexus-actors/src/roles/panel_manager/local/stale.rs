//! What a crashed run of the `local` driver left behind: the network
//! namespaces of its instances (and whatever still runs in them, runsc
//! sandboxes included) and the scratch copies of its App instances.
//!
//! A namespace is the driver's when its instance (or warm sandbox) has a
//! directory under the driver's `instances/`; other nodes' namespaces are
//! left alone. It never touches an instance the running driver knows.

use std::path::Path;

use super::files::check_id;
use super::metrics::LocalMetrics;
use super::{procs, runsc};
use crate::infra::find_program;
use crate::netns::Netns;

/// Deletes the stale namespaces under `data_dir`'s instances that
/// `running` does not claim, with what runs in them; returns how many.
pub(super) async fn sweep(data_dir: &Path, running: impl Fn(&str) -> bool, metrics: &LocalMetrics) -> usize {
    if !crate::netns::supported() {
        return 0;
    }
    let instances = data_dir.join("instances");
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return 0 };
    let names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let mut swept = 0;
    for name in names {
        let Some(id) = name.strip_prefix("nexus-") else { continue };
        let dir = instances.join(id);
        if check_id("instance", id).is_err() || running(id) || !dir.is_dir() {
            continue;
        }
        let state = dir.join("runsc");
        if state.is_dir() {
            if let Some(runsc) = find_program("runsc") {
                runsc::delete(&runsc, &state, &name).await;
            }
        }
        // An App instance's copy of its snapshot dies with it.
        if let Err(error) = super::scratch::release(&data_dir.join("scratch").join(id)) {
            tracing::warn!(instance = id, %error, "could not delete a stale App copy");
        }
        let Some(netns) = Netns::existing(&name) else { continue };
        procs::kill_namespace_members(&netns.path()).await;
        match netns.delete() {
            Ok(()) => {
                swept += 1;
                metrics.stale_swept.inc();
                tracing::warn!(instance = id, netns = %name, "nexus_local_stale_namespaces_swept_total: left by a crash");
            }
            Err(error) => tracing::error!(instance = id, %error, "could not delete a stale namespace"),
        }
    }
    swept
}
