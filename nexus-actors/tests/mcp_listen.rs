//! MCP 2026-07-28 `subscriptions/listen` on document resources, over real
//! sockets: two nodes over one Redis. A listen on the first node hears a
//! change made through the second; someone else's document is refused
//! before anything is subscribed; listens per user are capped; a listen
//! ends with its token and with its node's drain; and its subscriptions
//! end with its request.

use std::time::Duration;

use nexus_actors::node::Role;
use nexus_testkit::{sse, until, ApiClient, TestNode};
use serde_json::{json, Value};

const VERSION: &str = "2026-07-28";

/// Opens `subscriptions/listen` on `base` for `uris` as `client`.
async fn listen(base: &str, client: &ApiClient, uris: &[String]) -> reqwest::Response {
    let meta = json!({"io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": {}});
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen",
        "params": {"_meta": meta, "notifications": {"resourceSubscriptions": uris}}});
    reqwest::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(client.token())
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", VERSION)
        .header("Mcp-Method", "subscriptions/listen")
        .json(&body)
        .send()
        .await
        .expect("the node answers")
}

/// The next JSON-RPC message of an SSE `stream` (within 10 s, pings aside).
async fn next_message(stream: &mut reqwest::Response, buffer: &mut String) -> Value {
    sse::next_message(stream, buffer, Duration::from_secs(10)).await
}

/// One JSON-RPC exchange with `base`'s `/mcp` under `version`.
async fn rpc(base: &str, client: &ApiClient, version: &str, method: &str, params: Value) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(client.token())
        .header("Accept", "application/json, text/event-stream")
        .header("MCP-Protocol-Version", version)
        .header("Mcp-Method", method)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .await
        .expect("the node answers")
        .json()
        .await
        .expect("a JSON answer")
}

async fn new_document(client: &ApiClient, state: Value) -> String {
    let (status, doc) = client.post("/api/documents", json!({"state": state})).await;
    assert_eq!(status, 201, "{doc}");
    doc["id"].as_str().expect("an id").to_owned()
}

fn redis_subscriptions(node: &nexus_actors::node::RunningNode) -> i64 {
    node.kernel.metrics().redis_subscriptions.get()
}

#[actix_rt::test]
async fn a_listen_hears_a_change_made_through_another_node_and_only_the_owners_documents() {
    let a = TestNode::start("mcp-listen", &[Role::TransactionManager]).await;
    let b = a.sibling("mcp-listen-b", &[Role::TransactionManager], |_| {}).await;
    let ada = a.user("ada").await;
    let bob = a.user("bob").await;
    let doc = new_document(&ada, json!({"n": 0})).await;
    let theirs = new_document(&bob, json!({"secret": true})).await;
    let uri = format!("nexus://documents/{doc}");
    let base = a.url();

    // Discovery offers following (sessions do too: tests/mcp_sessions.rs).
    let meta = json!({"io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": {}});
    let discover = rpc(&base, &ada, VERSION, "server/discover", json!({"_meta": meta})).await;
    assert_eq!(discover["result"]["capabilities"]["resources"]["subscribe"], true, "{discover}");

    // Someone else's document, or a missing one, subscribes nothing.
    let before = redis_subscriptions(&a.node);
    for probe in [format!("nexus://documents/{theirs}"), format!("nexus://documents/{}", uuid::Uuid::now_v7())] {
        let mut refused = listen(&base, &ada, &[uri.clone(), probe.clone()]).await;
        let mut buffer = String::new();
        let mut message = next_message(&mut refused, &mut buffer).await;
        if message["method"] == "notifications/subscriptions/acknowledged" {
            message = next_message(&mut refused, &mut buffer).await;
        }
        assert_eq!(message["error"]["message"], format!("no resource {probe:?} is available to you"), "{message}");
        assert!(!message.to_string().contains("secret"));
    }
    assert_eq!(redis_subscriptions(&a.node), before, "a refused listen subscribed nothing");

    // Ada's own document: a change through node b arrives at node a's listen.
    let mut stream = listen(&base, &ada, std::slice::from_ref(&uri)).await;
    assert!(stream.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let mut buffer = String::new();
    let ack = next_message(&mut stream, &mut buffer).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
    assert_eq!(ack["params"]["notifications"]["resourceSubscriptions"], json!([uri]));
    until(10, "the listen's subscription", || async { redis_subscriptions(&a.node) > before }).await;
    let through_b = ApiClient::login(&format!("http://{}", b.http), "ada", "ada-password").await;
    let (status, body) =
        through_b.patch(&format!("/api/documents/{doc}"), json!({"version": 1, "patch": {"n": 1}})).await;
    assert_eq!(status, 200, "{body}");
    let updated = next_message(&mut stream, &mut buffer).await;
    assert_eq!(updated["method"], "notifications/resources/updated", "{updated}");
    assert_eq!(updated["params"]["uri"], uri);
    assert_eq!(updated["params"]["_meta"]["version"], 2, "{updated}");

    // At most 16 listens a user.
    let mut more = Vec::new();
    for _ in 1..16 {
        let mut extra = listen(&base, &ada, std::slice::from_ref(&uri)).await;
        let mut buffer = String::new();
        let ack = next_message(&mut extra, &mut buffer).await;
        assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
        more.push(extra);
    }
    let mut over = listen(&base, &ada, std::slice::from_ref(&uri)).await;
    let mut buffer_over = String::new();
    let mut message = next_message(&mut over, &mut buffer_over).await;
    if message["method"] == "notifications/subscriptions/acknowledged" {
        message = next_message(&mut over, &mut buffer_over).await;
    }
    assert!(message["error"]["message"].as_str().is_some_and(|m| m.contains("too many listens")), "{message}");
    let mut bobs = listen(&base, &bob, &[format!("nexus://documents/{theirs}")]).await;
    let mut bob_buffer = String::new();
    let ack = next_message(&mut bobs, &mut bob_buffer).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "bob is not held to ada's cap: {ack}");
    let (status, body) = bob.patch(&format!("/api/documents/{theirs}"), json!({"version": 1, "patch": {"n": 1}})).await;
    assert_eq!(status, 200, "{body}");
    let updated = next_message(&mut bobs, &mut bob_buffer).await;
    assert_eq!(updated["params"]["uri"], format!("nexus://documents/{theirs}"), "{updated}");
    // Ada's listen heard nothing of bob's document.
    let (status, body) = ada.patch(&format!("/api/documents/{doc}"), json!({"version": 2, "patch": {"n": 2}})).await;
    assert_eq!(status, 200, "{body}");
    let next = next_message(&mut stream, &mut buffer).await;
    assert_eq!(next["params"]["uri"], uri, "{next}");
    assert_eq!(next["params"]["_meta"]["version"], 3, "{next}");

    // Closing the requests gives their subscriptions up.
    drop((stream, more, over, bobs));
    until(15, "the listens' subscriptions given up", || async { redis_subscriptions(&a.node) == before }).await;

    // More than 256 documents is refused; so is none.
    let many: Vec<String> = (0..257).map(|_| format!("nexus://documents/{}", uuid::Uuid::now_v7())).collect();
    for uris in [many, Vec::new()] {
        let mut refused = listen(&base, &ada, &uris).await;
        let mut buffer = String::new();
        let mut message = next_message(&mut refused, &mut buffer).await;
        if message["method"] == "notifications/subscriptions/acknowledged" {
            message = next_message(&mut refused, &mut buffer).await;
        }
        assert_eq!(message["error"]["code"], -32602, "{message}");
    }

    // A listen ends with its token: logging out ends it within a check.
    let session = ApiClient::login(&base, "ada", "ada-password").await;
    let mut ending = listen(&base, &session, std::slice::from_ref(&uri)).await;
    let mut buffer = String::new();
    let ack = next_message(&mut ending, &mut buffer).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
    let (status, body) = session.post("/api/logout", json!({})).await;
    assert!(status.is_success(), "{body}");
    let ended = sse::next_message(&mut ending, &mut buffer, Duration::from_secs(25)).await;
    assert_eq!(ended["error"]["message"], "the listen ended: token revoked (logged out)", "{ended}");

    // A draining node ends its listens with their result: the client goes on elsewhere.
    let b_base = format!("http://{}", b.http);
    let mut on_b = listen(&b_base, &bob, &[format!("nexus://documents/{theirs}")]).await;
    let mut buffer = String::new();
    let ack = next_message(&mut on_b, &mut buffer).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
    let stopping = actix_rt::spawn(b.stop());
    let last = next_message(&mut on_b, &mut buffer).await;
    assert_eq!(last["id"], 1, "{last}");
    assert!(last.get("result").is_some() && last.get("error").is_none(), "a result, not an error: {last}");
    stopping.await.expect("joined").expect("node b stops");
    a.stop().await;
}

#[actix_rt::test]
async fn after_a_redis_outage_a_listen_announces_its_documents_again() {
    let mut a = TestNode::start("mcp-listen-outage", &[Role::TransactionManager]).await;
    let ada = a.user("ada").await;
    let doc = new_document(&ada, json!({"n": 0})).await;
    let uri = format!("nexus://documents/{doc}");
    let before = redis_subscriptions(&a.node);
    let mut stream = listen(&a.url(), &ada, std::slice::from_ref(&uri)).await;
    let mut buffer = String::new();
    let ack = next_message(&mut stream, &mut buffer).await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged", "{ack}");
    until(10, "the listen's subscription", || async { redis_subscriptions(&a.node) > before }).await;

    // Changes made while Redis was away are lost to the bus: the listen
    // says the document may have changed, without a version.
    a.brokers.redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.brokers.redis.restart().expect("redis-server restarts");
    let again = sse::next_message(&mut stream, &mut buffer, Duration::from_secs(20)).await;
    assert_eq!(again["method"], "notifications/resources/updated", "{again}");
    assert_eq!(again["params"]["uri"], uri);
    assert!(again["params"]["_meta"]["version"].is_null(), "no version after an outage: {again}");
    a.stop().await;
}
