//! The Studio web UI: static files built into the binary and served at
//! `/`. The page's own modules are plain files; the code editor
//! (`/static/editor.js`, CodeMirror 6) is a bundle `build.rs` makes with
//! esbuild from `nexus-actors/ui-editor/`, loaded only when a panel's code
//! is opened. The browser talks to `/api` and `/ws` like any other client
//! and holds no privileges of its own.
//!
//! Every answer forbids framing (`frame-ancestors 'none'`, `X-Frame-Options:
//! DENY`), so no other page can lay the Studio under its own and trick a
//! logged-in user into clicking. The Content Security Policy lets the page
//! load only its own scripts and styles, talk to its own node (`/api`,
//! `/ws`) and to the traffic gateway, and frame only the gateway, where
//! panels are opened.

use actix_web::{web, HttpRequest, HttpResponse};

use super::TmState;

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const CONTEXTS: &str = include_str!("ui/contexts.js");
const GRAPH: &str = include_str!("ui/graph.js");
const STYLE: &str = include_str!("ui/style.css");
const WORKSPACE: &str = include_str!("ui/workspace.js");
const EDITOR: &str = include_str!(concat!(env!("OUT_DIR"), "/editor.js"));

/// Registers `/`, `/static/app.js`, the modules it imports
/// (`/static/contexts.js`: the Contexts view; `/static/graph.js`: the
/// mailbox graph; `/static/workspace.js`: the panels' code;
/// `/static/editor.js`: the editor bundle) and
/// `/static/style.css`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    const JS: &str = "text/javascript; charset=utf-8";
    cfg.route("/", web::get().to(|req: HttpRequest| async move { asset(&req, INDEX, "text/html; charset=utf-8") }))
        .route("/static/app.js", web::get().to(|req: HttpRequest| async move { asset(&req, APP, JS) }))
        .route("/static/contexts.js", web::get().to(|req: HttpRequest| async move { asset(&req, CONTEXTS, JS) }))
        .route("/static/graph.js", web::get().to(|req: HttpRequest| async move { asset(&req, GRAPH, JS) }))
        .route("/static/workspace.js", web::get().to(|req: HttpRequest| async move { asset(&req, WORKSPACE, JS) }))
        .route("/static/editor.js", web::get().to(|req: HttpRequest| async move { asset(&req, EDITOR, JS) }))
        .route(
            "/static/style.css",
            web::get().to(|req: HttpRequest| async move { asset(&req, STYLE, "text/css; charset=utf-8") }),
        );
}

fn asset(req: &HttpRequest, body: &'static str, content_type: &'static str) -> HttpResponse {
    let gateway = req.app_data::<web::Data<TmState>>().and_then(|state| state.ui.gateway_url.clone());
    let page_host = req.connection_info().host().to_owned();
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Content-Security-Policy", policy(gateway.as_deref(), &page_host)))
        .body(body)
}

/// The page's Content Security Policy. `page_host` is the `Host` the page
/// was asked for (`host[:port]`); `gateway` the gateway's URL as the node
/// tells the UI.
fn policy(gateway: Option<&str>, page_host: &str) -> String {
    let mut sockets = String::new();
    if is_host(page_host) {
        sockets = format!(" ws://{page_host} wss://{page_host}");
    }
    let gateways = gateway.map(|g| gateway_origins(g, page_host).join(" ")).unwrap_or_default();
    let frames = if gateways.is_empty() { "'none'".to_owned() } else { gateways.clone() };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{sockets} {gateways}; frame-src {frames}; form-action 'self'; base-uri 'none'; \
         object-src 'none'; frame-ancestors 'none'"
    )
}

/// The origins the UI reaches the gateway at: the configured one and,
/// when the gateway and the page are both on loopback under different
/// names (`localhost` and `127.0.0.1`), the gateway under the page's name,
/// which the UI uses so the panel cookie (host-scoped) reaches it.
fn gateway_origins(gateway: &str, page_host: &str) -> Vec<String> {
    let Ok(uri) = gateway.parse::<http::Uri>() else { return Vec::new() };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else { return Vec::new() };
    if !is_host(host) {
        return Vec::new();
    }
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    let mut origins = vec![format!("{scheme}://{host}{port}")];
    let page_name = page_host.rsplit_once(':').map_or(page_host, |(name, port)| match port.ends_with(']') {
        true => page_host,
        false => name,
    });
    if is_host(page_name) && is_loopback(host) && is_loopback(page_name) && page_name != host {
        origins.push(format!("{scheme}://{page_name}{port}"));
    }
    origins
}

/// Whether `host` (a name, an IP or `[v6]`, with an optional port) can go
/// into the policy as it is: nothing that could end a source or a directive.
fn is_host(host: &str) -> bool {
    !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_frames_only_the_gateway_and_nobody_frames_the_studio() {
        let csp = policy(Some("http://127.0.0.1:7071"), "127.0.0.1:7070");
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("frame-src http://127.0.0.1:7071;"));
        assert!(csp.contains("connect-src 'self' ws://127.0.0.1:7070 wss://127.0.0.1:7070 http://127.0.0.1:7071;"));
        assert!(csp.contains("script-src 'self';"));
        // The page on localhost reaches the gateway as localhost too.
        let csp = policy(Some("http://127.0.0.1:7071"), "localhost:7070");
        assert!(csp.contains("frame-src http://127.0.0.1:7071 http://localhost:7071;"), "{csp}");
        // No gateway: nothing to frame.
        assert!(policy(None, "studio.example").contains("frame-src 'none';"));
    }

    #[test]
    fn hosts_that_could_break_the_policy_are_left_out() {
        let csp = policy(Some("http://gw.example"), "evil; script-src *");
        assert!(!csp.contains("evil"));
        assert!(csp.contains("frame-src http://gw.example;"));
        assert!(policy(Some("not a url"), "h").contains("frame-src 'none';"));
    }
}
