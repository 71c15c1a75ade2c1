//! An instance's network, like a Pod's: a veth pair from the node's network
//! into the instance's namespace, a `/30` of the node's pool, NAT to the
//! outside, and the nftables rules that make it a policy.
//!
//! The node's side (table `inet nexus`, one per machine: every node of a
//! machine must use the same pool) lets an instance reach the public
//! internet and the configured DNS servers, and nothing private: not
//! 10/8, 172.16/12, 192.168/16, 100.64/10, 169.254/16 (the cloud metadata
//! address), not the host's own addresses, not another instance. New
//! connections into an instance come only from processes of the node's own
//! uid (the gateway, the sidecar), never from another local user.
//!
//! The instance's side (table `inet nexus` in its namespace, which the
//! panel cannot change: it has no capability over that namespace) turns
//! connections to its address on 8080 and 9999 into connections to its
//! loopback, where the panel and the watchdog listen, so the panel may
//! bind `127.0.0.1` as it would on a laptop; and it applies the same
//! egress policy again, so a flushed host ruleset does not open it.
//!
//! An instance's address is claimed by the name of its host-side interface
//! (`nxp<index>`): the kernel refuses a second interface of the same name,
//! so two nodes of a machine never hand out one address, and the claim
//! ends with the namespace. It starts no process of a panel.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use std::io::Write;

use super::super::driver::{DriverError, SandboxError};
use super::files::{blocking, netns_name};
use crate::netns::{Netns, NetnsThread};

/// Where an instance may connect beyond its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// The public internet and DNS (what `pip install` needs).
    Internet,
    /// Nothing outside: not even DNS.
    Off,
}

/// The addresses and policy of the instances' networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The pool instances' `/30`s come from (`10.251.0.0/16`).
    pub pool: Ipv4Addr,
    /// Its prefix length, 8 to 28.
    pub prefix: u8,
    /// Where instances may connect.
    pub egress: Egress,
    /// The DNS servers instances may ask (UDP and TCP port 53), private
    /// ones included; `None` takes the IPv4 `nameserver`s of
    /// `/etc/resolv.conf`, which is what an instance's resolver reads.
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { pool: Ipv4Addr::new(10, 251, 0, 0), prefix: 16, egress: Egress::Internet, dns: None }
    }
}

/// Where the panel listens and the watchdog, reached at the instance's address.
const FORWARDED_PORTS: [u16; 2] = [8080, 9999];
/// Destinations no instance reaches (DNS servers excepted).
/// 168.63.129.16 is Azure's platform endpoint (metadata and DNS there).
const PRIVATE: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
                       172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3, \
                       168.63.129.16";
/// The prefix of host-side interface names.
const LINK_PREFIX: &str = "nxp";

/// The node's instance networks.
#[derive(Debug)]
pub(super) struct Network {
    config: NetworkConfig,
    /// The DNS servers instances may ask, read once.
    dns: Vec<Ipv4Addr>,
    /// The next index to try: it moves on, so a freed address is not
    /// handed out again before the pool has gone round.
    next: AtomicU32,
}

/// One instance's link: released with its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Link {
    /// The instance's address: the gateway and the sidecar connect here.
    pub(super) addr: Ipv4Addr,
}

/// Why the network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command failed.
    #[error("`{command}` failed: {why}")]
    Command {
        /// What ran.
        command: String,
        /// What it said.
        why: String,
    },
    /// Every address of the pool is taken.
    #[error("all {0} instance addresses of the pool are in use")]
    PoolExhausted(u32),
    /// The pool is not a usable prefix.
    #[error("the instance pool {0}/{1} must be an IPv4 prefix of length 8 to 28")]
    BadPool(Ipv4Addr, u8),
}

impl Network {
    pub(super) fn new(config: NetworkConfig) -> Network {
        let dns = match &config.dns {
            Some(dns) => dns.clone(),
            None => resolv_conf_nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        };
        Network { next: AtomicU32::new(rand::random::<u32>()), config, dns }
    }

    /// What leaves an instance, as [`outward`] says for this network.
    fn outward(&self) -> String {
        outward(self.config.pool, self.config.prefix, self.config.egress, &self.dns)
    }

    fn slots(&self) -> u32 {
        1 << (32 - u32::from(self.config.prefix)).saturating_sub(2)
    }

    /// The node's rules and IPv4 forwarding, replaced as one transaction;
    /// run before the first instance starts (blocking).
    pub(super) fn install(&self) -> Result<(), NetworkError> {
        let NetworkConfig { pool, prefix, egress, .. } = self.config;
        if !is_pool(pool, prefix) {
            return Err(NetworkError::BadPool(pool, prefix));
        }
        let dns = &self.dns;
        // Forwarding that was off stays off for everything but instances.
        let forwarding_was_on = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1");
        if egress == Egress::Internet {
            if dns.iter().any(Ipv4Addr::is_loopback) {
                tracing::warn!(?dns, "a DNS server on loopback is not reachable from panel instances");
            }
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetworkError::Command {
                command: "enable net.ipv4.ip_forward".into(),
                why: e.to_string(),
            })?;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        nft(None, &node_rules(&self.outward(), pool, prefix, uid, forwarding_was_on))?;
        tracing::info!(%pool, prefix, ?egress, ?dns, "instance network rules installed");
        Ok(())
    }

    /// Gives `netns` its link and address (blocking).
    pub(super) fn attach(&self, netns: &Netns) -> Result<Link, NetworkError> {
        let slots = self.slots();
        for _ in 0..slots {
            let index = self.next.fetch_add(1, Ordering::Relaxed) % slots;
            let name = format!("{LINK_PREFIX}{index}");
            let created = run(
                None,
                "ip",
                &["link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", netns.name()],
                None,
            );
            match created {
                Ok(()) => return self.configure(netns, index, &name),
                Err(NetworkError::Command { why, .. }) if why.contains("File exists") => continue,
                Err(error) => return Err(error),
            }
        }
        Err(NetworkError::PoolExhausted(slots))
    }

    fn configure(&self, netns: &Netns, index: u32, name: &str) -> Result<Link, NetworkError> {
        let base = u32::from(self.config.pool) + index * 4;
        let (host, addr) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let configured = (|| {
            run(None, "ip", &["-batch", "-"], Some(&format!("addr add {host}/30 dev {name}\nlink set {name} up\n")))?;
            let inside = format!("addr add {addr}/30 dev eth0\nlink set eth0 up\nroute add default via {host}\n");
            run(None, "ip", &["-n", netns.name(), "-batch", "-"], Some(&inside))?;
            let path = netns.path();
            route_localnet(&path)?;
            nft(Some(&path), &instance_rules(&self.outward()))
        })();
        if let Err(error) = configured {
            let _ = run(None, "ip", &["link", "delete", name], None);
            return Err(error);
        }
        Ok(Link { addr })
    }
}

/// Whether `pool`/`prefix` is a prefix of length 8 to 28 with no host bits set.
pub fn is_pool(pool: Ipv4Addr, prefix: u8) -> bool {
    (8..=28).contains(&prefix) && u32::from(pool) & !(u32::MAX << (32 - prefix)) == 0
}

/// Lets the instance's loopback take connections that arrive on `eth0`.
fn route_localnet(netns: &Path) -> Result<(), NetworkError> {
    let failed = |why: String| NetworkError::Command { command: "set route_localnet".into(), why };
    let inside = NetnsThread::enter(netns).map_err(|e| failed(e.to_string()))?;
    inside
        .run(|| {
            ["all", "eth0"]
                .iter()
                .try_for_each(|dev| std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/route_localnet"), "1"))
        })
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))
}

/// The rules for what leaves an instance, after what it may always do
/// (answer connections made to it); `nft` statements, one a line.
fn outward(pool: Ipv4Addr, prefix: u8, egress: Egress, dns: &[Ipv4Addr]) -> String {
    let mut rules = vec![
        "ct state established,related accept".to_owned(),
        "meta nfproto ipv6 drop".to_owned(),
        // Only its own address: no loopback or spoofed source goes out.
        format!("ip saddr != {pool}/{prefix} drop"),
    ];
    if egress == Egress::Internet {
        if !dns.is_empty() {
            let servers = dns.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(", ");
            rules.push(format!("ip daddr {{ {servers} }} meta l4proto {{ tcp, udp }} th dport 53 accept"));
        }
        rules.push(format!("ip daddr {{ {PRIVATE} }} drop"));
        rules.push(format!("ip daddr {pool}/{prefix} drop"));
        rules.push("accept".to_owned());
    } else {
        rules.push("drop".to_owned());
    }
    rules.join("\n\t\t")
}

/// The node's table, `outward` filtering what instances send out: see the
/// module documentation.
fn node_rules(outward: &str, pool: Ipv4Addr, prefix: u8, uid: u32, forwarding_was_on: bool) -> String {
    let links = format!("\"{LINK_PREFIX}*\"");
    let outward = format!("oifname {links} drop\n\t\t{outward}");
    let others = match forwarding_was_on {
        true => String::new(),
        false => format!("\t\tiifname != {links} oifname != {links} drop\n"),
    };
    format!(
        "table inet nexus\n\
         delete table inet nexus\n\
         table inet nexus {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 5; policy accept;\n\
         \t\tiifname {links} jump from_instance\n\
         \t\toifname {links} ct state established,related accept\n\
         \t\toifname {links} drop\n\
         {others}\
         \t}}\n\
         \tchain from_instance {{\n\
         \t\t{outward}\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter - 5; policy accept;\n\
         \t\tiifname {links} ct state established,related accept\n\
         \t\tiifname {links} drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter - 5; policy accept;\n\
         \t\toifname {links} ct state new meta skuid != {uid} drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat - 5; policy accept;\n\
         \t\tip saddr {pool}/{prefix} oifname != {links} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// The instance's table: its address's 8080 and 9999 lead to its
/// loopback, and `outward` filters what leaves by `eth0`.
fn instance_rules(outward: &str) -> String {
    let ports = FORWARDED_PORTS.map(|p| p.to_string()).join(", ");
    format!(
        "table inet nexus {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"eth0\" tcp dport {{ {ports} }} dnat ip to 127.0.0.1\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"eth0\" ip daddr 127.0.0.0/8 ct status ! dnat drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\toifname != \"eth0\" accept\n\
         \t\t{outward}\n\
         \t}}\n\
         }}\n"
    )
}

/// The IPv4 `nameserver`s of a `resolv.conf`.
fn resolv_conf_nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

fn nft(netns: Option<&Path>, rules: &str) -> Result<(), NetworkError> {
    run(netns, "nft", &["-f", "-"], Some(rules))
}

/// Runs `program` (inside `netns` when given) with `stdin`; its stderr is the error.
fn run(netns: Option<&Path>, program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetworkError> {
    let command_line = format!("{program} {}", args.join(" "));
    let failed = |why: String| NetworkError::Command { command: command_line.clone(), why };
    let mut command = Command::new(program);
    // Errors are matched on ("File exists"): never translated.
    command.args(args).env("LC_ALL", "C").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(netns) = netns {
        let file = Arc::new(std::fs::File::open(netns).map_err(|e| failed(e.to_string()))?);
        // SAFETY: between fork and exec only setns(2), a raw syscall.
        unsafe {
            command.pre_exec(move || match libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    }
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or_default().as_bytes()).map_err(|e| failed(e.to_string()))?;
    }
    let output = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(failed(String::from_utf8_lossy(&output.stderr).trim().to_owned())),
    }
}

pub(super) fn network_error(error: NetworkError) -> DriverError {
    DriverError::Sandbox(SandboxError::Network(Arc::new(error)))
}

/// A new network namespace named for `id`, with its link (the node's
/// rules installed before); nothing is left on failure.
pub(super) async fn new_namespace(network: Arc<Network>, id: &str) -> Result<(Netns, Link), DriverError> {
    let netns = Netns::create(&netns_name(id)).map_err(|e| SandboxError::Netns(Arc::new(e)))?;
    let inside = netns.clone();
    match blocking(move || network.attach(&inside).map_err(network_error)).await {
        Ok(link) => Ok((netns, link)),
        Err(error) => {
            drop_namespace(id, &netns).await;
            Err(error)
        }
    }
}

/// Deletes a namespace of this driver's (failures are logged).
pub(super) async fn drop_namespace(id: &str, netns: &Netns) {
    if let Err(error) = netns.delete() {
        tracing::warn!(instance = id, %error, "could not delete the network namespace");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_from_resolv_conf() {
        let text = "# comment\nnameserver 10.255.255.53\nnameserver ::1\noptions ndots:2\nnameserver 1.1.1.1\n";
        assert_eq!(resolv_conf_nameservers(text), [Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(1, 1, 1, 1)]);
    }

    #[test]
    fn egress_off_drops_everything_outward_and_dns_is_allowed_before_the_private_ranges() {
        let dns = [Ipv4Addr::new(10, 255, 255, 53)];
        let pool = Ipv4Addr::new(10, 251, 0, 0);
        let rules =
            |egress, forwarding_was_on| node_rules(&outward(pool, 16, egress, &dns), pool, 16, 0, forwarding_was_on);
        let on = rules(Egress::Internet, true);
        let (dns_at, private_at) = (on.find("th dport 53 accept").unwrap(), on.find("ip daddr { 0.0.0.0/8").unwrap());
        assert!(dns_at < private_at, "{on}");
        let off = rules(Egress::Off, true);
        assert!(!on.contains("iifname != \"nxp*\" oifname != \"nxp*\" drop"), "forwarding was on: left alone");
        let was_off = rules(Egress::Internet, false);
        assert!(was_off.contains("iifname != \"nxp*\" oifname != \"nxp*\" drop"), "{was_off}");
        assert!(!off.contains("dport 53") && !off.contains("\t\taccept\n\t}\n\tchain input"), "{off}");
    }

    #[test]
    fn a_pool_must_be_a_prefix() {
        let network = Network::new(NetworkConfig { pool: Ipv4Addr::new(10, 251, 0, 1), ..NetworkConfig::default() });
        assert!(matches!(network.install(), Err(NetworkError::BadPool(..))));
        let network = Network::new(NetworkConfig { prefix: 30, ..NetworkConfig::default() });
        assert!(matches!(network.install(), Err(NetworkError::BadPool(..))));
        assert_eq!(Network::new(NetworkConfig::default()).slots(), 16384);
    }
}
