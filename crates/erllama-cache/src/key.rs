//! Cache keys (docs/cache-format.md): the key derivation, the quant byte table, model
//! fingerprints, the context-parameter hash and the effective fingerprint
//! of a model with LoRA adapters.
//!
//! A key names exactly one KV state: the model bytes (fingerprint), its
//! quantisation, the context parameters that shape the KV layout, and the
//! token ids in order. Two requests share a cache row only when all four
//! agree, which is what makes a restore token-exact.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::gguf::{self, GgufError};

/// Errors from key derivation and the small parsers of this module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    /// A model fingerprint was not exactly 32 bytes.
    #[error("fingerprint must be 32 bytes, got {len}")]
    BadFingerprintLength {
        /// The length given.
        len: usize,
    },
    /// A context-parameter hash was not exactly 32 bytes.
    #[error("ctx_params_hash must be 32 bytes, got {len}")]
    BadCtxParamsHashLength {
        /// The length given.
        len: usize,
    },
    /// A caller-supplied (`fast_unsafe`) digest was not exactly 32 bytes.
    #[error("a fast_unsafe fingerprint digest must be 32 bytes, got {len}")]
    BadDigestLength {
        /// The length given.
        len: usize,
    },
    /// A key was not 64 hex digits.
    #[error("a cache key is 64 hex digits, got {input:?}")]
    BadHex {
        /// The input (first 100 characters).
        input: String,
    },
    /// A quantisation label is not in the table.
    #[error("unknown quantisation label {label:?}")]
    UnknownQuantLabel {
        /// The label given.
        label: String,
    },
    /// A quant byte outside 0–29.
    #[error("unknown quant byte {0} (valid: 0-29)")]
    UnknownQuantByte(u8),
    /// A fingerprint mode byte outside 0–2.
    #[error("unknown fingerprint mode byte {0} (valid: 0-2)")]
    UnknownFingerprintMode(u8),
    /// A fingerprint mode label other than `safe`, `gguf_chunked`,
    /// `fast_unsafe`.
    #[error("unknown fingerprint mode {label:?} (expected safe, gguf_chunked or fast_unsafe)")]
    UnknownFingerprintModeLabel {
        /// The label given.
        label: String,
    },
    /// A LoRA adapter scale is NaN or infinite.
    #[error("adapter #{index} has a non-finite scale {scale}")]
    NonFiniteScale {
        /// Position of the adapter in the caller's list.
        index: usize,
        /// The scale given.
        scale: f64,
    },
    /// A LoRA adapter scale whose fixed-point form (× 2³²) does not fit
    /// an i64 (|scale| ≥ 2³¹).
    #[error("adapter #{index} scale {scale} is out of range (|scale| must be below 2^31)")]
    ScaleOutOfRange {
        /// Position of the adapter in the caller's list.
        index: usize,
        /// The scale given.
        scale: f64,
    },
    /// A prefix length beyond the end of the token list.
    #[error("prefix length {len} exceeds the {available} tokens given")]
    PrefixOutOfRange {
        /// The prefix length asked for.
        len: usize,
        /// The number of tokens given.
        available: usize,
    },
}

/// A cache key: SHA-256 over fingerprint, quant byte, ctx-params hash and
/// tokens. Displays as 64 lowercase hex digits (the tier file name stem).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The raw 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits (either case).
    ///
    /// # Errors
    ///
    /// [`KeyError::BadHex`] when the input is not exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadHex {
            input: s.chars().take(100).collect(),
        };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or_else(bad)?;
            let lo = hex_value(pair[1]).ok_or_else(bad)?;
            *byte = (hi << 4) | lo;
        }
        Ok(CacheKey(out))
    }

    /// The 64 lowercase hex digits (same as `to_string()`).
    #[must_use]
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

impl FromStr for CacheKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

impl From<[u8; 32]> for CacheKey {
    fn from(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }
}

impl AsRef<[u8]> for CacheKey {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Model quantisation, with the cache-internal byte of docs/cache-format.md.
///
/// Variant names follow llama.cpp's spelling; [`QuantType::label`] gives
/// the lowercase label used in the table.
#[expect(
    non_camel_case_types,
    reason = "variant names follow llama.cpp's quantisation names (Q4_K_M, IQ2_XXS, ...)"
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QuantType {
    /// f32 = 0
    F32 = 0,
    /// f16 = 1
    F16 = 1,
    /// q4_0 = 2
    Q4_0 = 2,
    /// q4_1 = 3
    Q4_1 = 3,
    /// q5_0 = 4
    Q5_0 = 4,
    /// q5_1 = 5
    Q5_1 = 5,
    /// q8_0 = 6
    Q8_0 = 6,
    /// q4_k_m = 7
    Q4_K_M = 7,
    /// q4_k_s = 8
    Q4_K_S = 8,
    /// q5_k_m = 9
    Q5_K_M = 9,
    /// q5_k_s = 10
    Q5_K_S = 10,
    /// q6_k = 11
    Q6_K = 11,
    /// q8_k = 12
    Q8_K = 12,
    /// q2_k = 13
    Q2_K = 13,
    /// q3_k_s = 14
    Q3_K_S = 14,
    /// q3_k_m = 15
    Q3_K_M = 15,
    /// q3_k_l = 16
    Q3_K_L = 16,
    /// iq2_xxs = 17
    IQ2_XXS = 17,
    /// iq2_xs = 18
    IQ2_XS = 18,
    /// iq2_s = 19
    IQ2_S = 19,
    /// iq2_m = 20
    IQ2_M = 20,
    /// iq3_xxs = 21
    IQ3_XXS = 21,
    /// iq3_xs = 22
    IQ3_XS = 22,
    /// iq3_s = 23
    IQ3_S = 23,
    /// iq3_m = 24
    IQ3_M = 24,
    /// iq1_s = 25
    IQ1_S = 25,
    /// iq1_m = 26
    IQ1_M = 26,
    /// iq4_nl = 27
    IQ4_NL = 27,
    /// iq4_xs = 28
    IQ4_XS = 28,
    /// bf16 = 29
    BF16 = 29,
}

/// The byte [`quant_byte_for_label`] gives an unknown label.
pub const UNKNOWN_QUANT_BYTE: u8 = 255;

impl QuantType {
    /// Every quant type, in byte order (`ALL[b] as u8 == b`).
    pub const ALL: [QuantType; 30] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4_K_M,
        QuantType::Q4_K_S,
        QuantType::Q5_K_M,
        QuantType::Q5_K_S,
        QuantType::Q6_K,
        QuantType::Q8_K,
        QuantType::Q2_K,
        QuantType::Q3_K_S,
        QuantType::Q3_K_M,
        QuantType::Q3_K_L,
        QuantType::IQ2_XXS,
        QuantType::IQ2_XS,
        QuantType::IQ2_S,
        QuantType::IQ2_M,
        QuantType::IQ3_XXS,
        QuantType::IQ3_XS,
        QuantType::IQ3_S,
        QuantType::IQ3_M,
        QuantType::IQ1_S,
        QuantType::IQ1_M,
        QuantType::IQ4_NL,
        QuantType::IQ4_XS,
        QuantType::BF16,
    ];

    /// The cache-internal byte (0–29).
    #[must_use]
    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    /// The quant type of a byte.
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownQuantByte`] for bytes above 29 (255, the
    /// unknown-label byte, included).
    pub fn from_byte(byte: u8) -> Result<Self, KeyError> {
        Self::ALL
            .get(usize::from(byte))
            .copied()
            .ok_or(KeyError::UnknownQuantByte(byte))
    }

    /// The lowercase label of the documented table (`"q4_k_m"`).
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q5_0 => "q5_0",
            QuantType::Q5_1 => "q5_1",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_K_M => "q4_k_m",
            QuantType::Q4_K_S => "q4_k_s",
            QuantType::Q5_K_M => "q5_k_m",
            QuantType::Q5_K_S => "q5_k_s",
            QuantType::Q6_K => "q6_k",
            QuantType::Q8_K => "q8_k",
            QuantType::Q2_K => "q2_k",
            QuantType::Q3_K_S => "q3_k_s",
            QuantType::Q3_K_M => "q3_k_m",
            QuantType::Q3_K_L => "q3_k_l",
            QuantType::IQ2_XXS => "iq2_xxs",
            QuantType::IQ2_XS => "iq2_xs",
            QuantType::IQ2_S => "iq2_s",
            QuantType::IQ2_M => "iq2_m",
            QuantType::IQ3_XXS => "iq3_xxs",
            QuantType::IQ3_XS => "iq3_xs",
            QuantType::IQ3_S => "iq3_s",
            QuantType::IQ3_M => "iq3_m",
            QuantType::IQ1_S => "iq1_s",
            QuantType::IQ1_M => "iq1_m",
            QuantType::IQ4_NL => "iq4_nl",
            QuantType::IQ4_XS => "iq4_xs",
            QuantType::BF16 => "bf16",
        }
    }

    /// Parses a label: case-insensitive, surrounding whitespace ignored,
    /// `-` read as `_`, and llama.cpp's file-type spellings accepted
    /// (`"Q4_K_M"`, `"MOSTLY_Q4_K_M"`, `"LLAMA_FTYPE_MOSTLY_Q4_K_M"`,
    /// `"LLAMA_FTYPE_ALL_F32"`).
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownQuantLabel`] when the label is not in the table.
    pub fn from_label(label: &str) -> Result<Self, KeyError> {
        let norm = label.trim().to_ascii_lowercase().replace('-', "_");
        let mut s = norm.as_str();
        for prefix in ["llama_ftype_", "mostly_", "all_"] {
            s = s.strip_prefix(prefix).unwrap_or(s);
        }
        Self::ALL
            .iter()
            .copied()
            .find(|q| q.label() == s)
            .ok_or_else(|| KeyError::UnknownQuantLabel {
                label: label.to_owned(),
            })
    }

    /// Maps a `llama_ftype` number (GGUF `general.file_type`) to a quant
    /// type; `None` for file types without a row in the table (Q2_K_S,
    /// TQ1_0, MXFP4, removed types, ...).
    #[must_use]
    pub const fn from_llama_ftype(ftype: u64) -> Option<Self> {
        Some(match ftype {
            0 => QuantType::F32,
            1 => QuantType::F16,
            2 => QuantType::Q4_0,
            3 => QuantType::Q4_1,
            7 => QuantType::Q8_0,
            8 => QuantType::Q5_0,
            9 => QuantType::Q5_1,
            10 => QuantType::Q2_K,
            11 => QuantType::Q3_K_S,
            12 => QuantType::Q3_K_M,
            13 => QuantType::Q3_K_L,
            14 => QuantType::Q4_K_S,
            15 => QuantType::Q4_K_M,
            16 => QuantType::Q5_K_S,
            17 => QuantType::Q5_K_M,
            18 => QuantType::Q6_K,
            19 => QuantType::IQ2_XXS,
            20 => QuantType::IQ2_XS,
            22 => QuantType::IQ3_XS,
            23 => QuantType::IQ3_XXS,
            24 => QuantType::IQ1_S,
            25 => QuantType::IQ4_NL,
            26 => QuantType::IQ3_S,
            27 => QuantType::IQ3_M,
            28 => QuantType::IQ2_S,
            29 => QuantType::IQ2_M,
            30 => QuantType::IQ4_XS,
            31 => QuantType::IQ1_M,
            32 => QuantType::BF16,
            _ => return None,
        })
    }

    /// Nominal bits per weight of the family (32, 16, 8, 6, 5, 4, 3, 2 or
    /// 1), for display and the KVC header's `quant_bits`.
    #[must_use]
    pub const fn nominal_bits(self) -> u8 {
        match self {
            QuantType::F32 => 32,
            QuantType::F16 | QuantType::BF16 => 16,
            QuantType::Q8_0 | QuantType::Q8_K => 8,
            QuantType::Q6_K => 6,
            QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5_K_M | QuantType::Q5_K_S => 5,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q4_K_M
            | QuantType::Q4_K_S
            | QuantType::IQ4_NL
            | QuantType::IQ4_XS => 4,
            QuantType::Q3_K_S
            | QuantType::Q3_K_M
            | QuantType::Q3_K_L
            | QuantType::IQ3_XXS
            | QuantType::IQ3_XS
            | QuantType::IQ3_S
            | QuantType::IQ3_M => 3,
            QuantType::Q2_K
            | QuantType::IQ2_XXS
            | QuantType::IQ2_XS
            | QuantType::IQ2_S
            | QuantType::IQ2_M => 2,
            QuantType::IQ1_S | QuantType::IQ1_M => 1,
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for QuantType {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_label(s)
    }
}

/// The quant byte of a label, [`UNKNOWN_QUANT_BYTE`] (255) when the label
/// is unknown (docs/cache-format.md). Accepts what [`QuantType::from_label`] accepts.
#[must_use]
pub fn quant_byte_for_label(label: &str) -> u8 {
    QuantType::from_label(label).map_or(UNKNOWN_QUANT_BYTE, QuantType::to_byte)
}

/// How a model's fingerprint was computed (KVC TLV 0x02).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FingerprintMode {
    /// SHA-256 of the whole GGUF file ([`fingerprint_file_safe`]).
    Safe = 0,
    /// Hash of the GGUF header sections plus the first tensor
    /// ([`fingerprint_gguf_chunked`]).
    GgufChunked = 1,
    /// A caller-supplied digest, trusted as is ([`fingerprint_fast_unsafe`]).
    FastUnsafe = 2,
}

impl FingerprintMode {
    /// The byte stored in KVC files.
    #[must_use]
    pub const fn to_byte(self) -> u8 {
        self as u8
    }

    /// The mode of a byte.
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownFingerprintMode`] for bytes above 2.
    pub fn from_byte(byte: u8) -> Result<Self, KeyError> {
        match byte {
            0 => Ok(FingerprintMode::Safe),
            1 => Ok(FingerprintMode::GgufChunked),
            2 => Ok(FingerprintMode::FastUnsafe),
            other => Err(KeyError::UnknownFingerprintMode(other)),
        }
    }

    /// `"safe"`, `"gguf_chunked"` or `"fast_unsafe"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            FingerprintMode::Safe => "safe",
            FingerprintMode::GgufChunked => "gguf_chunked",
            FingerprintMode::FastUnsafe => "fast_unsafe",
        }
    }

    /// Parses a label (case-insensitive).
    ///
    /// # Errors
    ///
    /// [`KeyError::UnknownFingerprintModeLabel`] for anything but the three
    /// labels.
    pub fn from_label(label: &str) -> Result<Self, KeyError> {
        [
            FingerprintMode::Safe,
            FingerprintMode::GgufChunked,
            FingerprintMode::FastUnsafe,
        ]
        .into_iter()
        .find(|m| m.label().eq_ignore_ascii_case(label.trim()))
        .ok_or_else(|| KeyError::UnknownFingerprintModeLabel {
            label: label.to_owned(),
        })
    }
}

impl fmt::Display for FingerprintMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for FingerprintMode {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_label(s)
    }
}

fn array32(bytes: &[u8], err: impl FnOnce(usize) -> KeyError) -> Result<&[u8; 32], KeyError> {
    bytes.try_into().map_err(|_| err(bytes.len()))
}

/// Tokens are encoded in chunks through this stack buffer, so hashing never
/// allocates and never builds the concatenated message.
const TOKEN_CHUNK: usize = 1024;

/// Incremental key derivation: absorb the fixed prefix once, then tokens
/// in any number of pieces. Cloning snapshots the state, so the keys of
/// several prefixes of one token list cost one pass over the tokens (see
/// [`KeyHasher::prefix_keys`]).
#[derive(Clone)]
pub struct KeyHasher {
    sha: Sha256,
    tokens: u64,
}

impl KeyHasher {
    /// Starts a key: absorbs `fingerprint ‖ quant_byte ‖ ctx_params_hash`.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadFingerprintLength`] or
    /// [`KeyError::BadCtxParamsHashLength`] when either is not 32 bytes.
    pub fn new(
        fingerprint: &[u8],
        quant_byte: u8,
        ctx_params_hash: &[u8],
    ) -> Result<Self, KeyError> {
        let fingerprint = array32(fingerprint, |len| KeyError::BadFingerprintLength { len })?;
        let ctx = array32(ctx_params_hash, |len| KeyError::BadCtxParamsHashLength {
            len,
        })?;
        Ok(Self::from_parts(fingerprint, quant_byte, ctx))
    }

    /// [`KeyHasher::new`] for inputs already known to be 32 bytes.
    #[must_use]
    pub fn from_parts(fingerprint: &[u8; 32], quant_byte: u8, ctx_params_hash: &[u8; 32]) -> Self {
        let mut sha = Sha256::new();
        sha.update(fingerprint);
        sha.update([quant_byte]);
        sha.update(ctx_params_hash);
        KeyHasher { sha, tokens: 0 }
    }

    /// Absorbs tokens (u32 little-endian each, no separators).
    pub fn update(&mut self, tokens: &[u32]) {
        let mut buf = [0u8; TOKEN_CHUNK * 4];
        for chunk in tokens.chunks(TOKEN_CHUNK) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            self.sha.update(&buf[..chunk.len() * 4]);
        }
        self.tokens += tokens.len() as u64;
    }

    /// How many tokens have been absorbed.
    #[must_use]
    pub const fn token_count(&self) -> u64 {
        self.tokens
    }

    /// The key of what has been absorbed so far; the hasher stays usable.
    #[must_use]
    pub fn key(&self) -> CacheKey {
        self.clone().finish()
    }

    /// The key of what has been absorbed.
    #[must_use]
    pub fn finish(self) -> CacheKey {
        CacheKey(self.sha.finalize().into())
    }

    /// Keys of `tokens[..len]` (appended to what was absorbed so far) for
    /// every `len` in `lengths`, in the order given, in one pass over the
    /// tokens. Longest-prefix lookups use it with
    /// [`longest_prefix_probes`](crate::longest_prefix_probes).
    ///
    /// # Errors
    ///
    /// [`KeyError::PrefixOutOfRange`] when a length exceeds `tokens.len()`.
    pub fn prefix_keys(
        &self,
        tokens: &[u32],
        lengths: &[usize],
    ) -> Result<Vec<CacheKey>, KeyError> {
        if let Some(&len) = lengths.iter().find(|&&len| len > tokens.len()) {
            return Err(KeyError::PrefixOutOfRange {
                len,
                available: tokens.len(),
            });
        }
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_unstable_by_key(|&i| lengths[i]);
        let mut keys = vec![CacheKey([0; 32]); lengths.len()];
        let mut hasher = self.clone();
        let mut done = 0;
        for i in order {
            let len = lengths[i];
            hasher.update(&tokens[done..len]);
            done = len;
            keys[i] = hasher.key();
        }
        Ok(keys)
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

/// `SHA-256(fingerprint[32] ‖ quant_byte ‖ ctx_params_hash[32] ‖ tokens)`,
/// tokens as u32 little-endian, in order, no separators; an empty token
/// list is valid (docs/cache-format.md). Hashes incrementally.
///
/// # Errors
///
/// [`KeyError::BadFingerprintLength`] or [`KeyError::BadCtxParamsHashLength`]
/// when either is not exactly 32 bytes.
pub fn derive_key(
    fingerprint: &[u8],
    quant_byte: u8,
    ctx_params_hash: &[u8],
    tokens: &[u32],
) -> Result<CacheKey, KeyError> {
    let mut hasher = KeyHasher::new(fingerprint, quant_byte, ctx_params_hash)?;
    hasher.update(tokens);
    Ok(hasher.finish())
}

/// Read size for file hashing: large enough to keep syscalls out of the
/// profile on multi-GB models.
const FILE_BUF: usize = 4 << 20;

/// `safe` fingerprint: SHA-256 of the whole file, streamed. `progress` is
/// called with `(bytes hashed, file length at open)` once before the first
/// read and after every read (at most every 4 MiB), so a caller can show
/// progress on big models. A file that grows while being read is hashed to
/// its end (`done` may then exceed `total`).
///
/// # Errors
///
/// Any I/O error opening or reading the file.
pub fn fingerprint_file_safe(
    path: impl AsRef<Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<[u8; 32]> {
    let mut file = File::open(path.as_ref())?;
    let total = file.metadata()?.len();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; FILE_BUF];
    let mut done = 0u64;
    progress(0, total);
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    Ok(sha.finalize().into())
}

/// `gguf_chunked` fingerprint: SHA-256 over the file's bytes
/// `[0, end of tensor infos)` — magic, version, counts, the metadata
/// key/value section and the tensor-info section, not the alignment
/// padding after it — followed by the data bytes of the first tensor in
/// tensor-info order (`ggml_nbytes` of its type and shape, at
/// `data_start + offset`). A file with no tensors hashes the header
/// sections only. GGUF v2 and v3 are read.
///
/// # Errors
///
/// A [`GgufError`]: I/O, not a GGUF file, unsupported version, truncated
/// or malformed header sections, a first tensor of unknown ggml type or
/// invalid shape, or first-tensor data outside the file.
pub fn fingerprint_gguf_chunked(path: impl AsRef<Path>) -> Result<[u8; 32], GgufError> {
    gguf::chunked_digest(path.as_ref())
}

/// `fast_unsafe` fingerprint: the caller's digest, trusted as is.
///
/// # Errors
///
/// [`KeyError::BadDigestLength`] unless the digest is exactly 32 bytes.
pub fn fingerprint_fast_unsafe(digest: &[u8]) -> Result<[u8; 32], KeyError> {
    array32(digest, |len| KeyError::BadDigestLength { len }).copied()
}

/// Reads `general.file_type` from a GGUF file and maps it with
/// [`QuantType::from_llama_ftype`]. `Ok(None)` when the key is absent, not
/// a non-negative integer, or a file type without a row in the table.
///
/// # Errors
///
/// A [`GgufError`] when the file cannot be read or its header up to the
/// end of the metadata section is not valid GGUF v2/v3.
pub fn read_gguf_file_type(path: impl AsRef<Path>) -> Result<Option<QuantType>, GgufError> {
    Ok(gguf::read_file_type(path.as_ref())?.and_then(QuantType::from_llama_ftype))
}

/// Context parameters that change the layout or contents of the KV state.
/// Hashed by [`ctx_params_hash`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CtxParams {
    /// Context size in tokens.
    pub n_ctx: u32,
    /// Logical batch size.
    pub n_batch: u32,
    /// Physical (micro) batch size.
    pub n_ubatch: u32,
    /// KV cache type of K (`"f16"`, `"q8_0"`, ...).
    pub type_k: String,
    /// KV cache type of V.
    pub type_v: String,
    /// Maximum number of sequences.
    pub n_seq_max: u32,
    /// Unified KV buffer across sequences.
    pub kv_unified: bool,
    /// Flash attention on.
    pub flash_attn: bool,
    /// Further parameters a backend considers layout-relevant, as
    /// `(name, value)` pairs; order does not matter.
    pub extra: Vec<(String, String)>,
}

/// Version tag at the start of the [`ctx_params_hash`] encoding; bump it
/// when the encoding changes so old rows stop matching.
pub const CTX_PARAMS_ENCODING_TAG: &[u8] = b"erllama.ctx_params.v1";

/// SHA-256 of a stable encoding of [`CtxParams`]. Every item below is a
/// field: u64 little-endian byte length followed by the bytes, in this
/// order:
///
/// 1. the tag [`CTX_PARAMS_ENCODING_TAG`]
/// 2. `n_ctx`, 3. `n_batch`, 4. `n_ubatch` (u32 LE each)
/// 5. `type_k`, 6. `type_v` (UTF-8, ASCII-lowercased so `"F16"` and
///    `"f16"` agree)
/// 7. `n_seq_max` (u32 LE)
/// 8. `kv_unified`, 9. `flash_attn` (one byte, 0 or 1)
/// 10. the number of `extra` pairs (u64 LE), then for each pair, sorted
///     by (name, value) bytes, the name field and the value field.
#[must_use]
pub fn ctx_params_hash(params: &CtxParams) -> [u8; 32] {
    fn field(sha: &mut Sha256, bytes: &[u8]) {
        sha.update((bytes.len() as u64).to_le_bytes());
        sha.update(bytes);
    }
    let mut sha = Sha256::new();
    field(&mut sha, CTX_PARAMS_ENCODING_TAG);
    field(&mut sha, &params.n_ctx.to_le_bytes());
    field(&mut sha, &params.n_batch.to_le_bytes());
    field(&mut sha, &params.n_ubatch.to_le_bytes());
    field(&mut sha, params.type_k.to_ascii_lowercase().as_bytes());
    field(&mut sha, params.type_v.to_ascii_lowercase().as_bytes());
    field(&mut sha, &params.n_seq_max.to_le_bytes());
    field(&mut sha, &[u8::from(params.kv_unified)]);
    field(&mut sha, &[u8::from(params.flash_attn)]);
    let mut extra: Vec<&(String, String)> = params.extra.iter().collect();
    extra.sort_unstable();
    field(&mut sha, &(extra.len() as u64).to_le_bytes());
    for (name, value) in extra {
        field(&mut sha, name.as_bytes());
        field(&mut sha, value.as_bytes());
    }
    sha.finalize().into()
}

/// round(scale × 2³²) half away from zero, or `None` outside i64.
fn scale_fixed(scale: f64) -> Option<i64> {
    /// 2^63: the fixed-point value must lie in [-2^63, 2^63).
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    // Multiplying by a power of two is exact (or overflows to infinity).
    let v = (scale * 4_294_967_296.0).round();
    // The range check makes the cast exact.
    (-LIMIT..LIMIT).contains(&v).then_some(v as i64)
}

/// The fingerprint of a model with LoRA adapters applied (docs/cache-format.md): no
/// adapters → `base`; otherwise SHA-256(base ‖ pair ‖ pair ‖ …) where a
/// pair is `adapter_sha256[32] ‖ i64 LE round(scale × 2³²)` (half away
/// from zero) and pairs are sorted by (adapter sha bytes, scale).
///
/// # Errors
///
/// [`KeyError::NonFiniteScale`] for a NaN or infinite scale,
/// [`KeyError::ScaleOutOfRange`] when |scale| ≥ 2³¹ (the fixed-point value
/// would not fit an i64).
pub fn effective_fingerprint(
    base: &[u8; 32],
    adapters: &[([u8; 32], f64)],
) -> Result<[u8; 32], KeyError> {
    if adapters.is_empty() {
        return Ok(*base);
    }
    let mut pairs = Vec::with_capacity(adapters.len());
    for (index, &(sha, scale)) in adapters.iter().enumerate() {
        if !scale.is_finite() {
            return Err(KeyError::NonFiniteScale { index, scale });
        }
        let fixed = scale_fixed(scale).ok_or(KeyError::ScaleOutOfRange { index, scale })?;
        pairs.push((sha, fixed));
    }
    // Rounding is monotone, so sorting by the fixed-point value orders the
    // pairs as sorting by scale does; equal fixed values encode equally.
    pairs.sort_unstable();
    let mut sha = Sha256::new();
    sha.update(base);
    for (adapter, fixed) in &pairs {
        sha.update(adapter);
        sha.update(fixed.to_le_bytes());
    }
    Ok(sha.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derive_key_matches_independent_vector() {
        // python3: hashlib.sha256(bytes(32) + b'\x07' + b'\x11'*32 +
        //   struct.pack('<3I', 1, 0xdeadbeef, 0xffffffff)).hexdigest()
        let key =
            derive_key(&[0; 32], 7, &[0x11; 32], &[1, 0xdead_beef, 0xffff_ffff]).expect("key");
        assert_eq!(
            key.to_string(),
            "b7317826a4274d310ae1bc4870eff565c7b9905b050885a36139cbfe7b8b279a"
        );
        // Empty token list: sha256(bytes(32) + b'\x07' + b'\x11'*32).
        let empty = derive_key(&[0; 32], 7, &[0x11; 32], &[]).expect("key");
        assert_eq!(
            empty.to_string(),
            "0fabead927f7813a0f2297f4f2291d928b64b54544b3733f1e5d4e98bd91be15"
        );
    }

    #[test]
    fn derive_key_rejects_bad_lengths() {
        assert_eq!(
            derive_key(&[0; 31], 0, &[0; 32], &[]),
            Err(KeyError::BadFingerprintLength { len: 31 })
        );
        assert_eq!(
            derive_key(&[0; 32], 0, &[0; 33], &[]),
            Err(KeyError::BadCtxParamsHashLength { len: 33 })
        );
        assert_eq!(
            KeyHasher::new(&[], 0, &[0; 32]).map(|h| h.token_count()),
            Err(KeyError::BadFingerprintLength { len: 0 })
        );
    }

    #[test]
    fn key_depends_on_every_input() {
        let base = derive_key(&[1; 32], 2, &[3; 32], &[4, 5]).expect("key");
        assert_ne!(
            base,
            derive_key(&[9; 32], 2, &[3; 32], &[4, 5]).expect("key")
        );
        assert_ne!(
            base,
            derive_key(&[1; 32], 9, &[3; 32], &[4, 5]).expect("key")
        );
        assert_ne!(
            base,
            derive_key(&[1; 32], 2, &[9; 32], &[4, 5]).expect("key")
        );
        assert_ne!(
            base,
            derive_key(&[1; 32], 2, &[3; 32], &[5, 4]).expect("key")
        );
        assert_ne!(base, derive_key(&[1; 32], 2, &[3; 32], &[4]).expect("key"));
    }

    #[test]
    fn hasher_chunks_and_prefixes() {
        let tokens: Vec<u32> = (0..5000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let whole = derive_key(&[1; 32], 3, &[2; 32], &tokens).expect("key");
        let mut h = KeyHasher::from_parts(&[1; 32], 3, &[2; 32]);
        h.update(&tokens[..1]);
        h.update(&tokens[1..3000]);
        h.update(&tokens[3000..]);
        assert_eq!(h.token_count(), 5000);
        assert_eq!(h.key(), whole);

        let start = KeyHasher::from_parts(&[1; 32], 3, &[2; 32]);
        let lengths = [4096, 0, 2048, 5000, 2048];
        let keys = start.prefix_keys(&tokens, &lengths).expect("keys");
        for (len, key) in lengths.iter().zip(&keys) {
            assert_eq!(
                *key,
                derive_key(&[1; 32], 3, &[2; 32], &tokens[..*len]).expect("key")
            );
        }
        assert_eq!(
            start.prefix_keys(&tokens, &[10, 5001]),
            Err(KeyError::PrefixOutOfRange {
                len: 5001,
                available: 5000
            })
        );
        assert!(format!("{start:?}").contains("tokens: 0"));
    }

    #[test]
    fn cache_key_hex() {
        let key = CacheKey(std::array::from_fn(|i| (i * 8) as u8));
        let hex = key.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("0008101820"));
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(CacheKey::from_hex(&hex), Ok(key));
        assert_eq!(CacheKey::from_hex(&hex.to_uppercase()), Ok(key));
        assert_eq!(hex.parse::<CacheKey>(), Ok(key));
        assert_eq!(key.as_bytes(), &key.0);
        assert_eq!(format!("{key:?}"), format!("CacheKey({hex})"));
        for bad in [
            "",
            "00",
            &hex[1..],
            &format!("{hex}0"),
            &format!("g{}", &hex[1..]),
        ] {
            assert!(
                matches!(CacheKey::from_hex(bad), Err(KeyError::BadHex { .. })),
                "{bad}"
            );
        }
        // A multi-byte character must not be split or accepted.
        let odd = format!("é{}", &hex[2..]);
        assert!(matches!(
            CacheKey::from_hex(&odd),
            Err(KeyError::BadHex { .. })
        ));
    }

    #[test]
    fn quant_table_is_exact() {
        let expected = [
            "f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m",
            "q5_k_s", "q6_k", "q8_k", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "iq2_xxs", "iq2_xs",
            "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq1_s", "iq1_m", "iq4_nl",
            "iq4_xs", "bf16",
        ];
        for (byte, label) in expected.iter().enumerate() {
            let byte = byte as u8;
            let q = QuantType::from_byte(byte).expect("valid byte");
            assert_eq!(q.to_byte(), byte);
            assert_eq!(q.label(), *label);
            assert_eq!(QuantType::from_label(label), Ok(q));
            assert_eq!(quant_byte_for_label(label), byte);
            assert_eq!(q.to_string().parse::<QuantType>(), Ok(q));
        }
        for byte in 30..=255u8 {
            assert_eq!(
                QuantType::from_byte(byte),
                Err(KeyError::UnknownQuantByte(byte))
            );
        }
    }

    #[test]
    fn quant_labels_llama_style() {
        assert_eq!(QuantType::from_label("Q4_K_M"), Ok(QuantType::Q4_K_M));
        assert_eq!(QuantType::from_label("Q4_1"), Ok(QuantType::Q4_1));
        assert_eq!(QuantType::from_label(" BF16 "), Ok(QuantType::BF16));
        assert_eq!(QuantType::from_label("iq2-xxs"), Ok(QuantType::IQ2_XXS));
        assert_eq!(QuantType::from_label("MOSTLY_Q6_K"), Ok(QuantType::Q6_K));
        assert_eq!(
            QuantType::from_label("LLAMA_FTYPE_MOSTLY_Q5_K_S"),
            Ok(QuantType::Q5_K_S)
        );
        assert_eq!(
            QuantType::from_label("LLAMA_FTYPE_ALL_F32"),
            Ok(QuantType::F32)
        );
        assert_eq!(
            QuantType::from_label("q4_k"),
            Err(KeyError::UnknownQuantLabel {
                label: "q4_k".into()
            })
        );
        assert_eq!(quant_byte_for_label("q4_k"), 255);
        assert_eq!(quant_byte_for_label(""), 255);
        assert_eq!(quant_byte_for_label("Q8_0"), 6);
    }

    #[test]
    fn llama_ftype_mapping() {
        let table: [(u64, QuantType); 29] = [
            (0, QuantType::F32),
            (1, QuantType::F16),
            (2, QuantType::Q4_0),
            (3, QuantType::Q4_1),
            (7, QuantType::Q8_0),
            (8, QuantType::Q5_0),
            (9, QuantType::Q5_1),
            (10, QuantType::Q2_K),
            (11, QuantType::Q3_K_S),
            (12, QuantType::Q3_K_M),
            (13, QuantType::Q3_K_L),
            (14, QuantType::Q4_K_S),
            (15, QuantType::Q4_K_M),
            (16, QuantType::Q5_K_S),
            (17, QuantType::Q5_K_M),
            (18, QuantType::Q6_K),
            (19, QuantType::IQ2_XXS),
            (20, QuantType::IQ2_XS),
            (22, QuantType::IQ3_XS),
            (23, QuantType::IQ3_XXS),
            (24, QuantType::IQ1_S),
            (25, QuantType::IQ4_NL),
            (26, QuantType::IQ3_S),
            (27, QuantType::IQ3_M),
            (28, QuantType::IQ2_S),
            (29, QuantType::IQ2_M),
            (30, QuantType::IQ4_XS),
            (31, QuantType::IQ1_M),
            (32, QuantType::BF16),
        ];
        for (ftype, q) in table {
            assert_eq!(QuantType::from_llama_ftype(ftype), Some(q), "ftype {ftype}");
        }
        for ftype in [4, 5, 6, 21, 33, 36, 38, 1024, u64::MAX] {
            assert_eq!(QuantType::from_llama_ftype(ftype), None, "ftype {ftype}");
        }
    }

    #[test]
    fn nominal_bits() {
        assert_eq!(QuantType::F32.nominal_bits(), 32);
        assert_eq!(QuantType::BF16.nominal_bits(), 16);
        assert_eq!(QuantType::Q4_K_M.nominal_bits(), 4);
        assert_eq!(QuantType::IQ1_M.nominal_bits(), 1);
        assert_eq!(QuantType::Q6_K.nominal_bits(), 6);
    }

    #[test]
    fn fingerprint_modes() {
        for (byte, mode, label) in [
            (0, FingerprintMode::Safe, "safe"),
            (1, FingerprintMode::GgufChunked, "gguf_chunked"),
            (2, FingerprintMode::FastUnsafe, "fast_unsafe"),
        ] {
            assert_eq!(FingerprintMode::from_byte(byte), Ok(mode));
            assert_eq!(mode.to_byte(), byte);
            assert_eq!(mode.label(), label);
            assert_eq!(FingerprintMode::from_label(&label.to_uppercase()), Ok(mode));
            assert_eq!(mode.to_string().parse::<FingerprintMode>(), Ok(mode));
        }
        assert_eq!(
            FingerprintMode::from_byte(3),
            Err(KeyError::UnknownFingerprintMode(3))
        );
        assert!(matches!(
            FingerprintMode::from_label("fast"),
            Err(KeyError::UnknownFingerprintModeLabel { .. })
        ));
    }

    #[test]
    fn fast_unsafe_checks_length() {
        assert_eq!(fingerprint_fast_unsafe(&[5; 32]), Ok([5; 32]));
        assert_eq!(
            fingerprint_fast_unsafe(&[5; 16]),
            Err(KeyError::BadDigestLength { len: 16 })
        );
    }

    #[test]
    fn safe_fingerprint_streams_whole_file() {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        let data: Vec<u8> = (0..(FILE_BUF + 12_345)).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).expect("write");
        f.flush().expect("flush");
        let mut calls = Vec::new();
        let digest = fingerprint_file_safe(f.path(), &mut |done, total| calls.push((done, total)))
            .expect("hash");
        let expected: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(digest, expected);
        let total = data.len() as u64;
        assert_eq!(calls.first(), Some(&(0, total)));
        assert_eq!(calls.last(), Some(&(total, total)));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(fingerprint_file_safe("/nonexistent/erllama", &mut |_, _| {}).is_err());
    }

    #[test]
    fn gguf_functions_share_the_reader() {
        use std::io::Write;
        let mut b = crate::gguf::tests::GgufBuilder::new();
        b.kv_u32("general.file_type", 15).tensor("t", &[8], 0, 0);
        let (bytes, _, _) = b.build(&[1u8; 32]);
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(&bytes).expect("write");
        f.flush().expect("flush");
        assert_eq!(
            read_gguf_file_type(f.path()).expect("ok"),
            Some(QuantType::Q4_K_M)
        );
        assert!(fingerprint_gguf_chunked(f.path()).is_ok());

        let mut b = crate::gguf::tests::GgufBuilder::new();
        b.kv_u32("general.file_type", 21);
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(&b.build(&[]).0).expect("write");
        f.flush().expect("flush");
        assert_eq!(read_gguf_file_type(f.path()).expect("ok"), None);

        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(b"not a model").expect("write");
        f.flush().expect("flush");
        assert!(matches!(
            read_gguf_file_type(f.path()),
            Err(GgufError::NotGguf { .. })
        ));
        assert!(matches!(
            fingerprint_gguf_chunked(f.path()),
            Err(GgufError::NotGguf { .. })
        ));
    }

    fn params() -> CtxParams {
        CtxParams {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            type_k: "f16".into(),
            type_v: "f16".into(),
            n_seq_max: 1,
            kv_unified: false,
            flash_attn: true,
            extra: vec![("b".into(), "2".into()), ("a".into(), "1".into())],
        }
    }

    #[test]
    fn ctx_params_hash_is_stable() {
        let p = params();
        // Independent encoding of the documented layout.
        let mut msg = Vec::new();
        let mut field = |b: &[u8]| {
            msg.extend_from_slice(&(b.len() as u64).to_le_bytes());
            msg.extend_from_slice(b);
        };
        field(b"erllama.ctx_params.v1");
        field(&4096u32.to_le_bytes());
        field(&2048u32.to_le_bytes());
        field(&512u32.to_le_bytes());
        field(b"f16");
        field(b"f16");
        field(&1u32.to_le_bytes());
        field(&[0]);
        field(&[1]);
        field(&2u64.to_le_bytes());
        field(b"a");
        field(b"1");
        field(b"b");
        field(b"2");
        let expected: [u8; 32] = Sha256::digest(&msg).into();
        assert_eq!(ctx_params_hash(&p), expected);
    }

    #[test]
    fn ctx_params_hash_sensitivity() {
        let base = ctx_params_hash(&params());
        let mut reordered = params();
        reordered.extra.reverse();
        assert_eq!(ctx_params_hash(&reordered), base);
        let mut upper = params();
        upper.type_k = "F16".into();
        assert_eq!(ctx_params_hash(&upper), base);

        let changes: [fn(&mut CtxParams); 9] = [
            |p| p.n_ctx += 1,
            |p| p.n_batch += 1,
            |p| p.n_ubatch += 1,
            |p| p.type_k = "q8_0".into(),
            |p| p.type_v = "q8_0".into(),
            |p| p.n_seq_max += 1,
            |p| p.kv_unified = !p.kv_unified,
            |p| p.flash_attn = !p.flash_attn,
            |p| p.extra.push(("c".into(), String::new())),
        ];
        for change in changes {
            let mut p = params();
            change(&mut p);
            assert_ne!(ctx_params_hash(&p), base);
        }
        // Length prefixes keep field boundaries apart.
        let mut a = params();
        a.extra = vec![("ab".into(), "c".into())];
        let mut b = params();
        b.extra = vec![("a".into(), "bc".into())];
        assert_ne!(ctx_params_hash(&a), ctx_params_hash(&b));
    }

    #[test]
    fn effective_fingerprint_rules() {
        let base = [7u8; 32];
        assert_eq!(effective_fingerprint(&base, &[]), Ok(base));

        let a = [1u8; 32];
        let b = [2u8; 32];
        // Independent encoding: sorted by sha, scale 0.5 → 2^31, 1.0 → 2^32.
        let mut msg = base.to_vec();
        msg.extend_from_slice(&a);
        msg.extend_from_slice(&(1i64 << 32).to_le_bytes());
        msg.extend_from_slice(&b);
        msg.extend_from_slice(&(1i64 << 31).to_le_bytes());
        let expected: [u8; 32] = Sha256::digest(&msg).into();
        assert_eq!(
            effective_fingerprint(&base, &[(b, 0.5), (a, 1.0)]),
            Ok(expected)
        );
        assert_eq!(
            effective_fingerprint(&base, &[(a, 1.0), (b, 0.5)]),
            Ok(expected)
        );

        // Same adapter twice: sorted by scale.
        let one = effective_fingerprint(&base, &[(a, 2.0), (a, -1.0)]);
        assert_eq!(one, effective_fingerprint(&base, &[(a, -1.0), (a, 2.0)]));
        assert_ne!(effective_fingerprint(&base, &[(a, 1.0)]), Ok(base));
        assert_ne!(
            effective_fingerprint(&base, &[(a, 1.0)]),
            effective_fingerprint(&base, &[(a, 0.5)])
        );

        assert_eq!(
            effective_fingerprint(&base, &[(a, 1.0), (b, f64::NAN)]).map_err(|e| e.to_string()),
            Err(KeyError::NonFiniteScale {
                index: 1,
                scale: f64::NAN
            }
            .to_string())
        );
        assert!(matches!(
            effective_fingerprint(&base, &[(a, f64::INFINITY)]),
            Err(KeyError::NonFiniteScale { index: 0, .. })
        ));
        assert!(matches!(
            effective_fingerprint(&base, &[(a, 2f64.powi(31))]),
            Err(KeyError::ScaleOutOfRange { index: 0, .. })
        ));
    }

    #[test]
    fn scale_rounding() {
        // 2^-33 is exactly half a unit: rounds away from zero.
        let half = 2f64.powi(-33);
        assert_eq!(scale_fixed(half), Some(1));
        assert_eq!(scale_fixed(-half), Some(-1));
        assert_eq!(scale_fixed(half * 0.999), Some(0));
        assert_eq!(scale_fixed(3.0 * half), Some(2));
        assert_eq!(scale_fixed(1.0), Some(1 << 32));
        assert_eq!(scale_fixed(-0.0), Some(0));
        assert_eq!(scale_fixed(-(2f64.powi(31))), Some(i64::MIN));
        assert_eq!(scale_fixed(2f64.powi(31)), None);
        // The largest scale below 2^31 that f64 can hold still fits.
        assert!(scale_fixed(2f64.powi(31) - 2f64.powi(-21)).is_some());
    }
}
