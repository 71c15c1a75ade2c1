//! Resource limits, under gVisor and under bubblewrap: a panel that takes
//! more memory than it may is killed, and (bubblewrap) one that forks past
//! its process limit is refused, each reported with the limit it ran into
//! (the status then reads "killed: memory limit"); an App that fills its
//! scratch space is refused more and reported too, and so is a Studio
//! panel that fills its volume (a file system of its own, whatever room the
//! host has), where the files API then refuses a save as over quota. Under gVisor a panel's
//! processes are the sandbox's, not the host's: the process limit bounds
//! the sandbox's own threads, and its memory limit everything.

use std::time::Duration;

use nexus_actors::roles::panel_manager::driver::{Code, DriverError, InstanceEvent, LimitHit, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::{Limits, SandboxChoice};
use nexus_actors::roles::panel_manager::volume_files::{FileError, FilePath};

use nexus_testkit::eventually;

use super::harness::{env_with, panel_id, register, sandbox_available, skipped, spec, Cleanup};

/// Touches 300 MiB (a `bytes` of that size is written, not merely reserved).
const MEMORY_HOG: &str = "x = b'x' * (300 << 20); print('survived', flush=True)";
/// Forks children that wait, until a fork is refused (exit 3) or 200 ran (exit 0).
const FORKER: &str = "
import os, sys, time
n = 0
try:
    while n < 200:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print('fork refused after', n, e, flush=True)
    sys.exit(3)
print('forked', n, flush=True)
";
/// Writes 64 MiB into its working directory, 1 MiB at a time, until refused (exit 4).
const FILLER: &str = "
import sys
try:
    with open('filler.bin', 'wb') as f:
        for i in range(64):
            f.write(b'x' * (1 << 20))
            f.flush()
except OSError as e:
    print('write refused:', e, flush=True)
    sys.exit(4)
print('wrote 64 MiB', flush=True)
";

pub(crate) fn limits_are_enforced_and_reported(test: &str, choice: SandboxChoice) {
    if skipped(test) || !sandbox_available(choice) {
        return;
    }
    let gvisor = choice == SandboxChoice::Gvisor;
    let limits = Limits {
        memory: 64 << 20,
        cpu_millis: 500,
        pids: if gvisor { 512 } else { 48 },
        disk: 16 << 20,
        volume: 32 << 20,
    };
    // Under gVisor Apps start in warm sandboxes: their limits are checked there.
    let env = env_with(test, choice, |config| {
        config.limits = limits;
        config.warm_sandboxes = usize::from(gvisor);
    });
    let id = std::process::id();
    let (hog, forker, filler) = (format!("{test}-hog-{id}"), format!("{test}-fork-{id}"), format!("{test}-fill-{id}"));
    let app_hog = format!("{test}-apphog-{id}");
    let studio_filler = format!("{test}-vol-{id}");
    let cleanup = Cleanup {
        instances: vec![hog.clone(), forker.clone(), filler.clone(), studio_filler.clone(), app_hog.clone()],
    };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async {
        let cases = [
            (&hog, MEMORY_HOG, InstanceEvent::Exited { code: None, limit: Some(LimitHit::Memory), restarted: false }),
            (&forker, FORKER, InstanceEvent::Exited { code: Some(3), limit: Some(LimitHit::Pids), restarted: false }),
        ];
        for (instance, script, expected) in cases.into_iter().take(if gvisor { 1 } else { 2 }) {
            let panel = panel_id();
            register(&env.redis_url, &panel).await;
            let volume = driver.volume(&panel, "template:python_minimal").await.unwrap();
            let command = serde_json::json!({"command": ["python3", "-c", script]}).to_string();
            std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
            let mut started = driver.start(spec(instance, &panel, Code::Studio(volume))).await.expect("start");
            let event = actix_rt::time::timeout(Duration::from_secs(90), started.events.recv()).await;
            let logs = driver.logs(instance, 20).await.unwrap_or_default();
            let event = event.unwrap_or_else(|_| panic!("{instance} did not end: {logs:?}"));
            // A kill's status depends on who reports it (bwrap's and runsc's
            // init exit 137): the limit is what must be right.
            let event = match event {
                Some(InstanceEvent::Exited { limit: Some(LimitHit::Memory), .. }) => {
                    Some(InstanceEvent::Exited { code: None, limit: Some(LimitHit::Memory), restarted: false })
                }
                event => event,
            };
            assert_eq!(event, Some(expected), "{instance}: {logs:?}");
            assert!(!logs.iter().any(|l| l.contains("survived")), "the hog got its memory: {logs:?}");
            driver.stop(instance, Duration::from_secs(5)).await.expect("stop");
        }

        // An App writes into its copy of the snapshot: 16 MiB at most here.
        let panel = panel_id();
        register(&env.redis_url, &panel).await;
        let volume = driver.volume(&panel, "template:python_minimal").await.unwrap();
        let command = serde_json::json!({"command": ["python3", "-c", FILLER]}).to_string();
        std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
        let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
        let warm = driver.metrics().clone();
        let scratch_dir = env.dir.join("data/scratch");
        let mut scratch = scratch_dir.join(&filler);
        if gvisor {
            driver.warm_up().await;
            eventually(60, "a warm sandbox is ready", || warm.warm_ready.get() == 1).await;
            // Its copy goes in the warm sandbox's scratch space.
            let slots = std::fs::read_dir(&scratch_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path());
            let slots: Vec<_> = slots.filter(|p| p.to_string_lossy().contains("_warm_")).collect();
            assert_eq!(slots.len(), 1, "{slots:?}");
            scratch = slots[0].clone();
        }
        let mut started = driver.start(spec(&filler, &panel, Code::App(snapshot))).await.expect("start the App");
        let event = actix_rt::time::timeout(Duration::from_secs(90), started.events.recv()).await;
        let logs = driver.logs(&filler, 20).await.unwrap_or_default();
        let event = event.unwrap_or_else(|_| panic!("{filler} did not end: {logs:?}"));
        assert_eq!(
            event,
            Some(InstanceEvent::Exited { code: Some(4), limit: Some(LimitHit::Disk), restarted: false }),
            "{logs:?}"
        );
        assert!(logs.iter().any(|l| l.contains("write refused")), "{logs:?}");
        driver.stop(&filler, Duration::from_secs(5)).await.expect("stop");
        assert!(!scratch.exists(), "the App's scratch space outlived it");
        if gvisor {
            // And one that takes more memory than it may, in the next one.
            assert_eq!(warm.warm_takes.with_label_values(&["taken"]).get(), 1, "the App took a warm sandbox");
            let command = serde_json::json!({"command": ["python3", "-c", MEMORY_HOG]}).to_string();
            std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
            let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
            eventually(60, "the pool refilled", || warm.warm_ready.get() == 1).await;
            let mut started = driver.start(spec(&app_hog, &panel, Code::App(snapshot))).await.expect("start");
            assert_eq!(warm.warm_takes.with_label_values(&["taken"]).get(), 2, "the App took a warm sandbox");
            let event = actix_rt::time::timeout(Duration::from_secs(90), started.events.recv()).await;
            let logs = driver.logs(&app_hog, 20).await.unwrap_or_default();
            let event = event.unwrap_or_else(|_| panic!("{app_hog} did not end: {logs:?}"));
            assert!(
                matches!(event, Some(InstanceEvent::Exited { limit: Some(LimitHit::Memory), .. })),
                "{event:?}: {logs:?}"
            );
            assert!(!logs.iter().any(|l| l.contains("survived")), "the hog got its memory: {logs:?}");
            driver.stop(&app_hog, Duration::from_secs(5)).await.expect("stop");
        }

        // A Studio panel writes into its volume: 32 MiB at most here.
        let panel = panel_id();
        register(&env.redis_url, &panel).await;
        let volume = driver.volume(&panel, "template:python_minimal").await.unwrap();
        let command = serde_json::json!({"command": ["python3", "-c", FILLER]}).to_string();
        std::fs::write(volume.location.path().join("nexus-panel.json"), command).unwrap();
        let mut started = driver.start(spec(&studio_filler, &panel, Code::Studio(volume))).await.expect("start");
        let event = actix_rt::time::timeout(Duration::from_secs(90), started.events.recv()).await;
        let logs = driver.logs(&studio_filler, 20).await.unwrap_or_default();
        let event = event.unwrap_or_else(|_| panic!("{studio_filler} did not end: {logs:?}"));
        assert_eq!(
            event,
            Some(InstanceEvent::Exited { code: Some(4), limit: Some(LimitHit::Disk), restarted: false }),
            "{logs:?}"
        );
        driver.stop(&studio_filler, Duration::from_secs(5)).await.expect("stop");
        let path = |p: &str| FilePath::parse(p).unwrap();
        let refused =
            driver.write_file(&panel, "template:python_minimal", path("more.bin"), vec![0; 1 << 20].into()).await;
        assert!(matches!(refused, Err(DriverError::File(FileError::Quota { .. }))), "{refused:?}");
        // Deleting what filled it makes room again.
        driver.delete_file(&panel, "template:python_minimal", path("filler.bin")).await.expect("delete");
        driver
            .write_file(&panel, "template:python_minimal", path("more.bin"), vec![0; 1 << 20].into())
            .await
            .expect("saved");
        driver.release().await;
        let root = env.dir.join("data/volumes").join(&panel);
        assert!(!root.join("home").join("more.bin").exists(), "released, the volume is no longer mounted");
    });
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&env.dir);
}
