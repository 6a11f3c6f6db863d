//! The meta index and publish protocol through the public API: saves and
//! loads on every tier, claims and pins, exact / exact-or-wait /
//! longest-prefix lookups, quotas and eviction, the reservation rules,
//! restarts over the same directories, counters.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{config, identity, open, payload, request, toks};
use erllama_cache::{
    Cache, CacheConfig, ClaimError, Counter, LinkOutcome, Lookup, OpenError, PolicyConfig,
    PrefixLookup, RowStatus, SaveError, SaveReason, SaveRequest, SaveStage, TierKind,
};

fn hit(lookup: Lookup) -> erllama_cache::Claim {
    match lookup {
        Lookup::Hit(c) => c,
        other => panic!("expected a hit, got {other:?}"),
    }
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn save_and_load_round_trip_on_every_tier() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    for (i, tier) in TierKind::ALL.into_iter().enumerate() {
        let tokens = toks(100 * i as u32, 600);
        let req = request(tier, &tokens, 300_000);
        let want = req.payload.clone();
        let key = req.key();
        let out = cache.save(req).expect("save");
        assert_eq!(out.key, key);
        assert_eq!(out.tier, tier);
        assert_eq!(out.link, LinkOutcome::Linked);
        assert!(out.size > want.len() as u64);
        let claim = hit(cache.lookup(&key));
        assert_eq!(claim.tier(), tier);
        assert_eq!(claim.tokens(), &tokens[..]);
        let got = claim.load().expect("load");
        assert_eq!(&got[..], &want[..]);
        assert_eq!(got.is_shared(), tier == TierKind::Ram);
        assert_eq!(cache.bytes(tier), out.size);
        let gauge = match tier {
            TierKind::Ram => Counter::BytesRam,
            TierKind::RamFile => Counter::BytesRamFile,
            TierKind::Disk => Counter::BytesDisk,
        };
        assert_eq!(cache.counters().get(gauge), out.size);
    }
    assert_eq!(cache.counters().get(Counter::SavesFinish), 3);
    // File tiers hold exactly one <hex>.kvc each, no temp files.
    for sub in ["shm", "disk"] {
        let names = files(&root.path().join(sub));
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].ends_with(".kvc") && names[0].len() == 68);
    }
}

#[test]
fn files_and_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let key = cache
        .save(request(TierKind::Disk, &toks(1, 10), 100))
        .expect("save")
        .key;
    let dir = root.path().join("disk");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(format!("{key}.kvc"))), 0o600);
}

#[test]
fn unconfigured_tier_is_refused() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let err = cache
        .save(request(TierKind::Disk, &toks(1, 10), 100))
        .expect_err("no disk tier");
    assert!(matches!(err, SaveError::TierDisabled(TierKind::Disk)));
    assert!(cache.is_empty());
}

#[test]
fn duplicate_save_is_already_present_and_counted() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let tokens = toks(5, 50);
    cache
        .save(request(TierKind::Disk, &tokens, 1000))
        .expect("save");
    // The same key in any tier is a duplicate: one row per key.
    for tier in TierKind::ALL {
        let err = cache
            .save(request(tier, &tokens, 1000))
            .expect_err("duplicate");
        assert!(matches!(err, SaveError::AlreadyPresent(_)), "{err}");
    }
    assert_eq!(cache.counters().get(Counter::DuplicateDropped), 3);
    assert_eq!(cache.len(), 1);
}

#[test]
fn a_live_reservation_makes_a_second_save_conflict() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let tokens = toks(9, 40);
    let pending = cache
        .begin_save(request(TierKind::RamFile, &tokens, 1000))
        .expect("reserve");
    let err = cache
        .begin_save(request(TierKind::RamFile, &tokens, 1000))
        .expect_err("conflict");
    assert!(matches!(err, SaveError::Conflict(_)));
    // While writing, the row is visible as busy, never as a hit.
    assert!(matches!(cache.lookup(pending.key()), Lookup::Busy));
    assert_eq!(
        cache.peek(pending.key()).expect("row").status,
        RowStatus::Writing
    );
    pending.run().expect("publish");
    assert!(matches!(
        cache.lookup(&identity().key(&tokens)),
        Lookup::Hit(_)
    ));
}

#[test]
fn dropping_a_pending_save_leaves_nothing() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let pending = cache
        .begin_save(request(TierKind::Disk, &toks(3, 30), 5000))
        .expect("reserve");
    let key = *pending.key();
    assert!(cache.reserved_bytes(TierKind::Disk) > 0);
    assert_eq!(cache.writer_pool().in_use(), 1);
    drop(pending);
    assert!(matches!(cache.lookup(&key), Lookup::Miss));
    assert_eq!(cache.reserved_bytes(TierKind::Disk), 0);
    assert_eq!(cache.writer_pool().in_use(), 0);
    assert!(files(&root.path().join("disk")).is_empty());
}

#[test]
fn writer_pool_full_drops_the_save_without_a_row() {
    let root = tempfile::tempdir().expect("tmp");
    let mut cfg = config(root.path(), 1 << 20, 1 << 20, 1 << 20);
    cfg.writer_limit = 1;
    let cache = Cache::open(cfg).expect("open");
    let first = cache
        .begin_save(request(TierKind::Ram, &toks(1, 10), 100))
        .expect("reserve");
    let err = cache
        .begin_save(request(TierKind::Ram, &toks(2, 10), 100))
        .expect_err("pool full");
    assert!(matches!(err, SaveError::MaxConcurrent));
    assert_eq!(cache.counters().get(Counter::SavesDropped), 1);
    assert_eq!(cache.len(), 1, "only the first reservation's row");
    first.run().expect("run");
    cache
        .save(request(TierKind::Ram, &toks(2, 10), 100))
        .expect("slot free again");
}

#[test]
fn continued_saves_leave_the_last_writer_slot_to_a_finish_save() {
    let root = tempfile::tempdir().expect("tmp");
    let mut cfg = config(root.path(), 1 << 20, 1 << 20, 1 << 20);
    cfg.writer_limit = 2;
    let cache = Cache::open(cfg).expect("open");
    let continued = |base| SaveRequest {
        reason: SaveReason::Continued,
        ..request(TierKind::Ram, &toks(base, 10), 100)
    };
    let first = cache.begin_save(continued(1)).expect("one slot of two");
    let err = cache
        .begin_save(continued(2))
        .expect_err("a continued save never takes the last slot");
    assert!(matches!(err, SaveError::MaxConcurrent));
    assert_eq!(cache.counters().get(Counter::SavesDropped), 1);
    let finish = cache
        .begin_save(request(TierKind::Ram, &toks(3, 10), 100))
        .expect("the finish save gets the last slot");
    finish.run().expect("finish");
    first.run().expect("continued");
    assert_eq!(cache.len(), 2);
}

#[test]
fn claims_pin_rows_against_every_eviction() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let a = cache
        .save(request(TierKind::Ram, &toks(1, 10), 1000))
        .expect("a")
        .key;
    let b = cache
        .save(request(TierKind::Ram, &toks(2, 10), 1000))
        .expect("b")
        .key;
    let claim = hit(cache.lookup(&a));
    assert_eq!(cache.peek(&a).expect("row").refcount, 1);
    assert_eq!(cache.gc(), 1, "only the unpinned row goes");
    assert!(cache.contains(&a) && !cache.contains(&b));
    assert_eq!(cache.evict_bytes(u64::MAX, &TierKind::ALL), (0, 0));
    // The payload stays readable while claimed.
    assert_eq!(claim.load().expect("load").len(), 1000);
    claim.release();
    assert_eq!(cache.peek(&a).expect("row").refcount, 0);
    assert_eq!(cache.gc(), 1);
    assert!(cache.is_empty());
    assert_eq!(cache.bytes(TierKind::Ram), 0);
    assert_eq!(cache.counters().get(Counter::BytesRam), 0);
    assert_eq!(cache.counters().get(Counter::Evictions), 2);
}

#[test]
fn a_claim_dropped_by_a_dead_thread_is_released() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let key = cache
        .save(request(TierKind::Ram, &toks(1, 10), 10))
        .expect("save")
        .key;
    let c2 = cache.clone();
    let _ = thread::spawn(move || {
        let _claim = c2.claim(&key).expect("claim");
        panic!("holder dies");
    })
    .join();
    assert_eq!(cache.peek(&key).expect("row").refcount, 0);
    assert_eq!(cache.gc(), 1);
}

#[test]
fn claim_counts_hits_and_persists_them_in_files() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let key = cache
        .save(request(TierKind::Disk, &toks(1, 10), 10))
        .expect("save")
        .key;
    for n in 1..=3 {
        assert_eq!(cache.claim(&key).expect("claim").hits(), n);
    }
    let bytes = std::fs::read(root.path().join("disk").join(format!("{key}.kvc"))).expect("read");
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().expect("4")), 3);
    assert!(
        erllama_cache::parse_full(&bytes, &key).is_ok(),
        "still valid"
    );
    assert_eq!(
        cache.claim(&identity().key(&[42])).err(),
        Some(ClaimError::NotFound)
    );
}

#[test]
fn restart_registers_files_with_hits_biasing_lru() {
    let root = tempfile::tempdir().expect("tmp");
    let (cold, hot) = {
        let cache = open(root.path());
        let cold = cache
            .save(request(TierKind::Disk, &toks(1, 10), 1000))
            .expect("a")
            .key;
        let hot = cache
            .save(request(TierKind::Disk, &toks(2, 10), 1000))
            .expect("b")
            .key;
        for _ in 0..5 {
            drop(cache.claim(&hot).expect("claim"));
        }
        // Make `cold` the most recently used in this process.
        drop(cache.claim(&cold).expect("claim"));
        (cold, hot)
    };
    let cache = open(root.path());
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.peek(&hot).expect("hot").hits, 5);
    let used = cache.bytes(TierKind::Disk);
    assert_eq!(cache.counters().get(Counter::BytesDisk), used);
    // After the restart the row with more hits is evicted last.
    assert_eq!(cache.evict_bytes(1, &[TierKind::Disk]).0, 1);
    assert!(cache.contains(&hot) && !cache.contains(&cold));
    let got = hit(cache.lookup(&hot)).load().expect("load");
    assert_eq!(&got[..], &payload(1000, 2)[..]);
}

#[test]
fn quota_evicts_lru_of_the_same_tier_or_drops() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = Cache::open(config(root.path(), 0, 0, 0)).expect("open");
    let err = cache
        .save(request(TierKind::Ram, &toks(1, 10), 10))
        .expect_err("zero quota");
    assert!(matches!(err, SaveError::NoSpace { .. }));
    assert_eq!(cache.counters().get(Counter::SavesDropped), 1);

    let cache = Cache::open(config(root.path(), 10_000, 10_000, 10_000)).expect("open");
    let row = cache
        .save(request(TierKind::Ram, &toks(1, 10), 3000))
        .expect("a");
    let quota_rows = 10_000 / row.size;
    assert_eq!(quota_rows, 3);
    let mut keys = vec![row.key];
    for i in 2..=3 {
        keys.push(
            cache
                .save(request(TierKind::Ram, &toks(i, 10), 3000))
                .expect("fill")
                .key,
        );
    }
    cache
        .save(request(TierKind::Disk, &toks(50, 10), 3000))
        .expect("other tier");
    drop(cache.claim(&keys[0]).expect("touch a: now b is the LRU"));
    let pin_c = cache.claim(&keys[2]).expect("pin c");
    let d = cache
        .save(request(TierKind::Ram, &toks(4, 10), 3000))
        .expect("evicts b")
        .key;
    assert!(cache.contains(&keys[0]) && !cache.contains(&keys[1]) && cache.contains(&d));
    assert!(cache.bytes(TierKind::Ram) <= 10_000);
    assert_eq!(
        cache.bytes(TierKind::Disk),
        row.size,
        "other tiers untouched"
    );
    // Too big for the quota even when empty: dropped, nothing evicted.
    let err = cache
        .save(request(TierKind::Ram, &toks(5, 10), 20_000))
        .expect_err("too big");
    assert!(matches!(err, SaveError::NoSpace { .. }));
    assert_eq!(cache.len(), 4);
    drop(pin_c);
}

#[test]
fn evict_bytes_respects_tiers_and_lru_order() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let mut keys = Vec::new();
    for (i, tier) in [
        TierKind::Ram,
        TierKind::Disk,
        TierKind::Ram,
        TierKind::RamFile,
    ]
    .into_iter()
    .enumerate()
    {
        keys.push(
            cache
                .save(request(tier, &toks(i as u32 * 10, 10), 1000))
                .expect("save"),
        );
    }
    let (n, freed) = cache.evict_bytes(1, &[TierKind::Ram]);
    assert_eq!((n, freed), (1, keys[0].size));
    assert!(!cache.contains(&keys[0].key) && cache.contains(&keys[2].key));
    let (n, _) = cache.evict_bytes(u64::MAX, &[TierKind::Ram, TierKind::RamFile]);
    assert_eq!(n, 2);
    assert!(cache.contains(&keys[1].key), "disk untouched");
    let dump = cache.dump();
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].tier, TierKind::Disk);
    assert_eq!(dump[0].token_count, 10);
    assert_eq!(dump[0].save_reason, SaveReason::Finish);
}

#[test]
fn exact_or_wait_wakes_when_the_row_publishes() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let tokens = toks(77, 100);
    let key = identity().key(&tokens);
    assert!(matches!(
        cache.lookup_wait(&key, Duration::from_millis(1)),
        Lookup::Miss
    ));
    let pending = cache
        .begin_save(request(TierKind::Disk, &tokens, 50_000))
        .expect("reserve");
    let waiter = {
        let cache = cache.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let lookup = cache.lookup_wait(&key, Duration::from_secs(30));
            (matches!(lookup, Lookup::Hit(_)), started.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(50));
    pending.run().expect("publish");
    let (was_hit, waited) = waiter.join().expect("join");
    assert!(was_hit);
    assert!(waited < Duration::from_secs(30), "woken, not timed out");
}

#[test]
fn exact_or_wait_gives_busy_at_the_deadline_and_miss_on_cancel() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let tokens = toks(1, 10);
    let key = identity().key(&tokens);
    let pending = cache
        .begin_save(request(TierKind::Ram, &tokens, 10))
        .expect("reserve");
    assert!(matches!(
        cache.lookup_wait(&key, Duration::from_millis(20)),
        Lookup::Busy
    ));
    let waiter = {
        let cache = cache.clone();
        thread::spawn(move || {
            matches!(
                cache.lookup_wait(&key, Duration::from_secs(30)),
                Lookup::Miss
            )
        })
    };
    thread::sleep(Duration::from_millis(20));
    drop(pending);
    assert!(waiter.join().expect("join"));
}

#[test]
fn longest_prefix_probes_down_to_the_cached_prefix() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let policy = PolicyConfig::default();
    let prompt = toks(1000, 12_000);
    let id = identity();
    // Only the 4096-token prefix is cached (plus a decoy of other tokens).
    cache
        .save(request(TierKind::Ram, &prompt[..4096], 100))
        .expect("save");
    cache
        .save(request(TierKind::Ram, &toks(5, 8192), 100))
        .expect("decoy");
    match cache.longest_prefix(&id.hasher(), &prompt, &policy) {
        PrefixLookup::Hit { claim, len, probes } => {
            assert_eq!((len, probes), (4096, 4), "10240, 8192, 6144, 4096");
            assert_eq!(claim.tokens(), &prompt[..4096]);
        }
        miss => panic!("expected a hit, got {miss:?}"),
    }
    assert_eq!(cache.counters().get(Counter::LongestPrefixProbes), 4);
    assert!(cache.counters().get(Counter::LongestPrefixNs) > 0);
    match cache.longest_prefix(&id.hasher(), &prompt[..1500], &policy) {
        PrefixLookup::Miss { probes } => assert_eq!(probes, 0),
        hit => panic!("expected a miss, got {hit:?}"),
    }
    // A prefix of a different prompt never matches.
    let other = toks(1, 12_000);
    assert!(matches!(
        cache.longest_prefix(&id.hasher(), &other, &policy),
        PrefixLookup::Miss { probes: 5 }
    ));
}

#[test]
fn sweep_drops_a_dead_reservation_and_run_then_expires() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let pending = cache
        .begin_save(request(TierKind::Disk, &toks(1, 10), 100))
        .expect("reserve");
    let key = *pending.key();
    assert_eq!(cache.sweep(), (0, 0), "still live");
    assert_eq!(
        cache.sweep_at(Instant::now() + Duration::from_secs(61)),
        (0, 1)
    );
    assert!(matches!(cache.lookup(&key), Lookup::Miss));
    assert_eq!(cache.reserved_bytes(TierKind::Disk), 0);
    let err = pending.run().expect_err("expired");
    assert!(matches!(err, SaveError::Expired(_)));
    assert!(files(&root.path().join("disk")).is_empty());
}

#[test]
fn sweep_adopts_a_valid_file_linked_by_a_writer_that_vanished() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = open(root.path());
    let tokens = toks(1, 10);
    // A writer reserved, then another process linked a valid file for the
    // key (as the dead writer would have); the reservation times out.
    let pending = cache
        .begin_save(request(TierKind::Disk, &tokens, 100))
        .expect("reserve");
    let key = *pending.key();
    let other = Cache::open(config(root.path(), 1 << 20, 1 << 20, 1 << 20)).expect("other");
    // A second index over the same directory reserves independently.
    other
        .save(request(TierKind::Disk, &tokens, 100))
        .expect("other writer");
    std::mem::forget(pending);
    assert_eq!(
        cache.sweep_at(Instant::now() + Duration::from_secs(61)),
        (1, 0)
    );
    let got = hit(cache.lookup(&key)).load().expect("load");
    assert_eq!(&got[..], &payload(100, 1)[..]);
    assert_eq!(
        cache.bytes(TierKind::Disk),
        cache.peek(&key).expect("row").size
    );
}

#[test]
fn two_caches_over_one_directory_adopt_each_others_files() {
    let root = tempfile::tempdir().expect("tmp");
    let a = open(root.path());
    let b = open(root.path());
    let tokens = toks(8, 64);
    a.save(request(TierKind::RamFile, &tokens, 4096))
        .expect("a");
    let out = b
        .save(request(TierKind::RamFile, &tokens, 4096))
        .expect("b");
    assert_eq!(out.link, LinkOutcome::AdoptedExisting);
    assert_eq!(files(&root.path().join("shm")).len(), 1);
}

#[test]
fn bad_config_is_refused() {
    let cfg = CacheConfig {
        writer_limit: 0,
        ..CacheConfig::default()
    };
    assert!(matches!(Cache::open(cfg), Err(OpenError::InvalidConfig(_))));
    let cfg = CacheConfig {
        writer_name: "a/b".into(),
        ..CacheConfig::default()
    };
    assert!(matches!(Cache::open(cfg), Err(OpenError::InvalidConfig(_))));
    let root = tempfile::tempdir().expect("tmp");
    let mut cfg = config(root.path(), 1, 1, 1);
    cfg.disk.as_mut().expect("disk").dir = root.path().join("shm");
    assert!(matches!(Cache::open(cfg), Err(OpenError::InvalidConfig(_))));
    let file = root.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    let mut cfg = config(root.path(), 1, 1, 1);
    cfg.disk.as_mut().expect("disk").dir = file;
    assert!(matches!(
        Cache::open(cfg),
        Err(OpenError::UnusableDir {
            tier: TierKind::Disk,
            ..
        })
    ));
}

#[test]
fn lookups_run_while_a_writer_churns() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let stable = cache
        .save(request(TierKind::Ram, &toks(1, 10), 64))
        .expect("save")
        .key;
    let pin = cache.claim(&stable).expect("pin");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (cache, stop) = (cache.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let mut i = 100;
            while !stop.load(Ordering::Relaxed) {
                let out = cache
                    .save(request(TierKind::Ram, &toks(i, 10), 64))
                    .expect("save");
                cache.evict_bytes(out.size, &[TierKind::Ram]);
                i += 1;
            }
        })
    };
    for _ in 0..20_000 {
        assert!(cache.contains(&stable));
        assert!(matches!(cache.lookup(&stable), Lookup::Hit(_)));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(cache.contains(&stable), "pinned row survived the churn");
    drop(pin);
}

#[test]
fn a_writer_unwinding_at_any_stage_leaves_no_stray_bytes() {
    for stage in [
        SaveStage::Reserved,
        SaveStage::TempPartial,
        SaveStage::Staged,
        SaveStage::Checked,
        SaveStage::Linked,
    ] {
        let root = tempfile::tempdir().expect("tmp");
        let cache = open(root.path());
        let pending = cache
            .begin_save(request(TierKind::Disk, &toks(3, 30), 5000))
            .expect("reserve");
        let key = *pending.key();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pending.run_with_probe(&|s| assert_ne!(s, stage, "writer dies"))
        }));
        assert!(unwound.is_err(), "{stage:?}");
        assert_eq!(cache.writer_pool().in_use(), 0);
        assert_eq!(cache.reserved_bytes(TierKind::Disk), 0);
        let names = files(&root.path().join("disk"));
        if stage == SaveStage::Linked {
            // The bytes were valid and in place: the row is published.
            assert_eq!(names, vec![format!("{key}.kvc")], "{stage:?}");
            assert!(cache.contains(&key));
            assert_eq!(
                cache.bytes(TierKind::Disk),
                cache.peek(&key).expect("row").size
            );
        } else {
            assert!(names.is_empty(), "{stage:?}: {names:?}");
            assert!(matches!(cache.lookup(&key), Lookup::Miss));
        }
    }
}

#[test]
fn a_timed_pin_holds_against_eviction_until_it_expires() {
    let root = tempfile::tempdir().expect("tmp");
    let cache = Cache::open(config(root.path(), 10_000, 0, 0)).expect("open");
    let a = cache
        .save(request(TierKind::Ram, &toks(1, 10), 3000))
        .expect("a")
        .key;
    let b = cache
        .save(request(TierKind::Ram, &toks(2, 10), 3000))
        .expect("b")
        .key;
    assert!(matches!(
        cache.pin_for(&toks_key(3), Duration::from_secs(60)),
        Err(erllama_cache::PinError::NotFound)
    ));
    cache
        .pin_for(&a, Duration::from_millis(300))
        .expect("pin a");
    assert_eq!(cache.peek(&a).expect("row").refcount, 1);
    // A second pin refreshes, never stacks.
    cache
        .pin_for(&a, Duration::from_millis(300))
        .expect("again");
    assert_eq!(cache.peek(&a).expect("row").refcount, 1);
    assert_eq!(cache.timed_pins_left().len(), 1);
    // Every eviction path passes it by: gc, evict_bytes, a quota.
    assert_eq!(cache.gc(), 1, "only b goes");
    assert!(cache.contains(&a) && !cache.contains(&b));
    assert_eq!(cache.evict_bytes(u64::MAX, &[TierKind::Ram]), (0, 0));
    for i in 10..14 {
        let _ = cache.save(request(TierKind::Ram, &toks(i, 10), 3000));
    }
    assert!(cache.contains(&a), "quota pressure keeps the pinned row");
    assert!(cache.bytes(TierKind::Ram) <= 10_000);
    // Past its deadline the next eviction takes it.
    thread::sleep(Duration::from_millis(350));
    assert_eq!(cache.peek(&a).expect("row").refcount, 1, "lazy expiry");
    cache.gc();
    assert!(!cache.contains(&a));
    assert!(cache.timed_pins_left().is_empty());
    // unpin ends one early.
    let c = cache
        .save(request(TierKind::Ram, &toks(20, 10), 3000))
        .expect("c")
        .key;
    cache.pin_for(&c, Duration::from_secs(3600)).expect("pin c");
    assert_eq!(cache.gc(), 0);
    assert!(cache.unpin(&c));
    assert!(!cache.unpin(&c));
    assert_eq!(cache.peek(&c).expect("row").refcount, 0);
    assert_eq!(cache.gc(), 1);
}

fn toks_key(base: u32) -> erllama_cache::CacheKey {
    identity().key(&toks(base, 10))
}

#[test]
fn a_save_can_pin_its_row_as_it_publishes() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let mut pending = cache
        .begin_save(request(TierKind::Ram, &toks(7, 10), 100))
        .expect("begin");
    pending.pin_on_publish(Duration::from_secs(60));
    let key = pending.run().expect("run").key;
    // Pinned from the moment it is visible.
    assert_eq!(cache.peek(&key).expect("row").refcount, 1);
    assert_eq!(cache.timed_pins_left().len(), 1);
    assert_eq!(cache.gc(), 0);
    assert!(cache.unpin(&key));
    assert_eq!(cache.gc(), 1);
}

#[test]
fn a_row_another_cache_publishes_later_is_adopted_on_a_miss() {
    let root = tempfile::tempdir().expect("tmp");
    let a = open(root.path());
    let b = open(root.path());
    for (tier, base) in [(TierKind::Disk, 30), (TierKind::RamFile, 31)] {
        let tokens = toks(base, 40);
        let key = b.save(request(tier, &tokens, 5000)).expect("b saves").key;
        assert!(!a.contains(&key), "a's index was built before");
        let got = hit(a.lookup(&key));
        assert_eq!(got.tier(), tier);
        assert_eq!(got.tokens(), &tokens[..]);
        assert_eq!(&got.load().expect("load")[..], &payload(5000, base)[..]);
    }
    assert_eq!(a.counters().get(Counter::FilesAdopted), 2);
    assert_eq!(
        a.bytes(TierKind::Disk) + a.bytes(TierKind::RamFile),
        b.bytes(TierKind::Disk) + b.bytes(TierKind::RamFile)
    );
    // A prefix row another cache publishes is found by the walk too.
    let long = toks(40, 5000);
    let policy = erllama_cache::PolicyConfig {
        boundary_align_tokens: 1024,
        min_tokens: 1024,
        ..erllama_cache::PolicyConfig::default()
    };
    b.save(request(TierKind::Disk, &long[..2048], 100))
        .expect("b saves a prefix");
    match a.longest_prefix(&identity().hasher(), &long, &policy) {
        erllama_cache::PrefixLookup::Hit { len, .. } => assert_eq!(len, 2048),
        erllama_cache::PrefixLookup::Miss { .. } => panic!("the prefix row was not adopted"),
    }
    // A corrupt file is never adopted: deleted and counted.
    let tokens = toks(50, 40);
    let key = b
        .save(request(TierKind::Disk, &tokens, 5000))
        .expect("b")
        .key;
    let path = root
        .path()
        .join("disk")
        .join(format!("{}.kvc", key.to_hex()));
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&path, bytes).expect("write");
    assert!(matches!(a.lookup(&key), Lookup::Miss));
    assert!(!path.exists());
    assert_eq!(a.counters().get(Counter::CorruptFiles), 1);
}

#[test]
fn mmap_loads_restore_straight_from_a_validated_mapping() {
    let root = tempfile::tempdir().expect("tmp");
    let mut cfg = config(root.path(), 1 << 20, 64 << 20, 64 << 20);
    if let Some(rf) = cfg.ram_file.as_mut() {
        rf.load = erllama_cache::FileLoad::Mmap;
    }
    let cache = Cache::open(cfg).expect("open");
    let tokens = toks(60, 40);
    let key = cache
        .save(request(TierKind::RamFile, &tokens, 100_000))
        .expect("save")
        .key;
    let claim = hit(cache.lookup(&key));
    let got = claim.load().expect("load");
    assert!(got.is_mapped());
    assert_eq!(&got[..], &payload(100_000, 60)[..]);
    drop(claim);
    // Evicted (the file unlinked) while a restore still holds the mapping:
    // the bytes stay readable and intact.
    assert_eq!(cache.gc(), 1);
    assert!(!cache.contains(&key));
    assert_eq!(&got[..], &payload(100_000, 60)[..]);
    // A corrupt file is rejected on the mapping: deleted, counted, a miss.
    let key = cache
        .save(request(TierKind::RamFile, &toks(70, 40), 100_000))
        .expect("save")
        .key;
    let path = root
        .path()
        .join("shm")
        .join(format!("{}.kvc", key.to_hex()));
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
    let claim = hit(cache.lookup(&key));
    assert!(claim.load().is_err());
    drop(claim);
    assert!(!cache.contains(&key));
    assert_eq!(cache.counters().get(Counter::CorruptFiles), 1);
}
