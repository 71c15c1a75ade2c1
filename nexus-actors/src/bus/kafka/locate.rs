//! Finding where a produced record landed when the broker confirmed it
//! without saying: librdkafka reports offset -1 for an idempotent retry
//! that the broker recognised as one it had written already (a broker
//! that restarted between writing the first try and acknowledging it).
//! The record is on the log, so this reads the partition's tail for its
//! envelope id. It only reads: assigned partitions, no offsets committed.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::KafkaConfig;
use crate::envelope::Envelope;

/// How far back from the partition's end a record is looked for: a
/// duplicate is one of the records in flight when the broker went away,
/// far fewer than this.
const LOOKBACK: i64 = 1024;
/// How long a lookup may take in all.
const LIMIT: Duration = Duration::from_secs(10);
/// How long to wait, once every record below the high watermark has come,
/// for one at it: tansu 0.6 reports a partition's end as its last batch's
/// base offset, so its last record is at the watermark, not below.
const END_GRACE: Duration = Duration::from_millis(500);

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

/// The offset of `sought` among the last 1,024 records of its
/// partition (the latest, should the same envelope be there twice: the
/// acknowledgement is the last send's); `None` when it is not there. The
/// reading runs on a blocking thread.
pub async fn locate(config: &KafkaConfig, sought: Sought) -> Result<Option<i64>, KafkaError> {
    let consumer: BaseConsumer = config.reader("nexus-offset-lookup").create()?;
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
    let left = || LIMIT.saturating_sub(started.elapsed());
    let (low, high) = consumer.fetch_watermarks(&sought.topic, sought.partition, LIMIT)?;
    let from = (high - LOOKBACK).max(low);
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&sought.topic, sought.partition, Offset::Offset(from))?;
    consumer.assign(&assignment)?;
    let (mut next, mut found) = (from, None);
    while !left().is_zero() {
        // The record was acknowledged before the watermark was read, so it
        // is below it (or at it, on tansu): nothing past it is read.
        if next > high {
            break;
        }
        let wait = if next == high { END_GRACE.min(left()) } else { left() };
        let message = match consumer.poll(wait) {
            None if next == high => break,
            None => continue,
            // A broker that restarted a moment ago may still refuse; try
            // again until the time is up.
            Some(Err(error)) => {
                tracing::debug!(%error, "kafka: looking a record up; polling again");
                std::thread::sleep(Duration::from_millis(50).min(left()));
                continue;
            }
            Some(Ok(message)) => message,
        };
        next = next.max(message.offset() + 1);
        if message.key() != Some(sought.key.as_bytes()) {
            continue;
        }
        let Ok(envelope) = Envelope::decode(message.payload().unwrap_or_default()) else { continue };
        if envelope.id == sought.id {
            found = Some(message.offset());
        }
    }
    Ok(found)
}
