//! Bad input around the file tiers' directories: directories that cannot
//! hold a tier are refused at open, existing ones are made private, links
//! and FIFOs planted under tier file names are never followed, opened or
//! adopted, and saves that fail after reserving are counted.

mod common;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::{open, request, toks};
use erllama_cache::{
    final_path, Cache, CacheConfig, CacheKey, Counter, DirError, FileTierConfig, LinkOutcome,
    Lookup, OpenError, SaveError, SaveStage, TierKind,
};

/// Only the `disk` tier, over `dir`.
fn disk_only(dir: &Path) -> CacheConfig {
    CacheConfig {
        disk: Some(FileTierConfig::new(dir, 64 << 20)),
        ..CacheConfig::default()
    }
}

/// Only the `ram_file` tier, over `dir`.
fn ram_file_only(dir: &Path) -> CacheConfig {
    CacheConfig {
        ram_file: Some(FileTierConfig::new(dir, 64 << 20)),
        ..CacheConfig::default()
    }
}

/// Why a config must be refused because of `dir`, checking that the error
/// names the tier and the directory.
fn refused(cfg: CacheConfig, tier: TierKind, dir: &Path) -> DirError {
    let err = Cache::open(cfg).expect_err("opened");
    let text = err.to_string();
    assert!(text.contains(&format!("tier {}", tier.label())), "{text}");
    assert!(text.contains(&dir.display().to_string()), "{text}");
    match err {
        OpenError::UnusableDir {
            tier: t,
            dir: d,
            reason,
        } => {
            assert_eq!((t, d.as_path()), (tier, dir));
            reason
        }
        other => panic!("{}: expected UnusableDir, got {other}", dir.display()),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("meta").permissions().mode() & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn can_create_in(dir: &Path) -> bool {
    let path = dir.join("write-test");
    match fs::File::create(&path) {
        Ok(_) => {
            let _ = fs::remove_file(&path);
            true
        }
        Err(_) => false,
    }
}

fn chattr(flag: &str, path: &Path) -> bool {
    Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A directory this process really cannot write in: mode 0o500 where mode
/// bits bind it (not root), else the immutable attribute (root overrides
/// mode bits but not `chattr +i`). Restored on drop so the tempdir can go.
struct ReadOnlyDir {
    path: PathBuf,
    immutable: bool,
}

impl ReadOnlyDir {
    /// None when neither works here (root on a file system without the
    /// immutable attribute, or no `chattr`).
    fn new(path: PathBuf) -> Option<Self> {
        fs::create_dir(&path).expect("mkdir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o500)).expect("chmod");
        if !can_create_in(&path) {
            return Some(Self {
                path,
                immutable: false,
            });
        }
        // Mode bits do not bind this process: a private, writable mode and
        // the immutable attribute instead.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        if !chattr("+i", &path) {
            return None;
        }
        let dir = Self {
            path,
            immutable: true,
        };
        (!can_create_in(&dir.path)).then_some(dir)
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        if self.immutable {
            chattr("-i", &self.path);
        }
        let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700));
    }
}

#[test]
fn directories_that_cannot_hold_a_tier_are_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let unique = format!("erllama-test-{}", std::process::id());
    // Pseudo file systems: nothing can be created there, root or not.
    for base in ["/proc", "/sys"] {
        let dir = Path::new(base).join(&unique).join("tier");
        let reason = refused(disk_only(&dir), TierKind::Disk, &dir);
        assert!(
            matches!(reason, DirError::Io { op: "create", .. }),
            "{reason}"
        );
        let reason = refused(ram_file_only(&dir), TierKind::RamFile, &dir);
        assert!(
            matches!(reason, DirError::Io { op: "create", .. }),
            "{reason}"
        );
    }
    // A regular file in place of the directory, and a path below one.
    let file = root.path().join("plain");
    fs::write(&file, b"x").expect("write");
    let reason = refused(disk_only(&file), TierKind::Disk, &file);
    assert!(matches!(reason, DirError::NotADirectory), "{reason}");
    assert_eq!(fs::read(&file).expect("file"), b"x");
    let below = file.join("tier");
    let reason = refused(ram_file_only(&below), TierKind::RamFile, &below);
    assert!(
        matches!(reason, DirError::Io { op: "stat", .. }),
        "{reason}"
    );
    // A shared sticky directory (like /tmp) is refused and left as it is.
    let shared = root.path().join("shared");
    fs::create_dir(&shared).expect("mkdir");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let reason = refused(disk_only(&shared), TierKind::Disk, &shared);
    assert!(matches!(reason, DirError::Shared { .. }), "{reason}");
    assert_eq!(mode(&shared), 0o1777);
}

#[test]
fn a_read_only_directory_is_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let Some(ro) = ReadOnlyDir::new(root.path().join("ro")) else {
        // Root without the immutable attribute: no honest read-only
        // directory exists here (the other refusals are tested anyway).
        eprintln!("skipped: cannot make a directory read-only for this process");
        return;
    };
    // The tier directory itself: the probe file cannot be created.
    let reason = refused(disk_only(&ro.path), TierKind::Disk, &ro.path);
    match &reason {
        DirError::Io { op, source } => {
            assert_eq!(*op, "create probe file");
            assert_eq!(source.kind(), io::ErrorKind::PermissionDenied, "{reason}");
        }
        other => panic!("expected a failed probe, got {other}"),
    }
    // A tier directory to be created inside it.
    let sub = ro.path.join("tier");
    let reason = refused(ram_file_only(&sub), TierKind::RamFile, &sub);
    assert!(
        matches!(reason, DirError::Io { op: "create", .. }),
        "{reason}"
    );
    drop(ro);
    assert!(names(&root.path().join("ro")).is_empty());
}

#[test]
fn existing_directories_are_made_private() {
    let root = tempfile::tempdir().expect("tmp");
    for sub in ["shm", "disk"] {
        let dir = root.path().join(sub);
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let cache = open(root.path());
    for sub in ["shm", "disk"] {
        let dir = root.path().join(sub);
        assert_eq!(mode(&dir), 0o700, "{sub}");
        // The probe file is gone.
        assert!(names(&dir).is_empty(), "{sub}: {:?}", names(&dir));
    }
    cache
        .save(request(TierKind::Disk, &toks(1, 10), 100))
        .expect("save");
}

/// A valid KVC file for `tokens` outside any tier of the cache under test:
/// its key, path, bytes and modification time.
fn outside_file(root: &Path, tokens: &[u32]) -> (CacheKey, PathBuf, Vec<u8>, SystemTime) {
    let other = Cache::open(disk_only(&root.join("outside"))).expect("open");
    let out = other
        .save(request(TierKind::Disk, tokens, 4096))
        .expect("save");
    let path = final_path(&root.join("outside"), &out.key);
    let bytes = fs::read(&path).expect("read");
    let mtime = fs::metadata(&path)
        .expect("meta")
        .modified()
        .expect("mtime");
    (out.key, path, bytes, mtime)
}

fn assert_untouched(path: &Path, bytes: &[u8], mtime: SystemTime) {
    assert_eq!(fs::read(path).expect("read"), bytes, "{}", path.display());
    let now = fs::metadata(path).expect("meta").modified().expect("mtime");
    assert_eq!(now, mtime, "{} was written", path.display());
}

fn is_gone(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

#[test]
fn a_planted_symlink_is_removed_at_startup_not_adopted() {
    let root = tempfile::tempdir().expect("tmp");
    let tokens = toks(3, 30);
    let (key, outside, bytes, mtime) = outside_file(root.path(), &tokens);
    let disk = root.path().join("disk");
    fs::create_dir(&disk).expect("mkdir");
    let link = final_path(&disk, &key);
    std::os::unix::fs::symlink(&outside, &link).expect("symlink");

    let cache = Cache::open(disk_only(&disk)).expect("open");
    assert!(cache.peek(&key).is_none(), "adopted through a link");
    assert_eq!(cache.counters().get(Counter::CorruptFiles), 1);
    assert_eq!(cache.bytes(TierKind::Disk), 0);
    assert!(is_gone(&link), "the link is still there");
    assert!(matches!(cache.lookup(&key), Lookup::Miss));
    assert_untouched(&outside, &bytes, mtime);
    // The key saves normally afterwards, into a file of its own.
    let out = cache
        .save(request(TierKind::Disk, &tokens, 4096))
        .expect("save");
    assert_eq!(out.link, LinkOutcome::Linked);
    assert!(fs::symlink_metadata(&link).expect("meta").is_file());
    assert_untouched(&outside, &bytes, mtime);
}

#[test]
fn hit_counts_and_loads_never_go_through_a_link() {
    let root = tempfile::tempdir().expect("tmp");
    let tokens = toks(4, 30);
    let (key, outside, bytes, mtime) = outside_file(root.path(), &tokens);
    let disk = root.path().join("disk");
    let cache = Cache::open(disk_only(&disk)).expect("open");
    cache
        .save(request(TierKind::Disk, &tokens, 4096))
        .expect("save");
    // The registered file is swapped for a link to an identical file.
    let path = final_path(&disk, &key);
    fs::remove_file(&path).expect("rm");
    std::os::unix::fs::symlink(&outside, &path).expect("symlink");
    let Lookup::Hit(claim) = cache.lookup(&key) else {
        panic!("row gone before the claim");
    };
    assert_eq!(claim.hits(), 1);
    let err = claim.load().expect_err("loaded through a link");
    assert!(
        err.to_string().contains("symbolic link"),
        "unexpected error: {err}"
    );
    drop(claim);
    assert!(cache.peek(&key).is_none());
    assert!(is_gone(&path));
    assert_untouched(&outside, &bytes, mtime);
}

#[test]
fn a_link_appearing_during_a_save_is_replaced_not_followed() {
    let root = tempfile::tempdir().expect("tmp");
    let tokens = toks(5, 30);
    let (key, outside, bytes, mtime) = outside_file(root.path(), &tokens);
    let disk = root.path().join("disk");
    let cache = Cache::open(disk_only(&disk)).expect("open");
    let path = final_path(&disk, &key);
    let pending = cache
        .begin_save(request(TierKind::Disk, &tokens, 4096))
        .expect("reserve");
    let out = pending
        .run_with_probe(&|stage| {
            if stage == SaveStage::Checked {
                std::os::unix::fs::symlink(&outside, &path).expect("symlink");
            }
        })
        .expect("save");
    assert_eq!(out.link, LinkOutcome::ReplacedInvalid);
    assert!(fs::symlink_metadata(&path).expect("meta").is_file());
    assert_untouched(&outside, &bytes, mtime);
}

#[test]
fn the_sweep_never_adopts_a_link() {
    let root = tempfile::tempdir().expect("tmp");
    let tokens = toks(6, 30);
    let (key, outside, bytes, mtime) = outside_file(root.path(), &tokens);
    let disk = root.path().join("disk");
    let cache = Cache::open(disk_only(&disk)).expect("open");
    let pending = cache
        .begin_save(request(TierKind::Disk, &tokens, 4096))
        .expect("reserve");
    // The writer vanished; a link to a valid file for the key appeared.
    std::mem::forget(pending);
    let path = final_path(&disk, &key);
    std::os::unix::fs::symlink(&outside, &path).expect("symlink");
    assert_eq!(
        cache.sweep_at(Instant::now() + Duration::from_secs(61)),
        (0, 1)
    );
    assert!(cache.peek(&key).is_none());
    assert_eq!(cache.counters().get(Counter::CorruptFiles), 1);
    assert!(is_gone(&path));
    assert_untouched(&outside, &bytes, mtime);
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // mkfifo only reads it.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
}

#[test]
fn a_fifo_under_a_tier_file_name_is_removed_without_being_opened() {
    let root = tempfile::tempdir().expect("tmp");
    let disk = root.path().join("disk");
    fs::create_dir(&disk).expect("mkdir");
    let key = common::identity().key(&toks(7, 30));
    let fifo = final_path(&disk, &key);
    mkfifo(&fifo);
    let tmp_fifo = disk.join("x.kvc.w.1-2-3.tmp");
    mkfifo(&tmp_fifo);
    // Opening a FIFO for reading blocks until a writer comes: run the open
    // on a thread so a regression fails instead of hanging the suite.
    let (tx, rx) = mpsc::channel();
    let cfg = disk_only(&disk);
    thread::spawn(move || {
        let _ = tx.send(Cache::open(cfg));
    });
    let cache = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("Cache::open hung on a FIFO")
        .expect("open");
    assert!(is_gone(&fifo) && is_gone(&tmp_fifo));
    assert_eq!(cache.counters().get(Counter::CorruptFiles), 2);
    assert!(cache.is_empty());
    // A FIFO appearing under a registered row's name is not read either.
    let tokens = toks(8, 30);
    let saved = cache
        .save(request(TierKind::Disk, &tokens, 512))
        .expect("save");
    let path = final_path(&disk, &saved.key);
    fs::remove_file(&path).expect("rm");
    mkfifo(&path);
    let Lookup::Hit(claim) = cache.lookup(&saved.key) else {
        panic!("row gone before the claim");
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(claim.load().map(|p| p.len()));
    });
    let loaded = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("load hung on a FIFO");
    assert!(loaded.is_err());
    assert!(cache.peek(&saved.key).is_none());
    assert!(is_gone(&path));
}

#[test]
fn saves_failing_after_their_reservation_are_counted() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let failed = || cache.counters().get(Counter::SavesFailed);
    let no_row = |tokens: &[u32]| {
        let key = common::identity().key(tokens);
        assert!(cache.peek(&key).is_none());
        assert_eq!(cache.reserved_bytes(TierKind::Disk), 0);
    };

    // The link fails: the temp file vanished before it.
    let disk = root.path().join("disk");
    let tokens = toks(1, 10);
    let err = cache
        .begin_save(request(TierKind::Disk, &tokens, 100))
        .expect("reserve")
        .run_with_probe(&|stage| {
            if stage == SaveStage::Checked {
                for name in names(&disk) {
                    fs::remove_file(disk.join(name)).expect("rm temp");
                }
            }
        })
        .expect_err("link");
    assert!(matches!(err, SaveError::Tier(_)), "{err}");
    assert_eq!(failed(), 1);
    no_row(&tokens);

    // The reservation expired before the publish.
    let tokens = toks(2, 10);
    let err = cache
        .begin_save(request(TierKind::Disk, &tokens, 100))
        .expect("reserve")
        .run_with_probe(&|stage| {
            if stage == SaveStage::Staged {
                cache.sweep_at(Instant::now() + Duration::from_secs(61));
            }
        })
        .expect_err("expired");
    assert!(matches!(err, SaveError::Expired(_)), "{err}");
    assert_eq!(failed(), 2);
    no_row(&tokens);

    // The directory became unusable after open: a file in its place.
    fs::rename(&disk, root.path().join("disk.old")).expect("mv");
    fs::write(&disk, b"not a directory").expect("write");
    let tokens = toks(3, 10);
    let err = cache
        .save(request(TierKind::Disk, &tokens, 100))
        .expect_err("write");
    assert!(matches!(err, SaveError::Tier(_)), "{err}");
    assert_eq!(failed(), 3);
    no_row(&tokens);
    assert!(cache.is_empty());
    // Refusals before the reservation are not failures.
    cache
        .save(request(TierKind::Ram, &toks(4, 10), 100))
        .expect("ram");
    cache
        .save(request(TierKind::Ram, &toks(4, 10), 100))
        .expect_err("duplicate");
    assert_eq!(failed(), 3);
    assert_eq!(cache.counters().get(Counter::SavesDropped), 0);
    assert_eq!(cache.counters().get(Counter::SavesFinish), 1);
    // The file put in place of the directory is untouched.
    assert_eq!(fs::read(&disk).expect("file"), b"not a directory");
}
