//! The verdict of a chaos run, once the load has stopped: reads what the
//! system kept (documents, the panel's run counts, `semantic.events`) and
//! counts it against what the clients were told.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_actors::bus::kafka::SEMANTIC_EVENTS;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;

use super::calls::{Answered, Caller};
use super::followers::Follower;
use super::load::{key, read, Shared, Writer};
use super::panel::Runs;

/// How long followers have to converge once the load stops.
pub(super) const CONVERGE_WITHIN: Duration = Duration::from_secs(5);

/// How long what the system kept may take to be read back after the run, in all.
const READ_BACK_WITHIN: Duration = Duration::from_secs(30);

/// What the run counts; every field but the totals must be zero.
#[derive(Debug, Default)]
pub(super) struct Verdict {
    pub(super) writes_acked: u64,
    /// Acknowledged writes missing from their document.
    pub(super) writes_lost: u64,
    /// Versions a document moved by that no distinct write explains.
    pub(super) writes_applied_twice: u64,
    pub(super) calls_answered: u64,
    /// Tool calls (one idempotency key each) whose tool ran more than once.
    pub(super) calls_ran_twice: u64,
    /// Answered calls the tool never ran, or whose answer was another call's.
    pub(super) calls_wrong: u64,
    /// Answered calls without their `nexus.tool.called` or `nexus.tool.finished` record.
    pub(super) records_lost: u64,
    /// Of those, calls answered by a node in the moments before it was
    /// killed with `kill -9` ([`Kill`]): records it held in memory, not yet
    /// handed to Kafka (the recorder produces off the call's path).
    pub(super) records_lost_with_killed_node: u64,
    /// Calls with a record produced again after a failed produce (the same
    /// record twice: the recorder delivers at least once).
    pub(super) records_produced_again: u64,
    /// Calls with two different records of one kind (called or finished).
    pub(super) records_twice: u64,
    pub(super) followers: u64,
    /// Followers not at their document's last version and state in time.
    pub(super) followers_not_converged: u64,
    /// Changes a follower got out of order (a gap or a repeat).
    pub(super) follower_gaps: u64,
    /// Messages posted to a context and acknowledged (`202`).
    pub(super) turns_acked: u64,
    /// Acknowledged messages whose turn never completed.
    pub(super) turns_lost: u64,
    /// Messages answered by more than one `turn_completed`.
    pub(super) turns_twice: u64,
    /// Messages answered more than once on the raw journal and once as
    /// readers see it: a fenced-off writer's late answers, left out.
    pub(super) turns_twice_fenced_off: u64,
    /// The answers (`turn_completed`) each context's journal showed its
    /// readers, by command offset.
    pub(super) answers_read: HashMap<String, HashMap<i64, u32>>,
    /// Model steps with more than one recorded response.
    pub(super) model_steps_twice: u64,
    /// Turns that completed with a failure (an answer, not a loss).
    pub(super) turns_failed: u64,
    /// What could not be read back after the run (a broker or node that
    /// stayed down): nothing can be said of it, so the run fails.
    pub(super) unreadable: Vec<String>,
}

impl Verdict {
    /// The counts that must be zero, named.
    pub(super) fn failures(&self) -> Vec<(&'static str, u64)> {
        [
            ("acknowledged writes lost", self.writes_lost),
            ("writes applied twice", self.writes_applied_twice),
            ("tool calls that ran twice", self.calls_ran_twice),
            ("tool calls answered wrongly", self.calls_wrong),
            (
                "tool call records lost (besides those a killed node held)",
                self.records_lost - self.records_lost_with_killed_node,
            ),
            ("tool call records written twice", self.records_twice),
            ("WebSocket followers that never converged", self.followers_not_converged),
            ("changes out of order at a follower", self.follower_gaps),
            ("acknowledged messages never answered", self.turns_lost),
            ("messages answered twice", self.turns_twice),
            ("model steps answered twice", self.model_steps_twice),
            ("results that could not be read back after the run", self.unreadable.len() as u64),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// The documents against their writers' acknowledgements; then the
/// followers against the documents.
pub(super) async fn documents(
    shared: &Shared,
    writers: &[Arc<Writer>],
    followers: &[(usize, Arc<Follower>)],
    verdict: &mut Verdict,
) {
    let mut finals = Vec::new();
    let until = Instant::now() + READ_BACK_WITHIN;
    for writer in writers {
        let Some((version, state)) =
            from_any_node(shared, until, |url| async move { read(shared, &url, &writer.doc).await }).await
        else {
            verdict.unreadable.push(format!("document {}", writer.doc));
            finals.push(None);
            continue;
        };
        let acked = writer.acked.lock().expect("acked").clone();
        verdict.writes_acked += acked.len() as u64;
        verdict.writes_lost += acked.iter().filter(|&&i| state.get(key(i)).is_none()).count() as u64;
        let keys = state.as_object().map_or(0, |o| o.len()) as u64;
        match version.checked_sub(writer.initial_version) {
            Some(moved) => verdict.writes_applied_twice += moved.abs_diff(keys),
            // The document went back: whatever it held since is lost.
            None => verdict.writes_lost += acked.len() as u64,
        }
        finals.push(Some((version, state)));
    }
    // Followers of a document that could not be read cannot be judged.
    let followers: Vec<(&Follower, &(u64, Value))> =
        followers.iter().filter_map(|(doc, f)| Some((f.as_ref(), finals[*doc].as_ref()?))).collect();
    verdict.followers = followers.len() as u64;
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let converged = |f: &Follower, (version, state): &(u64, Value)| {
        let want: HashSet<&String> = state.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        f.version.load(Ordering::Relaxed) == *version
            && f.keys.lock().expect("keys").iter().collect::<HashSet<_>>() == want
    };
    while Instant::now() < deadline && !followers.iter().all(|(f, last)| converged(f, last)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    verdict.followers_not_converged = followers.iter().filter(|(f, last)| !converged(f, last)).count() as u64;
    verdict.follower_gaps = followers.iter().map(|(f, _)| f.gaps.load(Ordering::Relaxed)).sum();
}

/// The first answer a node gives to `ask` (each asked in turn, again
/// until `until`, at least once); None when none did. Readers of many
/// things share one `until`, so that a run whose nodes are down ends its
/// verdict in one wait, not in one wait per thing read.
pub(super) async fn from_any_node<T, Fut>(shared: &Shared, until: Instant, ask: impl Fn(String) -> Fut) -> Option<T>
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = until;
    loop {
        for url in &shared.urls {
            if let Some(answer) = ask(url.clone()).await {
                return Some(answer);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The panel's runs and the calls' records against the answers.
pub(super) fn tool_calls(callers: &[Arc<Caller>], runs: &Runs, brokers: &str, kills: &[Kill], verdict: &mut Verdict) {
    let answered: Vec<Answered> = callers.iter().flat_map(|c| c.answered.lock().expect("answered").clone()).collect();
    verdict.calls_answered = answered.len() as u64;
    verdict.calls_wrong = callers.iter().map(|c| c.wrong.load(Ordering::Relaxed)).sum();
    let runs = runs.lock().expect("runs").clone();
    let twice: Vec<(&u64, &u32)> = runs.iter().filter(|(_, &r)| r > 1).collect();
    verdict.calls_ran_twice = twice.len() as u64;
    for (n, runs) in twice.iter().take(20) {
        eprintln!("chaos: tool call n={n} ran {runs} times");
    }
    verdict.calls_wrong += answered.iter().filter(|a| !runs.contains_key(&a.n)).count() as u64;

    // Records leave a node off the call's path: give its queue time to drain.
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = match records_of(&answered, brokers, deadline) {
        Ok(records) => records,
        Err(why) => {
            eprintln!("chaos: the tool call records could not be read back: {why}");
            verdict.unreadable.push(format!("the tool call records on {SEMANTIC_EVENTS}: {why}"));
            return;
        }
    };
    let record_of = |a: &Answered| records.get(&a.call_id).cloned().unwrap_or_default();
    let lost: Vec<&Answered> = answered.iter().filter(|a| !record_of(a).complete()).collect();
    let twice: Vec<&Answered> = answered.iter().filter(|a| record_of(a).distinct() > 2).collect();
    verdict.records_lost = lost.len() as u64;
    verdict.records_produced_again = answered.iter().filter(|a| record_of(a).produced_again()).count() as u64;
    let held =
        |a: &&&Answered| kills.iter().any(|k| k.node == a.node && (k.settled_ms..=k.killed_ms).contains(&a.at_ms));
    verdict.records_lost_with_killed_node = lost.iter().filter(held).count() as u64;
    verdict.records_twice = twice.len() as u64;
    report("lost a record", &lost);
    report("recorded twice", &twice);
}

/// Says on stderr which calls went wrong and when they were answered, to
/// match against the faults' times.
fn report(what: &str, calls: &[&Answered]) {
    for call in calls.iter().take(20) {
        eprintln!(
            "chaos: tool call n={} ({}), answered at {:.2} s: {what}",
            call.n,
            call.call_id,
            call.at_ms as f64 / 1e3
        );
    }
    if calls.len() > 20 {
        eprintln!("chaos: ... and {} more calls that {what}", calls.len() - 20);
    }
}

/// A `kill -9` of a node: before it, the harness waited until every call
/// answered before `settled_ms` had its records on Kafka; calls the node
/// answered between then and `killed_ms` may have had theirs in its memory.
pub(super) struct Kill {
    pub(super) node: usize,
    pub(super) settled_ms: u64,
    pub(super) killed_ms: u64,
}

/// The envelope ids of one call's records, by kind.
#[derive(Clone, Default)]
struct CallRecords {
    called: Vec<String>,
    finished: Vec<String>,
}

impl CallRecords {
    fn complete(&self) -> bool {
        !self.called.is_empty() && !self.finished.is_empty()
    }

    /// Different records, of both kinds (two when all is well).
    fn distinct(&self) -> usize {
        let distinct = |ids: &[String]| ids.iter().collect::<HashSet<_>>().len();
        distinct(&self.called) + distinct(&self.finished)
    }

    fn produced_again(&self) -> bool {
        self.called.len() + self.finished.len() > self.distinct()
    }
}

/// The records of `answered` calls, read until all are there or `deadline`.
fn records_of(answered: &[Answered], brokers: &str, deadline: Instant) -> Result<HashMap<String, CallRecords>, String> {
    loop {
        let records = tool_records(brokers)?;
        let complete = answered.iter().all(|a| records.get(&a.call_id).is_some_and(CallRecords::complete));
        if complete || Instant::now() >= deadline {
            return Ok(records);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How many of `answered` lack a record on Kafka after waiting up to `within`.
pub(super) fn unrecorded(answered: &[Answered], brokers: &str, within: Duration) -> Result<usize, String> {
    let records = records_of(answered, brokers, Instant::now() + within)?;
    Ok(answered.iter().filter(|a| !records.get(&a.call_id).is_some_and(CallRecords::complete)).count())
}

/// The `nexus.tool.called` and `nexus.tool.finished` records on `semantic.events`, by call id.
fn tool_records(brokers: &str) -> Result<HashMap<String, CallRecords>, String> {
    let mut records = HashMap::new();
    scan_events(brokers, |_, envelope| {
        let (call, called) = match envelope["type"].as_str() {
            Some("nexus.tool.called") => (&envelope["data"]["call"]["call_id"], true),
            Some("nexus.tool.finished") => (&envelope["data"]["call_id"], false),
            _ => return,
        };
        let (Some(call), Some(id)) = (call.as_str(), envelope["id"].as_str()) else { return };
        let entry: &mut CallRecords = records.entry(call.to_owned()).or_default();
        if called {
            entry.called.push(id.to_owned());
        } else {
            entry.finished.push(id.to_owned());
        }
    })?;
    Ok(records)
}

/// Hands every record on `semantic.events` that decodes as JSON to
/// `visit`, with its key, as the broker holds them: no reader's filtering.
pub(super) fn scan_events(brokers: &str, mut visit: impl FnMut(Option<&[u8]>, &Value)) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "nexus-chaos-verdict")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .map_err(|e| format!("a Kafka consumer: {e}"))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(SEMANTIC_EVENTS), timeout).map_err(|e| format!("metadata: {e}"))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(SEMANTIC_EVENTS, partition, timeout)
            .map_err(|e| format!("partition {partition}'s watermarks: {e}"))?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(SEMANTIC_EVENTS, partition, Offset::Offset(low))
            .map_err(|e| format!("partition {partition}: {e}"))?;
        consumer.assign(&assignment).map_err(|e| format!("partition {partition}: {e}"))?;
        let mut next = low;
        let deadline = Instant::now() + Duration::from_secs(60);
        while next < high {
            if Instant::now() >= deadline {
                return Err(format!("partition {partition} stalled at {next} of {high}"));
            }
            let Some(Ok(message)) = consumer.poll(Duration::from_secs(1)) else { continue };
            // A broker may answer a fetch with a batch seen already.
            if message.partition() != partition || message.offset() < next {
                continue;
            }
            next = message.offset() + 1;
            if let Ok(envelope) = serde_json::from_slice::<Value>(message.payload().unwrap_or_default()) {
                visit(message.key(), &envelope);
            }
        }
    }
    Ok(())
}
