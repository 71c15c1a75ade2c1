//! The Studio's Contexts view end to end: a node with the transaction
//! manager and the llm-manager over its own redis-server and tansu, a
//! model, and headless Chromium driven by playwright-core
//! (`ui-tests/contexts.test.mjs`): a context answers in streamed text, its
//! timeline replays at a record, and a fork there keeps the history.
//!
//! Once with a scripted model (a tool call, then an exact answer streamed a
//! word at a time), once with `nexus dev` and the real local model server
//! it starts (then replay and fork with that server killed), and once with
//! no model, when the view must say why nothing can be made. `scripts/test`
//! installs Chromium, the npm packages and the model; without them the
//! tests fail under `CI` and are passed over elsewhere, saying why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{nexus_dev, wait_for_health, KillOnDrop};
use nexus_actors::infra::{free_port, ModelServer};
use nexus_actors::node::Role;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel};
use nexus_testkit::{prerequisite, tempdir, ApiClient, Brokers, TestNode};
use serde_json::json;

const ROLES: &[Role] = &[Role::TransactionManager, Role::LlmManager];
/// What the scripted model answers, markup included: the page must show it as text.
const ANSWER: &str = "Hello from the <b>scripted</b> model.";
/// The tool the scripted model calls first.
const TOOL: &str = "list_documents";

/// `ui-tests/`, when Chromium, node and playwright-core are installed.
fn ui_tests() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui-tests");
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    let ready = prerequisite(Path::new("/usr/bin/chromium").exists(), "Chromium (apt-get install chromium)")
        && prerequisite(node, "node (apt-get install nodejs)")
        && prerequisite(
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core (npm ci --prefix ui-tests; scripts/test does)",
        );
    ready.then_some(dir)
}

/// Runs `contexts.test.mjs` against the node at `url` as `ada` (password
/// `ada-password`), with `env` on top, its screenshots in the fresh
/// directory `shots` (not the node's); panics with the test's output when
/// it fails.
async fn browser_test(url: String, ui_tests: PathBuf, shots: &str, env: Vec<(&'static str, String)>) {
    let user = "ada";
    let screenshots = tempdir(shots);
    // The node runs on this thread: the browser test waits on another.
    let output = actix_rt::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "contexts.test.mjs"])
            .current_dir(ui_tests)
            .env("NEXUS_URL", url)
            .env("NEXUS_USER", user)
            .env("NEXUS_PASSWORD", format!("{user}-password"))
            .env("NEXUS_SCREENSHOT_DIR", &screenshots)
            .envs(env)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Calls the tool once when it is offered, then answers, slowly enough
/// that the answer is seen arriving.
fn tool_then_answer(call: &ModelCall) -> Reply {
    let reply = match call.tool_results() {
        0 if call.tool_names().contains(&TOOL) => Reply::tool_calls(&[(TOOL, "{}")]),
        _ => Reply::text(ANSWER),
    };
    reply.with_delay(Duration::from_millis(80))
}

#[actix_rt::test]
async fn contexts_view_with_a_scripted_model() {
    let Some(ui_tests) = ui_tests() else { return };
    let model = ScriptedModel::start(tool_then_answer);
    let endpoint = EndpointConfig::new(&model.url(), "scripted").unwrap();
    let node = TestNode::start_with("contexts-ui", ROLES, |c| c.llm.model = ModelConfig::new(vec![endpoint])).await;
    let env = vec![
        ("NEXUS_EXPECT_TOOL", TOOL.to_owned()),
        ("NEXUS_EXPECT_TEXT", ANSWER.to_owned()),
        // A word per chunk, 80 ms apart: the page renders the answer growing.
        ("NEXUS_STREAM_RENDERS", "2".to_owned()),
    ];
    node.user("ada").await;
    browser_test(node.url(), ui_tests, "contexts-ui-shots", env).await;
    assert_eq!(model.requests(), 2, "one call for the tool, one for the answer; replay and fork called no model");
    node.stop().await;
}

#[actix_rt::test]
async fn contexts_view_without_a_model_says_why() {
    let Some(ui_tests) = ui_tests() else { return };
    let node = TestNode::start("contexts-ui-no-model", &[Role::TransactionManager]).await;
    node.user("ada").await;
    let env = vec![("NEXUS_EXPECT_NO_MODEL", "1".to_owned())];
    browser_test(node.url(), ui_tests, "contexts-ui-no-model-shots", env).await;
    node.stop().await;
}

/// Kills (SIGKILL) the local model server that a `nexus dev` with data in
/// `data_dir` started: the one process whose command line names its directory.
fn kill_model_server(data_dir: &Path) -> bool {
    let marker = data_dir.join("model-server");
    let mut killed = false;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("model_server.py") && cmdline.contains(&*marker.to_string_lossy()) {
            let pid = entry.file_name().to_string_lossy().into_owned();
            killed |= Command::new("kill").args(["-9", &pid]).status().is_ok_and(|s| s.success());
        }
    }
    killed
}

/// `nexus dev` with no model configured starts the real local model server
/// and answers in the browser; then, with that server killed, the journal
/// still replays and forks.
#[actix_rt::test]
async fn nexus_dev_answers_with_the_real_model_and_replays_without_it() {
    let Some(ui_tests) = ui_tests() else { return };
    if !prerequisite(ModelServer::installed(), "the local model server (scripts/lib.sh ensure_model)") {
        return;
    }
    let brokers = Brokers::with_kafka("contexts-ui-dev");
    let data = brokers.dir.join("data");
    let port = free_port().unwrap();
    let log = std::fs::File::create(brokers.dir.join("nexus-dev.log")).unwrap();
    let dev = nexus_dev(port, 0, &data)
        .env("REDIS_URL", brokers.redis_url())
        .env("KAFKA_BROKERS", brokers.kafka_brokers())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _dev = KillOnDrop(dev);
    actix_rt::task::spawn_blocking(move || wait_for_health(port)).await.unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let password = std::fs::read_to_string(data.join("admin-password")).unwrap();
    let admin = ApiClient::login(&url, "admin", password.trim()).await;
    let (status, body) = admin.post("/api/users", json!({"username": "ada", "password": "ada-password"})).await;
    assert_eq!(status, 201, "{body}");
    // Two cores share the model, the broker and the browser: a turn may take a while.
    let env = vec![("NEXUS_TURN_TIMEOUT_MS", "240000".to_owned())];
    browser_test(url.clone(), ui_tests, "contexts-ui-dev-shots", env).await;

    assert!(kill_model_server(&data), "the model server nexus dev started is found and killed");
    let ada = ApiClient::login(&url, "ada", "ada-password").await;
    let (status, contexts) = ada.get("/api/contexts").await;
    assert_eq!(status, 200, "{contexts}");
    // The browser test's own context, not the fork it made.
    for context in contexts.as_array().unwrap().iter().filter(|c| c["parent"].is_null()) {
        let id = context["id"].as_str().unwrap();
        let (status, transcript) = ada.get(&format!("/api/contexts/{id}/transcript")).await;
        assert_eq!(status, 200, "{transcript}");
        let Some(answer) = transcript["messages"].as_array().unwrap().iter().find(|m| m["role"] == "assistant") else {
            continue;
        };
        let at = answer["offset"].as_i64().unwrap();
        let (status, fork) = ada.post(&format!("/api/contexts/{id}/fork"), json!({ "at": at })).await;
        assert_eq!(status, 201, "a fork needs no model: {fork}");
        let child = fork["id"].as_str().unwrap();
        let (status, replayed) = ada.get(&format!("/api/contexts/{child}/transcript")).await;
        assert!(status == 200 || status == 409, "{replayed}");
        let (status, middle) = ada.get(&format!("/api/contexts/{id}/transcript?at={at}")).await;
        assert_eq!(status, 200, "replay at an offset needs no model: {middle}");
        assert_eq!(middle["messages"].as_array().unwrap().last().unwrap()["offset"], at);
        return;
    }
    panic!("no context with an answer: {contexts}");
}
