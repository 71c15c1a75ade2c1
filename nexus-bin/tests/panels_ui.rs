//! Panels in the Studio UI end to end (issue 5 §5, issue 12): a real `nexus
//! dev` with its panel manager, local driver and traffic gateway, real
//! redis-server, and headless Chromium driven by playwright-core
//! (`ui-tests/panels.test.mjs`; `ui-tests/workspace.test.mjs`, a panel
//! written in the code editor). Apps scale to zero after 3 s here so the
//! test sees it happen. `scripts/test` installs Chromium and the npm
//! packages; without them this test fails and says what is missing. It
//! fails too when the browser test is skipped or runs no test at all.
//!
//! First, with a plain HTTP client: a running Studio of the admin's is
//! refused to anyone else at the gateway (401 without a credential, 403
//! with another user's token), served to the admin by token or by the
//! cookie the API hands out, and its tool interface is never reachable
//! through the gateway.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer};
use nexus_testkit::ApiClient;
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::KillOnDrop;

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until `port` accepts connections, or fails with the node's log.
fn wait_for(node: &mut KillOnDrop, port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = node.0.try_wait() {
            panic!("nexus dev exited ({status}) before its {what} listened:\n{}", log_tail(log));
        }
        assert!(Instant::now() < deadline, "the {what} of nexus dev did not listen:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a `# name N` summary line of node's TAP output.
fn tap_count(tap: &str, name: &str) -> Option<u64> {
    tap.lines().find_map(|line| line.strip_prefix(&format!("# {name} "))?.trim().parse().ok())
}

#[test]
fn a_panel_runs_in_studio_deploys_as_an_app_scales_to_zero_and_comes_back() {
    browser_test("panels", |base, gateway, password| {
        actix_rt::System::new().block_on(strangers_are_refused_a_running_studio(base, gateway, password));
    });
}

/// `ui-tests/workspace.test.mjs`: a panel written in the Studio's editor.
#[test]
fn a_panel_is_written_in_the_editor_and_runs_restarts_and_deploys() {
    browser_test("workspace", |_, _, _| {});
}

/// Runs `ui-tests/<script>.test.mjs` against a fresh `nexus dev` whose Apps
/// scale to zero after 3 s, after `before(api, gateway, admin password)`.
fn browser_test(script: &str, before: impl FnOnce(&str, &str, &str)) {
    let ui_tests = common::ui_tests();
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-{script}-ui-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let (port, gateway_port) = (free_port().unwrap(), free_port().unwrap());
    let log = dir.join("nexus-dev.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = common::nexus_dev(port, gateway_port, &dir.join("data"))
        .arg("--no-local-model")
        .env("NEXUS_APP_IDLE_SECS", "3")
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    // Stopped (SIGTERM first: the node stops its instances) however the test ends.
    let mut node = KillOnDrop(child);
    wait_for(&mut node, port, "HTTP API", &log);
    wait_for(&mut node, gateway_port, "traffic gateway", &log);
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();
    let (base, gateway) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{gateway_port}"));
    before(&base, &gateway, password.trim());

    let output = Command::new("node")
        .args(["--test", "--test-reporter=tap", &format!("{script}.test.mjs")])
        .current_dir(&ui_tests)
        .env("NEXUS_URL", &base)
        .env("NEXUS_GATEWAY", &gateway)
        .env("NEXUS_PASSWORD", password.trim())
        .env("NEXUS_SCREENSHOT", dir.join(format!("{script}.png")))
        .output()
        .expect("node is installed");
    drop(node);
    let tap = String::from_utf8_lossy(&output.stdout);
    let report = format!("{tap}\n{}\nnexus dev:\n{}", String::from_utf8_lossy(&output.stderr), log_tail(&log));
    assert!(output.status.success(), "browser test failed:\n{report}");
    // A skipped or vanished test must not pass as a success: node exits 0
    // for skipped tests, but does not count them as passed.
    let (tests, pass) = (tap_count(&tap, "tests"), tap_count(&tap, "pass"));
    assert!(tests.is_some_and(|n| n > 0) && pass == tests, "not every browser test ran and passed:\n{report}");
    for name in ["skipped", "skip", "todo", "cancelled"] {
        assert!(tap_count(&tap, name).unwrap_or(0) == 0, "a browser test is {name}:\n{report}");
    }
}

/// Starts a Studio of the admin's and tries it with a plain HTTP client:
/// see the module docs.
async fn strangers_are_refused_a_running_studio(base: &str, gateway: &str, password: &str) {
    let admin = ApiClient::login(base, "admin", password).await;
    let (status, body) = admin.post("/api/users", json!({"username": "mallory", "password": "mallory-password"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mallory = ApiClient::login(base, "mallory", "mallory-password").await;
    let (status, panel) = admin
        .post("/api/panels", json!({"name": "private", "mode": "studio", "source": "template:python_minimal"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{panel}");
    let id = panel["id"].as_str().expect("a panel id").to_owned();
    let (status, body) = admin.post(&format!("/api/panels/{id}/studio"), json!({})).await;
    assert!(status.is_success(), "starting the Studio: {status} {body}");
    until_states(&admin, &id, &["ready", "idle"]).await;

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{gateway}/p/{id}/");
    let get = |path: &str| http.get(format!("{url}{path}"));
    let nobody = get("").send().await.unwrap();
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(nobody.json::<Value>().await.unwrap()["error"], "unauthorized");
    assert_eq!(get("").bearer_auth(mallory.token()).send().await.unwrap().status(), StatusCode::FORBIDDEN);
    let (status, _) = mallory.post(&format!("/api/panels/{id}/access"), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no cookie for someone else's panel");

    // The owner, by token and by the cookie the API sets.
    let page = get("").bearer_auth(admin.token()).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("python_minimal"));
    let access = admin.http.post(format!("{base}/api/panels/{id}/access")).bearer_auth(admin.token()).send().await;
    let access = access.unwrap();
    let set_cookie = access.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains(&format!("Path=/p/{id}/")) && set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert_eq!(get("").header("cookie", &cookie).send().await.unwrap().status(), StatusCode::OK);

    // The panel really has a /manifest; nobody reaches it through the
    // gateway (the gateway's own 404, not the panel's).
    for path in ["manifest", "%6danifest", "MANIFEST", "mcp/execute"] {
        let r = get(path).bearer_auth(admin.token()).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(r.text().await.unwrap().contains("sidecar"), "{path} was refused by the gateway");
    }

    // Gone before the browser test, which watches the admin's panel list.
    let (status, body) = admin.delete(&format!("/api/panels/{id}/studio")).await;
    assert!(status.is_success(), "stopping the Studio: {status} {body}");
    until_states(&admin, &id, &["stopped"]).await;
    let (status, body) = admin.delete(&format!("/api/panels/{id}")).await;
    assert!(status.is_success(), "deleting the panel: {status} {body}");
}

/// Waits (90 s at most) until an instance of panel `id` is in one of `states`.
async fn until_states(client: &ApiClient, id: &str, states: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, instances) = client.get(&format!("/api/panels/{id}/instances")).await;
        let now: Vec<&str> = instances.as_array().into_iter().flatten().filter_map(|s| s["state"].as_str()).collect();
        if now.iter().any(|s| states.contains(s)) {
            return;
        }
        assert!(!now.contains(&"failed"), "the instance failed: {instances}");
        assert!(Instant::now() < deadline, "no instance became {states:?}: {instances}");
        actix_rt::time::sleep(Duration::from_millis(250)).await;
    }
}
