//! Deploy time: snapshots of a Studio volume with the real `LocalDriver`
//! (its content-addressed object store), for a 10 MB tree deployed first,
//! deployed again unchanged, and with one file changed, against a plain
//! copy of the same tree (`cp -a`) measured in the same run: what a deploy
//! that copies everything costs at least.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use nexus_actors::roles::panel_manager::driver::RuntimeDriver;
use nexus_actors::roles::panel_manager::local::{LocalConfig, LocalDriver, SandboxChoice};

const FILES: usize = 200;
const FILE_BYTES: usize = 50 * 1024;
const PANEL: &str = "bench-deploy";

pub(crate) const NOTES: &str = "\
A Studio volume of 200 files of 50 KiB (10 MB, pseudo-random bytes, in 10
directories) is snapshotted by the real `LocalDriver` (what `POST
/api/panels/{id}/deploy` does before it starts the App). A snapshot's files
are hard links to objects named by their SHA-256 and mode, so an unchanged
file costs a read and a link. Each row is the median of 5 runs (the first
deploy: 1 run, into an empty store); `cp -a` of the same tree, on the same
disk, is the baseline (`cp -a` ÷ Nexus: higher is better, 1.00 is
parity). Snapshots past the last 5 are pruned and their
unreferenced objects deleted inside the measured time.
";

/// Runs the deploys; returns the markdown table.
pub(crate) async fn table(dir: &Path) -> String {
    match measure(&dir.join("deploy")).await {
        Ok(table) => table,
        Err(why) => format!("| deploy | — | — |\n|---|---:|---:|\n| skipped: {why} | — | — |\n"),
    }
}

async fn measure(work: &Path) -> Result<String, String> {
    let _ = std::fs::remove_dir_all(work);
    let driver = LocalDriver::new(LocalConfig::new(
        work.join("data"),
        PathBuf::from("nexus"),
        "redis://127.0.0.1:1".into(),
        SandboxChoice::Process,
    ));
    let volume = driver.volume(PANEL, "template:empty").await.map_err(|e| e.to_string())?.location.path().to_owned();
    for i in 0..FILES {
        let file = volume.join(format!("dir{}/file{i}.bin", i % 10));
        std::fs::create_dir_all(file.parent().ok_or("a parent")?).map_err(|e| e.to_string())?;
        // Distinct incompressible content per file (xorshift, seeded by the index).
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (i as u64 + 1);
        let bytes: Vec<u8> = (0..FILE_BYTES)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        std::fs::write(&file, bytes).map_err(|e| e.to_string())?;
    }
    let snapshot = || async { driver.snapshot(PANEL, "template:empty").await.map(drop).map_err(|e| e.to_string()) };

    let started = Instant::now();
    snapshot().await?;
    let first = ms(started);
    let mut unchanged = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        snapshot().await?;
        unchanged.push(ms(started));
    }
    let mut one_changed = Vec::new();
    for run in 0..5 {
        std::fs::write(volume.join("dir0/file0.bin"), format!("changed {run}")).map_err(|e| e.to_string())?;
        let started = Instant::now();
        snapshot().await?;
        one_changed.push(ms(started));
    }
    let mut copies = Vec::new();
    for run in 0..5 {
        let to = work.join(format!("copy-{run}"));
        let started = Instant::now();
        let copied = Command::new("cp").arg("-a").arg(&volume).arg(&to).status().map_err(|e| e.to_string())?;
        copies.push(ms(started));
        if !copied.success() {
            return Err("cp -a failed".into());
        }
    }
    let baseline = median(copies);
    let row = |what: &str, took: f64| format!("| {what} | {took:.1} | {:.2} |\n", baseline / took);
    let mut out = String::from("| deploy of a 10 MB tree (200 files) | ms | `cp -a` ÷ Nexus |\n|---|---:|---:|\n");
    out += &row("first deploy (every object new)", first);
    out += &row("unchanged redeploy (deduplicated)", median(unchanged));
    out += &row("redeploy with one file changed", median(one_changed));
    out += &format!("| `cp -a` of the same tree (baseline) | {baseline:.1} | 1.00 |\n");
    let _ = std::fs::remove_dir_all(work);
    Ok(out)
}

fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
