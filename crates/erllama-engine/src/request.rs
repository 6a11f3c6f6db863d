//! Requests, their results and errors.

use std::fmt;

use erllama_cache::{CacheKey, TierKind};

use crate::backend::{BackendError, SamplingParams};

/// A request id, unique within an engine.
pub type RequestId = u64;

/// What to complete: text (tokenized by the model, with its start token)
/// or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text; user text never yields control tokens.
    Text(String),
    /// Token ids, checked against the vocabulary.
    Tokens(Vec<u32>),
}

/// Per-request options.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOptions {
    /// Generate at most this many tokens.
    pub max_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// The `finish_key` of an earlier turn to resume from.
    pub parent_key: Option<CacheKey>,
    /// Explicit cache breakpoints (docs/policy.md, breakpoints): the
    /// prompt's state at each of these token counts is saved as a row of
    /// its own, whatever the policy, and pinned for its TTL. At most
    /// [`MAX_BREAKPOINTS`], strictly increasing, each within the prompt.
    pub breakpoints: Vec<Breakpoint>,
}

/// Most breakpoints one request may set.
pub const MAX_BREAKPOINTS: usize = 8;

/// One explicit cache breakpoint: save the prompt's first `tokens` tokens
/// as a row, and keep that row from eviction for `pin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breakpoint {
    /// Prompt tokens before the breakpoint (at least 1).
    pub tokens: usize,
    /// How long the row is kept from eviction (renewed by every request
    /// that sets the same breakpoint); `None`: not pinned.
    pub pin: Option<std::time::Duration>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            parent_key: None,
            breakpoints: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled by the caller (or the model was unloaded).
    Cancelled,
}

impl FinishReason {
    /// `"stop"`, `"length"` or `"cancelled"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How the cache served a request's prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    /// The whole prompt was cached.
    Exact,
    /// A prefix was cached (resume or longest prefix).
    Partial,
    /// Nothing was cached.
    Cold,
}

impl HitKind {
    /// `"exact"`, `"partial"` or `"cold"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            HitKind::Exact => "exact",
            HitKind::Partial => "partial",
            HitKind::Cold => "cold",
        }
    }
}

/// Which lookup served a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitSource {
    /// The exact key of the prompt.
    Exact,
    /// The request's `parent_key`.
    Resume,
    /// The longest-prefix walk.
    LongestPrefix,
    /// Another sequence of the same context (running, or kept warm after
    /// its request ended): its cells were shared, nothing was restored.
    Shared,
}

impl HitSource {
    /// `"exact"`, `"resume"`, `"longest_prefix"` or `"shared"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            HitSource::Exact => "exact",
            HitSource::Resume => "resume",
            HitSource::LongestPrefix => "longest_prefix",
            HitSource::Shared => "shared",
        }
    }
}

/// A cached row that was found but could not be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreFailure {
    /// The lookup that found it (the hit the request would have had).
    pub source: HitSource,
    /// Why it could not be restored.
    pub reason: String,
}

/// Statistics of one request (docs/api.md).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Milliseconds from admission to the first generated token's logits
    /// (lookup, restore and prefill).
    pub prefill_ms: f64,
    /// Milliseconds spent generating.
    pub generation_ms: f64,
    /// Milliseconds restoring from the cache (claim, read, unpack).
    pub restore_ms: f64,
    /// How the cache served the prompt.
    pub cache_hit_kind: HitKind,
    /// Which lookup hit, if any.
    pub hit_source: Option<HitSource>,
    /// Prompt tokens whose KV state came from the cache.
    pub cached_tokens: usize,
    /// The tier that served them.
    pub cache_tier: Option<TierKind>,
    /// They came from the remote tier (stored in `cache_tier` on the way).
    pub from_remote: bool,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Whether the request was cancelled.
    pub cancelled: bool,
    /// Milliseconds the request waited in the model's queue.
    pub queue_ms: f64,
    /// The last cached row that was found but failed to restore (the
    /// request then fell back to the next lookup, or to prefill).
    pub restore_failure: Option<RestoreFailure>,
    /// Prompt tokens the model computed for this request: the prompt less
    /// what came from the cache or another sequence; 1 for an exact hit
    /// whose row has no stored logits (its last token is fed again), 0
    /// for one whose row has them.
    pub prefill_tokens: usize,
    /// Generated tokens fed back to the model. A sampled token is fed
    /// only when the next one is wanted, so this is at most
    /// `completion_tokens - 1` (0 for `max_tokens=1`).
    pub decode_tokens: usize,
    /// The largest breakpoint whose row this request wrote (0: none; a
    /// breakpoint whose row already existed was only renewed).
    pub breakpoint_written: usize,
    /// The stop string that ended generation (`finish_reason` `stop`
    /// without one: an end-of-generation token).
    pub stop_sequence: Option<String>,
}

impl RequestStats {
    /// The stats of a request leaving the queue after `queue_ms`: nothing
    /// computed yet, a cold prompt, and `Stop` until something else ends it.
    #[must_use]
    pub fn dequeued(prompt_tokens: usize, queue_ms: f64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens: 0,
            prefill_ms: 0.0,
            generation_ms: 0.0,
            restore_ms: 0.0,
            cache_hit_kind: HitKind::Cold,
            hit_source: None,
            cached_tokens: 0,
            cache_tier: None,
            from_remote: false,
            finish_reason: FinishReason::Stop,
            cancelled: false,
            queue_ms,
            restore_failure: None,
            prefill_tokens: 0,
            breakpoint_written: 0,
            stop_sequence: None,
            decode_tokens: 0,
        }
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The request id.
    pub request_id: RequestId,
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Statistics.
    pub stats: RequestStats,
    /// The key of the finish save (pass it as the next turn's
    /// `parent_key`), when one was made or already present.
    pub finish_key: Option<CacheKey>,
}

/// What a request reports while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while a
    /// multi-byte character or a possible stop string is pending).
    Token {
        /// The token id.
        id: u32,
        /// Newly final text.
        text: String,
        /// With the first token only: what the prompt cost.
        prompt: Option<PromptUsage>,
    },
    /// The request ended.
    Done(Result<Completion, EngineError>),
}

/// What a request's prompt cost, final once its first token is out (and
/// sent with it, so a stream can report it before the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptUsage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens computed for this request ([`RequestStats::prefill_tokens`]).
    pub prefill_tokens: usize,
    /// [`RequestStats::breakpoint_written`].
    pub breakpoint_written: usize,
}

/// Errors of engine calls; each maps to exactly one Python exception
/// (`erllama-py`'s `error.rs`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Bad input (sampler values, options, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The prompt (or another token list) is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A token id outside the vocabulary.
    #[error("token id {token} at index {index} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange {
        /// The id.
        token: i64,
        /// Its position.
        index: usize,
        /// The vocabulary size.
        n_vocab: u32,
    },
    /// Prompt plus generation would not fit the context.
    #[error("{prompt} prompt tokens + {max_tokens} max_tokens exceed n_ctx = {n_ctx}")]
    ContextOverflow {
        /// Prompt tokens.
        prompt: usize,
        /// Requested generation.
        max_tokens: usize,
        /// Context size.
        n_ctx: usize,
    },
    /// No model with this id.
    #[error("no model {0:?} is loaded")]
    NotFound(String),
    /// The id is taken.
    #[error("a model {0:?} is already loaded")]
    AlreadyLoaded(String),
    /// The backend lacks the capability.
    #[error("{0} is not supported by this backend")]
    NotSupported(String),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoTemplate,
    /// A grammar failed to parse, or a grammar step failed.
    #[error("invalid grammar: {0}")]
    Grammar(String),
    /// Invalid KV state bytes.
    #[error("invalid KV state: {0}")]
    KvState(String),
    /// A tier that is not configured or not known.
    #[error("tier {0} is not configured")]
    UnknownTier(String),
    /// The backend could not create a context.
    #[error("cannot create a context: {0}")]
    Context(String),
    /// Computing a batch failed.
    #[error("decode failed: {0}")]
    Decode(String),
    /// The backend failed otherwise.
    #[error("backend error: {0}")]
    Backend(String),
    /// A foreign backend's own error, handed back unchanged.
    #[error("{0}")]
    Foreign(crate::backend::ForeignError),
    /// Loading the model (or an adapter) failed.
    #[error("loading failed: {0}")]
    ModelLoad(String),
    /// A file to load does not exist.
    #[error("no such file: {0}")]
    FileNotFound(String),
    /// The model's task stopped (it crashed or was unloaded).
    #[error("model {0:?} stopped: {1}")]
    ModelGone(String, String),
    /// The model's queue is full: back pressure, try again later.
    #[error("model {0:?} is busy: its queue is full")]
    Busy(String),
    /// A blocking save did not finish in time.
    #[error("the {0} save did not finish within {1} ms")]
    SaveTimeout(&'static str, u64),
    /// A cache operation failed.
    #[error("cache: {0}")]
    Cache(String),
    /// A bug: something that must not happen did (a caught panic). The
    /// engine goes on serving.
    #[error("internal error (a bug; please report it): {0}")]
    Internal(String),
}

impl EngineError {
    /// A stable snake_case name of the variant.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            EngineError::InvalidInput(_) => "invalid_input",
            EngineError::EmptyPrompt => "empty_prompt",
            EngineError::TokenOutOfRange { .. } => "token_out_of_range",
            EngineError::ContextOverflow { .. } => "context_overflow",
            EngineError::NotFound(_) => "not_found",
            EngineError::AlreadyLoaded(_) => "already_loaded",
            EngineError::NotSupported(_) => "not_supported",
            EngineError::NoTemplate => "no_template",
            EngineError::Grammar(_) => "grammar",
            EngineError::KvState(_) => "kv_state",
            EngineError::UnknownTier(_) => "unknown_tier",
            EngineError::Context(_) => "context",
            EngineError::Decode(_) => "decode",
            EngineError::Backend(_) => "backend",
            EngineError::Foreign(_) => "foreign",
            EngineError::ModelLoad(_) => "model_load",
            EngineError::FileNotFound(_) => "file_not_found",
            EngineError::ModelGone(..) => "model_gone",
            EngineError::Busy(_) => "busy",
            EngineError::SaveTimeout(..) => "save_timeout",
            EngineError::Cache(_) => "cache",
            EngineError::Internal(_) => "internal",
        }
    }
}

impl From<BackendError> for EngineError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidInput(m) => EngineError::InvalidInput(m),
            BackendError::EmptyInput(_) => EngineError::EmptyPrompt,
            BackendError::TokenOutOfRange {
                token,
                index,
                n_vocab,
            } => EngineError::TokenOutOfRange {
                token,
                index,
                n_vocab,
            },
            BackendError::ContextOverflow {
                have,
                adding,
                n_ctx,
            } => EngineError::ContextOverflow {
                prompt: have + adding,
                max_tokens: 0,
                n_ctx,
            },
            BackendError::KvState(m) => EngineError::KvState(m),
            BackendError::NotSupported("chat_template") | BackendError::NoTemplate => {
                EngineError::NoTemplate
            }
            BackendError::NotSupported(what) => EngineError::NotSupported(what.to_owned()),
            BackendError::Grammar(m) => EngineError::Grammar(m),
            BackendError::ContextCreate(m) => EngineError::Context(m),
            BackendError::Decode(m) => EngineError::Decode(m),
            // A step interrupted by a cancel: the actor ends the request as
            // cancelled before this could reach a caller.
            BackendError::Cancelled => EngineError::Backend("cancelled".into()),
            BackendError::Foreign(f) => EngineError::Foreign(f),
            BackendError::Other(m) => EngineError::Backend(m),
        }
    }
}
