//! Low-level access to a llama.cpp model and context (`Model`, `Context`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use erllama_llama::{LlamaError, Model, ModelParams, Session, SessionParams, SessionWorker};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};

use crate::error::llama_err;

/// A size option from Python: must be in `1..=u32::MAX`.
fn positive(name: &'static str, v: i64) -> PyResult<u32> {
    u32::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| {
        llama_err(LlamaError::InvalidParam {
            name,
            reason: format!("{v} must be a positive integer"),
        })
    })
}

/// Validates Python ints as token ids of `model`.
fn token_ids(model: &Model, tokens: &[i64]) -> PyResult<Vec<u32>> {
    model.check_tokens(tokens).map_err(llama_err)?;
    // In range 0..n_vocab, so they fit a u32.
    Ok(tokens.iter().map(|&t| t as u32).collect())
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
    #[pyo3(signature = (path, *, n_gpu_layers = 0, use_mmap = true))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        n_gpu_layers: u32,
        use_mmap: bool,
    ) -> PyResult<Self> {
        let params = ModelParams {
            n_gpu_layers,
            use_mmap,
            use_mlock: false,
        };
        let model = py
            .detach(|| Model::load(&path, &params))
            .map_err(llama_err)?;
        Ok(Self { model })
    }

    #[getter]
    fn path(&self) -> String {
        self.model.path().to_string_lossy().into_owned()
    }

    #[getter]
    fn n_vocab(&self) -> u32 {
        self.model.n_vocab()
    }

    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.model.meta();
        let model = self.model.clone();
        // The first call probes the state layout in a small context.
        let support = py.detach(move || model.cache_support());
        let d = PyDict::new(py);
        d.set_item("architecture", &m.architecture)?;
        d.set_item("name", &m.name)?;
        d.set_item("quant_type", &m.quant_type)?;
        d.set_item("n_ctx_train", m.n_ctx_train)?;
        d.set_item("n_vocab", m.n_vocab)?;
        d.set_item("n_layer", m.n_layer)?;
        d.set_item("n_embd", m.n_embd)?;
        d.set_item("n_params", m.n_params)?;
        d.set_item("size_bytes", m.size_bytes)?;
        d.set_item("has_chat_template", m.has_chat_template)?;
        d.set_item("n_swa", self.model.n_swa())?;
        d.set_item("memory", &support.memory)?;
        d.set_item("cacheable", support.cacheable)?;
        d.set_item("cache_reason", support.reason.as_deref())?;
        Ok(d)
    }

    #[pyo3(signature = (text, *, add_bos = true, special = false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: String,
        add_bos: bool,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        let model = &self.model;
        py.detach(|| model.tokenize(&text, add_bos, special))
            .map_err(llama_err)
    }

    #[pyo3(signature = (tokens, *, special = false))]
    fn detokenize(&self, py: Python<'_>, tokens: Vec<i64>, special: bool) -> PyResult<String> {
        let ids = token_ids(&self.model, &tokens)?;
        let model = &self.model;
        py.detach(|| model.detokenize(&ids, special))
            .map_err(llama_err)
    }

    #[pyo3(signature = (messages, *, add_assistant = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<String> {
        let model = &self.model;
        py.detach(|| model.apply_chat_template(&messages, add_assistant))
            .map_err(llama_err)
    }

    #[pyo3(signature = (messages, *, add_assistant = true))]
    fn chat_tokens(
        &self,
        py: Python<'_>,
        messages: Vec<(String, String)>,
        add_assistant: bool,
    ) -> PyResult<Vec<u32>> {
        let model = &self.model;
        py.detach(|| model.chat_tokens(&messages, add_assistant))
            .map_err(llama_err)
    }

    fn is_eog(&self, token: i64) -> PyResult<bool> {
        let ids = token_ids(&self.model, &[token])?;
        Ok(self.model.is_eog(ids[0]))
    }

    #[pyo3(signature = (*, n_ctx = 4096, n_batch = 512, n_threads = None, n_seq_max = 1))]
    fn new_context(
        &self,
        py: Python<'_>,
        n_ctx: i64,
        n_batch: i64,
        n_threads: Option<i64>,
        n_seq_max: i64,
    ) -> PyResult<PyContext> {
        let params = SessionParams {
            n_ctx: positive("n_ctx", n_ctx)?,
            n_batch: positive("n_batch", n_batch)?,
            n_threads: n_threads.map(|n| positive("n_threads", n)).transpose()?,
            n_seq_max: positive("n_seq_max", n_seq_max)?,
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
        run(py, &self.worker, None, |s| Ok(s.n_past()))
    }

    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        run(py, &self.worker, None, |s| Ok(s.tokens().to_vec()))
    }

    fn prefill(&self, py: Python<'_>, tokens: Vec<i64>) -> PyResult<()> {
        let ids = token_ids(&self.model, &tokens)?;
        run(py, &self.worker, None, move |s| s.prefill(&ids))
    }

    fn decode_one(&self, py: Python<'_>) -> PyResult<u32> {
        run(py, &self.worker, None, Session::decode_one)
    }

    fn generate(&self, py: Python<'_>, max_tokens: i64) -> PyResult<Vec<u32>> {
        let max_tokens = usize::try_from(max_tokens).map_err(|_| {
            llama_err(LlamaError::InvalidParam {
                name: "max_tokens",
                reason: format!("{max_tokens} is negative"),
            })
        })?;
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        run(py, &self.worker, Some(cancel), move |s| {
            s.generate_until(max_tokens, &flag)
        })
    }

    fn kv_pack<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = run(py, &self.worker, None, |s| s.kv_pack())?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn kv_unpack(&self, py: Python<'_>, data: PyBackedBytes, tokens: Vec<i64>) -> PyResult<()> {
        let ids = token_ids(&self.model, &tokens)?;
        run(py, &self.worker, None, move |s| s.kv_unpack(&data, &ids))
    }

    fn remove_last(&self, py: Python<'_>) -> PyResult<()> {
        run(py, &self.worker, None, Session::remove_last)
    }

    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        run(py, &self.worker, None, |s| {
            s.clear();
            Ok(())
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
