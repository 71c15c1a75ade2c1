//! Brokers as child processes: a `redis-server` and a `tansu` Kafka broker
//! on free loopback ports, for `nexus dev`, the tests and the benchmarks.
//!
//! Each child is killed when its handle is dropped and can be restarted on
//! the same port (tests that restart a broker use this). This module does
//! not install anything; it says how when a program is missing.

pub mod dev;
mod process;
pub mod redis_server;
pub mod tansu;

pub use process::{find_program, free_port, InfraError};
pub use redis_server::RedisServer;
pub use tansu::{Tansu, TansuStorage};
