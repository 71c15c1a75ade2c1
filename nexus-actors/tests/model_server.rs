//! The local model server (llama.cpp through xllamacpp, Qwen2.5-Coder-0.5B)
//! as a child process: it loads, streams chat completions over the OpenAI
//! API, returns tool calls as such, and restarts on its port.
//! `scripts/lib.sh` `ensure_model` installs it.

use futures::StreamExt;
use nexus_actors::infra::ModelServer;
use nexus_testkit::{prerequisite, tempdir};
use serde_json::{json, Value};

/// Starts a server in a fresh directory, or says why the test cannot run.
fn server(name: &str) -> Option<ModelServer> {
    if !prerequisite(ModelServer::installed(), "the local model server (scripts/lib.sh ensure_model)") {
        return None;
    }
    Some(ModelServer::start(&tempdir(name)).expect("the model server starts and loads its model"))
}

/// Posts a streaming chat completion and returns each `data:` event's JSON
/// (without the closing `[DONE]`, which it checks arrived last).
async fn stream_chat(server: &ModelServer, mut body: Value) -> Vec<Value> {
    body["model"] = json!(server.model());
    body["stream"] = json!(true);
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                assert!(!done, "nothing may follow [DONE]: {data}");
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(data).unwrap());
                }
            }
        }
    }
    assert!(done, "the stream ends with [DONE]");
    events
}

/// The `choices[0].delta` of each event that has one.
fn deltas(events: &[Value]) -> impl Iterator<Item = &Value> {
    events.iter().filter_map(|e| e["choices"].get(0).map(|c| &c["delta"]))
}

/// The server's own generation rate, from the `timings` of its last event.
fn report_rate(events: &[Value]) {
    if let Some(timings) = events.iter().rev().find_map(|e| e.get("timings")) {
        eprintln!(
            "model server: prompt {} tokens at {:.1}/s, generated {} tokens at {:.1}/s",
            timings["prompt_n"], timings["prompt_per_second"], timings["predicted_n"], timings["predicted_per_second"]
        );
    }
}

#[tokio::test]
async fn streams_a_chat_completion_in_several_chunks_and_restarts_on_its_port() {
    let Some(mut server) = server("model-server-stream") else { return };
    let models: Value = reqwest::get(format!("{}/models", server.base_url()))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], server.model(), "{models}");

    let question = json!({
        "messages": [{"role": "user", "content": "Name three colours of the rainbow, in one sentence."}],
        "max_tokens": 32,
        "temperature": 0,
        "seed": 7,
    });
    let events = stream_chat(&server, question.clone()).await;
    report_rate(&events);
    let pieces: Vec<&str> = deltas(&events).filter_map(|d| d["content"].as_str()).filter(|s| !s.is_empty()).collect();
    let text = pieces.concat();
    assert!(pieces.len() > 1, "the answer arrives in several chunks: {pieces:?}");
    assert!(!text.trim().is_empty(), "{events:?}");
    let finish = events.iter().rev().find_map(|e| e["choices"].get(0).and_then(|c| c["finish_reason"].as_str()));
    assert!(matches!(finish, Some("stop" | "length")), "{finish:?}");

    let port = server.port();
    server.kill();
    let refused = reqwest::get(format!("{}/models", server.base_url())).await;
    assert!(refused.is_err(), "a killed server answers nothing: {refused:?}");
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    let again = stream_chat(&server, question).await;
    let text_again: String = deltas(&again).filter_map(|d| d["content"].as_str()).collect();
    assert_eq!(text_again, text, "temperature 0 answers the same after a restart");
}

#[tokio::test]
async fn a_request_with_tools_gets_a_streamed_tool_call() {
    let Some(server) = server("model-server-tools") else { return };
    let events = stream_chat(
        &server,
        json!({
            "messages": [
                {"role": "system", "content": "You operate a panel. Use the tools."},
                {"role": "user", "content": "Set the counter to 5."},
            ],
            "tools": [
                {"type": "function", "function": {
                    "name": "set_counter",
                    "description": "Set the panel's counter to a value",
                    "parameters": {"type": "object", "properties": {"value": {"type": "integer"}}, "required": ["value"]},
                }},
                {"type": "function", "function": {
                    "name": "get_counter",
                    "description": "Read the panel's counter",
                    "parameters": {"type": "object", "properties": {}},
                }},
            ],
            "max_tokens": 64,
            "temperature": 0,
            "seed": 7,
        }),
    )
    .await;
    report_rate(&events);
    let calls: Vec<&Value> = deltas(&events).filter_map(|d| d["tool_calls"].as_array()).flatten().collect();
    assert!(!calls.is_empty(), "a tool call, not text: {events:?}");
    assert!(calls.iter().all(|c| c["index"] == 0), "one call: {calls:?}");
    let name: String = calls.iter().filter_map(|c| c["function"]["name"].as_str()).collect();
    let arguments: String = calls.iter().filter_map(|c| c["function"]["arguments"].as_str()).collect();
    assert_eq!(name, "set_counter");
    assert!(calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()), "{calls:?}");
    let arguments: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(arguments, json!({"value": 5}));
    let finish = events.iter().rev().find_map(|e| e["choices"].get(0).and_then(|c| c["finish_reason"].as_str()));
    assert_eq!(finish, Some("tool_calls"));
}
