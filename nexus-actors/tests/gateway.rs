//! The traffic gateway over real sockets: a real redis-server per test,
//! real users, tokens and panel records, real upstream HTTP and WebSocket
//! servers, real clients. The test plays the panel manager where one is
//! needed: it writes routes into Redis, announces them, and answers
//! activations by starting an upstream. The heartbeat is forwarded to a
//! real `nexus watchdog` that checks its token.
//!
//! The first tests try to cross each boundary of who may open a panel;
//! then proxying, limits and the activator (as the panel's owner).

#[path = "gateway/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use harness::{
    activations, announce, client, dead_addr, metric, outcome, put_route, raw, route, start_gateway, ws_echo_server,
    Env, Upstream,
};
use nexus_actors::instance::{last_request_key, InstanceMode, ROUTES_KEY};
use nexus_actors::platform::auth::Audience;
use nexus_actors::platform::{Auth, PanelMode};
use nexus_actors::roles::traffic_gateway::routes::Reload;
use nexus_actors::watchdog::{self, RedisExpiry, WatchdogConfig, TOKEN_HEADER};
use nexus_testkit::{eventually, tempdir, TestKeys};
use serde_json::Value;

const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

// ---- who may open a panel ---------------------------------------------------

#[actix_rt::test]
async fn a_studio_is_served_to_its_owner_only() {
    let env = Env::start("owner-only", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let a = env.panel(PanelMode::Studio, false).await;
    let b = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&a, InstanceMode::Studio, &[&addr], false)).await;
    env.put_route(&route(&b, InstanceMode::Studio, &[&addr], false)).await;
    let url = env.url(&format!("/p/{a}/page"));
    let get = |cookie: Option<String>, bearer: Option<String>| {
        let mut request = env.http.get(&url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    // No credential, or garbage: 401, with a clear code.
    let (status, body) = get(None, None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("private"));
    assert_eq!(get(Some("nexus_panel=garbage".into()), Some("garbage".into())).await.0, 401);
    // A token of another audience is no cookie, and no bearer token.
    assert_eq!(get(Some(format!("nexus_panel={}", env.ada)), None).await.0, 401);
    assert_eq!(get(None, Some(env.cookie(&a).await.replace("nexus_panel=", ""))).await.0, 401);
    // Signed by keys this gateway does not hold.
    let stranger_keys = TestKeys::new(&tempdir(&format!("{}-other-keys", env.kernel.node())));
    let forged = Auth::new(stranger_keys.ring.clone(), env.platform.accounts.clone());
    let forged = forged.issue("ada", &Audience::Panel(a.clone())).await.unwrap().0;
    assert_eq!(get(Some(format!("nexus_panel={forged}")), None).await.0, 401);

    // Bob's valid credentials: 403.
    let bob_cookie = format!("nexus_panel={}", env.token("bob", Audience::Panel(a.clone())).await);
    let (status, body) = get(Some(bob_cookie), None).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    assert_eq!(get(None, Some(env.token("bob", Audience::Api).await)).await.0, 403);
    // Ada's cookie for panel B does not open panel A.
    assert_eq!(get(Some(env.cookie(&b).await), None).await.0, 403);

    // A revoked user's tokens open nothing.
    let carol_api = env.token("carol", Audience::Api).await;
    let carol_cookie = format!("nexus_panel={}", env.token("carol", Audience::Panel(a.clone())).await);
    assert!(env.platform.auth.revoke("carol").await.unwrap());
    assert_eq!(get(None, Some(carol_api)).await.0, 401);
    assert_eq!(get(Some(carol_cookie), None).await.0, 401);
    assert!(upstream.seen().is_empty(), "no refused request reached the panel: {:?}", upstream.seen());

    // The owner, with the cookie or with a bearer token: served.
    let (status, body) = get(Some(env.cookie(&a).await), None).await;
    assert_eq!((status, body["path"].as_str()), (200, Some("/page")), "{body}");
    assert_eq!(get(None, Some(env.ada.clone())).await.0, 200);
    // Ada's own cookie for A next to a stray one: the valid one counts.
    assert_eq!(get(Some(format!("nexus_panel=junk; {}", env.cookie(&a).await)), None).await.0, 200);
    // Her own (private) panel carries no sandbox.
    let r = env.owner.get(&url).send().await.unwrap();
    assert!(!r.headers().contains_key("content-security-policy"));

    assert_eq!(upstream.seen().len(), 4);
    assert_eq!(env.metric(&outcome("unauthorized")), 7.0);
    assert_eq!(env.metric(&outcome("forbidden")), 3.0);
}

#[actix_rt::test]
async fn an_unknown_or_deleted_panel_is_404_and_a_studio_is_never_public() {
    let env = Env::start("records", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    // A route whose record is gone (deleted; the route not yet removed).
    let gone = uuid::Uuid::now_v7().to_string();
    env.put_route(&route(&gone, InstanceMode::App, &[&addr], true)).await;
    let r = env.owner.get(env.url(&format!("/p/{gone}/"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    // A Studio instance is private even when its record says public.
    let studio = env.panel(PanelMode::Studio, true).await;
    env.put_route(&route(&studio, InstanceMode::Studio, &[&addr], false)).await;
    assert_eq!(env.http.get(env.url(&format!("/p/{studio}/"))).send().await.unwrap().status(), 401);
    assert!(upstream.seen().is_empty());
}

#[actix_rt::test]
async fn a_public_app_is_served_to_anyone_sandboxed_and_a_private_one_starts_nothing_for_strangers() {
    let env = Env::start("public", |_| {}).await;
    let asked = activations(&env.brokers).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let public = env.panel(PanelMode::App, true).await;
    env.put_route(&route(&public, InstanceMode::App, &[&addr], true)).await;

    // Anyone: served, with the sandbox that keeps the App out of the
    // gateway's origin. The owner gets the same answer.
    for client in [&env.http, &env.owner] {
        let r = client.get(env.url(&format!("/p/{public}/x"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let policies: Vec<_> = r.headers().get_all("content-security-policy").iter().collect();
        assert_eq!(policies, [SANDBOX]);
    }
    // Still only the panel's own paths.
    assert_eq!(env.http.get(env.url(&format!("/p/{public}/manifest"))).send().await.unwrap().status(), 404);

    // A private App scaled to zero: a stranger is refused, and nothing is
    // started, held or recorded as traffic for it.
    let private = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&private, InstanceMode::App, &[], true)).await;
    let url = env.url(&format!("/p/{private}/"));
    assert_eq!(env.http.get(&url).send().await.unwrap().status(), 401);
    let bob = client(Some(&env.token("bob", Audience::Api).await));
    assert_eq!(bob.post(&url).body("x").send().await.unwrap().status(), 403);
    assert_eq!(env.metric("nexus_gateway_queued_requests"), 0.0);

    // A marker: the owner wakes a third App. Activations are announced in
    // order on one connection, so once the marker's arrives any for the
    // private App would have arrived before it.
    let marker = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&marker, InstanceMode::App, &[], true)).await;
    let (owner, marker_url) = (env.owner.clone(), env.url(&format!("/p/{marker}/")));
    let woken = actix::spawn(async move { owner.get(marker_url).send().await.unwrap().status().as_u16() });
    let (a, m) = (asked.clone(), marker.clone());
    eventually(10, "the marker's activation", move || a.lock().unwrap().contains(&m)).await;
    put_route(&env.conn, &route(&marker, InstanceMode::App, &[&addr], true)).await;
    assert_eq!(woken.await.unwrap(), 200);
    let asked_for = asked.lock().unwrap().clone();
    assert!(asked_for.iter().all(|p| *p == marker), "only the owner's request asked for an activation: {asked_for:?}");
    let kernel = env.kernel.clone();
    eventually(10, "the marker's activation ended", move || {
        metric(&kernel, "nexus_gateway_activations_total{outcome=\"ready\"}") == 1.0
    })
    .await;
    for outcome_name in ["abandoned", "gone"] {
        assert_eq!(env.metric(&format!("nexus_gateway_activations_total{{outcome=\"{outcome_name}\"}}")), 0.0);
    }
    // Traffic signals: written for the served panels, never for the refused one.
    let mut conn = env.conn.clone();
    let (p, m) = (last_request_key(&public), last_request_key(&marker));
    let kernel = env.kernel.clone();
    eventually(10, "traffic signals written", move || {
        metric(&kernel, "nexus_gateway_last_request_writes_total{outcome=\"ok\"}") >= 2.0
    })
    .await;
    let written: (Option<u64>, Option<u64>, Option<u64>) =
        redis::pipe().get(p).get(m).get(last_request_key(&private)).query_async(&mut conn).await.unwrap();
    assert!(written.0.is_some() && written.1.is_some(), "{written:?}");
    assert_eq!(written.2, None, "a refused request is no traffic");
}

#[actix_rt::test]
async fn tool_paths_never_reach_the_instance_however_they_are_spelt() {
    let env = Env::start("tool-paths", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::Studio, false).await;
    env.put_route(&route(&id, InstanceMode::Studio, &[&addr], false)).await;
    let tails = [
        "/mcp/execute",
        "/manifest",
        "/manifest/",
        "/MANIFEST",
        "/Mcp/Execute",
        "//manifest",
        "/%6dcp/execute",
        "/%6Danifest",
        "/x/../mcp/execute",
        "/./mcp/execute",
        "/x/%2e%2e/manifest",
        "/x%2f..%2fmcp/execute",
        "/%252e%252e/mcp/execute",
        "/mcp;v=1/execute",
        "/manifest?x=1",
    ];
    for tail in tails {
        for method in ["GET", "POST"] {
            let request = format!(
                "{method} /p/{id}{tail} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {}\r\n\
                 content-length: 2\r\nconnection: close\r\n\r\n{{}}",
                env.ada
            );
            let (status, answer) = raw(env.gateway.local_addr(), request.as_bytes()).await;
            assert_eq!(status, 404, "{method} {tail}: {answer}");
            assert!(answer.contains("\"error\":\"not_found\"") && answer.contains("sidecar"), "{answer}");
        }
    }
    // A WebSocket to the tool interface is refused the same way.
    let ws = format!("ws://{}/p/{id}/%6Dcp/socket", env.gateway.local_addr());
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws).unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", env.ada).parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());
    assert!(upstream.seen().is_empty(), "the instance saw: {:?}", upstream.seen());
    assert_eq!(env.metric(&outcome("tool_path")), (tails.len() * 2 + 1) as f64);

    // The panel's own paths that merely look alike pass.
    for tail in ["/manifest.json", "/docs/manifest", "/mcpx", "/api/mcp/execute"] {
        let r = env.owner.get(env.url(&format!("/p/{id}{tail}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{tail}");
    }
    assert_eq!(upstream.seen().len(), 4);
}

#[actix_rt::test]
async fn the_gateways_credentials_and_platform_secrets_never_reach_the_panel() {
    let env = Env::start("strip", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let id = env.panel(PanelMode::App, false).await;
    env.put_route(&route(&id, InstanceMode::App, &[&addr], true)).await;
    let url = env.url(&format!("/p/{id}/see"));
    let cookie = env.cookie(&id).await;

    // The cookie opens it; the panel gets its own cookies and its own
    // Authorization, never the gateway's cookie or the platform's secrets.
    let r = env
        .http
        .get(&url)
        .header("cookie", format!("theme=dark; {cookie}; session=abc"))
        .header("authorization", "Basic cGFuZWw6b3du")
        .header("x-nexus-sidecar-token", "stolen")
        .header("x-nexus-watchdog-token", "stolen")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["cookie"], "theme=dark; session=abc");
    assert_eq!(seen["authorization"], "Basic cGFuZWw6b3du", "an Authorization the gateway did not use is the panel's");
    assert_eq!((&seen["x-nexus-sidecar-token"], &seen["x-nexus-watchdog-token"]), (&Value::Null, &Value::Null));

    // The bearer token that opened it stays at the gateway; a cookie that
    // is only the gateway's leaves no empty header behind.
    let seen: Value = env.owner.get(&url).header("cookie", &cookie).send().await.unwrap().json().await.unwrap();
    assert_eq!((&seen["authorization"], &seen["cookie"]), (&Value::Null, &Value::Null), "{seen}");

    // Public Apps too, for anyone.
    let public = env.panel(PanelMode::App, true).await;
    env.put_route(&route(&public, InstanceMode::App, &[&addr], true)).await;
    let bob = env.token("bob", Audience::Api).await;
    let r = env
        .http
        .get(env.url(&format!("/p/{public}/see")))
        .bearer_auth(&bob)
        .header("cookie", format!("{cookie}; mine=1"))
        .header("x-nexus-sidecar-token", "stolen")
        .send()
        .await
        .unwrap();
    let seen: Value = r.json().await.unwrap();
    assert_eq!((&seen["authorization"], &seen["cookie"]), (&Value::Null, &Value::from("mine=1")), "{seen}");
    assert_eq!(seen["x-nexus-sidecar-token"], Value::Null);
    for seen in upstream.seen() {
        let text = seen.to_string();
        assert!(!text.contains(&env.ada) && !text.contains(&bob) && !text.contains("stolen"), "{text}");
        assert!(!text.contains("nexus_panel"), "{text}");
    }

    // A panel cannot set the gateway's cookie, and its own are kept under
    // its path.
    let r = env.owner.get(env.url(&format!("/p/{id}/set-cookie"))).send().await.unwrap();
    let set: Vec<_> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(set, [format!("own=1; Path=/p/{id}/; HttpOnly")]);
}

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
