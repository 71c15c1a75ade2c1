//! What a rendered manifest may ask for, whatever the operator's templates
//! say: the driver's guard against a template (or a value) that would hand
//! user code a credential or the host. It reads rendered documents and
//! refuses; it renders and sends nothing.
//!
//! * The user's containers get no service-account token, no Secret but
//!   their own sidecar token, no `envFrom`; only the watchdog mounts a
//!   token, only the sidecar reads the Redis URL.
//! * Volumes from an allow-list: `emptyDir`, the instance's own claim, the
//!   watchdog's projected token (Studio). No host namespaces, no shared
//!   process namespace (every container runs as the same uid: a shared one
//!   would let user code read the watchdog's environment), no ephemeral
//!   containers, no privilege, no root, no added capabilities, no lifted
//!   seccomp; the RuntimeClass the driver reports.
//! * The watchdog's Role deletes (and may get) its own Pod and nothing
//!   else; its binding names its own account; the account mounts nothing
//!   by itself; the Secret holds exactly the tokens the driver made.

use serde_json::{json, Value};

use super::render::{Kind, Values};

/// The containers that may see what user code must not.
const WATCHDOG: &str = "watchdog";
const SIDECAR: &str = "sidecar";

/// Checks one rendered document of `kind` against the policy.
pub(super) fn check(kind: Kind, doc: &Value, values: &Values) -> Result<(), String> {
    match kind {
        Kind::Pod => check_pod(&doc["spec"], values, Some(values.service_account.as_str())),
        Kind::Knative => check_pod(&doc["spec"]["template"]["spec"], values, None),
        Kind::Role => check_role(doc, values),
        Kind::RoleBinding => check_binding(doc, values),
        Kind::ServiceAccount => match doc["automountServiceAccountToken"] == Value::Bool(false) {
            true => Ok(()),
            false => Err("the watchdog's ServiceAccount must set automountServiceAccountToken: false".to_owned()),
        },
        Kind::Secret => check_secret(doc, values),
        Kind::Claim => Ok(()),
    }
}

fn check_pod(spec: &Value, values: &Values, account: Option<&str>) -> Result<(), String> {
    if spec["automountServiceAccountToken"] != Value::Bool(false) {
        return Err("the pod must set automountServiceAccountToken: false".to_owned());
    }
    if spec["serviceAccountName"].as_str() != account {
        return Err(format!("the pod's serviceAccountName must be {account:?}"));
    }
    // The driver reports gVisor isolation: the pod must ask for it.
    if spec["runtimeClassName"].as_str() != Some(values.runtime_class.as_str()) {
        return Err(format!("the pod's runtimeClassName must be {}", values.runtime_class));
    }
    for field in ["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"] {
        if spec[field] == Value::Bool(true) {
            return Err(format!("the pod may not set {field}"));
        }
    }
    if spec.get("ephemeralContainers").is_some() {
        return Err("the pod may not have ephemeral containers".to_owned());
    }
    check_context(&spec["securityContext"]).map_err(|why| format!("the pod {why}"))?;
    if spec["securityContext"]["runAsNonRoot"] != Value::Bool(true) {
        return Err("the pod must set securityContext.runAsNonRoot: true".to_owned());
    }
    let mut token_volumes = Vec::new();
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let name = volume["name"].as_str().unwrap_or("");
        match volume_kind(volume, values, account.is_some()) {
            Some(VolumeKind::Plain) => {}
            Some(VolumeKind::Token) => token_volumes.push(name),
            None => {
                return Err(format!("volume {name}: only emptyDir, the instance's own claim and the watchdog's token"))
            }
        }
    }
    let containers = spec["containers"].as_array().into_iter().chain(spec["initContainers"].as_array()).flatten();
    for container in containers {
        let name = container["name"].as_str().unwrap_or("");
        let context = &container["securityContext"];
        if context["allowPrivilegeEscalation"] != Value::Bool(false) {
            return Err(format!("container {name} must set allowPrivilegeEscalation: false"));
        }
        check_context(context).map_err(|why| format!("container {name} {why}"))?;
        if container.get("envFrom").is_some() {
            return Err(format!("container {name} may not use envFrom"));
        }
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = mount["name"].as_str().unwrap_or("");
            if token_volumes.contains(&volume) && name != WATCHDOG {
                return Err(format!("container {name} may not mount the credentials of volume {volume}"));
            }
        }
        for env in container["env"].as_array().into_iter().flatten() {
            if env["valueFrom"].get("configMapKeyRef").is_some() {
                return Err(format!("container {name} may not read a ConfigMap"));
            }
            let Some(reference) = env["valueFrom"].get("secretKeyRef") else { continue };
            let (secret, key) = (reference["name"].as_str().unwrap_or(""), reference["key"].as_str().unwrap_or(""));
            if !may_read(name, secret, key, values) {
                return Err(format!("container {name} may not read key {key:?} of Secret {secret:?}"));
            }
        }
    }
    Ok(())
}

/// What a pod's or container's security context may not say.
fn check_context(context: &Value) -> Result<(), String> {
    if context["privileged"] == Value::Bool(true) {
        return Err("may not be privileged".to_owned());
    }
    if context["runAsNonRoot"] == Value::Bool(false) || context["runAsUser"] == json!(0) {
        return Err("may not run as root".to_owned());
    }
    if context["capabilities"]["add"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err("may not add capabilities".to_owned());
    }
    if context["seccompProfile"]["type"] == "Unconfined" || context.get("procMount").is_some_and(|p| p != "Default") {
        return Err("may not lift seccomp or /proc masking".to_owned());
    }
    Ok(())
}

enum VolumeKind {
    /// Scratch space or the instance's own code.
    Plain,
    /// The watchdog's service-account token.
    Token,
}

/// An allowed volume's kind: `emptyDir`; the instance's own claim (the
/// Studio volume, or the App's snapshot, read-only); for a Studio pod, the
/// one projected volume of the watchdog's token, the cluster's CA and the
/// namespace. Anything else (a Secret, a host path, a CSI driver, another
/// panel's claim) is `None`.
fn volume_kind(volume: &Value, values: &Values, studio: bool) -> Option<VolumeKind> {
    let object = volume.as_object()?;
    let source: Vec<&String> = object.keys().filter(|k| *k != "name").collect();
    let [source] = source.as_slice() else { return None };
    let spec = &volume[source.as_str()];
    match source.as_str() {
        "emptyDir" => Some(VolumeKind::Plain),
        "persistentVolumeClaim" => {
            let claim = spec["claimName"].as_str();
            let own =
                if studio { claim == Some(values.claim.as_str()) } else { claim == Some(values.snapshot.as_str()) };
            own.then_some(VolumeKind::Plain)
        }
        "projected" if studio => {
            let sources = spec["sources"].as_array()?;
            let allowed = sources.iter().all(|s| {
                s.get("serviceAccountToken").is_some()
                    || s.get("downwardAPI").is_some()
                    || s["configMap"]["name"] == "kube-root-ca.crt"
            });
            allowed.then_some(VolumeKind::Token)
        }
        _ => None,
    }
}

/// Which Secret keys a container may read: its instance's sidecar token
/// (user code and sidecar), the watchdog token (watchdog), the Redis URL
/// (sidecar).
fn may_read(container: &str, secret: &str, key: &str, values: &Values) -> bool {
    match (secret == values.secret, key) {
        (true, "sidecar-token") => container != WATCHDOG,
        (true, "watchdog-token") => container == WATCHDOG,
        (false, "url") => secret == values.redis_secret && container == SIDECAR,
        _ => false,
    }
}

fn check_role(doc: &Value, values: &Values) -> Result<(), String> {
    let rules = doc["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    let [rule] = rules else { return Err("the watchdog's Role must have exactly one rule".to_owned()) };
    let verbs = rule["verbs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let own_pod = rule["apiGroups"] == json!([""])
        && rule["resources"] == json!(["pods"])
        && rule["resourceNames"] == json!([values.name]);
    let only_delete = !verbs.is_empty() && verbs.iter().all(|v| v == "delete" || v == "get");
    match own_pod && only_delete && rule.get("nonResourceURLs").is_none() {
        true => Ok(()),
        false => Err(format!("the watchdog's Role may only get and delete the pod {}", values.name)),
    }
}

fn check_binding(doc: &Value, values: &Values) -> Result<(), String> {
    let role = json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": values.service_account});
    let subject = json!([{"kind": "ServiceAccount", "name": values.service_account, "namespace": values.namespace}]);
    match doc["roleRef"] == role && doc["subjects"] == subject {
        true => Ok(()),
        false => Err(format!("the RoleBinding must bind Role {0} to ServiceAccount {0} only", values.service_account)),
    }
}

fn check_secret(doc: &Value, values: &Values) -> Result<(), String> {
    // Another type (a service-account token's) would have the cluster
    // write a credential into it.
    if doc["type"] != "Opaque" {
        return Err("the instance's Secret must be of type Opaque".to_owned());
    }
    let mut expected = json!({"sidecar-token": values.sidecar_token});
    if doc["stringData"].get("watchdog-token").is_some() {
        expected["watchdog-token"] = json!(values.watchdog_token);
    }
    match doc["stringData"] == expected && doc.get("data").is_none() {
        true => Ok(()),
        false => Err("the instance's Secret must hold exactly the tokens the driver made".to_owned()),
    }
}
