//! The values the engine returns, as typed, immutable Python objects.
//!
//! Each record is a frozen pyclass with read-only attributes, `==`, a
//! `repr` listing its fields and `to_dict()`; the stub (`_erllama.pyi`)
//! declares every attribute's type, so `mypy --strict` and stubtest see a
//! renamed or retyped field.

use std::collections::BTreeMap;

use erllama_cache::{RowInfo, TierKind};
use erllama_engine::{
    AdapterInfo as EngineAdapter, CheckOutcome, Completion as EngineCompletion,
    ModelInfo as EngineModelInfo, RequestStats, SaveSummary as EngineSave, SchedulerStatus as St,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::IntoPyObjectExt;

/// Declares a record: the pyclass, its `repr` and `to_dict`.
macro_rules! record {
    ($(#[$doc:meta])* $rs:ident => $py:literal {
        $($(#[$fdoc:meta])* $field:ident: $ty:ty,)+
    }) => {
        $(#[$doc])*
        #[pyclass(name = $py, module = "erllama._erllama", frozen, get_all, eq)]
        #[derive(Debug, Clone, PartialEq)]
        pub struct $rs {
            $($(#[$fdoc])* pub $field: $ty,)+
        }

        #[pymethods]
        impl $rs {
            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                let parts: Vec<String> = vec![$(
                    format!(
                        "{}={}",
                        stringify!($field),
                        self.$field.clone().into_bound_py_any(py)?.repr()?
                    ),
                )+];
                Ok(format!("{}({})", $py, parts.join(", ")))
            }

            /// The fields as a dict (nested records stay records).
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), self.$field.clone())?;)+
                Ok(d)
            }
        }
    };
}

record! {
    /// What happened to one request (docs/api.md, Stats).
    Stats => "Stats" {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
        /// Admission to the first token's logits: lookup, restore, prefill.
        prefill_ms: f64,
        /// Time generating.
        generation_ms: f64,
        /// Time restoring from the cache (part of `prefill_ms`).
        restore_ms: f64,
        /// Time waiting in the model's queue.
        queue_ms: f64,
        /// `exact`, `partial` or `cold`.
        cache_hit_kind: String,
        /// `exact`, `resume`, `longest_prefix` or `None`.
        hit_source: Option<String>,
        /// Prompt tokens whose KV state came from the cache.
        cached_tokens: usize,
        /// The tier that served them.
        cache_tier: Option<String>,
        /// `stop`, `length` or `cancelled`.
        finish_reason: String,
        /// Whether it was cancelled.
        cancelled: bool,
        /// A row found by this lookup failed to restore.
        fallback_from: Option<String>,
        /// Why.
        fallback_reason: Option<String>,
        /// Prompt tokens the model computed (0 for an exact hit whose row
        /// stored its logits).
        prefill_tokens: usize,
        /// Generated tokens fed back to the model (at most
        /// `completion_tokens - 1`).
        decode_tokens: usize,
        /// The largest breakpoint whose row this request wrote (0: none).
        breakpoint_written: usize,
        /// The stop string that ended generation, if one did.
        stop_sequence: Option<String>,
    }
}

impl From<&RequestStats> for Stats {
    fn from(s: &RequestStats) -> Self {
        Self {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            prefill_ms: s.prefill_ms,
            generation_ms: s.generation_ms,
            restore_ms: s.restore_ms,
            queue_ms: s.queue_ms,
            cache_hit_kind: s.cache_hit_kind.label().into(),
            hit_source: s.hit_source.map(|h| h.label().into()),
            cached_tokens: s.cached_tokens,
            cache_tier: if s.from_remote {
                Some("remote".into())
            } else {
                s.cache_tier.map(|t| t.label().into())
            },
            finish_reason: s.finish_reason.label().into(),
            cancelled: s.cancelled,
            fallback_from: s.restore_failure.as_ref().map(|f| f.source.label().into()),
            fallback_reason: s.restore_failure.as_ref().map(|f| f.reason.clone()),
            prefill_tokens: s.prefill_tokens,
            decode_tokens: s.decode_tokens,
            breakpoint_written: s.breakpoint_written,
            stop_sequence: s.stop_sequence.clone(),
        }
    }
}

record! {
    /// A finished request.
    Completion => "Completion" {
        /// Its id.
        request_id: u64,
        /// The generated text (a stop string excluded).
        text: String,
        /// The generated token ids.
        tokens: Vec<u32>,
        /// What happened.
        stats: Stats,
        /// Key (hex) of the finish save: the next turn's `parent_key`.
        finish_key: Option<String>,
    }
}

impl From<EngineCompletion> for Completion {
    fn from(c: EngineCompletion) -> Self {
        Self {
            request_id: c.request_id,
            stats: Stats::from(&c.stats),
            text: c.text,
            tokens: c.tokens,
            finish_key: c.finish_key.map(|k| k.to_hex()),
        }
    }
}

record! {
    /// A loaded model.
    ModelInfo => "ModelInfo" {
        /// Its id.
        id: String,
        /// `llama`, `stub` or a Python backend's name.
        backend: String,
        /// Its status now.
        status: String,
        /// Context size.
        n_ctx: usize,
        /// Vocabulary size.
        n_vocab: u32,
        /// Quant label.
        quant_type: String,
        /// Nominal bits per weight.
        quant_bits: u8,
        /// The tier its saves go to.
        tier: String,
        /// Hex of the base fingerprint.
        fingerprint: String,
        /// `safe`, `gguf_chunked` or `fast_unsafe`.
        fingerprint_mode: String,
        /// Whether its state is cached.
        cacheable: bool,
        /// Its memory kind.
        memory: String,
        /// Why it is not cacheable.
        cache_reason: Option<String>,
        /// Sequences computed together (`parallel`).
        parallel: usize,
        /// The K cache's element type (`f16`, `q8_0`, ...).
        cache_type_k: String,
        /// The V cache's element type.
        cache_type_v: String,
        /// Flash attention as loaded (`auto`, `on` or `off`).
        flash_attn: String,
        /// Requests running now.
        running: usize,
        /// Requests waiting for a sequence or KV cells.
        queued: usize,
        /// Finished sequences kept for sharing.
        warm_sequences: usize,
        /// KV cells in use (shared cells once), out of `n_ctx`.
        kv_cells_used: usize,
    }
}

impl From<EngineModelInfo> for ModelInfo {
    fn from(i: EngineModelInfo) -> Self {
        Self {
            id: i.id,
            backend: i.backend,
            status: i.status.label().into(),
            n_ctx: i.n_ctx,
            n_vocab: i.n_vocab,
            quant_type: i.quant_type,
            quant_bits: i.quant_bits,
            tier: i.tier.label().into(),
            fingerprint: i.fingerprint,
            fingerprint_mode: i.fingerprint_mode,
            cacheable: i.cacheable,
            memory: i.memory,
            cache_reason: i.cache_reason,
            parallel: i.parallel,
            cache_type_k: i.cache_type_k.label().into(),
            cache_type_v: i.cache_type_v.label().into(),
            flash_attn: i.flash_attn.label().into(),
            running: i.running,
            queued: i.queued,
            warm_sequences: i.warm_sequences,
            kv_cells_used: i.kv_cells_used,
        }
    }
}

record! {
    /// A LoRA adapter loaded on a model.
    AdapterInfo => "AdapterInfo" {
        /// Its id.
        id: String,
        /// The adapter file.
        path: String,
        /// SHA-256 of the file (hex).
        sha256: String,
        /// The scale it is applied with.
        scale: f64,
    }
}

impl From<EngineAdapter> for AdapterInfo {
    fn from(a: EngineAdapter) -> Self {
        Self {
            id: a.id,
            path: a.path.display().to_string(),
            sha256: a.sha256,
            scale: f64::from(a.scale),
        }
    }
}

record! {
    /// What an evict, save_now or unload saved.
    SaveSummary => "SaveSummary" {
        /// The row's key (hex).
        key: String,
        /// Tokens saved.
        tokens: usize,
        /// It was already stored.
        already_present: bool,
    }
}

impl From<EngineSave> for SaveSummary {
    fn from(s: EngineSave) -> Self {
        Self {
            key: s.key.to_hex(),
            tokens: s.tokens,
            already_present: s.already_present,
        }
    }
}

record! {
    /// One row of the cache index.
    CacheRow => "CacheRow" {
        /// Key (hex).
        key: String,
        /// `ram`, `ram_file` or `disk`.
        tier: String,
        /// `available`, `writing` or `evicting`.
        status: String,
        /// Bytes held.
        size: u64,
        /// Claims pinning it now.
        refcount: u32,
        /// Hits so far.
        hits: u32,
        /// LRU tick of its last use.
        last_used: u64,
        /// Tokens it holds.
        tokens: usize,
        /// Why it was saved.
        save_reason: String,
        /// The context size it was saved from.
        context_size: u32,
        /// Unix time it was written.
        created: u64,
    }
}

impl From<&RowInfo> for CacheRow {
    fn from(r: &RowInfo) -> Self {
        Self {
            key: r.key.to_hex(),
            tier: r.tier.label().into(),
            status: r.status.label().into(),
            size: r.size,
            refcount: r.refcount,
            hits: r.hits,
            last_used: r.last_used,
            tokens: r.token_count,
            save_reason: r.save_reason.label().into(),
            context_size: r.context_size,
            created: r.created_unix,
        }
    }
}

record! {
    /// What one scheduler check did.
    CheckResult => "CheckResult" {
        /// `evicted` or a `skipped(...)` label.
        outcome: String,
        /// Rows evicted.
        count: usize,
        /// Bytes they held.
        bytes: u64,
        /// Idle contexts saved and released.
        contexts: usize,
    }
}

impl From<CheckOutcome> for CheckResult {
    fn from(o: CheckOutcome) -> Self {
        match o {
            CheckOutcome::Evicted {
                count,
                bytes,
                contexts,
            } => Self {
                outcome: "evicted".into(),
                count,
                bytes,
                contexts,
            },
            other => Self {
                outcome: other.label().into(),
                count: 0,
                bytes: 0,
                contexts: 0,
            },
        }
    }
}

record! {
    /// The scheduler's settings and last readings.
    SchedulerStatus => "SchedulerStatus" {
        /// Whether periodic checks run.
        enabled: bool,
        /// Check interval.
        interval_ms: u64,
        /// Evict at or above this fraction.
        high_watermark: f64,
        /// Evict down to this fraction.
        low_watermark: f64,
        /// The least an eviction frees.
        min_evict_bytes: u64,
        /// Tiers evicted from.
        evict_tiers: Vec<String>,
        /// Whether idle models' contexts are released too.
        evict_idle_models: bool,
        /// The pressure source's name.
        pressure_source: String,
        /// Whether the last sample worked (`None` before the first).
        available: Option<bool>,
        /// Why it did not.
        unavailable_reason: Option<String>,
        /// Details the sampler reports.
        sampler_details: Vec<(String, String)>,
        /// Last sample: bytes used.
        last_used: u64,
        /// Last sample: bytes in all.
        last_total: u64,
        /// Last used / total.
        last_ratio: f64,
        /// Bytes the last eviction freed.
        last_evicted_bytes: u64,
        /// Unix time of the last sample.
        sampled_at: Option<f64>,
        /// Unix time of the last eviction.
        last_evicted_at: Option<f64>,
        /// Checks run.
        checks: u64,
        /// The last check's outcome label.
        last_outcome: Option<String>,
        /// Bytes held per tier now.
        tier_bytes: BTreeMap<String, u64>,
    }
}

impl From<St> for SchedulerStatus {
    fn from(st: St) -> Self {
        let secs = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64())
        };
        let c = &st.config;
        Self {
            enabled: c.enabled,
            interval_ms: u64::try_from(c.interval.as_millis()).unwrap_or(u64::MAX),
            high_watermark: c.high_watermark,
            low_watermark: c.low_watermark,
            min_evict_bytes: c.min_evict_bytes,
            evict_tiers: c.evict_tiers.iter().map(|t| t.label().to_owned()).collect(),
            evict_idle_models: c.evict_idle_models,
            pressure_source: st.sampler.clone(),
            available: st.available,
            unavailable_reason: st.sampler_error.clone(),
            sampler_details: st.sampler_details.clone(),
            last_used: st.last_used,
            last_total: st.last_total,
            last_ratio: st.last_ratio,
            last_evicted_bytes: st.last_evicted_bytes,
            sampled_at: secs(st.sampled_at),
            last_evicted_at: secs(st.last_evicted_at),
            checks: st.checks,
            last_outcome: st.last_outcome.map(str::to_owned),
            tier_bytes: st
                .tier_bytes
                .iter()
                .map(|(t, b): &(TierKind, u64)| (t.label().to_owned(), *b))
                .collect(),
        }
    }
}

record! {
    /// A GGUF model's metadata (low-level `LlamaModel.info()`).
    LlamaModelInfo => "LlamaModelInfo" {
        /// `general.architecture`.
        architecture: String,
        /// `general.name` or the file stem.
        name: String,
        /// Quant label.
        quant_type: String,
        /// Training context length.
        n_ctx_train: u32,
        /// Vocabulary size.
        n_vocab: u32,
        /// Layers.
        n_layer: u32,
        /// Embedding width.
        n_embd: u32,
        /// Parameters.
        n_params: u64,
        /// Bytes of weights.
        size_bytes: u64,
        /// Whether the GGUF has a chat template.
        has_chat_template: bool,
        /// Sliding window (0: none).
        n_swa: u32,
        /// Memory kind.
        memory: String,
        /// Whether its state is cacheable.
        cacheable: bool,
        /// Why not.
        cache_reason: Option<String>,
    }
}

record! {
    /// One `*.kvc` file of a directory, header-parsed (no CRC).
    KvcFile => "KvcFile" {
        /// File name.
        file: String,
        /// Key recomputed from the contents (`None` when the header fails).
        key: Option<String>,
        /// Whether the name is `<key>.kvc`.
        name_ok: bool,
        /// Cached tokens.
        tokens: u32,
        /// Save reason label.
        save_reason: Option<String>,
        /// Hit count.
        hits: u32,
        /// File size.
        size: u64,
        /// Unix creation time.
        created: u64,
        /// Unix last-used time.
        last_used: u64,
        /// Context size it was saved from.
        context_size: u32,
        /// Quant label.
        quant: Option<String>,
        /// The first 80 characters of the stored prompt text.
        prompt: Option<String>,
        /// Stored logits (the scores of the token after `tokens`; 0: none).
        logits: u32,
        /// Why the header does not parse.
        error: Option<String>,
    }
}
