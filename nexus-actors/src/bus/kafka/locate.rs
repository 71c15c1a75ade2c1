//! Finding where a produced record landed when the broker confirmed it
//! without saying: librdkafka reports offset -1 for an idempotent retry
//! that the broker recognised as one it had written already (a broker
//! that restarted between writing the first try and acknowledging it).
//! The record is on the log, so this reads the partition's tail for its
//! envelope id. It only reads: no group, no committed offsets.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::KafkaConfig;
use crate::envelope::Envelope;

/// How far back from the partition's end a record is looked for: a
/// duplicate is one of the records in flight when the broker went away,
/// far fewer than this.
pub const LOOKBACK: i64 = 1024;
/// How long a lookup may take in all.
const LIMIT: Duration = Duration::from_secs(10);
/// How long to wait past the high watermark for more records (tansu 0.6
/// reports a partition's end as its last batch's base offset).
const END_GRACE: Duration = Duration::from_millis(50);

/// What identifies the record looked for.
#[derive(Debug, Clone)]
pub struct Sought {
    /// Its topic.
    pub topic: String,
    /// The partition the broker put it in.
    pub partition: i32,
    /// Its key.
    pub key: String,
    /// Its envelope's id.
    pub id: String,
}

/// The offset of `sought` among the last [`LOOKBACK`] records of its
/// partition; `None` when it is not there. Runs on a blocking thread.
pub async fn locate(config: &KafkaConfig, sought: Sought) -> Result<Option<i64>, KafkaError> {
    let consumer: BaseConsumer = config
        .client()
        .set("group.id", "nexus-offset-lookup")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let found = tokio::task::spawn_blocking(move || {
        let found = scan(&consumer, &sought);
        // Closing a consumer takes about 100 ms; the caller need not wait for it.
        std::thread::spawn(move || drop(consumer));
        found
    });
    found.await.unwrap_or(Err(KafkaError::Canceled))
}

fn scan(consumer: &BaseConsumer, sought: &Sought) -> Result<Option<i64>, KafkaError> {
    let started = Instant::now();
    let (low, high) = consumer.fetch_watermarks(&sought.topic, sought.partition, LIMIT)?;
    let from = (high - LOOKBACK).max(low);
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&sought.topic, sought.partition, Offset::Offset(from))?;
    consumer.assign(&assignment)?;
    let mut next = from;
    while started.elapsed() < LIMIT {
        let wait = if next >= high { END_GRACE } else { LIMIT.saturating_sub(started.elapsed()) };
        let message = match consumer.poll(wait) {
            None if next >= high => return Ok(None),
            None => continue,
            Some(received) => received?,
        };
        next = next.max(message.offset() + 1);
        if message.key() != Some(sought.key.as_bytes()) {
            continue;
        }
        let Ok(envelope) = Envelope::decode(message.payload().unwrap_or_default()) else { continue };
        if envelope.id == sought.id {
            return Ok(Some(message.offset()));
        }
    }
    Ok(None)
}
