//! Exactly one answer per command through crashes: `nexus node --roles
//! llm-manager` processes are killed with SIGKILL in the middle of turns
//! (a model answer streaming, after a tool ran), and the journal must then
//! hold exactly one `turn_completed` per command, no model step answered
//! twice, and no tool run twice (the tool counts its runs).
//!
//! The transaction manager (the API) and the counting tool run in this
//! process; the LLM managers are child processes over the same brokers.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::kernel::Kernel;
use nexus_actors::node::Role;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_actors::tools::registry::{RegisterTool, RegistryDeps};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::{SystemTool, ToolRegistry};
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel};
use nexus_testkit::{ApiClient, TestNode};
use serde_json::{json, Value};

/// The model asks for `count` once per turn, then streams a slow answer.
fn count_then_answer_slowly(call: &ModelCall) -> Reply {
    match call.tool_results() {
        0 => Reply::tool_calls(&[("count", "{}")]),
        _ => Reply::text("The tool ran and counted one more run, and this answer streams slowly.")
            .with_delay(Duration::from_millis(60)),
    }
}

struct LlmProcess {
    child: Child,
}

impl LlmProcess {
    fn start(name: &str, node: &TestNode, model: &ScriptedModel, log: &Path) -> LlmProcess {
        let log = std::fs::File::create(log).unwrap();
        let errors = log.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nexus"))
            .args(["node", "--roles", "llm-manager", "--name", name, "--http", "127.0.0.1:0"])
            .args(["--redis-url", &node.brokers.redis_url(), "--kafka-brokers", &node.brokers.kafka_brokers()])
            .args(["--llm-endpoint", &format!("url={},model=scripted", model.url())])
            .env("RUST_LOG", "info")
            .stdout(log)
            .stderr(errors)
            .spawn()
            .unwrap();
        LlmProcess { child }
    }

    /// SIGKILL: no goodbye to the group, nothing flushed.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlmProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A registry in this process serving the system tool `count`, which counts its runs.
async fn counting_tool(node: &TestNode) -> (Arc<AtomicUsize>, Kernel) {
    let kernel = Kernel::new("count-tool");
    let redis = node.brokers.redis_url();
    let bridge = RedisBridge::spawn(&kernel, &actix_rt::Arbiter::new().handle(), &redis).unwrap();
    let store = ToolStore::connect(&redis).await.unwrap();
    let registry = ToolRegistry::spawn(RegistryDeps { kernel: kernel.clone(), store, redis: bridge, kafka: None });
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let tool = SystemTool::new("count", "Counts its runs", move |_: Value, _| {
        let runs = counted.clone();
        async move { Ok(json!({ "runs": runs.fetch_add(1, Ordering::SeqCst) + 1 })) }
    });
    registry.link::<RegisterTool>("test").ask(RegisterTool(tool)).await.unwrap().unwrap();
    (runs, kernel)
}

async fn api_node(name: &str, model: &ScriptedModel) -> TestNode {
    let endpoint = EndpointConfig::new(&model.url(), "scripted").unwrap();
    // The API only; the LLM managers are the child processes.
    TestNode::start_with(name, &[Role::TransactionManager], |c| c.llm.model = ModelConfig::new(vec![endpoint])).await
}

/// Starts `contexts` turns, one per new context; their ids and command offsets.
async fn start_turns(ada: &ApiClient, contexts: usize) -> Vec<(String, i64)> {
    let mut turns = Vec::new();
    for i in 0..contexts {
        let (status, created) = ada.post("/api/contexts", json!({ "tools": ["count"] })).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_owned();
        let (status, sent) =
            ada.post(&format!("/api/contexts/{id}/messages"), json!({ "content": format!("turn {i}: count") })).await;
        assert_eq!(status, 202, "{sent}");
        turns.push((id, sent["offset"].as_i64().unwrap()));
    }
    turns
}

/// Waits until `answers` final answers are streaming (a tool ran first).
async fn until_answers_stream(model: &ScriptedModel, answers: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while model.received().iter().filter(|body| body.to_string().contains("\"role\":\"tool\"")).count() < answers {
        assert!(Instant::now() < deadline, "no answer streamed: {} requests", model.requests());
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The context's whole journal, as the API gives it.
async fn journal(ada: &ApiClient, id: &str) -> Vec<Value> {
    let (status, body) = ada.get(&format!("/api/contexts/{id}/events?limit=5000")).await;
    assert_eq!(status, 200, "{body}");
    body["records"].as_array().unwrap().clone()
}

/// Waits for every turn's answer, then checks each command has exactly one
/// answer, each model step one response and each tool call one outcome.
async fn assert_exactly_once(ada: &ApiClient, turns: &[(String, i64)], runs: &AtomicUsize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for (id, offset) in turns {
        loop {
            let records = journal(ada, id).await;
            let done = records.iter().any(|r| {
                r["type"] == "nexus.context.turn_completed" && r["data"]["command_offset"].as_i64() == Some(*offset)
            });
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "turn {offset} of {id} never completed: {records:#?}");
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Anything a dying node had in flight has landed by now.
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    let mut tool_calls = 0;
    for (id, offset) in turns {
        let records = journal(ada, id).await;
        let of = |kind: &str| records.iter().filter(move |r| r["type"] == kind).collect::<Vec<_>>();
        let completed = of("nexus.context.turn_completed");
        let summary: Vec<String> =
            records.iter().map(|r| format!("{}:{}:{}", r["offset"], r["type"], r["data"]["step"])).collect();
        assert_eq!(completed.len(), 1, "one answer to command {offset} of {id}: {summary:#?}");
        assert_eq!(completed[0]["data"]["outcome"], "completed", "{records:#?}");
        assert_eq!(of("nexus.context.created").len(), 1, "the creation is journaled once: {summary:#?}");
        let mut steps = HashSet::new();
        for response in of("nexus.llm.response") {
            let step = response["data"]["step"].as_u64().unwrap();
            assert!(steps.insert(step), "step {step} of {id} was answered by a model twice: {records:#?}");
        }
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        for finished in of("nexus.tool.finished") {
            *outcomes.entry(finished["data"]["call_id"].as_str().unwrap().to_owned()).or_default() += 1;
            assert!(finished["data"].get("result").is_some(), "the tool answered: {finished:#}");
        }
        assert!(outcomes.values().all(|n| *n == 1), "a tool outcome was recorded twice: {outcomes:?}");
        tool_calls += outcomes.len();
    }
    assert_eq!(tool_calls, turns.len(), "one tool call per turn");
    assert_eq!(runs.load(Ordering::SeqCst), turns.len(), "no tool ran twice");
}

#[actix_rt::test]
async fn a_killed_llm_manager_restarts_and_each_command_gets_exactly_one_answer() {
    let model = ScriptedModel::start(count_then_answer_slowly);
    let node = api_node("llm-kill9", &model).await;
    let (runs, _tool) = counting_tool(&node).await;
    let ada = node.user("ada").await;
    let logs = node.brokers.dir.clone();
    let mut first = LlmProcess::start("llm-first", &node, &model, &logs.join("llm-first.log"));
    let turns = start_turns(&ada, 3).await;
    until_answers_stream(&model, 1).await;
    first.kill9();
    let _second = LlmProcess::start("llm-second", &node, &model, &logs.join("llm-second.log"));
    assert_exactly_once(&ada, &turns, &runs).await;
}

#[actix_rt::test]
async fn when_one_of_two_llm_managers_dies_mid_turn_the_other_finishes_every_turn() {
    let model = ScriptedModel::start(count_then_answer_slowly);
    let node = api_node("llm-handover", &model).await;
    let (runs, _tool) = counting_tool(&node).await;
    let ada = node.user("ada").await;
    let logs = node.brokers.dir.clone();
    let mut a = LlmProcess::start("llm-a", &node, &model, &logs.join("llm-a.log"));
    let _b = LlmProcess::start("llm-b", &node, &model, &logs.join("llm-b.log"));
    // Both in the group before the work arrives, so the partitions are shared.
    actix_rt::time::sleep(Duration::from_secs(4)).await;
    let turns = start_turns(&ada, 6).await;
    until_answers_stream(&model, 2).await;
    a.kill9();
    assert_exactly_once(&ada, &turns, &runs).await;
}
