//! The egress policy, against hosts the test builds: a "site" network
//! namespace stands in for the machine (the driver, its redis-server, its
//! rules and its instances all live there), linked to an "internet" host
//! (198.51.100.10, its default route), a "private" host (192.168.77.10,
//! and the site's DNS server 192.168.77.53) and a "metadata" host
//! (169.254.169.254). No packet leaves this machine, and nothing of the
//! machine's own network is touched.
//!
//! Each host counts the connections it accepts: the panel must reach the
//! internet (through NAT) and DNS, and nothing else; only the node's own
//! uid may open connections into an instance.

use std::net::{SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_actors::instance::Isolation;
use nexus_actors::netns::{Netns, NetnsThread};
use nexus_actors::roles::panel_manager::driver::RuntimeDriver;
use nexus_actors::roles::panel_manager::local::SandboxChoice;

use super::harness::{env_with, get_json, panel_id, probe, skipped, spec, volume_with_probe, Cleanup};

/// A host's listener: how many connections it took, and from where.
#[derive(Clone, Default)]
struct Seen {
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

fn listen(inside: &NetnsThread, addr: &str) -> Seen {
    let listener: TcpListener = inside.bind(addr.parse().unwrap()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let seen = Seen::default();
    let counted = seen.clone();
    std::thread::spawn(move || {
        while let Ok((_stream, peer)) = listener.accept() {
            counted.accepted.fetch_add(1, Ordering::SeqCst);
            counted.peers.lock().unwrap().push(peer);
        }
    });
    seen
}

impl Seen {
    /// The connections taken, once the accepting thread has caught up
    /// with one the panel saw connected.
    fn accepted_after_connect(&self) -> usize {
        for _ in 0..100 {
            if self.accepted.load(Ordering::SeqCst) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The site and its hosts, deleted (with whatever runs in them) on drop.
struct Site {
    names: Vec<String>,
}

impl Site {
    fn build(id: &str) -> Site {
        let site = Site { names: ["site", "inet", "priv", "meta"].iter().map(|n| format!("nxt-{n}-{id}")).collect() };
        for name in &site.names {
            Netns::create(name).unwrap_or_else(|e| panic!("netns {name}: {e}"));
        }
        let (s, inet, private, meta) = (&site.names[0], &site.names[1], &site.names[2], &site.names[3]);
        let mut ip = vec![
            format!("-n {s} link add wan type veth peer name eth0 netns {inet}"),
            format!("-n {s} link add lan type veth peer name eth0 netns {private}"),
            format!("-n {s} link add mdata type veth peer name eth0 netns {meta}"),
            format!("-n {s} addr add 198.51.100.1/24 dev wan"),
            format!("-n {s} addr add 192.168.77.1/24 dev lan"),
            format!("-n {s} addr add 169.254.0.1/16 dev mdata"),
            format!("-n {inet} addr add 198.51.100.10/24 dev eth0"),
            format!("-n {private} addr add 192.168.77.10/24 dev eth0"),
            format!("-n {private} addr add 192.168.77.53/24 dev eth0"),
            format!("-n {meta} addr add 169.254.169.254/16 dev eth0"),
        ];
        for (ns, dev) in [(s, "wan"), (s, "lan"), (s, "mdata"), (inet, "eth0"), (private, "eth0"), (meta, "eth0")] {
            ip.push(format!("-n {ns} link set {dev} up"));
        }
        ip.push(format!("-n {s} route add default via 198.51.100.10"));
        // Every host can answer anything the site sends it: a connection
        // that fails, fails for the policy, not for want of a route back.
        ip.push(format!("-n {inet} route add default via 198.51.100.1"));
        ip.push(format!("-n {private} route add default via 192.168.77.1"));
        ip.push(format!("-n {meta} route add default via 169.254.0.1"));
        for args in ip {
            let status = std::process::Command::new("ip").args(args.split(' ')).status().unwrap();
            assert!(status.success(), "ip {args}");
        }
        site
    }

    fn path(&self, which: usize) -> std::path::PathBuf {
        Netns::existing(&self.names[which]).expect("the site's namespace").path()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.names.iter().for_each(|name| super::harness::delete_namespace(name));
    }
}

/// Whether a process of `uid` in the site opens a connection to `addr`.
fn connects_as(uid: u32, addr: &str) -> bool {
    use std::os::unix::process::CommandExt;
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!("import socket; socket.create_connection(('{host}', {port}), timeout=3).close()");
    let status = std::process::Command::new("/usr/bin/python3").args(["-c", &script]).uid(uid).gid(uid).status();
    status.unwrap().success()
}

pub(crate) fn egress_policy(test: &str, choice: SandboxChoice) {
    if skipped(test) || !super::harness::sandbox_available(choice) {
        return;
    }
    let id = std::process::id().to_string();
    let site = Site::build(&id);
    let hosts =
        [NetnsThread::enter(&site.path(1)), NetnsThread::enter(&site.path(2)), NetnsThread::enter(&site.path(3))]
            .map(|host| host.expect("enter a host"));
    let internet = listen(&hosts[0], "198.51.100.10:80");
    let private = listen(&hosts[1], "192.168.77.10:80");
    let dns = listen(&hosts[1], "192.168.77.53:53");
    let dns_other_port = listen(&hosts[1], "192.168.77.53:80");
    let metadata = listen(&hosts[2], "169.254.169.254:80");
    let inside_site = NetnsThread::enter(&site.path(0)).expect("enter the site");
    let site_port = inside_site.bind("0.0.0.0:0".parse().unwrap()).expect("a listener of the site's own");
    let site_port = site_port.local_addr().unwrap().port();

    let test = test.to_owned();
    let outcome = inside_site.run(move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            let env = env_with(&test, choice, |config| {
                config.network.dns = Some(vec!["192.168.77.53".parse().unwrap()]);
            });
            let (a, b) = (format!("egress-a-{id}"), format!("egress-b-{id}"));
            let cleanup = Cleanup { instances: vec![a.clone(), b.clone()] };
            let driver = env.driver.clone();
            actix_rt::System::new().block_on(async {
                let (panel_a, panel_b) = (panel_id(), panel_id());
                let code = volume_with_probe(&driver, &env.redis_url, &panel_a).await;
                let started = driver.start(spec(&a, &panel_a, code)).await.expect("start the probe panel");
                let code = volume_with_probe(&driver, &env.redis_url, &panel_b).await;
                let other = driver.start(spec(&b, &panel_b, code)).await.expect("start another panel");
                let expected = if choice == SandboxChoice::Gvisor { Isolation::Gvisor } else { Isolation::Namespaces };
                assert_eq!(started.isolation, expected);
                let addr = started.endpoint.addr.clone();
                get_json(&other.endpoint.addr, "/whoami");

                // The internet, through NAT: the host sees the site's address.
                let answer = probe(&addr, "198.51.100.10", 80);
                assert_eq!(answer["connected"], true, "the panel reaches the internet: {answer}");
                assert_eq!(internet.accepted_after_connect(), 1);
                let peer = internet.peers.lock().unwrap()[0];
                assert_eq!(peer.ip().to_string(), "198.51.100.1", "the instance's address is hidden by NAT");
                // DNS, though the server's address is private.
                assert_eq!(probe(&addr, "192.168.77.53", 53)["connected"], true, "the panel reaches DNS");
                assert_eq!(dns.accepted_after_connect(), 1);

                let (own_host, _) = addr.rsplit_once(':').unwrap();
                let own: std::net::Ipv4Addr = own_host.parse().unwrap();
                let gateway_side = std::net::Ipv4Addr::from(u32::from(own) - 1).to_string();
                let (other_host, other_port) = other.endpoint.addr.rsplit_once(':').unwrap();
                let denied = [
                    ("192.168.77.10", 80, "a private host"),
                    ("192.168.77.53", 80, "the DNS server on another port"),
                    ("169.254.169.254", 80, "the metadata address"),
                    ("198.51.100.1", site_port, "the host's own address"),
                    (gateway_side.as_str(), site_port, "the host's side of the instance's link"),
                    (other_host, other_port.parse().unwrap(), "another instance"),
                ];
                for (host, port, what) in denied {
                    let answer = probe(&addr, host, port);
                    assert_eq!(answer["connected"], false, "the panel reached {what} ({host}:{port}): {answer}");
                }
                for (seen, what) in [(&private, "private"), (&dns_other_port, "dns:80"), (&metadata, "metadata")] {
                    assert_eq!(seen.accepted.load(Ordering::SeqCst), 0, "the {what} host was reached");
                }

                // Into an instance: the node's uid (root: the gateway, the
                // sidecar), no other local user.
                assert!(connects_as(0, &addr), "root (the gateway) reaches the instance");
                assert!(!connects_as(65534, &addr), "another local user reached the instance at {addr}");

                // The instance's own rules hold when the host's are gone
                // (an operator's `nft flush ruleset`).
                let flushed = std::process::Command::new("nft").args(["delete", "table", "inet", "nexus"]).status();
                assert!(flushed.unwrap().success(), "the node's table is there to delete");
                let answer = probe(&addr, "192.168.77.10", 80);
                assert_eq!(answer["connected"], false, "without the node's rules the panel reached a private host");
                assert_eq!(private.accepted.load(Ordering::SeqCst), 0);

                for instance in [&a, &b] {
                    driver.stop(instance, Duration::from_secs(5)).await.expect("stop");
                }
            });
            drop(cleanup);
            let _ = std::fs::remove_dir_all(&env.dir);
        }))
    });
    drop(site);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(error) => panic!("the site's thread: {error}"),
    }
}
