//! Rebuilding a long context: a journal of 10,001 records written straight
//! to `semantic.events` (with its directory entry, as the llm-manager
//! leaves them), folded by `GET …/transcript` whole and at its middle,
//! against reading the same records raw with an rdkafka consumer.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use nexus_actors::bus::kafka::{KafkaConfig, SEMANTIC_EVENTS};
use nexus_actors::platform::store::Redis;
use nexus_actors::semantic::directory::{ContextDirectory, ContextInfo};
use nexus_actors::semantic::records::{
    ContextCreated, LlmResponse, ThoughtDelta, TurnCompleted, TurnOutcome, Usage, UserMessage,
};
use nexus_actors::Envelope;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde_json::Value;

use super::client::pct_ms;
use super::{ms, node, Harness, Line, HELLO, SCRIPTED, TWENTY_WORDS};

/// Turns in the journal; with its creation, 4 records each.
const TURNS: usize = 2_500;

/// The records of one turn, as the llm-manager journals a one-step answer.
fn turn(context: &str, command_offset: i64) -> [Envelope<Value>; 4] {
    let usage = Usage { input_tokens: 10, output_tokens: 20 };
    let user = UserMessage {
        context: context.to_owned(),
        user: node::USER.to_owned(),
        content: HELLO.to_owned(),
        command_offset: Some(command_offset),
    };
    let delta = ThoughtDelta { context: context.to_owned(), command_offset, step: 0, text: TWENTY_WORDS.to_owned() };
    let response = LlmResponse {
        context: context.to_owned(),
        command_offset,
        step: 0,
        content: Some(TWENTY_WORDS.to_owned()),
        tool_calls: Vec::new(),
        finish_reason: Some("stop".to_owned()),
        usage,
        model: SCRIPTED.to_owned(),
        endpoint: "scripted".to_owned(),
        ttft_ms: 1,
        latency_ms: 2,
    };
    let completed = TurnCompleted {
        context: context.to_owned(),
        command_offset,
        outcome: TurnOutcome::Completed,
        answer: Some(TWENTY_WORDS.to_owned()),
        steps: 1,
        usage,
    };
    [
        Envelope::new("bench", user).into_untyped(),
        Envelope::new("bench", delta).into_untyped(),
        Envelope::new("bench", response).into_untyped(),
        Envelope::new("bench", completed).into_untyped(),
    ]
}

/// Writes the context's journal; its (partition, first offset, last offset, records).
async fn write(config: &KafkaConfig, id: &str) -> Result<(i32, i64, i64, usize), String> {
    // As the node's bridge writes them: one record per batch.
    let producer: FutureProducer = config.producer().create().map_err(|e| e.to_string())?;
    let created = ContextCreated {
        context: id.to_owned(),
        owner: node::USER.to_owned(),
        model: Some(SCRIPTED.to_owned()),
        system: None,
        tools: Vec::new(),
        parent: None,
        command_offset: Some(0),
    };
    let bytes = Envelope::new("bench", created).encode();
    let timeout = Timeout::After(Duration::from_secs(30));
    let delivered = producer
        .send(FutureRecord::to(SEMANTIC_EVENTS).key(id).payload(&bytes), timeout)
        .await
        .map_err(|(e, _)| e.to_string())?;
    let (partition, first) = (delivered.partition, delivered.offset);
    let records: Vec<Vec<u8>> = (0..TURNS).flat_map(|t| turn(id, 1 + t as i64)).map(|e| e.encode()).collect();
    let offsets: Vec<i64> = futures::stream::iter(records.iter())
        .map(|bytes| {
            let producer = producer.clone();
            async move {
                let record = FutureRecord::to(SEMANTIC_EVENTS).key(id).partition(partition).payload(bytes);
                producer.send(record, Timeout::After(Duration::from_secs(30))).await.map(|d| d.offset)
            }
        })
        .buffered(256)
        .map(|r| r.map_err(|(e, _)| e.to_string()))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let last = offsets.iter().copied().max().unwrap_or(first);
    Ok((partition, first, last, 1 + records.len()))
}

/// Reads `records` records of `id` from `first` raw with a consumer of its
/// own (created, assigned, closed: a one-shot reader, as the journal's);
/// the time it took, and how much of it closing the consumer took.
async fn read_raw(
    config: &KafkaConfig,
    id: &str,
    partition: i32,
    first: i64,
    records: usize,
) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    let consumer: StreamConsumer = config
        .client()
        .set("group.id", "bench-raw-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| e.to_string())?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(SEMANTIC_EVENTS, partition, Offset::Offset(first)).map_err(|e| e.to_string())?;
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut seen = 0;
    while seen < records {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| format!("the raw read stalled after {seen} records"))?
            .map_err(|e| e.to_string())?;
        if message.key() == Some(id.as_bytes()) && message.payload().is_some() {
            seen += 1;
        }
    }
    let closing = Instant::now();
    drop(consumer);
    Ok((started.elapsed(), closing.elapsed()))
}

/// The rebuild rows, each the median of `runs` runs.
pub(super) async fn rows(h: &Harness, runs: usize) -> Result<Vec<Line>, String> {
    let config = KafkaConfig::new(h.tansu.brokers());
    let id = uuid::Uuid::now_v7().to_string();
    let redis = Redis::connect(&h.redis.url()).await.map_err(|e| e.to_string())?;
    let directory = ContextDirectory::new(redis);
    let info = ContextInfo {
        id: id.clone(),
        owner: node::USER.to_owned(),
        model: Some(SCRIPTED.to_owned()),
        tools: Vec::new(),
        parent: None,
        created_at: Utc::now(),
        partition: None,
        first_offset: None,
        last_offset: None,
    };
    directory.create(&info, usize::MAX).await.map_err(|e| e.to_string())?;
    let (partition, first, last, records) = write(&config, &id).await?;
    directory.journaled(&id, partition, first).await.map_err(|e| e.to_string())?;
    directory.journaled(&id, partition, last).await.map_err(|e| e.to_string())?;
    // The middle: after the first half of the turns.
    let middle = first + (last - first) / 2;

    let (mut whole, mut half, mut raw, mut raw_half, mut close) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..runs + 1 {
        let started = Instant::now();
        let transcript = h.api.get(&format!("/api/contexts/{id}/transcript")).await?;
        let took = started.elapsed();
        let messages = transcript["messages"].as_array().map_or(0, Vec::len);
        if messages != 2 * TURNS {
            return Err(format!("the whole transcript has {messages} messages, not {}", 2 * TURNS));
        }
        let started = Instant::now();
        h.api.get(&format!("/api/contexts/{id}/transcript?at={middle}")).await?;
        let took_half = started.elapsed();
        let raw_whole = read_raw(&config, &id, partition, first, records).await?;
        let raw_middle = read_raw(&config, &id, partition, first, records / 2).await?;
        // The first run warms the broker's and the node's caches.
        if run > 0 {
            whole.push(took);
            half.push(took_half);
            raw.push(raw_whole.0);
            raw_half.push(raw_middle.0);
            close.extend([raw_whole.1, raw_middle.1]);
        }
    }
    let line = |what: &str, nexus: &[Duration], base: &[Duration], note: String| {
        let (n, b) = (pct_ms(nexus, 0.5), pct_ms(base, 0.5));
        Line::new(what, ms(n), ms(b)).ratio(b / n).note(note)
    };
    let closing = ms(pct_ms(&close, 0.5));
    Ok(vec![
        line(
            "rebuild: transcript of a 10,001-record context, p50",
            &whole,
            &raw,
            format!(
                "{} messages folded, median of {runs}; Nexus includes the journal reader's 20 ms wait past the last \
                 record; baseline: the records read raw by a one-shot consumer, {closing} of it closing the consumer",
                2 * TURNS
            ),
        ),
        line(
            "rebuild: transcript at the middle offset, p50",
            &half,
            &raw_half,
            format!(
                "?at={middle} ({} records), median of {runs}; baseline: those records read raw, as above",
                records / 2
            ),
        ),
    ])
}
