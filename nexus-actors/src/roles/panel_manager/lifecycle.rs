//! `PodLifecycle`: the life of one panel instance, as a kernel actor.
//!
//! pending → (driver started it) starting → (`GET /manifest` answered 200)
//! ready ⇄ idle; a crash restarts the user process with exponential backoff
//! and too many crashes in a window end in `failed` with the log tail; a
//! stop goes through stopping to stopped. Every transition goes to the
//! [`PanelManager`](super::manager::PanelManager) as a [`Transition`]; the
//! manager records it, announces it and keeps the route. This actor decides
//! *when*; the [`RuntimeDriver`] knows *how*; it never touches Redis.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{ActorContext, ActorFutureExt, AsyncContext};
use tokio::sync::oneshot;

use super::driver::{DriverError, InstanceEvent, InstanceSpec, LimitHit, RuntimeDriver, Started};
use super::metrics::mode_label;
use crate::instance::{Endpoint, InstanceState, InstanceStatus, Isolation, SIDECAR_TOKEN_HEADER};
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Link, Message, Reply, Supervised};
use crate::telemetry::Metrics;

/// How long after a start `/manifest` is asked every
/// [`EAGER_PROBE_INTERVAL`] rather than every `probe_interval`.
pub const EAGER_PROBES: Duration = Duration::from_secs(3);
const EAGER_PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Timing and crash policy of every lifecycle of one panel manager.
#[derive(Debug, Clone)]
pub struct LifecyclePolicy {
    /// From started to `/manifest` answering 200; past it the instance fails.
    pub ready_timeout: Duration,
    /// How often `/manifest` is asked while starting, after the first
    /// [`EAGER_PROBES`] (when most panels come up) asked every 20 ms at most.
    pub probe_interval: Duration,
    /// The first restart waits this long; every further crash doubles it.
    pub restart_backoff: Duration,
    /// The longest wait before a restart.
    pub max_restart_backoff: Duration,
    /// More crashes than this within `crash_window` end in `failed`.
    pub max_crashes: usize,
    /// See `max_crashes`.
    pub crash_window: Duration,
    /// A serving instance without a request for this long is `idle`.
    pub idle_mark: Duration,
    /// Lines of the user process's log kept in a failed status.
    pub log_tail_lines: usize,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A lifecycle's new state, for its manager.
#[derive(Debug, Clone)]
pub struct Transition {
    /// The instance's status now.
    pub status: InstanceStatus,
    /// Where it serves, while it serves.
    pub endpoint: Option<Endpoint>,
    /// The state it was already in, told again for the manager's resync:
    /// written again, nothing decided. (It goes the way transitions go, so
    /// it is never written after a newer one.)
    pub again: bool,
}

/// Tell the current state again ([`Transition::again`]).
pub struct TellAgain;

impl Message for TellAgain {
    type Reply = ();
}

impl Message for Transition {
    type Reply = ();
}

/// Stops the instance (SIGTERM, SIGKILL after `grace`); replies with its
/// final status once it is stopped (at once when it already ended).
pub struct Stop {
    /// Why, for the final status.
    pub reason: String,
    /// SIGTERM to SIGKILL.
    pub grace: Duration,
}

impl Message for Stop {
    type Reply = InstanceStatus;
}

/// When the panel last had a request (unix ms, from the gateway), to tell
/// `ready` from `idle`.
pub struct Traffic {
    /// Unix ms; `None` when the gateway never forwarded a request.
    pub last_request_ms: Option<u64>,
}

impl Message for Traffic {
    type Reply = ();
}

/// The driver reported what happened to the instance.
struct Happened(InstanceEvent);

impl Message for Happened {
    type Reply = ();
}

/// What a lifecycle needs besides its spec.
#[derive(Clone)]
pub struct LifecycleDeps {
    /// Starts, restarts and stops the instance.
    pub driver: Arc<dyn RuntimeDriver>,
    /// Timers and the crash policy.
    pub policy: LifecyclePolicy,
    /// Hears every transition.
    pub manager: Link<Transition>,
    /// The node's metrics.
    pub metrics: Metrics,
    /// The readiness probe's client.
    pub http: reqwest::Client,
}

/// Why an instance did not answer its readiness probe in time (the last
/// attempt's failure).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no answer yet")]
    NoAnswer,
    #[error("GET /manifest answered {0}")]
    Status(reqwest::StatusCode),
    #[error("GET /manifest failed: {0}")]
    Failed(#[from] reqwest::Error),
}

/// The life of one instance; see the module documentation.
pub struct PodLifecycle {
    spec: InstanceSpec,
    deps: LifecycleDeps,
    /// Set once the driver was asked to start; shared with the factory, so
    /// a lifecycle rebuilt after a panic knows not to start a second copy.
    launched: Arc<AtomicBool>,
    status: InstanceStatus,
    endpoint: Option<Endpoint>,
    /// The instance's sidecar secret, sent with every readiness probe.
    sidecar_token: Option<String>,
    warning: Option<String>,
    created: Instant,
    /// When it first served (unix ms): the idle clock starts there.
    serving_since_ms: Option<u64>,
    /// Grows with every (re)start, so a late probe or timer of an earlier
    /// run is ignored.
    attempt: u64,
    crashes: VecDeque<Instant>,
    /// How the user process last ended, and whether the runtime restarted
    /// it by itself, for the reason of a restart that never serves.
    last_exit: Option<(String, bool)>,
    /// A stop (or a failure) is under way; later stops only wait for it.
    ending: bool,
    /// A stop asked for while the driver was still starting the instance.
    stop_when_started: Option<(String, Duration)>,
    waiters: Vec<oneshot::Sender<InstanceStatus>>,
    me: Option<ActorRef<PodLifecycle>>,
}

impl PodLifecycle {
    /// The actor kind in the mailbox graph.
    pub const KIND: &'static str = "pod_lifecycle";

    /// The status an instance has before its lifecycle runs.
    pub fn pending_status(spec: &InstanceSpec) -> InstanceStatus {
        InstanceStatus {
            instance: spec.instance.clone(),
            panel: spec.panel.clone(),
            owner: spec.owner.clone(),
            mode: spec.mode,
            state: InstanceState::Pending,
            isolation: Isolation::None,
            reason: None,
            log_tail: Vec::new(),
            restarts: 0,
            since_ms: now_ms(),
        }
    }

    /// Spawns the lifecycle of `spec` on the current arbiter; it starts the
    /// instance at once.
    pub fn spawn(kernel: &crate::kernel::Kernel, spec: InstanceSpec, deps: LifecycleDeps) -> ActorRef<PodLifecycle> {
        let launched = Arc::new(AtomicBool::new(false));
        let id = format!("pod-{}", spec.instance);
        kernel.spawn(id, move || PodLifecycle {
            status: Self::pending_status(&spec),
            spec: spec.clone(),
            deps: deps.clone(),
            launched: launched.clone(),
            endpoint: None,
            sidecar_token: None,
            warning: None,
            created: Instant::now(),
            serving_since_ms: None,
            attempt: 0,
            crashes: VecDeque::new(),
            last_exit: None,
            ending: false,
            stop_when_started: None,
            waiters: Vec::new(),
            me: None,
        })
    }

    /// Moves to `state` and tells the manager. `reason` says why; the
    /// isolation warning is kept next to it so the user always sees it.
    fn set(&mut self, state: InstanceState, reason: Option<String>) {
        self.status.state = state;
        self.status.since_ms = now_ms();
        self.status.reason = match (reason, &self.warning) {
            (Some(r), Some(w)) => Some(format!("{r}; {w}")),
            (Some(r), None) => Some(r),
            (None, w) => w.clone(),
        };
        if state.serves() && self.serving_since_ms.is_none() {
            self.serving_since_ms = Some(self.status.since_ms);
        }
        tracing::info!(
            instance = %self.spec.instance,
            panel = %self.spec.panel,
            state = ?state,
            reason = self.status.reason.as_deref().unwrap_or(""),
            "panel instance state"
        );
        let endpoint = if state.serves() { self.endpoint.clone() } else { None };
        let _ = self.deps.manager.tell(Transition { status: self.status.clone(), endpoint, again: false });
    }

    fn launch(&mut self, ctx: &mut Ctx<Self>) {
        let (driver, spec) = (self.deps.driver.clone(), self.spec.clone());
        let fut = async move { driver.start(spec).await };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(|result, s, ctx| {
            s.behaviour_mut().launched(result, ctx);
        }));
    }

    fn launched(&mut self, result: Result<Started, DriverError>, ctx: &mut Ctx<Self>) {
        let started = match result {
            Ok(started) => started,
            Err(error) => {
                self.ending = true;
                if let Some((reason, _)) = self.stop_when_started.take() {
                    return self.finish(InstanceState::Stopped, Some(reason), ctx);
                }
                self.deps.metrics.panel_instance_failures.inc();
                tracing::warn!(instance = %self.spec.instance, %error, "nexus_panel_instance_failures_total");
                return self.finish(InstanceState::Failed, Some(format!("could not start: {error}")), ctx);
            }
        };
        self.endpoint = Some(started.endpoint);
        self.sidecar_token = started.sidecar_token;
        self.status.isolation = started.isolation;
        self.warning = started.warning;
        if let Some(me) = &self.me {
            let happened = me.link::<Happened>("runtime-driver");
            let mut events = started.events;
            actix::spawn(async move {
                while let Some(event) = events.recv().await {
                    if happened.tell(Happened(event)).is_err() {
                        return;
                    }
                }
            });
        }
        if let Some((reason, grace)) = self.stop_when_started.take() {
            return self.stop_now(reason, grace, ctx);
        }
        self.set(InstanceState::Starting, None);
        self.probe(ctx);
    }

    /// Polls `GET /manifest` until it answers 200 or the ready timeout passes.
    fn probe(&mut self, ctx: &mut Ctx<Self>) {
        let Some(endpoint) = &self.endpoint else { return };
        let attempt = self.attempt;
        let url = format!("http://{}/manifest", endpoint.addr);
        let (http, policy, token) = (self.deps.http.clone(), self.deps.policy.clone(), self.sidecar_token.clone());
        let fut = async move {
            let started = tokio::time::Instant::now();
            let deadline = started + policy.ready_timeout;
            let mut last = ProbeError::NoAnswer;
            while tokio::time::Instant::now() < deadline {
                let mut request = http.get(&url).timeout(policy.probe_interval.max(Duration::from_secs(1)));
                // The panel answers `/manifest` to its sidecar's secret only.
                if let Some(token) = &token {
                    request = request.header(SIDECAR_TOKEN_HEADER, token);
                }
                match request.send().await {
                    Ok(resp) if resp.status().is_success() => return Ok(()),
                    Ok(resp) => last = ProbeError::Status(resp.status()),
                    Err(error) => last = ProbeError::Failed(error),
                }
                // A refused connection costs nothing: ask often while a
                // cold start is likely to finish, so none waits a whole
                // interval for its answer to be seen.
                let eager = started.elapsed() < EAGER_PROBES;
                let wait = if eager { policy.probe_interval.min(EAGER_PROBE_INTERVAL) } else { policy.probe_interval };
                tokio::time::sleep(wait).await;
            }
            Err(last)
        };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |result, s, ctx| {
            s.behaviour_mut().probed(attempt, result, ctx);
        }));
    }

    fn probed(&mut self, attempt: u64, result: Result<(), ProbeError>, ctx: &mut Ctx<Self>) {
        if attempt != self.attempt || self.ending || self.status.state != InstanceState::Starting {
            return;
        }
        match result {
            Ok(()) => {
                self.last_exit = None;
                if self.serving_since_ms.is_none() {
                    let mode = mode_label(self.spec.mode);
                    let seconds = self.created.elapsed().as_secs_f64();
                    self.deps.metrics.panel_instance_start_seconds.with_label_values(&[mode]).observe(seconds);
                    tracing::info!(instance = %self.spec.instance, seconds, "nexus_panel_instance_start_seconds");
                }
                self.set(InstanceState::Ready, None);
            }
            Err(last) => {
                let timeout = self.deps.policy.ready_timeout.as_secs_f64();
                let restarts = self.status.restarts;
                let reason = match &self.last_exit {
                    // A runtime that restarts by itself backs off longer
                    // and longer: this is where its crash loop ends.
                    Some((exit, true)) if self.crashes.len() >= 2 => {
                        format!("crash loop: not serving within {timeout}s of restart {restarts} (last {exit}; {last})")
                    }
                    Some((exit, _)) => {
                        format!("not ready within {timeout}s after restart {restarts} (last {exit}; {last})")
                    }
                    None => format!("not ready within {timeout}s ({last})"),
                };
                self.fail(reason, ctx);
            }
        }
    }

    fn exited(&mut self, code: Option<i32>, limit: Option<LimitHit>, restarted: bool, ctx: &mut Ctx<Self>) {
        if self.ending
            || !matches!(self.status.state, InstanceState::Starting | InstanceState::Ready | InstanceState::Idle)
        {
            return;
        }
        self.attempt += 1;
        let now = Instant::now();
        let window = self.deps.policy.crash_window;
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.crashes.pop_front();
        }
        let exit = match (code, limit) {
            (_, Some(LimitHit::Memory)) => format!("killed: {}", LimitHit::Memory),
            (Some(code), Some(limit)) => format!("exit code {code} ({limit} reached)"),
            (None, Some(limit)) => format!("killed by a signal ({limit} reached)"),
            (Some(code), None) => format!("exit code {code}"),
            (None, None) => "killed by a signal".to_owned(),
        };
        let crashes = self.crashes.len();
        if crashes > self.deps.policy.max_crashes {
            return self.fail(format!("crashed {crashes} times; last {exit}"), ctx);
        }
        let policy = &self.deps.policy;
        let backoff = policy.restart_backoff.saturating_mul(1 << (crashes - 1).min(16)).min(policy.max_restart_backoff);
        self.status.restarts += 1;
        self.deps.metrics.panel_instance_restarts.inc();
        tracing::warn!(
            instance = %self.spec.instance,
            %exit,
            backoff_ms = backoff.as_millis() as u64,
            "nexus_panel_instance_restarts_total"
        );
        let reason = format!("restarting after {exit} (restart {})", self.status.restarts);
        self.last_exit = Some((exit, restarted));
        self.set(InstanceState::Starting, Some(reason));
        if restarted {
            // The runtime restarts it with a backoff of its own.
            return self.probe(ctx);
        }
        let attempt = self.attempt;
        ctx.run_later(backoff, move |s, ctx| s.behaviour_mut().restart(attempt, ctx));
    }

    /// The instance is gone from under the driver (deleted or evicted):
    /// ends, `failed` (evicted) as any failure, else `stopped`.
    fn gone(&mut self, reason: String, failed: bool, ctx: &mut Ctx<Self>) {
        if self.ending {
            return;
        }
        self.attempt += 1;
        if failed {
            return self.fail(reason, ctx);
        }
        self.wind_up(InstanceState::Stopped, reason, ctx);
    }

    fn restart(&mut self, attempt: u64, ctx: &mut Ctx<Self>) {
        if attempt != self.attempt || self.ending {
            return;
        }
        let (driver, instance) = (self.deps.driver.clone(), self.spec.instance.clone());
        let fut = async move { driver.restart(&instance).await };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |result, s, ctx| {
            let this = s.behaviour_mut();
            if attempt != this.attempt || this.ending {
                return;
            }
            match result {
                Ok(()) => this.probe(ctx),
                Err(error) => this.fail(format!("restart failed: {error}"), ctx),
            }
        }));
    }

    /// Ends in `failed`: keeps the log tail, then stops what is left.
    fn fail(&mut self, reason: String, ctx: &mut Ctx<Self>) {
        self.deps.metrics.panel_instance_failures.inc();
        tracing::warn!(instance = %self.spec.instance, %reason, "nexus_panel_instance_failures_total");
        self.wind_up(InstanceState::Failed, reason, ctx);
    }

    /// Ends in `state` without a grace: keeps the log tail of a failure,
    /// has the driver free what is left of the instance, then finishes.
    fn wind_up(&mut self, state: InstanceState, reason: String, ctx: &mut Ctx<Self>) {
        self.ending = true;
        let (driver, instance) = (self.deps.driver.clone(), self.spec.instance.clone());
        let lines = (state == InstanceState::Failed).then_some(self.deps.policy.log_tail_lines);
        let fut = async move {
            let tail = match lines {
                Some(lines) => driver.logs(&instance, lines).await.unwrap_or_else(|e| vec![format!("(no log: {e})")]),
                None => Vec::new(),
            };
            if let Err(error) = driver.stop(&instance, Duration::ZERO).await {
                tracing::warn!(%instance, %error, "could not free what an ended instance held");
            }
            tail
        };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |tail, s, ctx| {
            let this = s.behaviour_mut();
            this.status.log_tail = tail;
            this.finish(state, Some(reason), ctx);
        }));
    }

    fn stop_now(&mut self, reason: String, grace: Duration, ctx: &mut Ctx<Self>) {
        self.ending = true;
        self.set(InstanceState::Stopping, Some(reason.clone()));
        let (driver, instance) = (self.deps.driver.clone(), self.spec.instance.clone());
        let fut = async move { driver.stop(&instance, grace).await };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |result, s, ctx| {
            let this = s.behaviour_mut();
            match result {
                Ok(()) => this.finish(InstanceState::Stopped, Some(reason), ctx),
                Err(error) => {
                    this.deps.metrics.panel_instance_failures.inc();
                    tracing::warn!(instance = %this.spec.instance, %error, "nexus_panel_instance_failures_total");
                    this.finish(InstanceState::Failed, Some(format!("{reason}; stopping failed: {error}")), ctx);
                }
            }
        }));
    }

    /// Reports the final state, answers everyone waiting for it and stops.
    fn finish(&mut self, state: InstanceState, reason: Option<String>, ctx: &mut Ctx<Self>) {
        self.set(state, reason);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(self.status.clone());
        }
        ctx.stop();
    }
}

impl Behaviour for PodLifecycle {
    const KIND: &'static str = PodLifecycle::KIND;

    fn started(&mut self, me: &ActorRef<Self>, ctx: &mut Ctx<Self>) {
        self.me = Some(me.clone());
        if self.launched.swap(true, Ordering::SeqCst) {
            // Rebuilt after a panic: the instance's run is unknown, so end
            // it rather than guess (the user can start it again).
            self.fail("the panel manager lost track of this instance".to_owned(), ctx);
            return;
        }
        self.set(InstanceState::Pending, None);
        self.launch(ctx);
    }
}

impl Handler<Stop> for PodLifecycle {
    fn handle(&mut self, msg: Stop, ctx: &mut Ctx<Self>) -> Reply<InstanceStatus> {
        if self.status.state.is_final() {
            return Reply::Now(self.status.clone());
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        if !self.ending {
            if self.endpoint.is_none() {
                // The driver is still starting it: stop once it has.
                self.ending = true;
                self.set(InstanceState::Stopping, Some(msg.reason.clone()));
                self.stop_when_started = Some((msg.reason, msg.grace));
            } else {
                self.stop_now(msg.reason, msg.grace, ctx);
            }
        }
        let current = self.status.clone();
        Reply::later(async move { rx.await.unwrap_or(current) })
    }
}

impl Handler<Traffic> for PodLifecycle {
    fn handle(&mut self, msg: Traffic, _: &mut Ctx<Self>) -> Reply<()> {
        if self.ending || !self.status.state.serves() {
            return Reply::Now(());
        }
        let since = self.serving_since_ms.unwrap_or(self.status.since_ms);
        let reference = msg.last_request_ms.unwrap_or(0).max(since);
        let quiet = Duration::from_millis(now_ms().saturating_sub(reference));
        let idle = quiet >= self.deps.policy.idle_mark;
        match (self.status.state, idle) {
            (InstanceState::Ready, true) => {
                let reason = format!("no request for {}s", quiet.as_secs());
                self.set(InstanceState::Idle, Some(reason));
            }
            (InstanceState::Idle, false) => self.set(InstanceState::Ready, None),
            _ => {}
        }
        Reply::Now(())
    }
}

impl Handler<TellAgain> for PodLifecycle {
    fn handle(&mut self, _: TellAgain, _: &mut Ctx<Self>) -> Reply<()> {
        if !self.status.state.is_final() {
            let endpoint = if self.status.state.serves() { self.endpoint.clone() } else { None };
            let _ = self.deps.manager.tell(Transition { status: self.status.clone(), endpoint, again: true });
        }
        Reply::Now(())
    }
}

impl Handler<Happened> for PodLifecycle {
    fn handle(&mut self, Happened(event): Happened, ctx: &mut Ctx<Self>) -> Reply<()> {
        match event {
            InstanceEvent::Exited { code, limit, restarted } => self.exited(code, limit, restarted, ctx),
            InstanceEvent::Gone { reason, failed } => self.gone(reason, failed, ctx),
        }
        Reply::Now(())
    }
}
