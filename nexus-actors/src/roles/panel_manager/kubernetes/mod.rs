//! The `kubernetes` runtime driver: panel instances as Pods (Studio) and
//! Knative Services (App) in one namespace, through kube-rs.
//!
//! | trait | here |
//! |---|---|
//! | [`Volume`] | a PersistentVolumeClaim mounted on `/home`, seeded from the panel's template by an init container |
//! | [`Snapshot`] | a read-only clone of that claim (`dataSource`), one per deploy |
//! | Studio start | a Pod: the user's code, `nexus sidecar`, `nexus watchdog` (with a Secret of the instance's tokens and the watchdog's ServiceAccount, Role and RoleBinding) |
//! | App start | a Knative Service (min-scale 0, a 60 s window) of the user's code and the sidecar, on a fresh copy of a snapshot |
//! | status | two watches ([`watch`]): Pod IPs and Service URLs become endpoints, restarts and deletions become [`InstanceEvent`]s |
//! | restart | nothing: the kubelet restarts the container |
//!
//! Every object comes from the operator's templates ([`render`]) and is
//! checked before it is sent. API calls are retried with backoff
//! ([`calls`]). It decides no policy, like every driver.

mod calls;
mod manifests;
mod names;
mod policy;
mod render;
mod storage;
mod sweep;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use tokio::sync::OnceCell;

use super::driver::{check_id, Code, DriverError, InstanceSpec, RuntimeDriver, Snapshot, Started, Volume};
use super::local::Limits;
use crate::instance::{Endpoint, InstanceMode, Isolation};
use crate::telemetry::Metrics;
pub use calls::Retry;
pub use render::Templates;
use render::{Kind, Object};
use watch::{Seen, Tracker, Watched, INSTANCE_LABEL, PANEL_CONTAINER};

/// The annotation naming the instance an object is made for.
const INSTANCE_ANNOTATION: &str = "nexus.dev/instance";
/// The label of every object of one panel.
const PANEL_KEY_LABEL: &str = "nexus.dev/panel-key";
/// The most of a log tail read from the API.
const LOG_TAIL_BYTES: i64 = 256 * 1024;

/// What went wrong between the driver and the cluster. Each says what an
/// owner or operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No cluster to talk to (neither in-cluster config nor `KUBECONFIG`).
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    /// An operator setting that cannot go into a manifest.
    #[error("invalid {what} {value:?}")]
    Setting {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// A template did not render, or rendered something else than asked.
    #[error("template: {0}")]
    Template(String),
    /// The API kept failing (5xx, 429, timeouts, quota) through every retry.
    #[error("the Kubernetes API did not succeed after {attempts} attempts: {last}")]
    Unavailable {
        /// Calls made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// An object of that name exists and is not this instance's.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The driver's account may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The object is not there.
    #[error("not found: {0}")]
    NotFound(String),
    /// The API refused the request (400, 422: an invalid object).
    #[error("refused: {0}")]
    Refused(String),
    /// The instance cannot run (its image does not pull, it was evicted,
    /// its revision failed).
    #[error("the instance cannot run: {0}")]
    CannotRun(String),
    /// It was not running (Studio) or ready (App) in time.
    #[error("not running within {0:?}: {1}")]
    StartTimeout(Duration, String),
}

/// The driver's settings; [`KubeConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// The panels' namespace (`--kube-namespace`).
    pub namespace: String,
    /// The node's name: its instances' objects carry a label of it, so a
    /// node that starts again sweeps what it left and nothing of another's.
    pub node: String,
    /// The `nexus` image: seed, sidecar and watchdog containers.
    pub nexus_image: String,
    /// The image the user's code runs in (python3 and node).
    pub panel_image: String,
    /// The gVisor RuntimeClass.
    pub runtime_class: String,
    /// The volumes' StorageClass; the cluster's default when `None`.
    pub storage_class: Option<String>,
    /// The Secret (key `url`) holding the sidecars' Redis URL.
    pub redis_secret: String,
    /// Requests and limits of the user's container, and volume sizes.
    pub limits: Limits,
    /// Where the user's code listens.
    pub panel_port: u16,
    /// Where the watchdog listens.
    pub watchdog_port: u16,
    /// How long a start waits for the Pod to run or the Service to be ready.
    pub start_timeout: Duration,
    /// How API calls are retried.
    pub retry: Retry,
}

impl KubeConfig {
    /// The defaults, in `namespace`.
    pub fn new(namespace: impl Into<String>) -> KubeConfig {
        KubeConfig {
            namespace: namespace.into(),
            node: "nexus".to_owned(),
            nexus_image: "ghcr.io/nexus-graph/nexus:latest".to_owned(),
            panel_image: "ghcr.io/nexus-graph/panel-runtime:latest".to_owned(),
            runtime_class: "gvisor".to_owned(),
            storage_class: None,
            redis_secret: "nexus-sidecar-redis".to_owned(),
            limits: Limits::default(),
            panel_port: 8080,
            watchdog_port: 9999,
            start_timeout: Duration::from_secs(300),
            retry: Retry::default(),
        }
    }

    fn check(&self) -> Result<(), KubeError> {
        names::check_label("namespace", &self.namespace)?;
        names::check_label("runtime class", &self.runtime_class)?;
        names::check_subdomain("redis secret", &self.redis_secret)?;
        if let Some(class) = &self.storage_class {
            names::check_subdomain("storage class", class)?;
        }
        names::check_image("nexus image", &self.nexus_image)?;
        names::check_image("panel image", &self.panel_image)
    }
}

/// An instance's objects, by name, so stop deletes what start made.
#[derive(Debug, Clone)]
struct Made {
    name: String,
    mode: InstanceMode,
}

/// Runs panel instances on a Kubernetes cluster; see the module documentation.
pub struct KubeDriver {
    config: KubeConfig,
    templates: Templates,
    client: Client,
    tracker: Arc<Tracker>,
    watching: OnceCell<()>,
    knative: ApiResource,
    metrics: Metrics,
    made: std::sync::Mutex<std::collections::HashMap<String, Made>>,
    /// Held while a snapshot is numbered and made.
    snapshots: tokio::sync::Mutex<()>,
}

impl KubeDriver {
    /// A driver on the cluster of the in-cluster config or `KUBECONFIG`.
    pub async fn infer(config: KubeConfig, templates: Templates, metrics: Metrics) -> Result<KubeDriver, KubeError> {
        let client = Client::try_default().await.map_err(|e| KubeError::Config(e.to_string()))?;
        KubeDriver::with_client(config, templates, client, metrics)
    }

    /// A driver on `client`'s cluster. Checks the settings and that the
    /// templates render for them.
    pub fn with_client(
        config: KubeConfig,
        templates: Templates,
        client: Client,
        metrics: Metrics,
    ) -> Result<KubeDriver, KubeError> {
        config.check()?;
        let gvk = GroupVersionKind::gvk("serving.knative.dev", "v1", "Service");
        let driver = KubeDriver {
            tracker: Arc::new(Tracker::new(config.panel_port, metrics.clone())),
            knative: ApiResource::from_gvk_with_plural(&gvk, "services"),
            config,
            templates,
            client,
            watching: OnceCell::new(),
            metrics,
            made: std::sync::Mutex::new(std::collections::HashMap::new()),
            snapshots: tokio::sync::Mutex::new(()),
        };
        driver.check_templates()?;
        Ok(driver)
    }

    /// Renders every part once with sample values, so a broken template
    /// fails the node's start rather than the first instance.
    fn check_templates(&self) -> Result<(), KubeError> {
        let spec = InstanceSpec {
            instance: "check-1".to_owned(),
            panel: "check".to_owned(),
            owner: "check".to_owned(),
            mode: InstanceMode::Studio,
            code: Code::Studio(Volume { panel: "check".to_owned(), location: names::claim("check").into() }),
            watchdog_timeout: None,
        };
        self.volume_objects("check", "template:empty")?;
        self.snapshot_objects("check", "template:empty", 1)?;
        self.instance_objects(&spec, "template:empty")?;
        let app = InstanceSpec {
            mode: InstanceMode::App,
            code: Code::App(Snapshot {
                panel: "check".to_owned(),
                version: 1,
                location: names::snapshot("check", 1).into(),
            }),
            ..spec
        };
        self.instance_objects(&app, "template:empty")?;
        Ok(())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn services(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.config.namespace, &self.knative)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Starts both watches once, on the runtime of the first start.
    async fn watch(&self) {
        self.watching
            .get_or_init(|| async {
                tokio::spawn(watch::follow(self.pods(), self.tracker.clone(), Watched::Pod));
                tokio::spawn(watch::follow(self.services(), self.tracker.clone(), Watched::Knative));
            })
            .await;
    }

    /// Creates `objects` in order (a Pod's account and secret before it),
    /// adding each that is this instance's (made now, or by an earlier
    /// attempt of it) to `made`: a failed start deletes those, never an
    /// object of the same name that is someone else's.
    async fn create(
        &self,
        objects: Vec<Object>,
        instance: &str,
        made: &mut Vec<(Kind, String)>,
    ) -> Result<(), KubeError> {
        let name = names::instance(instance);
        let owned = |labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>| {
            labels.get(INSTANCE_LABEL) == Some(&name)
                && annotations.get(INSTANCE_ANNOTATION).map(String::as_str) == Some(instance)
        };
        for object in objects {
            let made_one = match object {
                Object::Claim(claim) => {
                    let key = claim.labels().get(PANEL_KEY_LABEL).cloned();
                    let ours = |c: &PersistentVolumeClaim| c.labels().get(PANEL_KEY_LABEL) == key.as_ref();
                    self.create_one(&self.claims(), Kind::Claim, &*claim, ours).await?
                }
                Object::Secret(secret) => {
                    let ours = |o: &Secret| owned(o.labels(), o.annotations());
                    self.create_one(&self.api(), Kind::Secret, &*secret, ours).await?
                }
                Object::ServiceAccount(account) => {
                    let ours = |o: &ServiceAccount| owned(o.labels(), o.annotations());
                    self.create_one(&self.api(), Kind::ServiceAccount, &*account, ours).await?
                }
                Object::Role(role) => {
                    let ours = |o: &Role| owned(o.labels(), o.annotations());
                    self.create_one(&self.api(), Kind::Role, &*role, ours).await?
                }
                Object::RoleBinding(binding) => {
                    let ours = |o: &RoleBinding| owned(o.labels(), o.annotations());
                    self.create_one(&self.api(), Kind::RoleBinding, &*binding, ours).await?
                }
                Object::Pod(pod) => {
                    let ours = |o: &Pod| owned(o.labels(), o.annotations());
                    self.create_one(&self.pods(), Kind::Pod, &*pod, ours).await?
                }
                Object::Knative(service) => {
                    let ours = |o: &DynamicObject| owned(o.labels(), o.annotations());
                    self.create_one(&self.services(), Kind::Knative, &*service, ours).await?
                }
            };
            made.push(made_one);
        }
        Ok(())
    }

    async fn create_one<K>(
        &self,
        api: &Api<K>,
        kind: Kind,
        object: &K,
        ours: impl Fn(&K) -> bool,
    ) -> Result<(Kind, String), KubeError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    {
        calls::create(api, &self.config.retry, &self.metrics, kind.label(), object, ours).await?;
        Ok((kind, object.meta().name.clone().unwrap_or_default()))
    }

    /// Deletes `objects` in the reverse order of their making (404s count
    /// as done); a Pod gets `grace`, at least a second, so its containers
    /// end before its object goes and its volume is let go.
    async fn delete_objects(&self, objects: &[(Kind, String)], grace: Duration) -> Result<(), KubeError> {
        let (retry, metrics) = (&self.config.retry, &self.metrics);
        let background = DeleteParams::background();
        let pod = DeleteParams::background().grace_period(grace.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
        // A Service's deletion is seen once its revisions' Pods are gone.
        let service = DeleteParams::foreground();
        let mut first_error = None;
        // Every object is tried: one that cannot go leaves the rest going.
        for (kind, name) in objects.iter().rev() {
            let label = kind.label();
            let deleted = match kind {
                Kind::Claim => calls::delete(&self.claims(), retry, metrics, label, name, &background).await,
                Kind::Secret => calls::delete(&self.api::<Secret>(), retry, metrics, label, name, &background).await,
                Kind::ServiceAccount => {
                    calls::delete(&self.api::<ServiceAccount>(), retry, metrics, label, name, &background).await
                }
                Kind::Role => calls::delete(&self.api::<Role>(), retry, metrics, label, name, &background).await,
                Kind::RoleBinding => {
                    calls::delete(&self.api::<RoleBinding>(), retry, metrics, label, name, &background).await
                }
                Kind::Pod => calls::delete(&self.pods(), retry, metrics, label, name, &pod).await,
                Kind::Knative => calls::delete(&self.services(), retry, metrics, label, name, &service).await,
            };
            if let Err(error) = deleted {
                tracing::warn!(kind = label, %name, %error, "could not delete; the next start of this node sweeps it");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Everything a started instance named `name` has, in the order made.
    fn instance_parts(name: &str, mode: InstanceMode) -> Vec<(Kind, String)> {
        let account = names::watchdog_account(name);
        match mode {
            InstanceMode::Studio => vec![
                (Kind::Secret, names::secret(name)),
                (Kind::ServiceAccount, account.clone()),
                (Kind::Role, account.clone()),
                (Kind::RoleBinding, account),
                (Kind::Pod, name.to_owned()),
            ],
            InstanceMode::App => vec![(Kind::Secret, names::secret(name)), (Kind::Knative, name.to_owned())],
        }
    }

    /// Waits until the instance serves, or cannot.
    async fn running(&self, name: &str) -> Result<String, KubeError> {
        let Some(mut seen) = self.tracker.seen(name) else {
            return Err(KubeError::CannotRun("no longer followed".to_owned()));
        };
        let mut last = Seen::Nothing;
        let waited = tokio::time::timeout(self.config.start_timeout, async {
            loop {
                last = seen.borrow_and_update().clone();
                match &last {
                    Seen::Serving(addr) => return Ok(addr.clone()),
                    Seen::Failed(reason) => return Err(KubeError::CannotRun(reason.clone())),
                    Seen::Deleted => return Err(KubeError::CannotRun("deleted while starting".to_owned())),
                    Seen::Nothing | Seen::Pending(_) => {}
                }
                if seen.changed().await.is_err() {
                    return Err(KubeError::CannotRun("no longer followed".to_owned()));
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(KubeError::StartTimeout(self.config.start_timeout, format!("{last:?}"))))
    }

    async fn start_instance(&self, spec: InstanceSpec) -> Result<Started, DriverError> {
        check_id("instance", &spec.instance)?;
        check_id("panel", &spec.panel)?;
        let name = names::instance(&spec.instance);
        let source = self.source_of(&spec).await?;
        let objects = self.instance_objects(&spec, &source)?;
        let watchdog_token = objects.iter().find_map(|o| match o {
            Object::Secret(s) => s.string_data.as_ref().and_then(|d| d.get("watchdog-token").cloned()),
            _ => None,
        });
        let sidecar_token = objects.iter().find_map(|o| match o {
            Object::Secret(s) => s.string_data.as_ref().and_then(|d| d.get("sidecar-token").cloned()),
            _ => None,
        });
        let watched = match spec.mode {
            InstanceMode::Studio => Watched::Pod,
            InstanceMode::App => Watched::Knative,
        };
        self.watch().await;
        self.tracker.track(&name, watched);
        self.made_lock().insert(spec.instance.clone(), Made { name: name.clone(), mode: spec.mode });
        let mut made = Vec::new();
        let started = async {
            self.create(objects, &spec.instance, &mut made).await?;
            self.running(&name).await
        }
        .await;
        let addr = match started {
            Ok(addr) => addr,
            Err(error) => {
                tracing::warn!(instance = %spec.instance, %error, "kubernetes instance did not start; deleting what was made");
                if let Err(cleanup) = self.delete_objects(&made, Duration::ZERO).await {
                    tracing::warn!(instance = %spec.instance, error = %cleanup, "could not delete a failed start's objects");
                }
                self.tracker.forget(&name);
                self.made_lock().remove(&spec.instance);
                return Err(error.into());
            }
        };
        let watchdog = match spec.mode {
            InstanceMode::Studio => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
                Some(format!("{host}:{}", self.config.watchdog_port))
            }
            InstanceMode::App => None,
        };
        let endpoint = Endpoint {
            instance: spec.instance.clone(),
            addr,
            watchdog_token: watchdog.as_ref().and(watchdog_token),
            watchdog,
        };
        tracing::info!(instance = %spec.instance, object = %name, addr = %endpoint.addr, "kubernetes instance running");
        Ok(Started {
            endpoint,
            sidecar_token,
            isolation: Isolation::Gvisor,
            warning: None,
            events: self.tracker.attach(&name),
        })
    }

    fn made_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Made>> {
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn stop_instance(&self, instance: &str, grace: Duration) -> Result<(), DriverError> {
        let Some(made) = self.made_lock().get(instance).cloned() else {
            return Err(DriverError::NoInstance(instance.to_owned()));
        };
        let seen = self.tracker.seen(&made.name);
        let deleted = self.delete_objects(&Self::instance_parts(&made.name, made.mode), grace).await;
        // Gone once the watch says so (or after the grace and a margin).
        if let (Some(mut seen), Ok(())) = (seen, &deleted) {
            let gone = seen.wait_for(|s| *s == Seen::Deleted);
            let _ = tokio::time::timeout(grace + Duration::from_secs(10), gone).await;
        }
        // Forgotten either way: the lifecycle that asked ends now, and an
        // object a failed delete left is the operator's (the log says so).
        self.tracker.forget(&made.name);
        self.made_lock().remove(instance);
        Ok(deleted?)
    }

    async fn instance_logs(&self, instance: &str, lines: usize) -> Result<Vec<String>, DriverError> {
        let Some(made) = self.made_lock().get(instance).cloned() else {
            return Err(DriverError::NoInstance(instance.to_owned()));
        };
        let pod = match made.mode {
            InstanceMode::Studio => made.name.clone(),
            InstanceMode::App => {
                let params = ListParams::default().labels(&format!("{INSTANCE_LABEL}={}", made.name));
                let api = self.pods();
                let pods =
                    calls::retried(&self.config.retry, &self.metrics, "listing the App's pods", || api.list(&params))
                        .await?;
                match pods.items.first() {
                    Some(pod) => pod.name_any(),
                    None => return Ok(vec!["(no pod: the App is scaled to zero)".to_owned()]),
                }
            }
        };
        let tail = i64::try_from(lines).unwrap_or(i64::MAX);
        // The user's code writes the log: a line without end must not be
        // read whole into the panel manager.
        let mut params = LogParams {
            container: Some(PANEL_CONTAINER.to_owned()),
            tail_lines: Some(tail),
            limit_bytes: Some(LOG_TAIL_BYTES),
            ..LogParams::default()
        };
        let what = format!("reading the log of {pod}");
        let api = self.pods();
        let current = calls::retried(&self.config.retry, &self.metrics, &what, || api.logs(&pod, &params)).await;
        let text = match current {
            Ok(text) if !text.is_empty() => text,
            // A container waiting to restart has no log, nor one just
            // restarted: the crash is in the last run's.
            Ok(_) | Err(KubeError::Refused(_)) => {
                params.previous = true;
                calls::retried(&self.config.retry, &self.metrics, &what, || api.logs(&pod, &params)).await?
            }
            Err(error) => return Err(error.into()),
        };
        Ok(text.lines().map(str::to_owned).collect())
    }
}

/// The name of `instance`'s Pod (Studio) or Knative Service (App), as
/// `kubectl` shows it.
pub fn object_name(instance: &str) -> String {
    names::instance(instance)
}

/// The name of `panel`'s Studio volume claim.
pub fn claim_name(panel: &str) -> String {
    names::claim(panel)
}

impl RuntimeDriver for KubeDriver {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn volume(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Volume, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        Box::pin(async move { self.create_volume(&panel, &source).await })
    }

    fn snapshot(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Snapshot, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        Box::pin(async move { self.take_snapshot(&panel, &source).await })
    }

    fn start(&self, spec: InstanceSpec) -> BoxFuture<'_, Result<Started, DriverError>> {
        Box::pin(self.start_instance(spec))
    }

    fn restart(&self, instance: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        let known = self.made_lock().contains_key(instance);
        let instance = instance.to_owned();
        Box::pin(async move {
            if known {
                Ok(())
            } else {
                Err(DriverError::NoInstance(instance))
            }
        })
    }

    fn stop(&self, instance: &str, grace: Duration) -> BoxFuture<'_, Result<(), DriverError>> {
        let instance = instance.to_owned();
        Box::pin(async move { self.stop_instance(&instance, grace).await })
    }

    fn logs(&self, instance: &str, lines: usize) -> BoxFuture<'_, Result<Vec<String>, DriverError>> {
        let instance = instance.to_owned();
        Box::pin(async move { self.instance_logs(&instance, lines).await })
    }

    fn forget(&self, panel: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        let panel = panel.to_owned();
        Box::pin(async move {
            check_id("panel", &panel)?;
            let selector = format!("nexus.dev/panel-key={}", names::panel_key(&panel));
            let params = ListParams::default().labels(&selector);
            let (retry, metrics) = (&self.config.retry, &self.metrics);
            let api = self.claims();
            let claims = calls::retried(retry, metrics, "listing the panel's claims", || api.list(&params)).await?;
            let claims: Vec<(Kind, String)> = claims.items.iter().map(|c| (Kind::Claim, c.name_any())).collect();
            self.delete_objects(&claims, Duration::ZERO).await?;
            tracing::info!(%panel, "panel's claims deleted");
            Ok(())
        })
    }
}
