//! A llama.cpp context with one token sequence: prefill, greedy decode,
//! KV pack/unpack.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LlamaStateSeqFlags;

use crate::backend::backend;
use crate::error::{LlamaError, Result};
use crate::lora::LoraAdapter;
use crate::model::{token_i32, Model};
use crate::state::{learn_layout, validate_seq_state, CacheSupport, StateLayout};

/// The sequence every session works on.
const SEQ: i32 = 0;

/// Options for a context.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Context window in tokens.
    pub n_ctx: u32,
    /// Tokens per `llama_decode` call during prefill.
    pub n_batch: u32,
    /// Compute threads; `None` uses every available core.
    pub n_threads: Option<u32>,
    /// Sequences the context can hold. The KV cache is unified (one pool of
    /// `n_ctx` cells shared by all sequences), which is what lets KV cells be
    /// copied between sequences. A `Session` drives sequence 0.
    pub n_seq_max: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: None,
            n_seq_max: 1,
        }
    }
}

impl SessionParams {
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

/// One llama.cpp context and the tokens its sequence holds.
///
/// A `Session` is not `Send`: create it on the thread that will use it (see
/// [`crate::SessionWorker`]). Invariant: the KV cache holds exactly
/// [`Session::tokens`], at positions `0..len`, in sequence 0.
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
    tokens: Vec<u32>,
    /// Batch index of the logits for the next token, when there are any.
    logits_at: Option<i32>,
    /// The state layout this context writes (learned by a probe at
    /// creation), or why its state cannot be cached.
    layout: std::result::Result<StateLayout, CacheSupport>,
    n_ctx: u32,
    n_batch: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_ctx", &self.n_ctx)
            .field("n_past", &self.tokens.len())
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
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(params.n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(params.n_seq_max)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = {
            let _guard = model
                .inner
                .new_context_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            batch: LlamaBatch::new(n_batch as usize, 1),
            ctx,
            lora: None,
            adapters_changed: false,
            model: model.clone(),
            tokens: Vec::new(),
            logits_at: None,
            layout: Err(CacheSupport::no("unknown", "not probed".into())),
            n_ctx: params.n_ctx,
            n_batch,
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

    /// Context window in tokens.
    #[must_use]
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Tokens per decode call during prefill.
    #[must_use]
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// The tokens the sequence holds.
    #[must_use]
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens in the sequence.
    #[must_use]
    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    /// Whether logits for a next token are available.
    #[must_use]
    pub fn has_logits(&self) -> bool {
        self.logits_at.is_some()
    }

    fn check_room(&self, adding: usize) -> Result<()> {
        if self.tokens.len() + adding > self.n_ctx as usize {
            return Err(LlamaError::ContextOverflow {
                have: self.tokens.len(),
                adding,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    /// Appends `tokens` to the sequence in `n_batch` chunks and computes the
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
        self.check_room(tokens.len())?;
        let start = self.tokens.len();
        let n_chunks = tokens.len().div_ceil(self.n_batch as usize);
        for (ci, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            if let Err(e) = self.decode_chunk(chunk, last_chunk) {
                self.truncate_to(start);
                return Err(e);
            }
        }
        Ok(())
    }

    fn decode_chunk(&mut self, chunk: &[u32], want_logits: bool) -> Result<()> {
        self.logits_at = None;
        self.batch.clear();
        let base = self.tokens.len();
        for (i, &t) in chunk.iter().enumerate() {
            let pos = i32::try_from(base + i).map_err(|_| LlamaError::ContextOverflow {
                have: base,
                adding: chunk.len(),
                n_ctx: self.n_ctx,
            })?;
            let logits = want_logits && i + 1 == chunk.len();
            self.batch
                .add(LlamaToken(token_i32(t)), pos, &[SEQ], logits)
                .map_err(|e| LlamaError::Decode(e.to_string()))?;
        }
        let _compute = crate::backend::compute_lock();
        let decoded = if self.adapters_changed {
            let _guard = self
                .model
                .inner
                .new_context_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.ctx.decode(&mut self.batch)
        } else {
            self.ctx.decode(&mut self.batch)
        };
        decoded.map_err(|e| LlamaError::Decode(e.to_string()))?;
        self.adapters_changed = false;
        self.tokens.extend_from_slice(chunk);
        if want_logits {
            self.logits_at = Some(self.batch.n_tokens() - 1);
        }
        Ok(())
    }

    /// The logits for the next token.
    ///
    /// # Errors
    ///
    /// [`LlamaError::NoLogits`] when nothing was decoded since the last
    /// restore, removal or clear.
    pub fn logits(&self) -> Result<&[f32]> {
        let at = self.logits_at.ok_or(LlamaError::NoLogits)?;
        Ok(self.ctx.get_logits_ith(at))
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
            self.check_room(max_tokens)?;
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

    /// Drops every token at position `n` and beyond.
    fn truncate_to(&mut self, n: usize) {
        let p0 = u32::try_from(n).unwrap_or(u32::MAX);
        // Removing a position range from a plain KV cache cannot fail.
        let _ = self
            .ctx
            .clear_kv_cache_seq(Some(SEQ as u32), Some(p0), None);
        self.tokens.truncate(n);
        self.logits_at = None;
    }

    /// Keeps the first `n` tokens of the sequence. Logits are gone
    /// afterwards: re-feed a token before decoding.
    ///
    /// # Errors
    ///
    /// [`LlamaError::InvalidParam`] when `n` exceeds the sequence length.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n > self.tokens.len() {
            return Err(LlamaError::InvalidParam {
                name: "n",
                reason: format!("cannot keep {n} of {} tokens", self.tokens.len()),
            });
        }
        self.truncate_to(n);
        Ok(())
    }

    /// Removes the last KV cell (the last token).
    ///
    /// # Errors
    ///
    /// [`LlamaError::EmptyInput`] when the sequence is empty.
    pub fn remove_last(&mut self) -> Result<()> {
        if self.tokens.is_empty() {
            return Err(LlamaError::EmptyInput("remove_last"));
        }
        self.truncate_to(self.tokens.len() - 1);
        Ok(())
    }

    /// Empties the sequence.
    pub fn clear(&mut self) {
        self.truncate_to(0);
    }

    /// The LoRA adapter applied to this context and its scale, if any.
    #[must_use]
    pub fn lora(&self) -> Option<(&LoraAdapter, f32)> {
        self.lora.as_ref().map(|(a, s)| (a, *s))
    }

    /// Applies `adapter` with `scale` to every later decode, replacing the
    /// one applied before; `None` (or a scale of 0) removes it. When this
    /// changes what is applied, the sequence is cleared: KV computed under
    /// other weights is never reused. The session keeps the adapter alive
    /// while it is applied.
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

    /// Size in bytes of the packed state of the sequence.
    #[must_use]
    pub fn kv_pack_size(&self) -> usize {
        self.ctx
            .state_seq_get_size_ext(SEQ, LlamaStateSeqFlags::empty())
    }

    /// Packs the sequence state into `dst`, which must hold at least
    /// [`Session::kv_pack_size`] bytes; returns the bytes written. Lets the
    /// caller pack straight into its final buffer (a slab, a mapped file).
    ///
    /// # Errors
    ///
    /// [`LlamaError::KvState`] when `dst` is too small or llama.cpp fails.
    pub fn kv_pack_into(&self, dst: &mut [u8]) -> Result<usize> {
        let size = self.kv_pack_size();
        if dst.len() < size {
            return Err(LlamaError::KvState(format!(
                "pack buffer of {} bytes is smaller than the state ({size} bytes)",
                dst.len()
            )));
        }
        // SAFETY: `dst` holds at least `size` bytes, the size llama.cpp just
        // computed for this sequence on this thread; nothing changed the
        // sequence in between (we hold `&self`, and `Session` is not shared
        // across threads), so llama.cpp writes at most `size` bytes.
        let n = unsafe {
            self.ctx
                .state_seq_get_data_ext(dst.as_mut_ptr(), SEQ, LlamaStateSeqFlags::empty())
        };
        if n != size {
            return Err(LlamaError::KvState(format!(
                "llama.cpp wrote {n} state bytes, expected {size}"
            )));
        }
        Ok(n)
    }

    /// Packs the sequence state into a new buffer.
    ///
    /// # Errors
    ///
    /// As [`Session::kv_pack_into`].
    pub fn kv_pack(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.kv_pack_size()];
        let n = self.kv_pack_into(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Restores a packed state that holds `tokens` into the cleared
    /// sequence. No logits are available afterwards: to continue, remove the
    /// last cell and re-feed its token (or prefill more tokens).
    ///
    /// # Errors
    ///
    /// [`LlamaError::TokenOutOfRange`], [`LlamaError::ContextOverflow`], or
    /// [`LlamaError::KvState`] when the bytes do not validate (the sequence
    /// is then untouched) or llama.cpp rejects them (the sequence is then
    /// empty).
    pub fn kv_unpack(&mut self, bytes: &[u8], tokens: &[u32]) -> Result<()> {
        self.model.check_tokens(tokens)?;
        if tokens.len() > self.n_ctx as usize {
            return Err(LlamaError::ContextOverflow {
                have: 0,
                adding: tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        let layout = self.layout.as_ref().map_err(|no| {
            LlamaError::KvState(format!(
                "this model's state is not cacheable: {}",
                no.reason.as_deref().unwrap_or("unknown")
            ))
        })?;
        let want_min = validate_seq_state(bytes, tokens.len(), layout)?;
        // Restore into a cleared sequence: unpacking over stale cells
        // fragments the cache and destroys the speed-up.
        self.clear();
        if tokens.is_empty() {
            return Ok(());
        }
        // SAFETY: the bytes passed the structural validation above against
        // the layout this very context writes (magic, the same memory
        // sections, one stream each, cells at the positions the tokens
        // imply, one sequence per cell, the same per-layer tensor types and
        // row sizes, sections ending exactly at the end), which covers
        // everything llama.cpp's reader asserts on instead of reporting.
        let ok = unsafe {
            self.ctx
                .state_seq_set_data_ext(bytes, SEQ, LlamaStateSeqFlags::empty())
        };
        let pos_min = self.ctx.kv_cache_seq_pos_min(SEQ);
        let pos_max = self.ctx.kv_cache_seq_pos_max(SEQ);
        let last = i32::try_from(tokens.len() - 1).unwrap_or(i32::MAX);
        if !ok || pos_min != want_min || pos_max != last {
            self.clear();
            return Err(LlamaError::KvState(format!(
                "llama.cpp rejected the state (restored positions {pos_min}..={pos_max}, \
                 expected {want_min}..={last})"
            )));
        }
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties, like llama.cpp's
/// greedy sampler).
fn argmax(logits: &[f32]) -> u32 {
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
