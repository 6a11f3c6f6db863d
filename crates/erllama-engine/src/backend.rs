//! What a model task needs from an inference backend.
//!
//! A [`Backend`] is a loaded model: shareable across threads, it tokenizes
//! and creates contexts. A [`BackendContext`] is one live token sequence and
//! may be `!Send` (llama.cpp's is): the model task creates it on the thread
//! that will drive it. Optional capabilities default to
//! [`BackendError::NotSupported`].

/// Errors a backend reports; the engine maps them to one exception each.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The caller's input is invalid (empty prompt, bad token id, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
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
    /// Anything else the backend reports.
    #[error("{0}")]
    Other(String),
}

/// Options for a new context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextParams {
    /// Context window in tokens.
    pub n_ctx: usize,
    /// Tokens per prefill step.
    pub n_batch: usize,
    /// Compute threads (`None`: every core).
    pub n_threads: Option<u32>,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: None,
        }
    }
}

/// A loaded model.
pub trait Backend: Send + Sync {
    /// Backend name (`llama`, `stub`, ...).
    fn name(&self) -> &str;
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

/// One live token sequence. Invariant: its KV state holds exactly
/// [`BackendContext::tokens`].
pub trait BackendContext {
    /// The tokens in the sequence.
    fn tokens(&self) -> &[u32];
    /// Appends tokens and computes the logits of the last one.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] (empty, bad id),
    /// [`BackendError::ContextOverflow`].
    fn prefill(&mut self, tokens: &[u32]) -> Result<(), BackendError>;
    /// Chooses the next token, appends it and returns it.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] when nothing was prefilled since the
    /// last restore, [`BackendError::ContextOverflow`] when full.
    fn decode_one(&mut self) -> Result<u32, BackendError>;
    /// Whether `token` ends generation.
    fn is_eog(&self, token: u32) -> bool;
    /// Packs the sequence's KV state.
    ///
    /// # Errors
    ///
    /// [`BackendError::KvState`] when the backend cannot pack.
    fn kv_pack(&self) -> Result<Vec<u8>, BackendError>;
    /// Restores a packed state holding `tokens` into the cleared sequence.
    ///
    /// # Errors
    ///
    /// [`BackendError::KvState`] for bytes that are not such a state.
    fn kv_unpack(&mut self, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError>;
    /// Removes the last token's KV cell.
    ///
    /// # Errors
    ///
    /// [`BackendError::InvalidInput`] on an empty sequence.
    fn remove_last(&mut self) -> Result<(), BackendError>;
    /// Empties the sequence.
    fn clear(&mut self);
}
