//! The panel manager over the `kubernetes` driver and a mock API server:
//! the gateway's route follows the watch (the Pod's IP once it runs and
//! answers `/manifest`), a restart by the kubelet is counted, and a Pod
//! deleted from under the manager (its watchdog's expiry) ends the
//! instance and its route.

use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use nexus_actors::instance::InstanceState;
use nexus_actors::roles::panel_manager::kubernetes::{object_name, KubeConfig, KubeDriver, Templates};
use nexus_actors::telemetry::Metrics;
use nexus_testkit::kube_api::MockKube;
use nexus_testkit::Brokers;
use serde_json::json;

use super::harness::{new_panel, node_over};
use super::kube_common::{client, settings};

/// What the mock's "Pod" serves: the panel's `/manifest`, on a loopback port.
fn panel_server() -> (u16, actix_web::dev::ServerHandle) {
    let server = HttpServer::new(|| {
        App::new().route("/manifest", web::get().to(|| async { HttpResponse::Ok().json(json!({"tools": []})) }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("a port");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (port, handle)
}

fn pod_status(restarts: i32) -> serde_json::Value {
    json!({
        "phase": "Running",
        "podIP": "127.0.0.1",
        "containerStatuses": [{
            "name": "panel", "image": "panel", "imageID": "", "ready": true, "restartCount": restarts,
            "state": {"running": {}},
            "lastState": if restarts > 0 { json!({"terminated": {"exitCode": 1, "reason": "Error"}}) } else { json!({}) },
        }],
    })
}

#[actix_rt::test]
async fn the_route_follows_the_watch_and_a_deleted_pod_ends_the_instance() {
    let mock = MockKube::start();
    let (port, _panel) = panel_server();
    let config = KubeConfig { panel_port: port, ..settings() };
    let driver = KubeDriver::with_client(config, Templates::embedded(), client(&mock), Metrics::new()).expect("driver");
    let node = node_over(Brokers::redis("pm-kube"), Arc::new(driver), |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:python_minimal").await;
    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, 201, "{created}");
    let instance = created["instance"].as_str().expect("an instance").to_owned();
    let pod = object_name(&instance);

    node.until(10, "the pod", || async { mock.object("pods", &pod) }).await;
    assert_eq!(node.status(&panel, &instance).await.map(|s| s.state), Some(InstanceState::Pending));
    assert!(node.route(&panel).await.is_none_or(|r| r.endpoints.is_empty()), "no route while pending");

    assert!(mock.set_status("pods", &pod, pod_status(0)));
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    let route = node.endpoints(&panel, 1).await;
    assert_eq!(route.endpoints[0].addr, format!("127.0.0.1:{port}"), "the pod's IP");
    assert_eq!(route.endpoints[0].watchdog.as_deref(), Some("127.0.0.1:9999"));

    // The kubelet restarted the container: counted, probed, serving again.
    assert!(mock.set_status("pods", &pod, pod_status(1)));
    let restarted = node
        .until(10, "the restart counted", || async {
            node.status(&panel, &instance).await.filter(|s| s.restarts == 1 && s.state == InstanceState::Ready)
        })
        .await;
    assert_eq!(restarted.restarts, 1);
    let creates = mock.writes().iter().filter(|r| r.method == "POST" && r.path.ends_with("/pods")).count();
    assert_eq!(creates, 1, "the manager asked for no second pod");

    // Its watchdog deleted the pod: the instance ends, its route goes, and
    // what the pod needed is deleted too.
    assert!(mock.remove("pods", &pod));
    let ended = node.state_of(&panel, &instance, InstanceState::Stopped).await;
    assert!(ended.reason.as_deref().is_some_and(|r| r.contains("deleted")), "{ended:?}");
    node.until(10, "the route gone", || async {
        node.route(&panel).await.is_none_or(|r| r.endpoints.is_empty()).then_some(())
    })
    .await;
    node.until(10, "the instance's objects deleted", || async {
        (mock.names("secrets").is_empty() && mock.names("serviceaccounts").is_empty()).then_some(())
    })
    .await;
    assert_eq!(mock.names("persistentvolumeclaims").len(), 1, "the volume stays");
}

#[actix_rt::test]
async fn a_crash_loop_ends_failed_with_the_containers_last_log_lines() {
    let mock = MockKube::start();
    let (port, panel_server) = panel_server();
    let config = KubeConfig { panel_port: port, ..settings() };
    let driver = KubeDriver::with_client(config, Templates::embedded(), client(&mock), Metrics::new()).expect("driver");
    let node = node_over(Brokers::redis("pm-kube-loop"), Arc::new(driver), |c| {
        c.ready_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:python_minimal").await;
    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, 201, "{created}");
    let instance = created["instance"].as_str().expect("an instance").to_owned();
    let pod = object_name(&instance);
    node.until(10, "the pod", || async { mock.object("pods", &pod) }).await;
    assert!(mock.set_status("pods", &pod, pod_status(0)));
    node.state_of(&panel, &instance, InstanceState::Ready).await;

    // The code now crashes at every start: the kubelet restarts it and
    // backs off, and it never serves again.
    panel_server.stop(false).await;
    mock.set_log(&pod, "", "Traceback (most recent call last):\nImportError: no module named numpy");
    assert!(mock.set_status("pods", &pod, pod_status(1)));
    node.until(10, "the first restart", || async { node.status(&panel, &instance).await.filter(|s| s.restarts == 1) })
        .await;
    assert!(mock.set_status("pods", &pod, pod_status(2)));
    let failed = node.state_of(&panel, &instance, InstanceState::Failed).await;
    let reason = failed.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("crash loop: not serving within 2s of restart 2 (last exit code 1"), "{reason}");
    assert_eq!(failed.log_tail.last().map(String::as_str), Some("ImportError: no module named numpy"), "{failed:?}");
    node.until(10, "the pod deleted", || async { mock.names("pods").is_empty().then_some(()) }).await;
}
