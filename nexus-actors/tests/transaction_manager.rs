//! The transaction manager's HTTP API on a whole node over a real
//! redis-server and tansu: who may do what (401, 403, admin-only routes),
//! ownership, optimistic concurrency (409), bad input, the bounds on what a
//! user can grow (document size, history, quotas), persistence across a
//! node restart and change announcements.

mod common;

use std::sync::{Arc, Mutex};

use actix::Arbiter;
use common::Collector;
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::bus::BusEvent;
use nexus_actors::node::Role;
use nexus_actors::platform::error::MAX_BODY;
use nexus_actors::platform::Redis;
use nexus_actors::roles::transaction_manager::documents::{Documents, HISTORY_LEN};
use nexus_actors::Kernel;
use nexus_testkit::{eventually, until, ApiClient, TestNode};
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const TM: &[Role] = &[Role::TransactionManager];

#[actix_rt::test]
async fn every_api_route_needs_a_token_and_admin_routes_an_admin() {
    let node = TestNode::start("tm-auth", TM).await;
    let anonymous = ApiClient::new(&node.url());
    for (method, path) in [
        (Method::GET, "/api/panels"),
        (Method::POST, "/api/panels"),
        (Method::GET, "/api/panels/x"),
        (Method::POST, "/api/documents"),
        (Method::GET, "/api/documents/x"),
        (Method::PATCH, "/api/documents/x"),
        (Method::POST, "/api/users"),
        (Method::POST, "/api/users/admin/revoke"),
        (Method::POST, "/api/logout"),
        (Method::GET, "/api/me"),
        (Method::GET, "/api/graph"),
        (Method::GET, "/api/no-such-route"),
    ] {
        let (status, body) = anonymous.send(method.clone(), path, Some(json!({}))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(body["error"], "unauthorized", "{method} {path}: {body}");
    }

    let (status, body) = anonymous.post("/api/login", json!({"username": "admin", "password": "nope"})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_credentials")));
    let (status, _) = anonymous.post("/api/login", json!({"username": "eve", "password": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, spec) = anonymous.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/login",
        "/api/logout",
        "/api/users/{name}/revoke",
        "/api/panels",
        "/api/panels/{id}/access",
        "/api/panels/{id}/studio",
        "/api/documents/{id}",
        "/api/documents/{id}/history",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }

    // Only an admin creates users; the first user is one.
    let admin = node.admin().await;
    assert_eq!(admin.get("/api/me").await.1, json!({"username": "admin", "role": "admin"}));
    let ada = node.user("ada").await;
    assert_eq!(ada.get("/api/me").await.1, json!({"username": "ada", "role": "user"}));
    assert_eq!(ada.get("/api/panels").await, (StatusCode::OK, json!([])));
    assert_eq!(ada.get("/api/no-such-route").await.0, StatusCode::NOT_FOUND);
    let (status, body) = ada.post("/api/users", json!({"username": "mallory", "password": "mallory-password"})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    let (status, _) =
        ada.post("/api/users", json!({"username": "mallory", "password": "mallory-password", "role": "admin"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "nor can a user make an admin");
    let (status, _) =
        anonymous.post("/api/login", json!({"username": "mallory", "password": "mallory-password"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "refused creations created nothing");

    // The mailbox graph names every running instance: admins only.
    let (status, body) = ada.get("/api/graph").await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    let (status, graph) = admin.get("/api/graph").await;
    assert_eq!(status, StatusCode::OK);
    assert!(graph["actors"].as_array().unwrap().iter().any(|a| a["kind"] == "redis_bridge"));

    let (status, body) = admin.post("/api/users", json!({"username": "ada", "password": "other-password"})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    for bad in [
        json!({"username": "d d", "password": "password1"}),
        json!({"username": "d:d", "password": "password1"}),
        json!({"username": "dee", "password": "short"}),
        json!({"username": "dee", "password": "password1", "role": "root"}),
    ] {
        assert_eq!(admin.post("/api/users", bad.clone()).await.0, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _) =
        admin.post("/api/users", json!({"username": "root2", "password": "root2-password", "role": "admin"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let root2 = ApiClient::login(&node.url(), "root2", "root2-password").await;
    assert_eq!(root2.get("/api/graph").await.0, StatusCode::OK);
}

#[actix_rt::test]
async fn a_forged_token_or_one_for_another_audience_is_refused() {
    let node = TestNode::start("tm-forged", TM).await;
    let ada = node.user("ada").await;
    // Signed with a key of another deployment.
    let other = nexus_testkit::TestKeys::new(&nexus_testkit::tempdir("tm-forged-other"));
    let platform = other.platform(&node.brokers.redis_url()).await;
    let mut forged = ApiClient::new(&node.url());
    forged.token = Some(platform.auth.sign("ada", 0, &nexus_actors::platform::auth::Audience::Api).unwrap().0);
    assert_eq!(forged.get("/api/panels").await.0, StatusCode::UNAUTHORIZED);
    // A panel cookie's token opens that panel at the gateway, not the API.
    let (_, panel) =
        ada.post("/api/panels", json!({"name": "p", "mode": "studio", "source": "template:python_minimal"})).await;
    let mine = node.keys.platform(&node.brokers.redis_url()).await;
    let audience = nexus_actors::platform::auth::Audience::Panel(panel["id"].as_str().unwrap().to_owned());
    let mut cookie_as_bearer = ApiClient::new(&node.url());
    cookie_as_bearer.token = Some(mine.auth.issue("ada", &audience).await.unwrap().0);
    assert_eq!(cookie_as_bearer.get("/api/panels").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::OK);
}

#[actix_rt::test]
async fn the_access_cookie_is_path_scoped_http_only_and_strict_for_the_owner_only() {
    let node = TestNode::start("tm-cookie", TM).await;
    let ada = node.user("ada").await;
    let bob = node.user("bob").await;
    let (_, panel) =
        ada.post("/api/panels", json!({"name": "p", "mode": "studio", "source": "template:python_minimal"})).await;
    let id = panel["id"].as_str().unwrap();
    let response =
        ada.http.post(format!("{}/api/panels/{id}/access", node.url())).bearer_auth(ada.token()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("nexus_panel="), "{cookie}");
    for attribute in [format!("Path=/p/{id}/"), "HttpOnly".into(), "SameSite=Strict".into()] {
        assert!(cookie.contains(&attribute), "{cookie} lacks {attribute}");
    }
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], format!("/p/{id}/"));
    assert_eq!(bob.post(&format!("/api/panels/{id}/access"), json!({})).await.0, StatusCode::FORBIDDEN);
    let unknown = uuid::Uuid::now_v7();
    assert_eq!(ada.post(&format!("/api/panels/{unknown}/access"), json!({})).await.0, StatusCode::NOT_FOUND);
}

#[actix_rt::test]
async fn logging_out_or_an_admin_revokes_every_token_on_every_node() {
    let node = TestNode::start("tm-revoke", TM).await;
    let sibling = node.sibling("tm-revoke-2", TM, |_| {}).await;
    let other_node = format!("http://{}", sibling.http);
    let ada = node.user("ada").await;
    let second = ApiClient::login(&node.url(), "ada", "ada-password").await;
    let mut on_sibling = ada.clone();
    on_sibling.base = other_node.clone();
    assert_eq!(on_sibling.get("/api/panels").await.0, StatusCode::OK, "one key file: every node accepts it");

    assert_eq!(ada.post("/api/logout", json!({})).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::UNAUTHORIZED, "at once on the node that revoked");
    assert_eq!(second.get("/api/panels").await.0, StatusCode::UNAUTHORIZED, "every token of the user");
    until(5, "another node refuses it once its cached standing expires", || async {
        on_sibling.get("/api/panels").await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    let ada = ApiClient::login(&node.url(), "ada", "ada-password").await;
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::OK, "a new login works");

    let bob = node.user("bob").await;
    assert_eq!(bob.post("/api/users/ada/revoke", json!({})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::OK, "a refused revocation revoked nothing");
    let admin = node.admin().await;
    assert_eq!(admin.post("/api/users/ada/revoke", json!({})).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin.post("/api/users/nobody/revoke", json!({})).await.0, StatusCode::NOT_FOUND);
    assert_eq!(bob.get("/api/panels").await.0, StatusCode::OK, "only ada's tokens");
    sibling.stop().await.unwrap();
}

#[actix_rt::test]
async fn failed_logins_are_limited_per_address_while_the_api_keeps_answering() {
    let node = TestNode::start("tm-login-flood", TM).await;
    let ada = node.user("ada").await;
    let anonymous = ApiClient::new(&node.url());
    let mut limited = None;
    for i in 0..40 {
        // Many usernames, one address: the per-address limit ends it.
        let (status, _) = anonymous.post("/api/login", json!({"username": format!("guess{i}"), "password": "x"})).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(i);
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let limited = limited.expect("the flood was limited");
    assert!(limited <= 20, "limited after {limited} failures");
    let response = anonymous
        .http
        .post(format!("{}/api/login", node.url()))
        .json(&json!({"username": "ada", "password": "ada-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS, "even the right password, from this address");
    let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::OK, "the API kept answering the logged-in user");
    let metrics = anonymous.http.get(format!("{}/metrics", node.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_logins_total{outcome=\"rate_limited\"}"), "counted");
}

#[actix_rt::test]
async fn failed_logins_are_limited_per_username_from_anywhere() {
    let node = TestNode::start("tm-login-user", TM).await;
    node.user("ada").await;
    let redis = Redis::connect(&node.brokers.redis_url()).await.unwrap();
    let anonymous = ApiClient::new(&node.url());
    let mut statuses = Vec::new();
    for i in 0..12 {
        // Each attempt from "another address": clear the address counter.
        let () = redis.conn().del("nexus:login-failures:addr:127.0.0.1").await.unwrap();
        statuses
            .push(anonymous.post("/api/login", json!({"username": "ada", "password": format!("guess{i}")})).await.0);
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 10, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS));
    // Garbage names count too, under one name, and never reach a key.
    let (status, _) = anonymous.post("/api/login", json!({"username": "a:b*c", "password": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let keys: Vec<String> = redis.conn().keys("nexus:login-failures:user:*").await.unwrap();
    assert!(keys.iter().all(|k| !k.contains("a:b*c")), "{keys:?}");
    let (status, body) = anonymous.post("/api/login", json!({"username": "ada", "password": "x".repeat(5000)})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[actix_rt::test]
async fn panels_belong_to_their_owner_and_bad_input_is_refused() {
    let node = TestNode::start_with("tm-panels", TM, |c| c.quotas.panels = 3).await;
    let ada = node.user("ada").await;
    let bob = node.user("bob").await;

    let (status, panel) = ada
        .post("/api/panels", json!({"name": "Editor", "mode": "studio", "source": "templates/python_minimal"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{panel}");
    assert_eq!((panel["owner"].as_str(), panel["public"].as_bool()), (Some("ada"), Some(false)), "private by default");
    let path = format!("/api/panels/{}", panel["id"].as_str().unwrap());
    assert_eq!(ada.get(&path).await, (StatusCode::OK, panel.clone()));
    let (status, updated) = ada.put(&path, json!({"name": "Renamed", "mode": "app", "public": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (updated["name"].as_str(), updated["mode"].as_str(), updated["source"].as_str(), updated["public"].as_bool()),
        (Some("Renamed"), Some("app"), Some("templates/python_minimal"), Some(true))
    );

    // Another user gets 403 on every verb and sees none of it in their list.
    assert_eq!(bob.get(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.put(&path, json!({"name": "mine"})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.delete(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.get("/api/panels").await, (StatusCode::OK, json!([])));
    assert_eq!(ada.get(&path).await.1["name"], "Renamed", "refused writes changed nothing");
    assert_eq!(ada.get("/api/panels/not-a-uuid").await.0, StatusCode::NOT_FOUND);

    // Bad input: a clear JSON error, nothing stored.
    let raw = ada
        .http
        .post(format!("{}/api/panels", node.url()))
        .bearer_auth(ada.token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_eq!(raw.json::<Value>().await.unwrap()["error"], "bad_request");
    for bad in [
        json!({"name": "", "mode": "studio", "source": "s"}),
        json!({"name": "n", "mode": "kiosk", "source": "s"}),
        json!({"name": "n"}),
    ] {
        let (status, body) = ada.post("/api/panels", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} gave {body}");
    }
    let huge = json!({"name": "n", "mode": "studio", "source": "x".repeat(MAX_BODY)});
    let (status, body) = ada.post("/api/panels", huge).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
    assert_eq!(ada.get("/api/panels").await.1.as_array().unwrap().len(), 1);

    // The quota: three panels, then a clear refusal that stores nothing.
    for name in ["two", "three"] {
        assert_eq!(
            ada.post("/api/panels", json!({"name": name, "mode": "studio", "source": "s"})).await.0,
            StatusCode::CREATED
        );
    }
    let (status, body) = ada.post("/api/panels", json!({"name": "four", "mode": "studio", "source": "s"})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")), "{body}");
    assert_eq!(ada.get("/api/panels").await.1.as_array().unwrap().len(), 3);
    assert_eq!(
        bob.post("/api/panels", json!({"name": "b", "mode": "studio", "source": "s"})).await.0,
        StatusCode::CREATED
    );

    assert_eq!(ada.delete(&path).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get(&path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        ada.post("/api/panels", json!({"name": "four", "mode": "studio", "source": "s"})).await.0,
        StatusCode::CREATED
    );
}

/// Every event on the node's document channels, as a subscriber on the
/// bus sees them (keep the second value alive while listening).
async fn document_events(node: &TestNode) -> (Arc<Mutex<Vec<BusEvent>>>, (Kernel, Arbiter)) {
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &node.brokers.redis_url()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let collector = kernel.spawn("collector", move || Collector { events: e.clone() });
    let topic = Topic::Pattern("nexus:doc:*".into());
    bridge
        .link::<Subscribe>("test")
        .ask(Subscribe { topic, subscriber: collector.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    eventually(10, "subscription live", || events.lock().unwrap().iter().any(|e| matches!(e, BusEvent::Up(_)))).await;
    (events, (kernel, arbiter))
}

#[actix_rt::test]
async fn documents_are_versioned_survive_a_node_restart_and_announce_changes() {
    let node = TestNode::start("tm-docs", TM).await;
    let (events, _listening) = document_events(&node).await;

    let ada = node.user("ada").await;
    let bob = node.user("bob").await;
    let (status, doc) = ada.post("/api/documents", json!({"state": {"title": "Draft", "body": "x"}})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(doc["version"], 1);
    let path = format!("/api/documents/{}", doc["id"].as_str().unwrap());
    assert_eq!(ada.get("/api/documents").await.1.as_array().unwrap().len(), 1);
    assert_eq!(bob.get("/api/documents").await, (StatusCode::OK, json!([])));

    let (status, doc) = ada.patch(&path, json!({"version": 1, "patch": {"title": "Final", "body": null}})).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!((doc["version"].as_u64(), &doc["state"]), (Some(2), &json!({"title": "Final"})));

    // A patch made against version 1 is refused, not applied.
    let (status, body) = ada.patch(&path, json!({"version": 1, "patch": {"title": "Lost"}})).await;
    assert_eq!(
        (status, body["error"].as_str(), body["current_version"].as_u64()),
        (StatusCode::CONFLICT, Some("stale_version"), Some(2))
    );
    assert_eq!(ada.get(&path).await.1["state"], json!({"title": "Final"}));

    // Ten writers racing at version 2: exactly one wins.
    let racers = (0..10).map(|i| ada.patch(&path, json!({"version": 2, "patch": {"n": i}})));
    let statuses: Vec<StatusCode> = futures::future::join_all(racers).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 9, "{statuses:?}");

    // Ownership.
    assert_eq!(bob.get(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.patch(&path, json!({"version": 3, "patch": {}})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.delete(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(ada.get("/api/documents/unknown").await.0, StatusCode::NOT_FOUND);
    assert_eq!(ada.get(&format!("{path}:log")).await.0, StatusCode::NOT_FOUND, "only UUIDs reach a key");

    let (status, history) = ada.get(&format!("{path}/history?since=1")).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<u64> = history.as_array().unwrap().iter().map(|c| c["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, vec![2, 3]);
    assert_eq!(history[0]["patch"], json!({"title": "Final", "body": null}));
    let (_, page) = ada.get(&format!("{path}/history?since=0&limit=1")).await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(ada.get(&format!("{path}/history?limit=0")).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(ada.get(&format!("{path}/history?since=x")).await.0, StatusCode::BAD_REQUEST);

    // Each applied change was announced on nexus:doc:{id}.
    eventually(10, "two change announcements", || {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, BusEvent::Message(m) if m.envelope.kind == "nexus.document.changed"))
            .count()
            == 2
    })
    .await;

    // A new node on the same Redis serves what the old one saved.
    let before = ada.get(&path).await.1;
    let TestNode { node: first, keys, brokers } = node;
    first.stop().await.unwrap();
    let node = TestNode {
        node: nexus_actors::node::start(nexus_testkit::node_config("tm-docs-2", TM, &brokers, &keys)).await.unwrap(),
        keys,
        brokers,
    };
    let ada = ApiClient::login(&node.url(), "ada", "ada-password").await;
    assert_eq!(ada.get(&path).await, (StatusCode::OK, before));

    assert_eq!(ada.delete(&path).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get(&path).await.0, StatusCode::NOT_FOUND);
}

#[actix_rt::test]
async fn a_document_stays_within_1_mib_and_a_patch_too_large_to_announce_still_reaches_followers() {
    let node = TestNode::start_with("tm-doc-size", TM, |c| c.quotas.documents = 2).await;
    let (events, _listening) = document_events(&node).await;
    let ada = node.user("ada").await;
    let (_, doc) = ada.post("/api/documents", json!({"state": {"a": "x".repeat(600_000)}})).await;
    let path = format!("/api/documents/{}", doc["id"].as_str().unwrap());
    let (status, body) = ada.patch(&path, json!({"version": 1, "patch": {"b": "y".repeat(600_000)}})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")), "{body}");
    assert_eq!(ada.get(&path).await.1["version"], 1, "nothing was written");

    // Nearly a mebibyte of patch: saved, and announced without the patch
    // (it would not fit an envelope), so followers fetch the version.
    let (_, small) = ada.post("/api/documents", json!({"state": {}})).await;
    let small_path = format!("/api/documents/{}", small["id"].as_str().unwrap());
    let (status, body) =
        ada.patch(&small_path, json!({"version": 1, "patch": {"big": "z".repeat(MAX_BODY - 200)}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(10, "the large change is announced and decodes", || {
        events.lock().unwrap().iter().any(|e| {
            matches!(e, BusEvent::Message(m) if m.envelope.kind == "nexus.document.changed"
                && m.envelope.data["version"] == 2 && m.envelope.data["patch"].is_null())
        })
    })
    .await;

    // The document quota: two, then a clear refusal.
    let (status, body) = ada.post("/api/documents", json!({"state": {}})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")));
    assert_eq!(ada.get("/api/documents").await.1.as_array().unwrap().len(), 2);
}

#[actix_rt::test]
async fn history_is_capped_and_read_from_since() {
    let node = TestNode::start("tm-history", TM).await;
    let ada = node.user("ada").await;
    let (_, doc) = ada.post("/api/documents", json!({"state": {"n": 0}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let redis = Redis::connect(&node.brokers.redis_url()).await.unwrap();
    let documents = Documents::new(redis.clone());
    // A log as an older node wrote it (time-based ids): replaced, not fatal.
    let () = redis::cmd("XADD")
        .arg(format!("nexus:doc:{{{id}}}:log"))
        .arg("*")
        .arg("version")
        .arg(1)
        .arg("patch")
        .arg("{}")
        .query_async::<String>(&mut redis.conn())
        .await
        .map(|_| ())
        .unwrap();
    let writes = HISTORY_LEN + 500;
    for version in 1..=writes as u64 {
        let current = documents.get(&id).await.unwrap().unwrap();
        let written = documents.patch(current, version, &json!({"n": version})).await.unwrap();
        assert!(matches!(written, nexus_actors::roles::transaction_manager::documents::Write::Applied(_)));
    }
    let length: usize = redis.conn().xlen(format!("nexus:doc:{{{id}}}:log")).await.unwrap();
    assert!(length < HISTORY_LEN + 200, "the history is trimmed near {HISTORY_LEN}: {length}");
    let last = writes as u64 + 1;
    let (_, tail) = ada.get(&format!("/api/documents/{id}/history?since={}", last - 3)).await;
    let versions: Vec<u64> = tail.as_array().unwrap().iter().map(|c| c["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, vec![last - 2, last - 1, last], "read from since, not from the start");
    let (_, from_start) = ada.get(&format!("/api/documents/{id}/history?since=0&limit=1")).await;
    assert!(from_start[0]["version"].as_u64().unwrap() > 2, "the oldest changes were trimmed: {from_start}");
}

/// Documents an older node wrote under untagged keys are moved to the
/// tagged ones when a node starts, history and all; ids in an owner's set
/// without a document stop holding quota once the owner reaches it.
#[actix_rt::test]
async fn documents_older_nodes_wrote_are_adopted_and_ids_without_one_hold_no_quota() {
    let node = TestNode::start_with("tm-adopt", TM, |c| c.quotas.documents = 2).await;
    let ada = node.user("ada").await;
    let mut redis = Redis::connect(&node.brokers.redis_url()).await.unwrap().conn();
    let (old, orphan) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let () = redis
        .hset_multiple(format!("nexus:doc:{old}"), &[("owner", "ada"), ("version", "3"), ("state", r#"{"n":3}"#)])
        .await
        .unwrap();
    for version in [2, 3] {
        let () = redis::cmd("XADD")
            .arg(format!("nexus:doc:{old}:log"))
            .arg(format!("{version}-1"))
            .arg("version")
            .arg(version)
            .arg("patch")
            .arg(format!(r#"{{"n":{version}}}"#))
            .query_async::<String>(&mut redis)
            .await
            .map(|_| ())
            .unwrap();
    }
    let () = redis.sadd("nexus:docs:ada", &[&old, &orphan]).await.unwrap();
    assert_eq!(ada.get("/api/documents").await.1, json!([]), "not seen before a node adopts it");

    let _sibling = node.sibling("tm-adopt-2", TM, |c| c.quotas.documents = 2).await;
    let (_, listed) = ada.get("/api/documents").await;
    assert_eq!(listed, json!([{"id": old, "owner": "ada", "version": 3, "state": {"n": 3}}]));
    let (_, history) = ada.get(&format!("/api/documents/{old}/history?since=1")).await;
    assert_eq!(history, json!([{"version": 2, "patch": {"n": 2}}, {"version": 3, "patch": {"n": 3}}]));
    let left: usize = redis.exists(&[format!("nexus:doc:{old}"), format!("nexus:doc:{old}:log")]).await.unwrap();
    assert_eq!(left, 0, "the old keys are gone");
    let (status, body) = ada.patch(&format!("/api/documents/{old}"), json!({"version": 3, "patch": {"n": 4}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The quota is two: the adopted document and an id without one.
    let (status, body) = ada.post("/api/documents", json!({"state": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "the id without a document held the quota: {body}");
    let members: Vec<String> = redis.smembers("nexus:docs:ada").await.unwrap();
    assert!(!members.contains(&orphan), "{members:?}");
    // Refused again, without reading the whole set once more: pruning
    // runs at most hourly per owner.
    let exists_calls = |info: String| {
        info.lines().find_map(|l| l.strip_prefix("cmdstat_exists:calls=")?.split(',').next()?.parse::<u64>().ok())
    };
    let info = |mut c: nexus_actors::platform::store::Conn| async move {
        redis::cmd("INFO").arg("commandstats").query_async::<String>(&mut c).await.unwrap()
    };
    let before = exists_calls(info(redis.clone()).await);
    let (status, body) = ada.post("/api/documents", json!({"state": {"refused": true}})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("quota_exceeded")));
    assert_eq!(exists_calls(info(redis.clone()).await), before, "no id was looked up");
    let docs: Vec<String> = redis::cmd("KEYS").arg("nexus:doc:{*}").query_async(&mut redis).await.unwrap();
    assert_eq!(docs.len(), 2, "a refused document is not kept: {docs:?}");
}

#[actix_rt::test]
async fn readyz_says_which_broker_is_missing_while_healthz_stays_cheap() {
    let mut node = TestNode::start("tm-ready", TM).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = node.url();
    let get = |path: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/readyz").await.0, StatusCode::OK);
    node.brokers.redis.kill();
    let (status, body) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("redis")), "{body}");
    assert_eq!(get("/healthz").await.0, StatusCode::OK, "alive all the same");
    node.brokers.redis.restart().unwrap();
    until(5, "ready again once redis is back", || async { get("/readyz").await.0 == StatusCode::OK }).await;
    node.brokers.kafka.as_mut().unwrap().kill();
    let (status, body) = get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("kafka")), "{body}");
}

#[actix_rt::test]
async fn a_node_that_checks_tokens_refuses_to_start_without_keys() {
    let brokers = nexus_testkit::Brokers::with_kafka("tm-nokeys");
    let keys = nexus_testkit::TestKeys::new(&brokers.dir);
    let mut config = nexus_testkit::node_config("tm-nokeys", TM, &brokers, &keys);
    config.key_file = None;
    let error = nexus_actors::node::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("--jwt-key-file"), "{error}");
    let mut config = nexus_testkit::node_config("tm-nokeys", TM, &brokers, &keys);
    config.key_file = Some(brokers.dir.join("missing.json"));
    let error = nexus_actors::node::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("missing.json"), "{error}");
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[actix_rt::test]
async fn rotated_keys_reach_every_node_and_old_tokens_live_until_their_key_retires() {
    use nexus_actors::platform::auth::keys::{unix_now, KeySet, PROPAGATION};
    use nexus_actors::platform::auth::TOKEN_TTL;
    let node = TestNode::start("tm-rotate", TM).await;
    let sibling = node.sibling("tm-rotate-2", TM, |_| {}).await;
    let ada = node.user("ada").await;
    let old_kid = kid_of(ada.token());
    let mut set = KeySet::load(&node.keys.file).unwrap();
    // As `nexus keys rotate` leaves it once its propagation minute is over.
    set.rotate(unix_now() - PROPAGATION.as_secs(), TOKEN_TTL);
    set.save(&node.keys.file).unwrap();
    let signs_with_new_key = || async {
        let client = ApiClient::login(&node.url(), "ada", "ada-password").await;
        kid_of(client.token()) != old_kid
    };
    until(15, "the node reloaded the key file and signs with the new key", signs_with_new_key).await;
    let fresh = ApiClient::login(&node.url(), "ada", "ada-password").await;
    let mut fresh_on_sibling = fresh.clone();
    fresh_on_sibling.base = format!("http://{}", sibling.http);
    until(15, "the other node reloaded it too", || async {
        fresh_on_sibling.get("/api/panels").await.0 == StatusCode::OK
    })
    .await;
    assert_eq!(ada.get("/api/panels").await.0, StatusCode::OK, "tokens of the old key live on");

    // The old key retires (its tokens have expired): they stop working everywhere.
    let mut set = KeySet::load(&node.keys.file).unwrap();
    for key in &mut set.keys {
        if key.kid == old_kid {
            key.verify_until = Some(unix_now() - 1);
        }
    }
    set.save(&node.keys.file).unwrap();
    let mut old_on_sibling = ada.clone();
    old_on_sibling.base = format!("http://{}", sibling.http);
    until(15, "both nodes refuse a retired key's tokens", || async {
        ada.get("/api/panels").await.0 == StatusCode::UNAUTHORIZED
            && old_on_sibling.get("/api/panels").await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(fresh.get("/api/panels").await.0, StatusCode::OK);
    sibling.stop().await.unwrap();
}

#[actix_rt::test]
async fn a_burst_of_parallel_guesses_gets_no_more_tries_than_the_limit() {
    let node = TestNode::start_with("tm-login-burst", TM, |c| c.login_limits.per_address = 5).await;
    let admin = node.admin().await;
    let anonymous = ApiClient::new(&node.url());
    let guesses =
        (0..30).map(|i| anonymous.post("/api/login", json!({"username": format!("guess{i}"), "password": "x"})));
    let statuses: Vec<StatusCode> = futures::future::join_all(guesses).await.into_iter().map(|(s, _)| s).collect();
    let tried = statuses.iter().filter(|s| **s != StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(tried, 5, "exactly the limit was checked, however many ran at once: {statuses:?}");
    assert_eq!(admin.get("/api/panels").await.0, StatusCode::OK);
    // A login that succeeds takes its attempt back from the address.
    let node2 = TestNode::start_with("tm-login-ok", TM, |c| c.login_limits.per_address = 2).await;
    for _ in 0..5 {
        ApiClient::login(&node2.url(), "admin", nexus_testkit::ADMIN_PASSWORD).await;
    }
}
