//! The runsc probe: a failure is tried again, and a downgrade to a weaker
//! isolation is probed again later, never kept for good. `runsc` is the
//! real one behind a wrapper that fails its first runs, as a fresh
//! machine's did once ("cannot read client sync file … EOF").

use std::path::{Path, PathBuf};
use std::time::Duration;

use nexus_actors::infra::find_program;
use nexus_actors::instance::Isolation;
use nexus_actors::roles::panel_manager::local::{LocalConfig, LocalDriver, SandboxChoice};
use nexus_testkit::{prerequisite, tempdir};

use super::harness::skipped;

/// Makes `bin/runsc` the real `runsc`, except that its first `failures`
/// `run`s (counted in `bin/runs`) fail.
fn flaky_runsc(bin: &Path, real: &Path, failures: u32) {
    let runs = bin.join("runs");
    let _ = std::fs::remove_file(&runs);
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in\n  *\" run \"*)\n    n=$(cat '{runs}' 2>/dev/null || echo 0)\n    echo $((n + 1)) > '{runs}'\n    if [ \"$n\" -lt {failures} ]; then echo 'cannot read client sync file: EOF' >&2; exit 1; fi;;\nesac\nexec '{real}' \"$@\"\n",
        runs = runs.display(),
        real = real.display(),
    );
    let path = bin.join("runsc");
    std::fs::write(&path, script).unwrap();
    std::process::Command::new("chmod").args(["755"]).arg(&path).status().unwrap();
}

fn driver(dir: &Path, reprobe_after: Duration) -> LocalDriver {
    let nexus = PathBuf::from(env!("CARGO_BIN_EXE_nexus"));
    let config = LocalConfig::new(dir.to_owned(), nexus, "redis://127.0.0.1:1".into(), SandboxChoice::Auto);
    LocalDriver::new(LocalConfig { reprobe_after, ..config })
}

#[test]
fn a_failed_runsc_probe_is_tried_again_and_a_downgrade_is_probed_again_later() {
    if skipped("a_failed_runsc_probe_is_tried_again_and_a_downgrade_is_probed_again_later") {
        return;
    }
    let Some(real) = find_program("runsc") else {
        assert!(!prerequisite(false, "runsc, for the probe test (apt-get install runsc)"));
        return;
    };
    let dir = tempdir("runsc-probe");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // Each test runs in a process of its own: this PATH is this test's.
    std::env::set_var("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    let probes = |d: &LocalDriver, outcome: &str| d.metrics().sandbox_probes.with_label_values(&[outcome]).get();
    actix_rt::System::new().block_on(async {
        flaky_runsc(&bin, &real, 1);
        assert_eq!(find_program("runsc"), Some(bin.join("runsc")), "the wrapper comes first on PATH");
        let once = driver(&dir.join("once"), LocalConfig::REPROBE_AFTER);
        let (isolation, warning) = once.isolation().await.unwrap();
        assert_eq!(isolation, Isolation::Gvisor, "one failed probe is tried again: {warning:?}");
        assert_eq!((probes(&once, "failed"), probes(&once, "ok")), (1, 1));

        flaky_runsc(&bin, &real, 3);
        let later = driver(&dir.join("later"), Duration::from_millis(500));
        let (isolation, warning) = later.isolation().await.unwrap();
        assert_eq!(isolation, Isolation::Namespaces, "every try failed");
        assert!(warning.unwrap_or_default().contains("gVisor is unavailable"));
        assert_eq!(later.isolation().await.unwrap().0, Isolation::Namespaces, "decided for a while");
        assert_eq!((probes(&later, "failed"), probes(&later, "ok")), (3, 0), "not probed again yet");
        actix_rt::time::sleep(Duration::from_millis(600)).await;
        let (isolation, _) = later.isolation().await.unwrap();
        assert_eq!(isolation, Isolation::Namespaces, "starts go on with the decision while it is probed again");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (isolation, warning) = loop {
            let decided = later.isolation().await.unwrap();
            if decided.0 != Isolation::Namespaces || std::time::Instant::now() > deadline {
                break decided;
            }
            actix_rt::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(isolation, Isolation::Gvisor, "probed again later: {warning:?}");
        assert!(warning.is_none());
        assert_eq!((probes(&later, "failed"), probes(&later, "ok")), (3, 1));
    });
    let _ = std::fs::remove_dir_all(&dir);
}
