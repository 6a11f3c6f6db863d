//! erllama's token-exact KV cache, without llama.cpp or Python.
//!
//! Prompt prefill costs seconds; restoring the KV state it produced costs
//! milliseconds. This crate decides *which* state a request may reuse and
//! stores it so that a restore is never wrong: a row is found only under a
//! key that names the exact model bytes, quantisation, context layout and
//! token ids, and a file is only trusted after its framing, CRC and
//! recomputed key check out.
//!
//! Components (all pure or file-local; no async; the only global state is
//! fsio's temp-name counter):
//!
//! - **key** (SPEC §3.1): [`CacheKey`] and [`derive_key`] /
//!   [`KeyHasher`] (incremental, cheap keys for every prefix of a
//!   prompt); the [`QuantType`] byte table; model fingerprints
//!   ([`fingerprint_file_safe`], [`fingerprint_gguf_chunked`],
//!   [`fingerprint_fast_unsafe`]) and [`read_gguf_file_type`] over one
//!   small GGUF header reader; [`ctx_params_hash`]; and
//!   [`effective_fingerprint`] for LoRA adapter sets.
//! - **kvc** (SPEC §3.2): the byte-exact KVC file codec —
//!   [`build_header`] returns the bytes before the payload so payloads are
//!   never copied; [`parse_meta`] / [`parse_meta_with_len`] check framing
//!   (startup scans read only the header) and [`parse_full`] adds the
//!   CRC32C and key checks (loads).
//! - **fsio** (SPEC §3.3, §3.5 steps 2 and 4): tier file primitives —
//!   [`write_temp`] (exclusive, private, synced), [`link_into_place`]
//!   (create-if-absent, adopt a valid existing file or replace an invalid
//!   one), the startup [`scan_dir`], [`read_file`] and the advisory
//!   [`write_hit_count`].
//! - **policy** (SPEC §3.6, §3.7): [`PolicyConfig`] with the defaults and
//!   its validation, and the pure save rules ([`cold_save_split`],
//!   [`should_continued_save`], [`should_finish_save`]) plus the
//!   longest-prefix probe walk ([`longest_prefix_probes`]).
//! - **semaphore** (SPEC §3.5, writer pool): [`WriterPool`], a counting
//!   semaphore bounding concurrent saves whose [`Permit`]s give their slot
//!   back on drop (also on panic), so no slot can leak; the limit can be
//!   changed at run time.
//! - **counters** (SPEC §3.8): [`Counters`], one lock-free atomic per
//!   [`Counter`], readable as a map and resettable (the live-byte gauges
//!   survive a reset), with [`TimerGuard`] for the `*_ns` timings.

mod counters;
mod fsio;
mod gguf;
mod key;
mod kvc;
mod policy;
mod semaphore;

pub use counters::{Counter, Counters, TimerGuard};
pub use fsio::{
    ensure_dir, final_path, link_into_place, read_file, scan_dir, write_hit_count, write_temp,
    FsioError, LinkOutcome, ScanReport, ScannedFile,
};
pub use gguf::GgufError;
pub use key::{
    ctx_params_hash, derive_key, effective_fingerprint, fingerprint_fast_unsafe,
    fingerprint_file_safe, fingerprint_gguf_chunked, quant_byte_for_label, read_gguf_file_type,
    CacheKey, CtxParams, FingerprintMode, KeyError, KeyHasher, QuantType, CTX_PARAMS_ENCODING_TAG,
    UNKNOWN_QUANT_BYTE,
};
pub use kvc::{
    build_header, crc32c, encode_hit_count, header_len, parse_full, parse_meta,
    parse_meta_with_len, KvcBuildError, KvcError, KvcHeaderInput, KvcMeta, SaveReason,
    UnknownSaveReasonLabel, HEADER_FIXED_LEN, HIT_COUNT_OFFSET, KVC_MAGIC, KVC_VERSION,
    PAYLOAD_OFFSET_OFFSET,
};
pub use policy::{
    cold_save_split, longest_prefix_probes, should_continued_save, should_finish_save,
    trim_boundary, validate_config, PolicyConfig, PolicyError,
};
pub use semaphore::{Permit, PoolError, WriterPool};
