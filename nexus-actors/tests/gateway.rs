//! The traffic gateway over real sockets: a real redis-server per test,
//! real users, tokens and panel records, real upstream HTTP and WebSocket
//! servers, real clients. The test plays the panel manager where one is
//! needed: it writes routes into Redis, announces them, and answers
//! activations by starting an upstream. The heartbeat is forwarded to a
//! real `nexus watchdog` that checks its token.
//!
//! `access` tries to cross each boundary of who may open a panel and what
//! reaches it; this file tests proxying, limits, the activator and
//! heartbeats (as the panel's owner).

#[path = "gateway/access.rs"]
mod access;
#[path = "gateway/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use harness::{
    activations, announce, dead_addr, metric, outcome, put_route, raw, route, start_gateway, ws_echo_server, Env,
    Upstream,
};
use nexus_actors::instance::{last_request_key, InstanceMode, ROUTES_KEY};
use nexus_actors::platform::auth::Audience;
use nexus_actors::platform::{Auth, PanelMode};
use nexus_actors::roles::traffic_gateway::routes::Reload;
use nexus_actors::watchdog::{self, RedisExpiry, WatchdogConfig, TOKEN_HEADER};
use nexus_testkit::{eventually, tempdir, TestKeys};
use serde_json::Value;

// ---- proxying ---------------------------------------------------------------------

#[actix_rt::test]
async fn unknown_panels_and_paths_get_404_pages_in_html_or_json() {
    let env = Env::start("404", |_| {}).await;
    let r = env.http.get(env.url("/p/nope/x")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("nope"));

    let r = env.http.get(env.url("/p/nope/x")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("404 Not Found"));

    assert_eq!(env.http.get(env.url("/elsewhere")).send().await.unwrap().status(), 404);
    assert_eq!(env.http.get(env.url("/p//x")).send().await.unwrap().status(), 404);
    let health: Value = env.http.get(env.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert!(env.metric(&outcome("not_found")) >= 3.0);
}

#[actix_rt::test]
async fn proxies_with_the_prefix_stripped_query_body_and_forwarding_headers() {
    let env = Env::start("proxy", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;

    let r = env
        .owner
        .post(env.url(&format!("/p/{id}/some/path?x=1&y=two")))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("x-kept", "yes")
        .body("hello body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/some/path");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], "hello body");
    assert_eq!(seen["x-forwarded-prefix"], format!("/p/{id}"));
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], env.gateway.local_addr().to_string());
    assert_eq!(seen["x-drop-me"], Value::Null, "headers named in Connection are hop-by-hop");
    assert_eq!(seen["x-kept"], "yes");

    // The root of a panel without its slash is redirected, query kept.
    let r = env.owner.get(env.url(&format!("/p/{id}?a=b"))).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], format!("/p/{id}/?a=b"));
    let r = env.owner.get(env.url(&format!("/p/{id}/"))).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/");

    // The traffic signal for scale to zero.
    let kernel = env.kernel.clone();
    eventually(5, "traffic signal written", move || {
        metric(&kernel, "nexus_gateway_last_request_writes_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    let mut conn = env.conn.clone();
    let ms: u64 = redis::cmd("GET").arg(last_request_key(&id)).query_async(&mut conn).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() as u64;
    assert!(ms <= now && now - ms < 60_000, "last-request {ms} is a recent unix ms (now {now})");
    assert_eq!(env.metric(&outcome("proxied")), 2.0);
}

#[actix_rt::test]
async fn connections_to_instances_are_kept_alive_and_reused() {
    let env = Env::start("keepalive", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    for i in 0..10 {
        let r = env.owner.get(env.url(&format!("/p/{id}/n/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(upstream.seen().len(), 10);
    let connections = upstream.connections.load(Ordering::SeqCst);
    assert!(connections < 10, "10 requests used {connections} upstream connections; the pool should reuse them");
}

#[actix_rt::test]
async fn websockets_pass_through_both_ways_for_the_owner_only() {
    let env = Env::start("ws", |_| {}).await;
    let addr = ws_echo_server().await;
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    let url = format!("ws://{}/p/{id}/socket", env.gateway.local_addr());
    let refused = tokio_tungstenite::connect_async(url.clone()).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request.headers_mut().insert("cookie", env.cookie(&id).await.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "the gateway"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();
}

#[actix_rt::test]
async fn oversized_bodies_and_headers_are_refused_before_the_instance() {
    let env = Env::start("limits", |c| {
        c.max_body_bytes = 1024;
        c.max_header_bytes = 4096;
    })
    .await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    let up = env.url(&format!("/p/{id}/up"));

    let r = env.owner.post(&up).body(vec![b'x'; 2048]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");
    // Chunked, so no Content-Length tells in advance.
    let mut chunked = format!(
        "POST /p/{id}/up HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n800\r\n",
        env.ada
    )
    .into_bytes();
    chunked.extend_from_slice(&[b'y'; 2048]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(raw(env.gateway.local_addr(), &chunked).await.0, 413);

    let r = env.owner.get(env.url(&format!("/p/{id}/h"))).header("x-big", "a".repeat(5000)).send().await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "request_header_fields_too_large");
    // Past the read buffer hyper itself answers 431.
    let huge = format!("GET /p/{id}/h HTTP/1.1\r\nhost: gw\r\nx-huge: {}\r\n\r\n", "b".repeat(40_000));
    assert_eq!(raw(env.gateway.local_addr(), huge.as_bytes()).await.0, 431);

    assert!(upstream.seen().is_empty(), "nothing oversized reached the instance: {:?}", upstream.seen());
    let ok = env.owner.post(&up).body(vec![b'x'; 1000]).send().await.unwrap();
    assert_eq!(ok.status(), 200, "a body within the limit passes");
}

#[actix_rt::test]
async fn dead_endpoints_give_502_and_a_live_one_is_tried_next() {
    let env = Env::start("502", |_| {}).await;
    let dead = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&dead, InstanceMode::Studio, &[&dead_addr()], false)).await;
    let r = env.owner.get(env.url(&format!("/p/{dead}/"))).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_gateway");
    let r = env.owner.get(env.url(&format!("/p/{dead}/"))).header("accept", "text/html").send().await.unwrap();
    assert!(r.text().await.unwrap().contains("502 Bad Gateway"));

    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let half = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&half, InstanceMode::App, &[&dead_addr(), &addr], true)).await;
    for i in 0..4 {
        let r = env.owner.post(env.url(&format!("/p/{half}/"))).body(format!("b{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "a refused connection moves on to the next endpoint");
    }
    let bodies: Vec<String> = upstream.seen().iter().map(|s| s["body"].as_str().unwrap().to_owned()).collect();
    assert_eq!(bodies, ["b0", "b1", "b2", "b3"], "each request reached the live instance exactly once");
}

#[actix_rt::test]
async fn a_slow_instance_gives_504() {
    let env = Env::start("504", |c| c.upstream_timeout = Duration::from_millis(300)).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    let r = env.owner.get(env.url(&format!("/p/{id}/slow"))).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "gateway_timeout");
    assert_eq!(env.metric(&outcome("timeout")), 1.0);
}

#[actix_rt::test]
async fn a_studio_panel_without_an_instance_gives_503_with_retry_after() {
    let env = Env::start("studio503", |_| {}).await;
    let studio = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&studio, InstanceMode::Studio, &[], false)).await;
    let r = env.owner.get(env.url(&format!("/p/{studio}/"))).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("start it in Studio"));
    // An App that is not activatable does not start either.
    let app = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&app, InstanceMode::App, &[], false)).await;
    let r = env.owner.get(env.url(&format!("/p/{app}/"))).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(env.metric("nexus_gateway_activations_total{outcome=\"ready\"}"), 0.0);
}

#[actix_rt::test]
async fn route_changes_in_redis_reach_every_gateway() {
    let env = Env::start("replicated-a", |_| {}).await;
    let (_kernel_b, gateway_b) = start_gateway(&env.brokers, &env.keys, "replicated-b", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let shared = env.panel(PanelMode::Studio, false).await;
    let url_b = format!("http://{}/p/{shared}/", gateway_b.local_addr());
    assert_eq!(env.owner.get(&url_b).send().await.unwrap().status(), 404);

    put_route(&env.conn, &route(&shared, InstanceMode::Studio, &[&addr], false)).await;
    for gateway in [&env.gateway, &gateway_b] {
        let (routes, id) = (gateway.routes().clone(), shared.clone());
        eventually(5, "route announced", move || routes.get(&id).is_some()).await;
        let r = env.owner.get(format!("http://{}/p/{shared}/", gateway.local_addr())).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    // Removed and announced: both answer 404 again.
    let mut conn = env.conn.clone();
    let _: () = redis::cmd("HDEL").arg(ROUTES_KEY).arg(&shared).query_async(&mut conn).await.unwrap();
    announce(&env.conn, &shared).await;
    for gateway in [&env.gateway, &gateway_b] {
        let (routes, id) = (gateway.routes().clone(), shared.clone());
        eventually(5, "route removal announced", move || routes.get(&id).is_none()).await;
        let r = env.owner.get(format!("http://{}/p/{shared}/", gateway.local_addr())).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }

    // Written without an announcement (a lost pub/sub message): a reload
    // repairs it.
    let json = serde_json::to_string(&route("quiet", InstanceMode::Studio, &[&addr], false)).unwrap();
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg("quiet").arg(json).query_async(&mut conn).await.unwrap();
    assert!(gateway_b.routes().get("quiet").is_none());
    gateway_b.route_table().link::<Reload>("test").ask(Reload).await.unwrap();
    assert!(gateway_b.routes().get("quiet").is_some());

    // A corrupt field is skipped, the rest stays.
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg("bad").arg("{not json").query_async(&mut conn).await.unwrap();
    gateway_b.route_table().link::<Reload>("test").ask(Reload).await.unwrap();
    assert!(gateway_b.routes().get("bad").is_none());
    assert!(gateway_b.routes().get("quiet").is_some());
    gateway_b.stop().await;
}

// ---- the activator ------------------------------------------------------------------

#[actix_rt::test]
async fn concurrent_requests_during_a_cold_start_are_each_answered_once() {
    let env = Env::start("activator", |_| {}).await;
    let asked = activations(&env.brokers).await;
    let cold = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&cold, InstanceMode::App, &[], true)).await;

    let mut requests = Vec::new();
    for i in 0..20 {
        let (http, url) = (env.owner.clone(), env.url(&format!("/p/{cold}/req?i={i}")));
        requests.push(actix::spawn(async move {
            let r = http.post(url).header("x-request-id", format!("r{i}")).body(format!("body {i}")).send().await;
            let r = r.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let kernel = env.kernel.clone();
    eventually(10, "20 requests held", move || metric(&kernel, "nexus_gateway_queued_requests") == 20.0).await;
    let (a, c) = (asked.clone(), cold.clone());
    eventually(10, "an activation was announced", move || a.lock().unwrap().contains(&c)).await;

    // The panel manager's part: start an instance and publish its route.
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    put_route(&env.conn, &route(&cold, InstanceMode::App, &[&addr], true)).await;

    let mut ids = HashSet::new();
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["body"].as_str().unwrap(), format!("body {}", &body["id"].as_str().unwrap()[1..]));
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 20, "every client got its own answer");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 20, "the instance got exactly 20 requests");
    let upstream_ids: HashSet<String> = seen.iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(upstream_ids.len(), 20, "no request was sent twice");
    assert!(seen.iter().all(|s| s["authorization"].is_null()), "held requests lose the gateway's token too");

    assert_eq!(env.metric("nexus_gateway_cold_start_seconds_count"), 1.0);
    assert_eq!(env.metric("nexus_gateway_activations_total{outcome=\"ready\"}"), 1.0);
    assert_eq!(env.metric("nexus_gateway_queued_requests"), 0.0);
    let mut conn = env.conn.clone();
    let kernel = env.kernel.clone();
    eventually(5, "traffic signal written", move || {
        metric(&kernel, "nexus_gateway_last_request_writes_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    let ms: Option<u64> = redis::cmd("GET").arg(last_request_key(&cold)).query_async(&mut conn).await.unwrap();
    assert!(ms.is_some(), "last-request written for the activated App");
}

#[actix_rt::test]
async fn a_full_queue_refuses_at_once_and_held_requests_get_503_at_the_deadline() {
    let env = Env::start("activator-full", |c| {
        c.queue_per_panel = 2;
        c.activation_deadline = Duration::from_secs(2);
    })
    .await;
    let asked = activations(&env.brokers).await;
    let never = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&never, InstanceMode::App, &[], true)).await;
    let url = env.url(&format!("/p/{never}/"));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (env.owner.clone(), url.clone());
            actix::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), r.headers().get("retry-after").cloned(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let kernel = env.kernel.clone();
    eventually(10, "2 requests held", move || metric(&kernel, "nexus_gateway_queued_requests") == 2.0).await;

    let r = env.owner.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503, "the third request finds the queue full");
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("too many"));

    for request in held {
        let (status, retry_after, body) = request.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "a held request that times out says when to retry");
        assert!(body["message"].as_str().unwrap().contains("did not start in time"));
    }
    assert!(asked.lock().unwrap().contains(&never));
    let kernel = env.kernel.clone();
    eventually(10, "the activation was abandoned", move || {
        metric(&kernel, "nexus_gateway_activations_total{outcome=\"abandoned\"}") == 1.0
    })
    .await;
    assert_eq!(env.metric("nexus_gateway_cold_start_seconds_count"), 0.0);
    assert_eq!(env.metric(&outcome("queue_full")), 1.0);
    assert_eq!(env.metric(&outcome("activation_timeout")), 2.0);
}

/// Plays the panel manager for `panel`: once the gateway asks for it to be
/// activated, writes `endpoints` as its route (an instance started).
async fn on_activation(env: &Env, asked: Arc<Mutex<Vec<String>>>, panel: &str, endpoints: &[&str]) {
    let (a, p) = (asked.clone(), panel.to_owned());
    eventually(10, "an activation was announced", move || a.lock().unwrap().contains(&p)).await;
    put_route(&env.conn, &route(panel, InstanceMode::App, endpoints, true)).await;
}

#[actix_rt::test]
async fn a_request_refused_by_an_app_scaled_to_zero_under_a_stale_route_is_held_and_sent_once() {
    let env = Env::start("stale-route", |_| {}).await;
    let asked = activations(&env.brokers).await;
    // The gateway still routes to an instance the panel manager has stopped.
    let app = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&app, InstanceMode::App, &[&dead_addr()], true)).await;

    let (http, url) = (env.owner.clone(), env.url(&format!("/p/{app}/orders?n=1")));
    let request = actix::spawn(async move {
        let r = http.post(url).header("x-request-id", "only").body("the order").send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    let kernel = env.kernel.clone();
    eventually(10, "the refused request is held", move || metric(&kernel, "nexus_gateway_queued_requests") == 1.0)
        .await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    on_activation(&env, asked.clone(), &app, &[&addr]).await;

    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["path"].as_str(), body["query"].as_str()), (Some("/orders"), Some("n=1")));
    assert_eq!(body["body"], "the order", "the body was kept while the request was held");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "sent exactly once: {seen:?}");
    assert_eq!(seen[0]["id"], "only");
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 1.0);
    assert_eq!(env.metric(&outcome("proxied")), 1.0);
    assert_eq!(env.metric(&outcome("bad_gateway")), 0.0);
    let kernel = env.kernel.clone();
    eventually(10, "the activation ended ready", move || {
        metric(&kernel, "nexus_gateway_activations_total{outcome=\"ready\"}") == 1.0
    })
    .await;
    assert_eq!(env.metric("nexus_gateway_queued_requests"), 0.0);
}

#[actix_rt::test]
async fn refused_connections_give_502_when_nothing_can_start_or_the_new_instance_refuses_too() {
    let env = Env::start("stale-route-502", |_| {}).await;
    let asked = activations(&env.brokers).await;
    // Not activatable (a Studio instance, an App without a snapshot): 502 at once.
    let studio = env.panel(PanelMode::Studio, false).await;
    let fixed = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&studio, InstanceMode::Studio, &[&dead_addr()], true)).await;
    env.put_route(&route(&fixed, InstanceMode::App, &[&dead_addr()], false)).await;
    for panel in [&studio, &fixed] {
        let r = env.owner.get(env.url(&format!("/p/{panel}/"))).send().await.unwrap();
        assert_eq!(r.status(), 502, "{panel}");
    }
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 0.0);
    assert!(asked.lock().unwrap().is_empty(), "nothing to activate: {:?}", asked.lock().unwrap());

    // Held once; the new instance refuses as well: 502, not another round.
    let flaky = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&flaky, InstanceMode::App, &[&dead_addr()], true)).await;
    let (http, url) = (env.owner.clone(), env.url(&format!("/p/{flaky}/")));
    let request = actix::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() });
    on_activation(&env, asked.clone(), &flaky, &[&dead_addr()]).await;
    assert_eq!(request.await.unwrap(), 502);
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 1.0);
    assert_eq!(env.metric(&outcome("bad_gateway")), 3.0);
}

// ---- heartbeats ---------------------------------------------------------------------

#[actix_rt::test]
async fn heartbeats_are_checked_against_the_owner_and_forwarded_to_the_watchdog() {
    let env = Env::start("heartbeat", |_| {}).await;
    let bob = env.token("bob", Audience::Api).await;
    let watchdog = Upstream::default();
    let (watchdog_addr, _server) = watchdog.serve();
    let studio = env.panel(PanelMode::Studio, false).await;
    let mut studio_route = route(&studio, InstanceMode::Studio, &[&watchdog_addr], false);
    studio_route.endpoints[0].watchdog = Some(watchdog_addr.clone());
    env.put_route(&studio_route).await;
    let nowatch = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&nowatch, InstanceMode::App, &[&watchdog_addr], false)).await;

    let beat = |panel: &str, token: Option<&str>| {
        let mut req = env.http.post(env.url(&format!("/heartbeat/{panel}")));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let r = beat(&studio, None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(beat(&studio, Some("not-a-token")).await.unwrap().status(), 401);
    let stranger_keys = TestKeys::new(&tempdir(&format!("{}-other-keys", env.kernel.node())));
    let forged = Auth::new(stranger_keys.ring.clone(), env.platform.accounts.clone());
    let forged = forged.issue("ada", &Audience::Api).await.unwrap().0;
    assert_eq!(beat(&studio, Some(&forged)).await.unwrap().status(), 401);
    // A panel cookie is not an API token.
    let cookie_token = env.token("ada", Audience::Panel(studio.clone())).await;
    assert_eq!(beat(&studio, Some(&cookie_token)).await.unwrap().status(), 401);
    assert_eq!(beat(&studio, Some(&bob)).await.unwrap().status(), 403);
    assert_eq!(beat("ghost", Some(&env.ada)).await.unwrap().status(), 404);
    assert_eq!(beat(&nowatch, Some(&env.ada)).await.unwrap().status(), 404);
    assert_eq!(watchdog.heartbeats.load(Ordering::SeqCst), 0);

    let r = beat(&studio, Some(&env.ada)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.json::<Value>().await.unwrap()["alive"], true);
    assert_eq!(watchdog.heartbeats.load(Ordering::SeqCst), 1);

    let preflight = env
        .http
        .request(reqwest::Method::OPTIONS, env.url(&format!("/heartbeat/{studio}")))
        .header("origin", "http://127.0.0.1:7070")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(preflight.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    assert_eq!(env.http.get(env.url(&format!("/heartbeat/{studio}"))).send().await.unwrap().status(), 405);
    // CORS is for the heartbeat only.
    let r = env.owner.get(env.url(&format!("/p/{studio}/"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[actix_rt::test]
async fn heartbeats_carry_the_instances_watchdog_token_to_a_real_watchdog() {
    let env = Env::start("heartbeat-token", |_| {}).await;
    let studio = env.panel(PanelMode::Studio, false).await;
    let redis_url = env.brokers.redis_url();
    let config = WatchdogConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some("the-instance-secret".into()),
        ..WatchdogConfig::new("studio-0", studio.clone(), redis_url.clone())
    };
    let expiry = RedisExpiry::connect(&redis_url).await.unwrap();
    let watchdog = watchdog::start(config, Arc::new(expiry)).await.unwrap();
    let (watchdog_addr, _handle) = (watchdog.local_addr().to_string(), watchdog.handle());
    actix::spawn(watchdog.run());
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let beat = || env.owner.post(env.url(&format!("/heartbeat/{studio}"))).send();

    // The panel's own code reaching the watchdog directly has no token.
    let direct = env.http.post(format!("http://{watchdog_addr}/heartbeat")).send().await.unwrap();
    assert_eq!(direct.status(), 401);

    // Through the gateway, the route's token goes along.
    let mut studio_route = route(&studio, InstanceMode::Studio, &[&addr], false);
    studio_route.endpoints[0].watchdog = Some(watchdog_addr.clone());
    studio_route.endpoints[0].watchdog_token = Some("the-instance-secret".into());
    env.put_route(&studio_route).await;
    let r = beat().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["instance"].as_str(), body["expired"].as_bool()), (Some("studio-0"), Some(false)));

    // A route with another token, or none, is refused by the watchdog.
    studio_route.endpoints[0].watchdog_token = Some("a-stale-secret".into());
    env.put_route(&studio_route).await;
    assert_eq!(beat().await.unwrap().status(), 401);
    studio_route.endpoints[0].watchdog_token = None;
    env.put_route(&studio_route).await;
    assert_eq!(beat().await.unwrap().status(), 401);

    let metrics = env.http.get(format!("http://{watchdog_addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_watchdog_heartbeats_total 1"), "{metrics}");
    assert!(metrics.contains("nexus_watchdog_refused_heartbeats_total 3"), "{metrics}");
    // The secret is for the watchdog only, never for the panel, and a
    // client's copy of the header never gets through.
    assert!(upstream.seen().is_empty());
    let r = env.owner.get(env.url(&format!("/p/{studio}/x"))).header(TOKEN_HEADER, "x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()[TOKEN_HEADER], Value::Null);
}

#[actix_rt::test]
async fn a_stopping_gateway_finishes_the_request_in_flight_and_takes_no_new_one() {
    let env = Env::start("drain", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    let gateway_addr = env.gateway.local_addr();
    // An idle keep-alive connection must not hold the stop up.
    let idle = env.owner.get(env.url("/healthz")).send().await.unwrap();
    assert_eq!(idle.status(), 200);
    let in_flight = {
        let (owner, url) = (env.owner.clone(), env.url(&format!("/p/{id}/slow")));
        actix_rt::spawn(async move { owner.get(url).send().await })
    };
    actix::clock::sleep(Duration::from_millis(500)).await;
    let Env { gateway, .. } = env;
    let started = std::time::Instant::now();
    let stopped = actix_rt::spawn(gateway.stop());
    actix::clock::sleep(Duration::from_millis(300)).await;
    assert!(std::net::TcpStream::connect(gateway_addr).is_err(), "a stopping gateway takes no new connection");
    let answer = in_flight.await.unwrap().expect("the request in flight is answered");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "finally");
    stopped.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "the stop ends once the request is done");
}
