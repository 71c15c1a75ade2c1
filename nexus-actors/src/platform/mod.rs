//! The platform layer: what every role shares, below the roles and above
//! the kernel and the buses.
//!
//! * [`accounts`]: users, their roles and token generations.
//! * [`panels`]: panel records, the ownership every role checks.
//! * [`channels`]: every pub/sub channel name.
//! * [`auth`]: signing keys, tokens, password hashing, login limits and
//!   the request extractors.
//! * [`error`]: the typed errors of every API route.
//! * [`http`]: the endpoints every node serves (`/healthz`, `/readyz`,
//!   `/metrics`, `/api/graph`).
//! * [`origin`]: the `Host`/`Origin` rules against DNS rebinding.
//! * [`files`]: secret files and private directories.
//! * [`quotas`]: what one user may hold at once.
//! * [`open_files`]: the node's open-file limit, raised at start.
//! * [`server`]: the HTTP server a node listens with, WebSocket upgrades
//!   handed their connection.
//!
//! Roles depend on this module and never on each other; this module
//! depends on no role.

pub mod accounts;
pub mod auth;
pub mod channels;
pub mod drain;
pub mod error;
pub mod files;
pub mod http;
pub mod node_lease;
pub mod open_files;
pub mod origin;
pub mod panels;
pub mod quotas;
pub mod server;
pub mod store;

pub use accounts::{Accounts, UserRole};
pub use auth::{Admin, Auth, Caller};
pub use error::{ApiError, ErrorBody};
pub use panels::{Panel, PanelChanged, PanelMode, PanelRecords};
pub use quotas::Quotas;
pub use store::{Redis, StoreError};

use auth::keys::KeyRing;

/// The platform's shared parts of one node, connected once and handed to
/// each role. Cheap to clone.
#[derive(Clone)]
pub struct Platform {
    /// The node's Redis connection for records.
    pub redis: Redis,
    /// User accounts.
    pub accounts: Accounts,
    /// Panel records.
    pub panels: PanelRecords,
    /// Tokens, under the node's keys.
    pub auth: Auth,
    /// Per-user limits.
    pub quotas: Quotas,
}

impl Platform {
    /// Connects to `redis_url` and checks tokens under `keys`.
    pub async fn connect(redis_url: &str, keys: KeyRing, quotas: Quotas) -> Result<Self, StoreError> {
        let redis = Redis::connect(redis_url).await?;
        let accounts = Accounts::new(redis.clone());
        let auth = Auth::new(keys, accounts.clone());
        Ok(Platform { panels: PanelRecords::new(redis.clone()), accounts, auth, quotas, redis })
    }
}
