//! The HTTP endpoints every node serves: `/healthz`, `/metrics` and
//! `/api/graph`. Roles add their own routes elsewhere; this module only
//! exposes what the kernel knows. `/healthz` and `/metrics` are always open.

use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, Responder};
use futures::StreamExt;
use tracing::Instrument;

use crate::kernel::Kernel;
use crate::roles::transaction_manager::api::ApiError;
use crate::roles::transaction_manager::auth::{Auth, Caller};

/// Registers the node endpoints on an actix-web app.
pub fn configure(kernel: Kernel) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(kernel))
            .route("/healthz", web::get().to(healthz))
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
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
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

async fn metrics(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(kernel.render_metrics())
}

/// The mailbox graph. On a node that runs the transaction manager (which
/// owns authentication) it needs a token like the rest of `/api`.
async fn graph(req: HttpRequest, kernel: web::Data<Kernel>) -> Result<HttpResponse, ApiError> {
    if req.app_data::<web::Data<Auth>>().is_some() {
        Caller::extract(&req).await?;
    }
    Ok(HttpResponse::Ok().json(kernel.graph().snapshot()))
}
