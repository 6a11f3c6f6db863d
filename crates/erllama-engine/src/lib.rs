//! The erllama engine: what runs a model and wires it to the cache.
//!
//! Why a separate crate: the engine logic (model tasks, registry, in-flight
//! table, scheduler) must be testable in milliseconds without compiling
//! llama.cpp, so it talks to models only through the [`Backend`] trait.
//!
//! Components so far:
//! - [`Backend`] / [`BackendContext`]: what a model task needs from a model
//!   (tokenize, contexts, prefill, decode, KV pack/unpack, last-cell removal,
//!   optional capabilities answering [`BackendError::NotSupported`]);
//! - [`StubBackend`]: the deterministic stub of SPEC §2, a product feature
//!   for fast cache tests.
//!
//! The model actor, registry, in-flight tracking and the memory-pressure
//! scheduler build on these.

mod backend;
mod stub;

pub use backend::{Backend, BackendContext, BackendError, ContextParams};
pub use stub::{stub_next_token, stub_word_token, StubBackend, STUB_BOS, STUB_VOCAB};
