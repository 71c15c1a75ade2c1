//! Helpers shared by the `nexus` binary's tests: bare HTTP requests and
//! child processes that die with the test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `ui-tests/`, after checking what the browser tests need is installed;
/// without it they fail and say what is missing.
pub(crate) fn ui_tests() -> std::path::PathBuf {
    let ui_tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui-tests");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Chromium is missing: apt-get install chromium (scripts/test does)"
    );
    assert!(
        ui_tests.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: npm ci --prefix ui-tests (scripts/test does)"
    );
    ui_tests
}

/// A bare HTTP/1.0 GET; returns (status, body).
pub(crate) fn get(port: u16, path: &str) -> Option<(u16, String)> {
    request(port, "GET", path, None, None)
}

/// A bare HTTP/1.0 GET to `addr` (`host:port`); returns (status, body).
pub(crate) fn get_at(addr: &str, path: &str) -> Option<(u16, String)> {
    request_at(addr, "GET", path, None, None)
}

/// A bare HTTP/1.0 request with an optional bearer token and JSON body.
pub(crate) fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, String)> {
    request_at(&format!("127.0.0.1:{port}"), method, path, token, body)
}

fn request_at(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some(token) = token {
        head += &format!("Authorization: Bearer {token}\r\n");
    }
    let body = body.unwrap_or("");
    head += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(head.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Waits up to 60 s for the node on `port` to answer `/healthz`.
pub(crate) fn wait_for_health(port: u16) -> (u16, String) {
    // `nexus dev` answers once its brokers and its model server are up;
    // loading the model on two busy cores can take a while.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(response) = get(port, "/healthz") {
            return response;
        }
        assert!(Instant::now() < deadline, "the node did not answer /healthz within 120s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) struct KillOnDrop(pub Child);

/// SIGTERM first: a node stops its instances and unmounts its panels'
/// volumes on a graceful shutdown; SIGKILL after 20 s.
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nexus dev` serving on 127.0.0.1:`port`, its gateway on `gateway` (0:
/// any free port), its data in `data`, and no model endpoints from the
/// test's environment; the caller adds the rest and spawns it.
pub(crate) fn nexus_dev(port: u16, gateway: u16, data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
    command
        .args(["dev", "--http", &format!("127.0.0.1:{port}"), "--gateway", &format!("127.0.0.1:{gateway}")])
        .arg("--data-dir")
        .arg(data)
        .env_remove("NEXUS_LLM_ENDPOINTS");
    command
}

/// What [`raw_request`] got back.
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    /// The head, lower-cased, for header checks.
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
}

/// A bare HTTP/1.0 request with any body bytes; `content_length`
/// overrides the declared length (to claim more than is sent).
pub(crate) fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    content_length: Option<usize>,
) -> RawResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the node listens");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("a timeout");
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some(token) = token {
        head += &format!("Authorization: Bearer {token}\r\n");
    }
    head += &format!(
        "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        content_length.unwrap_or(body.len())
    );
    stream.write_all(head.as_bytes()).expect("the request is sent");
    // A refusal may come before the whole body is read.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    RawResponse { status, head, body: response[split + 4..].to_vec() }
}
