//! A Redis Cluster of `redis-server` children on loopback ports: masters
//! with their replicas, made with `redis-cli --cluster create`, for the
//! tests and benchmarks of sharded documents. A master can be killed and
//! the cluster waited for until its replica took over.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{find_program, free_port, InfraError};
use super::RedisServer;

/// How long a silent node counts as alive; a master silent longer is
/// failed over to its replica. Short, so tests see a failover in seconds.
const NODE_TIMEOUT_MS: u64 = 1000;

/// A Redis Cluster on 127.0.0.1; every node is killed when dropped.
pub struct RedisCluster {
    nodes: Vec<(u16, Option<RedisServer>)>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each, their data
    /// and logs under `dir`, and waits until the cluster serves every slot.
    /// The servers die with the thread that calls this (as every child of
    /// [`super::process`] does): not a blocking pool's thread, which exits
    /// when idle.
    pub fn start(dir: &Path, masters: usize, replicas: usize) -> Result<Self, InfraError> {
        let cli = find_program("redis-cli").ok_or(InfraError::NotInstalled {
            program: "redis-cli",
            hint: "install it with `apt-get install redis-tools`",
        })?;
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let port = cluster_port()?;
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
            ]
            .map(String::from)
            .to_vec();
            let server = RedisServer::start_on(&dir.join(format!("node-{i}")), false, port, extra)?;
            nodes.push((port, Some(server)));
        }
        let mut create = Command::new(cli);
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(|(port, _)| format!("127.0.0.1:{port}")));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = create.output()?;
        if !out.status.success() {
            let tail = String::from_utf8_lossy(&out.stdout).lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(InfraError::Io(std::io::Error::other(format!("redis-cli --cluster create failed: {tail}"))));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_until_served(None, Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `redis://127.0.0.1:<port>/` of every node still running.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().filter(|(_, s)| s.is_some()).map(|(port, _)| format!("redis://127.0.0.1:{port}/")).collect()
    }

    /// The port of the master that serves `key` (or channel) now.
    pub fn master_of(&self, key: &str) -> Result<u16, InfraError> {
        let slot: u16 = self.query(&["CLUSTER", "KEYSLOT", key])?.trim().parse().map_err(std::io::Error::other)?;
        let nodes = self.query(&["CLUSTER", "NODES"])?;
        masters(&nodes)
            .into_iter()
            .find(|(_, slots)| slots.iter().any(|(from, to)| (*from..=*to).contains(&slot)))
            .map(|(port, _)| port)
            .ok_or_else(|| std::io::Error::other(format!("no master serves slot {slot}")).into())
    }

    /// The ports of the masters serving slots now.
    pub fn masters(&self) -> Result<Vec<u16>, InfraError> {
        Ok(masters(&self.query(&["CLUSTER", "NODES"])?).into_iter().map(|(port, _)| port).collect())
    }

    /// Kills the master on `port`, as a crash would, and waits until every
    /// other node sees one of its replicas serve its slots.
    pub fn fail_over(&mut self, port: u16, timeout: Duration) -> Result<(), InfraError> {
        if let Some((_, server)) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            server.take();
        }
        self.wait_until_served(Some(port), timeout)
    }

    /// Waits until every running node says the cluster is `ok`, all 16384
    /// slots are served, and `gone` (a killed master) serves none of them.
    fn wait_until_served(&self, gone: Option<u16>, timeout: Duration) -> Result<(), InfraError> {
        let deadline = Instant::now() + timeout;
        loop {
            let served = self.nodes.iter().filter(|(_, s)| s.is_some()).all(|(port, _)| {
                let ok = cli(*port, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384"));
                let moved = cli(*port, &["CLUSTER", "NODES"])
                    .is_ok_and(|nodes| masters(&nodes).iter().all(|(master, _)| Some(*master) != gone));
                ok && moved
            });
            if served {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the redis cluster did not serve every slot in time").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Moves the hash slot of `key`, with its keys, to the master on `to`,
    /// as resharding does (`SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE`,
    /// `SETSLOT NODE`).
    pub fn move_slot_of(&self, key: &str, to: u16) -> Result<(), InfraError> {
        let from = self.master_of(key)?;
        let slot = self.query(&["CLUSTER", "KEYSLOT", key])?.trim().to_owned();
        let id = |port| cli(port, &["CLUSTER", "MYID"]).map(|id| id.trim().to_owned());
        let (from_id, to_id) = (id(from)?, id(to)?);
        cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])?;
        cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("the keys of slot {slot} did not move in 30 s")).into());
            }
            let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])?;
            let keys: Vec<&str> = keys.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys);
            cli(from, &migrate)?;
        }
        let mut masters = self.masters()?;
        masters.sort_by_key(|port| (*port != to, *port != from));
        for port in masters {
            cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])?;
        }
        Ok(())
    }

    /// Waits until every replica of the master on `port` has all that the
    /// master wrote (replication is asynchronous: a write a replica lacks
    /// is lost when the master dies).
    pub fn wait_replicated(&self, port: u16, timeout: Duration) -> Result<(), InfraError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = cli(port, &["INFO", "replication"])?;
            let field = |line: &str, name: &str| {
                line.split(',').find_map(|f| f.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok())
            };
            let master = info.lines().find_map(|l| l.strip_prefix("master_repl_offset:")?.trim().parse::<u64>().ok());
            let replicas: Vec<Option<u64>> =
                info.lines().filter(|l| l.starts_with("slave")).map(|l| field(l, "offset=")).collect();
            if master.is_some() && !replicas.is_empty() && replicas.iter().all(|offset| *offset == master) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("the replicas of {port} did not catch up: {info}")).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks any running node.
    fn query(&self, args: &[&str]) -> Result<String, InfraError> {
        let mut last = None;
        for (port, _) in self.nodes.iter().filter(|(_, s)| s.is_some()) {
            match cli(*port, args) {
                Ok(out) => return Ok(out),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no node of the cluster runs").into()))
    }
}

/// A free port whose cluster bus port (+10000) is a port too.
fn cluster_port() -> std::io::Result<u16> {
    loop {
        let port = free_port()?;
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

/// `redis-cli -p <port> <args>`'s output.
fn cli(port: u16, args: &[&str]) -> Result<String, InfraError> {
    let cli = find_program("redis-cli").ok_or(InfraError::NotInstalled {
        program: "redis-cli",
        hint: "install it with `apt-get install redis-tools`",
    })?;
    let out = Command::new(cli).args(["-p", &port.to_string()]).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.starts_with("ERR") || text.starts_with("Could not connect") {
        return Err(std::io::Error::other(format!("redis-cli -p {port} {}: {text}", args.join(" "))).into());
    }
    Ok(text)
}

/// The live masters of a `CLUSTER NODES` reply, with the slot ranges each
/// serves.
fn masters(nodes: &str) -> Vec<(u16, Vec<(u16, u16)>)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (addr, flags) = (fields.get(1)?, fields.get(2)?);
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots = fields[8.min(fields.len())..]
                .iter()
                .filter_map(|range| match range.split_once('-') {
                    Some((from, to)) => Some((from.parse().ok()?, to.parse().ok()?)),
                    None => range.parse().ok().map(|slot| (slot, slot)),
                })
                .collect::<Vec<_>>();
            (!slots.is_empty()).then_some((port, slots))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
a 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922 12000
c 127.0.0.1:7003@17003 master,fail - 0 0 3 disconnected 10923-16383
d 127.0.0.1:7004@17004 slave a 0 0 1 connected
";
        assert_eq!(super::masters(nodes), vec![(7001, vec![(0, 5460)]), (7002, vec![(5461, 10922), (12000, 12000)])]);
    }
}
