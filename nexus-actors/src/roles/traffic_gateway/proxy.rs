//! The reverse proxy: hyper's HTTP/1.1 server in front of panel instances.
//!
//! `/p/<panel>/<rest>` goes to `http://<endpoint>/<rest>` (prefix stripped,
//! `X-Forwarded-*` set, hop-by-hop headers dropped), round-robin over the
//! route's endpoints, through one keep-alive pool. WebSocket upgrades are
//! passed through; an App scaled to zero goes to the [`Activator`], and so
//! does a request every instance of an App refused (scaled to zero under a
//! route this gateway had not yet seen change); a Studio user's heartbeat
//! goes to the instance's watchdog, with the instance's watchdog token.
//! Every request ends in exactly one outcome, counted in
//! `nexus_gateway_requests_total`.
//! Routes are read from the [`Routes`] snapshot, never through a mailbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use redis::aio::ConnectionManager;

use super::activator::{settled, Activator};
use super::metrics::GatewayMetrics;
use super::pages::{self, full};
use super::routes::Routes;
use super::GatewayConfig;
use crate::instance::{last_request_key, InstanceMode, PanelRoute};
use crate::kernel::lock;
use crate::platform::auth::{extract, Audience, Auth};
use crate::watchdog::TOKEN_HEADER;

/// What the gateway answers with.
pub type Body = BoxBody<Bytes, hyper::Error>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a panel's traffic signal is not written again.
const TOUCH_EVERY: Duration = Duration::from_secs(1);
/// How long an idle pooled connection to an instance is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long connecting to an instance may take before it counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a request needs, shared by all connections.
pub struct Shared {
    pub routes: Routes,
    pub activator: Arc<Activator>,
    pub traffic: Arc<Traffic>,
    pub client: Client<HttpConnector, OutBody>,
    pub auth: Auth,
    pub metrics: GatewayMetrics,
    pub config: GatewayConfig,
    round_robin: AtomicUsize,
}

impl Shared {
    pub fn new(
        routes: Routes,
        activator: Arc<Activator>,
        traffic: Arc<Traffic>,
        auth: Auth,
        metrics: GatewayMetrics,
        config: GatewayConfig,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Shared { routes, activator, traffic, client, auth, metrics, config, round_robin: AtomicUsize::new(0) }
    }
}

/// Writes `nexus:panel:{id}:last-request`, at most once per
/// [`TOUCH_EVERY`] per panel, so panel managers see traffic.
pub struct Traffic {
    redis: ConnectionManager,
    last: Mutex<HashMap<String, Instant>>,
    runtime: tokio::runtime::Handle,
    metrics: GatewayMetrics,
}

impl Traffic {
    pub fn new(redis: ConnectionManager, runtime: tokio::runtime::Handle, metrics: GatewayMetrics) -> Arc<Self> {
        Arc::new(Traffic { redis, last: Mutex::default(), runtime, metrics })
    }

    /// Records traffic for `panel` now, unless it was recorded lately.
    /// Returns when it was last recorded (now, or the recent time that
    /// made this call skip it).
    pub fn touch(&self, panel: &str) -> Instant {
        let now = Instant::now();
        {
            let mut last = lock(&self.last);
            match last.get_mut(panel) {
                Some(at) if now.duration_since(*at) < TOUCH_EVERY => return *at,
                Some(at) => *at = now,
                None => {
                    last.insert(panel.to_owned(), now);
                }
            }
        }
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let (mut conn, key, metrics) = (self.redis.clone(), last_request_key(panel), self.metrics.clone());
        let panel = panel.to_owned();
        // Spawned on the proxy's runtime by handle: a body may be dropped
        // after it stopped, and then the write is simply skipped.
        self.runtime.spawn(async move {
            let written: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg(ms).query_async(&mut conn).await;
            let outcome = if written.is_ok() { "ok" } else { "error" };
            metrics.last_request_writes.with_label_values(&[outcome]).inc();
            if let Err(error) = written {
                tracing::warn!(panel, %error, "nexus_gateway_last_request_writes_total");
            }
        });
        now
    }
}

/// Handles one request from `peer`. Never fails: every error is a page.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let html = pages::wants_html(req.headers());
    if header_bytes(&req) > shared.config.max_header_bytes {
        shared.metrics.request("headers_too_large", "");
        let message = format!("the request's headers are larger than {} bytes", shared.config.max_header_bytes);
        return pages::error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &message, html, None);
    }
    let path = req.uri().path();
    if path == "/healthz" {
        let body = serde_json::json!({ "status": "ok", "routes": shared.routes.snapshot().len() }).to_string();
        let mut response = Response::new(full(body));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }
    if let Some(panel) = path.strip_prefix("/heartbeat/").filter(|p| !p.is_empty() && !p.contains('/')) {
        let panel = panel.to_owned();
        return heartbeat(&shared, req, &panel).await;
    }
    let Some(rest) = path.strip_prefix("/p/") else {
        shared.metrics.request("not_found", "");
        return pages::error(StatusCode::NOT_FOUND, "nothing here; panels are under /p/<panel-id>/", html, None);
    };
    let (panel, tail) = match rest.find('/') {
        Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
        None => return redirect_to_slash(&shared, &req, rest, html),
    };
    let Some(route) = shared.routes.get(&panel).filter(|_| !panel.is_empty()) else {
        shared.metrics.request("not_found", &panel);
        return pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None);
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.config.max_body_bytes as u64) {
        return too_large(&shared, &panel, html);
    }
    if !route.endpoints.is_empty() {
        let request = Forward::new(&shared, req, &panel, &tail, peer);
        return forward(&shared, &route, request).await;
    }
    let retry = Some(shared.config.retry_after.as_secs().max(1));
    match (route.mode, route.activatable) {
        (InstanceMode::App, true) => {
            let request = Forward::new(&shared, req, &panel, &tail, peer);
            hold(&shared, request, Vec::new()).await
        }
        (InstanceMode::Studio, _) => {
            shared.metrics.request("unavailable", &panel);
            let message = "this Studio instance is not running; start it in Studio";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, retry)
        }
        (InstanceMode::App, false) => {
            shared.metrics.request("unavailable", &panel);
            let message = "this App has no running instance and no deployed version to start";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, retry)
        }
    }
}

/// Bytes of the request line and headers, roughly as sent.
fn header_bytes<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    line + req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>()
}

fn too_large(shared: &Shared, panel: &str, html: bool) -> Response<Body> {
    shared.metrics.request("too_large", panel);
    let message = format!("the request body is larger than {} bytes", shared.config.max_body_bytes);
    pages::error(StatusCode::PAYLOAD_TOO_LARGE, &message, html, None)
}

/// `/p/<panel>` → 308 to `/p/<panel>/`, so the panel's relative links work.
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
            shared.metrics.request("not_found", panel);
            pages::error(StatusCode::NOT_FOUND, "no panel here", html, None)
        }
    }
}

/// An App without a usable instance: hold `request` until its route names
/// an endpoint other than the `refused` ones, then send it, once.
async fn hold(shared: &Arc<Shared>, mut request: Forward, refused: Vec<String>) -> Response<Body> {
    let (panel, html) = (request.panel.clone(), request.html);
    let retry = Some(shared.config.retry_after.as_secs().max(1));
    let Some(slot) = shared.activator.admit(&panel, &refused) else {
        shared.metrics.request("queue_full", &panel);
        let message = "this App is starting and too many requests are waiting for it; try again shortly";
        return pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, retry);
    };
    let deadline = tokio::time::Instant::now() + shared.config.activation_deadline;
    match request.body.buffer().await {
        Ok(()) => {}
        Err(Unbuffered::TooLarge) => return too_large(shared, &panel, html),
        Err(Unbuffered::Client(error)) => {
            tracing::debug!(panel, %error, "client went away while its request was held");
            shared.metrics.request("client_error", &panel);
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
            shared.metrics.request("not_found", &panel);
            pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None)
        }
        Some(_) => {
            shared.metrics.request("activation_timeout", &panel);
            let message = "this App did not start in time; try again shortly";
            pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, retry)
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
}

impl Forward {
    /// Prepares `req` for `panel`'s instances; its body stays streamed
    /// until [`Outgoing::buffer`] reads it.
    fn new(shared: &Shared, req: Request<Incoming>, panel: &str, tail: &str, peer: SocketAddr) -> Self {
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
        let (hint, end) = (hyper::body::Body::size_hint(&body), hyper::body::Body::is_end_stream(&body));
        let (limit, over) = (shared.config.max_body_bytes, Arc::new(AtomicBool::new(false)));
        let body = Outgoing::Streamed { slot: Arc::new(Mutex::new(Some(body))), hint, end, limit, over };
        Forward { panel: panel.to_owned(), method: parts.method, path_and_query, headers, body, upgrade, html }
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
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    shared.metrics.request("bad_gateway", panel);
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
                shared.metrics.request("bad_gateway", &panel);
                return Ok(pages::error(StatusCode::BAD_GATEWAY, "the panel's instance has a bad address", html, None));
            }
        };
        let mut upstream = Request::new(request.body.body());
        *upstream.method_mut() = request.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = request.headers.clone();
        match tokio::time::timeout(shared.config.upstream_timeout, shared.client.request(upstream)).await {
            Err(_) => {
                shared.metrics.request("timeout", &panel);
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
                shared.metrics.request("bad_gateway", &panel);
                let message = "the panel's instance closed the connection without a valid answer";
                return Ok(pages::error(StatusCode::BAD_GATEWAY, message, html, None));
            }
            Ok(Ok(response)) => break response,
        }
    };
    shared.metrics.request("proxied", &panel);
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
    let body = Tracked { inner: body, traffic: shared.traffic.clone(), panel, touched };
    Ok(Response::from_parts(parts, body.boxed()))
}

fn error_chain(error: &dyn std::error::Error) -> String {
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

/// The body of an instance's answer; its frames and its end count as
/// traffic, so a long download keeps the panel awake.
struct Tracked {
    inner: Incoming,
    traffic: Arc<Traffic>,
    panel: String,
    /// When the panel's traffic was last recorded, as this body knows it.
    /// [`Traffic::touch`] skips any call within [`TOUCH_EVERY`] of that;
    /// checking here first keeps its shared lock off every frame.
    touched: Instant,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            let now = Instant::now();
            if now.duration_since(self.touched) >= TOUCH_EVERY {
                self.touched = self.traffic.touch(&self.panel);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that can be offered to a second endpoint as long as the
/// first never read it.
pub enum Outgoing {
    Buffered(Bytes),
    Streamed { slot: Arc<Mutex<Option<Incoming>>>, hint: SizeHint, end: bool, limit: usize, over: Arc<AtomicBool> },
}

impl Outgoing {
    fn body(&self) -> OutBody {
        match self {
            Outgoing::Buffered(bytes) => OutBody::Bytes((!bytes.is_empty()).then(|| bytes.clone())),
            Outgoing::Streamed { slot, hint, end, limit, over } => OutBody::Stream {
                slot: slot.clone(),
                taken: None,
                hint: *hint,
                end: *end,
                seen: 0,
                limit: *limit,
                over: over.clone(),
            },
        }
    }

    /// Reads a streamed body whole, so that it can wait for an instance
    /// and be sent later. Fails when it is over the limit, when the client
    /// fails to send it, or when an attempt already read part of it.
    async fn buffer(&mut self) -> Result<(), Unbuffered> {
        let Outgoing::Streamed { slot, limit, .. } = self else { return Ok(()) };
        let Some(incoming) = lock(slot).take() else { return Err(Unbuffered::Consumed) };
        let bytes = match Limited::new(incoming, *limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(Unbuffered::TooLarge)
            }
            Err(error) => return Err(Unbuffered::Client(error)),
        };
        *self = Outgoing::Buffered(bytes);
        Ok(())
    }

    /// Whether the client sent more than the body limit.
    fn over_limit(&self) -> bool {
        matches!(self, Outgoing::Streamed { over, .. } if over.load(Ordering::Relaxed))
    }
}

/// Why a request body could not be held.
#[derive(Debug, thiserror::Error)]
enum Unbuffered {
    #[error("the request body is over the limit")]
    TooLarge,
    #[error("reading the request body: {0}")]
    Client(BoxError),
    #[error("the request body was already partly sent")]
    Consumed,
}

/// The request body as the upstream client sends it.
pub enum OutBody {
    Bytes(Option<Bytes>),
    Stream {
        slot: Arc<Mutex<Option<Incoming>>>,
        taken: Option<Incoming>,
        hint: SizeHint,
        end: bool,
        seen: usize,
        limit: usize,
        over: Arc<AtomicBool>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
struct BodyTooLarge {
    limit: usize,
}

impl hyper::body::Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            OutBody::Bytes(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream { slot, taken, seen, limit, over, .. } => {
                if taken.is_none() {
                    *taken = lock(slot).take();
                }
                let Some(body) = taken.as_mut() else { return Poll::Ready(None) };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *seen += frame.data_ref().map_or(0, |d| d.len());
                        if *seen > *limit {
                            over.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: *limit }))));
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Bytes(bytes) => bytes.is_none(),
            OutBody::Stream { end, .. } => *end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Bytes(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Stream { hint, .. } => *hint,
        }
    }
}

/// `POST /heartbeat/<panel>` from the Studio UI (another origin): checked
/// against the panel's owner, then passed to the instance's watchdog.
async fn heartbeat(shared: &Arc<Shared>, req: Request<Incoming>, panel: &str) -> Response<Body> {
    let mut response = heartbeat_answer(shared, req, panel).await;
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

async fn heartbeat_answer(shared: &Arc<Shared>, req: Request<Incoming>, panel: &str) -> Response<Body> {
    let html = false;
    if req.method() == Method::OPTIONS {
        let mut response = Response::new(full(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return response;
    }
    if req.method() != Method::POST {
        let mut response = pages::error(StatusCode::METHOD_NOT_ALLOWED, "heartbeats are POSTed", html, None);
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        return response;
    }
    let token = extract::bearer(req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    let verified = match token {
        Some(token) => shared.auth.verify(token, &Audience::Api).await.ok(),
        None => None,
    };
    let Some(user) = verified.map(|identity| identity.user) else {
        shared.metrics.request("unauthorized", panel);
        return pages::error(StatusCode::UNAUTHORIZED, "a valid bearer token is required", html, None);
    };
    let Some(route) = shared.routes.get(panel) else {
        shared.metrics.request("not_found", panel);
        return pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None);
    };
    if route.owner != user {
        shared.metrics.request("forbidden", panel);
        return pages::error(StatusCode::FORBIDDEN, "this panel belongs to someone else", html, None);
    }
    let Some((watchdog, secret)) =
        route.endpoints.iter().find_map(|e| Some((e.watchdog.as_deref()?, e.watchdog_token.as_deref())))
    else {
        shared.metrics.request("not_found", panel);
        return pages::error(StatusCode::NOT_FOUND, "this panel has no running Studio instance", html, None);
    };
    let Ok(uri) = format!("http://{watchdog}/heartbeat").parse::<Uri>() else {
        shared.metrics.request("bad_gateway", panel);
        return pages::error(StatusCode::BAD_GATEWAY, "the instance's watchdog has a bad address", html, None);
    };
    let mut upstream = Request::new(OutBody::Bytes(None));
    *upstream.method_mut() = Method::POST;
    *upstream.uri_mut() = uri;
    // Only the gateway knows the secret, so only heartbeats through it (from
    // the owner) count, not the panel code's own on its loopback.
    match secret.map(HeaderValue::from_str) {
        Some(Ok(mut value)) => {
            value.set_sensitive(true);
            upstream.headers_mut().insert(TOKEN_HEADER, value);
        }
        Some(Err(_)) => tracing::warn!(panel, "the route's watchdog token is not a header value; sent without it"),
        None => {}
    }
    match tokio::time::timeout(shared.config.upstream_timeout, shared.client.request(upstream)).await {
        Ok(Ok(answer)) => {
            shared.metrics.request("heartbeat", panel);
            let (mut parts, body) = answer.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Ok(Err(error)) => {
            tracing::info!(panel, error = %error_chain(&error), "watchdog failed");
            shared.metrics.request("bad_gateway", panel);
            pages::error(StatusCode::BAD_GATEWAY, "the instance's watchdog did not answer", html, None)
        }
        Err(_) => {
            shared.metrics.request("timeout", panel);
            pages::error(StatusCode::GATEWAY_TIMEOUT, "the instance's watchdog did not answer in time", html, None)
        }
    }
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
