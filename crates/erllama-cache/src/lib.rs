//! erllama's token-exact KV cache, without llama.cpp or Python.
//!
//! Prompt prefill costs seconds; restoring the KV state it produced costs
//! milliseconds. This crate decides *which* state a request may reuse and
//! stores it so that a restore is never wrong: a row is found only under a
//! key that names the exact model bytes, quantisation, context layout and
//! token ids, and a file is only trusted after its framing, CRC and
//! recomputed key check out.
//!
//! Components (no async runtime needed: every call is synchronous and
//! thread-safe; the only global state is fsio's temp-name counter):
//!
//! - **key** (docs/cache-format.md): [`CacheKey`] and [`derive_key`] /
//!   [`KeyHasher`] (incremental, cheap keys for every prefix of a
//!   prompt); the [`QuantType`] byte table; model fingerprints
//!   ([`fingerprint_file_safe`], [`fingerprint_gguf_chunked`],
//!   [`fingerprint_fast_unsafe`]) and [`read_gguf_file_type`] over one
//!   small GGUF header reader; [`ctx_params_hash`]; and
//!   [`effective_fingerprint`] for LoRA adapter sets.
//! - **kvc** (docs/cache-format.md): the byte-exact KVC file codec —
//!   [`build_header`] returns the bytes before the payload so payloads are
//!   never copied; [`parse_meta`] / [`parse_meta_with_len`] check framing
//!   (startup scans read only the header) and [`parse_full`] adds the
//!   CRC32C and key checks (loads).
//! - **fsio** (docs/tiers.md, publish steps 2 and 4): tier file primitives —
//!   [`prepare_dir`] (private directory, proven writable by a probe file),
//!   [`write_temp`] (exclusive, private, synced), [`link_into_place`]
//!   (create-if-absent, adopt a valid existing file or replace an invalid
//!   one), the startup [`scan_dir`], [`read_file`] and the advisory
//!   [`write_hit_count`]; tier files are never opened through a symlink
//!   or unless they are regular files.
//! - **policy** (docs/policy.md): [`PolicyConfig`] with the defaults and
//!   its validation, and the pure save rules ([`cold_save_split`],
//!   [`should_continued_save`], [`should_finish_save`]) plus the
//!   longest-prefix probe walk ([`longest_prefix_probes`]).
//! - **semaphore** (docs/tiers.md, writer pool): [`WriterPool`], a counting
//!   semaphore bounding concurrent saves whose [`Permit`]s give their slot
//!   back on drop (also on panic), so no slot can leak; the limit can be
//!   changed at run time.
//! - **counters** (docs/counters.md): [`Counters`], one lock-free atomic per
//!   [`Counter`], readable as a map and resettable (the live-byte gauges
//!   survive a reset), with [`TimerGuard`] for the `*_ns` timings.
//! - **tier** (docs/tiers.md): the [`Tier`] trait and its three
//!   implementations — [`RamTier`] (in-process, zero-copy loads),
//!   [`RamFileTier`] (tmpfs files) and [`DiskTier`] (persistent files) —
//!   doing byte work only: stage (durable, invisible), commit (atomic
//!   link), load (full parse), remove.
//! - **meta** (docs/tiers.md): [`Cache`], the meta index with one writer lock
//!   for every mutation and lock-free reads ([`Cache::peek`],
//!   [`Cache::contains`], the probes of [`Cache::longest_prefix`]);
//!   [`Claim`]s pin rows until dropped; exact, exact-or-wait and
//!   longest-prefix lookups; quotas per tier with LRU eviction biased by
//!   persisted hit counts after a restart; `gc`, `evict_bytes`, `dump`.
//! - **writer** (docs/tiers.md): saves through the crash-safe publish protocol
//!   — [`Cache::begin_save`] (writer-pool slot + reservation, on the
//!   request path) then [`PendingSave::run`] (write temp + sync, check,
//!   link, publish, off the request path) — and the reservation sweep.
//! - **bench** (README, cache throughput): [`microbench`] and [`raw_baseline`], behind
//!   `cargo bench -p erllama-cache`.

mod bench;
mod counters;
mod fsio;
mod gguf;
mod key;
mod kvc;
mod lru;
mod meta;
mod policy;
mod remote;
mod semaphore;
mod tier;
mod writer;

pub use bench::{
    microbench, raw_baseline, raw_read, raw_write_fsync, touch_pages, BaselineKind,
    MicrobenchConfig, MicrobenchError, MicrobenchReport, RawBaseline,
};
pub use counters::{Counter, Counters, TimerGuard};
pub use fsio::{
    ensure_dir, final_path, link_into_place, list_rows, not_regular, prepare_dir, read_file,
    read_header, scan_dir, write_hit_count, write_temp, write_temp_probed, DirError, DirFile,
    DirLock, FsioError, LinkOutcome, NotRegularFile, ScanReport, ScannedFile,
};
pub use gguf::GgufError;
pub use key::{
    ctx_params_hash, derive_key, effective_fingerprint, fingerprint_fast_unsafe,
    fingerprint_file_safe, fingerprint_gguf_chunked, quant_byte_for_label, read_gguf_file_type,
    CacheKey, CtxParams, FingerprintMode, KeyError, KeyHasher, QuantType, CTX_PARAMS_ENCODING_TAG,
    UNKNOWN_QUANT_BYTE,
};
pub use kvc::{
    build_header, build_header_for, crc32c, encode_hit_count, header_len, parse_full, parse_meta,
    parse_meta_with_len, KvcBuildError, KvcError, KvcHeaderInput, KvcMeta, SaveReason,
    UnknownSaveReasonLabel, HEADER_FIXED_LEN, HIT_COUNT_OFFSET, KVC_MAGIC, KVC_VERSION,
    LOGIT_BYTES, PAYLOAD_OFFSET_OFFSET,
};
pub use meta::{
    Cache, CacheConfig, Claim, ClaimError, FileTierConfig, Lookup, OpenError, PinError,
    PrefixLookup, RowInfo, RowStatus, DEFAULT_RESERVATION_TTL, MAX_PIN_TTL, MAX_TIMED_PINS,
};
pub use policy::{
    cold_save_split, longest_prefix_probes, should_continued_save, should_finish_save,
    trim_boundary, validate_config, PolicyConfig, PolicyError,
};
pub use remote::{PutOutcome, Remote, RemoteConfig, RemoteError, RemoteRow, RemoteStats};
pub use semaphore::{Permit, PoolError, WriterPool};
pub use tier::{
    Committed, DiskTier, FileLoad, LoadError, Payload, RamFileTier, RamTier, Recovered, SaveStage,
    Staged, Tier, TierError, TierKind, UnknownTier, Visible,
};
pub use writer::{ModelIdentity, PendingSave, SaveError, SaveOutcome, SaveRequest};

/// An empty buffer with at least `len` bytes of capacity for packing a
/// save's payload: one of the cache's recycled buffers (already faulted
/// in) when one is large enough. A save hands it back when its bytes are
/// written, so a save on the request path allocates nothing. A new buffer
/// gets room for the row's KVC header too, so that loading the row back
/// from a file tier reuses it rather than faulting in a fresh one.
#[must_use]
pub fn pack_buffer(len: usize) -> Vec<u8> {
    tier::pool::take(len + len / 64 + (256 << 10))
}
