//! `Drain`: a node's word that it is going away (a rolling restart's
//! SIGTERM). It is given once and never taken back. Parts that take new
//! work read it and refuse (`/readyz` answers 503 so load balancers look
//! elsewhere; `/ws` refuses new sessions); parts that hold long-lived work
//! wait for it and let go (WebSocket sessions close with 1012, "service
//! restart", so clients reconnect to another node). It does not stop
//! anything itself: `node::RunningNode` orders the shutdown.

use std::sync::Arc;

use tokio::sync::watch;

/// Shared by everything that must know; cheap to clone.
#[derive(Clone, Debug)]
pub struct Drain {
    started: Arc<watch::Sender<bool>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { started: Arc::new(watch::channel(false).0) }
    }
}

impl Drain {
    /// Gives the word; later calls change nothing.
    pub fn start(&self) {
        self.started.send_replace(true);
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the node drains (at once when it already does).
    pub fn started(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut watching = self.started.subscribe();
        async move {
            // The sender lives as long as any clone of this Drain.
            let _ = watching.wait_for(|draining| *draining).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_word_reaches_those_waiting_and_those_who_ask_later() {
        let drain = Drain::default();
        let waiting = tokio::spawn(drain.started());
        assert!(!drain.is_draining());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drain.clone().start();
        waiting.await.unwrap();
        assert!(drain.is_draining());
        drain.started().await;
    }
}
