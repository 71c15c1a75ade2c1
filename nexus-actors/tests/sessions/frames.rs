//! Frames a WebSocket library would not send, written raw on the socket of
//! a real session: each is refused with its own close code, before the
//! server holds more than one frame's worth of it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use nexus_actors::roles::transaction_manager as tm;

use super::harness::*;

/// A client frame (masked) of `opcode`, with FIN set when `fin`, whose
/// header announces `announced` payload bytes, carrying `payload` (which
/// may be less than announced).
fn raw_frame(opcode: u8, fin: bool, announced: u64, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![opcode | if fin { 0x80 } else { 0 }];
    match announced {
        0..=125 => frame.push(0x80 | announced as u8),
        126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(announced as u16).to_be_bytes());
        }
        _ => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&announced.to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

async fn write_raw(ws: &mut Ws, bytes: &[u8]) {
    let MaybeTlsStream::Plain(stream) = ws.get_mut() else { panic!("a plain socket") };
    // The server may close while a large write is still going.
    let _ = stream.write_all(bytes).await;
}

/// The close code the server ends with, skipping what comes before it.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    close_code_within(ws, Duration::from_secs(10)).await
}

/// The close code the server ends with, which must come within `limit`.
async fn close_code_within(ws: &mut Ws, limit: Duration) -> Option<u16> {
    loop {
        match tokio::time::timeout(limit, ws.next()).await.unwrap_or_else(|_| panic!("no close within {limit:?}")) {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[actix_rt::test]
async fn frames_a_client_library_would_not_send_close_the_socket_with_their_own_code() {
    let world = World::new("ws-raw").await;
    let node = world.node().await;
    let ada = node.login("ada").await;

    // A frame that announces a terabyte: refused once one frame's worth
    // is in, not when the terabyte would be. (Exactly one byte more is
    // sent, so that nothing unread makes the close a reset.)
    let mut ws = connect(&node, &ada).await;
    let payload = vec![b'x'; tm::protocol::MAX_FRAME + 1];
    write_raw(&mut ws, &raw_frame(0x1, true, 1 << 40, &payload)).await;
    assert_eq!(close_code(&mut ws).await, Some(1009));

    // Text that is not UTF-8.
    let mut ws = connect(&node, &ada).await;
    write_raw(&mut ws, &raw_frame(0x1, true, 2, &[0xff, 0xfe])).await;
    assert_eq!(close_code(&mut ws).await, Some(1007));

    // A message in fragments: nothing would put them together.
    let mut ws = connect(&node, &ada).await;
    write_raw(&mut ws, &raw_frame(0x1, false, 3, b"{\"t")).await;
    write_raw(&mut ws, &raw_frame(0x0, true, 3, b"\":1")).await;
    assert_eq!(close_code(&mut ws).await, Some(1003));

    // A ping flood is answered as far as the queue goes, and the session
    // still serves.
    let mut ws = connect(&node, &ada).await;
    for _ in 0..200 {
        ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    }
    ws.send(Message::text(json!({"type": "subscribe", "doc": 42}).to_string())).await.unwrap();
    assert_eq!(next(&mut ws).await["code"], "bad_frame");
}

/// A WebSocket upgrade request for `path`, with `token` if any.
fn upgrade_request(path: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
    .into_bytes()
}

/// Writes `bytes` on a new connection to `node` and returns the response's
/// status line and what follows its head, once `enough` says it is enough.
async fn raw_exchange(node: &Node, bytes: &[u8], enough: impl Fn(&[u8]) -> bool) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut socket = tokio::net::TcpStream::connect(&node.addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if enough(&got[end + 4..]) {
                    break end;
                }
            }
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection ended: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(10), read).await.expect("no answer within 10 s");
    let status = String::from_utf8_lossy(&got[..got.iter().position(|&b| b == b'\r').unwrap()]).into_owned();
    (status, got[end + 4..].to_vec())
}

/// The whole server text frames (unmasked, shorter than 64 KiB) at the
/// start of `bytes`, as JSON.
fn text_frames(mut bytes: &[u8]) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        assert_eq!(bytes[0], 0x81, "a whole text frame");
        let (len, header) = match bytes[1] {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            126 => break,
            len => (usize::from(len), 2),
        };
        let Some(payload) = bytes.get(header..header + len) else { break };
        frames.push(serde_json::from_slice(payload).unwrap());
        bytes = &bytes[header + len..];
    }
    frames
}

#[actix_rt::test]
async fn only_ws_upgrades_and_a_first_frame_riding_with_the_request_is_served() {
    let world = World::new("ws-upgrade").await;
    let node = world.node().await;
    let ada = node.login("ada").await;

    // The client's first frame in the same write as its request: it is
    // what the server read past the request's head, and must not be lost.
    let payload = br#"{"type":"subscribe","doc":42}"#;
    let mut bytes = upgrade_request("/ws", Some(ada.token()));
    bytes.extend_from_slice(&raw_frame(0x1, true, payload.len() as u64, payload));
    let (status, rest) = raw_exchange(&node, &bytes, |rest| text_frames(rest).len() >= 2).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let frames = text_frames(&rest);
    assert_eq!(frames[0]["type"], "welcome", "{frames:?}");
    assert_eq!(frames[1]["code"], "bad_frame", "the first frame was answered: {frames:?}");

    // An upgrade is checked before anything happens: no token, no session.
    let (status, body) = raw_exchange(&node, &upgrade_request("/ws", None), |_| true).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status} {:?}", String::from_utf8_lossy(&body));
    // Upgrades elsewhere are not a way around the routes.
    let (status, _) = raw_exchange(&node, &upgrade_request("/api/graph", Some(ada.token())), |_| true).await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    // `/ws` without the upgrade says what it lacks.
    let plain = reqwest::get(format!("http://{}/ws", node.addr)).await.unwrap();
    assert_eq!(plain.status(), 426);
}

#[actix_rt::test]
async fn a_frame_begun_and_never_finished_closes_the_socket_in_time() {
    let world = World::new("ws-partial").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let mut ws = connect(&node, &ada).await;
    // A header announcing 60 KiB (the server makes room for all of it),
    // ten bytes of it, then silence.
    write_raw(&mut ws, &raw_frame(0x1, true, 60 * 1024, b"{\"type\":\"x")).await;
    let started = std::time::Instant::now();
    assert_eq!(close_code_within(&mut ws, Duration::from_secs(40)).await, Some(1008));
    assert!(started.elapsed() >= Duration::from_secs(15), "closed before its deadline: {:?}", started.elapsed());
}

#[actix_rt::test]
async fn a_catch_up_larger_than_one_write_arrives_whole_on_a_quiet_document() {
    let world = World::new("ws-burst").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({})).await;
    // 60 changes of about 1 KiB each: the catch-up queues them all in one
    // turn of the session, far more than one write takes.
    let filler = "x".repeat(1000);
    for n in 1..=60u64 {
        patch(&ada, &id, n, json!({"n": n, "filler": format!("{n}{filler}")})).await;
    }
    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1})).await;
    // Nothing else happens on the document or the socket from here.
    for expected in 2..=61u64 {
        let change = next(&mut ws).await;
        assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(expected)));
    }
}

#[actix_rt::test]
async fn a_node_takes_no_more_sessions_than_its_limit_and_takes_one_again_when_one_leaves() {
    let world = World::new("ws-limit").await;
    let node = world.node_with_max_sessions(2).await;
    let ada = node.login("ada").await;
    let first = connect(&node, &ada).await;
    let _second = connect(&node, &ada).await;
    let url = format!("ws://{}/ws?token={}", node.addr, ada.token());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503 past the limit, got {:?}", other.map(|(_, r)| r.status())),
    }
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => panic!("no session after one left: {error}"),
        }
    }
}
