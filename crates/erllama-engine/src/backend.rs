//! What a model task needs from an inference backend.
//!
//! A [`Backend`] is a loaded model: shareable across threads, it tokenizes
//! and creates contexts. A [`BackendContext`] is one live token sequence and
//! may be `!Send` (llama.cpp's is): the model task creates it on the thread
//! that will drive it. Optional capabilities default to
//! [`BackendError::NotSupported`].

use erllama_cache::{CtxParams, FingerprintMode, QuantType};

/// An error raised by a backend written in another language (a Python
/// backend's exception), carried unchanged through the engine so the host
/// can give it back to its caller as it was.
#[derive(Clone)]
pub struct ForeignError {
    /// A description for logs and for hosts that cannot use the payload.
    pub message: String,
    /// The host's own error object (a Python backend puts its `PyErr` here).
    pub payload: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for ForeignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ForeignError").field(&self.message).finish()
    }
}

impl std::fmt::Display for ForeignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Errors a backend reports; each maps to one engine error and one
/// exception.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The caller's input is invalid (bad parameter, no logits, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Something needs at least one token and got none.
    #[error("{0} needs at least one token")]
    EmptyInput(String),
    /// A token id outside the vocabulary.
    #[error("token id {token} at index {index} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange {
        /// The id.
        token: i64,
        /// Its position in the input.
        index: usize,
        /// The vocabulary size.
        n_vocab: u32,
    },
    /// The tokens would not fit in the context window.
    #[error("context overflow: {have} + {adding} tokens exceed n_ctx = {n_ctx}")]
    ContextOverflow {
        /// Tokens already in the sequence.
        have: usize,
        /// Tokens being added.
        adding: usize,
        /// The context size.
        n_ctx: usize,
    },
    /// KV state bytes are invalid for this context.
    #[error("invalid KV state: {0}")]
    KvState(String),
    /// The backend does not implement this capability.
    #[error("{0} is not supported by this backend")]
    NotSupported(&'static str),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoTemplate,
    /// A sampling grammar did not parse, or a grammar step failed.
    #[error("invalid grammar: {0}")]
    Grammar(String),
    /// The backend could not create a context (memory, parameters).
    #[error("cannot create a context: {0}")]
    ContextCreate(String),
    /// Computing a batch failed.
    #[error("decode failed: {0}")]
    Decode(String),
    /// The request was cancelled while the backend was inside a step.
    #[error("cancelled")]
    Cancelled,
    /// An error of a foreign backend, to be handed back unchanged.
    #[error("{0}")]
    Foreign(ForeignError),
    /// Anything else the backend reports.
    #[error("{0}")]
    Other(String),
}

/// How the next token is chosen (docs/api.md sampling). The chain order is
/// grammar → repetition penalty → top-k → top-p → min-p → (temperature > 0
/// ? temperature → seeded sampling : greedy); it is reset after every
/// request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    /// Seed of the sampling RNG (`None`: a fixed default, so runs repeat).
    pub seed: Option<u64>,
    /// A GBNF grammar the output must follow (root rule `root`).
    pub grammar: Option<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Whether this is plain greedy decoding.
    #[must_use]
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 && self.grammar.is_none() && self.repetition_penalty == 1.0
    }

    /// Checks the values are sane before any backend sees them.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] naming the first bad value.
    pub fn validate(&self) -> Result<(), BackendError> {
        let bad = |what: String| Err(BackendError::InvalidInput(what));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.grammar.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return bad("grammar is empty".into());
        }
        Ok(())
    }
}

/// How much of a sequence's cells outlive cutting it back, and so can be
/// kept ([`BackendContext::truncate`]) or shared with another sequence
/// ([`BackendContext::copy_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixReuse {
    /// Any prefix (a plain KV cache: every token's cell stays).
    Any,
    /// The whole sequence or all but its last token (a sliding-window
    /// cache: cells that left the window may already be reused, and only
    /// the last token's window is certain to be whole).
    LastToken,
    /// None (a recurrent state, one per sequence): sequences are only
    /// filled and cleared.
    Nothing,
}

/// How a context's KV cells are divided between its sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCells {
    /// One pool of `n_ctx` cells that all sequences draw from (a unified
    /// cache): a lone request may use them all, and a copied prefix shares
    /// its cells with the source. Requests wait for cells as well as for a
    /// sequence.
    #[default]
    Pooled,
    /// `n_ctx` cells of each sequence's own (llama.cpp's non-unified
    /// cache): the context holds `n_seq × n_ctx` cells, a copied prefix is
    /// a copy, and a request waits only for a sequence.
    PerSequence,
}

/// Whether a context's state can be cached (saved and restored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSupport {
    /// Rows can be saved and restored.
    pub cacheable: bool,
    /// The memory kind (`kv`, `kv_iswa`, `recurrent`, `hybrid`, ...).
    pub memory: String,
    /// Why it is not cacheable (`None` when it is).
    pub reason: Option<String>,
    /// Which prefixes can be kept or shared between sequences.
    pub reuse: PrefixReuse,
}

impl Default for StateSupport {
    fn default() -> Self {
        Self {
            cacheable: true,
            memory: "kv".into(),
            reason: None,
            reuse: PrefixReuse::Any,
        }
    }
}

impl PrefixReuse {
    /// Whether the first `n` tokens of a sequence of `len` can be kept or
    /// shared.
    #[must_use]
    pub fn allows(self, n: usize, len: usize) -> bool {
        match self {
            PrefixReuse::Any => n <= len,
            PrefixReuse::LastToken => n <= len && n + 1 >= len,
            PrefixReuse::Nothing => n == 0,
        }
    }
}

/// A loaded LoRA adapter, opaque to the engine (each backend downcasts its
/// own type).
pub type AdapterHandle = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// What identifies a backend's weights for the cache key (docs/cache-format.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFingerprint {
    /// 32-byte fingerprint of the weights (before adapters).
    pub bytes: [u8; 32],
    /// How it was computed.
    pub mode: FingerprintMode,
    /// The weights' quant type.
    pub quant: QuantType,
}

/// The element type of a KV cache (llama.cpp's `--cache-type-k/-v`):
/// quantized types make every cached row and every sequence smaller, at a
/// cost in precision (docs/api.md, quantized KV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (llama.cpp's default).
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale (8.5 bits per value).
    Q8_0,
    /// 5-bit blocks with scale and minimum.
    Q5_1,
    /// 5-bit blocks with a scale.
    Q5_0,
    /// 4-bit blocks with scale and minimum.
    Q4_1,
    /// 4-bit blocks of 32 with an f16 scale (4.5 bits per value).
    Q4_0,
}

impl KvType {
    /// Every type, in label order of precision.
    pub const ALL: [KvType; 8] = [
        KvType::F32,
        KvType::F16,
        KvType::Bf16,
        KvType::Q8_0,
        KvType::Q5_1,
        KvType::Q5_0,
        KvType::Q4_1,
        KvType::Q4_0,
    ];

    /// `"f32"`, `"f16"`, `"bf16"`, `"q8_0"`, `"q5_1"`, `"q5_0"`, `"q4_1"`
    /// or `"q4_0"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Bf16 => "bf16",
            KvType::Q8_0 => "q8_0",
            KvType::Q5_1 => "q5_1",
            KvType::Q5_0 => "q5_0",
            KvType::Q4_1 => "q4_1",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Whether values are stored in quantized blocks (llama.cpp then needs
    /// flash attention for a quantized V cache).
    #[must_use]
    pub const fn is_quantized(self) -> bool {
        !matches!(self, KvType::F32 | KvType::F16 | KvType::Bf16)
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for KvType {
    type Err = BackendError;

    /// A label of [`KvType::label`], case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let want = s.trim().to_ascii_lowercase();
        KvType::ALL
            .into_iter()
            .find(|t| t.label() == want)
            .ok_or_else(|| {
                let labels: Vec<&str> = KvType::ALL.iter().map(|t| t.label()).collect();
                BackendError::InvalidInput(format!(
                    "unknown KV cache type {s:?} (expected one of {})",
                    labels.join(", ")
                ))
            })
    }
}

/// Whether attention runs through llama.cpp's fused flash-attention
/// kernel (llama.cpp's `--flash-attn on|off|auto`). The choice changes the
/// arithmetic and the V cache's layout, so it is part of every cache key:
/// rows written under one setting are never served to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlashAttn {
    /// llama.cpp decides (on for the CPU); a quantized K or V cache turns
    /// it on explicitly.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Off: attention is a plain matrix product and softmax. A quantized V
    /// cache cannot run without flash attention. On the CPU this is what
    /// makes a sequence decoded beside others give the tokens it gives
    /// alone on models whose weight products do not change kernel with
    /// the number of rows (docs/api.md, "Parallel requests").
    Off,
}

impl FlashAttn {
    /// Every setting.
    pub const ALL: [FlashAttn; 3] = [FlashAttn::Auto, FlashAttn::On, FlashAttn::Off];

    /// `"auto"`, `"on"` or `"off"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            FlashAttn::Auto => "auto",
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
        }
    }
}

impl std::fmt::Display for FlashAttn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for FlashAttn {
    type Err = BackendError;

    /// A label of [`FlashAttn::label`], case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let want = s.trim().to_ascii_lowercase();
        FlashAttn::ALL
            .into_iter()
            .find(|t| t.label() == want)
            .ok_or_else(|| {
                BackendError::InvalidInput(format!(
                    "unknown flash attention setting {s:?} (expected auto, on or off)"
                ))
            })
    }
}

/// Options for a new context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextParams {
    /// KV cells: the context window of each request. Shared by all
    /// sequences or one such window each, as the backend's
    /// [`BackendContext::kv_cells`] says.
    pub n_ctx: usize,
    /// Tokens per prefill chunk (chunks start at multiples of it).
    pub n_batch: usize,
    /// Compute threads (`None`: every core).
    pub n_threads: Option<u32>,
    /// Sequences computed together (`parallel`): concurrent requests and
    /// kept warm sequences.
    pub n_seq: usize,
    /// The element type of the K cache.
    pub type_k: KvType,
    /// The element type of the V cache.
    pub type_v: KvType,
    /// Flash attention.
    pub flash_attn: FlashAttn,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: None,
            n_seq: 4,
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: FlashAttn::Auto,
        }
    }
}

/// A loaded model.
pub trait Backend: Send + Sync {
    /// Backend name (`llama`, `stub`, ...).
    fn name(&self) -> &str;
    /// The weights' fingerprint, mode and quant type for cache keys.
    fn fingerprint(&self) -> ModelFingerprint;
    /// The context parameters that shape the KV layout, hashed into every
    /// cache key. The default covers n_ctx, n_batch and the KV types in one
    /// unified sequence.
    fn ctx_params(&self, params: &ContextParams) -> CtxParams {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        CtxParams {
            n_ctx: n(params.n_ctx),
            n_batch: n(params.n_batch),
            n_ubatch: n(params.n_batch),
            type_k: params.type_k.label().into(),
            type_v: params.type_v.label().into(),
            // A row is one sequence's state, the same whichever context
            // (of any parallelism) saved or restores it.
            n_seq_max: 1,
            kv_unified: true,
            flash_attn: false,
            extra: vec![("backend".into(), self.name().to_owned())],
        }
    }
    /// The bytes of one token's text (pieces of a multi-byte character
    /// may split across tokens).
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for an id outside the vocabulary.
    fn token_bytes(&self, token: u32) -> Result<Vec<u8>, BackendError> {
        self.detokenize(&[token]).map(String::into_bytes)
    }
    /// Renders `(role, content)` messages through the model's chat
    /// template and tokenizes the result (markup as control tokens, the
    /// contents as plain text).
    ///
    /// # Errors
    ///
    /// [`BackendError::NotSupported`] without a template.
    fn chat_tokens(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<Vec<u32>, BackendError> {
        let _ = (messages, add_assistant);
        Err(BackendError::NotSupported("chat_template"))
    }
    /// Vocabulary size; valid token ids are `0..n_vocab`.
    fn n_vocab(&self) -> u32;
    /// Tokenizes text (`add_bos`: the model's start token if it wants one).
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for text the tokenizer cannot take.
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError>;
    /// Turns tokens back into text.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for ids outside the vocabulary.
    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError>;
    /// Creates a context; call it on the thread that will use the context.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for bad parameters,
    /// [`BackendError::Other`] when the backend cannot allocate it.
    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError>;
    /// Loads a LoRA adapter file for this model (it is applied per context
    /// with [`BackendContext::set_adapters`]).
    ///
    /// # Errors
    ///
    /// [`BackendError::NotSupported`] unless the backend implements it;
    /// [`BackendError::InvalidInput`] for a file that is not an adapter of
    /// this model.
    fn load_adapter(&self, path: &std::path::Path) -> Result<AdapterHandle, BackendError> {
        let _ = path;
        Err(BackendError::NotSupported("lora"))
    }
    /// A GBNF grammar (root rule `root`) that holds output to the JSON
    /// Schema `schema` (JSON text).
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for a schema that cannot be
    /// converted; [`BackendError::NotSupported`] unless the backend
    /// implements it.
    fn json_schema_grammar(&self, schema: &str) -> Result<String, BackendError> {
        let _ = schema;
        Err(BackendError::NotSupported("json_schema"))
    }
    /// A pooled embedding of `tokens`.
    ///
    /// # Errors
    ///
    /// [`BackendError::NotSupported`] unless the backend implements it.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
        let _ = tokens;
        Err(BackendError::NotSupported("embed"))
    }
}

/// A sequence of a context: `0..n_seq`.
pub type SeqId = usize;

/// Tokens for one sequence in a [`BackendContext::decode`] batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    /// The sequence they are appended to.
    pub seq: SeqId,
    /// The tokens, at the sequence's next positions.
    pub tokens: &'a [u32],
    /// Whether the logits of the last of them are wanted (they become the
    /// sequence's current logits, for [`BackendContext::sample`]).
    pub logits: bool,
}

/// One context holding up to `n_seq` token sequences, with `n_ctx` KV cells
/// shared by all of them or `n_ctx` each ([`BackendContext::kv_cells`]).
///
/// Invariants: the KV cells of sequence `s` hold exactly
/// [`BackendContext::tokens`]`(s)`, at positions `0..len`; the logits a
/// [`BackendContext::decode`] computed last until the next `decode` (of
/// any sequence) or until their sequence changes.
pub trait BackendContext {
    /// How many sequences the context holds.
    fn n_seq(&self) -> usize;
    /// The tokens in sequence `seq`.
    fn tokens(&self, seq: SeqId) -> &[u32];
    /// Configures how [`BackendContext::sample`] chooses `seq`'s tokens
    /// until the next call (the engine sets it when a request starts on
    /// the sequence).
    ///
    /// # Errors
    ///
    /// [`BackendError::Grammar`] for a grammar that does not parse;
    /// [`BackendError::NotSupported`] for anything but greedy decoding
    /// unless the backend implements sampling.
    fn set_sampling(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), BackendError> {
        let _ = seq;
        params.validate()?;
        if params.is_greedy() {
            Ok(())
        } else {
            Err(BackendError::NotSupported("sampling"))
        }
    }
    /// The cancel flag of the request running on `seq` (`None` between
    /// requests); a backend whose steps can be long (grammar sampling)
    /// checks it inside them and fails the step with
    /// [`BackendError::Cancelled`].
    fn set_interrupt(
        &mut self,
        seq: SeqId,
        flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) {
        let _ = (seq, flag);
    }
    /// How the context's KV cells are divided between its sequences; the
    /// default is one pool shared by all.
    fn kv_cells(&self) -> KvCells {
        KvCells::Pooled
    }
    /// Whether this context's state can be cached. A model that is not
    /// cacheable is looked up and saved never; the default is a plain KV
    /// cache.
    fn state_support(&self) -> StateSupport {
        StateSupport::default()
    }
    /// Applies exactly these adapters with these scales from now on (an
    /// empty list removes all) and clears every sequence: KV computed
    /// under other adapters is never reused. The engine calls it only when
    /// no request runs.
    ///
    /// # Errors
    ///
    /// [`BackendError::NotSupported`] for a non-empty list unless the
    /// backend implements adapters (or for more adapters than it can apply
    /// at once).
    fn set_adapters(&mut self, adapters: &[(AdapterHandle, f32)]) -> Result<(), BackendError> {
        if adapters.is_empty() {
            Ok(())
        } else {
            Err(BackendError::NotSupported("lora"))
        }
    }
    /// Appends each item's tokens to its sequence, all in one step; an
    /// item that asks for logits makes its last token's logits the
    /// sequence's current logits. On error every sequence of the batch is
    /// as it was before the call.
    ///
    /// # Errors
    ///
    /// [`BackendError::EmptyInput`] (an item without tokens),
    /// [`BackendError::TokenOutOfRange`], [`BackendError::ContextOverflow`]
    /// (no room for the tokens), [`BackendError::Decode`].
    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError>;
    /// Chooses `seq`'s next token from its current logits (its sampler
    /// chain and grammar advance); the token is *not* appended — the
    /// engine feeds it in a later [`BackendContext::decode`] only if
    /// generation goes on.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] when `seq` has no logits,
    /// [`BackendError::Grammar`], [`BackendError::Cancelled`].
    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError>;
    /// `seq`'s current logits (the scores of its next token), while it has
    /// them: from the [`BackendContext::decode`] that last asked for them
    /// or from [`BackendContext::set_logits`], until the sequence changes
    /// or the next decode. The engine stores them with a row that ends at
    /// the end of a prompt. `None` (the default): the backend keeps none
    /// to hand out.
    fn logits(&self, seq: SeqId) -> Option<&[f32]> {
        let _ = seq;
        None
    }
    /// Makes `logits` (as [`BackendContext::logits`] gave them for the
    /// tokens `seq` holds now) `seq`'s current logits, so the next
    /// [`BackendContext::sample`] needs no decode: an exact cache hit
    /// restores the state and these, and answers at restore speed.
    ///
    /// # Errors
    ///
    /// [`BackendError::NotSupported`] (the default; the engine then re-feeds
    /// the last prompt token), [`BackendError::InvalidInput`] for logits
    /// of the wrong length or an empty sequence.
    fn set_logits(&mut self, seq: SeqId, logits: &[f32]) -> Result<(), BackendError> {
        let _ = (seq, logits);
        Err(BackendError::NotSupported("stored logits"))
    }
    /// Whether `token` ends generation.
    ///
    /// # Errors
    ///
    /// A backend whose check can fail (a Python backend) reports it.
    fn is_eog(&self, token: u32) -> Result<bool, BackendError>;
    /// Packs `seq`'s KV state.
    ///
    /// # Errors
    ///
    /// [`BackendError::KvState`] when the backend cannot pack.
    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError>;
    /// A size hint for [`BackendContext::kv_pack_into`]: at least the bytes
    /// `seq`'s state packs into, when the backend knows it cheaply (0:
    /// unknown).
    fn kv_pack_size(&self, seq: SeqId) -> usize {
        let _ = seq;
        0
    }
    /// Appends `seq`'s packed KV state (what [`BackendContext::kv_pack`]
    /// returns) to `buf`: the engine packs into a recycled buffer that is
    /// already faulted in, so a save on the request path allocates
    /// nothing. On error `buf` is as it was.
    ///
    /// # Errors
    ///
    /// As [`BackendContext::kv_pack`].
    fn kv_pack_into(&self, seq: SeqId, buf: &mut Vec<u8>) -> Result<(), BackendError> {
        buf.extend_from_slice(&self.kv_pack(seq)?);
        Ok(())
    }
    /// Restores a packed state holding `tokens` into `seq`, which is
    /// cleared first. No logits afterwards.
    ///
    /// # Errors
    ///
    /// [`BackendError::KvState`] for bytes that are not such a state (the
    /// sequence is then empty).
    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError>;
    /// Keeps the first `n` tokens of `seq` (no logits afterwards).
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] when `n` exceeds its length.
    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError>;
    /// Makes the empty sequence `dst` hold `src`'s first `n` tokens without
    /// computing them: sharing their KV cells ([`KvCells::Pooled`]) or
    /// copying them ([`KvCells::PerSequence`]). No logits.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] when `dst` is not empty, `src ==
    /// dst` or `n` exceeds `src`'s length.
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError>;
    /// Empties `seq`.
    fn clear(&mut self, seq: SeqId);
}
