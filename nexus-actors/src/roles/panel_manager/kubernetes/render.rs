//! The manifests, from the operator's templates: `deploy/k8s/templates/
//! dev_pod.yaml` (Studio) and `prod_service.yaml` (App), Jinja2 syntax
//! rendered with minijinja, then parsed into typed objects. The driver
//! builds these objects no other way.
//!
//! Every value is written as JSON (auto-escaping is JSON for every
//! template), so no value can add a field or end a string; and a rendered
//! manifest is refused unless it holds exactly the objects asked for, by
//! kind, name and namespace, with the instance's label, and asks for
//! nothing [`super::policy`] forbids.

use std::path::Path;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::DynamicObject;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{policy, KubeError};

/// The Studio template's file name.
pub(super) const DEV_POD: &str = "dev_pod.yaml";
/// The App template's file name.
pub(super) const PROD_SERVICE: &str = "prod_service.yaml";

const EMBEDDED_DEV_POD: &str = include_str!("../../../../../deploy/k8s/templates/dev_pod.yaml");
const EMBEDDED_PROD_SERVICE: &str = include_str!("../../../../../deploy/k8s/templates/prod_service.yaml");

/// Everything a template may use. Strings the driver made or checked; all
/// of them are written as JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Values {
    /// `volume` / `instance` (Studio), `snapshot` / `instance` (App).
    pub part: &'static str,
    /// `studio` or `app`.
    pub mode: &'static str,
    pub namespace: String,
    /// The instance's Pod or Knative Service, and its label.
    pub name: String,
    pub instance: String,
    pub panel: String,
    pub panel_key: String,
    pub node_key: String,
    pub owner: String,
    pub source: String,
    /// The Studio volume's claim.
    pub claim: String,
    /// A snapshot's claim and version.
    pub snapshot: String,
    pub version: u64,
    pub secret: String,
    pub service_account: String,
    pub sidecar_token: String,
    pub watchdog_token: String,
    pub nexus_image: String,
    pub panel_image: String,
    pub runtime_class: String,
    pub storage_class: Option<String>,
    pub redis_secret: String,
    /// Quantities: `512Mi`, `1000m`.
    pub memory: String,
    pub cpu: String,
    pub disk: String,
    /// An App's ephemeral storage: its copy of the code and its scratch.
    pub app_disk: String,
    pub volume_size: String,
    pub panel_port: u16,
    pub watchdog_port: u16,
    pub watchdog_timeout_secs: u64,
}

/// One object of a rendered manifest.
#[derive(Debug, Clone)]
pub(super) enum Object {
    Claim(Box<PersistentVolumeClaim>),
    Secret(Box<Secret>),
    ServiceAccount(Box<ServiceAccount>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    Pod(Box<Pod>),
    /// `serving.knative.dev/v1` Service.
    Knative(Box<DynamicObject>),
}

/// The kinds a template may render, by `apiVersion` and `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Claim,
    Secret,
    ServiceAccount,
    Role,
    RoleBinding,
    Pod,
    Knative,
}

impl Kind {
    /// The kind's name, for logs and errors.
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Claim => "PersistentVolumeClaim",
            Kind::Secret => "Secret",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Role => "Role",
            Kind::RoleBinding => "RoleBinding",
            Kind::Pod => "Pod",
            Kind::Knative => "Knative Service",
        }
    }

    fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("v1", "PersistentVolumeClaim") => Kind::Claim,
            ("v1", "Secret") => Kind::Secret,
            ("v1", "ServiceAccount") => Kind::ServiceAccount,
            ("rbac.authorization.k8s.io/v1", "Role") => Kind::Role,
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => Kind::RoleBinding,
            ("v1", "Pod") => Kind::Pod,
            ("serving.knative.dev/v1", "Service") => Kind::Knative,
            _ => return None,
        })
    }
}

/// The operator's two templates, compiled.
pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    /// The templates of `deploy/k8s/templates` as this binary was built.
    pub fn embedded() -> Templates {
        Templates::from_sources(EMBEDDED_DEV_POD.to_owned(), EMBEDDED_PROD_SERVICE.to_owned())
            .expect("the embedded templates compile (tested)")
    }

    /// The operator's `dev_pod.yaml` and `prod_service.yaml` in `dir`.
    pub fn load(dir: &Path) -> Result<Templates, KubeError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| KubeError::Template(format!("{}: {e}", dir.join(name).display())))
        };
        Templates::from_sources(read(DEV_POD)?, read(PROD_SERVICE)?)
    }

    fn from_sources(dev_pod: String, prod_service: String) -> Result<Templates, KubeError> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Json);
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template_owned(DEV_POD, dev_pod).map_err(|e| KubeError::Template(format!("{DEV_POD}: {e:#}")))?;
        env.add_template_owned(PROD_SERVICE, prod_service)
            .map_err(|e| KubeError::Template(format!("{PROD_SERVICE}: {e:#}")))?;
        Ok(Templates { env })
    }

    /// The YAML text `template` renders for `values`.
    pub(super) fn text(&self, template: &str, values: &Values) -> Result<String, KubeError> {
        let compiled = self.env.get_template(template).map_err(|e| KubeError::Template(e.to_string()))?;
        compiled.render(values).map_err(|e| KubeError::Template(format!("{template}: {e:#}")))
    }

    /// Renders `template` and returns its objects, checked against
    /// `expect`: exactly these kinds and names, in any order.
    pub(super) fn render(
        &self,
        template: &str,
        values: &Values,
        expect: &[(Kind, &str)],
    ) -> Result<Vec<Object>, KubeError> {
        let text = self.text(template, values)?;
        let refuse = |why: String| KubeError::Template(format!("{template} ({} part): {why}", values.part));
        let mut docs = Vec::new();
        for document in serde_norway::Deserializer::from_str(&text) {
            let doc = Value::deserialize(document).map_err(|e| refuse(format!("not YAML: {e}")))?;
            if !doc.is_null() {
                docs.push(doc);
            }
        }
        let mut wanted: Vec<(Kind, &str)> = expect.to_vec();
        let mut objects = Vec::new();
        for doc in docs {
            let (api_version, kind) = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
            let kind = Kind::of(api_version, kind).ok_or_else(|| refuse(format!("unexpected {api_version}/{kind}")))?;
            let name = doc["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let Some(at) = wanted.iter().position(|(k, n)| *k == kind && *n == name) else {
                return Err(refuse(format!("unexpected {kind:?} named {name:?}")));
            };
            wanted.swap_remove(at);
            if doc["metadata"]["namespace"].as_str() != Some(values.namespace.as_str()) {
                return Err(refuse(format!("{kind:?} {name}: not in namespace {}", values.namespace)));
            }
            if values.part == "instance" {
                // What the watches, the sweep and the ownership checks find
                // an instance's objects by.
                let labels = &doc["metadata"]["labels"];
                let expected = [
                    ("app.kubernetes.io/managed-by", "nexus"),
                    ("app.kubernetes.io/component", "panel"),
                    ("nexus.dev/instance-key", values.name.as_str()),
                    ("nexus.dev/mode", values.mode),
                    ("nexus.dev/node", values.node_key.as_str()),
                ];
                if let Some((label, value)) = expected.iter().find(|(l, v)| labels[*l].as_str() != Some(*v)) {
                    return Err(refuse(format!("{kind:?} {name}: label {label} is not {value:?}")));
                }
                if doc["metadata"]["annotations"]["nexus.dev/instance"].as_str() != Some(values.instance.as_str()) {
                    return Err(refuse(format!(
                        "{kind:?} {name}: annotation nexus.dev/instance is not {:?}",
                        values.instance
                    )));
                }
            }
            policy::check(kind, &doc, values).map_err(|why| refuse(format!("{kind:?} {name}: {why}")))?;
            objects.push(typed(kind, doc).map_err(|e| refuse(format!("{kind:?} {name}: {e}")))?);
        }
        if let Some((kind, name)) = wanted.first() {
            return Err(refuse(format!("no {kind:?} named {name:?}")));
        }
        Ok(objects)
    }
}

fn typed(kind: Kind, doc: Value) -> Result<Object, serde_json::Error> {
    Ok(match kind {
        Kind::Claim => Object::Claim(Box::new(serde_json::from_value(doc)?)),
        Kind::Secret => Object::Secret(Box::new(serde_json::from_value(doc)?)),
        Kind::ServiceAccount => Object::ServiceAccount(Box::new(serde_json::from_value(doc)?)),
        Kind::Role => Object::Role(Box::new(serde_json::from_value(doc)?)),
        Kind::RoleBinding => Object::RoleBinding(Box::new(serde_json::from_value(doc)?)),
        Kind::Pod => Object::Pod(Box::new(serde_json::from_value(doc)?)),
        Kind::Knative => Object::Knative(Box::new(serde_json::from_value(doc)?)),
    })
}
