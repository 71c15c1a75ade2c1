//! The HTTP endpoints every node serves: `/healthz`, `/metrics` and
//! `/api/graph`. Roles add their own routes elsewhere; this module only
//! exposes what the kernel knows.

use actix_web::{web, HttpResponse, Responder};

use crate::kernel::Kernel;

/// Registers the node endpoints on an actix-web app.
pub fn configure(kernel: Kernel) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(kernel))
            .route("/healthz", web::get().to(healthz))
            .route("/metrics", web::get().to(metrics))
            .route("/api/graph", web::get().to(graph));
    }
}

async fn healthz(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "node": kernel.node() }))
}

async fn metrics(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(kernel.render_metrics())
}

async fn graph(kernel: web::Data<Kernel>) -> impl Responder {
    HttpResponse::Ok().json(kernel.graph().snapshot())
}
