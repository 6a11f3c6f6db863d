//! A llama.cpp context of one or more token sequences, each with KV cells of
//! its own: prefill, batched decode, greedy decode, per-sequence KV
//! pack/unpack, prefix copies between sequences.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use erllama_engine::{FlashAttn, KvType};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LlamaStateSeqFlags;

use crate::backend::backend;
use crate::error::{LlamaError, Result};
use crate::lora::LoraAdapter;
use crate::model::{token_i32, Model};
use crate::state::{
    compact_streams, expand_streams_into, learn_layout, validate_seq_state, CacheSupport,
    StateLayout,
};

/// Options for a context.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Context window in tokens, of each sequence.
    pub n_ctx: u32,
    /// Tokens per `llama_decode` call during prefill.
    pub n_batch: u32,
    /// Compute threads; `None` uses every available core.
    pub n_threads: Option<u32>,
    /// Sequences the context can hold. Each has `n_ctx` KV cells of its own
    /// (llama.cpp's non-unified cache, one stream per sequence), so the
    /// context holds `n_seq_max × n_ctx` cells. A sequence's attention then
    /// reads only its own cells, which is what makes a sequence computed
    /// beside others give the tokens it gives alone.
    pub n_seq_max: u32,
    /// The element type of the K cache.
    pub type_k: KvType,
    /// The element type of the V cache. A quantized one needs flash
    /// attention, which the session then turns on explicitly.
    pub type_v: KvType,
    /// Flash attention; [`FlashAttn::Off`] with a quantized V cache is
    /// refused.
    pub flash_attn: FlashAttn,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: None,
            n_seq_max: 1,
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: FlashAttn::Auto,
        }
    }
}

/// llama.cpp's name for a KV cache type.
fn llama_kv_type(t: KvType) -> KvCacheType {
    match t {
        KvType::F32 => KvCacheType::F32,
        KvType::F16 => KvCacheType::F16,
        KvType::Bf16 => KvCacheType::BF16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q5_1 => KvCacheType::Q5_1,
        KvType::Q5_0 => KvCacheType::Q5_0,
        KvType::Q4_1 => KvCacheType::Q4_1,
        KvType::Q4_0 => KvCacheType::Q4_0,
    }
}

impl SessionParams {
    /// Flash attention as the context is created: `Some(on)` when it is
    /// set explicitly, `None` for llama.cpp's `auto`. `auto` with a KV type
    /// other than f16 is set on explicitly (a quantized V cache needs it,
    /// and the choice must not depend on llama.cpp's `auto` resolution for
    /// rows to be interchangeable).
    #[must_use]
    pub fn flash_attn_setting(&self) -> Option<bool> {
        match self.flash_attn {
            FlashAttn::On => Some(true),
            FlashAttn::Off => Some(false),
            FlashAttn::Auto => {
                (self.type_k != KvType::F16 || self.type_v != KvType::F16).then_some(true)
            }
        }
    }

    /// The thread count actually used.
    #[must_use]
    pub fn threads(&self) -> u32 {
        self.n_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
        })
    }

    fn validate(&self, model: &Model) -> Result<()> {
        let invalid = |name, reason: String| Err(LlamaError::InvalidParam { name, reason });
        if self.n_ctx < 8 || self.n_ctx > 1 << 22 {
            return invalid("n_ctx", format!("{} is outside 8..=4194304", self.n_ctx));
        }
        if self.n_batch == 0 || self.n_batch > 1 << 16 {
            return invalid("n_batch", format!("{} is outside 1..=65536", self.n_batch));
        }
        if self.n_seq_max == 0 || self.n_seq_max > 256 {
            return invalid(
                "n_seq_max",
                format!("{} is outside 1..=256", self.n_seq_max),
            );
        }
        if u64::from(self.n_ctx) * u64::from(self.n_seq_max) > 1 << 24 {
            return invalid(
                "n_seq_max",
                format!(
                    "{} sequences of {} cells are more than 16777216 KV cells",
                    self.n_seq_max, self.n_ctx
                ),
            );
        }
        if self.flash_attn == FlashAttn::Off && self.type_v.is_quantized() {
            return invalid(
                "flash_attn",
                format!(
                    "a quantized V cache ({}) needs flash attention (use \"auto\" or \"on\")",
                    self.type_v
                ),
            );
        }
        if matches!(self.n_threads, Some(0) | Some(1025..)) {
            return invalid("n_threads", "must be between 1 and 1024".into());
        }
        let train = model.meta().n_ctx_train;
        if train > 0 && self.n_ctx > train.saturating_mul(4) {
            return invalid(
                "n_ctx",
                format!(
                    "{} is more than 4x the model's training context {train}",
                    self.n_ctx
                ),
            );
        }
        Ok(())
    }
}

/// Tokens for one sequence in a [`Session::decode_batch`] call.
#[derive(Debug, Clone, Copy)]
pub struct SeqTokens<'a> {
    /// The sequence (`0..n_seq`).
    pub seq: usize,
    /// The tokens, appended at the sequence's next positions.
    pub tokens: &'a [u32],
    /// Whether to compute the logits after the last of them.
    pub logits: bool,
}

/// What one sequence holds.
#[derive(Debug, Default)]
struct Seq {
    tokens: Vec<u32>,
    /// Batch index of the logits for the next token, when there are any.
    logits_at: Option<i32>,
    /// The logits for the next token, copied out of llama.cpp when a
    /// later compute step of the same batch replaced them.
    owned_logits: Option<Vec<f32>>,
}

/// One llama.cpp context: `n_seq` token sequences, each with `n_ctx` KV
/// cells of its own (one llama.cpp stream each).
///
/// A `Session` is not `Send`: create it on the thread that will use it (see
/// [`crate::SessionWorker`]). Invariant: the KV cells of sequence `s` hold
/// exactly [`Session::seq_tokens`]`(s)`, at positions `0..len`. The
/// single-sequence methods ([`Session::prefill`], [`Session::tokens`],
/// [`Session::kv_pack`], ...) drive sequence 0; the `seq_*` methods and
/// [`Session::decode_batch`] drive any.
pub struct Session {
    // Field order matters: `batch` and `ctx` must drop before `lora` (the
    // context points at the adapter it applies) and `model`, whose weights
    // the context points into.
    batch: LlamaBatch<'static>,
    ctx: LlamaContext<'static>,
    /// The adapter applied to the context and its scale; holding it keeps
    /// the adapter alive while llama.cpp points at it.
    lora: Option<(LoraAdapter, f32)>,
    /// The adapters changed since the last decode: llama.cpp re-plans its
    /// compute graph on the next decode and reads the model's adapter set
    /// while doing so, so that decode holds the model's lock.
    adapters_changed: bool,
    model: Model,
    seqs: Vec<Seq>,
    /// The state layout this context writes (learned by a probe at
    /// creation), or why its state cannot be cached.
    layout: std::result::Result<StateLayout, CacheSupport>,
    n_ctx: u32,
    n_batch: u32,
    /// Tokens one [`Session::decode_batch`] may carry: `n_batch` plus one
    /// per sequence (a prefill chunk and every other sequence's next
    /// token), at most `n_ctx`. It is llama.cpp's `n_batch` and
    /// `n_ubatch`, so one call is one compute step.
    capacity: usize,
    /// The buffer [`Session::seq_copy_prefix`] moves state through, and
    /// a restore expands a one-stream row into, kept (and so already
    /// faulted in) between uses: at most one sequence's state.
    copy_buf: Vec<u8>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_ctx", &self.n_ctx)
            .field("n_seq", &self.seqs.len())
            .field("n_past", &self.seqs[0].tokens.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Creates a context for `model`.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for out-of-range options,
    /// [`LlamaError::ContextCreate`] when llama.cpp cannot allocate it.
    pub fn new(model: &Model, params: &SessionParams) -> Result<Self> {
        params.validate(model)?;
        let backend = backend()?;
        let threads = i32::try_from(params.threads()).unwrap_or(1);
        let n_batch = params.n_batch.min(params.n_ctx);
        let capacity = (n_batch + params.n_seq_max).min(params.n_ctx);
        // llama.cpp splits its `n_ctx` evenly between the streams (padded to
        // 256 cells each).
        let n_ctx_all = params.n_ctx.next_multiple_of(256) * params.n_seq_max;
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx_all))
            .with_n_batch(capacity)
            .with_n_ubatch(capacity)
            .with_n_seq_max(params.n_seq_max)
            .with_kv_unified(false)
            // A sliding-window cache as large as the context, so that a
            // prefix of any length can be copied to another sequence or
            // kept when a sequence is cut back.
            .with_swa_full(params.n_seq_max > 1)
            .with_type_k(llama_kv_type(params.type_k))
            .with_type_v(llama_kv_type(params.type_v))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let cparams =
            match params.flash_attn_setting() {
                Some(true) => cparams
                    .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED),
                Some(false) => cparams
                    .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED),
                None => cparams,
            };

        let ctx = {
            let _guard = model.inner.lock_model_state();
            model
                .inner
                .model
                .new_context(backend, cparams)
                .map_err(|e| LlamaError::ContextCreate(e.to_string()))?
        };
        // SAFETY: the context borrows the `LlamaModel` inside `model.inner`,
        // an `Arc` allocation that never moves. `Session` keeps a clone of
        // that `Arc` in `self.model`, declared after `ctx`, so the model
        // outlives the context; the extended lifetime never escapes `Session`.
        let ctx: LlamaContext<'static> = unsafe { std::mem::transmute(ctx) };
        let mut session = Self {
            batch: LlamaBatch::new(capacity as usize, 1),
            ctx,
            lora: None,
            adapters_changed: false,
            model: model.clone(),
            seqs: (0..params.n_seq_max).map(|_| Seq::default()).collect(),
            layout: Err(CacheSupport::no("unknown", "not probed".into())),
            n_ctx: params.n_ctx,
            n_batch,
            capacity: capacity as usize,
            copy_buf: Vec::new(),
        };
        session.layout = session.probe_layout();
        session.clear();
        Ok(session)
    }

    /// Learns the state layout this context writes: packs a two-token
    /// probe sequence, checks its structure ([`learn_layout`]) and that
    /// llama.cpp takes it back. Leaves the sequence empty.
    fn probe_layout(&mut self) -> std::result::Result<StateLayout, CacheSupport> {
        let model = &self.model.inner.model;
        if model.is_recurrent() {
            return Err(CacheSupport::no(
                "recurrent",
                "a recurrent memory (Mamba, RWKV, ...) is one state per sequence that cannot be \
                 cut back to a prefix or re-fed a token; erllama does not cache it"
                    .into(),
            ));
        }
        if model.is_hybrid() {
            return Err(CacheSupport::no(
                "hybrid",
                "a hybrid memory (attention + recurrent layers) holds recurrent state that \
                 cannot be cut back to a prefix; erllama does not cache it"
                    .into(),
            ));
        }
        let probe = [0u32, 0u32];
        let unknown = |e: LlamaError| CacheSupport::no("unknown", e.to_string());
        if self.model.n_vocab() == 0 || (self.n_ctx as usize) < probe.len() {
            return Err(CacheSupport::no(
                "unknown",
                "no room for the layout probe".into(),
            ));
        }
        self.clear();
        self.prefill(&probe).map_err(unknown)?;
        let bytes = self.kv_pack().map_err(unknown)?;
        let layout = learn_layout(
            &bytes,
            probe.len(),
            self.model.meta().n_layer,
            self.model.n_swa(),
        )
        .map_err(|e| CacheSupport::no("unknown", e.to_string()))?;
        // The round trip: llama.cpp must take back what it wrote.
        self.layout = Ok(layout.clone());
        let restored = self.kv_unpack(&bytes, &probe);
        self.clear();
        restored.map_err(unknown)?;
        Ok(layout)
    }

    /// Whether this context's state can be cached, its memory kind, and
    /// why not.
    #[must_use]
    pub fn cache_support(&self) -> CacheSupport {
        match &self.layout {
            Ok(layout) => CacheSupport::yes(layout),
            Err(no) => no.clone(),
        }
    }

    /// The state layout this context writes, when it is one erllama
    /// validates.
    #[must_use]
    pub fn state_layout(&self) -> Option<&StateLayout> {
        self.layout.as_ref().ok()
    }

    /// The model this session runs.
    #[must_use]
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Context window in tokens (KV cells shared by all sequences).
    #[must_use]
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Tokens per decode call during [`Session::prefill`].
    #[must_use]
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// How many sequences the context holds.
    #[must_use]
    pub fn n_seq(&self) -> usize {
        self.seqs.len()
    }

    /// Most tokens one [`Session::decode_batch`] may carry (`n_batch` plus
    /// one per sequence, at most `n_ctx`).
    #[must_use]
    pub fn batch_capacity(&self) -> usize {
        self.capacity
    }

    /// The tokens sequence 0 holds.
    #[must_use]
    pub fn tokens(&self) -> &[u32] {
        &self.seqs[0].tokens
    }

    /// Number of tokens in sequence 0.
    #[must_use]
    pub fn n_past(&self) -> usize {
        self.seqs[0].tokens.len()
    }

    /// Whether logits for sequence 0's next token are available.
    #[must_use]
    pub fn has_logits(&self) -> bool {
        self.seqs[0].logits_at.is_some() || self.seqs[0].owned_logits.is_some()
    }

    fn check_seq(&self, seq: usize) -> Result<()> {
        if seq < self.seqs.len() {
            Ok(())
        } else {
            Err(LlamaError::InvalidParam {
                name: "seq",
                reason: format!(
                    "sequence {seq} does not exist (the context holds {})",
                    self.seqs.len()
                ),
            })
        }
    }

    /// The tokens sequence `seq` holds (empty for a sequence that does not
    /// exist).
    #[must_use]
    pub fn seq_tokens(&self, seq: usize) -> &[u32] {
        self.seqs.get(seq).map_or(&[], |s| &s.tokens)
    }

    fn check_room(&self, have: usize, adding: usize) -> Result<()> {
        if have + adding > self.n_ctx as usize {
            return Err(LlamaError::ContextOverflow {
                have,
                adding,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    /// Appends `tokens` to sequence 0 in `n_batch` chunks and computes the
    /// logits of the last one.
    ///
    /// # Errors
    ///
    /// [`LlamaError::EmptyInput`], [`LlamaError::TokenOutOfRange`],
    /// [`LlamaError::ContextOverflow`] before anything runs;
    /// [`LlamaError::Decode`] if llama.cpp fails (the sequence is then rolled
    /// back to its state before the call).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(LlamaError::EmptyInput("prefill"));
        }
        self.model.check_tokens(tokens)?;
        let start = self.seqs[0].tokens.len();
        self.check_room(start, tokens.len())?;
        let n_chunks = tokens.len().div_ceil(self.n_batch as usize);
        for (ci, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            let item = SeqTokens {
                seq: 0,
                tokens: chunk,
                logits: ci + 1 == n_chunks,
            };
            if let Err(e) = self.decode_batch(&[item]) {
                self.truncate_to(0, start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Appends each item's tokens to its sequence; an item with `logits`
    /// gets the logits after its last token. The one-token items are
    /// computed together in one `llama_decode`, each longer item (a prefill
    /// chunk) in one of its own, so every row is computed as it is when its
    /// sequence runs alone. Every sequence's earlier logits are gone
    /// afterwards.
    ///
    /// # Errors
    ///
    /// Checked before anything runs: [`LlamaError::InvalidParam`] (a
    /// sequence that does not exist or appears twice, more tokens than
    /// [`Session::batch_capacity`]), [`LlamaError::EmptyInput`],
    /// [`LlamaError::TokenOutOfRange`], [`LlamaError::ContextOverflow`].
    /// [`LlamaError::Decode`] if llama.cpp fails (for example no free KV
    /// cell); every sequence is then as it was before the call.
    pub fn decode_batch(&mut self, items: &[SeqTokens<'_>]) -> Result<()> {
        if items.is_empty() {
            return Err(LlamaError::EmptyInput("decode_batch"));
        }
        let mut total = 0usize;
        for (i, item) in items.iter().enumerate() {
            self.check_seq(item.seq)?;
            if items[..i].iter().any(|o| o.seq == item.seq) {
                return Err(LlamaError::InvalidParam {
                    name: "seq",
                    reason: format!("sequence {} appears twice in one batch", item.seq),
                });
            }
            if item.tokens.is_empty() {
                return Err(LlamaError::EmptyInput("decode_batch"));
            }
            self.model.check_tokens(item.tokens)?;
            self.check_room(self.seqs[item.seq].tokens.len(), item.tokens.len())?;
            total += item.tokens.len();
        }
        if total > self.capacity {
            return Err(LlamaError::InvalidParam {
                name: "batch",
                reason: format!("{total} tokens exceed the batch capacity {}", self.capacity),
            });
        }
        for seq in &mut self.seqs {
            seq.logits_at = None;
            seq.owned_logits = None;
        }
        // Each prefill chunk is computed in a step of its own, then every
        // one-token item in one more step, so that each row meets the
        // kernels it meets alone: llama.cpp's CPU attention picks its kernel
        // by the number of query rows (tiled for 64 or more), and over
        // separate streams it splits a step into pieces of equal length per
        // sequence, which would cut a chunk next to a one-token item.
        let mut steps: Vec<Vec<SeqTokens<'_>>> = items
            .iter()
            .filter(|i| i.tokens.len() > 1)
            .map(|&i| vec![i])
            .collect();
        let mut singles: Vec<SeqTokens<'_>> = items
            .iter()
            .copied()
            .filter(|i| i.tokens.len() == 1)
            .collect();
        // Consecutive sequence ids share one llama.cpp micro-batch.
        singles.sort_by_key(|i| i.seq);
        if !singles.is_empty() {
            steps.push(singles);
        }
        let before: Vec<(usize, usize)> = items
            .iter()
            .map(|i| (i.seq, self.seqs[i.seq].tokens.len()))
            .collect();
        let last = steps.len() - 1;
        for (k, step) in steps.iter().enumerate() {
            if let Err(e) = self.compute_step(step) {
                for &(seq, n) in &before {
                    self.truncate_to(seq, n);
                }
                return Err(e);
            }
            if k < last {
                // The next step replaces llama.cpp's logits: keep a copy.
                for item in step.iter().filter(|i| i.logits) {
                    let copy = self.seq_logits(item.seq)?.to_vec();
                    self.seqs[item.seq].owned_logits = Some(copy);
                    self.seqs[item.seq].logits_at = None;
                }
            }
        }
        Ok(())
    }

    /// One `llama_decode` of `items` (checked by the caller); on failure
    /// their sequences are as before.
    fn compute_step(&mut self, items: &[SeqTokens<'_>]) -> Result<()> {
        self.batch.clear();
        let mut logits_at = Vec::with_capacity(items.len());
        for item in items {
            let base = self.seqs[item.seq].tokens.len();
            let seq_id = i32::try_from(item.seq).unwrap_or(i32::MAX);
            for (i, &t) in item.tokens.iter().enumerate() {
                // Within n_ctx (checked by the caller), so within i32.
                let pos = i32::try_from(base + i).unwrap_or(i32::MAX);
                let logits = item.logits && i + 1 == item.tokens.len();
                self.batch
                    .add(LlamaToken(token_i32(t)), pos, &[seq_id], logits)
                    .map_err(|e| LlamaError::Decode(e.to_string()))?;
            }
            if item.logits {
                logits_at.push((item.seq, self.batch.n_tokens() - 1));
            }
        }
        let decoded = {
            let _compute = crate::backend::compute_lock();
            if self.adapters_changed {
                let _guard = self.model.inner.lock_model_state();
                self.ctx.decode(&mut self.batch)
            } else {
                self.ctx.decode(&mut self.batch)
            }
        };
        if let Err(e) = decoded {
            // llama.cpp removes a failed step's cells itself; make sure.
            for item in items {
                let n = self.seqs[item.seq].tokens.len();
                self.truncate_to(item.seq, n);
            }
            return Err(LlamaError::Decode(e.to_string()));
        }
        self.adapters_changed = false;
        for item in items {
            self.seqs[item.seq].tokens.extend_from_slice(item.tokens);
        }
        for (seq, at) in logits_at {
            self.seqs[seq].logits_at = Some(at);
        }
        Ok(())
    }

    /// The logits for sequence 0's next token.
    ///
    /// # Errors
    ///
    /// [`LlamaError::NoLogits`] when nothing was decoded since the last
    /// restore, removal or clear.
    pub fn logits(&self) -> Result<&[f32]> {
        self.seq_logits(0)
    }

    /// The logits for sequence `seq`'s next token (from the last
    /// [`Session::decode_batch`], if it asked for them).
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for a sequence that does not exist,
    /// [`LlamaError::NoLogits`].
    pub fn seq_logits(&self, seq: usize) -> Result<&[f32]> {
        self.check_seq(seq)?;
        if let Some(owned) = &self.seqs[seq].owned_logits {
            return Ok(owned);
        }
        let at = self.seqs[seq].logits_at.ok_or(LlamaError::NoLogits)?;
        Ok(self.ctx.get_logits_ith(at))
    }

    /// Makes `logits` sequence `seq`'s logits for its next token, as a
    /// decode would have left them: stored with a cached state, they let
    /// a restored sequence sample without decoding anything. They last
    /// until the sequence changes or the next [`Session::decode_batch`].
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for a sequence that does not exist, an
    /// empty one, or logits that are not one per vocabulary entry.
    pub fn seq_set_logits(&mut self, seq: usize, logits: &[f32]) -> Result<()> {
        self.check_seq(seq)?;
        let n_vocab = self.model.n_vocab() as usize;
        if logits.len() != n_vocab {
            return Err(LlamaError::InvalidParam {
                name: "logits",
                reason: format!("{} logits for a vocabulary of {n_vocab}", logits.len()),
            });
        }
        if self.seqs[seq].tokens.is_empty() {
            return Err(LlamaError::InvalidParam {
                name: "logits",
                reason: format!("sequence {seq} is empty: no token has logits to follow"),
            });
        }
        let s = &mut self.seqs[seq];
        s.logits_at = None;
        let mut owned = s.owned_logits.take().unwrap_or_default();
        owned.clear();
        owned.extend_from_slice(logits);
        s.owned_logits = Some(owned);
        Ok(())
    }

    /// Greedy step: takes the most likely next token, appends it to the
    /// sequence (computing the logits after it) and returns it.
    ///
    /// # Errors
    ///
    /// [`LlamaError::NoLogits`], [`LlamaError::ContextOverflow`] when the
    /// context is full, [`LlamaError::Decode`].
    pub fn decode_one(&mut self) -> Result<u32> {
        let token = argmax(self.logits()?);
        self.accept(token)?;
        Ok(token)
    }

    /// Appends one chosen token and computes the logits after it.
    ///
    /// # Errors
    ///
    /// As [`Session::prefill`].
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.prefill(&[token])
    }

    /// Greedy generation until an end-of-generation token (included in the
    /// result) or `max_tokens`.
    ///
    /// # Errors
    ///
    /// As [`Session::decode_one`].
    pub fn generate(&mut self, max_tokens: usize) -> Result<Vec<u32>> {
        self.generate_until(max_tokens, &AtomicBool::new(false))
    }

    /// [`Session::generate`] that also stops, between tokens, once `stop` is
    /// set (e.g. by a Ctrl-C handler or a cancel request).
    ///
    /// # Errors
    ///
    /// As [`Session::decode_one`]; the whole request is validated (logits
    /// present, room for `max_tokens`) before the first token.
    pub fn generate_until(&mut self, max_tokens: usize, stop: &AtomicBool) -> Result<Vec<u32>> {
        if max_tokens > 0 {
            self.logits()?;
            self.check_room(self.n_past(), max_tokens)?;
        }
        let mut out = Vec::with_capacity(max_tokens);
        while out.len() < max_tokens && !stop.load(Ordering::Relaxed) {
            let t = self.decode_one()?;
            out.push(t);
            if self.model.is_eog(t) {
                break;
            }
        }
        Ok(out)
    }

    /// Drops every token of `seq` at position `n` and beyond.
    fn truncate_to(&mut self, seq: usize, n: usize) {
        let p0 = u32::try_from(n).unwrap_or(u32::MAX);
        let id = u32::try_from(seq).unwrap_or(u32::MAX);
        // Removing a position range from a KV cache cannot fail.
        let _ = self.ctx.clear_kv_cache_seq(Some(id), Some(p0), None);
        self.seqs[seq].tokens.truncate(n);
        self.seqs[seq].logits_at = None;
        self.seqs[seq].owned_logits = None;
    }

    /// Keeps the first `n` tokens of sequence 0. Logits are gone
    /// afterwards: re-feed a token before decoding.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] when `n` exceeds the sequence length.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        self.seq_truncate(0, n)
    }

    /// Keeps the first `n` tokens of sequence `seq` (no logits
    /// afterwards).
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for a sequence that does not exist or
    /// `n` beyond its length.
    pub fn seq_truncate(&mut self, seq: usize, n: usize) -> Result<()> {
        self.check_seq(seq)?;
        let len = self.seqs[seq].tokens.len();
        if n > len {
            return Err(LlamaError::InvalidParam {
                name: "n",
                reason: format!("cannot keep {n} of {len} tokens"),
            });
        }
        self.truncate_to(seq, n);
        Ok(())
    }

    /// Removes the last KV cell (the last token) of sequence 0.
    ///
    /// # Errors
    ///
    /// [`LlamaError::EmptyInput`] when the sequence is empty.
    pub fn remove_last(&mut self) -> Result<()> {
        let len = self.n_past();
        if len == 0 {
            return Err(LlamaError::EmptyInput("remove_last"));
        }
        self.truncate_to(0, len - 1);
        Ok(())
    }

    /// Empties every sequence.
    pub fn clear(&mut self) {
        for seq in 0..self.seqs.len() {
            self.truncate_to(seq, 0);
        }
    }

    /// Empties sequence `seq` (nothing for one that does not exist).
    pub fn seq_clear(&mut self, seq: usize) {
        if seq < self.seqs.len() {
            self.truncate_to(seq, 0);
        }
    }

    /// Makes the empty sequence `dst` hold the first `n` tokens of `src`:
    /// `src`'s cells are packed and restored into `dst`'s own cells (a
    /// memory copy, no computation), then cut back to `n`. No logits for
    /// `dst`.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for sequences that do not exist, `src
    /// == dst`, a `dst` that is not empty or `n` beyond `src`'s length;
    /// [`LlamaError::KvState`] when the model's state cannot be packed.
    pub fn seq_copy_prefix(&mut self, src: usize, dst: usize, n: usize) -> Result<()> {
        self.check_seq(src)?;
        self.check_seq(dst)?;
        let invalid = |reason: String| {
            Err(LlamaError::InvalidParam {
                name: "seq",
                reason,
            })
        };
        if src == dst {
            return invalid(format!("cannot copy sequence {src} onto itself"));
        }
        if !self.seqs[dst].tokens.is_empty() {
            return invalid(format!("sequence {dst} is not empty"));
        }
        if n > self.seqs[src].tokens.len() {
            return invalid(format!(
                "sequence {src} holds {} tokens, not {n}",
                self.seqs[src].tokens.len()
            ));
        }
        if n == 0 {
            return Ok(());
        }
        // llama.cpp copies between streams only whole and only at the next
        // decode; its state calls copy just the cells in use, at once. The
        // state stays in this context's own form (llama.cpp reads a
        // sequence's cells into the stream of the sequence it restores), so
        // it needs neither the one-stream rewrite nor validation.
        let size = self.seq_kv_pack_size(src);
        let mut buf = std::mem::take(&mut self.copy_buf);
        buf.resize(size, 0);
        let (s, d) = (
            i32::try_from(src).unwrap_or(i32::MAX),
            i32::try_from(dst).unwrap_or(i32::MAX),
        );
        // SAFETY: `buf` holds `size` bytes, the size llama.cpp just computed
        // for `src` on this thread with nothing changed in between.
        let written = unsafe {
            self.ctx
                .state_seq_get_data_ext(buf.as_mut_ptr(), s, LlamaStateSeqFlags::empty())
        };
        // SAFETY: the bytes are the state this very context wrote for `src`
        // a moment ago (its layout, its stream count), which llama.cpp
        // reads back by construction.
        let ok = written == size
            && unsafe {
                self.ctx
                    .state_seq_set_data_ext(&buf[..size], d, LlamaStateSeqFlags::empty())
            };
        self.copy_buf = buf;
        let len = self.seqs[src].tokens.len();
        let last = i32::try_from(len).unwrap_or(i32::MAX) - 1;
        if !ok || self.ctx.kv_cache_seq_pos_max(d) != last {
            self.truncate_to(dst, 0);
            return Err(LlamaError::KvState(format!(
                "copying sequence {src} into {dst} failed"
            )));
        }
        self.seqs[dst].tokens = self.seqs[src].tokens.clone();
        self.truncate_to(dst, n);
        Ok(())
    }

    /// The LoRA adapter applied to this context and its scale, if any.
    #[must_use]
    pub fn lora(&self) -> Option<(&LoraAdapter, f32)> {
        self.lora.as_ref().map(|(a, s)| (a, *s))
    }

    /// Applies `adapter` with `scale` to every later decode, replacing the
    /// one applied before; `None` (or a scale of 0) removes it. When this
    /// changes what is applied, every sequence is cleared: KV computed
    /// under other weights is never reused. The session keeps the adapter
    /// alive while it is applied.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for a scale that is not finite or an
    /// adapter loaded for another model (nothing changes then);
    /// [`LlamaError::LoraApply`] if llama.cpp refuses.
    pub fn set_lora(&mut self, adapter: Option<(&LoraAdapter, f32)>) -> Result<()> {
        if let Some((a, scale)) = adapter {
            if !scale.is_finite() {
                return Err(LlamaError::InvalidParam {
                    name: "scale",
                    reason: format!("LoRA scale must be finite, got {scale}"),
                });
            }
            if !a.belongs_to(&self.model) {
                return Err(LlamaError::InvalidParam {
                    name: "adapter",
                    reason: format!(
                        "the LoRA adapter {} was loaded for another model",
                        a.path().display()
                    ),
                });
            }
        }
        let wanted = adapter.filter(|&(_, scale)| scale != 0.0);
        let unchanged = match (&self.lora, wanted) {
            (None, None) => true,
            (Some((cur, cur_scale)), Some((a, scale))) => {
                cur.same_as(a) && cur_scale.to_bits() == scale.to_bits()
            }
            _ => false,
        };
        if unchanged {
            return Ok(());
        }
        // From here on the context's adapters may differ from before:
        // whatever happens, the old KV is stale and the next decode
        // re-plans.
        self.clear();
        self.adapters_changed = true;
        // llama.cpp's `llama_set_adapters_lora` always returns 0 (bad
        // arguments assert instead); the error arms are defensive.
        let ctx = &mut self.ctx;
        match wanted {
            Some((a, scale)) => {
                a.with_raw(|raw| ctx.lora_adapter_set(raw, scale))
                    .map_err(|e| LlamaError::LoraApply(e.to_string()))?;
                self.lora = Some((a.clone(), scale));
            }
            None => {
                if let Some((cur, _)) = &self.lora {
                    cur.with_raw(|raw| ctx.lora_adapter_remove(raw))
                        .map_err(|e| LlamaError::LoraApply(e.to_string()))?;
                }
                self.lora = None;
            }
        }
        Ok(())
    }

    /// Size in bytes of the packed state of sequence 0.
    #[must_use]
    pub fn kv_pack_size(&self) -> usize {
        self.seq_kv_pack_size(0)
    }

    /// Size in bytes llama.cpp writes for the state of sequence `seq` (0
    /// for one that does not exist): an upper bound of the packed size,
    /// which is smaller in a context of several sequences.
    #[must_use]
    pub fn seq_kv_pack_size(&self, seq: usize) -> usize {
        if seq >= self.seqs.len() {
            return 0;
        }
        let id = i32::try_from(seq).unwrap_or(i32::MAX);
        self.ctx
            .state_seq_get_size_ext(id, LlamaStateSeqFlags::empty())
    }

    /// Packs sequence 0's state into `dst`; see [`Session::seq_kv_pack_into`].
    ///
    /// # Errors
    ///
    /// As [`Session::seq_kv_pack_into`].
    pub fn kv_pack_into(&self, dst: &mut [u8]) -> Result<usize> {
        self.seq_kv_pack_into(0, dst)
    }

    /// Packs sequence `seq`'s state (only its cells) into `dst`, which must
    /// hold at least [`Session::seq_kv_pack_size`] bytes; returns the bytes
    /// written. Lets the caller pack straight into its final buffer (a
    /// slab, a mapped file). The state is in the one-stream form whatever
    /// the number of sequences (see [`crate::state`]), so it restores into
    /// any context of the model.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] for a sequence that does not exist;
    /// [`LlamaError::KvState`] when `dst` is too small or llama.cpp fails.
    pub fn seq_kv_pack_into(&self, seq: usize, dst: &mut [u8]) -> Result<usize> {
        self.check_seq(seq)?;
        let size = self.seq_kv_pack_size(seq);
        if dst.len() < size {
            return Err(LlamaError::KvState(format!(
                "pack buffer of {} bytes is smaller than the state ({size} bytes)",
                dst.len()
            )));
        }
        let id = i32::try_from(seq).unwrap_or(i32::MAX);
        // SAFETY: `dst` holds at least `size` bytes, the size llama.cpp just
        // computed for this sequence on this thread; nothing changed the
        // context in between (we hold `&self`, and `Session` is not shared
        // across threads), so llama.cpp writes at most `size` bytes.
        let n = unsafe {
            self.ctx
                .state_seq_get_data_ext(dst.as_mut_ptr(), id, LlamaStateSeqFlags::empty())
        };
        if n != size {
            return Err(LlamaError::KvState(format!(
                "llama.cpp wrote {n} state bytes, expected {size}"
            )));
        }
        if self.seqs.len() > 1 {
            return compact_streams(&mut dst[..n]);
        }
        Ok(n)
    }

    /// Appends sequence `seq`'s packed state (as
    /// [`Session::seq_kv_pack_into`] writes it) to `buf`, reserving what
    /// it needs: packing into a recycled buffer that is already faulted in
    /// costs no page faults and no zero-fill. On error `buf` keeps its
    /// length.
    ///
    /// # Errors
    ///
    /// As [`Session::seq_kv_pack_into`].
    pub fn seq_kv_pack_append(&self, seq: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.check_seq(seq)?;
        let size = self.seq_kv_pack_size(seq);
        let start = buf.len();
        buf.reserve(size);
        let id = i32::try_from(seq).unwrap_or(i32::MAX);
        // SAFETY: `reserve` left room for `size` bytes after `start`, the
        // size llama.cpp just computed for this sequence on this thread
        // with nothing changed in between (`&self`; `Session` is not
        // shared across threads), so llama.cpp writes at most `size` bytes
        // there; the length is extended only over the bytes it wrote.
        let n = unsafe {
            let dst = buf.as_mut_ptr().add(start);
            let n = self
                .ctx
                .state_seq_get_data_ext(dst, id, LlamaStateSeqFlags::empty());
            if n == size {
                buf.set_len(start + n);
            }
            n
        };
        if n != size {
            return Err(LlamaError::KvState(format!(
                "llama.cpp wrote {n} state bytes, expected {size}"
            )));
        }
        if self.seqs.len() > 1 {
            match compact_streams(&mut buf[start..]) {
                Ok(len) => buf.truncate(start + len),
                Err(e) => {
                    buf.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Packs sequence 0's state into a new buffer.
    ///
    /// # Errors
    ///
    /// As [`Session::kv_pack_into`].
    pub fn kv_pack(&self) -> Result<Vec<u8>> {
        self.seq_kv_pack(0)
    }

    /// Packs sequence `seq`'s state into a new buffer.
    ///
    /// # Errors
    ///
    /// As [`Session::seq_kv_pack_into`].
    pub fn seq_kv_pack(&self, seq: usize) -> Result<Vec<u8>> {
        self.check_seq(seq)?;
        let mut buf = vec![0u8; self.seq_kv_pack_size(seq)];
        let n = self.seq_kv_pack_into(seq, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Restores a packed state that holds `tokens` into sequence 0; see
    /// [`Session::seq_kv_unpack`].
    ///
    /// # Errors
    ///
    /// As [`Session::seq_kv_unpack`].
    pub fn kv_unpack(&mut self, bytes: &[u8], tokens: &[u32]) -> Result<()> {
        self.seq_kv_unpack(0, bytes, tokens)
    }

    /// Restores a packed state that holds `tokens` into sequence `seq`,
    /// which is cleared first; the other sequences are untouched. No
    /// logits are available afterwards: to continue, remove the last cell
    /// and re-feed its token (or prefill more tokens).
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`], [`LlamaError::TokenOutOfRange`],
    /// [`LlamaError::ContextOverflow`], or [`LlamaError::KvState`] when the
    /// bytes do not validate (the sequence is then untouched) or llama.cpp
    /// rejects them (the sequence is then empty).
    pub fn seq_kv_unpack(&mut self, seq: usize, bytes: &[u8], tokens: &[u32]) -> Result<()> {
        self.check_seq(seq)?;
        self.model.check_tokens(tokens)?;
        self.check_room(0, tokens.len())?;
        let layout = self.layout.as_ref().map_err(|no| {
            LlamaError::KvState(format!(
                "this model's state is not cacheable: {}",
                no.reason.as_deref().unwrap_or("unknown")
            ))
        })?;
        let want_min = validate_seq_state(bytes, tokens.len(), layout)?;
        // Restore into a cleared sequence: unpacking over stale cells
        // fragments the cache and destroys the speed-up.
        self.truncate_to(seq, 0);
        if tokens.is_empty() {
            return Ok(());
        }
        let id = i32::try_from(seq).unwrap_or(i32::MAX);
        // A context of several streams reads as many per section: the
        // one-stream state gets empty ones added (a copy).
        // The copy goes through the kept buffer (already faulted in).
        let mut expanded = std::mem::take(&mut self.copy_buf);
        let bytes = if self.seqs.len() > 1 {
            let n_stream = u32::try_from(self.seqs.len()).unwrap_or(u32::MAX);
            if let Err(e) = expand_streams_into(bytes, n_stream, &mut expanded) {
                self.copy_buf = expanded;
                return Err(e);
            }
            &expanded[..]
        } else {
            bytes
        };
        // SAFETY: the bytes passed the structural validation above against
        // the layout this very context writes (magic, the same memory
        // sections, one stream each, cells at the positions the tokens
        // imply, one sequence per cell, the same per-layer tensor types and
        // row sizes, sections ending exactly at the end), which covers
        // everything llama.cpp's reader asserts on instead of reporting;
        // expanding only adds empty streams, which the context expects.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(bytes, id, LlamaStateSeqFlags::empty())
        };
        self.copy_buf = expanded;
        let pos_min = self.ctx.kv_cache_seq_pos_min(id);
        let pos_max = self.ctx.kv_cache_seq_pos_max(id);
        let last = i32::try_from(tokens.len() - 1).unwrap_or(i32::MAX);
        if !ok || pos_min != want_min || pos_max != last {
            self.truncate_to(seq, 0);
            return Err(LlamaError::KvState(format!(
                "llama.cpp rejected the state (restored positions {pos_min}..={pos_max}, \
                 expected {want_min}..={last})"
            )));
        }
        self.seqs[seq].tokens.extend_from_slice(tokens);
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties, like llama.cpp's
/// greedy sampler).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    u32::try_from(best).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(super::argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(super::argmax(&[f32::NAN, -1.0]), 1);
    }
}
