//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use nexus_actors::bus::kafka::{KafkaRecord, Nack};
use nexus_actors::bus::BusEvent;
use nexus_actors::{Behaviour, Ctx, Handler, Reply};

#[allow(unused_imports)]
pub(crate) use nexus_testkit::{eventually, tempdir};

/// Records every bus event it receives.
pub(crate) struct Collector {
    pub events: Arc<Mutex<Vec<BusEvent>>>,
}

impl Behaviour for Collector {
    const KIND: &'static str = "collector";
}

impl Handler<BusEvent> for Collector {
    fn handle(&mut self, event: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
        self.events.lock().unwrap().push(event);
        Reply::Now(())
    }
}

/// What a [`Recorder`] saw: every delivery attempt, and the acknowledged ones.
#[derive(Default)]
pub(crate) struct Seen {
    pub attempts: Vec<(i32, i64, u64)>,
    pub acked: Vec<(i32, i64, u64)>,
    pub keys: Vec<(Option<String>, u64)>,
    pub trace: Vec<Option<String>>,
}

/// Acknowledges Kafka records, except that it refuses `nack_once` and
/// panics on `panic_once` the first time it sees them.
pub(crate) struct Recorder {
    pub seen: Arc<Mutex<Seen>>,
    pub nack_once: Arc<Mutex<Option<u64>>>,
    pub panic_once: Arc<Mutex<Option<u64>>>,
}

impl Recorder {
    pub(crate) fn new(seen: Arc<Mutex<Seen>>) -> Self {
        Recorder { seen, nack_once: Arc::default(), panic_once: Arc::default() }
    }
}

impl Behaviour for Recorder {
    const KIND: &'static str = "recorder";
}

pub(crate) fn seq_of(record: &KafkaRecord) -> u64 {
    record.envelope.data["seq"].as_u64().expect("seq in payload")
}

impl Handler<KafkaRecord> for Recorder {
    fn handle(&mut self, record: KafkaRecord, _: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        let seq = seq_of(&record);
        self.seen.lock().unwrap().attempts.push((record.partition, record.offset, seq));
        if self.nack_once.lock().unwrap().take_if(|s| *s == seq).is_some() {
            return Reply::Now(Err(Nack("not now".into())));
        }
        if self.panic_once.lock().unwrap().take_if(|s| *s == seq).is_some() {
            panic!("recorder panics on {seq}");
        }
        let mut seen = self.seen.lock().unwrap();
        seen.acked.push((record.partition, record.offset, seq));
        seen.keys.push((record.key.clone(), seq));
        seen.trace.push(record.trace.traceparent.clone());
        Reply::Now(Ok(()))
    }
}
