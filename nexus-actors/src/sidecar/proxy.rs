//! The sidecar's loopback HTTP endpoints: `POST /proxy` (the panel
//! publishes to the platform), `POST /progress` (the panel reports how far
//! a running call has come), `POST /reload` (re-read the manifest now),
//! `GET /healthz` and `GET /metrics`.
//!
//! `/proxy` publishes only on `nexus:panel:{id}:out:{channel}`: the body
//! names a sub-channel, never a Redis channel, so a panel cannot reach
//! anything outside its own namespace. `/progress` sends only to the caller
//! of a call this sidecar runs now, and only where that call answers. Bodies
//! are bounded, and publishing and reporting share one rate limit (token
//! bucket).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::inbound::Running;
use super::registration::{PanelState, Registrar};
use crate::bus::redis::Publisher;
use crate::envelope::Envelope;
use crate::kernel::{lock, Kernel};
use crate::platform::channels;
use crate::platform::http::{read_body, BodyError};
use crate::tools::protocol::ToolProgress;

/// Largest body `/proxy` accepts.
pub const MAX_PROXY_BODY: usize = 64 * 1024;
/// Largest body `/progress` accepts.
pub const MAX_PROGRESS_BODY: usize = 4 * 1024;
/// Longest progress `message`, in characters.
pub const MAX_PROGRESS_MESSAGE: usize = 1024;
/// The CloudEvents type of a panel message whose body names none.
pub const DEFAULT_MESSAGE_TYPE: &str = "nexus.panel.message";

fn is_valid_channel(channel: &str) -> bool {
    (1..=64).contains(&channel.len()) && channel.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_valid_type(kind: &str) -> bool {
    (1..=128).contains(&kind.len()) && kind.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
pub struct RateLimit {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `rate` tokens a second, at most `burst` saved up (each at least 1).
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimit { rate: f64::from(rate.max(1)), burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        let mut state = lock(&self.state);
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

/// What the endpoints share.
pub struct ProxyState {
    /// The sidecar's kernel (metrics).
    pub kernel: Kernel,
    /// The panel whose namespace it publishes in.
    pub panel_id: String,
    /// The bus.
    pub publish: Publisher,
    /// The publish rate limit.
    pub limit: RateLimit,
    /// The tool listing, for `/reload` and `/healthz`.
    pub registrar: Registrar,
    /// The calls running now, for `/progress`.
    pub running: Running,
}

#[derive(Deserialize)]
struct ProgressReport {
    call_id: String,
    progress: f64,
    #[serde(default)]
    total: Option<f64>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct PanelMessage {
    channel: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    data: Value,
}

/// Why `/proxy` refused a message: the `error` code of the answer and the
/// `reason` of `nexus_sidecar_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooLarge,
    BadBody,
    BadJson,
    BadChannel,
    BadType,
    RateLimited,
    BusUnavailable,
    BadProgress,
    UnknownCall,
}

impl Refusal {
    fn code(self) -> &'static str {
        match self {
            Refusal::TooLarge => "too_large",
            Refusal::BadBody => "bad_body",
            Refusal::BadJson => "bad_json",
            Refusal::BadChannel => "bad_channel",
            Refusal::BadType => "bad_type",
            Refusal::RateLimited => "rate_limited",
            Refusal::BusUnavailable => "bus_unavailable",
            Refusal::BadProgress => "bad_progress",
            Refusal::UnknownCall => "unknown_call",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BadBody | Refusal::BadJson | Refusal::BadChannel | Refusal::BadType | Refusal::BadProgress => {
                StatusCode::BAD_REQUEST
            }
            Refusal::UnknownCall => StatusCode::NOT_FOUND,
            Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BusUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

fn refuse(state: &ProxyState, why: Refusal, message: impl Into<String>) -> HttpResponse {
    let code = why.code();
    state.kernel.metrics().sidecar_refused.with_label_values(&[code]).inc();
    let message = message.into();
    tracing::info!(panel = %state.panel_id, reason = code, %message, "nexus_sidecar_refused_total");
    HttpResponse::build(why.status()).json(json!({ "error": code, "message": message }))
}

/// Registers the sidecar's endpoints.
pub fn configure(state: web::Data<ProxyState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state)
            .route("/proxy", web::post().to(proxy))
            .route("/progress", web::post().to(progress))
            .route("/reload", web::post().to(reload))
            .route("/healthz", web::get().to(healthz))
            .route("/metrics", web::get().to(metrics));
    }
}

/// The body, of at most `limit` bytes, as JSON of the shape `expected`
/// describes; else the refusal to answer.
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &ProxyState,
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    expected: &str,
) -> Result<T, HttpResponse> {
    let body = match read_body(req, payload, limit).await {
        Ok(body) => body,
        Err(e @ BodyError::TooLarge { .. }) => return Err(refuse(state, Refusal::TooLarge, e.to_string())),
        Err(e @ BodyError::Unreadable(_)) => return Err(refuse(state, Refusal::BadBody, e.to_string())),
    };
    serde_json::from_slice(&body).map_err(|e| refuse(state, Refusal::BadJson, format!("expected {expected}: {e}")))
}

async fn proxy(state: web::Data<ProxyState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let message: PanelMessage = match read_json(&state, &req, payload, MAX_PROXY_BODY, "{channel, type?, data}").await {
        Ok(message) => message,
        Err(refused) => return refused,
    };
    if !is_valid_channel(&message.channel) {
        let text = "channel must match ^[A-Za-z0-9_-]{1,64}$ (it names a sub-channel of the panel's own namespace)";
        return refuse(&state, Refusal::BadChannel, text);
    }
    let kind = message.kind.unwrap_or_else(|| DEFAULT_MESSAGE_TYPE.to_owned());
    if !is_valid_type(&kind) || (kind.starts_with("nexus.") && kind != DEFAULT_MESSAGE_TYPE) {
        let text = "type must match ^[A-Za-z0-9._-]{1,128}$ and not start with \"nexus.\" (the platform's own types)";
        return refuse(&state, Refusal::BadType, text);
    }
    if let Err(wait) = state.limit.take() {
        return rate_limited(&state, wait);
    }
    let channel = channels::panel_out(&state.panel_id, &message.channel);
    let envelope = Envelope::with_type(kind, format!("panel/{}", state.panel_id), message.data);
    let id = envelope.id.clone();
    match state.publish.publish(channel.clone(), envelope).await {
        Ok(_) => {
            state.kernel.metrics().sidecar_published.inc();
            HttpResponse::Accepted().json(json!({ "channel": channel, "id": id }))
        }
        Err(error) => refuse(&state, Refusal::BusUnavailable, error.to_string()),
    }
}

/// 429 with the seconds until the bucket has a token again.
fn rate_limited(state: &ProxyState, wait: Duration) -> HttpResponse {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = refuse(state, Refusal::RateLimited, "too many messages; slow down");
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(actix_web::http::header::RETRY_AFTER, value);
    }
    response
}

async fn progress(state: web::Data<ProxyState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let expected = "{call_id, progress, total?, message?}";
    let report: ProgressReport = match read_json(&state, &req, payload, MAX_PROGRESS_BODY, expected).await {
        Ok(report) => report,
        Err(refused) => return refused,
    };
    let finite = report.progress.is_finite() && report.total.is_none_or(f64::is_finite);
    if !finite || report.message.as_ref().is_some_and(|m| m.chars().count() > MAX_PROGRESS_MESSAGE) {
        let text =
            format!("progress and total must be finite numbers, message at most {MAX_PROGRESS_MESSAGE} characters");
        return refuse(&state, Refusal::BadProgress, text);
    }
    let Some(reply_to) = state.running.reply_to(&report.call_id) else {
        let text = "no such call is running here: it ended, ran out of time or was cancelled; stop its work";
        return refuse(&state, Refusal::UnknownCall, text);
    };
    if let Err(wait) = state.limit.take() {
        return rate_limited(&state, wait);
    }
    let ProgressReport { call_id, progress, total, message } = report;
    let envelope =
        Envelope::new(format!("panel/{}", state.panel_id), ToolProgress { call_id, progress, total, message });
    match state.publish.publish(reply_to, envelope.into_untyped()).await {
        Ok(_) => HttpResponse::Accepted().json(json!({})),
        Err(error) => refuse(&state, Refusal::BusUnavailable, error.to_string()),
    }
}

async fn reload(state: web::Data<ProxyState>) -> HttpResponse {
    match state.registrar.sync().await {
        PanelState::Up { tools } => HttpResponse::Ok().json(json!({ "tools": tools })),
        PanelState::Down { reason } => {
            HttpResponse::BadGateway().json(json!({ "error": "panel_down", "message": reason }))
        }
        PanelState::Invalid { reason } => {
            HttpResponse::UnprocessableEntity().json(json!({ "error": "invalid_manifest", "message": reason }))
        }
        PanelState::Unlisted { reason } => {
            HttpResponse::ServiceUnavailable().json(json!({ "error": "bus_unavailable", "message": reason }))
        }
        PanelState::Starting => HttpResponse::ServiceUnavailable().json(json!({ "error": "starting" })),
    }
}

async fn healthz(state: web::Data<ProxyState>) -> HttpResponse {
    let panel = match state.registrar.state() {
        PanelState::Up { tools } => json!({ "state": "up", "tools": tools }),
        PanelState::Down { reason } => json!({ "state": "down", "reason": reason }),
        PanelState::Invalid { reason } => json!({ "state": "invalid_manifest", "reason": reason }),
        PanelState::Unlisted { reason } => json!({ "state": "unlisted", "reason": reason }),
        PanelState::Starting => json!({ "state": "starting" }),
    };
    HttpResponse::Ok().json(json!({ "status": "ok", "panel_id": state.panel_id, "panel": panel }))
}

async fn metrics(state: web::Data<ProxyState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.kernel.render_metrics())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_cannot_leave_the_namespace() {
        assert!(is_valid_channel("notes"));
        assert!(is_valid_channel("a_b-9"));
        for bad in ["", "a:b", "*", "nexus:doc:1", "a b", "ü", &"a".repeat(65)] {
            assert!(!is_valid_channel(bad), "{bad:?}");
        }
        assert_eq!(channels::panel_out("p1", "notes"), "nexus:panel:p1:out:notes");
    }

    #[test]
    fn the_bucket_refuses_past_its_burst_and_refills() {
        let limit = RateLimit::new(1000, 3);
        assert!((0..3).all(|_| limit.take().is_ok()));
        let wait = limit.take().unwrap_err();
        assert!(wait <= Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(5));
        assert!(limit.take().is_ok());
    }
}
