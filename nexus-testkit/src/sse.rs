//! Server-Sent Events in tests: the JSON messages of a streamed answer
//! (`/mcp`'s listens and sessions), one at a time, pings and other
//! data-less events aside.

use std::time::Duration;

use serde_json::Value;

/// The next JSON message on `stream` within `wait`, or `None` when none
/// came in time. `buffer` holds what was read past it: pass the same one
/// to every call on a stream. Panics if the stream fails or ends.
pub async fn try_next_message(stream: &mut reqwest::Response, buffer: &mut String, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data: String = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            if !data.is_empty() {
                return Some(serde_json::from_str(&data).expect("a JSON message"));
            }
            continue;
        }
        let chunk = tokio::time::timeout_at(deadline, stream.chunk()).await.ok()?;
        let chunk = chunk.expect("the stream reads").expect("the stream goes on");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// The next JSON message on `stream`, which must come within `wait`.
pub async fn next_message(stream: &mut reqwest::Response, buffer: &mut String, wait: Duration) -> Value {
    let message = try_next_message(stream, buffer, wait).await;
    message.unwrap_or_else(|| panic!("a message within {wait:?}"))
}
