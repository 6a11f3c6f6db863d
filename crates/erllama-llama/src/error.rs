//! Typed errors of the llama.cpp backend.

use std::path::PathBuf;

/// Everything that can go wrong in the llama.cpp backend.
///
/// Each variant carries enough context for a clear message; the Python
/// bindings map every variant to one specific exception class.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// The process-wide llama.cpp backend could not be initialised.
    #[error("llama.cpp backend initialisation failed: {0}")]
    BackendInit(String),

    /// The model file does not exist.
    #[error("model file not found: {}", .0.display())]
    ModelNotFound(PathBuf),

    /// The model file exists but cannot be read.
    #[error("cannot read model file {}: {source}", path.display())]
    ModelUnreadable {
        /// The path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The file is not a GGUF file (bad magic or unsupported version).
    #[error("{} is not a GGUF model file: {reason}", path.display())]
    NotGguf {
        /// The path that was given.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// llama.cpp refused to load the model.
    #[error("llama.cpp could not load the model {}: {reason}", path.display())]
    ModelLoad {
        /// The path that was given.
        path: PathBuf,
        /// What llama.cpp (or its wrapper) reported.
        reason: String,
    },

    /// A context (session) could not be created.
    #[error("could not create a llama.cpp context: {0}")]
    ContextCreate(String),

    /// A parameter is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParam {
        /// Parameter name as the caller spells it.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A token id is negative or not below the vocabulary size.
    #[error("token id {token} at index {index} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange {
        /// The offending id.
        token: i64,
        /// Its index in the input.
        index: usize,
        /// The model's vocabulary size.
        n_vocab: u32,
    },

    /// An operation that needs at least one token got none.
    #[error("{0} needs at least one token")]
    EmptyInput(&'static str),

    /// The tokens do not fit in the context window.
    #[error(
        "context overflow: {have} tokens in the context + {adding} new ones exceed n_ctx = {n_ctx}"
    )]
    ContextOverflow {
        /// Tokens already in the sequence.
        have: usize,
        /// Tokens the caller wants to add.
        adding: usize,
        /// The context size.
        n_ctx: u32,
    },

    /// Sampling was asked for but no logits are available (nothing was
    /// prefilled since the last restore / removal).
    #[error("no logits available: prefill at least one token before decoding")]
    NoLogits,

    /// Text to tokenize is too large for llama.cpp's 32-bit lengths.
    #[error("input text of {0} bytes is too large to tokenize")]
    TextTooLarge(usize),

    /// The model's GGUF carries no chat template.
    #[error("the model has no chat template")]
    NoChatTemplate,

    /// llama.cpp could not render the chat template.
    #[error("chat template failed: {0}")]
    ChatTemplate(String),

    /// `llama_decode` failed.
    #[error("llama_decode failed: {0}")]
    Decode(String),

    /// KV state bytes are malformed or do not match this context.
    #[error("invalid KV state: {0}")]
    KvState(String),

    /// A LoRA adapter could not be loaded for the model.
    #[error("cannot load LoRA adapter {}: {reason}", path.display())]
    LoraLoad {
        /// The path that was given.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },

    /// llama.cpp could not apply or remove a LoRA adapter on a context.
    #[error("cannot apply LoRA adapter: {0}")]
    LoraApply(String),

    /// The thread owning a context is gone (it panicked or was shut down).
    #[error("the context worker thread is gone: {0}")]
    WorkerGone(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;
