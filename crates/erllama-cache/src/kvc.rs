//! The KVC file codec (docs/cache-format.md): a fixed 72-byte header with trailer,
//! a prompt section, a TLV section, then the opaque payload.
//!
//! The same framing is used by every tier, including the RAM slab, so a
//! row can move between tiers byte for byte. The builder returns only the
//! bytes before the payload, so a multi-GB payload is never copied into a
//! bigger buffer; the parser checks framing first (cheap, used by startup
//! scans over header prefixes) and the payload CRC and key only on load.
//!
//! Layout (little-endian, no padding):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 3 | magic `KVC` |
//! | 3 | 1 | version = 1 |
//! | 4 | 1 | quant_bits |
//! | 5 | 1 | save_reason |
//! | 6 | 2 | reserved 0 |
//! | 8 | 4 | cached_token_count |
//! | 12 | 4 | hit_count |
//! | 16 | 4 | context_size |
//! | 20 | 4 | reserved 0 |
//! | 24 | 8 | creation_time |
//! | 32 | 8 | last_used_time |
//! | 40 | 8 | payload_byte_count |
//! | 48 | 8 | payload_offset |
//! | 56 | 8 | payload_length |
//! | 64 | 4 | CRC32C of the payload |
//! | 68 | 4 | reserved 0 |
//! | 72 | 4+N | prompt: u32 length + UTF-8 |
//! | … | 4+M | TLVs: u32 total length + (u8 tag, u32 length, value)* |
//!
//! A payload may end with the logits of the token after the row's tokens
//! (TLV 0x0A gives their count); the CRC covers them with the state.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::key::{CacheKey, FingerprintMode, KeyHasher, QuantType};

/// Magic bytes at offset 0.
pub const KVC_MAGIC: [u8; 3] = *b"KVC";
/// The only format version (byte 3).
pub const KVC_VERSION: u8 = 1;
/// Length of the fixed header including the trailer; the prompt section
/// starts here. Read this much first, then the rest of the header up to
/// `payload_offset` (bytes 48..56).
pub const HEADER_FIXED_LEN: usize = 72;
/// Offset of the u32 LE hit count, rewritten in place on hits (the CRC
/// covers only the payload, so the file stays valid).
pub const HIT_COUNT_OFFSET: usize = 12;
/// Offset of the u64 LE `payload_offset` field in the trailer.
pub const PAYLOAD_OFFSET_OFFSET: usize = 48;

/// Bytes before the trailer; shorter input is a bad header.
const PRE_TRAILER_LEN: usize = 48;

const TAG_FINGERPRINT: u8 = 0x01;
const TAG_FINGERPRINT_MODE: u8 = 0x02;
const TAG_QUANT_TYPE: u8 = 0x03;
const TAG_CTX_PARAMS_HASH: u8 = 0x04;
const TAG_HOSTNAME: u8 = 0x05;
const TAG_WRITER_VERSION: u8 = 0x06;
const TAG_SAVE_REASON_DETAIL: u8 = 0x07;
const TAG_TOKEN_COUNT: u8 = 0x08;
const TAG_TOKEN_IDS: u8 = 0x09;
const TAG_LOGITS: u8 = 0x0A;

/// Bytes of one stored logit (an `f32`, little-endian).
pub const LOGIT_BYTES: usize = 4;

/// Why a row was saved (header byte 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SaveReason {
    /// Not recorded.
    Unknown = 0,
    /// After a cold prefill, of the trimmed-aligned prefix.
    Cold = 1,
    /// Every `continued_interval` generated tokens.
    Continued = 2,
    /// The model gave up its context (pressure, API).
    Evict = 3,
    /// Unload or engine shutdown.
    Shutdown = 4,
    /// End of a request.
    Finish = 5,
}

impl SaveReason {
    /// Every reason, in byte order.
    pub const ALL: [SaveReason; 6] = [
        SaveReason::Unknown,
        SaveReason::Cold,
        SaveReason::Continued,
        SaveReason::Evict,
        SaveReason::Shutdown,
        SaveReason::Finish,
    ];

    /// The header byte.
    #[must_use]
    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    /// The reason of a header byte.
    ///
    /// # Errors
    ///
    /// [`KvcError::UnknownSaveReason`] for bytes above 5.
    pub fn from_byte(byte: u8) -> Result<Self, KvcError> {
        Self::ALL
            .get(usize::from(byte))
            .copied()
            .ok_or(KvcError::UnknownSaveReason(byte))
    }

    /// `"unknown"`, `"cold"`, `"continued"`, `"evict"`, `"shutdown"` or
    /// `"finish"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            SaveReason::Unknown => "unknown",
            SaveReason::Cold => "cold",
            SaveReason::Continued => "continued",
            SaveReason::Evict => "evict",
            SaveReason::Shutdown => "shutdown",
            SaveReason::Finish => "finish",
        }
    }
}

impl fmt::Display for SaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Error of [`SaveReason::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown save reason {0:?}")]
pub struct UnknownSaveReasonLabel(pub String);

impl FromStr for SaveReason {
    type Err = UnknownSaveReasonLabel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.label().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownSaveReasonLabel(s.to_owned()))
    }
}

/// Errors from parsing a KVC file. The framing checks run in the order of
/// the variants (the documented order; the additions are marked), so the
/// first problem found is the one reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvcError {
    /// Shorter than the 48 bytes before the trailer, or no `KVC` magic.
    #[error("bad KVC header (short or bad magic)")]
    BadHeader,
    /// Version byte other than 1.
    #[error("unsupported KVC version {0}")]
    UnsupportedVersion(u8),
    /// Save reason byte above 5.
    #[error("unknown save reason byte {0}")]
    UnknownSaveReason(u8),
    /// Shorter than the 72-byte fixed header: no room for the trailer.
    #[error("bad KVC trailer (header shorter than 72 bytes)")]
    BadTrailer,
    /// (Addition.) A reserved field is not zero.
    #[error("reserved header field at byte {offset} is {value}, expected 0")]
    ReservedNotZero {
        /// Offset of the field.
        offset: usize,
        /// Its value.
        value: u32,
    },
    /// A section's u32 length prefix (or the prefix itself) runs past the
    /// header bytes available: `min(payload_offset, bytes given)`.
    #[error("{section} section at byte {offset} with length {length} overruns the header ending at byte {limit}")]
    BadLengthPrefixedSection {
        /// `"prompt"` or `"tlv"`.
        section: &'static str,
        /// Offset of the length prefix.
        offset: u64,
        /// The declared length (0 when the prefix itself does not fit).
        length: u64,
        /// End of the bytes available to the header.
        limit: u64,
    },
    /// (Addition.) The TLV section ends before `payload_offset`: the
    /// format has no padding.
    #[error("header sections end at byte {sections_end} but payload_offset is {payload_offset}")]
    HeaderGap {
        /// End of the TLV section.
        sections_end: u64,
        /// The trailer's payload offset.
        payload_offset: u64,
    },
    /// A TLV record is truncated or malformed (a known tag with the wrong
    /// value length, or a known tag twice).
    #[error("bad TLV record at byte {offset}: {reason}")]
    BadTlv {
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Fingerprint mode byte (TLV 0x02) above 2.
    #[error("unknown fingerprint mode byte {0}")]
    UnknownFingerprintMode(u8),
    /// Quant type byte (TLV 0x03) above 29.
    #[error("unknown quant byte {0}")]
    UnknownQuantByte(u8),
    /// `payload_length` (trailer) differs from `payload_byte_count`.
    #[error(
        "payload_length {payload_length} differs from payload_byte_count {payload_byte_count}"
    )]
    PayloadLengthMismatch {
        /// Header field at offset 40.
        payload_byte_count: u64,
        /// Trailer field at offset 56.
        payload_length: u64,
    },
    /// The file is shorter than `payload_offset + payload_length`.
    #[error("truncated KVC file: {file_len} bytes, header says {expected_len}")]
    Truncated {
        /// `payload_offset + payload_length` (saturated).
        expected_len: u64,
        /// Actual file length.
        file_len: u64,
    },
    /// The file is longer than `payload_offset + payload_length`.
    #[error("trailing bytes after KVC payload: {file_len} bytes, header says {expected_len}")]
    TrailingBytes {
        /// `payload_offset + payload_length`.
        expected_len: u64,
        /// Actual file length.
        file_len: u64,
    },
    /// A required TLV is absent; the name is one of `fingerprint`,
    /// `fingerprint_mode`, `quant_type`, `ctx_params_hash`, `token_count`,
    /// `token_ids`.
    #[error("required TLV {0} is missing")]
    MissingTlv(&'static str),
    /// (Addition.) The header's `cached_token_count`, the token-count TLV
    /// and the number of token ids disagree.
    #[error("token counts disagree: header {cached_token_count}, TLV {tlv_token_count}, {token_ids} token ids")]
    TokenCountMismatch {
        /// Header field at offset 8.
        cached_token_count: u32,
        /// TLV 0x08.
        tlv_token_count: u32,
        /// Number of ids in TLV 0x09.
        token_ids: usize,
    },
    /// (Addition, TLV 0x0A.) The logits the TLV announces are more bytes
    /// than the payload holds.
    #[error(
        "logits section of {logits_bytes} bytes overruns the payload of {payload_length} bytes"
    )]
    LogitsOverrun {
        /// `4 × count` of the logits TLV.
        logits_bytes: u64,
        /// The payload length.
        payload_length: u64,
    },
    /// (Full parse.) The payload CRC32C differs from the trailer's.
    #[error("payload CRC32C mismatch: header {expected:#010x}, payload {actual:#010x}")]
    CrcMismatch {
        /// CRC stored in the trailer.
        expected: u32,
        /// CRC of the payload bytes.
        actual: u32,
    },
    /// (Full parse.) The key recomputed from the file is not the one
    /// asked for.
    #[error("key mismatch: expected {expected}, file holds {actual}")]
    KeyMismatch {
        /// The key the caller asked for.
        expected: CacheKey,
        /// The key recomputed from the file's fingerprint, quant, ctx hash
        /// and tokens.
        actual: CacheKey,
    },
}

impl KvcError {
    /// The documented snake_case name of the error (`"bad_header"`,
    /// `"crc_mismatch"`, …), for counters, logs and the Python mapping.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            KvcError::BadHeader => "bad_header",
            KvcError::UnsupportedVersion(_) => "unsupported_version",
            KvcError::UnknownSaveReason(_) => "unknown_save_reason",
            KvcError::BadTrailer => "bad_trailer",
            KvcError::ReservedNotZero { .. } => "reserved_not_zero",
            KvcError::BadLengthPrefixedSection { .. } => "bad_length_prefixed_section",
            KvcError::HeaderGap { .. } => "header_gap",
            KvcError::BadTlv { .. } => "bad_tlv",
            KvcError::UnknownFingerprintMode(_) => "unknown_fingerprint_mode",
            KvcError::UnknownQuantByte(_) => "unknown_quant_byte",
            KvcError::PayloadLengthMismatch { .. } => "payload_length_mismatch",
            KvcError::Truncated { .. } => "truncated",
            KvcError::TrailingBytes { .. } => "trailing_bytes",
            KvcError::MissingTlv(_) => "missing_tlv",
            KvcError::TokenCountMismatch { .. } => "token_count_mismatch",
            KvcError::LogitsOverrun { .. } => "logits_overrun",
            KvcError::CrcMismatch { .. } => "crc_mismatch",
            KvcError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

/// Errors from [`build_header`]: inputs too large for the format's u32
/// length fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvcBuildError {
    /// More tokens than the u32 length of the token-ids TLV can describe
    /// (at most 1 073 741 823).
    #[error("{count} tokens do not fit a KVC file (at most 1073741823)")]
    TooManyTokens {
        /// The number of tokens given.
        count: usize,
    },
    /// The logits announced are more bytes than the payload holds.
    #[error("{logits_bytes} bytes of logits do not fit a payload of {payload_length} bytes")]
    LogitsOverrun {
        /// `4 × logits_count`.
        logits_bytes: u64,
        /// The payload length.
        payload_length: u64,
    },
    /// The prompt text, a TLV value or the TLV section exceeds u32::MAX
    /// bytes.
    #[error("{section} of {len} bytes does not fit a u32 length")]
    SectionTooLarge {
        /// Which part.
        section: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Inputs of [`build_header`]. `cached_token_count` is `tokens.len()`;
/// payload length and CRC come from the payload.
#[derive(Clone, Debug)]
pub struct KvcHeaderInput<'a> {
    /// Nominal bits per weight of the model (header byte 4).
    pub quant_bits: u8,
    /// Why the row is saved.
    pub save_reason: SaveReason,
    /// Initial hit count.
    pub hit_count: u32,
    /// The context's n_ctx.
    pub context_size: u32,
    /// Unix seconds.
    pub creation_time: u64,
    /// Unix seconds.
    pub last_used_time: u64,
    /// The prompt text, for observability only (may be empty).
    pub prompt_text: &'a str,
    /// The model's effective fingerprint.
    pub fingerprint: [u8; 32],
    /// How the fingerprint was computed.
    pub fingerprint_mode: FingerprintMode,
    /// The model's quant type.
    pub quant_type: QuantType,
    /// [`ctx_params_hash`](crate::ctx_params_hash) of the context.
    pub ctx_params_hash: [u8; 32],
    /// `None` → this machine's hostname (omitted when it cannot be read);
    /// `Some("")` → omitted.
    pub hostname: Option<&'a str>,
    /// `None` → this crate's version; `Some("")` → omitted.
    pub writer_version: Option<&'a str>,
    /// Free text about the save; `None` or empty → omitted.
    pub save_reason_detail: Option<&'a str>,
    /// The token ids whose KV state the payload holds.
    pub tokens: &'a [u32],
    /// How many logits (`f32`, little-endian) end the payload: the scores
    /// of the token after `tokens` (TLV 0x0A); 0 → none, TLV omitted.
    pub logits_count: u32,
}

/// Everything a KVC header says, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvcMeta {
    /// Header byte 4.
    pub quant_bits: u8,
    /// Header byte 5.
    pub save_reason: SaveReason,
    /// Header offset 8; equals `tokens.len()`.
    pub cached_token_count: u32,
    /// Header offset 12.
    pub hit_count: u32,
    /// Header offset 16.
    pub context_size: u32,
    /// Unix seconds.
    pub creation_time: u64,
    /// Unix seconds.
    pub last_used_time: u64,
    /// Where the payload starts (= header length).
    pub payload_offset: u64,
    /// Payload length in bytes.
    pub payload_length: u64,
    /// CRC32C of the payload, as stored.
    pub payload_crc: u32,
    /// Prompt text (invalid UTF-8 replaced; never trusted).
    pub prompt_text: String,
    /// TLV 0x01.
    pub fingerprint: [u8; 32],
    /// TLV 0x02.
    pub fingerprint_mode: FingerprintMode,
    /// TLV 0x03.
    pub quant_type: QuantType,
    /// TLV 0x04.
    pub ctx_params_hash: [u8; 32],
    /// TLV 0x05, `None` when absent or empty.
    pub hostname: Option<String>,
    /// TLV 0x06, `None` when absent or empty.
    pub writer_version: Option<String>,
    /// TLV 0x07, `None` when absent or empty.
    pub save_reason_detail: Option<String>,
    /// TLV 0x09.
    pub tokens: Vec<u32>,
    /// TLV 0x0A: how many logits (`f32`, little-endian) end the payload
    /// (0 when absent: the payload is all sequence state).
    pub logits_count: u32,
}

impl KvcMeta {
    /// The key recomputed from the stored fingerprint, quant, ctx hash and
    /// tokens (what a startup scan registers the file under).
    #[must_use]
    pub fn key(&self) -> CacheKey {
        let mut hasher = KeyHasher::from_parts(
            &self.fingerprint,
            self.quant_type.to_byte(),
            &self.ctx_params_hash,
        );
        hasher.update(&self.tokens);
        hasher.finish()
    }

    /// Bytes of logits at the end of the payload.
    #[must_use]
    pub fn logits_bytes(&self) -> u64 {
        u64::from(self.logits_count) * LOGIT_BYTES as u64
    }

    /// The payload's byte range in the file.
    #[must_use]
    pub fn payload_range(&self) -> std::ops::Range<u64> {
        self.payload_offset..self.payload_offset.saturating_add(self.payload_length)
    }

    /// The last full-parse checks when the payload's CRC32C was computed
    /// elsewhere (e.g. while reading the file): CRC, then the key. The
    /// payload length must already be checked (the meta parse does that
    /// against the file length).
    ///
    /// # Errors
    ///
    /// [`KvcError::CrcMismatch`], then [`KvcError::KeyMismatch`].
    pub fn verify_crc_and_key(
        &self,
        actual_crc: u32,
        expected_key: &CacheKey,
    ) -> Result<(), KvcError> {
        if actual_crc != self.payload_crc {
            return Err(KvcError::CrcMismatch {
                expected: self.payload_crc,
                actual: actual_crc,
            });
        }
        let actual = self.key();
        if actual != *expected_key {
            return Err(KvcError::KeyMismatch {
                expected: *expected_key,
                actual,
            });
        }
        Ok(())
    }

    /// The full-parse checks for a payload read separately from its
    /// header: length, CRC32C, then the key.
    ///
    /// # Errors
    ///
    /// [`KvcError::Truncated`] / [`KvcError::TrailingBytes`] when the
    /// payload length differs from the header's,
    /// [`KvcError::CrcMismatch`], then [`KvcError::KeyMismatch`].
    pub fn verify_payload(&self, payload: &[u8], expected_key: &CacheKey) -> Result<(), KvcError> {
        let got = payload.len() as u64;
        if got != self.payload_length {
            let expected_len = self.payload_offset.saturating_add(self.payload_length);
            let file_len = self.payload_offset.saturating_add(got);
            return Err(if got < self.payload_length {
                KvcError::Truncated {
                    expected_len,
                    file_len,
                }
            } else {
                KvcError::TrailingBytes {
                    expected_len,
                    file_len,
                }
            });
        }
        let actual = crc32c(payload);
        if actual != self.payload_crc {
            return Err(KvcError::CrcMismatch {
                expected: self.payload_crc,
                actual,
            });
        }
        let actual = self.key();
        if actual != *expected_key {
            return Err(KvcError::KeyMismatch {
                expected: *expected_key,
                actual,
            });
        }
        Ok(())
    }
}

/// CRC32C (Castagnoli), hardware-accelerated where available.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The 4 bytes to write at [`HIT_COUNT_OFFSET`] to record `hits`.
#[must_use]
pub const fn encode_hit_count(hits: u32) -> [u8; 4] {
    hits.to_le_bytes()
}

/// This machine's hostname: `/proc/sys/kernel/hostname`, else
/// `/etc/hostname`, else `$HOSTNAME`; read once.
fn machine_hostname() -> Option<&'static str> {
    static HOSTNAME: OnceLock<Option<String>> = OnceLock::new();
    HOSTNAME
        .get_or_init(|| {
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .chain(std::env::var("HOSTNAME").ok())
                .map(|s| s.trim().to_owned())
                .find(|s| !s.is_empty())
        })
        .as_deref()
}

fn u32_len(section: &'static str, len: usize) -> Result<u32, KvcBuildError> {
    u32::try_from(len).map_err(|_| KvcBuildError::SectionTooLarge { section, len })
}

/// Builds the bytes before the payload: fixed header, trailer (with the
/// payload's CRC32C), prompt section and TLV section, in that order; its
/// length is `payload_offset`. TLVs are written in the order 01 02 03 04
/// 08 09 05 06 07 0A, empty optional ones left out. The payload is only
/// read (for its length and CRC), never copied.
///
/// # Errors
///
/// [`KvcBuildError`] when the tokens, prompt or a TLV do not fit the
/// format's u32 length fields, or the logits announced do not fit the
/// payload.
pub fn build_header(input: &KvcHeaderInput<'_>, payload: &[u8]) -> Result<Vec<u8>, KvcBuildError> {
    build_header_for(input, payload.len() as u64, crc32c(payload))
}

/// [`build_header`] for a payload of `payload_len` bytes whose CRC32C is
/// `crc` (computed elsewhere; any value when only the header's length is
/// wanted).
///
/// # Errors
///
/// As [`build_header`].
pub fn build_header_for(
    input: &KvcHeaderInput<'_>,
    payload_len: u64,
    crc: u32,
) -> Result<Vec<u8>, KvcBuildError> {
    let count = input.tokens.len();
    let token_bytes = count
        .checked_mul(4)
        .filter(|&n| u32::try_from(n).is_ok())
        .ok_or(KvcBuildError::TooManyTokens { count })?;
    let cached_token_count =
        u32::try_from(count).map_err(|_| KvcBuildError::TooManyTokens { count })?;

    let nonempty = |s: Option<&'static str>, given: Option<&str>| -> Option<String> {
        match given {
            Some(v) => Some(v.to_owned()),
            None => s.map(str::to_owned),
        }
        .filter(|v| !v.is_empty())
    };
    let hostname = nonempty(machine_hostname(), input.hostname);
    let writer_version = nonempty(Some(env!("CARGO_PKG_VERSION")), input.writer_version);
    let detail = nonempty(None, input.save_reason_detail);

    let mode = [input.fingerprint_mode.to_byte()];
    let quant = [input.quant_type.to_byte()];
    let token_count = cached_token_count.to_le_bytes();
    let logits_count = input.logits_count.to_le_bytes();
    let logits_bytes = u64::from(input.logits_count) * LOGIT_BYTES as u64;
    if logits_bytes > payload_len {
        return Err(KvcBuildError::LogitsOverrun {
            logits_bytes,
            payload_length: payload_len,
        });
    }
    let fixed: [(u8, &[u8]); 5] = [
        (TAG_FINGERPRINT, &input.fingerprint),
        (TAG_FINGERPRINT_MODE, &mode),
        (TAG_QUANT_TYPE, &quant),
        (TAG_CTX_PARAMS_HASH, &input.ctx_params_hash),
        (TAG_TOKEN_COUNT, &token_count),
    ];
    let optional = [
        (TAG_HOSTNAME, "hostname", hostname.as_deref()),
        (
            TAG_WRITER_VERSION,
            "writer version",
            writer_version.as_deref(),
        ),
        (
            TAG_SAVE_REASON_DETAIL,
            "save reason detail",
            detail.as_deref(),
        ),
    ];
    let mut tlv_len = fixed.iter().map(|(_, v)| 5 + v.len()).sum::<usize>() + 5 + token_bytes;
    if input.logits_count > 0 {
        tlv_len += 5 + logits_count.len();
    }
    for (_, section, value) in &optional {
        if let Some(v) = value {
            u32_len(section, v.len())?;
            tlv_len += 5 + v.len();
        }
    }
    let tlv_len_u32 = u32_len("TLV section", tlv_len)?;
    let prompt = input.prompt_text.as_bytes();
    let prompt_len = u32_len("prompt text", prompt.len())?;
    let header_len = HEADER_FIXED_LEN + 4 + prompt.len() + 4 + tlv_len;
    let mut out = Vec::with_capacity(header_len);
    out.extend_from_slice(&KVC_MAGIC);
    out.push(KVC_VERSION);
    out.push(input.quant_bits);
    out.push(input.save_reason.to_byte());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&cached_token_count.to_le_bytes());
    out.extend_from_slice(&input.hit_count.to_le_bytes());
    out.extend_from_slice(&input.context_size.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&input.creation_time.to_le_bytes());
    out.extend_from_slice(&input.last_used_time.to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    // Trailer.
    out.extend_from_slice(&(header_len as u64).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Prompt section.
    out.extend_from_slice(&prompt_len.to_le_bytes());
    out.extend_from_slice(prompt);
    // TLV section.
    out.extend_from_slice(&tlv_len_u32.to_le_bytes());
    let record = |out: &mut Vec<u8>, tag: u8, len: usize| {
        out.push(tag);
        // Every length was checked against u32 above.
        out.extend_from_slice(&(len as u32).to_le_bytes());
    };
    for (tag, value) in fixed {
        record(&mut out, tag, value.len());
        out.extend_from_slice(value);
    }
    record(&mut out, TAG_TOKEN_IDS, token_bytes);
    for t in input.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for (tag, _, value) in optional {
        if let Some(v) = value {
            record(&mut out, tag, v.len());
            out.extend_from_slice(v.as_bytes());
        }
    }
    if input.logits_count > 0 {
        record(&mut out, TAG_LOGITS, logits_count.len());
        out.extend_from_slice(&logits_count);
    }
    debug_assert_eq!(out.len(), header_len);
    Ok(out)
}

fn le_u32(b: &[u8; HEADER_FIXED_LEN], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le_u64(b: &[u8; HEADER_FIXED_LEN], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Reads a u32 at `off` if it ends by `limit`.
fn read_u32_at(bytes: &[u8], off: usize, limit: usize) -> Option<u32> {
    let end = off.checked_add(4).filter(|&e| e <= limit)?;
    bytes.get(off..end)?.try_into().ok().map(u32::from_le_bytes)
}

/// Reads a u32-length-prefixed section at `off`; returns (body range end,
/// body). The body must end by `limit`.
fn section<'b>(
    bytes: &'b [u8],
    off: usize,
    limit: usize,
    name: &'static str,
) -> Result<(usize, &'b [u8]), KvcError> {
    let overrun = |length: u64| KvcError::BadLengthPrefixedSection {
        section: name,
        offset: off as u64,
        length,
        limit: limit as u64,
    };
    let len = read_u32_at(bytes, off, limit).ok_or_else(|| overrun(0))?;
    let start = off + 4;
    let end = start
        .checked_add(len as usize)
        .filter(|&e| e <= limit)
        .ok_or_else(|| overrun(u64::from(len)))?;
    Ok((end, &bytes[start..end]))
}

/// Raw TLV values found, by tag.
#[derive(Default)]
struct Tlvs<'b> {
    fingerprint: Option<&'b [u8; 32]>,
    fingerprint_mode: Option<u8>,
    quant_type: Option<u8>,
    ctx_params_hash: Option<&'b [u8; 32]>,
    hostname: Option<&'b [u8]>,
    writer_version: Option<&'b [u8]>,
    save_reason_detail: Option<&'b [u8]>,
    token_count: Option<u32>,
    token_ids: Option<&'b [u8]>,
    logits_count: Option<u32>,
}

/// Stores a known tag's value (or the error saying its size is wrong); a
/// second value for one tag is a duplicate.
fn set<T>(slot: &mut Option<T>, value: Result<T, &'static str>) -> Result<(), &'static str> {
    if slot.replace(value?).is_some() {
        return Err("duplicate tag");
    }
    Ok(())
}

/// Frames the TLV records of `body` (which starts at file offset `base`):
/// every record complete, known tags with their fixed sizes, no known tag
/// twice. Unknown tags are skipped.
fn frame_tlvs(body: &[u8], base: usize) -> Result<Tlvs<'_>, KvcError> {
    let mut tlvs = Tlvs::default();
    let mut pos = 0;
    while pos < body.len() {
        let offset = (base + pos) as u64;
        let bad = |reason| KvcError::BadTlv { offset, reason };
        let tag = body[pos];
        let len =
            read_u32_at(body, pos + 1, body.len()).ok_or(bad("truncated record header"))? as usize;
        let start = pos + 5;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or(bad("value runs past the TLV section"))?;
        let value = &body[start..end];
        pos = end;

        let sized = |reason| move |_| reason;
        let result = match tag {
            TAG_FINGERPRINT => set(
                &mut tlvs.fingerprint,
                value
                    .try_into()
                    .map_err(sized("fingerprint must be 32 bytes")),
            ),
            TAG_FINGERPRINT_MODE => set(
                &mut tlvs.fingerprint_mode,
                <[u8; 1]>::try_from(value)
                    .map(|[b]| b)
                    .map_err(sized("fingerprint_mode must be 1 byte")),
            ),
            TAG_QUANT_TYPE => set(
                &mut tlvs.quant_type,
                <[u8; 1]>::try_from(value)
                    .map(|[b]| b)
                    .map_err(sized("quant_type must be 1 byte")),
            ),
            TAG_CTX_PARAMS_HASH => set(
                &mut tlvs.ctx_params_hash,
                value
                    .try_into()
                    .map_err(sized("ctx_params_hash must be 32 bytes")),
            ),
            TAG_HOSTNAME => set(&mut tlvs.hostname, Ok(value)),
            TAG_WRITER_VERSION => set(&mut tlvs.writer_version, Ok(value)),
            TAG_SAVE_REASON_DETAIL => set(&mut tlvs.save_reason_detail, Ok(value)),
            TAG_TOKEN_COUNT => set(
                &mut tlvs.token_count,
                value
                    .try_into()
                    .map(u32::from_le_bytes)
                    .map_err(sized("token_count must be 4 bytes")),
            ),
            TAG_TOKEN_IDS => set(
                &mut tlvs.token_ids,
                Some(value)
                    .filter(|v| v.len() % 4 == 0)
                    .ok_or("token_ids length must be a multiple of 4"),
            ),
            TAG_LOGITS => set(
                &mut tlvs.logits_count,
                value
                    .try_into()
                    .map(u32::from_le_bytes)
                    .map_err(sized("logits must be 4 bytes")),
            ),
            // Forward compatibility: newer writers may add tags.
            _ => Ok(()),
        };
        result.map_err(bad)?;
    }
    Ok(tlvs)
}

fn lossy(v: Option<&[u8]>) -> Option<String> {
    v.filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Checks the fixed 72 bytes (magic, version, save reason, trailer room,
/// reserved fields) in the documented order.
fn check_fixed(prefix: &[u8]) -> Result<(&[u8; HEADER_FIXED_LEN], SaveReason), KvcError> {
    if prefix.len() < PRE_TRAILER_LEN || prefix[..3] != KVC_MAGIC {
        return Err(KvcError::BadHeader);
    }
    if prefix[3] != KVC_VERSION {
        return Err(KvcError::UnsupportedVersion(prefix[3]));
    }
    let save_reason = SaveReason::from_byte(prefix[5])?;
    let fixed: &[u8; HEADER_FIXED_LEN] = prefix
        .get(..HEADER_FIXED_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(KvcError::BadTrailer)?;
    for (offset, value) in [
        (6, u32::from(u16::from_le_bytes([fixed[6], fixed[7]]))),
        (20, le_u32(fixed, 20)),
        (68, le_u32(fixed, 68)),
    ] {
        if value != 0 {
            return Err(KvcError::ReservedNotZero { offset, value });
        }
    }
    Ok((fixed, save_reason))
}

/// The header length (`payload_offset`) from the first
/// [`HEADER_FIXED_LEN`] bytes of a file, after checking those bytes: the
/// first step of reading just a header. The value comes from the file, so
/// cap what you read by the file length before allocating for it; the
/// meta parse then checks it properly.
///
/// # Errors
///
/// [`KvcError::BadHeader`], [`KvcError::UnsupportedVersion`],
/// [`KvcError::UnknownSaveReason`], [`KvcError::BadTrailer`] or
/// [`KvcError::ReservedNotZero`].
pub fn header_len(fixed: &[u8]) -> Result<u64, KvcError> {
    let (fixed, _) = check_fixed(fixed)?;
    Ok(le_u64(fixed, PAYLOAD_OFFSET_OFFSET))
}

/// Meta parse of a whole file: framing and TLVs, no CRC or key check.
/// Same as [`parse_meta_with_len`]`(bytes, bytes.len())`.
///
/// # Errors
///
/// See [`parse_meta_with_len`].
pub fn parse_meta(bytes: &[u8]) -> Result<KvcMeta, KvcError> {
    parse_meta_with_len(bytes, bytes.len() as u64)
}

/// Meta parse from the start of a file of `file_len` bytes: `prefix`
/// needs only the header (the first `payload_offset` bytes; read
/// [`HEADER_FIXED_LEN`] bytes, take `payload_offset` from bytes 48..56,
/// read the rest); more is ignored. A `prefix` longer than `file_len`
/// counts as the whole file. Checks, in order (first failure reported):
/// magic, version, save reason, trailer room, reserved fields, section
/// length prefixes, sections ending at `payload_offset`, TLV records,
/// fingerprint mode and quant bytes, payload length fields, file length
/// (truncated / trailing), required TLVs, token counts.
///
/// # Errors
///
/// Every [`KvcError`] variant up to [`KvcError::TokenCountMismatch`].
pub fn parse_meta_with_len(prefix: &[u8], file_len: u64) -> Result<KvcMeta, KvcError> {
    let file_len = file_len.max(prefix.len() as u64);
    let (fixed, save_reason) = check_fixed(prefix)?;
    let payload_byte_count = le_u64(fixed, 40);
    let payload_offset = le_u64(fixed, PAYLOAD_OFFSET_OFFSET);
    let payload_length = le_u64(fixed, 56);

    // Sections live in [72, payload_offset), limited by what was given.
    let limit = usize::try_from(payload_offset).map_or(prefix.len(), |p| p.min(prefix.len()));
    let (prompt_end, prompt) = section(prefix, HEADER_FIXED_LEN, limit, "prompt")?;
    let (tlv_end, tlv_body) = section(prefix, prompt_end, limit, "tlv")?;
    if tlv_end as u64 != payload_offset {
        return Err(KvcError::HeaderGap {
            sections_end: tlv_end as u64,
            payload_offset,
        });
    }
    let tlvs = frame_tlvs(tlv_body, prompt_end + 4)?;

    let fingerprint_mode = tlvs
        .fingerprint_mode
        .map(|b| FingerprintMode::from_byte(b).map_err(|_| KvcError::UnknownFingerprintMode(b)))
        .transpose()?;
    let quant_type = tlvs
        .quant_type
        .map(|b| QuantType::from_byte(b).map_err(|_| KvcError::UnknownQuantByte(b)))
        .transpose()?;

    if payload_length != payload_byte_count {
        return Err(KvcError::PayloadLengthMismatch {
            payload_byte_count,
            payload_length,
        });
    }
    let expected_len = payload_offset.saturating_add(payload_length);
    if file_len < expected_len {
        return Err(KvcError::Truncated {
            expected_len,
            file_len,
        });
    }
    if file_len > expected_len {
        return Err(KvcError::TrailingBytes {
            expected_len,
            file_len,
        });
    }

    let fingerprint = tlvs
        .fingerprint
        .ok_or(KvcError::MissingTlv("fingerprint"))?;
    let fingerprint_mode = fingerprint_mode.ok_or(KvcError::MissingTlv("fingerprint_mode"))?;
    let quant_type = quant_type.ok_or(KvcError::MissingTlv("quant_type"))?;
    let ctx_params_hash = tlvs
        .ctx_params_hash
        .ok_or(KvcError::MissingTlv("ctx_params_hash"))?;
    let tlv_token_count = tlvs
        .token_count
        .ok_or(KvcError::MissingTlv("token_count"))?;
    let token_ids = tlvs.token_ids.ok_or(KvcError::MissingTlv("token_ids"))?;

    let cached_token_count = le_u32(fixed, 8);
    let n_ids = token_ids.len() / 4;
    if tlv_token_count != cached_token_count || n_ids as u64 != u64::from(cached_token_count) {
        return Err(KvcError::TokenCountMismatch {
            cached_token_count,
            tlv_token_count,
            token_ids: n_ids,
        });
    }
    let logits_count = tlvs.logits_count.unwrap_or(0);
    let logits_bytes = u64::from(logits_count) * LOGIT_BYTES as u64;
    if logits_bytes > payload_length {
        return Err(KvcError::LogitsOverrun {
            logits_bytes,
            payload_length,
        });
    }
    let tokens = token_ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();

    Ok(KvcMeta {
        quant_bits: fixed[4],
        save_reason,
        cached_token_count,
        hit_count: le_u32(fixed, HIT_COUNT_OFFSET),
        context_size: le_u32(fixed, 16),
        creation_time: le_u64(fixed, 24),
        last_used_time: le_u64(fixed, 32),
        payload_offset,
        payload_length,
        payload_crc: le_u32(fixed, 64),
        prompt_text: String::from_utf8_lossy(prompt).into_owned(),
        fingerprint: *fingerprint,
        fingerprint_mode,
        quant_type,
        ctx_params_hash: *ctx_params_hash,
        hostname: lossy(tlvs.hostname),
        writer_version: lossy(tlvs.writer_version),
        save_reason_detail: lossy(tlvs.save_reason_detail),
        tokens,
        logits_count,
    })
}

/// Full parse of a whole file: the meta parse, then the payload's CRC32C,
/// then the key recomputed from the stored fingerprint, quant byte, ctx
/// hash and tokens compared with `expected_key`.
///
/// # Errors
///
/// Any meta-parse error, then [`KvcError::CrcMismatch`], then
/// [`KvcError::KeyMismatch`].
pub fn parse_full(bytes: &[u8], expected_key: &CacheKey) -> Result<KvcMeta, KvcError> {
    let meta = parse_meta(bytes)?;
    // The meta parse proved payload_offset + payload_length == bytes.len().
    let start = usize::try_from(meta.payload_offset).unwrap_or(bytes.len());
    let payload = bytes.get(start..).unwrap_or_default();
    meta.verify_payload(payload, expected_key)?;
    Ok(meta)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn input<'a>(tokens: &'a [u32], prompt: &'a str) -> KvcHeaderInput<'a> {
        KvcHeaderInput {
            quant_bits: 4,
            save_reason: SaveReason::Finish,
            hit_count: 3,
            context_size: 4096,
            creation_time: 1_700_000_000,
            last_used_time: 1_700_000_100,
            prompt_text: prompt,
            fingerprint: [0xAB; 32],
            fingerprint_mode: FingerprintMode::GgufChunked,
            quant_type: QuantType::Q4_K_M,
            ctx_params_hash: [0xCD; 32],
            hostname: Some("host-a"),
            writer_version: Some("9.9.9"),
            save_reason_detail: Some("test"),
            tokens,
            logits_count: 0,
        }
    }

    fn file(inp: &KvcHeaderInput<'_>, payload: &[u8]) -> Vec<u8> {
        let mut f = build_header(inp, payload).expect("build");
        f.extend_from_slice(payload);
        f
    }

    fn good() -> Vec<u8> {
        file(&input(&[1, 2, 3], "hi"), b"payload!")
    }

    /// Offset of the TLV section's length prefix in `good()`.
    const TLV_AT: usize = 72 + 4 + 2;

    fn set_u32(f: &mut [u8], off: usize, v: u32) {
        f[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u64(f: &mut [u8], off: usize, v: u64) {
        f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Replaces the TLV section of `good()` with `records`, fixing up
    /// payload_offset.
    fn with_tlvs(records: &[u8]) -> Vec<u8> {
        let g = good();
        let mut f = g[..TLV_AT].to_vec();
        f.extend_from_slice(&(records.len() as u32).to_le_bytes());
        f.extend_from_slice(records);
        let off = f.len() as u64;
        set_u64(&mut f, 48, off);
        f.extend_from_slice(b"payload!");
        f
    }

    fn rec(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut r = vec![tag];
        r.extend_from_slice(&(value.len() as u32).to_le_bytes());
        r.extend_from_slice(value);
        r
    }

    /// The six required records, minus the tags in `skip`.
    fn required(skip: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let ids: Vec<u8> = [1u32, 2, 3].iter().flat_map(|t| t.to_le_bytes()).collect();
        for (tag, value) in [
            (1, vec![0xAB; 32]),
            (2, vec![1]),
            (3, vec![7]),
            (4, vec![0xCD; 32]),
            (8, 3u32.to_le_bytes().to_vec()),
            (9, ids),
        ] {
            if !skip.contains(&tag) {
                out.extend(rec(tag, &value));
            }
        }
        out
    }

    pub(crate) fn key_of(tokens: &[u32]) -> CacheKey {
        crate::derive_key(
            &[0xAB; 32],
            QuantType::Q4_K_M.to_byte(),
            &[0xCD; 32],
            tokens,
        )
        .expect("key")
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn round_trip() {
        let f = good();
        let meta = parse_full(&f, &key_of(&[1, 2, 3])).expect("parse");
        assert_eq!(meta.quant_bits, 4);
        assert_eq!(meta.save_reason, SaveReason::Finish);
        assert_eq!(meta.cached_token_count, 3);
        assert_eq!(meta.hit_count, 3);
        assert_eq!(meta.context_size, 4096);
        assert_eq!(meta.creation_time, 1_700_000_000);
        assert_eq!(meta.last_used_time, 1_700_000_100);
        assert_eq!(meta.payload_length, 8);
        assert_eq!(meta.payload_offset as usize, f.len() - 8);
        assert_eq!(meta.payload_crc, crc32c(b"payload!"));
        assert_eq!(meta.prompt_text, "hi");
        assert_eq!(meta.fingerprint, [0xAB; 32]);
        assert_eq!(meta.fingerprint_mode, FingerprintMode::GgufChunked);
        assert_eq!(meta.quant_type, QuantType::Q4_K_M);
        assert_eq!(meta.ctx_params_hash, [0xCD; 32]);
        assert_eq!(meta.hostname.as_deref(), Some("host-a"));
        assert_eq!(meta.writer_version.as_deref(), Some("9.9.9"));
        assert_eq!(meta.save_reason_detail.as_deref(), Some("test"));
        assert_eq!(meta.tokens, vec![1, 2, 3]);
        assert_eq!(meta.key(), key_of(&[1, 2, 3]));
        assert_eq!(&f[meta.payload_range().start as usize..], b"payload!");
        assert_eq!(parse_meta(&f), Ok(meta));
    }

    #[test]
    fn empty_tokens_and_payload() {
        let f = file(&input(&[], ""), b"");
        let meta = parse_full(&f, &key_of(&[])).expect("parse");
        assert!(meta.tokens.is_empty());
        assert_eq!(meta.payload_length, 0);
        assert_eq!(meta.payload_offset as usize, f.len());
    }

    #[test]
    fn defaults_and_omitted_optionals() {
        let mut inp = input(&[5], "p");
        inp.hostname = None;
        inp.writer_version = None;
        inp.save_reason_detail = None;
        let meta = parse_meta(&file(&inp, b"x")).expect("parse");
        assert_eq!(meta.hostname.as_deref(), machine_hostname());
        assert_eq!(
            meta.writer_version.as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(meta.save_reason_detail, None);

        inp.hostname = Some("");
        inp.writer_version = Some("");
        inp.save_reason_detail = Some("");
        let f = file(&inp, b"x");
        let meta = parse_meta(&f).expect("parse");
        assert_eq!(
            (meta.hostname, meta.writer_version, meta.save_reason_detail),
            (None, None, None)
        );
        // Only the six required records: 5+32, 5+1, 5+1, 5+32, 5+4, 5+4.
        let tlv_at = 72 + 4 + 1;
        assert_eq!(
            u32::from_le_bytes(f[tlv_at..tlv_at + 4].try_into().expect("4")),
            37 + 6 + 6 + 37 + 9 + 9
        );
    }

    #[test]
    fn header_prefix_parse() {
        let f = good();
        let header_len = parse_meta(&f).expect("parse").payload_offset as usize;
        let meta = parse_meta_with_len(&f[..header_len], f.len() as u64).expect("prefix parse");
        assert_eq!(meta, parse_meta(&f).expect("parse"));
        assert_eq!(
            parse_meta_with_len(&f[..header_len], f.len() as u64 - 1),
            Err(KvcError::Truncated {
                expected_len: f.len() as u64,
                file_len: f.len() as u64 - 1
            })
        );
        assert_eq!(
            parse_meta_with_len(&f[..header_len], f.len() as u64 + 5),
            Err(KvcError::TrailingBytes {
                expected_len: f.len() as u64,
                file_len: f.len() as u64 + 5
            })
        );
        // Too short a prefix cannot hold the TLV section.
        assert!(matches!(
            parse_meta_with_len(&f[..header_len - 1], f.len() as u64),
            Err(KvcError::BadLengthPrefixedSection { section: "tlv", .. })
        ));
    }

    #[test]
    fn header_len_from_fixed_bytes() {
        let f = good();
        assert_eq!(header_len(&f[..HEADER_FIXED_LEN]), Ok(f.len() as u64 - 8));
        assert_eq!(
            header_len(&f[..HEADER_FIXED_LEN - 1]),
            Err(KvcError::BadTrailer)
        );
        assert_eq!(header_len(b"nope"), Err(KvcError::BadHeader));
        let mut m = f[..HEADER_FIXED_LEN].to_vec();
        m[70] = 1;
        assert_eq!(
            header_len(&m),
            Err(KvcError::ReservedNotZero {
                offset: 68,
                value: 1 << 16
            })
        );
    }

    #[test]
    fn hit_count_rewrite_keeps_file_valid() {
        let mut f = good();
        f[HIT_COUNT_OFFSET..HIT_COUNT_OFFSET + 4].copy_from_slice(&encode_hit_count(0xDEAD_BEEF));
        let meta = parse_full(&f, &key_of(&[1, 2, 3])).expect("still valid");
        assert_eq!(meta.hit_count, 0xDEAD_BEEF);
        assert_eq!(encode_hit_count(1), [1, 0, 0, 0]);
    }

    #[test]
    fn bad_header() {
        let f = good();
        assert_eq!(parse_meta(&[]), Err(KvcError::BadHeader));
        assert_eq!(parse_meta(&f[..47]), Err(KvcError::BadHeader));
        let mut m = f.clone();
        m[2] = b'D';
        assert_eq!(parse_meta(&m), Err(KvcError::BadHeader));
        // Bad magic wins over a bad version.
        m[3] = 9;
        assert_eq!(parse_meta(&m), Err(KvcError::BadHeader));
    }

    #[test]
    fn unsupported_version() {
        let mut f = good();
        f[3] = 2;
        f[5] = 99; // version is checked first
        assert_eq!(parse_meta(&f), Err(KvcError::UnsupportedVersion(2)));
        f[3] = 0;
        assert_eq!(parse_meta(&f), Err(KvcError::UnsupportedVersion(0)));
    }

    #[test]
    fn unknown_save_reason() {
        let mut f = good();
        for r in 0..=5 {
            f[5] = r;
            assert!(parse_meta(&f).is_ok());
        }
        f[5] = 6;
        assert_eq!(parse_meta(&f), Err(KvcError::UnknownSaveReason(6)));
        // ... before the trailer check.
        assert_eq!(parse_meta(&f[..60]), Err(KvcError::UnknownSaveReason(6)));
    }

    #[test]
    fn bad_trailer() {
        let f = good();
        assert_eq!(parse_meta(&f[..48]), Err(KvcError::BadTrailer));
        assert_eq!(parse_meta(&f[..71]), Err(KvcError::BadTrailer));
    }

    #[test]
    fn reserved_fields() {
        for (off, value) in [
            (6, 0x0100),
            (7, 0x01_0000),
            (20, 1),
            (23, 1 << 24),
            (68, 1),
            (71, 1 << 24),
        ] {
            let mut f = good();
            f[off] = 1;
            let field = match off {
                6 | 7 => 6,
                20..=23 => 20,
                _ => 68,
            };
            let value = if field == 6 { value >> 8 } else { value };
            assert_eq!(
                parse_meta(&f),
                Err(KvcError::ReservedNotZero {
                    offset: field,
                    value
                }),
                "byte {off}"
            );
        }
    }

    #[test]
    fn bad_length_prefixed_section() {
        let f = good();
        let header_len = f.len() - 8;
        // Prompt length runs past the header.
        let mut m = f.clone();
        set_u32(&mut m, 72, 1000);
        assert_eq!(
            parse_meta(&m),
            Err(KvcError::BadLengthPrefixedSection {
                section: "prompt",
                offset: 72,
                length: 1000,
                limit: header_len as u64
            })
        );
        // payload_offset too small to hold the prompt's length prefix.
        let mut m = f.clone();
        set_u64(&mut m, 48, 74);
        assert!(matches!(
            parse_meta(&m),
            Err(KvcError::BadLengthPrefixedSection {
                section: "prompt",
                length: 0,
                ..
            })
        ));
        // TLV length runs past payload_offset.
        let mut m = f.clone();
        let tlv_len = u32::from_le_bytes(m[TLV_AT..TLV_AT + 4].try_into().expect("4"));
        set_u32(&mut m, TLV_AT, tlv_len + 1);
        assert!(matches!(
            parse_meta(&m),
            Err(KvcError::BadLengthPrefixedSection { section: "tlv", .. })
        ));
        // Only the fixed header given.
        assert!(matches!(
            parse_meta(&f[..72]),
            Err(KvcError::BadLengthPrefixedSection {
                section: "prompt",
                ..
            })
        ));
    }

    #[test]
    fn header_gap() {
        let mut f = good();
        let tlv_len = u32::from_le_bytes(f[TLV_AT..TLV_AT + 4].try_into().expect("4"));
        set_u32(&mut f, TLV_AT, tlv_len - 1);
        let end = (f.len() - 9) as u64;
        assert_eq!(
            parse_meta(&f),
            Err(KvcError::HeaderGap {
                sections_end: end,
                payload_offset: end + 1
            })
        );
    }

    #[test]
    fn bad_tlv() {
        let mut r = required(&[]);
        r.push(0x42); // a lone tag byte
        assert_eq!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::BadTlv {
                offset: (TLV_AT + 4 + r.len() - 1) as u64,
                reason: "truncated record header"
            })
        );
        let mut r = required(&[]);
        r.extend_from_slice(&[0x42, 9, 0, 0, 0, 1, 2]);
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::BadTlv {
                reason: "value runs past the TLV section",
                ..
            })
        ));
        // Wrong sizes for known tags.
        for (tag, value, reason) in [
            (1u8, vec![0; 31], "fingerprint must be 32 bytes"),
            (2, vec![0, 0], "fingerprint_mode must be 1 byte"),
            (3, vec![], "quant_type must be 1 byte"),
            (4, vec![0; 33], "ctx_params_hash must be 32 bytes"),
            (8, vec![0; 8], "token_count must be 4 bytes"),
            (9, vec![0; 6], "token_ids length must be a multiple of 4"),
        ] {
            let mut r = rec(tag, &value);
            r.extend(required(&[tag]));
            assert!(
                matches!(parse_meta(&with_tlvs(&r)), Err(KvcError::BadTlv { reason: got, .. }) if got == reason),
                "tag {tag}"
            );
        }
        // Duplicate known tag.
        let mut r = required(&[]);
        r.extend(rec(3, &[7]));
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::BadTlv {
                reason: "duplicate tag",
                ..
            })
        ));
        // A truncated record is reported before an unknown mode byte.
        let mut r = rec(2, &[9]);
        r.extend(required(&[2]));
        r.push(0x42);
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::BadTlv { .. })
        ));
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut r = rec(0x7F, b"future");
        r.extend(required(&[]));
        r.extend(rec(0x10, &[]));
        r.extend(rec(0x7F, b"twice is fine"));
        let meta = parse_full(&with_tlvs(&r), &key_of(&[1, 2, 3])).expect("parse");
        assert_eq!(meta.tokens, vec![1, 2, 3]);
        assert_eq!(meta.hostname, None);
    }

    #[test]
    fn logits_travel_with_the_payload_under_its_crc() {
        let tokens = [1, 2, 3];
        let mut payload: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        payload.extend_from_slice(b"state");
        let inp = KvcHeaderInput {
            logits_count: 2,
            ..input(&tokens, "hi")
        };
        let f = file(&inp, &payload);
        let meta = parse_full(&f, &key_of(&tokens)).expect("parse");
        assert_eq!(meta.logits_count, 2);
        assert_eq!(meta.logits_bytes(), 8);
        // Without logits the TLV is left out: what older writers wrote.
        let plain = parse_full(&good(), &key_of(&tokens)).expect("parse");
        assert_eq!(plain.logits_count, 0);
        // A flipped logit is a CRC mismatch like any payload byte.
        let mut bad = f.clone();
        let at = usize::try_from(meta.payload_offset).expect("small");
        bad[at] ^= 1;
        assert!(matches!(
            parse_full(&bad, &key_of(&tokens)),
            Err(KvcError::CrcMismatch { .. })
        ));
        // More logits than payload: refused when built and when parsed.
        let over = KvcHeaderInput {
            logits_count: 4,
            ..input(&tokens, "hi")
        };
        assert!(matches!(
            build_header(&over, &payload),
            Err(KvcBuildError::LogitsOverrun { .. })
        ));
        let mut r = required(&[]);
        r.extend(rec(TAG_LOGITS, &100u32.to_le_bytes()));
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::LogitsOverrun { .. })
        ));
        let mut r = required(&[]);
        r.extend(rec(TAG_LOGITS, &[1, 0]));
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::BadTlv { .. })
        ));
    }

    #[test]
    fn unknown_mode_and_quant() {
        let mut r = rec(2, &[3]);
        r.extend(required(&[2]));
        assert_eq!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::UnknownFingerprintMode(3))
        );
        let mut r = rec(3, &[30]);
        r.extend(required(&[3]));
        assert_eq!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::UnknownQuantByte(30))
        );
        // Mode before quant, and before the payload length check.
        let mut r = rec(2, &[3]);
        r.extend(rec(3, &[255]));
        r.extend(required(&[2, 3]));
        assert_eq!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::UnknownFingerprintMode(3))
        );
        let mut f = with_tlvs(&r);
        set_u64(&mut f, 40, 1);
        assert_eq!(parse_meta(&f), Err(KvcError::UnknownFingerprintMode(3)));
    }

    #[test]
    fn payload_length_mismatch() {
        let mut f = good();
        set_u64(&mut f, 40, 9);
        assert_eq!(
            parse_meta(&f),
            Err(KvcError::PayloadLengthMismatch {
                payload_byte_count: 9,
                payload_length: 8
            })
        );
        // Checked before the file length.
        f.push(0);
        assert!(matches!(
            parse_meta(&f),
            Err(KvcError::PayloadLengthMismatch { .. })
        ));
    }

    #[test]
    fn truncated_and_trailing() {
        let f = good();
        let n = f.len() as u64;
        assert_eq!(
            parse_meta(&f[..f.len() - 1]),
            Err(KvcError::Truncated {
                expected_len: n,
                file_len: n - 1
            })
        );
        let mut m = f.clone();
        m.push(0);
        assert_eq!(
            parse_meta(&m),
            Err(KvcError::TrailingBytes {
                expected_len: n,
                file_len: n + 1
            })
        );
        // Huge lengths saturate instead of overflowing.
        let mut m = f.clone();
        set_u64(&mut m, 40, u64::MAX);
        set_u64(&mut m, 56, u64::MAX);
        assert!(matches!(
            parse_meta(&m),
            Err(KvcError::Truncated {
                expected_len: u64::MAX,
                ..
            })
        ));
    }

    #[test]
    fn missing_tlv() {
        for (tag, name) in [
            (1u8, "fingerprint"),
            (2, "fingerprint_mode"),
            (3, "quant_type"),
            (4, "ctx_params_hash"),
            (8, "token_count"),
            (9, "token_ids"),
        ] {
            assert_eq!(
                parse_meta(&with_tlvs(&required(&[tag]))),
                Err(KvcError::MissingTlv(name))
            );
        }
        // Missing TLVs come after the file-length checks.
        let mut f = with_tlvs(&required(&[1]));
        f.push(0);
        assert!(matches!(
            parse_meta(&f),
            Err(KvcError::TrailingBytes { .. })
        ));
        // Reported in tag order.
        assert_eq!(
            parse_meta(&with_tlvs(&required(&[1, 2, 3, 4]))),
            Err(KvcError::MissingTlv("fingerprint"))
        );
        assert_eq!(
            parse_meta(&with_tlvs(&required(&[3, 9]))),
            Err(KvcError::MissingTlv("quant_type"))
        );
    }

    #[test]
    fn token_count_mismatch() {
        // Header says 3; TLV says 2.
        let mut r = rec(8, &2u32.to_le_bytes());
        r.extend(required(&[8]));
        assert_eq!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::TokenCountMismatch {
                cached_token_count: 3,
                tlv_token_count: 2,
                token_ids: 3
            })
        );
        // Header disagrees with both.
        let mut f = good();
        set_u32(&mut f, 8, 4);
        assert_eq!(
            parse_meta(&f),
            Err(KvcError::TokenCountMismatch {
                cached_token_count: 4,
                tlv_token_count: 3,
                token_ids: 3
            })
        );
        // Fewer ids than counted.
        let mut r = rec(9, &[1, 0, 0, 0]);
        r.extend(required(&[9]));
        assert!(matches!(
            parse_meta(&with_tlvs(&r)),
            Err(KvcError::TokenCountMismatch { token_ids: 1, .. })
        ));
    }

    #[test]
    fn crc_mismatch() {
        let mut f = good();
        let last = f.len() - 1;
        f[last] ^= 0x80;
        // Meta does not read the payload.
        assert!(parse_meta(&f).is_ok());
        assert_eq!(
            parse_full(&f, &key_of(&[1, 2, 3])),
            Err(KvcError::CrcMismatch {
                expected: crc32c(b"payload!"),
                actual: crc32c(b"payload\xA1")
            })
        );
        // A corrupted CRC field too.
        let mut f = good();
        f[64] ^= 1;
        assert!(matches!(
            parse_full(&f, &key_of(&[1, 2, 3])),
            Err(KvcError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn key_mismatch() {
        let f = good();
        let other = key_of(&[1, 2]);
        assert_eq!(
            parse_full(&f, &other),
            Err(KvcError::KeyMismatch {
                expected: other,
                actual: key_of(&[1, 2, 3])
            })
        );
        // A changed token id changes the recomputed key.
        let pos = f
            .windows(12)
            .position(|w| w == [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0])
            .expect("token ids");
        let mut m = f.clone();
        m[pos] = 9;
        assert!(matches!(
            parse_full(&m, &key_of(&[1, 2, 3])),
            Err(KvcError::KeyMismatch { .. })
        ));
        assert_eq!(
            parse_full(&m, &key_of(&[9, 2, 3])).map(|meta| meta.tokens),
            Ok(vec![9, 2, 3])
        );
    }

    #[test]
    fn verify_payload_checks_length() {
        let meta = parse_meta(&good()).expect("parse");
        let key = key_of(&[1, 2, 3]);
        assert_eq!(meta.verify_payload(b"payload!", &key), Ok(()));
        assert!(matches!(
            meta.verify_payload(b"payload", &key),
            Err(KvcError::Truncated { .. })
        ));
        assert!(matches!(
            meta.verify_payload(b"payload!!", &key),
            Err(KvcError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn lossy_text() {
        let f = file(&input(&[1, 2, 3], "h\u{e9}"), b"payload!");
        let mut m = f.clone();
        // Break the UTF-8 of the prompt: it is observability only.
        m[76 + 1] = 0xFF;
        let meta = parse_full(&m, &key_of(&[1, 2, 3])).expect("parse");
        assert!(meta.prompt_text.starts_with('h'));
        assert!(meta.prompt_text.contains('\u{FFFD}'));
    }

    #[test]
    fn error_names() {
        assert_eq!(KvcError::BadHeader.name(), "bad_header");
        assert_eq!(KvcError::MissingTlv("fingerprint").name(), "missing_tlv");
        assert_eq!(
            KvcError::CrcMismatch {
                expected: 0,
                actual: 1
            }
            .name(),
            "crc_mismatch"
        );
        assert_eq!(
            KvcError::UnsupportedVersion(2).to_string(),
            "unsupported KVC version 2"
        );
    }

    #[test]
    fn save_reasons() {
        for (byte, label) in [
            "unknown",
            "cold",
            "continued",
            "evict",
            "shutdown",
            "finish",
        ]
        .iter()
        .enumerate()
        {
            let r = SaveReason::from_byte(byte as u8).expect("valid");
            assert_eq!(r.to_byte() as usize, byte);
            assert_eq!(r.label(), *label);
            assert_eq!(label.parse::<SaveReason>(), Ok(r));
        }
        assert_eq!(
            SaveReason::from_byte(6),
            Err(KvcError::UnknownSaveReason(6))
        );
        assert!("paused".parse::<SaveReason>().is_err());
    }

    #[test]
    fn build_rejects_oversized_text() {
        // Cannot allocate 4 GiB in a unit test; check the helper instead.
        assert_eq!(
            u32_len("prompt text", usize::MAX),
            Err(KvcBuildError::SectionTooLarge {
                section: "prompt text",
                len: usize::MAX
            })
        );
        assert_eq!(u32_len("x", 5), Ok(5));
    }
}
