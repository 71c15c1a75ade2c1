//! What the driver fills its templates with: names, settings and fresh
//! secrets for one volume, snapshot or instance, and the objects each
//! part must render to. It sends nothing.

use std::time::Duration;

use super::render::{self, Kind, Object, Values};
use super::{names, KubeDriver, KubeError};
use crate::instance::InstanceMode;
use crate::roles::panel_manager::driver::{Code, InstanceSpec};

impl KubeDriver {
    pub(super) fn values(&self, part: &'static str, panel: &str) -> Values {
        let limits = &self.config.limits;
        Values {
            part,
            namespace: self.config.namespace.clone(),
            panel: panel.to_owned(),
            panel_key: names::panel_key(panel),
            node_key: names::node_key(&self.config.node),
            claim: names::claim(panel),
            nexus_image: self.config.nexus_image.clone(),
            panel_image: self.config.panel_image.clone(),
            runtime_class: self.config.runtime_class.clone(),
            storage_class: self.config.storage_class.clone(),
            redis_secret: self.config.redis_secret.clone(),
            memory: format!("{}Mi", (limits.memory >> 20).max(1)),
            cpu: format!("{}m", limits.cpu_millis.max(1)),
            disk: format!("{}Mi", (limits.disk >> 20).max(1)),
            app_disk: format!("{}Mi", ((limits.disk + limits.volume) >> 20).max(1)),
            volume_size: format!("{}Mi", (limits.volume >> 20).max(1)),
            panel_port: self.config.panel_port,
            watchdog_port: self.config.watchdog_port,
            ..Values::default()
        }
    }

    pub(super) fn volume_objects(&self, panel: &str, source: &str) -> Result<Vec<Object>, KubeError> {
        let values = Values { source: source.to_owned(), ..self.values("volume", panel) };
        let claim = values.claim.clone();
        self.templates.render(render::DEV_POD, &values, &[(Kind::Claim, &claim)])
    }

    pub(super) fn snapshot_objects(&self, panel: &str, source: &str, version: u64) -> Result<Vec<Object>, KubeError> {
        let values = Values {
            snapshot: names::snapshot(panel, version),
            version,
            source: source.to_owned(),
            ..self.values("snapshot", panel)
        };
        let snapshot = values.snapshot.clone();
        self.templates.render(render::PROD_SERVICE, &values, &[(Kind::Claim, &snapshot)])
    }

    /// The objects of one instance, with fresh secrets.
    pub(super) fn instance_objects(&self, spec: &InstanceSpec, source: &str) -> Result<Vec<Object>, KubeError> {
        let name = names::instance(&spec.instance);
        let timeout = spec.watchdog_timeout.unwrap_or(Duration::from_secs(1800));
        let mut values = Values {
            name: name.clone(),
            instance: spec.instance.clone(),
            owner: spec.owner.clone(),
            source: source.to_owned(),
            secret: names::secret(&name),
            service_account: names::watchdog_account(&name),
            sidecar_token: token(),
            watchdog_token: token(),
            watchdog_timeout_secs: timeout.as_secs().max(1),
            mode: match spec.mode {
                InstanceMode::Studio => "studio",
                InstanceMode::App => "app",
            },
            ..self.values("instance", &spec.panel)
        };
        let (secret, account) = (values.secret.clone(), values.service_account.clone());
        match &spec.code {
            Code::Studio(volume) => {
                values.claim = volume.location.as_str().to_owned();
                let expect = [
                    (Kind::Secret, secret.as_str()),
                    (Kind::ServiceAccount, &account),
                    (Kind::Role, &account),
                    (Kind::RoleBinding, &account),
                    (Kind::Pod, &name),
                ];
                self.templates.render(render::DEV_POD, &values, &expect)
            }
            Code::App(snapshot) => {
                values.snapshot = snapshot.location.as_str().to_owned();
                values.version = snapshot.version;
                self.templates.render(render::PROD_SERVICE, &values, &[(Kind::Secret, &secret), (Kind::Knative, &name)])
            }
        }
    }
}

/// A fresh secret: 32 random bytes, hex.
fn token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
