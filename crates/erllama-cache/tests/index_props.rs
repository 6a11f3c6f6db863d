//! Property test of the index under concurrency: random interleavings of
//! claim / release / save / evict / gc on several threads never evict a
//! pinned or writing row, never exceed a quota, and always leave the index
//! consistent with the files on disk and with the byte gauges.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread;

use common::{config, identity, payload, request, toks};
use erllama_cache::{Cache, Claim, Counter, PendingSave, RowStatus, SaveError, TierKind};
use proptest::prelude::*;

const QUOTA: u64 = 40_000;

#[derive(Debug, Clone)]
enum Op {
    Save {
        tier: usize,
        id: u32,
        len: usize,
    },
    /// Reserve and hold the reservation until a later `Finish`.
    Begin {
        tier: usize,
        id: u32,
        len: usize,
    },
    Finish,
    Claim {
        id: u32,
    },
    Release,
    Evict {
        bytes: u64,
        tiers: u8,
    },
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..12u32, 0..12_000usize).prop_map(|(tier, id, len)| Op::Save { tier, id, len }),
        1 => (0..3usize, 0..12u32, 0..12_000usize).prop_map(|(tier, id, len)| Op::Begin { tier, id, len }),
        1 => Just(Op::Finish),
        4 => (0..12u32).prop_map(|id| Op::Claim { id }),
        2 => Just(Op::Release),
        1 => (0..30_000u64, 1..8u8).prop_map(|(bytes, tiers)| Op::Evict { bytes, tiers }),
        1 => Just(Op::Gc),
    ]
}

fn tokens_of(id: u32) -> Vec<u32> {
    toks(id * 1000, 16 + id as usize)
}

fn tier_list(mask: u8) -> Vec<TierKind> {
    TierKind::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, t)| t)
        .collect()
}

fn check_quotas(cache: &Cache) {
    for tier in TierKind::ALL {
        let used = cache.bytes(tier) + cache.reserved_bytes(tier);
        assert!(used <= QUOTA, "{tier}: {used} > {QUOTA}");
    }
}

/// Runs one thread's ops; asserts pins and reservations hold throughout.
fn run_thread(cache: &Cache, ops: Vec<Op>) {
    let mut claims: Vec<Claim> = Vec::new();
    let mut pending: Vec<PendingSave> = Vec::new();
    for op in ops {
        match op {
            Op::Save { tier, id, len } => {
                match cache.save(request(TierKind::ALL[tier], &tokens_of(id), len)) {
                    Ok(_)
                    | Err(
                        SaveError::AlreadyPresent(_)
                        | SaveError::Conflict(_)
                        | SaveError::NoSpace { .. }
                        | SaveError::MaxConcurrent,
                    ) => {}
                    Err(e) => panic!("save failed: {e}"),
                }
            }
            Op::Begin { tier, id, len } => {
                if let Ok(p) = cache.begin_save(request(TierKind::ALL[tier], &tokens_of(id), len)) {
                    pending.push(p);
                }
            }
            Op::Finish => {
                if let Some(p) = pending.pop() {
                    let key = *p.key();
                    // A held reservation is never evicted or taken over.
                    assert_eq!(cache.peek(&key).expect("row").status, RowStatus::Writing);
                    p.run().expect("a live reservation publishes");
                }
            }
            Op::Claim { id } => {
                if let Ok(c) = cache.claim(&identity().key(&tokens_of(id))) {
                    claims.push(c);
                }
            }
            Op::Release => {
                claims.pop();
            }
            Op::Evict { bytes, tiers } => {
                cache.evict_bytes(bytes, &tier_list(tiers));
            }
            Op::Gc => {
                cache.gc();
            }
        }
        for c in &claims {
            assert!(cache.contains(c.key()), "a pinned row was evicted");
        }
        for p in &pending {
            assert_eq!(
                cache.peek(p.key()).map(|r| r.status),
                Some(RowStatus::Writing),
                "a reservation was lost"
            );
        }
        check_quotas(cache);
    }
    // Pinned rows still load their exact bytes at the end (payloads are
    // a pure function of length and first token).
    for c in &claims {
        let got = c.load().expect("pinned row loads");
        assert_eq!(&got[..], &payload(got.len(), c.tokens()[0])[..]);
    }
    for p in pending {
        p.run().expect("publish");
    }
}

fn kvc_files(dir: &std::path::Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().into_string().expect("utf8"),
                e.metadata().expect("meta").len(),
            )
        })
        .collect()
}

fn check_consistent(cache: &Cache, root: &std::path::Path) {
    let dump = cache.dump();
    for tier in TierKind::ALL {
        let rows: Vec<_> = dump.iter().filter(|r| r.tier == tier).collect();
        assert!(rows
            .iter()
            .all(|r| r.status == RowStatus::Available && r.refcount == 0));
        let total: u64 = rows.iter().map(|r| r.size).sum();
        assert_eq!(cache.bytes(tier), total, "{tier}");
        assert_eq!(cache.reserved_bytes(tier), 0, "{tier}");
        let gauge = [Counter::BytesRam, Counter::BytesRamFile, Counter::BytesDisk][tier as usize];
        assert_eq!(cache.counters().get(gauge), total, "{tier} gauge");
        let dir = match tier {
            TierKind::Ram => continue,
            TierKind::RamFile => root.join("shm"),
            TierKind::Disk => root.join("disk"),
        };
        let want: BTreeMap<String, u64> = rows
            .iter()
            .map(|r| (format!("{}.kvc", r.key), r.size))
            .collect();
        assert_eq!(kvc_files(&dir), want, "{tier}: files on disk == index rows");
    }
    assert_eq!(cache.writer_pool().in_use(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_ops_keep_the_index_sound(
        threads in prop::collection::vec(prop::collection::vec(op(), 1..40), 2..4)
    ) {
        let root = tempfile::tempdir().expect("tmp");
        let cache = Cache::open(config(root.path(), QUOTA, QUOTA, QUOTA)).expect("open");
        let barrier = Arc::new(std::sync::Barrier::new(threads.len()));
        let handles: Vec<_> = threads
            .into_iter()
            .map(|ops| {
                let (cache, barrier) = (cache.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    run_thread(&cache, ops);
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        check_consistent(&cache, root.path());
        // A fresh index over the same directories sees the same file rows.
        let file_rows = |c: &Cache| -> BTreeMap<String, u64> {
            c.dump()
                .into_iter()
                .filter(|r| r.tier != TierKind::Ram)
                .map(|r| (r.key.to_hex(), r.size))
                .collect()
        };
        let before = file_rows(&cache);
        drop(cache);
        let reopened = Cache::open(config(root.path(), QUOTA, QUOTA, QUOTA)).expect("reopen");
        prop_assert_eq!(file_rows(&reopened), before);
        check_consistent(&reopened, root.path());
    }
}
