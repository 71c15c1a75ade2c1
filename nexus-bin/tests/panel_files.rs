//! A panel's files over HTTP against a real `nexus dev` (real redis-server,
//! the local driver): an empty panel is written file by file and by an
//! upload, its code runs as a Studio instance, and every refusal (another
//! user, a climbing path, an oversized body, a bad archive) changes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{nexus_dev, raw_request, request, wait_for_health, KillOnDrop, RawResponse};
use nexus_actors::infra::{free_port, RedisServer};
use serde_json::{json, Value};

fn call(port: u16, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = request(port, method, path, Some(token), body.as_deref()).expect("the node answers");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn login(port: u16, user: &str, password: &str) -> String {
    let body = json!({"username": user, "password": password}).to_string();
    let (status, text) = request(port, "POST", "/api/login", None, Some(&body)).expect("the node answers");
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).expect("JSON")["token"].as_str().expect("a token").to_owned()
}

fn json_of(response: &RawResponse) -> Value {
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

/// The listing as `path:size` strings.
fn listing(port: u16, id: &str, token: &str) -> Vec<String> {
    let (status, list) = call(port, "GET", &format!("/api/panels/{id}/files"), token, None);
    assert_eq!(status, 200, "{list}");
    let entries = list["entries"].as_array().expect("entries").iter();
    entries.map(|e| format!("{}:{}", e["path"].as_str().unwrap_or("?"), e["size"])).collect()
}

const SERVER: &str = r#"
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"tools": []} if self.path == "/manifest" else {"hello": "from the editor"}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
print("written through the files API", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn an_empty_panel_is_written_through_the_files_api_and_runs() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-panel-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let port = free_port().unwrap();
    let node = nexus_dev(port, 0, &dir.join("data"))
        .arg("--no-local-model")
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _node = KillOnDrop(node);
    wait_for_health(port);
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();
    let admin = login(port, "admin", password.trim());
    let bob = json!({"username": "bob", "password": "bob-password-1", "role": "user"});
    assert_eq!(call(port, "POST", "/api/users", &admin, Some(bob)).0, 201);
    let bob = login(port, "bob", "bob-password-1");

    let panel = json!({"name": "mine", "mode": "studio", "source": "template:empty"});
    let (status, panel) = call(port, "POST", "/api/panels", &admin, Some(panel));
    assert_eq!(status, 201, "{panel}");
    let id = panel["id"].as_str().unwrap().to_owned();
    let files = format!("/api/panels/{id}/files");
    assert_eq!(listing(port, &id, &admin), Vec::<String>::new(), "an empty panel has no files");

    // Written file by file; a save answers 201 when new, 200 when replaced.
    let put = |path: &str, token: &str, body: &[u8]| {
        raw_request(port, "PUT", &format!("{files}/{path}"), Some(token), body, None)
    };
    let saved = put("server.py", &admin, SERVER.as_bytes());
    assert_eq!(saved.status, 201, "{}", String::from_utf8_lossy(&saved.body));
    assert_eq!(json_of(&saved), json!({"path": "server.py", "size": SERVER.len()}));
    assert_eq!(put("server.py", &admin, SERVER.as_bytes()).status, 200);
    let binary: Vec<u8> = (0..=255).collect();
    assert_eq!(put("assets/blob.bin", &admin, &binary).status, 201);
    let read = raw_request(port, "GET", &format!("{files}/assets/blob.bin"), Some(&admin), b"", None);
    assert_eq!((read.status, read.body.as_slice()), (200, binary.as_slice()));
    for header in [
        "content-type: application/octet-stream",
        "x-content-type-options: nosniff",
        "content-security-policy: sandbox",
    ] {
        assert!(read.head.contains(header), "{header} missing from\n{}", read.head);
    }

    // Another user reaches nothing; a climbing or absolute path, an
    // oversized body and a bad archive are refused. Nothing changes.
    let before = listing(port, &id, &admin);
    let (status, _) = call(port, "GET", &files, &bob, None);
    assert_eq!(status, 403);
    for (method, path) in [("GET", "server.py"), ("PUT", "server.py"), ("DELETE", "server.py"), ("PUT", "bob.txt")] {
        let refused = raw_request(port, method, &format!("{files}/{path}"), Some(&bob), b"bob was here", None);
        assert_eq!(refused.status, 403, "bob's {method} {path}");
    }
    assert_eq!(raw_request(port, "PUT", &files, Some(&bob), b"PK\x03\x04", None).status, 403);
    let unknown = format!("/api/panels/{}/files/x", nexus_testkit::panel_id());
    assert_eq!(raw_request(port, "PUT", &unknown, Some(&admin), b"x", None).status, 404);
    for path in ["../../../../etc/nexus-escaped", "a/../../x", "%2e%2e/x", "a//b", "%2Fetc%2Fpasswd"] {
        let refused = put(path, &admin, b"escaped");
        assert_eq!(refused.status, 400, "{path}: {}", String::from_utf8_lossy(&refused.body));
        assert_eq!(json_of(&refused)["error"], "bad_request", "{path}");
    }
    let oversized = raw_request(port, "PUT", &format!("{files}/big"), Some(&admin), b"", Some((16 << 20) + 1));
    assert_eq!((oversized.status, json_of(&oversized)["error"].clone()), (413, json!("too_large")));
    let garbage = raw_request(port, "PUT", &files, Some(&admin), b"\x1f\x8bnot really gzip", None);
    assert_eq!((garbage.status, json_of(&garbage)["error"].clone()), (400, json!("bad_request")));
    let (status, gone) = call(port, "DELETE", &format!("{files}/nothing-here"), &admin, None);
    assert_eq!(status, 404, "{gone}");
    assert_eq!(listing(port, &id, &admin), before, "no refusal changed the files");
    assert!(!Path::new("/etc/nexus-escaped").exists());

    // An upload replaces the tree; the code in it starts as a Studio instance.
    let tree = dir.join("upload");
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::write(tree.join("server.py"), SERVER).unwrap();
    std::fs::write(tree.join("lib/notes.txt"), "uploaded").unwrap();
    let archive = dir.join("upload.tar.gz");
    let tarred = Command::new("tar").arg("czf").arg(&archive).arg("-C").arg(&tree).arg(".").status().unwrap();
    assert!(tarred.success());
    let uploaded = raw_request(port, "PUT", &files, Some(&admin), &std::fs::read(&archive).unwrap(), None);
    assert_eq!(uploaded.status, 200, "{}", String::from_utf8_lossy(&uploaded.body));
    assert_eq!(
        listing(port, &id, &admin),
        ["lib:0".to_owned(), "lib/notes.txt:8".into(), format!("server.py:{}", SERVER.len())]
    );
    assert_eq!(raw_request(port, "DELETE", &format!("{files}/lib"), Some(&admin), b"", None).status, 204);

    let (status, started) = call(port, "POST", &format!("/api/panels/{id}/studio"), &admin, None);
    assert_eq!(status, 201, "{started}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, statuses) = call(port, "GET", &format!("/api/panels/{id}/instances"), &admin, None);
        if statuses.as_array().is_some_and(|s| s.iter().any(|s| s["state"] == "ready")) {
            break;
        }
        assert!(Instant::now() < deadline, "the written panel never became ready: {statuses}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, logs) = call(port, "GET", &format!("/api/panels/{id}/logs"), &admin, None);
    assert!(logs.to_string().contains("written through the files API"), "{logs}");

    let (_, metrics) = request(port, "GET", "/metrics", None, None).unwrap();
    for line in [
        r#"nexus_panel_file_changes_total{op="write",result="ok"} 3"#,
        r#"nexus_panel_file_changes_total{op="upload",result="ok"} 1"#,
        r#"nexus_panel_file_changes_total{op="upload",result="refused"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing");
    }
    let _ = call(port, "DELETE", &format!("/api/panels/{id}/instances"), &admin, None);
}
