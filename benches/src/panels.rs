//! Panels: what the traffic gateway costs per request, and how long an App
//! scaled to zero takes to answer its first request.
//!
//! Gateway overhead: one upstream (this binary in `serve-hello` mode, or the
//! Python template panel) reached three ways in the same run — directly, through
//! the Nexus gateway (`nexus_actors::roles::traffic_gateway`, in this process,
//! routes written into a private redis-server) and through Debian's nginx as a
//! reverse proxy (its configuration generated into the run's temp dir). `wrk`
//! makes the load. Cold start: the python_minimal template deployed as an App
//! with the real `LocalDriver`, `PanelManager` and gateway, scaled to zero, then
//! one request through the gateway, timed until its response.
//!
//! Measures and reports; it asserts no timing and leaves the system nginx alone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Arbiter;
use actix_web::{web, App, HttpResponse, HttpServer};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::{find_program, free_port, RedisServer};
use nexus_actors::instance::{instances_key, Endpoint, InstanceMode, InstanceStatus, PanelRoute, ROUTES_KEY};
use nexus_actors::platform::auth::keys::{KeyRing, KeySet};
use nexus_actors::platform::auth::{Audience, PANEL_COOKIE};
use nexus_actors::platform::channels::ACTIVATE as ACTIVATE_CHANNEL;
use nexus_actors::platform::{Panel, PanelMode, PanelRecords, Platform, UserRole};
use nexus_actors::roles::panel_manager::driver::RuntimeDriver;
use nexus_actors::roles::panel_manager::local::{LocalConfig, LocalDriver, SandboxChoice};
use nexus_actors::roles::panel_manager::manager::{Deploy, Scale};
use nexus_actors::roles::panel_manager::{self as pm, PanelManagerConfig, PanelManagerHandle};
use nexus_actors::roles::traffic_gateway::{self as gateway, Gateway, GatewayConfig};
use nexus_actors::Kernel;

use super::{percentile, wait_listening};
use crate::tools::PythonPanel;

/// The owner of every bench panel.
const OWNER: &str = "bench";
/// Route ids of the two upstreams of the overhead table.
const HELLO_PANEL: &str = "0190a5a4-0000-7000-8000-00000000be01";
const PYTHON_PANEL: &str = "0190a5a4-0000-7000-8000-00000000be02";
/// The App of the cold-start table.
const APP_PANEL: &str = "0190a5a4-0000-7000-8000-00000000be03";
/// Threads of the gateway's runtime and nginx worker processes: the same.
const PROXY_THREADS: usize = 2;
/// How long any one wait for the panel manager may take before the run
/// reports a failure instead of hanging.
const WAIT_LIMIT: Duration = Duration::from_secs(90);

/// How much to measure.
pub(crate) struct Sizes {
    /// wrk duration of the main load (32 connections to the hello server).
    pub load: Duration,
    /// wrk duration of the single-connection and Python loads.
    pub short: Duration,
    /// wrk run before each measured run (fills the proxies' pools).
    pub warmup: Duration,
    /// Cold starts per sandbox kind.
    pub cold_starts: usize,
    /// Warm requests to the same App, one at a time.
    pub warm_requests: usize,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                load: Duration::from_secs(3),
                short: Duration::from_secs(2),
                warmup: Duration::from_secs(1),
                cold_starts: 2,
                warm_requests: 20,
            }
        } else {
            Sizes {
                load: Duration::from_secs(8),
                short: Duration::from_secs(4),
                warmup: Duration::from_secs(1),
                cold_starts: 5,
                warm_requests: 200,
            }
        }
    }
}

pub(crate) const OVERHEAD_NOTES: &str = "\
Each row group is one load, sent by `wrk` (one thread, keep-alive
connections, fixed duration) to the same upstream three ways, one after the
other in the same run: **direct** to the upstream, through the **Nexus
gateway** (`traffic_gateway::start` in the harness process: 2 threads, each
a current-thread tokio runtime with its own `SO_REUSEPORT` listener and its
own pool of upstream connections; the route is a `PanelRoute` with one endpoint in the
private redis-server's `nexus:routes`, the panel a private App whose
owner's `nexus_panel` cookie wrk sends on every request, so the gateway
checks a token and the owner on each; the other paths get the same header
and ignore it), and through **nginx** (the Debian
package, `worker_processes 2`, an `upstream` block with `keepalive 64`,
`proxy_http_version 1.1`, `proxy_set_header Connection \"\"`, access log off;
its config and pid file live in the run's temp dir). A 1 s wrk run before each
measured run warms the proxies' upstream pools. Ratios: \"gateway ÷ direct\"
and \"nginx ÷ direct\" are throughput ÷ direct throughput, and direct latency ÷
latency, so 1.00 means no cost and lower means slower; \"gateway ÷ nginx\" is
the same comparison of the gateway against nginx (above 1.00: the gateway is
faster). Latencies are wrk's percentiles of request → response under that
load (wrk, not wrk2: no correction for coordinated omission).
Upstream **hello**: a minimal actix-web server (this binary as
`nexus-bench serve-hello`, one worker thread, a separate process) answering
`hello` to `GET /`. Upstream **python_minimal**: the template
`panel-sdk-docs/python_minimal/server.py` answering `GET /` (its page; the
gateway never forwards `/manifest`); it speaks
HTTP/1.0 and closes every connection, so each request opens a new
connection to it on every path; on the direct path that is wrk reconnecting
after every answer, while the proxies keep wrk's connections open and do the
connecting themselves. That direct column has varied most between trial runs
(from half to 1.5 times the proxies' throughput), so read it as wrk's
reconnecting client rather than a floor, and compare the gateway with nginx
there (the same upstream work on both).
Everything — wrk, the proxy, the upstream, redis-server — shares the
machine's two cores, so a proxy's cost shows as CPU taken from the others;
the single-connection rows show the added latency of one hop without that
contention. One run per cell: expect noise of ±10 %.
";

pub(crate) const COLD_NOTES: &str = "\
An App from zero to its first response, through the real parts in the
harness process: the `LocalDriver` (network namespace per instance, the
`nexus sidecar` from `target/release/nexus`, the user process as a plain
process, under `bwrap` or under `runsc run`), the `PanelManager` (default
timers) and the traffic gateway, on a private redis-server. The
python_minimal template is deployed once (`Deploy`), then each cold start:
`Scale { replicas: 0 }` (what `PUT /api/panels/{id}/scale` sends), wait
until the instance is stopped and its endpoint left the gateway's routes,
then one `GET /p/<id>/` through the gateway, timed from sending the
request to having the whole response: activator → `Activate` on Redis →
activation claim → snapshot copied → namespace, helpers' listeners bound,
sidecar and user process started → readiness probe answered → route
published → request forwarded.
\"warm p50\" is the same GET to the running instance (one at a time, after
the deploy); the ratio says how many warm requests one cold start costs. The
gateway's own `nexus_gateway_cold_start_seconds` histogram (first queued
request → endpoints) is shown as its mean. The \"warm sandboxes\" rows keep 2
and wait, before each cold start, until both are ready. Rows are skipped, with the reason,
without root, without runsc, or without the `nexus` binary.
The time split is made of means over the cold starts alone (the deploy's
start left out) of the driver's `nexus_local_start_phase_seconds{phase}`: prepare
(sandbox resolved, instance dir), copy (scratch tmpfs and the snapshot's
copy), network (namespace and link), sandbox (helpers' listeners, runsc
bundle, cgroup), credentials (the sidecar's Redis user), spawn (sidecar,
watchdog, user process); then boot: the panel manager's
`nexus_panel_instance_start_seconds{mode=\"app\"}` less the driver's steps
(processes spawned → readiness probe answered, with the instance actor's
own start before the driver's); activation and route: the
gateway's cold-start mean less that (Activate published, claimed, route
seen); request through: the mean cold start less the gateway's mean.

A warm row's time split says what its sandbox made ahead saves: the
namespace (network), the fork of the user process (spawn) and, in boot,
`runsc create`/`start` and the interpreter's start and imports; what is left
is the job sent, the uid change, the panel's file run and the readiness
probe (every 20 ms) seeing it listen.
";

// ---- the hello upstream -------------------------------------------------------

/// `nexus-bench serve-hello PORT`: answers `hello` to every request.
pub(crate) fn serve_hello(args: &[String]) {
    let [port] = args else { panic!("serve-hello PORT") };
    let port: u16 = port.parse().expect("serve-hello PORT: a port number");
    actix_rt::System::new().block_on(async move {
        HttpServer::new(|| App::new().default_service(web::to(hello)))
            .workers(1)
            .bind(("127.0.0.1", port))
            .expect("bind the hello upstream")
            .run()
            .await
            .expect("hello upstream runs");
    });
}

async fn hello() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("hello")
}

/// A child process of this run, killed on drop.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hello() -> Result<(Running, u16), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["serve-hello", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the hello upstream: {e}"))?;
    let running = Running { child };
    wait_listening(port, "the hello upstream", Duration::from_secs(15))?;
    Ok((running, port))
}

// ---- nginx ----------------------------------------------------------------------

/// nginx as a reverse proxy to both upstreams, from a config in `dir`:
/// `/hello/` → the hello server, `/python/` → the Python panel.
fn start_nginx(dir: &Path, hello: u16, python: Option<u16>) -> Result<(Nginx, u16), String> {
    let nginx = find_program("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .ok_or("nginx is not installed (scripts/bench installs nginx-light)")?;
    let dir = dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| e.to_string())?;
    let d = dir.display();
    // Upstream keep-alive as the gateway has it; keepalive_requests raised
    // on both sides so neither wrk's nor the upstream's connections are
    // recycled every 1000 requests (the gateway never recycles them).
    let python_upstream = python
        .map(|p| format!("upstream python {{ server 127.0.0.1:{p}; keepalive 64; keepalive_requests 10000000; }}"))
        .unwrap_or_default();
    let python_location = if python.is_some() {
        "location /python/ { proxy_pass http://python/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
    } else {
        ""
    };
    let conf = format!(
        "worker_processes {PROXY_THREADS};
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream hello {{ server 127.0.0.1:{hello}; keepalive 64; keepalive_requests 10000000; }}
    {python_upstream}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 10000000;
        location /hello/ {{ proxy_pass http://hello/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
        {python_location}
    }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let child =
        nginx_command(&nginx, &dir).args(["-g", "daemon off;"]).spawn().map_err(|e| format!("starting nginx: {e}"))?;
    let running = Nginx { program: nginx, dir: dir.clone(), child };
    wait_listening(port, "nginx", Duration::from_secs(15)).map_err(|e| format!("{e}; see {d}/error.log"))?;
    Ok((running, port))
}

/// nginx with everything it reads and writes in `dir`.
fn nginx_command(program: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// A running nginx master. Dropping it stops it with `nginx -s stop`, so
/// the master takes its workers along (SIGKILL to the master alone would
/// leave them serving).
struct Nginx {
    program: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = nginx_command(&self.program, &self.dir).args(["-s", "stop"]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("nginx did not stop on `nginx -s stop`; killing its master (workers may remain)");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- wrk --------------------------------------------------------------------------

/// What one wrk run measured.
#[derive(Debug, Clone)]
struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// Non-2xx answers and socket errors, when wrk reported any.
    errors: Option<String>,
}

fn wrk(url: &str, cookie: &str, connections: usize, duration: Duration) -> Result<Load, String> {
    let wrk = find_program("wrk").ok_or("wrk is not installed (scripts/bench installs it)")?;
    let out = Command::new(wrk)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{}s", duration.as_secs().max(1)), "--latency"])
        .args(["-H", &format!("Cookie: {cookie}"), url])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed: {text} {}", String::from_utf8_lossy(&out.stderr)));
    }
    parse_wrk(&text).ok_or_else(|| format!("unreadable wrk output: {text}"))
}

/// Reads wrk's `--latency` report.
fn parse_wrk(text: &str) -> Option<Load> {
    let mut rps = None;
    let (mut p50, mut p99, mut requests) = (None, None, None);
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => rps = v.parse().ok(),
            (Some("50%"), Some(v)) => p50 = micros(v),
            (Some("99%"), Some(v)) => p99 = micros(v),
            (Some(n), Some("requests")) => requests = n.parse().ok(),
            (Some("Non-2xx"), _) => errors.push(line.to_owned()),
            (Some("Socket"), _) => errors.push(line.to_owned()),
            _ => {}
        }
    }
    Some(Load {
        rps: rps?,
        p50_us: p50?,
        p99_us: p99?,
        requests: requests?,
        errors: (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

/// `312.00us`, `1.23ms`, `2.00s` → microseconds.
fn micros(v: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

// ---- gateway overhead ---------------------------------------------------------

/// One load against the same upstream by three paths.
struct Scenario {
    label: &'static str,
    connections: usize,
    duration: Duration,
    /// Direct, gateway, nginx.
    urls: [Option<String>; 3],
    /// What a good answer contains.
    expect: &'static str,
    /// The owner's `Cookie` header, sent on every path (the gateway
    /// checks it; the others ignore it), so each path gets the same bytes.
    cookie: String,
}

const PATHS: [&str; 3] = ["direct", "Nexus gateway", "nginx"];

/// Runs the overhead loads; returns the markdown table.
pub(crate) async fn overhead(dir: &Path, sizes: &Sizes) -> String {
    let redis = RedisServer::start(&dir.join("panels-redis"), false).expect("redis-server");
    let (_hello, hello_port) = match start_hello() {
        Ok(both) => both,
        Err(error) => return format!("Skipped: {error}\n"),
    };
    let python = PythonPanel::start(dir).map_err(|e| eprintln!("gateway overhead: no Python panel: {e}")).ok();
    let python_port = python.as_ref().map(|p| p.port);

    let mut conn = redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    put_route(&mut conn, HELLO_PANEL, &format!("127.0.0.1:{hello_port}")).await;
    if let Some(port) = python_port {
        put_route(&mut conn, PYTHON_PANEL, &format!("127.0.0.1:{port}")).await;
    }
    // Private panels, opened by their owner's cookie: the gateway checks it
    // on every request, as it does for a Studio in the browser.
    let keys = KeyRing::new(KeySet::generate());
    let platform = Platform::connect(&redis.url(), keys.clone(), Default::default()).await.expect("records");
    platform.accounts.set(OWNER, "not-for-login", UserRole::User).await.expect("owner");
    let mut cookies = std::collections::HashMap::new();
    for id in [HELLO_PANEL, PYTHON_PANEL] {
        let record = Panel {
            id: id.to_owned(),
            name: id.to_owned(),
            owner: OWNER.to_owned(),
            mode: PanelMode::App,
            source: "nexus-bench".to_owned(),
            public: false,
        };
        platform.panels.put(&record).await.expect("panel record");
        let (token, _) = platform.auth.issue(OWNER, &Audience::Panel(id.to_owned())).await.expect("cookie");
        cookies.insert(id, format!("{PANEL_COOKIE}={token}"));
    }
    let kernel = Kernel::new("bench-gateway");
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().expect("address"), redis.url(), keys);
    config.threads = PROXY_THREADS;
    let gateway = gateway::start(&kernel, config).await.expect("gateway starts");
    let gw = gateway.local_addr();
    let nginx = start_nginx(dir, hello_port, python_port);
    let nginx_port = match &nginx {
        Ok((_, port)) => Some(*port),
        Err(error) => {
            eprintln!("gateway overhead: no nginx column: {error}");
            None
        }
    };

    let mut scenarios = vec![
        Scenario {
            label: "hello, 32 connections",
            connections: 32,
            duration: sizes.load,
            urls: [
                Some(format!("http://127.0.0.1:{hello_port}/")),
                Some(format!("http://{gw}/p/{HELLO_PANEL}/")),
                nginx_port.map(|p| format!("http://127.0.0.1:{p}/hello/")),
            ],
            expect: "hello",
            cookie: cookies[HELLO_PANEL].clone(),
        },
        Scenario {
            label: "hello, 1 connection",
            connections: 1,
            duration: sizes.short,
            urls: [
                Some(format!("http://127.0.0.1:{hello_port}/")),
                Some(format!("http://{gw}/p/{HELLO_PANEL}/")),
                nginx_port.map(|p| format!("http://127.0.0.1:{p}/hello/")),
            ],
            expect: "hello",
            cookie: cookies[HELLO_PANEL].clone(),
        },
    ];
    if let Some(port) = python_port {
        scenarios.push(Scenario {
            label: "python_minimal page, 8 connections",
            connections: 8,
            duration: sizes.short,
            urls: [
                Some(format!("http://127.0.0.1:{port}/")),
                Some(format!("http://{gw}/p/{PYTHON_PANEL}/")),
                nginx_port.map(|p| format!("http://127.0.0.1:{p}/python/")),
            ],
            expect: "python_minimal",
            cookie: cookies[PYTHON_PANEL].clone(),
        });
    }

    let http = reqwest::Client::new();
    let mut out = String::from(
        "| load | measure | direct | Nexus gateway | nginx | gateway ÷ direct | nginx ÷ direct | gateway ÷ nginx |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut notes = Vec::new();
    for s in &scenarios {
        let mut loads: [Option<Load>; 3] = [None, None, None];
        for (i, url) in s.urls.iter().enumerate() {
            let Some(url) = url else { continue };
            // One checked answer first: a proxy that answers errors fast
            // must not pass for a fast proxy.
            match http.get(url).header("cookie", &s.cookie).send().await {
                Ok(r) if r.status().is_success() => {
                    let body = r.text().await.unwrap_or_default();
                    if !body.contains(s.expect) {
                        notes.push(format!("{} via {}: unexpected answer {body:?}", s.label, PATHS[i]));
                        continue;
                    }
                }
                Ok(r) => {
                    notes.push(format!("{} via {}: answered {}", s.label, PATHS[i], r.status()));
                    continue;
                }
                Err(error) => {
                    notes.push(format!("{} via {}: {error}", s.label, PATHS[i]));
                    continue;
                }
            }
            let (url, connections, duration) = (url.clone(), s.connections, s.duration);
            let (warmup, cookie) = (sizes.warmup, s.cookie.clone());
            let measured = tokio::task::spawn_blocking(move || {
                wrk(&url, &cookie, connections, warmup)?;
                wrk(&url, &cookie, connections, duration)
            })
            .await
            .unwrap_or_else(|e| Err(format!("wrk thread: {e}")));
            match measured {
                Ok(load) => {
                    if let Some(errors) = &load.errors {
                        notes.push(format!("{} via {}: {errors}", s.label, PATHS[i]));
                    }
                    eprintln!(
                        "{} via {}: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs ({} requests)",
                        s.label, PATHS[i], load.rps, load.p50_us, load.p99_us, load.requests
                    );
                    loads[i] = Some(load);
                }
                Err(error) => notes.push(format!("{} via {}: {error}", s.label, PATHS[i])),
            }
        }
        out += &overhead_rows(s, &loads);
    }
    let _ = writeln!(
        out,
        "\nTools: {}; {}.",
        version_of("nginx", "-v").unwrap_or_else(|| "nginx missing".into()),
        version_of("wrk", "-v").unwrap_or_else(|| "wrk missing".into())
    );
    if nginx_port.is_none() {
        notes.push("nginx column empty: nginx did not start (see the harness's stderr)".into());
    }
    for note in notes {
        let _ = writeln!(out, "\nNote: {note}");
    }
    gateway.stop().await;
    drop(nginx);
    drop(python);
    out
}

/// A row of a load: its name, its value, whether it is a throughput.
type Measure = (&'static str, fn(&Load) -> f64, bool);

fn overhead_rows(s: &Scenario, loads: &[Option<Load>; 3]) -> String {
    let cell = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0}"));
    // Higher is better for the ratio: throughput a ÷ b, latency b ÷ a.
    let ratio = |a: Option<f64>, b: Option<f64>, throughput: bool| match (a, b) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => format!("{:.2}", if throughput { a / b } else { b / a }),
        _ => "—".to_owned(),
    };
    let mut out = String::new();
    let measures: [Measure; 3] =
        [("requests/s", |l| l.rps, true), ("p50 µs", |l| l.p50_us, false), ("p99 µs", |l| l.p99_us, false)];
    for (name, get, throughput) in measures {
        let [d, g, n] = [0, 1, 2].map(|i| loads[i].as_ref().map(get));
        let _ = writeln!(
            out,
            "| {} | {name} | {} | {} | {} | {} | {} | {} |",
            s.label,
            cell(d),
            cell(g),
            cell(n),
            ratio(g, d, throughput),
            ratio(n, d, throughput),
            ratio(g, n, throughput)
        );
    }
    out
}

/// Writes a route with one endpoint, as a panel manager would. The gateway
/// reads the whole table when it starts, so no announcement is needed.
async fn put_route(conn: &mut redis::aio::MultiplexedConnection, panel: &str, addr: &str) {
    let route = PanelRoute {
        panel: panel.to_owned(),
        owner: OWNER.to_owned(),
        mode: InstanceMode::App,
        endpoints: vec![Endpoint {
            instance: format!("{panel}-0"),
            addr: addr.to_owned(),
            watchdog: None,
            watchdog_token: None,
        }],
        activatable: false,
    };
    let json = serde_json::to_string(&route).expect("route json");
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg(panel).arg(json).query_async(conn).await.expect("HSET route");
}

// ---- cold start -------------------------------------------------------------------

/// One sandbox kind's cold starts.
struct Cold {
    kind: &'static str,
    isolation: String,
    /// Milliseconds of each successful cold start.
    cold_ms: Vec<f64>,
    warm_p50_ms: f64,
    gateway_mean_ms: Option<f64>,
    /// Where the time went: (step, mean ms), in order.
    split: Vec<(&'static str, f64)>,
    note: String,
}

/// The driver's phases, as `nexus_local_start_phase_seconds` labels them, in order.
const PHASES: [&str; 6] = ["prepare", "copy", "network", "sandbox", "credentials", "spawn"];

/// Runs the cold starts; returns the markdown table.
pub(crate) async fn cold_start(dir: &Path, sizes: &Sizes) -> String {
    let nexus_bin = std::env::var_os("NEXUS_BIN").map(PathBuf::from).or_else(|| {
        std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("nexus"))).filter(|p| p.is_file())
    });
    let mut out = String::from(
        "| sandbox | isolation | cold starts | p50 ms | max ms | warm p50 ms | cold p50 ÷ warm p50 | note |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    let mut splits = Vec::new();
    let kinds = [
        ("plain process", SandboxChoice::Process, "process", 0),
        ("plain process, 2 warm sandboxes", SandboxChoice::Process, "process-warm", 2),
        ("bubblewrap namespaces", SandboxChoice::Namespaces, "namespaces", 0),
        ("gVisor (runsc)", SandboxChoice::Gvisor, "gvisor", 0),
        ("gVisor, 2 warm sandboxes", SandboxChoice::Gvisor, "gvisor-warm", 2),
    ];
    for (kind, choice, dir_name, warm) in kinds {
        let skip = |why: String| format!("| {kind} | — | 0 | — | — | — | — | skipped: {why} |\n");
        if !is_root() {
            out += &skip("needs root (network namespaces, runsc)".into());
            continue;
        }
        let Some(bin) = nexus_bin.clone() else {
            out +=
                &skip("no `nexus` binary next to this one (cargo build --release -p nexus-bin) nor NEXUS_BIN".into());
            continue;
        };
        let work = dir.join(format!("cold-{dir_name}"));
        match cold_starts(&work, bin, (kind, choice, warm), sizes).await {
            Ok(cold) => {
                out += &cold_row(&cold);
                splits.push(cold);
            }
            Err(why) => out += &skip(why),
        }
    }
    if !splits.is_empty() {
        out += &split_table(&splits);
    }
    if let Some(runsc) = version_of("runsc", "--version") {
        let _ = writeln!(out, "\nTools: {runsc}.");
    }
    out
}

/// The first line `program flag` prints (on stdout or stderr), for the record.
fn version_of(program: &str, flag: &str) -> Option<String> {
    let path = find_program(program).or_else(|| Some(Path::new("/usr/sbin").join(program)).filter(|p| p.is_file()))?;
    let out = Command::new(path).arg(flag).stdin(Stdio::null()).output().ok()?;
    let text = [out.stdout, out.stderr].concat();
    let line = String::from_utf8_lossy(&text).lines().next()?.trim().to_owned();
    // wrk appends its copyright to the version line.
    Some(line.split(" Copyright").next().unwrap_or(&line).to_owned())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Where each sandbox's cold start goes, in mean milliseconds.
fn split_table(colds: &[Cold]) -> String {
    let steps: Vec<&str> = colds[0].split.iter().map(|(step, _)| *step).collect();
    let mut out = format!("\n| time split, mean ms | {} |\n|---|{}\n", steps.join(" | "), "---:|".repeat(steps.len()));
    for c in colds {
        let cells: Vec<String> = c.split.iter().map(|(_, ms)| format!("{ms:.1}")).collect();
        let _ = writeln!(out, "| {} | {} |", c.kind, cells.join(" | "));
    }
    out
}

/// The split of the cold starts from the node's histograms: their means
/// over the cold starts alone (`before` is the rendering taken after the
/// deploy), beside the measured mean.
fn cold_split(before: &str, after: &str, cold_mean_ms: f64) -> Vec<(&'static str, f64)> {
    let mean = |name: &str, label: Option<&str>| {
        let (then, now) = (totals(before, name, label), totals(after, name, label));
        let (sum, count) = (now.0 - then.0, now.1 - then.1);
        if count > 0.0 {
            sum / count * 1e3
        } else {
            f64::NAN
        }
    };
    let mut split: Vec<(&'static str, f64)> =
        PHASES.iter().map(|phase| (*phase, mean("nexus_local_start_phase_seconds", Some(phase)))).collect();
    let driver: f64 = split.iter().map(|(_, ms)| ms).sum();
    let ready = mean("nexus_panel_instance_start_seconds", Some("app"));
    let gateway = mean("nexus_gateway_cold_start_seconds", None);
    split.push(("boot (spawned → ready)", ready - driver));
    split.push(("activation and route", gateway - ready));
    split.push(("request through", cold_mean_ms - gateway));
    split
}

/// `(sum, count)` of the histogram `name` (with `label` as its one label's
/// value, if given) in a Prometheus text rendering; zeros when absent.
fn totals(metrics: &str, name: &str, label: Option<&str>) -> (f64, f64) {
    let value = |suffix: &str| {
        let series = format!("{name}_{suffix}");
        metrics
            .lines()
            .filter(|l| l.split([' ', '{']).next() == Some(series.as_str()))
            .find(|l| label.is_none_or(|label| l.contains(&format!("=\"{label}\""))))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

fn cold_row(c: &Cold) -> String {
    let mut sorted = c.cold_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, max) =
        if sorted.is_empty() { (f64::NAN, f64::NAN) } else { (sorted[sorted.len() / 2], sorted[sorted.len() - 1]) };
    let gateway = c.gateway_mean_ms.map(|m| format!("gateway histogram mean {m:.0} ms")).unwrap_or_default();
    let note = [gateway, c.note.clone()].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("; ");
    format!(
        "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {} |\n",
        c.kind,
        c.isolation,
        c.cold_ms.len(),
        p50,
        max,
        c.warm_p50_ms,
        p50 / c.warm_p50_ms,
        note
    )
}

/// The parts of one cold-start setup, stopped together.
struct AppNode {
    redis: RedisServer,
    kernel: Kernel,
    handle: PanelManagerHandle,
    gateway: Gateway,
    conn: redis::aio::MultiplexedConnection,
    arbiter: Arbiter,
}

/// `(kind, choice, warm)`: the row's name, the sandbox asked for, and how
/// many warm sandboxes the driver keeps.
async fn cold_starts(
    work: &Path,
    nexus_bin: PathBuf,
    (kind, choice, warm): (&'static str, SandboxChoice, usize),
    sizes: &Sizes,
) -> Result<Cold, String> {
    let _ = std::fs::remove_dir_all(work);
    let redis = RedisServer::start(&work.join("redis"), false).map_err(|e| e.to_string())?;
    let config =
        LocalConfig { warm_sandboxes: warm, ..LocalConfig::new(work.join("data"), nexus_bin, redis.url(), choice) };
    let driver = Arc::new(LocalDriver::new(config));
    let (isolation, _) = driver.isolation().await.map_err(|e| e.to_string())?;
    driver.warm_up().await;
    let kernel = Kernel::new("bench-cold");
    driver.metrics().register(kernel.metrics().registry()).map_err(|e| e.to_string())?;
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &redis.url()).map_err(|e| e.to_string())?;
    let config = PanelManagerConfig::new("bench", redis.url());
    let handle = pm::start(&kernel, bridge, driver.clone(), config).await.map_err(|e| e.to_string())?;
    let keys = KeyRing::new(KeySet::generate());
    let gateway =
        gateway::start(&kernel, GatewayConfig::new("127.0.0.1:0".parse().expect("address"), redis.url(), keys))
            .await
            .map_err(|e| e.to_string())?;
    let conn = redis::Client::open(redis.url())
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let node = AppNode { redis, kernel, handle, gateway, conn, arbiter };
    let result = measure_cold(&node, (kind, &driver, warm), format!("{isolation:?}").to_lowercase(), sizes).await;
    // Scaled to zero again whatever happened, then everything stops.
    let _ = scale(&node, 0).await;
    node.handle.stop_all(Duration::from_secs(5)).await;
    node.gateway.stop().await;
    node.arbiter.stop();
    driver.release().await;
    result
}

async fn measure_cold(
    node: &AppNode,
    (kind, driver, pool): (&'static str, &LocalDriver, usize),
    isolation: String,
    sizes: &Sizes,
) -> Result<Cold, String> {
    wait_until("the panel manager subscribes to activations", || async {
        let (_, n): (String, u64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(ACTIVATE_CHANNEL).query_async(&mut node.conn.clone()).await.ok()?;
        (n > 0).then_some(())
    })
    .await?;
    let panel = Panel {
        id: APP_PANEL.to_owned(),
        name: "bench app".to_owned(),
        owner: OWNER.to_owned(),
        mode: PanelMode::App,
        source: "template:python_minimal".to_owned(),
        public: true,
    };
    let store = PanelRecords::connect(&node.redis.url()).await.map_err(|e| e.to_string())?;
    store.put(&panel).await.map_err(|e| e.to_string())?;
    match node.handle.actor.link::<Deploy>("bench").ask(Deploy { panel }).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(format!("deploy: {error}")),
        Err(_) => return Err("deploy: the panel manager is gone".into()),
    }
    wait_serving(node, true).await?;

    let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
    let url = format!("http://{}/p/{APP_PANEL}/", node.gateway.local_addr());
    let mut warm = Vec::with_capacity(sizes.warm_requests);
    for _ in 0..sizes.warm_requests {
        let t = Instant::now();
        page(&http, &url).await.map_err(|e| format!("warm request: {e}"))?;
        warm.push(t.elapsed().as_micros() as u64);
    }
    warm.sort_unstable();

    let before = node.kernel.render_metrics();
    let mut cold_ms = Vec::new();
    let mut failures = Vec::new();
    let ready = &driver.metrics().warm_ready;
    for _ in 0..sizes.cold_starts {
        scale(node, 0).await?;
        wait_serving(node, false).await?;
        // Cold starts come one at a time here: each finds the pool full.
        if pool > 0 {
            wait_until("the warm sandboxes are ready", || async { (ready.get() >= pool as i64).then_some(()) }).await?;
        }
        let t = Instant::now();
        match page(&http, &url).await {
            Ok(()) => cold_ms.push(t.elapsed().as_secs_f64() * 1e3),
            Err(error) => failures.push(error),
        }
        // The activated instance must be serving before the next scale to
        // zero, or that scale would race its start.
        wait_serving(node, true).await?;
    }
    let started = statuses(node).await;
    let isolation = started.iter().map(|s| format!("{:?}", s.isolation).to_lowercase()).next().unwrap_or(isolation);
    eprintln!("cold start, {kind}: {cold_ms:.0?} ms; warm p50 {:.1} ms", percentile(&warm, 0.5) / 1e3);
    let mut note = format!("{} instances over the run (the deploy's, then one per cold start)", started.len());
    if pool > 0 {
        let takes = &driver.metrics().warm_takes;
        let taken = takes.with_label_values(&["taken"]).get();
        let _ = write!(note, "; {taken} of {} starts took a warm sandbox", started.len());
    }
    if !failures.is_empty() {
        let _ = write!(note, "; {} failed: {}", failures.len(), failures.join(" / "));
    }
    let cold_mean = cold_ms.iter().sum::<f64>() / cold_ms.len() as f64;
    Ok(Cold {
        kind,
        isolation,
        cold_ms,
        warm_p50_ms: percentile(&warm, 0.5) / 1e3,
        gateway_mean_ms: gateway_cold_mean_ms(&node.kernel),
        split: cold_split(&before, &node.kernel.render_metrics(), cold_mean),
        note,
    })
}

/// One `GET /` (the panel's page) through the gateway, checked.
async fn page(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if status.is_success() && body.contains("<title>python_minimal</title>") {
        Ok(())
    } else {
        Err(format!("{status}: {}", body.chars().take(200).collect::<String>()))
    }
}

async fn scale(node: &AppNode, replicas: u32) -> Result<(), String> {
    let scale = Scale { panel: APP_PANEL.to_owned(), replicas };
    match node.handle.actor.link::<Scale>("bench").ask(scale).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("scale: {error}")),
        Err(_) => Err("scale: the panel manager is gone".into()),
    }
}

/// Waits until the gateway routes the App to an instance (`true`), or
/// until it has none and every instance is stopped (`false`).
async fn wait_serving(node: &AppNode, serving: bool) -> Result<(), String> {
    let what = if serving { "the App serves through the gateway" } else { "the App is scaled to zero" };
    wait_until(what, || async {
        let endpoints = node.gateway.routes().get(APP_PANEL).map_or(0, |r| r.endpoints.len());
        let done = if serving {
            endpoints > 0
        } else {
            endpoints == 0 && statuses(node).await.iter().all(|s| s.state.is_final())
        };
        done.then_some(())
    })
    .await
}

/// The App's instances as the panel manager recorded them, newest first.
async fn statuses(node: &AppNode) -> Vec<InstanceStatus> {
    let raw: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(instances_key(APP_PANEL))
        .query_async(&mut node.conn.clone())
        .await
        .unwrap_or_default();
    let mut all: Vec<InstanceStatus> = raw.values().filter_map(|v| serde_json::from_str(v).ok()).collect();
    all.sort_by_key(|s| std::cmp::Reverse(s.since_ms));
    all
}

async fn wait_until<F, Fut>(what: &str, mut f: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + WAIT_LIMIT;
    while Instant::now() < deadline {
        if f().await.is_some() {
            return Ok(());
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("timed out after {}s waiting until {what}", WAIT_LIMIT.as_secs()))
}

/// Mean of `nexus_gateway_cold_start_seconds`, in ms.
fn gateway_cold_mean_ms(kernel: &Kernel) -> Option<f64> {
    let (sum, count) = totals(&kernel.render_metrics(), "nexus_gateway_cold_start_seconds", None);
    (count > 0.0).then(|| sum / count * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 8s test @ http://127.0.0.1:1/
  1 threads and 32 connections
  Latency Distribution
     50%  312.00us
     75%  450.00us
     90%  500.00us
     99%    1.23ms
  760000 requests in 8.00s, 80.00MB read
  Non-2xx or 3xx responses: 5
Requests/sec:  95000.12
Transfer/sec:      8.00MB
";
        let load = parse_wrk(report).expect("parsed");
        assert_eq!(load.requests, 760000);
        assert!((load.rps - 95000.12).abs() < 1e-6);
        assert!((load.p50_us - 312.0).abs() < 1e-6);
        assert!((load.p99_us - 1230.0).abs() < 1e-6);
        assert_eq!(load.errors.as_deref(), Some("Non-2xx or 3xx responses: 5"));
    }

    #[test]
    fn a_cold_split_counts_only_what_came_after_the_deploy() {
        let render = |copy: f64, count: u32, gateway: f64, ready: f64| {
            let mut text = String::new();
            for phase in PHASES {
                let sum = if phase == "copy" { copy } else { 0.001 * f64::from(count) };
                text += &format!("nexus_local_start_phase_seconds_sum{{phase=\"{phase}\"}} {sum}\n");
                text += &format!("nexus_local_start_phase_seconds_count{{phase=\"{phase}\"}} {count}\n");
            }
            text += &format!("nexus_panel_instance_start_seconds_sum{{mode=\"app\"}} {ready}\n");
            text += &format!("nexus_panel_instance_start_seconds_count{{mode=\"app\"}} {count}\n");
            text += "nexus_panel_instance_start_seconds_sum{mode=\"studio\"} 99\n";
            text += "nexus_panel_instance_start_seconds_count{mode=\"studio\"} 1\n";
            if count > 1 {
                text += &format!(
                    "nexus_gateway_cold_start_seconds_sum {gateway}\nnexus_gateway_cold_start_seconds_count 2\n"
                );
            }
            text
        };
        // The deploy's start (1 s copy) then two cold starts of 10 ms copies.
        let before = render(1.0, 1, 0.0, 1.1);
        let after = render(1.02, 3, 0.3, 1.38);
        let split = cold_split(&before, &after, 160.0);
        let ms = |step: &str| split.iter().find(|(s, _)| *s == step).expect(step).1;
        assert!((ms("copy") - 10.0).abs() < 1e-6, "{split:?}");
        assert!((ms("network") - 1.0).abs() < 1e-6, "{split:?}");
        assert!((ms("boot (spawned → ready)") - (140.0 - 15.0)).abs() < 1e-6, "{split:?}");
        assert!((ms("activation and route") - 10.0).abs() < 1e-6, "{split:?}");
        assert!((ms("request through") - 10.0).abs() < 1e-6, "{split:?}");
    }

    #[test]
    fn refuses_a_report_without_numbers() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_none());
        assert_eq!(micros("2.5s"), Some(2.5e6));
        assert_eq!(micros("fast"), None);
    }
}
