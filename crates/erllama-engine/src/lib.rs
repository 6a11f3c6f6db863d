//! The erllama engine: what runs a model and wires it to the cache.
//!
//! Why a separate crate: the engine logic (model tasks, registry, in-flight
//! table, scheduler) must be testable in milliseconds without compiling
//! llama.cpp, so it talks to models only through the [`Backend`] trait.
//!
//! Components:
//! - [`Backend`] / [`BackendContext`]: what a model task needs from a model
//!   (tokenize, contexts, prefill, decode, KV pack/unpack, last-cell removal,
//!   sampling; optional capabilities answer [`BackendError::NotSupported`]);
//! - [`StubBackend`]: the deterministic stub of docs/api.md, a product feature
//!   for fast cache tests;
//! - the model actor (one thread per model owning its context; one prefill
//!   chunk or one token per turn; cache lookups, restores and saves);
//! - [`Engine`]: the registry of models by id, the in-flight request table
//!   (cancel by id), LoRA adapter sets and the shared
//!   [`erllama_cache::Cache`];
//! - [`Scheduler`] and the [`PressureSampler`]s (`noop`, `system` with
//!   cgroup v2 limits, `nvml`): evict LRU cache rows, and optionally idle
//!   models' contexts, when memory runs high.

mod backend;
mod cells;
mod engine;
mod model;
mod pressure;
mod request;
mod scheduler;
mod stub;
mod text;

pub use backend::{
    AdapterHandle, Backend, BackendContext, BackendError, BatchItem, ContextParams, FlashAttn,
    ForeignError, KvCells, KvType, ModelFingerprint, PrefixReuse, SamplingParams, SeqId,
    StateSupport,
};
pub use cells::CellLedger;
pub use engine::{AdapterInfo, Engine, ModelInfo, RequestStream};
pub use model::{ModelConfig, ModelStatus, SaveSummary};
pub use pressure::{
    NoopSampler, NvmlSampler, PressureSampler, Sample, SamplerError, SystemSampler,
};
pub use request::{
    Breakpoint, Completion, EngineError, Event, FinishReason, HitKind, HitSource, Prompt,
    PromptUsage, RequestId, RequestOptions, RequestStats, RestoreFailure, MAX_BREAKPOINTS,
};
pub use scheduler::{CheckOutcome, Scheduler, SchedulerConfig, SchedulerError, SchedulerStatus};
pub use stub::{stub_next_token, stub_word_token, stub_words, StubBackend, STUB_BOS, STUB_VOCAB};
