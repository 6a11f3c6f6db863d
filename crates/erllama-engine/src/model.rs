//! The per-model actor: one dedicated thread owns the model's context
//! (llama.cpp's is `!Send`) and runs the loop `idle → prefilling →
//! generating → idle`.
//!
//! Each turn of the loop does one unit of work — one prefill chunk of at
//! most `n_batch` tokens or one decoded token — and then drains the
//! mailbox, so cancels, evicts and new requests interleave between tokens.
//! Status is an atomic the handle reads directly, so it is answered at
//! once even mid-generation. Requests are admitted in FIFO order.
//!
//! Cache wiring (docs/policy.md): on admission the prompt is looked up — exact
//! key, then the request's `parent_key` (exact-or-wait, must be a prefix
//! of the prompt), then the longest-prefix walk — and a hit is restored
//! into the cleared sequence. A cold prompt is prefilled up to its
//! trimmed-aligned boundary, saved, then prefilled to the end, where the
//! whole prompt is saved too (so a repeated prompt is an exact hit). Saves
//! pack
//! the state on this thread (the only part on the request path), reserve
//! the key at once (so the next turn's exact-or-wait finds it), and write
//! on a separate thread; `evict` and `shutdown` saves wait for the write,
//! bounded by `evict_save_timeout_ms`.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use erllama_cache::{
    cold_save_split, should_continued_save, should_finish_save, Cache, CacheKey, Claim, Counter,
    Lookup, ModelIdentity, PolicyConfig, PrefixLookup, SaveError, SaveReason, SaveRequest,
    TierKind,
};
use tokio::sync::{mpsc, oneshot};

use crate::backend::{AdapterHandle, Backend, BackendContext, ContextParams, StateSupport};
use crate::request::{
    Completion, EngineError, Event, FinishReason, HitKind, HitSource, RequestId, RequestOptions,
    RequestStats, RestoreFailure,
};
use crate::text::TextStream;

/// A model's state as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStatus {
    /// No request running.
    Idle,
    /// Restoring or prefilling a prompt.
    Prefilling,
    /// Generating tokens.
    Generating,
    /// The task stopped (unloaded or crashed).
    Stopped,
}

impl ModelStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => ModelStatus::Idle,
            1 => ModelStatus::Prefilling,
            2 => ModelStatus::Generating,
            _ => ModelStatus::Stopped,
        }
    }

    /// `"idle"`, `"prefilling"`, `"generating"` or `"stopped"`.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            ModelStatus::Idle => "idle",
            ModelStatus::Prefilling => "prefilling",
            ModelStatus::Generating => "generating",
            ModelStatus::Stopped => "stopped",
        }
    }
}

/// Settings of one loaded model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Context options.
    pub context: ContextParams,
    /// The tier this model's saves go to.
    pub tier: TierKind,
    /// The save policy.
    pub policy: PolicyConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            context: ContextParams::default(),
            tier: TierKind::Ram,
            policy: PolicyConfig::default(),
        }
    }
}

/// A request on its way to the actor.
pub(crate) struct Submission {
    pub(crate) id: RequestId,
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_text: String,
    pub(crate) options: RequestOptions,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) submitted: Instant,
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveSummary {
    /// The row's key.
    pub key: CacheKey,
    /// Tokens saved.
    pub tokens: usize,
    /// Whether it was already stored (nothing written).
    pub already_present: bool,
}

pub(crate) enum Command {
    Submit(Box<Submission>),
    /// Save the live context (reason evict) and clear it.
    Evict(oneshot::Sender<Result<Option<SaveSummary>, EngineError>>),
    /// Save the live context (reason shutdown) and keep serving.
    SaveNow(oneshot::Sender<Result<Option<SaveSummary>, EngineError>>),
    /// Cancel everything, save (reason shutdown) and stop.
    Stop(oneshot::Sender<Result<Option<SaveSummary>, EngineError>>),
    /// Apply a new adapter set (between requests) and clear the context.
    Adapters(AdapterChange),
}

/// Shared between the handle and the actor.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) status: AtomicU8,
    /// Tokens in the live context (for the scheduler's idle-model evict).
    pub(crate) live_tokens: std::sync::atomic::AtomicUsize,
    pub(crate) stop_reason: std::sync::Mutex<Option<String>>,
    /// Whether the context's state can be cached (set once the context
    /// exists).
    pub(crate) state_support: std::sync::OnceLock<StateSupport>,
}

impl Shared {
    pub(crate) fn status(&self) -> ModelStatus {
        ModelStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    fn set(&self, s: ModelStatus) {
        self.status.store(s as u8, Ordering::Release);
    }
}

/// Called when a request ends (the engine forgets its id).
pub(crate) type OnDone = Arc<dyn Fn(RequestId) + Send + Sync>;

pub(crate) struct ActorSetup {
    pub(crate) model_id: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: ModelConfig,
    pub(crate) identity: Arc<ModelIdentity>,
    pub(crate) cache: Cache,
    pub(crate) shared: Arc<Shared>,
    pub(crate) on_done: OnDone,
    /// Called once if the task panics: its requests are lost with it.
    pub(crate) on_crash: Arc<dyn Fn() + Send + Sync>,
}

/// Starts the actor thread; resolves once the context exists.
pub(crate) fn spawn(
    setup: ActorSetup,
    rx: mpsc::Receiver<Command>,
) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let name = format!("erllama-model-{}", setup.model_id);
    let shared = Arc::clone(&setup.shared);
    let on_crash = Arc::clone(&setup.on_crash);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let model_id = setup.model_id.clone();
            let crashed = move || {
                // Runs before the actor's state (and with it the event
                // senders of its requests) is dropped, so a request that
                // sees its stream close also sees the model stopped.
                shared.set(ModelStatus::Stopped);
                tracing::error!(model = %model_id, "model task panicked; its requests fail");
                *shared
                    .stop_reason
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some("the model task crashed".into());
                on_crash();
            };
            run(setup, rx, ready_tx, crashed);
        })
        .map_err(|e| EngineError::Backend(format!("cannot start the model thread: {e}")))?;
    Ok(ready_rx)
}

fn run(
    setup: ActorSetup,
    mut rx: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), EngineError>>,
    crashed: impl FnOnce(),
) {
    let shared = Arc::clone(&setup.shared);
    let ctx = match catch_unwind(AssertUnwindSafe(|| {
        setup.backend.new_context(&setup.config.context)
    })) {
        Ok(ctx) => ctx,
        Err(_) => {
            let _ = ready.send(Err(EngineError::ModelLoad(
                "the backend panicked while creating its context".into(),
            )));
            shared.set(ModelStatus::Stopped);
            return;
        }
    };
    let ctx = match ctx {
        Ok(ctx) => {
            let support = ctx.state_support();
            if let Some(reason) = &support.reason {
                tracing::warn!(
                    model = %setup.model_id,
                    memory = %support.memory,
                    %reason,
                    "this model's state is not cacheable: no lookups, no saves"
                );
            }
            let _ = shared.state_support.set(support);
            shared.set(ModelStatus::Idle);
            let _ = ready.send(Ok(()));
            ctx
        }
        Err(e) => {
            let _ = ready.send(Err(EngineError::from(e)));
            shared.set(ModelStatus::Stopped);
            return;
        }
    };
    let cacheable = shared.state_support.get().is_none_or(|s| s.cacheable);
    let mut actor = Actor {
        identity: Arc::clone(&setup.identity),
        cacheable,
        setup,
        ctx,
        queue: VecDeque::new(),
        active: None,
        deferred: Vec::new(),
    };
    let served = catch_unwind(AssertUnwindSafe(|| serve(&mut actor, &mut rx)));
    if served.is_err() {
        crashed();
    }
    shared.set(ModelStatus::Stopped);
    // `actor` and `rx` drop here: pending requests' streams close.
}

/// The actor loop; returns when the model is stopped or every handle is
/// gone.
fn serve(actor: &mut Actor, rx: &mut mpsc::Receiver<Command>) {
    loop {
        if actor.active.is_none() && actor.queue.is_empty() {
            match rx.blocking_recv() {
                Some(cmd) => {
                    if actor.handle(cmd) {
                        return;
                    }
                }
                None => {
                    actor.stop(None);
                    return;
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if actor.handle(cmd) {
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if actor.active.is_none() && actor.queue.is_empty() {
                        actor.stop(None);
                        return;
                    }
                    break;
                }
            }
        }
        actor.turn();
    }
}

/// One request being served.
struct Active {
    sub: Box<Submission>,
    /// Prompt tokens still to prefill (from `prefill_at`).
    prefill_at: usize,
    /// Cold-save boundary in prompt tokens, if a cold save is due.
    cold_at: Option<usize>,
    generated: Vec<u32>,
    text: TextStream,
    stats: RequestStats,
    admitted: Instant,
    gen_started: Option<Instant>,
    last_saved_at: usize,
}

struct Actor {
    setup: ActorSetup,
    /// The cache identity of what the context computes now (the base
    /// fingerprint with the active adapters). Changes only between
    /// requests, so a request keeps the identity it was admitted with.
    identity: Arc<ModelIdentity>,
    /// Whether the context's state can be cached; when not, no lookup and
    /// no save ever happens.
    cacheable: bool,
    ctx: Box<dyn BackendContext>,
    queue: VecDeque<Box<Submission>>,
    active: Option<Active>,
    /// Evicts and adapter changes asked for mid-request, done when it ends.
    deferred: Vec<Deferred>,
}

enum Deferred {
    Evict(SaveReply),
    Adapters(AdapterChange),
}

/// A new adapter set and the identity it gives.
pub(crate) struct AdapterChange {
    pub(crate) identity: Arc<ModelIdentity>,
    pub(crate) adapters: Vec<(AdapterHandle, f32)>,
    pub(crate) reply: oneshot::Sender<Result<(), EngineError>>,
}

type SaveReply = oneshot::Sender<Result<Option<SaveSummary>, EngineError>>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Actor {
    fn cache(&self) -> &Cache {
        &self.setup.cache
    }

    fn counters(&self) -> &erllama_cache::Counters {
        self.setup.cache.counters()
    }

    fn policy(&self) -> &PolicyConfig {
        &self.setup.config.policy
    }

    fn publish_live(&self) {
        self.setup
            .shared
            .live_tokens
            .store(self.ctx.tokens().len(), Ordering::Relaxed);
    }

    /// Handles a command; true when the actor must exit.
    fn handle(&mut self, cmd: Command) -> bool {
        let exit = self.handle_inner(cmd);
        self.publish_live();
        exit
    }

    fn handle_inner(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(sub) => self.queue.push_back(sub),
            Command::Evict(reply) => {
                if self.active.is_some() {
                    self.deferred.push(Deferred::Evict(reply));
                } else {
                    self.evict(reply);
                }
            }
            Command::Adapters(change) => {
                if self.active.is_some() {
                    self.deferred.push(Deferred::Adapters(change));
                } else {
                    self.apply_adapters(change);
                }
            }
            Command::SaveNow(reply) => {
                let r = self.save_blocking(SaveReason::Shutdown);
                let _ = reply.send(r);
            }
            Command::Stop(reply) => {
                self.stop(Some(reply));
                return true;
            }
        }
        false
    }

    /// Switches adapters: the live context was computed under the old set,
    /// so it is dropped (never saved or reused under the new identity).
    fn apply_adapters(&mut self, change: AdapterChange) {
        let result = self
            .ctx
            .set_adapters(&change.adapters)
            .map_err(EngineError::from);
        if result.is_ok() {
            self.identity = change.identity;
        }
        self.ctx.clear();
        self.publish_live();
        let _ = change.reply.send(result);
    }

    fn run_deferred(&mut self) {
        for d in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Evict(reply) => self.evict(reply),
                Deferred::Adapters(change) => self.apply_adapters(change),
            }
        }
    }

    fn evict(&mut self, reply: SaveReply) {
        let r = self.save_blocking(SaveReason::Evict);
        self.ctx.clear();
        self.publish_live();
        let _ = reply.send(r);
    }

    /// Unload: cancel the running request (its finish save still fires),
    /// fail the queued ones, save the live context, stop.
    fn stop(&mut self, reply: Option<SaveReply>) {
        if let Some(a) = self.active.take() {
            a.sub.cancel.store(true, Ordering::Relaxed);
            self.finish(a, FinishReason::Cancelled);
        }
        let reason = "the model was unloaded".to_owned();
        for sub in self.queue.drain(..) {
            (self.setup.on_done)(sub.id);
            let _ = sub.events.send(Event::Done(Err(EngineError::ModelGone(
                self.setup.model_id.clone(),
                reason.clone(),
            ))));
        }
        let r = self.save_blocking(SaveReason::Shutdown);
        for d in self.deferred.drain(..) {
            match d {
                Deferred::Evict(reply) => {
                    let _ = reply.send(Ok(None));
                }
                Deferred::Adapters(change) => {
                    let _ = change.reply.send(Err(EngineError::ModelGone(
                        self.setup.model_id.clone(),
                        "the model was unloaded".into(),
                    )));
                }
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(r);
        }
    }

    fn turn(&mut self) {
        self.turn_inner();
        self.publish_live();
    }

    fn turn_inner(&mut self) {
        if self.active.is_none() {
            self.run_deferred();
            if let Some(sub) = self.queue.pop_front() {
                self.active = self.admit(sub);
            }
        }
        let Some(mut a) = self.active.take() else {
            self.setup.shared.set(ModelStatus::Idle);
            return;
        };
        match self.step(&mut a) {
            Ok(None) => self.active = Some(a),
            Ok(Some(reason)) => self.finish(a, reason),
            Err(e) => self.fail(a, e),
        }
        if self.active.is_none() && self.queue.is_empty() {
            self.run_deferred();
            self.setup.shared.set(ModelStatus::Idle);
        }
    }

    /// Status reads idle as soon as the last queued request is answered.
    fn idle_if_done(&self) {
        if self.queue.is_empty() {
            self.setup.shared.set(ModelStatus::Idle);
        }
    }

    fn fail(&mut self, a: Active, e: EngineError) {
        // The sequence may be half-written: start the next request clean.
        self.ctx.clear();
        (self.setup.on_done)(a.sub.id);
        self.publish_live();
        self.idle_if_done();
        let _ = a.sub.events.send(Event::Done(Err(e)));
    }

    /// Admission: sampling setup, cache lookup and restore.
    fn admit(&mut self, sub: Box<Submission>) -> Option<Active> {
        self.setup.shared.set(ModelStatus::Prefilling);
        let admitted = Instant::now();
        let mut stats = RequestStats {
            prompt_tokens: sub.tokens.len(),
            completion_tokens: 0,
            prefill_ms: 0.0,
            generation_ms: 0.0,
            restore_ms: 0.0,
            cache_hit_kind: HitKind::Cold,
            hit_source: None,
            cached_tokens: 0,
            cache_tier: None,
            finish_reason: FinishReason::Stop,
            cancelled: false,
            queue_ms: ms(admitted.duration_since(sub.submitted)),
            restore_failure: None,
        };
        let text = TextStream::new(sub.options.stop.clone());
        let mut a = Active {
            sub,
            prefill_at: 0,
            cold_at: None,
            generated: Vec::new(),
            text,
            stats: stats.clone(),
            admitted,
            gen_started: None,
            last_saved_at: 0,
        };
        if a.sub.cancel.load(Ordering::Relaxed) {
            self.finish(a, FinishReason::Cancelled);
            return None;
        }
        if let Err(e) = self.ctx.set_sampling(&a.sub.options.sampling) {
            self.fail(a, e.into());
            return None;
        }
        self.ctx.set_interrupt(Some(Arc::clone(&a.sub.cancel)));
        self.ctx.clear();
        let restore_started = Instant::now();
        let restored = if self.cacheable {
            self.restore(
                &a.sub.tokens,
                a.sub.options.parent_key.as_ref(),
                &mut stats.restore_failure,
            )
        } else {
            None
        };
        let n = a.sub.tokens.len();
        match restored {
            Some((len, source, tier)) => {
                stats.cache_hit_kind = if len == n {
                    HitKind::Exact
                } else {
                    HitKind::Partial
                };
                stats.hit_source = Some(source);
                stats.cached_tokens = len;
                stats.cache_tier = Some(tier);
                stats.restore_ms = ms(restore_started.elapsed());
                a.prefill_at = len;
                a.last_saved_at = len;
                if len == n {
                    // Logits are needed: drop the last cell and re-feed it.
                    if let Err(e) = self.ctx.remove_last() {
                        self.fail(a, e.into());
                        return None;
                    }
                    a.prefill_at = n - 1;
                }
            }
            None if !self.cacheable => {}
            None => {
                self.counters().incr(Counter::Misses);
                a.cold_at = cold_save_split(&a.sub.tokens, self.policy()).map(|(p, _)| p.len());
            }
        }
        a.stats = stats;
        Some(a)
    }

    /// The lookup order of docs/policy.md; restores a hit into the cleared
    /// sequence. Returns (tokens restored, source, tier). A row that is
    /// found but fails to restore is removed, counted, logged and reported
    /// in `failure`, and the next lookup is tried.
    fn restore(
        &mut self,
        tokens: &[u32],
        parent: Option<&CacheKey>,
        failure: &mut Option<RestoreFailure>,
    ) -> Option<(usize, HitSource, TierKind)> {
        let cache = self.cache().clone();
        let identity = Arc::clone(&self.identity);
        let key = identity.key(tokens);
        if let Lookup::Hit(claim) = cache.lookup(&key) {
            if let Some(r) = self.unpack(claim, HitSource::Exact, failure) {
                self.counters().incr(Counter::HitsExact);
                return Some(r);
            }
        }
        if let Some(parent) = parent {
            let wait = Duration::from_millis(self.policy().session_resume_wait_ms);
            if let Lookup::Hit(claim) = cache.lookup_wait(parent, wait) {
                let len = claim.tokens().len();
                if len <= tokens.len() && claim.tokens() == &tokens[..len] {
                    if let Some(r) = self.unpack(claim, HitSource::Resume, failure) {
                        self.counters().incr(Counter::HitsResume);
                        return Some(r);
                    }
                }
            }
        }
        if let PrefixLookup::Hit { claim, .. } =
            cache.longest_prefix(&identity.hasher(), tokens, self.policy())
        {
            if let Some(r) = self.unpack(claim, HitSource::LongestPrefix, failure) {
                self.counters().incr(Counter::HitsLongestPrefix);
                return Some(r);
            }
        }
        None
    }

    /// Loads and unpacks a claimed row (the claim is released on return);
    /// any failure is a miss and leaves the sequence empty. A row that
    /// cannot be restored is never tried again: a corrupt file is deleted
    /// by the load (and counted in `corrupt_files`), a state the backend
    /// refuses is removed here and counted in `restore_failures`.
    fn unpack(
        &mut self,
        claim: Claim,
        source: HitSource,
        failure: &mut Option<RestoreFailure>,
    ) -> Option<(usize, HitSource, TierKind)> {
        if claim.tokens().is_empty() {
            return None;
        }
        let fail = |failure: &mut Option<RestoreFailure>, reason: String| {
            *failure = Some(RestoreFailure { source, reason });
        };
        let payload = match claim.load() {
            Ok(p) => p,
            Err(erllama_cache::LoadError::Missing { .. }) => return None,
            Err(e) => {
                if !matches!(e, erllama_cache::LoadError::Corrupt { .. }) {
                    self.counters().incr(Counter::RestoreFailures);
                }
                tracing::warn!(
                    model = %self.setup.model_id,
                    key = %claim.key().to_hex(),
                    source = source.label(),
                    error = %e,
                    "a cached row could not be read; falling back"
                );
                fail(failure, format!("reading the row failed: {e}"));
                return None;
            }
        };
        if payload.is_empty() {
            return None;
        }
        match self.ctx.kv_unpack(&payload, claim.tokens()) {
            Ok(()) => Some((claim.tokens().len(), source, claim.tier())),
            Err(e) => {
                self.counters().incr(Counter::RestoreFailures);
                tracing::warn!(
                    model = %self.setup.model_id,
                    key = %claim.key().to_hex(),
                    source = source.label(),
                    tier = claim.tier().label(),
                    error = %e,
                    "a cached state failed to restore; the row is removed and the request falls back"
                );
                fail(failure, e.to_string());
                self.ctx.clear();
                claim.invalidate();
                None
            }
        }
    }

    /// One unit of work; `Some(reason)` when the request is done.
    fn step(&mut self, a: &mut Active) -> Result<Option<FinishReason>, EngineError> {
        if a.sub.cancel.load(Ordering::Relaxed) {
            return Ok(Some(FinishReason::Cancelled));
        }
        let n = a.sub.tokens.len();
        if a.prefill_at < n {
            self.setup.shared.set(ModelStatus::Prefilling);
            // Chunks end at absolute multiples of n_batch, whatever was
            // restored: a warm run then computes every remaining token in
            // the same batch shape as the cold run did, so the logits are
            // bit-identical and a cache hit never changes the output.
            let batch = self.setup.config.context.n_batch.max(1);
            let mut end = ((a.prefill_at / batch + 1) * batch).min(n);
            if let Some(cold) = a.cold_at {
                if a.prefill_at < cold && end > cold {
                    end = cold;
                }
            }
            self.ctx.prefill(&a.sub.tokens[a.prefill_at..end])?;
            a.prefill_at = end;
            if a.cold_at == Some(end) {
                a.cold_at = None;
                self.save_async(SaveReason::Cold, &a.sub.prompt_text);
                a.last_saved_at = end;
            }
            if a.prefill_at == n {
                // The sequence holds exactly the prompt: save it under the
                // prompt's own key too, so a repeated prompt is an exact
                // hit (the aligned cold save and the finish save cover
                // prefixes and continuations, never the prompt itself).
                let policy = self.policy();
                if a.stats.cache_hit_kind != HitKind::Exact
                    && (policy.cold_min_tokens..=policy.cold_max_tokens).contains(&n)
                {
                    self.save_async(SaveReason::Cold, &a.sub.prompt_text);
                    a.last_saved_at = n;
                }
                a.stats.prefill_ms = ms(a.admitted.elapsed());
                a.gen_started = Some(Instant::now());
            }
            return Ok(None);
        }
        self.setup.shared.set(ModelStatus::Generating);
        if a.generated.len() >= a.sub.options.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        let token = match self.ctx.decode_one() {
            Ok(t) => t,
            // A cancel observed inside a long step (grammar sampling).
            Err(crate::backend::BackendError::Cancelled) => {
                return Ok(Some(FinishReason::Cancelled))
            }
            Err(e) => return Err(e.into()),
        };
        if self.ctx.is_eog(token)? {
            return Ok(Some(FinishReason::Stop));
        }
        a.generated.push(token);
        let bytes = self.setup.backend.token_bytes(token)?;
        let (piece, stopped) = a.text.push(&bytes);
        let _ = a.sub.events.send(Event::Token {
            id: token,
            text: piece,
        });
        let live = self.ctx.tokens().len();
        if should_continued_save(live, a.last_saved_at, self.policy()) {
            self.save_async(SaveReason::Continued, &a.sub.prompt_text);
            a.last_saved_at = live;
        }
        if stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if a.generated.len() >= a.sub.options.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn finish(&mut self, mut a: Active, reason: FinishReason) {
        let tail = a.text.finish();
        if !tail.is_empty() {
            let _ = a.sub.events.send(Event::Token {
                id: u32::MAX,
                text: tail,
            });
        }
        if let Some(started) = a.gen_started {
            a.stats.generation_ms = ms(started.elapsed());
        } else if a.stats.prefill_ms == 0.0 {
            a.stats.prefill_ms = ms(a.admitted.elapsed());
        }
        a.stats.completion_tokens = a.generated.len();
        a.stats.finish_reason = reason;
        a.stats.cancelled = reason == FinishReason::Cancelled;
        // A finish save, also for a cancelled request; only a sequence
        // that holds the whole prompt is worth saving.
        let live = self.ctx.tokens().len();
        let finish_key = if live >= a.sub.tokens.len() && should_finish_save(live, self.policy()) {
            self.save_async(SaveReason::Finish, &a.sub.prompt_text)
        } else {
            None
        };
        let completion = Completion {
            request_id: a.sub.id,
            text: a.text.text().to_owned(),
            tokens: std::mem::take(&mut a.generated),
            stats: a.stats,
            finish_key,
        };
        (self.setup.on_done)(a.sub.id);
        self.publish_live();
        self.idle_if_done();
        let _ = a.sub.events.send(Event::Done(Ok(completion)));
    }

    /// Packs the live context and reserves its key; the write runs on
    /// another thread. Returns the key when the row is (or will be) stored.
    fn save_async(&mut self, reason: SaveReason, prompt_text: &str) -> Option<CacheKey> {
        match self.begin_save(reason, prompt_text) {
            Ok(Begun::Pending(pending, key)) => {
                let spawned = std::thread::Builder::new()
                    .name("erllama-save".into())
                    .spawn(move || {
                        if let Err(e) = pending.run() {
                            tracing::warn!(error = %e, "cache save failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a save thread");
                    return None;
                }
                Some(key)
            }
            Ok(Begun::Present(key)) => Some(key),
            Ok(Begun::Empty) => None,
            Err(e) => {
                tracing::debug!(error = %e, reason = reason.label(), "save skipped");
                None
            }
        }
    }

    /// An evict or shutdown save: waits for the write, bounded by
    /// `evict_save_timeout_ms`. A no-op on an empty context.
    fn save_blocking(&mut self, reason: SaveReason) -> Result<Option<SaveSummary>, EngineError> {
        let tokens = self.ctx.tokens().len();
        match self.begin_save(reason, "")? {
            Begun::Empty => Ok(None),
            Begun::Present(key) => Ok(Some(SaveSummary {
                key,
                tokens,
                already_present: true,
            })),
            Begun::Pending(pending, key) => {
                let timeout_ms = self.policy().evict_save_timeout_ms;
                let (tx, rx) = std_mpsc::channel();
                std::thread::Builder::new()
                    .name("erllama-save".into())
                    .spawn(move || {
                        let _ = tx.send(pending.run());
                    })
                    .map_err(|e| EngineError::Cache(format!("cannot start a save thread: {e}")))?;
                match rx.recv_timeout(Duration::from_millis(timeout_ms)) {
                    Ok(Ok(_)) => Ok(Some(SaveSummary {
                        key,
                        tokens,
                        already_present: false,
                    })),
                    Ok(Err(e)) => Err(EngineError::Cache(e.to_string())),
                    Err(_) => Err(EngineError::SaveTimeout(reason.label(), timeout_ms)),
                }
            }
        }
    }

    fn begin_save(&mut self, reason: SaveReason, prompt_text: &str) -> Result<Begun, EngineError> {
        let tokens = self.ctx.tokens();
        if tokens.is_empty() || !self.cacheable {
            return Ok(Begun::Empty);
        }
        let key = self.identity.key(tokens);
        if self.cache().contains(&key) {
            self.counters().incr(Counter::DuplicateDropped);
            return Ok(Begun::Present(key));
        }
        let payload = {
            let _t = self.counters().time(Counter::PackTotalNs);
            self.ctx.kv_pack()?
        };
        let request = SaveRequest {
            identity: Arc::clone(&self.identity),
            tier: self.setup.config.tier,
            tokens: tokens.into(),
            payload,
            reason,
            prompt_text: truncate_chars(prompt_text, 512),
            detail: None,
        };
        match self.cache().begin_save(request) {
            Ok(pending) => Ok(Begun::Pending(pending, key)),
            Err(SaveError::AlreadyPresent(_) | SaveError::Conflict(_)) => Ok(Begun::Present(key)),
            Err(e) => Err(EngineError::Cache(e.to_string())),
        }
    }
}

enum Begun {
    Empty,
    Present(CacheKey),
    Pending(erllama_cache::PendingSave, CacheKey),
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}
