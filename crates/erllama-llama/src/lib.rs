//! The llama.cpp backend of erllama.
//!
//! This is the only crate that compiles llama.cpp (through `llama-cpp-2`), so
//! everything else builds and tests in seconds. It gives the engine what a
//! model task needs and nothing it must not do:
//!
//! - [`backend`]: the one process-wide llama.cpp backend, logs routed to
//!   `tracing` (silent unless a subscriber is installed);
//! - [`Model`]: a loaded GGUF with its [`ModelMeta`], tokenizer and
//!   detokenizer (user text never becomes control tokens unless asked);
//! - [`Session`]: one context and its token sequence — chunked prefill,
//!   greedy decode, KV pack/unpack through llama.cpp's per-sequence state
//!   API (restores go into a *cleared* sequence), removal of the last cell;
//! - [`LlamaBackend`] / [`LlamaContextBackend`]: the engine's `Backend` /
//!   `BackendContext` traits over a [`Model`] and a [`Session`], with the
//!   llama.cpp sampler chain, grammars and pooled embeddings;
//! - [`LoraAdapter`]: a LoRA adapter loaded with [`Model::load_lora`] and
//!   applied per session ([`Session::set_lora`]; one at a time);
//! - [`SessionWorker`]: the dedicated thread a session lives on;
//! - [`validate_seq_state`]: the structural check every state passes before
//!   llama.cpp reads it, against the [`StateLayout`] each session learns
//!   from its own pack (plain and sliding-window KV caches); a model whose
//!   memory has another layout (recurrent, hybrid, ...) is reported not
//!   cacheable ([`CacheSupport`]).
//!
//! llama.cpp aborts the process on some bad inputs (token ids out of range,
//! batches past the context, malformed state). Every public call here
//! validates first and answers with a [`LlamaError`] instead.

mod backend;
mod engine_backend;
mod error;
mod grammar;
mod lora;
mod model;
mod session;
mod state;
mod worker;

pub use backend::{backend, system_info};
pub use engine_backend::{
    LlamaBackend, LlamaContextBackend, DEFAULT_SAMPLING_SEED, GRAMMAR_PARSE_BUDGET,
    GRAMMAR_STEP_BUDGET, PENALTY_LAST_N,
};
pub use error::{LlamaError, Result};
pub use grammar::{
    build_grammar, check_grammar, grammar_stats, GrammarStats, GrammarStep, GrammarStepError,
    DEFAULT_GRAMMAR_CHUNK, MAX_GRAMMAR_BREADTH, MAX_GRAMMAR_BYTES, MAX_GRAMMAR_ELEMENTS,
    MAX_GRAMMAR_NESTING, MAX_GRAMMAR_PROBE, MAX_GRAMMAR_REPETITION, MAX_GRAMMAR_STACKS,
    MAX_GRAMMAR_WORK,
};
pub use lora::LoraAdapter;
pub use model::{Model, ModelMeta, ModelParams};
pub use session::{SeqTokens, Session, SessionParams};
pub use state::{
    learn_layout, validate_seq_state, CacheSupport, SectionKind, SectionLayout, StateLayout,
    TensorShape, SEQ_STATE_MAGIC,
};
pub use worker::SessionWorker;
