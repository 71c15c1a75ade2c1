//! The API failing: 5xx and timeouts retried, quota refusals retried then
//! reported, conflicts told apart from retried creates, invalid objects
//! and images that never pull reported at once; a failed start leaves
//! nothing behind.

use hyper::Method;
use nexus_actors::roles::panel_manager::driver::RuntimeDriver;
use nexus_actors::roles::panel_manager::kubernetes::{object_name, KubeConfig, KubeDriver, Templates};
use nexus_actors::telemetry::Metrics;
use serde_json::json;

use super::common::{client, driver, settings, studio, until, NS};
use super::driver::running;
use nexus_testkit::kube_api::MockKube;

fn posts(mock: &MockKube, plural: &str) -> usize {
    mock.requests().iter().filter(|r| r.method == "POST" && r.path.ends_with(&format!("/{plural}"))).count()
}

/// Plays the kubelet: the pod runs as soon as it exists.
async fn run_when_made(mock: &MockKube, name: &str) {
    until("the pod", || mock.object("pods", name).is_some()).await;
    assert!(mock.set_status("pods", name, running("10.8.0.9", 0, None)));
}

#[tokio::test]
async fn server_errors_and_timeouts_are_retried() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    driver.volume("demo", "template:empty").await.expect("the volume");
    mock.fail(Method::POST, "/pods", 503, "etcdserver: leader changed", 2);
    mock.hang(Method::POST, "/secrets", 1);
    let name = object_name("demo-r1");
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-r1", "alice")), run_when_made(&mock, &name));
    started.expect("started after retries");
    assert_eq!(posts(&mock, "pods"), 3, "two 503s, then the pod");
    assert_eq!(posts(&mock, "secrets"), 2, "a silent server, then the secret");
}

#[tokio::test]
async fn a_quota_refusal_is_retried_then_reported_and_nothing_is_left() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    driver.volume("demo", "template:empty").await.expect("the volume");
    let quota = "pods \"p-x\" is forbidden: exceeded quota: compute, requested: memory=512Mi";
    mock.fail(Method::POST, "/pods", 403, quota, 10);
    let error = driver.start(studio("demo", "demo-q1", "alice")).await.err().expect("refused");
    let text = error.to_string();
    assert!(text.contains("after 4 attempts") && text.contains("exceeded quota"), "{text}");
    assert_eq!(posts(&mock, "pods"), 4);
    for plural in ["secrets", "serviceaccounts", "roles", "rolebindings", "pods"] {
        assert!(mock.names(plural).is_empty(), "the failed start's {plural} are deleted");
    }
}

#[tokio::test]
async fn a_name_taken_by_someone_else_is_a_conflict_but_our_own_is_ours() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    driver.volume("demo", "template:empty").await.expect("the volume");
    let name = object_name("demo-c1");
    // Someone else's secret with the instance's secret's name.
    let foreign =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-tokens"), "namespace": NS}});
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/namespaces/{NS}/secrets", mock.url());
    assert_eq!(http.post(&url).json(&foreign).send().await.expect("posted").status(), 201);
    let error = driver.start(studio("demo", "demo-c1", "alice")).await.err().expect("a conflict");
    assert!(error.to_string().contains("conflict") && error.to_string().contains("not this instance's"), "{error}");
    assert!(mock.names("pods").is_empty(), "no pod for a conflicting instance");
    assert!(mock.object("secrets", &format!("{name}-tokens")).is_some(), "someone else's secret is left alone");

    // A create the server carried out but whose answer was lost: the
    // retry's 409 finds the instance's own object and goes on.
    let name = object_name("demo-c2");
    let ours = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-tokens"), "namespace": NS,
                     "labels": {"nexus.dev/instance-key": name},
                     "annotations": {"nexus.dev/instance": "demo-c2"}},
    });
    assert_eq!(http.post(&url).json(&ours).send().await.expect("posted").status(), 201);
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-c2", "alice")), run_when_made(&mock, &name));
    started.expect("started over its own secret");
}

#[tokio::test]
async fn an_invalid_object_and_an_image_that_never_pulls_fail_at_once() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    driver.volume("demo", "template:empty").await.expect("the volume");
    mock.fail(Method::POST, "/pods", 422, "spec.containers[0].image: Required value", 1);
    let error = driver.start(studio("demo", "demo-i1", "alice")).await.err().expect("refused");
    assert!(error.to_string().contains("Required value"), "{error}");
    assert_eq!(posts(&mock, "pods"), 1, "a 422 is not retried");

    let name = object_name("demo-i2");
    let pull = async {
        until("the pod", || mock.object("pods", &name).is_some()).await;
        let status = json!({"phase": "Pending", "containerStatuses": [{
            "name": "panel", "image": "panel", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}},
        }]});
        assert!(mock.set_status("pods", &name, status));
    };
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-i2", "alice")), pull);
    let error = started.err().expect("cannot run");
    assert!(error.to_string().contains("ImagePullBackOff"), "{error}");
    until("the failed pod deleted", || mock.names("pods").is_empty()).await;

    // A seed that keeps failing: the volume cannot be made ready.
    let name = object_name("demo-i3");
    let seed = async {
        until("the pod", || mock.object("pods", &name).is_some()).await;
        let status = json!({"phase": "Pending", "initContainerStatuses": [{
            "name": "seed", "image": "nexus", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
        }]});
        assert!(mock.set_status("pods", &name, status));
    };
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-i3", "alice")), seed);
    let error = started.err().expect("cannot run");
    assert!(error.to_string().contains("init container seed: CrashLoopBackOff"), "{error}");
}

#[tokio::test]
async fn a_node_that_starts_again_sweeps_what_its_last_run_left_and_nothing_else() {
    let mock = MockKube::start();
    let config = || KubeConfig { node: "node-a".to_owned(), ..settings() };
    let first =
        KubeDriver::with_client(config(), Templates::embedded(), client(&mock), Metrics::new()).expect("driver");
    first.volume("demo", "template:empty").await.expect("the volume");
    let name = object_name("demo-s1");
    let (started, ()) = tokio::join!(first.start(studio("demo", "demo-s1", "alice")), run_when_made(&mock, &name));
    started.expect("started");
    drop(first);
    // Another node's instance, and a pod that is not Nexus's.
    let mut other = mock.object("pods", &name).expect("the pod");
    other["metadata"]["name"] = json!("p-other-node");
    other["metadata"]["labels"]["nexus.dev/node"] = json!("another-node");
    mock.put(&format!("/api/v1/namespaces/{NS}/pods"), other);
    let foreign = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-nexus", "namespace": NS}});
    mock.put(&format!("/api/v1/namespaces/{NS}/pods"), foreign);

    let again =
        KubeDriver::with_client(config(), Templates::embedded(), client(&mock), Metrics::new()).expect("driver");
    assert_eq!(again.sweep_stale().await.expect("swept"), 5, "pod, secret, account, role and binding");
    let mut pods = mock.names("pods");
    pods.sort();
    assert_eq!(pods, ["not-nexus", "p-other-node"]);
    for plural in ["secrets", "serviceaccounts", "roles", "rolebindings"] {
        assert!(mock.names(plural).is_empty(), "{plural} swept");
    }
    assert_eq!(mock.names("persistentvolumeclaims").len(), 1, "the panel's volume stays");
    assert_eq!(again.sweep_stale().await.expect("swept"), 0);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_found_again_as_the_instances_own() {
    let mock = MockKube::start();
    let driver = driver(&mock);
    driver.volume("demo", "template:empty").await.expect("the volume");
    // The server makes the pod, and the answer never comes: the retry's
    // 409 finds the instance's own pod.
    mock.lose_answer(Method::POST, "/pods", "", 1);
    let name = object_name("demo-l1");
    let (started, ()) = tokio::join!(driver.start(studio("demo", "demo-l1", "alice")), run_when_made(&mock, &name));
    started.expect("started over its own pod");
    assert_eq!(posts(&mock, "pods"), 2, "one lost answer, one conflict");
    assert_eq!(mock.names("pods"), [name]);
    // The same for a snapshot: its mark tells it from someone else's.
    mock.lose_answer(Method::POST, "/persistentvolumeclaims", "\"snap-", 1);
    let snapshot = driver.snapshot("demo", "template:empty").await.expect("a snapshot");
    assert_eq!(snapshot.version, 1, "the lost create is this deploy's, not a taken number");
}
