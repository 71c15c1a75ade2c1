//! Nexus: an actor-system runtime for Nexus Graph Studio.
//!
//! * [`kernel`]: typed messages, supervised actors on actix, the mailbox graph.
//! * [`envelope`]: the CloudEvents-shaped envelope of every bus message.
//! * [`bus`]: the Redis and Kafka bridges, as actors.
//! * [`telemetry`]: metrics, tracing, OTLP and trace-context propagation.
//! * [`platform`]: what every role shares: accounts, panel records, auth,
//!   API errors, channel names and the endpoints every node serves.
//! * [`node`]: wiring a node from its configuration.
//! * [`infra`]: brokers as child processes, for `nexus dev` and tests.
//! * [`sidecar`]: `nexus sidecar`, beside each panel instance.
//! * [`tools`]: the tool registry, tool calls and panel manifests.
//! * [`instance`]: panel instances, routes and their messages.
//! * [`netns`]: network namespaces, a panel instance's private network.
//! * [`watchdog`]: `nexus watchdog`, deletes a Studio instance nobody works in.

#![warn(clippy::unwrap_used)]

pub mod bus;
pub mod envelope;
pub mod infra;
pub mod instance;
pub mod kernel;
pub mod netns;
pub mod node;
pub mod platform;
pub mod roles;
pub mod semantic;
pub mod sidecar;
pub mod telemetry;
pub mod tools;
pub mod watchdog;

pub use envelope::{Envelope, Payload};
pub use kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply};
