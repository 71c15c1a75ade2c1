//! Which panel paths the gateway never forwards: a panel's tool interface
//! (`/manifest` and everything under `/mcp`) is reached only by its
//! sidecar, so that nobody runs a panel's tools by going round the tool
//! registry (its owner check, argument schema, idempotency and records).
//!
//! Servers disagree on how they read a path: one decodes `%6d` to `m`,
//! another `%2f` to `/`, folds `//`, resolves `..` or ignores case. So the
//! check reads the path in the most generous way any of them might — and
//! refuses when that reading names a tool path. The request is forwarded
//! with its path as sent; this module only decides.

/// How often percent-decoding is applied: `%256d` is `%6d` after one
/// round and `m` after two. More rounds than this are refused outright.
const DECODE_ROUNDS: usize = 4;

/// Whether `path` (a panel's path with its `/p/<id>` prefix removed, no
/// query) reaches its tool interface under any common reading, or is so
/// encoded that it cannot be read with confidence.
pub(crate) fn is_tool_path(path: &str) -> bool {
    let Some(decoded) = decode_fully(path) else { return true };
    let segments = segments(&decoded);
    match segments.as_slice() {
        [first, ..] if first == "mcp" => true,
        [only] if only == "manifest" => true,
        _ => false,
    }
}

/// Percent-decodes until nothing changes (bytes that are not UTF-8 are
/// kept lossily: they cannot spell a tool path). `None` when it takes more
/// than [`DECODE_ROUNDS`].
fn decode_fully(path: &str) -> Option<String> {
    let mut current = path.to_owned();
    for _ in 0..DECODE_ROUNDS {
        let next = percent_decode(&current);
        if next == current {
            return Some(current);
        }
        current = next;
    }
    None
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path's segments as the most forgiving server would resolve them:
/// `\` is a separator too, empty and `.` segments vanish, `..` climbs (not
/// above the root), `;parameters` and anything after a NUL are cut, and
/// case and surrounding whitespace do not count.
fn segments(path: &str) -> Vec<String> {
    let mut resolved: Vec<String> = Vec::new();
    for raw in path.split(['/', '\\']) {
        let segment = raw.split([';', '\0']).next().unwrap_or("").trim().to_ascii_lowercase();
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                resolved.pop();
            }
            _ => resolved.push(segment),
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_paths_are_recognised_however_they_are_spelt() {
        for path in [
            "/mcp",
            "/mcp/",
            "/mcp/execute",
            "/manifest",
            "/manifest/",
            "/MANIFEST",
            "/Mcp/Execute",
            "//manifest",
            "/./mcp/execute",
            "/x/../mcp/execute",
            "/x/y/../../manifest",
            "/../manifest",
            "/%6dcp/execute",
            "/%6Dcp/execute",
            "/%4d%43%50/execute",
            "/x%2f..%2fmcp/execute",
            "%2fmanifest",
            "/%252e%252e/mcp/execute",
            "/%256d%2563p/execute",
            "/mcp;x=1/execute",
            "/manifest;jsessionid=1",
            "/manifest%00.html",
            "\\mcp\\execute",
            "/ manifest",
        ] {
            assert!(is_tool_path(path), "{path} must be refused");
        }
    }

    #[test]
    fn the_panels_own_paths_pass() {
        for path in [
            "/",
            "/index.html",
            "/static/app.js",
            "/manifest.json",
            "/mcpx",
            "/api/mcp/execute",
            "/docs/manifest",
            "/mcp-notes",
            "/a%20b",
            "/%e2%9c%93",
            "/%zz",
        ] {
            assert!(!is_tool_path(path), "{path} must pass");
        }
    }

    #[test]
    fn endless_encoding_is_refused() {
        assert!(is_tool_path("/%2525252525252e"));
    }
}
