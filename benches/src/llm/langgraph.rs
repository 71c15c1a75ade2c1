//! LangGraph side by side: the same agent loop (the model asks for one
//! `http_get`, then answers "done") through the node and through
//! `benches/langgraph/agent.py`, against the same scripted server and tool:
//! added time per model step, turns per second, bytes stored per step as a
//! thread grows, and the model calls a replay from step 50 makes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nexus_actors::bus::kafka::{KafkaConfig, SEMANTIC_EVENTS};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use reqwest::Method;
use serde_json::{json, Value};

use super::client::{body, direct, mean_ms, pct_ms};
use super::{ms, Harness, Line, GO, SCRIPTED, TOOL};

/// Longest one agent turn may take (a long thread sends a long history).
const TURN_LIMIT: Duration = Duration::from_secs(60);
/// Untimed turns per side first.
const WARM_UP: usize = 5;
/// The replay: a thread of this many model steps, replayed from this one.
const REPLAY_THREAD: usize = 100;
const REPLAY_FROM: usize = 50;

/// The tool as offered to the model on the direct side (the node offers the registered one).
fn offer() -> Value {
    json!({"type": "function", "function": {
        "name": TOOL,
        "description": "Fetch a URL with HTTP GET and return the response body.",
        "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]},
    }})
}

/// One turn's times: its two model steps and the whole turn.
struct Turn {
    steps: [Duration; 2],
    turn: Duration,
}

/// The turn without a framework: model call, HTTP GET, model call.
async fn direct_turn(h: &Harness) -> Result<Turn, String> {
    let (url, tools) = (h.model.url(), [offer()]);
    let started = Instant::now();
    let mut messages = vec![json!({"role": "user", "content": GO})];
    let first = direct(&h.http, &url, &body(SCRIPTED, &messages, &tools)).await?;
    let [(id, name, arguments)] = first.calls.as_slice() else {
        return Err(format!("the direct step 1 asked for {} tool calls", first.calls.len()));
    };
    let target: Value = serde_json::from_str(arguments).map_err(|e| e.to_string())?;
    let get = h.http.get(target["url"].as_str().unwrap_or_default()).send().await.map_err(|e| e.to_string())?;
    let result = get.text().await.map_err(|e| e.to_string())?;
    messages.push(json!({"role": "assistant", "content": null,
        "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}));
    messages.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
    let second = direct(&h.http, &url, &body(SCRIPTED, &messages, &tools)).await?;
    if second.text != "done" {
        return Err(format!("the direct step 2 answered {:?}", second.text));
    }
    Ok(Turn { steps: [first.total, second.total], turn: started.elapsed() })
}

/// One turn through the node. Step 1: from the POST to the tool's start;
/// step 2: from the model's request for the answer to `turn_completed`.
async fn nexus_turn(h: &Harness, id: &str) -> Result<Turn, String> {
    *h.marks.tool_started.lock().unwrap() = None;
    *h.marks.answer_asked.lock().unwrap() = None;
    let sent = Instant::now();
    let offset = h.api.say(id, GO).await?;
    let done = h.turns.wait(id, offset, TURN_LIMIT).await?;
    let tool = h.marks.tool_started.lock().unwrap().ok_or("the turn never called the tool")?;
    let asked = h.marks.answer_asked.lock().unwrap().ok_or("the turn never asked for the answer")?;
    Ok(Turn { steps: [tool - sent, done - asked], turn: done - sent })
}

/// The Nexus side of every row.
struct NexusSide {
    /// Both model steps of every turn, and each apart.
    step: Vec<Duration>,
    by_step: [Vec<Duration>; 2],
    direct_step: Vec<Duration>,
    turns_per_second: f64,
    direct_turns_per_second: f64,
    /// (model steps, records, payload bytes) as the thread grew.
    growth: Vec<(usize, usize, u64)>,
    replay_calls: usize,
    fork_calls: usize,
    replay_time: Duration,
}

async fn nexus_side(h: &Harness, n: usize, thread_steps: &[usize]) -> Result<NexusSide, String> {
    let mut ids = Vec::with_capacity(WARM_UP + n);
    for _ in 0..WARM_UP + n {
        ids.push(h.api.create(SCRIPTED, &[TOOL]).await?);
    }
    for id in &ids {
        h.api.journaled(id).await?;
    }
    let (mut step, mut direct_step, mut turns, mut direct_turns) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut by_step = [Vec::new(), Vec::new()];
    for (i, id) in ids.iter().enumerate() {
        let d = direct_turn(h).await?;
        let t = nexus_turn(h, id).await?;
        if i >= WARM_UP {
            step.extend(t.steps);
            by_step[0].push(t.steps[0]);
            by_step[1].push(t.steps[1]);
            direct_step.extend(d.steps);
            turns.push(t.turn);
            direct_turns.push(d.turn);
        }
    }
    let rate = |xs: &[Duration]| xs.len() as f64 / xs.iter().map(Duration::as_secs_f64).sum::<f64>();
    let last = ids.last().ok_or("no context")?;
    let answer = h.api.get(&format!("/api/contexts/{last}/transcript")).await?;
    if answer["messages"].as_array().and_then(|m| m.last()).map(|m| &m["content"]) != Some(&json!("done")) {
        return Err(format!("the agent loop did not end with \"done\": {answer}"));
    }

    let thread = h.api.create(SCRIPTED, &[TOOL]).await?;
    h.api.journaled(&thread).await?;
    let (mut growth, mut steps) = (Vec::new(), 0);
    let (mut replay_calls, mut fork_calls, mut replay_time) = (usize::MAX, usize::MAX, Duration::ZERO);
    let mut targets: Vec<usize> = thread_steps.to_vec();
    targets.push(REPLAY_THREAD);
    targets.sort_unstable();
    targets.dedup();
    for target in targets {
        while steps < target {
            nexus_turn(h, &thread).await?;
            steps += 2;
        }
        // The snapshot a turn may write comes after its end.
        actix::clock::sleep(Duration::from_millis(500)).await;
        if thread_steps.contains(&target) {
            let (records, bytes) = journal_bytes(h, &thread).await?;
            growth.push((steps, records, bytes));
        }
        if target == REPLAY_THREAD {
            (replay_calls, fork_calls, replay_time) = replay(h, &thread).await?;
        }
    }
    Ok(NexusSide {
        turns_per_second: rate(&turns),
        direct_turns_per_second: rate(&direct_turns),
        step,
        by_step,
        direct_step,
        growth,
        replay_calls,
        fork_calls,
        replay_time,
    })
}

/// The context's records on `semantic.events` and the sum of their payload sizes.
async fn journal_bytes(h: &Harness, id: &str) -> Result<(usize, u64), String> {
    let info = h.api.get(&format!("/api/contexts/{id}")).await?;
    let (Some(partition), Some(first), Some(last)) =
        (info["partition"].as_i64(), info["first_offset"].as_i64(), info["last_offset"].as_i64())
    else {
        return Err(format!("context {id} is not journaled: {info}"));
    };
    let consumer: StreamConsumer = KafkaConfig::new(h.tansu.brokers())
        .client()
        .set("group.id", "bench-journal-bytes")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(SEMANTIC_EVENTS, partition as i32, Offset::Offset(first))
        .map_err(|e| e.to_string())?;
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let (mut records, mut bytes) = (0, 0u64);
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| "the journal read stalled".to_owned())?
            .map_err(|e| e.to_string())?;
        if message.key() == Some(id.as_bytes()) {
            records += 1;
            bytes += message.payload().map_or(0, <[u8]>::len) as u64;
        }
        if message.offset() >= last {
            return Ok((records, bytes));
        }
    }
}

/// Rebuilds the transcript at the 50th model response and forks there;
/// the model calls each made, and how long the rebuild took.
async fn replay(h: &Harness, id: &str) -> Result<(usize, usize, Duration), String> {
    let events = h.api.events(id).await?;
    let responses: Vec<i64> =
        events.iter().filter(|r| r["type"] == "nexus.llm.response").filter_map(|r| r["offset"].as_i64()).collect();
    let at = *responses.get(REPLAY_FROM - 1).ok_or(format!("only {} model responses", responses.len()))?;
    let before = h.model.requests();
    let started = Instant::now();
    let transcript = h.api.get(&format!("/api/contexts/{id}/transcript?at={at}")).await?;
    let took = started.elapsed();
    let assistant =
        transcript["messages"].as_array().map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
    if assistant != REPLAY_FROM {
        return Err(format!("the transcript at step {REPLAY_FROM} holds {assistant} model answers"));
    }
    let replay_calls = h.model.requests() - before;
    let (status, fork) = h.api.send(Method::POST, &format!("/api/contexts/{id}/fork"), Some(json!({"at": at}))).await?;
    let child = fork["id"].as_str().ok_or(format!("fork answered {status}: {fork}"))?;
    h.api.journaled(child).await?;
    h.api.get(&format!("/api/contexts/{child}/transcript")).await?;
    Ok((replay_calls, h.model.requests() - before - replay_calls, took))
}

/// Runs the LangGraph script; its JSON.
async fn langgraph(h: &Harness, n: usize, thread_steps: &[usize], quick: bool) -> Result<Value, String> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("langgraph");
    let log = |name: &str| std::fs::File::create(h.dir.join(name)).map_err(|e| e.to_string());
    let setup = tokio::process::Command::new(here.join("setup.sh"))
        .stderr(log("langgraph-setup.log")?)
        .output()
        .await
        .map_err(|e| format!("benches/langgraph/setup.sh: {e}"))?;
    if !setup.status.success() {
        return Err(format!("benches/langgraph/setup.sh failed ({}; see langgraph-setup.log)", setup.status));
    }
    let python = String::from_utf8_lossy(&setup.stdout).lines().last().unwrap_or_default().trim().to_owned();
    let out = h.dir.join("langgraph.json");
    let pg = std::env::var("NEXUS_BENCH_PG").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into());
    let steps: Vec<String> = thread_steps.iter().map(usize::to_string).collect();
    let status = tokio::process::Command::new(&python)
        .arg(here.join("agent.py"))
        .args(["--model-url", &h.model.url(), "--tool-url", &h.tool_url, "--pg", &pg])
        .args(["--turns", &n.to_string(), "--warmup", &WARM_UP.to_string(), "--steps-thread", &steps.join(",")])
        .args(["--replay-thread-steps", &REPLAY_THREAD.to_string(), "--replay-from", &REPLAY_FROM.to_string()])
        // The headline mode only: its second mode (`async`) is not in the table.
        .args(if quick { &["--durability", "sync"][..] } else { &[] })
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(log("langgraph.log")?)
        .status()
        .await
        .map_err(|e| format!("{python}: {e}"))?;
    if !status.success() {
        return Err(format!("agent.py failed ({status}; see langgraph.log)"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("agent.py's JSON: {e}"))
}

/// The LangGraph table: the Nexus side always, LangGraph's when its script ran.
pub(super) async fn rows(h: &Harness, n: usize, thread_steps: &[usize], quick: bool) -> Result<Vec<Line>, String> {
    let nexus = nexus_side(h, n, thread_steps).await?;
    let peer = langgraph(h, n, thread_steps, quick).await;
    if let Err(error) = &peer {
        eprintln!("llm bench: LangGraph: {error}");
    }
    let lg = peer.as_ref().ok();
    let missing = peer.as_ref().err().map_or(String::new(), |e| format!("LangGraph not run: {e}"));
    let lg_value = |f: &dyn Fn(&Value) -> Option<f64>| lg.and_then(f);
    let shown = |x: Option<f64>, unit: &dyn Fn(f64) -> String| x.map_or("—".to_owned(), unit);
    let mut lines = Vec::new();

    // Nexus's two steps differ (the first carries the command through
    // semantic.commands), so the mean says more than a percentile of both.
    let stat = |xs: &[Duration], p: Option<f64>| p.map_or_else(|| mean_ms(xs), |p| pct_ms(xs, p));
    for (label, p, key) in [("mean", None, "mean"), ("p50", Some(0.5), "p50"), ("p99", Some(0.99), "p99")] {
        let (step, base) = (stat(&nexus.step, p), stat(&nexus.direct_step, p));
        let added = step - base;
        let theirs = lg_value(&|v| v["added_step_ms"][key].as_f64());
        let note = match lg {
            Some(v) => format!(
                "steps {} (step 1 {}, step 2 {}) vs direct {} (Rust); LangGraph steps {} vs direct {} (Python openai SDK)",
                ms(step),
                ms(stat(&nexus.by_step[0], p)),
                ms(stat(&nexus.by_step[1], p)),
                ms(base),
                ms(v["step_ms"][key].as_f64().unwrap_or(f64::NAN)),
                ms(v["direct_step_ms"][key].as_f64().unwrap_or(f64::NAN))
            ),
            None => format!("steps {} vs direct {}; {missing}", ms(step), ms(base)),
        };
        let line = Line::new(format!("added time per model step, {label}"), ms(added), shown(theirs, &ms)).note(note);
        lines.push(match theirs {
            Some(t) => line.ratio(t / added),
            None => line,
        });
    }

    let theirs = lg_value(&|v| v["turns_per_second"].as_f64());
    let rate = |x: f64| format!("{x:.1}/s");
    let line =
        Line::new("turns per second, one client", rate(nexus.turns_per_second), shown(theirs, &rate)).note(format!(
            "a turn = 2 model steps + 1 tool call; direct (Rust) {:.1}/s{}",
            nexus.direct_turns_per_second,
            lg.map_or(String::new(), |v| format!(", direct (Python) {}/s", v["direct_turns_per_second"]))
        ));
    lines.push(match theirs {
        Some(t) => line.ratio(nexus.turns_per_second / t),
        None => line,
    });

    let wanted: Vec<usize> = if quick { vec![100, 1_000] } else { thread_steps.to_vec() };
    for target in wanted {
        let what = format!("bytes stored per step at {target} steps");
        let Some(&(steps, records, bytes)) = nexus.growth.iter().find(|g| g.0 == target) else {
            lines.push(Line::missing(&what, "only in the full run (with --quick the thread grows to 100 steps)"));
            continue;
        };
        let ours = bytes as f64 / steps as f64;
        let point = lg.and_then(|v| v["threads"].as_array()?.iter().find(|p| p["steps"] == json!(steps)).cloned());
        let theirs = point.as_ref().and_then(|p| p["payload_bytes_per_step"].as_f64());
        let bytes_shown = |x: f64| format!("{x:.0} B");
        let note = match &point {
            Some(p) => format!(
                "Nexus: {records} records, {bytes} B; LangGraph: {} B of checkpoints ({} B/step as stored)",
                p["payload_bytes_total"], p["bytes_per_step"]
            ),
            None => format!("Nexus: {records} records, {bytes} B; {missing}"),
        };
        let line = Line::new(what, bytes_shown(ours), shown(theirs, &bytes_shown)).note(note);
        lines.push(match theirs {
            Some(t) => line.ratio(t / ours),
            None => line,
        });
    }

    let theirs = lg_value(&|v| v["replay_model_calls"].as_f64());
    let note = format!(
        "Nexus: transcript at step {REPLAY_FROM} rebuilt in {}, a fork there made {} calls{}",
        ms(replay_ms(nexus.replay_time)),
        nexus.fork_calls,
        lg.map_or(format!("; {missing}"), |v| format!(
            "; LangGraph re-ran step {REPLAY_FROM} from its checkpoint, and {} calls to finish the thread again",
            v["replay_to_end_model_calls"]
        ))
    );
    lines.push(
        Line::new(
            format!("model calls made by a replay from step {REPLAY_FROM}"),
            nexus.replay_calls.to_string(),
            shown(theirs, &|x| format!("{x:.0}")),
        )
        .note(note),
    );
    if let Some(v) = lg {
        if let Some(last) = lines.last_mut() {
            last.note = format!("{}; LangGraph {}", last.note, versions(v));
        }
    }
    Ok(lines)
}

fn replay_ms(took: Duration) -> f64 {
    took.as_secs_f64() * 1e3
}

fn versions(v: &Value) -> String {
    let version = |name: &str| v["versions"][name].as_str().unwrap_or("?").to_owned();
    format!("{}, langgraph-checkpoint-postgres {}", version("langgraph"), version("langgraph-checkpoint-postgres"))
}
