//! [`Replay`](super::Replay): reads a topic again, from an offset or a
//! point in time up to the end it had when the replay started, under a
//! throwaway group that commits nothing. Records are delivered one at a
//! time, each until acknowledged. It must not touch any group's offsets.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::consumer::{deliver_until_acked, to_record};
use super::{KafkaConfig, Replay, ReplayFrom};
use crate::bus::{Bus, BusErrorKind};
use crate::telemetry::Metrics;

pub(super) async fn replay(config: KafkaConfig, msg: Replay, metrics: Metrics) -> Result<u64, KafkaError> {
    let consumer: StreamConsumer = config
        .client()
        .set("group.id", format!("nexus-replay-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(&msg.topic), timeout)?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut start = TopicPartitionList::new();
    let mut end: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(&msg.topic, p, timeout)?;
        end.insert(p, high);
        let from = match msg.from {
            ReplayFrom::Offset(o) => o.clamp(low, high),
            ReplayFrom::Timestamp(_) => low,
        };
        start.add_partition_offset(&msg.topic, p, Offset::Offset(from))?;
    }
    if let ReplayFrom::Timestamp(ts) = msg.from {
        let mut query = TopicPartitionList::new();
        for &p in &partitions {
            query.add_partition_offset(&msg.topic, p, Offset::Offset(ts))?;
        }
        let found = consumer.offsets_for_times(query, timeout)?;
        for elem in found.elements() {
            let offset = match elem.offset() {
                Offset::Offset(o) => o,
                _ => end.get(&elem.partition()).copied().unwrap_or(0),
            };
            start.set_partition_offset(&msg.topic, elem.partition(), Offset::Offset(offset))?;
        }
    }
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for elem in start.elements() {
        if let (Offset::Offset(from), Some(&high)) = (elem.offset(), end.get(&elem.partition())) {
            if from < high {
                remaining.insert(elem.partition(), high);
            }
        }
    }
    consumer.assign(&start)?;
    let mut delivered = 0;
    while !remaining.is_empty() {
        let m = consumer.recv().await?;
        let Some(&high) = remaining.get(&m.partition()) else { continue };
        if m.offset() >= high {
            remaining.remove(&m.partition());
            continue;
        }
        match to_record(&m) {
            Ok(record) => {
                if !deliver_until_acked(&msg.subscriber, record, &metrics).await {
                    break;
                }
                delivered += 1;
            }
            Err(error) => metrics.bus_error(Bus::Kafka, BusErrorKind::Decode, &error),
        }
        if m.offset() + 1 >= high {
            remaining.remove(&m.partition());
        }
    }
    Ok(delivered)
}
