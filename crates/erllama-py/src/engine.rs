//! The engine for Python: `Engine` (models, requests, cache) and `Stream`.
//!
//! Every call that can wait returns an awaitable (pyo3-async-runtimes on
//! one global tokio runtime); CPU work (tokenizing, loading, fingerprinting
//! a model file) runs on tokio's blocking pool, so neither the GIL nor the
//! runtime's workers are held during it. Inputs are extracted into owned
//! Rust values before anything is awaited.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use erllama_cache::{
    Cache, CacheConfig, CacheKey, FileTierConfig, FingerprintMode, PolicyConfig, RowInfo, TierKind,
};
use erllama_engine::{
    Backend, CheckOutcome, Completion, ContextParams, Engine, Event, ModelConfig, NoopSampler,
    NvmlSampler, PressureSampler, Prompt, RequestOptions, RequestStats, SamplingParams, Scheduler,
    SchedulerConfig, StubBackend, SystemSampler,
};
use erllama_llama::{LlamaBackend, ModelParams};
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::sync::Mutex as AsyncMutex;

use crate::bridge::{enter_python, future_into_py, runtime};
use crate::error::{engine_err, erllama_err, llama_err};
use crate::pybackend::PyBackend;

/// Runs CPU or file work on the blocking pool.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> PyResult<R> {
    runtime()
        .spawn_blocking(f)
        .await
        .map_err(|e| erllama_err("ErllamaError", format!("a worker task failed: {e}")))
}

fn tier(label: &str) -> PyResult<TierKind> {
    label
        .parse::<TierKind>()
        .map_err(|e| erllama_err("UnknownTierError", e.to_string()))
}

fn policy_from(map: Option<BTreeMap<String, i64>>, base: &PolicyConfig) -> PyResult<PolicyConfig> {
    let Some(map) = map else {
        return Ok(base.clone());
    };
    let mut full = base.to_map();
    full.extend(map);
    PolicyConfig::from_map(&full).map_err(|e| erllama_err("InvalidInputError", e.to_string()))
}

fn key_from_hex(hex: &str) -> PyResult<CacheKey> {
    CacheKey::from_hex(hex).map_err(|e| erllama_err("InvalidInputError", e.to_string()))
}

fn size(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| {
        erllama_err(
            "InvalidInputError",
            format!("{name} must be positive, got {v}"),
        )
    })
}

/// A prompt from Python: text, or token ids (negative ids are refused
/// here; ids beyond the vocabulary by the engine).
fn prompt_from(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(text) = obj.extract::<String>() {
        return Ok(Prompt::Text(text));
    }
    let ids: Vec<i64> = obj.extract().map_err(|_| {
        erllama_err(
            "InvalidInputError",
            "prompt must be a str or a sequence of int token ids".into(),
        )
    })?;
    let mut out = Vec::with_capacity(ids.len());
    for (index, &t) in ids.iter().enumerate() {
        let t = u32::try_from(t).map_err(|_| {
            erllama_err(
                "TokenOutOfRangeError",
                format!("token id {t} at index {index} is out of range"),
            )
        })?;
        out.push(t);
    }
    Ok(Prompt::Tokens(out))
}

fn stats_dict<'py>(py: Python<'py>, s: &RequestStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("prompt_tokens", s.prompt_tokens)?;
    d.set_item("completion_tokens", s.completion_tokens)?;
    d.set_item("prefill_ms", s.prefill_ms)?;
    d.set_item("generation_ms", s.generation_ms)?;
    d.set_item("restore_ms", s.restore_ms)?;
    d.set_item("queue_ms", s.queue_ms)?;
    d.set_item("cache_hit_kind", s.cache_hit_kind.label())?;
    d.set_item(
        "hit_source",
        s.hit_source.map(erllama_engine::HitSource::label),
    )?;
    d.set_item("cached_tokens", s.cached_tokens)?;
    d.set_item("cache_tier", s.cache_tier.map(TierKind::label))?;
    d.set_item("finish_reason", s.finish_reason.label())?;
    d.set_item("cancelled", s.cancelled)?;
    d.set_item(
        "fallback_from",
        s.restore_failure.as_ref().map(|f| f.source.label()),
    )?;
    d.set_item(
        "fallback_reason",
        s.restore_failure.as_ref().map(|f| f.reason.as_str()),
    )?;
    Ok(d)
}

fn completion_dict<'py>(py: Python<'py>, c: &Completion) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("request_id", c.request_id)?;
    d.set_item("text", &c.text)?;
    d.set_item("tokens", &c.tokens)?;
    d.set_item("stats", stats_dict(py, &c.stats)?)?;
    d.set_item("finish_key", c.finish_key.map(|k| k.to_hex()))?;
    Ok(d)
}

fn row_dict<'py>(py: Python<'py>, r: &RowInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("key", r.key.to_hex())?;
    d.set_item("tier", r.tier.label())?;
    d.set_item("status", r.status.label())?;
    d.set_item("size", r.size)?;
    d.set_item("refcount", r.refcount)?;
    d.set_item("hits", r.hits)?;
    d.set_item("last_used", r.last_used)?;
    d.set_item("tokens", r.token_count)?;
    d.set_item("save_reason", r.save_reason.label())?;
    d.set_item("context_size", r.context_size)?;
    d.set_item("created", r.created_unix)?;
    Ok(d)
}

/// The native engine. Wrapped by `erllama.Engine`.
#[pyclass(name = "Engine", module = "erllama._erllama", frozen)]
pub struct PyEngine {
    engine: Engine,
    scheduler: Scheduler,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (*, ram_quota, ram_file_dir, ram_file_quota, disk_dir, disk_quota, writer_limit, policy, scheduler, pressure_source))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        ram_quota: u64,
        ram_file_dir: Option<PathBuf>,
        ram_file_quota: u64,
        disk_dir: Option<PathBuf>,
        disk_quota: u64,
        writer_limit: Option<usize>,
        policy: BTreeMap<String, i64>,
        scheduler: SchedulerArgs,
        pressure_source: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let policy = policy_from(Some(policy), &PolicyConfig::default())?;
        let mut config = CacheConfig {
            ram_quota,
            ram_file: ram_file_dir.map(|d| FileTierConfig::new(d, ram_file_quota)),
            disk: disk_dir.map(|d| FileTierConfig::new(d, disk_quota)),
            ..CacheConfig::default()
        };
        if let Some(limit) = writer_limit {
            config.writer_limit = limit;
        }
        // Opening scans the file tiers: no GIL while it runs.
        let cache = py
            .detach(move || Cache::open(config))
            .map_err(|e| erllama_err("CacheError", e.to_string()))?;
        let engine = Engine::new(cache, policy).map_err(engine_err)?;
        let sampler = sampler_from(&pressure_source)?;
        let scheduler = Scheduler::new(engine.clone(), sampler, scheduler.into_config()?)
            .map_err(|e| erllama_err("InvalidInputError", e.to_string()))?;
        scheduler.spawn(runtime().handle());
        Ok(Self { engine, scheduler })
    }

    // --- scheduler (plain calls) ---

    fn scheduler_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = py.detach(|| self.scheduler.status());
        let d = PyDict::new(py);
        let c = &st.config;
        d.set_item("enabled", c.enabled)?;
        d.set_item(
            "interval_ms",
            u64::try_from(c.interval.as_millis()).unwrap_or(u64::MAX),
        )?;
        d.set_item("high_watermark", c.high_watermark)?;
        d.set_item("low_watermark", c.low_watermark)?;
        d.set_item("min_evict_bytes", c.min_evict_bytes)?;
        d.set_item(
            "evict_tiers",
            c.evict_tiers.iter().map(|t| t.label()).collect::<Vec<_>>(),
        )?;
        d.set_item("evict_idle_models", c.evict_idle_models)?;
        d.set_item("pressure_source", st.sampler)?;
        d.set_item("available", st.available)?;
        d.set_item("unavailable_reason", st.sampler_error)?;
        d.set_item("sampler_details", st.sampler_details)?;
        d.set_item("last_used", st.last_used)?;
        d.set_item("last_total", st.last_total)?;
        d.set_item("last_ratio", st.last_ratio)?;
        d.set_item("last_evicted_bytes", st.last_evicted_bytes)?;
        let secs = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
        };
        d.set_item("sampled_at", secs(st.sampled_at))?;
        d.set_item("last_evicted_at", secs(st.last_evicted_at))?;
        d.set_item("checks", st.checks)?;
        d.set_item("last_outcome", st.last_outcome)?;
        d.set_item(
            "tier_bytes",
            st.tier_bytes
                .iter()
                .map(|(t, b)| (t.label(), *b))
                .collect::<BTreeMap<_, _>>(),
        )?;
        Ok(d)
    }

    /// Runs one check now; (outcome label, rows, bytes, contexts).
    fn scheduler_force_check(&self, py: Python<'_>) -> (&'static str, usize, u64, usize) {
        let scheduler = self.scheduler.clone();
        let outcome = py.detach(move || runtime().block_on(scheduler.force_check()));
        match outcome {
            CheckOutcome::Evicted {
                count,
                bytes,
                contexts,
            } => ("evicted", count, bytes, contexts),
            other => (other.label(), 0, 0, 0),
        }
    }

    fn scheduler_enable(&self, on: bool) {
        self.scheduler.enable(on);
    }

    #[pyo3(signature = (high, low, min_evict_bytes=None))]
    fn scheduler_set_thresholds(
        &self,
        high: f64,
        low: f64,
        min_evict_bytes: Option<u64>,
    ) -> PyResult<()> {
        self.scheduler
            .set_thresholds(high, low, min_evict_bytes)
            .map_err(|e| erllama_err("InvalidInputError", e.to_string()))
    }

    fn scheduler_set_interval(&self, interval_ms: u64) -> PyResult<()> {
        self.scheduler
            .set_interval(Duration::from_millis(interval_ms))
            .map_err(|e| erllama_err("InvalidInputError", e.to_string()))
    }

    /// Loads a model; returns its id.
    #[pyo3(signature = (backend, *, path, model_id, n_ctx, n_batch, n_threads, n_gpu_layers, use_mmap, tier, policy, fingerprint_mode))]
    #[allow(clippy::too_many_arguments)]
    fn load_model<'py>(
        &self,
        py: Python<'py>,
        backend: Bound<'py, PyAny>,
        path: String,
        model_id: Option<String>,
        n_ctx: i64,
        n_batch: i64,
        n_threads: Option<i64>,
        n_gpu_layers: u32,
        use_mmap: bool,
        tier: &str,
        policy: Option<BTreeMap<String, i64>>,
        fingerprint_mode: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        let tier = self::tier(tier)?;
        let policy = policy_from(policy, engine.policy())?;
        let context =
            ContextParams {
                n_ctx: size("n_ctx", n_ctx)?,
                n_batch: size("n_batch", n_batch)?,
                n_threads: match n_threads {
                    None => None,
                    Some(n) => Some(u32::try_from(size("n_threads", n)?).map_err(|_| {
                        erllama_err("InvalidInputError", "n_threads too large".into())
                    })?),
                },
            };
        let mode = FingerprintMode::from_label(fingerprint_mode)
            .map_err(|e| erllama_err("InvalidInputError", e.to_string()))?;
        enum Kind {
            Llama,
            Stub,
            Python(Arc<PyBackend>),
        }
        let kind = match backend.extract::<String>() {
            Ok(name) if name == "llama" => Kind::Llama,
            Ok(name) if name == "stub" => Kind::Stub,
            Ok(name) => {
                return Err(erllama_err(
                    "InvalidInputError",
                    format!(
                    "unknown backend {name:?} (expected \"llama\", \"stub\" or a backend object)"
                ),
                ))
            }
            Err(_) => Kind::Python(Arc::new(PyBackend::new(&backend, &path)?)),
        };
        let config = ModelConfig {
            context,
            tier,
            policy,
        };
        future_into_py(py, async move {
            let backend: Arc<dyn Backend> = match kind {
                Kind::Stub => Arc::new(StubBackend::new(path)),
                Kind::Python(b) => b,
                Kind::Llama => {
                    let params = ModelParams {
                        n_gpu_layers,
                        use_mmap,
                        ..ModelParams::default()
                    };
                    let loaded = blocking(move || LlamaBackend::open(&path, &params, mode)).await?;
                    Arc::new(loaded.map_err(llama_err)?)
                }
            };
            engine
                .load_model(backend, model_id, config)
                .await
                .map_err(engine_err)
        })
    }

    /// Allocates a request id (cancellable before the request starts).
    fn reserve_request(&self, model_id: &str) -> PyResult<u64> {
        self.engine.reserve_request(model_id).map_err(engine_err)
    }

    /// Releases a reserved id that will not be submitted.
    fn release_request(&self, request_id: u64) {
        self.engine.release_request(request_id);
    }

    /// Validates, tokenizes and queues a request under a reserved id;
    /// resolves to a `Stream`.
    #[pyo3(signature = (request_id, model_id, prompt, *, max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, grammar, stop, parent_key))]
    #[allow(clippy::too_many_arguments)]
    fn submit<'py>(
        &self,
        py: Python<'py>,
        request_id: u64,
        model_id: String,
        prompt: Bound<'py, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: Option<u64>,
        grammar: Option<String>,
        stop: Option<Vec<String>>,
        parent_key: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        let prompt = prompt_from(&prompt)?;
        let max_tokens = usize::try_from(max_tokens).map_err(|_| {
            erllama_err(
                "InvalidInputError",
                format!("max_tokens must be >= 0, got {max_tokens}"),
            )
        })?;
        let top_k = u32::try_from(top_k).map_err(|_| {
            erllama_err(
                "InvalidInputError",
                format!("top_k must be >= 0, got {top_k}"),
            )
        })?;
        let options = RequestOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
                grammar,
            },
            stop: stop.unwrap_or_default(),
            parent_key: parent_key.as_deref().map(key_from_hex).transpose()?,
        };
        future_into_py(py, async move {
            let (model, opts) = (model_id.clone(), options.clone());
            let e2 = engine.clone();
            let prepared =
                blocking(move || e2.prepare(&model, &prompt, &opts).map(|t| (t, prompt)))
                    .await
                    .and_then(|r| r.map_err(engine_err));
            let (tokens, prompt) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    engine.release_request(request_id);
                    return Err(e);
                }
            };
            let text = match prompt {
                Prompt::Text(t) => t,
                Prompt::Tokens(_) => String::new(),
            };
            let stream = engine
                .submit_reserved(request_id, &model_id, tokens, text, options)
                .map_err(engine_err)?;
            Ok(PyStream {
                id: stream.id,
                model_id,
                inner: Arc::new(AsyncMutex::new(stream)),
            })
        })
    }

    /// Cancels a request; true when it was live.
    fn cancel(&self, request_id: u64) -> bool {
        self.engine.cancel(request_id)
    }

    /// Ids of loaded models.
    fn models(&self) -> Vec<String> {
        self.engine.models()
    }

    /// A model's status label.
    fn status(&self, model_id: &str) -> PyResult<&'static str> {
        Ok(self.engine.status(model_id).map_err(engine_err)?.label())
    }

    /// A model's description.
    fn info<'py>(&self, py: Python<'py>, model_id: &str) -> PyResult<Bound<'py, PyDict>> {
        let i = self.engine.info(model_id).map_err(engine_err)?;
        let d = PyDict::new(py);
        d.set_item("id", i.id)?;
        d.set_item("backend", i.backend)?;
        d.set_item("status", i.status.label())?;
        d.set_item("n_ctx", i.n_ctx)?;
        d.set_item("n_vocab", i.n_vocab)?;
        d.set_item("quant_type", i.quant_type)?;
        d.set_item("quant_bits", i.quant_bits)?;
        d.set_item("tier", i.tier.label())?;
        d.set_item("fingerprint", i.fingerprint)?;
        d.set_item("fingerprint_mode", i.fingerprint_mode)?;
        d.set_item("cacheable", i.cacheable)?;
        d.set_item("memory", i.memory)?;
        d.set_item("cache_reason", i.cache_reason)?;
        Ok(d)
    }

    /// Ids of live requests with their model.
    fn inflight(&self) -> Vec<(u64, String)> {
        self.engine.inflight()
    }

    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        text: String,
        add_bos: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let backend = self.engine.backend(&model_id).map_err(engine_err)?;
        future_into_py(py, async move {
            blocking(move || backend.tokenize(&text, add_bos))
                .await?
                .map_err(|e| engine_err(e.into()))
        })
    }

    fn detokenize<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        tokens: Vec<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let backend = self.engine.backend(&model_id).map_err(engine_err)?;
        let tokens = match prompt_from(&PyList::new(py, tokens)?.into_any())? {
            Prompt::Tokens(t) => t,
            Prompt::Text(_) => unreachable!("a list is never text"),
        };
        check_vocab(&tokens, backend.n_vocab())?;
        future_into_py(py, async move {
            blocking(move || backend.detokenize(&tokens))
                .await?
                .map_err(|e| engine_err(e.into()))
        })
    }

    fn chat_tokens<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let backend = self.engine.backend(&model_id).map_err(engine_err)?;
        future_into_py(py, async move {
            blocking(move || backend.chat_tokens(&messages, add_assistant))
                .await?
                .map_err(|e| engine_err(e.into()))
        })
    }

    fn embed<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        tokens: Vec<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let backend = self.engine.backend(&model_id).map_err(engine_err)?;
        let tokens = match prompt_from(&PyList::new(py, tokens)?.into_any())? {
            Prompt::Tokens(t) => t,
            Prompt::Text(_) => unreachable!("a list is never text"),
        };
        if tokens.is_empty() {
            return Err(erllama_err(
                "EmptyInputError",
                "embed needs at least one token".into(),
            ));
        }
        check_vocab(&tokens, backend.n_vocab())?;
        future_into_py(py, async move {
            blocking(move || backend.embed(&tokens))
                .await?
                .map_err(|e| engine_err(e.into()))
        })
    }

    /// Loads a LoRA adapter on a model; resolves to its info dict.
    #[pyo3(signature = (model_id, path, scale, adapter_id=None))]
    fn load_adapter<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        path: PathBuf,
        scale: f32,
        adapter_id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let info = engine
                .load_adapter(&model_id, path, scale, adapter_id)
                .await
                .map_err(engine_err)?;
            Ok(adapter_tuple(info))
        })
    }

    fn set_adapter_scale<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        adapter_id: String,
        scale: f32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let info = engine
                .set_adapter_scale(&model_id, &adapter_id, scale)
                .await
                .map_err(engine_err)?;
            Ok(adapter_tuple(info))
        })
    }

    fn unload_adapter<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        adapter_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            engine
                .unload_adapter(&model_id, &adapter_id)
                .await
                .map_err(engine_err)
        })
    }

    fn adapters<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let list = engine.adapters(&model_id).await.map_err(engine_err)?;
            Ok(list.into_iter().map(adapter_tuple).collect::<Vec<_>>())
        })
    }

    /// Saves the live context (reason evict) and releases it.
    fn evict<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let s = engine.evict(&model_id).await.map_err(engine_err)?;
            Ok(s.map(|s| (s.key.to_hex(), s.tokens, s.already_present)))
        })
    }

    /// Saves the live context now (reason shutdown).
    fn save_now<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let s = engine.shutdown_save(&model_id).await.map_err(engine_err)?;
            Ok(s.map(|s| (s.key.to_hex(), s.tokens, s.already_present)))
        })
    }

    fn unload<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            let s = engine.unload(&model_id).await.map_err(engine_err)?;
            Ok(s.map(|s| (s.key.to_hex(), s.tokens, s.already_present)))
        })
    }

    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let engine = self.engine.clone();
        future_into_py(py, async move {
            engine.shutdown().await;
            // Let in-flight background saves land before returning.
            for _ in 0..2000 {
                if TierKind::ALL
                    .iter()
                    .all(|&t| engine.cache().reserved_bytes(t) == 0)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
    }

    // --- cache inspection (plain calls) ---

    fn cache_counters(&self) -> BTreeMap<&'static str, u64> {
        self.engine.cache().counters().snapshot()
    }

    fn cache_reset_counters(&self) {
        self.engine.cache().counters().reset();
    }

    fn cache_dump<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let rows = py.detach(|| self.engine.cache().dump());
        rows.iter().map(|r| row_dict(py, r)).collect()
    }

    fn cache_gc(&self, py: Python<'_>) -> usize {
        py.detach(|| self.engine.cache().gc())
    }

    #[pyo3(signature = (n, tiers=None))]
    fn cache_evict_bytes(
        &self,
        py: Python<'_>,
        n: u64,
        tiers: Option<Vec<String>>,
    ) -> PyResult<(usize, u64)> {
        let tiers = match tiers {
            None => TierKind::ALL.to_vec(),
            Some(t) => t.iter().map(|s| tier(s)).collect::<PyResult<_>>()?,
        };
        Ok(py.detach(|| self.engine.cache().evict_bytes(n, &tiers)))
    }

    fn cache_bytes(&self) -> BTreeMap<&'static str, u64> {
        TierKind::ALL
            .iter()
            .map(|&t| (t.label(), self.engine.cache().bytes(t)))
            .collect()
    }

    /// Waits until no save is in flight (for tests and orderly exits).
    #[pyo3(signature = (timeout_s=30.0))]
    fn cache_settle(&self, py: Python<'_>, timeout_s: f64) -> bool {
        let cache = self.engine.cache().clone();
        py.detach(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
            loop {
                if TierKind::ALL.iter().all(|&t| cache.reserved_bytes(t) == 0) {
                    return true;
                }
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    }
}

fn check_vocab(tokens: &[u32], n_vocab: u32) -> PyResult<()> {
    match tokens.iter().position(|&t| t >= n_vocab) {
        Some(i) => Err(erllama_err(
            "TokenOutOfRangeError",
            format!(
                "token id {} at index {i} is out of range (vocabulary size {n_vocab})",
                tokens[i]
            ),
        )),
        None => Ok(()),
    }
}

/// A running request's events.
#[pyclass(name = "Stream", module = "erllama._erllama", frozen)]
pub struct PyStream {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    model_id: String,
    inner: Arc<AsyncMutex<erllama_engine::RequestStream>>,
}

#[pymethods]
impl PyStream {
    /// Resolves to `("token", id, text)`, `("done", completion_dict)`, or
    /// raises the request's error; after done, raises StopAsyncIteration.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = Arc::clone(&self.inner);
        let model = self.model_id.clone();
        future_into_py(py, async move {
            let ev = inner.lock().await.next().await;
            match ev {
                Some(Event::Token { id, text }) => closing_or(enter_python(|py| {
                    Ok(("token", id, text).into_pyobject(py)?.into_any().unbind())
                })),
                Some(Event::Done(Ok(c))) => closing_or(enter_python(|py| {
                    Ok(("done", completion_dict(py, &c)?)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind())
                })),
                Some(Event::Done(Err(e))) => Err(engine_err(e)),
                None => {
                    // Done was already delivered, or the model died.
                    Err(PyStopAsyncIteration::new_err(format!(
                        "request stream of model {model} is closed"
                    )))
                }
            }
        })
    }
}

/// A value built inside Python, or an error when the interpreter closes.
fn closing_or(v: Option<PyResult<Py<PyAny>>>) -> PyResult<Py<PyAny>> {
    v.unwrap_or_else(|| {
        Err(pyo3::exceptions::PyRuntimeError::new_err(
            "the interpreter is shutting down",
        ))
    })
}

/// (id, path, sha256, scale) of an adapter.
fn adapter_tuple(a: erllama_engine::AdapterInfo) -> (String, String, String, f32) {
    (a.id, a.path.display().to_string(), a.sha256, a.scale)
}

/// Scheduler settings from Python (`SchedulerConfig` fields).
#[derive(FromPyObject)]
pub struct SchedulerArgs {
    #[pyo3(item)]
    enabled: bool,
    #[pyo3(item)]
    interval_ms: i64,
    #[pyo3(item)]
    high_watermark: f64,
    #[pyo3(item)]
    low_watermark: f64,
    #[pyo3(item)]
    min_evict_bytes: i64,
    #[pyo3(item)]
    evict_tiers: Vec<String>,
    #[pyo3(item)]
    evict_idle_models: bool,
}

impl SchedulerArgs {
    fn into_config(self) -> PyResult<SchedulerConfig> {
        let bad = |m: String| erllama_err("InvalidInputError", m);
        let interval = u64::try_from(self.interval_ms)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| {
                bad(format!(
                    "interval_ms must be positive, got {}",
                    self.interval_ms
                ))
            })?;
        let min_evict_bytes = u64::try_from(self.min_evict_bytes).map_err(|_| {
            bad(format!(
                "min_evict_bytes must be >= 0, got {}",
                self.min_evict_bytes
            ))
        })?;
        let evict_tiers = if self.evict_tiers.len() == 1 && self.evict_tiers[0] == "all" {
            TierKind::ALL.to_vec()
        } else {
            self.evict_tiers
                .iter()
                .map(|t| tier(t))
                .collect::<PyResult<_>>()?
        };
        let config = SchedulerConfig {
            enabled: self.enabled,
            interval: Duration::from_millis(interval),
            high_watermark: self.high_watermark,
            low_watermark: self.low_watermark,
            min_evict_bytes,
            evict_tiers,
            evict_idle_models: self.evict_idle_models,
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        Ok(config)
    }
}

/// `"system"`, `"nvml"`, `"noop"`, or a Python object with `sample()`.
fn sampler_from(source: &Bound<'_, PyAny>) -> PyResult<Box<dyn PressureSampler>> {
    if let Ok(name) = source.extract::<String>() {
        return match name.as_str() {
            "system" => Ok(Box::new(SystemSampler::new())),
            "nvml" => Ok(Box::new(NvmlSampler::new())),
            "noop" => Ok(Box::new(NoopSampler)),
            other => Err(erllama_err(
                "InvalidInputError",
                format!("unknown pressure source {other:?} (system, nvml, noop or an object with sample())"),
            )),
        };
    }
    if !source.hasattr("sample")? {
        return Err(erllama_err(
            "InvalidInputError",
            "a pressure source object needs a sample() method returning (used_bytes, total_bytes)"
                .into(),
        ));
    }
    Ok(Box::new(crate::pybackend::PySampler::new(source)))
}

/// (used, total, details) of one pressure sample.
type PressureReading = (u64, u64, Vec<(String, String)>);

/// Samples a built-in source once: (used, total), or raises
/// `NotSupportedError` with the reason when it is unavailable here.
#[pyfunction]
pub fn sample_pressure(py: Python<'_>, source: &str) -> PyResult<PressureReading> {
    let sampler: Box<dyn PressureSampler> = match source {
        "system" => Box::new(SystemSampler::new()),
        "nvml" => Box::new(NvmlSampler::new()),
        "noop" => Box::new(NoopSampler),
        other => {
            return Err(erllama_err(
                "InvalidInputError",
                format!("unknown pressure source {other:?}"),
            ))
        }
    };
    let (sample, details) = py.detach(|| (sampler.sample(), sampler.details()));
    match sample {
        Ok(s) => Ok((s.used, s.total, details)),
        Err(e) => Err(erllama_err("NotSupportedError", format!("{source}: {e}"))),
    }
}
