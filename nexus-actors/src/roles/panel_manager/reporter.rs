//! The reporter: writes instance statuses, routes and App records to Redis
//! and announces them, one write after the other in the order they were made.
//!
//! Order matters: a `ready` written before the `starting` it follows would
//! leave the wrong state in Redis. One task drains a queue, so neither the
//! manager nor a lifecycle waits for Redis. A write that fails is tried
//! again with backoff for up to [`RETRY_FOR`] (a Redis restart) before it
//! is given up (the manager's resync writes the state again later); after
//! one is given up, the next ones are tried once each until one succeeds,
//! so a long outage does not hold the queue for 30 s a write. It decides
//! nothing.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::store::{AppRecord, PmStore, StoreError};
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::instance::{InstanceChanged, InstanceStatus, PanelRoute, RouteChanged};
use crate::platform::channels;

/// One write, with its announcement.
#[derive(Debug)]
pub enum Report {
    /// HSET `nexus:instances:{panel}`, then [`InstanceChanged`] on `nexus:panels:{owner}`.
    Status(InstanceStatus),
    /// The same state written again (resync): HSET only, no announcement.
    StatusAgain(InstanceStatus),
    /// HSET `nexus:routes`, then [`RouteChanged`].
    Route(PanelRoute),
    /// SET `nexus:app:{panel}`: the deployed App record; `done` hears how it went.
    App(AppRecord, Written),
    /// DEL `nexus:app:{panel}`: the panel is no longer deployed.
    DeleteApp(String, Written),
    /// Removes the panel's route, App record, statuses and traffic signal,
    /// then [`RouteChanged`].
    ForgetPanel(String),
    /// Answers once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Where a write that its requester waits for reports how it went.
pub type Written = oneshot::Sender<Result<(), StoreError>>;

/// Queues writes for the reporter task. Cheap to clone.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Report>,
}

impl Reporter {
    /// Starts the task on the current arbiter. `keep_final` final statuses
    /// are kept per panel, so the UI can show why an instance ended.
    pub fn spawn(store: PmStore, publish: Publisher, node: String, keep_final: usize) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
        actix::spawn(async move {
            let mut budget = RETRY_FOR;
            while let Some(report) = rx.recv().await {
                write(&store, &publish, &node, keep_final, &mut budget, report).await;
            }
        });
        Reporter { tx }
    }

    /// Queues a write; never waits.
    pub fn send(&self, report: Report) {
        // The task lives as long as the arbiter; after that nothing is reported.
        let _ = self.tx.send(report);
    }

    /// Waits until every report queued so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Report::Flush(tx));
        let _ = rx.await;
    }
}

async fn announce<T: Payload>(publish: &Publisher, node: &str, channel: String, payload: T) {
    let envelope = Envelope::new(node.to_owned(), payload).into_untyped();
    // Announcements are best effort: the state is in Redis, and readers
    // resync from it when they miss one.
    if let Err(error) = publish.publish(channel, envelope).await {
        tracing::warn!(%error, "panel manager could not announce a change");
    }
}

/// How long a failed write is tried again before it is given up.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// `attempt` until it succeeds or `budget` has passed, pausing with
/// backoff between tries. A success restores the budget to [`RETRY_FOR`];
/// giving up spends it, so the next writes are tried once each.
async fn retrying<F, Fut>(what: &str, budget: &mut Duration, mut attempt: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let deadline = tokio::time::Instant::now() + *budget;
    let mut pause = FIRST_PAUSE;
    loop {
        match attempt().await {
            Ok(()) => {
                *budget = RETRY_FOR;
                return Ok(());
            }
            Err(error) if error.is_unavailable() && tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(what, %error, ?pause, "a panel manager write failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(error) => {
                *budget = Duration::ZERO;
                return Err(error);
            }
        }
    }
}

async fn write(
    store: &PmStore,
    publish: &Publisher,
    node: &str,
    keep_final: usize,
    budget: &mut Duration,
    report: Report,
) {
    match report {
        Report::Status(status) => {
            if let Err(error) = retrying("status", budget, || store.put_status(node, &status)).await {
                tracing::warn!(instance = %status.instance, %error, "could not write an instance status");
            }
            if status.state.is_final() {
                if let Err(error) = store.trim_final(&status.panel, keep_final).await {
                    tracing::warn!(panel = %status.panel, %error, "could not trim old instance statuses");
                }
            }
            let channel = channels::panels(&status.owner);
            announce(publish, node, channel, InstanceChanged { status }).await;
        }
        Report::StatusAgain(status) => {
            if let Err(error) = retrying("status", budget, || store.put_status(node, &status)).await {
                tracing::warn!(instance = %status.instance, %error, "could not write an instance status again");
            }
        }
        Report::Route(route) => {
            if let Err(error) = retrying("route", budget, || store.put_route(&route)).await {
                tracing::warn!(panel = %route.panel, %error, "could not write a route");
            }
            announce(publish, node, channels::ROUTES_CHANGED.to_owned(), RouteChanged { panel: route.panel }).await;
        }
        Report::App(app, done) => {
            let _ = done.send(retrying("app record", budget, || store.put_app(&app)).await);
        }
        Report::DeleteApp(panel, done) => {
            let _ = done.send(retrying("app record", budget, || store.delete_app(&panel)).await);
        }
        Report::ForgetPanel(panel) => {
            if let Err(error) = retrying("forget", budget, || store.forget_panel(&panel)).await {
                tracing::warn!(%panel, %error, "could not remove a deleted panel's state");
            }
            announce(publish, node, channels::ROUTES_CHANGED.to_owned(), RouteChanged { panel }).await;
        }
        Report::Flush(done) => {
            let _ = done.send(());
        }
    }
}
