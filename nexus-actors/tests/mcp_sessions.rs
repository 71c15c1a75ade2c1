//! MCP sessions (`initialize`, `Mcp-Session-Id`) and `resources/subscribe`
//! over real sockets: two nodes over one Redis. A session's stream hears a
//! change made through the other node; someone else's document, or session,
//! is refused before anything is subscribed; subscriptions per session and
//! sessions per user are capped (the least recently used session makes way); `unsubscribe` and `DELETE` give
//! subscriptions up; a session ends with its token; and a client that does
//! not read its stream is dropped and counted.

use std::time::Duration;

use nexus_actors::node::{Role, RunningNode};
use nexus_testkit::{sse, until, ApiClient, TestNode};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const VERSION: &str = "2025-11-25";

/// One MCP session of a client, on one node.
struct Session {
    base: String,
    token: String,
    id: String,
}

impl Session {
    /// Begins a session on `base` as `client`, with its `initialized` said.
    async fn begin(base: &str, client: &ApiClient) -> (Session, Value) {
        let hello = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
        let response = post(base, client.token(), None, &hello).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = response.headers()["mcp-session-id"].to_str().expect("a session id").to_owned();
        let init = answer(response).await;
        let session = Session { base: base.to_owned(), token: client.token().to_owned(), id };
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let response = post(base, &session.token, Some(&session.id), &initialized).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        (session, init)
    }

    /// One request of the session: its HTTP answer.
    async fn send(&self, method: &str, params: Value) -> reqwest::Response {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        post(&self.base, &self.token, Some(&self.id), &body).await
    }

    /// One request of the session: its JSON-RPC answer.
    async fn call(&self, method: &str, params: Value) -> Value {
        let response = self.send(method, params).await;
        assert_eq!(response.status(), StatusCode::OK);
        answer(response).await
    }

    async fn subscribe(&self, uri: &str) -> Value {
        self.call("resources/subscribe", json!({"uri": uri})).await
    }

    /// The session's own stream (`GET`), for notifications.
    async fn stream(&self) -> reqwest::Response {
        let response = self.request(Method::GET).header("Accept", "text/event-stream").send().await.expect("answers");
        assert_eq!(response.status(), StatusCode::OK);
        response
    }

    fn request(&self, method: Method) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}/mcp", self.base))
            .bearer_auth(&self.token)
            .header("Mcp-Session-Id", &self.id)
            .header("MCP-Protocol-Version", VERSION)
    }
}

async fn post(base: &str, token: &str, session: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/mcp"))
        .bearer_auth(token)
        .header("Accept", "application/json, text/event-stream")
        .json(body);
    if let Some(session) = session {
        request = request.header("Mcp-Session-Id", session).header("MCP-Protocol-Version", VERSION);
    }
    request.send().await.expect("the node answers")
}

/// The JSON-RPC answer in a response, JSON or SSE.
async fn answer(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("a body");
    if let Ok(message) = serde_json::from_str(&text) {
        return message;
    }
    let mut data = text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).filter(|d| !d.is_empty());
    serde_json::from_str(data.next_back().unwrap_or_else(|| panic!("a message in {text:?}"))).expect("JSON-RPC")
}

async fn new_document(client: &ApiClient) -> String {
    let (status, doc) = client.post("/api/documents", json!({"state": {"n": 0}})).await;
    assert_eq!(status, 201, "{doc}");
    doc["id"].as_str().expect("an id").to_owned()
}

fn redis_subscriptions(node: &RunningNode) -> i64 {
    node.kernel.metrics().redis_subscriptions.get()
}

#[actix_rt::test]
async fn a_sessions_stream_hears_its_subscriptions_changed_through_another_node_and_only_its_owners() {
    let a = TestNode::start("mcp-sessions", &[Role::TransactionManager]).await;
    let b = a.sibling("mcp-sessions-b", &[Role::TransactionManager], |_| {}).await;
    let ada = a.user("ada").await;
    let bob = a.user("bob").await;
    let doc = new_document(&ada).await;
    let theirs = new_document(&bob).await;
    let uri = format!("nexus://documents/{doc}");

    // Bob's is the node's oldest session: only ada's may make way for hers.
    let (bobs_first, _) = Session::begin(&a.url(), &bob).await;
    let (session, init) = Session::begin(&a.url(), &ada).await;
    assert_eq!(init["result"]["protocolVersion"], VERSION, "{init}");
    assert_eq!(init["result"]["capabilities"]["resources"]["subscribe"], true, "{init}");
    let mut stream = session.stream().await;
    let mut buffer = String::new();

    // Someone else's document, a missing one, or anything else subscribes nothing.
    let before = redis_subscriptions(&a.node);
    for probe in [
        format!("nexus://documents/{theirs}"),
        format!("nexus://documents/{}", uuid::Uuid::now_v7()),
        "test://watched-resource".to_owned(),
    ] {
        let refused = session.subscribe(&probe).await;
        assert_eq!(refused["error"]["code"], -32002, "{refused}");
        assert_eq!(refused["error"]["message"], format!("no resource {probe:?} is available to you"));
    }
    assert_eq!(redis_subscriptions(&a.node), before, "a refused subscription subscribed nothing");

    // Bob cannot use ada's session, nor hear its stream.
    let bobs = Session { base: a.url(), token: bob.token().to_owned(), id: session.id.clone() };
    let response = bobs.send("resources/subscribe", json!({"uri": format!("nexus://documents/{theirs}")})).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = bobs.request(Method::GET).header("Accept", "text/event-stream").send().await.expect("answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // Ada's own document: a change through node b arrives on her stream.
    let subscribed = session.subscribe(&uri).await;
    assert_eq!(subscribed["result"], json!({}), "{subscribed}");
    until(10, "the session's subscription", || async { redis_subscriptions(&a.node) > before }).await;
    let through_b = ApiClient::login(&format!("http://{}", b.http), "ada", "ada-password").await;
    let (status, body) =
        through_b.patch(&format!("/api/documents/{doc}"), json!({"version": 1, "patch": {"n": 1}})).await;
    assert_eq!(status, 200, "{body}");
    let updated = sse::next_message(&mut stream, &mut buffer, Duration::from_secs(10)).await;
    assert_eq!(updated["method"], "notifications/resources/updated", "{updated}");
    assert_eq!(updated["params"]["uri"], uri);
    assert_eq!(updated["params"]["_meta"]["version"], 2, "{updated}");

    // Bob's changes to his own document are not ada's to hear.
    let (status, body) = bob.patch(&format!("/api/documents/{theirs}"), json!({"version": 1, "patch": {"n": 1}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse::try_next_message(&mut stream, &mut buffer, Duration::from_secs(1)).await, None);

    // Unsubscribed, the change is not announced, and the bridge lets go.
    let gone = session.call("resources/unsubscribe", json!({"uri": uri})).await;
    assert_eq!(gone["result"], json!({}), "{gone}");
    until(10, "the subscription given up", || async { redis_subscriptions(&a.node) == before }).await;
    let (status, body) = ada.patch(&format!("/api/documents/{doc}"), json!({"version": 2, "patch": {"n": 2}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse::try_next_message(&mut stream, &mut buffer, Duration::from_secs(1)).await, None);

    // At most 256 subscriptions a session.
    let mut docs = Vec::new();
    for _ in 0..257 {
        docs.push(new_document(&ada).await);
    }
    for doc in &docs[..256] {
        let ok = session.subscribe(&format!("nexus://documents/{doc}")).await;
        assert_eq!(ok["result"], json!({}), "{ok}");
    }
    let over = session.subscribe(&format!("nexus://documents/{}", docs[256])).await;
    let message = over["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("at most 256"), "{over}");
    let again = session.subscribe(&format!("nexus://documents/{}", docs[0])).await;
    assert_eq!(again["result"], json!({}), "a repeat takes no room: {again}");

    // DELETE ends the session and gives its subscriptions up; its id is unknown since.
    let response = session.request(Method::DELETE).send().await.expect("answers");
    assert!(response.status().is_success(), "{}", response.status());
    until(10, "the session's subscriptions given up", || async { redis_subscriptions(&a.node) == before }).await;
    let response = session.send("tools/list", json!({})).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    drop(stream);

    // A session is its node's: another node does not know it.
    let (session, _) = Session::begin(&a.url(), &ada).await;
    let elsewhere =
        Session { base: format!("http://{}", b.http), token: session.token.clone(), id: session.id.clone() };
    assert_eq!(elsewhere.send("tools/list", json!({})).await.status(), StatusCode::NOT_FOUND);

    // At most 16 sessions a user on a node (one is open): the 17th ends
    // the one used least recently. Bob's are his own.
    let mut more = Vec::new();
    for _ in 1..16 {
        more.push(Session::begin(&a.url(), &ada).await.0);
    }
    assert_eq!(session.send("tools/list", json!({})).await.status(), StatusCode::OK, "the first is used again");
    let evicted = a.node.kernel.metrics().mcp_sessions_evicted.get();
    let (newest, _) = Session::begin(&a.url(), &ada).await;
    assert_eq!(a.node.kernel.metrics().mcp_sessions_evicted.get(), evicted + 1);
    assert_eq!(more[0].send("tools/list", json!({})).await.status(), StatusCode::NOT_FOUND, "the least recently used");
    for kept in [&session, &more[1], &newest, &bobs_first] {
        assert_eq!(kept.send("tools/list", json!({})).await.status(), StatusCode::OK);
    }
    // Stateless requests go on beside a user's sessions.
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}});
    let listed = answer(post(&a.url(), ada.token(), None, &list).await).await;
    assert!(listed["result"]["tools"].is_array(), "{listed}");

    b.stop().await.expect("node b stops");
    a.stop().await;
}

#[actix_rt::test]
async fn a_session_ends_with_its_token_and_a_client_that_does_not_read_is_dropped() {
    let a = TestNode::start("mcp-sessions-end", &[Role::TransactionManager]).await;
    let ada = a.user("ada").await;
    let doc = new_document(&ada).await;
    let uri = format!("nexus://documents/{doc}");
    let before = redis_subscriptions(&a.node);

    // Logging out ends the session within a token check.
    let login = ApiClient::login(&a.url(), "ada", "ada-password").await;
    let (session, _) = Session::begin(&a.url(), &login).await;
    let mut stream = session.stream().await;
    assert_eq!(session.subscribe(&uri).await["result"], json!({}));
    let (status, body) = login.post("/api/logout", json!({})).await;
    assert!(status.is_success(), "{body}");
    until(25, "the session's subscription given up", || async { redis_subscriptions(&a.node) == before }).await;
    let ended =
        tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = stream.chunk().await {} });
    assert!(ended.await.is_ok(), "the session's stream ends with it");

    // A client that never reads its stream (a small receive buffer, so the
    // kernel holds little for it): the changes it is told about back up,
    // and the session is dropped and counted.
    let ada = ApiClient::login(&a.url(), "ada", "ada-password").await;
    let (session, _) = Session::begin(&a.url(), &ada).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small buffer");
    let mut stalled = socket.connect(a.node.http).await.expect("connects");
    let get = format!(
        "GET /mcp HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nMcp-Session-Id: {}\r\n\
         MCP-Protocol-Version: {VERSION}\r\nAccept: text/event-stream\r\n\r\n",
        a.node.http, session.token, session.id
    );
    tokio::io::AsyncWriteExt::write_all(&mut stalled, get.as_bytes()).await.expect("sent");
    let docs = [new_document(&ada).await, new_document(&ada).await, new_document(&ada).await, new_document(&ada).await];
    for doc in &docs {
        assert_eq!(session.subscribe(&format!("nexus://documents/{doc}")).await["result"], json!({}));
    }
    let too_slow = || a.node.kernel.metrics().mcp_sessions_too_slow.get();
    let dropped = too_slow();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut version = 1;
    while too_slow() <= dropped {
        assert!(tokio::time::Instant::now() < deadline, "the session was not dropped in 180 s");
        // Each change is a notification of its own (a new version).
        let paths: Vec<String> = docs.iter().map(|doc| format!("/api/documents/{doc}")).collect();
        let changes = paths.iter().map(|path| ada.patch(path, json!({"version": version, "patch": {"n": version}})));
        for (status, body) in futures::future::join_all(changes).await {
            assert_eq!(status, 200, "{body}");
        }
        version += 1;
    }
    until(30, "the stalled session ended", || async {
        session.send("tools/list", json!({})).await.status() == StatusCode::NOT_FOUND
    })
    .await;
    drop(stalled);
    a.stop().await;
}
