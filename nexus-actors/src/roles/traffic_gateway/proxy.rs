//! The reverse proxy: hyper's HTTP/1.1 server in front of panel instances.
//!
//! `/p/<panel>/<rest>` goes to `http://<endpoint>/<rest>` (prefix stripped,
//! `X-Forwarded-*` set, hop-by-hop headers and the gateway's credentials
//! dropped), round-robin over the route's endpoints, through one
//! keep-alive pool. In order, and before anything happens on its behalf, a
//! request is refused when it names the panel's tool interface
//! ([`paths`]), when the panel is unknown, or when it may not open the
//! panel ([`access`]). WebSocket upgrades are passed through; an App
//! scaled to zero goes to the [`Activator`], and so does a request every
//! instance of an App refused (scaled to zero under a route this gateway
//! had not yet seen change). Every request ends in exactly one outcome,
//! counted in `nexus_gateway_requests_total`. Routes are read from the
//! [`Routes`] snapshot, never through a mailbox.
//!
//! [`paths`]: super::paths
//! [`access`]: super::access

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::access::{strip_credentials, Denied, Gatekeeper, Granted, PUBLIC_APP_CSP};
use super::activator::{settled, Activator};
use super::body::{full, Body, OutBody, Outgoing, Tracked, Unbuffered};
use super::cookies::scope_set_cookies;
use super::metrics::{GatewayMetrics, RequestOutcome};
use super::pages;
use super::paths::is_tool_path;
use super::routes::Routes;
use super::traffic::Traffic;
use super::GatewayConfig;
use crate::instance::{InstanceMode, PanelRoute};
use crate::platform::Auth;

/// How long an idle pooled connection to an instance is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long connecting to an instance may take before it counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    static CLIENT: std::cell::OnceCell<Client<HttpConnector, OutBody>> = const { std::cell::OnceCell::new() };
}

/// Everything a request needs, shared by all connections.
pub(crate) struct Shared {
    pub(crate) routes: Routes,
    pub(crate) activator: Arc<Activator>,
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) gatekeeper: Gatekeeper,
    /// Checks heartbeats' API tokens.
    pub(crate) auth: Auth,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) config: GatewayConfig,
    round_robin: AtomicUsize,
}

impl Shared {
    /// The parts.
    pub(crate) fn new(
        routes: Routes,
        activator: Arc<Activator>,
        traffic: Arc<Traffic>,
        gatekeeper: Gatekeeper,
        auth: Auth,
        metrics: GatewayMetrics,
        config: GatewayConfig,
    ) -> Self {
        Shared { routes, activator, traffic, gatekeeper, auth, metrics, config, round_robin: AtomicUsize::new(0) }
    }

    /// This thread's pool of connections to instances. Each gateway thread
    /// has its own: a pooled connection is driven by the runtime that
    /// opened it, so sharing one pool would hand requests between threads.
    pub(crate) fn client(&self) -> Client<HttpConnector, OutBody> {
        CLIENT.with(|client| {
            client
                .get_or_init(|| {
                    let mut connector = HttpConnector::new();
                    connector.set_nodelay(true);
                    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
                    Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(POOL_IDLE)
                        .pool_timer(TokioTimer::new())
                        .build(connector)
                })
                .clone()
        })
    }

    /// The `Retry-After` of 503 answers, in seconds.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        Some(self.config.retry_after.as_secs().max(1))
    }
}

/// Handles a request for `/p/<rest>`. Never fails: every error is a page.
pub(crate) async fn panel_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    rest: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let html = pages::wants_html(req.headers());
    let (panel, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => return redirect_to_slash(shared, &req, rest, html),
    };
    if is_tool_path(tail) {
        shared.metrics.request(RequestOutcome::ToolPath, panel);
        let message = "a panel's tool interface (/mcp, /manifest) is reached only by its sidecar; \
                       call its tools through the Nexus tool API (/api/tools, /mcp on the node)";
        return pages::error(StatusCode::NOT_FOUND, message, html, None);
    }
    let Some(route) = shared.routes.get(panel).filter(|_| !panel.is_empty()) else {
        shared.metrics.request(RequestOutcome::NotFound, panel);
        return pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None);
    };
    let granted = match shared.gatekeeper.check(&route, req.headers()).await {
        Ok(granted) => granted,
        Err(denied) => return denied_page(shared, panel, &denied, html),
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.config.max_body_bytes as u64) {
        return too_large(shared, panel, html);
    }
    if !route.endpoints.is_empty() {
        let request = Forward::new(shared, req, panel, tail, peer, granted);
        return forward(shared, &route, request).await;
    }
    match (route.mode, route.activatable) {
        (InstanceMode::App, true) => {
            let request = Forward::new(shared, req, panel, tail, peer, granted);
            hold(shared, request, Vec::new()).await
        }
        (InstanceMode::Studio, _) => {
            shared.metrics.request(RequestOutcome::Unavailable, panel);
            let message = "this Studio instance is not running; start it in Studio";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, shared.retry_after())
        }
        (InstanceMode::App, false) => {
            shared.metrics.request(RequestOutcome::Unavailable, panel);
            let message = "this App has no running instance and no deployed version to start";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, shared.retry_after())
        }
    }
}

/// The answer to a request [`Gatekeeper::check`] refused.
fn denied_page(shared: &Shared, panel: &str, denied: &Denied, html: bool) -> Response<Body> {
    let message = denied.to_string();
    match denied {
        Denied::NotFound(_) => {
            shared.metrics.request(RequestOutcome::NotFound, panel);
            pages::error(StatusCode::NOT_FOUND, &message, html, None)
        }
        Denied::Unauthorized => {
            shared.metrics.request(RequestOutcome::Unauthorized, panel);
            let mut response = pages::error(StatusCode::UNAUTHORIZED, &message, html, None);
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        Denied::Forbidden => {
            shared.metrics.request(RequestOutcome::Forbidden, panel);
            pages::error(StatusCode::FORBIDDEN, &message, html, None)
        }
        Denied::Unavailable(error) => {
            tracing::warn!(panel, %error, "panel access could not be checked");
            shared.metrics.request(RequestOutcome::Unavailable, panel);
            pages::error(StatusCode::SERVICE_UNAVAILABLE, &message, html, shared.retry_after())
        }
    }
}

fn too_large(shared: &Shared, panel: &str, html: bool) -> Response<Body> {
    shared.metrics.request(RequestOutcome::TooLarge, panel);
    let message = format!("the request body is larger than {} bytes", shared.config.max_body_bytes);
    pages::error(StatusCode::PAYLOAD_TOO_LARGE, &message, html, None)
}

/// `/p/<panel>` → 308 to `/p/<panel>/`, so the panel's relative links work
/// (and its cookie, scoped to `/p/<panel>/`, is sent).
fn redirect_to_slash(shared: &Shared, req: &Request<Incoming>, panel: &str, html: bool) -> Response<Body> {
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    match HeaderValue::from_str(&format!("/p/{panel}/{query}")) {
        Ok(location) if !panel.is_empty() => {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        _ => {
            shared.metrics.request(RequestOutcome::NotFound, panel);
            pages::error(StatusCode::NOT_FOUND, "no panel here", html, None)
        }
    }
}

/// An App without a usable instance: hold `request` until its route names
/// an endpoint other than the `refused` ones, then send it, once.
async fn hold(shared: &Arc<Shared>, mut request: Forward, refused: Vec<String>) -> Response<Body> {
    let (panel, html) = (request.panel.clone(), request.html);
    let Some(slot) = shared.activator.admit(&panel, &refused) else {
        shared.metrics.request(RequestOutcome::QueueFull, &panel);
        let message = "this App is starting and too many requests are waiting for it; try again shortly";
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, shared.retry_after());
    };
    let deadline = tokio::time::Instant::now() + shared.config.activation_deadline;
    match request.body.buffer().await {
        Ok(()) => {}
        Err(Unbuffered::TooLarge) => return too_large(shared, &panel, html),
        Err(Unbuffered::Client(error)) => {
            tracing::debug!(panel, %error, "client went away while its request was held");
            shared.metrics.request(RequestOutcome::ClientError, &panel);
            return pages::error(StatusCode::BAD_REQUEST, "the request body could not be read", html, None);
        }
        Err(Unbuffered::Consumed) => return refused_page(shared, &panel, html),
    }
    let route = shared.routes.await_route(&panel, deadline, |r| settled(r, &refused)).await;
    drop(slot);
    match route {
        Some(route) if !route.endpoints.is_empty() && settled(Some(&route), &refused) => {
            match send(shared, &route, &mut request).await {
                Ok(response) => response,
                Err(_) => refused_page(shared, &panel, html),
            }
        }
        None => {
            shared.metrics.request(RequestOutcome::NotFound, &panel);
            pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None)
        }
        Some(_) => {
            shared.metrics.request(RequestOutcome::ActivationTimeout, &panel);
            let message = "this App did not start in time; try again shortly";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, shared.retry_after())
        }
    }
}

/// A request on its way to an instance.
struct Forward {
    panel: String,
    method: Method,
    /// `/<rest>?<query>`: the path without the panel prefix.
    path_and_query: String,
    headers: HeaderMap,
    body: Outgoing,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    html: bool,
    /// Served as a public App: its answers carry [`PUBLIC_APP_CSP`].
    public: bool,
}

impl Forward {
    /// Prepares `req` for `panel`'s instances, as `granted`; its body
    /// stays streamed until [`Outgoing::buffer`] reads it.
    fn new(
        shared: &Shared,
        req: Request<Incoming>,
        panel: &str,
        tail: &str,
        peer: SocketAddr,
        granted: Granted,
    ) -> Self {
        let (mut parts, body) = req.into_parts();
        let html = pages::wants_html(&parts.headers);
        let upgrade = match is_upgrade(&parts.headers) {
            true => parts.extensions.remove::<hyper::upgrade::OnUpgrade>().map(|on| {
                let protocol = parts.headers.get(header::UPGRADE).cloned();
                (on, protocol)
            }),
            false => None,
        };
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{tail}?{q}"),
            None => tail.to_owned(),
        };
        let mut headers = parts.headers;
        let host = headers
            .remove(header::HOST)
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        strip_hop_by_hop(&mut headers);
        strip_credentials(&mut headers, granted);
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }
        if let Some(host) = host {
            headers.insert("x-forwarded-host", host);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        if let Ok(prefix) = HeaderValue::from_str(&format!("/p/{panel}")) {
            headers.insert("x-forwarded-prefix", prefix);
        }
        let upgrade = upgrade.map(|(on, protocol)| {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = protocol {
                headers.insert(header::UPGRADE, protocol);
            }
            on
        });
        let body = Outgoing::streamed(body, shared.config.max_body_bytes);
        Forward {
            panel: panel.to_owned(),
            method: parts.method,
            path_and_query,
            headers,
            body,
            upgrade,
            html,
            public: granted.public,
        }
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && headers.contains_key(header::UPGRADE)
}

/// Drops the headers that belong to one connection, not to the message.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Sends `request` to one of `route`'s endpoints. When every endpoint
/// refuses the connection (nothing was sent) and the route is an
/// activatable App, its instance was most likely scaled to zero under this
/// gateway's route: the request is held for a new instance, like a cold
/// start, instead of failing.
async fn forward(shared: &Arc<Shared>, route: &PanelRoute, mut request: Forward) -> Response<Body> {
    let refused = match send(shared, route, &mut request).await {
        Ok(response) => return response,
        Err(refused) => refused,
    };
    if route.mode != InstanceMode::App || !route.activatable {
        return refused_page(shared, &request.panel, request.html);
    }
    shared.metrics.reactivations.inc();
    tracing::info!(panel = %request.panel, ?refused, "nexus_gateway_reactivations_total");
    hold(shared, request, refused).await
}

fn refused_page(shared: &Shared, panel: &str, html: bool) -> Response<Body> {
    shared.metrics.request(RequestOutcome::BadGateway, panel);
    pages::error(StatusCode::BAD_GATEWAY, "the panel's instance refused the connection", html, None)
}

/// Sends `request` to one of `route`'s endpoints, round-robin, moving on
/// to the next while connections are refused (nothing was sent, so each
/// endpoint is tried at most once). Gives back the refused addresses when
/// every endpoint refused; any other outcome is the answer.
async fn send(shared: &Arc<Shared>, route: &PanelRoute, request: &mut Forward) -> Result<Response<Body>, Vec<String>> {
    let panel = request.panel.clone();
    let html = request.html;
    let touched = shared.traffic.touch(&panel);
    let endpoints = &route.endpoints;
    let first = shared.round_robin.fetch_add(1, Ordering::Relaxed);
    let mut refused = Vec::new();
    let response = loop {
        if refused.len() == endpoints.len() {
            return Err(refused);
        }
        let endpoint = &endpoints[(first + refused.len()) % endpoints.len()];
        let uri = match format!("http://{}{}", endpoint.addr, request.path_and_query).parse::<Uri>() {
            Ok(uri) => uri,
            Err(error) => {
                tracing::warn!(panel, addr = %endpoint.addr, %error, "route has an unusable endpoint address");
                shared.metrics.request(RequestOutcome::BadGateway, &panel);
                return Ok(pages::error(StatusCode::BAD_GATEWAY, "the panel's instance has a bad address", html, None));
            }
        };
        let mut upstream = Request::new(request.body.body());
        *upstream.method_mut() = request.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = request.headers.clone();
        match tokio::time::timeout(shared.config.upstream_timeout, shared.client().request(upstream)).await {
            Err(_) => {
                shared.metrics.request(RequestOutcome::Timeout, &panel);
                let message = format!(
                    "the panel's instance did not answer within {} s",
                    shared.config.upstream_timeout.as_secs_f64()
                );
                return Ok(pages::error(StatusCode::GATEWAY_TIMEOUT, &message, html, None));
            }
            Ok(Err(error)) if error.is_connect() => {
                tracing::info!(panel, addr = %endpoint.addr, error = %error_chain(&error), "instance refused");
                refused.push(endpoint.addr.clone());
            }
            Ok(Err(error)) => {
                if request.body.over_limit() {
                    return Ok(too_large(shared, &panel, html));
                }
                tracing::info!(panel, addr = %endpoint.addr, error = %error_chain(&error), "instance failed");
                shared.metrics.request(RequestOutcome::BadGateway, &panel);
                let message = "the panel's instance closed the connection without a valid answer";
                return Ok(pages::error(StatusCode::BAD_GATEWAY, message, html, None));
            }
            Ok(Ok(response)) => break response,
        }
    };
    shared.metrics.request(RequestOutcome::Proxied, &panel);
    let mut response = response;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_side)) = (switching, request.upgrade.take()) {
        let instance_side = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_side, instance_side, shared.traffic.clone(), panel.clone()));
    }
    let (mut parts, body) = response.into_parts();
    if !switching {
        strip_hop_by_hop(&mut parts.headers);
    }
    scope_set_cookies(&mut parts.headers, &panel);
    if request.public {
        // Appended: a policy the App sends itself is enforced as well.
        parts.headers.append(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PUBLIC_APP_CSP));
    }
    let body = Tracked::new(body, shared.traffic.clone(), panel, touched);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// An error with its causes, `outer: inner: innermost`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Copies bytes both ways between an upgraded client and instance
/// connection, recording traffic while it lasts and when it ends.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    instance: hyper::upgrade::OnUpgrade,
    traffic: Arc<Traffic>,
    panel: String,
) {
    let (client, instance) = match tokio::try_join!(client, instance) {
        Ok(both) => both,
        Err(error) => {
            tracing::info!(panel, %error, "upgrade failed");
            return;
        }
    };
    let (mut client, mut instance) = (TokioIo::new(client), TokioIo::new(instance));
    let copy = tokio::io::copy_bidirectional(&mut client, &mut instance);
    tokio::pin!(copy);
    // A long WebSocket is traffic: keep the App from being scaled to zero.
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut copy => break,
            _ = tick.tick() => {
                traffic.touch(&panel);
            }
        }
    }
    traffic.touch(&panel);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
