//! The engine over the Rust stub: request flow, cache wiring (exact,
//! resume, longest prefix, cold saves), cancel, FIFO, concurrency, errors.

use std::sync::Arc;
use std::time::Duration;

use erllama_cache::{Cache, CacheConfig, Counter, FileTierConfig, PolicyConfig, TierKind};
use erllama_engine::{
    Backend, BackendContext, BackendError, BatchItem, ContextParams, Engine, EngineError, Event,
    FinishReason, HitKind, HitSource, ModelConfig, ModelFingerprint, ModelStatus, Prompt,
    RequestOptions, SamplingParams, SeqId, StubBackend,
};

/// A small policy so short stub prompts are cached.
fn policy() -> PolicyConfig {
    PolicyConfig {
        min_tokens: 8,
        cold_min_tokens: 8,
        cold_max_tokens: 30_000,
        continued_interval: 64,
        boundary_trim_tokens: 2,
        boundary_align_tokens: 16,
        session_resume_wait_ms: 2000,
        evict_save_timeout_ms: 5000,
    }
}

fn engine_with(cache: CacheConfig) -> Engine {
    Engine::new(Cache::open(cache).expect("cache"), policy()).expect("engine")
}

fn engine() -> Engine {
    engine_with(CacheConfig::default())
}

async fn stub(engine: &Engine, id: Option<&str>, tier: TierKind) -> String {
    engine
        .load_model(
            Arc::new(StubBackend::new("stub-model")),
            id.map(str::to_owned),
            ModelConfig {
                context: ContextParams {
                    n_ctx: 2048,
                    n_batch: 8,
                    n_threads: None,
                    n_seq: 4,
                    ..ContextParams::default()
                },
                tier,
                policy: policy(),
            },
        )
        .await
        .expect("load")
}

fn words(n: usize, salt: &str) -> String {
    (0..n)
        .map(|i| format!("w{i}{salt}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn opts(max_tokens: usize) -> RequestOptions {
    RequestOptions {
        max_tokens,
        ..RequestOptions::default()
    }
}

/// Waits until the cache holds no reservation (async saves finished).
async fn settle(engine: &Engine) {
    for _ in 0..500 {
        if TierKind::ALL
            .iter()
            .all(|&t| engine.cache().reserved_bytes(t) == 0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("saves did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_then_repeat_is_an_exact_hit_and_longer_is_partial() {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    assert_eq!(m, "erllama_model_1");
    let prompt = Prompt::Text(words(40, "a"));
    let cold = engine
        .complete(&m, prompt.clone(), opts(12))
        .await
        .expect("cold");
    assert_eq!(cold.stats.cache_hit_kind, HitKind::Cold);
    assert_eq!(cold.stats.prompt_tokens, 41, "40 words + BOS");
    assert_eq!(cold.tokens.len(), 12);
    assert_eq!(cold.stats.finish_reason, FinishReason::Length);
    assert!(cold.finish_key.is_some());
    settle(&engine).await;
    let c = engine.cache().counters();
    assert_eq!(c.get(Counter::Misses), 1);
    assert_eq!(
        c.get(Counter::SavesCold),
        2,
        "the aligned prefix (32 tokens) and the whole prompt"
    );
    assert_eq!(c.get(Counter::SavesFinish), 1);

    // The finished sequence is kept warm: the repeat takes it over.
    let shared = engine
        .complete(&m, prompt.clone(), opts(12))
        .await
        .expect("shared");
    assert_eq!(shared.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(shared.stats.hit_source, Some(HitSource::Shared));
    assert_eq!(shared.stats.cached_tokens, 41);
    assert_eq!(shared.stats.cache_tier, None);
    assert_eq!(c.get(Counter::HitsShared), 1);
    assert_eq!(shared.tokens, cold.tokens, "sharing changes nothing");
    // Once evicted, the repeat restores the cached row.
    engine.evict(&m).await.expect("evict");
    let warm = engine
        .complete(&m, prompt.clone(), opts(12))
        .await
        .expect("warm");
    assert_eq!(warm.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(warm.stats.hit_source, Some(HitSource::Exact));
    assert_eq!(warm.stats.cached_tokens, 41);
    assert_eq!(warm.stats.cache_tier, Some(TierKind::Ram));
    assert_eq!(c.get(Counter::HitsExact), 1);
    assert_eq!(warm.tokens, cold.tokens, "a restore changes nothing");
    assert_eq!(warm.text, cold.text);
    // A longer prompt sharing the first 32+ tokens: longest prefix.
    engine.evict(&m).await.expect("evict");
    let longer = engine
        .complete(
            &m,
            Prompt::Text(words(40, "a") + " more words here"),
            opts(3),
        )
        .await
        .expect("longer");
    assert_eq!(longer.stats.cache_hit_kind, HitKind::Partial);
    assert_eq!(longer.stats.hit_source, Some(HitSource::LongestPrefix));
    assert_eq!(longer.stats.cached_tokens, 32);
    assert_eq!(c.get(Counter::HitsLongestPrefix), 1);
    // With the first prompt's sequence warm, the longer one shares its
    // whole chunks instead (40 = 5 chunks of n_batch 8).
    engine.complete(&m, prompt, opts(3)).await.expect("again");
    let longer2 = engine
        .complete(
            &m,
            Prompt::Text(words(40, "a") + " other words here"),
            opts(3),
        )
        .await
        .expect("longer, shared");
    assert_eq!(longer2.stats.cache_hit_kind, HitKind::Partial);
    assert_eq!(longer2.stats.hit_source, Some(HitSource::Shared));
    assert_eq!(longer2.stats.cached_tokens, 40);
    let alone = engine_cold_output(
        &engine
            .prepare(
                &m,
                &Prompt::Text(words(40, "a") + " other words here"),
                &opts(3),
            )
            .expect("prepare"),
        3,
    )
    .await;
    assert_eq!(longer2.tokens, alone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_prompt_row_is_an_exact_hit() {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let first = engine
        .complete(&m, Prompt::Text(words(30, "x")), opts(5))
        .await
        .expect("first");
    settle(&engine).await;
    engine.evict(&m).await.expect("evict");
    // The finish row holds the prompt and every generated token but the
    // last (never fed): asking for exactly those tokens is an exact hit.
    let backend = engine.backend(&m).expect("backend");
    let mut tokens = backend.tokenize(&words(30, "x"), true).expect("tok");
    tokens.extend(&first.tokens[..first.tokens.len() - 1]);
    let exact = engine
        .complete(&m, Prompt::Tokens(tokens.clone()), opts(5))
        .await
        .expect("exact");
    assert_eq!(exact.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(exact.stats.hit_source, Some(HitSource::Exact));
    assert_eq!(exact.stats.cached_tokens, tokens.len());
    assert_eq!(engine.cache().counters().get(Counter::HitsExact), 1);
    let mut fresh = engine_cold_output(&tokens, 5).await;
    assert_eq!(exact.tokens, std::mem::take(&mut fresh));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_row_with_logits_answers_without_a_decode() {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let prompt = Prompt::Text(words(30, "l"));
    let cold = engine
        .complete(&m, prompt.clone(), opts(4))
        .await
        .expect("cold");
    assert_eq!(cold.stats.prefill_tokens, cold.stats.prompt_tokens);
    // Fed: every generated token but the last.
    assert_eq!(cold.stats.decode_tokens, 3);
    settle(&engine).await;
    engine.evict(&m).await.expect("evict");
    let warm = engine
        .complete(&m, prompt.clone(), opts(4))
        .await
        .expect("warm");
    assert_eq!(warm.stats.hit_source, Some(HitSource::Exact));
    // The prompt's row stored the logits after it: nothing was computed
    // before the first token.
    assert_eq!(warm.stats.prefill_tokens, 0);
    assert_eq!(warm.tokens, cold.tokens);
    engine.evict(&m).await.expect("evict");
    // max_tokens = 1: no decode at all after the restore.
    let one = engine.complete(&m, prompt, opts(1)).await.expect("one");
    assert_eq!((one.stats.prefill_tokens, one.stats.decode_tokens), (0, 0));
    assert_eq!(one.tokens, cold.tokens[..1]);
    // A finish row has no logits: its last token is fed again.
    engine.evict(&m).await.expect("evict");
    let backend = engine.backend(&m).expect("backend");
    let mut tokens = backend.tokenize(&words(30, "l"), true).expect("tok");
    tokens.extend(&cold.tokens[..3]);
    let resumed = engine
        .complete(&m, Prompt::Tokens(tokens.clone()), opts(2))
        .await
        .expect("finish row");
    assert_eq!(resumed.stats.hit_source, Some(HitSource::Exact));
    assert_eq!(resumed.stats.prefill_tokens, 1);
    assert_eq!(resumed.tokens, engine_cold_output(&tokens, 2).await);
}

/// The output of a model with an empty cache.
async fn engine_cold_output(tokens: &[u32], n: usize) -> Vec<u32> {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let r = engine
        .complete(&m, Prompt::Tokens(tokens.to_vec()), opts(n))
        .await
        .expect("cold");
    assert_eq!(r.stats.cache_hit_kind, HitKind::Cold);
    r.tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_key_resumes_the_previous_turn() {
    let root = tempfile::tempdir().expect("tmp");
    let engine = engine_with(CacheConfig {
        disk: Some(FileTierConfig::new(root.path().join("disk"), 1 << 30)),
        ..CacheConfig::default()
    });
    let m = stub(&engine, Some("chat"), TierKind::Disk).await;
    // A second model with the same weights and context: the same keys,
    // but none of the first one's sequences (no warm sequence to share).
    let other = stub(&engine, Some("chat2"), TierKind::Disk).await;
    let backend = engine.backend(&m).expect("backend");
    let turn1 = backend.tokenize(&words(20, "t1"), true).expect("tok");
    let r1 = engine
        .complete(&m, Prompt::Tokens(turn1.clone()), opts(6))
        .await
        .expect("turn 1");
    let parent = r1.finish_key.expect("finish key");
    // Turn 2 = turn 1 + its answer + new text; no settle: the resume waits
    // for the row being written.
    let mut turn2 = turn1.clone();
    turn2.extend(&r1.tokens);
    turn2.extend(backend.tokenize(&words(5, "t2"), false).expect("tok"));
    let with_parent = RequestOptions {
        parent_key: Some(parent),
        ..opts(6)
    };
    let r2 = engine
        .complete(&other, Prompt::Tokens(turn2.clone()), with_parent.clone())
        .await
        .expect("turn 2");
    assert_eq!(r2.stats.cache_hit_kind, HitKind::Partial);
    assert_eq!(r2.stats.hit_source, Some(HitSource::Resume));
    // The row holds turn 1 and its answer but the answer's last token.
    assert_eq!(r2.stats.cached_tokens, turn1.len() + r1.tokens.len() - 1);
    assert_eq!(r2.stats.cache_tier, Some(TierKind::Disk));
    assert_eq!(engine.cache().counters().get(Counter::HitsResume), 1);
    let cold = engine_cold_output(&turn2, 6).await;
    assert_eq!(r2.tokens, cold);
    // On the first model, turn 1's sequence is still warm: another turn 2
    // takes it over and continues it, as a cold prefill would.
    let mut turn2b = turn1.clone();
    turn2b.extend(&r1.tokens);
    turn2b.extend(backend.tokenize(&words(7, "t2b"), false).expect("tok"));
    let r2b = engine
        .complete(&m, Prompt::Tokens(turn2b.clone()), with_parent)
        .await
        .expect("turn 2b");
    assert_eq!(r2b.stats.hit_source, Some(HitSource::Shared));
    assert_eq!(r2b.stats.cached_tokens, turn1.len() + r1.tokens.len() - 1);
    assert_eq!(r2b.tokens, engine_cold_output(&turn2b, 6).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_over_the_disk_dir_gets_hits() {
    let root = tempfile::tempdir().expect("tmp");
    let cfg = || CacheConfig {
        disk: Some(FileTierConfig::new(root.path().join("disk"), 1 << 30)),
        ..CacheConfig::default()
    };
    let prompt = Prompt::Text(words(50, "p"));
    let first = {
        let engine = engine_with(cfg());
        let m = stub(&engine, None, TierKind::Disk).await;
        let r = engine
            .complete(&m, prompt.clone(), opts(4))
            .await
            .expect("cold");
        settle(&engine).await;
        engine.shutdown().await;
        r
    };
    let engine = engine_with(cfg());
    let m = stub(&engine, None, TierKind::Disk).await;
    let r = engine.complete(&m, prompt, opts(4)).await.expect("warm");
    assert_eq!(r.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(r.stats.cache_tier, Some(TierKind::Disk));
    assert_eq!(r.tokens, first.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_ends_cancelled_and_still_saves() {
    let engine = engine();
    let (m, _log) = logged_model(&engine, 4).await;
    let tokens = engine
        .prepare(&m, &Prompt::Text(words(20, "c")), &opts(1000))
        .expect("prepare");
    let mut stream = engine
        .submit(&m, Prompt::Tokens(tokens), opts(1000))
        .expect("submit");
    let id = stream.id;
    let mut seen = 0;
    let done = loop {
        match stream.next().await.expect("event") {
            Event::Token { .. } => {
                seen += 1;
                if seen == 3 {
                    assert!(engine.cancel(id));
                    assert!(engine.cancel(id), "idempotent");
                }
            }
            Event::Done(r) => break r.expect("completion"),
        }
    };
    assert_eq!(done.stats.finish_reason, FinishReason::Cancelled);
    assert!(done.stats.cancelled);
    assert!(done.tokens.len() >= 3 && done.tokens.len() < 1000);
    assert!(done.finish_key.is_some(), "finish save fired");
    assert!(!engine.cancel(id), "finished ids are forgotten");
    assert!(!engine.cancel(987_654), "unknown ids are fine");
    assert!(engine.inflight().is_empty());
}

/// A stub that logs which request's prompt each call serves and takes
/// 1 ms per decoded token, so interleavings are observable.
struct Logged {
    inner: StubBackend,
    log: Arc<std::sync::Mutex<Vec<(char, u32)>>>,
}

struct LoggedCtx {
    inner: Box<dyn BackendContext>,
    log: Arc<std::sync::Mutex<Vec<(char, u32)>>>,
}

impl Backend for Logged {
    fn name(&self) -> &str {
        "logged"
    }
    fn fingerprint(&self) -> ModelFingerprint {
        self.inner.fingerprint()
    }
    fn n_vocab(&self) -> u32 {
        self.inner.n_vocab()
    }
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError> {
        self.inner.tokenize(text, add_bos)
    }
    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        self.inner.detokenize(tokens)
    }
    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError> {
        Ok(Box::new(LoggedCtx {
            inner: self.inner.new_context(params)?,
            log: Arc::clone(&self.log),
        }))
    }
}

impl LoggedCtx {
    /// The request a sequence serves: its second prompt token (after BOS).
    fn tag(&self, seq: SeqId) -> u32 {
        self.inner.tokens(seq).get(1).copied().unwrap_or(0)
    }
}

impl BackendContext for LoggedCtx {
    fn n_seq(&self) -> usize {
        self.inner.n_seq()
    }
    fn tokens(&self, seq: SeqId) -> &[u32] {
        self.inner.tokens(seq)
    }
    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError> {
        std::thread::sleep(Duration::from_millis(1));
        self.inner.decode(batch)?;
        let mut log = self.log.lock().expect("log");
        for item in batch {
            log.push(('p', self.tag(item.seq)));
        }
        Ok(())
    }
    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError> {
        let t = self.inner.sample(seq)?;
        let tag = self.tag(seq);
        self.log.lock().expect("log").push(('d', tag));
        Ok(t)
    }
    fn is_eog(&self, token: u32) -> Result<bool, BackendError> {
        self.inner.is_eog(token)
    }
    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        self.inner.kv_pack(seq)
    }
    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        self.inner.kv_unpack(seq, bytes, tokens)
    }
    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError> {
        self.inner.truncate(seq, n)
    }
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError> {
        self.inner.copy_prefix(src, dst, n)
    }
    fn clear(&mut self, seq: SeqId) {
        self.inner.clear(seq);
    }
}

type Log = Arc<std::sync::Mutex<Vec<(char, u32)>>>;

async fn logged_model(engine: &Engine, n_seq: usize) -> (String, Log) {
    logged_model_with(
        engine,
        ContextParams {
            n_seq,
            ..ContextParams::default()
        },
    )
    .await
}

async fn logged_model_with(engine: &Engine, context: ContextParams) -> (String, Log) {
    let log: Log = Arc::default();
    let m = engine
        .load_model(
            Arc::new(Logged {
                inner: StubBackend::new("logged"),
                log: Arc::clone(&log),
            }),
            None,
            ModelConfig {
                context,
                policy: policy(),
                ..ModelConfig::default()
            },
        )
        .await
        .expect("load");
    (m, log)
}

/// Submits three 30-token requests at once; returns their tags in
/// submission order and the log, once all are done.
async fn three_at_once(engine: &Engine, m: &str, log: &Log) -> (Vec<u32>, Vec<(char, u32)>) {
    assert_eq!(engine.status(m).expect("status"), ModelStatus::Idle);
    let mut streams = Vec::new();
    let mut tags = Vec::new();
    for i in 0..3 {
        let o = opts(30);
        let t = engine
            .prepare(m, &Prompt::Text(format!("req{i} a b c")), &o)
            .expect("prepare");
        tags.push(t[1]);
        streams.push(engine.submit(m, Prompt::Tokens(t), o).expect("submit"));
    }
    let mut saw_generating = false;
    for _ in 0..2000 {
        if engine.status(m).expect("status") == ModelStatus::Generating {
            saw_generating = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(saw_generating, "status answered mid-generation");
    for s in streams {
        let r = s.collect().await.expect("done");
        assert_eq!(r.tokens.len(), 30);
    }
    assert_eq!(engine.status(m).expect("status"), ModelStatus::Idle);
    let log = log.lock().expect("log").clone();
    (tags, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_sequence_requests_run_one_at_a_time_in_fifo_order() {
    let engine = engine();
    let (m, log) = logged_model(&engine, 1).await;
    let (tags, log) = three_at_once(&engine, &m, &log).await;
    // The log is three unbroken blocks, in submission order.
    let mut blocks: Vec<u32> = log.iter().map(|&(_, tag)| tag).collect();
    blocks.dedup();
    assert_eq!(blocks, tags, "FIFO, one request at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_sequences_requests_decode_together() {
    let engine = engine();
    let (m, log) = logged_model(&engine, 4).await;
    let (tags, log) = three_at_once(&engine, &m, &log).await;
    // Every request is sampled 30 times; once all three run, each step
    // samples all three, so their samples interleave.
    let samples: Vec<u32> = log
        .iter()
        .filter(|&&(k, _)| k == 'd')
        .map(|&(_, t)| t)
        .collect();
    for t in &tags {
        assert_eq!(samples.iter().filter(|&x| x == t).count(), 30);
    }
    let switches = samples.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches >= 30,
        "decodes interleave ({switches} switches in {samples:?})"
    );
    // The first request did not run alone to the end before the last
    // one started.
    let first_of_last = samples.iter().position(|&t| t == tags[2]).expect("ran");
    let last_of_first = samples.iter().rposition(|&t| t == tags[0]).expect("ran");
    assert!(first_of_last < last_of_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_context_runs_what_fits_and_queues_the_rest() {
    let engine = engine();
    // The stub's sequences share one pool of 128 cells; each request may
    // need 1 + 20 + 30 = 51 of them, so two run at once out of four
    // sequences and the others wait, FIFO.
    let (m, log) = logged_model_with(
        &engine,
        ContextParams {
            n_ctx: 128,
            n_batch: 8,
            n_threads: None,
            n_seq: 4,
            ..ContextParams::default()
        },
    )
    .await;
    let mut streams = Vec::new();
    let mut tags = Vec::new();
    for i in 0..6 {
        let o = opts(30);
        let t = engine
            .prepare(&m, &Prompt::Text(words(20, &format!("q{i}"))), &o)
            .expect("prepare");
        tags.push(t[1]);
        streams.push(engine.submit(&m, Prompt::Tokens(t), o).expect("submit"));
    }
    for s in streams {
        assert_eq!(s.collect().await.expect("done").tokens.len(), 30);
    }
    let log = log.lock().expect("log").clone();
    let spans: Vec<(usize, usize)> = tags
        .iter()
        .map(|&t| {
            let first = log.iter().position(|&(k, x)| k == 'd' && x == t);
            let last = log.iter().rposition(|&(k, x)| k == 'd' && x == t);
            (first.expect("sampled"), last.expect("sampled"))
        })
        .collect();
    let most = (0..log.len())
        .map(|i| spans.iter().filter(|&&(a, b)| a <= i && i <= b).count())
        .max();
    assert_eq!(most, Some(2), "two requests at a time: {spans:?}");
    let starts: Vec<usize> = spans.iter().map(|s| s.0).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "FIFO: {starts:?}");
    // One that cannot fit even alone is refused at once.
    let err = engine
        .prepare(&m, &Prompt::Text(words(100, "big")), &opts(30))
        .expect_err("too long");
    assert_eq!(err.name(), "context_overflow");
    let info = engine.info(&m).expect("info");
    assert!(info.kv_cells_used <= 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_tasks_each_get_exactly_one_answer() {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (engine, m) = (engine.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for r in 0..20 {
                let prompt = Prompt::Text(words(12, &format!("{t}-{}", r % 3)));
                let c = engine
                    .complete(&m, prompt, opts(3))
                    .await
                    .expect("complete");
                assert_eq!(c.tokens.len(), 3);
                ids.push(c.request_id);
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!((n, all.len()), (160, 160));
    assert!(engine.inflight().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_model_keeps_serving() {
    let engine = engine();
    let m = stub(&engine, Some("m"), TierKind::Ram).await;
    let check = |r: Result<Vec<u32>, EngineError>, name: &str| {
        assert_eq!(r.expect_err(name).name(), name);
    };
    check(
        engine.prepare(&m, &Prompt::Text(String::new()), &opts(1)),
        "empty_prompt",
    );
    check(
        engine.prepare(&m, &Prompt::Tokens(vec![]), &opts(1)),
        "empty_prompt",
    );
    check(
        engine.prepare(&m, &Prompt::Tokens(vec![1, 70_000]), &opts(1)),
        "token_out_of_range",
    );
    check(
        engine.prepare(&m, &Prompt::Tokens(vec![1; 2000]), &opts(100)),
        "context_overflow",
    );
    let neg = RequestOptions {
        sampling: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        },
        ..opts(1)
    };
    check(
        engine.prepare(&m, &Prompt::Text("a".into()), &neg),
        "invalid_input",
    );
    check(
        engine.prepare("nope", &Prompt::Text("a".into()), &opts(1)),
        "not_found",
    );
    let dup = engine
        .load_model(
            Arc::new(StubBackend::new("x")),
            Some("m".into()),
            ModelConfig::default(),
        )
        .await;
    assert_eq!(dup.expect_err("dup").name(), "already_loaded");
    let bad_tier = engine
        .load_model(
            Arc::new(StubBackend::new("x")),
            None,
            ModelConfig {
                tier: TierKind::Disk,
                ..ModelConfig::default()
            },
        )
        .await;
    assert_eq!(bad_tier.expect_err("tier").name(), "unknown_tier");
    let ok = engine
        .complete(&m, Prompt::Text("still fine".into()), opts(2))
        .await
        .expect("serving");
    assert_eq!(ok.tokens.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_saves_and_releases_the_context_and_unload_frees_the_id() {
    let engine = engine();
    let m = stub(&engine, Some("e"), TierKind::Ram).await;
    assert!(
        engine.evict(&m).await.expect("empty evict").is_empty(),
        "no-op when empty"
    );
    engine
        .complete(&m, Prompt::Text(words(4, "e")), opts(2))
        .await
        .expect("short");
    // 5 prompt tokens + the first generated one (the last is never fed):
    // below min_tokens, but evict saves regardless.
    let saved = engine.evict(&m).await.expect("evict");
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].tokens, 6);
    assert_eq!(engine.cache().counters().get(Counter::SavesEvict), 1);
    assert!(engine.cache().contains(&saved[0].key));
    assert!(
        engine.evict(&m).await.expect("again").is_empty(),
        "sequences released"
    );

    engine
        .complete(&m, Prompt::Text(words(4, "f")), opts(2))
        .await
        .expect("short");
    let summary = engine.unload(&m).await.expect("unload");
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].tokens, 6);
    assert_eq!(engine.cache().counters().get(Counter::SavesShutdown), 1);
    assert!(engine.models().is_empty());
    assert_eq!(engine.status(&m).expect_err("gone").name(), "not_found");
    assert_eq!(
        engine.unload(&m).await.expect_err("gone").name(),
        "not_found"
    );
    // The id can be reused.
    stub(&engine, Some("e"), TierKind::Ram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation() {
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let free = engine
        .complete(&m, Prompt::Text("one two".into()), opts(6))
        .await
        .expect("free");
    // Stub tokens read "<id>": stop at the third token's text.
    let stop = format!("<{}>", free.tokens[2]);
    assert!(free.text.contains(&stop));
    let cut = engine
        .complete(
            &m,
            Prompt::Text("one two".into()),
            RequestOptions {
                stop: vec![stop.clone()],
                ..opts(6)
            },
        )
        .await
        .expect("cut");
    assert_eq!(cut.stats.finish_reason, FinishReason::Stop);
    assert!(!cut.text.contains(&stop));
    assert!(free.text.starts_with(&cut.text));
}

/// A stub whose context panics when it decodes after the word "panic".
struct Panicky(StubBackend);

struct PanickyCtx(Box<dyn BackendContext>, u32);

impl Backend for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }
    fn fingerprint(&self) -> ModelFingerprint {
        self.0.fingerprint()
    }
    fn n_vocab(&self) -> u32 {
        self.0.n_vocab()
    }
    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError> {
        self.0.tokenize(text, add_bos)
    }
    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        self.0.detokenize(tokens)
    }
    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError> {
        Ok(Box::new(PanickyCtx(
            self.0.new_context(params)?,
            erllama_engine::stub_word_token("panic"),
        )))
    }
}

impl BackendContext for PanickyCtx {
    fn n_seq(&self) -> usize {
        self.0.n_seq()
    }
    fn tokens(&self, seq: SeqId) -> &[u32] {
        self.0.tokens(seq)
    }
    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError> {
        self.0.decode(batch)
    }
    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError> {
        assert!(!self.0.tokens(seq).contains(&self.1), "the backend crashed");
        self.0.sample(seq)
    }
    fn is_eog(&self, token: u32) -> Result<bool, BackendError> {
        self.0.is_eog(token)
    }
    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        self.0.kv_pack(seq)
    }
    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        self.0.kv_unpack(seq, bytes, tokens)
    }
    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError> {
        self.0.truncate(seq, n)
    }
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError> {
        self.0.copy_prefix(src, dst, n)
    }
    fn clear(&mut self, seq: SeqId) {
        self.0.clear(seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_model_fails_its_requests_and_spares_the_others() {
    let engine = engine();
    let healthy = stub(&engine, Some("healthy"), TierKind::Ram).await;
    let crashy = engine
        .load_model(
            Arc::new(Panicky(StubBackend::new("p"))),
            Some("crashy".into()),
            ModelConfig::default(),
        )
        .await
        .expect("load");
    // One request that crashes the model task, two queued behind it.
    let o = opts(5);
    let mut streams = Vec::new();
    for text in ["please panic now", "queued one", "queued two"] {
        let t = engine
            .prepare(&crashy, &Prompt::Text(text.into()), &o)
            .expect("prepare");
        streams.push(
            engine
                .submit(&crashy, Prompt::Tokens(t), o.clone())
                .expect("submit"),
        );
    }
    for s in streams {
        let err = s.collect().await.expect_err("the model crashed");
        assert_eq!(err.name(), "model_gone", "{err}");
    }
    assert_eq!(
        engine.status(&crashy).expect("status"),
        ModelStatus::Stopped
    );
    let err = engine
        .complete(&crashy, Prompt::Text("after".into()), opts(1))
        .await
        .expect_err("stopped");
    assert_eq!(err.name(), "model_gone");
    // The other model and the engine are untouched.
    let ok = engine
        .complete(&healthy, Prompt::Text("still here".into()), opts(3))
        .await
        .expect("healthy");
    assert_eq!(ok.tokens.len(), 3);
    assert!(
        engine.inflight().is_empty(),
        "crashed requests are forgotten"
    );
    engine
        .unload(&crashy)
        .await
        .expect("unload a stopped model");
    assert_eq!(engine.models(), vec!["healthy".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_change_the_fingerprint_so_rows_never_mix() {
    let root = tempfile::tempdir().expect("tmp");
    let file_a = root.path().join("a.gguf");
    let file_b = root.path().join("b.gguf");
    std::fs::write(&file_a, b"adapter a").expect("write");
    std::fs::write(&file_b, b"adapter b").expect("write");
    let engine = engine();
    let m = stub(&engine, None, TierKind::Ram).await;
    let prompt = Prompt::Text(words(40, "lora"));
    let base = engine
        .complete(&m, prompt.clone(), opts(3))
        .await
        .expect("base");
    assert_eq!(base.stats.cache_hit_kind, HitKind::Cold);
    settle(&engine).await;
    let base_fp = engine.info(&m).expect("info").fingerprint;

    let a = engine
        .load_adapter(&m, file_a.clone(), 1.0, None)
        .await
        .expect("load a");
    assert_eq!(a.id, "adapter_1");
    assert_eq!(a.sha256.len(), 64);
    // Same prompt, other adapter set: a miss, not the base model's row.
    let with_a = engine
        .complete(&m, prompt.clone(), opts(3))
        .await
        .expect("a");
    assert_eq!(with_a.stats.cache_hit_kind, HitKind::Cold);
    settle(&engine).await;
    assert_eq!(
        engine
            .complete(&m, prompt.clone(), opts(3))
            .await
            .expect("a again")
            .stats
            .cache_hit_kind,
        HitKind::Exact
    );
    // The scale is part of the fingerprint too.
    engine
        .set_adapter_scale(&m, "adapter_1", 0.5)
        .await
        .expect("scale");
    assert_eq!(
        engine
            .complete(&m, prompt.clone(), opts(3))
            .await
            .expect("half")
            .stats
            .cache_hit_kind,
        HitKind::Cold
    );
    // Scale 0 is the base model again: its row hits.
    engine
        .set_adapter_scale(&m, "adapter_1", 0.0)
        .await
        .expect("scale 0");
    assert_eq!(
        engine
            .complete(&m, prompt.clone(), opts(3))
            .await
            .expect("off")
            .stats
            .cache_hit_kind,
        HitKind::Exact
    );
    let b = engine
        .load_adapter(&m, file_b, 1.0, Some("b".into()))
        .await
        .expect("load b");
    assert_eq!(b.id, "b");
    let listed: Vec<String> = engine
        .adapters(&m)
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(listed, ["adapter_1", "b"]);
    let dup = engine
        .load_adapter(&m, file_a.clone(), 1.0, Some("b".into()))
        .await;
    assert_eq!(dup.expect_err("dup").name(), "already_loaded");
    let missing = engine
        .load_adapter(&m, root.path().join("nope.gguf"), 1.0, None)
        .await;
    assert_eq!(missing.expect_err("missing").name(), "file_not_found");
    let nan = engine.load_adapter(&m, file_a, f32::NAN, None).await;
    assert_eq!(nan.expect_err("nan").name(), "invalid_input");
    assert_eq!(
        engine
            .unload_adapter(&m, "zzz")
            .await
            .expect_err("unknown")
            .name(),
        "not_found"
    );
    engine.unload_adapter(&m, "b").await.expect("unload b");
    engine
        .unload_adapter(&m, "adapter_1")
        .await
        .expect("unload a");
    assert!(engine.adapters(&m).await.expect("list").is_empty());
    assert_eq!(engine.info(&m).expect("info").fingerprint, base_fp);
    assert_eq!(
        engine
            .complete(&m, prompt, opts(3))
            .await
            .expect("base again")
            .stats
            .cache_hit_kind,
        HitKind::Exact
    );
}
