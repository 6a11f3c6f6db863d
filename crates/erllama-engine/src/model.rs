//! The per-model actor: a batch scheduler over one context of `n_seq`
//! sequences that share one KV cache.
//!
//! One dedicated thread owns the context (llama.cpp's is `!Send`). Each turn
//! of its loop builds one batch — one token for every generating sequence
//! plus at most one prefill piece (chunked prefill: a long prompt never
//! stalls the others' decoding) — runs it, samples every sequence that got
//! logits, and then drains the mailbox, so cancels, evicts and new requests
//! interleave between steps. Requests are admitted in FIFO order while a
//! sequence and enough KV cells are free (a request reserves its prompt plus
//! `max_tokens` cells; a copied prefix costs none); a request that cannot
//! fit even alone was refused at submission.
//!
//! Where a prompt's prefix comes from, best first: another sequence of the
//! context (a running one, one still prefilling it — the newcomer waits for
//! those chunks and copies them — or a finished one kept warm) whose cells
//! are shared without recomputing or restoring anything; the cache (exact
//! key, `parent_key`, longest prefix), restored into the cleared sequence;
//! the remote tier, asked on a thread of its own while the other sequences
//! go on (the request waits in `Phase::Fetching`); or nothing (cold).
//!
//! Exactness: a prompt is prefilled in chunks that end at multiples of
//! `n_batch` counted from position 0, with its last token decoded on its
//! own, so the state after a prompt is a function of its tokens alone; a
//! shared or restored prefix is one that such a prefill produces. A sampled
//! token is fed only when the next token is wanted.
//!
//! Cache wiring (docs/policy.md): a cold prompt is saved at its aligned
//! chunk boundary and whole; continued saves every `continued_interval`
//! generated tokens (counted from the end of the prompt); a finish save at
//! the end. Saves pack on this thread (the only part on the request path)
//! and write on another; `evict` and `shutdown` saves wait for the write.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use erllama_cache::{
    cold_save_split, effective_fingerprint, longest_prefix_probes, should_continued_save,
    should_finish_save, Cache, CacheKey, Claim, Counter, Lookup, ModelIdentity, PolicyConfig,
    PrefixLookup, SaveError, SaveReason, SaveRequest, TierKind,
};
use tokio::sync::{mpsc, oneshot};

use crate::backend::{
    AdapterHandle, Backend, BackendContext, BackendError, BatchItem, ContextParams, KvCells,
    PrefixReuse, SeqId, StateSupport,
};
use crate::cells::CellLedger;
use crate::request::{
    Completion, EngineError, Event, FinishReason, HitKind, HitSource, PromptUsage, RequestId,
    RequestOptions, RequestStats, RestoreFailure,
};
use crate::text::TextStream;

/// Domain separation of [`Actor::identity_for`]'s salted context hash.
const SPLIT_SALT: u8 = 0xB7;

/// Mailbox depth of a model actor.
const MAILBOX: usize = 1024;

/// A model's state as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStatus {
    /// No request running.
    Idle,
    /// Restoring or prefilling a prompt (possibly while others generate).
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
    /// Context options (`n_seq` is the parallelism).
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

/// A request on its way to the actor (prepared: tokenized and checked).
pub(crate) struct Submission {
    pub(crate) id: RequestId,
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_text: String,
    pub(crate) options: RequestOptions,
    pub(crate) cancel: Arc<std::sync::atomic::AtomicBool>,
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

/// A LoRA adapter loaded on a model (see `Engine::load_adapter`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// Its id (given, or `adapter_<N>`).
    pub id: String,
    /// The adapter file.
    pub path: std::path::PathBuf,
    /// SHA-256 of the file (hex).
    pub sha256: String,
    /// The scale it is applied with (0 = loaded but inactive).
    pub scale: f32,
}

/// A loaded adapter: its description and the backend's handle.
pub(crate) struct Adapter {
    pub(crate) info: AdapterInfo,
    pub(crate) handle: AdapterHandle,
}

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// The actor's commands. Built only by [`ModelHandle`].
enum Command {
    Submit(Box<Submission>),
    /// Save every sequence with content (reason evict) and free them, once
    /// no request runs.
    Evict(Reply<Vec<SaveSummary>>),
    /// Save every sequence with content now (reason shutdown), keep them.
    SaveNow(Reply<Vec<SaveSummary>>),
    /// Cancel everything, save (reason shutdown) and stop.
    Stop(Reply<Vec<SaveSummary>>),
    /// Adapter changes, applied once no request runs.
    Adapters(AdapterCommand),
}

enum AdapterCommand {
    Add(Adapter, Reply<AdapterInfo>),
    Scale(String, f32, Reply<AdapterInfo>),
    Remove(String, Reply<()>),
    List(Reply<Vec<AdapterInfo>>),
}

/// What a model's sequences hold now (published after every step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Occupancy {
    pub(crate) running: usize,
    pub(crate) queued: usize,
    pub(crate) warm: usize,
    pub(crate) cells: usize,
}

/// Shared between the handle and the actor.
#[derive(Debug)]
pub(crate) struct Shared {
    status: AtomicU8,
    /// KV cells in use (for the scheduler's idle-model evict).
    pub(crate) live_tokens: AtomicUsize,
    occupancy: Mutex<Occupancy>,
    stop_reason: Mutex<Option<String>>,
    /// Whether the context's state can be cached (set once it exists).
    pub(crate) state_support: OnceLock<StateSupport>,
}

impl Shared {
    fn new() -> Self {
        Self {
            status: AtomicU8::new(ModelStatus::Prefilling as u8),
            live_tokens: AtomicUsize::new(0),
            occupancy: Mutex::new(Occupancy::default()),
            stop_reason: Mutex::new(None),
            state_support: OnceLock::new(),
        }
    }

    pub(crate) fn status(&self) -> ModelStatus {
        ModelStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    pub(crate) fn occupancy(&self) -> Occupancy {
        *self
            .occupancy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, s: ModelStatus) {
        self.status.store(s as u8, Ordering::Release);
    }
}

/// The cloneable handle of one model's actor: the mailbox protocol lives
/// here (commands are built in one place), and a full mailbox is back
/// pressure ([`EngineError::Busy`]), never "model gone".
#[derive(Clone)]
pub(crate) struct ModelHandle {
    id: String,
    tx: mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl ModelHandle {
    fn gone(&self) -> EngineError {
        let why = self
            .shared
            .stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the model task stopped".into());
        EngineError::ModelGone(self.id.clone(), why)
    }

    /// Queues a prepared request. On failure the submission comes back
    /// with the reason (its stream is still the caller's to answer).
    pub(crate) fn submit(
        &self,
        sub: Box<Submission>,
    ) -> Result<(), (EngineError, Box<Submission>)> {
        match self.tx.try_send(Command::Submit(sub)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Command::Submit(sub))) => {
                Err((EngineError::Busy(self.id.clone()), sub))
            }
            Err(mpsc::error::TrySendError::Closed(Command::Submit(sub))) => Err((self.gone(), sub)),
            Err(_) => unreachable!("a Submit command comes back as sent"),
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(make(tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(EngineError::Busy(self.id.clone()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.gone()),
        }
        rx.await.map_err(|_| self.gone())?
    }

    pub(crate) async fn evict(&self) -> Result<Vec<SaveSummary>, EngineError> {
        self.ask(Command::Evict).await
    }

    pub(crate) async fn save_now(&self) -> Result<Vec<SaveSummary>, EngineError> {
        self.ask(Command::SaveNow).await
    }

    /// Stops the actor (a stopped actor answers `Ok(vec![])`).
    pub(crate) async fn stop(&self) -> Result<Vec<SaveSummary>, EngineError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Stop(tx)).await.is_err() {
            return Ok(Vec::new());
        }
        rx.await.unwrap_or(Ok(Vec::new()))
    }

    pub(crate) async fn add_adapter(&self, adapter: Adapter) -> Result<AdapterInfo, EngineError> {
        self.ask(|r| Command::Adapters(AdapterCommand::Add(adapter, r)))
            .await
    }

    pub(crate) async fn set_adapter_scale(
        &self,
        id: &str,
        scale: f32,
    ) -> Result<AdapterInfo, EngineError> {
        let id = id.to_owned();
        self.ask(|r| Command::Adapters(AdapterCommand::Scale(id, scale, r)))
            .await
    }

    pub(crate) async fn remove_adapter(&self, id: &str) -> Result<(), EngineError> {
        let id = id.to_owned();
        self.ask(|r| Command::Adapters(AdapterCommand::Remove(id, r)))
            .await
    }

    pub(crate) async fn adapters(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        self.ask(|r| Command::Adapters(AdapterCommand::List(r)))
            .await
    }
}

pub(crate) struct ActorSetup {
    pub(crate) model_id: String,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: ModelConfig,
    pub(crate) identity: Arc<ModelIdentity>,
    pub(crate) cache: Cache,
    /// Called once if the task panics.
    pub(crate) on_crash: Arc<dyn Fn() + Send + Sync>,
}

/// Starts the actor thread; the receiver resolves once the context
/// exists.
pub(crate) fn spawn(
    setup: ActorSetup,
) -> Result<(ModelHandle, oneshot::Receiver<Result<(), EngineError>>), EngineError> {
    let (tx, rx) = mpsc::channel(MAILBOX);
    let shared = Arc::new(Shared::new());
    let handle = ModelHandle {
        id: setup.model_id.clone(),
        tx,
        shared: Arc::clone(&shared),
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let name = format!("erllama-model-{}", setup.model_id);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run(setup, rx, ready_tx, shared))
        .map_err(|e| EngineError::Backend(format!("cannot start the model thread: {e}")))?;
    Ok((handle, ready_rx))
}

fn run(
    setup: ActorSetup,
    mut rx: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), EngineError>>,
    shared: Arc<Shared>,
) {
    let ctx = match catch_unwind(AssertUnwindSafe(|| {
        setup.backend.new_context(&setup.config.context)
    })) {
        Ok(Ok(ctx)) => ctx,
        Ok(Err(e)) => {
            let _ = ready.send(Err(EngineError::from(e)));
            shared.set(ModelStatus::Stopped);
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(EngineError::ModelLoad(
                "the backend panicked while creating its context".into(),
            )));
            shared.set(ModelStatus::Stopped);
            return;
        }
    };
    let support = ctx.state_support();
    if let Some(reason) = &support.reason {
        tracing::warn!(
            model = %setup.model_id,
            memory = %support.memory,
            %reason,
            "this model's state is not cacheable: no lookups, no saves"
        );
    }
    let cacheable = support.cacheable;
    let reuse = support.reuse;
    let _ = shared.state_support.set(support);
    let n_seq = ctx.n_seq();
    let kv_cells = ctx.kv_cells();
    let on_crash = Arc::clone(&setup.on_crash);
    let model_id = setup.model_id.clone();
    let mut actor = Actor {
        base: Arc::clone(&setup.identity),
        identity: Arc::clone(&setup.identity),
        cacheable,
        reuse,
        adapters: Vec::new(),
        slots: (0..n_seq).map(|_| Slot::Free).collect(),
        cells: match kv_cells {
            KvCells::Pooled => CellLedger::new(n_seq),
            KvCells::PerSequence => CellLedger::per_sequence(n_seq),
        },
        pooled: kv_cells == KvCells::Pooled,
        queue: VecDeque::new(),
        deferred: Vec::new(),
        tick: 0,
        logits_buf: Vec::new(),
        shared: Arc::clone(&shared),
        setup,
        ctx,
    };
    shared.set(ModelStatus::Idle);
    let _ = ready.send(Ok(()));
    let served = catch_unwind(AssertUnwindSafe(|| serve(&mut actor, &mut rx)));
    if served.is_err() {
        // Before the actor (and with it its requests' event senders) is
        // dropped, so a request that sees its stream close sees the model
        // stopped.
        shared.set(ModelStatus::Stopped);
        tracing::error!(model = %model_id, "model task panicked; its requests fail");
        *shared
            .stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some("the model task crashed".into());
        on_crash();
    }
    shared.set(ModelStatus::Stopped);
}

/// The actor loop; returns when the model is stopped or every handle is
/// gone.
fn serve(actor: &mut Actor, rx: &mut mpsc::Receiver<Command>) {
    loop {
        if actor.is_idle() && actor.queue.is_empty() {
            actor.run_deferred();
            actor.publish();
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
                    if actor.is_idle() && actor.queue.is_empty() {
                        actor.stop(None);
                        return;
                    }
                    break;
                }
            }
        }
        actor.step();
        actor.publish();
        if actor.only_fetching() {
            // Nothing to compute until a remote lookup ends, a command
            // arrives or a request is cancelled: look again shortly rather
            // than spin.
            std::thread::sleep(FETCH_POLL);
        }
    }
}

/// How often the model's thread looks for the end of a remote lookup while
/// nothing else can run.
const FETCH_POLL: Duration = Duration::from_millis(1);

/// What a sequence of the context is doing.
enum Slot {
    /// Empty.
    Free,
    /// Holds a finished request's tokens (its prompt, then output), kept
    /// for sharing until its cells are needed (least recently used first).
    Warm {
        last_used: u64,
        prompt_len: usize,
        /// The breakpoints its cells were computed with.
        splits: Arc<[usize]>,
    },
    /// Serves a request.
    Busy(Box<Active>),
}

/// Where a running request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `src` to prefill its first `len` tokens, which it will
    /// then share.
    Waiting { src: SeqId, len: usize },
    /// Waiting for its remote lookup, which runs on a thread of its own
    /// (`Active::fetch`) so that the other sequences go on meanwhile.
    Fetching,
    /// Prefilling the prompt from `prefill_at`.
    Prefilling,
    /// Generating.
    Generating,
}

/// One request being served on a sequence.
struct Active {
    sub: Box<Submission>,
    phase: Phase,
    /// Prompt tokens in the sequence so far.
    prefill_at: usize,
    /// Cold-save boundary in prompt tokens, if a cold save is due.
    cold_at: Option<usize>,
    /// Whether the prompt's own row is due when prefill ends.
    save_prompt: bool,
    /// A sampled token not yet fed to the sequence.
    pending: Option<u32>,
    generated: Vec<u32>,
    text: TextStream,
    stats: RequestStats,
    admitted: Instant,
    gen_started: Option<Instant>,
    last_saved_at: usize,
    /// Its breakpoints' token counts: its prefill pieces end there
    /// (docs/policy.md, breakpoints).
    splits: Arc<[usize]>,
    /// Its remote lookup, while it runs (`Phase::Fetching`).
    fetch: Option<PendingFetch>,
}

/// A remote lookup running on a thread of its own: the row it found
/// (stored in the model's tier and claimed) or none.
struct PendingFetch {
    result: std_mpsc::Receiver<Option<Claim>>,
    /// When the request's lookups began (its `restore_ms` counts from here).
    started: Instant,
}

impl Active {
    fn prompt(&self) -> &[u32] {
        &self.sub.tokens
    }

    /// Cells this request may still add (prompt left, then generation).
    fn future_cells(&self, len: usize) -> usize {
        (self.sub.tokens.len() + self.sub.options.max_tokens).saturating_sub(len)
    }
}

enum Deferred {
    Evict(Reply<Vec<SaveSummary>>),
    Adapters(AdapterCommand),
}

struct Actor {
    setup: ActorSetup,
    shared: Arc<Shared>,
    /// The identity without adapters.
    base: Arc<ModelIdentity>,
    /// The identity the context computes under now (adapters applied).
    /// Changes only when no request runs, so a request keeps the identity
    /// it was admitted with.
    identity: Arc<ModelIdentity>,
    adapters: Vec<Adapter>,
    /// Whether the context's state can be cached; when not, no lookup and
    /// no save ever happens.
    cacheable: bool,
    /// Which prefixes of a sequence can be kept or shared.
    reuse: PrefixReuse,
    ctx: Box<dyn BackendContext>,
    slots: Vec<Slot>,
    cells: CellLedger,
    /// The sequences draw on one pool of `n_ctx` cells
    /// ([`KvCells::Pooled`]); otherwise each has `n_ctx` of its own and a
    /// request never waits for cells.
    pooled: bool,
    queue: VecDeque<Box<Submission>>,
    /// Evicts and adapter changes waiting for no request to run.
    deferred: Vec<Deferred>,
    /// LRU clock of warm sequences.
    tick: u64,
    /// Stored logits being installed (kept between restores).
    logits_buf: Vec<f32>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The length of the common prefix of `a` and `b`.
/// The largest breakpoint both sequences have, within their `common`
/// tokens and short of a `prompt_len`-token prompt's end (0: none): a piece
/// ends there in both, so the state before it is the same.
fn common_split(src: &[usize], req: &[usize], common: usize, prompt_len: usize) -> usize {
    req.iter()
        .copied()
        .filter(|&b| b <= common && b < prompt_len && src.contains(&b))
        .max()
        .unwrap_or(0)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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

    fn n_ctx(&self) -> usize {
        self.setup.config.context.n_ctx
    }

    fn n_batch(&self) -> usize {
        self.setup.config.context.n_batch.max(1)
    }

    fn is_idle(&self) -> bool {
        !self.slots.iter().any(|s| matches!(s, Slot::Busy(_)))
    }

    /// Whether every running request waits for a remote lookup (its own,
    /// or the one of the sequence it will share), so a step computes
    /// nothing.
    fn only_fetching(&self) -> bool {
        let mut fetching = false;
        for slot in &self.slots {
            if let Slot::Busy(a) = slot {
                match a.phase {
                    Phase::Fetching => fetching = true,
                    Phase::Waiting { .. } => {}
                    Phase::Prefilling | Phase::Generating => return false,
                }
            }
        }
        fetching
    }

    fn active(&self, seq: SeqId) -> Option<&Active> {
        match &self.slots[seq] {
            Slot::Busy(a) => Some(a),
            _ => None,
        }
    }

    fn publish(&self) {
        self.shared
            .live_tokens
            .store(self.cells.used(), Ordering::Relaxed);
        let occupancy = Occupancy {
            running: self
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Busy(_)))
                .count(),
            queued: self.queue.len(),
            warm: self
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Warm { .. }))
                .count(),
            cells: self.cells.used(),
        };
        *self
            .shared
            .occupancy
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = occupancy;
        let mut status = ModelStatus::Idle;
        for slot in &self.slots {
            if let Slot::Busy(a) = slot {
                status = match a.phase {
                    Phase::Generating if status == ModelStatus::Idle => ModelStatus::Generating,
                    Phase::Generating => status,
                    _ => ModelStatus::Prefilling,
                };
            }
        }
        if status == ModelStatus::Idle && !self.queue.is_empty() {
            status = ModelStatus::Prefilling;
        }
        self.shared.set(status);
    }

    /// Handles a command; true when the actor must exit.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(sub) => self.queue.push_back(sub),
            Command::Evict(reply) => {
                if self.is_idle() {
                    let r = self.evict_all();
                    let _ = reply.send(r);
                } else {
                    self.deferred.push(Deferred::Evict(reply));
                }
            }
            Command::SaveNow(reply) => {
                let r = self.save_all(SaveReason::Shutdown, false);
                let _ = reply.send(r);
            }
            Command::Stop(reply) => {
                self.stop(Some(reply));
                return true;
            }
            Command::Adapters(AdapterCommand::List(reply)) => {
                let _ = reply.send(Ok(self.adapters.iter().map(|a| a.info.clone()).collect()));
            }
            Command::Adapters(change) => {
                if self.is_idle() {
                    self.adapter_change(change);
                } else {
                    self.deferred.push(Deferred::Adapters(change));
                }
            }
        }
        false
    }

    fn run_deferred(&mut self) {
        if !self.is_idle() {
            return;
        }
        for d in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Evict(reply) => {
                    let r = self.evict_all();
                    let _ = reply.send(r);
                }
                Deferred::Adapters(change) => self.adapter_change(change),
            }
        }
    }

    // --- adapters (the actor owns the set) ---

    fn adapter_change(&mut self, change: AdapterCommand) {
        match change {
            AdapterCommand::Add(adapter, reply) => {
                let info = adapter.info.clone();
                if self.adapters.iter().any(|a| a.info.id == info.id) {
                    let _ = reply.send(Err(EngineError::AlreadyLoaded(format!(
                        "adapter {}",
                        info.id
                    ))));
                    return;
                }
                self.adapters.push(adapter);
                let r = self.apply_adapters().map(|()| info);
                if r.is_err() {
                    self.adapters.pop();
                    let _ = self.apply_adapters();
                }
                let _ = reply.send(r);
            }
            AdapterCommand::Scale(id, scale, reply) => {
                let Some(i) = self.adapters.iter().position(|a| a.info.id == id) else {
                    let _ = reply.send(Err(EngineError::NotFound(format!("adapter {id}"))));
                    return;
                };
                let old = std::mem::replace(&mut self.adapters[i].info.scale, scale);
                let r = self
                    .apply_adapters()
                    .map(|()| self.adapters[i].info.clone());
                if r.is_err() {
                    self.adapters[i].info.scale = old;
                    let _ = self.apply_adapters();
                }
                let _ = reply.send(r);
            }
            AdapterCommand::Remove(id, reply) => {
                let Some(i) = self.adapters.iter().position(|a| a.info.id == id) else {
                    let _ = reply.send(Err(EngineError::NotFound(format!("adapter {id}"))));
                    return;
                };
                let removed = self.adapters.remove(i);
                let r = self.apply_adapters();
                if r.is_err() {
                    self.adapters.insert(i, removed);
                    let _ = self.apply_adapters();
                }
                let _ = reply.send(r);
            }
            AdapterCommand::List(reply) => {
                let _ = reply.send(Ok(self.adapters.iter().map(|a| a.info.clone()).collect()));
            }
        }
    }

    /// Applies the adapter set under the effective fingerprint it gives;
    /// every sequence is cleared (KV of other weights is never reused).
    fn apply_adapters(&mut self) -> Result<(), EngineError> {
        let active: Vec<&Adapter> = self
            .adapters
            .iter()
            .filter(|a| a.info.scale != 0.0)
            .collect();
        let pairs: Vec<([u8; 32], f64)> = active
            .iter()
            .map(|a| {
                let sha = CacheKey::from_hex(&a.info.sha256)
                    .map(|k| k.0)
                    .unwrap_or([0; 32]);
                (sha, f64::from(a.info.scale))
            })
            .collect();
        let fingerprint = effective_fingerprint(&self.base.fingerprint, &pairs)
            .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        let handles: Vec<(AdapterHandle, f32)> = active
            .iter()
            .map(|a| (Arc::clone(&a.handle), a.info.scale))
            .collect();
        let result = self.ctx.set_adapters(&handles).map_err(EngineError::from);
        for seq in 0..self.slots.len() {
            self.free(seq);
        }
        if result.is_ok() {
            self.identity = Arc::new(ModelIdentity {
                fingerprint,
                ..(*self.base).clone()
            });
        }
        // Before the caller hears back: whoever awaited the change reads
        // the freed sequences in `info()`.
        self.publish();
        result
    }

    // --- sequences ---

    fn free(&mut self, seq: SeqId) {
        self.ctx.clear(seq);
        self.cells.clear(seq);
        self.slots[seq] = Slot::Free;
    }

    /// Cells the running requests may still add.
    fn reserved(&self) -> usize {
        (0..self.slots.len())
            .filter_map(|s| self.active(s).map(|a| a.future_cells(self.cells.len(s))))
            .sum()
    }

    /// Frees the least recently used warm sequence not in `keep`; false
    /// when there is none.
    fn evict_warm(&mut self, keep: &[SeqId]) -> bool {
        let victim = (0..self.slots.len())
            .filter(|s| !keep.contains(s))
            .filter_map(|s| match self.slots[s] {
                Slot::Warm { last_used, .. } => Some((last_used, s)),
                _ => None,
            })
            .min();
        match victim {
            Some((_, s)) => {
                self.free(s);
                true
            }
            None => false,
        }
    }

    /// The prompt length of what `seq` holds (its request's, running or
    /// finished).
    fn prompt_len(&self, seq: SeqId) -> usize {
        match &self.slots[seq] {
            Slot::Busy(a) => a.prompt().len(),
            Slot::Warm { prompt_len, .. } => *prompt_len,
            Slot::Free => 0,
        }
    }

    /// The breakpoints `seq`'s cells were (or are being) computed with.
    fn splits(&self, seq: SeqId) -> &[usize] {
        match &self.slots[seq] {
            Slot::Busy(a) => &a.splits,
            Slot::Warm { splits, .. } => splits,
            Slot::Free => &[],
        }
    }

    /// How much of a sequence computed with `splits` is what a prefill
    /// without breakpoints computes too: the whole `n_batch` chunks before
    /// the first breakpoint's piece (everything, without breakpoints).
    fn split_cap(&self, splits: &[usize]) -> usize {
        splits
            .first()
            .map_or(usize::MAX, |&b| (b - 1) / self.n_batch() * self.n_batch())
    }

    /// How far two sequences computed with the breakpoints `a` and `b`
    /// hold the same state (as far as their tokens agree): up to the first
    /// breakpoint one has and the other not — but the piece that ends
    /// there was cut differently, so only up to that piece's start: the
    /// last common breakpoint or the last whole chunk before it.
    fn split_limit(&self, a: &[usize], b: &[usize]) -> usize {
        let mut last_common = 0;
        for i in 0.. {
            match (a.get(i), b.get(i)) {
                (Some(x), Some(y)) if x == y => last_common = *x,
                (None, None) => return usize::MAX,
                (x, y) => {
                    let first = (*x.unwrap_or(&usize::MAX)).min(*y.unwrap_or(&usize::MAX));
                    return last_common.max((first - 1) / self.n_batch() * self.n_batch());
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// The identity a row of the first `len` tokens of a sequence computed
    /// with `splits` is keyed under. Pieces that end at a breakpoint
    /// round differently from whole chunks, so a row past a breakpoint
    /// is keyed by its model, its tokens and the breakpoints before its
    /// end (a row at or before the first breakpoint is an ordinary row: a
    /// prompt of those tokens is prefilled the same way).
    fn identity_for(&self, splits: &[usize], len: usize) -> Arc<ModelIdentity> {
        let before: Vec<u32> = splits
            .iter()
            .take_while(|&&b| b < len)
            .map(|&b| u32::try_from(b).unwrap_or(u32::MAX))
            .collect();
        if before.is_empty() {
            return Arc::clone(&self.identity);
        }
        let mut h = erllama_cache::KeyHasher::from_parts(
            &self.identity.ctx_params_hash,
            SPLIT_SALT,
            &[SPLIT_SALT; 32],
        );
        h.update(&before);
        Arc::new(ModelIdentity {
            ctx_params_hash: h.finish().0,
            ..(*self.identity).clone()
        })
    }

    /// How many of `tokens` the sequence `src` can give by sharing its
    /// cells, as a cold prefill of `tokens` would have computed them:
    /// everything it holds when it finished its prompt and `tokens`
    /// continues what it holds (as a `parent_key` resume does); all but
    /// the last token when it ran exactly this prompt (that token is
    /// re-fed); else the whole `n_batch` chunks of its prompt the two have
    /// in common.
    fn shareable(&self, src: SeqId, tokens: &[u32], splits: &[usize]) -> usize {
        let held = self.ctx.tokens(src);
        let prompt_len = self.prompt_len(src);
        let common = common_prefix(held, tokens);
        let n = if held.len() >= prompt_len && common == held.len() && common < tokens.len() {
            common
        } else if common >= tokens.len() && tokens.len() == prompt_len {
            tokens.len() - 1
        } else {
            let chunks = common.min(prompt_len.saturating_sub(1));
            (chunks / self.n_batch() * self.n_batch()).max(common_split(
                self.splits(src),
                splits,
                common,
                tokens.len(),
            ))
        };
        let n = n.min(self.split_limit(self.splits(src), splits));
        if n > 0 && self.reuse.allows(n, held.len()) {
            n
        } else {
            0
        }
    }

    /// A sequence other than `exclude` still prefilling (or fetching) a
    /// prompt that shares at least one whole chunk with `tokens`: (its seq,
    /// the length to wait for).
    fn pending_share(
        &self,
        tokens: &[u32],
        splits: &[usize],
        exclude: SeqId,
    ) -> Option<(SeqId, usize)> {
        if self.reuse == PrefixReuse::Nothing {
            return None;
        }
        (0..self.slots.len())
            .filter(|&s| s != exclude)
            .filter_map(|s| {
                let a = self.active(s)?;
                if !matches!(a.phase, Phase::Prefilling | Phase::Fetching) {
                    return None;
                }
                let common = common_prefix(a.prompt(), tokens);
                let want = if common >= tokens.len() && tokens.len() == a.prompt().len() {
                    tokens.len() - 1
                } else {
                    (common.min(a.prompt().len() - 1) / self.n_batch() * self.n_batch())
                        .max(common_split(&a.splits, splits, common, tokens.len()))
                };
                let want = want.min(self.split_limit(&a.splits, splits));
                (want > self.ctx.tokens(s).len()).then_some((s, want))
            })
            .max_by_key(|&(_, want)| want)
    }

    /// The best sequence to share from now, other than `exclude`: (seq,
    /// tokens).
    fn best_share(
        &self,
        tokens: &[u32],
        exclude: Option<SeqId>,
        splits: &[usize],
    ) -> Option<(SeqId, usize)> {
        (0..self.slots.len())
            .filter(|&s| Some(s) != exclude && !matches!(self.slots[s], Slot::Free))
            .filter(
                |&s| !matches!(self.active(s), Some(a) if matches!(a.phase, Phase::Waiting { .. })),
            )
            .map(|s| (s, self.shareable(s, tokens, splits)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(s, n)| (n, std::cmp::Reverse(s)))
    }

    // --- one step ---

    fn step(&mut self) {
        self.admit();
        self.resolve_fetches();
        self.resolve_waits();
        let mut items: Vec<(SeqId, Vec<u32>, bool)> = Vec::new();
        // Every generating sequence with a sampled token feeds it.
        for seq in 0..self.slots.len() {
            if let Slot::Busy(a) = &mut self.slots[seq] {
                if a.phase == Phase::Generating {
                    if let Some(t) = a.pending.take() {
                        items.push((seq, vec![t], true));
                    }
                }
            }
        }
        // Other requests' last prompt tokens (one each, cheap), and one
        // prefill piece (FIFO by admission).
        let mut chunk: Option<(SeqId, Vec<u32>, bool)> = None;
        let mut order: Vec<(Instant, SeqId)> = (0..self.slots.len())
            .filter_map(|s| {
                self.active(s)
                    .filter(|a| a.phase == Phase::Prefilling)
                    .map(|a| (a.admitted, s))
            })
            .collect();
        order.sort();
        for (_, seq) in order {
            let Some(a) = self.active(seq) else { continue };
            let (start, end) = self.next_piece(a);
            let last = end == a.prompt().len() || a.splits.contains(&end);
            let piece = (seq, a.prompt()[start..end].to_vec(), last);
            if end - start == 1 {
                items.push(piece);
            } else if chunk.is_none() {
                chunk = Some(piece);
            }
        }
        // The one-token rows first, and their tokens handed out at once: a
        // request's first token never waits for another's prefill chunk.
        self.decode_step(items);
        if let Some(chunk) = chunk {
            self.decode_step(vec![chunk]);
        }
        // Requests cancelled meanwhile end now (their sequences are freed
        // within this step).
        for seq in 0..self.slots.len() {
            if self
                .active(seq)
                .is_some_and(|a| a.sub.cancel.load(Ordering::Relaxed))
            {
                self.finish(seq, FinishReason::Cancelled);
            }
        }
    }

    /// Decodes `items` (sequence, tokens, whether logits are wanted) in one
    /// backend call and moves their requests on; if the call fails, its
    /// requests fail (nothing of it was applied).
    fn decode_step(&mut self, items: Vec<(SeqId, Vec<u32>, bool)>) {
        // A request of the batch may have ended in an earlier part of the
        // step (its sampled token stopped it).
        let items: Vec<_> = items
            .into_iter()
            .filter(|(seq, _, _)| self.active(*seq).is_some())
            .collect();
        if items.is_empty() {
            return;
        }
        let batch: Vec<BatchItem<'_>> = items
            .iter()
            .map(|(seq, tokens, logits)| BatchItem {
                seq: *seq,
                tokens,
                logits: *logits,
            })
            .collect();
        if let Err(e) = self.ctx.decode(&batch) {
            let e = EngineError::from(e);
            for (seq, _, _) in &items {
                self.fail(*seq, e.clone());
            }
            return;
        }
        for (seq, tokens, _) in &items {
            self.cells.append(*seq, tokens.len());
        }
        let alone = items.len() == 1;
        for (seq, tokens, logits) in items {
            self.after_decode(seq, tokens.len(), logits, alone);
        }
    }

    /// The next prefill piece of a request: up to the next multiple of
    /// `n_batch`, stopping before the prompt's last token, which goes on
    /// its own.
    fn next_piece(&self, a: &Active) -> (usize, usize) {
        let n = a.prompt().len();
        let at = a.prefill_at;
        if at + 1 >= n {
            return (at, n);
        }
        let batch = self.n_batch();
        let mut end = ((at / batch + 1) * batch).min(n - 1);
        if let Some(cold) = a.cold_at {
            if at < cold && end > cold {
                end = cold;
            }
        }
        // A breakpoint ends a piece, and the token before it goes on its
        // own (with logits), as a prompt's last token does.
        if let Some(&b) = a.splits.iter().find(|&&b| b > at) {
            end = end.min(if at + 1 < b { b - 1 } else { b });
        }
        (at, end)
    }

    /// After `seq` got `n` tokens in a step (`alone`: no other sequence
    /// was computed in it).
    fn after_decode(&mut self, seq: SeqId, n: usize, logits: bool, alone: bool) {
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        match a.phase {
            Phase::Prefilling => {
                a.prefill_at += n;
                a.stats.prefill_tokens += n;
                let at = a.prefill_at;
                let prompt_len = a.prompt().len();
                if let Some(bp) = a.sub.options.breakpoints.iter().find(|b| b.tokens == at) {
                    let pin = bp.pin;
                    self.save_breakpoint(seq, logits && alone, pin);
                }
                let Slot::Busy(a) = &mut self.slots[seq] else {
                    return;
                };
                if a.cold_at == Some(at) {
                    a.cold_at = None;
                    a.last_saved_at = at;
                    self.save_async(seq, SaveReason::Cold, false);
                }
                if at == prompt_len {
                    self.prompt_done(seq, alone);
                }
            }
            Phase::Generating => {
                a.stats.decode_tokens += n;
                if logits {
                    self.generate(seq);
                }
            }
            Phase::Waiting { .. } | Phase::Fetching => {}
        }
    }

    /// `seq` holds its whole prompt and has the logits that follow it:
    /// the prompt's own row is saved if due, and generation starts.
    ///
    /// The row carries those logits (a repeat is then answered without a
    /// decode) only when `lone_logits`: the last prompt token was computed
    /// in a step of its own, as a lone run computes it. A step shared with
    /// other sequences may round differently (docs/api.md, parallel
    /// requests), and a row must restore into what a lone run gives: a
    /// row without logits has its last token fed again, alone.
    fn prompt_done(&mut self, seq: SeqId, lone_logits: bool) {
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        let prompt_len = a.prompt().len();
        let save_prompt = a.save_prompt;
        a.stats.prefill_ms = ms(a.admitted.elapsed());
        a.gen_started = Some(Instant::now());
        a.phase = Phase::Generating;
        a.prefill_at = prompt_len;
        // Continued saves count from the end of the prompt.
        a.last_saved_at = prompt_len;
        if save_prompt {
            self.save_async(seq, SaveReason::Cold, lone_logits);
        }
        self.generate(seq);
    }

    /// Samples `seq`'s next token and hands it out; feeds it next step
    /// only if generation goes on.
    fn generate(&mut self, seq: SeqId) {
        let Some(a) = self.active(seq) else { return };
        if a.sub.cancel.load(Ordering::Relaxed) {
            self.finish(seq, FinishReason::Cancelled);
            return;
        }
        if a.generated.len() >= a.sub.options.max_tokens {
            self.finish(seq, FinishReason::Length);
            return;
        }
        let token = match self.ctx.sample(seq) {
            Ok(t) => t,
            Err(BackendError::Cancelled) => {
                self.finish(seq, FinishReason::Cancelled);
                return;
            }
            Err(e) => {
                self.fail(seq, e.into());
                return;
            }
        };
        match self.ctx.is_eog(token) {
            Ok(true) => {
                self.finish(seq, FinishReason::Stop);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                self.fail(seq, e.into());
                return;
            }
        }
        let bytes = match self.setup.backend.token_bytes(token) {
            Ok(b) => b,
            Err(e) => {
                self.fail(seq, e.into());
                return;
            }
        };
        let live = self.ctx.tokens(seq).len();
        let continued = should_continued_save(
            live,
            self.active(seq).map_or(live, |a| a.last_saved_at),
            self.policy(),
        );
        if continued {
            self.save_async(seq, SaveReason::Continued, false);
        }
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        if continued {
            a.last_saved_at = live;
        }
        let prompt = a.generated.is_empty().then_some(PromptUsage {
            prompt_tokens: a.stats.prompt_tokens,
            prefill_tokens: a.stats.prefill_tokens,
            breakpoint_written: a.stats.breakpoint_written,
        });
        a.generated.push(token);
        let (piece, stopped) = a.text.push(&bytes);
        let _ = a.sub.events.send(Event::Token {
            id: token,
            text: piece,
            prompt,
        });
        if stopped {
            self.finish(seq, FinishReason::Stop);
        } else if a.generated.len() >= a.sub.options.max_tokens {
            self.finish(seq, FinishReason::Length);
        } else {
            a.pending = Some(token);
        }
    }

    // --- admission ---

    /// Admits queued requests in FIFO order while a sequence and enough
    /// cells are free.
    fn admit(&mut self) {
        // Adapter changes and evicts wait for the running requests to end;
        // no new one starts meanwhile.
        if !self.deferred.is_empty() {
            if self.is_idle() {
                self.run_deferred();
            }
            return;
        }
        while let Some(sub) = self.queue.front() {
            if sub.cancel.load(Ordering::Relaxed) {
                // Cancelled while queued: it ends here, touching nothing.
                let sub = self.queue.pop_front().expect("front exists");
                self.answer_cancelled(sub);
                continue;
            }
            let tokens = sub.tokens.clone();
            let need_all = tokens.len() + sub.options.max_tokens;
            // The best prefix another sequence holds. A finished (warm)
            // one is taken over in place, cut back to that prefix, as a
            // llama.cpp server slot is; a running one is shared into a
            // free sequence (if none is free, the least recently used warm
            // one is freed).
            let splits: Vec<usize> = sub.options.breakpoints.iter().map(|b| b.tokens).collect();
            let share = self.best_share(&tokens, None, &splits);
            let src = share.map(|(s, _)| s);
            let shared = share.map_or(0, |(_, n)| n);
            let in_place = src.filter(|&s| matches!(self.slots[s], Slot::Warm { .. }));
            let seq = match in_place {
                Some(s) => s,
                None => match self.slots.iter().position(|s| matches!(s, Slot::Free)) {
                    Some(s) => s,
                    None => {
                        let keep: Vec<SeqId> = src.into_iter().collect();
                        if !self.evict_warm(&keep) {
                            return; // every sequence runs a request
                        }
                        match self.slots.iter().position(|s| matches!(s, Slot::Free)) {
                            Some(s) => s,
                            None => return,
                        }
                    }
                },
            };
            // Cells of a pool: what it may add against what is free; warm
            // sequences give theirs back, least recently used first.
            while self.pooled {
                let mut cells = self.cells.clone();
                if in_place.is_some() {
                    cells.truncate(seq, shared);
                }
                let free = self.n_ctx().saturating_sub(cells.used() + self.reserved());
                if need_all.saturating_sub(shared) <= free {
                    break;
                }
                let keep: Vec<SeqId> = src.into_iter().chain([seq]).collect();
                if !self.evict_warm(&keep) {
                    return; // wait for running requests to end (FIFO)
                }
            }
            let sub = self.queue.pop_front().expect("front exists");
            if in_place.is_some() {
                self.ctx
                    .truncate(seq, shared)
                    .expect("the shared prefix is within the sequence");
                self.cells.truncate(seq, shared);
                if let Slot::Warm { prompt_len, .. } = &mut self.slots[seq] {
                    *prompt_len = (*prompt_len).min(shared);
                }
            }
            self.start(seq, sub);
        }
    }

    fn answer_cancelled(&self, sub: Box<Submission>) {
        let stats = RequestStats {
            finish_reason: FinishReason::Cancelled,
            cancelled: true,
            ..RequestStats::dequeued(sub.tokens.len(), ms(sub.submitted.elapsed()))
        };
        let _ = sub.events.send(Event::Done(Ok(Completion {
            request_id: sub.id,
            text: String::new(),
            tokens: Vec::new(),
            stats,
            finish_key: None,
        })));
    }

    /// Starts `sub` on `seq`, which is empty or holds a prefix of its
    /// prompt (a warm sequence taken over): sampling, then its prefix
    /// (kept, shared, waited for, restored, or none).
    fn start(&mut self, seq: SeqId, sub: Box<Submission>) {
        let admitted = Instant::now();
        let splits: Arc<[usize]> = sub.options.breakpoints.iter().map(|b| b.tokens).collect();
        let stats =
            RequestStats::dequeued(sub.tokens.len(), ms(admitted.duration_since(sub.submitted)));
        if let Err(e) = self.ctx.set_sampling(seq, &sub.options.sampling) {
            let _ = sub.events.send(Event::Done(Err(e.into())));
            return;
        }
        self.ctx.set_interrupt(seq, Some(Arc::clone(&sub.cancel)));
        let text = TextStream::new(sub.options.stop.clone());
        let a = Active {
            sub,
            phase: Phase::Prefilling,
            prefill_at: 0,
            cold_at: None,
            save_prompt: false,
            pending: None,
            generated: Vec::new(),
            text,
            stats,
            admitted,
            gen_started: None,
            last_saved_at: 0,
            splits: Arc::clone(&splits),
            fetch: None,
        };
        let tokens = a.sub.tokens.clone();
        self.slots[seq] = Slot::Busy(Box::new(a));
        // A prefix another sequence is prefilling right now: wait for it
        // (unless this sequence already holds a longer one).
        let now = self
            .best_share(&tokens, Some(seq), &splits)
            .map_or(0, |(_, n)| n)
            .max(self.ctx.tokens(seq).len());
        if let Some((src, len)) = self.pending_share(&tokens, &splits, seq) {
            if len > now {
                if let Slot::Busy(a) = &mut self.slots[seq] {
                    a.phase = Phase::Waiting { src, len };
                }
                return;
            }
        }
        self.place_prefix(seq);
    }

    /// Waiting requests whose source has prefilled far enough copy it; a
    /// source that went away leaves them to find their prefix elsewhere.
    fn resolve_waits(&mut self) {
        for seq in 0..self.slots.len() {
            let Some(Phase::Waiting { src, len }) = self.active(seq).map(|a| a.phase) else {
                continue;
            };
            let ready = self.ctx.tokens(src).len() >= len;
            let alive = self
                .active(src)
                .is_some_and(|a| matches!(a.phase, Phase::Prefilling | Phase::Fetching));
            if ready || !alive {
                if let Slot::Busy(a) = &mut self.slots[seq] {
                    a.phase = Phase::Prefilling;
                }
                self.place_prefix(seq);
            }
        }
    }

    /// Gives a started request its prefix, the longest of: what its
    /// sequence already holds (a warm sequence taken over), another
    /// sequence's cells (shared), a cached row (restored); else cold.
    fn place_prefix(&mut self, seq: SeqId) {
        let tokens = match self.active(seq) {
            Some(a) => a.prompt().to_vec(),
            None => return,
        };
        let n = tokens.len();
        let started = Instant::now();
        let local = self.prefix_at_hand(seq, &tokens);
        let mut failure = None;
        let restored = if self.cacheable && local + 1 < n {
            let parent = self.active(seq).and_then(|a| a.sub.options.parent_key);
            let found = self.restore(seq, &tokens, parent.as_ref(), local, &mut failure);
            if found.is_none() {
                // The sequence is as it was (or empty after a failed
                // restore): the remote tier is asked last, off this thread.
                let local = self.prefix_at_hand(seq, &tokens);
                let splits = self.active(seq).map(|a| Arc::clone(&a.splits));
                let keys = splits.and_then(|s| self.remote_candidates(&tokens, &s, local));
                if let Some(keys) = keys.filter(|_| local + 1 < n) {
                    self.start_fetch(seq, keys, started, failure);
                    return;
                }
            }
            found
        } else {
            None
        };
        self.place(seq, &tokens, started, restored, failure);
    }

    /// The longest prefix of `tokens` that `seq` holds or could copy from
    /// another sequence now: what a cached row must beat.
    fn prefix_at_hand(&self, seq: SeqId, tokens: &[u32]) -> usize {
        let held = self.ctx.tokens(seq).len();
        self.best_share(tokens, Some(seq), self.splits(seq))
            .map_or(held, |(_, k)| k.max(held))
    }

    /// Places `seq`'s prefix once the cache has answered: the row
    /// `restored`, else the best another sequence holds (copied), else
    /// what the sequence holds, else nothing (cold); counts the hit or
    /// miss and schedules the prompt's saves.
    fn place(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        started: Instant,
        restored: Option<Restored>,
        failure: Option<RestoreFailure>,
    ) {
        let n = tokens.len();
        let held = self.ctx.tokens(seq).len();
        let share = self
            .best_share(tokens, Some(seq), self.splits(seq))
            .filter(|&(_, k)| k > held);
        // (tokens, source, tier, stored logits installed)
        let placed = match restored {
            Some(r) => Some((r.len, r.source, Some(r.tier), r.logits)),
            None => {
                // A failed restore leaves the sequence empty.
                let held = self.ctx.tokens(seq).len();
                match share {
                    Some((src, k)) if k > held => {
                        self.ctx.clear(seq);
                        self.cells.clear(seq);
                        match self.ctx.copy_prefix(src, seq, k) {
                            Ok(()) => {
                                self.cells.copy(src, seq, k);
                                Some((k, HitSource::Shared, None, false))
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "sharing a prefix failed; prefilling it");
                                self.ctx.clear(seq);
                                None
                            }
                        }
                    }
                    _ if held > 0 => Some((held, HitSource::Shared, None, false)),
                    _ => None,
                }
            }
        };
        if placed.is_some_and(|(_, source, _, _)| source == HitSource::Shared) {
            self.counters().incr(Counter::HitsShared);
        }
        if placed.is_none() && self.cacheable {
            self.counters().incr(Counter::Misses);
        }
        let cold_at = if placed.is_none() && self.cacheable {
            self.cold_boundary(tokens)
        } else {
            None
        };
        let save_prompt = self.cacheable
            && placed.is_none_or(|(len, _, _, _)| len < n - 1)
            && (self.policy().cold_min_tokens..=self.policy().cold_max_tokens).contains(&n);
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        a.stats.restore_failure = failure;
        a.cold_at = cold_at;
        a.save_prompt = save_prompt;
        let Some((len, source, tier, logits)) = placed else {
            return;
        };
        // The whole prompt held with the logits that follow it: generation
        // starts at once. Without them its last token is fed again for the
        // logits of the first generated one.
        let answered = len >= n && logits;
        let len = if len >= n && !logits {
            self.ctx
                .truncate(seq, n - 1)
                .expect("n - 1 is within the sequence");
            self.cells.truncate(seq, n - 1);
            n - 1
        } else {
            len.min(n)
        };
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        a.stats.cache_hit_kind = if len + 1 >= n {
            HitKind::Exact
        } else {
            HitKind::Partial
        };
        a.stats.hit_source = Some(source);
        a.stats.cached_tokens = if a.stats.cache_hit_kind == HitKind::Exact {
            n
        } else {
            len
        };
        a.stats.cache_tier = tier;
        a.stats.restore_ms = ms(started.elapsed());
        a.prefill_at = len;
        a.last_saved_at = len;
        self.renew_breakpoints(seq, len);
        if answered {
            // Nothing is saved: the prompt's row is the one just restored.
            self.prompt_done(seq, false);
        }
    }

    /// The cold save's boundary: the policy's aligned prefix, at a whole
    /// number of `n_batch` chunks (so its state is what any prefill of
    /// those tokens computes).
    fn cold_boundary(&self, tokens: &[u32]) -> Option<usize> {
        let (prefix, _) = cold_save_split(tokens, self.policy())?;
        let at = prefix.len() / self.n_batch() * self.n_batch();
        (at > 0 && at < tokens.len()).then_some(at)
    }

    /// The lookup order of docs/policy.md for `seq`; restores a hit into
    /// the cleared sequence when it gives more than `better_than` tokens.
    /// Returns (tokens restored, source, tier, whether the row's stored
    /// logits were installed: only for a row of the whole prompt). A row
    /// that is found but fails to restore is removed, counted, logged and
    /// reported in `failure`, and the next lookup is tried.
    fn restore(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        parent: Option<&CacheKey>,
        better_than: usize,
        failure: &mut Option<RestoreFailure>,
    ) -> Option<Restored> {
        let cache = self.cache().clone();
        let identity = Arc::clone(&self.identity);
        let splits: Arc<[usize]> = self
            .active(seq)
            .map_or_else(|| Arc::from([]), |a| Arc::clone(&a.splits));
        let key = self.identity_for(&splits, tokens.len()).key(tokens);
        if let Lookup::Hit(claim) = cache.lookup(&key) {
            if let Some(r) = self.unpack(seq, claim, tokens.len(), HitSource::Exact, failure) {
                self.counters().incr(Counter::HitsExact);
                return Some(r);
            }
        }
        if let Some(parent) = parent {
            let wait = Duration::from_millis(self.policy().session_resume_wait_ms);
            if let Lookup::Hit(claim) = cache.lookup_wait(parent, wait) {
                let len = claim.tokens().len();
                if len > better_than && len <= tokens.len() && claim.tokens() == &tokens[..len] {
                    if let Some(r) =
                        self.unpack(seq, claim, tokens.len(), HitSource::Resume, failure)
                    {
                        self.counters().incr(Counter::HitsResume);
                        return Some(r);
                    }
                }
            }
        }
        // The breakpoints' rows, the longest first.
        for &b in splits.iter().rev() {
            if b >= tokens.len() || b <= better_than {
                continue;
            }
            let key = self.identity_for(&splits, b).key(&tokens[..b]);
            if let Lookup::Hit(claim) = cache.lookup(&key) {
                if let Some(r) =
                    self.unpack(seq, claim, tokens.len(), HitSource::LongestPrefix, failure)
                {
                    self.counters().incr(Counter::HitsLongestPrefix);
                    return Some(r);
                }
            }
        }
        // Ordinary rows hold for the chunks before the first breakpoint.
        let plain = &tokens[..self.split_cap(&splits).min(tokens.len())];
        if let PrefixLookup::Hit { claim, len, .. } =
            cache.longest_prefix(&identity.hasher(), plain, self.policy())
        {
            if len > better_than {
                if let Some(r) =
                    self.unpack(seq, claim, tokens.len(), HitSource::LongestPrefix, failure)
                {
                    self.counters().incr(Counter::HitsLongestPrefix);
                    return Some(r);
                }
            }
        }
        None
    }

    /// The keys of the last lookup (docs/tiers.md), the remote tier's:
    /// every key the local lookups tried (the whole prompt, the
    /// breakpoints, the aligned prefixes) that gives more than
    /// `better_than` tokens, the longest first; `None` without a remote
    /// tier or any such key.
    fn remote_candidates(
        &self,
        tokens: &[u32],
        splits: &[usize],
        better_than: usize,
    ) -> Option<Vec<CacheKey>> {
        self.cache().remote()?;
        let mut candidates: Vec<(usize, CacheKey)> = Vec::new();
        if tokens.len() > better_than {
            candidates.push((
                tokens.len(),
                self.identity_for(splits, tokens.len()).key(tokens),
            ));
        }
        for &b in splits {
            if b < tokens.len() && b > better_than {
                candidates.push((b, self.identity_for(splits, b).key(&tokens[..b])));
            }
        }
        // The aligned prefixes, their keys derived in one pass (as the
        // local longest-prefix walk does).
        let plain = &tokens[..self.split_cap(splits).min(tokens.len())];
        let lengths: Vec<usize> = longest_prefix_probes(plain.len(), self.policy())
            .filter(|&len| len > better_than)
            .collect();
        let keys = self
            .identity
            .hasher()
            .prefix_keys(plain, &lengths)
            .expect("probe lengths never exceed the token count");
        candidates.extend(lengths.into_iter().zip(keys));
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|c| seen.insert(c.1));
        (!candidates.is_empty()).then(|| candidates.into_iter().map(|c| c.1).collect())
    }

    /// Starts the remote lookup of `keys` for `seq` on a thread of its own
    /// (the other sequences go on meanwhile); [`Actor::resolve_fetches`]
    /// picks its row up.
    fn start_fetch(
        &mut self,
        seq: SeqId,
        keys: Vec<CacheKey>,
        started: Instant,
        failure: Option<RestoreFailure>,
    ) {
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        let cache = self.setup.cache.clone();
        let home = self.setup.config.tier;
        let (tx, rx) = std_mpsc::sync_channel(1);
        a.phase = Phase::Fetching;
        a.fetch = Some(PendingFetch {
            result: rx,
            started,
        });
        a.stats.restore_failure = failure;
        let spawned = std::thread::Builder::new()
            .name("erllama-remote".into())
            .spawn(move || {
                // A cancelled request no longer listens: the claim is
                // released here.
                let _ = tx.send(cache.fetch_remote(&keys, home));
            });
        if let Err(e) = spawned {
            // The sender is gone with the closure: the next step sees a
            // miss.
            tracing::warn!(error = %e, "no thread for a remote lookup; treating it as a miss");
        }
    }

    /// Requests whose remote lookup has ended take its row (or go on
    /// without one).
    fn resolve_fetches(&mut self) {
        for seq in 0..self.slots.len() {
            let Some(fetch) = self.active(seq).and_then(|a| a.fetch.as_ref()) else {
                continue;
            };
            let claim = match fetch.result.try_recv() {
                Ok(claim) => claim,
                Err(std_mpsc::TryRecvError::Empty) => continue,
                // The lookup thread died: a miss.
                Err(std_mpsc::TryRecvError::Disconnected) => None,
            };
            self.fetched(seq, claim);
        }
    }

    /// `seq`'s remote lookup ended with `claim`: restores it when it gives
    /// more than the sequence holds and any other sequence could share
    /// now, then places the prefix as [`Actor::place_prefix`] does.
    fn fetched(&mut self, seq: SeqId, claim: Option<Claim>) {
        let Slot::Busy(a) = &mut self.slots[seq] else {
            return;
        };
        let Some(fetch) = a.fetch.take() else {
            return;
        };
        a.phase = Phase::Prefilling;
        let mut failure = a.stats.restore_failure.take();
        let tokens = a.prompt().to_vec();
        let local = self.prefix_at_hand(seq, &tokens);
        let restored = claim
            .filter(|c| {
                let len = c.tokens().len();
                len > local && len <= tokens.len() && c.tokens() == &tokens[..len]
            })
            .and_then(|claim| {
                let len = claim.tokens().len();
                let (source, counter) = if len == tokens.len() {
                    (HitSource::Exact, Counter::HitsExact)
                } else {
                    (HitSource::LongestPrefix, Counter::HitsLongestPrefix)
                };
                let r = self.unpack(seq, claim, tokens.len(), source, &mut failure)?;
                self.counters().incr(counter);
                if let Slot::Busy(a) = &mut self.slots[seq] {
                    a.stats.from_remote = true;
                }
                Some(r)
            });
        self.place(seq, &tokens, fetch.started, restored, failure);
    }

    /// Loads and unpacks a claimed row into `seq` (the claim is released
    /// on return); any failure is a miss and leaves the sequence empty. A
    /// row of the whole prompt (`prompt_len` tokens) with stored logits
    /// also installs them, so the first token needs no decode. A row that
    /// cannot be restored is never tried again: a corrupt file is deleted
    /// by the load (`corrupt_files`), a state the backend refuses is
    /// removed here (`restore_failures`).
    fn unpack(
        &mut self,
        seq: SeqId,
        claim: Claim,
        prompt_len: usize,
        source: HitSource,
        failure: &mut Option<RestoreFailure>,
    ) -> Option<Restored> {
        let len = claim.tokens().len();
        if len == 0 {
            return None;
        }
        // Restored cells turn this request's reservation into cells in use;
        // that fits unless its admission counted on sharing cells instead.
        if self.pooled && self.cells.used() + self.reserved() > self.n_ctx() {
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
        match self.ctx.kv_unpack(seq, payload.state(), claim.tokens()) {
            Ok(()) => {
                self.cells.clear(seq);
                self.cells.append(seq, len);
                let mut logits = std::mem::take(&mut self.logits_buf);
                let with_logits = len == prompt_len
                    && payload.logits_into(&mut logits)
                    && match self.ctx.set_logits(seq, &logits) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::debug!(error = %e, "stored logits not used; re-feeding");
                            false
                        }
                    };
                self.logits_buf = logits;
                Some(Restored {
                    len,
                    source,
                    tier: claim.tier(),
                    logits: with_logits,
                })
            }
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
                self.ctx.clear(seq);
                self.cells.clear(seq);
                claim.invalidate();
                None
            }
        }
    }

    // --- ending requests ---

    /// Ends the request on `seq`: final text, finish save, the answer; the
    /// sequence is kept warm (its cells shareable) until they are needed.
    fn finish(&mut self, seq: SeqId, reason: FinishReason) {
        let Slot::Busy(mut a) = std::mem::replace(&mut self.slots[seq], Slot::Free) else {
            return;
        };
        self.ctx.set_interrupt(seq, None);
        let tail = a.text.finish();
        if !tail.is_empty() {
            let _ = a.sub.events.send(Event::Token {
                id: u32::MAX,
                text: tail,
                prompt: None,
            });
        }
        if let Some(started) = a.gen_started {
            a.stats.generation_ms = ms(started.elapsed());
        } else if a.stats.prefill_ms == 0.0 {
            a.stats.prefill_ms = ms(a.admitted.elapsed());
        }
        a.stats.completion_tokens = a.generated.len();
        a.stats.stop_sequence = a.text.matched().map(str::to_owned);
        a.stats.finish_reason = reason;
        a.stats.cancelled = reason == FinishReason::Cancelled;
        // A finish save, also for a cancelled request; only a sequence that
        // holds the whole prompt is worth saving.
        let live = self.ctx.tokens(seq).len();
        let finish_key = if live >= a.sub.tokens.len() && should_finish_save(live, self.policy()) {
            self.save_async(seq, SaveReason::Finish, false)
        } else {
            None
        };
        self.tick += 1;
        if live > 0 && reason != FinishReason::Cancelled {
            self.slots[seq] = Slot::Warm {
                last_used: self.tick,
                prompt_len: a.sub.tokens.len(),
                splits: Arc::clone(&a.splits),
            };
        } else {
            // A cancelled request's cells are freed at once.
            self.free(seq);
        }
        let completion = Completion {
            request_id: a.sub.id,
            text: a.text.text().to_owned(),
            tokens: std::mem::take(&mut a.generated),
            stats: a.stats,
            finish_key,
        };
        // Before the answer: whoever awaited it reads this model's cells
        // and occupancy as they now are.
        self.publish();
        let _ = a.sub.events.send(Event::Done(Ok(completion)));
    }

    /// Fails the request on `seq` (its sequence may be half-written: it is
    /// freed).
    fn fail(&mut self, seq: SeqId, e: EngineError) {
        let Slot::Busy(a) = std::mem::replace(&mut self.slots[seq], Slot::Free) else {
            return;
        };
        self.ctx.set_interrupt(seq, None);
        self.free(seq);
        self.publish();
        let _ = a.sub.events.send(Event::Done(Err(e)));
    }

    /// Unload: cancel the running requests (their finish saves still
    /// fire), fail the queued ones, save what the sequences hold, stop.
    fn stop(&mut self, reply: Option<Reply<Vec<SaveSummary>>>) {
        for seq in 0..self.slots.len() {
            if let Some(a) = self.active(seq) {
                a.sub.cancel.store(true, Ordering::Relaxed);
                self.finish(seq, FinishReason::Cancelled);
            }
        }
        let reason = "the model was unloaded".to_owned();
        for sub in self.queue.drain(..) {
            let _ = sub.events.send(Event::Done(Err(EngineError::ModelGone(
                self.setup.model_id.clone(),
                reason.clone(),
            ))));
        }
        let r = self.save_all(SaveReason::Shutdown, false);
        for d in self.deferred.drain(..) {
            let gone = || EngineError::ModelGone(self.setup.model_id.clone(), reason.clone());
            match d {
                Deferred::Evict(reply) => {
                    let _ = reply.send(Ok(Vec::new()));
                }
                Deferred::Adapters(AdapterCommand::Add(_, r)) => {
                    let _ = r.send(Err(gone()));
                }
                Deferred::Adapters(AdapterCommand::Scale(_, _, r)) => {
                    let _ = r.send(Err(gone()));
                }
                Deferred::Adapters(AdapterCommand::Remove(_, r)) => {
                    let _ = r.send(Err(gone()));
                }
                Deferred::Adapters(AdapterCommand::List(r)) => {
                    let _ = r.send(Err(gone()));
                }
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(r);
        }
    }

    /// Saves every sequence with content (`reason`, waiting for the
    /// writes) and, with `free`, releases them.
    fn save_all(
        &mut self,
        reason: SaveReason,
        free: bool,
    ) -> Result<Vec<SaveSummary>, EngineError> {
        let mut out = Vec::new();
        let mut first_err = None;
        for seq in 0..self.slots.len() {
            if matches!(self.slots[seq], Slot::Free) {
                continue;
            }
            match self.save_blocking(seq, reason) {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            if free && !matches!(self.slots[seq], Slot::Busy(_)) {
                self.free(seq);
            }
        }
        match first_err {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn evict_all(&mut self) -> Result<Vec<SaveSummary>, EngineError> {
        let saved = self.save_all(SaveReason::Evict, true);
        // Before the reply: whoever waited for the evict reads the freed
        // cells at once.
        self.publish();
        saved
    }

    // --- saves ---

    /// Packs `seq` (with its current logits when `with_logits`: a row that
    /// ends at the end of a prompt) and reserves its key; the write runs
    /// on another thread. Returns the key when the row is (or will be)
    /// stored.
    fn save_async(
        &mut self,
        seq: SeqId,
        reason: SaveReason,
        with_logits: bool,
    ) -> Option<CacheKey> {
        self.save_async_pinned(seq, reason, with_logits, None)
            .map(|(key, _)| key)
    }

    /// [`Actor::save_async`], then (with `pin`) the row is kept from
    /// eviction for that long once it is published. Returns the key and
    /// whether this save writes it (false: it was already stored).
    fn save_async_pinned(
        &mut self,
        seq: SeqId,
        reason: SaveReason,
        with_logits: bool,
        pin: Option<Duration>,
    ) -> Option<(CacheKey, bool)> {
        match self.begin_save(seq, reason, with_logits) {
            Ok(Begun::Pending(mut pending, key)) => {
                if let Some(ttl) = pin {
                    pending.pin_on_publish(ttl);
                }
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
                Some((key, true))
            }
            Ok(Begun::Present(key)) => {
                if let Some(ttl) = pin {
                    // Renewed; a row another save is still writing is
                    // pinned by that save's request if it asked.
                    let _ = self.cache().pin_for(&key, ttl);
                }
                Some((key, false))
            }
            Ok(Begun::Empty) => None,
            Err(e) => {
                tracing::debug!(error = %e, reason = reason.label(), "save skipped");
                None
            }
        }
    }

    /// `seq` just reached one of its breakpoints: its row is saved (with
    /// the logits that follow when `with_logits`: its last token was
    /// decoded alone), whatever the policy, and pinned for `pin`.
    fn save_breakpoint(&mut self, seq: SeqId, with_logits: bool, pin: Option<Duration>) {
        if let Some((_, true)) = self.save_async_pinned(seq, SaveReason::Cold, with_logits, pin) {
            if let Slot::Busy(a) = &mut self.slots[seq] {
                a.stats.breakpoint_written = a.prefill_at;
            }
        }
    }

    /// Renews the pins of the breakpoints a placed prefix of `len` tokens
    /// covers (a use refreshes a breakpoint's lifetime).
    fn renew_breakpoints(&self, seq: SeqId, len: usize) {
        let Some(a) = self.active(seq) else { return };
        for b in &a.sub.options.breakpoints {
            if let (true, Some(ttl)) = (b.tokens <= len, b.pin) {
                let key = self
                    .identity_for(&a.splits, b.tokens)
                    .key(&a.prompt()[..b.tokens]);
                let _ = self.cache().pin_for(&key, ttl);
            }
        }
    }

    /// An evict or shutdown save: waits for the write, bounded by
    /// `evict_save_timeout_ms`. A no-op on an empty sequence.
    fn save_blocking(
        &mut self,
        seq: SeqId,
        reason: SaveReason,
    ) -> Result<Option<SaveSummary>, EngineError> {
        let tokens = self.ctx.tokens(seq).len();
        match self.begin_save(seq, reason, false)? {
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

    fn begin_save(
        &mut self,
        seq: SeqId,
        reason: SaveReason,
        with_logits: bool,
    ) -> Result<Begun, EngineError> {
        let identity = self.identity_for(self.splits(seq), self.ctx.tokens(seq).len());
        let tokens = self.ctx.tokens(seq);
        if tokens.is_empty() || !self.cacheable {
            return Ok(Begun::Empty);
        }
        let key = identity.key(tokens);
        if self.cache().contains(&key) {
            self.counters().incr(Counter::DuplicateDropped);
            return Ok(Begun::Present(key));
        }
        // The payload: the logits that follow the tokens (when wanted and
        // present), then the state, packed into a recycled buffer.
        let (payload, logits_count) = {
            let _t = self.counters().time(Counter::PackTotalNs);
            let logits = if with_logits {
                self.ctx
                    .logits(seq)
                    .filter(|l| u32::try_from(l.len()).is_ok())
            } else {
                None
            };
            let logits_bytes = logits.map_or(0, |l| l.len() * erllama_cache::LOGIT_BYTES);
            let mut buf = erllama_cache::pack_buffer(logits_bytes + self.ctx.kv_pack_size(seq));
            for v in logits.unwrap_or_default() {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            self.ctx.kv_pack_into(seq, &mut buf)?;
            let count = logits.map_or(0, |l| u32::try_from(l.len()).unwrap_or(0));
            (buf, count)
        };
        let prompt_text = self
            .active(seq)
            .map(|a| truncate_chars(&a.sub.prompt_text, 512))
            .unwrap_or_default();
        let request = SaveRequest {
            identity,
            tier: self.setup.config.tier,
            tokens: self.ctx.tokens(seq).into(),
            payload,
            logits_count,
            reason,
            prompt_text,
            detail: None,
        };
        match self.cache().begin_save(request) {
            Ok(pending) => Ok(Begun::Pending(Box::new(pending), key)),
            Err(SaveError::AlreadyPresent(_) | SaveError::Conflict(_)) => Ok(Begun::Present(key)),
            Err(e) => Err(EngineError::Cache(e.to_string())),
        }
    }
}

/// A row restored into a sequence.
struct Restored {
    len: usize,
    source: HitSource,
    tier: TierKind,
    /// Its stored logits were installed: the sequence holds the whole
    /// prompt and can sample at once.
    logits: bool,
}

enum Begun {
    Empty,
    Present(CacheKey),
    Pending(Box<erllama_cache::PendingSave>, CacheKey),
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}
