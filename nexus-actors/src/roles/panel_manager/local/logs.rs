//! An instance's log (`panel.log`: the user process's stdout and stderr,
//! written straight to the file with `O_APPEND`), kept under a size cap by
//! copy-and-truncate: past [`MAX_LOG`] its content becomes `panel.log.1`
//! (the one before is dropped) and the file starts again from empty. The
//! writers keep their descriptors and append at the new end. A panel can
//! exceed the cap only by what it writes between two checks
//! ([`CHECK_EVERY`]), and lose at most the lines written during a copy.
//!
//! Reading the last lines goes back into `panel.log.1` when the current
//! file holds fewer. It knows nothing about instances beyond their log's path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use prometheus::IntCounter;

/// The size past which a log is rotated.
pub(super) const MAX_LOG: u64 = 8 << 20;
/// How often a running instance's log is checked.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How much of a file the last lines are looked for in.
const WINDOW: u64 = 1 << 20;

fn previous(log: &Path) -> PathBuf {
    log.with_extension("log.1")
}

/// Rotates `log` when it is larger than `max`: true when it did.
pub(super) fn rotate_if_over(log: &Path, max: u64) -> io::Result<bool> {
    if fs::metadata(log)?.len() <= max {
        return Ok(false);
    }
    let previous = previous(log);
    let temporary = log.with_extension("log.1.tmp");
    let mut copy = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    io::copy(&mut File::open(log)?, &mut copy)?;
    fs::rename(&temporary, &previous)?;
    OpenOptions::new().write(true).open(log)?.set_len(0)?;
    Ok(true)
}

/// Checks `log` every [`CHECK_EVERY`] while `alive` can be upgraded (the
/// instance runs), counting rotations in `rotations`.
pub(super) fn keep_capped<T: Send + Sync + 'static>(log: PathBuf, alive: Weak<T>, rotations: IntCounter) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if alive.upgrade().is_none() {
                return;
            }
            let path = log.clone();
            match tokio::task::spawn_blocking(move || rotate_if_over(&path, MAX_LOG)).await {
                Ok(Ok(true)) => {
                    rotations.inc();
                    tracing::info!(log = %log.display(), "nexus_local_log_rotations_total: log rotated");
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => return,
                Ok(Err(error)) => tracing::warn!(log = %log.display(), %error, "log not rotated"),
                Err(_) => return,
            }
        }
    });
}

/// The last `lines` lines of `log`, oldest first, going back into the
/// rotated file when the current one holds fewer.
pub(super) fn tail(log: &Path, lines: usize) -> io::Result<Vec<String>> {
    let mut last = last_lines(log, lines)?;
    if last.len() < lines {
        match last_lines(&previous(log), lines - last.len()) {
            Ok(mut earlier) => {
                earlier.append(&mut last);
                last = earlier;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(last)
}

fn last_lines(path: &Path, lines: usize) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].iter().map(|l| (*l).to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_past_its_cap_is_rotated_and_read_across_both_files() {
        let dir = std::env::temp_dir().join(format!("nexus-logs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("panel.log");
        // An appending writer, as the panel's stdout is.
        let mut writer = OpenOptions::new().create(true).append(true).open(&log).expect("open");
        for i in 0..10 {
            writeln!(writer, "line {i}").expect("write");
        }
        assert!(!rotate_if_over(&log, 1000).expect("checked"), "under the cap: kept");
        assert!(rotate_if_over(&log, 50).expect("checked"), "over the cap: rotated");
        assert_eq!(fs::metadata(&log).expect("stat").len(), 0);
        // The writer goes on at the new end, not at its old offset.
        writeln!(writer, "line 10").expect("write");
        assert_eq!(fs::read_to_string(&log).expect("read"), "line 10\n");
        assert_eq!(tail(&log, 3).expect("tail"), ["line 8", "line 9", "line 10"]);
        assert_eq!(tail(&log, 1).expect("tail"), ["line 10"]);
        // The file before the last is dropped on the next rotation.
        assert!(rotate_if_over(&log, 1).expect("checked"));
        assert_eq!(tail(&log, 5).expect("tail"), ["line 10"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
