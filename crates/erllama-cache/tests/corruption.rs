//! Corrupt tier files (docs/cache-format.md, docs/tiers.md): every kind of damage is detected,
//! the file removed, counted in `corrupt_files` and never returned as a
//! hit, and the cache keeps working for the same key afterwards.
//!
//! Files are saved by a first cache and damaged on disk; then either a
//! fresh cache is opened (the startup scan deletes files failing the meta
//! parse or named after another key) or a claim + load runs on the live
//! cache (the full parse at load catches CRC and key mismatches). Both file
//! tiers are covered. Files the cache does not own (`notes.txt`) are left
//! alone.

mod common;
use common::tlv_value_offset;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use erllama_cache::{
    final_path, Cache, CacheKey, Counter, KvcError, LoadError, Lookup, SaveRequest, TierKind,
};

const FILE_TIERS: [TierKind; 2] = [TierKind::Disk, TierKind::RamFile];
const PAYLOAD_LEN: usize = 64 << 10;
const TOKENS: usize = 40;

fn req(tier: TierKind, base: u32) -> SaveRequest {
    common::request(tier, &common::toks(base, TOKENS), PAYLOAD_LEN)
}

fn corrupt(cache: &Cache) -> u64 {
    cache.counters().get(Counter::CorruptFiles)
}

/// A tempdir with a cache that has saved `req(tier, base)`; returns the
/// request and the file's path.
fn saved(root: &Path, tier: TierKind, base: u32) -> (Cache, SaveRequest, PathBuf) {
    let cache = common::open(root);
    let request = req(tier, base);
    cache.save(request.clone()).expect("first save");
    let dir = cache.tier_dir(tier).expect("file tier");
    let path = final_path(&dir, &request.key());
    assert!(path.exists());
    (cache, request, path)
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).expect("read file")
}

fn flip_byte(path: &Path, at: usize) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for flip");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at as u64).expect("read byte");
    f.write_all_at(&[b[0] ^ 0xA5], at as u64)
        .expect("write byte");
}

/// Offset of the payload's first byte (the trailer's `payload_offset`).
fn payload_offset(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[48..56].try_into().expect("8 bytes")) as usize
}

fn assert_miss(cache: &Cache, key: &CacheKey) {
    match cache.lookup(key) {
        Lookup::Miss => {}
        other => panic!("expected a miss for {key}, got {other:?}"),
    }
    assert!(cache.peek(key).is_none(), "no row may remain for {key}");
}

fn assert_hit(cache: &Cache, request: &SaveRequest) {
    let key = request.key();
    let claim = match cache.lookup(&key) {
        Lookup::Hit(claim) => claim,
        other => panic!("expected a hit for {key}, got {other:?}"),
    };
    let loaded = claim.load().expect("load");
    assert!(loaded[..] == request.payload[..], "payload differs");
}

/// A new save and load of the same key succeeds.
fn assert_works_again(cache: &Cache, request: &SaveRequest) {
    cache.save(request.clone()).expect("save again");
    assert_hit(cache, request);
}

/// Claims `key` and loads it: must fail; returns the error.
fn load_fails(cache: &Cache, key: &CacheKey) -> LoadError {
    let claim = match cache.lookup(key) {
        Lookup::Hit(claim) => claim,
        other => panic!("the row is registered before its load: {other:?}"),
    };
    match claim.load() {
        Ok(p) => panic!("a corrupt file was returned ({} bytes)", p.len()),
        Err(e) => e,
    }
}

/// Opens a fresh cache whose startup scan must delete `path` (and count
/// it), leaving `key` a miss; then checks the key saves again.
fn fresh_scan_removes(root: &Path, request: &SaveRequest, path: &Path) {
    let cache = common::open(root);
    assert!(!path.exists(), "the scan deletes {}", path.display());
    assert_eq!(corrupt(&cache), 1);
    assert_miss(&cache, &request.key());
    assert!(cache.is_empty(), "nothing else registered");
    assert_works_again(&cache, request);
}

/// Runs `case` once per file tier, each in a fresh tempdir.
fn each_tier(case: impl Fn(&Path, TierKind)) {
    for tier in FILE_TIERS {
        let root = tempfile::tempdir().expect("tempdir");
        case(root.path(), tier);
    }
}

#[test]
fn flipped_payload_byte_fresh_cache_crc_mismatch_at_load() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 100);
        drop(first);
        let bytes = read(&path);
        flip_byte(&path, payload_offset(&bytes) + PAYLOAD_LEN / 2);

        // The meta parse cannot see it: the row is registered…
        let cache = common::open(root);
        assert_eq!(corrupt(&cache), 0);
        let key = request.key();
        let err = load_fails(&cache, &key);
        // …and the full parse at load rejects it.
        assert!(
            matches!(
                err,
                LoadError::Corrupt {
                    error: KvcError::CrcMismatch { .. },
                    ..
                }
            ),
            "got {err:?}"
        );
        assert_eq!(corrupt(&cache), 1);
        assert!(!path.exists(), "the corrupt file is deleted");
        assert_miss(&cache, &key);
        assert_eq!(cache.bytes(tier), 0);
        assert_works_again(&cache, &request);
    });
}

#[test]
fn flipped_payload_byte_live_cache_crc_mismatch_at_load() {
    each_tier(|root, tier| {
        let (cache, request, path) = saved(root, tier, 110);
        let bytes = read(&path);
        flip_byte(&path, bytes.len() - 1);
        let key = request.key();
        let err = load_fails(&cache, &key);
        assert!(
            matches!(
                err,
                LoadError::Corrupt {
                    error: KvcError::CrcMismatch { .. },
                    ..
                }
            ),
            "got {err:?}"
        );
        assert_eq!(corrupt(&cache), 1);
        assert!(!path.exists());
        assert_miss(&cache, &key);
        assert_eq!(cache.bytes(tier), 0);
        assert_works_again(&cache, &request);
    });
}

#[test]
fn flipped_token_id_fresh_cache_name_mismatch_at_scan() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 200);
        drop(first);
        let bytes = read(&path);
        flip_byte(&path, tlv_value_offset(&bytes, 0x09) + 4 * 7);
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn flipped_token_id_live_cache_key_mismatch_at_load() {
    each_tier(|root, tier| {
        let (cache, request, path) = saved(root, tier, 210);
        let bytes = read(&path);
        flip_byte(&path, tlv_value_offset(&bytes, 0x09) + 4 * 3);
        let key = request.key();
        let err = load_fails(&cache, &key);
        assert!(
            matches!(
                err,
                LoadError::Corrupt {
                    error: KvcError::KeyMismatch { .. },
                    ..
                }
            ),
            "got {err:?}"
        );
        assert_eq!(corrupt(&cache), 1);
        assert!(!path.exists());
        assert_miss(&cache, &key);
        assert_works_again(&cache, &request);
    });
}

#[test]
fn flipped_fingerprint_byte_fresh_cache_name_mismatch_at_scan() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 220);
        drop(first);
        let bytes = read(&path);
        flip_byte(&path, tlv_value_offset(&bytes, 0x01) + 5);
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn flipped_magic_fresh_cache_bad_header_at_scan() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 230);
        drop(first);
        flip_byte(&path, 1);
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn truncated_file_fresh_cache() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 300);
        drop(first);
        let len = fs::metadata(&path).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 1).expect("truncate");
        drop(f);
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn truncated_into_header_fresh_cache() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 310);
        drop(first);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(100).expect("truncate");
        drop(f);
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn appended_bytes_fresh_cache() {
    each_tier(|root, tier| {
        let (first, request, path) = saved(root, tier, 400);
        drop(first);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"trailing junk").expect("append");
        drop(f);
        assert!(fs::metadata(&path).expect("meta").len() > (PAYLOAD_LEN as u64));
        fresh_scan_removes(root, &request, &path);
    });
}

/// A live cache meets a file whose size changed underneath: the load
/// reports the bytes as gone (`LoadError::Missing`, not counted as
/// corrupt by design of `FileStore::load`'s size check), the row and file
/// are dropped and nothing is returned.
#[test]
fn size_changed_under_live_cache_is_never_returned() {
    each_tier(|root, tier| {
        for grow in [false, true] {
            let (cache, request, path) = saved(root, tier, if grow { 510 } else { 500 });
            let len = fs::metadata(&path).expect("meta").len();
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            if grow {
                f.write_all_at(b"extra", len).expect("append");
            } else {
                f.set_len(len - 3).expect("truncate");
            }
            drop(f);
            let key = request.key();
            let err = load_fails(&cache, &key);
            assert!(
                matches!(err, LoadError::Missing { .. } | LoadError::Corrupt { .. }),
                "got {err:?}"
            );
            assert!(!path.exists(), "the damaged file is removed");
            assert_miss(&cache, &key);
            assert_works_again(&cache, &request);
        }
    });
}

#[test]
fn valid_file_renamed_to_another_key_fresh_cache() {
    each_tier(|root, tier| {
        let (first, a, a_path) = saved(root, tier, 600);
        drop(first);
        // Key C is never saved; A's file takes its name.
        let c = req(tier, 650);
        let c_path = a_path.with_file_name(format!("{}.kvc", c.key()));
        fs::rename(&a_path, &c_path).expect("rename");

        let cache = common::open(root);
        assert!(!c_path.exists(), "the misnamed file is deleted");
        assert!(!a_path.exists());
        assert_eq!(corrupt(&cache), 1);
        assert_miss(&cache, &a.key());
        assert_miss(&cache, &c.key());
        assert!(cache.is_empty());
        assert_works_again(&cache, &a);
        assert_works_again(&cache, &c);
    });
}

#[test]
fn valid_file_renamed_over_another_key_live_cache() {
    each_tier(|root, tier| {
        let (cache, a, a_path) = saved(root, tier, 700);
        // B has as many tokens and payload bytes as A, so the file sizes
        // agree and the load reaches the full parse.
        let b = req(tier, 750);
        cache.save(b.clone()).expect("save b");
        let b_path = final_path(&cache.tier_dir(tier).expect("dir"), &b.key());
        assert_eq!(
            fs::metadata(&a_path).expect("a").len(),
            fs::metadata(&b_path).expect("b").len()
        );
        fs::rename(&a_path, &b_path).expect("rename a over b");

        let err = load_fails(&cache, &b.key());
        assert!(
            matches!(
                err,
                LoadError::Corrupt {
                    error: KvcError::KeyMismatch { .. },
                    ..
                }
            ),
            "got {err:?}"
        );
        assert_eq!(corrupt(&cache), 1);
        assert!(!b_path.exists(), "the misnamed file is deleted");
        assert_miss(&cache, &b.key());

        // A's own file is gone: its load fails too and drops the row.
        let err = load_fails(&cache, &a.key());
        assert!(matches!(err, LoadError::Missing { .. }), "got {err:?}");
        assert_miss(&cache, &a.key());

        assert_works_again(&cache, &a);
        assert_works_again(&cache, &b);
    });
}

#[test]
fn foreign_junk_named_like_a_key_fresh_cache() {
    each_tier(|root, tier| {
        // A valid row next to the junk stays registered.
        let (first, keep, keep_path) = saved(root, tier, 800);
        drop(first);
        let junk_req = req(tier, 850);
        let junk = keep_path.with_file_name(format!("{}.kvc", junk_req.key()));
        fs::write(
            &junk,
            b"this is not a KVC file at all, just junk\n".repeat(50),
        )
        .expect("write junk");

        let cache = common::open(root);
        assert!(!junk.exists(), "junk is deleted");
        assert_eq!(corrupt(&cache), 1);
        assert_miss(&cache, &junk_req.key());
        assert!(keep_path.exists());
        assert_hit(&cache, &keep);
        assert_works_again(&cache, &junk_req);
    });
}

#[test]
fn zero_length_kvc_fresh_cache() {
    each_tier(|root, tier| {
        let cache = common::open(root);
        let dir = cache.tier_dir(tier).expect("dir");
        drop(cache);
        let request = req(tier, 900);
        let path = final_path(&dir, &request.key());
        fs::write(&path, b"").expect("create empty");
        fresh_scan_removes(root, &request, &path);
    });
}

#[test]
fn zero_length_kvc_replaces_on_save_in_live_cache() {
    // A zero-length file appears under a key's name in a live cache's
    // directory (another process): the save links over it (replaces the
    // invalid file) and the row loads fine.
    each_tier(|root, tier| {
        let cache = common::open(root);
        let dir = cache.tier_dir(tier).expect("dir");
        let request = req(tier, 950);
        let path = final_path(&dir, &request.key());
        fs::write(&path, b"").expect("create empty");
        let outcome = cache.save(request.clone()).expect("save");
        assert_eq!(outcome.link, erllama_cache::LinkOutcome::ReplacedInvalid);
        assert_hit(&cache, &request);
        assert!(fs::metadata(&path).expect("meta").len() > PAYLOAD_LEN as u64);
    });
}

#[test]
fn non_kvc_files_are_left_alone() {
    each_tier(|root, tier| {
        let (first, keep, _) = saved(root, tier, 1000);
        let dir = first.tier_dir(tier).expect("dir");
        drop(first);
        let others: Vec<(PathBuf, &[u8])> = vec![
            (dir.join("notes.txt"), b"my notes"),
            (dir.join("README"), b""),
            (dir.join("backup.kvc.bak"), b"KVC junk"),
            (dir.join(".hidden"), b"x"),
        ];
        for (p, content) in &others {
            fs::write(p, content).expect("write other");
        }
        let cache = common::open(root);
        for (p, content) in &others {
            assert_eq!(&read(p)[..], *content, "{} untouched", p.display());
        }
        assert_eq!(corrupt(&cache), 0);
        assert_hit(&cache, &keep);
        // Still there after a gc and another reopen.
        assert_eq!(cache.gc(), 1);
        drop(cache);
        let cache = common::open(root);
        for (p, content) in &others {
            assert_eq!(&read(p)[..], *content, "{} untouched", p.display());
        }
        assert_eq!(corrupt(&cache), 0);
        assert!(cache.is_empty());
        assert_works_again(&cache, &keep);
    });
}
