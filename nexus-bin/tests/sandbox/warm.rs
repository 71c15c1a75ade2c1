//! Warm sandboxes under gVisor: an App start takes one made ahead and is
//! contained as a cold start is (its panel's uid, no capability, its own
//! namespace and sidecar, its log); a restart, a stop, a dead sandbox, a
//! command that is not `python3 script.py` and the driver's release each
//! leave nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nexus_actors::roles::panel_manager::driver::{Code, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::{LocalConfig, LocalDriver, SandboxChoice};
use nexus_testkit::eventually;

use super::harness::{
    env_with, get_json, host_ip, namespace_members, panel_id, probe, processes_mentioning, sandbox_available, skipped,
    spec, volume_with_probe, Cleanup, Env,
};
use super::instance_cgroup;

/// The warm sandboxes' directories under the driver's `instances/`.
fn slots(instances: &Path) -> Vec<String> {
    let names = std::fs::read_dir(instances).into_iter().flatten();
    names.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("_warm_")).collect()
}

fn capability_sets(status: &str) -> Vec<String> {
    status.lines().filter(|l| l.starts_with("Cap")).map(str::to_owned).collect()
}

/// The processes in the namespace of the slot `slot`.
fn slot_members(slot: &str) -> Vec<i32> {
    namespace_members(&Path::new("/run/netns").join(format!("nexus-{slot}")))
}

#[test]
fn under_gvisor_an_app_starts_in_a_warm_sandbox_contained_as_a_cold_one() {
    starts_in_a_warm_sandbox(
        "under_gvisor_an_app_starts_in_a_warm_sandbox_contained_as_a_cold_one",
        SandboxChoice::Gvisor,
    );
}

#[test]
fn as_a_process_an_app_starts_in_a_warm_sandbox_contained_as_a_cold_one() {
    starts_in_a_warm_sandbox(
        "as_a_process_an_app_starts_in_a_warm_sandbox_contained_as_a_cold_one",
        SandboxChoice::Process,
    );
}

fn starts_in_a_warm_sandbox(test: &str, choice: SandboxChoice) {
    if skipped(test) || !sandbox_available(choice) {
        return;
    }
    let gvisor = choice == SandboxChoice::Gvisor;
    let env = env_with(if gvisor { "warm" } else { "warm-process" }, choice, |config| config.warm_sandboxes = 1);
    let panel = panel_id();
    let id = std::process::id();
    let (a1, a2, a3) = (format!("w1-{id}"), format!("w2-{id}"), format!("w3-{id}"));
    let mut cleanup = Cleanup { instances: vec![a1.clone(), a2.clone(), a3.clone()] };
    let (instances, scratch) = (env.dir.join("data").join("instances"), env.dir.join("data").join("scratch"));
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        let Code::Studio(volume) = &code else { unreachable!("a volume is Studio code") };
        let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
        let metrics = driver.metrics().clone();
        driver.warm_up().await;
        eventually(60, "a warm sandbox is ready", || metrics.warm_ready.get() == 1).await;
        let first = slots(&instances);
        assert_eq!(first.len(), 1, "{first:?}");

        let app =
            driver.start(spec(&a1, &panel, Code::App(snapshot.clone()))).await.expect("start in the warm sandbox");
        assert_eq!(metrics.warm_takes.with_label_values(&["taken"]).get(), 1);
        let addr = app.endpoint.addr.clone();
        let who = get_json(&addr, "/whoami");
        let panel_uid = who["uid"].as_u64().expect("a uid");
        assert_ne!(panel_uid, 0, "the panel runs as its own uid, not the sandbox's root: {who}");
        let code = scratch.join(&first[0]).join("code");
        assert_eq!(u64::from(std::fs::metadata(code.join("server.py")).unwrap().uid()), panel_uid, "its code");
        let home = if gvisor { "/home/panel".to_owned() } else { code.display().to_string() };
        assert_eq!(who["cwd"], home.as_str());
        assert_eq!(who["env"]["PORT"], "8080");
        assert_eq!(who["env"]["HOME"], home.as_str());
        assert!(who["env"]["NEXUS_SIDECAR_TOKEN"].as_str().is_some_and(|t| t.len() == 48), "{who}");
        let status = get_json(&addr, "/read?name=/proc/self/status");
        let caps = capability_sets(status["text"].as_str().unwrap_or_default());
        assert!(caps.len() >= 4, "{status}");
        assert!(
            caps.iter().all(|l| l.ends_with("0000000000000000")),
            "no capability is left, bounding set included: {caps:?}"
        );
        if gvisor {
            let kernel = get_json(&addr, "/kernel");
            assert!(kernel["dmesg"].as_str().unwrap_or_default().contains("Starting gVisor"), "{kernel}");
        } else {
            let status = status["text"].as_str().unwrap_or_default();
            assert!(status.contains("NoNewPrivs:\t1"), "no new privileges, as a cold start: {status}");
            assert_eq!(get_json(&addr, "/pdeathsig")["signal"], 9, "it dies with its node, as a cold start");
        }
        assert_eq!(get_json(&addr, "/sidecar")["status"], 200, "its own sidecar answers");
        if let Some(host) = host_ip() {
            assert_eq!(probe(&addr, &host, env.redis_port)["connected"], false, "the host stays out of reach");
        }
        let logs = driver.logs(&a1, 50).await.unwrap();
        assert!(logs.iter().any(|l| l == "probe panel up"), "the panel's output is in its instance's log: {logs:?}");
        assert!(!logs.iter().any(|l| l.contains("nexus-warm")), "the zygote's own line is not: {logs:?}");

        // A restart is a cold start in the same namespace, from the snapshot.
        get_json(&addr, "/write?name=scratch.txt");
        driver.restart(&a1).await.expect("restart");
        assert_eq!(get_json(&addr, "/exists?name=scratch.txt")["exists"], false, "a restarted App starts afresh");
        assert_eq!(get_json(&addr, "/whoami")["uid"], panel_uid);
        driver.stop(&a1, Duration::from_secs(5)).await.unwrap();
        assert!(!instances.join(&first[0]).exists(), "the slot's files go with its instance");
        assert!(!Path::new("/run/netns").join(format!("nexus-{}", first[0])).exists());
        assert_eq!(processes_mentioning(&first[0]), Vec::<String>::new());
        assert!(!code.exists(), "nor its copy");

        // The pool fills again; a sandbox that died meanwhile is not taken.
        eventually(60, "the pool refilled", || metrics.warm_ready.get() == 1).await;
        let second = slots(&instances);
        assert_eq!(second.len(), 1, "{second:?}");
        let killed: Vec<String> = slot_members(&second[0]).iter().map(i32::to_string).collect();
        assert!(!killed.is_empty(), "the ready sandbox runs");
        for pid in &killed {
            let _ = std::process::Command::new("kill").args(["-9", pid]).status();
        }
        // And a command other than `python3 script.py` runs by exec.
        let command = r#"{"command": ["sh", "-c", "exec python3 server.py"]}"#;
        std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
        let by_shell = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
        // Dead, not dying: gone, or a zombie (its files closed).
        let dead = |pid: &String| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        };
        eventually(10, "the killed sandbox is dead", || killed.iter().all(dead)).await;
        let app = driver.start(spec(&a2, &panel, Code::App(by_shell.clone()))).await.expect("a cold start instead");
        assert_eq!(metrics.warm_takes.with_label_values(&["dead"]).get(), 1);
        assert_eq!(metrics.warm_takes.with_label_values(&["empty"]).get(), 1);
        assert_eq!(get_json(&app.endpoint.addr, "/whoami")["uid"], panel_uid);
        driver.stop(&a2, Duration::from_secs(5)).await.unwrap();
        eventually(60, "the pool refilled", || metrics.warm_ready.get() == 1).await;
        let app = driver.start(spec(&a3, &panel, Code::App(by_shell))).await.expect("start by exec");
        assert_eq!(metrics.warm_takes.with_label_values(&["taken"]).get(), 2);
        let who = get_json(&app.endpoint.addr, "/whoami");
        assert_eq!(who["uid"], panel_uid, "{who}");
        let status = get_json(&app.endpoint.addr, "/read?name=/proc/self/status");
        let caps = capability_sets(status["text"].as_str().unwrap_or_default());
        assert!(caps.iter().all(|l| l.ends_with("0000000000000000")), "{caps:?}");
        driver.stop(&a3, Duration::from_secs(5)).await.unwrap();

        // The driver's release ends the pool with nothing left of it.
        eventually(60, "the pool refilled", || metrics.warm_ready.get() == 1).await;
        let last = slots(&instances);
        assert_eq!(last.len(), 1, "{last:?}");
        let running: Vec<String> = slot_members(&last[0]).iter().map(i32::to_string).collect();
        assert!(!running.is_empty(), "the ready sandbox runs");
        driver.release().await;
        assert_eq!(metrics.warm_ready.get(), 0);
        assert_eq!(slots(&instances), Vec::<String>::new(), "no slot's files are left");
        eventually(10, "no warm sandbox runs", || running.iter().all(dead)).await;
        assert!(!scratch.join(&last[0]).exists(), "nor its scratch space");
        assert!(!Path::new("/run/netns").join(format!("nexus-{}", last[0])).exists());
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A driver that crashed leaves its warm sandboxes: the next one on the
/// same data dir ends them and frees their namespace, cgroup, scratch space
/// and files.
#[test]
fn a_new_driver_sweeps_the_warm_sandboxes_a_crashed_one_left() {
    if skipped("a_new_driver_sweeps_the_warm_sandboxes_a_crashed_one_left") || !sandbox_available(SandboxChoice::Gvisor)
    {
        return;
    }
    let env = env_with("warm-crash", SandboxChoice::Gvisor, |config| config.warm_sandboxes = 1);
    let Env { dir, _brokers, redis_url, driver, .. } = env;
    let data_dir = dir.join("data");
    actix_rt::System::new().block_on(async move {
        let metrics = driver.metrics().clone();
        driver.warm_up().await;
        eventually(60, "a warm sandbox is ready", || metrics.warm_ready.get() == 1).await;
        let made = slots(&data_dir.join("instances"));
        assert_eq!(made.len(), 1, "{made:?}");
        let slot = made[0].clone();
        let netns = Path::new("/run/netns").join(format!("nexus-{slot}"));
        let (scratch, cgroup) = (data_dir.join("scratch").join(&slot), instance_cgroup(&slot));

        // The "crash": gone without a release.
        drop(driver);
        actix_rt::time::sleep(Duration::from_secs(1)).await;
        assert!(netns.exists() && scratch.is_dir() && cgroup.is_dir(), "the slot outlived its driver");

        let next = LocalDriver::new(LocalConfig::new(
            data_dir.clone(),
            PathBuf::from(env!("CARGO_BIN_EXE_nexus")),
            redis_url.clone(),
            SandboxChoice::Gvisor,
        ));
        assert_eq!(next.sweep_stale().await, 1, "the slot's namespace is swept");
        assert!(!netns.exists(), "its namespace is deleted");
        assert_eq!(processes_mentioning(&slot), Vec::<String>::new(), "its sandbox is ended");
        assert!(!scratch.exists(), "its scratch space is gone");
        assert!(!cgroup.exists(), "its cgroup {} is removed", cgroup.display());
        assert_eq!(slots(&data_dir.join("instances")), Vec::<String>::new(), "its files are gone");
    });
    drop(_brokers);
    let _ = std::fs::remove_dir_all(&dir);
}
