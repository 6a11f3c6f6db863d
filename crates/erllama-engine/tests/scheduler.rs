//! The memory-pressure scheduler with scripted samplers: every check
//! outcome, the eviction arithmetic, the tier filter, pins, live
//! thresholds, periodic checks in paused time, idle-model eviction.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use erllama_cache::{
    Cache, CacheConfig, FileTierConfig, FingerprintMode, ModelIdentity, PolicyConfig, QuantType,
    SaveReason, SaveRequest, TierKind,
};
use erllama_engine::{
    CheckOutcome, ContextParams, Engine, ModelConfig, PressureSampler, Prompt, RequestOptions,
    Sample, SamplerError, Scheduler, SchedulerConfig, StubBackend,
};

/// A sampler whose reading the test sets; counts its calls.
#[derive(Default)]
struct Scripted {
    used: AtomicU64,
    total: AtomicU64,
    calls: AtomicUsize,
    unavailable: std::sync::atomic::AtomicBool,
}

impl Scripted {
    fn set(&self, used: u64, total: u64) {
        self.used.store(used, Ordering::SeqCst);
        self.total.store(total, Ordering::SeqCst);
    }
}

struct Shared(Arc<Scripted>);

impl PressureSampler for Shared {
    fn name(&self) -> &str {
        "scripted"
    }
    fn sample(&self) -> Result<Sample, SamplerError> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if self.0.unavailable.load(Ordering::SeqCst) {
            return Err(SamplerError::Unavailable("no device".into()));
        }
        Ok(Sample {
            used: self.0.used.load(Ordering::SeqCst),
            total: self.0.total.load(Ordering::SeqCst),
        })
    }
}

fn identity() -> Arc<ModelIdentity> {
    Arc::new(ModelIdentity {
        fingerprint: [7; 32],
        fingerprint_mode: FingerprintMode::FastUnsafe,
        quant_type: QuantType::F32,
        ctx_params_hash: [9; 32],
        context_size: 4096,
    })
}

fn row(cache: &Cache, tier: TierKind, first: u32, len: usize) -> erllama_cache::CacheKey {
    cache
        .save(SaveRequest {
            identity: identity(),
            tier,
            tokens: vec![first, 1, 2].into(),
            payload: vec![first as u8; len],
            logits_count: 0,
            reason: SaveReason::Finish,
            prompt_text: String::new(),
            detail: None,
        })
        .expect("save")
        .key
}

fn setup(config: SchedulerConfig) -> (tempfile::TempDir, Engine, Scheduler, Arc<Scripted>) {
    let root = tempfile::tempdir().expect("tmp");
    let cache = Cache::open(CacheConfig {
        disk: Some(FileTierConfig::new(root.path().join("disk"), 1 << 30)),
        ..CacheConfig::default()
    })
    .expect("cache");
    let engine = Engine::new(cache, PolicyConfig::default()).expect("engine");
    let script = Arc::new(Scripted::default());
    let scheduler = Scheduler::new(
        engine.clone(),
        Box::new(Shared(Arc::clone(&script))),
        config,
    )
    .expect("new");
    (root, engine, scheduler, script)
}

fn on() -> SchedulerConfig {
    SchedulerConfig {
        enabled: true,
        min_evict_bytes: 1,
        ..SchedulerConfig::default()
    }
}

#[tokio::test]
async fn every_outcome_of_force_check() {
    let (_root, engine, s, script) = setup(SchedulerConfig::default());
    assert_eq!(s.force_check().await, CheckOutcome::SkippedDisabled);
    s.enable(true);
    script.set(10, 100);
    assert_eq!(s.force_check().await, CheckOutcome::SkippedBelowWatermark);
    script.set(0, 0);
    assert_eq!(
        s.force_check().await,
        CheckOutcome::SkippedBelowWatermark,
        "total 0"
    );
    script.set(95, 100);
    assert_eq!(s.force_check().await, CheckOutcome::SkippedNothingToEvict);
    row(engine.cache(), TierKind::Ram, 1, 100);
    assert!(matches!(
        s.force_check().await,
        CheckOutcome::Evicted {
            count: 1,
            contexts: 0,
            ..
        }
    ));
    script.unavailable.store(true, Ordering::SeqCst);
    assert_eq!(s.force_check().await, CheckOutcome::SkippedUnavailable);
    let st = s.status();
    assert_eq!(st.available, Some(false));
    assert!(st.sampler_error.expect("error").contains("no device"));
    assert_eq!(st.last_outcome, Some("skipped(unavailable)"));
}

#[tokio::test]
async fn eviction_target_arithmetic_lru_first() {
    // 95/100 with high 0.85 and low 0.75: at least ⌊0.10 × 100⌋ = 10 bytes.
    let (_root, engine, s, script) = setup(on());
    let cache = engine.cache();
    let keys: Vec<_> = (1..=4).map(|i| row(cache, TierKind::Ram, i, 1)).collect();
    let size = cache.peek(&keys[0]).expect("row").size;
    // Touch the first row: the second becomes least recently used.
    drop(cache.claim(&keys[0]).expect("claim"));
    script.set(95, 100);
    let CheckOutcome::Evicted { count, bytes, .. } = s.force_check().await else {
        panic!("expected an eviction")
    };
    assert!(bytes >= 10);
    assert_eq!(count as u64, 10u64.div_ceil(size));
    assert!(!cache.contains(&keys[1]), "the LRU row went first");
    assert!(cache.contains(&keys[0]), "the recently used row stays");
    let st = s.status();
    assert_eq!((st.last_used, st.last_total), (95, 100));
    assert!((st.last_ratio - 0.95).abs() < 1e-9);
    assert_eq!(st.last_evicted_bytes, bytes);
    assert!(st.last_evicted_at.is_some() && st.sampled_at.is_some());

    // min_evict_bytes raises the target.
    s.set_thresholds(0.85, 0.75, Some(u64::MAX))
        .expect("thresholds");
    let left = cache.len();
    assert!(matches!(s.force_check().await, CheckOutcome::Evicted { count, .. } if count == left));
}

#[tokio::test]
async fn the_tier_filter_spares_disk_unless_asked() {
    let (_root, engine, s, script) = setup(on());
    let cache = engine.cache();
    let disk = row(cache, TierKind::Disk, 1, 1000);
    script.set(99, 100);
    assert_eq!(s.force_check().await, CheckOutcome::SkippedNothingToEvict);
    assert!(cache.contains(&disk));
    let (_root2, engine2, s_all, script2) = setup(SchedulerConfig {
        evict_tiers: TierKind::ALL.to_vec(),
        ..on()
    });
    let disk2 = row(engine2.cache(), TierKind::Disk, 1, 1000);
    script2.set(99, 100);
    assert!(matches!(
        s_all.force_check().await,
        CheckOutcome::Evicted { count: 1, .. }
    ));
    assert!(!engine2.cache().contains(&disk2));
    assert_eq!(engine2.cache().bytes(TierKind::Disk), 0);
}

#[tokio::test]
async fn pinned_rows_are_never_evicted() {
    let (_root, engine, s, script) = setup(on());
    let cache = engine.cache();
    let pinned = row(cache, TierKind::Ram, 1, 100);
    let free = row(cache, TierKind::Ram, 2, 100);
    let claim = cache.claim(&pinned).expect("pin");
    script.set(99, 100);
    s.set_thresholds(0.5, 0.0, Some(u64::MAX))
        .expect("thresholds");
    assert!(matches!(
        s.force_check().await,
        CheckOutcome::Evicted { count: 1, .. }
    ));
    assert!(cache.contains(&pinned) && !cache.contains(&free));
    assert_eq!(s.force_check().await, CheckOutcome::SkippedNothingToEvict);
    drop(claim);
}

#[tokio::test]
async fn thresholds_change_live_and_bad_values_are_refused() {
    let (_root, engine, s, script) = setup(on());
    row(engine.cache(), TierKind::Ram, 1, 10);
    script.set(60, 100);
    assert_eq!(s.force_check().await, CheckOutcome::SkippedBelowWatermark);
    s.set_thresholds(0.5, 0.4, None).expect("lower");
    assert!(matches!(
        s.force_check().await,
        CheckOutcome::Evicted { .. }
    ));
    for (high, low) in [
        (0.5, 0.5),
        (0.4, 0.5),
        (1.1, 0.5),
        (0.9, -0.1),
        (f64::NAN, 0.1),
    ] {
        assert!(s.set_thresholds(high, low, None).is_err(), "{high} {low}");
    }
    let st = s.status();
    assert_eq!(
        (st.config.high_watermark, st.config.low_watermark),
        (0.5, 0.4)
    );
    assert!(s.set_interval(Duration::ZERO).is_err());
    assert!(Scheduler::new(
        engine.clone(),
        Box::new(erllama_engine::NoopSampler),
        SchedulerConfig {
            evict_tiers: vec![],
            ..SchedulerConfig::default()
        }
    )
    .is_err());
}

#[tokio::test(start_paused = true)]
async fn periodic_checks_follow_the_interval_and_stop_when_disabled() {
    let (_root, _engine, s, script) = setup(SchedulerConfig {
        interval: Duration::from_millis(1000),
        ..SchedulerConfig::default()
    });
    script.set(1, 100);
    s.spawn(&tokio::runtime::Handle::current());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(s.status().checks, 0, "disabled: no checks");
    s.enable(true);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(s.status().checks, 3, "one per second while enabled");
    s.set_interval(Duration::from_millis(100))
        .expect("interval");
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(s.status().checks, 13);
    s.enable(false);
    let before = script.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5000)).await;
    assert_eq!(script.calls.load(Ordering::SeqCst), before, "stopped");
}

/// High pressure until the RAM tier holds something (a saved context).
struct CacheAware(Cache);

impl PressureSampler for CacheAware {
    fn name(&self) -> &str {
        "cache-aware"
    }
    fn sample(&self) -> Result<Sample, SamplerError> {
        let used = if self.0.bytes(TierKind::Ram) > 0 {
            10
        } else {
            99
        };
        Ok(Sample { used, total: 100 })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_release_their_contexts_when_the_cache_is_not_enough() {
    let (_root, engine, _, _) = setup(on());
    let s = Scheduler::new(
        engine.clone(),
        Box::new(CacheAware(engine.cache().clone())),
        SchedulerConfig {
            evict_idle_models: true,
            ..on()
        },
    )
    .expect("scheduler");
    // A policy that saves nothing on its own: only evict saves fill the cache.
    let policy = PolicyConfig {
        min_tokens: 100_000,
        cold_min_tokens: 100_000,
        cold_max_tokens: 100_000,
        ..PolicyConfig::default()
    };
    for (name, words) in [("small", 5), ("big", 50)] {
        let id = engine
            .load_model(
                Arc::new(StubBackend::new(name)),
                Some(name.into()),
                ModelConfig {
                    context: ContextParams::default(),
                    tier: TierKind::Ram,
                    policy: policy.clone(),
                },
            )
            .await
            .expect("load");
        let text = (0..words)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let options = RequestOptions {
            max_tokens: 2,
            ..RequestOptions::default()
        };
        engine
            .complete(&id, Prompt::Text(text), options)
            .await
            .expect("complete");
    }
    assert_eq!(
        engine.idle_models_by_size(),
        vec![("big".to_owned(), 52), ("small".to_owned(), 7)],
        "KV cells in use: BOS + words + the first generated token"
    );
    // The cache is empty, so only releasing contexts helps; the largest
    // goes first, and one is enough here.
    let outcome = s.force_check().await;
    assert_eq!(
        outcome,
        CheckOutcome::Evicted {
            count: 0,
            bytes: 0,
            contexts: 1
        }
    );
    assert_eq!(engine.idle_models_by_size(), vec![("small".to_owned(), 7)]);
    // Without the opt-in, the same pressure finds nothing to evict.
    engine.cache().gc();
    let plain = Scheduler::new(
        engine.clone(),
        Box::new(CacheAware(engine.cache().clone())),
        on(),
    )
    .expect("scheduler");
    assert_eq!(
        plain.force_check().await,
        CheckOutcome::SkippedNothingToEvict
    );
}
