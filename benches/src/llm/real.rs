//! The local model (the `xllamacpp` server `scripts/dev` installs): tokens
//! per second and time to first token through the node against direct
//! calls to the same server, one request at a time. Without the model the
//! row says so.

use std::time::{Duration, Instant};

use serde_json::json;

use super::client::{body, direct, follow, mean_ms};
use super::{ms, Harness, Line};

/// What the user asks: an answer of some tens of tokens that ends (free
/// prose from a small model sometimes runs on for thousands of tokens, and
/// the node sends no `max_tokens`).
const PROMPT: &str = "Count from 1 to 30, separated by commas.";
/// A local model on two cores answers in seconds; past this the row gives up.
const TURN_LIMIT: Duration = Duration::from_secs(120);

/// The local model rows, `n` turns per side after one untimed direct call
/// (which loads the model's pages and primes the server's prompt cache for
/// both sides: they send the same prompt).
pub(super) async fn rows(h: &Harness, n: usize) -> Result<Vec<Line>, String> {
    let server = match &h.real {
        Ok(server) => server,
        Err(why) => return Ok(vec![Line::missing("local model: tokens per second", why)]),
    };
    let (model, url) = (server.model().to_owned(), server.base_url());
    let (mut n_tokens, mut n_time, mut n_first) = (0u64, Duration::ZERO, Vec::new());
    let (mut d_tokens, mut d_time, mut d_first) = (0u64, Duration::ZERO, Vec::new());
    let request = body(&model, &[json!({"role": "user", "content": PROMPT})], &[]);
    let call = || async {
        tokio::time::timeout(TURN_LIMIT, direct(&h.http, &url, &request))
            .await
            .map_err(|_| format!("the direct call took longer than {TURN_LIMIT:?}"))?
    };
    call().await?;
    for _ in 0..n {
        let d = call().await?;
        let id = h.api.create(&model, &[]).await?;
        h.api.journaled(&id).await?;
        let mut follower = follow(h.node.port, &h.api.token, &id).await?;
        let sent = Instant::now();
        let offset = h.api.say(&id, PROMPT).await?;
        let times = follower.turn(offset, TURN_LIMIT).await?;
        let events = h.api.events(&id).await?;
        let completed = events
            .iter()
            .find(|r| r["type"] == "nexus.context.turn_completed" && r["data"]["command_offset"] == offset)
            .ok_or("no turn_completed record")?;
        if completed["data"]["outcome"] != "completed" {
            return Err(format!("the local model's turn ended {}", completed["data"]));
        }
        let tokens = completed["data"]["usage"]["output_tokens"].as_u64().unwrap_or(0);
        n_tokens += tokens;
        n_time += times.done - sent;
        n_first.push(times.first.unwrap_or(times.done) - sent);
        d_tokens += d.output_tokens;
        d_time += d.total;
        d_first.push(d.ttft);
    }
    let (nexus_rate, direct_rate) = (n_tokens as f64 / n_time.as_secs_f64(), d_tokens as f64 / d_time.as_secs_f64());
    let (nf, df) = (mean_ms(&n_first), mean_ms(&d_first));
    Ok(vec![
        Line::new("local model: tokens per second", format!("{nexus_rate:.1}/s"), format!("{direct_rate:.1}/s"))
            .ratio(nexus_rate / direct_rate)
            .note(format!(
                "{} ({n} turns per side): {n_tokens} tokens through Nexus, {d_tokens} direct; time from the request to the whole answer",
                server.model()
            )),
        Line::new("local model: time to first token, mean", ms(nf), ms(df))
            .ratio(df / nf)
            .note(format!("added {:+.1} ms", nf - df)),
    ])
}
