//! Who may open a panel through the gateway, and what reaches it: each
//! boundary is tried from the wrong side (no credential, garbage, forged,
//! another user's, another panel's cookie, a revoked user), and the
//! upstream records every request that gets through.

use nexus_actors::instance::{last_request_key, InstanceMode};
use nexus_actors::platform::auth::Audience;
use nexus_actors::platform::{Auth, PanelMode};
use nexus_testkit::{eventually, tempdir, TestKeys};
use serde_json::Value;

use crate::harness::{activations, client, metric, outcome, put_route, raw, route, Env, Upstream};

const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

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
