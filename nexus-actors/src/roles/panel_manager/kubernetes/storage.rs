//! Volumes and snapshots as claims: a panel's Studio claim, made once from
//! its template; a snapshot, a read-only clone of it per deploy, numbered
//! one deploy at a time and pruned to the last few (a claim an App still
//! mounts is kept by Kubernetes until it lets go). It runs no instance.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::ListParams;
use kube::ResourceExt;

use super::render::Kind;
use super::{calls, names, KubeDriver, KubeError, PANEL_KEY_LABEL};
use crate::roles::panel_manager::driver::{check_id, Code, DriverError, InstanceSpec, Location, Snapshot, Volume};
use crate::roles::panel_manager::templates;

/// Snapshots kept per panel, the newest; older ones are deleted.
const SNAPSHOTS_KEPT: u64 = 3;
/// Where a claim says which template seeds its panel's code.
const SOURCE_ANNOTATION: &str = "nexus.dev/source";
const VERSION_ANNOTATION: &str = "nexus.dev/version";
/// How many taken numbers a deploy skips before it gives up.
const VERSION_TRIES: u64 = 5;
const NONCE_ANNOTATION: &str = "nexus.dev/made-by";

impl KubeDriver {
    /// The panel's Studio claim, made from `source` the first time.
    pub(super) async fn create_volume(&self, panel: &str, source: &str) -> Result<Volume, DriverError> {
        check_id("panel", panel)?;
        templates::files(source)?;
        let objects = self.volume_objects(panel, source)?;
        self.create(objects, "", &mut Vec::new()).await?;
        Ok(Volume { location: Location::from(names::claim(panel)), panel: panel.to_owned() })
    }

    /// A new snapshot claim of the panel's volume. One at a time, so two
    /// deploys never take one number; a number taken anyway (by a node that
    /// ran before) is skipped, never shared.
    pub(super) async fn take_snapshot(&self, panel: &str, source: &str) -> Result<Snapshot, DriverError> {
        self.create_volume(panel, source).await?;
        let _numbering = self.snapshots.lock().await;
        let mut version = self.last_version(panel).await? + 1;
        for _ in 0..VERSION_TRIES {
            let mut objects = self.snapshot_objects(panel, source, version)?;
            let Some(super::render::Object::Claim(mut claim)) = objects.pop() else {
                return Err(KubeError::Template("the snapshot part must render one claim".to_owned()).into());
            };
            // This attempt's mark: a create whose answer was lost is found
            // again as ours, not taken for someone else's number.
            let nonce = uuid::Uuid::now_v7().to_string();
            claim.annotations_mut().insert(NONCE_ANNOTATION.to_owned(), nonce.clone());
            let ours = |c: &PersistentVolumeClaim| c.annotations().get(NONCE_ANNOTATION) == Some(&nonce);
            let (retry, metrics) = (&self.config.retry, &self.metrics);
            let taken = calls::create(&self.claims(), retry, metrics, Kind::Claim.label(), &*claim, ours).await;
            match taken {
                Ok(_) => {
                    tracing::info!(%panel, version, "snapshot claim made");
                    self.prune(panel, version).await;
                    return Ok(Snapshot {
                        location: Location::from(names::snapshot(panel, version)),
                        panel: panel.to_owned(),
                        version,
                    });
                }
                Err(KubeError::Conflict(_)) => version += 1,
                // Taken, then gone before it could be read: try it again.
                Err(KubeError::NotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Err(KubeError::Conflict(format!("snapshot numbers up to {version} of panel {panel} are taken")).into())
    }

    fn snapshot_selector(panel: &str) -> ListParams {
        let key = names::panel_key(panel);
        ListParams::default().labels(&format!("{PANEL_KEY_LABEL}={key},app.kubernetes.io/component=panel-snapshot"))
    }

    async fn snapshot_claims(&self, panel: &str) -> Result<Vec<(u64, String)>, KubeError> {
        let (api, params) = (self.claims(), Self::snapshot_selector(panel));
        let claims =
            calls::retried(&self.config.retry, &self.metrics, "listing snapshots", || api.list(&params)).await?;
        let versioned = |c: &PersistentVolumeClaim| {
            let version = c.annotations().get(VERSION_ANNOTATION)?.parse::<u64>().ok()?;
            Some((version, c.name_any()))
        };
        Ok(claims.items.iter().filter_map(versioned).collect())
    }

    async fn last_version(&self, panel: &str) -> Result<u64, KubeError> {
        Ok(self.snapshot_claims(panel).await?.into_iter().map(|(v, _)| v).max().unwrap_or(0))
    }

    /// Deletes the snapshots older than the newest [`SNAPSHOTS_KEPT`]
    /// that no App of the panel runs (deploys that failed after taking
    /// theirs must not cost the running one its code); a failure only
    /// waits for the next deploy.
    async fn prune(&self, panel: &str, newest: u64) {
        if let Err(error) = self.prune_unused(panel, newest).await {
            tracing::warn!(%panel, %error, "old snapshots not pruned; the next deploy tries again");
        }
    }

    async fn prune_unused(&self, panel: &str, newest: u64) -> Result<(), KubeError> {
        let claims = self.snapshot_claims(panel).await?;
        let params = ListParams::default().labels(&format!("{PANEL_KEY_LABEL}={}", names::panel_key(panel)));
        let api = self.services();
        let listed =
            calls::retried(&self.config.retry, &self.metrics, "listing the panel's Apps", || api.list(&params));
        let services = match listed.await {
            Ok(list) => list.items,
            Err(KubeError::NotFound(_)) => Vec::new(),
            Err(error) => return Err(error),
        };
        let mounted: Vec<&str> = services
            .iter()
            .flat_map(|s| s.data["spec"]["template"]["spec"]["volumes"].as_array().into_iter().flatten())
            .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
            .collect();
        let old: Vec<(Kind, String)> = claims
            .into_iter()
            .filter(|(version, name)| *version + SNAPSHOTS_KEPT <= newest && !mounted.contains(&name.as_str()))
            .map(|(_, name)| (Kind::Claim, name))
            .collect();
        self.delete_objects(&old, std::time::Duration::ZERO).await
    }

    /// The template an instance's code comes from, as its claim says (a
    /// Studio volume or App snapshot never edited is seeded from it), once
    /// the spec's location is checked to be that panel's own claim.
    pub(super) async fn source_of(&self, spec: &InstanceSpec) -> Result<String, DriverError> {
        let (location, expected) = match &spec.code {
            Code::Studio(volume) => (&volume.location, names::claim(&spec.panel)),
            Code::App(snapshot) => (&snapshot.location, names::snapshot(&spec.panel, snapshot.version)),
        };
        if location.as_str() != expected {
            return Err(KubeError::Setting { what: "claim of the panel", value: location.to_string() }.into());
        }
        let api = self.claims();
        let what = format!("reading claim {expected}");
        let claim = calls::retried(&self.config.retry, &self.metrics, &what, || api.get(&expected)).await?;
        let empty = BTreeMap::new();
        let source =
            claim.metadata.annotations.as_ref().unwrap_or(&empty).get(SOURCE_ANNOTATION).cloned().unwrap_or_default();
        templates::files(&source)?;
        Ok(source)
    }
}
