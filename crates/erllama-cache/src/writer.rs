//! Saves: the crash-safe publish protocol of docs/tiers.md over any tier.
//!
//! [`Cache::begin_save`] is the cheap, synchronous part that belongs on the
//! request path: it takes a writer-pool slot and reserves the key (so a
//! later exact-or-wait lookup finds the row `writing` and waits for it).
//! [`PendingSave::run`] is the slow part for a worker thread: build the
//! header (CRC of the payload), stage the bytes (temp file written and
//! synced), check the reservation, link, publish. A `PendingSave` dropped
//! before it publishes (error, panic, cancelled task) cancels its
//! reservation and gives its slot back, so nothing is left behind; a writer
//! that vanishes without unwinding is cleaned up by [`Cache::sweep`] once
//! its reservation's TTL has passed.

use std::sync::Arc;
use std::time::Instant;

use crate::counters::Counter;
use crate::fsio::LinkOutcome;
use crate::key::{CacheKey, FingerprintMode, KeyHasher, QuantType};
use crate::kvc::{build_header, build_header_for, KvcBuildError, KvcHeaderInput, SaveReason};
use crate::meta::{unix_now, Cache, Reservation, RowStatus, WriterState};
use crate::semaphore::Permit;
use crate::tier::{SaveStage, Staged, Tier, TierError, TierKind, Visible};

/// What identifies a model's KV layout: everything of a key but the
/// tokens, plus the header fields that come from the model and context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    /// The effective model fingerprint.
    pub fingerprint: [u8; 32],
    /// How it was computed.
    pub fingerprint_mode: FingerprintMode,
    /// The quant type.
    pub quant_type: QuantType,
    /// The context parameters hash.
    pub ctx_params_hash: [u8; 32],
    /// The context size (header field).
    pub context_size: u32,
}

impl ModelIdentity {
    /// A hasher holding the key's fixed part; extend it with tokens.
    #[must_use]
    pub fn hasher(&self) -> KeyHasher {
        KeyHasher::from_parts(
            &self.fingerprint,
            self.quant_type.to_byte(),
            &self.ctx_params_hash,
        )
    }

    /// The key of `tokens` for this model.
    #[must_use]
    pub fn key(&self, tokens: &[u32]) -> CacheKey {
        let mut h = self.hasher();
        h.update(tokens);
        h.finish()
    }
}

/// A save the cache refused, and the payload it came with.
type Refused = Box<(SaveError, Vec<u8>)>;

/// One save: which model state, what it holds, where it goes.
#[derive(Clone, Debug)]
pub struct SaveRequest {
    /// The model and context the state comes from.
    pub identity: Arc<ModelIdentity>,
    /// The tier to write to.
    pub tier: TierKind,
    /// The tokens whose KV state the payload holds.
    pub tokens: Arc<[u32]>,
    /// The payload: `logits_count` logits (`f32`, little-endian), then the
    /// packed sequence state. Taken from [`crate::pack_buffer`] it goes
    /// back to the pool once written.
    pub payload: Vec<u8>,
    /// How many logits start the payload (0: none): the scores of the
    /// token after `tokens`, so an exact hit needs no decode before its
    /// first token (docs/cache-format.md, TLV 0x0A).
    pub logits_count: u32,
    /// Why the state is saved.
    pub reason: SaveReason,
    /// The prompt text, for observability only (may be empty).
    pub prompt_text: String,
    /// Free text about the save.
    pub detail: Option<String>,
}

impl SaveRequest {
    /// The key the row will have.
    #[must_use]
    pub fn key(&self) -> CacheKey {
        self.identity.key(&self.tokens)
    }

    fn header_input(&self, now: u64) -> KvcHeaderInput<'_> {
        let id = &self.identity;
        KvcHeaderInput {
            quant_bits: id.quant_type.nominal_bits(),
            save_reason: self.reason,
            hit_count: 0,
            context_size: id.context_size,
            creation_time: now,
            last_used_time: now,
            prompt_text: &self.prompt_text,
            fingerprint: id.fingerprint,
            fingerprint_mode: id.fingerprint_mode,
            quant_type: id.quant_type,
            ctx_params_hash: id.ctx_params_hash,
            hostname: None,
            writer_version: None,
            save_reason_detail: self.detail.as_deref(),
            tokens: &self.tokens,
            logits_count: self.logits_count,
        }
    }
}

/// Why a save did not happen or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The tier is not configured.
    #[error("tier {0} is not configured")]
    TierDisabled(TierKind),
    /// The key is already stored (counted in `duplicate_dropped`).
    #[error("key {0} is already present")]
    AlreadyPresent(CacheKey),
    /// Another save holds a live reservation for the key.
    #[error("key {0} is being saved by another writer")]
    Conflict(CacheKey),
    /// Every writer-pool slot is busy (counted in `saves_dropped`).
    #[error("too many saves in flight (max_concurrent)")]
    MaxConcurrent,
    /// The row cannot fit the tier's quota even after evicting every
    /// unpinned row (counted in `saves_dropped`).
    #[error("{size} bytes do not fit tier {tier} (quota {quota})")]
    NoSpace {
        /// The tier.
        tier: TierKind,
        /// Bytes needed.
        size: u64,
        /// The tier's quota.
        quota: u64,
    },
    /// The reservation expired before the check or publish.
    #[error("reservation for key {0} expired")]
    Expired(CacheKey),
    /// The header cannot describe the row.
    #[error(transparent)]
    Build(#[from] KvcBuildError),
    /// Writing or linking failed.
    #[error(transparent)]
    Tier(#[from] TierError),
}

impl SaveError {
    /// A short snake_case name (`already_present`, `max_concurrent`, …).
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            SaveError::TierDisabled(_) => "tier_disabled",
            SaveError::AlreadyPresent(_) => "already_present",
            SaveError::Conflict(_) => "conflict",
            SaveError::MaxConcurrent => "max_concurrent",
            SaveError::NoSpace { .. } => "no_space",
            SaveError::Expired(_) => "expired",
            SaveError::Build(_) => "build",
            SaveError::Tier(_) => "tier",
        }
    }
}

/// A finished save.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaveOutcome {
    /// The row's key.
    pub key: CacheKey,
    /// Where it was written.
    pub tier: TierKind,
    /// Bytes stored.
    pub size: u64,
    /// Whether a new file was linked, an existing valid one adopted, or an
    /// invalid one replaced.
    pub link: LinkOutcome,
}

/// What a pending save writes.
enum Body {
    /// A packed state: the header is built from the request.
    Request(SaveRequest),
    /// A whole KVC row (from the remote tier): header, payload at `start`.
    Kvc {
        bytes: Vec<u8>,
        start: usize,
        reason: SaveReason,
    },
}

/// A reserved save waiting to be written; see the module docs.
#[must_use = "a pending save does nothing until run; dropping it cancels the reservation"]
pub struct PendingSave {
    cache: Cache,
    key: CacheKey,
    token: u64,
    reserved: u64,
    body: Option<Body>,
    request_tier: TierKind,
    linked: Option<u64>,
    _permit: Option<Permit>,
    done: bool,
    /// Pin the row for this long as it is published.
    pin: Option<std::time::Duration>,
}

impl std::fmt::Debug for PendingSave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSave")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

const fn save_counter(reason: SaveReason) -> Option<Counter> {
    match reason {
        SaveReason::Cold => Some(Counter::SavesCold),
        SaveReason::Continued => Some(Counter::SavesContinued),
        SaveReason::Finish => Some(Counter::SavesFinish),
        SaveReason::Evict => Some(Counter::SavesEvict),
        SaveReason::Shutdown => Some(Counter::SavesShutdown),
        SaveReason::Unknown => None,
    }
}

impl Cache {
    /// docs/tiers.md, publish step 1 with back pressure: takes a writer-pool slot and
    /// reserves the request's key in its tier, evicting least recently
    /// used rows of that tier if the row would not fit its quota.
    ///
    /// # Errors
    ///
    /// [`SaveError::TierDisabled`]; [`SaveError::MaxConcurrent`] and
    /// [`SaveError::NoSpace`] (counted in `saves_dropped`);
    /// [`SaveError::AlreadyPresent`] (counted in `duplicate_dropped`);
    /// [`SaveError::Conflict`]; [`SaveError::Build`] for a row the format
    /// cannot hold.
    pub fn begin_save(&self, request: SaveRequest) -> Result<PendingSave, SaveError> {
        self.reserve(request).map_err(|refused| {
            let (e, payload) = *refused;
            // Refused: the pack buffer serves the next pack.
            crate::tier::pool::give_back(payload);
            e
        })
    }

    /// [`Cache::begin_save`], handing a refused request's payload back.
    fn reserve(&self, request: SaveRequest) -> Result<PendingSave, Refused> {
        let tier = request.tier;
        if !self.has_tier(tier) {
            return Err(Box::new((SaveError::TierDisabled(tier), request.payload)));
        }
        let key = request.key();
        // Header length does not depend on the payload bytes, so it is
        // measured without the CRC pass (which runs off the request path).
        let header_len =
            match build_header_for(&request.header_input(0), request.payload.len() as u64, 0) {
                Ok(header) => header.len() as u64,
                Err(e) => return Err(Box::new((e.into(), request.payload))),
            };
        let size = header_len + request.payload.len() as u64;
        if self
            .row(&key)
            .is_some_and(|r| r.status() != RowStatus::Writing)
        {
            self.counters().incr(Counter::DuplicateDropped);
            return Err(Box::new((SaveError::AlreadyPresent(key), request.payload)));
        }
        let Ok(permit) = self.acquire_permit(request.reason) else {
            self.counters().incr(Counter::SavesDropped);
            return Err(Box::new((SaveError::MaxConcurrent, request.payload)));
        };
        let token = match self.reserve_key(
            key,
            tier,
            size,
            Arc::clone(&request.tokens),
            request.reason,
            request.identity.context_size,
        ) {
            Ok(token) => token,
            Err(e) => return Err(Box::new((e, request.payload))),
        };
        Ok(PendingSave {
            cache: self.clone(),
            key,
            token,
            reserved: size,
            request_tier: request.tier,
            body: Some(Body::Request(request)),
            linked: None,
            _permit: Some(permit),
            done: false,
            pin: None,
        })
    }

    /// Publish step 1 for `key` (size bytes in `tier`): the key is
    /// reserved and a `writing` placeholder row inserted.
    fn reserve_key(
        &self,
        key: CacheKey,
        tier: TierKind,
        size: u64,
        tokens: Arc<[u32]>,
        reason: SaveReason,
        context_size: u32,
    ) -> Result<u64, SaveError> {
        let mut st = self.lock();
        self.sweep_locked(&mut st, Instant::now());
        if let Some(row) = self.row(&key) {
            if row.status() == RowStatus::Writing {
                return Err(SaveError::Conflict(key));
            }
            self.counters().incr(Counter::DuplicateDropped);
            return Err(SaveError::AlreadyPresent(key));
        }
        if !self.make_room_locked(&mut st, tier, size) {
            self.counters().incr(Counter::SavesDropped);
            return Err(SaveError::NoSpace {
                tier,
                size,
                quota: self.quota(tier),
            });
        }
        st.next_token += 1;
        let token = st.next_token;
        st.reserved[tier.index()] += size;
        st.reservations.insert(
            key,
            Reservation {
                token,
                tier,
                size,
                deadline: Instant::now() + self.config().reservation_ttl,
            },
        );
        let row = self.new_writing_row(key, tier, tokens, reason, context_size, size);
        self.insert_row_locked(row);
        Ok(token)
    }

    /// A row fetched from the remote tier, stored in `tier` through the
    /// publish protocol (no writer-pool slot: it is on the request path
    /// and replaces a restore). `kvc` was validated as the row of `key`.
    pub(crate) fn import(
        &self,
        key: CacheKey,
        tier: TierKind,
        kvc: Vec<u8>,
        meta: &crate::kvc::KvcMeta,
    ) -> Result<SaveOutcome, SaveError> {
        if !self.has_tier(tier) {
            return Err(SaveError::TierDisabled(tier));
        }
        let start = usize::try_from(meta.payload_offset).unwrap_or(kvc.len());
        let token = self.reserve_key(
            key,
            tier,
            kvc.len() as u64,
            Arc::from(&meta.tokens[..]),
            meta.save_reason,
            meta.context_size,
        )?;
        PendingSave {
            cache: self.clone(),
            key,
            token,
            reserved: kvc.len() as u64,
            request_tier: tier,
            body: Some(Body::Kvc {
                bytes: kvc,
                start,
                reason: meta.save_reason,
            }),
            linked: None,
            _permit: None,
            done: false,
            pin: None,
        }
        .run()
    }

    /// [`Cache::begin_save`] then [`PendingSave::run`] on this thread.
    ///
    /// # Errors
    ///
    /// As both.
    pub fn save(&self, request: SaveRequest) -> Result<SaveOutcome, SaveError> {
        self.begin_save(request)?.run()
    }

    /// docs/tiers.md, publish step 3: ok while the reservation is live (refreshing its
    /// TTL).
    fn check_locked(&self, st: &mut WriterState, key: &CacheKey, token: u64) -> bool {
        let ttl = self.config().reservation_ttl;
        match st.reservations.get_mut(key) {
            Some(r) if r.token == token && Instant::now() <= r.deadline => {
                r.deadline = Instant::now() + ttl;
                true
            }
            _ => false,
        }
    }

    fn end_reservation_locked(&self, st: &mut WriterState, key: &CacheKey) -> Option<Reservation> {
        let r = st.reservations.remove(key)?;
        let reserved = &mut st.reserved[r.tier.index()];
        *reserved = reserved.saturating_sub(r.size);
        Some(r)
    }

    /// Cancels `token`'s reservation if it is still live: drops the
    /// placeholder row and wakes waiters.
    fn cancel(&self, key: &CacheKey, token: u64) {
        let mut st = self.lock();
        if st.reservations.get(key).is_some_and(|r| r.token == token) {
            self.end_reservation_locked(&mut st, key);
            self.remove_placeholder_locked(key);
        }
        drop(st);
        self.inner.published.notify_all();
    }

    /// The reservation sweep (docs/tiers.md): every reservation whose TTL has
    /// passed is ended; if its writer got as far as linking, the visible
    /// row is validated (full parse) and adopted, else any file is deleted
    /// and the placeholder dropped. Returns (adopted, removed).
    pub fn sweep(&self) -> (usize, usize) {
        self.sweep_at(Instant::now())
    }

    /// [`Cache::sweep`] as if the time were `now` (for tests).
    pub fn sweep_at(&self, now: Instant) -> (usize, usize) {
        let mut st = self.lock();
        let counts = self.sweep_locked(&mut st, now);
        drop(st);
        self.inner.published.notify_all();
        counts
    }

    fn sweep_locked(&self, st: &mut WriterState, now: Instant) -> (usize, usize) {
        let expired: Vec<CacheKey> = st
            .reservations
            .iter()
            .filter(|(_, r)| r.deadline < now)
            .map(|(k, _)| *k)
            .collect();
        let (mut adopted, mut removed) = (0, 0);
        for key in expired {
            let Some(r) = self.end_reservation_locked(st, &key) else {
                continue;
            };
            let tier = self.tier(r.tier).expect("reserved tiers are configured");
            let row = self
                .row(&key)
                .filter(|row| row.status() == RowStatus::Writing);
            match (tier.validate_visible(&key), row) {
                (Visible::Valid(found), Some(row)) => {
                    self.publish_row_locked(st, &row, found.size);
                    adopted += 1;
                }
                (found, _) => {
                    match found {
                        Visible::Valid(_) => {
                            let _ = tier.remove(&key);
                        }
                        Visible::RemovedInvalid => self.counters().incr(Counter::CorruptFiles),
                        Visible::Absent => {}
                    }
                    self.remove_placeholder_locked(&key);
                    removed += 1;
                }
            }
        }
        (adopted, removed)
    }
}

impl PendingSave {
    /// The key being saved.
    #[must_use]
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// Bytes reserved for the row.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.reserved
    }

    /// Writes, checks, links and publishes (docs/tiers.md, publish steps 2–5).
    ///
    /// # Errors
    ///
    /// [`SaveError::Tier`] when writing or linking fails (nothing is left
    /// behind), [`SaveError::Expired`] when the reservation lapsed,
    /// [`SaveError::Build`] when the header cannot be built. Each is
    /// counted in `saves_failed`.
    pub fn run(self) -> Result<SaveOutcome, SaveError> {
        self.run_with_probe(&|_| {})
    }

    /// Pins the row for `ttl` from its publish ([`Cache::pin_for`]), in the
    /// same step: no eviction can come between.
    pub fn pin_on_publish(&mut self, ttl: std::time::Duration) {
        self.pin = Some(ttl);
    }

    /// [`PendingSave::run`], calling `probe` at each [`SaveStage`] (crash
    /// tests stop a writer process there). Every error is counted in
    /// `saves_failed`: the save held a reservation and did not publish.
    ///
    /// # Errors
    ///
    /// As [`PendingSave::run`].
    pub fn run_with_probe(mut self, probe: &dyn Fn(SaveStage)) -> Result<SaveOutcome, SaveError> {
        let result = self.write_and_publish(probe);
        if result.is_err() {
            self.cache.counters().incr(Counter::SavesFailed);
        }
        // Dropped here: after an error before the link the reservation is
        // cancelled (placeholder row dropped, waiters woken).
        result
    }

    fn write_and_publish(&mut self, probe: &dyn Fn(SaveStage)) -> Result<SaveOutcome, SaveError> {
        let body = self
            .body
            .take()
            .expect("a pending save runs once (run consumes it)");
        let cache = self.cache.clone();
        let tier_kind = self.request_tier;
        let tier = cache.tier(tier_kind).expect("checked in begin_save");
        probe(SaveStage::Reserved);
        let (staged, reason, mirror) = match body {
            Body::Request(request) => {
                let header = build_header(&request.header_input(unix_now()), &request.payload)?;
                let staged = tier.stage(&self.key, header, request.payload, probe)?;
                (staged, request.reason, true)
            }
            Body::Kvc {
                bytes,
                start,
                reason,
            } => (tier.stage_kvc(&self.key, bytes, start)?, reason, false),
        };
        // From here until the commit, an unwinding probe must not leave
        // staged bytes behind: the guard discards them on drop.
        let staged = StagedGuard {
            tier,
            staged: Some(staged),
        };
        probe(SaveStage::Staged);
        let live = {
            let mut st = cache.lock();
            cache.check_locked(&mut st, &self.key, self.token)
        };
        if !live {
            return Err(SaveError::Expired(self.key));
        }
        probe(SaveStage::Checked);
        // The directory's quota holds across processes: the check and the
        // link happen under its lock.
        let dir_lock = tier.lock_dir().map_err(|e| {
            SaveError::Tier(crate::tier::TierError::Fsio(crate::fsio::FsioError::Io {
                op: "lock the tier directory",
                path: cache.tier_dir(tier_kind).unwrap_or_default(),
                source: e,
            }))
        })?;
        if dir_lock.is_some() {
            cache.fit_directory(tier_kind, tier, &self.key, self.reserved)?;
        }
        let committed = tier.commit(&self.key, staged.take())?;
        drop(dir_lock);
        // Linked: from now on a drop publishes rather than cancels (the
        // bytes are valid and in place).
        self.linked = Some(committed.size);
        probe(SaveStage::Linked);
        self.publish(tier)?;
        if let Some(c) = save_counter(reason) {
            cache.counters().incr(c);
        }
        probe(SaveStage::Published);
        if mirror {
            cache.mirror_to_remote(tier_kind, &self.key, committed.size);
        }
        Ok(SaveOutcome {
            key: self.key,
            tier: tier_kind,
            size: committed.size,
            link: committed.outcome,
        })
    }

    /// docs/tiers.md, publish step 5, once the bytes are linked.
    fn publish(&mut self, tier: &dyn Tier) -> Result<(), SaveError> {
        let size = self.linked.expect("publish follows a link");
        let cache = self.cache.clone();
        let mut st = cache.lock();
        self.done = true;
        if !cache.check_locked(&mut st, &self.key, self.token) {
            // The sweep ended the reservation meanwhile, validating what
            // was visible then. If it dropped the row (the link came
            // later), the linked file is an orphan: remove it.
            if cache.row(&self.key).is_none() {
                let _ = tier.remove(&self.key);
            }
            return Err(SaveError::Expired(self.key));
        }
        cache.end_reservation_locked(&mut st, &self.key);
        let row = cache
            .row(&self.key)
            .filter(|r| r.status() == RowStatus::Writing)
            .expect("a live reservation keeps its placeholder row");
        cache.publish_row_locked(&mut st, &row, size);
        if let Some(ttl) = self.pin {
            cache.pin_published_locked(&mut st, &row, ttl);
        }
        drop(st);
        cache.inner.published.notify_all();
        Ok(())
    }
}

/// Staged bytes that are discarded when dropped before being taken.
struct StagedGuard<'a> {
    tier: &'a dyn Tier,
    staged: Option<Staged>,
}

impl StagedGuard<'_> {
    fn take(mut self) -> Staged {
        self.staged.take().expect("taken once")
    }
}

impl Drop for StagedGuard<'_> {
    fn drop(&mut self) {
        if let Some(staged) = self.staged.take() {
            self.tier.discard(staged);
        }
    }
}

impl Drop for PendingSave {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.linked.is_some() {
            let cache = self.cache.clone();
            if let Some(tier) = cache.tier(self.request_tier) {
                if self.publish(tier).is_err() {
                    cache.counters().incr(Counter::SavesFailed);
                }
            }
        } else {
            self.cache.cancel(&self.key, self.token);
        }
    }
}
