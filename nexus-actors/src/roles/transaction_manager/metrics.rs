//! The transaction manager's metric families, in the node's registry.
//! Names are stable; labels come from enums, so a typo does not compile.

use prometheus::{IntCounterVec, Opts, Registry};

/// How a login ended, the `outcome` of `nexus_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// A token was issued.
    Ok,
    /// Wrong username or password.
    Refused,
    /// Too many failures from the address or for the user.
    RateLimited,
    /// Too many hashes waiting.
    Busy,
}

impl LoginOutcome {
    const ALL: [LoginOutcome; 4] =
        [LoginOutcome::Ok, LoginOutcome::Refused, LoginOutcome::RateLimited, LoginOutcome::Busy];

    fn label(self) -> &'static str {
        match self {
            LoginOutcome::Ok => "ok",
            LoginOutcome::Refused => "refused",
            LoginOutcome::RateLimited => "rate_limited",
            LoginOutcome::Busy => "busy",
        }
    }
}

/// The role's metrics. Cloning shares them.
#[derive(Clone)]
pub struct TmMetrics {
    /// `nexus_logins_total{outcome}`.
    logins: IntCounterVec,
}

impl TmMetrics {
    /// Registers the families in `registry`; a registry that has them
    /// already (a second transaction manager in one process, in tests)
    /// keeps its own and this one counts apart.
    pub fn register(registry: &Registry) -> Self {
        let metrics = TmMetrics::unregistered();
        if let Err(error) = registry.register(Box::new(metrics.logins.clone())) {
            tracing::warn!(%error, "transaction manager metrics not registered");
        }
        metrics
    }

    fn unregistered() -> Self {
        let logins = IntCounterVec::new(Opts::new("nexus_logins_total", "Logins by outcome"), &["outcome"])
            .expect("valid metric definition");
        for outcome in LoginOutcome::ALL {
            logins.with_label_values(&[outcome.label()]);
        }
        TmMetrics { logins }
    }

    /// Counts one login.
    pub fn login(&self, outcome: LoginOutcome) {
        self.logins.with_label_values(&[outcome.label()]).inc();
    }
}
