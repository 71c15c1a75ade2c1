//! The LLM manager end to end: a node with the transaction manager and the
//! llm-manager over its own brokers, a scripted OpenAI-compatible server
//! that counts requests, contexts driven through the HTTP API.

use std::time::Duration;

use nexus_actors::node::Role;
use nexus_actors::platform::store::Redis;
use nexus_actors::roles::llm_manager::lease::{self, Lease};
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel};
use nexus_testkit::{metric, ApiClient, TestNode};
use serde_json::{json, Value};

const ROLES: &[Role] = &[Role::TransactionManager, Role::LlmManager];

async fn node_with(name: &str, model: &ScriptedModel) -> TestNode {
    let endpoint = EndpointConfig::new(&model.url(), "scripted").unwrap();
    TestNode::start_with(name, ROLES, |c| {
        c.llm.model = ModelConfig::new(vec![endpoint]);
        c.llm.model.backoff = Duration::from_millis(20);
    })
    .await
}

/// Polls `GET path` until `done` holds for its body; the body then.
async fn poll(client: &ApiClient, path: &str, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = client.get(path).await;
        if done(status.as_u16(), &body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {status} {body:#}");
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the turn of `command_offset` to be answered; the transcript then.
async fn answered(client: &ApiClient, context: &str, command_offset: i64) -> Value {
    let path = format!("/api/contexts/{context}/transcript");
    let key = command_offset.to_string();
    poll(client, &path, "the turn's answer", |status, body| status == 200 && body["answered"].get(&key).is_some()).await
}

async fn context(client: &ApiClient, tools: &[&str]) -> String {
    let (status, body) = client.post("/api/contexts", json!({ "system": "You are terse.", "tools": tools })).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn say(client: &ApiClient, context: &str, content: &str) -> i64 {
    let (status, body) = client.post(&format!("/api/contexts/{context}/messages"), json!({ "content": content })).await;
    assert_eq!(status, 202, "{body}");
    body["offset"].as_i64().unwrap()
}

fn roles(transcript: &Value) -> Vec<String> {
    transcript["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap().to_owned()).collect()
}

/// The model asks for two tools at once (arguments split across chunks),
/// then answers from their results.
fn two_tools_then_answer(call: &ModelCall) -> Reply {
    if call.tool_results() == 0 {
        Reply::tool_calls(&[("list_documents", "{}"), ("list_documents", "{}")])
    } else {
        Reply::text("You have no documents.")
    }
}

#[actix_rt::test]
async fn a_turn_runs_parallel_tools_and_replay_and_fork_call_no_model() {
    let model = ScriptedModel::start(two_tools_then_answer);
    let node = node_with("llm-turn", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &["list_documents"]).await;
    let offset = say(&ada, &id, "What documents do I have?").await;
    let transcript = answered(&ada, &id, offset).await;
    assert_eq!(roles(&transcript), ["user", "assistant", "tool", "tool", "assistant"], "{transcript:#}");
    let messages = transcript["messages"].as_array().unwrap();
    assert_eq!(messages[4]["content"], "You have no documents.");
    assert!(messages[2]["content"].as_str().unwrap().contains("documents"), "the tool's result reached the model");
    assert_eq!(transcript["answered"][offset.to_string()], "completed");
    assert_eq!(model.requests(), 2, "one model call per step");
    let second = model.received()[1].clone();
    let sent_roles: Vec<&str> =
        second["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(sent_roles, ["system", "user", "assistant", "tool", "tool"], "the prompt is rebuilt by folding");

    // Mid-turn: after the model asked for the tools, before their results.
    let asked = messages[1]["offset"].as_i64().unwrap();
    let (status, mid) = ada.get(&format!("/api/contexts/{id}/transcript?at={asked}")).await;
    assert_eq!(status, 200, "{mid}");
    assert_eq!(roles(&mid), ["user", "assistant"]);
    assert!(mid["open"]["calls"].as_array().unwrap().len() == 2, "the open turn shows the calls under way: {mid:#}");
    assert!(transcript["steps"].as_array().unwrap().iter().any(|s| s["kind"] == "model" && s["duration_ms"].is_u64()));

    // A fork at that point references the parent's records and starts from there.
    let (status, fork) = ada.post(&format!("/api/contexts/{id}/fork"), json!({ "at": asked })).await;
    assert_eq!(status, 201, "{fork}");
    let child = fork["id"].as_str().unwrap().to_owned();
    assert_eq!(fork["parent"], json!({ "context": id, "offset": asked }));
    let child_transcript = until_transcript(&ada, &child).await;
    assert_eq!(roles(&child_transcript), ["user", "assistant"], "{child_transcript:#}");
    assert_eq!(model.requests(), 2, "replay and fork made no model call");

    // The fork goes its own way from there.
    let child_offset = say(&ada, &child, "And now?").await;
    let child_done = answered(&ada, &child, child_offset).await;
    assert_eq!(roles(&child_done).first().map(String::as_str), Some("user"));
    let (_, parent_again) = ada.get(&format!("/api/contexts/{id}/transcript")).await;
    assert_eq!(roles(&parent_again).len(), 5, "the parent is untouched by its fork");
    node.stop().await;
}

async fn until_transcript(client: &ApiClient, id: &str) -> Value {
    poll(client, &format!("/api/contexts/{id}/transcript"), "a transcript", |status, _| status == 200).await
}

#[actix_rt::test]
async fn invented_tools_and_invalid_arguments_go_back_to_the_model() {
    let model = ScriptedModel::start(|call: &ModelCall| match call.tool_results() {
        0 => Reply::tool_calls(&[("delete_everything", "{}"), ("list_documents", "{\"nope\": ")]),
        _ => Reply::text("Sorry."),
    });
    let node = node_with("llm-bad-tools", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &["list_documents"]).await;
    let offset = say(&ada, &id, "Clean up.").await;
    let transcript = answered(&ada, &id, offset).await;
    assert_eq!(transcript["answered"][offset.to_string()], "completed", "{transcript:#}");
    let messages = transcript["messages"].as_array().unwrap();
    assert!(messages[2]["content"].as_str().unwrap().contains("not_found"), "{:#}", messages[2]);
    assert!(messages[3]["content"].as_str().unwrap().contains("invalid_arguments"), "{:#}", messages[3]);
    assert_eq!(model.requests(), 2);
    node.stop().await;
}

#[actix_rt::test]
async fn rate_limits_are_retried_and_server_errors_fail_the_turn_with_a_reason() {
    let model = ScriptedModel::scripted(vec![
        Reply::rate_limited(0),
        Reply::text("Fine."),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
        Reply::status(500),
    ]);
    let node = node_with("llm-failures", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &[]).await;
    let first = say(&ada, &id, "Hello?").await;
    let transcript = answered(&ada, &id, first).await;
    assert_eq!(transcript["answered"][first.to_string()], "completed");
    assert_eq!(model.requests(), 2, "the 429 was retried once");
    let second = say(&ada, &id, "Again?").await;
    let transcript = answered(&ada, &id, second).await;
    assert_eq!(transcript["answered"][second.to_string()], "failed", "{transcript:#}");
    let failed: Vec<&Value> =
        transcript["steps"].as_array().unwrap().iter().filter(|s| s["kind"] == "failed").collect();
    assert!(failed.iter().any(|s| s["outcome"] == "model_http"), "{failed:#?}");
    node.stop().await;
}

/// The first model call runs while the turn's message is journaled, yet
/// the journal reads message, text, response; a cancel ends a turn even
/// while that first call is under way; and commands the node's own API
/// produced reach its inbox by the tap, each answered once.
#[actix_rt::test]
async fn a_turns_message_is_journaled_before_its_text_and_a_cancel_ends_a_first_step() {
    let model = ScriptedModel::start(|call: &ModelCall| match call.last_content() {
        Some("Wait forever.") => Reply::Hang,
        _ => Reply::text("Hello there, friend."),
    });
    let node = node_with("llm-first-step", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &[]).await;
    let first = say(&ada, &id, "Hi.").await;
    answered(&ada, &id, first).await;
    let (status, page) = ada.get(&format!("/api/contexts/{id}/events")).await;
    assert_eq!(status, 200, "{page}");
    let kinds: Vec<&str> = page["records"].as_array().unwrap().iter().map(|r| r["type"].as_str().unwrap()).collect();
    let text = kinds.iter().position(|k| *k == "nexus.thought.delta").expect("the answer was streamed");
    let journal_start = ["nexus.context.fenced", "nexus.context.created", "nexus.context.user_message"];
    assert_eq!(kinds[..text], journal_start, "{kinds:?}");
    // The context's writer fenced it before anything else: this node's LLM manager, one process of it.
    let records = page["records"].as_array().unwrap();
    let writer = records[0]["data"]["writer"].as_str().unwrap();
    assert!(writer.starts_with("llm-first-step/"), "{writer}");
    assert!(records.iter().all(|r| r["source"] == writer), "every record is the writer's: {page:#}");
    assert_eq!(kinds[kinds.len() - 2..], ["nexus.llm.response", "nexus.context.turn_completed"], "{kinds:?}");

    let hanging = say(&ada, &id, "Wait forever.").await;
    poll(&ada, "/healthz", "the model to be asked", |_, _| model.requests() == 2).await;
    let (status, body) = ada.post(&format!("/api/contexts/{id}/cancel"), json!({})).await;
    assert_eq!(status, 202, "{body}");
    let transcript = answered(&ada, &id, hanging).await;
    assert_eq!(transcript["answered"][hanging.to_string()], "cancelled", "{transcript:#}");
    assert_eq!(roles(&transcript), ["user", "assistant", "user"], "the cancelled turn's message is on the journal");
    let after = say(&ada, &id, "Still there?").await;
    let transcript = answered(&ada, &id, after).await;
    assert_eq!(transcript["answered"][after.to_string()], "completed", "{transcript:#}");
    assert_eq!(model.requests(), 3);

    // Commands this node produced were handed to its inbox as the broker
    // acknowledged them, and each was still answered exactly once.
    let metrics = reqwest::get(format!("{}/metrics", node.url())).await.unwrap().text().await.unwrap();
    let tapped = metric(&metrics, "nexus_llm_commands_tapped_total").expect("nexus_llm_commands_tapped_total");
    assert!(tapped >= 2.0, "messages after the first command came by the tap: {tapped}");
    // The consumer was moved past each, so the broker was not asked for them again.
    let refetched = metric(&metrics, "nexus_llm_commands_refetched_total").expect("nexus_llm_commands_refetched_total");
    assert_eq!(refetched, 0.0, "tapped commands fetched again: {refetched} of {tapped}");
    let (_, page) = ada.get(&format!("/api/contexts/{id}/events")).await;
    let mut completed: Vec<i64> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "nexus.context.turn_completed")
        .map(|r| r["data"]["command_offset"].as_i64().unwrap())
        .collect();
    completed.sort_unstable();
    assert_eq!(completed, [first, hanging, after], "one turn_completed per command");
    node.stop().await;
}

#[actix_rt::test]
async fn another_users_context_is_out_of_reach() {
    let model = ScriptedModel::start(|_: &ModelCall| Reply::text("hi"));
    let node = node_with("llm-access", &model).await;
    let ada = node.user("ada").await;
    let bob = node.user("bob").await;
    let id = context(&ada, &[]).await;
    for (status, body) in [
        bob.get(&format!("/api/contexts/{id}")).await,
        bob.get(&format!("/api/contexts/{id}/transcript")).await,
        bob.post(&format!("/api/contexts/{id}/messages"), json!({ "content": "mine now" })).await,
        bob.post(&format!("/api/contexts/{id}/fork"), json!({ "at": 0 })).await,
    ] {
        assert_eq!(status, 404, "{body}");
    }
    assert_eq!(model.requests(), 0, "nothing reached the model");
    node.stop().await;
}

#[actix_rt::test]
async fn a_panels_agent_talks_to_its_owners_context_and_no_one_elses() {
    let model =
        ScriptedModel::start(|call: &ModelCall| Reply::text(&format!("heard: {}", call.last_content().unwrap_or(""))));
    let node = node_with("llm-agent", &model).await;
    let ada = node.user("ada").await;
    let bob = node.user("bob").await;
    let panel = |client: &ApiClient| {
        let client = client.clone();
        async move {
            let (status, body) = client
                .post("/api/panels", json!({ "name": "agent", "mode": "studio", "source": "template:python_minimal" }))
                .await;
            assert_eq!(status, 201, "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };
    let (adas_panel, bobs_panel) = (panel(&ada).await, panel(&bob).await);
    let id = context(&ada, &[]).await;
    let redis = redis::Client::open(node.brokers.redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    // What a sidecar publishes for `POST :3500/proxy {"channel": "context", ...}`.
    let publish_as = |panel: &str, content: &str| {
        let envelope = nexus_actors::Envelope::with_type(
            "nexus.panel.message",
            format!("panel/{panel}"),
            json!({ "context": id, "content": content }),
        );
        (format!("nexus:panel:{panel}:out:context"), String::from_utf8(envelope.encode()).unwrap())
    };
    let (channel, message) = publish_as(&bobs_panel, "bob's panel speaking");
    let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg(&message).query_async(&mut conn).await.unwrap();
    let (channel, message) = publish_as(&adas_panel, "ada's panel speaking");
    let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg(&message).query_async(&mut conn).await.unwrap();
    let transcript = poll(&ada, &format!("/api/contexts/{id}/transcript"), "the agent's turn", |status, body| {
        status == 200 && body["answered"].as_object().is_some_and(|a| !a.is_empty())
    })
    .await;
    let messages = transcript["messages"].as_array().unwrap();
    assert_eq!(messages[0]["panel"], adas_panel.as_str(), "{transcript:#}");
    assert_eq!(messages[1]["content"], "heard: ada's panel speaking");
    assert!(!transcript.to_string().contains("bob's panel"), "another user's panel cannot post into the context");
    let metrics = reqwest::get(format!("{}/metrics", node.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_agent_messages_total{outcome=\"not_owner\"} 1"), "{metrics}");
    assert_eq!(model.requests(), 1);
    node.stop().await;
}

#[actix_rt::test]
async fn garbage_on_the_command_topic_is_dead_lettered_and_never_blocks_a_partition() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::Message as _;

    let model = ScriptedModel::start(|_: &ModelCall| Reply::text("still here"));
    let node = node_with("llm-garbage", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &[]).await;
    let (status, info) = ada.get(&format!("/api/contexts/{id}")).await;
    assert_eq!(status, 200, "{info}");
    let kafka = nexus_actors::bus::kafka::KafkaConfig::new(node.brokers.kafka_brokers());
    let producer: FutureProducer = kafka.client().create().unwrap();
    let unknown = "01a20000-0000-7000-8000-000000000000";
    let envelope = |kind: &str, context: &str| {
        nexus_actors::Envelope::with_type(
            kind,
            "attacker",
            json!({ "context": context, "user": "ada", "content": "x" }),
        )
        .encode()
    };
    let oversized = vec![b'x'; 300_000];
    let garbage: Vec<(&str, Vec<u8>, &str)> = vec![
        (id.as_str(), b"not json at all".to_vec(), "not_an_envelope"),
        (id.as_str(), envelope("nexus.context.teapot", &id), "unknown_type"),
        (id.as_str(), envelope("nexus.context.user_message", unknown), "bad_command"),
        ("not-a-context", envelope("nexus.context.user_message", &id), "bad_key"),
        (unknown, envelope("nexus.context.user_message", unknown), "unknown_context"),
        (id.as_str(), oversized, "oversized"),
    ];
    for (key, payload, _) in &garbage {
        // Ahead of the real message (in its partition, for the records keyed by its id).
        let record = FutureRecord::to("semantic.commands").key(*key).payload(payload);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    let offset = say(&ada, &id, "Are you there?").await;
    let transcript = answered(&ada, &id, offset).await;
    assert_eq!(transcript["messages"][1]["content"], "still here", "the partition went on past the garbage");

    let dlq: StreamConsumer =
        kafka.client().set("group.id", "test-dlq").set("auto.offset.reset", "earliest").create().unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition_offset("semantic.dlq", p, rdkafka::Offset::Beginning).unwrap();
    }
    dlq.assign(&partitions).unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < garbage.len() {
        let message = tokio::time::timeout(Duration::from_secs(20), dlq.recv()).await.expect("dead letters").unwrap();
        let letter: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        reasons.push(letter["data"]["reason"].as_str().unwrap().to_owned());
    }
    reasons.sort();
    let mut expected: Vec<&str> = garbage.iter().map(|(_, _, reason)| *reason).collect();
    expected.sort();
    assert_eq!(reasons, expected);
    let metrics = reqwest::get(format!("{}/metrics", node.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_semantic_dead_letters_total{reason=\"not_an_envelope\"} 1"), "{metrics}");
    let taken = metric(&metrics, "nexus_llm_command_delay_seconds_count");
    assert!(taken.is_some_and(|n| n >= 1.0), "the commands taken had their delay observed: {taken:?}");
    // Clients of the test's broker close before it goes (a consumer closing
    // against a stopped broker waits for it).
    drop((dlq, producer));
    node.stop().await;
}

/// A node paused past its lease learns at its next renewal that the lease
/// lapsed (and holds nothing until then, nor after, until it has let go
/// and re-arms it), a node started again under its name drops its dead
/// predecessor's lease instead of waiting for it, and a lease Redis dropped
/// is reported lapsed whatever the node's clock says.
#[actix_rt::test]
async fn a_lapsed_lease_is_noticed_and_a_restarted_node_evicts_its_predecessor() {
    let brokers = nexus_testkit::Brokers::redis("llm-lease");
    let store = Redis::connect(&brokers.redis_url()).await.unwrap();
    let first = Lease::new(store.clone(), "node-a");
    let other = Lease::new(store.clone(), "node-b");
    assert!(!first.held(), "not held before its first renewal");
    let (_, lapsed) = first.renew().await.unwrap();
    assert!(lapsed, "a first renewal comes after no lease");
    assert!(!first.held(), "a renewal that found no lease arms nothing by itself");
    first.rearm();
    assert!(first.held());
    other.renew().await.unwrap();
    other.rearm();
    let (members, lapsed) = first.renew().await.unwrap();
    assert!(first.held() && !lapsed);
    assert_eq!(members.len(), 2);

    actix_rt::time::sleep(lease::TTL - lease::RENEW + Duration::from_millis(100)).await;
    assert!(!first.held(), "unrenewed for TTL - RENEW: no longer held");
    let (_, lapsed) = first.renew().await.unwrap();
    assert!(lapsed, "the renewal after the gap says the lease had lapsed");
    assert!(!first.held(), "nothing begun under the lapsed lease writes before the node has let go");
    first.rearm();
    assert!(first.held(), "re-armed from that renewal");

    // node-a killed and started again: a new member under the same name.
    let again = Lease::new(store.clone(), "node-a");
    again.evict_predecessors().await.unwrap();
    let (members, _) = again.renew().await.unwrap();
    assert_eq!(members, vec![again.member().to_owned(), other.member().to_owned()], "the old node-a is gone");

    // The old process, held by its own clock, learns from Redis that it was
    // removed: a clock that stood still (a frozen machine) cannot vouch.
    assert!(first.held());
    let (_, lapsed) = first.renew().await.unwrap();
    assert!(lapsed, "a lease Redis no longer had is reported lapsed");
    assert!(!first.held());
}

/// A draining node (a rolling restart's SIGTERM) takes no new commands but
/// finishes the turn in flight itself, past its HTTP drain and past the
/// time its lease holds without renewal, before it stops: the turn is
/// answered once, by it.
#[actix_rt::test]
async fn a_draining_node_finishes_the_turn_in_flight_itself() {
    // Seven chunks a second apart: longer than the 2 s notice and than the
    // lease's TTL - RENEW (4 s), so the drain must wait and keep renewing.
    const SLOWLY: Duration = Duration::from_secs(1);
    let model = ScriptedModel::start(|call: &ModelCall| match call.last_content() {
        Some("Take your time.") => Reply::text("Slowly, but surely, done.").with_delay(SLOWLY),
        _ => Reply::text("Hi."),
    });
    let node = node_with("llm-drain", &model).await;
    let ada = node.user("ada").await;
    let id = context(&ada, &[]).await;
    // A node that reads journals but runs no turns (no other node does):
    // whatever answers the turn is the draining node.
    let reader = node.sibling("llm-drain-reader", &[Role::TransactionManager], |_| {}).await;
    let slow = say(&ada, &id, "Take your time.").await;
    poll(&ada, "/healthz", "the model to be asked", |_, _| model.requests() == 1).await;

    let TestNode { node: running, brokers, keys: _keys } = node;
    running.drain().await.expect("the node drains cleanly");

    let ada = ApiClient::login(&format!("http://{}", reader.http), "ada", "ada-password").await;
    let transcript = answered(&ada, &id, slow).await;
    assert_eq!(transcript["answered"][slow.to_string()], "completed", "{transcript:#}");
    let (status, page) = ada.get(&format!("/api/contexts/{id}/events")).await;
    assert_eq!(status, 200, "{page}");
    let completed: Vec<&Value> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "nexus.context.turn_completed" && r["data"]["command_offset"] == slow)
        .collect();
    assert_eq!(completed.len(), 1, "answered once: {page:#}");
    assert_eq!(model.requests(), 1, "the model was asked once");
    reader.stop().await.expect("the reader stops");
    drop(brokers);
}

/// The llm-manager's `/metrics` value of `series` (0 when absent).
async fn series(node: &TestNode, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.url())).await.unwrap().text().await.unwrap();
    metric(&text, series).unwrap_or(0.0)
}

async fn until_all_paused(node: &TestNode, what: &str) {
    let all = |text: String| metric(&text, "nexus_llm_inbox_paused_partitions") == Some(3.0);
    nexus_testkit::until(30, what, || async {
        all(reqwest::get(format!("{}/metrics", node.url())).await.unwrap().text().await.unwrap())
    })
    .await;
}

/// Partitions read to their end are not fetched, and every command still
/// gets its answer: one produced on another node wakes its partition by its
/// hint, one produced with no hint (another producer; a hint lost) by the
/// check of the partition's end, and garbage or forged hints cost a wake at most.
#[actix_rt::test]
async fn partitions_read_to_their_end_sleep_and_every_command_wakes_them() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let model = ScriptedModel::start(|_: &ModelCall| Reply::text("awake"));
    let node = node_with("llm-wake", &model).await;
    let endpoint = EndpointConfig::new(&model.url(), "scripted").unwrap();
    // The API of another node: its commands reach this one's inbox by the broker, announced by hints.
    let api = node
        .sibling("llm-wake-api", &[Role::TransactionManager], |c| c.llm.model = ModelConfig::new(vec![endpoint]))
        .await;
    node.user("ada").await;
    let ada = nexus_testkit::ApiClient::login(&format!("http://{}", api.http), "ada", "ada-password").await;

    // A partition is paused only once read, so every one gets a command first.
    let mut seen = std::collections::BTreeSet::new();
    let mut last = None;
    for _ in 0..60 {
        if seen.len() == 3 {
            break;
        }
        let id = context(&ada, &[]).await;
        let (status, body) = ada.post(&format!("/api/contexts/{id}/messages"), json!({ "content": "hi" })).await;
        assert_eq!(status, 202, "{body}");
        seen.insert(body["partition"].as_i64().unwrap());
        answered(&ada, &id, body["offset"].as_i64().unwrap()).await;
        last = Some(id);
    }
    assert_eq!(seen.len(), 3, "60 contexts fell in every partition of three");
    let id = last.unwrap();

    // The check of the ends may wake a partition before the hint arrives,
    // once in a long while: a few tries, each on a paused partition.
    let hinted = series(&node, "nexus_llm_inbox_wakes_total{cause=\"hint\"}").await;
    for _ in 0..5 {
        until_all_paused(&node, "every partition read to its end and paused").await;
        let offset = say(&ada, &id, "again").await;
        answered(&ada, &id, offset).await;
        if series(&node, "nexus_llm_inbox_wakes_total{cause=\"hint\"}").await > hinted {
            break;
        }
    }
    assert!(
        series(&node, "nexus_llm_inbox_wakes_total{cause=\"hint\"}").await > hinted,
        "another node's command woke its partition"
    );
    nexus_testkit::until(10, "a hint relayed for every command", || async {
        series(&node, "nexus_llm_command_hints_total{outcome=\"relayed\"}").await >= 7.0
    })
    .await;

    // A command no hint announces.
    until_all_paused(&node, "paused again").await;
    let checked = series(&node, "nexus_llm_inbox_wakes_total{cause=\"check\"}").await;
    let kafka = nexus_actors::bus::kafka::KafkaConfig::new(node.brokers.kafka_brokers());
    let producer: FutureProducer = kafka.client().create().unwrap();
    let command = nexus_actors::Envelope::with_type(
        "nexus.context.user_message",
        "another-producer",
        json!({ "context": id, "user": "ada", "content": "unannounced" }),
    )
    .encode();
    let record = FutureRecord::to("semantic.commands").key(&id).payload(&command);
    let offset = producer.send(record, Duration::from_secs(10)).await.unwrap().offset;
    answered(&ada, &id, offset).await;
    assert!(series(&node, "nexus_llm_inbox_wakes_total{cause=\"check\"}").await > checked, "found by the check");

    // Garbage and forged hints: counted, and at most a wake; no turn runs.
    until_all_paused(&node, "paused after the unannounced command").await;
    let relayed = series(&node, "nexus_llm_command_hints_total{outcome=\"relayed\"}").await;
    let malformed = series(&node, "nexus_llm_command_hints_total{outcome=\"malformed\"}").await;
    let calls = model.requests();
    let redis = redis::Client::open(node.brokers.redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let forged =
        |data: Value| nexus_actors::Envelope::with_type("nexus.semantic.command_produced", "attacker", data).encode();
    let hints = [
        b"not an envelope".to_vec(),
        forged(json!({ "partition": 0, "offset": -1 })),
        forged(json!({ "partition": "0", "offset": 1 })),
        forged(json!({ "partition": 0, "offset": 1_000_000_000_000i64 })),
        forged(json!({ "partition": 99, "offset": 5 })),
    ];
    for hint in hints {
        let _: i64 =
            redis::cmd("PUBLISH").arg("nexus:semantic:commands").arg(hint).query_async(&mut conn).await.unwrap();
    }
    nexus_testkit::until(10, "the forged hints relayed and the malformed ones counted", || async {
        series(&node, "nexus_llm_command_hints_total{outcome=\"relayed\"}").await >= relayed + 2.0
            && series(&node, "nexus_llm_command_hints_total{outcome=\"malformed\"}").await >= malformed + 2.0
    })
    .await;
    until_all_paused(&node, "the partition a forged hint woke paused again").await;
    assert_eq!(model.requests(), calls, "a forged hint made no turn run");
    let offset = say(&ada, &id, "still fine?").await;
    let transcript = answered(&ada, &id, offset).await;
    assert_eq!(transcript["answered"][offset.to_string()], "completed");
    drop(producer);
    api.stop().await.unwrap();
    node.stop().await;
}
