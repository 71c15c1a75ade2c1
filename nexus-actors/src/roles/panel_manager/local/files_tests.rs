//! The `local` driver's file methods on a real directory: what the API's
//! routes do to a Studio volume, and every refusal leaving it as it was.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::super::driver::{DriverError, RuntimeDriver};
use super::super::volume_files::{FileError, FileKind, FilePath, VolumeLimits};
use super::{LocalConfig, LocalDriver, SandboxChoice};

const SOURCE: &str = "template:empty";

struct Scratch {
    dir: PathBuf,
    driver: LocalDriver,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // As root the volumes are mounted file systems.
        for volume in std::fs::read_dir(self.dir.join("data/volumes")).into_iter().flatten().flatten() {
            let _ = super::disks::unmount(&volume.path());
        }
        let _ = super::tree::remove(&self.dir);
    }
}

fn scratch(name: &str, limits: VolumeLimits) -> Scratch {
    scratch_with(name, limits, |_| {})
}

/// [`scratch`] with the driver's configuration changed by `change`.
fn scratch_with(name: &str, limits: VolumeLimits, change: impl FnOnce(&mut LocalConfig)) -> Scratch {
    let dir = std::env::temp_dir().join(format!("nexus-volume-files-{name}-{}", std::process::id()));
    let _ = super::tree::remove(&dir);
    let mut config = LocalConfig::new(
        dir.join("data"),
        PathBuf::from("/nonexistent"),
        "redis://127.0.0.1:1".into(),
        SandboxChoice::Process,
    );
    change(&mut config);
    let driver = LocalDriver::new(config).with_file_limits(limits);
    Scratch { dir, driver }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() }) == 0
}

fn path(p: &str) -> FilePath {
    FilePath::parse(p).expect("a valid path")
}

fn volume(s: &Scratch) -> PathBuf {
    s.dir.join("data/volumes/p/home")
}

/// A file beside the volume's tree, on its file system (a hard link can
/// reach no other).
fn beside(s: &Scratch, name: &str) -> PathBuf {
    s.dir.join("data/volumes/p").join(name)
}

/// The volume's tree as `path kind size`, to compare before and after.
async fn tree(s: &Scratch) -> Vec<String> {
    let list = s.driver.list_files("p", SOURCE).await;
    list.expect("a listing").entries.iter().map(|e| format!("{} {:?} {}", e.path, e.kind, e.size)).collect()
}

fn small() -> VolumeLimits {
    VolumeLimits { max_bytes: 1000, max_entries: 6, max_file_bytes: 400 }
}

#[actix_rt::test]
async fn files_are_saved_read_listed_and_deleted() {
    let s = scratch("roundtrip", VolumeLimits::default());
    let d = &s.driver;
    assert!(d.list_files("p", SOURCE).await.expect("an empty volume").entries.is_empty());
    assert!(d.write_file("p", SOURCE, path("src/app/main.py"), "print(1)\n".into()).await.expect("saved"));
    assert!(!d.write_file("p", SOURCE, path("src/app/main.py"), "print(2)\n".into()).await.expect("replaced"));
    assert_eq!(d.read_file("p", SOURCE, path("src/app/main.py")).await.expect("read"), b"print(2)\n");
    d.write_file("p", SOURCE, path("a.txt"), "a".into()).await.expect("saved");
    let list = d.list_files("p", SOURCE).await.expect("a listing");
    let seen: Vec<_> = list.entries.iter().map(|e| (e.path.as_str(), e.kind, e.size)).collect();
    assert_eq!(
        seen,
        [
            ("a.txt", FileKind::File, 1),
            ("src", FileKind::Dir, 0),
            ("src/app", FileKind::Dir, 0),
            ("src/app/main.py", FileKind::File, 9)
        ]
    );
    assert_eq!(list.bytes, 10);
    assert!(!list.truncated);
    d.delete_file("p", SOURCE, path("src")).await.expect("a directory deleted with its content");
    assert_eq!(tree(&s).await, ["a.txt File 1"]);
    let missing = d.read_file("p", SOURCE, path("src/app/main.py")).await;
    assert!(matches!(missing, Err(DriverError::File(FileError::NotFound(_)))), "{missing:?}");
    let missing = d.delete_file("p", SOURCE, path("nothing")).await;
    assert!(matches!(missing, Err(DriverError::File(FileError::NotFound(_)))), "{missing:?}");
}

#[actix_rt::test]
async fn an_existing_file_keeps_its_mode_and_a_template_fills_a_new_volume() {
    use std::os::unix::fs::PermissionsExt;
    let s = scratch("mode", VolumeLimits::default());
    let d = &s.driver;
    let list = d.list_files("q", "template:node_minimal").await.expect("the template's volume");
    let names: Vec<_> = list.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names, ["README.md", "nexus-panel.json", "server.js"]);
    let file = s.dir.join("data/volumes/q/home/run.sh");
    d.write_file("q", "template:node_minimal", path("run.sh"), "#!/bin/sh\n".into()).await.expect("saved");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d.write_file("q", "template:node_minimal", path("run.sh"), "#!/bin/sh\necho\n".into()).await.expect("saved");
    assert_eq!(std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777, 0o755);
    let list = d.list_files("q", "template:node_minimal").await.expect("a listing");
    assert!(list.entries.iter().any(|e| e.path == "run.sh" && e.executable));
}

#[actix_rt::test]
async fn symlinks_are_never_followed_by_a_read_a_write_or_a_delete() {
    let s = scratch("symlinks", VolumeLimits::default());
    let d = &s.driver;
    d.write_file("p", SOURCE, path("keep.txt"), "kept".into()).await.expect("saved");
    let outside = s.dir.join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("secret"), "host secret").expect("write");
    std::os::unix::fs::symlink(&outside, volume(&s).join("out")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("secret"), volume(&s).join("link")).expect("symlink");

    for p in ["out/secret", "link"] {
        let read = d.read_file("p", SOURCE, path(p)).await;
        assert!(matches!(read, Err(DriverError::File(FileError::WrongKind { .. }))), "{p}: {read:?}");
        let written = d.write_file("p", SOURCE, path(p), "overwritten".into()).await;
        assert!(matches!(written, Err(DriverError::File(FileError::WrongKind { .. }))), "{p}: {written:?}");
    }
    let written = d.write_file("p", SOURCE, path("out/new"), "x".into()).await;
    assert!(matches!(written, Err(DriverError::File(FileError::WrongKind { .. }))), "{written:?}");
    assert!(!outside.join("new").exists(), "nothing was written through the symlink");
    d.delete_file("p", SOURCE, path("out")).await.expect("the link itself is deleted");
    assert_eq!(std::fs::read_to_string(outside.join("secret")).expect("read"), "host secret");
    let listed = d.list_files("p", SOURCE).await.expect("a listing").entries;
    let seen: Vec<_> = listed.iter().map(|e| (e.path.as_str(), e.kind, e.target.as_deref())).collect();
    let target = outside.join("secret").to_string_lossy().into_owned();
    assert_eq!(seen, [("keep.txt", FileKind::File, None), ("link", FileKind::Symlink, Some(target.as_str()))]);
}

#[actix_rt::test]
async fn a_save_replaces_a_planted_hard_link_instead_of_writing_through_it() {
    let s = scratch("hardlink", VolumeLimits::default());
    let d = &s.driver;
    d.list_files("p", SOURCE).await.expect("the volume exists");
    let outside = beside(&s, "host-file");
    std::fs::write(&outside, "host content").expect("write");
    std::fs::hard_link(&outside, volume(&s).join("linked")).expect("hard link");
    d.write_file("p", SOURCE, path("linked"), "panel content".into()).await.expect("saved");
    assert_eq!(std::fs::read_to_string(&outside).expect("read"), "host content", "the host file is untouched");
    assert_eq!(d.read_file("p", SOURCE, path("linked")).await.expect("read"), b"panel content");
}

#[actix_rt::test]
async fn as_root_a_volume_is_a_capped_file_system_of_its_own_kept_across_drivers() {
    if !nexus_testkit::prerequisite(is_root(), "mounting a volume's disk needs root") {
        return;
    }
    let big = VolumeLimits { max_bytes: 1 << 30, max_entries: 4096, max_file_bytes: 1 << 30 };
    let s = scratch_with("disk", big, |c| c.limits.volume = 16 << 20);
    let d = &s.driver;
    d.write_file("p", SOURCE, path("a.txt"), "kept".into()).await.expect("saved");
    let root = s.dir.join("data/volumes/p");
    let image = s.dir.join("data/volumes/.disks/p.ext4");
    assert!(super::disks::is_mounted(&root, &image).expect("mountinfo"), "the volume is its disk's mount");
    // 20 MiB do not fit in 16: a quota, the volume as it was but for the
    // files that did fit.
    let mut refused = None;
    for i in 0..20 {
        if let Err(error) = d.write_file("p", SOURCE, path(&format!("big{i}")), vec![7; 1 << 20].into()).await {
            refused = Some(error);
            break;
        }
    }
    assert!(matches!(refused, Some(DriverError::File(FileError::Quota { .. }))), "{refused:?}");
    assert_eq!(std::fs::metadata(&image).expect("the image").len(), 16 << 20);
    // Stopped, the node unmounts; the next driver mounts the same disk.
    d.release().await;
    assert!(!super::disks::is_mounted(&root, &image).expect("mountinfo"), "released");
    let mut config = LocalConfig::new(
        s.dir.join("data"),
        PathBuf::from("/nonexistent"),
        "redis://127.0.0.1:1".into(),
        SandboxChoice::Process,
    );
    config.limits.volume = 16 << 20;
    let next = LocalDriver::new(config).with_file_limits(big);
    assert_eq!(next.read_file("p", SOURCE, path("a.txt")).await.expect("read"), b"kept");
    next.forget("p").await.expect("forget");
    assert!(!image.exists() && !root.exists(), "a forgotten panel leaves no disk");
}

#[actix_rt::test]
async fn a_volume_of_the_earlier_layout_moves_into_home() {
    let s = scratch("legacy", VolumeLimits::default());
    let old = s.dir.join("data/volumes/p");
    // The panel's own tree, with a home/ of its own and any mode it chose.
    std::fs::create_dir_all(old.join("home")).expect("the old volume");
    std::fs::write(old.join("server.py"), "print('mine')").expect("write");
    std::fs::write(old.join("home/notes.txt"), "kept").expect("write");
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    assert_eq!(s.driver.read_file("p", SOURCE, path("server.py")).await.expect("read"), b"print('mine')");
    assert_eq!(s.driver.read_file("p", SOURCE, path("home/notes.txt")).await.expect("read"), b"kept");
    assert!(volume(&s).join("server.py").exists(), "the tree is in home/");
    assert!(!s.dir.join("data/volumes/.p.legacy").exists(), "nothing left aside");
    if is_root() {
        let image = s.dir.join("data/volumes/.disks/p.ext4");
        assert!(super::disks::is_mounted(&old, &image).expect("mountinfo"), "moved onto its disk");
    }
    // Opened again by another driver, it stays as it is.
    let again = LocalDriver::new(LocalConfig::new(
        s.dir.join("data"),
        PathBuf::from("/nonexistent"),
        "redis://127.0.0.1:1".into(),
        SandboxChoice::Process,
    ));
    let names: Vec<_> =
        again.list_files("p", SOURCE).await.expect("a listing").entries.into_iter().map(|e| e.path).collect();
    assert_eq!(names, ["home", "home/notes.txt", "server.py"]);
}

#[actix_rt::test]
async fn a_hard_link_to_a_file_of_another_owner_is_not_read() {
    if !nexus_testkit::prerequisite(is_root(), "reading a foreign hard link needs root (files of two owners)") {
        return;
    }
    let s = scratch("foreign", VolumeLimits::default());
    let d = &s.driver;
    d.list_files("p", SOURCE).await.expect("the volume exists");
    let outside = beside(&s, "root-secret");
    std::fs::write(&outside, "root's secret").expect("write");
    std::fs::hard_link(&outside, volume(&s).join("shadow")).expect("hard link");
    // The volume is the panel's, as after its first start.
    std::os::unix::fs::chown(volume(&s), Some(1_234_567), Some(1_234_567)).expect("chown");
    let read = d.read_file("p", SOURCE, path("shadow")).await;
    assert!(matches!(read, Err(DriverError::File(FileError::WrongKind { .. }))), "{read:?}");
    d.write_file("p", SOURCE, path("made.txt"), "x".into()).await.expect("saved");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(volume(&s).join("made.txt")).expect("stat"));
    assert_eq!(owner, 1_234_567, "what the API makes is the volume owner's");
}

#[actix_rt::test]
async fn limits_refuse_a_write_and_change_nothing() {
    let s = scratch("limits", small());
    let d = &s.driver;
    d.write_file("p", SOURCE, path("a"), vec![b'a'; 400].into()).await.expect("at the file limit");
    let before = tree(&s).await;
    let too_large = d.write_file("p", SOURCE, path("b"), vec![b'b'; 401].into()).await;
    assert!(matches!(too_large, Err(DriverError::File(FileError::FileTooLarge { bytes: 401, .. }))), "{too_large:?}");
    d.write_file("p", SOURCE, path("b"), vec![b'b'; 400].into()).await.expect("800 bytes in all");
    let over = d.write_file("p", SOURCE, path("c"), vec![b'c'; 201].into()).await;
    assert!(matches!(over, Err(DriverError::File(FileError::Quota { what: "bytes", .. }))), "{over:?}");
    d.write_file("p", SOURCE, path("a"), vec![b'a'; 300].into()).await.expect("a smaller replacement fits");
    let deep = d.write_file("p", SOURCE, path("d1/d2/d3/d4/f"), "x".into()).await;
    assert!(matches!(deep, Err(DriverError::File(FileError::Quota { what: "entries", .. }))), "{deep:?}");
    assert!(!volume(&s).join("d1").exists(), "no directory is left from a refused write");
    assert_eq!(tree(&s).await.len(), before.len() + 1);
}

#[actix_rt::test]
async fn a_second_change_while_one_runs_is_refused_as_busy() {
    let s = scratch("busy", VolumeLimits::default());
    let d = &s.driver;
    d.list_files("p", SOURCE).await.expect("the volume exists");
    let editing = d.edit("p").expect("free");
    let busy = d.write_file("p", SOURCE, path("a"), "a".into()).await;
    assert!(matches!(busy, Err(DriverError::File(FileError::Busy))), "{busy:?}");
    d.write_file("other", SOURCE, path("a"), "a".into()).await.expect("another panel is not held up");
    drop(editing);
    d.write_file("p", SOURCE, path("a"), "a".into()).await.expect("free again");
}

fn tar_gz(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_gnu();
        // Written raw: the builder refuses `..` and absolute names, which
        // are exactly what an attacker's archive holds.
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(if name.ends_with(".sh") { 0o755 } else { 0o644 });
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("tar").finish().expect("gzip")
}

/// A tar.gz whose one entry has a GNU long name of 100,000 bytes.
fn long_name() -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    let name = format!("{}x", "\u{1}/".repeat(50_000));
    builder.append_data(&mut header, name, &b"x"[..]).expect("append");
    builder.into_inner().expect("tar").finish().expect("gzip")
}

fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        writer.start_file(*name, options).expect("start");
        writer.write_all(data).expect("write");
    }
    writer.finish().expect("zip").into_inner()
}

#[actix_rt::test]
async fn a_tar_gz_or_zip_upload_replaces_the_tree() {
    use tar::EntryType as T;
    let s = scratch("upload", VolumeLimits::default());
    let d = &s.driver;
    d.write_file("p", SOURCE, path("old.txt"), "old".into()).await.expect("saved");
    let archive = tar_gz(&[
        ("./", T::Directory, b"", ""),
        ("./server.py", T::Regular, b"print()", ""),
        ("./bin/run.sh", T::Regular, b"#!/bin/sh", ""),
        ("./lib/", T::Directory, b"", ""),
        ("./lib/current", T::Symlink, b"", "../bin/run.sh"),
    ]);
    let list = d.replace_files("p", SOURCE, archive.into()).await.expect("uploaded");
    let seen: Vec<_> = list.entries.iter().map(|e| (e.path.as_str(), e.kind, e.executable)).collect();
    assert_eq!(
        seen,
        [
            ("bin", FileKind::Dir, false),
            ("bin/run.sh", FileKind::File, true),
            ("lib", FileKind::Dir, false),
            ("lib/current", FileKind::Symlink, false),
            ("server.py", FileKind::File, false)
        ]
    );
    assert_eq!(d.read_file("p", SOURCE, path("server.py")).await.expect("read"), b"print()");

    // A folder zipped as is: its content is the tree.
    let archive = zip(&[("my-panel/server.js", b"// js"), ("my-panel/lib/a.js", b"a")]);
    d.replace_files("p", SOURCE, archive.into()).await.expect("uploaded");
    assert_eq!(tree(&s).await, ["lib Dir 0", "lib/a.js File 1", "server.js File 5"]);
    assert!(!s
        .dir
        .join("data/volumes/p")
        .read_dir()
        .expect("ls")
        .any(|e| { e.expect("entry").file_name().to_string_lossy().contains("upload") }));
}

#[actix_rt::test]
async fn a_bad_archive_is_refused_and_changes_nothing() {
    use tar::EntryType as T;
    let s = scratch("bad-archive", small());
    let d = &s.driver;
    d.write_file("p", SOURCE, path("server.py"), "kept".into()).await.expect("saved");
    let before = tree(&s).await;
    let mut truncated = tar_gz(&[("a", T::Regular, &[b'a'; 300], "")]);
    truncated.truncate(truncated.len() / 2);
    let mut corrupted = tar_gz(&[("a", T::Regular, &[b'a'; 300], "")]);
    let crc = corrupted.len() - 8;
    corrupted[crc] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not an archive", b"{\"json\": true}".to_vec()),
        ("a truncated gzip", truncated),
        ("a climbing path", tar_gz(&[("../escaped", T::Regular, b"x", "")])),
        ("an absolute path", tar_gz(&[("/etc/escaped", T::Regular, b"x", "")])),
        ("a symlink out", tar_gz(&[("out", T::Symlink, b"", "/etc/passwd")])),
        ("a symlink up", tar_gz(&[("d/out", T::Symlink, b"", "../../x")])),
        ("a hard link", tar_gz(&[("a", T::Regular, b"x", ""), ("b", T::Link, b"", "a")])),
        ("a device", tar_gz(&[("dev", T::Char, b"", "")])),
        ("a write through its own symlink", tar_gz(&[("d", T::Symlink, b"", "."), ("d/x", T::Regular, b"x", "")])),
        ("a name twice", tar_gz(&[("a", T::Regular, b"x", ""), ("a", T::Regular, b"y", "")])),
        ("a file over the limit", tar_gz(&[("a", T::Regular, &[b'a'; 401], "")])),
        (
            "bytes over the limit",
            tar_gz(&[
                ("a", T::Regular, &[b'a'; 400], ""),
                ("b", T::Regular, &[b'b'; 400], ""),
                ("c", T::Regular, &[b'c'; 400], ""),
            ]),
        ),
        (
            "entries over the limit",
            zip(&[("1", b""), ("2", b""), ("3", b""), ("4", b""), ("5", b""), ("6", b""), ("7", b"")]),
        ),
        ("a zip bomb", zip(&[("zeros", &[0u8; 100_000])])),
        ("a zip climbing", zip(&[("../escaped", b"x")])),
        (
            "a symlink through a symlink",
            tar_gz(&[
                ("d/l", T::Symlink, b"", ".."),
                ("x", T::Symlink, b"", "d/l/d/l/../../../../etc/shadow"),
                ("y", T::Regular, b"", ""),
            ]),
        ),
        (
            "a symlink out of the stripped top",
            tar_gz(&[("top/a", T::Symlink, b"", "../x"), ("top/b", T::Regular, b"", "")]),
        ),
        ("no files at all", tar_gz(&[("./", T::Directory, b"", "")])),
        ("a corrupted checksum", corrupted),
    ];
    for (what, archive) in cases {
        let refused = d.replace_files("p", SOURCE, archive.into()).await;
        assert!(
            matches!(
                refused,
                Err(DriverError::File(
                    FileError::BadArchive(_) | FileError::Quota { .. } | FileError::FileTooLarge { .. }
                ))
            ),
            "{what}: {refused:?}"
        );
        assert_eq!(tree(&s).await, before, "{what} changed the volume");
        let message = format!("{refused:?}");
        assert!(message.len() < 600, "{what}: a message of {} bytes", message.len());
    }
    assert!(!s.dir.join("escaped").exists() && !Path::new("/etc/escaped").exists());
}

#[test]
fn a_swap_that_fails_midway_puts_everything_back() {
    let s = scratch("swap", VolumeLimits::default());
    let volume = s.dir.join("volume");
    let (new, old) = (s.dir.join("new"), s.dir.join("old"));
    for dir in [&volume, &new, &old] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    for name in ["a", "b", "c"] {
        std::fs::write(volume.join(name), name).expect("write");
    }
    std::fs::write(new.join("n"), "new").expect("write");
    // A name the old entries cannot move to: the swap stops there.
    std::fs::write(old.join("b"), "in the way").expect("write");
    let open = |p: &Path| super::tree::Dir::open(p).expect("open");
    let refused = super::swap::replace_entries(&open(&volume), &open(&new), &open(&old));
    assert!(matches!(refused, Err(DriverError::File(FileError::Busy))), "{refused:?}");
    let mut names: Vec<_> = std::fs::read_dir(&volume).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"], "the volume is as it was");
    assert_eq!(std::fs::read_to_string(volume.join("b")).expect("read"), "b");
    assert!(new.join("n").exists(), "nothing new moved in");
}

#[actix_rt::test]
async fn a_long_name_is_refused_unread_with_a_short_message() {
    let s = scratch("long-name", VolumeLimits::default());
    let refused = s.driver.replace_files("p", SOURCE, long_name().into()).await;
    let message = match refused {
        Err(DriverError::File(FileError::BadArchive(message))) => message,
        other => panic!("{other:?}"),
    };
    assert!(message.contains("a name or link of 100001 bytes"), "{message}");
    assert!(message.len() < 300, "a message of {} bytes", message.len());
}

fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat"))
}

fn objects(s: &Scratch) -> usize {
    std::fs::read_dir(s.dir.join("data/snapshots/.objects")).expect("the store").count()
}

#[actix_rt::test]
async fn snapshots_store_each_content_once_and_old_ones_are_pruned() {
    let s = scratch("snapshots", VolumeLimits::default());
    let d = &s.driver;
    d.write_file("p", SOURCE, path("server.py"), "v1".into()).await.expect("saved");
    d.write_file("p", SOURCE, path("assets/big.bin"), vec![7u8; 1 << 20].into()).await.expect("saved");
    let one = d.snapshot("p", SOURCE).await.expect("v1");
    let two = d.snapshot("p", SOURCE).await.expect("v2, unchanged");
    assert_eq!(
        inode(&one.location.path().join("server.py")),
        inode(&two.location.path().join("server.py")),
        "stored once"
    );
    assert_eq!(objects(&s), 2);
    d.write_file("p", SOURCE, path("server.py"), "v3".into()).await.expect("saved");
    let three = d.snapshot("p", SOURCE).await.expect("v3");
    assert_ne!(inode(&two.location.path().join("server.py")), inode(&three.location.path().join("server.py")));
    assert_eq!(
        inode(&one.location.path().join("assets/big.bin")),
        inode(&three.location.path().join("assets/big.bin"))
    );
    assert_eq!(std::fs::read_to_string(three.location.path().join("server.py")).expect("read"), "v3");
    assert_eq!(std::fs::read_to_string(one.location.path().join("server.py")).expect("read"), "v1", "v1 is as it was");

    // An App's copy is its own: writing it changes no snapshot.
    let scratch_copy = s.dir.join("app-copy");
    super::files::fresh_copy(three.location.path(), &scratch_copy, None).await.expect("a fresh copy");
    std::fs::write(scratch_copy.join("server.py"), "changed by the App").expect("the copy is writable");
    assert_eq!(std::fs::read_to_string(three.location.path().join("server.py")).expect("read"), "v3");

    // Five kept: v1 and its own object go once five newer ones exist.
    for version in 4..=8 {
        d.write_file("p", SOURCE, path("server.py"), format!("v{version}").into()).await.expect("saved");
        d.snapshot("p", SOURCE).await.expect("a snapshot");
    }
    let kept: Vec<u64> = {
        let mut kept: Vec<u64> = std::fs::read_dir(s.dir.join("data/snapshots/p"))
            .expect("ls")
            .filter_map(|e| e.expect("entry").file_name().to_str()?.parse().ok())
            .collect();
        kept.sort();
        kept
    };
    assert_eq!(kept, [4, 5, 6, 7, 8]);
    // big.bin once, and server.py v4..v8.
    assert_eq!(objects(&s), 6, "objects of pruned snapshots are collected");
}

#[actix_rt::test]
async fn a_deploy_waits_for_a_change_in_progress_and_holds_off_the_next() {
    let s = std::sync::Arc::new(scratch("deploy-waits", VolumeLimits::default()));
    s.driver.write_file("p", SOURCE, path("server.py"), "v1".into()).await.expect("saved");
    let editing = s.driver.edit("p").expect("free");
    let deploying = {
        let s = s.clone();
        tokio::spawn(async move { s.driver.snapshot("p", SOURCE).await.map(|snapshot| snapshot.version) })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!deploying.is_finished(), "the deploy waits while the files change");
    drop(editing);
    assert_eq!(deploying.await.expect("joined").expect("the snapshot"), 1);
}
