//! The transaction manager's HTTP API over real sockets against a real
//! redis-server: auth (401), ownership (403), optimistic concurrency (409),
//! bad input, persistence across a node restart, and change announcements.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use actix::Arbiter;
use actix_web::{web, App, HttpServer};
use common::{eventually, tempdir, Collector};
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::bus::BusEvent;
use nexus_actors::infra::RedisServer;
use nexus_actors::roles::transaction_manager::{self as tm, auth::hash_password};
use nexus_actors::Kernel;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Starts a transaction-manager node on a free port; returns its base URL.
async fn start_node(
    redis_url: &str,
    publish: Option<nexus_actors::Link<nexus_actors::bus::redis::Publish>>,
) -> (String, actix_web::dev::ServerHandle) {
    let state = web::Data::new(tm::state(redis_url, publish, "tm-test").await.unwrap());
    let server =
        HttpServer::new(move || App::new().configure(tm::configure(state.clone())).configure(tm::configure_fallback))
            .workers(1)
            .bind(("127.0.0.1", 0))
            .unwrap();
    let addr: SocketAddr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (format!("http://{addr}"), handle)
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(base: &str) -> Self {
        Client { http: reqwest::Client::new(), base: base.to_owned(), token: None }
    }

    async fn login(base: &str, user: &str, password: &str) -> Self {
        let mut client = Client::new(base);
        let (status, body) = client
            .send(reqwest::Method::POST, "/api/login", Some(json!({"username": user, "password": password})))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        client.token = Some(body["token"].as_str().unwrap().to_owned());
        client
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

async fn setup_users(redis_url: &str) {
    let store = tm::Store::connect(redis_url).await.unwrap();
    assert!(store.create_user("ada", &hash_password("ada-password")).await.unwrap());
    assert!(store.create_user("bob", &hash_password("bob-password")).await.unwrap());
}

#[actix_rt::test]
async fn every_api_route_needs_a_token_except_login_and_openapi() {
    let redis = RedisServer::start(&tempdir("tm-auth"), false).unwrap();
    setup_users(&redis.url()).await;
    let (base, _server) = start_node(&redis.url(), None).await;
    let anonymous = Client::new(&base);
    for (method, path) in [
        (reqwest::Method::GET, "/api/panels"),
        (reqwest::Method::POST, "/api/panels"),
        (reqwest::Method::GET, "/api/panels/x"),
        (reqwest::Method::POST, "/api/documents"),
        (reqwest::Method::GET, "/api/documents/x"),
        (reqwest::Method::PATCH, "/api/documents/x"),
        (reqwest::Method::POST, "/api/users"),
        (reqwest::Method::GET, "/api/no-such-route"),
    ] {
        let (status, body) = anonymous.send(method.clone(), path, Some(json!({}))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(body["error"], "unauthorized", "{method} {path}: {body}");
    }
    let mut forged = Client::new(&base);
    forged.token = Some(tm::Auth::new(b"another secret").issue("ada").0);
    assert_eq!(forged.get("/api/panels").await.0, StatusCode::UNAUTHORIZED);

    let (status, body) =
        anonymous.send(reqwest::Method::POST, "/api/login", Some(json!({"username": "ada", "password": "nope"}))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_credentials")));
    let (status, _) =
        anonymous.send(reqwest::Method::POST, "/api/login", Some(json!({"username": "eve", "password": "x"}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, spec) = anonymous.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/api/login", "/api/panels", "/api/panels/{id}", "/api/documents/{id}", "/api/documents/{id}/history"]
    {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());

    let ada = Client::login(&base, "ada", "ada-password").await;
    assert_eq!(ada.get("/api/panels").await, (StatusCode::OK, json!([])));
    assert_eq!(ada.get("/api/no-such-route").await.0, StatusCode::NOT_FOUND);
    let (status, _) = ada
        .send(reqwest::Method::POST, "/api/users", Some(json!({"username": "cyd", "password": "cyd-password"})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = ada
        .send(reqwest::Method::POST, "/api/users", Some(json!({"username": "cyd", "password": "other-password"})))
        .await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    let (status, _) =
        ada.send(reqwest::Method::POST, "/api/users", Some(json!({"username": "d d", "password": "password1"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Client::login(&base, "cyd", "cyd-password").await;
}

#[actix_rt::test]
async fn panels_belong_to_their_owner_and_bad_input_is_refused() {
    let redis = RedisServer::start(&tempdir("tm-panels"), false).unwrap();
    setup_users(&redis.url()).await;
    let (base, _server) = start_node(&redis.url(), None).await;
    let ada = Client::login(&base, "ada", "ada-password").await;
    let bob = Client::login(&base, "bob", "bob-password").await;

    let (status, panel) = ada
        .send(
            reqwest::Method::POST,
            "/api/panels",
            Some(json!({"name": "Editor", "mode": "studio", "source": "templates/python_minimal"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{panel}");
    assert_eq!(panel["owner"], "ada");
    let path = format!("/api/panels/{}", panel["id"].as_str().unwrap());
    assert_eq!(ada.get(&path).await, (StatusCode::OK, panel.clone()));
    let (status, updated) =
        ada.send(reqwest::Method::PUT, &path, Some(json!({"name": "Renamed", "mode": "app"}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (updated["name"].as_str(), updated["mode"].as_str(), updated["source"].as_str()),
        (Some("Renamed"), Some("app"), Some("templates/python_minimal"))
    );

    // Another user gets 403 on every verb and sees none of it in their list.
    assert_eq!(bob.get(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.send(reqwest::Method::PUT, &path, Some(json!({"name": "mine"}))).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.send(reqwest::Method::DELETE, &path, None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.get("/api/panels").await, (StatusCode::OK, json!([])));
    assert_eq!(ada.get(&path).await.1["name"], "Renamed", "refused writes changed nothing");

    // Bad input: a clear JSON error, nothing stored.
    let raw = reqwest::Client::new()
        .post(format!("{base}/api/panels"))
        .bearer_auth(ada.token.as_deref().unwrap())
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
        let (status, body) = ada.send(reqwest::Method::POST, "/api/panels", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} gave {body}");
    }
    let huge = json!({"name": "n", "mode": "studio", "source": "x".repeat(tm::api::MAX_BODY)});
    let (status, body) = ada.send(reqwest::Method::POST, "/api/panels", Some(huge)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")));
    assert_eq!(ada.get("/api/panels").await.1.as_array().unwrap().len(), 1);

    assert_eq!(ada.send(reqwest::Method::DELETE, &path, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get(&path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(ada.get("/api/panels").await, (StatusCode::OK, json!([])));
}

#[actix_rt::test]
async fn documents_are_versioned_survive_a_node_restart_and_announce_changes() {
    let redis = RedisServer::start(&tempdir("tm-docs"), false).unwrap();
    setup_users(&redis.url()).await;
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &redis.url()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let collector = kernel.spawn("collector", move || Collector { events: e.clone() });
    bridge
        .link::<Subscribe>("test")
        .ask(Subscribe { topic: Topic::Pattern("nexus:doc:*".into()), subscriber: collector.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    eventually(10, "subscription live", || events.lock().unwrap().iter().any(|e| matches!(e, BusEvent::Up(_)))).await;

    let (base, server) = start_node(&redis.url(), Some(bridge.link("transaction-manager"))).await;
    let ada = Client::login(&base, "ada", "ada-password").await;
    let bob = Client::login(&base, "bob", "bob-password").await;
    let (status, doc) = ada
        .send(reqwest::Method::POST, "/api/documents", Some(json!({"state": {"title": "Draft", "body": "x"}})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(doc["version"], 1);
    let path = format!("/api/documents/{}", doc["id"].as_str().unwrap());
    assert_eq!(ada.get("/api/documents").await.1.as_array().unwrap().len(), 1);
    assert_eq!(bob.get("/api/documents").await, (StatusCode::OK, json!([])));

    let (status, doc) = ada
        .send(reqwest::Method::PATCH, &path, Some(json!({"version": 1, "patch": {"title": "Final", "body": null}})))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!((doc["version"].as_u64(), &doc["state"]), (Some(2), &json!({"title": "Final"})));

    // A patch made against version 1 is refused, not applied.
    let (status, body) =
        ada.send(reqwest::Method::PATCH, &path, Some(json!({"version": 1, "patch": {"title": "Lost"}}))).await;
    assert_eq!(
        (status, body["error"].as_str(), body["current_version"].as_u64()),
        (StatusCode::CONFLICT, Some("stale_version"), Some(2))
    );
    assert_eq!(ada.get(&path).await.1["state"], json!({"title": "Final"}));

    // Ten writers racing at version 2: exactly one wins.
    let racers =
        (0..10).map(|i| ada.send(reqwest::Method::PATCH, &path, Some(json!({"version": 2, "patch": {"n": i}}))));
    let statuses: Vec<StatusCode> = futures::future::join_all(racers).await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 9, "{statuses:?}");

    // Ownership.
    assert_eq!(bob.get(&path).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        bob.send(reqwest::Method::PATCH, &path, Some(json!({"version": 3, "patch": {}}))).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(bob.send(reqwest::Method::DELETE, &path, None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(ada.get("/api/documents/unknown").await.0, StatusCode::NOT_FOUND);

    let (status, history) = ada.get(&format!("{path}/history?since=1")).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<u64> = history.as_array().unwrap().iter().map(|c| c["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, vec![2, 3]);
    assert_eq!(history[0]["patch"], json!({"title": "Final", "body": null}));

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
    server.stop(true).await;
    let (base, _server) = start_node(&redis.url(), None).await;
    let ada = Client::login(&base, "ada", "ada-password").await;
    assert_eq!(ada.get(&path).await, (StatusCode::OK, before));

    assert_eq!(ada.send(reqwest::Method::DELETE, &path, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(ada.get(&path).await.0, StatusCode::NOT_FOUND);
}
