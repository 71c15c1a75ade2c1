//! The gateway's own answers: clear error pages, HTML for browsers and
//! JSON (`{"error": code, "message": ...}`) for everything else. It only
//! renders; deciding which answer fits is the proxy's job.

use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use super::body::{full, Body};

/// Whether the client asked for HTML (a browser navigating).
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers.get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/html"))
}

/// The stable `error` code of a status, as the API's: `not_found`,
/// `bad_gateway`, `service_unavailable`, `gateway_timeout`, ….
fn code(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("error").to_ascii_lowercase().replace([' ', '-'], "_")
}

/// An error answer. `retry_after` (seconds) goes out as `Retry-After`.
pub(crate) fn error(status: StatusCode, message: &str, html: bool, retry_after: Option<u64>) -> Response<Body> {
    let (content_type, body) = if html {
        ("text/html; charset=utf-8", html_page(status, message))
    } else {
        let json = serde_json::json!({ "error": code(status), "message": message });
        ("application/json", json.to_string())
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(seconds) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn html_page(status: StatusCode, message: &str) -> String {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = escape(message);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{code} {reason}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:4rem auto;max-width:40rem;color:#222}}\
         h1{{font-size:1.4rem}}p{{color:#555}}</style></head>\n\
         <body><h1>{code} {reason}</h1><p>{message}</p><p><small>Nexus traffic gateway</small></p></body></html>\n"
    )
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_and_json_carries_the_code() {
        let page = html_page(StatusCode::NOT_FOUND, "no panel <script>");
        assert!(page.contains("404 Not Found"));
        assert!(page.contains("no panel &lt;script&gt;"));
        let r = error(StatusCode::SERVICE_UNAVAILABLE, "later", false, Some(5));
        assert_eq!(r.headers()[RETRY_AFTER], "5");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn accept_decides_html() {
        let mut h = HeaderMap::new();
        assert!(!wants_html(&h));
        h.insert(ACCEPT, HeaderValue::from_static("text/html,application/xhtml+xml"));
        assert!(wants_html(&h));
    }
}
