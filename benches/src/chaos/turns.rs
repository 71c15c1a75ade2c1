//! The semantic side of a chaos run: askers post messages to their
//! contexts (commands on `semantic.commands`, which the nodes' LLM managers
//! consume and answer through a scripted model) and wait for each turn's
//! end in the context's journal; the verdict reads every journal back:
//! each acknowledged message answered exactly once, no model step answered
//! twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load::{Progress, Shared, BACKOFF, REQUEST_TIMEOUT};
use super::verify::{from_any_node, scan_events, Verdict};

/// Messages per context before an asker starts another (a journal is read
/// back whole, 5,000 records at most).
const TURNS_PER_CONTEXT: usize = 40;
/// How long an asker waits for a turn before posting the next message
/// (the verdict still counts it).
const TURN_WAIT: Duration = Duration::from_secs(30);
/// How often an asker reads its context's journal while it waits.
const POLL: Duration = Duration::from_millis(100);
/// The most records one read of a journal returns.
const READ_LIMIT: usize = 5000;

/// One context and the command offsets of its acknowledged messages.
#[derive(Clone)]
pub(super) struct Asked {
    id: String,
    offsets: Vec<i64>,
}

/// An asker: its contexts and what it was told.
#[derive(Default)]
pub(super) struct Asker {
    contexts: Mutex<Vec<Asked>>,
    /// Turns it stopped waiting for.
    pub(super) unanswered_in_time: AtomicU64,
    pub(super) progress: Progress,
}

/// Posts a message, waits until its turn completes, and again, moving to a
/// new context every [`TURNS_PER_CONTEXT`] messages. A post without an
/// answer is not retried: it may have become a command anyway, and a
/// second message would be a second command, not a retry.
pub(super) async fn ask(shared: Arc<Shared>, asker: Arc<Asker>) {
    let mut turn = 0usize;
    let mut asked = 0u64;
    let mut context: Option<(String, i64)> = None;
    while !shared.stopped() {
        let url = shared.urls[turn % shared.urls.len()].clone();
        turn += 1;
        let full = asker.contexts.lock().expect("contexts").last().is_none_or(|c| c.offsets.len() >= TURNS_PER_CONTEXT);
        if context.is_none() || full {
            match create(&shared, &url).await {
                Some(id) => {
                    asker.contexts.lock().expect("contexts").push(Asked { id: id.clone(), offsets: Vec::new() });
                    context = Some((id, 0));
                }
                None => tokio::time::sleep(BACKOFF).await,
            }
            continue;
        }
        let Some((id, from)) = context.as_mut() else { continue };
        let started = shared.now_ms();
        asked += 1;
        let posted = shared
            .http
            .post(format!("{url}/api/contexts/{id}/messages"))
            .bearer_auth(&shared.token)
            .timeout(REQUEST_TIMEOUT)
            .json(&json!({"content": format!("question {asked}")}))
            .send()
            .await;
        let offset = match posted {
            // A null offset: accepted, but where is unknown (a produce
            // retried across a broker restart that the bridge could not
            // find again); counted as failed.
            Ok(answer) if answer.status().as_u16() == 202 => {
                answer.json::<Value>().await.ok().and_then(|body| body["offset"].as_i64())
            }
            _ => None,
        };
        let Some(offset) = offset else {
            asker.progress.failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(BACKOFF).await;
            continue;
        };
        if let Some(asked) = asker.contexts.lock().expect("contexts").last_mut() {
            asked.offsets.push(offset);
        }
        if wait_for_turn(&shared, id, from, offset, &mut turn).await {
            asker.progress.ok(started);
        } else {
            asker.unanswered_in_time.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn create(shared: &Shared, url: &str) -> Option<String> {
    Some(shared.post(&format!("{url}/api/contexts"), &json!({})).await?["id"].as_str()?.to_owned())
}

/// Reads the context's journal from `from` (moving it on) until the turn
/// of command `offset` completes; false after [`TURN_WAIT`].
async fn wait_for_turn(shared: &Shared, id: &str, from: &mut i64, offset: i64, turn: &mut usize) -> bool {
    let deadline = Instant::now() + TURN_WAIT;
    while Instant::now() < deadline && !shared.stopped() {
        let url = &shared.urls[*turn % shared.urls.len()];
        *turn += 1;
        if let Some(records) = events(shared, url, id, *from).await {
            if let Some(last) = records.last().and_then(|r| r["offset"].as_i64()) {
                *from = last + 1;
            }
            if records.iter().any(|r| completes(r) == Some(offset)) {
                return true;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    false
}

/// The command offset a `turn_completed` record answers.
fn completes(record: &Value) -> Option<i64> {
    (record["type"] == "nexus.context.turn_completed").then(|| record["data"]["command_offset"].as_i64())?
}

async fn events(shared: &Shared, url: &str, id: &str, from: i64) -> Option<Vec<Value>> {
    let page = shared.get(&format!("{url}/api/contexts/{id}/events?from={from}&limit={READ_LIMIT}")).await?;
    page["records"].as_array().cloned()
}

/// Reads every context's journal back (waiting up to [`TURN_WAIT`] in all
/// for turns still running and for a node to answer) and counts turns
/// lost, answered twice and failed.
pub(super) async fn verify(shared: &Shared, askers: &[Arc<Asker>], verdict: &mut Verdict) {
    let contexts: Vec<Asked> = askers.iter().flat_map(|a| a.contexts.lock().expect("contexts").clone()).collect();
    let deadline = Instant::now() + TURN_WAIT;
    'contexts: for context in &contexts {
        verdict.turns_acked += context.offsets.len() as u64;
        let records = loop {
            let read =
                from_any_node(shared, deadline, |url| async move { events(shared, &url, &context.id, 0).await }).await;
            let Some(records) = read else {
                verdict.unreadable.push(format!("the journal of context {}", context.id));
                continue 'contexts;
            };
            let answered: HashSet<i64> = records.iter().filter_map(completes).collect();
            if context.offsets.iter().all(|o| answered.contains(o)) || Instant::now() > deadline {
                break records;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut answers: HashMap<i64, u32> = HashMap::new();
        for record in &records {
            if let Some(offset) = completes(record) {
                *answers.entry(offset).or_default() += 1;
                if record["data"]["outcome"] != "completed" {
                    verdict.turns_failed += 1;
                }
            }
        }
        verdict.turns_lost += context.offsets.iter().filter(|o| !answers.contains_key(o)).count() as u64;
        verdict.answers_read.insert(context.id.clone(), answers.clone());
        verdict.turns_twice += answers.values().filter(|&&n| n > 1).count() as u64;
        for (offset, _) in answers.iter().filter(|(_, &n)| n > 1) {
            eprintln!("chaos: context {} answered command {offset} twice:", context.id);
            for record in records.iter().filter(|r| r["data"]["command_offset"].as_i64() == Some(*offset)) {
                eprintln!(
                    "chaos:   {} {} {} step {}",
                    record["offset"], record["time"], record["type"], record["data"]["step"]
                );
            }
        }
        let mut steps = HashSet::new();
        for response in records.iter().filter(|r| r["type"] == "nexus.llm.response") {
            let step = (response["data"]["command_offset"].as_i64(), response["data"]["step"].as_u64());
            if !steps.insert(step) {
                verdict.model_steps_twice += 1;
            }
        }
    }
}

/// Counts the messages answered more than once on the raw journal (as the
/// broker holds it) that readers saw answered once: late answers of a
/// writer fenced off by the context's next one (a node paused past its
/// lease), which readers leave out. Not a failure: what counts is
/// [`Verdict::turns_twice`]. Only contexts [`verify`] read are looked at.
pub(super) fn fenced_off(brokers: &str, verdict: &mut Verdict) -> Result<(), String> {
    let ids: HashSet<String> = verdict.answers_read.keys().cloned().collect();
    let mut answers: HashMap<(String, i64), u32> = HashMap::new();
    scan_events(brokers, |key, envelope| {
        let Some(key) = key.and_then(|k| std::str::from_utf8(k).ok()).filter(|k| ids.contains(*k)) else { return };
        if let Some(offset) = completes(envelope) {
            *answers.entry((key.to_owned(), offset)).or_default() += 1;
        }
    })?;
    let read = &verdict.answers_read;
    let left_out = answers.iter().filter(|((id, offset), &n)| {
        n > 1 && read.get(id).is_some_and(|seen| seen.get(offset).copied().unwrap_or(0) == 1)
    });
    verdict.turns_twice_fenced_off = left_out.count() as u64;
    Ok(())
}
