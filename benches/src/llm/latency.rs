//! Time to first token and to the whole answer through the node against
//! a direct call, the journal append, and turns per second: the rows of
//! the model hop. Measures; changes nothing on the node but its contexts.

use std::time::{Duration, Instant};

use actix::Arbiter;
use futures::future::join_all;
use nexus_actors::bus::kafka::{KafkaBridge, KafkaConfig, Produce, SEMANTIC_EVENTS};
use nexus_actors::semantic::records::{LlmResponse, Usage};
use nexus_actors::{Envelope, Kernel};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{json, Value};

use super::client::{body, direct, follow, pct_ms};
use super::{ms, node, Harness, Line, HELLO, SCRIPTED, TWENTY_WORDS};

/// Untimed turns before the timed ones.
const WARM_UP: usize = 10;
/// Longest a turn may take before the row gives up.
const TURN_LIMIT: Duration = Duration::from_secs(30);

/// p50 and p99 rows of `what`, Nexus against direct, with the added time.
fn pair(what: &str, nexus: &[Duration], direct: &[Duration], note: &str) -> Vec<Line> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .map(|(label, p)| {
            let (n, d) = (pct_ms(nexus, p), pct_ms(direct, p));
            let added = format!("added {:+.2} ms", n - d);
            let note = if note.is_empty() { added } else { format!("{added}; {note}") };
            Line::new(format!("{what} {label}"), ms(n), ms(d)).ratio(d / n).note(note)
        })
        .collect()
}

/// Time to first token and to the answer: `n` turns in one context,
/// followed on a WebSocket, each after a direct call with the same history.
/// `journaled` says what the journal held before them, for the row names;
/// `all` asks for every row, otherwise only the model hop's.
pub(super) async fn first_token(h: &Harness, n: usize, journaled: &str, all: bool) -> Result<Vec<Line>, String> {
    let id = h.api.create(SCRIPTED, &[]).await?;
    h.api.journaled(&id).await?;
    let mut follower = follow(h.node.port, &h.api.token, &id).await?;
    let mut history: Vec<Value> = Vec::new();
    let (mut n_first, mut n_whole, mut d_first, mut d_whole) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The model hop: from the context taking the command to its first text at the browser.
    let (mut delivered, mut hop, mut to_text, mut to_browser) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARM_UP + n {
        history.push(json!({"role": "user", "content": HELLO}));
        let d = direct(&h.http, &h.model.url(), &body(SCRIPTED, &history, &[])).await?;
        if d.text != TWENTY_WORDS {
            return Err(format!("the direct call answered {:?}", d.text));
        }
        history.push(json!({"role": "assistant", "content": d.text}));
        let sent = Instant::now();
        let offset = h.api.say(&id, HELLO).await?;
        let times = follower.turn(offset, TURN_LIMIT).await?;
        let first = times.first.ok_or("a turn completed without a nexus.thought.delta")?;
        let taken = times.taken.ok_or("a turn completed without the journal copy of its message")?;
        if i >= WARM_UP {
            n_first.push(first - sent);
            n_whole.push(times.done - sent);
            d_first.push(d.ttft);
            d_whole.push(d.total);
            delivered.push(taken.saturating_duration_since(sent));
            hop.push(first.saturating_duration_since(taken));
            let made = times.first_made.unwrap_or(first);
            to_text.push(made.saturating_duration_since(taken));
            to_browser.push(first.saturating_duration_since(made));
        }
    }
    let mut lines = Vec::new();
    if all {
        lines.extend(pair("time to first token", &n_first, &d_first, &format!("{n} turns, one at a time")));
        lines.extend(pair("time to the whole answer", &n_whole, &d_whole, "23 chunks"));
    }
    let p50_p99 = |d: &[Duration]| format!("p50 {}, p99 {}", ms(pct_ms(d, 0.5)), ms(pct_ms(d, 0.99)));
    let note = format!(
        "from the context taking the command to the first text at the browser: to the text's record {}, from there to the browser {}; before it, the POST to the context taking the command: {}",
        p50_p99(&to_text),
        p50_p99(&to_browser),
        p50_p99(&delivered)
    );
    lines.extend(pair(&format!("model hop, {journaled}: time to first token"), &hop, &d_first, &note));
    Ok(lines)
}

/// The node's journal append histogram now: `(upper bound, cumulative count)`.
pub(super) async fn append_buckets(h: &Harness) -> Result<Vec<(f64, u64)>, String> {
    Ok(node::buckets(&h.api.metrics().await?, "nexus_llm_journal_append_seconds"))
}

/// The journal append: the node's histogram since `before` (taken before
/// the one-at-a-time turns, so that it holds their appends alone), and `n`
/// produces one at a time through a Kafka bridge against raw rdkafka.
pub(super) async fn append(h: &Harness, n: usize, before: &[(f64, u64)]) -> Result<Vec<Line>, String> {
    let buckets: Vec<(f64, u64)> = append_buckets(h)
        .await?
        .into_iter()
        .map(|(le, count)| (le, count - before.iter().find(|b| b.0 == le).map_or(0, |b| b.1)))
        .collect();
    let appends = buckets.last().map_or(0, |b| b.1);
    let bound = |q| node::bucket_quantile(&buckets, q).map_or("—".to_owned(), |s| format!("≤ {}", ms(s * 1e3)));
    let histogram = format!(
        "the node's own histogram over the {appends} appends of those turns: p50 {}, p99 {}",
        bound(0.5),
        bound(0.99)
    );

    let config = KafkaConfig::new(h.tansu.brokers());
    let kernel = Kernel::new("bench-llm-append");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.map_err(|e| e.to_string())?;
    let produce = bridge.link::<Produce>("bench");
    let key = uuid::Uuid::now_v7().to_string();
    let record = |i: usize| {
        let response = LlmResponse {
            context: key.clone(),
            command_offset: i as i64,
            step: 0,
            content: Some(TWENTY_WORDS.to_owned()),
            tool_calls: Vec::new(),
            finish_reason: Some("stop".to_owned()),
            usage: Usage { input_tokens: 10, output_tokens: 20 },
            model: SCRIPTED.to_owned(),
            endpoint: "scripted".to_owned(),
            ttft_ms: 1,
            latency_ms: 1,
        };
        Envelope::new("bench", response).into_untyped()
    };
    let mut nexus = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let started = Instant::now();
        let produced = Produce { topic: SEMANTIC_EVENTS.to_owned(), key: key.clone(), envelope: record(i) };
        produce.ask(produced).await.map_err(|e| format!("{e:?}"))?.map_err(|e| e.to_string())?;
        if i >= 50 {
            nexus.push(started.elapsed());
        }
    }
    arbiter.stop();
    let producer: FutureProducer = config.producer().create().map_err(|e| e.to_string())?;
    let mut raw = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let started = Instant::now();
        let bytes = record(i).encode();
        let sent = FutureRecord::to(SEMANTIC_EVENTS).key(&key).payload(&bytes);
        producer.send(sent, Timeout::After(Duration::from_secs(30))).await.map_err(|(e, _)| e.to_string())?;
        if i >= 50 {
            raw.push(started.elapsed());
        }
    }
    let size = record(0).encode().len();
    let mut lines = pair("journal append (produce → broker ack)", &nexus, &raw, "");
    lines[0].note =
        format!("{}; {n} appends of {size} B one at a time through a KafkaBridge vs rdkafka", lines[0].note);
    lines[1].note = format!("{}; {histogram}", lines[1].note);
    Ok(lines)
}

/// Turns per second: `contexts` contexts sending turns back to back for
/// `window`, against as many direct callers.
pub(super) async fn throughput(h: &Harness, contexts: usize, window: Duration) -> Result<Vec<Line>, String> {
    let mut ids = Vec::with_capacity(contexts);
    for _ in 0..contexts {
        ids.push(h.api.create(SCRIPTED, &[]).await?);
    }
    for id in &ids {
        h.api.journaled(id).await?;
    }
    let url = h.model.url();
    let started = Instant::now();
    let callers = (0..contexts).map(|_| async {
        let mut history: Vec<Value> = Vec::new();
        let mut done = 0u64;
        while started.elapsed() < window {
            history.push(json!({"role": "user", "content": HELLO}));
            let d = direct(&h.http, &url, &body(SCRIPTED, &history, &[])).await?;
            history.push(json!({"role": "assistant", "content": d.text}));
            done += 1;
        }
        Ok::<u64, String>(done)
    });
    let direct_done: u64 = join_all(callers).await.into_iter().sum::<Result<u64, String>>()?;
    let direct_rate = direct_done as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let senders = ids.iter().map(|id| async move {
        let mut done = 0u64;
        while started.elapsed() < window {
            let offset = h.api.say(id, HELLO).await?;
            h.turns.wait(id, offset, TURN_LIMIT).await?;
            done += 1;
        }
        Ok::<u64, String>(done)
    });
    let nexus_done: u64 = join_all(senders).await.into_iter().sum::<Result<u64, String>>()?;
    let nexus_rate = nexus_done as f64 / started.elapsed().as_secs_f64();
    let note = format!(
        "{:?} per side: {nexus_done} turns, each context sending its next message once its turn completed; direct: {direct_done} completions by {contexts} callers",
        window
    );
    Ok(vec![Line::new(
        format!("turns per second, one llm-manager, {contexts} contexts"),
        format!("{nexus_rate:.0}/s"),
        format!("{direct_rate:.0}/s"),
    )
    .ratio(nexus_rate / direct_rate)
    .note(note)])
}
