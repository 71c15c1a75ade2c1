//! Brokers as child processes: a `redis-server` (or a Redis Cluster of
//! them) and a `tansu` Kafka broker on free loopback ports, for `nexus dev`, the tests and the benchmarks;
//! and the local model server (llama.cpp's, from PyPI) the same way.
//!
//! Each child is killed when its handle is dropped and can be restarted on
//! the same port (tests that restart a broker use this). This module does
//! not install anything; it says how when a program is missing.

pub mod dev;
pub mod model_server;
mod process;
pub mod redis_cluster;
pub mod redis_server;
pub mod tansu;

pub use model_server::ModelServer;
pub use process::{find_program, free_port, InfraError};
pub use redis_cluster::RedisCluster;
pub use redis_server::RedisServer;
pub use tansu::{Tansu, TansuStorage};
