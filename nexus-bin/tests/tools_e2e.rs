//! The panel contract end to end with real parts only: `nexus dev` on a
//! real redis-server and tansu, the zero-dependency `python_minimal` panel
//! behind a real `nexus sidecar` process, its tools called over
//! `/api/tools` and over `/mcp` by the official MCP SDK client (Node,
//! `ui-tests/mcp.test.mjs`, `llm_ask` included, answered by a scripted
//! model), and its outbound message seen on Redis.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, nexus_dev, request, wait_for_health, KillOnDrop};
use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_testkit::scripted_model::{Reply, ScriptedModel};
use serde_json::{json, Value};

fn json_request(port: u16, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = request(port, method, path, Some(token), body.as_deref()).expect("the node answers");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn python_minimal_tools_are_callable_through_a_sidecar_over_the_api_and_mcp() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ui_tests = repo.join("ui-tests");
    assert!(
        ui_tests.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "the MCP SDK is missing: npm ci --prefix ui-tests (scripts/test does)"
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-tools-e2e-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let tansu = Tansu::start(&dir.join("tansu"), TansuStorage::Memory).unwrap();
    let model = ScriptedModel::start(|_| Reply::text("The answer is 42."));
    let port = free_port().unwrap();
    let node = nexus_dev(port, 0, &dir.join("data"))
        .args(["--llm-endpoint", &format!("url={},model=scripted", model.url())])
        .env("REDIS_URL", redis.url())
        .env("KAFKA_BROKERS", tansu.brokers())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _node = KillOnDrop(node);
    wait_for_health(port);
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();
    let login = json!({"username": "admin", "password": password.trim()}).to_string();
    let (_, token) = request(port, "POST", "/api/login", None, Some(&login)).unwrap();
    let token: Value = serde_json::from_str(&token).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();

    let panel = json!({"name": "minimal", "mode": "studio", "source": "panel-sdk-docs/python_minimal"});
    let (status, panel) = json_request(port, "POST", "/api/panels", &token, Some(panel));
    assert_eq!(status, 201, "{panel}");
    let id = panel["id"].as_str().unwrap().to_owned();

    let (panel_port, sidecar_port) = (free_port().unwrap(), free_port().unwrap());
    let python = Command::new("python3")
        .arg(repo.join("panel-sdk-docs/python_minimal/server.py"))
        .env("PORT", panel_port.to_string())
        .env("NEXUS_PROXY_URL", format!("http://127.0.0.1:{sidecar_port}/proxy"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs the template");
    let _python = KillOnDrop(python);
    let sidecar = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["sidecar", "--panel", &id, "--redis-url", &redis.url()])
        .args(["--panel-url", &format!("http://127.0.0.1:{panel_port}")])
        .args(["--listen", &format!("127.0.0.1:{sidecar_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _sidecar = KillOnDrop(sidecar);

    let word_count = format!("{id}.word_count");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, tools) = json_request(port, "GET", "/api/tools", &token, None);
        assert_eq!(status, 200, "{tools}");
        let names: Vec<&str> = tools.as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
        if names.contains(&word_count.as_str()) {
            assert!(names.contains(&"list_documents") && names.contains(&format!("{id}.publish_note").as_str()));
            break;
        }
        assert!(Instant::now() < deadline, "the panel's tools were never listed: {names:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, health) = get(sidecar_port, "/healthz").unwrap();
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"state\":\"up\""), "{health}");

    let call = |tool: &str, arguments: Value| {
        json_request(port, "POST", &format!("/api/tools/{tool}/call"), &token, Some(json!({ "arguments": arguments })))
    };
    let (status, body) = call(&word_count, json!({"text": "one two three\nfour"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], json!({"words": 4, "characters": 18, "lines": 2}));
    let (status, body) = call(&word_count, json!({"text": 42}));
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_arguments")), "{body}");
    let (status, body) = call(&format!("{id}.no_such_tool"), json!({}));
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "{body}");
    let (status, _) = request(port, "GET", "/api/tools", None, None).unwrap();
    assert_eq!(status, 401);

    // Another user neither sees nor calls admin's panel tools.
    let bob = json!({"username": "bob", "password": "bobs-password"});
    assert_eq!(json_request(port, "POST", "/api/users", &token, Some(bob.clone())).0, 201);
    let (_, bob_token) = request(port, "POST", "/api/login", None, Some(&bob.to_string())).unwrap();
    let bob_token: Value = serde_json::from_str(&bob_token).unwrap();
    let bob_token = bob_token["token"].as_str().unwrap();
    let (_, bobs_tools) = json_request(port, "GET", "/api/tools", bob_token, None);
    let bobs_tools = bobs_tools.to_string();
    assert!(bobs_tools.contains("list_documents") && !bobs_tools.contains(&id), "{bobs_tools}");
    let bobs_call = json!({"arguments": {"text": "x"}});
    let (status, _) = json_request(port, "POST", &format!("/api/tools/{word_count}/call"), bob_token, Some(bobs_call));
    assert_eq!(status, 404);

    // The panel publishes through its sidecar's /proxy, into its own namespace.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut subscriber = client.get_connection().unwrap();
    let mut pubsub = subscriber.as_pubsub();
    pubsub.subscribe(format!("nexus:panel:{id}:out:notes")).unwrap();
    pubsub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, body) = call(&format!("{id}.publish_note"), json!({"text": "hello platform"}));
    assert_eq!(status, 200, "{body}");
    let message = pubsub.get_message().expect("the note arrives on the panel's channel");
    let envelope: Value = serde_json::from_slice(message.get_payload_bytes()).unwrap();
    assert_eq!(envelope["data"], json!({"text": "hello platform"}));
    assert_eq!(envelope["source"], format!("panel/{id}"));
    assert_eq!(body["result"]["id"], envelope["id"]);

    let output = Command::new("node")
        .args(["--test", "mcp.test.mjs"])
        .current_dir(&ui_tests)
        .env("NEXUS_URL", format!("http://127.0.0.1:{port}"))
        .env("NEXUS_PASSWORD", password.trim())
        .env("NEXUS_PANEL_TOOL", &word_count)
        .env("NEXUS_PANEL_URL", format!("http://127.0.0.1:{panel_port}"))
        .env("NEXUS_LLM", "1")
        .output()
        .expect("node is installed");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "MCP client test failed:\n{report}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(report.contains("# skipped 0"), "no MCP check may be skipped:\n{report}");
    assert!(report.contains("ok 9 - a subscribed document's change arrives"), "the subscription ran:\n{report}");

    // A client that just goes away from a call that reports progress,
    // without a word, cancels it too (its stream's next write fails): the
    // panel stops the work long before its 10 s. So does one in a session
    // (rmcp's sessions cancel only when told; the node tells it).
    let stats = || {
        let (_, body) = get(panel_port, "/stats").expect("the panel answers");
        serde_json::from_str::<Value>(&body).expect("JSON stats")["slow_count"].clone()
    };
    let mcp = |extra: &str, body: &str| {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let head = format!(
            "POST /mcp HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{extra}\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        std::io::Write::write_all(&mut stream, format!("{head}{body}").as_bytes()).unwrap();
        stream
    };
    let hello = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25",
        "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let mut begun = mcp("", &hello.to_string());
    let mut answer = Vec::new();
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut begun, &mut byte).expect("an answer");
        answer.push(byte[0]);
    }
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    let session = answer.lines().find_map(|l| l.strip_prefix("mcp-session-id:")).expect("a session").trim().to_owned();
    let in_session = format!("Mcp-Session-Id: {session}\r\nMCP-Protocol-Version: 2025-11-25\r\n");
    drop(mcp(&in_session, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string()));
    for extra in ["MCP-Protocol-Version: 2025-06-18\r\n", in_session.as_str()] {
        let before = stats();
        let slow = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": format!("{id}.slow_count"), "arguments": {"text": "a b", "steps": 50, "step_ms": 200},
                "_meta": {"progressToken": "gone"}}});
        let gone = mcp(extra, &slow.to_string());
        std::thread::sleep(Duration::from_millis(800));
        drop(gone);
        let deadline = Instant::now() + Duration::from_secs(8);
        while stats()["stopped"] != json!(before["stopped"].as_u64().unwrap() + 1) {
            assert!(Instant::now() < deadline, "the panel never stopped the abandoned call ({extra}): {}", stats());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(stats()["finished"], before["finished"]);
    }

    // Every call was counted, and recorded on the semantic bus.
    let (_, metrics) = get(port, "/metrics").unwrap();
    let sum = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(sum("nexus_mcp_exec_total{outcome=\"ok\",tool=\"panel\"}") >= 3, "{metrics}");
    assert!(sum("nexus_mcp_exec_total{outcome=\"invalid_arguments\"") >= 1, "{metrics}");
    assert!(sum("nexus_mcp_exec_total{outcome=\"cancelled\",tool=\"panel\"}") >= 1, "{metrics}");
    assert!(sum("nexus_bus_published_total{bus=\"kafka\",topic=\"semantic.events\"}") >= 6, "{metrics}");
}
