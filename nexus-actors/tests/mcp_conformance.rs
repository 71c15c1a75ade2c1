//! The official MCP conformance suite (`@modelcontextprotocol/conformance`,
//! server mode) against a whole node's `/mcp`, through a proxy that adds
//! the bearer token the suite does not know how to send, and leaves `Host`
//! and `Origin` as the suite wrote them. Needs Node.js and
//! `npm ci --prefix ui-tests` (`scripts/test` does both).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nexus_actors::node::Role;
use nexus_testkit::{prerequisite, TestNode};

/// Forwards every request to `target` (`host:port`) with `token` added,
/// on a free loopback port; returns the port.
async fn token_proxy(target: SocketAddr, token: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    actix_rt::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (client, token) = (client.clone(), token.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (client, token) = (client.clone(), token.clone());
                async move { Ok::<_, Infallible>(forward(&client, target, &token, req).await) }
            });
            actix_rt::spawn(async move {
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    port
}

async fn forward(
    client: &reqwest::Client,
    target: SocketAddr,
    token: &str,
    req: Request<Incoming>,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let url = format!("http://{target}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut request = client.request(method, url).body(body).bearer_auth(token);
    for (name, value) in &parts.headers {
        if name != "authorization" && name != "content-length" {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = request.send().await.unwrap();
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        response = response.header(name.as_str(), value.as_bytes());
    }
    // Streamed: a session's stream (GET) lasts as long as the session.
    let frames = futures::stream::unfold(answer, |mut answer| async move {
        let chunk = answer.chunk().await.ok().flatten()?;
        Some((Ok(Frame::data(chunk)), answer))
    });
    response.body(StreamBody::new(frames).boxed_unsync()).unwrap()
}

/// The suite's entry point, once `node` and it are there.
fn suite() -> Option<std::path::PathBuf> {
    let suite = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ui-tests/node_modules/@modelcontextprotocol/conformance/dist/index.js");
    let node_js = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    prerequisite(node_js && suite.exists(), "node and the MCP conformance suite (npm ci --prefix ui-tests)")
        .then_some(suite)
}

/// Runs `suite` in server mode against the proxy on `port` with `args`;
/// whether it passed, and its report.
async fn server_mode(suite: &Path, port: u16, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let output = tokio::process::Command::new("node")
        .arg(suite)
        .args(["server", "--url", &format!("http://localhost:{port}/mcp")])
        .args(args)
        .output()
        .await
        .expect("the suite runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    (output.status.success(), report)
}

/// Runs `scenario` of `suite` against the proxy on `port`; its report, once it passed.
async fn run(suite: &Path, port: u16, scenario: &str) -> String {
    let (passed, report) = server_mode(suite, port, &["--scenario".as_ref(), scenario.as_ref()]).await;
    assert!(passed, "{scenario} failed:\n{report}");
    report
}

/// A node named `name` whose admin has a document (so resources are
/// listed), and the port of the token proxy in front of it.
async fn served(name: &str) -> (TestNode, u16) {
    let node = TestNode::start(name, &[Role::TransactionManager]).await;
    let admin = node.admin().await;
    let (status, _) = admin.post("/api/documents", serde_json::json!({"state": {"listed": true}})).await;
    assert_eq!(status, 201);
    let port = token_proxy(node.node.http, admin.token().to_owned()).await;
    (node, port)
}

#[actix_rt::test]
async fn the_official_suite_passes_what_nexus_serves() {
    let Some(suite) = suite() else { return };
    let (_node, port) = served("mcp-conformance-served").await;
    for scenario in [
        "server-initialize",
        "ping",
        "tools-list",
        "logging-set-level",
        "completion-complete",
        "resources-list",
        "prompts-list",
    ] {
        let report = run(&suite, port, scenario).await;
        let summary =
            report.lines().find(|l| l.contains("Passed:")).unwrap_or_else(|| panic!("{scenario}: no summary"));
        assert!(summary.contains(", 0 failed"), "{scenario}: {summary}");
        assert!(!summary.contains("Passed: 0/"), "{scenario}: {summary}");
    }
}

#[actix_rt::test]
async fn the_official_suite_finds_dns_rebinding_protection() {
    let Some(suite) = suite() else { return };
    let (_node, port) = served("mcp-conformance").await;
    let report = run(&suite, port, "dns-rebinding-protection").await;
    for check in ["localhost-host-rebinding-rejected", "localhost-host-valid-accepted"] {
        let line =
            report.lines().find(|l| l.contains(&format!("[{check}"))).unwrap_or_else(|| panic!("{check} not run"));
        assert!(line.contains("SUCCESS"), "{check}: {line}");
    }
    assert!(report.contains("Passed: 2/2, 0 failed"), "{report}");
}

/// Every scenario of the suite's active set: those that need the suite's
/// own fixtures are listed, with why, in
/// `tests/mcp_conformance/expected-failures.yaml`; any other failure fails
/// this test, and so does a listed scenario that passes (the list is stale).
#[actix_rt::test]
async fn the_whole_suite_fails_only_where_its_expected_failures_say() {
    let Some(suite) = suite() else { return };
    let (_node, port) = served("mcp-conformance-all").await;
    let baseline = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_conformance/expected-failures.yaml");
    let args = ["--suite".as_ref(), "active".as_ref(), "--expected-failures".as_ref(), baseline.as_os_str()];
    let (passed, report) = server_mode(&suite, port, &args).await;
    assert!(passed, "the suite disagrees with {}:\n{report}", baseline.display());
    assert!(report.contains("Baseline check passed"), "{report}");
}
