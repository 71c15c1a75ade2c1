//! The Studio watchdog against a real redis-server: heartbeats keep the
//! instance, silence gets an `ExpireInstance` on the instance's control
//! channel (repeated until the watchdog stops), heartbeats without the
//! instance's token are refused and do not keep it, bad requests and
//! configurations are refused, and with a network namespace the listener
//! exists only inside it.

mod common;
mod raw_http;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use common::Collector;
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::bus::BusEvent;
use nexus_actors::infra::free_port;
use nexus_actors::instance::ExpireInstance;
use nexus_actors::netns::{self, Netns, NetnsThread};
use nexus_actors::platform::channels;
use nexus_actors::watchdog::{self, RedisExpiry, Watchdog, WatchdogConfig, WatchdogError, MAX_TIMEOUT, TOKEN_HEADER};
use nexus_actors::Kernel;
use nexus_testkit::{eventually, prerequisite, Brokers};
use serde_json::Value;

/// A redis-server and everything published on one instance's control channel.
struct Harness {
    brokers: Brokers,
    expiries: Arc<Mutex<Vec<BusEvent>>>,
    _kernel: Kernel,
}

impl Harness {
    async fn new(name: &str, instance: &str) -> Harness {
        let brokers = Brokers::redis(name);
        let kernel = Kernel::new("watchdog-test");
        let bridge = RedisBridge::spawn(&kernel, &Arbiter::new().handle(), &brokers.redis_url()).unwrap();
        let expiries = Arc::new(Mutex::new(Vec::new()));
        let events = expiries.clone();
        let collector = kernel.spawn("collector", move || Collector { events: events.clone() });
        let topic = Topic::Channel(channels::instance_control(instance));
        bridge
            .link::<Subscribe>("test")
            .ask(Subscribe { topic, subscriber: collector.link("redis") })
            .await
            .unwrap()
            .unwrap();
        Harness { brokers, expiries, _kernel: kernel }
    }

    fn config(&self, instance: &str, timeout_s: u64) -> WatchdogConfig {
        WatchdogConfig {
            listen: format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap(),
            timeout: Duration::from_secs(timeout_s),
            repeat: Duration::from_millis(200),
            ..WatchdogConfig::new(instance, "panel-1", self.brokers.redis_url())
        }
    }

    async fn start(&self, config: WatchdogConfig) -> (String, actix_web::dev::ServerHandle) {
        let expiry = RedisExpiry::connect(&self.brokers.redis_url()).await.unwrap();
        let watchdog = watchdog::start(config, Arc::new(expiry)).await.unwrap();
        let (url, handle) = (format!("http://{}", watchdog.local_addr()), watchdog.handle());
        actix::spawn(watchdog.run());
        (url, handle)
    }

    fn received(&self) -> Vec<ExpireInstance> {
        self.expiries
            .lock()
            .unwrap()
            .iter()
            .filter_map(|event| match event {
                BusEvent::Message(m) => {
                    Some(m.envelope.clone().typed::<ExpireInstance>().expect("an ExpireInstance").data)
                }
                _ => None,
            })
            .collect()
    }
}

async fn post(url: &str) -> (u16, Value) {
    post_with_token(url, None).await
}

async fn post_with_token(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url);
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[actix_rt::test]
async fn heartbeats_keep_the_instance_and_silence_then_expires_it() {
    let h = Harness::new("watchdog-alive", "inst-a").await;
    let (url, _handle) = h.start(h.config("inst-a", 2)).await;

    // Heartbeats every 500 ms for 3 s: past the 2 s timeout, never expired.
    for _ in 0..6 {
        let (status, body) = post(&format!("{url}/heartbeat")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["instance"], "inst-a");
        assert_eq!(body["expires_in_s"], 2);
        actix::clock::sleep(Duration::from_millis(500)).await;
    }
    assert!(h.received().is_empty(), "expired despite heartbeats: {:?}", h.received());
    let health: Value = reqwest::get(format!("{url}/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!(health["expired"], false);

    // Then silence: it asks for the deletion.
    eventually(10, "an ExpireInstance after the heartbeats stop", || !h.received().is_empty()).await;
    let expire = &h.received()[0];
    assert_eq!(expire.instance, "inst-a");
    assert_eq!(expire.reason, "no heartbeat for 2 s");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_watchdog_heartbeats_total 6"), "{metrics}");
    assert!(metrics.contains("nexus_watchdog_expiries_total 1"), "{metrics}");
}

#[actix_rt::test]
async fn with_a_token_only_heartbeats_carrying_it_keep_the_instance() {
    let h = Harness::new("watchdog-token", "inst-t").await;
    let mut config = h.config("inst-t", 2);
    config.token = Some("s3cret-token".into());
    let (url, _handle) = h.start(config).await;
    let heartbeat = format!("{url}/heartbeat");

    // The right token keeps it past the 2 s timeout.
    for _ in 0..6 {
        let (status, body) = post_with_token(&heartbeat, Some("s3cret-token")).await;
        assert_eq!(status, 200, "{body}");
        actix::clock::sleep(Duration::from_millis(500)).await;
    }
    assert!(h.received().is_empty(), "expired despite heartbeats with the token: {:?}", h.received());

    // Without it, with a wrong one of the same or another length, or an
    // empty one (what the panel's own code can send): 401, and the clock
    // runs on, so the instance expires although the heartbeats keep coming.
    let wrong = [None, Some("s3cret-tokeN"), Some("s3cret"), Some("s3cret-token-and-more"), Some("")];
    let mut refused = 0;
    while h.received().is_empty() {
        assert!(refused < 40, "no ExpireInstance after {refused} refused heartbeats");
        for token in wrong {
            let (status, body) = post_with_token(&heartbeat, token).await;
            if status == 410 {
                break;
            }
            assert_eq!(status, 401, "token {token:?}: {body}");
            assert_eq!(body["error"], "unauthorized");
            refused += 1;
        }
        actix::clock::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(h.received()[0].instance, "inst-t");
    assert_eq!(h.received()[0].reason, "no heartbeat for 2 s");
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_watchdog_heartbeats_total 6"), "refused ones are not heartbeats: {metrics}");
    assert!(metrics.contains(&format!("nexus_watchdog_refused_heartbeats_total {refused}")), "{metrics}");
    // Once expired, even the right token is too late.
    assert_eq!(post_with_token(&heartbeat, Some("s3cret-token")).await.0, 410);
}

#[actix_rt::test]
async fn without_heartbeats_it_asks_again_and_again_and_a_late_heartbeat_is_gone() {
    let h = Harness::new("watchdog-silent", "inst-b").await;
    let (url, handle) = h.start(h.config("inst-b", 1)).await;

    // Startup counted as the only heartbeat; nobody acts on the first ask, so it repeats.
    eventually(10, "the ExpireInstance, repeated", || h.received().len() >= 2).await;
    assert!(h.received().iter().all(|e| e.instance == "inst-b" && e.reason == "no heartbeat for 1 s"));

    let (status, body) = post(&format!("{url}/heartbeat")).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"], "expired");
    let health: Value = reqwest::get(format!("{url}/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!((health["expired"].clone(), health["expires_in_s"].clone()), (Value::Bool(true), 0.into()));
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_watchdog_heartbeats_total 0"), "{metrics}");
    assert!(metrics.contains("nexus_watchdog_expiries_total 1"), "counted once per expiry: {metrics}");

    // Stopped with its instance, it stops asking.
    handle.stop(true).await;
    actix::clock::sleep(Duration::from_millis(300)).await;
    let asked = h.received().len();
    actix::clock::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.received().len(), asked, "a stopped watchdog kept asking");
}

#[actix_rt::test]
async fn bad_requests_and_bad_configurations_are_refused() {
    let h = Harness::new("watchdog-bad", "inst-c").await;
    let (url, _handle) = h.start(h.config("inst-c", 60)).await;
    let client = reqwest::Client::new();
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(client.get(format!("{url}/heartbeat")).send().await.unwrap()), 405);
    assert_eq!(status(client.post(format!("{url}/healthz")).send().await.unwrap()), 405);
    assert_eq!(status(client.get(format!("{url}/nope")).send().await.unwrap()), 404);
    assert_eq!(status(client.post(format!("{url}/heartbeat/inst-c")).send().await.unwrap()), 404);
    let health: Value = client.get(format!("{url}/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["expired"], false, "a refused request must not touch the clock");

    let redis_url = h.brokers.redis_url();
    let start = |config: WatchdogConfig| {
        let redis_url = redis_url.clone();
        async move {
            let expiry = RedisExpiry::connect(&redis_url).await.unwrap();
            watchdog::start(config, Arc::new(expiry)).await.map(|_: Watchdog| ())
        }
    };
    let mut outside = h.config("inst-c", 60);
    outside.listen = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(start(outside).await, Err(WatchdogError::NotLoopback(_))));
    let mut instant = h.config("inst-c", 60);
    instant.timeout = Duration::from_millis(10);
    assert!(matches!(start(instant).await, Err(WatchdogError::TimeoutTooShort)));
    // A timeout that would overflow the clock is refused, not a dead timer.
    for huge in [Duration::from_secs(u64::MAX), MAX_TIMEOUT + Duration::from_secs(1)] {
        let mut forever = h.config("inst-c", 60);
        forever.timeout = huge;
        match start(forever).await {
            Err(error @ WatchdogError::TimeoutTooLong(_)) => {
                assert!(error.to_string().contains("at most 2592000 s"), "{error}")
            }
            other => panic!("a {huge:?} timeout was not refused: {:?}", other.err()),
        }
    }
    let mut empty_token = h.config("inst-c", 60);
    empty_token.token = Some(String::new());
    assert!(matches!(start(empty_token).await, Err(WatchdogError::EmptyToken)));
    let mut nowhere = h.config("inst-c", 60);
    nowhere.netns = Some("/run/netns/nexus-no-such-namespace".into());
    assert!(matches!(start(nowhere).await, Err(WatchdogError::Netns(_))));

    let closed = format!("redis://127.0.0.1:{}", free_port().unwrap());
    assert!(RedisExpiry::connect(&closed).await.is_err(), "connected to a closed port");
    let mut no_redis = h.config("inst-c", 60);
    no_redis.redis_url = closed;
    assert!(matches!(watchdog::run(no_redis).await, Err(WatchdogError::Expiry(_))));
}

#[actix_rt::test]
async fn the_longest_timeout_runs_and_counts_down() {
    let h = Harness::new("watchdog-longest", "inst-l").await;
    let mut config = h.config("inst-l", 60);
    config.timeout = MAX_TIMEOUT;
    let (url, _handle) = h.start(config).await;
    let (status, body) = post(&format!("{url}/heartbeat")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in_s"], MAX_TIMEOUT.as_secs());
    let health: Value = reqwest::get(format!("{url}/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!(health["expired"], false, "the timer is alive: {health}");
    assert!(h.received().is_empty());
}

/// Deletes the namespace when the test ends, passed or not.
struct NetnsGuard(Netns);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

#[actix_rt::test]
async fn in_a_namespace_the_listener_is_only_inside() {
    if !prerequisite(netns::supported(), "the watchdog-in-a-namespace test needs root and iproute2") {
        return;
    }
    let guard = NetnsGuard(Netns::create(&format!("nexus-wd-{}", std::process::id())).unwrap());
    let h = Harness::new("watchdog-netns", "inst-d").await;
    let mut config = h.config("inst-d", 60);
    config.netns = Some(guard.0.path());
    let (url, _handle) = h.start(config.clone()).await;

    let from_host = reqwest::Client::new().post(format!("{url}/heartbeat")).send().await;
    assert!(from_host.is_err(), "the watchdog answered from the host: {from_host:?}");

    let inside = NetnsThread::enter(&guard.0.path()).unwrap();
    let mut stream = raw_http::connect_inside(&inside, config.listen).unwrap();
    let answer = raw_http::request(&mut stream, "POST", "/heartbeat", "").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!((body["instance"].as_str(), body["expires_in_s"].as_u64()), (Some("inst-d"), Some(60)));
    assert!(h.received().is_empty());
}
