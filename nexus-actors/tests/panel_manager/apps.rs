//! Apps: deploy, scale, scale to zero with its drain, activation and its
//! races with undeploy and deletion, and a Redis restart during a deploy.

use std::time::Duration;

use nexus_actors::instance::{last_request_key, Activate, InstanceMode, InstanceState, InstanceStatus};
use nexus_actors::platform::channels;
use nexus_actors::roles::panel_manager as pm;
use nexus_actors::Envelope;
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;

use super::harness::{new_panel, node, node_on, now_ms, send_raw, Node};
use super::manifest;

#[actix_rt::test]
async fn a_deployed_app_scales_to_zero_and_one_activation_starts_one_instance() {
    let node = node("pm-app", |c| c.idle_timeout = Duration::from_secs(2)).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (_, studio) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    let studio = studio["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &studio, InstanceState::Ready).await;

    let (status, deployed) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{deployed}");
    assert_eq!(deployed, json!({"panel": panel, "version": 1, "replicas": 1}));
    let stopped = node.state_of(&panel, &studio, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("deployed as an App"));
    let route = node.endpoints(&panel, 1).await;
    assert_eq!((route.mode, route.activatable), (InstanceMode::App, true));
    let first = route.endpoints[0].instance.clone();
    assert_ne!(first, studio);
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "one panel, one route: no Studio while it is an App");

    // No request comes: scaled to zero, the route stays activatable.
    let gone = node.state_of(&panel, &first, InstanceState::Stopped).await;
    assert!(gone.reason.unwrap().contains("scaled to zero"));
    let route = node.endpoints(&panel, 0).await;
    assert!(route.activatable);

    for _ in 0..5 {
        node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    }
    let route = node.endpoints(&panel, 1).await;
    let second = route.endpoints[0].instance.clone();
    assert_ne!(second, first);
    // Repeats while it starts (and once it serves) start nothing more.
    for _ in 0..3 {
        node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let apps: Vec<InstanceStatus> =
        node.statuses(&panel).await.into_iter().filter(|s| s.mode == InstanceMode::App).collect();
    assert_eq!(apps.len(), 2, "one instance before scale to zero, exactly one after: {apps:?}");
    let claim: Option<String> = node.conn.clone().get(format!("nexus:panel:{panel}:activating")).await.unwrap();
    assert_eq!(claim, None, "the claim is released once the instance serves");

    // Activation of a panel that is not deployed starts nothing.
    let other = new_panel(&ada, "template:ok").await;
    node.publish(channels::ACTIVATE, Activate { panel: other.clone() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(node.statuses(&other).await.is_empty());
    assert_eq!(node.route(&other).await, None);
}

#[actix_rt::test]
async fn scale_runs_that_many_instances_and_refuses_bad_requests() {
    let node = node("pm-scale", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let scale = format!("/api/panels/{panel}/scale");

    let (status, body) = ada.put(&scale, json!({"replicas": 2})).await;
    assert_eq!(status, StatusCode::CONFLICT, "not deployed: {body}");
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;

    let (status, body) = ada.put(&scale, json!({"replicas": 2})).await;
    assert_eq!((status, body["replicas"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    let route = node.endpoints(&panel, 2).await;
    assert_ne!(route.endpoints[0].addr, route.endpoints[1].addr);

    let (status, body) = ada.put(&scale, json!({"replicas": 5})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("0 to 4"), "{body}");
    for bad in [r#"{"replicas": -1}"#, r#"{"replicas": "two"}"#, "{not json", ""] {
        let (status, body) = send_raw(&ada, reqwest::Method::PUT, &scale, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["message"].as_str().unwrap().contains("invalid JSON body"), "{body}");
    }
    node.endpoints(&panel, 2).await;

    let (status, _) = ada.put(&scale, json!({"replicas": 0})).await;
    assert_eq!(status, StatusCode::OK);
    let route = node.endpoints(&panel, 0).await;
    assert!(route.activatable, "scaled to zero by hand, still activatable");

    let (status, _) = ada.delete(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let route =
        node.until(5, "undeployed route", || async { node.route(&panel).await.filter(|r| !r.activatable) }).await;
    assert_eq!(route.mode, InstanceMode::Studio);
    let (status, _) = ada.put(&scale, json!({"replicas": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "undeployed");
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "a Studio instance may run again");
}

#[actix_rt::test]
async fn a_scale_runs_its_replicas_only_once_its_record_is_written() {
    let node = node("pm-scale-written", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;
    let before = node.driver.started(&panel);
    // Redis takes no writes for 2 s: the scale's record waits, and its
    // replicas with it.
    let _: () =
        redis::cmd("CLIENT").arg("PAUSE").arg(2000).arg("WRITE").query_async(&mut node.conn.clone()).await.unwrap();
    let scaling = actix::spawn({
        let (ada, path) = (ada.clone(), format!("/api/panels/{panel}/scale"));
        async move { ada.put(&path, json!({"replicas": 3})).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(node.driver.started(&panel), before, "a replica started before the scale's record was written");
    let (status, body) = scaling.await.unwrap();
    assert_eq!((status, body["replicas"].as_u64()), (StatusCode::OK, Some(3)), "{body}");
    node.endpoints(&panel, 3).await;
}

/// Waits until the route has no endpoint, then checks that `instance` still
/// runs, serves and is not stopping: it left the route before its stop.
async fn out_of_route_but_still_serving(node: &Node, panel: &str, instance: &str, addr: &str) {
    node.endpoints(panel, 0).await;
    let status = node.status(panel, instance).await.unwrap();
    assert!(status.state.serves(), "not stopped before the drain: {status:?}");
    assert!(node.driver.is_running(instance));
    let token = node.driver.token(instance).unwrap();
    assert_eq!(
        manifest(addr, Some(&token)).await,
        StatusCode::OK,
        "a gateway holding the old route still gets answers"
    );
}

#[actix_rt::test]
async fn scale_to_zero_drains_before_stopping_and_a_request_meanwhile_keeps_the_instance() {
    let node = node("pm-drain", |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.drain = Duration::from_secs(3);
    })
    .await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);

    // Out of the route first, stopped only after the drain.
    let first = node.endpoints(&panel, 1).await.endpoints[0].clone();
    out_of_route_but_still_serving(&node, &panel, &first.instance, &first.addr).await;
    let stopped = node.state_of(&panel, &first.instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("scaled to zero"));
    assert!(node.route(&panel).await.unwrap().activatable);

    // A request during the drain (the gateway's signal, read again before
    // the stop) keeps the instance, back in the route.
    node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    let second = node.endpoints(&panel, 1).await.endpoints[0].clone();
    assert_ne!(second.instance, first.instance);
    out_of_route_but_still_serving(&node, &panel, &second.instance, &second.addr).await;
    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();
    let back = node.endpoints(&panel, 1).await;
    assert_eq!(back.endpoints[0].instance, second.instance, "the same instance serves again");
    assert!(node.status(&panel, &second.instance).await.unwrap().state.serves());

    // An activation during the drain keeps it too, without a cold start.
    out_of_route_but_still_serving(&node, &panel, &second.instance, &second.addr).await;
    node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    let back = node.endpoints(&panel, 1).await;
    assert_eq!(back.endpoints[0].instance, second.instance);
    assert_eq!(node.driver.started(&panel), 2, "no new instance was started");

    // Left alone, it is scaled to zero in the end.
    let stopped = node.state_of(&panel, &second.instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("scaled to zero"));
    assert!(!node.driver.is_running(&second.instance));
}

#[actix_rt::test]
async fn an_undeploy_racing_an_activation_leaves_no_instance_and_no_activatable_route() {
    let node = node("pm-race", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;
    let (status, _) = ada.put(&format!("/api/panels/{panel}/scale"), json!({"replicas": 0})).await;
    assert_eq!(status, StatusCode::OK);
    node.until(10, "scaled to zero", || async { node.live_apps(&panel).await.is_empty().then_some(()) }).await;
    let started = node.driver.started(&panel);

    // Writes wait while reads pass: the activation reads the App record and
    // then waits on its claim, while the Undeploy is handled. (Shorter than
    // the Redis client's 500 ms response timeout, so the claim succeeds.)
    let mut conn = node.conn.clone();
    redis::cmd("CLIENT").arg("PAUSE").arg(200).arg("WRITE").query_async::<()>(&mut conn).await.unwrap();
    let activate = nexus_actors::bus::BusEvent::Message(std::sync::Arc::new(nexus_actors::bus::BusMessage {
        channel: channels::ACTIVATE.to_owned(),
        pattern: None,
        envelope: Envelope::new("test", Activate { panel: panel.clone() }).into_untyped(),
    }));
    node.handle.actor.link::<nexus_actors::bus::BusEvent>("test").tell(activate).unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let undeploy = pm::manager::Undeploy { panel: panel.clone() };
    node.handle.actor.link::<pm::manager::Undeploy>("test").ask(undeploy).await.unwrap().unwrap();

    let claim = format!("nexus:panel:{panel}:activating");
    node.until(5, "the claim released", || async {
        let held: Option<String> = node.conn.clone().get(&claim).await.unwrap();
        held.is_none().then_some(())
    })
    .await;
    // Whatever the claim started would be pending or serving by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.live_apps(&panel).await, vec![], "no instance remains");
    assert_eq!(node.driver.started(&panel), started, "nothing was started");
    let route = node.route(&panel).await.unwrap();
    assert!(!route.activatable && route.endpoints.is_empty(), "{route:?}");
    let app: Option<String> = node.conn.clone().get(format!("nexus:app:{panel}")).await.unwrap();
    assert_eq!(app, None);
}

#[actix_rt::test]
async fn an_activation_for_a_panel_whose_record_vanished_cleans_it_up_and_starts_nothing() {
    let node = node("pm-vanished", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;
    let (status, _) = ada.put(&format!("/api/panels/{panel}/scale"), json!({"replicas": 0})).await;
    assert_eq!(status, StatusCode::OK);
    node.until(10, "scaled to zero", || async { node.live_apps(&panel).await.is_empty().then_some(()) }).await;
    assert!(node.route(&panel).await.unwrap().activatable);
    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();

    // Deleted behind the panel manager's back: no message.
    let _: () = node.conn.clone().del(format!("nexus:panel:{panel}")).await.unwrap();
    node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    node.until(5, "route, statuses and App record removed", || async {
        let app: Option<String> = node.conn.clone().get(format!("nexus:app:{panel}")).await.unwrap();
        let gone = node.route(&panel).await.is_none() && node.statuses(&panel).await.is_empty() && app.is_none();
        gone.then_some(())
    })
    .await;
    assert!(node.driver.forgotten.lock().unwrap().contains(&panel));
    assert_eq!(node.driver.started(&panel), 1, "the activation started nothing");
    assert_eq!(node.last_request(&panel).await, None);
}

/// A crashed App instance is not restarted in place (with a backoff that
/// held requests would wait out): it stops at once, and the next
/// activation starts a new instance.
#[actix_rt::test]
async fn a_crashed_app_instance_leaves_at_once_and_the_next_activation_starts_another() {
    let node = node("pm-app-crash", |c| c.max_crashes = 5).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:crash").await;
    let (status, deployed) = ada.post(&format!("/api/panels/{panel}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{deployed}");
    let apps = |all: Vec<InstanceStatus>| all.into_iter().filter(|s| s.mode == InstanceMode::App).collect::<Vec<_>>();
    let first = node
        .until(10, "the first App instance to crash and stop", || async {
            apps(node.statuses(&panel).await).into_iter().find(|s| s.state == InstanceState::Stopped)
        })
        .await;
    let reason = first.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("crashed, replaced on the next request"), "{reason}");
    assert_eq!(first.restarts, 1, "stopped at its first crash, not restarted with backoff");

    node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    let second = node
        .until(10, "a new App instance", || async {
            apps(node.statuses(&panel).await).into_iter().find(|s| s.instance != first.instance)
        })
        .await;
    assert_ne!(second.instance, first.instance);
}

#[actix_rt::test]
async fn redis_restarted_during_a_deploy_and_the_app_still_starts_on_the_next_request() {
    let brokers = nexus_testkit::Brokers::redis_persistent("pm-app-redis-restart");
    let mut node = node_on(brokers, "pm-app-redis-restart", |c| {
        c.idle_timeout = Duration::from_secs(2);
        c.resync = Duration::from_millis(500);
    })
    .await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    *node.driver.snapshot_takes.lock().unwrap() = Duration::from_secs(2);
    let deploy = actix::spawn({
        let (ada, path) = (ada.clone(), format!("/api/panels/{panel}/deploy"));
        async move { ada.post(&path, json!({})).await }
    });
    // The deploy is taking its snapshot when Redis goes, and writes its
    // App record while Redis is down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.brokers.redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.brokers.redis.restart().expect("redis-server starts again");
    let url = node.brokers.redis_url();
    node.conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();

    let (status, deployed) = deploy.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "the deploy's writes are retried until Redis is back: {deployed}");
    let stored: Option<String> = node.conn.clone().get(format!("nexus:app:{panel}")).await.unwrap();
    assert!(stored.is_some_and(|s| s.contains("\"version\":1")), "the App record was written");
    let first = node.endpoints(&panel, 1).await.endpoints[0].instance.clone();

    // Scaled to zero, the next request starts it again.
    node.state_of(&panel, &first, InstanceState::Stopped).await;
    assert!(node.endpoints(&panel, 0).await.activatable);
    node.publish(channels::ACTIVATE, Activate { panel: panel.clone() }).await;
    let route = node.endpoints(&panel, 1).await;
    assert_ne!(route.endpoints[0].instance, first, "a new instance serves the next request");
}
