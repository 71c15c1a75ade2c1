//! CI's chaos run: `scripts/chaos --short` (each fault once, under load),
//! with the debug build of `nexus`. It fails on any acknowledged write
//! lost, anything done twice, a follower that never converged, or a fault
//! not recovered from at all (recovery times are reported, not judged; see
//! `benches/src/chaos`).

use std::path::Path;
use std::process::Command;

use nexus_actors::infra::{find_program, Tansu};

#[test]
fn a_short_chaos_run_loses_nothing_and_does_nothing_twice() {
    let ready = find_program("redis-server").is_some() && Tansu::supports_sqlite();
    if !nexus_testkit::prerequisite(ready, "redis-server and tansu with SQLite storage (scripts/test installs them)") {
        return;
    }
    let bench = env!("CARGO_BIN_EXE_nexus-bench");
    let nexus = Path::new(bench).with_file_name("nexus");
    assert!(nexus.is_file(), "the nexus binary is built beside nexus-bench (cargo build -p nexus-bin)");
    let status =
        Command::new(bench).args(["chaos", "--short", "--nexus"]).arg(&nexus).status().expect("nexus-bench runs");
    assert!(status.success(), "the chaos run failed: its counts and logs are above");
}
