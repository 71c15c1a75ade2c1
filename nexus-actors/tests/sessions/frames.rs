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
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close within 10 s") {
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
