//! The instance's sidecar secret end to end with the templates
//! (python_minimal, node_minimal), each run as the platform runs it.

use std::time::{Duration, Instant};

use nexus_actors::instance::SIDECAR_TOKEN_HEADER;
use nexus_actors::platform::channels;
use nexus_actors::roles::panel_manager::driver::{Code, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::SandboxChoice;
use nexus_actors::tools::protocol::{Outcome, ToolRequest, ToolResponse};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::ToolCall;
use nexus_actors::Envelope;
use serde_json::Value;

use super::harness::{env, panel_id, register, spec, Cleanup};

/// What a redis subscriber on `channel` receives next (blocking, 30 s at most).
fn next_message(pubsub: &mut redis::PubSub<'_>) -> Vec<u8> {
    pubsub.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    pubsub.get_message().expect("a reply within 30 s").get_payload_bytes().to_vec()
}

/// The instance's sidecar secret with the python_minimal template run as the
/// platform runs it: its sidecar lists its tools and runs a call from the
/// bus (so its requests carry the secret), while `/manifest` and
/// `/mcp/execute` without it, or with a wrong one, get 401.
#[test]
fn python_minimal_answers_its_own_sidecar_only() {
    answers_its_own_sidecar_only("python_minimal");
}

/// The same for the Node.js template, under the same sandbox.
#[test]
fn node_minimal_answers_its_own_sidecar_only() {
    answers_its_own_sidecar_only("node_minimal");
}

fn answers_its_own_sidecar_only(template: &str) {
    // Runs without root too (no isolation then): the secret does not depend on the sandbox.
    let env = env(&format!("secret-{template}"), SandboxChoice::Auto);
    let panel = panel_id();
    let instance = format!("secret-{template}-{}", std::process::id());
    let source = format!("template:{template}");
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        register(&env.redis_url, &panel).await;
        let volume = driver.volume(&panel, &source).await.unwrap();
        let started = driver.start(spec(&instance, &panel, Code::Studio(volume))).await.expect("start");
        let token = started.sidecar_token.clone().expect("the driver hands back the sidecar secret");
        let base = format!("http://{}", started.endpoint.addr);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let send = |method: reqwest::Method, path: &str, token: Option<&str>| {
            let mut request = http.request(method, format!("{base}{path}")).header("content-type", "application/json");
            if let Some(token) = token {
                request = request.header(SIDECAR_TOKEN_HEADER, token);
            }
            request.body(r#"{"tool": "word_count", "arguments": {"text": "a b"}}"#).send()
        };

        // Its sidecar read the manifest: the tools are listed.
        let tools = ToolStore::connect(&env.redis_url).await.unwrap();
        let word_count = format!("{panel}.word_count");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !tools.list_for("owner").await.unwrap().iter().any(|t| t.name == word_count) {
            assert!(Instant::now() < deadline, "the sidecar never listed {word_count}");
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        // A call from the bus runs: the sidecar's POST /mcp/execute carried it too.
        let client = redis::Client::open(env.redis_url.as_str()).unwrap();
        let mut subscriber = client.get_connection().unwrap();
        let mut replies = subscriber.as_pubsub();
        // Where the platform's registries hear replies: all a sidecar may answer on.
        let reply_to = channels::tool_replies("test", &panel_id());
        replies.subscribe(&reply_to).unwrap();
        let call = ToolCall::new("word_count", serde_json::json!({"text": "one two three"}), "owner");
        let request = ToolRequest {
            call_id: call.call_id.clone(),
            tool: "word_count".into(),
            arguments: call.arguments.clone(),
            caller: call.caller.clone(),
            deadline: call.deadline,
            idempotency_key: call.call_id.clone(),
            keep_result: false,
            reply_to,
            resource: None,
        };
        let mut publisher = client.get_connection().unwrap();
        let envelope = Envelope::new("test", request).encode();
        let _: u64 = redis::Commands::publish(&mut publisher, channels::panel_calls(&panel), envelope).unwrap();
        let reply = Envelope::<Value>::decode(&next_message(&mut replies)).unwrap().typed::<ToolResponse>().unwrap();
        let Outcome::Result(result) = reply.data.outcome else { panic!("the call failed: {:?}", reply.data.outcome) };
        assert_eq!(result["words"], 3, "{result}");

        // From anything else: refused, whatever it presents.
        let wrong = token.chars().rev().collect::<String>();
        for presented in [None, Some("not-the-secret"), Some(wrong.as_str()), Some("")] {
            for (method, path) in [(reqwest::Method::GET, "/manifest"), (reqwest::Method::POST, "/mcp/execute")] {
                let status = send(method.clone(), path, presented).await.unwrap().status();
                assert_eq!(status, 401, "{method} {path} with {presented:?}");
            }
        }
        assert_eq!(send(reqwest::Method::GET, "/manifest", Some(&token)).await.unwrap().status(), 200);
        assert_eq!(send(reqwest::Method::GET, "/", None).await.unwrap().status(), 200, "its page is anyone's");
        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
    });
    cleanup.instances.clear();
}
