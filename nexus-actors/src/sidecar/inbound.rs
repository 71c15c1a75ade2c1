//! `CallForwarder`: tool calls from the bus to the panel. Each
//! [`ToolRequest`] on the panel's call channel becomes a
//! `POST /mcp/execute` (once per idempotency key), and its result or a clear
//! error goes back to the caller's reply channel. At most `max_calls` run at
//! once; past that a caller gets `busy` at once instead of waiting. A
//! hanging or crashing panel costs the caller its deadline, never more.
//!
//! A [`ToolCancel`] on the same channel aborts the named call's request to
//! the panel (the panel sees its connection close), and the call is not
//! answered: its caller has stopped waiting. [`Running`] knows the calls
//! that run, for cancellations and for the panel's progress reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::panel::PanelClient;
use crate::bus::redis::Publisher;
use crate::bus::{Bus, BusErrorKind, BusEvent};
use crate::envelope::Envelope;
use crate::kernel::{lock, Behaviour, Ctx, Handler, Kernel, Reply};
use crate::tools::panel_tool_name;
use crate::tools::protocol::{outcome_label, ToolCancel, ToolError, ToolRequest, ToolResponse, ToolResult};
use crate::tools::store::ToolStore;

/// Forwards calls from the bus to one panel.
pub struct CallForwarder {
    pub(super) kernel: Kernel,
    pub(super) panel_id: String,
    pub(super) panel: PanelClient,
    pub(super) store: ToolStore,
    pub(super) publish: Publisher,
    /// Calls now running; shared so a restart of this actor keeps the count.
    pub(super) in_flight: Arc<AtomicUsize>,
    pub(super) max_calls: usize,
    pub(super) running: Running,
}

/// The calls this sidecar has taken and not yet answered, by call id.
/// Shared with `/progress`, which sends a call's reports where it answers.
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<HashMap<String, RunningCall>>>);

struct RunningCall {
    caller: String,
    reply_to: String,
    stop: CancellationToken,
}

impl Running {
    /// Where call `call_id` answers, while it runs and is not cancelled.
    pub fn reply_to(&self, call_id: &str) -> Option<String> {
        lock(&self.0).get(call_id).filter(|call| !call.stop.is_cancelled()).map(|call| call.reply_to.clone())
    }

    /// Notes `request` as running until the guard drops; `None` when the
    /// same call was delivered twice (the first delivery is the one noted).
    fn start(&self, request: &ToolRequest) -> Option<Tracked> {
        let mut calls = lock(&self.0);
        let std::collections::hash_map::Entry::Vacant(entry) = calls.entry(request.call_id.clone()) else {
            return None;
        };
        let stop = CancellationToken::new();
        let call =
            RunningCall { caller: request.caller.clone(), reply_to: request.reply_to.clone(), stop: stop.clone() };
        entry.insert(call);
        Some(Tracked { running: self.clone(), call_id: request.call_id.clone(), stop })
    }

    /// Stops the call `cancel` names, if its caller asks; whether one stopped.
    fn stop(&self, cancel: &ToolCancel) -> bool {
        let calls = lock(&self.0);
        let Some(call) = calls.get(&cancel.call_id).filter(|call| call.caller == cancel.caller) else { return false };
        call.stop.cancel();
        true
    }
}

/// A call noted in [`Running`], taken out when this drops.
struct Tracked {
    running: Running,
    call_id: String,
    stop: CancellationToken,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.running.0).remove(&self.call_id);
    }
}

impl CallForwarder {
    /// The actor kind in the mailbox graph.
    pub const KIND: &'static str = "call_forwarder";

    /// A cancellation from the caller's node: the call's request to the
    /// panel is aborted where it runs.
    fn cancel(&self, envelope: Envelope<Value>) {
        match envelope.typed::<ToolCancel>() {
            Ok(cancel) => {
                let stopped = self.running.stop(&cancel.data);
                tracing::info!(call_id = %cancel.data.call_id, stopped, "tool call cancelled by its caller");
            }
            Err(error) => self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::ToolRequest, &error),
        }
    }

    fn forward(&self, envelope: Envelope<Value>) {
        let trace = envelope.trace_context();
        let request = match envelope.typed::<ToolRequest>() {
            Ok(request) => request.data,
            Err(error) => {
                self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::ToolRequest, &error);
                return;
            }
        };
        let span = tracing::info_span!("nexus.sidecar.call", tool = %request.tool, call_id = %request.call_id);
        trace.set_as_parent_of(&span);
        let (panel, store, publish) = (self.panel.clone(), self.store.clone(), self.publish.clone());
        let (metrics, source) = (self.kernel.metrics().clone(), format!("panel/{}", self.panel_id));
        let tool = panel_tool_name(&self.panel_id, &request.tool);
        let (in_flight, limit) = (self.in_flight.clone(), self.max_calls);
        // Noted before the call is spawned: a cancellation right behind it
        // on the channel finds it.
        let tracked = self.running.start(&request);
        let stop = tracked.as_ref().map(|t| t.stop.clone()).unwrap_or_default();
        actix::spawn(
            async move {
                let _tracked = tracked;
                // Admitted only once its key is claimed: a replica that is
                // full must not answer `busy` for a call another one runs.
                let work = async {
                    let admitted = in_flight
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
                        .is_ok();
                    if !admitted {
                        return Err(ToolError::Busy { limit });
                    }
                    let _guard = InFlight(in_flight.clone());
                    let work = async {
                        match &request.resource {
                            Some(uri) => panel.read_resource(&request, uri).await,
                            None => panel.execute(&request).await,
                        }
                    };
                    tokio::select! {
                        result = work => result,
                        // Dropping the request closes its connection: the panel can tell.
                        () = stop.cancelled() => Err(ToolError::Cancelled),
                    }
                };
                let answer = |result: ToolResult| async {
                    let outcome = outcome_label(&result);
                    metrics.sidecar_calls.with_label_values(&[outcome]).inc();
                    if stop.is_cancelled() {
                        // Nobody waits for it any more.
                        if !matches!(result, Err(ToolError::Cancelled)) {
                            metrics.tool_late_answers.with_label_values(&["sidecar"]).inc();
                            tracing::info!(call_id = %request.call_id, outcome, "nexus_tool_late_answers_total");
                        }
                        return;
                    }
                    if let Err(error) = &result {
                        tracing::info!(tool = %request.tool, outcome, %error, "nexus_sidecar_calls_total");
                    }
                    let response = ToolResponse { call_id: request.call_id.clone(), outcome: result.into() };
                    let envelope = Envelope::new(source, response).into_untyped();
                    if let Err(error) = publish.publish(request.reply_to.clone(), envelope).await {
                        metrics.bus_error(Bus::Redis, BusErrorKind::ToolResponse, &error);
                    }
                };
                store.run_once(&tool, &request, work, answer).await;
            }
            .instrument(span),
        );
    }
}

/// Counts one call in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Behaviour for CallForwarder {
    const KIND: &'static str = CallForwarder::KIND;
}

impl Handler<BusEvent> for CallForwarder {
    fn handle(&mut self, event: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
        if let BusEvent::Message(message) = event {
            let envelope = std::sync::Arc::unwrap_or_clone(message).envelope;
            match envelope.kind.as_str() {
                <ToolCancel as crate::envelope::Payload>::TYPE => self.cancel(envelope),
                _ => self.forward(envelope),
            }
        }
        Reply::Now(())
    }
}
