//! The Studio's Contexts view end to end: a node with the transaction
//! manager and the llm-manager over its own redis-server and tansu, a
//! model, and headless Chromium driven by playwright-core
//! (`ui-tests/contexts.test.mjs`): a context answers in streamed text, its
//! timeline replays at a record, and a fork there keeps the history.
//!
//! Once with a scripted model (a tool call, then an exact answer streamed a
//! word at a time), once with the real local model server, and once with
//! no model, when the view must say why nothing can be made. `scripts/test`
//! installs Chromium, the npm packages and the model; without them the
//! tests fail under `CI` and are passed over elsewhere, saying why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nexus_actors::infra::ModelServer;
use nexus_actors::node::Role;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel};
use nexus_testkit::{prerequisite, tempdir, TestNode};

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

/// Runs `contexts.test.mjs` against `node` as a new user, with `env` on
/// top, its screenshots in the fresh directory `shots` (not the node's);
/// panics with the test's output when it fails.
async fn browser_test(node: &TestNode, ui_tests: PathBuf, shots: &str, env: Vec<(&'static str, String)>) {
    let user = "ada";
    node.user(user).await;
    let screenshots = tempdir(shots);
    let url = node.url();
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
    browser_test(&node, ui_tests, "contexts-ui-shots", env).await;
    assert_eq!(model.requests(), 2, "one call for the tool, one for the answer; replay and fork called no model");
    node.stop().await;
}

#[actix_rt::test]
async fn contexts_view_without_a_model_says_why() {
    let Some(ui_tests) = ui_tests() else { return };
    let node = TestNode::start("contexts-ui-no-model", &[Role::TransactionManager]).await;
    browser_test(&node, ui_tests, "contexts-ui-no-model-shots", vec![("NEXUS_EXPECT_NO_MODEL", "1".to_owned())]).await;
    node.stop().await;
}

#[actix_rt::test]
async fn contexts_view_with_the_real_model() {
    let Some(ui_tests) = ui_tests() else { return };
    if !prerequisite(ModelServer::installed(), "the local model server (scripts/lib.sh ensure_model)") {
        return;
    }
    let server = ModelServer::start(&tempdir("contexts-ui-model-server")).expect("the model server starts");
    let mut endpoint = EndpointConfig::new(&server.base_url(), server.model()).unwrap();
    endpoint.concurrency = server.concurrency();
    let node =
        TestNode::start_with("contexts-ui-real", ROLES, |c| c.llm.model = ModelConfig::new(vec![endpoint])).await;
    // Two cores share the model, the broker and the browser: a turn may take a while.
    let env = vec![("NEXUS_TURN_TIMEOUT_MS", "240000".to_owned())];
    browser_test(&node, ui_tests, "contexts-ui-real-shots", env).await;
    node.stop().await;
    drop(server);
}
