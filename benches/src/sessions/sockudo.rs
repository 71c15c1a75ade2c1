//! The sessions table's peer: Sockudo (crates.io `sockudo` 5.2, a Rust
//! Pusher-protocol WebSocket server; `scripts/bench` installs it), with one
//! app and one public channel that every client subscribes to. A change is
//! an event triggered through its signed HTTP API, carrying the version as
//! the Nexus clients' change frames do.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use nexus_actors::infra::{find_program, free_port};
use serde_json::json;
use sha2::Sha256;

use super::{Killed, NodeProcess};

const APP_ID: &str = "bench-app";
const APP_KEY: &str = "bench-key";
const APP_SECRET: &str = "bench-secret";
const CHANNEL: &str = "doc";

/// What a client sends to follow the channel.
pub(super) const SUBSCRIBE: &str = r#"{"event":"pusher:subscribe","data":{"channel":"doc"}}"#;

/// The Sockudo binary: `$NEXUS_SOCKUDO`, where `scripts/bench` installs it,
/// or on `PATH`.
pub(super) fn program() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NEXUS_SOCKUDO") {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let installed = home.join(".cache/nexus/sockudo/bin/sockudo");
    if installed.is_file() {
        return Some(installed);
    }
    find_program("sockudo")
}

/// Starts Sockudo on a free loopback port, configured in `dir`: one app,
/// no Redis (local adapter, memory cache and app manager, no queue), no
/// rate limits, no connection limits, no metrics listener, and clients
/// never pinged during a run. Waits until the app answers `/up`.
pub(super) async fn start(program: &Path, dir: &Path) -> NodeProcess {
    let port = free_port().expect("port");
    let config = json!({
        "host": "127.0.0.1",
        "port": port,
        "max_connections": 0,
        "activity_timeout": 3600,
        "adapter": {"driver": "local"},
        "cache": {"driver": "memory"},
        "queue": {"driver": "none"},
        "rate_limiter": {"enabled": false},
        "metrics": {"enabled": false},
        "app_manager": {"driver": "memory", "array": {"apps": [
            {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET, "enabled": true, "max_connections": 0}
        ]}}
    });
    std::fs::create_dir_all(dir).expect("sockudo's directory");
    let file = dir.join("sockudo.json");
    std::fs::write(&file, config.to_string()).expect("sockudo's config");
    let child = Command::new(program)
        .arg("--config")
        .arg(&file)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sockudo starts");
    let server = NodeProcess { child: Killed(child), port };
    // A config it could not read leaves it on its defaults, without the
    // app: `/up/<app>` answers 200 only with this config loaded.
    let (http, deadline) = (reqwest::Client::new(), Instant::now() + Duration::from_secs(30));
    loop {
        let up = http.get(format!("http://127.0.0.1:{port}/up/{APP_ID}")).send().await;
        if up.is_ok_and(|r| r.status().is_success()) {
            return server;
        }
        assert!(Instant::now() < deadline, "sockudo did not serve its app within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client's URL on `port`.
pub(super) fn url(port: u16) -> String {
    format!("ws://127.0.0.1:{port}/app/{APP_KEY}?protocol=7&client=nexus-bench&version=1.0")
}

/// Triggers the change that makes `version + 1` on the server on `port`.
pub(super) async fn trigger(http: &reqwest::Client, port: u16, version: u64) {
    let data = json!({ "version": version + 1 }).to_string();
    let body = json!({"name": "change", "channel": CHANNEL, "data": data}).to_string();
    let path = format!("/apps/{APP_ID}/events");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let query = signed_query((APP_KEY, APP_SECRET), &path, body.as_bytes(), now);
    http.post(format!("http://127.0.0.1:{port}{path}?{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("trigger")
        .error_for_status()
        .expect("trigger accepted");
}

/// The Pusher HTTP API's authentication of a request by the app `(key,
/// secret)`: the query parameters sorted by name, signed with the secret
/// (HMAC-SHA256 of `POST\n<path>\n<query>`).
fn signed_query((key, secret): (&str, &str), path: &str, body: &[u8], now: u64) -> String {
    let body_md5 = hex(&Md5::digest(body));
    let query = format!("auth_key={key}&auth_timestamp={now}&auth_version=1.0&body_md5={body_md5}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    format!("{query}&auth_signature={}", hex(&mac.finalize().into_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// The worked example of the Pusher HTTP API reference
    /// (pusher.com/docs/channels/library_auth_reference/rest-api).
    #[test]
    fn requests_are_signed_as_the_pusher_reference_signs_its_example() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let app = ("278d425bdf160c739803", "7ad3773142a6692b25b8");
        assert_eq!(
            super::signed_query(app, "/apps/3/events", body, 1353088179),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}
