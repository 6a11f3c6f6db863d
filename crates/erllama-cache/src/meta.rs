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
//! - **LRU bookkeeping.** The writer state keeps per-tier recency lists
//!   ([`crate::lru`]): a claim moves its row to the most recent end, a
//!   publish appends, every removal unlists, and an eviction walks from
//!   the least recent end and stops once enough bytes are freed — no
//!   mutation scans the whole index. Release stays lock-free.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::counters::{Counter, Counters};
use crate::fsio::DirError;
use crate::key::{CacheKey, KeyHasher};
use crate::kvc::SaveReason;
use crate::lru::{Recency, Walk, NIL};
use crate::policy::{longest_prefix_probes, PolicyConfig};
use crate::remote::{Remote, RemoteConfig};
use crate::semaphore::{PoolError, WriterPool};
use crate::tier::{
    DiskTier, FileLoad, LoadError, Payload, RamFileTier, RamTier, Recovered, Tier, TierError,
    TierKind, Visible,
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
    /// The remote tier (Redis or Valkey), if any.
    pub remote: Option<RemoteConfig>,
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
            remote: None,
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
/// the atomics are written only under the writer lock and read anywhere,
/// except the pin word, which a release lowers without the lock.
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
    /// Live claims in the low bits, plus [`PARKED`] while the row sits in
    /// its tier's parked recency list (one word, so a lock-free release
    /// and an eviction walk parking the row cannot miss each other).
    pins: AtomicU32,
    hits: AtomicU32,
    last_used: AtomicU64,
    /// The row's slot in the recency lists ([`NIL`] unless available);
    /// only used under the writer lock.
    lru_slot: AtomicU32,
}

/// The parked bit of [`Row::pins`] (the claim count stays below it).
const PARKED: u32 = 1 << 31;

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

    /// Live claims. `SeqCst`, paired with [`Row::unpin`] and the parked
    /// flags (see [`crate::lru`]).
    pub(crate) fn refcount(&self) -> u32 {
        self.pins.load(Ordering::SeqCst) & !PARKED
    }

    /// Whether the row sits in its tier's parked list.
    #[cfg(test)]
    pub(crate) fn is_parked(&self) -> bool {
        self.pins.load(Ordering::SeqCst) & PARKED != 0
    }

    /// The LRU tick (higher is more recent).
    pub(crate) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    pub(crate) fn lru_slot(&self) -> u32 {
        self.lru_slot.load(Ordering::Relaxed)
    }

    pub(crate) fn set_lru_slot(&self, slot: u32) {
        self.lru_slot.store(slot, Ordering::Relaxed);
    }

    /// Under the writer lock: sets the parked bit if the row is pinned, in
    /// one step with respect to releases; false (bit left clear) once the
    /// last pin is gone.
    pub(crate) fn try_park(&self) -> bool {
        self.pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n & !PARKED != 0).then_some(n | PARKED)
            })
            .is_ok()
    }

    /// Under the writer lock (a claim): one more pin, parked bit cleared
    /// (the claim moves the row back to its tier's main list).
    fn pin(&self) {
        let _ = self
            .pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some((n & !PARKED) + 1)
            });
    }

    /// Lock-free release: one pin fewer (saturating at 0). True when this
    /// dropped the last pin of a parked row, which the tier's next
    /// eviction walk must then look at.
    fn unpin(&self) -> bool {
        self.pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n & !PARKED != 0).then(|| n - 1)
            })
            .is_ok_and(|n| n == PARKED | 1)
    }

    fn info(&self) -> RowInfo {
        RowInfo {
            key: self.key,
            tier: self.tier,
            status: self.status(),
            size: self.size(),
            refcount: self.refcount(),
            hits: self.hits.load(Ordering::Relaxed),
            last_used: self.last_used(),
            token_count: self.tokens.len(),
            save_reason: self.save_reason,
            context_size: self.context_size,
            created_unix: self.created_unix,
        }
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
    /// Every available row in per-tier recency lists ([`crate::lru`]).
    pub(crate) recency: Recency,
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
    /// Per tier: a release unpinned a parked row (or a walk left unpinned
    /// rows in the parked list), so the next eviction walk must look at
    /// the parked list ([`crate::lru`]).
    pub(crate) parked_released: [AtomicBool; 3],
    pub(crate) config: CacheConfig,
    /// Pins with an expiry ([`Cache::pin_for`]): each holds one pin on its
    /// row until the deadline. Lock order: the writer lock, then this.
    pub(crate) timed_pins: Mutex<HashMap<CacheKey, TimedPin>>,
    /// The remote tier's connection, if configured.
    pub(crate) remote: Option<Remote>,
}

/// One pin of [`Cache::pin_for`].
pub(crate) struct TimedPin {
    row: Arc<Row>,
    until: Instant,
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

/// Why [`Cache::pin_for`] could not pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// No row under the key.
    #[error("no row under that key")]
    NotFound,
    /// The row is being written or evicted.
    #[error("the row is busy (being written or evicted)")]
    Busy,
    /// [`MAX_TIMED_PINS`] rows are pinned with an expiry already.
    #[error("too many pinned rows (at most {MAX_TIMED_PINS})")]
    TooMany,
}

impl From<ClaimError> for PinError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::NotFound => Self::NotFound,
            ClaimError::Busy => Self::Busy,
        }
    }
}

/// Most rows [`Cache::pin_for`] holds at once.
pub const MAX_TIMED_PINS: usize = 4096;

/// Longest [`Cache::pin_for`] lifetime (a day); longer asks are cut to it.
pub const MAX_PIN_TTL: Duration = Duration::from_secs(24 * 3600);

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
        // Unpinning a parked row tells the tier's next eviction walk to
        // look at the parked list (SeqCst: see crate::lru).
        self.cache.unpin_row(&self.row);
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
        let remote = config
            .remote
            .clone()
            .map(|r| Remote::new(r, Arc::clone(&counters)))
            .transpose()
            .map_err(OpenError::InvalidConfig)?;
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
                parked_released: Default::default(),
                config,
                timed_pins: Mutex::new(HashMap::new()),
                remote,
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
            let (key, size) = (r.key, r.size);
            let row = Arc::new(self.found_row(tier, r));
            st.recency.insert(&row);
            rows.insert(key, row);
            st.used[tier.index()] += size;
            self.inner.counters.add(bytes_counter(tier), size);
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

    /// The remote tier, if configured.
    #[must_use]
    pub fn remote(&self) -> Option<&Remote> {
        self.inner.remote.as_ref()
    }

    /// The remote tier's lookup, after every local tier missed
    /// (docs/tiers.md): `candidates` are keys of the prompt's prefixes,
    /// the preferred (longest) first. One round trip finds the first the
    /// store holds; its bytes are fetched, validated like a file (framing,
    /// CRC32C, recomputed key: a corrupt or foreign value is deleted from
    /// the store and counted in `remote_corrupt`), stored in the local
    /// tier `home` through the publish protocol and claimed there. None
    /// on a miss, a failure (counted; never an error for the request) or
    /// when `home` has no room.
    #[must_use]
    pub fn fetch_remote(&self, candidates: &[CacheKey], home: TierKind) -> Option<Claim> {
        let remote = self.remote()?;
        if candidates.is_empty() || !self.has_tier(home) {
            return None;
        }
        let _timer = self.inner.counters.time(Counter::RemoteLookupNs);
        let Ok(found) = remote.first_present(candidates) else {
            return None;
        };
        let Some((key, size)) = found.map(|(i, size)| (candidates[i], size)) else {
            self.inner.counters.incr(Counter::RemoteMisses);
            return None;
        };
        if size > remote.config().quota {
            // No row of ours is larger than the quota: a foreign value,
            // never fetched (no allocation of a size the server chose).
            self.inner.counters.incr(Counter::RemoteCorrupt);
            tracing::warn!(key = %key, size, "a remote value larger than the quota; deleting it");
            let _ = remote.delete(&key);
            return None;
        }
        let bytes = match remote.get(&key, size) {
            Ok(Some(b)) => b,
            Ok(None) => {
                // Evicted or expired since the probe.
                self.inner.counters.incr(Counter::RemoteMisses);
                return None;
            }
            Err(_) => return None,
        };
        let meta = match crate::kvc::parse_full(&bytes, &key) {
            Ok(meta) => meta,
            Err(e) => {
                self.inner.counters.incr(Counter::RemoteCorrupt);
                tracing::warn!(key = %key, error = %e, "a remote row failed validation; deleting it");
                let _ = remote.delete(&key);
                return None;
            }
        };
        if self.row(&key).is_none() {
            if let Err(e) = self.import(key, home, bytes, &meta) {
                tracing::debug!(key = %key, error = %e, "a remote row could not be stored locally");
            }
        }
        let claim = self.claim(&key).ok()?;
        self.inner.counters.incr(Counter::RemoteHits);
        Some(claim)
    }

    /// After a save published `key` locally: the same bytes go to the
    /// remote tier too (on the save's thread, holding its writer-pool
    /// slot). Failures are counted, never reported to the save.
    pub(crate) fn mirror_to_remote(&self, tier: TierKind, key: &CacheKey, size: u64) {
        let Some(remote) = self.remote() else { return };
        let Some(t) = self.tier(tier) else { return };
        // Stored already (or the server is failing): no read-back at all.
        if !matches!(remote.contains(key), Ok(false)) {
            return;
        }
        let Ok(payload) = t.load(key, size) else {
            return; // evicted meanwhile
        };
        if let Ok(crate::remote::PutOutcome::TooLarge) = remote.put(key, payload.kvc()) {
            tracing::debug!(key = %key, size, "a row larger than the remote quota is not stored");
        }
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

    /// Whether a save is still in flight: reserved and not yet published,
    /// or published and still writing its remote copy (it holds its
    /// writer-pool slot until then).
    #[must_use]
    pub fn saves_in_flight(&self) -> bool {
        let st = self.lock();
        st.reserved.iter().any(|&b| b > 0) || self.inner.pool.in_use() > 0
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
        let found = self.inner.rows.pin().get(key).cloned();
        let row = match found {
            Some(row) => row,
            None => self.adopt(key).ok_or(ClaimError::NotFound)?,
        };
        self.claim_row(row)
    }

    /// A row another process published into a shared file tier (docs/tiers.md,
    /// sharing a directory): on an index miss, a file under the key's name
    /// is validated in full (framing, CRC32C, recomputed key) and joins
    /// the index like one found at startup. An invalid one is deleted and
    /// counted in `corrupt_files`. Costs one `stat` per file tier when
    /// there is none.
    fn adopt(&self, key: &CacheKey) -> Option<Arc<Row>> {
        for tier in [TierKind::RamFile, TierKind::Disk] {
            let Some(t) = self.tier(tier) else { continue };
            if !t.visible(key) {
                continue;
            }
            let found = match t.validate_visible(key) {
                Visible::Valid(found) => found,
                Visible::RemovedInvalid => {
                    self.inner.counters.incr(Counter::CorruptFiles);
                    continue;
                }
                Visible::Absent => continue,
            };
            let mut st = self.lock();
            if let Some(row) = self.inner.rows.pin().get(key) {
                // Adopted or saved here meanwhile.
                return Some(Arc::clone(row));
            }
            if !self.make_room_locked(&mut st, tier, found.size) {
                return None;
            }
            let size = found.size;
            let row = Arc::new(self.found_row(tier, *found));
            st.recency.insert(&row);
            self.inner.rows.pin().insert(*key, Arc::clone(&row));
            st.used[tier.index()] += size;
            self.inner.counters.add(bytes_counter(tier), size);
            self.inner.counters.incr(Counter::FilesAdopted);
            return Some(row);
        }
        None
    }

    fn claim_row(&self, row: Arc<Row>) -> Result<Claim, ClaimError> {
        self.pin_row(&row)?;
        Ok(Claim {
            cache: self.clone(),
            row,
        })
    }

    /// Pins an available row (one more claim), bumps its hits and marks it
    /// most recently used.
    fn pin_row(&self, row: &Arc<Row>) -> Result<(), ClaimError> {
        let hits = {
            let mut writer = self.lock();
            // Re-check under the lock: the row may have been removed or
            // changed state since the lock-free read. Every status change
            // and removal (un)lists the row under this lock, so a listed
            // row is in the index and available: no second lookup.
            if row.lru_slot() == NIL {
                return Err(if self.inner.rows.pin().contains_key(&row.key) {
                    // Not available, or replaced by a newer row.
                    ClaimError::Busy
                } else {
                    ClaimError::NotFound
                });
            }
            debug_assert_eq!(row.status(), RowStatus::Available);
            row.pin();
            row.last_used.store(self.next_tick(), Ordering::Relaxed);
            writer.recency.touch(row);
            row.hits.fetch_add(1, Ordering::Relaxed).saturating_add(1)
        };
        if let Some(t) = self.tier(row.tier) {
            t.record_hits(&row.key, hits);
        }
        Ok(())
    }

    /// Drops one pin of `row` (lock-free, see [`Claim`]'s drop).
    fn unpin_row(&self, row: &Row) {
        // Unpinning a parked row tells the tier's next eviction walk to
        // look at the parked list (SeqCst: see crate::lru).
        if row.unpin() {
            self.inner.parked_released[row.tier.index()].store(true, Ordering::SeqCst);
        }
    }

    /// Pins the row under `key` until `ttl` from now: no eviction (quota,
    /// [`Cache::gc`], [`Cache::evict_bytes`]) removes it before then. A
    /// row already pinned this way gets the later of its two deadlines
    /// (a use refreshes its lifetime, as a prompt cache's TTL does). The
    /// pin lives in this process only; an explicit delete still removes
    /// the row. At most [`MAX_TIMED_PINS`] rows are pinned at once.
    ///
    /// # Errors
    ///
    /// [`PinError::NotFound`], [`PinError::Busy`] (being written or
    /// evicted), or [`PinError::TooMany`].
    pub fn pin_for(&self, key: &CacheKey, ttl: Duration) -> Result<(), PinError> {
        let until = Instant::now() + ttl.min(MAX_PIN_TTL);
        self.sweep_pins();
        let row = self.row(key).ok_or(PinError::NotFound)?;
        {
            let pins = self.timed_pins();
            if let Some(p) = pins.get(key) {
                if Arc::ptr_eq(&p.row, &row) {
                    drop(pins);
                    // Already pinned: a use (hits, recency) and a later
                    // deadline.
                    self.pin_row(&row)?;
                    self.unpin_row(&row);
                    let mut pins = self.timed_pins();
                    if let Some(p) = pins.get_mut(key) {
                        p.until = p.until.max(until);
                        return Ok(());
                    }
                    // Expired meanwhile: pin anew below.
                } else if pins.len() >= MAX_TIMED_PINS {
                    return Err(PinError::TooMany);
                }
            } else if pins.len() >= MAX_TIMED_PINS {
                return Err(PinError::TooMany);
            }
        }
        self.pin_row(&row)?;
        let old = self.timed_pins().insert(*key, TimedPin { row, until });
        if let Some(old) = old {
            self.unpin_row(&old.row);
        }
        Ok(())
    }

    /// Pins a row being published (under the writer lock) as
    /// [`Cache::pin_for`] would; skipped (logged) at [`MAX_TIMED_PINS`].
    pub(crate) fn pin_published_locked(
        &self,
        _st: &mut WriterState,
        row: &Arc<Row>,
        ttl: Duration,
    ) {
        let until = Instant::now() + ttl.min(MAX_PIN_TTL);
        let mut pins = self.timed_pins();
        if pins.len() >= MAX_TIMED_PINS && !pins.contains_key(&row.key) {
            tracing::warn!(key = %row.key, "too many pinned rows; this one is not pinned");
            return;
        }
        row.pin();
        let old = pins.insert(
            row.key,
            TimedPin {
                row: Arc::clone(row),
                until,
            },
        );
        drop(pins);
        if let Some(old) = old {
            self.unpin_row(&old.row);
        }
    }

    /// Ends the [`Cache::pin_for`] pin of `key` now; false if it had none.
    pub fn unpin(&self, key: &CacheKey) -> bool {
        let removed = self.timed_pins().remove(key);
        match removed {
            Some(p) => {
                self.unpin_row(&p.row);
                true
            }
            None => false,
        }
    }

    /// The rows pinned by [`Cache::pin_for`] and the time each has left.
    #[must_use]
    pub fn timed_pins_left(&self) -> Vec<(CacheKey, Duration)> {
        self.sweep_pins();
        let now = Instant::now();
        let mut out: Vec<_> = self
            .timed_pins()
            .iter()
            .map(|(k, p)| (*k, p.until.saturating_duration_since(now)))
            .collect();
        out.sort_by_key(|(k, _)| k.0);
        out
    }

    fn timed_pins(&self) -> MutexGuard<'_, HashMap<CacheKey, TimedPin>> {
        self.inner
            .timed_pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Releases the timed pins whose deadline passed (every eviction walk
    /// starts with this, so an expired pin never keeps a row).
    pub(crate) fn sweep_pins(&self) {
        let now = Instant::now();
        let expired: Vec<TimedPin> = {
            let mut pins = self.timed_pins();
            if pins.values().all(|p| p.until > now) {
                return;
            }
            let keys: Vec<CacheKey> = pins
                .iter()
                .filter(|(_, p)| p.until <= now)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| pins.remove(k)).collect()
        };
        for p in expired {
            self.unpin_row(&p.row);
        }
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
        let lengths_again = lengths.clone();
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
        drop(rows);
        // Rows other processes published into a shared file tier, longest
        // first (only when the index has none).
        if self.has_tier(TierKind::RamFile) || self.has_tier(TierKind::Disk) {
            let keys = base
                .prefix_keys(tokens, &lengths_again)
                .expect("probe lengths never exceed the token count");
            for (len, key) in lengths_again.iter().zip(keys) {
                if self.inner.rows.pin().contains_key(&key) {
                    continue;
                }
                let Some(row) = self.adopt(&key) else {
                    continue;
                };
                if row.tokens[..] != tokens[..*len] {
                    continue;
                }
                if let Ok(claim) = self.claim_row(row) {
                    return PrefixLookup::Hit {
                        claim,
                        len: *len,
                        probes,
                    };
                }
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
        st.recency.remove(row);
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
    /// Returns (rows, bytes) evicted. Walks the recency lists from the
    /// least recent end: O(victims), not O(rows).
    pub(crate) fn evict_locked(
        &self,
        st: &mut WriterState,
        want: u64,
        tiers: &[TierKind],
    ) -> (usize, u64) {
        self.sweep_pins();
        let mut walk = Walk::new(&st.recency, tiers, &self.inner.parked_released);
        let freed = self.evict_walk(st, &mut walk, want);
        walk.finish(&self.inner.parked_released);
        freed
    }

    /// Evicts the candidates of `walk` until at least `want` bytes are
    /// freed or none is left; returns (rows, bytes) evicted.
    fn evict_walk(&self, st: &mut WriterState, walk: &mut Walk, want: u64) -> (usize, u64) {
        let (mut count, mut freed) = (0, 0);
        while freed < want {
            let Some(candidate) = walk.take(&mut st.recency) else {
                break;
            };
            if self.remove_locked(st, &candidate.row) {
                count += 1;
                freed += candidate.row.size();
            } else {
                walk.keep(&candidate);
            }
        }
        (count, freed)
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
        st.recency.remove(row);
        self.account_removed(st, row);
        self.inner.counters.incr(Counter::Evictions);
        true
    }

    /// Before a save links its `size`-byte file for `key` into a file
    /// tier (under the directory's lock, so saves of every process take
    /// turns): makes the directory's row files and this one fit the tier's
    /// quota. This index's least recently used unpinned rows go first,
    /// then other processes' files, the least recently used (modified)
    /// first; they see a clean miss. `NoSpace` when even that cannot fit
    /// it.
    pub(crate) fn fit_directory(
        &self,
        kind: TierKind,
        tier: &dyn Tier,
        key: &CacheKey,
        size: u64,
    ) -> Result<(), crate::writer::SaveError> {
        let quota = self.quota(kind);
        let dir = self.tier_dir(kind).unwrap_or_default();
        for _ in 0..64 {
            let files = tier.dir_rows();
            let total: u64 = files.iter().filter(|f| f.key != *key).map(|f| f.size).sum();
            if total.saturating_add(size) <= quota {
                return Ok(());
            }
            let need = total + size - quota;
            let (evicted, _) = {
                let mut st = self.lock();
                self.evict_locked(&mut st, need, &[kind])
            };
            if evicted > 0 {
                continue; // look again: some of those rows may be gone already
            }
            let mut foreign: Vec<_> = files
                .into_iter()
                .filter(|f| f.key != *key && self.row(&f.key).is_none())
                .collect();
            foreign.sort_by_key(|f| f.modified);
            let mut freed = 0;
            for f in foreign {
                if freed >= need {
                    break;
                }
                if std::fs::remove_file(crate::fsio::final_path(&dir, &f.key)).is_ok() {
                    freed += f.size;
                    self.inner.counters.incr(Counter::Evictions);
                }
            }
            if freed == 0 {
                break;
            }
        }
        Err(crate::writer::SaveError::NoSpace {
            tier: kind,
            size,
            quota,
        })
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
        // Walk LRU-first collecting victims until they cover the need; only
        // then evict them (a row whose bytes cannot be removed is replaced
        // by the next candidates). Nothing is evicted if they cannot.
        self.sweep_pins();
        let mut walk = Walk::new(&st.recency, &[tier], &self.inner.parked_released);
        let mut victims = Vec::new();
        let mut covered = 0;
        while covered < need {
            let Some(candidate) = walk.take(&mut st.recency) else {
                break;
            };
            covered += candidate.row.size();
            victims.push(candidate);
        }
        if covered < need {
            for candidate in &victims {
                walk.keep(candidate);
            }
            walk.finish(&self.inner.parked_released);
            return false;
        }
        let mut freed = 0;
        for candidate in victims {
            if self.remove_locked(st, &candidate.row) {
                freed += candidate.row.size();
            } else {
                walk.keep(&candidate);
            }
        }
        if freed < need {
            self.evict_walk(st, &mut walk, need - freed);
        }
        walk.finish(&self.inner.parked_released);
        st.used[i] + st.reserved[i] + size <= quota
    }

    /// An available row for a valid file found in `tier` (the startup scan,
    /// or a file another process published).
    fn found_row(&self, tier: TierKind, r: Recovered) -> Row {
        Row {
            key: r.key,
            tier,
            tokens: r.meta.tokens.into(),
            save_reason: r.meta.save_reason,
            context_size: r.meta.context_size,
            created_unix: r.meta.creation_time,
            status: AtomicU8::new(RowStatus::Available as u8),
            size: AtomicU64::new(r.size),
            pins: AtomicU32::new(0),
            hits: AtomicU32::new(r.meta.hit_count),
            last_used: AtomicU64::new(self.next_tick()),
            lru_slot: AtomicU32::new(NIL),
        }
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
            pins: AtomicU32::new(0),
            hits: AtomicU32::new(0),
            last_used: AtomicU64::new(self.next_tick()),
            lru_slot: AtomicU32::new(NIL),
        }
    }

    pub(crate) fn row(&self, key: &CacheKey) -> Option<Arc<Row>> {
        self.inner.rows.pin().get(key).cloned()
    }

    /// Marks a written row published (under the writer lock): available,
    /// the most recently used of its tier.
    pub(crate) fn publish_row_locked(&self, st: &mut WriterState, row: &Arc<Row>, size: u64) {
        row.size.store(size, Ordering::Relaxed);
        row.last_used.store(self.next_tick(), Ordering::Relaxed);
        st.used[row.tier.index()] += size;
        self.inner.counters.add(bytes_counter(row.tier), size);
        row.set_status(RowStatus::Available);
        st.recency.insert(row);
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

#[cfg(test)]
impl Cache {
    /// Checks that the recency lists and the index agree (see
    /// `Recency::check`).
    ///
    /// # Errors
    ///
    /// What disagrees.
    pub(crate) fn check_lru(&self) -> Result<(), String> {
        let st = self.lock();
        let rows: Vec<Arc<Row>> = self.inner.rows.pin().values().cloned().collect();
        st.recency.check(&rows, &self.inner.parked_released)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::key::{FingerprintMode, QuantType};
    use crate::writer::{ModelIdentity, SaveError, SaveRequest};

    fn identity() -> Arc<ModelIdentity> {
        Arc::new(ModelIdentity {
            fingerprint: [0x11; 32],
            fingerprint_mode: FingerprintMode::Safe,
            quant_type: QuantType::Q4_1,
            ctx_params_hash: [0x22; 32],
            context_size: 4096,
        })
    }

    /// Row `n` of `tier` with a `len`-byte payload.
    fn request(tier: TierKind, n: u32, len: usize) -> SaveRequest {
        SaveRequest {
            identity: identity(),
            tier,
            tokens: vec![n, n + 1, n + 2, n + 3].into(),
            payload: vec![0x5A; len],
            logits_count: 0,
            reason: SaveReason::Finish,
            prompt_text: String::new(),
            detail: None,
        }
    }

    fn key(n: u32) -> CacheKey {
        request(TierKind::Ram, n, 0).key()
    }

    fn ram_cache(quota: u64) -> Cache {
        Cache::open(CacheConfig {
            ram_quota: quota,
            ..CacheConfig::default()
        })
        .expect("open cache")
    }

    /// Saves rows `ns` (RAM, 100-byte payloads); returns their size.
    fn save_all(cache: &Cache, ns: &[u32]) -> u64 {
        ns.iter()
            .map(|&n| {
                cache
                    .save(request(TierKind::Ram, n, 100))
                    .expect("save")
                    .size
            })
            .max()
            .unwrap_or(0)
    }

    fn touch(cache: &Cache, n: u32) {
        cache.claim(&key(n)).expect("claim").release();
    }

    /// The rows (by number, of 0..100) in `dump` order.
    fn order(cache: &Cache) -> Vec<u32> {
        cache
            .dump()
            .iter()
            .map(|r| (0..100).find(|&n| key(n) == r.key).expect("a test row"))
            .collect()
    }

    #[test]
    fn eviction_follows_claims() {
        let cache = ram_cache(1 << 20);
        let size = save_all(&cache, &[1, 2, 3, 4, 5]);
        touch(&cache, 2);
        touch(&cache, 1);
        touch(&cache, 4);
        assert_eq!(order(&cache), [3, 5, 2, 1, 4]);
        cache.check_lru().expect("lists agree");
        assert_eq!(cache.evict_bytes(2 * size, &[TierKind::Ram]), (2, 2 * size));
        assert_eq!(order(&cache), [2, 1, 4]);
        assert_eq!(cache.evict_bytes(1, &[TierKind::Ram]), (1, size));
        assert_eq!(order(&cache), [1, 4]);
        cache.check_lru().expect("lists agree");
    }

    #[test]
    fn pinned_rows_are_skipped_then_evicted_in_order() {
        let cache = ram_cache(1 << 20);
        let size = save_all(&cache, &[1, 2, 3, 4]);
        let pin = cache.claim(&key(1)).expect("claim");
        touch(&cache, 2);
        touch(&cache, 3);
        touch(&cache, 4);
        // LRU order 1 (pinned), 2, 3, 4: 1 is skipped and parked.
        assert_eq!(cache.evict_bytes(1, &[TierKind::Ram]), (1, size));
        assert_eq!(order(&cache), [1, 3, 4]);
        let one = cache.row(&key(1)).expect("row 1");
        assert!(one.is_parked());
        assert!(!cache.inner.parked_released[0].load(Ordering::SeqCst));
        cache.check_lru().expect("lists agree");
        // Released: the oldest again, evicted before 3.
        drop(pin);
        assert!(cache.inner.parked_released[0].load(Ordering::SeqCst));
        cache.check_lru().expect("lists agree");
        assert_eq!(cache.evict_bytes(1, &[TierKind::Ram]), (1, size));
        assert_eq!(order(&cache), [3, 4]);
        cache.check_lru().expect("lists agree");

        // A parked row claimed again is the most recent, no longer parked.
        let pin = cache.claim(&key(3)).expect("claim");
        save_all(&cache, &[5]);
        touch(&cache, 4);
        assert_eq!(order(&cache), [3, 5, 4]);
        assert_eq!(cache.evict_bytes(1, &[TierKind::Ram]), (1, size));
        assert_eq!(order(&cache), [3, 4]);
        assert!(cache.row(&key(3)).expect("row 3").is_parked());
        let again = cache.claim(&key(3)).expect("claim again");
        assert!(!cache.row(&key(3)).expect("row 3").is_parked());
        assert_eq!(order(&cache), [4, 3]);
        drop((pin, again));
        cache.check_lru().expect("lists agree");
        assert_eq!(cache.evict_bytes(1, &[TierKind::Ram]), (1, size));
        assert_eq!(order(&cache), [3]);
        // Everything pinned: nothing to evict.
        let pin = cache.claim(&key(3)).expect("claim");
        assert_eq!(cache.evict_bytes(u64::MAX, &TierKind::ALL), (0, 0));
        assert_eq!(cache.gc(), 0);
        drop(pin);
        assert_eq!(cache.gc(), 1);
        assert!(cache.is_empty());
        cache.check_lru().expect("lists agree");
    }

    #[test]
    fn make_room_that_cannot_succeed_evicts_nothing() {
        let size = save_all(&ram_cache(1 << 20), &[1]);
        let cache = ram_cache(3 * size);
        save_all(&cache, &[1, 2, 3]);
        let pin1 = cache.claim(&key(1)).expect("claim");
        let pin3 = cache.claim(&key(3)).expect("claim");
        // Needs two rows' worth; only row 2 is evictable.
        let big = request(
            TierKind::Ram,
            4,
            usize::try_from(size).expect("small") + 100,
        );
        match cache.save(big.clone()) {
            Err(SaveError::NoSpace { .. }) => {}
            other => panic!("expected no_space, got {other:?}"),
        }
        assert_eq!(order(&cache), [2, 1, 3]);
        assert_eq!(cache.counters().get(Counter::Evictions), 0);
        assert_eq!(cache.bytes(TierKind::Ram), 3 * size);
        cache.check_lru().expect("lists agree");
        // One row's worth fits by evicting row 2 (1 and 3 are parked
        // pinned rows by now).
        save_all(&cache, &[5]);
        assert_eq!(order(&cache), [1, 3, 5]);
        assert!(cache.row(&key(1)).expect("row 1").is_parked());
        // Row 1 released: it and row 5 (3 is pinned) could free two rows'
        // worth, not three.
        drop(pin1);
        let bigger = request(
            TierKind::Ram,
            6,
            usize::try_from(2 * size).expect("small") + 100,
        );
        match cache.save(bigger) {
            Err(SaveError::NoSpace { .. }) => {}
            other => panic!("expected no_space, got {other:?}"),
        }
        assert_eq!(order(&cache), [1, 3, 5]);
        cache
            .check_lru()
            .expect("lists agree (parked row 1 still flagged)");
        cache.save(big).expect("fits after evicting 1 and 5");
        assert_eq!(order(&cache), [3, 4]);
        assert_eq!(cache.counters().get(Counter::Evictions), 3);
        drop(pin3);
        cache.check_lru().expect("lists agree");
    }

    /// Releases racing eviction walks (which park pinned rows) never
    /// leave an unpinned row where no walk looks: afterwards the lists
    /// agree with the index and `gc` evicts every row.
    #[test]
    fn concurrent_releases_never_strand_parked_rows() {
        use std::sync::atomic::AtomicUsize;
        const N: u32 = 16;
        let cache = ram_cache(1 << 20);
        let size = save_all(&cache, &(0..N).collect::<Vec<_>>());
        let (walks, done) = (AtomicU64::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (cache, walks, done) = (&cache, &walks, &done);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15 ^ (t + 1);
                    let mut rand = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    let mut held: Vec<Claim> = Vec::new();
                    for _ in 0..20_000 {
                        let n = u32::try_from(rand() % u64::from(N)).expect("small");
                        if let Ok(claim) = cache.claim(&key(n)) {
                            held.push(claim);
                        }
                        if held.len() > 3 {
                            let i = usize::try_from(rand() % 4).expect("small");
                            held.swap_remove(i);
                        }
                    }
                    // Let the walks park what is still held, then release.
                    let seen = walks.load(Ordering::SeqCst);
                    while walks.load(Ordering::SeqCst) < seen + 5 {
                        std::thread::yield_now();
                    }
                    drop(held);
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            let (cache, walks, done) = (&cache, &walks, &done);
            s.spawn(move || {
                let mut k = 0;
                while done.load(Ordering::SeqCst) < 2 {
                    // One to three rows' worth, then everything unpinned.
                    k = k % 4 + 1;
                    let want = if k == 4 { u64::MAX } else { k * size };
                    cache.evict_bytes(want, &[TierKind::Ram]);
                    walks.fetch_add(1, Ordering::SeqCst);
                    for n in 0..N {
                        let _ = cache.save(request(TierKind::Ram, n, 100));
                    }
                }
            });
        });
        cache.check_lru().expect("lists agree");
        assert!(cache.counters().get(Counter::Evictions) > 0);
        let rows = cache.len();
        assert_eq!(cache.gc(), rows, "every row is unpinned and found");
        assert!(cache.is_empty());
        cache.check_lru().expect("lists agree");
    }

    #[test]
    fn tiers_are_merged_by_recency() {
        let root = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(CacheConfig {
            ram_quota: 1 << 20,
            disk: Some(FileTierConfig::new(root.path().join("disk"), 1 << 20)),
            ..CacheConfig::default()
        })
        .expect("open cache");
        for (n, tier) in [(1, TierKind::Disk), (2, TierKind::Ram), (3, TierKind::Disk)] {
            cache.save(request(tier, n, 100)).expect("save");
        }
        save_all(&cache, &[4]);
        touch(&cache, 1);
        assert_eq!(order(&cache), [2, 3, 4, 1]);
        let tiers = [TierKind::Ram, TierKind::Disk];
        assert_eq!(cache.evict_bytes(1, &tiers).0, 1);
        assert_eq!(order(&cache), [3, 4, 1]);
        assert_eq!(cache.evict_bytes(1, &tiers).0, 1);
        assert_eq!(order(&cache), [4, 1]);
        assert_eq!(cache.evict_bytes(1, &[TierKind::Disk]).0, 1);
        assert_eq!(order(&cache), [4]);
        cache.check_lru().expect("lists agree");
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Save row `n` into tier `t` with a payload of `len` bytes.
        Save(u32, usize, usize),
        /// Claim row `n` and hold the claim.
        Claim(u32),
        /// Claim row `n` and release it at once.
        Touch(u32),
        /// Release the `i`-th held claim.
        Release(usize),
        /// Invalidate the `i`-th held claim (drop its row).
        Invalidate(usize),
        /// Evict `bytes` from the tiers in `mask`.
        Evict(u64, u8),
        Gc,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..24u32, 0..3usize, 0..700usize).prop_map(|(n, t, l)| Op::Save(n, t, l)),
            3 => (0..24u32).prop_map(Op::Claim),
            3 => (0..24u32).prop_map(Op::Touch),
            3 => (0..8usize).prop_map(Op::Release),
            1 => (0..8usize).prop_map(Op::Invalidate),
            2 => (0..3000u64, 1..8u8).prop_map(|(b, m)| Op::Evict(b, m)),
            1 => Just(Op::Gc),
        ]
    }

    /// The rows an LRU-first eviction of `want` bytes from `tiers` takes,
    /// computed from a dump the way the index did before the lists.
    fn expected_victims(before: &[RowInfo], tiers: &[TierKind], want: u64) -> HashSet<CacheKey> {
        let mut freed = 0;
        before
            .iter()
            .filter(|r| {
                tiers.contains(&r.tier) && r.status == RowStatus::Available && r.refcount == 0
            })
            .take_while(|r| {
                let take = freed < want;
                freed += r.size;
                take
            })
            .map(|r| r.key)
            .collect()
    }

    fn gone(before: &[RowInfo], after: &[RowInfo]) -> HashSet<CacheKey> {
        let kept: HashSet<CacheKey> = after.iter().map(|r| r.key).collect();
        before
            .iter()
            .map(|r| r.key)
            .filter(|k| !kept.contains(k))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// After any sequence of operations the recency lists and the index
        /// agree, and every eviction takes exactly the rows a sort of the
        /// evictable rows by `last_used` would.
        #[test]
        fn lists_and_index_agree(ops in proptest::collection::vec(op(), 1..60)) {
            let root = tempfile::tempdir().expect("tempdir");
            let quota = 2500;
            let cache = Cache::open(CacheConfig {
                ram_quota: quota,
                ram_file: Some(FileTierConfig::new(root.path().join("shm"), quota)),
                disk: Some(FileTierConfig::new(root.path().join("disk"), quota)),
                ..CacheConfig::default()
            })
            .expect("open cache");
            let mut held: Vec<Claim> = Vec::new();
            for op in ops {
                let before = cache.dump();
                let mut expected: HashSet<CacheKey> = HashSet::new();
                match op {
                    Op::Save(n, t, len) => {
                        let tier = TierKind::ALL[t];
                        let req = request(tier, n, len);
                        let key = req.key();
                        let used = cache.bytes(tier);
                        let result = cache.save(req);
                        let size = match &result {
                            Ok(out) => Some(out.size),
                            Err(SaveError::NoSpace { size, .. }) => Some(*size),
                            Err(_) => None,
                        };
                        if let Some(size) = size {
                            if used + size > quota && size <= quota {
                                let need = used + size - quota;
                                let victims = expected_victims(&before, &[tier], need);
                                let covered: u64 = before
                                    .iter()
                                    .filter(|r| victims.contains(&r.key))
                                    .map(|r| r.size)
                                    .sum();
                                if covered >= need {
                                    expected = victims;
                                }
                            }
                        }
                        let fits = size.map(|s| used + s <= quota);
                        match &result {
                            Ok(_) => prop_assert!(fits == Some(true) || !expected.is_empty()),
                            Err(SaveError::NoSpace { .. }) => {
                                prop_assert!(fits == Some(false) && expected.is_empty());
                            }
                            Err(_) => {}
                        }
                        if result.is_ok() {
                            prop_assert!(cache.peek(&key).is_some());
                        }
                    }
                    Op::Claim(n) => {
                        if let Ok(c) = cache.claim(&key(n)) {
                            held.push(c);
                        }
                    }
                    Op::Touch(n) => {
                        if let Ok(c) = cache.claim(&key(n)) {
                            c.release();
                        }
                    }
                    Op::Release(i) => {
                        if i < held.len() {
                            held.swap_remove(i);
                        }
                    }
                    Op::Invalidate(i) => {
                        if i < held.len() {
                            let c = held.swap_remove(i);
                            expected.insert(*c.key());
                            c.invalidate();
                        }
                    }
                    Op::Evict(bytes, mask) => {
                        let tiers: Vec<TierKind> = TierKind::ALL
                            .into_iter()
                            .filter(|t| mask & (1 << t.index()) != 0)
                            .collect();
                        expected = expected_victims(&before, &tiers, bytes);
                        let bytes_expected: u64 = before
                            .iter()
                            .filter(|r| expected.contains(&r.key))
                            .map(|r| r.size)
                            .sum();
                        prop_assert_eq!(
                            cache.evict_bytes(bytes, &tiers),
                            (expected.len(), bytes_expected)
                        );
                    }
                    Op::Gc => {
                        expected = expected_victims(&before, &TierKind::ALL, u64::MAX);
                        prop_assert_eq!(cache.gc(), expected.len());
                    }
                }
                prop_assert_eq!(gone(&before, &cache.dump()), expected);
                if let Err(e) = cache.check_lru() {
                    prop_assert!(false, "{}", e);
                }
                for tier in TierKind::ALL {
                    prop_assert!(cache.bytes(tier) <= quota);
                }
            }
            drop(held);
            cache.gc();
            prop_assert!(cache.is_empty());
            if let Err(e) = cache.check_lru() {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
