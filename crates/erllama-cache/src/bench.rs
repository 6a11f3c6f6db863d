//! Microbench helpers (README, cache throughput): cache throughput with no model.
//!
//! [`microbench`] saves then loads `iterations` distinct payloads of a given
//! size through one tier of a live [`Cache`], on the full path a real save
//! and restore take — key derivation, header framing and CRC32C, for file
//! tiers the private temp file, `fsync`, hard link and directory `fsync`,
//! then claim, read and full validation (CRC and recomputed key) on load —
//! and reports average save and load time and throughput. Each row is
//! removed right after it was loaded, so at most one benchmark row is live
//! at a time and the cache is left as it was found: the rows are saved
//! under a model fingerprint of their own (no key can collide with a real
//! row), with [`SaveReason::Unknown`] (no `saves_*` counter moves), and the
//! benchmark refuses to start a save that would make the tier evict
//! anything. Only `load_total_ns` (and, for file tiers, nothing else) keeps
//! a trace.
//!
//! [`raw_baseline`] measures what the same bytes cost without the cache:
//! `memcpy` into a pre-faulted buffer for the RAM tier, and for a file tier
//! a plain `write` + `fsync` of a new file and a plain `read` of it in the
//! tier's directory. Ratios of the two are what the throughput targets
//! (≥ 70 % of raw) are stated against.
//!
//! **What a load costs.** A consumer of a restored payload reads it (the
//! engine copies it into the model's KV cache), so every load here is
//! followed by [`touch_pages`], one read per 4 KiB page. For file tiers the
//! bytes were already read and checked by the load; for the RAM tier a load
//! hands out a shared reference to the stored row — no copy at all — so
//! its load time is claim + reference + page touches and its "MB/s" is not
//! a copy bandwidth: [`MicrobenchReport::load_zero_copy`] says so, and its
//! `Display` prints it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::key::{CacheKey, FingerprintMode, QuantType};
use crate::kvc::SaveReason;
use crate::meta::{Cache, Lookup};
use crate::tier::{LoadError, TierKind};
use crate::writer::{ModelIdentity, SaveError, SaveRequest};

/// Tokens per benchmark row (part of the key and of the header).
const BENCH_TOKENS: usize = 256;

/// Header bytes assumed on top of the tokens when checking that a row fits
/// the tier without evicting anything (the real header is well under).
const HEADER_SLACK: u64 = 8 << 10;

/// Distinguishes the runs of one process (fingerprints and file names).
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What to measure with [`microbench`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicrobenchConfig {
    /// The tier to save to and load from (must be configured).
    pub tier: TierKind,
    /// Payload size in bytes (the header comes on top).
    pub payload_bytes: usize,
    /// Number of distinct payloads saved and loaded (at least 1).
    pub iterations: usize,
}

impl MicrobenchConfig {
    /// A config for `iterations` payloads of `payload_bytes` in `tier`.
    #[must_use]
    pub const fn new(tier: TierKind, payload_bytes: usize, iterations: usize) -> Self {
        Self {
            tier,
            payload_bytes,
            iterations,
        }
    }
}

/// Averages measured by [`microbench`]. Throughputs count payload bytes
/// only, in MB/s (10⁶ bytes per second).
#[derive(Clone, Debug, PartialEq)]
pub struct MicrobenchReport {
    /// The tier measured.
    pub tier: TierKind,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Bytes stored per row (header + payload).
    pub row_bytes: u64,
    /// Number of save/load pairs averaged.
    pub iterations: usize,
    /// Average save time (begin_save + run: framing, CRC, staging, link,
    /// publish) in microseconds.
    pub save_us: f64,
    /// Average load time (claim, load with full validation, one read per
    /// page of the payload, release) in microseconds.
    pub load_us: f64,
    /// Payload MB/s of a save.
    pub save_mb_s: f64,
    /// Payload MB/s of a load.
    pub load_mb_s: f64,
    /// Whether loads handed out the stored bytes without copying them (the
    /// RAM tier): then `load_mb_s` is not a copy bandwidth.
    pub load_zero_copy: bool,
}

impl fmt::Display for MicrobenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{tier:<8} {size:>10} B x{n:<4} save {su:>10.1} us {sm:>9.1} MB/s | load {lu:>10.1} us {lm:>9.1} MB/s",
            tier = self.tier.label(),
            size = self.payload_bytes,
            n = self.iterations,
            su = self.save_us,
            sm = self.save_mb_s,
            lu = self.load_us,
            lm = self.load_mb_s,
        )?;
        if self.load_zero_copy {
            f.write_str(" (zero-copy load: shared reference, pages touched only)")?;
        }
        Ok(())
    }
}

/// Why [`microbench`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum MicrobenchError {
    /// `iterations` was zero.
    #[error("a microbench needs at least one iteration")]
    NoIterations,
    /// A save failed — including [`SaveError::NoSpace`] when a row would
    /// not fit the tier without evicting rows the benchmark does not own.
    #[error("microbench save: {0}")]
    Save(#[from] SaveError),
    /// A load failed.
    #[error("microbench load: {0}")]
    Load(#[from] LoadError),
    /// The row just saved was not found available (evicted or busy).
    #[error("microbench row {0} was not available right after its save")]
    Lost(CacheKey),
}

/// Reads one byte per 4 KiB page of `bytes` (and the last byte), so a
/// consumer's page faults and cache misses are paid; returns their wrapping
/// sum so the reads cannot be optimised away.
#[must_use]
pub fn touch_pages(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    for chunk in bytes.chunks(4096) {
        sum = sum.wrapping_add(u64::from(black_box(chunk[0])));
    }
    if let Some(&last) = bytes.last() {
        sum = sum.wrapping_add(u64::from(black_box(last)));
    }
    sum
}

/// A deterministic, incompressible-looking payload (xorshift32).
fn fill_payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let take = (len - out.len()).min(4);
        out.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    out
}

/// Makes payload `i` distinct from the others (its first bytes).
fn stamp(payload: &mut [u8], i: u64) {
    let bytes = i.to_le_bytes();
    let n = payload.len().min(bytes.len());
    payload[..n].copy_from_slice(&bytes[..n]);
}

fn unique_stamp() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40) ^ RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// An identity no real model has: the benchmark's keys never collide with
/// stored rows.
fn bench_identity() -> Arc<ModelIdentity> {
    let mut fingerprint = *b"erllama-cache microbench........";
    fingerprint[24..].copy_from_slice(&unique_stamp().to_le_bytes());
    Arc::new(ModelIdentity {
        fingerprint,
        fingerprint_mode: FingerprintMode::FastUnsafe,
        quant_type: QuantType::F16,
        ctx_params_hash: [0xB5; 32],
        context_size: 4096,
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mb_s(bytes: usize, avg_us: f64) -> f64 {
    if avg_us > 0.0 {
        bytes as f64 / avg_us
    } else {
        f64::INFINITY
    }
}

/// Removes one row the benchmark owns, with the index's own accounting:
/// its bytes are removed from the tier, and the next load of the (still
/// claimed) row takes the "bytes vanished" path, which drops the row and
/// its bytes from the gauges without counting an eviction or corruption.
fn remove_own_row(cache: &Cache, claim: crate::meta::Claim) -> Result<(), MicrobenchError> {
    let key = *claim.key();
    if let Some(tier) = cache.tier(claim.tier()) {
        tier.remove(&key).map_err(SaveError::Tier)?;
    }
    match claim.load() {
        Err(LoadError::Missing { .. }) => Ok(()),
        Err(e) => Err(e.into()),
        // Cannot happen (the bytes are gone); nothing to undo either way.
        Ok(_) => Ok(()),
    }
}

/// Saves then loads `cfg.iterations` distinct payloads of
/// `cfg.payload_bytes` through `cfg.tier` of `cache` and reports the
/// averages; see the module docs for what is timed. Each row is removed
/// after its load, so the cache holds what it held before (rows, bytes,
/// LRU order); payload generation and removal are not timed.
///
/// # Errors
///
/// [`MicrobenchError::NoIterations`]; [`MicrobenchError::Save`] with
/// [`SaveError::TierDisabled`], [`SaveError::MaxConcurrent`] (every writer
/// slot busy) or [`SaveError::NoSpace`] when a row would not fit the tier's
/// free quota (nothing is evicted to make room), or any failure of the
/// save; [`MicrobenchError::Load`] and [`MicrobenchError::Lost`] when the
/// row cannot be read back.
pub fn microbench(
    cache: &Cache,
    cfg: &MicrobenchConfig,
) -> Result<MicrobenchReport, MicrobenchError> {
    if cfg.iterations == 0 {
        return Err(MicrobenchError::NoIterations);
    }
    if !cache.has_tier(cfg.tier) {
        return Err(SaveError::TierDisabled(cfg.tier).into());
    }
    let identity = bench_identity();
    let base = fill_payload(cfg.payload_bytes, 0x5EED);
    let need = cfg.payload_bytes as u64 + 4 * BENCH_TOKENS as u64 + HEADER_SLACK;
    let (mut save_total, mut load_total) = (Duration::ZERO, Duration::ZERO);
    let mut row_bytes = 0;
    let mut zero_copy = true;
    let mut sink = 0u64;
    for i in 0..cfg.iterations {
        let free = cache
            .quota(cfg.tier)
            .saturating_sub(cache.bytes(cfg.tier) + cache.reserved_bytes(cfg.tier));
        if need > free {
            return Err(SaveError::NoSpace {
                tier: cfg.tier,
                size: need,
                quota: cache.quota(cfg.tier),
            }
            .into());
        }
        // Untimed: a fresh payload (the RAM tier takes ownership of it) and
        // distinct tokens, hence a distinct key.
        let mut payload = base.clone();
        stamp(&mut payload, i as u64);
        let first = (i * BENCH_TOKENS) as u32;
        let tokens: Arc<[u32]> = (first..first + BENCH_TOKENS as u32).collect();
        let request = SaveRequest {
            identity: Arc::clone(&identity),
            tier: cfg.tier,
            tokens,
            payload,
            logits_count: 0,
            reason: SaveReason::Unknown,
            prompt_text: String::new(),
            detail: None,
        };
        let key = request.key();

        let t = Instant::now();
        let outcome = cache.begin_save(request)?.run()?;
        save_total += t.elapsed();
        row_bytes = outcome.size;

        let t = Instant::now();
        let claim = match cache.lookup(&key) {
            Lookup::Hit(claim) => claim,
            Lookup::Miss | Lookup::Busy => return Err(MicrobenchError::Lost(key)),
        };
        let loaded = claim.load();
        let payload = match loaded {
            Ok(p) => p,
            Err(e) => {
                drop(claim);
                return Err(e.into());
            }
        };
        sink = sink.wrapping_add(touch_pages(&payload));
        zero_copy &= payload.is_shared();
        drop(payload);
        load_total += t.elapsed();

        remove_own_row(cache, claim)?;
    }
    black_box(sink);
    let n = cfg.iterations as f64;
    let (save_us, load_us) = (us(save_total) / n, us(load_total) / n);
    Ok(MicrobenchReport {
        tier: cfg.tier,
        payload_bytes: cfg.payload_bytes,
        row_bytes,
        iterations: cfg.iterations,
        save_us,
        load_us,
        save_mb_s: mb_s(cfg.payload_bytes, save_us),
        load_mb_s: mb_s(cfg.payload_bytes, load_us),
        load_zero_copy: zero_copy,
    })
}

/// What [`raw_baseline`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaselineKind {
    /// `memcpy` into a pre-faulted buffer (stands for both directions).
    Memcpy,
    /// Plain file `write` + `fsync` of a new file, and plain `read`.
    File,
}

/// Averages measured by [`raw_baseline`], payload MB/s (10⁶ bytes/s).
#[derive(Clone, Debug, PartialEq)]
pub struct RawBaseline {
    /// What was measured.
    pub kind: BaselineKind,
    /// Bytes per operation.
    pub payload_bytes: usize,
    /// Operations averaged.
    pub iterations: usize,
    /// Average write time (memcpy, or create + write + fsync) in µs.
    pub write_us: f64,
    /// Average read time (memcpy, or open + read + page touches) in µs.
    pub read_us: f64,
    /// MB/s of a write.
    pub write_mb_s: f64,
    /// MB/s of a read.
    pub read_mb_s: f64,
}

impl fmt::Display for RawBaseline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            BaselineKind::Memcpy => "memcpy",
            BaselineKind::File => "file",
        };
        write!(
            f,
            "{what:<8} {size:>10} B x{n:<4} write {wu:>9.1} us {wm:>9.1} MB/s | read {ru:>10.1} us {rm:>9.1} MB/s",
            size = self.payload_bytes,
            n = self.iterations,
            wu = self.write_us,
            wm = self.write_mb_s,
            ru = self.read_us,
            rm = self.read_mb_s,
        )
    }
}

/// Creates `path` (exclusive, 0o600), writes `bytes` and syncs it: the
/// plain-file equivalent of staging a row.
///
/// # Errors
///
/// Any error of create, write or sync.
pub fn raw_write_fsync(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Reads `path` whole into a buffer of its `fstat` size and touches its
/// pages ([`touch_pages`]): the plain-file equivalent of a load. Returns
/// the touch sum.
///
/// # Errors
///
/// Any error of open, stat or read.
pub fn raw_read(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    let mut buf = Vec::with_capacity(len);
    file.read_to_end(&mut buf)?;
    Ok(touch_pages(&buf))
}

/// Measures the raw cost of moving `payload_bytes` bytes, `iterations`
/// times: with `dir` = `None`, `memcpy` into a pre-faulted buffer (the RAM
/// tier's baseline; write and read are the same copy); with a directory,
/// [`raw_write_fsync`] of a new file there and [`raw_read`] of it (the file
/// tiers' baseline — pass the tier's directory so the same file system is
/// measured). Files are removed afterwards (untimed).
///
/// # Errors
///
/// Any I/O error of the file baseline.
pub fn raw_baseline(
    dir: Option<&Path>,
    payload_bytes: usize,
    iterations: usize,
) -> io::Result<RawBaseline> {
    let iterations = iterations.max(1);
    let base = fill_payload(payload_bytes, 0x5EED);
    let (kind, write_total, read_total) = match dir {
        None => {
            let mut dst = vec![1u8; payload_bytes];
            let mut total = Duration::ZERO;
            for i in 0..iterations {
                let t = Instant::now();
                dst.copy_from_slice(black_box(&base));
                black_box(&mut dst);
                total += t.elapsed();
                black_box(dst.get(i % payload_bytes.max(1)));
            }
            (BaselineKind::Memcpy, total, total)
        }
        Some(dir) => {
            let (mut w, mut r) = (Duration::ZERO, Duration::ZERO);
            let mut sink = 0u64;
            for i in 0..iterations {
                let mut payload = base.clone();
                stamp(&mut payload, i as u64);
                let path = raw_path(dir);
                let t = Instant::now();
                let written = raw_write_fsync(&path, &payload);
                w += t.elapsed();
                if let Err(e) = written {
                    let _ = fs::remove_file(&path);
                    return Err(e);
                }
                let t = Instant::now();
                let read = raw_read(&path);
                r += t.elapsed();
                let _ = fs::remove_file(&path);
                sink = sink.wrapping_add(read?);
            }
            black_box(sink);
            (BaselineKind::File, w, r)
        }
    };
    let n = iterations as f64;
    let (write_us, read_us) = (us(write_total) / n, us(read_total) / n);
    Ok(RawBaseline {
        kind,
        payload_bytes,
        iterations,
        write_us,
        read_us,
        write_mb_s: mb_s(payload_bytes, write_us),
        read_mb_s: mb_s(payload_bytes, read_us),
    })
}

/// A fresh file name in `dir` that no tier scan would mistake for a row.
fn raw_path(dir: &Path) -> PathBuf {
    dir.join(format!("raw-baseline.{}.bin", unique_stamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{CacheConfig, FileTierConfig};

    fn open(root: &Path) -> Cache {
        Cache::open(CacheConfig {
            ram_quota: 8 << 20,
            ram_file: Some(FileTierConfig::new(root.join("shm"), 8 << 20)),
            disk: Some(FileTierConfig::new(root.join("disk"), 8 << 20)),
            ..CacheConfig::default()
        })
        .expect("open cache")
    }

    fn sane(r: &MicrobenchReport, payload: usize, n: usize) {
        assert_eq!(r.payload_bytes, payload);
        assert_eq!(r.iterations, n);
        assert!(r.row_bytes > payload as u64, "{r}");
        assert!(r.save_us > 0.0 && r.save_us.is_finite(), "{r}");
        assert!(r.load_us > 0.0 && r.load_us.is_finite(), "{r}");
        assert!(r.save_mb_s > 0.0 && r.load_mb_s > 0.0, "{r}");
        assert!(!r.to_string().is_empty());
    }

    #[test]
    fn every_tier_reports_and_leaves_the_cache_as_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = open(dir.path());
        // A row of someone else's, which must survive untouched.
        let keep = SaveRequest {
            identity: bench_identity(),
            tier: TierKind::Disk,
            tokens: vec![1, 2, 3].into(),
            payload: vec![7; 1000],
            logits_count: 0,
            reason: SaveReason::Finish,
            prompt_text: String::new(),
            detail: None,
        };
        let keep_key = keep.key();
        cache.save(keep).expect("save");
        let before = cache.dump();
        let counters = cache.counters().snapshot();
        for tier in TierKind::ALL {
            let r =
                microbench(&cache, &MicrobenchConfig::new(tier, 100_000, 3)).expect("microbench");
            sane(&r, 100_000, 3);
            assert_eq!(r.load_zero_copy, tier == TierKind::Ram, "{r}");
            assert_eq!(cache.bytes(tier), before_bytes(&before, tier));
        }
        assert_eq!(cache.dump(), before);
        assert_eq!(cache.len(), 1);
        assert!(cache.peek(&keep_key).is_some());
        let after = cache.counters().snapshot();
        for (name, value) in &counters {
            if *name != "load_total_ns" {
                assert_eq!(after[name], *value, "counter {name}");
            }
        }
        // No file of the benchmark is left in either tier directory.
        for tier in [TierKind::RamFile, TierKind::Disk] {
            let files = fs::read_dir(cache.tier_dir(tier).expect("dir"))
                .expect("list")
                .count();
            assert_eq!(files, usize::from(tier == TierKind::Disk), "{tier}");
        }
    }

    fn before_bytes(rows: &[crate::meta::RowInfo], tier: TierKind) -> u64 {
        rows.iter().filter(|r| r.tier == tier).map(|r| r.size).sum()
    }

    #[test]
    fn refuses_rows_that_would_evict_and_zero_iterations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = open(dir.path());
        let err = microbench(&cache, &MicrobenchConfig::new(TierKind::Ram, 9 << 20, 1))
            .expect_err("too big");
        assert!(
            matches!(err, MicrobenchError::Save(SaveError::NoSpace { .. })),
            "{err}"
        );
        assert!(matches!(
            microbench(&cache, &MicrobenchConfig::new(TierKind::Ram, 10, 0)),
            Err(MicrobenchError::NoIterations)
        ));
        assert!(cache.is_empty());
    }

    #[test]
    fn raw_baselines_measure_something() {
        let mem = raw_baseline(None, 1 << 20, 3).expect("memcpy");
        assert_eq!(mem.kind, BaselineKind::Memcpy);
        assert!(mem.write_mb_s > 0.0 && mem.read_mb_s > 0.0, "{mem}");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = raw_baseline(Some(dir.path()), 1 << 20, 2).expect("file");
        assert_eq!(file.kind, BaselineKind::File);
        assert!(file.write_us > 0.0 && file.read_us > 0.0, "{file}");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn touch_pages_reads_one_byte_per_page() {
        let mut bytes = vec![0u8; 3 * 4096 + 1];
        bytes[0] = 1;
        bytes[4096] = 2;
        bytes[8192] = 3;
        bytes[12288] = 4; // the last byte, also its page's first
        assert_eq!(touch_pages(&bytes), 1 + 2 + 3 + 4 + 4);
        assert_eq!(touch_pages(&[]), 0);
    }
}
