//! The memory-pressure scheduler (docs/scheduler.md): off by default; when on, it
//! samples memory every interval and, above the high watermark, evicts
//! least-recently-used cache rows of the chosen tiers.
//!
//! One check: sample `(used, total)`; below `high_watermark` (or an
//! unknown total) nothing happens; otherwise evict
//! `max(⌊(high − low) × total⌋, min_evict_bytes)` bytes, LRU first, from
//! `evict_tiers` (pinned and being-written rows are never touched). Beyond
//! the spec, with `evict_idle_models` on, when cache eviction alone does
//! not bring usage under the high watermark, idle models are asked to
//! `evict` (save and release) their live contexts, largest first, until it
//! does. A sampler that cannot sample (no GPU, no driver) makes the check
//! a skip, never an error.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use erllama_cache::TierKind;
use tokio::sync::Notify;

use crate::engine::Engine;
use crate::pressure::{PressureSampler, Sample, SamplerError};

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Whether periodic checks run.
    pub enabled: bool,
    /// Time between checks.
    pub interval: Duration,
    /// Checks evict when `used / total >= high_watermark`.
    pub high_watermark: f64,
    /// Eviction aims `(high − low) × total` bytes below the high mark.
    pub low_watermark: f64,
    /// The least a check that evicts frees.
    pub min_evict_bytes: u64,
    /// Tiers evicted from.
    pub evict_tiers: Vec<TierKind>,
    /// Also ask idle models to save and release their contexts.
    pub evict_idle_models: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Duration::from_millis(5000),
            high_watermark: 0.85,
            low_watermark: 0.75,
            min_evict_bytes: 1 << 20,
            evict_tiers: vec![TierKind::Ram, TierKind::RamFile],
            evict_idle_models: false,
        }
    }
}

/// An invalid scheduler setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scheduler setting: {0}")]
pub struct SchedulerError(pub String);

fn validate_thresholds(high: f64, low: f64) -> Result<(), SchedulerError> {
    if !(high.is_finite() && low.is_finite()) {
        return Err(SchedulerError("watermarks must be finite".into()));
    }
    if high > 1.0 {
        return Err(SchedulerError(format!("high_watermark {high} is above 1")));
    }
    if low < 0.0 {
        return Err(SchedulerError(format!("low_watermark {low} is below 0")));
    }
    if high <= low {
        return Err(SchedulerError(format!(
            "high_watermark {high} must be above low_watermark {low}"
        )));
    }
    Ok(())
}

impl SchedulerConfig {
    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`SchedulerError`] naming the first bad value: high > low, high ≤ 1,
    /// low ≥ 0, a positive interval, at least one tier.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        validate_thresholds(self.high_watermark, self.low_watermark)?;
        if self.interval.is_zero() {
            return Err(SchedulerError("interval must be positive".into()));
        }
        if self.evict_tiers.is_empty() {
            return Err(SchedulerError("evict_tiers is empty".into()));
        }
        Ok(())
    }
}

/// What a check did (docs/scheduler.md's four results, plus an unavailable sampler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The scheduler is disabled.
    SkippedDisabled,
    /// Usage is under the high watermark (or the total is unknown).
    SkippedBelowWatermark,
    /// Over the watermark, but nothing could be evicted (all pinned, being
    /// written, or in other tiers).
    SkippedNothingToEvict,
    /// The sampler gave no reading (the reason is in the status).
    SkippedUnavailable,
    /// Rows (and, with `evict_idle_models`, live contexts) were evicted.
    Evicted {
        /// Cache rows evicted.
        count: usize,
        /// Bytes they held.
        bytes: u64,
        /// Model contexts saved and released.
        contexts: usize,
    },
}

impl CheckOutcome {
    /// `skipped(disabled)`, `skipped(below_watermark)`,
    /// `skipped(nothing_to_evict)`, `skipped(unavailable)` or `evicted`.
    #[must_use]
    pub const fn label(&self) -> &'static str {
        match self {
            CheckOutcome::SkippedDisabled => "skipped(disabled)",
            CheckOutcome::SkippedBelowWatermark => "skipped(below_watermark)",
            CheckOutcome::SkippedNothingToEvict => "skipped(nothing_to_evict)",
            CheckOutcome::SkippedUnavailable => "skipped(unavailable)",
            CheckOutcome::Evicted { .. } => "evicted",
        }
    }
}

/// What [`Scheduler::status`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerStatus {
    /// The settings now.
    pub config: SchedulerConfig,
    /// The sampler's name.
    pub sampler: String,
    /// Whether the last sample worked (`None` before the first).
    pub available: Option<bool>,
    /// Why the last sample failed.
    pub sampler_error: Option<String>,
    /// The sampler's own figures (e.g. per GPU).
    pub sampler_details: Vec<(String, String)>,
    /// Last reading: bytes used.
    pub last_used: u64,
    /// Last reading: bytes total.
    pub last_total: u64,
    /// `last_used / last_total` (0 when the total is 0).
    pub last_ratio: f64,
    /// Bytes freed by the last check that evicted.
    pub last_evicted_bytes: u64,
    /// When the last sample was taken.
    pub sampled_at: Option<SystemTime>,
    /// When the last eviction happened.
    pub last_evicted_at: Option<SystemTime>,
    /// Checks run so far.
    pub checks: u64,
    /// The last check's outcome label.
    pub last_outcome: Option<&'static str>,
    /// Bytes held per tier now.
    pub tier_bytes: Vec<(TierKind, u64)>,
}

#[derive(Debug)]
struct State {
    config: SchedulerConfig,
    last: Option<Sample>,
    sampler_error: Option<String>,
    last_evicted_bytes: u64,
    sampled_at: Option<SystemTime>,
    last_evicted_at: Option<SystemTime>,
    checks: u64,
    last_outcome: Option<&'static str>,
}

struct Inner {
    engine: Engine,
    sampler: Box<dyn PressureSampler>,
    state: Mutex<State>,
    wake: Notify,
    /// Serialises checks (periodic and forced).
    check_lock: tokio::sync::Mutex<()>,
}

/// The scheduler; a cheap handle (clone freely).
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("sampler", &self.inner.sampler.name())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `engine`'s cache and models, reading `sampler`.
    /// Call [`Scheduler::spawn`] to start the periodic task.
    ///
    /// # Errors
    ///
    /// [`SchedulerError`] for invalid settings.
    pub fn new(
        engine: Engine,
        sampler: Box<dyn PressureSampler>,
        config: SchedulerConfig,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                sampler,
                state: Mutex::new(State {
                    config,
                    last: None,
                    sampler_error: None,
                    last_evicted_bytes: 0,
                    sampled_at: None,
                    last_evicted_at: None,
                    checks: 0,
                    last_outcome: None,
                }),
                wake: Notify::new(),
                check_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the periodic task on `runtime`. It checks every interval
    /// while enabled, picks up setting changes at once, and ends when the
    /// last handle is dropped.
    pub fn spawn(&self, runtime: &tokio::runtime::Handle) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let interval = inner
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .config
                    .interval;
                let woken = {
                    let wake = inner.wake.notified();
                    tokio::select! {
                        () = tokio::time::sleep(interval) => false,
                        () = wake => true,
                    }
                };
                if woken {
                    continue; // settings changed: restart the wait
                }
                let scheduler = Scheduler { inner };
                if scheduler.state().config.enabled {
                    scheduler.run_check().await;
                }
            }
        });
    }

    /// Runs one check now, whatever the interval (disabled → skipped).
    pub async fn force_check(&self) -> CheckOutcome {
        if !self.state().config.enabled {
            let outcome = CheckOutcome::SkippedDisabled;
            self.state().last_outcome = Some(outcome.label());
            return outcome;
        }
        self.run_check().await
    }

    fn sample(&self) -> Result<Sample, SamplerError> {
        let result = self.inner.sampler.sample().and_then(|s| {
            if s.used > s.total && s.total > 0 {
                Err(SamplerError::Failed(format!(
                    "used {} exceeds total {}",
                    s.used, s.total
                )))
            } else {
                Ok(s)
            }
        });
        let mut st = self.state();
        st.sampled_at = Some(SystemTime::now());
        match &result {
            Ok(s) => {
                st.last = Some(*s);
                st.sampler_error = None;
            }
            Err(e) => st.sampler_error = Some(e.to_string()),
        }
        result
    }

    fn over(config: &SchedulerConfig, s: Sample) -> bool {
        s.total > 0 && s.used as f64 / s.total as f64 >= config.high_watermark
    }

    async fn run_check(&self) -> CheckOutcome {
        let _one_at_a_time = self.inner.check_lock.lock().await;
        let outcome = self.check_inner().await;
        let mut st = self.state();
        st.checks += 1;
        st.last_outcome = Some(outcome.label());
        if let CheckOutcome::Evicted { bytes, .. } = outcome {
            st.last_evicted_bytes = bytes;
            st.last_evicted_at = Some(SystemTime::now());
        }
        outcome
    }

    async fn check_inner(&self) -> CheckOutcome {
        let config = self.state().config.clone();
        let Ok(sample) = self.sample() else {
            return CheckOutcome::SkippedUnavailable;
        };
        if !Self::over(&config, sample) {
            return CheckOutcome::SkippedBelowWatermark;
        }
        let span = ((config.high_watermark - config.low_watermark) * sample.total as f64).floor();
        // The span is finite and in [0, total]: the cast is exact enough.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 <= span <= total, a u64"
        )]
        let target = (span as u64).max(config.min_evict_bytes);
        let (count, bytes) = self
            .inner
            .engine
            .cache()
            .evict_bytes(target, &config.evict_tiers);
        let mut contexts = 0;
        if config.evict_idle_models {
            let mut still_over = match self.sample() {
                Ok(s) => Self::over(&config, s),
                Err(_) => false,
            };
            for (model, _tokens) in self.inner.engine.idle_models_by_size() {
                if !still_over {
                    break;
                }
                if self
                    .inner
                    .engine
                    .evict(&model)
                    .await
                    .is_ok_and(|saved| !saved.is_empty())
                {
                    contexts += 1;
                }
                still_over = match self.sample() {
                    Ok(s) => Self::over(&config, s),
                    Err(_) => false,
                };
            }
        }
        if count == 0 && contexts == 0 {
            CheckOutcome::SkippedNothingToEvict
        } else {
            CheckOutcome::Evicted {
                count,
                bytes,
                contexts,
            }
        }
    }

    /// Turns periodic checks on or off.
    pub fn enable(&self, on: bool) {
        self.state().config.enabled = on;
        self.inner.wake.notify_waiters();
    }

    /// Changes the watermarks (and optionally `min_evict_bytes`) live.
    ///
    /// # Errors
    ///
    /// [`SchedulerError`] unless high > low, high ≤ 1 and low ≥ 0 (the
    /// settings are unchanged then).
    pub fn set_thresholds(
        &self,
        high: f64,
        low: f64,
        min_evict_bytes: Option<u64>,
    ) -> Result<(), SchedulerError> {
        validate_thresholds(high, low)?;
        let mut st = self.state();
        st.config.high_watermark = high;
        st.config.low_watermark = low;
        if let Some(m) = min_evict_bytes {
            st.config.min_evict_bytes = m;
        }
        Ok(())
    }

    /// Changes the check interval live.
    ///
    /// # Errors
    ///
    /// [`SchedulerError`] for a zero interval.
    pub fn set_interval(&self, interval: Duration) -> Result<(), SchedulerError> {
        if interval.is_zero() {
            return Err(SchedulerError("interval must be positive".into()));
        }
        self.state().config.interval = interval;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    /// The settings, the last readings and the bytes per tier.
    #[must_use]
    pub fn status(&self) -> SchedulerStatus {
        let cache = self.inner.engine.cache();
        let tier_bytes = TierKind::ALL.iter().map(|&t| (t, cache.bytes(t))).collect();
        let details = self.inner.sampler.details();
        let st = self.state();
        let (used, total) = st.last.map_or((0, 0), |s| (s.used, s.total));
        SchedulerStatus {
            config: st.config.clone(),
            sampler: self.inner.sampler.name().to_owned(),
            available: st.sampled_at.map(|_| st.sampler_error.is_none()),
            sampler_error: st.sampler_error.clone(),
            sampler_details: details,
            last_used: used,
            last_total: total,
            last_ratio: if total == 0 {
                0.0
            } else {
                used as f64 / total as f64
            },
            last_evicted_bytes: st.last_evicted_bytes,
            sampled_at: st.sampled_at,
            last_evicted_at: st.last_evicted_at,
            checks: st.checks,
            last_outcome: st.last_outcome,
            tier_bytes,
        }
    }
}
