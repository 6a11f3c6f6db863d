//! Save and load throughput per tier (README, cache throughput), against the raw cost of
//! moving the same bytes, measured side by side in the same run.
//!
//! For each tier (`ram`, `ram_file`, `disk`) and payload size (1, 16 and
//! 64 MiB), criterion group `{tier}/{size}` holds:
//!
//! - `save`: `Cache::save` of a fresh, distinct payload (key derivation,
//!   header + CRC32C; file tiers: private temp file, write, `fsync`, hard
//!   link, unlink, directory `fsync`; publish). The payload clone before and
//!   the eviction after each save are not timed.
//! - `load` (`ram_file`: `load_read` and `load_mmap`, the two
//!   [`FileLoad`] modes): `Cache::lookup` (claim; file tiers also write the
//!   hit count), `Claim::load` (file tiers: read + full parse — CRC32C and
//!   recomputed key), one read per 4 KiB page of the payload (a consumer
//!   reads what it restores), release. The RAM tier hands out a shared
//!   reference (zero copy), so its "load" is claim + page touches, not a
//!   copy: compare it with `memcpy` only as "what a copying design costs".
//! - `ram` also has `crc32c`: one CRC32C pass over the payload, the
//!   validation cost every save and every file load pays on top of moving
//!   the bytes.
//! - baselines on the same bytes: `ram` — `memcpy` into a pre-faulted
//!   buffer (stands for both save and load); file tiers — `raw_write_fsync`
//!   (create, write, `fsync` a new file in the tier's directory) and
//!   `raw_read` (open, read whole into an uninitialised buffer, touch
//!   pages); `ram_file` also has `raw_read_zeroed`, the same read into a
//!   zero-filled buffer as the tiers' `read(2)` mode does it.
//!
//! Throughput is payload bytes (`Throughput::Bytes`; criterion prints
//! MiB/s or GiB/s). `ram_file` lives in a fresh directory under `/dev/shm`
//! (tmpfs) and `disk` in a fresh directory under `/tmp` — or under cargo's
//! target tmpdir when `/tmp` is itself a tmpfs; both are removed at the end.
//! After the criterion groups, a short summary runs [`microbench`] and
//! [`raw_baseline`] for every cell and prints the ratios (set
//! `ERLLAMA_BENCH_NO_SUMMARY=1` to skip it).
//!
//! Results (`cargo bench -p erllama-cache --bench throughput`, 2-core VM,
//! /tmp = ext4 on virtio, release profile; criterion middle estimates,
//! MB/s = 10⁶ B/s of payload; ratio = cache / raw):
//!
//! | tier     | size  | save | raw write¹ | save/raw | load              | raw read² | load/raw   |
//! |----------|-------|-----:|-----------:|---------:|-------------------|----------:|-----------:|
//! | ram      | 1MiB  | 11443 | 21962 (memcpy) | 52% | 1461577 (zero-copy³) | 21962 (memcpy) | n/a³ |
//! | ram      | 16MiB |  9519 | 12218 (memcpy) | 78% |  587960 (zero-copy³) | 12218 (memcpy) | n/a³ |
//! | ram      | 64MiB | 10691 |  6813 (memcpy) | 157% | 688526 (zero-copy³) |  6813 (memcpy) | n/a³ |
//! | ram_file | 1MiB  |  2960 |  5292 | 56% | read 5719 / mmap 4376 | 11095 (zeroed 9123) | 52% / 39% |
//! | ram_file | 16MiB |  1961 |  2738 | 72% | read 3747 / mmap 4102 |  7385 (zeroed 5707) | 51% / 56% |
//! | ram_file | 64MiB |  2143 |  2655 | 81% | read 1540 / mmap 1425 |  1681 (zeroed 1562) | 92% / 85% |
//! | disk     | 1MiB  |   758 |   303⁴ | 250%⁴ | 7111 | 17508 | 41% |
//! | disk     | 16MiB |  1021 |  1097 | 93% | 4404 | 11274 | 39% |
//! | disk     | 64MiB |  1027 |  1139 | 90% | 1526 |  1721 | 89% |
//!
//! crc32c alone (`ram` groups): 19524 / 14526 / 11479 MB/s at 1 / 16 /
//! 64 MiB.
//!
//! ¹ `ram`: memcpy; file tiers: create + write + fsync. ² file tiers:
//! `raw_read` (uninitialised buffer); `zeroed`: `raw_read_zeroed`.
//! ³ The RAM tier's load is a shared reference plus page touches, not a
//! copy; its MB/s is not comparable with memcpy. ⁴ 1 MiB fsync on this VM
//! is very noisy: other runs measured raw 855–1053 MB/s and ratios 33–89%.
//!
//! Ratio ranges over three full and two partial runs (the machine was shared with other builds):
//! save — ram 52–59% / 71–78% / 157–185%, ram_file 56–107% / 72–98% /
//! 70–109%, disk 33–250% / 74–93% / 85–92%; load — ram_file (read)
//! 52–68% / 42–63% / 82–116%, disk 41–53% / 39–45% / 69–89%. So saves meet
//! the 70 % target except `ram` at 1 MiB (the CRC32C pass, at ~20 GB/s,
//! against a cache-hot memcpy) and small file saves in some runs; file
//! loads miss it up to 16 MiB: the load zero-fills its buffer
//! (`raw_read_zeroed` vs `raw_read`: −13–18% at 1 MiB, −23–35% at 16 MiB,
//! 0–7% at 64 MiB where the allocator hands out fresh zero pages) and then makes a
//! second, separate CRC32C pass over the whole file. At 64 MiB every read
//! is page-fault bound (fresh mmap'd buffers) and the cache is within
//! 10–20 % of raw.
//!
//! `FileLoad::Read` vs `FileLoad::Mmap` on tmpfs: Read is faster at 1 MiB
//! (all 4 runs, by 7–31 %) and at 64 MiB (3 of 4 runs, by 3–11 %); Mmap is
//! faster at 16 MiB in 4 of 5 runs (by 9–47 %) — because Read zero-fills a
//! recycled 16 MiB heap buffer before reading into it, while Mmap copies
//! into an uninitialised one. Without the zero fill Read should win or tie
//! everywhere; `Read` stays the right default (it is also the safe one).

use std::fs::File;
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use erllama_cache::{
    crc32c, microbench, raw_baseline, raw_read, raw_write_fsync, touch_pages, Cache, CacheConfig,
    CacheKey, FileLoad, FileTierConfig, FingerprintMode, Lookup, MicrobenchConfig, ModelIdentity,
    QuantType, SaveReason, SaveRequest, TierKind,
};

const MIB: usize = 1 << 20;
const SIZES: [usize; 3] = [MIB, 16 * MIB, 64 * MIB];
const TOKENS: u32 = 512;
const QUOTA: u64 = 512 << 20;

fn identity() -> Arc<ModelIdentity> {
    Arc::new(ModelIdentity {
        fingerprint: [0x33; 32],
        fingerprint_mode: FingerprintMode::Safe,
        quant_type: QuantType::Q8_0,
        ctx_params_hash: [0x44; 32],
        context_size: 8192,
    })
}

/// A deterministic, incompressible-looking payload.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x0123_4567_89AB_CDEF;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    out
}

/// Distinct token lists (hence keys) for every save of the run.
static NEXT_TOKENS: AtomicU32 = AtomicU32::new(0);

fn request(id: &Arc<ModelIdentity>, tier: TierKind, base: &[u8]) -> SaveRequest {
    let first = NEXT_TOKENS.fetch_add(TOKENS, Ordering::Relaxed);
    let mut payload = base.to_vec();
    payload[..4].copy_from_slice(&first.to_le_bytes());
    SaveRequest {
        identity: Arc::clone(id),
        tier,
        tokens: (first..first + TOKENS).collect(),
        payload,
        logits_count: 0,
        reason: SaveReason::Finish,
        prompt_text: String::new(),
        detail: None,
    }
}

/// Whether `path` lives on a tmpfs, from the longest matching mount point.
fn on_tmpfs(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), fs == "tmpfs"))
        })
        .max_by_key(|&(len, _)| len)
        .is_some_and(|(_, tmpfs)| tmpfs)
}

struct Dirs {
    shm: tempfile::TempDir,
    disk: tempfile::TempDir,
}

fn dirs() -> Dirs {
    let shm = tempfile::Builder::new()
        .prefix("erllama-bench-")
        .tempdir_in("/dev/shm")
        .expect("tempdir under /dev/shm");
    let disk_root = if on_tmpfs(Path::new("/tmp")) {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    } else {
        PathBuf::from("/tmp")
    };
    assert!(!on_tmpfs(&disk_root), "no disk-backed directory found");
    let disk = tempfile::Builder::new()
        .prefix("erllama-bench-")
        .tempdir_in(&disk_root)
        .expect("tempdir for the disk tier");
    Dirs { shm, disk }
}

struct Caches {
    /// ram, ram_file (read(2)) and disk (read(2)).
    main: Cache,
    /// ram_file read through mmap.
    mmap: Cache,
}

fn caches(d: &Dirs) -> Caches {
    let main = Cache::open(CacheConfig {
        ram_quota: QUOTA,
        ram_file: Some(FileTierConfig {
            dir: d.shm.path().join("read"),
            quota: QUOTA,
            load: FileLoad::Read,
        }),
        disk: Some(FileTierConfig::new(d.disk.path().join("disk"), QUOTA)),
        ..CacheConfig::default()
    })
    .expect("open cache");
    let mmap = Cache::open(CacheConfig {
        ram_quota: 0,
        ram_file: Some(FileTierConfig {
            dir: d.shm.path().join("mmap"),
            quota: QUOTA,
            load: FileLoad::Mmap,
        }),
        ..CacheConfig::default()
    })
    .expect("open mmap cache");
    Caches { main, mmap }
}

fn label(size: usize) -> String {
    format!("{}MiB", size / MIB)
}

fn bench_save(g: &mut BenchmarkGroup<'_, WallTime>, cache: &Cache, tier: TierKind, base: &[u8]) {
    let id = identity();
    g.bench_function("save", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let req = request(&id, tier, base);
                let t = Instant::now();
                let out = cache.save(req).expect("save");
                total += t.elapsed();
                black_box(out);
                cache.gc();
            }
            total
        });
    });
}

/// Claim, load, touch, release: one restore.
fn load_once(cache: &Cache, key: &CacheKey) -> u64 {
    let Lookup::Hit(claim) = cache.lookup(key) else {
        panic!("the row is cached");
    };
    let payload = claim.load().expect("load");
    touch_pages(&payload)
}

fn bench_load(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    cache: &Cache,
    tier: TierKind,
    base: &[u8],
) {
    let req = request(&identity(), tier, base);
    let key = req.key();
    cache.save(req).expect("save the row to load");
    g.bench_function(name, |b| b.iter(|| black_box(load_once(cache, &key))));
    cache.gc();
}

/// `raw_read` the way the file tiers read today: into a zero-filled
/// buffer (`vec![0; len]` + `read_exact`), to show what the zero fill
/// costs when the allocator hands out recycled (not fresh) pages.
fn raw_read_zeroed(path: &Path) -> u64 {
    let mut file = File::open(path).expect("open raw file");
    let len = file.metadata().expect("stat raw file").len() as usize;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).expect("read raw file");
    touch_pages(&buf)
}

fn bench_raw_file(g: &mut BenchmarkGroup<'_, WallTime>, dir: &Path, base: &[u8], zeroed_too: bool) {
    let path = dir.join("raw-baseline.bin");
    g.bench_function("raw_write_fsync", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut bytes = base.to_vec();
                bytes[0] ^= 1;
                let t = Instant::now();
                raw_write_fsync(&path, &bytes).expect("raw write");
                total += t.elapsed();
                std::fs::remove_file(&path).expect("remove raw file");
            }
            total
        });
    });
    raw_write_fsync(&path, base).expect("raw write");
    g.bench_function("raw_read", |b| {
        b.iter(|| black_box(raw_read(&path).expect("raw read")));
    });
    if zeroed_too {
        g.bench_function("raw_read_zeroed", |b| {
            b.iter(|| black_box(raw_read_zeroed(&path)));
        });
    }
    std::fs::remove_file(&path).expect("remove raw file");
}

fn bench_memcpy(g: &mut BenchmarkGroup<'_, WallTime>, base: &[u8]) {
    let mut dst = vec![1u8; base.len()];
    g.bench_function("raw_memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(base));
            black_box(&mut dst);
        });
    });
}

fn throughput(c: &mut Criterion, caches: &Caches) {
    for size in SIZES {
        let base = payload(size);
        for tier in TierKind::ALL {
            let mut g = c.benchmark_group(format!("{tier}/{}", label(size)));
            g.sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_millis(200))
                .measurement_time(Duration::from_millis(if size > 16 * MIB {
                    1200
                } else {
                    800
                }))
                .throughput(Throughput::Bytes(size as u64));
            bench_save(&mut g, &caches.main, tier, &base);
            match tier {
                TierKind::Ram => {
                    bench_load(&mut g, "load", &caches.main, tier, &base);
                    bench_memcpy(&mut g, &base);
                    g.bench_function("crc32c", |b| {
                        b.iter(|| black_box(crc32c(black_box(&base))));
                    });
                }
                TierKind::RamFile => {
                    bench_load(&mut g, "load_read", &caches.main, tier, &base);
                    bench_load(&mut g, "load_mmap", &caches.mmap, tier, &base);
                    let dir = caches.main.tier_dir(tier).expect("ram_file dir");
                    bench_raw_file(&mut g, &dir, &base, true);
                }
                TierKind::Disk => {
                    bench_load(&mut g, "load", &caches.main, tier, &base);
                    let dir = caches.main.tier_dir(tier).expect("disk dir");
                    bench_raw_file(&mut g, &dir, &base, false);
                }
            }
            g.finish();
        }
    }
}

/// The README, cache throughput helper on every cell, with ratios to the raw baseline.
fn summary(caches: &Caches) {
    println!();
    println!("microbench summary (MB/s = 1e6 B/s of payload; ratio = cache / raw)");
    println!(
        "{:<15} {:>6} {:>10} {:>10} {:>7} {:>10} {:>10} {:>7}",
        "tier", "size", "save", "raw_w", "ratio", "load", "raw_r", "ratio"
    );
    for size in SIZES {
        let n = (64 * MIB / size).clamp(3, 10);
        let cells = [
            ("ram", &caches.main, TierKind::Ram),
            ("ram_file/read", &caches.main, TierKind::RamFile),
            ("ram_file/mmap", &caches.mmap, TierKind::RamFile),
            ("disk", &caches.main, TierKind::Disk),
        ];
        for (name, cache, tier) in cells {
            let r = microbench(cache, &MicrobenchConfig::new(tier, size, n)).expect("microbench");
            let dir = cache.tier_dir(tier);
            let raw = raw_baseline(dir.as_deref(), size, n).expect("raw baseline");
            println!(
                "{name:<15} {:>6} {:>10.0} {:>10.0} {:>6.0}% {:>10.0} {:>10.0} {:>6.0}%{}",
                label(size),
                r.save_mb_s,
                raw.write_mb_s,
                100.0 * r.save_mb_s / raw.write_mb_s,
                r.load_mb_s,
                raw.read_mb_s,
                100.0 * r.load_mb_s / raw.read_mb_s,
                if r.load_zero_copy {
                    "  (zero-copy load)"
                } else {
                    ""
                },
            );
        }
    }
}

fn main() {
    let dirs = dirs();
    let caches = caches(&dirs);
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c, &caches);
    c.final_summary();
    let benching = std::env::args().any(|a| a == "--bench");
    if benching && std::env::var_os("ERLLAMA_BENCH_NO_SUMMARY").is_none() {
        summary(&caches);
    }
    assert!(caches.main.is_empty() && caches.mmap.is_empty());
    drop(caches);
    drop(dirs);
}
