//! Memory per idle context: the node process's resident memory before and
//! after N contexts were created through the API and each had one turn
//! answered, all of them still alive (the bench's node stops idle contexts
//! only after an hour).

use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{Harness, Line, SCRIPTED, TINY};

/// Contexts being created and answered at once.
const IN_FLIGHT: usize = 64;

/// The memory row for `n` contexts.
pub(super) async fn rows(h: &Harness, n: usize) -> Result<Vec<Line>, String> {
    // Settle what the warm-up turn left behind.
    actix::clock::sleep(Duration::from_secs(1)).await;
    let alive_before = h.metric("nexus_llm_contexts").await.unwrap_or(0.0);
    let before = h.node.rss_bytes();
    let completed_before = h.turns.completed();
    let started = Instant::now();
    let made: Vec<Result<(), String>> = futures::stream::iter(0..n)
        .map(|_| async {
            let id = h.api.create(SCRIPTED, &[]).await?;
            h.api.say(&id, TINY).await.map(|_| ())
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    made.into_iter().collect::<Result<Vec<()>, String>>()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while h.turns.completed() - completed_before < n as u64 {
        if Instant::now() > deadline {
            let done = h.turns.completed() - completed_before;
            return Err(format!("only {done} of {n} turns completed within 10 minutes"));
        }
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    h.turns.forget();
    actix::clock::sleep(Duration::from_secs(1)).await;
    let after = h.node.rss_bytes();
    let alive = h.metric("nexus_llm_contexts").await.unwrap_or(0.0) - alive_before;
    if alive < n as f64 {
        return Err(format!("only {alive} of the {n} contexts were alive when measured"));
    }
    let per_context = after.saturating_sub(before) as f64 / n as f64;
    let note = format!(
        "{n} contexts alive (nexus_llm_contexts), each with one answered turn; node RSS {:.0} → {:.0} MiB; created and answered in {:.1} s ({:.0} contexts/s, {IN_FLIGHT} at once)",
        before as f64 / 1_048_576.0,
        after as f64 / 1_048_576.0,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    Ok(vec![Line::new("memory per idle context", format!("{:.1} KiB", per_context / 1024.0), "—").note(note)])
}
