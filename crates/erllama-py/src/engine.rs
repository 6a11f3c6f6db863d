//! The engine for Python: `Engine` (models, requests, cache, scheduler).
//!
//! Every call that can wait returns an awaitable (one global tokio
//! runtime); CPU and file work (tokenizing, loading, fingerprinting) runs on
//! tokio's blocking pool, so neither the GIL nor the runtime's workers are
//! held during it. Every value from Python is checked in [`crate::args`]
//! before it reaches the engine, every result is a typed record
//! ([`crate::records`]), every error goes through [`crate::error`], and
//! every method runs under [`guard`], so a panic is an `InternalError`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use erllama_cache::{
    Cache, CacheConfig, FileLoad, FileTierConfig, FingerprintMode, PolicyConfig, RemoteConfig,
    TierKind,
};
use erllama_engine::{
    Backend, ContextParams, Engine, ModelConfig, NoopSampler, NvmlSampler, PressureSampler, Prompt,
    Scheduler, SchedulerConfig, StubBackend, SystemSampler,
};
use erllama_llama::{LlamaBackend, ModelParams};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::args::{float_where, int_in, str_arg, u32_in, u64_in, usize_in, RequestArgs};
use crate::bridge::{future_into_py, runtime};
use crate::error::{engine_err, err, guard, invalid, llama_err, Kind};
use crate::pybackend::PyBackend;
use crate::records::{AdapterInfo, CacheRow, CheckResult, ModelInfo, SaveSummary, SchedulerStatus};
use crate::stream::PyStream;

/// Runs CPU or file work on the blocking pool.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> PyResult<R> {
    match runtime().spawn_blocking(f).await {
        Ok(r) => Ok(r),
        Err(e) if e.is_panic() => Err(crate::error::internal("a worker task", &e.into_panic())),
        Err(e) => Err(err(Kind::Internal, format!("a worker task failed: {e}"))),
    }
}

fn tier(label: &str) -> PyResult<TierKind> {
    label
        .parse::<TierKind>()
        .map_err(|e| err(Kind::UnknownTier, e.to_string()))
}

/// A policy from a name → int mapping over `base`.
fn policy_from(map: Option<&Bound<'_, PyDict>>, base: &PolicyConfig) -> PyResult<PolicyConfig> {
    let Some(map) = map else {
        return Ok(base.clone());
    };
    let mut full = base.to_map();
    for (k, v) in map.iter() {
        let name: String = k
            .extract()
            .map_err(|_| invalid("policy keys must be str"))?;
        let value = int_in(&v, &format!("policy.{name}"), 0, i128::from(i64::MAX))?;
        full.insert(name, i64::try_from(value).unwrap_or(i64::MAX));
    }
    PolicyConfig::from_map(&full).map_err(|e| invalid(e.to_string()))
}

/// An int argument that may be `None`.
/// The remote tier's settings from `CacheConfig`'s `remote_*` fields
/// (a dict: url, prefix, quota, ttl_s, timeout_s, connect_timeout_s,
/// retry_s), checked again here.
fn remote_config(d: &Bound<'_, PyDict>) -> PyResult<RemoteConfig> {
    let field = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(d.get_item(name)?.filter(|v| !v.is_none()))
    };
    let url = field("url")?.ok_or_else(|| invalid("remote_url is required"))?;
    let mut r = RemoteConfig::new(str_arg(&url, "remote_url", 4096)?);
    let secs = |v: &Bound<'_, PyAny>, name: &str, max: f64| -> PyResult<Duration> {
        let v = float_where(v, name, &format!("in (0, {max}]"), |x| x > 0.0 && x <= max)?;
        Ok(Duration::from_secs_f64(v))
    };
    if let Some(v) = field("prefix")? {
        r.prefix = str_arg(&v, "remote_prefix", 64)?;
    }
    if let Some(v) = field("quota")? {
        r.quota = u64_in(&v, "remote_quota", 1, MAX_QUOTA)?;
    }
    if let Some(v) = field("ttl_s")? {
        r.ttl = Some(secs(&v, "remote_ttl_s", 365.0 * 86400.0)?);
    }
    if let Some(v) = field("timeout_s")? {
        r.op_timeout = secs(&v, "remote_timeout_s", 600.0)?;
    }
    if let Some(v) = field("connect_timeout_s")? {
        r.connect_timeout = secs(&v, "remote_connect_timeout_s", 600.0)?;
    }
    if let Some(v) = field("retry_s")? {
        r.retry_after = secs(&v, "remote_retry_s", 3600.0)?;
    }
    r.validate().map_err(invalid)?;
    Ok(r)
}

fn opt<T>(
    obj: Option<&Bound<'_, PyAny>>,
    f: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    match obj {
        Some(o) if !o.is_none() => f(o).map(Some),
        _ => Ok(None),
    }
}

/// A path argument: a `str` or `os.PathLike`, no NUL.
fn path_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<PathBuf> {
    let path: PathBuf = obj
        .extract()
        .map_err(|_| invalid(format!("{name} must be a str or os.PathLike")))?;
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid(format!("{name} contains a NUL character")));
    }
    Ok(path)
}

/// A prompt from Python: text, or token ids (negative or huge ids are
/// refused here; ids beyond the vocabulary by the engine).
fn prompt_from(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if obj.is_instance_of::<PyString>() {
        return Ok(Prompt::Text(str_arg(obj, "prompt", usize::MAX)?));
    }
    if obj.is_instance_of::<PyBytes>() {
        return Err(invalid(
            "prompt must be a str or a sequence of int token ids, not bytes",
        ));
    }
    let iter = obj
        .try_iter()
        .map_err(|_| invalid("prompt must be a str or a sequence of int token ids"))?;
    token_list(iter, "prompt")
}

fn token_list(iter: Bound<'_, pyo3::types::PyIterator>, what: &str) -> PyResult<Prompt> {
    let mut out = Vec::new();
    for (index, item) in iter.enumerate() {
        let item = item?;
        let t =
            int_in(&item, &format!("{what}[{index}]"), 0, i128::from(u32::MAX)).map_err(|_| {
                err(
                    Kind::TokenOutOfRange,
                    format!(
                        "token id {} at index {index} is out of range",
                        item.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                    ),
                )
            })?;
        out.push(u32::try_from(t).unwrap_or(u32::MAX));
    }
    Ok(Prompt::Tokens(out))
}

fn tokens_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    let iter = obj
        .try_iter()
        .map_err(|_| invalid(format!("{what} must be a sequence of int token ids")))?;
    match token_list(iter, what)? {
        Prompt::Tokens(t) => Ok(t),
        Prompt::Text(_) => Err(invalid(format!("{what} must be token ids"))),
    }
}

fn check_vocab(tokens: &[u32], n_vocab: u32) -> PyResult<()> {
    match tokens.iter().position(|&t| t >= n_vocab) {
        Some(i) => Err(err(
            Kind::TokenOutOfRange,
            format!(
                "token id {} at index {i} is out of range (vocabulary size {n_vocab})",
                tokens[i]
            ),
        )),
        None => Ok(()),
    }
}

/// The largest cache quota accepted (1 EiB).
const MAX_QUOTA: u64 = 1 << 60;
/// The longest wait `settle` accepts.
const MAX_SETTLE_S: f64 = 86_400.0;

/// The native engine. Wrapped by `erllama.Engine`.
#[pyclass(name = "Engine", module = "erllama._erllama", frozen)]
pub struct PyEngine {
    engine: Engine,
    scheduler: Scheduler,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (*, ram_quota, ram_file_dir, ram_file_quota, disk_dir, disk_quota, writer_limit, policy, scheduler, pressure_source, ram_file_load = None, remote = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        ram_quota: &Bound<'_, PyAny>,
        ram_file_dir: Option<&Bound<'_, PyAny>>,
        ram_file_quota: &Bound<'_, PyAny>,
        disk_dir: Option<&Bound<'_, PyAny>>,
        disk_quota: &Bound<'_, PyAny>,
        writer_limit: Option<&Bound<'_, PyAny>>,
        policy: &Bound<'_, PyDict>,
        scheduler: &Bound<'_, PyDict>,
        pressure_source: Bound<'_, PyAny>,
        ram_file_load: Option<&Bound<'_, PyAny>>,
        remote: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        guard("Engine()", || {
            let remote = remote.map(remote_config).transpose()?;
            let load = match opt(ram_file_load, |v| str_arg(v, "ram_file_load", 16))?.as_deref() {
                None | Some("read") => FileLoad::Read,
                Some("mmap") => FileLoad::Mmap,
                Some(other) => {
                    return Err(invalid(format!(
                        "ram_file_load must be \"read\" or \"mmap\", got {other:?}"
                    )))
                }
            };
            let policy = policy_from(Some(policy), &PolicyConfig::default())?;
            let quota = |v, name| u64_in(v, name, 0, MAX_QUOTA);
            let mut config = CacheConfig {
                ram_quota: quota(ram_quota, "ram_quota")?,
                ram_file: opt(ram_file_dir, |d| path_arg(d, "ram_file_dir"))?
                    .map(|d| {
                        quota(ram_file_quota, "ram_file_quota").map(|q| FileTierConfig {
                            load,
                            ..FileTierConfig::new(d, q)
                        })
                    })
                    .transpose()?,
                disk: opt(disk_dir, |d| path_arg(d, "disk_dir"))?
                    .map(|d| quota(disk_quota, "disk_quota").map(|q| FileTierConfig::new(d, q)))
                    .transpose()?,
                ..CacheConfig::default()
            };
            config.remote = remote;
            if let Some(limit) = opt(writer_limit, |v| usize_in(v, "writer_limit", 1, 4096))? {
                config.writer_limit = limit;
            }
            let scheduler = scheduler_config(scheduler)?;
            let sampler = sampler_from(&pressure_source)?;
            // Opening scans the file tiers: no GIL while it runs.
            let cache = py
                .detach(move || Cache::open(config))
                .map_err(|e| err(Kind::Cache, e.to_string()))?;
            let engine = Engine::new(cache, policy).map_err(engine_err)?;
            let scheduler = Scheduler::new(engine.clone(), sampler, scheduler)
                .map_err(|e| invalid(e.to_string()))?;
            scheduler.spawn(runtime().handle());
            Ok(Self { engine, scheduler })
        })
    }

    // --- scheduler (plain calls) ---

    fn scheduler_status(&self, py: Python<'_>) -> PyResult<SchedulerStatus> {
        guard("scheduler.status", || {
            Ok(py.detach(|| self.scheduler.status()).into())
        })
    }

    /// Runs one check now.
    fn scheduler_force_check(&self, py: Python<'_>) -> PyResult<CheckResult> {
        guard("scheduler.force_check", || {
            let scheduler = self.scheduler.clone();
            Ok(py
                .detach(move || runtime().block_on(scheduler.force_check()))
                .into())
        })
    }

    fn scheduler_enable(&self, on: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("scheduler.enable", || {
            let on: bool = on.extract().map_err(|_| invalid("enable() takes a bool"))?;
            self.scheduler.enable(on);
            Ok(())
        })
    }

    #[pyo3(signature = (high, low, min_evict_bytes=None))]
    fn scheduler_set_thresholds(
        &self,
        high: &Bound<'_, PyAny>,
        low: &Bound<'_, PyAny>,
        min_evict_bytes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        guard("scheduler.set_thresholds", || {
            let high = float_where(high, "high_watermark", "in [0, 1]", |x| {
                (0.0..=1.0).contains(&x)
            })?;
            let low = float_where(low, "low_watermark", "in [0, 1]", |x| {
                (0.0..=1.0).contains(&x)
            })?;
            let min = opt(min_evict_bytes, |v| {
                u64_in(v, "min_evict_bytes", 0, MAX_QUOTA)
            })?;
            self.scheduler
                .set_thresholds(high, low, min)
                .map_err(|e| invalid(e.to_string()))
        })
    }

    fn scheduler_set_interval(&self, interval_ms: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("scheduler.set_interval", || {
            let ms = u64_in(interval_ms, "interval_ms", 1, 86_400_000)?;
            self.scheduler
                .set_interval(Duration::from_millis(ms))
                .map_err(|e| invalid(e.to_string()))
        })
    }

    /// Loads a model; resolves to its id.
    #[pyo3(signature = (backend, *, path, model_id, n_ctx, n_batch, n_threads, n_gpu_layers, use_mmap, tier, policy, fingerprint_mode, parallel, cache_type_k = None, cache_type_v = None, flash_attn = None))]
    #[allow(clippy::too_many_arguments)]
    fn load_model<'py>(
        &self,
        py: Python<'py>,
        backend: Bound<'py, PyAny>,
        path: &Bound<'py, PyAny>,
        model_id: Option<&Bound<'py, PyAny>>,
        n_ctx: &Bound<'py, PyAny>,
        n_batch: &Bound<'py, PyAny>,
        n_threads: Option<&Bound<'py, PyAny>>,
        n_gpu_layers: &Bound<'py, PyAny>,
        use_mmap: bool,
        tier: &str,
        policy: Option<&Bound<'py, PyDict>>,
        fingerprint_mode: &str,
        parallel: &Bound<'py, PyAny>,
        cache_type_k: Option<&Bound<'py, PyAny>>,
        cache_type_v: Option<&Bound<'py, PyAny>>,
        flash_attn: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("load_model", || {
            let engine = self.engine.clone();
            let tier = self::tier(tier)?;
            let policy = policy_from(policy, engine.policy())?;
            let path = path_arg(path, "path")?;
            let model_id = opt(model_id, |v| str_arg(v, "model_id", 256))?;
            let context = ContextParams {
                n_ctx: usize_in(n_ctx, "n_ctx", 1, 1 << 22)?,
                n_batch: usize_in(n_batch, "n_batch", 1, 1 << 16)?,
                n_threads: opt(n_threads, |v| u32_in(v, "n_threads", 1, 1024))?,
                n_seq: usize_in(parallel, "parallel", 1, 256)?,
                type_k: crate::args::kv_type(cache_type_k, "cache_type_k")?,
                type_v: crate::args::kv_type(cache_type_v, "cache_type_v")?,
                flash_attn: crate::args::flash_attn(flash_attn)?,
            };
            let n_gpu_layers = u32_in(n_gpu_layers, "n_gpu_layers", 0, 100_000)?;
            let mode = FingerprintMode::from_label(fingerprint_mode)
                .map_err(|e| invalid(e.to_string()))?;
            enum Which {
                Llama,
                Stub,
                Python(Arc<PyBackend>),
            }
            let which = if backend.is_instance_of::<PyString>() {
                match backend.extract::<String>()?.as_str() {
                    "llama" => Which::Llama,
                    "stub" => Which::Stub,
                    other => {
                        return Err(invalid(format!(
                            "unknown backend {other:?} (expected \"llama\", \"stub\" or a backend object)"
                        )))
                    }
                }
            } else {
                let label = path.display().to_string();
                Which::Python(Arc::new(PyBackend::new(&backend, &label)?))
            };
            let config = ModelConfig {
                context,
                tier,
                policy,
            };
            future_into_py(py, async move {
                let backend: Arc<dyn Backend> = match which {
                    Which::Stub => Arc::new(StubBackend::new(path.display().to_string())),
                    Which::Python(b) => b,
                    Which::Llama => {
                        let params = ModelParams {
                            n_gpu_layers,
                            use_mmap,
                            ..ModelParams::default()
                        };
                        let loaded =
                            blocking(move || LlamaBackend::open(&path, &params, mode)).await?;
                        Arc::new(loaded.map_err(llama_err)?)
                    }
                };
                engine
                    .load_model(backend, model_id, config)
                    .await
                    .map_err(engine_err)
            })
        })
    }

    /// Submits a request and returns its stream at once (one crossing:
    /// the options are checked here; the prompt is tokenized on the
    /// blocking pool and its errors arrive through the stream).
    #[pyo3(signature = (model_id, prompt, options=None))]
    fn submit(
        &self,
        model_id: &str,
        prompt: &Bound<'_, PyAny>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        guard("submit", || {
            let prompt = prompt_from(prompt)?;
            let options = RequestArgs::from_mapping(options)?.into_options();
            let _rt = runtime().enter();
            let stream = self
                .engine
                .submit(model_id, prompt, options)
                .map_err(engine_err)?;
            Ok(PyStream::new(stream))
        })
    }

    /// Cancels a request; true when it was live.
    fn cancel(&self, request_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        guard("cancel", || {
            let id = u64_in(request_id, "request_id", 0, u64::MAX)?;
            Ok(self.engine.cancel(id))
        })
    }

    /// Ids of loaded models.
    fn models(&self) -> Vec<String> {
        self.engine.models()
    }

    /// A model's status label.
    fn status(&self, model_id: &str) -> PyResult<&'static str> {
        guard("status", || {
            Ok(self.engine.status(model_id).map_err(engine_err)?.label())
        })
    }

    /// A model's description.
    fn info(&self, model_id: &str) -> PyResult<ModelInfo> {
        guard("info", || {
            Ok(self.engine.info(model_id).map_err(engine_err)?.into())
        })
    }

    /// Ids of live requests with their model.
    fn inflight(&self) -> Vec<(u64, String)> {
        self.engine.inflight()
    }

    /// Starts the HTTP server over this engine; resolves to a `Server`.
    #[pyo3(signature = (host, port, *, api_key = None, max_queue, max_body_bytes))]
    fn serve<'py>(
        &self,
        py: Python<'py>,
        host: &str,
        port: &Bound<'py, PyAny>,
        api_key: Option<String>,
        max_queue: &Bound<'py, PyAny>,
        max_body_bytes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("serve", || {
            crate::server::serve(
                py,
                self.engine.clone(),
                host,
                port,
                api_key,
                max_queue,
                max_body_bytes,
            )
        })
    }

    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        model_id: &str,
        text: &Bound<'py, PyAny>,
        add_bos: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("tokenize", || {
            let backend = self.engine.backend(model_id).map_err(engine_err)?;
            let text = str_arg(text, "text", usize::MAX)?;
            future_into_py(py, async move {
                blocking(move || backend.tokenize(&text, add_bos))
                    .await?
                    .map_err(|e| engine_err(e.into()))
            })
        })
    }

    fn detokenize<'py>(
        &self,
        py: Python<'py>,
        model_id: &str,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("detokenize", || {
            let backend = self.engine.backend(model_id).map_err(engine_err)?;
            let tokens = tokens_arg(tokens, "tokens")?;
            check_vocab(&tokens, backend.n_vocab())?;
            future_into_py(py, async move {
                blocking(move || backend.detokenize(&tokens))
                    .await?
                    .map_err(|e| engine_err(e.into()))
            })
        })
    }

    fn chat_tokens<'py>(
        &self,
        py: Python<'py>,
        model_id: &str,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("chat_tokens", || {
            let backend = self.engine.backend(model_id).map_err(engine_err)?;
            future_into_py(py, async move {
                blocking(move || backend.chat_tokens(&messages, add_assistant))
                    .await?
                    .map_err(|e| engine_err(e.into()))
            })
        })
    }

    fn embed<'py>(
        &self,
        py: Python<'py>,
        model_id: &str,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("embed", || {
            let backend = self.engine.backend(model_id).map_err(engine_err)?;
            let tokens = tokens_arg(tokens, "tokens")?;
            if tokens.is_empty() {
                return Err(err(Kind::EmptyInput, "embed needs at least one token"));
            }
            check_vocab(&tokens, backend.n_vocab())?;
            future_into_py(py, async move {
                blocking(move || backend.embed(&tokens))
                    .await?
                    .map_err(|e| engine_err(e.into()))
            })
        })
    }

    /// Loads a LoRA adapter on a model; resolves to its `AdapterInfo`.
    #[pyo3(signature = (model_id, path, scale, adapter_id=None))]
    fn load_adapter<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        path: &Bound<'py, PyAny>,
        scale: &Bound<'py, PyAny>,
        adapter_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("load_adapter", || {
            let engine = self.engine.clone();
            let path = path_arg(path, "path")?;
            let scale = adapter_scale(scale)?;
            let adapter_id = opt(adapter_id, |v| str_arg(v, "adapter_id", 256))?;
            future_into_py(py, async move {
                let info = engine
                    .load_adapter(&model_id, path, scale, adapter_id)
                    .await
                    .map_err(engine_err)?;
                Ok(AdapterInfo::from(info))
            })
        })
    }

    fn set_adapter_scale<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        adapter_id: String,
        scale: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("set_adapter_scale", || {
            let engine = self.engine.clone();
            let scale = adapter_scale(scale)?;
            future_into_py(py, async move {
                let info = engine
                    .set_adapter_scale(&model_id, &adapter_id, scale)
                    .await
                    .map_err(engine_err)?;
                Ok(AdapterInfo::from(info))
            })
        })
    }

    fn unload_adapter<'py>(
        &self,
        py: Python<'py>,
        model_id: String,
        adapter_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        guard("unload_adapter", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                engine
                    .unload_adapter(&model_id, &adapter_id)
                    .await
                    .map_err(engine_err)
            })
        })
    }

    fn adapters<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        guard("adapters", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                let list = engine.adapters(&model_id).await.map_err(engine_err)?;
                Ok(list.into_iter().map(AdapterInfo::from).collect::<Vec<_>>())
            })
        })
    }

    /// Saves every sequence with content (reason evict) and releases them.
    fn evict<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        guard("evict", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                let s = engine.evict(&model_id).await.map_err(engine_err)?;
                Ok(s.into_iter().map(SaveSummary::from).collect::<Vec<_>>())
            })
        })
    }

    /// Saves every sequence with content now (reason shutdown).
    fn save_now<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        guard("save_now", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                let s = engine.shutdown_save(&model_id).await.map_err(engine_err)?;
                Ok(s.into_iter().map(SaveSummary::from).collect::<Vec<_>>())
            })
        })
    }

    fn unload<'py>(&self, py: Python<'py>, model_id: String) -> PyResult<Bound<'py, PyAny>> {
        guard("unload", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                let s = engine.unload(&model_id).await.map_err(engine_err)?;
                Ok(s.into_iter().map(SaveSummary::from).collect::<Vec<_>>())
            })
        })
    }

    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard("shutdown", || {
            let engine = self.engine.clone();
            future_into_py(py, async move {
                engine.shutdown().await;
                // Let in-flight background saves land before returning.
                for _ in 0..2000 {
                    if !engine.cache().saves_in_flight() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(())
            })
        })
    }

    // --- cache inspection (plain calls) ---

    fn cache_counters(&self) -> BTreeMap<&'static str, u64> {
        self.engine.cache().counters().snapshot()
    }

    fn cache_reset_counters(&self) {
        self.engine.cache().counters().reset();
    }

    fn cache_dump(&self, py: Python<'_>) -> PyResult<Vec<CacheRow>> {
        guard("cache.dump", || {
            let rows = py.detach(|| self.engine.cache().dump());
            Ok(rows.iter().map(CacheRow::from).collect())
        })
    }

    fn cache_gc(&self, py: Python<'_>) -> PyResult<usize> {
        guard("cache.gc", || Ok(py.detach(|| self.engine.cache().gc())))
    }

    #[pyo3(signature = (n, tiers=None))]
    fn cache_evict_bytes(
        &self,
        py: Python<'_>,
        n: &Bound<'_, PyAny>,
        tiers: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(usize, u64)> {
        guard("cache.evict_bytes", || {
            let n = u64_in(n, "n", 0, u64::MAX)?;
            let tiers = match tiers {
                None => TierKind::ALL.to_vec(),
                Some(t) if t.is_none() => TierKind::ALL.to_vec(),
                Some(t) if t.is_instance_of::<PyString>() => {
                    return Err(invalid("tiers must be a sequence of tier names, not a str"))
                }
                Some(t) => t
                    .try_iter()
                    .map_err(|_| invalid("tiers must be a sequence of tier names"))?
                    .map(|x| tier(&str_arg(&x?, "tiers[]", 64)?))
                    .collect::<PyResult<_>>()?,
            };
            Ok(py.detach(|| self.engine.cache().evict_bytes(n, &tiers)))
        })
    }

    /// Pins a row against eviction for `ttl_s` seconds (renewing an
    /// earlier pin to the later deadline).
    fn cache_pin(&self, key: &Bound<'_, PyAny>, ttl_s: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("cache.pin", || {
            let key = crate::args::key_arg(key, "key")?;
            let ttl = float_where(ttl_s, "ttl_s", "in (0, 86400]", |x| x > 0.0 && x <= 86400.0)?;
            self.engine
                .cache()
                .pin_for(&key, Duration::from_secs_f64(ttl))
                .map_err(|e| invalid(format!("cannot pin {}: {e}", key.to_hex())))
        })
    }

    /// Ends a `cache_pin` pin now; False if the key had none.
    fn cache_unpin(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        guard("cache.unpin", || {
            let key = crate::args::key_arg(key, "key")?;
            Ok(self.engine.cache().unpin(&key))
        })
    }

    /// Pinned keys and the seconds each has left.
    fn cache_pins(&self) -> BTreeMap<String, f64> {
        self.engine
            .cache()
            .timed_pins_left()
            .into_iter()
            .map(|(k, left)| (k.to_hex(), left.as_secs_f64()))
            .collect()
    }

    fn cache_bytes(&self) -> BTreeMap<&'static str, u64> {
        TierKind::ALL
            .iter()
            .map(|&t| (t.label(), self.engine.cache().bytes(t)))
            .collect()
    }

    /// Waits until no save is in flight (for tests and orderly exits).
    #[pyo3(signature = (timeout_s=None))]
    fn cache_settle(&self, py: Python<'_>, timeout_s: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        guard("cache.settle", || {
            let timeout = opt(timeout_s, |v| {
                float_where(v, "timeout_s", &format!("in [0, {MAX_SETTLE_S}]"), |x| {
                    (0.0..=MAX_SETTLE_S).contains(&x)
                })
            })?
            .unwrap_or(30.0);
            let cache = self.engine.cache().clone();
            Ok(py.detach(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout);
                loop {
                    if !cache.saves_in_flight() {
                        return true;
                    }
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }))
        })
    }
}

fn adapter_scale(scale: &Bound<'_, PyAny>) -> PyResult<f32> {
    f32_scale(float_where(scale, "scale", "finite", f64::is_finite)?)
}

fn f32_scale(v: f64) -> PyResult<f32> {
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(invalid(format!("scale {v} does not fit a 32-bit float")))
    }
}

/// Scheduler settings from Python (`SchedulerConfig.to_dict()`).
fn scheduler_config(d: &Bound<'_, PyDict>) -> PyResult<SchedulerConfig> {
    let item = |name: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(name)?
            .ok_or_else(|| invalid(format!("scheduler setting {name} is missing")))
    };
    let enabled: bool = item("enabled")?
        .extract()
        .map_err(|_| invalid("scheduler.enabled must be a bool"))?;
    let interval = u64_in(&item("interval_ms")?, "interval_ms", 1, 86_400_000)?;
    let unit = |name: &str| {
        float_where(&item(name)?, name, "in [0, 1]", |x| {
            (0.0..=1.0).contains(&x)
        })
    };
    let min_evict_bytes = u64_in(&item("min_evict_bytes")?, "min_evict_bytes", 0, MAX_QUOTA)?;
    let tiers: Vec<String> = item("evict_tiers")?
        .try_iter()
        .map_err(|_| invalid("evict_tiers must be a sequence of tier names"))?
        .map(|t| str_arg(&t?, "evict_tiers[]", 64))
        .collect::<PyResult<_>>()?;
    let evict_tiers = if tiers.len() == 1 && tiers[0] == "all" {
        TierKind::ALL.to_vec()
    } else {
        tiers.iter().map(|t| tier(t)).collect::<PyResult<_>>()?
    };
    let evict_idle_models: bool = item("evict_idle_models")?
        .extract()
        .map_err(|_| invalid("scheduler.evict_idle_models must be a bool"))?;
    let config = SchedulerConfig {
        enabled,
        interval: Duration::from_millis(interval),
        high_watermark: unit("high_watermark")?,
        low_watermark: unit("low_watermark")?,
        min_evict_bytes,
        evict_tiers,
        evict_idle_models,
    };
    config.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(config)
}

/// `"system"`, `"nvml"`, `"noop"`, or a Python object with `sample()`.
fn sampler_from(source: &Bound<'_, PyAny>) -> PyResult<Box<dyn PressureSampler>> {
    if source.is_instance_of::<PyString>() {
        let name: String = source.extract()?;
        return match name.as_str() {
            "system" => Ok(Box::new(SystemSampler::new())),
            "nvml" => Ok(Box::new(NvmlSampler::new())),
            "noop" => Ok(Box::new(NoopSampler)),
            other => Err(invalid(format!(
                "unknown pressure source {other:?} (system, nvml, noop or an object with sample())"
            ))),
        };
    }
    if !source.hasattr("sample")? {
        return Err(invalid(
            "a pressure source object needs a sample() method returning (used_bytes, total_bytes)",
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
    guard("sample_pressure", || {
        let sampler: Box<dyn PressureSampler> = match source {
            "system" => Box::new(SystemSampler::new()),
            "nvml" => Box::new(NvmlSampler::new()),
            "noop" => Box::new(NoopSampler),
            other => return Err(invalid(format!("unknown pressure source {other:?}"))),
        };
        let (sample, details) = py.detach(|| (sampler.sample(), sampler.details()));
        match sample {
            Ok(s) => Ok((s.used, s.total, details)),
            Err(e) => Err(err(Kind::NotSupported, format!("{source}: {e}"))),
        }
    })
}
