//! `POST /heartbeat/<panel>`: the Studio page (another origin, hence CORS
//! open) tells an open Studio instance's watchdog that its owner is still
//! there. Checked against the owner's API token (`Authorization: Bearer`,
//! never a cookie, so no other site can send one for the owner), then
//! passed to the watchdog with the instance's watchdog secret, which only
//! the gateway knows: the panel's own code, which shares the watchdog's
//! loopback, cannot keep itself alive.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{full, Body, OutBody};
use super::metrics::RequestOutcome;
use super::pages;
use super::proxy::{error_chain, strip_hop_by_hop, Shared};
use crate::platform::auth::{extract, Audience, AuthError};
use crate::watchdog::TOKEN_HEADER;

/// Answers a heartbeat request for `panel`, with CORS open.
pub(crate) async fn heartbeat(shared: &Arc<Shared>, req: Request<Incoming>, panel: &str) -> Response<Body> {
    let mut response = answer(shared, req, panel).await;
    response.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

async fn answer(shared: &Arc<Shared>, req: Request<Incoming>, panel: &str) -> Response<Body> {
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
        Some(token) => shared.auth.verify(token, &Audience::Api).await,
        None => Err(AuthError::Invalid),
    };
    let user = match verified {
        Ok(identity) => identity.user,
        Err(AuthError::Store(error)) => {
            tracing::warn!(panel, %error, "a heartbeat's token could not be checked");
            shared.metrics.request(RequestOutcome::Unavailable, panel);
            let message = "the token could not be checked now";
            return pages::error(StatusCode::SERVICE_UNAVAILABLE, message, html, shared.retry_after());
        }
        Err(_) => {
            shared.metrics.request(RequestOutcome::Unauthorized, panel);
            return pages::error(StatusCode::UNAUTHORIZED, "a valid bearer token is required", html, None);
        }
    };
    let Some(route) = shared.routes.get(panel) else {
        shared.metrics.request(RequestOutcome::NotFound, panel);
        return pages::error(StatusCode::NOT_FOUND, &format!("no panel {panel:?} here"), html, None);
    };
    if route.owner != user {
        shared.metrics.request(RequestOutcome::Forbidden, panel);
        return pages::error(StatusCode::FORBIDDEN, "this panel belongs to someone else", html, None);
    }
    let Some((watchdog, secret)) =
        route.endpoints.iter().find_map(|e| Some((e.watchdog.as_deref()?, e.watchdog_token.as_deref())))
    else {
        shared.metrics.request(RequestOutcome::NotFound, panel);
        return pages::error(StatusCode::NOT_FOUND, "this panel has no running Studio instance", html, None);
    };
    let Ok(uri) = format!("http://{watchdog}/heartbeat").parse::<Uri>() else {
        shared.metrics.request(RequestOutcome::BadGateway, panel);
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
    match tokio::time::timeout(shared.config.upstream_timeout, shared.client().request(upstream)).await {
        Ok(Ok(answer)) => {
            shared.metrics.request(RequestOutcome::Heartbeat, panel);
            let (mut parts, body) = answer.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Ok(Err(error)) => {
            tracing::info!(panel, error = %error_chain(&error), "watchdog failed");
            shared.metrics.request(RequestOutcome::BadGateway, panel);
            pages::error(StatusCode::BAD_GATEWAY, "the instance's watchdog did not answer", html, None)
        }
        Err(_) => {
            shared.metrics.request(RequestOutcome::Timeout, panel);
            pages::error(StatusCode::GATEWAY_TIMEOUT, "the instance's watchdog did not answer in time", html, None)
        }
    }
}
