//! The transaction manager's side of LLM contexts on a whole node over a
//! real redis-server and tansu: the context routes, the `follow_context`
//! WebSocket frame and the `llm_ask` system tool. No LLM manager runs
//! here: the test reads the commands the API produces back from
//! `semantic.commands` with a plain consumer, and writes the journal
//! itself as the LLM manager would (records on `semantic.events` keyed by
//! the context id, each noted in the directory, live ones published on
//! the context's channel).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nexus_actors::bus::kafka::{KafkaConfig, SEMANTIC_COMMANDS, SEMANTIC_EVENTS};
use nexus_actors::envelope::{Envelope, Payload};
use nexus_actors::node::{NodeConfig, Role};
use nexus_actors::platform::{channels, Redis};
use nexus_actors::roles::llm_manager::lease;
use nexus_actors::roles::llm_manager::model::EndpointConfig;
use nexus_actors::semantic::directory::{ContextDirectory, ContextInfo, Fences};
use nexus_actors::semantic::records::{
    call_id, ContextCreated, ContextFenced, ForkPoint, Journaled, LlmResponse, RequestedCall, ThoughtDelta,
    TurnCompleted, TurnOutcome, Usage, UserMessage, MAX_MESSAGE_BYTES,
};
use nexus_actors::tools::protocol::{Outcome, ToolCalled, ToolFinished};
use nexus_testkit::{ApiClient, TestNode};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TM: &[Role] = &[Role::TransactionManager];

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A model endpoint nobody serves: the node then has a model as far as
/// the API knows (no LLM manager runs to call it).
fn with_model(config: &mut NodeConfig) {
    config.llm.model.endpoints.push(EndpointConfig::new("http://127.0.0.1:9/v1", "scripted").unwrap());
}

/// A node, and the journal as the LLM manager writes it.
struct World {
    node: TestNode,
    directory: ContextDirectory,
    producer: FutureProducer,
}

impl World {
    async fn start(name: &str, change: impl FnOnce(&mut NodeConfig)) -> World {
        let node = TestNode::start_with(name, TM, change).await;
        let directory = ContextDirectory::new(Redis::connect(&node.brokers.redis_url()).await.unwrap());
        let producer = KafkaConfig::new(node.brokers.kafka_brokers()).client().create().unwrap();
        World { node, directory, producer }
    }

    fn brokers(&self) -> String {
        self.node.brokers.kafka_brokers()
    }

    /// Appends `data` to `context`'s journal; its offset.
    async fn journal<T: Payload>(&self, context: &str, data: T) -> i64 {
        self.journal_as("test", context, data).await
    }

    /// Appends `data` to `context`'s journal as the writer `source`; its offset.
    async fn journal_as<T: Payload>(&self, source: &str, context: &str, data: T) -> i64 {
        let (partition, offset) = self.produce_as(source, context, data).await;
        self.directory.journaled(context, partition, offset).await.unwrap();
        offset
    }

    /// Fences `context` for `writer`, as an LLM manager taking it up does,
    /// its lease live for `lease_ms` more (by Redis's clock, give or take
    /// this machine's); the fence's offset, and whether it counts.
    async fn fence_leased(&self, writer: &str, context: &str, lease_ms: i64) -> (i64, bool) {
        let client = redis::Client::open(self.node.brokers.redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let lapses = chrono::Utc::now().timestamp_millis() + lease_ms;
        let _: i64 = conn.zadd(lease::MEMBERS, writer, lapses).await.unwrap();
        let (partition, offset) = self.produce_as(writer, context, ContextFenced { writer: writer.into() }).await;
        (offset, self.directory.fenced(context, partition, offset, writer, lease::MEMBERS).await.unwrap())
    }

    /// Fences `context` for `writer`, whose lease is live; the fence's offset.
    async fn fence(&self, writer: &str, context: &str) -> i64 {
        let (offset, counts) = self.fence_leased(writer, context, 60_000).await;
        assert!(counts, "a live writer's fence counts");
        offset
    }

    /// Appends `data` without telling the directory, as streamed text is; its partition and offset.
    async fn produce<T: Payload>(&self, context: &str, data: T) -> (i32, i64) {
        self.produce_as("test", context, data).await
    }

    async fn produce_as<T: Payload>(&self, source: &str, context: &str, data: T) -> (i32, i64) {
        let payload = Envelope::new(source, data).encode();
        let record = FutureRecord::to(SEMANTIC_EVENTS).key(context).payload(&payload);
        let delivery = self.producer.send(record, Duration::from_secs(10)).await.unwrap();
        (delivery.partition, delivery.offset)
    }

    /// Publishes a journaled record on the context's channel, as the LLM manager does.
    async fn publish<T: Payload>(&self, context: &str, offset: i64, data: T) {
        let record = Envelope::new("test", data).into_untyped();
        let journaled = Journaled { context: context.to_owned(), offset, record };
        let envelope = Envelope::new("test", journaled).encode();
        let client = redis::Client::open(self.node.brokers.redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = conn.publish(channels::context(context), envelope).await.unwrap();
    }

    async fn connect(&self, client: &ApiClient) -> Ws {
        let url = format!("ws://{}/ws?token={}", self.node.node.http, client.token());
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }
}

/// The first `n` commands keyed by `context` on `semantic.commands`, in order, with their offsets.
async fn commands(brokers: &str, context: &str, n: usize) -> Vec<(i64, Envelope)> {
    records(brokers, SEMANTIC_COMMANDS, context, n).await
}

/// The first `n` records keyed by `context` on `topic`, in order, with their offsets.
async fn records(brokers: &str, topic: &str, context: &str, n: usize) -> Vec<(i64, Envelope)> {
    let consumer: StreamConsumer =
        KafkaConfig::new(brokers).client().set("group.id", "contexts-api-test").create().unwrap();
    let mut partitions = TopicPartitionList::new();
    for p in 0..KafkaConfig::new(brokers).partitions {
        partitions.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let mut found = Vec::new();
    while found.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await.expect("commands arrive");
        let message = message.unwrap();
        if message.key() == Some(context.as_bytes()) {
            found.push((message.offset(), Envelope::decode(message.payload().unwrap()).unwrap()));
        }
    }
    found
}

async fn create(client: &ApiClient, body: Value) -> Value {
    let (status, context) = client.post("/api/contexts", body).await;
    assert_eq!(status, StatusCode::CREATED, "{context}");
    context
}

fn id(context: &Value) -> String {
    context["id"].as_str().unwrap().to_owned()
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next frame that is not the welcome.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("no frame within 15s");
        if let Message::Text(text) = message.expect("socket open").expect("no socket error") {
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            if frame["type"] != "welcome" {
                return frame;
            }
        }
    }
}

fn user_message(context: &str, command_offset: i64) -> UserMessage {
    UserMessage {
        context: context.into(),
        user: "ada".into(),
        content: "hi".into(),
        command_offset: Some(command_offset),
    }
}

/// A new root context of `owner`, not yet journaled, as the directory holds it.
fn root_context(owner: &str) -> ContextInfo {
    ContextInfo {
        id: uuid::Uuid::now_v7().to_string(),
        owner: owner.into(),
        model: None,
        tools: Vec::new(),
        parent: None,
        created_at: chrono::Utc::now(),
        partition: None,
        first_offset: None,
        last_offset: None,
    }
}

fn created(context: &str, parent: Option<ForkPoint>) -> ContextCreated {
    ContextCreated {
        context: context.into(),
        owner: "ada".into(),
        model: Some("scripted".into()),
        system: Some("be brief".into()),
        tools: vec!["list_documents".into()],
        parent,
        command_offset: Some(0),
    }
}

fn response(context: &str, step: u32, content: Option<&str>, calls: Vec<RequestedCall>) -> LlmResponse {
    LlmResponse {
        context: context.into(),
        command_offset: 1,
        step,
        content: content.map(str::to_owned),
        tool_calls: calls,
        finish_reason: None,
        usage: Usage { input_tokens: 10, output_tokens: 2 },
        model: "scripted".into(),
        endpoint: "e".into(),
        ttft_ms: 4,
        latency_ms: 9,
    }
}

fn completed(context: &str, command_offset: i64, answer: &str) -> TurnCompleted {
    TurnCompleted {
        context: context.into(),
        command_offset,
        outcome: TurnOutcome::Completed,
        answer: Some(answer.into()),
        steps: 2,
        usage: Usage::default(),
    }
}

#[actix_rt::test]
async fn contexts_are_created_listed_and_reached_by_their_owner_or_an_admin_only() {
    let world = World::start("ctx-access", with_model).await;
    let (ada, bob, admin) = (world.node.user("ada").await, world.node.user("bob").await, world.node.admin().await);
    let first = create(&ada, json!({"model": "scripted", "system": "be brief", "tools": ["list_documents"]})).await;
    let second = create(&ada, json!({})).await;
    let context = id(&first);
    assert_eq!((first["owner"].as_str(), first["model"].as_str()), (Some("ada"), Some("scripted")));
    assert_eq!(first["tools"], json!(["list_documents"]));
    assert!(first["partition"].is_null() && first["parent"].is_null(), "{first}");
    let (status, listed) = ada.get("/api/contexts").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<String> = listed.as_array().unwrap().iter().map(id).collect();
    assert_eq!(listed, [id(&second), context.clone()], "newest first");
    assert_eq!(bob.get("/api/contexts").await.1, json!([]));
    assert_eq!(ada.get(&format!("/api/contexts/{context}")).await, (StatusCode::OK, first.clone()));
    assert_eq!(admin.get(&format!("/api/contexts/{context}")).await.0, StatusCode::OK, "an admin sees any context");

    // Another user's context does not exist for them, whatever they try; and nothing is produced.
    let at = json!({"at": 0});
    let message = json!({"content": "hello"});
    for (method, path, body) in [
        (Method::GET, format!("/api/contexts/{context}"), None),
        (Method::POST, format!("/api/contexts/{context}/messages"), Some(message.clone())),
        (Method::POST, format!("/api/contexts/{context}/cancel"), None),
        (Method::GET, format!("/api/contexts/{context}/events"), None),
        (Method::GET, format!("/api/contexts/{context}/transcript"), None),
        (Method::POST, format!("/api/contexts/{context}/fork"), Some(at.clone())),
        (Method::GET, "/api/contexts/not-a-uuid".to_owned(), None),
        (Method::POST, format!("/api/contexts/{}/messages", uuid::Uuid::now_v7()), Some(message.clone())),
    ] {
        let (status, body) = bob.send(method.clone(), &path, body).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{method} {path}");
    }
    let (status, accepted) = ada.post(&format!("/api/contexts/{context}/messages"), message).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let got: Vec<Envelope> = commands(&world.brokers(), &context, 2).await.into_iter().map(|(_, e)| e).collect();
    let kinds: Vec<&str> = got.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, [ContextCreated::TYPE, UserMessage::TYPE], "bob's attempts produced nothing");
    let made: ContextCreated = got[0].clone().typed().unwrap().data;
    assert_eq!((made.owner.as_str(), made.system.as_deref(), made.command_offset), ("ada", Some("be brief"), None));
    let said: UserMessage = got[1].clone().typed().unwrap().data;
    assert_eq!((said.user.as_str(), said.content.as_str()), ("ada", "hello"));
    assert_eq!(accepted["id"].as_str(), Some(got[1].id.as_str()));
    assert!(accepted["offset"].as_i64().is_some() && accepted["partition"].as_i64().is_some(), "{accepted}");

    let (_, spec) = ada.get("/api/openapi.json").await;
    for path in ["", "/{id}", "/{id}/messages", "/{id}/cancel", "/{id}/events", "/{id}/transcript", "/{id}/fork"] {
        assert!(spec["paths"].get(format!("/api/contexts{path}")).is_some(), "openapi lacks /api/contexts{path}");
    }
    assert!(spec["components"]["schemas"].get("Transcript").is_some());

    let (status, cancelled) = ada.post(&format!("/api/contexts/{context}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!(commands(&world.brokers(), &context, 3).await[2].1.kind, "nexus.context.cancel");
}

#[actix_rt::test]
async fn a_tool_call_names_only_a_context_of_its_caller() {
    let world = World::start("ctx-tool-calls", with_model).await;
    let (ada, bob, admin) = (world.node.user("ada").await, world.node.user("bob").await, world.node.admin().await);
    let context = id(&create(&ada, json!({})).await);
    let call = |context: &str| json!({"arguments": {}, "context": context});
    let tool = "/api/tools/list_documents/call";
    // Someone else's context, or a context id that is no context: as for a missing tool, before any call.
    for named in [context.clone(), uuid::Uuid::now_v7().to_string()] {
        let (status, body) = bob.post(tool, call(&named)).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{body}");
        assert!(body.get("call_id").is_none(), "no call was made: {body}");
    }
    let mut made = Vec::new();
    for (client, named) in [(&ada, context.as_str()), (&admin, context.as_str()), (&bob, "bobs-own-chain")] {
        let (status, body) = client.post(tool, call(named)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        made.push(body["call_id"].as_str().unwrap().to_owned());
    }
    // The context's journal holds the owner's and the admin's calls, and nothing of bob's.
    let journal = records(&world.brokers(), SEMANTIC_EVENTS, &context, 4).await;
    let calls: Vec<(String, String)> = journal
        .iter()
        .filter(|(_, e)| e.kind == ToolCalled::TYPE)
        .map(|(_, e)| {
            let called: ToolCalled = e.clone().typed().unwrap().data;
            (called.call.call_id, called.call.caller)
        })
        .collect();
    assert_eq!(calls, [(made[0].clone(), "ada".to_owned()), (made[1].clone(), "admin".to_owned())]);
}

#[actix_rt::test]
async fn bad_input_gets_a_clear_4xx() {
    let world = World::start("ctx-input", with_model).await;
    let ada = world.node.user("ada").await;
    let context = id(&create(&ada, json!({})).await);
    let messages = format!("/api/contexts/{context}/messages");
    let (status, body) = ada.post(&messages, json!({"content": "x".repeat(MAX_MESSAGE_BYTES + 1)})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")), "{body}");
    assert!(body["message"].as_str().unwrap().contains(&MAX_MESSAGE_BYTES.to_string()), "{body}");
    let (status, body) = ada.post(&messages, json!({"content": " \n"})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("empty"), "{body}");
    let (status, _) = ada.post(&messages, json!({"content": "x".repeat(MAX_MESSAGE_BYTES)})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the limit itself is allowed");
    for body in [
        json!({"tools": ["no spaces"]}),
        json!({"tools": ["t", "t"]}),
        json!({"system": "x".repeat(32 * 1024 + 1)}),
        json!({"model": ""}),
        json!({"modle": "typo"}),
        json!({"system_prompt": "no_such_prompt"}),
        json!({"system_prompt": "assistant", "system": "mine"}),
    ] {
        let (status, answer) = ada.post("/api/contexts", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    // A system prompt of the platform's, by name: the context's system is its text.
    let named = id(&create(&ada, json!({"system_prompt": "document_reader"})).await);
    let made: ContextCreated = commands(&world.brokers(), &named, 1).await[0].1.clone().typed().unwrap().data;
    let prompt = nexus_actors::roles::transaction_manager::system_prompts::find("document_reader").unwrap();
    assert_eq!(made.system.as_deref(), Some(prompt.text));
    for query in ["limit=0", "limit=5001", "from=x"] {
        let (status, _) = ada.get(&format!("/api/contexts/{context}/events?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
    }
}

/// A node paused past its lease (writer a) may get a record onto the
/// journal after the context's next writer (b) fenced it and answered:
/// every reader leaves a's late records out, and b's and others' stand.
#[actix_rt::test]
async fn records_a_fenced_off_writer_lands_late_are_left_out_by_every_reader() {
    let world = World::start("ctx-fences", with_model).await;
    let ada = world.node.user("ada").await;
    let context = id(&create(&ada, json!({"model": "scripted"})).await);
    let (a, b) = ("node-a/1", "node-b/2");
    let recorded = ToolFinished {
        call_id: "a call of the tools api".into(),
        tool: "list_documents".into(),
        outcome: Outcome::Result(json!({"documents": []})),
        duration_ms: 1,
    };
    let o = [
        world.fence(a, &context).await,
        world.journal_as(a, &context, created(&context, None)).await,
        world.journal_as(a, &context, user_message(&context, 1)).await,
        world.fence(b, &context).await,
        world.journal_as(b, &context, response(&context, 0, Some("b's answer"), Vec::new())).await,
        // a, resumed: its answer, written before the pause, lands now.
        world.journal_as(a, &context, response(&context, 0, Some("a's late answer"), Vec::new())).await,
        world.journal_as(b, &context, completed(&context, 1, "b's answer")).await,
        // The tool registry's records name a node, never a writer: they stand.
        world.journal(&context, recorded).await,
    ];
    let (status, page) = ada.get(&format!("/api/contexts/{context}/events")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let offsets: Vec<i64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, [o[0], o[1], o[2], o[3], o[4], o[6], o[7]], "a's late answer is left out: {page:#}");
    let (_, page) = ada.get(&format!("/api/contexts/{context}/events?from={}", o[5])).await;
    let offsets: Vec<i64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, [o[6], o[7]], "also when reading from the late record on");
    let (status, transcript) = ada.get(&format!("/api/contexts/{context}/transcript")).await;
    assert_eq!(status, StatusCode::OK, "{transcript}");
    let said: Vec<&str> =
        transcript["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(said, ["hi", "b's answer"], "{transcript:#}");

    // a takes the context back: from its new fence on, b is the one fenced off.
    let back = [
        world.fence(a, &context).await,
        world.journal_as(b, &context, user_message(&context, 2)).await,
        world.journal_as(a, &context, user_message(&context, 3)).await,
    ];
    let (_, page) = ada.get(&format!("/api/contexts/{context}/events?from={}", back[0])).await;
    let offsets: Vec<i64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, [back[0], back[2]], "{page:#}");

    // a fencing again (a new worker of the same process) is a read barrier,
    // not a change of writer: the directory notes it once.
    let again = world.fence(a, &context).await;
    // A machine frozen past its lease, its clock stopped, fences late: Redis's
    // clock says its lease ran out, and the fence does not count.
    let (frozen, counts) = world.fence_leased("node-c/3", &context, -1_000).await;
    assert!(!counts, "a lapsed writer's fence is refused");
    let after = world.journal_as(a, &context, user_message(&context, 4)).await;
    let (_, page) = ada.get(&format!("/api/contexts/{context}/events?from={again}")).await;
    let offsets: Vec<i64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, [again, frozen, after], "a is not fenced out by the refused fence: {page:#}");
    let noted = vec![(o[0], a.to_owned()), (o[3], b.to_owned()), (back[0], a.to_owned())];
    assert_eq!(world.directory.fences(&context).await.unwrap(), Fences::new(noted), "neither `again` nor `frozen`");
}

#[actix_rt::test]
async fn events_and_transcripts_are_read_from_the_journal_at_any_offset() {
    let world = World::start("ctx-journal", with_model).await;
    let ada = world.node.user("ada").await;
    let context = id(&create(&ada, json!({"model": "scripted"})).await);
    let events = format!("/api/contexts/{context}/events");
    let transcript = format!("/api/contexts/{context}/transcript");
    let (status, page) = ada.get(&events).await;
    assert_eq!((status, page), (StatusCode::OK, json!({"context": context, "records": [], "next": 0})));
    let (status, body) = ada.get(&transcript).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "not journaled yet");

    let call = RequestedCall {
        id: "c0".into(),
        call_id: call_id(&context, 1, 0, 0),
        name: "list_documents".into(),
        arguments: "{}".into(),
    };
    let finished = ToolFinished {
        call_id: call.call_id.clone(),
        tool: "list_documents".into(),
        outcome: Outcome::Result(json!({"documents": []})),
        duration_ms: 3,
    };
    let delta = |text: &str| ThoughtDelta { context: context.clone(), command_offset: 1, step: 1, text: text.into() };
    let o = [
        world.journal(&context, created(&context, None)).await,
        world.journal(&context, user_message(&context, 1)).await,
        world.journal(&context, response(&context, 0, None, vec![call])).await,
        world.journal(&context, finished).await,
        world.journal(&context, delta("hel")).await,
        world.journal(&context, delta("lo")).await,
        world.journal(&context, response(&context, 1, Some("hello"), Vec::new())).await,
        world.journal(&context, completed(&context, 1, "hello")).await,
    ];

    let (status, page) = ada.get(&format!("{events}?from={}", o[2])).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let offsets: Vec<i64> = page["records"].as_array().unwrap().iter().map(|r| r["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, o[2..]);
    assert_eq!(page["records"][0]["type"], "nexus.llm.response");
    assert_eq!(page["records"][0]["data"]["tool_calls"][0]["name"], "list_documents");
    assert!(page["records"][0]["id"].is_string() && page["records"][0]["time"].is_string());
    assert_eq!(page["next"].as_i64(), Some(o[7] + 1));
    let (_, page) = ada.get(&format!("{events}?from={}&limit=2", o[1])).await;
    assert_eq!(page["records"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"].as_i64(), Some(o[2] + 1), "where to read on from");

    // Mid-turn: after the tool's result, with the next step's text streaming.
    let (status, mid) = ada.get(&format!("{transcript}?at={}", o[5])).await;
    assert_eq!(status, StatusCode::OK, "{mid}");
    let roles: Vec<&str> = mid["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool"]);
    assert_eq!(mid["open"]["command_offset"], 1);
    assert_eq!(mid["open"]["streaming"], "hello");
    let steps: Vec<&str> = mid["steps"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(steps, ["model", "tool"]);
    assert_eq!((mid["steps"][0]["ttft_ms"].as_u64(), mid["steps"][0]["duration_ms"].as_u64()), (Some(4), Some(9)));
    assert_eq!(mid["steps"][1]["duration_ms"], 3);
    assert_eq!(mid["last_offset"].as_i64(), Some(o[5]));

    let (_, end) = ada.get(&transcript).await;
    assert!(end["open"].is_null(), "{end}");
    assert_eq!(end["messages"].as_array().unwrap().len(), 4);
    assert_eq!(end["messages"][3]["content"], "hello");
    assert_eq!(end["answered"]["1"], "completed");
    for at in [o[0] - 1, o[7] + 1] {
        let (status, body) = ada.get(&format!("{transcript}?at={at}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {body}");
        assert!(body["message"].as_str().unwrap().contains("outside the context"), "{body}");
    }
    let metrics = reqwest::get(format!("{}/metrics", world.node.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_context_transcripts_total 2"), "two transcripts were rebuilt");

    // Streamed text reaches the directory only with its step's response;
    // until then it is within the context all the same, and other
    // contexts' records past the directory's end are not.
    world.journal(&context, user_message(&context, 2)).await;
    let text = ThoughtDelta { context: context.clone(), command_offset: 2, step: 0, text: "wor".into() };
    let (partition, streaming) = world.produce(&context, text).await;
    let (status, mid) = ada.get(&format!("{transcript}?at={streaming}")).await;
    assert_eq!(status, StatusCode::OK, "{mid}");
    assert_eq!(mid["open"]["streaming"], "wor");
    let (status, fork) = ada.post(&format!("/api/contexts/{context}/fork"), json!({"at": streaming})).await;
    assert_eq!(status, StatusCode::CREATED, "{fork}");
    let other = loop {
        let other = uuid::Uuid::now_v7().to_string();
        if world.produce(&other, user_message(&other, 9)).await.0 == partition {
            break other;
        }
    };
    let foreign = world.produce(&other, user_message(&other, 10)).await.1;
    for at in [foreign, foreign + 1_000_000] {
        let (status, body) = ada.get(&format!("{transcript}?at={at}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {body}");
    }
}

#[actix_rt::test]
async fn a_fork_branches_inside_the_journal_and_copies_nothing() {
    let world = World::start("ctx-fork", with_model).await;
    let (ada, admin) = (world.node.user("ada").await, world.node.admin().await);
    let body = json!({"model": "scripted", "system": "be brief", "tools": ["list_documents"]});
    let parent = id(&create(&ada, body).await);
    let fork = format!("/api/contexts/{parent}/fork");
    let (status, answer) = ada.post(&fork, json!({"at": 0})).await;
    assert_eq!((status, answer["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "not journaled yet");

    let o = [
        world.journal(&parent, created(&parent, None)).await,
        world.journal(&parent, user_message(&parent, 1)).await,
        world.journal(&parent, response(&parent, 0, Some("hi there"), Vec::new())).await,
        world.journal(&parent, completed(&parent, 1, "hi there")).await,
    ];
    for at in [o[0] - 1, o[3] + 1] {
        let (status, answer) = ada.post(&fork, json!({"at": at})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("outside the context"), "{answer}");
    }
    let (status, child) = ada.post(&fork, json!({"at": o[1]})).await;
    assert_eq!(status, StatusCode::CREATED, "{child}");
    assert_eq!(child["parent"], json!({"context": parent, "offset": o[1]}));
    assert_eq!((child["owner"].as_str(), child["model"].as_str()), (Some("ada"), Some("scripted")));
    assert_eq!(child["tools"], json!(["list_documents"]));
    let child = id(&child);
    let made: ContextCreated = commands(&world.brokers(), &child, 1).await[0].1.clone().typed().unwrap().data;
    let point = ForkPoint { context: parent.clone(), offset: o[1] };
    assert_eq!((made.parent, made.system.as_deref()), (Some(point.clone()), Some("be brief")));
    let (status, theirs) = admin.post(&fork, json!({"at": o[3]})).await;
    assert_eq!((status, theirs["owner"].as_str()), (StatusCode::CREATED, Some("admin")), "{theirs}");

    // The child's journal holds its own records only; its history is the parent's, read in place.
    let mut child_created = created(&child, Some(point));
    child_created.command_offset = Some(5);
    world.journal(&child, child_created).await;
    let (status, transcript) = ada.get(&format!("/api/contexts/{child}/transcript")).await;
    assert_eq!(status, StatusCode::OK, "{transcript}");
    assert_eq!(transcript["messages"].as_array().unwrap().len(), 1, "history up to the fork point: {transcript}");
    assert_eq!(transcript["messages"][0]["context"].as_str(), Some(parent.as_str()));
    assert_eq!(transcript["parent"]["offset"].as_i64(), Some(o[1]));
    let (_, events) = ada.get(&format!("/api/contexts/{child}/events")).await;
    assert_eq!(events["records"].as_array().unwrap().len(), 1, "nothing copied: {events}");
}

#[actix_rt::test]
async fn without_a_model_llm_routes_answer_503_and_reading_still_works() {
    let world = World::start("ctx-no-model", |_| {}).await;
    let ada = world.node.user("ada").await;
    let (status, body) = ada.post("/api/contexts", json!({})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("llm_unavailable")));
    assert!(body["message"].as_str().unwrap().contains("no model endpoint is configured"), "{body}");
    // A context made while a model was configured.
    let info = root_context("ada");
    world.directory.create(&info, 10).await.unwrap();
    let context = info.id.clone();
    let first = world.journal(&context, created(&context, None)).await;
    for (path, body) in [
        (format!("/api/contexts/{context}/messages"), json!({"content": "hi"})),
        (format!("/api/contexts/{context}/fork"), json!({"at": first})),
    ] {
        let (status, answer) = ada.post(&path, body).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("llm_unavailable")));
    }
    assert_eq!(ada.get("/api/contexts").await.1.as_array().unwrap().len(), 1);
    assert_eq!(ada.get(&format!("/api/contexts/{context}")).await.0, StatusCode::OK);
    let (_, page) = ada.get(&format!("/api/contexts/{context}/events")).await;
    assert_eq!(page["records"][0]["offset"].as_i64(), Some(first));
    let (status, transcript) = ada.get(&format!("/api/contexts/{context}/transcript")).await;
    assert_eq!((status, transcript["system"].as_str()), (StatusCode::OK, Some("be brief")));
    let call = json!({"arguments": {"message": "hi"}});
    let (status, answer) = ada.post("/api/tools/llm_ask/call", call).await;
    assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tool_error")));
    assert!(answer["message"].as_str().unwrap().contains("no model endpoint is configured"), "{answer}");
}

#[actix_rt::test]
async fn a_session_follows_only_the_contexts_its_user_may_see() {
    let world = World::start("ctx-follow", with_model).await;
    let (ada, bob, admin) = (world.node.user("ada").await, world.node.user("bob").await, world.node.admin().await);
    let adas = id(&create(&ada, json!({})).await);
    let bobs = id(&create(&bob, json!({})).await);
    let mut ws = world.connect(&bob).await;
    send(&mut ws, json!({"type": "follow_context", "context": adas})).await;
    let refused = next(&mut ws).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("not_found")), "{refused}");
    send(&mut ws, json!({"type": "follow_context", "context": "nexus:context:*"})).await;
    assert_eq!(next(&mut ws).await["code"], "bad_frame");
    send(&mut ws, json!({"type": "follow_context", "context": bobs})).await;
    assert_eq!(next(&mut ws).await, json!({"type": "context_followed", "context": bobs}));
    world.publish(&adas, 11, user_message(&adas, 1)).await;
    world.publish(&bobs, 12, user_message(&bobs, 1)).await;
    let record = next(&mut ws).await;
    assert_eq!((record["type"].as_str(), record["context"].as_str()), (Some("context_record"), Some(bobs.as_str())));
    assert_eq!(record["offset"], 12, "ada's record never reached bob: {record}");
    assert_eq!(record["record"]["type"], UserMessage::TYPE);
    assert_eq!(record["record"]["data"]["context"].as_str(), Some(bobs.as_str()));

    // Unfollowed: its records stop, whatever the bridge still holds.
    send(&mut ws, json!({"type": "unfollow_context", "context": bobs})).await;
    let other = id(&create(&bob, json!({})).await);
    send(&mut ws, json!({"type": "follow_context", "context": other})).await;
    assert_eq!(next(&mut ws).await["type"], "context_followed");
    world.publish(&bobs, 13, user_message(&bobs, 1)).await;
    world.publish(&other, 14, user_message(&other, 1)).await;
    assert_eq!(next(&mut ws).await["offset"], 14);

    let mut watching = world.connect(&admin).await;
    send(&mut watching, json!({"type": "follow_context", "context": adas})).await;
    assert_eq!(next(&mut watching).await["type"], "context_followed", "an admin follows any context");
    world.publish(&adas, 15, user_message(&adas, 1)).await;
    assert_eq!(next(&mut watching).await["offset"], 15);

    // A session follows a bounded number of contexts.
    let mut busy = world.connect(&ada).await;
    let mut mine = vec![adas.clone()];
    for _ in 0..16 {
        mine.push(id(&create(&ada, json!({})).await));
    }
    for context in &mine {
        send(&mut busy, json!({"type": "follow_context", "context": context})).await;
    }
    let mut frames = Vec::new();
    for _ in 0..mine.len() {
        frames.push(next(&mut busy).await);
    }
    let followed = frames.iter().filter(|f| f["type"] == "context_followed").count();
    let refused: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!((followed, refused.len()), (16, 1), "{frames:?}");
    assert_eq!(refused[0]["code"], "too_many_contexts");
}

#[actix_rt::test]
async fn llm_ask_posts_a_message_and_returns_the_answer_of_its_turn() {
    let world = World::start("ctx-ask", with_model).await;
    let (ada, bob) = (world.node.user("ada").await, world.node.user("bob").await);
    let context = id(&create(&ada, json!({})).await);
    let ask = |arguments: Value| {
        let ada = ada.clone();
        async move { ada.post("/api/tools/llm_ask/call", json!({"arguments": arguments, "timeout_ms": 30_000})).await }
    };

    // The answer arrives live on the context's channel, and counts once the
    // journal keeps it: a live record the journal does not keep (a frozen
    // writer's late one) is not the answer.
    let call = actix_rt::spawn(ask(json!({"context": context, "message": "what is 6 * 7?"})));
    let (command_offset, said) = commands(&world.brokers(), &context, 2).await[1].clone();
    let said: UserMessage = said.typed().unwrap().data;
    assert_eq!((said.content.as_str(), said.user.as_str()), ("what is 6 * 7?", "ada"));
    world.journal(&context, created(&context, None)).await;
    world.publish(&context, 40, completed(&context, command_offset - 1, "not this one")).await;
    world.publish(&context, 4000, completed(&context, command_offset, "not on the journal")).await;
    let at = world.journal(&context, completed(&context, command_offset, "42")).await;
    world.publish(&context, at, completed(&context, command_offset, "42")).await;
    let (status, answer) = call.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["result"], json!({"context": context, "answer": "42", "outcome": "completed", "steps": 2}));

    // A new context, its answer only on the journal (the live record was lost).
    let call = actix_rt::spawn(ask(json!({"message": "hello"})));
    let mut fresh = None;
    for _ in 0..200 {
        let (_, listed) = ada.get("/api/contexts").await;
        fresh = listed.as_array().unwrap().iter().map(id).find(|c| *c != context);
        if fresh.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = fresh.expect("llm_ask made a context");
    let (command_offset, said) = commands(&world.brokers(), &fresh, 2).await[1].clone();
    assert_eq!(said.kind, UserMessage::TYPE);
    world.journal(&fresh, created(&fresh, None)).await;
    world.journal(&fresh, completed(&fresh, command_offset, "hi")).await;
    let (status, answer) = call.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["result"]["context"].as_str(), Some(fresh.as_str()));
    assert_eq!(answer["result"]["answer"], "hi");

    let (status, answer) =
        bob.post("/api/tools/llm_ask/call", json!({"arguments": {"context": context, "message": "x"}})).await;
    assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("tool_error")));
    assert!(answer["message"].as_str().unwrap().contains("not found"), "{answer}");
    let arguments = json!({"context": context, "message": "x", "model": "other"});
    let (status, answer) = ada.post("/api/tools/llm_ask/call", json!({"arguments": arguments})).await;
    assert_eq!((status, answer["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_arguments")));
}

/// A record the broker took without saying where (a produce retried
/// across a broker restart, confirmed as a duplicate, has offset -1) is not
/// noted as the journal's start; and a directory that noted one before
/// still reads, from the partition's start.
#[actix_rt::test]
async fn an_unknown_offset_is_never_noted_and_one_noted_before_still_reads() {
    let world = World::start("ctx-unknown-offset", with_model).await;
    let ada = world.node.user("ada").await;
    let info = root_context("ada");
    world.directory.create(&info, 10).await.unwrap();
    let context = info.id.clone();
    let first = world.journal(&context, created(&context, None)).await;
    let partition = world.directory.get(&context).await.unwrap().unwrap().partition.unwrap();
    world.directory.journaled(&context, partition, -1).await.unwrap();
    assert_eq!(world.directory.get(&context).await.unwrap().unwrap().first_offset, Some(first));

    let client = redis::Client::open(world.node.brokers.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("nexus:context:{context}:journal");
    let () = redis::cmd("HSET").arg(&key).arg("first").arg(-1).query_async(&mut conn).await.unwrap();
    // Folding the context reads its journal from its first offset.
    let (status, transcript) = ada.get(&format!("/api/contexts/{context}/transcript")).await;
    assert_eq!(status, StatusCode::OK, "{transcript}");
    let (status, page) = ada.get(&format!("/api/contexts/{context}/events")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let records = page["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{page}");
    assert_eq!(records[0]["offset"].as_i64(), Some(first));
}
