//! Crash tests of the publish protocol (docs/tiers.md) with real processes.
//!
//! The test binary re-executes itself as a child running only
//! [`child_writer`], which opens a cache over a temp directory, begins a
//! multi-MiB save and stops at a requested [`SaveStage`] (printing a marker
//! and sleeping forever). The parent reads the marker, SIGKILLs the child
//! and opens a fresh cache over the same directory: a writer killed before
//! the link leaves nothing, one killed after it leaves a file that is
//! adopted if valid and deleted (and counted) if not; no temp file
//! survives. Both file tiers are covered.
//!
//! The in-process sweep is tested too: an expired reservation is dropped
//! (its late `run` fails with `expired` and leaves nothing), and a file
//! linked by another cache instance while this one holds the expired
//! reservation is adopted when valid and removed when not.

mod common;
use common::tlv_value_offset;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use erllama_cache::{
    final_path, Cache, CacheKey, Counter, LinkOutcome, Lookup, SaveError, SaveRequest, SaveStage,
    TierKind,
};

const ENV_DIR: &str = "ERLLAMA_CRASH_DIR";
const ENV_STAGE: &str = "ERLLAMA_CRASH_STAGE";
const ENV_TIER: &str = "ERLLAMA_CRASH_TIER";
/// Printed by the child when it reaches the requested stage.
const MARKER: &str = "ERLLAMA_CRASH_STAGE_REACHED";
/// Big enough that the window between header and payload is real.
const PAYLOAD_LEN: usize = 4 << 20;
/// A broken child never hangs the suite.
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// Past the default 60 s reservation TTL.
const PAST_TTL: Duration = Duration::from_secs(61);
const QUOTA: u64 = 64 << 20;

const FILE_TIERS: [TierKind; 2] = [TierKind::Disk, TierKind::RamFile];

fn crash_tokens() -> Vec<u32> {
    common::toks(1000, 64)
}

fn crash_request(tier: TierKind) -> SaveRequest {
    common::request(tier, &crash_tokens(), PAYLOAD_LEN)
}

fn open_cache(root: &Path) -> Cache {
    Cache::open(common::config(root, QUOTA, QUOTA, QUOTA)).expect("open cache")
}

fn stage_name(stage: SaveStage) -> &'static str {
    match stage {
        SaveStage::Reserved => "reserved",
        SaveStage::TempPartial => "temp_partial",
        SaveStage::Staged => "staged",
        SaveStage::Checked => "checked",
        SaveStage::Linked => "linked",
        SaveStage::Published => "published",
    }
}

fn stage_from_name(name: &str) -> SaveStage {
    [
        SaveStage::Reserved,
        SaveStage::TempPartial,
        SaveStage::Staged,
        SaveStage::Checked,
        SaveStage::Linked,
        SaveStage::Published,
    ]
    .into_iter()
    .find(|s| stage_name(*s) == name)
    .unwrap_or_else(|| panic!("unknown stage {name:?}"))
}

/// The child side: does nothing unless started by [`crash_at`].
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(ENV_DIR) else {
        return;
    };
    let stage = stage_from_name(&std::env::var(ENV_STAGE).expect("stage env var"));
    let tier: TierKind = std::env::var(ENV_TIER)
        .expect("tier env var")
        .parse()
        .expect("tier label");
    let cache = open_cache(Path::new(&dir));
    let pending = cache.begin_save(crash_request(tier)).expect("begin_save");
    let probe = move |at: SaveStage| {
        if at == stage {
            let mut out = std::io::stdout().lock();
            writeln!(out, "\n{MARKER}").expect("write marker");
            out.flush().expect("flush marker");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    let result = pending.run_with_probe(&probe);
    panic!("stage {stage:?} was never reached; the save returned {result:?}");
}

/// Runs a child writer that stops at `stage` and SIGKILLs it there.
fn crash_at(root: &Path, tier: TierKind, stage: SaveStage) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, root)
        .env(ENV_STAGE, stage_name(stage))
        .env(ENV_TIER, tier.label())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child writer");
    let stdout = child.stdout.take().expect("child stdout");
    let mut stderr = child.stderr.take().expect("child stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let out_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let mut seen = Vec::new();
    let reached = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(MARKER) => break Ok(()),
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => break Err("timed out"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err("exited without the marker"),
        }
    };
    // Child::kill is SIGKILL on Unix: no unwinding, no destructors.
    child.kill().expect("kill child");
    let status = child.wait().expect("wait child");
    drop(rx);
    let _ = out_reader.join();
    let err = err_reader.join().unwrap_or_default();
    if let Err(why) = reached {
        panic!(
            "child writer ({tier}, {stage:?}) {why}; status {status:?}\nstdout:\n{}\nstderr:\n{err}",
            seen.join("\n")
        );
    }
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    out.sort();
    out
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    files_with_suffix(dir, ".tmp")
}

fn kvc_files(dir: &Path) -> Vec<PathBuf> {
    files_with_suffix(dir, ".kvc")
}

fn tier_dir(cache: &Cache, tier: TierKind) -> PathBuf {
    cache.tier_dir(tier).expect("file tier has a directory")
}

/// Where `tier`'s files live under `root` (as `common::config` lays out).
fn dir_under(root: &Path, tier: TierKind) -> PathBuf {
    match tier {
        TierKind::RamFile => root.join("shm"),
        TierKind::Disk => root.join("disk"),
        TierKind::Ram => panic!("ram has no directory"),
    }
}

fn assert_miss(cache: &Cache, key: &CacheKey) {
    match cache.lookup(key) {
        Lookup::Miss => {}
        other => panic!("expected a miss for {key}, got {other:?}"),
    }
    assert!(cache.peek(key).is_none(), "no row may remain for {key}");
}

/// Looks `key` up, loads it and checks the bytes.
fn assert_hit_with(cache: &Cache, key: &CacheKey, payload: &[u8]) {
    let claim = match cache.lookup(key) {
        Lookup::Hit(claim) => claim,
        other => panic!("expected a hit for {key}, got {other:?}"),
    };
    let loaded = claim.load().expect("load adopted row");
    assert!(&loaded[..] == payload, "loaded payload differs");
}

/// A new save and load of `request`'s key works on `cache`.
fn assert_cache_works(cache: &Cache, request: SaveRequest) {
    let key = request.key();
    let payload = request.payload.clone();
    cache.save(request).expect("save after recovery");
    assert_hit_with(cache, &key, &payload);
}

/// Kills a writer at `stage`, then checks what a fresh cache makes of it.
fn crash_case(tier: TierKind, stage: SaveStage) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = dir_under(root.path(), tier);
    let request = crash_request(tier);
    let key = request.key();
    crash_at(root.path(), tier, stage);

    // What the killed writer left: the window was real.
    let tmps = tmp_files(&dir);
    let kvcs = kvc_files(&dir);
    match stage {
        SaveStage::TempPartial => {
            assert_eq!(tmps.len(), 1, "a partial temp file: {tmps:?}");
            let len = fs::metadata(&tmps[0]).expect("tmp meta").len();
            assert!(
                len < PAYLOAD_LEN as u64,
                "temp holds the header only ({len} bytes)"
            );
            assert!(kvcs.is_empty(), "nothing linked yet: {kvcs:?}");
        }
        SaveStage::Checked => {
            assert_eq!(tmps.len(), 1, "a complete temp file: {tmps:?}");
            let len = fs::metadata(&tmps[0]).expect("tmp meta").len();
            assert!(len > PAYLOAD_LEN as u64, "temp is complete ({len} bytes)");
            assert!(kvcs.is_empty(), "nothing linked yet: {kvcs:?}");
        }
        SaveStage::Linked | SaveStage::Published => {
            assert!(tmps.is_empty(), "the link removed the temp: {tmps:?}");
            assert_eq!(kvcs, vec![final_path(&dir, &key)]);
        }
        other => panic!("no crash case for {other:?}"),
    }

    let cache = open_cache(root.path());
    assert_eq!(tier_dir(&cache, tier), dir);
    assert!(tmp_files(&dir).is_empty(), "temp files survive the scan");
    assert_eq!(cache.counters().get(Counter::CorruptFiles), 0);
    match stage {
        SaveStage::TempPartial | SaveStage::Checked => {
            assert!(kvc_files(&dir).is_empty());
            assert_miss(&cache, &key);
            assert_eq!(cache.bytes(tier), 0);
            assert_cache_works(&cache, crash_request(tier));
        }
        _ => {
            let path = final_path(&dir, &key);
            let size = fs::metadata(&path).expect("adopted file").len();
            assert_eq!(cache.bytes(tier), size);
            assert_hit_with(&cache, &key, &request.payload);
            // A second save of the key is a duplicate, not a second file.
            assert!(matches!(
                cache.save(crash_request(tier)),
                Err(SaveError::AlreadyPresent(k)) if k == key
            ));
        }
    }
    assert!(tmp_files(&dir).is_empty());
    assert_eq!(cache.reserved_bytes(tier), 0);
}

#[test]
fn crash_disk_temp_partial() {
    crash_case(TierKind::Disk, SaveStage::TempPartial);
}

#[test]
fn crash_disk_checked() {
    crash_case(TierKind::Disk, SaveStage::Checked);
}

#[test]
fn crash_disk_linked() {
    crash_case(TierKind::Disk, SaveStage::Linked);
}

#[test]
fn crash_disk_published() {
    crash_case(TierKind::Disk, SaveStage::Published);
}

#[test]
fn crash_ram_file_temp_partial() {
    crash_case(TierKind::RamFile, SaveStage::TempPartial);
}

#[test]
fn crash_ram_file_checked() {
    crash_case(TierKind::RamFile, SaveStage::Checked);
}

#[test]
fn crash_ram_file_linked() {
    crash_case(TierKind::RamFile, SaveStage::Linked);
}

#[test]
fn crash_ram_file_published() {
    crash_case(TierKind::RamFile, SaveStage::Published);
}

/// How the parent damages a linked file before reopening.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Cut the file in the middle of the payload.
    Truncate,
    /// Make the fingerprint-mode TLV value an unknown mode (meta parse
    /// fails with `unknown_fingerprint_mode`).
    FlipTlvByte,
}

fn crash_linked_then_damage(tier: TierKind, damage: Damage) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = dir_under(root.path(), tier);
    let key = crash_request(tier).key();
    crash_at(root.path(), tier, SaveStage::Linked);
    let path = final_path(&dir, &key);
    let len = fs::metadata(&path).expect("linked file").len();
    match damage {
        Damage::Truncate => {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(len / 2).expect("truncate");
        }
        Damage::FlipTlvByte => {
            let header = {
                let mut f = fs::File::open(&path).expect("open");
                let mut buf = vec![0u8; 64 << 10];
                let n = f.read(&mut buf).expect("read header");
                buf.truncate(n);
                buf
            };
            let at = tlv_value_offset(&header, 0x02);
            assert!(header[at] <= 2, "a valid fingerprint mode before damage");
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.write_all_at(&[header[at] ^ 0xFF], at as u64)
                .expect("flip byte");
        }
    }

    let cache = open_cache(root.path());
    assert!(!path.exists(), "the damaged file ({damage:?}) is removed");
    assert!(kvc_files(&dir).is_empty());
    assert!(tmp_files(&dir).is_empty());
    assert_miss(&cache, &key);
    assert!(cache.counters().get(Counter::CorruptFiles) >= 1);
    assert_eq!(cache.bytes(tier), 0);
    assert_cache_works(&cache, crash_request(tier));
}

#[test]
fn crash_disk_linked_truncated() {
    crash_linked_then_damage(TierKind::Disk, Damage::Truncate);
}

#[test]
fn crash_disk_linked_tlv_flipped() {
    crash_linked_then_damage(TierKind::Disk, Damage::FlipTlvByte);
}

#[test]
fn crash_ram_file_linked_truncated() {
    crash_linked_then_damage(TierKind::RamFile, Damage::Truncate);
}

#[test]
fn crash_ram_file_linked_tlv_flipped() {
    crash_linked_then_damage(TierKind::RamFile, Damage::FlipTlvByte);
}

/// Small in-process saves.
fn small_request(tier: TierKind, base: u32) -> SaveRequest {
    common::request(tier, &common::toks(base, 32), 256 << 10)
}

#[test]
fn sweep_drops_expired_reservation_and_late_run_leaves_nothing() {
    for tier in FILE_TIERS {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = open_cache(root.path());
        let dir = tier_dir(&cache, tier);
        let request = small_request(tier, 50);
        let key = request.key();
        let pending = cache.begin_save(request.clone()).expect("begin_save");
        assert_eq!(cache.reserved_bytes(tier), pending.size());
        assert!(matches!(cache.lookup(&key), Lookup::Busy));

        // Not yet expired: the sweep leaves it alone.
        assert_eq!(cache.sweep_at(Instant::now()), (0, 0));
        assert!(cache.peek(&key).is_some());

        assert_eq!(cache.sweep_at(Instant::now() + PAST_TTL), (0, 1));
        assert_miss(&cache, &key);
        assert_eq!(cache.reserved_bytes(tier), 0);
        assert!(cache.is_empty());

        let err = pending.run().expect_err("the reservation expired");
        assert!(
            matches!(err, SaveError::Expired(k) if k == key),
            "got {err:?}"
        );
        assert!(kvc_files(&dir).is_empty(), "no file after an expired run");
        assert!(tmp_files(&dir).is_empty(), "no temp after an expired run");
        assert_miss(&cache, &key);
        assert_eq!(cache.reserved_bytes(tier), 0);
        assert_eq!(cache.bytes(tier), 0);

        assert_cache_works(&cache, request);
    }
}

#[test]
fn sweep_adopts_valid_file_linked_by_another_instance() {
    for tier in FILE_TIERS {
        let root = tempfile::tempdir().expect("tempdir");
        let a = open_cache(root.path());
        let dir = tier_dir(&a, tier);
        let request = small_request(tier, 60);
        let key = request.key();
        let pending = a.begin_save(request.clone()).expect("begin_save");

        // Another instance over the same directory links the key.
        let b = open_cache(root.path());
        let outcome = b.save(request.clone()).expect("save by b");
        assert_eq!(outcome.link, LinkOutcome::Linked);
        drop(b);
        let path = final_path(&dir, &key);
        let size = fs::metadata(&path).expect("linked by b").len();

        assert_eq!(a.sweep_at(Instant::now() + PAST_TTL), (1, 0));
        assert_eq!(a.reserved_bytes(tier), 0);
        assert_eq!(a.bytes(tier), size);
        assert_hit_with(&a, &key, &request.payload);

        // The writer that held the reservation comes back too late.
        let err = pending.run().expect_err("the reservation expired");
        assert!(
            matches!(err, SaveError::Expired(k) if k == key),
            "got {err:?}"
        );
        assert!(path.exists(), "the adopted file stays");
        assert!(tmp_files(&dir).is_empty());
        assert_hit_with(&a, &key, &request.payload);
        assert_eq!(a.bytes(tier), size);
        assert_eq!(a.counters().get(Counter::CorruptFiles), 0);
    }
}

#[test]
fn sweep_removes_invalid_file_linked_by_another_instance() {
    for tier in FILE_TIERS {
        let root = tempfile::tempdir().expect("tempdir");
        let a = open_cache(root.path());
        let dir = tier_dir(&a, tier);
        let request = small_request(tier, 70);
        let key = request.key();
        let pending = a.begin_save(request.clone()).expect("begin_save");

        let b = open_cache(root.path());
        b.save(request.clone()).expect("save by b");
        drop(b);
        let path = final_path(&dir, &key);
        // Damage the payload: the meta parse still passes, the CRC fails.
        let len = fs::metadata(&path).expect("linked by b").len();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, len - 10).expect("read byte");
        f.write_all_at(&[byte[0] ^ 0x5A], len - 10)
            .expect("flip byte");
        drop(f);

        assert_eq!(a.sweep_at(Instant::now() + PAST_TTL), (0, 1));
        assert!(!path.exists(), "the invalid file is deleted");
        assert_miss(&a, &key);
        assert_eq!(a.reserved_bytes(tier), 0);
        assert_eq!(a.bytes(tier), 0);

        let err = pending.run().expect_err("the reservation expired");
        assert!(
            matches!(err, SaveError::Expired(k) if k == key),
            "got {err:?}"
        );
        assert!(kvc_files(&dir).is_empty());
        assert!(tmp_files(&dir).is_empty());
        assert_cache_works(&a, request);
    }
}
