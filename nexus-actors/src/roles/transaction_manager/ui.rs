//! The Studio web UI: three static files built into the binary and served
//! at `/`. No build step; the browser talks to `/api` and `/ws` like any
//! other client and holds no privileges of its own.

use actix_web::{web, HttpResponse};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

fn asset(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

/// Registers `/`, `/static/app.js` and `/static/style.css`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/static/app.js", web::get().to(|| async { asset(APP, "text/javascript; charset=utf-8") }))
        .route("/static/style.css", web::get().to(|| async { asset(STYLE, "text/css; charset=utf-8") }));
}
