//! The LLM manager's model client against the scripted OpenAI-compatible
//! server, over real loopback sockets: streamed text and tool calls,
//! retries, `Retry-After`, fail-over, timeouts, broken streams, deadlines,
//! concurrency slots, keys, metrics and the `gen_ai.chat` span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_actors::roles::llm_manager::metrics::LlmMetrics;
use nexus_actors::roles::llm_manager::model::{
    Completion, EndpointConfig, ModelClient, ModelConfig, ModelError, ModelRequest,
};
use nexus_actors::semantic::chat::{ChatMessage, Role, ToolOffer};
use nexus_actors::semantic::records::Usage;
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel, MODEL, PROMPT_TOKENS};
use nexus_testkit::tempdir;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use prometheus::Registry;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const LONG: Duration = Duration::from_secs(30);

fn endpoint(server: &ScriptedModel, name: &str) -> EndpointConfig {
    let mut endpoint = EndpointConfig::new(&server.url(), MODEL).unwrap();
    endpoint.name = name.to_owned();
    endpoint
}

/// A client of `endpoints` with quick backoff, the policy changed by `change`.
fn model_client(endpoints: Vec<EndpointConfig>, change: impl FnOnce(&mut ModelConfig)) -> (ModelClient, Registry) {
    let mut config = ModelConfig::new(endpoints);
    config.backoff = Duration::from_millis(10);
    change(&mut config);
    let registry = Registry::new();
    let metrics = LlmMetrics::new(&registry).unwrap();
    (ModelClient::new(config, metrics).unwrap(), registry)
}

fn offer() -> ToolOffer {
    ToolOffer {
        alias: "p_search".into(),
        tool: "p.search".into(),
        description: "Searches".into(),
        parameters: json!({"type": "object", "properties": {"query": {"type": "string"}}}),
    }
}

/// One call within `within`; the result and the text deltas handed out.
async fn ask_model(
    client: &ModelClient,
    model: Option<&str>,
    within: Duration,
) -> (Result<Completion, ModelError>, Vec<String>) {
    let messages = [ChatMessage::text(Role::System, "Be brief."), ChatMessage::text(Role::User, "hi")];
    let tools = [offer()];
    let request = ModelRequest { model, messages: &messages, tools: &tools, deadline: Instant::now() + within };
    let mut deltas = Vec::new();
    let mut on_text = |text: &str| deltas.push(text.to_owned());
    let result = client.complete(request, &mut on_text).await;
    (result, deltas)
}

async fn ask(client: &ModelClient, within: Duration) -> (Result<Completion, ModelError>, Vec<String>) {
    ask_model(client, None, within).await
}

fn counter(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            labels.iter().all(|(k, v)| metric.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
        })
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

fn codes(failed: &[ModelError]) -> Vec<&str> {
    failed.iter().map(ModelError::code).collect()
}

#[actix_rt::test]
async fn text_streams_in_deltas_with_usage_and_the_request_has_the_openai_shape() {
    let server = ScriptedModel::scripted(vec![Reply::text("The quick brown fox")]);
    let (client, registry) = model_client(vec![endpoint(&server, "local")], |_| {});
    assert!(client.is_configured());
    assert_eq!(client.endpoints()[0].name, "local");

    let (result, deltas) = ask(&client, LONG).await;
    let answer = result.unwrap();
    assert_eq!(deltas, vec!["The ", "quick ", "brown ", "fox"]);
    assert_eq!(answer.content.as_deref(), Some("The quick brown fox"));
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    assert_eq!(answer.usage, Usage { input_tokens: PROMPT_TOKENS, output_tokens: 4 });
    assert_eq!((answer.model.as_str(), answer.endpoint.as_str()), (MODEL, "local"));
    assert!(answer.tool_calls.is_empty() && answer.failed_attempts.is_empty());
    assert!(answer.ttft <= answer.latency);

    assert_eq!(server.requests(), 1);
    let body = &server.received()[0];
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["messages"][1], json!({"role": "user", "content": "hi"}));
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "p_search");
    assert_eq!(body["tools"][0]["function"]["parameters"]["type"], "object");

    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("endpoint", "local"), ("outcome", "ok")]), 1.0);
    assert_eq!(counter(&registry, "nexus_llm_tokens_total", &[("kind", "output")]), 4.0);
}

#[actix_rt::test]
async fn tool_call_arguments_split_across_chunks_are_joined() {
    let arguments = r#"{"query": "cats and dogs", "limit": 3}"#;
    let server = ScriptedModel::scripted(vec![Reply::tool_calls(&[("p_search", arguments)])]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, deltas) = ask(&client, LONG).await;
    let answer = result.unwrap();
    assert!(deltas.is_empty());
    assert_eq!(answer.content, None);
    assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(answer.tool_calls.len(), 1);
    let call = &answer.tool_calls[0];
    assert_eq!((call.index, call.name.as_str(), call.arguments.as_str()), (0, "p_search", arguments));
    assert!(call.id.as_deref().is_some_and(|id| id.starts_with("call_")));
    assert!(call.arguments_valid);
}

#[actix_rt::test]
async fn two_parallel_tool_calls_in_one_answer() {
    let server =
        ScriptedModel::scripted(vec![Reply::tool_calls(&[("p_search", r#"{"query": "a"}"#), ("p_fetch", "{}")])]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let answer = ask(&client, LONG).await.0.unwrap();
    let calls: Vec<_> = answer.tool_calls.iter().map(|c| (c.index, c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, vec![(0, "p_search", r#"{"query": "a"}"#), (1, "p_fetch", "{}")]);
    assert_ne!(answer.tool_calls[0].id, answer.tool_calls[1].id);
    assert!(answer.tool_calls.iter().all(|c| c.arguments_valid));
}

fn tool_delta(call: Value) -> Value {
    json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]})
}

#[actix_rt::test]
async fn missing_and_repeated_ids_are_tolerated() {
    let server = ScriptedModel::scripted(vec![Reply::stream(vec![
        tool_delta(json!({"index": 0, "function": {"name": "p_search", "arguments": "{\"q\""}})),
        tool_delta(json!({"index": 1, "id": "dup", "function": {"name": "p_fetch", "arguments": ""}})),
        tool_delta(json!({"index": 0, "function": {"arguments": ": 1}"}})),
        tool_delta(json!({"index": 1, "id": "dup", "function": {"arguments": "{}"}})),
        tool_delta(json!({"index": 2, "id": "dup", "function": {"name": "p_search", "arguments": "{}"}})),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ])]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let answer = ask(&client, LONG).await.0.unwrap();
    let calls: Vec<_> =
        answer.tool_calls.iter().map(|c| (c.id.as_deref(), c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(
        calls,
        vec![(None, "p_search", "{\"q\": 1}"), (Some("dup"), "p_fetch", "{}"), (Some("dup"), "p_search", "{}")]
    );
    assert_eq!(answer.usage, Usage::default(), "no usage chunk: zeros");
}

#[actix_rt::test]
async fn invalid_arguments_are_flagged_not_refused() {
    let server = ScriptedModel::scripted(vec![Reply::tool_calls(&[("p_search", "{\"query\": "), ("p_fetch", "")])]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let answer = ask(&client, LONG).await.0.unwrap();
    let valid: Vec<_> = answer.tool_calls.iter().map(|c| (c.arguments.as_str(), c.arguments_valid)).collect();
    assert_eq!(valid, vec![("{\"query\": ", false), ("", true)]);
}

#[actix_rt::test]
async fn a_429_is_retried_after_its_retry_after() {
    let server = ScriptedModel::scripted(vec![Reply::rate_limited(1), Reply::text("ok")]);
    let (client, registry) = model_client(vec![endpoint(&server, "local")], |_| {});

    let answer = ask(&client, LONG).await.0.unwrap();
    assert_eq!(answer.content.as_deref(), Some("ok"));
    assert_eq!(server.requests(), 2);
    assert!(matches!(&answer.failed_attempts[..], [ModelError::Http { status: 429, .. }]));
    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("outcome", "model_http")]), 1.0);
}

#[actix_rt::test]
async fn a_retry_after_past_the_deadline_ends_the_call_without_retrying_early() {
    // Backoff alone (10 ms) would retry and get the text: only honouring
    // Retry-After (5 s) against the deadline (1 s) gives Deadline here.
    let server = ScriptedModel::scripted(vec![Reply::rate_limited(5), Reply::text("too early")]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, _) = ask(&client, Duration::from_secs(1)).await;
    assert_eq!(result.unwrap_err(), ModelError::Deadline);
    assert_eq!(server.requests(), 1);
}

#[actix_rt::test]
async fn a_500_is_retried() {
    let server = ScriptedModel::scripted(vec![Reply::status(500), Reply::text("second time")]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let answer = ask(&client, LONG).await.0.unwrap();
    assert_eq!(answer.content.as_deref(), Some("second time"));
    assert_eq!(server.requests(), 2);
    let [ModelError::Http { endpoint, status: 500, body }] = &answer.failed_attempts[..] else {
        panic!("{:?}", answer.failed_attempts)
    };
    assert_eq!(endpoint, "local");
    assert!(body.contains("scripted status 500"), "{body}");
}

#[actix_rt::test]
async fn a_client_error_is_not_retried_and_the_last_error_is_returned() {
    let long = "é".repeat(1000);
    let server = ScriptedModel::start(move |_| Reply::Status { status: 400, retry_after: None, body: long.clone() });
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, _) = ask(&client, LONG).await;
    let Err(ModelError::Http { status: 400, body, .. }) = &result else { panic!("{result:?}") };
    assert_eq!(body, &"é".repeat(256), "the first 512 bytes");
    assert_eq!(server.requests(), 1);
}

#[actix_rt::test]
async fn five_hundreds_on_one_endpoint_fail_over_to_the_next() {
    let a = ScriptedModel::start(|_| Reply::status(503));
    let b = ScriptedModel::scripted(vec![Reply::text("from b")]);
    let (client, registry) = model_client(vec![endpoint(&a, "a"), endpoint(&b, "b")], |c| c.retries = 1);

    let answer = ask(&client, LONG).await.0.unwrap();
    assert_eq!((answer.endpoint.as_str(), answer.content.as_deref()), ("b", Some("from b")));
    assert_eq!((a.requests(), b.requests()), (2, 1));
    assert_eq!(codes(&answer.failed_attempts), vec!["model_http", "model_http"]);
    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("endpoint", "a"), ("outcome", "model_http")]), 2.0);
}

#[actix_rt::test]
async fn a_hanging_endpoint_times_out_and_fails_over() {
    let a = ScriptedModel::start(|_| Reply::Hang);
    let b = ScriptedModel::scripted(vec![Reply::text("awake")]);
    let idle = |c: &mut ModelConfig| {
        c.retries = 1;
        c.idle_timeout = Duration::from_millis(300);
    };
    let (client, _) = model_client(vec![endpoint(&a, "a"), endpoint(&b, "b")], idle);
    let answer = ask(&client, LONG).await.0.unwrap();
    assert_eq!(answer.endpoint, "b");
    assert_eq!(
        answer.failed_attempts[..2],
        [ModelError::Timeout { endpoint: "a".into() }, ModelError::Timeout { endpoint: "a".into() }]
    );
    assert_eq!(a.requests(), 2);

    let (alone, _) = model_client(vec![endpoint(&a, "a")], idle);
    assert_eq!(ask(&alone, LONG).await.0.unwrap_err(), ModelError::Timeout { endpoint: "a".into() });
}

#[actix_rt::test]
async fn a_stream_that_goes_silent_before_any_text_times_out_and_is_retried() {
    let server =
        ScriptedModel::scripted(vec![Reply::text("late").with_delay(Duration::from_secs(5)), Reply::text("on time")]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |c| c.idle_timeout = Duration::from_millis(300));

    let answer = ask(&client, LONG).await.0.unwrap();
    assert_eq!(answer.content.as_deref(), Some("on time"));
    assert_eq!(codes(&answer.failed_attempts), vec!["model_timeout"]);
}

#[actix_rt::test]
async fn a_truncated_stream_is_a_stream_error_and_text_already_shown_is_not_retried() {
    let server = ScriptedModel::scripted(vec![Reply::truncated_text("one two three four")]);
    let (client, registry) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, deltas) = ask(&client, LONG).await;
    assert!(matches!(&result, Err(ModelError::Stream { endpoint, .. }) if endpoint == "local"), "{result:?}");
    assert_eq!(deltas, vec!["one ", "two "]);
    assert_eq!(server.requests(), 1, "the caller saw text: it decides, the client does not retry");
    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("outcome", "model_stream")]), 1.0);
}

#[actix_rt::test]
async fn a_malformed_chunk_is_a_stream_error_after_the_retries() {
    let server = ScriptedModel::start(|_| Reply::malformed());
    let (client, _) = model_client(vec![endpoint(&server, "local")], |c| c.retries = 1);

    let (result, deltas) = ask(&client, LONG).await;
    let Err(ModelError::Stream { reason, .. }) = &result else { panic!("{result:?}") };
    assert!(reason.contains("not JSON"), "{reason}");
    assert!(deltas.is_empty());
    assert_eq!(server.requests(), 2);
}

#[actix_rt::test]
async fn an_error_chunk_mid_stream_is_a_stream_error() {
    let server = ScriptedModel::scripted(vec![Reply::stream(vec![json!({"error": {"message": "out of memory"}})])]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |c| c.retries = 0);

    let (result, _) = ask(&client, LONG).await;
    let Err(ModelError::Stream { reason, .. }) = &result else { panic!("{result:?}") };
    assert!(reason.contains("out of memory"), "{reason}");
}

#[actix_rt::test]
async fn the_deadline_ends_a_call_that_is_waiting() {
    let server = ScriptedModel::start(|_| Reply::Hang);
    let (client, registry) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, _) = ask(&client, Duration::from_millis(300)).await;
    assert_eq!(result.unwrap_err(), ModelError::Deadline);
    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("outcome", "deadline")]), 1.0);

    let (result, _) = ask(&client, Duration::ZERO).await;
    assert_eq!(result.unwrap_err(), ModelError::Deadline);
}

#[actix_rt::test]
async fn waiting_for_a_slot_counts_against_the_deadline() {
    let server = ScriptedModel::scripted(vec![Reply::Hang]);
    let mut one = endpoint(&server, "local");
    one.concurrency = 1;
    let (client, _) = model_client(vec![one], |_| {});

    let first = {
        let client = client.clone();
        actix_rt::spawn(async move { ask(&client, Duration::from_secs(60)).await.0 })
    };
    nexus_testkit::until(10, "the first call reaches the server", || async { server.requests() == 1 }).await;
    let (second, _) = ask(&client, Duration::from_millis(300)).await;
    assert_eq!(second.unwrap_err(), ModelError::Deadline);
    assert_eq!(server.requests(), 1, "the second call never got a slot");
    first.abort();
}

#[actix_rt::test]
async fn models_pick_their_endpoints_and_none_is_no_endpoint() {
    let small = ScriptedModel::scripted(vec![Reply::text("small")]);
    let large = ScriptedModel::scripted(vec![Reply::text("large")]);
    let mut big = endpoint(&large, "large");
    big.model = "large-model".into();
    let (client, _) = model_client(vec![endpoint(&small, "small"), big], |_| {});

    let answer = ask_model(&client, Some("large-model"), LONG).await.0.unwrap();
    assert_eq!((answer.endpoint.as_str(), answer.content.as_deref()), ("large", Some("large")));
    assert_eq!(large.received()[0]["model"], "large-model");
    assert_eq!(ask_model(&client, Some("other"), LONG).await.0.unwrap_err(), ModelError::NoEndpoint);
    assert_eq!(small.requests(), 0);

    let (none, registry) = model_client(Vec::new(), |_| {});
    assert!(!none.is_configured());
    assert_eq!(ask(&none, LONG).await.0.unwrap_err(), ModelError::NoEndpoint);
    assert_eq!(counter(&registry, "nexus_llm_requests_total", &[("outcome", "no_endpoint")]), 1.0);
}

#[actix_rt::test]
async fn a_non_streamed_answer_is_read_too() {
    let body = json!({
        "model": "whole", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "all at once"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3}
    });
    let server =
        ScriptedModel::scripted(vec![Reply::Status { status: 200, retry_after: None, body: body.to_string() }]);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let (result, deltas) = ask(&client, LONG).await;
    let answer = result.unwrap();
    assert_eq!((answer.content.as_deref(), answer.model.as_str()), (Some("all at once"), "whole"));
    assert_eq!(deltas, vec!["all at once"]);
}

#[actix_rt::test]
async fn the_key_file_is_sent_as_a_bearer_token() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let server = ScriptedModel::start(move |call: &ModelCall| {
        record.lock().unwrap().push(call.header("Authorization").map(str::to_owned));
        Reply::text("ok")
    });
    let dir = tempdir("llm-model-key");
    let key = dir.join("key");
    std::fs::write(&key, "sekrit\n").unwrap();
    let mut keyed = endpoint(&server, "local");
    keyed.key_file = Some(key);
    let (client, _) = model_client(vec![keyed.clone()], |_| {});

    ask(&client, LONG).await.0.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![Some("Bearer sekrit".to_owned())]);

    keyed.key_file = Some(dir.join("missing"));
    let refused = ModelClient::new(ModelConfig::new(vec![keyed]), LlmMetrics::new(&Registry::new()).unwrap());
    assert!(refused.is_err());
}

#[actix_rt::test]
async fn one_gen_ai_span_per_call_its_context_sent_as_traceparent() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let traceparents = Arc::new(Mutex::new(Vec::new()));
    let record = traceparents.clone();
    let server = ScriptedModel::start(move |call: &ModelCall| {
        record.lock().unwrap().push(call.header("traceparent").map(str::to_owned));
        Reply::text("traced answer")
    });
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});

    let root = tracing::info_span!("test.root");
    let root_cx = root.context().span().span_context().clone();
    ask(&client, LONG).instrument(root).await.0.unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let chat = spans.iter().find(|s| s.name == format!("chat {MODEL}")).unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(chat.parent_span_id, root_cx.span_id());
    assert_eq!(chat.span_context.trace_id(), root_cx.trace_id());
    let attribute = |key: &str| {
        chat.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string()).unwrap_or_default()
    };
    assert_eq!(attribute("gen_ai.operation.name"), "chat");
    assert_eq!(attribute("gen_ai.system"), "openai");
    assert_eq!(attribute("gen_ai.request.model"), MODEL);
    assert_eq!(attribute("gen_ai.response.model"), MODEL);
    assert_eq!(attribute("gen_ai.usage.input_tokens"), PROMPT_TOKENS.to_string());
    assert_eq!(attribute("gen_ai.usage.output_tokens"), "2");
    assert_eq!(attribute("gen_ai.response.finish_reasons"), "stop");
    assert_eq!(attribute("server.address"), "127.0.0.1");

    let sent = traceparents.lock().unwrap().clone();
    let expected = format!("00-{}-{}-01", chat.span_context.trace_id(), chat.span_context.span_id());
    assert_eq!(sent, vec![Some(expected)]);
}

#[actix_rt::test]
async fn the_scripted_server_lists_its_model_and_counts_requests_for_other_peers() {
    let server = ScriptedModel::scripted(vec![Reply::status(500)]);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let models: Value = http.get(format!("{}/models", server.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    let (client, _) = model_client(vec![endpoint(&server, "local")], |_| {});
    ask(&client, LONG).await.0.unwrap();
    let base = server.url().trim_end_matches("/v1").to_owned();
    let count: Value = http.get(format!("{base}/_requests")).send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!({"requests": 2}));
    assert_eq!(server.received().len(), 2);
}
