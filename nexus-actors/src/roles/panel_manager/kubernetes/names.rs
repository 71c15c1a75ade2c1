//! Kubernetes names for Nexus ids, and the checks on what operators pass.
//!
//! Panel and instance ids may hold upper case and `_` and run to 100
//! characters; Kubernetes wants lower-case DNS labels (63 at most, and a
//! Knative Service's name short enough for its revisions' names). Every
//! name is a readable slug of the id plus 64 bits of a hash of the whole
//! id, so ids that differ only in case or `_` get different names and a
//! name never grows past its limit. The raw ids travel in annotations,
//! which take any text, and an object is only taken for an instance's when
//! its annotation names that instance.

use sha2::{Digest, Sha256};

use super::KubeError;

/// A Knative Service's name becomes `<name>-00001`-style revision and
/// route names: 49 leaves room for them under 63.
const INSTANCE_NAME_MAX: usize = 49;
const NAME_MAX: usize = 63;

/// The first `chars` hex digits of the id's SHA-256.
fn hash(id: &str, chars: usize) -> String {
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..chars].to_owned()
}

/// `<prefix>-<slug of id>-<hash>`, at most `max` characters, a DNS label.
fn name(prefix: &str, id: &str, max: usize) -> String {
    let tail = hash(id, 16);
    let room = max.saturating_sub(prefix.len() + tail.len() + 2);
    let slug: String = id
        .chars()
        .map(|c| if c == '_' { '-' } else { c.to_ascii_lowercase() })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .take(room)
        .collect();
    let slug = slug.trim_matches('-');
    if slug.is_empty() {
        format!("{prefix}-{tail}")
    } else {
        format!("{prefix}-{slug}-{tail}")
    }
}

/// The Pod (Studio) or Knative Service (App) of an instance, and the value
/// of its `nexus.dev/instance-key` label.
pub(super) fn instance(instance: &str) -> String {
    name("p", instance, INSTANCE_NAME_MAX)
}

/// The PersistentVolumeClaim of a panel's Studio volume.
pub(super) fn claim(panel: &str) -> String {
    name("vol", panel, NAME_MAX)
}

/// The read-only PersistentVolumeClaim of a panel's snapshot `version`.
pub(super) fn snapshot(panel: &str, version: u64) -> String {
    format!("snap-{}-v{version}", hash(panel, 16))
}

/// The `nexus.dev/panel-key` label of a panel's objects.
pub(super) fn panel_key(panel: &str) -> String {
    hash(panel, 16)
}

/// The `nexus.dev/node` label of a node's instances.
pub(super) fn node_key(node: &str) -> String {
    hash(node, 16)
}

/// The Secret of an instance's tokens.
pub(super) fn secret(instance_name: &str) -> String {
    format!("{instance_name}-tokens")
}

/// The watchdog's ServiceAccount, Role and RoleBinding.
pub(super) fn watchdog_account(instance_name: &str) -> String {
    format!("watchdog-{instance_name}")
}

/// A DNS-1123 label (a namespace, a RuntimeClass).
pub(super) fn check_label(what: &'static str, value: &str) -> Result<(), KubeError> {
    let valid = !value.is_empty()
        && value.len() <= NAME_MAX
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    valid.then_some(()).ok_or_else(|| KubeError::Setting { what, value: value.to_owned() })
}

/// A DNS-1123 subdomain (a StorageClass, a Secret).
pub(super) fn check_subdomain(what: &'static str, value: &str) -> Result<(), KubeError> {
    let valid = !value.is_empty() && value.len() <= 253 && value.split('.').all(|part| check_label(what, part).is_ok());
    valid.then_some(()).ok_or_else(|| KubeError::Setting { what, value: value.to_owned() })
}

/// A container image reference: `[registry[:port]/]path[:tag][@digest]`
/// in the characters references allow, nothing that could end a string.
pub(super) fn check_image(what: &'static str, image: &str) -> Result<(), KubeError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@');
    let valid = !image.is_empty()
        && image.len() <= 255
        && image.bytes().all(allowed)
        && image.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && image.matches('@').count() <= 1;
    valid.then_some(()).ok_or_else(|| KubeError::Setting { what, value: image.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lower_case_labels_and_distinct() {
        let long = "A_very_Long_Panel_id-".repeat(5);
        for id in ["demo", "Panel_A", "panel-a", long.as_str(), "___", "9lives"] {
            let name = instance(id);
            assert!(name.len() <= INSTANCE_NAME_MAX, "{name}");
            check_label("name", &name).expect("a DNS label");
            assert!(name.starts_with("p-"), "starts with a letter: {name}");
            check_label("claim", &claim(id)).expect("a DNS label");
        }
        assert_ne!(instance("Panel_A"), instance("panel-a"), "the hash keeps ids apart");
        assert_eq!(instance("demo-1"), instance("demo-1"), "stable");
    }

    #[test]
    fn operator_settings_that_could_break_a_manifest_are_refused() {
        check_image("image", "ghcr.io/nexus/nexus:0.1@sha256:abc").expect("a reference");
        for bad in ["", "img\"\nkind: Secret", "a b", "-x", "x:y\n  extra: 1", "a@b@c"] {
            assert!(check_image("image", bad).is_err(), "{bad:?}");
        }
        check_label("namespace", "nexus-panels").expect("a label");
        for bad in ["Nexus", "a_b", "-a", &"a".repeat(64)] {
            assert!(check_label("namespace", bad).is_err(), "{bad:?}");
        }
        check_subdomain("storage class", "premium-rwo").expect("a subdomain");
        assert!(check_subdomain("storage class", "a..b").is_err());
    }
}
