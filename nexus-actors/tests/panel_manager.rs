//! The panel manager against a real redis-server, a real Redis bridge and
//! real panel processes: states announced on the owner's channel, routes,
//! crash restarts and failure, Studio/App rules, scale to zero, activation,
//! watchdog expiry, deleted panels, stale state after a restart, the
//! owner-only API, the running-instance quota and the sidecar secret of
//! the readiness probe.
//!
//! The driver is [`harness::ProcDriver`]: each instance a real `python3`
//! process on a host port that answers `/manifest` to its secret only;
//! [`kubernetes`] runs the manager over the `kubernetes` driver and a mock
//! Kubernetes API server.

#[path = "panel_manager/apps.rs"]
mod apps;
#[path = "panel_manager/guards.rs"]
mod guards;
#[path = "panel_manager/harness.rs"]
mod harness;
#[path = "kubernetes/common.rs"]
mod kube_common;
#[path = "panel_manager/kubernetes.rs"]
mod kubernetes;

use std::collections::HashMap;
use std::time::Duration;

use harness::{listen, new_panel, node, node_on, now_ms};
use nexus_actors::instance::{
    instances_key, last_request_key, Endpoint, ExpireInstance, InstanceMode, InstanceState, InstanceStatus, Isolation,
    PanelRoute, ROUTES_KEY, SIDECAR_TOKEN_HEADER,
};
use nexus_actors::platform::channels;
use nexus_testkit::{ApiClient, Brokers};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;

/// `GET /manifest` of the instance at `addr`, with `token` as its sidecar would send it.
async fn manifest(addr: &str, token: Option<&str>) -> StatusCode {
    let mut request = reqwest::Client::new().get(format!("http://{addr}/manifest"));
    if let Some(token) = token {
        request = request.header(SIDECAR_TOKEN_HEADER, token);
    }
    request.send().await.unwrap().status()
}

#[actix_rt::test]
async fn studio_instance_goes_pending_starting_ready_is_routed_and_stops() {
    let node = node("pm-studio", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let announced = listen(&node.brokers.redis_url(), "nexus:panels:ada").await;

    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["state"], "pending");
    assert_eq!(created["mode"], "studio");
    let instance = created["instance"].as_str().unwrap().to_owned();
    assert!(instance.starts_with(&panel), "{instance}");

    let ready = node.state_of(&panel, &instance, InstanceState::Ready).await;
    assert_eq!(ready.isolation, Isolation::None);
    assert!(ready.reason.as_deref().unwrap_or("").contains("no isolation"), "the warning is shown: {ready:?}");
    let route = node.endpoints(&panel, 1).await;
    assert_eq!((route.mode, route.activatable, route.owner.as_str()), (InstanceMode::Studio, false, "ada"));
    assert_eq!(route.endpoints[0].instance, instance);
    let token = node.driver.token(&instance).unwrap();
    assert_eq!(manifest(&route.endpoints[0].addr, Some(&token)).await, StatusCode::OK, "the route leads to the panel");

    let (status, body) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{body}");

    let (status, logs) = ada.get(&format!("/api/panels/{panel}/logs?lines=5")).await;
    assert_eq!(status, StatusCode::OK, "{logs}");
    assert_eq!(logs["instance"], instance.as_str());
    assert!(logs["lines"][0].as_str().unwrap().contains("panel serving on"), "{logs}");

    let (status, _) = ada.delete(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stopped = node.state_of(&panel, &instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("stopped by its owner"));
    let route = node.endpoints(&panel, 0).await;
    assert!(!route.activatable);
    assert!(!node.driver.is_running(&instance), "the process is gone");
    let (status, _) = ada.delete(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing left to stop");

    let (status, list) = ada.get(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["state"], "stopped");

    // Every transition was announced to the owner, in order.
    let states = node
        .until(5, "stopped announced", || async {
            let seen = announced.lock().unwrap().clone();
            let states: Vec<String> = seen
                .iter()
                .filter(|e| e["type"] == "nexus.instance.changed")
                .map(|e| e["data"]["status"]["state"].as_str().unwrap().to_owned())
                .collect();
            states.last().is_some_and(|s| s == "stopped").then_some(states)
        })
        .await;
    assert_eq!(states, ["pending", "starting", "ready", "stopping", "stopped"]);
    assert_eq!(node.metric("nexus_panel_instance_start_seconds_count{mode=\"studio\"}"), Some(1.0));
    assert_eq!(node.metric("nexus_panel_instances{mode=\"studio\",state=\"ready\"}"), Some(0.0));
}

#[actix_rt::test]
async fn a_crashing_panel_is_restarted_with_backoff_then_fails_with_its_log_tail() {
    let node = node("pm-crash", |c| c.max_crashes = 2).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:crash").await;
    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let instance = created["instance"].as_str().unwrap();

    let failed = node.state_of(&panel, instance, InstanceState::Failed).await;
    assert_eq!(failed.restarts, 2);
    let reason = failed.reason.unwrap();
    assert!(reason.starts_with("crashed 3 times; last exit code 3"), "{reason}");
    assert!(failed.log_tail.iter().any(|l| l.contains("boom: the panel cannot start")), "{:?}", failed.log_tail);
    assert!(failed.log_tail.len() <= 20);
    assert_eq!(node.metric("nexus_panel_instance_restarts_total"), Some(2.0));
    assert_eq!(node.metric("nexus_panel_instance_failures_total"), Some(1.0));
    let route = node.route(&panel).await.unwrap();
    assert!(route.endpoints.is_empty());
    // A failed instance is final: a new Studio start is allowed.
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[actix_rt::test]
async fn a_panel_that_never_answers_fails_after_the_ready_timeout() {
    let node = node("pm-deaf", |c| c.ready_timeout = Duration::from_secs(1)).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:deaf").await;
    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    let instance = created["instance"].as_str().unwrap();
    let failed = node.state_of(&panel, instance, InstanceState::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(reason.starts_with("not ready within 1s (GET /manifest failed"), "{reason}");
    assert_eq!(failed.log_tail, ["running, but never listening"]);
    assert_eq!(failed.restarts, 0);
    assert!(!node.driver.is_running(instance), "what never got ready is stopped");
    assert!(node.route(&panel).await.unwrap().endpoints.is_empty());
}

#[actix_rt::test]
async fn the_watchdog_expires_a_studio_instance_and_shutdown_stops_the_rest() {
    let node = node("pm-watchdog", |c| c.idle_mark = Duration::from_secs(1)).await;
    let ada = node.login("ada").await;
    let (one, two) = (new_panel(&ada, "template:ok").await, new_panel(&ada, "template:ok").await);
    let (_, a) = ada.post(&format!("/api/panels/{one}/studio"), json!({})).await;
    let (_, b) = ada.post(&format!("/api/panels/{two}/studio"), json!({})).await;
    let (a, b) = (a["instance"].as_str().unwrap().to_owned(), b["instance"].as_str().unwrap().to_owned());
    node.state_of(&one, &a, InstanceState::Ready).await;
    node.state_of(&two, &b, InstanceState::Ready).await;
    node.wait_subscribed(&channels::instance_control(&a)).await;

    // Without requests a serving instance shows as idle; a request makes it ready again.
    let idle = node.state_of(&two, &b, InstanceState::Idle).await;
    assert!(idle.reason.unwrap().starts_with("no request for"));
    node.until(10, "ready again after a request", || async {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let _: () = node.conn.clone().set(format!("nexus:panel:{two}:last-request"), now).await.unwrap();
        node.status(&two, &b).await.filter(|s| s.state == InstanceState::Ready)
    })
    .await;
    assert_eq!(node.endpoints(&two, 1).await.endpoints[0].instance, b, "idle instances keep serving");

    // A message naming another instance on a's channel is not obeyed.
    let forged = ExpireInstance { instance: b.clone(), reason: "forged".into() };
    node.publish(&channels::instance_control(&a), forged).await;
    let expire = ExpireInstance { instance: a.clone(), reason: "no heartbeat for 30 min".into() };
    node.publish(&channels::instance_control(&a), expire).await;
    let stopped = node.state_of(&one, &a, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().starts_with("watchdog: no heartbeat for 30 min"));
    node.endpoints(&one, 0).await;
    assert_eq!(node.status(&two, &b).await.unwrap().state, InstanceState::Ready);

    node.handle.stop_all(Duration::from_secs(1)).await;
    let status = node.status(&two, &b).await.unwrap();
    assert_eq!(status.state, InstanceState::Stopped, "written before stop_all returns");
    assert!(status.reason.unwrap().contains("its node shut down"));
    assert!(!node.driver.is_running(&b));
}

#[actix_rt::test]
async fn the_api_is_for_the_panels_owner_only_and_checks_its_input() {
    let node = node("pm-api", |_| {}).await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let anonymous = ApiClient::new(&node.base);
    let panel = new_panel(&ada, "template:ok").await;
    let routes = [
        (reqwest::Method::GET, "instances"),
        (reqwest::Method::DELETE, "instances"),
        (reqwest::Method::POST, "studio"),
        (reqwest::Method::DELETE, "studio"),
        (reqwest::Method::POST, "deploy"),
        (reqwest::Method::PUT, "scale"),
        (reqwest::Method::GET, "logs"),
    ];
    for (method, tail) in &routes {
        let path = format!("/api/panels/{panel}/{tail}");
        let body = Some(json!({"replicas": 1}));
        let (status, err) = anonymous.send(method.clone(), &path, body.clone()).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{method} {path}"
        );
        let (status, err) = bob.send(method.clone(), &path, body.clone()).await;
        assert_eq!((status, err["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{method} {path}");
        for unknown in ["no-such-panel".to_owned(), uuid::Uuid::new_v4().to_string()] {
            let path = format!("/api/panels/{unknown}/{tail}");
            let (status, err) = ada.send(method.clone(), &path, body.clone()).await;
            assert_eq!((status, err["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{method} {path}");
        }
    }
    assert!(node.statuses(&panel).await.is_empty(), "nothing ran for a refused request");

    let (status, body) = ada.get(&format!("/api/panels/{panel}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no instance yet: {body}");
    let broken = new_panel(&ada, "template:unknown").await;
    let (status, body) = ada.post(&format!("/api/panels/{broken}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unknown panel source"), "{body}");
    let (status, _) = ada.post(&format!("/api/panels/{broken}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    let instance = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    for bad in ["lines=0", "lines=1001", "lines=abc"] {
        let (status, body) = ada.get(&format!("/api/panels/{panel}/logs?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = ada.get(&format!("/api/panels/{panel}/logs?instance=someone-else")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only this panel's instances");
    let (status, logs) = ada.get(&format!("/api/panels/{panel}/logs?instance={instance}&lines=1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(logs["lines"].as_array().unwrap().len(), 1);
    let (status, list) = bob.get(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{list}");
}

#[actix_rt::test]
async fn deleting_a_panel_stops_its_instances_and_removes_its_state() {
    let node = node("pm-delete", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    let instance = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    node.until(5, "a pattern subscription", || async {
        let n: u64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut node.conn.clone()).await.unwrap();
        (n > 0).then_some(())
    })
    .await;

    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();

    let (status, _) = ada.delete(&format!("/api/panels/{panel}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    node.until(10, "panel forgotten by the driver", || async {
        node.driver.forgotten.lock().unwrap().contains(&panel).then_some(())
    })
    .await;
    assert!(!node.driver.is_running(&instance));
    node.until(5, "route and statuses removed", || async {
        let gone = node.route(&panel).await.is_none() && node.statuses(&panel).await.is_empty();
        gone.then_some(())
    })
    .await;
    node.until(5, "traffic signal removed", || async { node.last_request(&panel).await.is_none().then_some(()) }).await;
}

#[actix_rt::test]
async fn a_restarted_panel_manager_marks_what_it_left_behind_stopped() {
    let brokers = Brokers::redis("pm-stale");
    let url = brokers.redis_url();
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let p1 = uuid::Uuid::new_v4().to_string();
    let (dead_id, other_id) = (format!("{p1}-dead"), format!("{p1}-other-node"));
    let status = InstanceStatus {
        instance: dead_id.clone(),
        panel: p1.clone(),
        owner: "ada".into(),
        mode: InstanceMode::App,
        state: InstanceState::Ready,
        isolation: Isolation::Gvisor,
        reason: None,
        log_tail: vec![],
        restarts: 0,
        since_ms: 1,
    };
    let live_elsewhere =
        Endpoint { instance: other_id, addr: "127.0.0.1:9".into(), watchdog: None, watchdog_token: None };
    let dead = Endpoint { instance: dead_id.clone(), addr: "127.0.0.1:8".into(), watchdog: None, watchdog_token: None };
    let route = PanelRoute {
        panel: p1.clone(),
        owner: "ada".into(),
        mode: InstanceMode::App,
        endpoints: vec![dead, live_elsewhere.clone()],
        activatable: true,
    };
    let _: () = conn.hset(instances_key(&p1), &dead_id, serde_json::to_string(&status).unwrap()).await.unwrap();
    let _: () = conn.hset("nexus:panel-manager:node-a:instances", &dead_id, &p1).await.unwrap();
    let _: () = conn.hset(ROUTES_KEY, &p1, serde_json::to_string(&route).unwrap()).await.unwrap();

    let node = node_on(brokers, "pm-stale", |_| {}).await;
    let cleared = node.status(&p1, &dead_id).await.unwrap();
    assert_eq!(cleared.state, InstanceState::Stopped);
    assert_eq!(cleared.reason.as_deref(), Some("its panel manager restarted"));
    let route = node.route(&p1).await.unwrap();
    assert_eq!(route.endpoints, vec![live_elsewhere], "only this node's endpoints go");
    assert!(route.activatable);
    let left: HashMap<String, String> =
        node.conn.clone().hgetall("nexus:panel-manager:node-a:instances").await.unwrap();
    assert!(left.is_empty());
}

#[actix_rt::test]
async fn the_sweep_stops_the_instances_of_a_panel_whose_record_vanished() {
    let node = node("pm-sweep", |c| c.sweep = Duration::from_millis(300)).await;
    let ada = node.login("ada").await;
    let (kept, vanished) = (new_panel(&ada, "template:ok").await, new_panel(&ada, "template:ok").await);
    let (_, a) = ada.post(&format!("/api/panels/{kept}/studio"), json!({})).await;
    let (_, b) = ada.post(&format!("/api/panels/{vanished}/studio"), json!({})).await;
    let (a, b) = (a["instance"].as_str().unwrap().to_owned(), b["instance"].as_str().unwrap().to_owned());
    node.state_of(&kept, &a, InstanceState::Ready).await;
    node.state_of(&vanished, &b, InstanceState::Ready).await;

    let _: () = node.conn.clone().del(format!("nexus:panel:{vanished}")).await.unwrap();
    node.until(10, "panel forgotten by the driver", || async {
        node.driver.forgotten.lock().unwrap().contains(&vanished).then_some(())
    })
    .await;
    assert!(!node.driver.is_running(&b));
    node.until(5, "route and statuses removed", || async {
        let gone = node.route(&vanished).await.is_none() && node.statuses(&vanished).await.is_empty();
        gone.then_some(())
    })
    .await;
    assert!(node.driver.is_running(&a), "a panel with its record is left alone");
    assert_eq!(node.endpoints(&kept, 1).await.endpoints[0].instance, a);
}

#[actix_rt::test]
async fn a_stopping_studio_instance_blocks_a_new_one_and_deploy_snapshots_after_it_stopped() {
    let node = node("pm-slowstop", |c| c.stop_grace = Duration::from_secs(3)).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:slowstop").await;
    let studio = format!("/api/panels/{panel}/studio");
    let (_, created) = ada.post(&studio, json!({})).await;
    let first = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &first, InstanceState::Ready).await;

    // It ignores SIGTERM, so it stops only at the SIGKILL after the grace.
    let (status, _) = ada.delete(&studio).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = ada.post(&studio, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("still stopping"), "{body}");
    assert!(node.driver.is_running(&first));
    node.state_of(&panel, &first, InstanceState::Stopped).await;
    let (status, created) = ada.post(&studio, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let second = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &second, InstanceState::Ready).await;

    // Deploy stops it and snapshots the volume only once it has stopped.
    let deployer = ada.clone();
    let deploy_path = format!("/api/panels/{panel}/deploy");
    let deploy = actix_rt::spawn(async move { deployer.post(&deploy_path, json!({})).await });
    node.state_of(&panel, &second, InstanceState::Stopping).await;
    let (status, body) = ada.post(&studio, json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "no Studio start while the old one stops: {body}");
    let (status, deployed) = deploy.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{deployed}");
    assert_eq!(node.status(&panel, &second).await.unwrap().state, InstanceState::Stopped);
    let snapshots = node.driver.snapshots.lock().unwrap().clone();
    assert_eq!(snapshots, vec![(panel.clone(), false)], "nothing of the panel ran during the snapshot");
    node.endpoints(&panel, 1).await;
}
