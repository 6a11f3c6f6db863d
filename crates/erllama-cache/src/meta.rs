//! The meta index and its sole writer (docs/tiers.md), and [`Cache`], the
//! one handle over index, tiers, counters and writer pool.
//!
//! Reads on the hot path ([`Cache::peek`], the probes of
//! [`Cache::longest_prefix`]) go to a lock-free concurrent map of
//! `Arc<Row>`; a row's mutable fields are atomics. Every mutation —
//! claim, release, reserve, check, publish, cancel, evict, sweep — runs
//! under the one writer lock, which is what makes "two reservations for one
//! key can never race" and "a pinned row is never evicted" hold: a mutation
//! decides on a consistent view and no other mutation can interleave.
//!
//! Decisions the spec leaves open:
//!
//! - **One row per key across tiers.** At startup a key found in several
//!   file tiers is registered in the fastest and deleted from the others
//!   (they could never be reached).
//! - **LRU after a restart.** Rows registered from files get LRU ranks
//!   from their persisted hit count (then their file times), all older
//!   than anything used in this process: the most-hit file is evicted last.
//! - **Quota accounting.** A tier's quota bounds published bytes plus the
//!   bytes reserved by saves in flight, so concurrent saves can never
//!   overshoot it together. File deletions happen under the writer lock,
//!   so a freed key cannot be re-linked before its old file is gone.

use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::counters::{Counter, Counters};
use crate::fsio::DirError;
use crate::key::{CacheKey, KeyHasher};
use crate::kvc::SaveReason;
use crate::policy::{longest_prefix_probes, PolicyConfig};
use crate::semaphore::{PoolError, WriterPool};
use crate::tier::{
    DiskTier, FileLoad, LoadError, Payload, RamFileTier, RamTier, Recovered, Tier, TierError,
    TierKind,
};

/// Default reservation TTL (docs/tiers.md).
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(60);

/// A file tier's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileTierConfig {
    /// The directory: created (0700) when missing, made private to the
    /// user (group and other permissions removed) at open, when the cache
    /// also proves it can write there.
    pub dir: PathBuf,
    /// Byte quota of the tier.
    pub quota: u64,
    /// How files are read back.
    pub load: FileLoad,
}

impl FileTierConfig {
    /// A tier over `dir` with `quota` bytes and the default read mode.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, quota: u64) -> Self {
        Self {
            dir: dir.into(),
            quota,
            load: FileLoad::default(),
        }
    }
}

/// Settings of a [`Cache`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Byte quota of the `ram` tier (always on; 0 stores nothing).
    pub ram_quota: u64,
    /// The `ram_file` tier, if any.
    pub ram_file: Option<FileTierConfig>,
    /// The `disk` tier, if any.
    pub disk: Option<FileTierConfig>,
    /// Concurrent saves allowed (the writer pool's limit).
    pub writer_limit: usize,
    /// How long [`Cache::begin_save`] waits for a writer-pool slot before
    /// dropping the save (`saves_dropped`); zero means do not wait.
    pub writer_acquire_timeout: Duration,
    /// Reservation TTL, refreshed by check and publish.
    pub reservation_ttl: Duration,
    /// This writer's name in temp file names (no `/`).
    pub writer_name: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ram_quota: 1 << 30,
            ram_file: None,
            disk: None,
            writer_limit: WriterPool::default_limit(),
            writer_acquire_timeout: Duration::ZERO,
            reservation_ttl: DEFAULT_RESERVATION_TTL,
            writer_name: format!("w{}", std::process::id()),
        }
    }
}

/// Why a [`Cache`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A setting is invalid.
    #[error("invalid cache config: {0}")]
    InvalidConfig(String),
    /// A file tier's directory cannot hold the tier: it is not a
    /// directory, cannot be created, is a shared sticky directory (`/tmp`),
    /// cannot be made private (chmod), or a probe file cannot be created,
    /// written, synced and removed in it (a read-only directory, a path
    /// under `/proc` or `/sys`, a full disk).
    #[error("tier {tier}: directory {} cannot hold the tier: {reason}", dir.display())]
    UnusableDir {
        /// Which tier.
        tier: TierKind,
        /// The configured directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        reason: DirError,
    },
    /// A file tier could not be started (its directory could not be
    /// listed, or a file in it could not be removed).
    #[error("starting tier {tier}: {source}")]
    Tier {
        /// Which tier.
        tier: TierKind,
        /// Why.
        #[source]
        source: TierError,
    },
}

/// A row's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStatus {
    /// Published; can be claimed.
    Available,
    /// Reserved by a save in flight.
    Writing,
    /// Being removed.
    Evicting,
}

impl RowStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => RowStatus::Available,
            1 => RowStatus::Writing,
            _ => RowStatus::Evicting,
        }
    }

    /// `"available"`, `"writing"` or `"evicting"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            RowStatus::Available => "available",
            RowStatus::Writing => "writing",
            RowStatus::Evicting => "evicting",
        }
    }
}

/// One index row. Immutable fields are set at reserve or registration;
/// the atomics are written only under the writer lock and read anywhere.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) key: CacheKey,
    pub(crate) tier: TierKind,
    pub(crate) tokens: Arc<[u32]>,
    pub(crate) save_reason: SaveReason,
    pub(crate) context_size: u32,
    pub(crate) created_unix: u64,
    status: AtomicU8,
    size: AtomicU64,
    refcount: AtomicU32,
    hits: AtomicU32,
    last_used: AtomicU64,
}

impl Row {
    pub(crate) fn status(&self) -> RowStatus {
        RowStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    fn set_status(&self, status: RowStatus) {
        self.status.store(status as u8, Ordering::Release);
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn info(&self) -> RowInfo {
        RowInfo {
            key: self.key,
            tier: self.tier,
            status: self.status(),
            size: self.size(),
            refcount: self.refcount.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            last_used: self.last_used.load(Ordering::Relaxed),
            token_count: self.tokens.len(),
            save_reason: self.save_reason,
            context_size: self.context_size,
            created_unix: self.created_unix,
        }
    }
}

/// Eviction order: the least recently used row is the heap's maximum.
struct Victim(Arc<Row>);

impl Victim {
    fn rank(&self) -> u64 {
        self.0.last_used.load(Ordering::Relaxed)
    }
}

impl PartialEq for Victim {
    fn eq(&self, other: &Self) -> bool {
        self.rank() == other.rank()
    }
}

impl Eq for Victim {}

impl PartialOrd for Victim {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Victim {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.rank().cmp(&self.rank())
    }
}

/// A snapshot of one row, from [`Cache::dump`] or [`Cache::peek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowInfo {
    /// The key.
    pub key: CacheKey,
    /// Where the row lives.
    pub tier: TierKind,
    /// Its state.
    pub status: RowStatus,
    /// Bytes held (header + payload; reserved bytes while writing).
    pub size: u64,
    /// Live claims.
    pub refcount: u32,
    /// Hits (persisted in files).
    pub hits: u32,
    /// LRU rank: higher is more recent.
    pub last_used: u64,
    /// Number of cached tokens.
    pub token_count: usize,
    /// Why it was saved.
    pub save_reason: SaveReason,
    /// The context size it was saved from.
    pub context_size: u32,
    /// Creation time (unix seconds).
    pub created_unix: u64,
}

/// A live reservation (docs/tiers.md).
#[derive(Debug)]
pub(crate) struct Reservation {
    pub(crate) token: u64,
    pub(crate) tier: TierKind,
    pub(crate) size: u64,
    pub(crate) deadline: Instant,
}

/// State only the writer touches.
#[derive(Debug, Default)]
pub(crate) struct WriterState {
    /// Published (and evicting) bytes per tier.
    pub(crate) used: [u64; 3],
    /// Bytes reserved by saves in flight per tier.
    pub(crate) reserved: [u64; 3],
    pub(crate) reservations: HashMap<CacheKey, Reservation>,
    pub(crate) next_token: u64,
}

pub(crate) struct Inner {
    pub(crate) rows: papaya::HashMap<CacheKey, Arc<Row>>,
    pub(crate) writer: Mutex<WriterState>,
    /// Signalled on every publish and cancel (exact-or-wait sleeps on it).
    pub(crate) published: Condvar,
    pub(crate) tiers: [Option<Box<dyn Tier>>; 3],
    pub(crate) quotas: [u64; 3],
    pub(crate) counters: Arc<Counters>,
    pub(crate) pool: WriterPool,
    pub(crate) tick: AtomicU64,
    pub(crate) config: CacheConfig,
}

/// The cache: meta index, tiers, counters and writer pool. Cheap to clone
/// (a shared handle); every method takes `&self` and is thread-safe.
#[derive(Clone)]
pub struct Cache {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("rows", &self.inner.rows.pin().len())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// What an exact lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The row is claimed (pinned) until the [`Claim`] is dropped.
    Hit(Claim),
    /// No row under the key.
    Miss,
    /// A row exists but is being written or evicted.
    Busy,
}

/// What [`Cache::longest_prefix`] found.
#[derive(Debug)]
pub enum PrefixLookup {
    /// The longest cached prefix, claimed; `len` tokens long.
    Hit {
        /// The claimed row.
        claim: Claim,
        /// Its length in tokens.
        len: usize,
        /// Probes made.
        probes: usize,
    },
    /// No probed prefix is cached.
    Miss {
        /// Probes made.
        probes: usize,
    },
}

/// Why a claim failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No row under the key.
    #[error("no row under the key")]
    NotFound,
    /// The row is being written or evicted.
    #[error("the row is busy (being written or evicted)")]
    Busy,
}

/// A pin on an available row: it cannot be evicted while the claim lives.
/// Dropping the claim releases it (so a holder that dies releases too);
/// [`Claim::release`] does the same explicitly.
pub struct Claim {
    cache: Cache,
    row: Arc<Row>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.row.key)
            .field("tier", &self.row.tier)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// The row's key.
    #[must_use]
    pub fn key(&self) -> &CacheKey {
        &self.row.key
    }

    /// The tier the row lives in.
    #[must_use]
    pub fn tier(&self) -> TierKind {
        self.row.tier
    }

    /// The cached tokens.
    #[must_use]
    pub fn tokens(&self) -> &[u32] {
        &self.row.tokens
    }

    /// Bytes held by the row.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.row.size()
    }

    /// The row's hit count, this claim included.
    #[must_use]
    pub fn hits(&self) -> u32 {
        self.row.hits.load(Ordering::Relaxed)
    }

    /// Reads the payload (full parse for files; time goes to
    /// `load_total_ns`). A corrupt file is deleted, its row removed and
    /// `corrupt_files` counted; a row whose bytes vanished is removed.
    ///
    /// # Errors
    ///
    /// [`LoadError`]; callers treat every error as a miss.
    pub fn load(&self) -> Result<Payload, LoadError> {
        self.cache.load_row(&self.row)
    }

    /// Releases the pin (same as dropping the claim).
    pub fn release(self) {}

    /// Removes the row (and its file) because its bytes, though intact,
    /// could not be restored: a row that fails a restore is never tried
    /// again. The caller counts it (`restore_failures`).
    pub fn invalidate(self) {
        self.cache.drop_row(&self.row);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // No writer lock needed: a release can only make a row evictable,
        // and eviction decides under the lock on what it sees then; claims
        // (which must not race an eviction) still take the lock.
        // Saturating: a release is idempotent even if accounting were off.
        let _ = self
            .row
            .refcount
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

/// The live-byte gauge of a tier.
pub(crate) const fn bytes_counter(tier: TierKind) -> Counter {
    match tier {
        TierKind::Ram => Counter::BytesRam,
        TierKind::RamFile => Counter::BytesRamFile,
        TierKind::Disk => Counter::BytesDisk,
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Cache {
    /// Opens a cache: starts the tiers (file tiers scan their directories
    /// per docs/tiers.md, deleting temp and invalid files, which count as
    /// `corrupt_files` when they were KVC files) and registers what they
    /// hold.
    ///
    /// # Errors
    ///
    /// [`OpenError::InvalidConfig`] for a zero writer limit or TTL, or a
    /// writer name with `/`; [`OpenError::UnusableDir`] when a file tier's
    /// directory cannot be created, made private or written (probe file);
    /// [`OpenError::Tier`] when it cannot be listed or cleaned.
    pub fn open(config: CacheConfig) -> Result<Self, OpenError> {
        Self::open_with_counters(config, Arc::new(Counters::new()))
    }

    /// [`Cache::open`] sharing an existing [`Counters`].
    ///
    /// # Errors
    ///
    /// As [`Cache::open`].
    pub fn open_with_counters(
        config: CacheConfig,
        counters: Arc<Counters>,
    ) -> Result<Self, OpenError> {
        if config.writer_name.is_empty() || config.writer_name.contains(['/', '\0']) {
            return Err(OpenError::InvalidConfig(format!(
                "writer_name {:?} must be non-empty without '/'",
                config.writer_name
            )));
        }
        if config.reservation_ttl.is_zero() {
            return Err(OpenError::InvalidConfig(
                "reservation_ttl must be positive".into(),
            ));
        }
        let pool = WriterPool::new(config.writer_limit)
            .map_err(|e| OpenError::InvalidConfig(e.to_string()))?;
        let ram: Box<dyn Tier> = Box::new(RamTier::new());
        let ram_file = config.ram_file.as_ref().map(|c| {
            Box::new(RamFileTier::new(&c.dir, &config.writer_name, c.load)) as Box<dyn Tier>
        });
        let disk = config
            .disk
            .as_ref()
            .map(|c| Box::new(DiskTier::new(&c.dir, &config.writer_name, c.load)) as Box<dyn Tier>);
        if let (Some(a), Some(b)) = (&config.ram_file, &config.disk) {
            if a.dir == b.dir {
                return Err(OpenError::InvalidConfig(
                    "ram_file and disk must use different directories".into(),
                ));
            }
        }
        let quotas = [
            config.ram_quota,
            config.ram_file.as_ref().map_or(0, |c| c.quota),
            config.disk.as_ref().map_or(0, |c| c.quota),
        ];
        let cache = Cache {
            inner: Arc::new(Inner {
                rows: papaya::HashMap::new(),
                writer: Mutex::new(WriterState::default()),
                published: Condvar::new(),
                tiers: [Some(ram), ram_file, disk],
                quotas,
                counters,
                pool,
                tick: AtomicU64::new(1),
                config,
            }),
        };
        cache.recover()?;
        Ok(cache)
    }

    fn recover(&self) -> Result<(), OpenError> {
        let mut st = self.lock();
        let mut found: Vec<(TierKind, Recovered)> = Vec::new();
        for tier in TierKind::ALL {
            let Some(t) = self.tier(tier) else { continue };
            let (rows, removed) = t.recover().map_err(|source| match source {
                TierError::Dir { dir, source } => OpenError::UnusableDir {
                    tier,
                    dir,
                    reason: source,
                },
                source => OpenError::Tier { tier, source },
            })?;
            self.inner
                .counters
                .add(Counter::CorruptFiles, removed as u64);
            found.extend(rows.into_iter().map(|r| (tier, r)));
        }
        // LRU ranks: fewest hits (then oldest) first, so the most-hit rows
        // are evicted last after a restart.
        found.sort_by_key(|(_, r)| {
            (
                r.meta.hit_count,
                r.meta.last_used_time.max(r.meta.creation_time),
            )
        });
        // Fastest tier wins a duplicated key; the slower copies go.
        let mut owner: HashMap<CacheKey, TierKind> = HashMap::new();
        for (tier, r) in &found {
            owner
                .entry(r.key)
                .and_modify(|t| *t = (*t).min(*tier))
                .or_insert(*tier);
        }
        let rows = self.inner.rows.pin();
        for (tier, r) in found {
            if owner.get(&r.key) != Some(&tier) {
                if let Some(t) = self.tier(tier) {
                    let _ = t.remove(&r.key);
                }
                continue;
            }
            let row = Arc::new(Row {
                key: r.key,
                tier,
                tokens: r.meta.tokens.into(),
                save_reason: r.meta.save_reason,
                context_size: r.meta.context_size,
                created_unix: r.meta.creation_time,
                status: AtomicU8::new(RowStatus::Available as u8),
                size: AtomicU64::new(r.size),
                refcount: AtomicU32::new(0),
                hits: AtomicU32::new(r.meta.hit_count),
                last_used: AtomicU64::new(self.next_tick()),
            });
            rows.insert(r.key, row);
            st.used[tier.index()] += r.size;
            self.inner.counters.add(bytes_counter(tier), r.size);
        }
        drop(rows);
        // A quota lowered since the files were written: trim LRU-first.
        for tier in TierKind::ALL {
            let over = st.used[tier.index()].saturating_sub(self.quota(tier));
            if over > 0 {
                self.evict_locked(&mut st, over, &[tier]);
            }
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, WriterState> {
        // A panic while holding the lock cannot leave the state half-made
        // in a way later calls trip over (every mutation is a few field
        // updates), so poisoning is ignored.
        self.inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn next_tick(&self) -> u64 {
        self.inner.tick.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn tier(&self, tier: TierKind) -> Option<&dyn Tier> {
        self.inner.tiers[tier.index()].as_deref()
    }

    /// Whether `tier` is configured (`ram` always is).
    #[must_use]
    pub fn has_tier(&self, tier: TierKind) -> bool {
        self.tier(tier).is_some()
    }

    /// The byte quota of `tier` (0 when not configured).
    #[must_use]
    pub fn quota(&self, tier: TierKind) -> u64 {
        self.inner.quotas[tier.index()]
    }

    /// The directory of a file tier.
    #[must_use]
    pub fn tier_dir(&self, tier: TierKind) -> Option<PathBuf> {
        self.tier(tier).and_then(|t| t.dir().map(PathBuf::from))
    }

    /// The counters (shared).
    #[must_use]
    pub fn counters(&self) -> &Arc<Counters> {
        &self.inner.counters
    }

    /// The writer pool bounding concurrent saves.
    #[must_use]
    pub fn writer_pool(&self) -> &WriterPool {
        &self.inner.pool
    }

    /// The settings the cache was opened with.
    #[must_use]
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Published bytes held by `tier` now (equals the tier's gauge).
    #[must_use]
    pub fn bytes(&self, tier: TierKind) -> u64 {
        self.lock().used[tier.index()]
    }

    /// Bytes reserved by saves in flight in `tier`.
    #[must_use]
    pub fn reserved_bytes(&self, tier: TierKind) -> u64 {
        self.lock().reserved[tier.index()]
    }

    /// Number of rows (any status).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.rows.pin().len()
    }

    /// Whether the index holds no row.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lock-free exact lookup without claiming: a snapshot of the row.
    #[must_use]
    pub fn peek(&self, key: &CacheKey) -> Option<RowInfo> {
        self.inner.rows.pin().get(key).map(|row| row.info())
    }

    /// Lock-free: whether an available row exists under `key`.
    #[must_use]
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.inner
            .rows
            .pin()
            .get(key)
            .is_some_and(|row| row.status() == RowStatus::Available)
    }

    /// Claims the row under `key`: pins it, bumps its hits (persisted at
    /// offset 12 for file rows) and marks it most recently used.
    ///
    /// # Errors
    ///
    /// [`ClaimError::NotFound`], or [`ClaimError::Busy`] for a row being
    /// written or evicted.
    pub fn claim(&self, key: &CacheKey) -> Result<Claim, ClaimError> {
        let row = self
            .inner
            .rows
            .pin()
            .get(key)
            .cloned()
            .ok_or(ClaimError::NotFound)?;
        self.claim_row(row)
    }

    fn claim_row(&self, row: Arc<Row>) -> Result<Claim, ClaimError> {
        let hits = {
            let _writer = self.lock();
            // Re-check under the lock: the row may have been removed or
            // changed state since the lock-free read.
            let current = self.inner.rows.pin().get(&row.key).cloned();
            match current {
                Some(ref r) if Arc::ptr_eq(r, &row) => {}
                Some(_) => return Err(ClaimError::Busy),
                None => return Err(ClaimError::NotFound),
            }
            if row.status() != RowStatus::Available {
                return Err(ClaimError::Busy);
            }
            row.refcount.fetch_add(1, Ordering::AcqRel);
            row.last_used.store(self.next_tick(), Ordering::Relaxed);
            row.hits.fetch_add(1, Ordering::Relaxed).saturating_add(1)
        };
        if let Some(t) = self.tier(row.tier) {
            t.record_hits(&row.key, hits);
        }
        Ok(Claim {
            cache: self.clone(),
            row,
        })
    }

    /// Exact lookup: claims the row if it is available.
    #[must_use]
    pub fn lookup(&self, key: &CacheKey) -> Lookup {
        match self.claim(key) {
            Ok(claim) => Lookup::Hit(claim),
            Err(ClaimError::NotFound) => Lookup::Miss,
            Err(ClaimError::Busy) => Lookup::Busy,
        }
    }

    /// Exact-or-wait: like [`Cache::lookup`], but a row being written is
    /// waited for until it publishes (woken at once) or `timeout` passes.
    /// A row that is absent, or still busy at the deadline, is a miss or
    /// busy respectively.
    #[must_use]
    pub fn lookup_wait(&self, key: &CacheKey, timeout: Duration) -> Lookup {
        let deadline = Instant::now() + timeout;
        loop {
            match self.claim(key) {
                Ok(claim) => return Lookup::Hit(claim),
                Err(ClaimError::NotFound) => return Lookup::Miss,
                Err(ClaimError::Busy) => {}
            }
            let mut st = self.lock();
            loop {
                let writing = self
                    .inner
                    .rows
                    .pin()
                    .get(key)
                    .map(|r| r.status() == RowStatus::Writing);
                match writing {
                    None => return Lookup::Miss,
                    Some(false) => break,
                    Some(true) => {}
                }
                let now = Instant::now();
                if now >= deadline {
                    return Lookup::Busy;
                }
                st = self
                    .inner
                    .published
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(st);
            // Available (or evicting) now: try the claim once more.
            if Instant::now() >= deadline {
                return match self.claim(key) {
                    Ok(claim) => Lookup::Hit(claim),
                    Err(ClaimError::NotFound) => Lookup::Miss,
                    Err(ClaimError::Busy) => Lookup::Busy,
                };
            }
        }
    }

    /// Longest-prefix lookup (docs/policy.md): probes the prefixes of `tokens`
    /// at multiples of `policy.boundary_align_tokens`, longest first, down
    /// to `max(min_tokens, stride)`; the first available row whose tokens
    /// are exactly that prefix is claimed. `base` is a hasher holding the
    /// key's fixed part (fingerprint, quant byte, ctx hash). Probes and
    /// time go to `longest_prefix_probes` and `longest_prefix_ns`.
    #[must_use]
    pub fn longest_prefix(
        &self,
        base: &KeyHasher,
        tokens: &[u32],
        policy: &PolicyConfig,
    ) -> PrefixLookup {
        let _timer = self.inner.counters.time(Counter::LongestPrefixNs);
        let lengths: Vec<usize> = longest_prefix_probes(tokens.len(), policy).collect();
        let keys = base
            .prefix_keys(tokens, &lengths)
            .expect("probe lengths never exceed the token count");
        let mut probes = 0;
        let rows = self.inner.rows.pin();
        for (len, key) in lengths.into_iter().zip(keys) {
            probes += 1;
            self.inner.counters.incr(Counter::LongestPrefixProbes);
            let Some(row) = rows.get(&key) else { continue };
            if row.status() != RowStatus::Available || row.tokens[..] != tokens[..len] {
                continue;
            }
            if let Ok(claim) = self.claim_row(Arc::clone(row)) {
                return PrefixLookup::Hit { claim, len, probes };
            }
        }
        PrefixLookup::Miss { probes }
    }

    fn load_row(&self, row: &Arc<Row>) -> Result<Payload, LoadError> {
        let _timer = self.inner.counters.time(Counter::LoadTotalNs);
        let tier = self
            .tier(row.tier)
            .expect("a row's tier is configured for the cache's lifetime");
        let result = tier.load(&row.key, row.size());
        match &result {
            Ok(_) | Err(LoadError::Io { .. }) => {}
            Err(LoadError::Corrupt { .. }) => {
                self.inner.counters.incr(Counter::CorruptFiles);
                self.drop_row(row);
            }
            Err(LoadError::Missing { .. }) => self.drop_row(row),
        }
        result
    }

    /// Removes a row whose bytes are bad or gone, whoever holds it.
    fn drop_row(&self, row: &Arc<Row>) {
        let mut st = self.lock();
        let rows = self.inner.rows.pin();
        if !rows.get(&row.key).is_some_and(|r| Arc::ptr_eq(r, row)) {
            return; // Already removed (another reader saw it too).
        }
        row.set_status(RowStatus::Evicting);
        if let Some(t) = self.tier(row.tier) {
            let _ = t.remove(&row.key);
        }
        rows.remove(&row.key);
        self.account_removed(&mut st, row);
    }

    fn account_removed(&self, st: &mut WriterState, row: &Row) {
        let size = row.size();
        let used = &mut st.used[row.tier.index()];
        *used = used.saturating_sub(size);
        self.inner.counters.sub(bytes_counter(row.tier), size);
    }

    /// Evicts unpinned available rows of `tiers`, least recently used
    /// first, until at least `want` bytes are freed (or none is left).
    /// Returns (rows, bytes) evicted.
    pub(crate) fn evict_locked(
        &self,
        st: &mut WriterState,
        want: u64,
        tiers: &[TierKind],
    ) -> (usize, u64) {
        // A heap (O(n) to build, O(log n) per victim) rather than a full
        // sort: most evictions take a few rows of many.
        let mut victims: BinaryHeap<Victim> = self
            .inner
            .rows
            .pin()
            .values()
            .filter(|r| tiers.contains(&r.tier) && Self::evictable(r))
            .map(|r| Victim(Arc::clone(r)))
            .collect();
        let (mut count, mut freed) = (0, 0);
        while let Some(Victim(row)) = victims.pop() {
            if freed >= want {
                break;
            }
            if self.remove_locked(st, &row) {
                count += 1;
                freed += row.size();
            }
        }
        (count, freed)
    }

    fn evictable(row: &Row) -> bool {
        row.status() == RowStatus::Available && row.refcount.load(Ordering::Acquire) == 0
    }

    /// Evicts one row under the writer lock; false (row kept) when its
    /// bytes could not be removed.
    fn remove_locked(&self, st: &mut WriterState, row: &Arc<Row>) -> bool {
        row.set_status(RowStatus::Evicting);
        let removed = self.tier(row.tier).map_or(Ok(()), |t| t.remove(&row.key));
        if removed.is_err() {
            row.set_status(RowStatus::Available);
            return false;
        }
        self.inner.rows.pin().remove(&row.key);
        self.account_removed(st, row);
        self.inner.counters.incr(Counter::Evictions);
        true
    }

    /// Evicts every unpinned available row; returns how many.
    pub fn gc(&self) -> usize {
        let mut st = self.lock();
        self.evict_locked(&mut st, u64::MAX, &TierKind::ALL).0
    }

    /// Evicts least-recently-used unpinned rows of `tiers` until at least
    /// `n` bytes are freed; returns (rows, bytes) evicted. Pinned and
    /// being-written rows are never evicted.
    pub fn evict_bytes(&self, n: u64, tiers: &[TierKind]) -> (usize, u64) {
        let mut st = self.lock();
        self.evict_locked(&mut st, n, tiers)
    }

    /// Every row, least recently used first.
    #[must_use]
    pub fn dump(&self) -> Vec<RowInfo> {
        let mut rows: Vec<RowInfo> = self.inner.rows.pin().values().map(|r| r.info()).collect();
        rows.sort_by_key(|r| r.last_used);
        rows
    }

    /// Makes room for `size` more bytes in `tier` by evicting LRU rows, if
    /// that can succeed; false (nothing evicted) if it cannot.
    pub(crate) fn make_room_locked(&self, st: &mut WriterState, tier: TierKind, size: u64) -> bool {
        let quota = self.quota(tier);
        let i = tier.index();
        let committed = st.used[i] + st.reserved[i];
        if committed.saturating_add(size) <= quota {
            return true;
        }
        if size > quota {
            return false;
        }
        let need = committed + size - quota;
        let evictable: u64 = self
            .inner
            .rows
            .pin()
            .values()
            .filter(|r| r.tier == tier && Self::evictable(r))
            .map(|r| r.size())
            .sum();
        if evictable < need {
            return false;
        }
        self.evict_locked(st, need, &[tier]);
        st.used[i] + st.reserved[i] + size <= quota
    }

    pub(crate) fn insert_row_locked(&self, row: Row) {
        self.inner.rows.pin().insert(row.key, Arc::new(row));
    }

    pub(crate) fn new_writing_row(
        &self,
        key: CacheKey,
        tier: TierKind,
        tokens: Arc<[u32]>,
        save_reason: SaveReason,
        context_size: u32,
        size: u64,
    ) -> Row {
        Row {
            key,
            tier,
            tokens,
            save_reason,
            context_size,
            created_unix: unix_now(),
            status: AtomicU8::new(RowStatus::Writing as u8),
            size: AtomicU64::new(size),
            refcount: AtomicU32::new(0),
            hits: AtomicU32::new(0),
            last_used: AtomicU64::new(self.next_tick()),
        }
    }

    pub(crate) fn row(&self, key: &CacheKey) -> Option<Arc<Row>> {
        self.inner.rows.pin().get(key).cloned()
    }

    /// Marks a written row published (under the writer lock).
    pub(crate) fn publish_row_locked(&self, st: &mut WriterState, row: &Row, size: u64) {
        row.size.store(size, Ordering::Relaxed);
        row.last_used.store(self.next_tick(), Ordering::Relaxed);
        st.used[row.tier.index()] += size;
        self.inner.counters.add(bytes_counter(row.tier), size);
        row.set_status(RowStatus::Available);
        // An adopted file larger than the reservation: stay under quota.
        let i = row.tier.index();
        let over = (st.used[i] + st.reserved[i]).saturating_sub(self.quota(row.tier));
        if over > 0 {
            self.evict_locked(st, over, &[row.tier]);
        }
    }

    pub(crate) fn remove_placeholder_locked(&self, key: &CacheKey) {
        let rows = self.inner.rows.pin();
        if rows
            .get(key)
            .is_some_and(|r| r.status() == RowStatus::Writing)
        {
            rows.remove(key);
        }
    }

    pub(crate) fn acquire_permit(
        &self,
        reason: crate::kvc::SaveReason,
    ) -> Result<crate::semaphore::Permit, PoolError> {
        // A continued save is opportunistic: it never takes the last free
        // slot, which stays for a cold, finish, evict or shutdown save.
        if reason == crate::kvc::SaveReason::Continued {
            return self.inner.pool.try_acquire_leaving(1);
        }
        let timeout = self.inner.config.writer_acquire_timeout;
        if timeout.is_zero() {
            self.inner.pool.try_acquire()
        } else {
            self.inner.pool.acquire_timeout(timeout)
        }
    }
}
