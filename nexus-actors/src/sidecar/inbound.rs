//! `CallForwarder`: tool calls from the bus to the panel. Each
//! [`ToolRequest`] on the panel's call channel becomes a
//! `POST /mcp/execute` (once per idempotency key), and its result or a clear
//! error goes back to the caller's reply channel. At most `max_calls` run at
//! once; past that a caller gets `busy` at once instead of waiting. A
//! hanging or crashing panel costs the caller its deadline, never more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tracing::Instrument;

use super::panel::PanelClient;
use crate::bus::redis::Publisher;
use crate::bus::{Bus, BusErrorKind, BusEvent};
use crate::envelope::Envelope;
use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Reply};
use crate::tools::panel_tool_name;
use crate::tools::protocol::{outcome_label, ToolError, ToolRequest, ToolResponse, ToolResult};
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
}

impl CallForwarder {
    /// The actor kind in the mailbox graph.
    pub const KIND: &'static str = "call_forwarder";

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
        actix::spawn(
            async move {
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
                    panel.execute(&request).await
                };
                let answer = |result: ToolResult| async {
                    let outcome = outcome_label(&result);
                    metrics.sidecar_calls.with_label_values(&[outcome]).inc();
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
            self.forward(std::sync::Arc::unwrap_or_clone(message).envelope);
        }
        Reply::Now(())
    }
}
