//! Files: Studio volumes persist and App copies do not, symlinks are never
//! followed by root, and a panel's uid reaches its own code only.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nexus_actors::roles::panel_manager::driver::{Code, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::SandboxChoice;

use super::harness::{env, get_json, panel_id, skipped, spec, volume_with_probe, Cleanup};

#[test]
fn studio_files_persist_across_restarts_and_app_files_do_not() {
    if skipped("studio_files_persist_across_restarts_and_app_files_do_not") {
        return;
    }
    let env = env("storage", SandboxChoice::Auto);
    let panel = panel_id();
    let id = std::process::id();
    let (s1, s2, a1, a2) = (format!("s1-{id}"), format!("s2-{id}"), format!("a1-{id}"), format!("a2-{id}"));
    let mut cleanup = Cleanup { instances: vec![s1.clone(), s2.clone(), a1.clone(), a2.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        let studio = driver.start(spec(&s1, &panel, code.clone())).await.expect("start Studio");
        get_json(&studio.endpoint.addr, "/write?name=kept.txt");
        driver.stop(&s1, Duration::from_secs(5)).await.unwrap();
        let studio = driver.start(spec(&s2, &panel, code)).await.expect("start Studio again");
        assert_eq!(get_json(&studio.endpoint.addr, "/exists?name=kept.txt")["exists"], true, "the volume persists");
        driver.stop(&s2, Duration::from_secs(5)).await.unwrap();

        // The snapshot is taken from the volume (the probe panel, kept.txt)
        // and is read-only.
        let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
        assert_eq!(snapshot.version, 1);
        assert!(snapshot.location.path().join("kept.txt").exists());
        for path in [snapshot.location.path().to_owned(), snapshot.location.path().join("server.py")] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o222, 0, "{} is writable: {mode:o}", path.display());
        }
        let second = driver.snapshot(&panel, "template:python_minimal").await.unwrap();
        assert_eq!(second.version, 2, "every snapshot gets the next version");

        let app = driver.start(spec(&a1, &panel, Code::App(snapshot.clone()))).await.expect("start App");
        assert!(app.endpoint.watchdog.is_none(), "an App has no watchdog");
        assert!(app.endpoint.watchdog_token.is_none(), "an App has no watchdog token");
        get_json(&app.endpoint.addr, "/write?name=scratch.txt");
        assert_eq!(get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"], true);
        driver.restart(&a1).await.expect("restart the App's process");
        assert_eq!(
            get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"],
            false,
            "a restarted App starts from its snapshot"
        );
        get_json(&app.endpoint.addr, "/write?name=scratch.txt");
        driver.stop(&a1, Duration::from_secs(5)).await.unwrap();
        let app = driver.start(spec(&a2, &panel, Code::App(snapshot.clone()))).await.unwrap();
        assert_eq!(get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"], false);
        assert!(!snapshot.location.path().join("scratch.txt").exists(), "nothing reached the snapshot");
        driver.stop(&a2, Duration::from_secs(5)).await.unwrap();

        driver.forget(&panel).await.expect("forget");
        assert!(!snapshot.location.path().exists(), "forget deletes the snapshots");
        let fresh = driver.volume(&panel, "template:python_minimal").await.unwrap();
        assert!(!fresh.location.path().join("kept.txt").exists(), "forget deleted the volume");
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A symlink in a volume stays a symlink in a snapshot: the driver never
/// reads the host file it points to.
#[test]
fn snapshots_copy_symlinks_without_following_them() {
    let env = env("symlinks", SandboxChoice::None);
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let volume = driver.volume("linkpanel", "template:python_minimal").await.unwrap();
        std::os::unix::fs::symlink("/etc/hostname", volume.location.path().join("host-file")).unwrap();
        let snapshot = driver.snapshot("linkpanel", "template:python_minimal").await.unwrap();
        let copied = std::fs::symlink_metadata(snapshot.location.path().join("host-file")).unwrap();
        assert!(copied.file_type().is_symlink(), "the symlink was followed and its target copied");
    });
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A hard link in a volume to a file from elsewhere (a panel can make one
/// to any file it can reach; root makes it here): starting the Studio does
/// not give that file to the panel, and a snapshot refuses it with a clear
/// error instead of copying the host file in; without it, both work.
#[test]
fn hard_links_to_files_from_elsewhere_are_neither_chowned_nor_copied() {
    if skipped("hard_links_to_files_from_elsewhere_are_neither_chowned_nor_copied") {
        return;
    }
    let env = env("hardlinks", SandboxChoice::Process);
    let panel = panel_id();
    let studio = format!("hardlink-{}", std::process::id());
    let cleanup = Cleanup { instances: vec![studio.clone()] };
    let marker = format!("HOST-FILE-{}", std::process::id());
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        let Code::Studio(volume) = &code else { unreachable!() };
        // Root's file beside the tree: on the volume's own file system, the
        // only one a hard link in it can reach.
        let outside = volume.location.path().parent().unwrap().join("host-file.txt");
        std::fs::write(&outside, &marker).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::hard_link(&outside, volume.location.path().join("linked.txt")).unwrap();
        driver.start(spec(&studio, &panel, code.clone())).await.expect("start Studio");
        driver.stop(&studio, Duration::from_secs(5)).await.unwrap();
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the host file was given to the panel");
        assert_ne!(std::fs::metadata(volume.location.path().join("server.py")).unwrap().uid(), 0, "its own files are");

        let refused = driver.snapshot(&panel, "template:python_minimal").await.expect_err("a snapshot with the link");
        assert!(refused.to_string().contains("linked.txt: a hard link"), "{refused}");
        std::fs::remove_file(volume.location.path().join("linked.txt")).unwrap();
        let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("a snapshot without it");
        assert_eq!(files_containing(snapshot.location.path(), &marker), Vec::<PathBuf>::new());
    });
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// Regular files under `root` (symlinks not followed) whose text holds `marker`.
fn files_containing(root: &Path, marker: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() && std::fs::read_to_string(&path).is_ok_and(|t| t.contains(marker)) {
                found.push(path);
            }
        }
    }
    found
}

/// The panel owns its volume and may swap any directory in it for a
/// symlink to a host path at any moment. Root copies the volume (snapshots)
/// and chowns it (every start) meanwhile: it must never read or chown
/// through such a symlink. A thread keeps swapping 40 directories with
/// symlinks to a root-only directory while the driver works; nothing of
/// that directory may reach a snapshot or change owner. (A path-based walk
/// loses this race within a few rounds.)
#[test]
fn root_never_copies_or_chowns_through_a_symlink_the_panel_swaps_in() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    if skipped("root_never_copies_or_chowns_through_a_symlink_the_panel_swaps_in") {
        return;
    }
    let env = env("swap", SandboxChoice::Process);
    let panel = panel_id();
    let (studio, app) = (format!("swap-s-{}", std::process::id()), format!("swap-a-{}", std::process::id()));
    let mut cleanup = Cleanup { instances: vec![studio.clone(), app.clone()] };
    let marker = format!("ROOT-ONLY-{}", std::process::id());
    let secret = env.dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("secret.txt"), &marker).unwrap();
    std::fs::set_permissions(secret.join("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        let Code::Studio(volume) = &code else { unreachable!() };
        // A plain symlink to the root-only file: it stays a symlink the panel cannot read.
        std::os::unix::fs::symlink(secret.join("secret.txt"), volume.location.path().join("leak")).unwrap();
        let pairs = 40;
        for i in 0..pairs {
            let sub = volume.location.path().join(format!("sub{i}"));
            std::fs::create_dir(&sub).unwrap();
            std::fs::write(sub.join("plain.txt"), "the panel's own file").unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, location, secret) = (stop.clone(), volume.location.path().to_owned(), secret.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..pairs {
                        let (sub, real) = (location.join(format!("sub{i}")), location.join(format!(".real{i}")));
                        if std::fs::rename(&sub, &real).is_ok() {
                            let _ = std::os::unix::fs::symlink(&secret, &sub);
                            std::thread::yield_now();
                            let _ = std::fs::remove_file(&sub);
                            let _ = std::fs::rename(&real, &sub);
                        }
                    }
                }
            })
        };

        for _ in 0..3 {
            let started = driver.start(spec(&studio, &panel, code.clone())).await.expect("start Studio");
            let read = get_json(&started.endpoint.addr, "/read?name=leak");
            assert!(!read.to_string().contains(&marker), "the Studio panel read a root-only file: {read}");
            driver.stop(&studio, Duration::from_secs(5)).await.unwrap();
            for _ in 0..10 {
                let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
                let leaked = files_containing(snapshot.location.path(), &marker);
                assert_eq!(leaked, Vec::<PathBuf>::new(), "root copied a file through a swapped symlink");
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        for path in [secret.clone(), secret.join("secret.txt")] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "root chowned {} through a symlink", path.display());
        }
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o7777, 0o700);

        // The App's copy of a snapshot keeps the symlink, which its uid cannot follow.
        let snapshot = driver.snapshot(&panel, "template:python_minimal").await.expect("snapshot");
        assert!(std::fs::symlink_metadata(snapshot.location.path().join("leak")).unwrap().file_type().is_symlink());
        let started = driver.start(spec(&app, &panel, Code::App(snapshot))).await.expect("start App");
        let read = get_json(&started.endpoint.addr, "/read?name=leak");
        assert!(read["error"].as_str().is_some_and(|e| e.contains("Permission denied")), "{read}");
        assert_eq!(get_json(&started.endpoint.addr, "/read?name=sub0/plain.txt")["text"], "the panel's own file");
        driver.stop(&app, Duration::from_secs(5)).await.unwrap();
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// The data directory keeps each panel's uid to its own code. Under
/// `process` isolation (the host's filesystem, only permissions between a
/// panel and the rest) a panel reads neither another panel's volume nor its
/// App's copy, nor the logs, snapshots or any file of the driver's private
/// directories, and lists none of the shared ones.
#[test]
fn a_panel_reaches_only_its_own_files() {
    if skipped("a_panel_reaches_only_its_own_files") {
        return;
    }
    let env = env("files", SandboxChoice::Process);
    let (panel, other) = (panel_id(), panel_id());
    let id = std::process::id();
    let (mine, theirs, their_app) = (format!("files-a-{id}"), format!("files-b-{id}"), format!("files-c-{id}"));
    let mut cleanup = Cleanup { instances: vec![mine.clone(), theirs.clone(), their_app.clone()] };
    let driver = env.driver.clone();
    let data = env.dir.join("data");
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, &panel).await;
        driver.snapshot(&panel, "template:python_minimal").await.expect("a snapshot of mine");
        let their_code = volume_with_probe(&driver, &env.redis_url, &other).await;
        let their_snapshot = driver.snapshot(&other, "template:python_minimal").await.expect("a snapshot of theirs");
        let started = driver.start(spec(&mine, &panel, code)).await.expect("start mine");
        driver.start(spec(&theirs, &other, their_code)).await.expect("start theirs");
        driver.start(spec(&their_app, &other, Code::App(their_snapshot))).await.expect("start their App");
        let addr = started.endpoint.addr.clone();
        let uid = get_json(&addr, "/whoami")["uid"].as_u64().expect("a uid") as u32;

        // The layout: shared directories passable, private ones closed, a volume its panel's alone.
        let mode = |path: &Path| {
            let meta = std::fs::metadata(path).unwrap();
            (meta.permissions().mode() & 0o7777, meta.uid())
        };
        for (dir, wanted) in
            [("", 0o711), ("volumes", 0o711), ("scratch", 0o711), ("instances", 0o700), ("snapshots", 0o700)]
        {
            assert_eq!(mode(&data.join(dir)), (wanted, 0), "data/{dir}");
        }
        assert_eq!(mode(&data.join("volumes").join(&panel)), (0o711, 0), "a volume's file system is root's");
        assert_eq!(mode(&data.join("volumes").join(&panel).join("home")), (0o700, uid), "its tree the panel's alone");
        assert_ne!(mode(&data.join("volumes").join(&other).join("home")).1, uid, "another panel has another uid");
        assert_eq!(mode(&data.join("volumes/.disks")), (0o700, 0), "the volumes' disks are root's");
        // World-readable files inside the private directories stay out of reach.
        for dir in ["instances", "snapshots"] {
            std::fs::write(data.join(dir).join("marker.txt"), "root's").unwrap();
            std::fs::set_permissions(data.join(dir).join("marker.txt"), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }

        let forbidden = [
            data.join("volumes").join(&other).join("home/server.py"),
            data.join("volumes/.disks").join(format!("{other}.ext4")),
            data.join("scratch").join(&their_app).join("code/server.py"),
            data.join("snapshots").join(&panel).join("1/server.py"),
            data.join("snapshots/marker.txt"),
            data.join("instances").join(&mine).join("panel.log"),
            data.join("instances").join(&mine).join("sidecar.log"),
            data.join("instances/marker.txt"),
        ];
        for path in &forbidden {
            assert!(path.exists(), "{} is there (seen as root)", path.display());
            let read = get_json(&addr, &format!("/read?name={}", path.display()));
            let denied = read["error"].as_str().is_some_and(|e| e.contains("Permission denied"));
            assert!(denied, "the panel read {}: {read}", path.display());
        }
        let lost_found = data.join("volumes").join(&panel).join("lost+found");
        for dir in [data.clone(), data.join("volumes"), data.join("scratch"), data.join("instances"), lost_found] {
            let query = dir.display().to_string().replace('+', "%2B");
            let listed = get_json(&addr, &format!("/list?name={query}"));
            assert!(
                listed["error"].as_str().is_some_and(|e| e.contains("Permission denied")),
                "{}: {listed}",
                dir.display()
            );
        }
        // What is its own it reads: the test can fail.
        let own = get_json(
            &addr,
            &format!("/read?name={}", data.join("volumes").join(&panel).join("home/server.py").display()),
        );
        assert!(own["text"].as_str().is_some_and(|t| t.contains("probe panel up")), "{own}");

        for instance in [&mine, &theirs, &their_app] {
            driver.stop(instance, Duration::from_secs(5)).await.expect("stop");
        }
        assert!(!data.join("scratch").join(&their_app).exists(), "an App's copy goes with it");
    });
    cleanup.instances.clear();
}
