//! The sessions rows too large for one process's open files: the clients
//! run in child processes (`nexus-bench serve-clients`), one per server,
//! and so do the servers (two nodes, two raw servers), each holding a
//! share of the sockets. Arrival times cross processes as readings of
//! the machine's monotonic clock, which every process shares.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};

use super::{change_version, connect, rss_kib, Killed, Outcome, CHANGES};

/// The machine's monotonic clock, in nanoseconds: the same in every process.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the struct given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// `nexus-bench serve-clients URL N SUBSCRIBE`: opens `N` WebSocket clients
/// to `URL`, each sending `SUBSCRIBE` and waiting for its snapshot, prints
/// `ready`, then a line `VERSION NANOS` for every change frame a client
/// gets. Ends when its stdin closes.
pub(crate) fn serve_clients(args: &[String]) {
    let [url, n, subscribe] = args else { panic!("serve-clients URL N SUBSCRIBE") };
    let n: usize = n.parse().expect("a number of clients");
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let clients = connect(std::slice::from_ref(url), subscribe, n).await;
        let (arrived, lines) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
        for ws in clients {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let (_sink, mut stream) = ws.split();
                while let Some(Ok(frame)) = stream.next().await {
                    let at = monotonic_ns();
                    if let Some(version) = change_version(&frame) {
                        let _ = arrived.send((version, at));
                    }
                }
            });
        }
        println!("ready");
        let mut lines = lines;
        let mut out = std::io::BufWriter::new(std::io::stdout());
        while let Some((version, at)) = lines.recv().await {
            let _ = writeln!(out, "{version} {at}");
            if lines.is_empty() {
                let _ = out.flush();
            }
        }
    });
}

/// A client process; killed when dropped.
struct Clients {
    _child: Killed,
    _stdin: ChildStdin,
}

/// Like [`super::fan_out`], with the `n` clients split evenly over one
/// child process per URL; `pids` are the servers whose memory is read.
pub(super) async fn fan_out<F, Fut>(
    setup: &'static str,
    pids: &[u32],
    urls: &[String],
    subscribe: &str,
    n: usize,
    mut change: F,
) -> Outcome
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let rss_before: u64 = pids.iter().map(|&pid| rss_kib(pid)).sum();
    let arrivals: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let (ready, readied) = mpsc::channel::<()>();
    let mut processes = Vec::new();
    for url in urls {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(["serve-clients", url, &(n / urls.len()).to_string(), subscribe])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("a client process");
        let (stdin, stdout) = (child.stdin.take().expect("stdin"), child.stdout.take().expect("stdout"));
        let (arrivals, ready) = (arrivals.clone(), ready.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready.send(());
                } else if let Some((version, at)) = line.split_once(' ') {
                    if let (Ok(version), Ok(at)) = (version.parse(), at.parse()) {
                        arrivals.lock().unwrap().push((version, at));
                    }
                }
            }
        });
        processes.push(Clients { _child: Killed(child), _stdin: stdin });
    }
    // Only the readers hold senders now: a process that dies unready ends the wait.
    drop(ready);
    let deadline = Instant::now() + Duration::from_secs(600);
    for _ in urls {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = tokio::task::block_in_place(|| readied.recv_timeout(left));
        got.expect("every client process connected its clients");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after: u64 = pids.iter().map(|&pid| rss_kib(pid)).sum();
    let n = (n / urls.len()) * urls.len();
    let mut latencies = Vec::new();
    for version in 1..=CHANGES {
        let sent = monotonic_ns();
        change(version).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrivals.lock().unwrap().iter().filter(|(v, _)| *v == version + 1).count() < n
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut all = arrivals.lock().unwrap();
        let this = all.iter().filter(|(v, _)| *v == version + 1);
        latencies.extend(this.map(|(_, at)| at.saturating_sub(sent) as f64 / 1e6));
        all.retain(|(v, _)| *v != version + 1);
    }
    drop(processes);
    super::outcome(setup, n, latencies, rss_after.saturating_sub(rss_before))
}
