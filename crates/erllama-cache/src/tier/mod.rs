//! The three storage tiers behind one trait (docs/tiers.md).
//!
//! A tier stores whole KVC rows (header ‖ payload) under their key. It
//! knows nothing about quotas, LRU, pins or reservations: the meta index
//! ([`Cache`](crate::Cache)) owns those and calls the tier for the byte
//! work only. Every tier follows the same two-step write so the publish
//! protocol of docs/tiers.md is tier-independent: [`Tier::stage`] makes the
//! bytes durable but invisible (a synced temp file, or an owned buffer),
//! [`Tier::commit`] makes them visible under the key atomically.
//!
//! - [`RamTier`]: an in-process store of `Arc` rows; loads hand out a
//!   shared reference to the payload (no copy).
//! - [`RamFileTier`]: files in a tmpfs directory read through `mmap`
//!   (shared between processes, survives a model restart).
//! - [`DiskTier`]: files on persistent storage, read with `pread`.

mod disk;
mod file;
mod ram;
mod ramfile;

use std::fmt;
use std::io;
use std::ops::Deref;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

pub use disk::DiskTier;
pub use file::FileLoad;
pub use ram::RamTier;
pub use ramfile::RamFileTier;

use crate::fsio::{DirError, FsioError, LinkOutcome};
use crate::key::CacheKey;
use crate::kvc::{KvcError, KvcMeta};

/// Which tier a row lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierKind {
    /// In-process slab store.
    Ram,
    /// Files on tmpfs, read through mmap.
    RamFile,
    /// Files on persistent storage.
    Disk,
}

impl TierKind {
    /// Every tier, fastest first.
    pub const ALL: [TierKind; 3] = [TierKind::Ram, TierKind::RamFile, TierKind::Disk];

    /// `"ram"`, `"ram_file"` or `"disk"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            TierKind::Ram => "ram",
            TierKind::RamFile => "ram_file",
            TierKind::Disk => "disk",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A tier label that is not `ram`, `ram_file` or `disk`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier {0:?} (expected ram, ram_file or disk)")]
pub struct UnknownTier(pub String);

impl FromStr for TierKind {
    type Err = UnknownTier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ram" => Ok(TierKind::Ram),
            "ram_file" => Ok(TierKind::RamFile),
            "disk" => Ok(TierKind::Disk),
            other => Err(UnknownTier(other.to_owned())),
        }
    }
}

/// A row's stored bytes as handed out by a load: the payload without its
/// KVC header — the stored logits, if the row has them (TLV 0x0A), then
/// the opaque sequence state. Dereferences to the whole payload.
///
/// A file load's buffer goes back to a small pool when the payload is
/// dropped, so the next load of a similar size reuses memory that is
/// already faulted in instead of paying a page fault per 4 KiB.
pub struct Payload {
    repr: PayloadRepr,
    /// Bytes of logits at the start of the payload.
    logits: usize,
}

impl Clone for Payload {
    fn clone(&self) -> Self {
        let repr = match &self.repr {
            PayloadRepr::Shared(row) => PayloadRepr::Shared(Arc::clone(row)),
            PayloadRepr::Owned { buf, start } => PayloadRepr::Owned {
                buf: buf.clone(),
                start: *start,
            },
            PayloadRepr::Mapped { map, start } => PayloadRepr::Mapped {
                map: Arc::clone(map),
                start: *start,
            },
        };
        Payload {
            repr,
            logits: self.logits,
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let PayloadRepr::Owned { buf, .. } = &mut self.repr {
            pool::give_back(std::mem::take(buf));
        }
    }
}

/// Recycled load and pack buffers (at most a few, bounded in bytes): a
/// buffer taken from here is already faulted in.
pub(crate) mod pool {
    use std::sync::Mutex;

    const MAX_BUFFERS: usize = 4;
    const MAX_BYTES: usize = 1 << 30;

    static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// An empty buffer with at least `len` bytes of capacity, reused when
    /// one is pooled.
    pub fn take(len: usize) -> Vec<u8> {
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The smallest pooled buffer that fits.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = pool.swap_remove(i);
                b.clear();
                b
            }
            None => fresh(len),
        }
    }

    /// A new empty buffer of `len` bytes' capacity. A large one asks the
    /// kernel for transparent huge pages (`MADV_HUGEPAGE`, honoured when
    /// THP is `madvise` or `always`): filling it then costs one fault per
    /// 2 MiB instead of one per 4 KiB (a 47 MB row: about 20 faults, not
    /// 11 500), which is most of what writing fresh memory costs.
    pub fn fresh(len: usize) -> Vec<u8> {
        const HUGE: usize = 2 << 20;
        let v: Vec<u8> = Vec::with_capacity(len);
        if len >= 2 * HUGE {
            let start = v.as_ptr() as usize;
            let first = start.next_multiple_of(HUGE);
            let end = (start + len) / HUGE * HUGE;
            if end > first {
                // SAFETY: [first, end) lies inside the allocation just made
                // (page aligned); MADV_HUGEPAGE only changes how the
                // kernel backs it, never its contents, and failure is
                // harmless (the advice is ignored).
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
                }
            }
        }
        v
    }

    /// Keeps `buf` for a later [`take`] (within the pool's bounds; else
    /// it is freed).
    pub fn give_back(buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + buf.capacity() > MAX_BYTES {
            // Keep the larger buffers: drop the smallest if it is smaller.
            if let Some((i, _)) = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .filter(|(_, b)| b.capacity() < buf.capacity())
            {
                pool.swap_remove(i);
            } else {
                return;
            }
        }
        if pool.len() >= MAX_BUFFERS {
            let (i, _) = pool
                .iter()
                .enumerate()
                .min_by_key(|(_, b)| b.capacity())
                .expect("non-empty");
            if pool[i].capacity() >= buf.capacity() {
                return;
            }
            pool.swap_remove(i);
        }
        pool.push(buf);
    }
}

enum PayloadRepr {
    /// A RAM row, shared with the store (no copy).
    Shared(Arc<RamRow>),
    /// A whole file read into memory; the payload starts at `start`.
    Owned { buf: Vec<u8>, start: usize },
    /// A whole file mapped ([`crate::FileLoad::Mmap`]), validated on the
    /// mapping; the payload starts at `start`. No copy: a restore reads
    /// the page cache directly.
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
    },
}

impl Payload {
    pub(crate) fn shared(row: Arc<RamRow>) -> Self {
        let logits = row.logits;
        Payload {
            repr: PayloadRepr::Shared(row),
            logits,
        }
    }

    /// The payload at `buf[start..]`, of which the first `logits` bytes are
    /// stored logits.
    pub(crate) fn owned(buf: Vec<u8>, start: usize, logits: usize) -> Self {
        debug_assert!(start + logits <= buf.len());
        Payload {
            repr: PayloadRepr::Owned { buf, start },
            logits,
        }
    }

    /// The payload at `map[start..]` (a validated file mapping).
    pub(crate) fn mapped(map: memmap2::Mmap, start: usize, logits: usize) -> Self {
        debug_assert!(start + logits <= map.len());
        Payload {
            repr: PayloadRepr::Mapped {
                map: Arc::new(map),
                start,
            },
            logits,
        }
    }

    /// Whether the bytes are a file mapping rather than a copy.
    #[must_use]
    pub fn is_mapped(&self) -> bool {
        matches!(self.repr, PayloadRepr::Mapped { .. })
    }

    /// The whole KVC row these bytes come from: header, then payload
    /// (what the remote tier stores).
    #[must_use]
    pub fn kvc(&self) -> &[u8] {
        match &self.repr {
            PayloadRepr::Shared(row) => &row.bytes,
            PayloadRepr::Owned { buf, .. } => buf,
            PayloadRepr::Mapped { map, .. } => map,
        }
    }

    /// Whether the bytes are shared with the RAM store rather than a copy.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        matches!(self.repr, PayloadRepr::Shared(_))
    }

    /// The sequence state (the payload after any stored logits).
    #[must_use]
    pub fn state(&self) -> &[u8] {
        &self[self.logits..]
    }

    /// The stored logits as little-endian `f32` bytes, when the row has
    /// them (the scores of the token after the row's tokens).
    #[must_use]
    pub fn logits_le(&self) -> Option<&[u8]> {
        (self.logits > 0).then(|| &self[..self.logits])
    }

    /// The stored logits decoded into `out` (cleared first); false when the
    /// row has none.
    pub fn logits_into(&self, out: &mut Vec<f32>) -> bool {
        out.clear();
        let Some(bytes) = self.logits_le() else {
            return false;
        };
        out.extend(
            bytes
                .chunks_exact(crate::kvc::LOGIT_BYTES)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        true
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.repr {
            PayloadRepr::Shared(row) => &row.bytes[row.start..],
            PayloadRepr::Owned { buf, start } => &buf[*start..],
            PayloadRepr::Mapped { map, start } => &map[*start..],
        }
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("len", &self.len())
            .field("logits", &self.logits)
            .field("shared", &self.is_shared())
            .finish()
    }
}

/// One row of the RAM store: the whole KVC file (header, then payload at
/// `start`), owned in one buffer.
#[derive(Debug)]
pub struct RamRow {
    pub(crate) bytes: Vec<u8>,
    /// Where the payload starts (the header's length).
    pub(crate) start: usize,
    /// Bytes of logits at the start of the payload.
    pub(crate) logits: usize,
}

/// Bytes made durable but not yet visible under their key (docs/tiers.md
/// step 2), produced by [`Tier::stage`] and consumed by [`Tier::commit`]
/// or [`Tier::discard`].
#[derive(Debug)]
pub enum Staged {
    /// A RAM row waiting to be inserted.
    Ram(Arc<RamRow>),
    /// A synced temp file next to the final path.
    File(PathBuf),
}

/// A row found by a file tier's startup scan (or the orphan sweep).
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The key recomputed from the file's contents.
    pub key: CacheKey,
    /// The parsed header.
    pub meta: KvcMeta,
    /// The file's length in bytes.
    pub size: u64,
}

/// What [`Tier::validate_visible`] found under a key.
#[derive(Debug, Clone)]
pub enum Visible {
    /// Nothing.
    Absent,
    /// A fully valid row.
    Valid(Box<Recovered>),
    /// An invalid row, now removed.
    RemovedInvalid,
}

/// A stage of a save, reported to the probe of
/// [`PendingSave::run_with_probe`](crate::PendingSave::run_with_probe) so
/// crash tests can kill a writer at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveStage {
    /// The reservation is held; nothing is written yet.
    Reserved,
    /// File tiers: the temp file holds the header but not the payload.
    TempPartial,
    /// The staged bytes are complete and synced.
    Staged,
    /// The reservation check passed.
    Checked,
    /// The bytes are visible under the key (linked or inserted).
    Linked,
    /// The row is published and available.
    Published,
}

/// Why a tier operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// A file operation failed.
    #[error(transparent)]
    Fsio(#[from] FsioError),
    /// A file tier's directory cannot hold the tier (it cannot be created
    /// or made private, or the probe file failed).
    #[error("directory {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: DirError,
    },
    /// An I/O call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl TierError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        TierError::Io { op, source }
    }
}

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The row's bytes are gone (file removed or truncated underneath, RAM
    /// row evicted).
    #[error("row {key} is gone from tier {tier}: {reason}")]
    Missing {
        /// The key.
        key: CacheKey,
        /// The tier.
        tier: TierKind,
        /// What was found instead.
        reason: String,
    },
    /// The bytes failed the full parse (CRC, key, framing).
    #[error("row {key} in tier {tier} is corrupt: {error}")]
    Corrupt {
        /// The key.
        key: CacheKey,
        /// The tier.
        tier: TierKind,
        /// The parse error.
        error: KvcError,
    },
    /// An I/O call failed.
    #[error("reading row {key} from tier {tier}: {source}")]
    Io {
        /// The key.
        key: CacheKey,
        /// The tier.
        tier: TierKind,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What [`Tier::commit`] did and how many bytes the visible row holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Link outcome (RAM rows are always [`LinkOutcome::Linked`]).
    pub outcome: LinkOutcome,
    /// Size of the row now visible (the existing file's when adopted).
    pub size: u64,
}

/// One storage tier: byte work only (see the module docs).
///
/// Implementations must be safe to call from many threads at once; the
/// index guarantees that at most one save per key is in flight and that
/// a key is not removed while it is being loaded.
pub trait Tier: Send + Sync + fmt::Debug {
    /// Which tier this is.
    fn kind(&self) -> TierKind;

    /// The directory of a file tier.
    fn dir(&self) -> Option<&std::path::Path> {
        None
    }

    /// Startup recovery: file tiers make their directory private, prove
    /// they can write in it (a probe file) and scan it (docs/tiers.md); the
    /// RAM tier starts empty. Returns the registered rows and how many
    /// files were deleted as invalid.
    ///
    /// # Errors
    ///
    /// [`TierError::Dir`] when the directory cannot hold the tier; another
    /// [`TierError`] when it cannot be listed or cleaned.
    fn recover(&self) -> Result<(Vec<Recovered>, usize), TierError>;

    /// docs/tiers.md, publish step 2: makes `header ‖ payload` durable but invisible.
    /// `probe` is called with [`SaveStage::TempPartial`] between header
    /// and payload by file tiers.
    ///
    /// # Errors
    ///
    /// [`TierError`] on a failed write or sync (nothing is left behind).
    fn stage(
        &self,
        key: &CacheKey,
        header: Vec<u8>,
        payload: Vec<u8>,
        probe: &dyn Fn(SaveStage),
    ) -> Result<Staged, TierError>;

    /// [`Tier::stage`] for a whole KVC row already in one buffer (the
    /// payload at `start`): a row fetched from the remote tier. The RAM
    /// tier keeps the buffer itself (no copy).
    ///
    /// # Errors
    ///
    /// As [`Tier::stage`].
    fn stage_kvc(&self, key: &CacheKey, bytes: Vec<u8>, start: usize) -> Result<Staged, TierError>;

    /// docs/tiers.md, publish step 4: makes staged bytes visible under `key`
    /// atomically (create-if-absent; adopt a valid existing row, replace
    /// an invalid one).
    ///
    /// # Errors
    ///
    /// [`TierError`] when the link fails (the staged bytes are removed).
    fn commit(&self, key: &CacheKey, staged: Staged) -> Result<Committed, TierError>;

    /// Drops staged bytes that will not be committed.
    fn discard(&self, staged: Staged);

    /// Reads `key`'s payload, running the full parse for files.
    /// `expected_size` is the row's size as registered.
    ///
    /// # Errors
    ///
    /// [`LoadError`]; a corrupt row is reported as such and left for the
    /// index to remove.
    fn load(&self, key: &CacheKey, expected_size: u64) -> Result<Payload, LoadError>;

    /// Removes `key`'s bytes; absent bytes are not an error.
    ///
    /// # Errors
    ///
    /// [`TierError`] when a file cannot be removed.
    fn remove(&self, key: &CacheKey) -> Result<(), TierError>;

    /// Persists a new hit count (file tiers: 4 bytes at offset 12,
    /// advisory, not synced, never through a symlink).
    fn record_hits(&self, key: &CacheKey, hits: u32);

    /// The orphan sweep: is there a visible, fully valid row for `key`?
    /// An invalid one is removed (for files: also a symlink or another
    /// non-regular file, whose entry is unlinked, never followed).
    fn validate_visible(&self, key: &CacheKey) -> Visible;

    /// Whether something is visible under `key`'s name (one `stat`; file
    /// tiers only): a row another process published here since this
    /// index was built ([`crate::Cache::lookup`] adopts it).
    fn visible(&self, key: &CacheKey) -> bool {
        let _ = key;
        false
    }

    /// File tiers: the directory's lock, held by a save while it fits the
    /// directory's bytes to the quota and links its file, in turn with the
    /// saves of every other process (`None`: the tier is not a directory).
    ///
    /// # Errors
    ///
    /// The lock file cannot be opened or locked.
    fn lock_dir(&self) -> std::io::Result<Option<crate::fsio::DirLock>> {
        Ok(None)
    }

    /// File tiers: the published row files in the directory, whoever
    /// wrote them.
    fn dir_rows(&self) -> Vec<crate::fsio::DirFile> {
        Vec::new()
    }
}
