//! What a panel manager that stopped without stopping its instances left
//! in the cluster: its instances' Pods, Knative Services, Secrets and the
//! watchdogs' accounts, Roles and bindings, found by the node label every
//! such object carries. A node that starts has forgotten them (their
//! statuses are marked stopped), so it deletes them before it starts
//! anything. Volumes and snapshots are the panels', never swept.

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use serde::de::DeserializeOwned;

use super::render::Kind;
use super::{calls, names, KubeDriver, KubeError};

impl KubeDriver {
    /// Deletes every instance object of this node; returns how many.
    pub async fn sweep_stale(&self) -> Result<usize, KubeError> {
        let selector = format!(
            "app.kubernetes.io/managed-by=nexus,app.kubernetes.io/component=panel,nexus.dev/node={}",
            names::node_key(&self.config.node)
        );
        let params = ListParams::default().labels(&selector);
        let mut stale = Vec::new();
        // In the order they are made: deleted in reverse, Pods first.
        stale.extend(self.names_of(&self.api::<Secret>(), Kind::Secret, &params).await?);
        stale.extend(self.names_of(&self.api::<ServiceAccount>(), Kind::ServiceAccount, &params).await?);
        stale.extend(self.names_of(&self.api::<Role>(), Kind::Role, &params).await?);
        stale.extend(self.names_of(&self.api::<RoleBinding>(), Kind::RoleBinding, &params).await?);
        stale.extend(self.names_of(&self.pods(), Kind::Pod, &params).await?);
        stale.extend(self.names_of(&self.services(), Kind::Knative, &params).await?);
        self.delete_objects(&stale, std::time::Duration::ZERO).await?;
        if !stale.is_empty() {
            tracing::warn!(objects = stale.len(), "deleted what this node's instances left in the cluster");
        }
        Ok(stale.len())
    }

    /// The names `params` selects; none where the kind is not served (a
    /// cluster without Knative).
    async fn names_of<K>(&self, api: &Api<K>, kind: Kind, params: &ListParams) -> Result<Vec<(Kind, String)>, KubeError>
    where
        K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let what = format!("listing stale {}s", kind.label());
        match calls::retried(&self.config.retry, &self.metrics, &what, || api.list(params)).await {
            Ok(list) => Ok(list.items.iter().map(|o| (kind, o.name_any())).collect()),
            Err(KubeError::NotFound(_)) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }
}
