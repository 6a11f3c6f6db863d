//! The engine: the model registry, the in-flight request table and the
//! shared cache.
//!
//! Models are found by string id (explicit, or `erllama_model_<N>`); each
//! is an actor ([`crate::model`]) reached through its [`ModelHandle`],
//! which owns the mailbox protocol. Request ids map to a cancel flag and
//! their model so `cancel` routes without going through any mailbox; each
//! request's stream owns its in-flight entry and removes it when the
//! request ends (or the stream is dropped). Calls that do CPU work
//! (tokenizing a long prompt) run on the blocking pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use erllama_cache::{
    ctx_params_hash, fingerprint_file_safe, validate_config, Cache, CacheKey, ModelIdentity,
    PolicyConfig, TierKind,
};
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError};
use crate::model::{
    self, ActorSetup, Adapter, ModelConfig, ModelHandle, ModelStatus, SaveSummary, Submission,
};
use crate::request::{
    Completion, EngineError, Event, Prompt, RequestId, RequestOptions, MAX_BREAKPOINTS,
};

pub use crate::model::AdapterInfo;

/// What `info` reports about a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model id.
    pub id: String,
    /// The backend name.
    pub backend: String,
    /// Its status now.
    pub status: ModelStatus,
    /// Context size.
    pub n_ctx: usize,
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Quant type label.
    pub quant_type: String,
    /// Nominal bits per weight.
    pub quant_bits: u8,
    /// The tier its saves go to.
    pub tier: TierKind,
    /// Hex of the base fingerprint.
    pub fingerprint: String,
    /// Fingerprint mode label.
    pub fingerprint_mode: String,
    /// Whether its state is cached (saved and restored); when not, no
    /// lookup or save happens for it.
    pub cacheable: bool,
    /// Its memory kind (`kv`, `kv_iswa`, `recurrent`, `hybrid`, ...).
    pub memory: String,
    /// Why it is not cacheable.
    pub cache_reason: Option<String>,
    /// Sequences computed together (`parallel`).
    pub parallel: usize,
    /// The K cache's element type.
    pub cache_type_k: crate::KvType,
    /// The V cache's element type.
    pub cache_type_v: crate::KvType,
    /// Flash attention, as loaded.
    pub flash_attn: crate::FlashAttn,
    /// Requests running now (on a sequence).
    pub running: usize,
    /// Requests waiting for a sequence or for KV cells.
    pub queued: usize,
    /// Finished sequences kept for sharing.
    pub warm_sequences: usize,
    /// KV cells in use (shared cells counted once), out of `n_ctx`.
    pub kv_cells_used: usize,
}

struct ModelEntry {
    handle: ModelHandle,
    backend: Arc<dyn Backend>,
    config: ModelConfig,
    /// The identity without adapters.
    identity: Arc<ModelIdentity>,
    /// Prompt preparations (tokenize, check, hand to the actor), run one
    /// after the other on the blocking pool by a task of this model, so
    /// requests reach the actor in the order they were submitted.
    prepare: mpsc::UnboundedSender<PrepareJob>,
}

/// One request's preparation.
type PrepareJob = Box<dyn FnOnce() + Send>;

/// Runs a model's preparations in submission order, each on the blocking
/// pool (tokenizing a long prompt is CPU work).
async fn run_preparations(mut jobs: mpsc::UnboundedReceiver<PrepareJob>) {
    while let Some(job) = jobs.recv().await {
        // A job that panics fails only its own request (its stream sees
        // the channel close).
        let _ = tokio::task::spawn_blocking(job).await;
    }
}

struct Inflight {
    model: String,
    cancel: Arc<AtomicBool>,
}

struct Inner {
    cache: Cache,
    policy: PolicyConfig,
    models: Mutex<HashMap<String, Arc<ModelEntry>>>,
    inflight: Arc<Mutex<HashMap<RequestId, Inflight>>>,
    next_model: AtomicU64,
    next_request: AtomicU64,
}

/// The engine; cheap to clone (a shared handle).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("models", &self.models())
            .finish_non_exhaustive()
    }
}

/// A request's entry in the in-flight table, removed when dropped.
struct InflightEntry {
    id: RequestId,
    table: Arc<Mutex<HashMap<RequestId, Inflight>>>,
}

impl Drop for InflightEntry {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A started request: its id, then its events.
///
/// The stream owns the request's in-flight entry: it is removed when the
/// request's final event is read, or when the stream is dropped. Dropping
/// the stream before the request ends cancels the request (no one is
/// listening any more).
pub struct RequestStream {
    /// The request id (known before the first token).
    pub id: RequestId,
    /// The model serving it.
    pub model: String,
    events: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
    entry: Option<InflightEntry>,
}

impl std::fmt::Debug for RequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("id", &self.id)
            .field("model", &self.model)
            .field("ended", &self.entry.is_none())
            .finish_non_exhaustive()
    }
}

impl RequestStream {
    fn seen(&mut self, ev: Option<Event>) -> Option<Event> {
        if !matches!(ev, Some(Event::Token { .. })) {
            // The end (or the model died): the id is forgotten.
            self.entry = None;
        }
        ev
    }

    /// The next event; after [`Event::Done`] this returns `None`, and so
    /// it does when the model task died without answering.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.events.recv().await;
        self.seen(ev)
    }

    /// Blocking [`RequestStream::next`] (not from inside a runtime).
    pub fn blocking_next(&mut self) -> Option<Event> {
        let ev = self.events.blocking_recv();
        self.seen(ev)
    }

    /// Waits for the end, ignoring token events.
    ///
    /// # Errors
    ///
    /// The request's error, or `ModelGone` if the model died.
    pub async fn collect(mut self) -> Result<Completion, EngineError> {
        while let Some(ev) = self.next().await {
            if let Event::Done(r) = ev {
                return r;
            }
        }
        Err(EngineError::ModelGone(
            self.model.clone(),
            "the model task stopped without answering".into(),
        ))
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if self.entry.is_some() {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// Tokenizes and checks a prompt for a model (the CPU part of a submit).
fn prepare_tokens(
    entry: &ModelEntry,
    prompt: &Prompt,
    options: &RequestOptions,
) -> Result<Vec<u32>, EngineError> {
    let tokens = match prompt {
        Prompt::Text(t) => {
            if t.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            entry.backend.tokenize(t, true)?
        }
        Prompt::Tokens(t) => t.clone(),
    };
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let n_vocab = entry.backend.n_vocab();
    if let Some(index) = tokens.iter().position(|&t| t >= n_vocab) {
        return Err(EngineError::TokenOutOfRange {
            token: i64::from(tokens[index]),
            index,
            n_vocab,
        });
    }
    if options.breakpoints.len() > MAX_BREAKPOINTS {
        return Err(EngineError::InvalidInput(format!(
            "at most {MAX_BREAKPOINTS} breakpoints, got {}",
            options.breakpoints.len()
        )));
    }
    let mut last = 0;
    for b in &options.breakpoints {
        if b.tokens <= last || b.tokens > tokens.len() {
            return Err(EngineError::InvalidInput(format!(
                "breakpoints must be strictly increasing token counts in 1..={} (the \
                 prompt's length); got {}",
                tokens.len(),
                b.tokens
            )));
        }
        last = b.tokens;
    }
    let n_ctx = entry.config.context.n_ctx;
    if tokens.len().saturating_add(options.max_tokens) > n_ctx {
        return Err(EngineError::ContextOverflow {
            prompt: tokens.len(),
            max_tokens: options.max_tokens,
            n_ctx,
        });
    }
    Ok(tokens)
}

impl Engine {
    /// An engine over `cache` with the global save `policy`.
    ///
    /// # Errors
    ///
    /// [`EngineError::InvalidInput`] for an invalid policy.
    pub fn new(cache: Cache, policy: PolicyConfig) -> Result<Self, EngineError> {
        validate_config(&policy).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache,
                policy,
                models: Mutex::new(HashMap::new()),
                inflight: Arc::new(Mutex::new(HashMap::new())),
                next_model: AtomicU64::new(1),
                next_request: AtomicU64::new(1),
            }),
        })
    }

    /// The shared cache.
    #[must_use]
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// The global save policy.
    #[must_use]
    pub fn policy(&self) -> &PolicyConfig {
        &self.inner.policy
    }

    fn models_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ModelEntry>>> {
        self.inner
            .models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, id: &str) -> Result<Arc<ModelEntry>, EngineError> {
        self.models_lock()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.to_owned()))
    }

    /// Loads a model: registers `id` (or `erllama_model_<N>`), starts its
    /// actor and waits until its context exists. `config.policy` is the
    /// model's policy (pass [`Engine::policy`] for the global one).
    ///
    /// # Errors
    ///
    /// [`EngineError::AlreadyLoaded`], [`EngineError::UnknownTier`] for a
    /// tier the cache lacks, [`EngineError::InvalidInput`] for a bad
    /// policy or sizes, or the backend's context error.
    pub async fn load_model(
        &self,
        backend: Arc<dyn Backend>,
        id: Option<String>,
        config: ModelConfig,
    ) -> Result<String, EngineError> {
        if !self.inner.cache.has_tier(config.tier) {
            return Err(EngineError::UnknownTier(config.tier.label().to_owned()));
        }
        validate_config(&config.policy).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        if config.context.n_ctx == 0 || config.context.n_batch == 0 {
            return Err(EngineError::InvalidInput(
                "n_ctx and n_batch must be positive".into(),
            ));
        }
        if !(1..=256).contains(&config.context.n_seq) {
            return Err(EngineError::InvalidInput(format!(
                "parallel must be in 1..=256, got {}",
                config.context.n_seq
            )));
        }
        let fp = backend.fingerprint();
        let identity = Arc::new(ModelIdentity {
            fingerprint: fp.bytes,
            fingerprint_mode: fp.mode,
            quant_type: fp.quant,
            ctx_params_hash: ctx_params_hash(&backend.ctx_params(&config.context)),
            context_size: u32::try_from(config.context.n_ctx).unwrap_or(u32::MAX),
        });
        let id = {
            let models = self.models_lock();
            match id {
                Some(id) if id.is_empty() => {
                    return Err(EngineError::InvalidInput("model id is empty".into()))
                }
                Some(id) if models.contains_key(&id) => return Err(EngineError::AlreadyLoaded(id)),
                Some(id) => id,
                None => loop {
                    let n = self.inner.next_model.fetch_add(1, Ordering::Relaxed);
                    let candidate = format!("erllama_model_{n}");
                    if !models.contains_key(&candidate) {
                        break candidate;
                    }
                },
            }
        };
        let crashed = Arc::clone(&self.inner.inflight);
        let crashed_id = id.clone();
        let setup = ActorSetup {
            model_id: id.clone(),
            backend: Arc::clone(&backend),
            config: config.clone(),
            identity: Arc::clone(&identity),
            cache: self.inner.cache.clone(),
            // The task's requests died with it (their streams report
            // `model_gone`): forget their ids.
            on_crash: Arc::new(move || {
                crashed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|_, f| f.model != crashed_id);
            }),
        };
        let (handle, ready) = model::spawn(setup)?;
        let (prepare, jobs) = mpsc::unbounded_channel();
        tokio::spawn(run_preparations(jobs));
        let entry = Arc::new(ModelEntry {
            handle: handle.clone(),
            backend,
            config,
            identity,
            prepare,
        });
        let inserted = {
            let mut models = self.models_lock();
            if models.contains_key(&id) {
                false
            } else {
                models.insert(id.clone(), entry);
                true
            }
        };
        if !inserted {
            // Loaded meanwhile under the same id: this one goes.
            let _ = handle.stop().await;
            return Err(EngineError::AlreadyLoaded(id));
        }
        match ready.await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => {
                self.models_lock().remove(&id);
                Err(e)
            }
            Err(_) => {
                self.models_lock().remove(&id);
                Err(EngineError::ModelLoad(
                    "the model task crashed while starting".into(),
                ))
            }
        }
    }

    /// Tokenizes and checks a prompt for `model` (CPU work: call it off
    /// the async runtime for long text).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`], [`EngineError::EmptyPrompt`],
    /// [`EngineError::TokenOutOfRange`], [`EngineError::ContextOverflow`],
    /// [`EngineError::InvalidInput`] for bad sampling values.
    pub fn prepare(
        &self,
        model: &str,
        prompt: &Prompt,
        options: &RequestOptions,
    ) -> Result<Vec<u32>, EngineError> {
        let entry = self.entry(model)?;
        options.sampling.validate()?;
        prepare_tokens(&entry, prompt, options)
    }

    /// Submits a request to `model` and returns its stream at once, with
    /// its id (cancellable from now on).
    ///
    /// The options are checked here (an error is returned at once); the
    /// prompt is tokenized and checked (empty, ids in the vocabulary, room
    /// in the context) on the blocking pool by the model's preparation task,
    /// one request after the other so they reach the model in submission
    /// order, and a prompt that fails ends the stream with that error. A
    /// full model queue ends it with [`EngineError::Busy`].
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`]; [`EngineError::InvalidInput`] for bad
    /// sampling values.
    pub fn submit(
        &self,
        model: &str,
        prompt: Prompt,
        options: RequestOptions,
    ) -> Result<RequestStream, EngineError> {
        let entry = self.entry(model)?;
        options.sampling.validate()?;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Inflight {
                    model: model.to_owned(),
                    cancel: Arc::clone(&cancel),
                },
            );
        let (events_tx, events) = mpsc::unbounded_channel();
        let submitted = Instant::now();
        let inflight = Arc::clone(&self.inner.inflight);
        let prepare = entry.prepare.clone();
        let job: PrepareJob = {
            let cancel = Arc::clone(&cancel);
            Box::new(move || {
                let forget = || {
                    inflight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id);
                };
                let tokens = match prepare_tokens(&entry, &prompt, &options) {
                    Ok(t) => t,
                    Err(e) => {
                        forget();
                        let _ = events_tx.send(Event::Done(Err(e)));
                        return;
                    }
                };
                let prompt_text = match prompt {
                    Prompt::Text(t) => t,
                    Prompt::Tokens(_) => String::new(),
                };
                let sub = Submission {
                    id,
                    tokens,
                    prompt_text,
                    options,
                    cancel,
                    events: events_tx,
                    submitted,
                };
                if let Err((e, sub)) = entry.handle.submit(Box::new(sub)) {
                    forget();
                    let _ = sub.events.send(Event::Done(Err(e)));
                }
            })
        };
        if let Err(mpsc::error::SendError(job)) = prepare.send(job) {
            // The model's preparation task is gone (its runtime shut
            // down): prepare inline, which reports the model gone.
            job();
        }
        Ok(RequestStream {
            id,
            model: model.to_owned(),
            events,
            cancel,
            entry: Some(InflightEntry {
                id,
                table: Arc::clone(&self.inner.inflight),
            }),
        })
    }

    /// [`Engine::submit`] + collect.
    ///
    /// # Errors
    ///
    /// As those, and the request's own error.
    pub async fn complete(
        &self,
        model: &str,
        prompt: Prompt,
        options: RequestOptions,
    ) -> Result<Completion, EngineError> {
        self.submit(model, prompt, options)?.collect().await
    }

    /// Cancels a request by id: idempotent, and an unknown or finished id
    /// is fine. Observed between tokens. Returns whether the id was live.
    pub fn cancel(&self, id: RequestId) -> bool {
        match self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            Some(f) => {
                f.cancel.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Ids of live requests, with their model.
    #[must_use]
    pub fn inflight(&self) -> Vec<(RequestId, String)> {
        let mut v: Vec<_> = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, f)| (*id, f.model.clone()))
            .collect();
        v.sort();
        v
    }

    /// Idle models with a live context, largest context first, with its
    /// token count (the scheduler's candidates for an `evict`).
    #[must_use]
    pub fn idle_models_by_size(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = self
            .models_lock()
            .iter()
            .filter(|(_, e)| e.handle.shared.status() == ModelStatus::Idle)
            .map(|(id, e)| {
                (
                    id.clone(),
                    e.handle.shared.live_tokens.load(Ordering::Relaxed),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Ids of loaded models, sorted.
    #[must_use]
    pub fn models(&self) -> Vec<String> {
        let mut v: Vec<String> = self.models_lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// A model's status (read without the mailbox: prompt mid-generation).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`].
    pub fn status(&self, model: &str) -> Result<ModelStatus, EngineError> {
        Ok(self.entry(model)?.handle.shared.status())
    }

    /// A model's description.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`].
    pub fn info(&self, model: &str) -> Result<ModelInfo, EngineError> {
        let e = self.entry(model)?;
        let occupancy = e.handle.shared.occupancy();
        let support = e
            .handle
            .shared
            .state_support
            .get()
            .cloned()
            .unwrap_or_default();
        Ok(ModelInfo {
            id: model.to_owned(),
            backend: e.backend.name().to_owned(),
            status: e.handle.shared.status(),
            n_ctx: e.config.context.n_ctx,
            n_vocab: e.backend.n_vocab(),
            quant_type: e.identity.quant_type.label().to_owned(),
            quant_bits: e.identity.quant_type.nominal_bits(),
            tier: e.config.tier,
            fingerprint: CacheKey(e.identity.fingerprint).to_hex(),
            fingerprint_mode: e.identity.fingerprint_mode.label().to_owned(),
            cacheable: support.cacheable,
            memory: support.memory,
            cache_reason: support.reason,
            parallel: e.config.context.n_seq,
            cache_type_k: e.config.context.type_k,
            cache_type_v: e.config.context.type_v,
            flash_attn: e.config.context.flash_attn,
            running: occupancy.running,
            queued: occupancy.queued,
            warm_sequences: occupancy.warm,
            kv_cells_used: occupancy.cells,
        })
    }

    /// The backend of a model (tokenize, detokenize, chat templates,
    /// embeddings run on it directly, off the actor).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`].
    pub fn backend(&self, model: &str) -> Result<Arc<dyn Backend>, EngineError> {
        Ok(Arc::clone(&self.entry(model)?.backend))
    }

    /// The model's cache identity (key parts).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`].
    pub fn identity(&self, model: &str) -> Result<Arc<ModelIdentity>, EngineError> {
        Ok(Arc::clone(&self.entry(model)?.identity))
    }

    /// Loads a LoRA adapter on `model` and applies it with `scale` (once
    /// no request runs on the model). The effective fingerprint changes
    /// (cache rows of different adapter sets never mix); requests already
    /// admitted finish under the old set.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`]; [`EngineError::FileNotFound`];
    /// [`EngineError::AlreadyLoaded`] for a taken adapter id;
    /// [`EngineError::InvalidInput`] for a non-finite scale;
    /// [`EngineError::ModelLoad`] when the file is not an adapter of this
    /// model; [`EngineError::NotSupported`] when the backend cannot apply
    /// it (the adapter is not kept then).
    pub async fn load_adapter(
        &self,
        model: &str,
        path: std::path::PathBuf,
        scale: f32,
        id: Option<String>,
    ) -> Result<AdapterInfo, EngineError> {
        let entry = self.entry(model)?;
        if !scale.is_finite() {
            return Err(EngineError::InvalidInput(format!(
                "adapter scale must be finite, got {scale}"
            )));
        }
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            return Err(EngineError::FileNotFound(path.display().to_string()));
        }
        let id = match id {
            Some(id) if id.is_empty() => {
                return Err(EngineError::InvalidInput("adapter id is empty".into()))
            }
            Some(id) => id,
            None => {
                let taken: Vec<String> = entry
                    .handle
                    .adapters()
                    .await?
                    .into_iter()
                    .map(|a| a.id)
                    .collect();
                (1..)
                    .map(|n| format!("adapter_{n}"))
                    .find(|c| !taken.contains(c))
                    .expect("an unused id exists")
            }
        };
        let backend = Arc::clone(&entry.backend);
        let p = path.clone();
        let (sha, handle) = tokio::task::spawn_blocking(move || {
            let sha = fingerprint_file_safe(&p, &mut |_, _| {}).map_err(|e| {
                EngineError::ModelLoad(format!("reading adapter {}: {e}", p.display()))
            })?;
            let handle = backend.load_adapter(&p).map_err(|e| match e {
                BackendError::NotSupported(w) => EngineError::NotSupported(w.to_owned()),
                other => EngineError::ModelLoad(format!("adapter {}: {other}", p.display())),
            })?;
            Ok::<_, EngineError>((sha, handle))
        })
        .await
        .map_err(|e| EngineError::Internal(format!("adapter loading task failed: {e}")))??;
        entry
            .handle
            .add_adapter(Adapter {
                info: AdapterInfo {
                    id,
                    path,
                    sha256: CacheKey(sha).to_hex(),
                    scale,
                },
                handle,
            })
            .await
    }

    /// Changes an adapter's scale (0 deactivates it without unloading).
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`] for an unknown model or adapter id;
    /// [`EngineError::InvalidInput`]; the backend's error (the old scale is
    /// kept then).
    pub async fn set_adapter_scale(
        &self,
        model: &str,
        id: &str,
        scale: f32,
    ) -> Result<AdapterInfo, EngineError> {
        let entry = self.entry(model)?;
        if !scale.is_finite() {
            return Err(EngineError::InvalidInput(format!(
                "adapter scale must be finite, got {scale}"
            )));
        }
        entry.handle.set_adapter_scale(id, scale).await
    }

    /// Unloads an adapter.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`] for an unknown model or adapter id.
    pub async fn unload_adapter(&self, model: &str, id: &str) -> Result<(), EngineError> {
        self.entry(model)?.handle.remove_adapter(id).await
    }

    /// The adapters loaded on `model`, in load order.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`].
    pub async fn adapters(&self, model: &str) -> Result<Vec<AdapterInfo>, EngineError> {
        self.entry(model)?.handle.adapters().await
    }

    /// Asks a model to save every sequence it holds (reason `evict`) and
    /// release them; waits for the saves (each bounded by
    /// `evict_save_timeout_ms`). Running requests finish first.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`], a save error or timeout.
    pub async fn evict(&self, model: &str) -> Result<Vec<SaveSummary>, EngineError> {
        self.entry(model)?.handle.evict().await
    }

    /// Saves every sequence a model holds now (reason `shutdown`), keeping
    /// them.
    ///
    /// # Errors
    ///
    /// As [`Engine::evict`].
    pub async fn shutdown_save(&self, model: &str) -> Result<Vec<SaveSummary>, EngineError> {
        self.entry(model)?.handle.save_now().await
    }

    /// Unloads a model: its running requests are cancelled (finish saves
    /// fired), queued ones fail, what its sequences hold is saved (reason
    /// `shutdown`), then the model is freed and its id released.
    ///
    /// # Errors
    ///
    /// [`EngineError::NotFound`]; the saves' error (the model is unloaded
    /// anyway).
    pub async fn unload(&self, model: &str) -> Result<Vec<SaveSummary>, EngineError> {
        let entry = self.entry(model)?;
        self.models_lock().remove(model);
        entry.handle.stop().await
    }

    /// Unloads every model.
    pub async fn shutdown(&self) {
        for id in self.models() {
            let _ = self.unload(&id).await;
        }
    }
}
