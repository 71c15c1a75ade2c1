//! HTTP/1.1 by hand over one TCP connection, for tests that must open the
//! connection themselves (inside a network namespace) or must see that two
//! requests travel on the same connection.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer: status and body.
pub(crate) struct Answer {
    pub status: u16,
    pub body: String,
}

/// Sends `method path` with `body` on `stream` (keeping it open) and reads
/// one answer, which must carry a Content-Length.
pub(crate) async fn request(stream: &mut TcpStream, method: &str, path: &str, body: &str) -> std::io::Result<Answer> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the headers"));
        }
        received.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = received[end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed inside the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned() })
}

/// A connection opened inside the namespace of `inside`.
pub(crate) fn connect_inside(
    inside: &nexus_actors::netns::NetnsThread,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    TcpStream::from_std(inside.connect(addr)?)
}
