//! The HTTP endpoints every node serves, whatever its roles:
//!
//! * `/healthz`: liveness, cheap and open: the process serves requests.
//! * `/readyz`: readiness, open: 200 while Redis and Kafka answer, 503
//!   with the reason while either cannot be reached.
//! * `/metrics`: Prometheus text, open.
//! * `/api/graph`: the live mailbox graph, for admins only (it names every
//!   running instance); 401 on a node without token-signing keys.
//!
//! Also the request span every route runs in, and a bounded body reader.
//! Roles add their own routes elsewhere.

use std::time::Duration;

use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::{web, HttpRequest, HttpResponse, Responder};
use futures::StreamExt;
use tracing::Instrument;

use super::auth::Admin;
use super::drain::Drain;
use super::error::ApiError;
use super::store::Redis;
use crate::bus::kafka::KafkaProbe;
use crate::kernel::Kernel;

/// How long `/readyz` waits for each broker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` checks.
#[derive(Clone, Default)]
pub struct Readiness {
    /// The node's Redis, when it uses one.
    pub redis: Option<Redis>,
    /// The node's Kafka brokers, when it uses them.
    pub kafka: Option<KafkaProbe>,
    /// Whether the node is going away: then it is not ready, whatever the brokers say.
    pub drain: Drain,
}

impl Readiness {
    /// Why the node is not ready, broker by broker; empty when it is.
    pub async fn problems(&self) -> Vec<String> {
        if self.drain.is_draining() {
            return vec!["draining: the node is shutting down".into()];
        }
        let redis = async {
            let redis = self.redis.as_ref()?;
            let mut conn = redis.conn();
            let ping = redis::cmd("PING");
            match tokio::time::timeout(PROBE_TIMEOUT, ping.query_async::<String>(&mut conn)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("redis: {e}")),
                Err(_) => Some(format!("redis: no answer within {} s", PROBE_TIMEOUT.as_secs())),
            }
        };
        let kafka = async { Some(format!("kafka: {}", self.kafka.as_ref()?.probe(PROBE_TIMEOUT).await.err()?)) };
        let (redis, kafka) = futures::join!(redis, kafka);
        redis.into_iter().chain(kafka).collect()
    }
}

/// Registers the node endpoints on an actix-web app.
pub fn configure(kernel: Kernel, readiness: Readiness) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(kernel))
            .app_data(web::Data::new(readiness))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .route("/api/graph", web::get().to(graph));
    }
}

/// Runs every request inside an `http.request` span, so that what a handler
/// publishes carries the request's trace. Use with `App::wrap_fn`.
pub fn traced<S>(
    req: ServiceRequest,
    service: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse, actix_web::Error>> + 'static
where
    S: Service<ServiceRequest, Response = ServiceResponse, Error = actix_web::Error>,
    S::Future: 'static,
{
    let span =
        tracing::info_span!("http.request", method = %req.method(), path = %req.path(), status = tracing::field::Empty);
    let call = service.call(req).instrument(span.clone());
    async move {
        let response = call.await?;
        span.record("status", response.status().as_u16());
        Ok(response)
    }
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over the limit, declared or streamed.
    #[error("the body is larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client failed to send it.
    #[error("the body could not be read: {0}")]
    Unreadable(String),
}

/// Reads a request body of at most `limit` bytes: a larger declared
/// `Content-Length` is refused before reading, a longer stream as soon as
/// it passes the limit.
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<web::Bytes, BodyError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| BodyError::Unreadable(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

async fn healthz(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "node": kernel.node() }))
}

async fn readyz(kernel: web::Data<Kernel>, readiness: web::Data<Readiness>) -> impl Responder {
    let problems = readiness.problems().await;
    if problems.is_empty() {
        return HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "node": kernel.node() }));
    }
    tracing::warn!(?problems, "nexus_node_not_ready");
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", "1"))
        .json(serde_json::json!({ "status": "unavailable", "node": kernel.node(), "reasons": problems }))
}

async fn metrics(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(kernel.render_metrics())
}

async fn graph(_admin: Admin, kernel: web::Data<Kernel>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(kernel.graph().snapshot()))
}
