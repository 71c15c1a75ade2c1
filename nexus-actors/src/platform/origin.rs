//! Which `Host` and `Origin` a request may come with, against DNS
//! rebinding (as the MCP transport rules require): a page of another site
//! whose name was made to resolve to this node must not get answers.
//!
//! * A node listening on loopback answers only requests addressed to a
//!   loopback name (`localhost`, `127.0.0.0/8`, `[::1]`, any port).
//! * A request with an `Origin` is answered only when that origin is the
//!   request's own (`Origin` names the `Host` it was sent to) or one the
//!   operator allowed. Requests without `Origin` (not from a browser page)
//!   are not refused here; authentication decides.
//!
//! This module decides; the endpoints call it before anything else.

use std::net::{IpAddr, SocketAddr};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    /// A loopback node was addressed under another name.
    #[error("this node answers only to loopback names, not Host {0:?}")]
    ForeignHost(String),
    /// The request came from a page of another origin.
    #[error("requests from origin {0:?} are not allowed")]
    ForeignOrigin(String),
}

/// The `Host`/`Origin` rules of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    loopback_only: bool,
    allowed: Vec<String>,
}

/// The host part of a `Host` header value or an origin's authority,
/// lowercased, without the port.
fn hostname(authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().map(|h| format!("[{h}]")).unwrap_or_default();
    }
    authority.split(':').next().unwrap_or_default().to_owned()
}

fn is_loopback_name(host: &str) -> bool {
    match host {
        "localhost" | "[::1]" => true,
        other => other.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
    }
}

impl OriginPolicy {
    /// The rules for a node listening on `listen`, with extra `allowed`
    /// origins (`scheme://host[:port]`).
    pub fn for_listener(listen: SocketAddr, allowed: Vec<String>) -> Self {
        let allowed = allowed.into_iter().map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase()).collect();
        OriginPolicy { loopback_only: listen.ip().is_loopback(), allowed }
    }

    /// Checks a request's `Host` and `Origin` header values.
    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), OriginError> {
        let host = host.unwrap_or_default().trim().to_ascii_lowercase();
        if self.loopback_only && !is_loopback_name(&hostname(&host)) {
            return Err(OriginError::ForeignHost(host));
        }
        let Some(origin) = origin.map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase()) else {
            return Ok(());
        };
        let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        let same_origin = authority.is_some_and(|a| !host.is_empty() && a == host);
        if same_origin || self.allowed.contains(&origin) {
            return Ok(());
        }
        Err(OriginError::ForeignOrigin(origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> OriginPolicy {
        OriginPolicy::for_listener("127.0.0.1:7070".parse().expect("addr"), vec!["https://studio.example.com".into()])
    }

    #[test]
    fn a_loopback_node_answers_only_loopback_names() {
        let policy = loopback();
        for host in ["localhost:7070", "127.0.0.1:7070", "127.0.0.2", "[::1]:7070", "LOCALHOST"] {
            assert_eq!(policy.check(Some(host), None), Ok(()), "{host}");
        }
        for host in ["evil.example.com", "evil.example.com:7070", "localhost.evil.com", "", "10.0.0.1:7070"] {
            assert!(matches!(policy.check(Some(host), None), Err(OriginError::ForeignHost(_))), "{host}");
        }
        assert!(policy.check(None, None).is_err(), "no Host at all");
    }

    #[test]
    fn only_the_requests_own_origin_or_an_allowed_one_passes() {
        let policy = loopback();
        assert_eq!(policy.check(Some("localhost:7070"), Some("http://localhost:7070")), Ok(()));
        assert_eq!(policy.check(Some("localhost:7070"), Some("https://studio.example.com/")), Ok(()));
        for origin in ["http://evil.example.com", "http://localhost:9999", "null", "http://localhost:7070.evil.com"] {
            assert!(
                matches!(policy.check(Some("localhost:7070"), Some(origin)), Err(OriginError::ForeignOrigin(_))),
                "{origin}"
            );
        }
        let public = OriginPolicy::for_listener("0.0.0.0:7070".parse().expect("addr"), Vec::new());
        assert_eq!(public.check(Some("nexus.example.com"), None), Ok(()), "any name on a public listener");
        assert_eq!(public.check(Some("nexus.example.com"), Some("https://nexus.example.com")), Ok(()));
        assert!(public.check(Some("nexus.example.com"), Some("https://evil.example.com")).is_err());
    }
}
