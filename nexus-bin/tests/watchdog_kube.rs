//! `nexus watchdog --expire-via kubernetes` deletes its own Pod through the
//! Kubernetes API when no heartbeat comes, against a mock API server (no
//! real API server runs on these machines), found through `KUBECONFIG` as
//! in a cluster it is found through the in-cluster config.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::KillOnDrop;
use nexus_testkit::kube_api::MockKube;
use serde_json::json;

const NS: &str = "nexus-panels";

fn watchdog(kubeconfig: &std::path::Path, args: &[&str], pod: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
    command
        .args([
            "watchdog",
            "--instance",
            "demo-1",
            "--panel",
            "demo",
            "--timeout-secs",
            "1",
            "--expire-via",
            "kubernetes",
        ])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NEXUS_WATCHDOG_TOKEN")
        .env_remove("POD_NAME");
    if let Some(pod) = pod {
        command.env("POD_NAME", pod);
    }
    command
}

#[test]
fn an_expired_watchdog_deletes_its_own_pod_and_nothing_else() {
    let mock = MockKube::start();
    let dir = nexus_testkit::tempdir("watchdog-kube");
    let kubeconfig = mock.kubeconfig(&dir, NS);
    for name in ["p-demo-1", "p-other"] {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS}});
        mock.put(&format!("/api/v1/namespaces/{NS}/pods"), pod);
    }
    let before = mock.requests().len();

    // On the Pod's address, which a token guards.
    let child = watchdog(&kubeconfig, &["--listen", "0.0.0.0:0", "--token", "secret-token"], Some("p-demo-1"))
        .stdout(Stdio::null())
        .spawn()
        .expect("the watchdog runs");
    let _child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while mock.object("pods", "p-demo-1").is_some() {
        assert!(Instant::now() < deadline, "the pod was not deleted: {:?}", mock.requests());
        std::thread::sleep(Duration::from_millis(50));
    }
    // It asks again every few seconds; a gone pod is no error.
    let writes = || -> Vec<String> {
        mock.requests().iter().skip(before).filter(|r| r.method != "GET").map(|r| r.line()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while writes().len() < 2 {
        assert!(Instant::now() < deadline, "it does not ask again: {:?}", writes());
        std::thread::sleep(Duration::from_millis(50));
    }
    let writes = writes();
    let own = format!("DELETE /api/v1/namespaces/{NS}/pods/p-demo-1");
    assert!(writes.iter().all(|w| *w == own), "only its own pod: {writes:?}");
    assert!(mock.object("pods", "p-other").is_some());
    assert_eq!(mock.requests()[before].query.get("dryRun"), None);
}

#[test]
fn a_watchdog_without_its_pod_or_token_is_refused() {
    let mock = MockKube::start();
    let dir = nexus_testkit::tempdir("watchdog-kube-refused");
    let kubeconfig = mock.kubeconfig(&dir, NS);
    let cases: [(&[&str], Option<&str>, &str); 3] = [
        (&["--listen", "127.0.0.1:0"], None, "--pod-name"),
        (&["--listen", "0.0.0.0:0"], Some("p-demo-1"), "loopback"),
        (&["--listen", "0.0.0.0:0", "--token", "t"], Some("p-demo-1"), ""),
    ];
    for (args, pod, says) in &cases[..2] {
        let out = watchdog(&kubeconfig, args, *pod).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = watchdog(&kubeconfig, cases[2].0, cases[2].1)
        .env("KUBECONFIG", dir.join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("runs");
    assert!(!out.status.success(), "no cluster configuration is an error at start");
    assert!(mock.requests().is_empty(), "nothing reached the API");
}
