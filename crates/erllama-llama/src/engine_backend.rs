//! The engine's [`Backend`] trait over llama.cpp.
//!
//! [`LlamaBackend`] is a loaded [`Model`] plus its cache fingerprint; each
//! context it creates is a [`Session`] wrapped with a sampler chain. What
//! the engine may hand in is validated here (or in [`Model`] / [`Session`])
//! before llama.cpp sees it, so bad input is an error, never an abort.
//!
//! Choices worth knowing:
//!
//! - `tokenize` never lets user text spell control tokens; `detokenize` and
//!   `token_bytes` render control tokens as nothing.
//! - Sampling (docs/api.md): the chain is grammar → repetition penalty → top-k →
//!   top-p → min-p → (temperature > 0 ? temperature → seeded `dist` :
//!   greedy). It is rebuilt by every [`BackendContext::set_sampling`], so
//!   its state (grammar position, penalty history, RNG) starts fresh with
//!   every request. Plain greedy decoding (no grammar, no penalty,
//!   temperature 0) takes the session's argmax path, which picks the same
//!   token. The repetition penalty looks at the last
//!   [`PENALTY_LAST_N`] tokens of the sequence, prompt included (like
//!   llama.cpp's server).
//! - Sampling is done on a copy of the logits: the grammar is applied
//!   first and checked to leave at least one candidate, then the rest of
//!   the chain picks, and only then is the token accepted into the
//!   samplers. llama.cpp's own `llama_sampler_sample` would abort the
//!   process on a grammar that allows no token.
//! - A context holds `n_seq` sequences (the engine's `parallel`), each with
//!   `n_ctx` KV cells of its own ([`KvCells::PerSequence`], see
//!   [`Session`]); [`BackendContext::decode`] computes the one-token items
//!   of a batch in one `llama_decode` and each prefill chunk in one of its
//!   own, and `copy_prefix` copies cells between sequences. Every sequence
//!   has its own sampler chain and cancel flag.
//! - LoRA: [`Backend::load_adapter`] loads a [`LoraAdapter`] (the handle
//!   downcasts to it); [`BackendContext::set_adapters`] applies at most one
//!   adapter with a non-zero scale at a time, since llama-cpp-2 0.1.160
//!   applies one at a time ([`BackendError::NotSupported`] for more).
//! - `embed` runs in its own short-lived context with embeddings on:
//!   the model's own pooling when its GGUF declares one (mean, CLS, ...),
//!   else the last token's hidden state. The vector is L2-normalised.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use erllama_cache::{
    fingerprint_file_safe, fingerprint_gguf_chunked, read_gguf_file_type, CtxParams,
    FingerprintMode, GgufError, QuantType,
};
use erllama_engine::{
    AdapterHandle, Backend, BackendContext, BackendError, BatchItem, ContextParams, KvCells,
    ModelFingerprint, PrefixReuse, SamplingParams, SeqId, StateSupport,
};
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use crate::backend::backend;
use crate::error::{LlamaError, Result};
use crate::grammar::{build_grammar, check_grammar, GrammarStep, GrammarStepError};
use crate::lora::LoraAdapter;
use crate::model::{token_i32, Model, ModelParams};
use crate::session::{SeqTokens, Session, SessionParams};

/// How many recent tokens the repetition penalty looks at.
pub const PENALTY_LAST_N: usize = 64;

/// Seed of the sampling RNG when a request gives none, so runs repeat.
pub const DEFAULT_SAMPLING_SEED: u32 = 0x2545_F491;

/// How long llama.cpp may take to parse a grammar (off the model's thread)
/// before the request fails.
pub const GRAMMAR_PARSE_BUDGET: Duration = Duration::from_secs(2);

/// How long one grammar-constrained sampling step may take before its
/// request fails: the grammar is applied to the candidates in chunks, and
/// the deadline (and the request's cancel flag) is checked between them.
pub const GRAMMAR_STEP_BUDGET: Duration = Duration::from_secs(2);

impl From<LlamaError> for BackendError {
    /// One engine error kind per llama error kind, so a failure keeps its
    /// meaning (and its Python class) whichever API it came through.
    fn from(e: LlamaError) -> Self {
        match e {
            LlamaError::InvalidParam { .. }
            | LlamaError::TextTooLarge(_)
            | LlamaError::NoLogits
            | LlamaError::LoraLoad { .. } => BackendError::InvalidInput(e.to_string()),
            LlamaError::EmptyInput(what) => BackendError::EmptyInput(what.to_owned()),
            LlamaError::TokenOutOfRange {
                token,
                index,
                n_vocab,
            } => BackendError::TokenOutOfRange {
                token,
                index,
                n_vocab,
            },
            LlamaError::ContextOverflow {
                have,
                adding,
                n_ctx,
            } => BackendError::ContextOverflow {
                have,
                adding,
                n_ctx: n_ctx as usize,
            },
            LlamaError::KvState(msg) => BackendError::KvState(msg),
            LlamaError::NoChatTemplate => BackendError::NoTemplate,
            LlamaError::ContextCreate(msg) => BackendError::ContextCreate(msg),
            LlamaError::Decode(msg) => BackendError::Decode(msg),
            LlamaError::BackendInit(_)
            | LlamaError::ModelNotFound(_)
            | LlamaError::ModelUnreadable { .. }
            | LlamaError::NotGguf { .. }
            | LlamaError::ModelLoad { .. }
            | LlamaError::ChatTemplate(_)
            | LlamaError::LoraApply(_)
            | LlamaError::WorkerGone(_) => BackendError::Other(e.to_string()),
        }
    }
}

/// A llama.cpp model as an engine [`Backend`].
#[derive(Debug, Clone)]
pub struct LlamaBackend {
    model: Model,
    fingerprint: ModelFingerprint,
}

impl LlamaBackend {
    /// Loads the GGUF at `path` with a fingerprint the caller computed.
    ///
    /// # Errors
    ///
    /// As [`Model::load`].
    pub fn load(
        path: impl AsRef<Path>,
        params: &ModelParams,
        fingerprint: ModelFingerprint,
    ) -> Result<Self> {
        let model = Model::load(path, params)?;
        Ok(Self { model, fingerprint })
    }

    /// Loads the GGUF at `path` and fingerprints it: `Safe` hashes the
    /// whole file ([`fingerprint_file_safe`]), `GgufChunked` its header and
    /// first tensor ([`fingerprint_gguf_chunked`]). The quant type comes
    /// from the file's `general.file_type`, else the loaded model's label
    /// (and `f32` for a file type the cache has no row for, with a
    /// warning).
    ///
    /// # Errors
    ///
    /// As [`Model::load`]; [`LlamaError::InvalidParam`] for `FastUnsafe`
    /// (it needs a caller-supplied digest: use [`LlamaBackend::load`]);
    /// [`LlamaError::ModelUnreadable`] / [`LlamaError::NotGguf`] when
    /// fingerprinting fails.
    pub fn open(
        path: impl AsRef<Path>,
        params: &ModelParams,
        mode: FingerprintMode,
    ) -> Result<Self> {
        let path = path.as_ref();
        if mode == FingerprintMode::FastUnsafe {
            return Err(LlamaError::InvalidParam {
                name: "fingerprint_mode",
                reason: "fast_unsafe needs a caller-supplied digest".into(),
            });
        }
        let model = Model::load(path, params)?;
        let gguf_err = |e: GgufError| match e {
            GgufError::Io { source, .. } => LlamaError::ModelUnreadable {
                path: path.to_path_buf(),
                source,
            },
            other => LlamaError::NotGguf {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        };
        let bytes = match mode {
            FingerprintMode::Safe => {
                fingerprint_file_safe(path, &mut |_, _| {}).map_err(|source| {
                    LlamaError::ModelUnreadable {
                        path: path.to_path_buf(),
                        source,
                    }
                })?
            }
            _ => fingerprint_gguf_chunked(path).map_err(gguf_err)?,
        };
        let quant = match read_gguf_file_type(path).map_err(gguf_err)? {
            Some(q) => q,
            None => QuantType::from_label(&model.meta().quant_type).unwrap_or_else(|_| {
                tracing::warn!(
                    path = %path.display(),
                    label = %model.meta().quant_type,
                    "unknown quant type; recording f32 in cache keys"
                );
                QuantType::F32
            }),
        };
        Ok(Self {
            model,
            fingerprint: ModelFingerprint { bytes, mode, quant },
        })
    }

    /// The loaded model.
    #[must_use]
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn session_params(params: &ContextParams) -> Result<SessionParams> {
        let to_u32 = |name: &'static str, v: usize| {
            u32::try_from(v).map_err(|_| LlamaError::InvalidParam {
                name,
                reason: format!("{v} is too large"),
            })
        };
        Ok(SessionParams {
            n_ctx: to_u32("n_ctx", params.n_ctx)?,
            n_batch: to_u32("n_batch", params.n_batch)?,
            n_threads: params.n_threads,
            n_seq_max: to_u32("n_seq", params.n_seq)?,
            type_k: params.type_k,
            type_v: params.type_v,
            flash_attn: params.flash_attn,
        })
    }

    /// The pooling an embeddings context uses: the model's own when its
    /// GGUF declares one, else the last token.
    fn embed_pooling(&self) -> LlamaPoolingType {
        let arch = &self.model.meta().architecture;
        let declared = self
            .model
            .inner
            .model
            .meta_val_str(&format!("{arch}.pooling_type"))
            .ok()
            .and_then(|v| v.trim().parse::<i32>().ok());
        match declared {
            Some(p) if p > 0 => LlamaPoolingType::Unspecified,
            _ => LlamaPoolingType::Last,
        }
    }
}

impl Backend for LlamaBackend {
    fn name(&self) -> &str {
        "llama"
    }

    fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint.clone()
    }

    /// The layout [`Session`] creates: `n_batch` clamped to `n_ctx`,
    /// `n_ubatch = n_batch`, the K and V types, one sequence in a unified
    /// KV cache (whatever `n_seq`: rows hold one sequence in the one-stream
    /// form, see [`crate::state`]), the flash-attention setting (`on`,
    /// `off`, or llama.cpp's `auto`, which is set on with a K or V type
    /// other than f16 — a quantized V needs it; recorded in `flash_attn`
    /// and `extra` since it decides the attention arithmetic and whether V
    /// is stored transposed), and the
    /// CPU features this build of llama.cpp computes with (`cpu`, from
    /// [`crate::system_info`]): kernels for other instruction sets (the
    /// wheel's AVX-512 build against its x86-64-v3 one) round differently,
    /// so their states are not the ones this process would compute, and a
    /// restore must never mix them.
    fn ctx_params(&self, params: &ContextParams) -> CtxParams {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let n_ctx = n(params.n_ctx);
        let n_batch = n(params.n_batch).min(n_ctx);
        let setting = Self::session_params(params)
            .ok()
            .and_then(|p| p.flash_attn_setting());
        CtxParams {
            n_ctx,
            n_batch,
            n_ubatch: n_batch,
            type_k: params.type_k.label().into(),
            type_v: params.type_v.label().into(),
            n_seq_max: 1,
            kv_unified: true,
            flash_attn: setting == Some(true),
            extra: vec![
                ("backend".into(), "llama".into()),
                (
                    "flash_attn".into(),
                    match setting {
                        Some(true) => "enabled",
                        Some(false) => "disabled",
                        None => "auto",
                    }
                    .into(),
                ),
                ("cpu".into(), crate::backend::cpu_features().to_owned()),
            ],
        }
    }

    /// Control tokens render as nothing.
    fn token_bytes(&self, token: u32) -> Result<Vec<u8>, BackendError> {
        Ok(self.model.token_bytes(token, false)?)
    }

    fn chat_tokens(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<Vec<u32>, BackendError> {
        Ok(self.model.chat_tokens(messages, add_assistant)?)
    }

    fn n_vocab(&self) -> u32 {
        self.model.n_vocab()
    }

    /// User text never yields control tokens.
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError> {
        Ok(self.model.tokenize(text, add_bos, false)?)
    }

    /// Control tokens render as nothing.
    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        Ok(self.model.detokenize(tokens, false)?)
    }

    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError> {
        let session = Session::new(&self.model, &Self::session_params(params)?)?;
        Ok(Box::new(LlamaContextBackend::new(session)))
    }

    /// Loads a LoRA adapter for this model; the handle is an
    /// `Arc<`[`LoraAdapter`]`>`. A file that is missing, not GGUF, not a
    /// LoRA adapter or not one of this model is
    /// [`BackendError::InvalidInput`].
    fn load_adapter(&self, path: &Path) -> Result<AdapterHandle, BackendError> {
        let adapter = self.model.load_lora(path)?;
        Ok(Arc::new(adapter))
    }

    /// A pooled, L2-normalised embedding of `tokens` (`n_embd` floats),
    /// computed in a fresh context: the model's declared pooling, else
    /// the last token's hidden state.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
        Ok(self.embed_impl(tokens)?)
    }

    /// llama.cpp's own converter (`common/json-schema-to-grammar.cpp`, what
    /// its server uses for `response_format`). The schema is bounded first:
    /// at most [`MAX_SCHEMA_BYTES`] of JSON nested at most
    /// [`MAX_SCHEMA_DEPTH`] deep, so the recursive converter never meets a
    /// hostile depth; a schema it rejects is `InvalidInput`.
    fn json_schema_grammar(&self, schema: &str) -> Result<String, BackendError> {
        check_schema(schema)?;
        let grammar = llama_cpp_2::json_schema_to_grammar(schema).map_err(|e| {
            BackendError::InvalidInput(format!("the JSON schema cannot be converted: {e}"))
        })?;
        // The grammar is checked like any user grammar before it is used.
        Ok(grammar)
    }
}

/// Largest JSON schema [`LlamaBackend::json_schema_grammar`] converts.
pub const MAX_SCHEMA_BYTES: usize = 64 << 10;
/// Deepest nesting of a JSON schema it converts.
pub const MAX_SCHEMA_DEPTH: usize = 32;

fn check_schema(schema: &str) -> std::result::Result<(), BackendError> {
    if schema.len() > MAX_SCHEMA_BYTES {
        return Err(BackendError::InvalidInput(format!(
            "the JSON schema is {} bytes, more than {MAX_SCHEMA_BYTES}",
            schema.len()
        )));
    }
    let value: serde_json::Value = serde_json::from_str(schema)
        .map_err(|e| BackendError::InvalidInput(format!("the JSON schema is not JSON: {e}")))?;
    if !value.is_object() && !value.is_boolean() {
        return Err(BackendError::InvalidInput(
            "a JSON schema must be an object (or a boolean)".into(),
        ));
    }
    fn depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    // serde_json stops at 128 levels, so this recursion is bounded too.
    let d = depth(&value);
    if d > MAX_SCHEMA_DEPTH {
        return Err(BackendError::InvalidInput(format!(
            "the JSON schema nests {d} levels deep, more than {MAX_SCHEMA_DEPTH}"
        )));
    }
    Ok(())
}

impl LlamaBackend {
    fn embed_impl(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(LlamaError::EmptyInput("embed"));
        }
        self.model.check_tokens(tokens)?;
        let train = self.model.meta().n_ctx_train;
        let limit = if train > 0 { train as usize } else { 1 << 16 };
        if tokens.len() > limit {
            return Err(LlamaError::ContextOverflow {
                have: 0,
                adding: tokens.len(),
                n_ctx: u32::try_from(limit).unwrap_or(u32::MAX),
            });
        }
        let n = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        // Small contexts still get a sane minimum size.
        let n_ctx = n.max(8);
        let threads = i32::try_from(SessionParams::default().threads()).unwrap_or(1);
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_seq_max(1)
            .with_embeddings(true)
            .with_pooling_type(self.embed_pooling())
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let backend = backend()?;
        let mut ctx = {
            let _guard = self.model.inner.lock_model_state();
            self.model
                .inner
                .model
                .new_context(backend, cparams)
                .map_err(|e| LlamaError::ContextCreate(e.to_string()))?
        };
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            let pos = i32::try_from(i).unwrap_or(i32::MAX);
            batch
                .add(LlamaToken(token_i32(t)), pos, &[0], true)
                .map_err(|e| LlamaError::Decode(e.to_string()))?;
        }
        {
            let _compute = crate::backend::compute_lock();
            ctx.decode(&mut batch)
                .map_err(|e| LlamaError::Decode(e.to_string()))?;
        }
        let raw = ctx
            .embeddings_seq_ith(0)
            .map_err(|e| LlamaError::Decode(format!("no pooled embedding: {e}")))?;
        let mut out = raw.to_vec();
        let norm = out
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() {
            return Err(LlamaError::Decode("the embedding is not finite".into()));
        }
        if norm > 0.0 {
            for v in &mut out {
                *v = (f64::from(*v) / norm) as f32;
            }
        }
        Ok(out)
    }
}

/// A grammar problem as a backend error.
fn grammar_err(msg: String) -> BackendError {
    BackendError::Grammar(msg)
}

/// A failed grammar step as a backend error.
fn step_err(e: GrammarStepError) -> BackendError {
    match e {
        GrammarStepError::Cancelled => BackendError::Cancelled,
        GrammarStepError::TooSlow { elapsed } => BackendError::Grammar(format!(
            "a grammar-constrained step took {:.1} s, more than the {} s budget; the grammar is \
             too ambiguous for this vocabulary",
            elapsed.as_secs_f64(),
            GRAMMAR_STEP_BUDGET.as_secs()
        )),
        GrammarStepError::NoCandidate => {
            BackendError::Grammar("the grammar allows no next token".into())
        }
        other => BackendError::Grammar(other.to_string()),
    }
}

/// Folds a 64-bit seed into llama.cpp's 32 bits, avoiding
/// `LLAMA_DEFAULT_SEED` (`u32::MAX`), which would mean "random".
fn seed32(seed: Option<u64>) -> u32 {
    match seed {
        None => DEFAULT_SAMPLING_SEED,
        Some(s) => {
            let folded = (s ^ (s >> 32)) as u32;
            if folded == u32::MAX {
                u32::MAX - 1
            } else {
                folded
            }
        }
    }
}

/// The sampler state of one request.
struct Sampler {
    /// The grammar, applied first (in chunks, under a deadline) and checked
    /// separately.
    grammar: Option<(LlamaSampler, GrammarStep)>,
    /// penalty → top-k → top-p → min-p → temp → dist, or … → greedy.
    chain: LlamaSampler,
    /// The penalty still has to see the sequence's recent tokens.
    prime_penalty: bool,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("grammar", &self.grammar.is_some())
            .field("chain", &self.chain)
            .finish()
    }
}

impl Sampler {
    fn build(model: &Model, params: &SamplingParams) -> Result<Self, BackendError> {
        let grammar = match params.grammar.as_deref() {
            None => None,
            Some(text) => {
                // Checked, then parsed by llama.cpp off this thread within
                // a time budget (crate::grammar).
                let g = build_grammar(model, text, GRAMMAR_PARSE_BUDGET).map_err(grammar_err)?;
                Some((g, GrammarStep::new(model)))
            }
        };
        let mut stages = Vec::new();
        let penalty = params.repetition_penalty != 1.0;
        if penalty {
            stages.push(LlamaSampler::penalties(
                i32::try_from(model.n_vocab()).unwrap_or(i32::MAX),
                PENALTY_LAST_N as i32,
                params.repetition_penalty,
                0.0,
                0.0,
            ));
        }
        if params.top_k > 0 {
            stages.push(LlamaSampler::top_k(
                i32::try_from(params.top_k).unwrap_or(i32::MAX),
            ));
        }
        if params.top_p < 1.0 {
            stages.push(LlamaSampler::top_p(params.top_p, 1));
        }
        if params.min_p > 0.0 {
            stages.push(LlamaSampler::min_p(params.min_p, 1));
        }
        if params.temperature > 0.0 {
            stages.push(LlamaSampler::temp(params.temperature));
            stages.push(LlamaSampler::dist(seed32(params.seed)));
        } else {
            stages.push(LlamaSampler::greedy());
        }
        Ok(Self {
            grammar,
            chain: LlamaSampler::chain(stages, true),
            prime_penalty: penalty,
        })
    }
}

/// A [`Session`] as an engine [`BackendContext`]: its sequences, each with
/// the sampler of the request running on it. `!Send`: created by
/// [`LlamaBackend::new_context`] on the thread that drives it.
#[derive(Debug)]
pub struct LlamaContextBackend {
    session: Session,
    /// Per sequence, `None`: plain greedy decoding (argmax).
    samplers: Vec<Option<Sampler>>,
    /// Per sequence, the running request's cancel flag, checked inside
    /// long grammar steps.
    interrupts: Vec<Option<Arc<AtomicBool>>>,
}

impl LlamaContextBackend {
    /// Wraps an existing session (greedy until [`BackendContext::set_sampling`]).
    #[must_use]
    pub fn new(session: Session) -> Self {
        let n = session.n_seq();
        Self {
            session,
            samplers: (0..n).map(|_| None).collect(),
            interrupts: vec![None; n],
        }
    }

    /// The session underneath.
    #[must_use]
    pub fn session(&self) -> &Session {
        &self.session
    }

    fn check_seq(&self, seq: SeqId) -> Result<(), BackendError> {
        if seq < self.session.n_seq() {
            Ok(())
        } else {
            Err(BackendError::InvalidInput(format!(
                "sequence {seq} does not exist (the context holds {})",
                self.session.n_seq()
            )))
        }
    }
}

impl BackendContext for LlamaContextBackend {
    fn n_seq(&self) -> usize {
        self.session.n_seq()
    }

    fn tokens(&self, seq: SeqId) -> &[u32] {
        self.session.seq_tokens(seq)
    }

    /// Checks the grammar text ([`BackendError::Grammar`], also for an
    /// empty one), validates `params` and builds a fresh sampler chain
    /// for `seq` (grammar → repetition penalty → top-k → top-p → min-p →
    /// temperature → seeded dist, or greedy). On error the sequence falls
    /// back to greedy.
    fn set_sampling(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), BackendError> {
        self.check_seq(seq)?;
        self.samplers[seq] = None;
        // The grammar first, so an empty one is a grammar error too.
        if let Some(text) = params.grammar.as_deref() {
            check_grammar(text).map_err(grammar_err)?;
        }
        params.validate()?;
        if params.is_greedy() {
            // top-k/p and min-p never remove the most likely token, so
            // temperature 0 without grammar or penalty is plain argmax.
            return Ok(());
        }
        self.samplers[seq] = Some(Sampler::build(self.session.model(), params)?);
        Ok(())
    }

    fn set_interrupt(&mut self, seq: SeqId, flag: Option<Arc<AtomicBool>>) {
        if let Some(slot) = self.interrupts.get_mut(seq) {
            *slot = flag;
        }
    }

    /// The layout this context's probe learned: plain and sliding-window
    /// KV caches are cacheable; recurrent, hybrid and unknown layouts are
    /// not (with the reason).
    fn kv_cells(&self) -> KvCells {
        // Each sequence has its own llama.cpp stream (see `Session`).
        KvCells::PerSequence
    }

    fn state_support(&self) -> StateSupport {
        let s = self.session.cache_support();
        let reuse = match s.memory.as_str() {
            _ if !s.cacheable => PrefixReuse::Nothing,
            "kv" => PrefixReuse::Any,
            _ => PrefixReuse::LastToken,
        };
        StateSupport {
            cacheable: s.cacheable,
            memory: s.memory,
            reason: s.reason,
            reuse,
        }
    }

    /// Entries with scale 0 are skipped; at most one may remain (applied
    /// with its scale), none removes the applied adapter. Changing what is
    /// applied clears every sequence.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] for a handle that is not a
    /// [`LoraAdapter`] of this model or a scale that is not finite;
    /// [`BackendError::NotSupported`] for more than one active adapter.
    /// On error nothing changes.
    fn set_adapters(&mut self, adapters: &[(AdapterHandle, f32)]) -> Result<(), BackendError> {
        let mut active: Option<(&LoraAdapter, f32)> = None;
        let mut n_active = 0usize;
        for (i, (handle, scale)) in adapters.iter().enumerate() {
            let adapter = handle
                .as_ref()
                .downcast_ref::<LoraAdapter>()
                .ok_or_else(|| {
                    BackendError::InvalidInput(format!(
                        "adapter {i} was not loaded by the llama backend"
                    ))
                })?;
            if !scale.is_finite() {
                return Err(BackendError::InvalidInput(format!(
                    "adapter {i}: the scale must be finite, got {scale}"
                )));
            }
            if !adapter.belongs_to(self.session.model()) {
                return Err(BackendError::InvalidInput(format!(
                    "adapter {i} ({}) was loaded for another model",
                    adapter.path().display()
                )));
            }
            if *scale != 0.0 {
                n_active += 1;
                active = Some((adapter, *scale));
            }
        }
        if n_active > 1 {
            return Err(BackendError::NotSupported(
                "several active LoRA adapters (llama-cpp-2 0.1.160 applies one at a time)",
            ));
        }
        Ok(self.session.set_lora(active)?)
    }

    /// One `llama_decode` of every item (the engine keeps each prompt's
    /// chunks aligned and its last token on its own, so a cache hit
    /// continues as the cold run did).
    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError> {
        let items: Vec<SeqTokens<'_>> = batch
            .iter()
            .map(|b| SeqTokens {
                seq: b.seq,
                tokens: b.tokens,
                logits: b.logits,
            })
            .collect();
        Ok(self.session.decode_batch(&items)?)
    }

    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError> {
        self.check_seq(seq)?;
        let logits = self.session.seq_logits(seq)?;
        let Some(s) = self.samplers[seq].as_mut() else {
            return Ok(crate::session::argmax(logits));
        };
        let mut cands = LlamaTokenDataArray::new(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    LlamaTokenData::new(LlamaToken(i32::try_from(i).unwrap_or(i32::MAX)), l, 0.0)
                })
                .collect(),
            false,
        );
        if s.prime_penalty {
            let toks = self.session.seq_tokens(seq);
            let tail = &toks[toks.len().saturating_sub(PENALTY_LAST_N)..];
            for &t in tail {
                s.chain.accept(LlamaToken(token_i32(t)));
            }
            s.prime_penalty = false;
        }
        if let Some((g, step)) = s.grammar.as_mut() {
            let deadline = Instant::now() + GRAMMAR_STEP_BUDGET;
            let cancel = self.interrupts[seq].clone();
            step.apply(g, &mut cands, deadline, || {
                cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
            })
            .map_err(step_err)?;
            if !cands.data.iter().any(|d| d.logit() > f32::NEG_INFINITY) {
                return Err(BackendError::Grammar(
                    "the grammar allows no next token".into(),
                ));
            }
        }
        cands.apply_sampler(&mut s.chain);
        let chosen = cands
            .selected
            .and_then(|i| cands.data.get(i))
            .copied()
            .ok_or_else(|| BackendError::Other("the sampler selected no token".into()))?;
        if chosen.logit() == f32::NEG_INFINITY || chosen.logit().is_nan() {
            return Err(BackendError::Grammar(
                "the grammar allows no next token".into(),
            ));
        }
        let token = u32::try_from(chosen.id().0)
            .ok()
            .filter(|&t| t < self.session.model().n_vocab())
            .ok_or_else(|| {
                BackendError::Other(format!("sampled token {} is invalid", chosen.id().0))
            })?;
        // The samplers advance past the chosen token (the engine feeds it
        // to the sequence if generation goes on).
        if let Some((g, step)) = s.grammar.as_mut() {
            step.accept(g, chosen.id()).map_err(step_err)?;
        }
        s.chain.accept(chosen.id());
        Ok(token)
    }

    fn is_eog(&self, token: u32) -> Result<bool, BackendError> {
        Ok(self.session.model().is_eog(token))
    }

    fn logits(&self, seq: SeqId) -> Option<&[f32]> {
        self.session.seq_logits(seq).ok()
    }

    /// Installs stored logits (one per vocabulary entry) as `seq`'s next
    /// token scores: sampling then gives exactly what it gave when they
    /// were computed.
    fn set_logits(&mut self, seq: SeqId, logits: &[f32]) -> Result<(), BackendError> {
        Ok(self.session.seq_set_logits(seq, logits)?)
    }

    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        Ok(self.session.seq_kv_pack(seq)?)
    }

    fn kv_pack_size(&self, seq: SeqId) -> usize {
        self.session.seq_kv_pack_size(seq)
    }

    fn kv_pack_into(&self, seq: SeqId, buf: &mut Vec<u8>) -> Result<(), BackendError> {
        Ok(self.session.seq_kv_pack_append(seq, buf)?)
    }

    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        Ok(self.session.seq_kv_unpack(seq, bytes, tokens)?)
    }

    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError> {
        Ok(self.session.seq_truncate(seq, n)?)
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError> {
        Ok(self.session.seq_copy_prefix(src, dst, n)?)
    }

    fn clear(&mut self, seq: SeqId) {
        self.session.seq_clear(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_step_errors_keep_their_meaning() {
        assert!(matches!(
            step_err(GrammarStepError::Cancelled),
            BackendError::Cancelled
        ));
        let slow = step_err(GrammarStepError::TooSlow {
            elapsed: Duration::from_secs(3),
        });
        assert!(matches!(&slow, BackendError::Grammar(m) if m.contains("budget")));
    }

    #[test]
    fn seeds_avoid_the_random_seed() {
        assert_eq!(seed32(None), DEFAULT_SAMPLING_SEED);
        assert_eq!(seed32(Some(42)), 42);
        assert_ne!(seed32(Some(u64::from(u32::MAX))), u32::MAX);
        assert_ne!(seed32(Some(42)), seed32(Some(43)));
    }

    #[test]
    fn errors_map_to_backend_errors() {
        let e: BackendError = LlamaError::EmptyInput("prefill").into();
        assert!(matches!(e, BackendError::EmptyInput(_)));
        let e: BackendError = LlamaError::ContextOverflow {
            have: 1,
            adding: 2,
            n_ctx: 3,
        }
        .into();
        assert!(matches!(
            e,
            BackendError::ContextOverflow {
                have: 1,
                adding: 2,
                n_ctx: 3
            }
        ));
        let e: BackendError = LlamaError::NoChatTemplate.into();
        assert!(matches!(e, BackendError::NoTemplate));
        let e: BackendError = LlamaError::KvState("x".into()).into();
        assert!(matches!(e, BackendError::KvState(_)));
        let e: BackendError = LlamaError::NoLogits.into();
        assert!(matches!(e, BackendError::InvalidInput(_)));
        let e: BackendError = LlamaError::Decode("x".into()).into();
        assert!(matches!(e, BackendError::Decode(_)));
        let e: BackendError = LlamaError::ContextCreate("x".into()).into();
        assert!(matches!(e, BackendError::ContextCreate(_)));
    }
}
