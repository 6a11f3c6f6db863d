//! Low-level access to a llama.cpp model and context (`Model`, `Context`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use erllama_llama::{LlamaError, Model, ModelParams, Session, SessionParams, SessionWorker};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::args::{str_arg, u32_in, usize_in};
use crate::error::{err, guard, llama_err, Kind};
use crate::records::LlamaModelInfo;

/// Python ints as token ids of `model` (any int, bool-free; out of range
/// is `TokenOutOfRangeError` naming the index).
fn token_ids(model: &Model, tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let iter = tokens
        .try_iter()
        .map_err(|_| crate::error::invalid("tokens must be a sequence of int token ids"))?;
    let n_vocab = model.n_vocab();
    let mut out = Vec::new();
    for (index, t) in iter.enumerate() {
        let t = t?;
        let id = crate::args::int_in(&t, "token", 0, i128::from(n_vocab) - 1).map_err(|_| {
            err(
                Kind::TokenOutOfRange,
                format!(
                    "token id {} at index {index} is out of range (vocabulary size {n_vocab})",
                    t.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                ),
            )
        })?;
        out.push(u32::try_from(id).unwrap_or(u32::MAX));
    }
    Ok(out)
}

/// Runs `job` on the session thread and waits without the GIL, checking for
/// Ctrl-C every 100 ms. On an interrupt `cancel` is raised so a long job can
/// stop between tokens, and the KeyboardInterrupt propagates.
fn run<R: Send + 'static>(
    py: Python<'_>,
    worker: &SessionWorker,
    cancel: Option<Arc<AtomicBool>>,
    job: impl FnOnce(&mut Session) -> Result<R, LlamaError> + Send + 'static,
) -> PyResult<R> {
    let (tx, rx) = mpsc::sync_channel(1);
    worker
        .submit(move |s| {
            let _ = tx.send(job(s));
        })
        .map_err(llama_err)?;
    let mut rx = rx;
    loop {
        // The receiver is Send but not Sync: move it in and back out.
        let (back, got) = py.detach(move || {
            let got = rx.recv_timeout(Duration::from_millis(100));
            (rx, got)
        });
        rx = back;
        match got {
            Ok(result) => return result.map_err(llama_err),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    if let Some(c) = &cancel {
                        c.store(true, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(llama_err(LlamaError::WorkerGone(
                    "the context thread stopped while running the call".into(),
                )))
            }
        }
    }
}

/// A GGUF model loaded by llama.cpp.
#[pyclass(name = "Model", module = "erllama._erllama", frozen)]
pub struct PyModel {
    model: Model,
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, *, n_gpu_layers = None, use_mmap = true))]
    fn new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        n_gpu_layers: Option<&Bound<'_, PyAny>>,
        use_mmap: bool,
    ) -> PyResult<Self> {
        guard("LlamaModel()", || {
            let path: std::path::PathBuf = path
                .extract()
                .map_err(|_| crate::error::invalid("path must be a str or os.PathLike"))?;
            let params = ModelParams {
                n_gpu_layers: match n_gpu_layers {
                    Some(v) if !v.is_none() => u32_in(v, "n_gpu_layers", 0, 100_000)?,
                    _ => 0,
                },
                use_mmap,
                use_mlock: false,
            };
            let model = py
                .detach(|| Model::load(&path, &params))
                .map_err(llama_err)?;
            Ok(Self { model })
        })
    }

    #[getter]
    fn path(&self) -> String {
        self.model.path().to_string_lossy().into_owned()
    }

    #[getter]
    fn n_vocab(&self) -> u32 {
        self.model.n_vocab()
    }

    /// Metadata, and whether the model's state is cacheable (the first
    /// call probes the state layout in a small context).
    fn info(&self, py: Python<'_>) -> PyResult<LlamaModelInfo> {
        guard("LlamaModel.info", || {
            let m = self.model.meta();
            let model = self.model.clone();
            let support = py.detach(move || model.cache_support());
            Ok(LlamaModelInfo {
                architecture: m.architecture.clone(),
                name: m.name.clone(),
                quant_type: m.quant_type.clone(),
                n_ctx_train: m.n_ctx_train,
                n_vocab: m.n_vocab,
                n_layer: m.n_layer,
                n_embd: m.n_embd,
                n_params: m.n_params,
                size_bytes: m.size_bytes,
                has_chat_template: m.has_chat_template,
                n_swa: self.model.n_swa(),
                memory: support.memory,
                cacheable: support.cacheable,
                cache_reason: support.reason,
            })
        })
    }

    #[pyo3(signature = (text, *, add_bos = true, special = false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        add_bos: bool,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        guard("LlamaModel.tokenize", || {
            let text = str_arg(text, "text", usize::MAX)?;
            let model = &self.model;
            py.detach(|| model.tokenize(&text, add_bos, special))
                .map_err(llama_err)
        })
    }

    #[pyo3(signature = (tokens, *, special = false))]
    fn detokenize(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        special: bool,
    ) -> PyResult<String> {
        guard("LlamaModel.detokenize", || {
            let ids = token_ids(&self.model, tokens)?;
            let model = &self.model;
            py.detach(|| model.detokenize(&ids, special))
                .map_err(llama_err)
        })
    }

    #[pyo3(signature = (messages, *, add_assistant = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<String> {
        guard("LlamaModel.apply_chat_template", || {
            let model = &self.model;
            py.detach(|| model.apply_chat_template(&messages, add_assistant))
                .map_err(llama_err)
        })
    }

    #[pyo3(signature = (messages, *, add_assistant = true))]
    fn chat_tokens(
        &self,
        py: Python<'_>,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<Vec<u32>> {
        guard("LlamaModel.chat_tokens", || {
            let model = &self.model;
            py.detach(|| model.chat_tokens(&messages, add_assistant))
                .map_err(llama_err)
        })
    }

    fn is_eog(&self, token: &Bound<'_, PyAny>) -> PyResult<bool> {
        guard("LlamaModel.is_eog", || {
            let one = pyo3::types::PyList::new(token.py(), [token])?;
            let ids = token_ids(&self.model, one.as_any())?;
            Ok(self.model.is_eog(ids[0]))
        })
    }

    #[pyo3(signature = (*, n_ctx = None, n_batch = None, n_threads = None, n_seq_max = None, cache_type_k = None, cache_type_v = None, flash_attn = None))]
    #[allow(clippy::too_many_arguments)]
    fn new_context(
        &self,
        py: Python<'_>,
        n_ctx: Option<&Bound<'_, PyAny>>,
        n_batch: Option<&Bound<'_, PyAny>>,
        n_threads: Option<&Bound<'_, PyAny>>,
        n_seq_max: Option<&Bound<'_, PyAny>>,
        cache_type_k: Option<&Bound<'_, PyAny>>,
        cache_type_v: Option<&Bound<'_, PyAny>>,
        flash_attn: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyContext> {
        guard("LlamaModel.new_context", || {
            let get = |v: Option<&Bound<'_, PyAny>>, name, lo, hi, default| match v {
                Some(v) if !v.is_none() => u32_in(v, name, lo, hi),
                _ => Ok(default),
            };
            let params = SessionParams {
                n_ctx: get(n_ctx, "n_ctx", 8, 1 << 22, 4096)?,
                n_batch: get(n_batch, "n_batch", 1, 1 << 16, 512)?,
                n_threads: match n_threads {
                    Some(v) if !v.is_none() => Some(u32_in(v, "n_threads", 1, 1024)?),
                    _ => None,
                },
                n_seq_max: get(n_seq_max, "n_seq_max", 1, 256, 1)?,
                type_k: crate::args::kv_type(cache_type_k, "cache_type_k")?,
                type_v: crate::args::kv_type(cache_type_v, "cache_type_v")?,
                flash_attn: crate::args::flash_attn(flash_attn)?,
            };
            let n_ctx = params.n_ctx;
            let model = &self.model;
            let worker = py
                .detach(|| SessionWorker::spawn(model, &params))
                .map_err(llama_err)?;
            Ok(PyContext {
                worker,
                model: self.model.clone(),
                n_ctx,
            })
        })
    }

    fn __repr__(&self) -> String {
        let m = self.model.meta();
        format!(
            "Model(path={:?}, architecture={:?}, quant_type={:?})",
            self.model.path(),
            m.architecture,
            m.quant_type
        )
    }
}

/// A llama.cpp context with one token sequence, living on its own thread.
#[pyclass(name = "Context", module = "erllama._erllama", frozen)]
pub struct PyContext {
    worker: SessionWorker,
    model: Model,
    n_ctx: u32,
}

#[pymethods]
impl PyContext {
    #[getter]
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    #[getter]
    fn n_past(&self, py: Python<'_>) -> PyResult<usize> {
        guard("Context.n_past", || {
            run(py, &self.worker, None, |s| Ok(s.n_past()))
        })
    }

    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        guard("Context.tokens", || {
            run(py, &self.worker, None, |s| Ok(s.tokens().to_vec()))
        })
    }

    fn prefill(&self, py: Python<'_>, tokens: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("Context.prefill", || {
            let ids = token_ids(&self.model, tokens)?;
            run(py, &self.worker, None, move |s| s.prefill(&ids))
        })
    }

    /// The logits for the next token (one per vocabulary entry).
    fn logits(&self, py: Python<'_>) -> PyResult<Vec<f32>> {
        guard("Context.logits", || {
            run(py, &self.worker, None, |s| s.logits().map(<[f32]>::to_vec))
        })
    }

    fn decode_one(&self, py: Python<'_>) -> PyResult<u32> {
        guard("Context.decode_one", || {
            run(py, &self.worker, None, Session::decode_one)
        })
    }

    fn generate(&self, py: Python<'_>, max_tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        guard("Context.generate", || {
            let max_tokens = usize_in(max_tokens, "max_tokens", 0, u32::MAX as usize)?;
            let cancel = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&cancel);
            run(py, &self.worker, Some(cancel), move |s| {
                s.generate_until(max_tokens, &flag)
            })
        })
    }

    fn kv_pack<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        guard("Context.kv_pack", || {
            let bytes = run(py, &self.worker, None, |s| s.kv_pack())?;
            Ok(PyBytes::new(py, &bytes))
        })
    }

    fn kv_unpack(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard("Context.kv_unpack", || {
            let data: PyBackedBytes = data
                .extract()
                .map_err(|_| crate::error::invalid("data must be bytes"))?;
            let ids = token_ids(&self.model, tokens)?;
            run(py, &self.worker, None, move |s| s.kv_unpack(&data, &ids))
        })
    }

    fn remove_last(&self, py: Python<'_>) -> PyResult<()> {
        guard("Context.remove_last", || {
            run(py, &self.worker, None, Session::remove_last)
        })
    }

    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        guard("Context.clear", || {
            run(py, &self.worker, None, |s| {
                s.clear();
                Ok(())
            })
        })
    }
}

/// llama.cpp's system information line (compiled-in SIMD features).
#[pyfunction]
fn system_info(py: Python<'_>) -> String {
    py.detach(erllama_llama::system_info)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_class::<PyContext>()?;
    m.add_function(wrap_pyfunction!(system_info, m)?)?;
    Ok(())
}
