//! What keeps a user in bounds: the sidecar secret that the readiness
//! probe sends (and Redis never holds) and the running-instance quota.

use std::collections::HashMap;
use std::time::Duration;

use nexus_actors::instance::{instances_key, Activate, InstanceMode, InstanceState, InstanceStatus, Isolation};
use nexus_actors::platform::channels;
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;

use super::harness::{new_panel, node, now_ms, Node};
use super::manifest;

#[actix_rt::test]
async fn the_readiness_probe_carries_the_instances_sidecar_secret_and_redis_never_holds_it() {
    let node = node("pm-secret", |c| c.ready_timeout = Duration::from_secs(2)).await;
    let ada = node.login("ada").await;
    let panel = new_panel(&ada, "template:ok").await;
    let studio = format!("/api/panels/{panel}/studio");
    let (status, created) = ada.post(&studio, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let instance = created["instance"].as_str().unwrap().to_owned();
    // The panel answers `/manifest` only with its secret: ready means the probe sent it.
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    let token = node.driver.token(&instance).unwrap();
    let addr = node.endpoints(&panel, 1).await.endpoints[0].addr.clone();
    assert_eq!(manifest(&addr, None).await, StatusCode::UNAUTHORIZED, "the panel refuses a request without it");
    assert_eq!(manifest(&addr, Some("not-the-secret")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(manifest(&addr, Some(&token)).await, StatusCode::OK);
    let leaks: Vec<String> = node.everything_in_redis().await.into_iter().filter(|v| v.contains(&token)).collect();
    assert_eq!(leaks, Vec::<String>::new(), "the secret reached Redis (the route, a status, ...)");

    // A driver that gives the panel a secret but does not hand it back:
    // the probe goes without, is refused, and the instance never gets ready.
    let (status, _) = ada.delete(&studio).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    node.state_of(&panel, &instance, InstanceState::Stopped).await;
    node.driver.keep_token.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, created) = ada.post(&studio, json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let failed = node.state_of(&panel, created["instance"].as_str().unwrap(), InstanceState::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(reason.contains("GET /manifest answered 401"), "{reason}");
}

/// How many instance starts `node` refused over the quota for `action`.
fn refusals(node: &Node, action: &str) -> f64 {
    node.metric(&format!("nexus_panel_quota_refusals_total{{action=\"{action}\"}}")).unwrap_or(0.0)
}

#[actix_rt::test]
async fn the_running_instance_quota_refuses_starts_past_it_and_starts_nothing() {
    let node = node("pm-quota", |c| c.instances_per_user = 2).await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let mut panels = Vec::new();
    for _ in 0..4 {
        panels.push(new_panel(&ada, "template:ok").await);
    }
    let (one, two, three, four) = (&panels[0], &panels[1], &panels[2], &panels[3]);
    let studio = |panel: &str| format!("/api/panels/{panel}/studio");
    let over_quota = |(status, body): (StatusCode, serde_json::Value)| {
        assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")), "{body}");
        assert!(body["message"].as_str().unwrap().contains('2'), "the message names the limit: {body}");
    };
    let mut running = HashMap::new();
    for panel in [one, two] {
        let (status, created) = ada.post(&studio(panel), json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        running.insert(panel.clone(), created["instance"].as_str().unwrap().to_owned());
    }

    // A third Studio instance and a deploy are refused before anything happens.
    over_quota(ada.post(&studio(three), json!({})).await);
    over_quota(ada.post(&format!("/api/panels/{three}/deploy"), json!({})).await);
    assert_eq!(node.driver.started(three), 0, "nothing was started");
    assert!(node.statuses(three).await.is_empty() && node.route(three).await.is_none());
    assert!(node.driver.snapshots.lock().unwrap().is_empty(), "no snapshot was taken");
    assert_eq!((refusals(&node, "studio"), refusals(&node, "deploy")), (1.0, 1.0));
    // The quota is per user.
    let bobs = new_panel(&bob, "template:ok").await;
    let (status, body) = bob.post(&studio(&bobs), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // An instance that stopped counts no more; scaling up past the quota is refused.
    let (status, _) = ada.delete(&studio(two)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    node.state_of(two, &running[two], InstanceState::Stopped).await;
    let (status, body) = ada.post(&format!("/api/panels/{three}/deploy"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    node.endpoints(three, 1).await;
    over_quota(ada.put(&format!("/api/panels/{three}/scale"), json!({"replicas": 2})).await);
    assert_eq!(node.driver.started(three), 1, "the refused scale started nothing");
    assert_eq!(refusals(&node, "scale"), 1.0);

    // An activation over the quota starts nothing and releases its claim.
    let (status, _) = ada.put(&format!("/api/panels/{three}/scale"), json!({"replicas": 0})).await;
    assert_eq!(status, StatusCode::OK);
    node.until(10, "scaled to zero", || async { node.live_apps(three).await.is_empty().then_some(()) }).await;
    let (status, body) = ada.post(&studio(two), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    node.publish(channels::ACTIVATE, Activate { panel: three.clone() }).await;
    node.until(10, "the activation refused", || async { (refusals(&node, "activation") == 1.0).then_some(()) }).await;
    assert_eq!(node.driver.started(three), 1, "the activation started nothing");
    let claim = format!("nexus:panel:{three}:activating");
    node.until(5, "the claim released", || async {
        node.conn.clone().get::<_, Option<String>>(&claim).await.unwrap().is_none().then_some(())
    })
    .await;

    // Instances that other nodes run (their statuses in Redis) count too.
    let (status, _) = ada.delete(&studio(two)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    node.until(10, "two stopped", || async {
        node.statuses(two).await.iter().all(|s| s.state.is_final()).then_some(())
    })
    .await;
    let elsewhere = InstanceStatus {
        instance: format!("{four}-on-node-b"),
        panel: four.clone(),
        owner: "ada".into(),
        mode: InstanceMode::Studio,
        state: InstanceState::Ready,
        isolation: Isolation::Gvisor,
        reason: None,
        log_tail: vec![],
        restarts: 0,
        since_ms: now_ms(),
    };
    let raw = serde_json::to_string(&elsewhere).unwrap();
    let _: () = node.conn.clone().hset(instances_key(four), &elsewhere.instance, raw).await.unwrap();
    over_quota(ada.post(&studio(two), json!({})).await);
    let _: () = node.conn.clone().del(instances_key(four)).await.unwrap();
    let (status, body) = ada.post(&studio(two), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
