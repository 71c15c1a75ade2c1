//! How a node's HTTP connections end, against real brokers. A draining
//! node (a rolling restart's SIGTERM) says it is not ready, refuses new
//! sessions, tells open ones to reconnect elsewhere (1012), finishes the
//! request in flight and stops; an idle client's connection is not closed
//! under it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nexus_actors::node::{Role, DRAIN_NOTICE};
use nexus_actors::roles::transaction_manager::session::CLOSE_SERVICE_RESTART;
use nexus_testkit::TestNode;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

mod raw_http;

#[actix_rt::test]
async fn a_draining_node_sends_clients_elsewhere_and_finishes_the_write_in_flight() {
    let node = TestNode::start("drain", &[Role::TransactionManager]).await;
    let (url, addr) = (node.url(), node.node.http);
    let admin = node.admin().await;
    let (status, doc) = admin.post("/api/documents", json!({"state": {"n": 0}})).await;
    assert_eq!(status, StatusCode::CREATED, "{doc}");
    let id = doc["id"].as_str().unwrap().to_owned();
    let version = doc["version"].as_u64().unwrap();

    let ws_url = format!("ws://{addr}/ws?token={}", admin.token());
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    ws.send(Message::text(json!({"type": "subscribe", "doc": id}).to_string())).await.unwrap();
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else { panic!("the session ended early") };
        if text.as_str().contains("\"snapshot\"") {
            break;
        }
    }

    // A write in flight: its head and half its body are in when the drain starts.
    let body = json!({"version": version, "patch": {"n": 1}}).to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut write = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PATCH /api/documents/{id} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        admin.token(),
        body.len()
    );
    write.write_all(head.as_bytes()).await.unwrap();
    write.write_all(first.as_bytes()).await.unwrap();
    let http = reqwest::Client::new();
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "ready before the drain");

    let TestNode { node: running, brokers, keys } = node;
    let drained = actix_rt::spawn(running.drain());

    // The open session is told to reconnect elsewhere.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the session closes at once");
    assert_eq!(closed, Some(CLOSE_SERVICE_RESTART));

    // During the notice the node answers, but it is not ready and takes no new session.
    let ready = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let reasons: Value = ready.json().await.unwrap();
    assert!(reasons.to_string().contains("draining"), "{reasons}");
    let refused = tokio_tungstenite::connect_async(&ws_url).await.expect_err("no new session while draining");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 503),
        other => panic!("expected a 503, got {other}"),
    }

    // The write finishes after the node stopped accepting connections.
    tokio::time::sleep(DRAIN_NOTICE + Duration::from_millis(500)).await;
    assert!(std::net::TcpStream::connect(addr).is_err(), "no new connection after the notice");
    write.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = String::new();
    write.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "the write in flight is answered: {answer}");

    drained.await.unwrap().expect("the node drains cleanly");
    // The acknowledged write is there for the next node.
    let config = nexus_testkit::node_config("drain-next", &[Role::TransactionManager], &brokers, &keys);
    let next = TestNode { node: nexus_actors::node::start(config).await.unwrap(), brokers, keys };
    let (status, doc) = next.admin().await.get(&format!("/api/documents/{id}")).await;
    assert_eq!((status, doc["version"].as_u64()), (StatusCode::OK, Some(version + 1)), "{doc}");
}

/// A client that reuses its pooled connection after a few idle seconds (the
/// browser test's request context did, after 5 s) must find it still open:
/// had the node closed it, the request would fail with a reset.
#[actix_rt::test]
async fn an_idle_keep_alive_connection_stays_open_for_the_next_request() {
    let node = TestNode::start("keep-alive", &[Role::TransactionManager]).await;
    let mut stream = tokio::net::TcpStream::connect(node.node.http).await.unwrap();
    let first = raw_http::request(&mut stream, "GET", "/healthz", "").await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let second = raw_http::request(&mut stream, "GET", "/healthz", "").await;
    assert_eq!(second.map(|a| a.status).ok(), Some(200), "the connection idle for 7 s still serves");
}
