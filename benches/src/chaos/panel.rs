//! The chaos run's panel: one tool, `count`, that answers its argument `n`
//! and counts how many times it ran for each `n`. A tool call is made
//! once per `n` (retries reuse its idempotency key), so any count above one
//! is a call that ran twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// The tool's name, as the panel lists it.
pub(super) const TOOL: &str = "count";
/// How long one run of the tool takes: long enough that faults land on
/// calls in flight.
const WORK: Duration = Duration::from_millis(20);

/// Runs of the tool, by `n`.
pub(super) type Runs = Arc<Mutex<HashMap<u64, u32>>>;

/// The panel's HTTP server, on a thread (and actix system) of its own.
pub(super) struct CountingPanel {
    port: u16,
    /// Runs of `count`, by `n`.
    pub(super) runs: Runs,
    handle: actix_web::dev::ServerHandle,
}

impl CountingPanel {
    pub(super) fn start() -> CountingPanel {
        let runs: Runs = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = runs.clone();
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(shared.clone()))
                        .route("/manifest", web::get().to(manifest))
                        .route("/mcp/execute", web::post().to(execute))
                })
                .workers(1)
                .bind(("127.0.0.1", 0))
                .expect("bind the chaos panel");
                let port = server.addrs()[0].port();
                let server = server.run();
                tx.send((port, server.handle())).expect("the harness waits");
                let _ = server.await;
            })
        });
        let (port, handle) = rx.recv().expect("the chaos panel starts");
        CountingPanel { port, runs, handle }
    }

    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for CountingPanel {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

async fn manifest() -> HttpResponse {
    HttpResponse::Ok().json(json!({"name": "chaos counter", "tools": [{
        "name": TOOL,
        "desc": "Answers n; counts its runs per n",
        "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    }]}))
}

async fn execute(runs: web::Data<Runs>, body: web::Json<Value>) -> HttpResponse {
    let Some(n) = body["arguments"]["n"].as_u64() else {
        return HttpResponse::Ok().json(json!({"error": "n must be a number"}));
    };
    *runs.lock().expect("runs").entry(n).or_default() += 1;
    actix_rt::time::sleep(WORK).await;
    HttpResponse::Ok().json(json!({"result": {"n": n}}))
}
