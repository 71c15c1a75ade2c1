//! The exact requests of a Studio and an App instance's life, and the
//! watch driving every state.

use std::time::Duration;

use nexus_actors::roles::panel_manager::driver::{InstanceEvent, LimitHit, RuntimeDriver};
use nexus_actors::roles::panel_manager::kubernetes::{claim_name, object_name};
use serde_json::{json, Value};

use super::common::{app, driver, studio, until, NS};
use nexus_testkit::kube_api::MockKube;

/// A Pod status: running at `ip`, the panel container restarted `restarts`
/// times, the last run ended as `last` (exit code, reason).
pub(crate) fn running(ip: &str, restarts: i32, last: Option<(i32, &str)>) -> Value {
    let last_state = match last {
        Some((code, reason)) => json!({"terminated": {"exitCode": code, "reason": reason}}),
        None => json!({}),
    };
    json!({
        "phase": "Running",
        "podIP": ip,
        "containerStatuses": [{
            "name": "panel", "image": "panel", "imageID": "", "ready": true,
            "restartCount": restarts, "state": {"running": {}}, "lastState": last_state,
        }],
    })
}

fn containers(spec: &Value) -> Vec<&str> {
    spec["containers"].as_array().expect("containers").iter().filter_map(|c| c["name"].as_str()).collect()
}

#[tokio::test]
async fn a_studio_instance_is_a_pod_on_its_volume_followed_by_the_watch() {
    let mock = MockKube::start();
    let driver = driver(&mock);

    let volume = driver.volume("demo", "template:python_minimal").await.expect("the volume");
    let claim = claim_name("demo");
    assert_eq!(volume.location.as_str(), claim);
    let writes = mock.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].line(), format!("POST /api/v1/namespaces/{NS}/persistentvolumeclaims"));
    assert_eq!(writes[0].body["metadata"]["name"], claim);
    assert_eq!(writes[0].body["spec"]["resources"]["requests"]["storage"], "1024Mi");
    assert_eq!(writes[0].body["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    driver.volume("demo", "template:python_minimal").await.expect("a second time: the claim is there");

    let name = object_name("demo-1a2b");
    let start = tokio::spawn({
        let driver = std::sync::Arc::new(driver);
        let spec = studio("demo", "demo-1a2b", "alice");
        let running = driver.clone();
        async move { (running.start(spec).await, driver) }
    });
    until("the pod", || mock.object("pods", &name).is_some()).await;
    let lines: Vec<String> = mock.writes().iter().skip(2).map(|r| r.line()).collect();
    let base = format!("/api/v1/namespaces/{NS}");
    let rbac = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}");
    assert_eq!(
        lines,
        [
            format!("POST {base}/secrets"),
            format!("POST {base}/serviceaccounts"),
            format!("POST {rbac}/roles"),
            format!("POST {rbac}/rolebindings"),
            format!("POST {base}/pods"),
        ],
        "the secret and the watchdog's account come before the pod"
    );
    let pod = mock.object("pods", &name).expect("the pod");
    let spec = &pod["spec"];
    assert_eq!(spec["runtimeClassName"], "gvisor");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(containers(spec), ["panel", "sidecar", "watchdog"]);
    assert_eq!(spec["volumes"][0]["persistentVolumeClaim"]["claimName"], claim);
    let seed = &spec["initContainers"][0];
    assert_eq!(seed["args"], json!(["seed-volume", "--source", "template:python_minimal", "--dir", "/home"]));
    let panel = &spec["containers"][0];
    assert_eq!(panel["volumeMounts"][0]["mountPath"], "/home");
    assert!(
        !panel.to_string().contains("/var/run/secrets"),
        "no service-account token in the user's container: {panel}"
    );
    assert_eq!(panel["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(panel["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(pod["metadata"]["labels"]["nexus.dev/instance-key"], name);
    assert_eq!(pod["metadata"]["annotations"]["nexus.dev/instance"], "demo-1a2b");
    let role = mock.object("roles", &format!("watchdog-{name}")).expect("the watchdog's role");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "resourceNames": [name], "verbs": ["delete"]}])
    );
    let secret = mock.object("secrets", &format!("{name}-tokens")).expect("the tokens");
    let watchdog_token = secret["stringData"]["watchdog-token"].as_str().expect("a token").to_owned();
    assert_eq!(watchdog_token.len(), 64);

    // Unschedulable for now: the start keeps waiting.
    let pending = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}]});
    assert!(mock.set_status("pods", &name, pending));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!start.is_finished(), "a pending pod is not started");

    assert!(mock.set_status("pods", &name, running("10.8.0.7", 0, None)));
    let (started, driver) =
        tokio::time::timeout(Duration::from_secs(5), start).await.expect("started").expect("joined");
    let mut started = started.expect("the start");
    assert_eq!(started.endpoint.addr, "10.8.0.7:8080", "the route is the pod's IP");
    assert_eq!(started.endpoint.watchdog.as_deref(), Some("10.8.0.7:9999"));
    assert_eq!(started.endpoint.watchdog_token.as_deref(), Some(watchdog_token.as_str()));
    assert_eq!(started.sidecar_token.as_deref(), secret["stringData"]["sidecar-token"].as_str());

    // The kubelet restarts a crashed container: reported, not restarted here.
    assert!(mock.set_status("pods", &name, running("10.8.0.7", 1, Some((3, "Error")))));
    let event = tokio::time::timeout(Duration::from_secs(5), started.events.recv()).await.expect("an event");
    assert_eq!(event, Some(InstanceEvent::Exited { code: Some(3), limit: None, restarted: true }));
    assert!(mock.set_status("pods", &name, running("10.8.0.7", 2, Some((137, "OOMKilled")))));
    let event = tokio::time::timeout(Duration::from_secs(5), started.events.recv()).await.expect("an event");
    assert_eq!(event, Some(InstanceEvent::Exited { code: Some(137), limit: Some(LimitHit::Memory), restarted: true }));
    driver.restart("demo-1a2b").await.expect("a restart asks nothing of the API");

    // A container waiting to restart has no log: its last run's is read.
    mock.set_log(&name, "", "Traceback\nValueError: boom");
    let log = driver.logs("demo-1a2b", 20).await.expect("the log");
    assert_eq!(log, ["Traceback", "ValueError: boom"]);
    let log_reads: Vec<_> = mock.requests().into_iter().filter(|r| r.path.ends_with("/log")).collect();
    assert_eq!(log_reads.len(), 2);
    assert_eq!(log_reads[1].query.get("previous").map(String::as_str), Some("true"));
    assert_eq!(log_reads[1].query.get("tailLines").map(String::as_str), Some("20"));
    assert_eq!(log_reads[1].query.get("container").map(String::as_str), Some("panel"));

    // Deleted outside the driver (its watchdog did it): the terminal phase
    // a deleted Pod passes through is no failure; its removal is gone.
    assert!(mock.mark_deleting("pods", &name));
    assert!(mock.remove("pods", &name));
    let event = tokio::time::timeout(Duration::from_secs(5), started.events.recv()).await.expect("an event");
    assert!(matches!(event, Some(InstanceEvent::Gone { failed: false, .. })), "{event:?}");

    // Stopping frees the rest.
    let before = mock.writes().len();
    driver.stop("demo-1a2b", Duration::from_secs(3)).await.expect("stopped");
    let deletes: Vec<String> = mock.writes().iter().skip(before).map(|r| r.line()).collect();
    assert_eq!(
        deletes,
        [
            format!("DELETE {base}/pods/{name}"),
            format!("DELETE {rbac}/rolebindings/watchdog-{name}"),
            format!("DELETE {rbac}/roles/watchdog-{name}"),
            format!("DELETE {base}/serviceaccounts/watchdog-{name}"),
            format!("DELETE {base}/secrets/{name}-tokens"),
        ]
    );
    assert!(mock.names("secrets").is_empty() && mock.names("roles").is_empty());
    assert!(driver.stop("demo-1a2b", Duration::ZERO).await.is_err(), "a stopped instance is unknown");
}

#[tokio::test]
async fn an_app_instance_is_a_knative_service_on_a_snapshot_and_routes_to_its_url() {
    let mock = MockKube::start();
    let driver = std::sync::Arc::new(driver(&mock));

    let snapshot = driver.snapshot("shop", "template:node_minimal").await.expect("a snapshot");
    assert_eq!(snapshot.version, 1);
    let clone = mock.object("persistentvolumeclaims", snapshot.location.as_str()).expect("the snapshot claim");
    assert_eq!(clone["spec"]["dataSource"], json!({"kind": "PersistentVolumeClaim", "name": claim_name("shop")}));
    assert_eq!(clone["spec"]["accessModes"], json!(["ReadOnlyMany"]));
    let second = driver.snapshot("shop", "template:node_minimal").await.expect("a second snapshot");
    assert_eq!(second.version, 2, "versions count up from the claims there");

    let name = object_name("shop-9f");
    let start = tokio::spawn({
        let (driver, spec) = (driver.clone(), app(second.clone(), "shop-9f"));
        async move { driver.start(spec).await }
    });
    until("the service", || mock.object("services", &name).is_some()).await;
    let knative = format!("/apis/serving.knative.dev/v1/namespaces/{NS}/services");
    let last: Vec<String> = mock.writes().iter().rev().take(2).map(|r| r.line()).collect();
    assert_eq!(last, [format!("POST {knative}"), format!("POST /api/v1/namespaces/{NS}/secrets")]);
    let service = mock.object("services", &name).expect("the service");
    assert_eq!(service["apiVersion"], "serving.knative.dev/v1");
    let template = &service["spec"]["template"];
    let inits: Vec<&str> = template["spec"]["initContainers"]
        .as_array()
        .expect("init")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(inits, ["copy", "seed"], "a snapshot never edited is seeded from its template");
    assert_eq!(template["spec"]["initContainers"][1]["args"][2], "template:node_minimal");
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["autoscaling.knative.dev/min-scale"], "0");
    assert_eq!(annotations["autoscaling.knative.dev/window"], "60s");
    assert_eq!(template["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(containers(&template["spec"]), ["panel", "sidecar"], "no watchdog in an App");
    assert_eq!(template["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], second.location.as_str());
    assert_eq!(service["metadata"]["labels"]["networking.knative.dev/visibility"], "cluster-local");

    // The revision's Pod runs before the Service is ready; it is Knative's,
    // not a route: the start waits for the Service.
    let revision_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-00001-deployment-x"), "namespace": NS, "labels": template["metadata"]["labels"]},
        "status": {"phase": "Running", "podIP": "10.9.9.9"},
    });
    mock.put(&format!("/api/v1/namespaces/{NS}/pods"), revision_pod);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!start.is_finished(), "a revision's pod is no endpoint");
    let ready = json!({
        "conditions": [{"type": "Ready", "status": "True"}],
        "url": "http://shop.example.com",
        "address": {"url": format!("http://{name}.{NS}.svc.cluster.local")},
    });
    assert!(mock.set_status("services", &name, ready));
    let mut started = tokio::time::timeout(Duration::from_secs(5), start)
        .await
        .expect("started")
        .expect("joined")
        .expect("the start");
    assert_eq!(started.endpoint.addr, format!("{name}.{NS}.svc.cluster.local:80"), "the cluster-local URL");
    assert_eq!(started.endpoint.watchdog, None);
    assert!(mock.remove("pods", &format!("{name}-00001-deployment-x")), "scaled to zero");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(started.events.try_recv().is_err(), "a revision's pod going is no news of the App");

    let failed = json!({"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": "exec format error"}]});
    assert!(mock.set_status("services", &name, failed));
    let event = tokio::time::timeout(Duration::from_secs(5), started.events.recv()).await.expect("an event");
    match event {
        Some(InstanceEvent::Gone { reason, failed: true }) => assert!(reason.contains("RevisionFailed"), "{reason}"),
        other => panic!("expected a failed Gone, got {other:?}"),
    }
    driver.stop("shop-9f", Duration::ZERO).await.expect("stopped");
    let last: Vec<String> = mock.writes().iter().rev().take(2).map(|r| r.line()).collect();
    assert_eq!(
        last,
        [format!("DELETE /api/v1/namespaces/{NS}/secrets/{name}-tokens"), format!("DELETE {knative}/{name}")]
    );

    driver.forget("shop").await.expect("forgotten");
    assert!(mock.names("persistentvolumeclaims").is_empty(), "volume and snapshots deleted");
}

#[tokio::test]
async fn snapshots_are_numbered_once_pruned_and_only_a_panels_own_claims_run() {
    let mock = MockKube::start();
    let driver = std::sync::Arc::new(driver(&mock));
    // Two deploys at once take two numbers.
    let (one, two) = tokio::join!(driver.snapshot("shop", "template:empty"), driver.snapshot("shop", "template:empty"));
    let mut versions = [one.expect("one").version, two.expect("two").version];
    versions.sort();
    assert_eq!(versions, [1, 2]);
    // A number taken by someone else is skipped, not shared.
    let third = driver.snapshot("shop", "template:empty").await.expect("three");
    let foreign = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": third.location.as_str().replace("-v3", "-v4"), "namespace": NS},
    });
    mock.put(&format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"), foreign);
    // An App still runs v2 (its deploy was the last to succeed).
    let v2 = third.location.as_str().replace("-v3", "-v2");
    let running = json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service",
        "metadata": {"name": "p-shop-app", "namespace": NS, "labels": {"nexus.dev/panel-key": mock.object("persistentvolumeclaims", &v2).expect("v2")["metadata"]["labels"]["nexus.dev/panel-key"]}},
        "spec": {"template": {"spec": {"volumes": [{"name": "snapshot", "persistentVolumeClaim": {"claimName": v2}}]}}},
    });
    mock.put(&format!("/apis/serving.knative.dev/v1/namespaces/{NS}/services"), running);
    let fifth = driver.snapshot("shop", "template:empty").await.expect("five");
    assert_eq!(fifth.version, 5, "v4 is someone else's");
    // Three numbers from the newest are kept, and one an App runs, and
    // nobody else's is touched.
    let left: Vec<String> =
        mock.names("persistentvolumeclaims").into_iter().filter(|n| n.starts_with("snap-")).collect();
    assert_eq!(left.len(), 4, "v2 (running), v3 and v5, and someone else's v4: {left:?}");
    assert!(!left.iter().any(|n| n.ends_with("-v1")), "{left:?}");

    // Another panel's claim is never mounted, whatever the record says.
    let mut stolen = app(fifth.clone(), "thief-1");
    stolen.panel = "thief".to_owned();
    let before = mock.writes().len();
    let error = driver.start(stolen).await.err().expect("refused");
    assert!(error.to_string().contains("claim of the panel"), "{error}");
    assert_eq!(mock.writes().len(), before, "nothing made");
}
