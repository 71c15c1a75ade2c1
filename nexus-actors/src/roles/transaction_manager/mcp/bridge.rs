//! The bridge from actix-web to rmcp's tower services: `/mcp`'s handler
//! checks `Host` and `Origin`, authenticates, checks a session is the
//! caller's, routes the request to the stateless service or the sessions'
//! one, and streams the answer back (a session's through its relay).
//!
//! This module owns HTTP: it reads nothing of MCP but the few fields it
//! routes by (a request's id, `initialize`, `notifications/cancelled`).

use std::convert::Infallible;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use rmcp::model::RequestId;
use serde_json::Value;
use tower_service::Service as _;

use super::subscriptions::Credentials;
use super::{call_label, Endpoints, McpUser, Sessions, MAX_BODY};
use crate::platform::auth::extract::{authenticate, bearer};
use crate::platform::auth::Auth;
use crate::platform::http::{read_body, BodyError};
use crate::platform::origin::OriginPolicy;
use crate::platform::ApiError;
use crate::roles::transaction_manager::tools_api::ToolsApi;

/// The actix-web handler: checks `Host` and `Origin`, authenticates, checks
/// the session is the caller's, hands the request to rmcp, and streams its
/// answer back.
pub(super) async fn serve(
    req: HttpRequest,
    payload: web::Payload,
    endpoints: web::Data<Endpoints>,
    sessions: web::Data<Sessions>,
    policy: web::Data<OriginPolicy>,
    tools: web::Data<ToolsApi>,
) -> Result<HttpResponse, ApiError> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    policy.check(header(actix_web::http::header::HOST), header(actix_web::http::header::ORIGIN))?;
    let caller = authenticate(&req).await?;
    // A listen checks its token again while it lasts.
    let credentials = req.app_data::<web::Data<Auth>>().and_then(|auth| {
        let token = bearer(req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok())?;
        Some(Credentials { user: caller.user.clone(), token: token.to_owned(), auth: auth.get_ref().clone() })
    });
    let body = read_body(&req, payload, MAX_BODY).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => ApiError::BodyTooLarge { limit },
        BodyError::Unreadable(e) => ApiError::BadRequest(format!("reading the body: {e}")),
    })?;
    let session = req.headers().get(SESSION_HEADER).map(|id| id.to_str().unwrap_or_default().to_owned());
    let reservation = match &session {
        // Before rmcp hears of it: someone else's session is unknown.
        Some(id) => {
            sessions.check(id, &caller.user, credentials.clone())?;
            None
        }
        None if req.method() == actix_web::http::Method::POST && is_initialize(&body) => {
            sessions.reserve(&caller.user)?
        }
        None => None,
    };
    // Without a session, rmcp drops notifications; this one is ours. The
    // call may run on another node, which the registry finds. A session
    // cancels its own requests.
    if let Some(label) = session.is_none().then(|| cancelled_request(&body)).flatten() {
        match tools.cancel(&caller.user, &label).await {
            Ok(stopped) => tracing::debug!(user = %caller.user, stopped, "notifications/cancelled"),
            Err(error) => tracing::warn!(%error, "could not cancel a tool call"),
        }
    }
    let stateful = session.is_some() || reservation.is_some();
    let relay = session.as_ref().map(|id| Relay {
        sessions: sessions.get_ref().clone(),
        id: id.clone(),
        // Its own stream, not a request's resumed (`Last-Event-ID`).
        own: req.method() == actix_web::http::Method::GET && !req.headers().contains_key("last-event-id"),
        request: (req.method() == actix_web::http::Method::POST).then(|| request_id(&body)).flatten(),
    });
    let mut request = to_http_request(&req, body, McpUser(caller.user))?;
    if let Some(credentials) = credentials {
        request.extensions_mut().insert(credentials);
    }
    let response = if stateful {
        endpoints.sessions.clone().call(request).await
    } else {
        endpoints.stateless.clone().call(request).await
    };
    let response = match response {
        Ok(response) => response,
        Err(never) => match never {},
    };
    // Held until the session is noted: rmcp has answered by now.
    drop(reservation);
    Ok(to_actix_response(response, relay).await)
}

/// Where a session's SSE answer goes through (see [`Sessions::relay`]).
pub(super) struct Relay {
    sessions: Sessions,
    id: String,
    own: bool,
    request: Option<RequestId>,
}

/// The header naming a request's session.
const SESSION_HEADER: &str = "mcp-session-id";

/// What a JSON-RPC message is, as far as routing it goes: the rest is rmcp's to read.
#[derive(serde::Deserialize)]
struct Head {
    method: Option<String>,
    id: Option<RequestId>,
}

impl Head {
    fn of(body: &[u8]) -> Option<Head> {
        serde_json::from_slice(body).ok()
    }
}

/// The id of the request `body` is, if it is one (a method and an id).
fn request_id(body: &[u8]) -> Option<RequestId> {
    Head::of(body).filter(|head| head.method.is_some()).and_then(|head| head.id)
}

/// Whether `body` is an `initialize` request, which begins a session.
fn is_initialize(body: &[u8]) -> bool {
    // Most bodies are not: they are not parsed twice for it.
    const METHOD: &[u8] = b"initialize";
    body.windows(METHOD.len()).any(|w| w == METHOD)
        && Head::of(body).is_some_and(|head| head.method.as_deref() == Some("initialize"))
}

/// The id of the request a `notifications/cancelled` body cancels, as a
/// call label (its JSON); `None` for any other body.
pub(super) fn cancelled_request(body: &[u8]) -> Option<String> {
    // Not the whole method: JSON may spell its slash `\/`.
    const METHOD: &[u8] = b"cancelled";
    if !body.windows(METHOD.len()).any(|w| w == METHOD) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Notification {
        method: String,
        id: Option<Value>,
        params: Option<Value>,
    }
    let note: Notification = serde_json::from_slice(body).ok()?;
    if note.method != "notifications/cancelled" || note.id.is_some() {
        return None;
    }
    let request_id = note.params?.get("requestId")?.clone();
    let request_id: RequestId = serde_json::from_value(request_id).ok()?;
    call_label(&request_id)
}

/// The actix request (actix-web 4 speaks `http` 0.2) as an `http` 1 request
/// with `body`, and `user` in its extensions.
pub(super) fn to_http_request(
    req: &HttpRequest,
    body: Bytes,
    user: McpUser,
) -> Result<http::Request<Full<Bytes>>, ApiError> {
    let bad = |what: &str| ApiError::BadRequest(format!("invalid {what}"));
    let method = http::Method::from_bytes(req.method().as_str().as_bytes()).map_err(|_| bad("method"))?;
    let uri: http::Uri = req.uri().to_string().parse().map_err(|_| bad("URI"))?;
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for (name, value) in req.headers() {
        let name = http::HeaderName::from_bytes(name.as_str().as_bytes()).map_err(|_| bad("header name"))?;
        let value = http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| bad("header value"))?;
        headers.append(name, value);
    }
    // HTTP/1.0 may come without `Host`; rmcp needs one.
    if !headers.contains_key(http::header::HOST) {
        let host = req.connection_info().host().to_owned();
        headers.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(|_| bad("host"))?);
    }
    request.extensions_mut().insert(user);
    Ok(request)
}

/// Headers that describe one hop's framing; actix sets its own.
fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection" | "keep-alive")
}

/// rmcp's response as an actix response: an SSE stream is streamed as rmcp
/// produces it (a session's through its relay, so a client that does not
/// read cannot hold the session up), any other body is sent whole.
pub(super) async fn to_actix_response(
    response: http::Response<BoxBody<Bytes, Infallible>>,
    relay: Option<Relay>,
) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let status = StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = HttpResponse::build(status);
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            out.append_header((name, value));
        }
    }
    let is_sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if is_sse {
        return match relay {
            Some(Relay { sessions, id, own, request }) => {
                out.streaming(sessions.relay(id, own, request, body.into_data_stream()))
            }
            None => out.streaming(body.into_data_stream()),
        };
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    out.body(bytes)
}
