//! What the kubernetes tests share: a driver on a mock API server.
#![allow(dead_code)]

use std::time::Duration;

use nexus_actors::instance::InstanceMode;
use nexus_actors::roles::panel_manager::driver::{Code, InstanceSpec, Snapshot, Volume};
use nexus_actors::roles::panel_manager::kubernetes::{claim_name, KubeConfig, KubeDriver, Retry, Templates};
use nexus_actors::telemetry::Metrics;
use nexus_testkit::kube_api::MockKube;

/// The panels' namespace in every test.
pub(crate) const NS: &str = "nexus-panels";

/// A client of `mock`, in [`NS`].
pub(crate) fn client(mock: &MockKube) -> kube::Client {
    let mut config = kube::Config::new(mock.url().parse().expect("the mock's URL"));
    config.default_namespace = NS.to_owned();
    kube::Client::try_from(config).expect("a client")
}

/// Settings with short timers.
pub(crate) fn settings() -> KubeConfig {
    KubeConfig {
        start_timeout: Duration::from_secs(10),
        retry: Retry {
            timeout: Duration::from_secs(2),
            first_wait: Duration::from_millis(10),
            max_wait: Duration::from_millis(50),
            attempts: 4,
        },
        ..KubeConfig::new(NS)
    }
}

/// A driver on `mock` with the built-in templates.
pub(crate) fn driver(mock: &MockKube) -> KubeDriver {
    KubeDriver::with_client(settings(), Templates::embedded(), client(mock), Metrics::new()).expect("a driver")
}

/// A Studio instance of `panel`.
pub(crate) fn studio(panel: &str, instance: &str, owner: &str) -> InstanceSpec {
    let volume = Volume { panel: panel.to_owned(), location: claim_name(panel).into() };
    InstanceSpec {
        instance: instance.to_owned(),
        panel: panel.to_owned(),
        owner: owner.to_owned(),
        mode: InstanceMode::Studio,
        code: Code::Studio(volume),
        watchdog_timeout: Some(Duration::from_secs(60)),
    }
}

/// An App instance of `snapshot`.
pub(crate) fn app(snapshot: Snapshot, instance: &str) -> InstanceSpec {
    InstanceSpec {
        instance: instance.to_owned(),
        panel: snapshot.panel.clone(),
        owner: "alice".to_owned(),
        mode: InstanceMode::App,
        code: Code::App(snapshot),
        watchdog_timeout: None,
    }
}

/// Waits up to 5 s for `check`.
pub(crate) async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
