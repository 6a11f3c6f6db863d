//! One tier directory shared by several processes keeps its quota: the test
//! binary re-executes itself as three writer processes that each save
//! distinct rows into one `disk` directory whose quota holds about ten of
//! them, while the parent polls the directory (under its lock, so each look
//! is one consistent state) and checks it never holds more than the quota.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use erllama_cache::{list_rows, Cache, DirLock, TierKind};

const ENV_CHILD: &str = "ERLLAMA_QUOTA_CHILD";
const QUOTA: u64 = 1 << 20;
const ROW: usize = 100_000;
const ROWS_PER_CHILD: u32 = 40;

fn open(root: &Path) -> Cache {
    Cache::open(common::config(root, 1 << 20, QUOTA, QUOTA)).expect("open cache")
}

/// Runs only in a child: saves `ROWS_PER_CHILD` distinct rows.
#[test]
fn child_writer() {
    let Ok(spec) = std::env::var(ENV_CHILD) else {
        return;
    };
    let (root, base) = spec.split_once('|').expect("dir|base");
    let base: u32 = base.parse().expect("base");
    let cache = open(Path::new(root));
    for i in 0..ROWS_PER_CHILD {
        let tokens = common::toks(base + i * 1000, 16);
        // A save may be refused (no space once everything else is pinned
        // or being written); the quota is what is checked.
        let _ = cache.save(common::request(TierKind::Disk, &tokens, ROW));
    }
}

fn directory_bytes(dir: &Path) -> u64 {
    let _lock = DirLock::acquire(dir).expect("lock");
    list_rows(dir).expect("list").iter().map(|f| f.size).sum()
}

#[test]
fn three_processes_keep_one_directory_within_its_quota() {
    let root = tempfile::tempdir().expect("tmp");
    // Create the directories first.
    drop(open(root.path()));
    let dir = root.path().join("disk");
    let exe = std::env::current_exe().expect("test binary");
    let mut children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(&exe)
                .args(["child_writer", "--exact", "--nocapture"])
                .env(
                    ENV_CHILD,
                    format!("{}|{}", root.path().display(), 1_000_000 * (i + 1)),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut polls, mut peak) = (0, 0);
    loop {
        let bytes = directory_bytes(&dir);
        assert!(
            bytes <= QUOTA,
            "the directory holds {bytes} bytes, over {QUOTA}"
        );
        peak = peak.max(bytes);
        polls += 1;
        let mut done = true;
        for c in &mut children {
            if c.try_wait().expect("wait").is_none() {
                done = false;
            }
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the writers did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
    for mut c in children {
        assert!(c.wait().expect("wait").success());
    }
    let bytes = directory_bytes(&dir);
    assert!(bytes <= QUOTA);
    // The quota was really in play: the writers wrote 12 times over it.
    assert!(peak > QUOTA / 2, "peak {peak}");
    assert!(polls > 3);
    // Every row left is valid and loadable by a fresh process.
    let cache = open(root.path());
    assert!(!cache.is_empty());
    for row in cache.dump() {
        let key = erllama_cache::CacheKey::from_hex(&row.key.to_hex()).expect("key");
        let claim = cache.claim(&key).expect("claim");
        assert_eq!(claim.load().expect("load").len(), ROW);
    }
}
