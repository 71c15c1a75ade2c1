//! What the cluster says about the driver's instances, from two watches
//! (`kube::runtime::watcher`, never a polling loop): one on the namespace's
//! Nexus Pods (Studio), one on its Knative Services (App).
//!
//! Each change becomes the instance's latest [`Seen`] (what a start waits
//! for) and, once the instance is started, an [`InstanceEvent`]: a
//! container restart by the kubelet is an `Exited { restarted: true }`, a
//! Pod or Service deleted or evicted from under the driver is `Gone`. It
//! decides nothing; the lifecycle does.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::super::driver::{InstanceEvent, LimitHit};
use crate::telemetry::Metrics;

/// The labels the watches select on: Studio Pods (never the Pods of App
/// revisions, which carry the App's labels), and App Services.
const STUDIO_PODS: &str = "app.kubernetes.io/managed-by=nexus,app.kubernetes.io/component=panel,nexus.dev/mode=studio";
const APP_SERVICES: &str = "app.kubernetes.io/managed-by=nexus,app.kubernetes.io/component=panel,nexus.dev/mode=app";
/// The label naming an object's instance (its Pod's or Service's name).
pub(super) const INSTANCE_LABEL: &str = "nexus.dev/instance-key";
/// The user's container in every instance.
pub(super) const PANEL_CONTAINER: &str = "panel";

/// Waiting reasons that no wait will cure, in any container: the start
/// fails with them (and with an init container's crash loop: the volume
/// cannot be made ready). `ErrImagePull` and `CreateContainer*` are often
/// passing (a registry's 429, a Secret not yet in the kubelet's cache):
/// the kubelet tries again and says `ImagePullBackOff` when it gives up.
const HOPELESS: &[&str] = &["ImagePullBackOff", "InvalidImageName"];
const INIT_HOPELESS: &str = "CrashLoopBackOff";

/// The latest word on one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    /// Nothing yet.
    Nothing,
    /// Created, not running yet (why, when the cluster says).
    Pending(String),
    /// Serving at `host:port`.
    Serving(String),
    /// It cannot run (an image that does not pull, an eviction, a failed
    /// revision).
    Failed(String),
    /// Deleted.
    Deleted,
}

/// Which watch an instance is seen by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watched {
    Pod,
    Knative,
}

struct Tracked {
    watched: Watched,
    seen: watch::Sender<Seen>,
    /// Buffered from the first change on, so nothing between the start's
    /// end and the lifecycle's reading is lost.
    events: mpsc::UnboundedSender<InstanceEvent>,
    receiver: Option<mpsc::UnboundedReceiver<InstanceEvent>>,
    restarts: i32,
    /// Its deletion was reported (it may stay Terminating a long while).
    deleting: bool,
}

/// The instances the driver runs, by object name, and what was seen of them.
pub(super) struct Tracker {
    instances: Mutex<HashMap<String, Tracked>>,
    panel_port: u16,
    metrics: Metrics,
}

impl Tracker {
    pub(super) fn new(panel_port: u16, metrics: Metrics) -> Tracker {
        Tracker { instances: Mutex::new(HashMap::new()), panel_port, metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts following `name` (before it is created, so no change is missed).
    pub(super) fn track(&self, name: &str, watched: Watched) -> watch::Receiver<Seen> {
        let (seen, rx) = watch::channel(Seen::Nothing);
        let (events, receiver) = mpsc::unbounded_channel();
        let tracked = Tracked { watched, seen, events, receiver: Some(receiver), restarts: 0, deleting: false };
        self.lock().insert(name.to_owned(), tracked);
        rx
    }

    /// What was seen of `name` last, and a receiver of what comes next.
    pub(super) fn seen(&self, name: &str) -> Option<watch::Receiver<Seen>> {
        self.lock().get(name).map(|t| t.seen.subscribe())
    }

    /// The changes of the started instance `name`, from its first on.
    pub(super) fn attach(&self, name: &str) -> mpsc::UnboundedReceiver<InstanceEvent> {
        match self.lock().get_mut(name).and_then(|t| t.receiver.take()) {
            Some(receiver) => receiver,
            None => mpsc::unbounded_channel().1,
        }
    }

    /// Stops following `name`.
    pub(super) fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    fn pod(&self, pod: &Pod) {
        let Some(name) = pod.labels().get(INSTANCE_LABEL).cloned() else { return };
        let mut instances = self.lock();
        let Some(tracked) = instances.get_mut(&name).filter(|t| t.watched == Watched::Pod) else { return };
        // A Pod being deleted reaches a terminal phase first: that is its
        // deletion, not a failure; and one stuck Terminating (its node gone)
        // must not be left routed, so the deletion is reported at once.
        if pod.metadata.deletion_timestamp.is_some() {
            return Self::deleting(tracked, "pod");
        }
        let status = pod.status.clone().unwrap_or_default();
        let init_failed = status.init_container_statuses.iter().flatten().find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            (reason == INIT_HOPELESS || HOPELESS.contains(&reason)).then(|| {
                format!("init container {}: {reason}: {}", c.name, waiting.message.clone().unwrap_or_default())
            })
        });
        let panel = status.container_statuses.iter().flatten().find(|c| c.name == PANEL_CONTAINER).cloned();
        if let Some(panel) = &panel {
            if panel.restart_count > tracked.restarts {
                tracked.restarts = panel.restart_count;
                let terminated = panel.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                let code = terminated.map(|t| t.exit_code);
                let oom = terminated.and_then(|t| t.reason.as_deref()) == Some("OOMKilled");
                let limit = oom.then_some(LimitHit::Memory);
                let _ = tracked.events.send(InstanceEvent::Exited { code, limit, restarted: true });
            }
        }
        let hopeless = status.container_statuses.iter().flatten().find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            waiting.reason.as_deref().is_some_and(|r| HOPELESS.contains(&r)).then(|| (c.name.clone(), waiting.clone()))
        });
        let phase = status.phase.as_deref().unwrap_or("Pending");
        let seen = if let Some(reason) = init_failed {
            Seen::Failed(reason)
        } else if let Some((container, waiting)) = hopeless {
            let reason = waiting.reason.clone().unwrap_or_default();
            Seen::Failed(format!("container {container}: {reason}: {}", waiting.message.clone().unwrap_or_default()))
        } else if matches!(phase, "Failed" | "Succeeded") {
            let why = status.reason.clone().unwrap_or_else(|| phase.to_owned());
            Seen::Failed(format!("the pod ended: {why}: {}", status.message.clone().unwrap_or_default()))
        } else if let (Some(ip), "Running") = (status.pod_ip.as_deref(), phase) {
            Seen::Serving(join_host_port(ip, self.panel_port))
        } else {
            let unscheduled = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False");
            Seen::Pending(unscheduled.and_then(|c| c.message).unwrap_or_else(|| phase.to_owned()))
        };
        self.see(&name, tracked, seen);
    }

    fn knative(&self, service: &DynamicObject) {
        let Some(name) = service.labels().get(INSTANCE_LABEL).cloned() else { return };
        let mut instances = self.lock();
        let Some(tracked) = instances.get_mut(&name).filter(|t| t.watched == Watched::Knative) else { return };
        if service.metadata.deletion_timestamp.is_some() {
            return Self::deleting(tracked, "Knative Service");
        }
        let status = &service.data["status"];
        let ready = status["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Ready");
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let seen = match ready.map(|c| (text(&c["status"]), c)) {
            Some((s, _)) if s == "True" => {
                let url = status["address"]["url"].as_str().or(status["url"].as_str()).unwrap_or("");
                match url_host_port(url) {
                    Some(addr) => Seen::Serving(addr),
                    None => Seen::Pending(format!("ready without a usable address: {url:?}")),
                }
            }
            Some((s, c)) if s == "False" => Seen::Failed(format!("{}: {}", text(&c["reason"]), text(&c["message"]))),
            Some((_, c)) => Seen::Pending(text(&c["message"])),
            None => Seen::Pending("no status yet".to_owned()),
        };
        self.see(&name, tracked, seen);
    }

    /// Records `seen`; an instance that comes to fail is gone (a start
    /// still under way fails on the same word, and drops the report).
    fn see(&self, name: &str, tracked: &mut Tracked, seen: Seen) {
        let was_failed = matches!(*tracked.seen.borrow(), Seen::Failed(_));
        if let (Seen::Failed(reason), false) = (&seen, was_failed) {
            let _ = tracked.events.send(InstanceEvent::Gone { reason: reason.clone(), failed: true });
        }
        tracing::debug!(instance = name, ?seen, "kubernetes instance seen");
        tracked.seen.send_replace(seen);
    }

    /// Reports the deletion once (`Seen` stays, so a stop still waits for
    /// the object to go).
    fn deleting(tracked: &mut Tracked, what: &str) {
        if !tracked.deleting {
            tracked.deleting = true;
            let reason = format!("the instance's {what} was deleted (by its watchdog, or outside Nexus)");
            let _ = tracked.events.send(InstanceEvent::Gone { reason, failed: false });
        }
    }

    fn deleted(&self, name: &str, watched: Watched) {
        let mut instances = self.lock();
        let Some(tracked) = instances.get_mut(name).filter(|t| t.watched == watched) else { return };
        let what = match tracked.watched {
            Watched::Pod => "pod",
            Watched::Knative => "Knative Service",
        };
        Self::deleting(tracked, what);
        tracked.seen.send_replace(Seen::Deleted);
    }

    /// After a (re)list: whatever of `watched` was seen before but is not
    /// listed now was deleted while the watch was down.
    fn relisted(&self, watched: Watched, listed: &HashSet<String>) {
        let missing: Vec<String> = self
            .lock()
            .iter()
            .filter(|(name, t)| {
                let known = !matches!(*t.seen.borrow(), Seen::Nothing | Seen::Deleted);
                t.watched == watched && known && !listed.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in missing {
            self.deleted(&name, watched);
        }
    }
}

/// `host:port`, bracketing IPv6 addresses.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port` of an `http://` or `https://` URL (default ports filled in).
fn url_host_port(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let default = match uri.scheme_str()? {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    Some(join_host_port(uri.host()?, uri.port_u16().unwrap_or(default)))
}

/// Follows `api`'s Nexus objects until the runtime stops; reconnects with
/// backoff.
pub(super) async fn follow<K>(api: Api<K>, tracker: Arc<Tracker>, watched: Watched)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + AsObserved + 'static,
{
    let (label, selector) = match watched {
        Watched::Pod => ("pod", STUDIO_PODS),
        Watched::Knative => ("knative_service", APP_SERVICES),
    };
    let events = watcher::watcher(api, watcher::Config::default().labels(selector)).default_backoff();
    let mut events = std::pin::pin!(events.into_stream());
    let mut listing: Option<HashSet<String>> = None;
    while let Some(event) = events.next().await {
        tracker.metrics.kube_watch_events.with_label_values(&[label]).inc();
        tracing::trace!(watch = label, "nexus_kube_watch_events_total");
        match event {
            Ok(Event::Init) => listing = Some(HashSet::new()),
            Ok(Event::InitApply(object)) => {
                if let (Some(listing), Some(name)) = (listing.as_mut(), object.labels().get(INSTANCE_LABEL)) {
                    listing.insert(name.clone());
                }
                object.observe(&tracker);
            }
            Ok(Event::InitDone) => {
                if let Some(listed) = listing.take() {
                    tracker.relisted(watched, &listed);
                }
            }
            Ok(Event::Apply(object)) => object.observe(&tracker),
            Ok(Event::Delete(object)) => {
                if let Some(name) = object.labels().get(INSTANCE_LABEL) {
                    tracker.deleted(name, watched);
                }
            }
            Err(error) => tracing::warn!(watch = label, %error, "kubernetes watch interrupted; it reconnects"),
        }
    }
}

/// How a watched object updates the tracker.
pub(super) trait AsObserved {
    fn observe(&self, tracker: &Tracker);
}

impl AsObserved for Pod {
    fn observe(&self, tracker: &Tracker) {
        tracker.pod(self);
    }
}

impl AsObserved for DynamicObject {
    fn observe(&self, tracker: &Tracker) {
        tracker.knative(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_urls_and_ips() {
        assert_eq!(
            url_host_port("http://p-a.nexus-panels.svc.cluster.local").as_deref(),
            Some("p-a.nexus-panels.svc.cluster.local:80")
        );
        assert_eq!(url_host_port("https://a.example:8443/x").as_deref(), Some("a.example:8443"));
        assert_eq!(url_host_port("ftp://a"), None);
        assert_eq!(url_host_port(""), None);
        assert_eq!(join_host_port("fd00::1", 8080), "[fd00::1]:8080");
    }
}
