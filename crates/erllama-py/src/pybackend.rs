//! A backend written in Python, driven by the Rust model actor through the
//! engine's `Backend` trait (the proof that a backend can be Python; see
//! `erllama.backends.stub`).
//!
//! The Python object provides `name`, `n_vocab`, `tokenize(text, add_bos)`,
//! `detokenize(tokens)`, `new_context(n_ctx, n_batch, n_seq)` and optionally
//! `fingerprint()`, `embed(tokens)`, `chat_tokens(messages,
//! add_assistant)`, `token_bytes(token)`, `is_eog(token)`. A context object
//! holds `n_seq` sequences and provides `decode(batch)` (a list of `(seq,
//! tokens, logits)`), `sample(seq)`, `kv_pack(seq)`, `kv_unpack(seq, data,
//! tokens)`, `truncate(seq, n)`, `copy_prefix(src, dst, n)`, `clear(seq)`
//! and optionally `set_sampling(seq, params: dict)` and
//! `set_adapters(pairs)`. Every call takes the GIL for its duration only;
//! the token lists are mirrored on the Rust side so `tokens()` needs no
//! call. A failing call fails one request, and its exception reaches the
//! caller: an `erllama.errors` class raised on purpose comes back
//! unchanged; any other exception comes back as `BackendError` with the
//! original chained as its `__cause__`.

use std::sync::Arc;

use erllama_cache::{FingerprintMode, QuantType};
use erllama_engine::{
    AdapterHandle, Backend, BackendContext, BackendError, BatchItem, ContextParams, ForeignError,
    ModelFingerprint, SamplingParams, SeqId,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use crate::bridge::enter_python;
use crate::error::{err, invalid, Kind};
use pyo3::types::PyDict;
use sha2::{Digest, Sha256};

/// The methods a context object must have.
const CONTEXT_METHODS: [&str; 7] = [
    "decode",
    "sample",
    "kv_pack",
    "kv_unpack",
    "truncate",
    "copy_prefix",
    "clear",
];

/// Carries an exception raised by backend code through the engine: an
/// `ErllamaError` as it is, anything else as `BackendError` caused by it.
fn backend_err(py: Python<'_>, e: PyErr, method: &str) -> BackendError {
    let name = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let message = format!("{method}() raised {name}: {}", e.value(py));
    let ours = py
        .import("erllama.errors")
        .and_then(|m| m.getattr("ErllamaError"))
        .is_ok_and(|c| e.is_instance(py, &c));
    let payload = if ours {
        e
    } else {
        let wrapped = err(Kind::Backend, format!("the Python backend's {message}"));
        wrapped.set_cause(py, Some(e));
        wrapped
    };
    BackendError::Foreign(ForeignError {
        message,
        payload: Arc::new(payload),
    })
}

fn call<T>(
    obj: &Py<PyAny>,
    method: &str,
    args: impl for<'py> pyo3::call::PyCallArgs<'py>,
) -> Result<T, BackendError>
where
    T: for<'a, 'py> FromPyObject<'a, 'py>,
{
    enter_python(|py| {
        obj.bind(py)
            .call_method1(method, args)
            .and_then(|r| r.extract::<T>().map_err(Into::into))
            .map_err(|e| backend_err(py, e, method))
    })
    .unwrap_or_else(|| Err(gone()))
}

fn gone() -> BackendError {
    BackendError::Other("the Python interpreter is shutting down".into())
}

/// A call whose result is ignored.
fn call_unit(
    obj: &Py<PyAny>,
    method: &str,
    args: impl for<'py> pyo3::call::PyCallArgs<'py>,
) -> Result<(), BackendError> {
    enter_python(|py| {
        obj.bind(py)
            .call_method1(method, args)
            .map(|_| ())
            .map_err(|e| backend_err(py, e, method))
    })
    .unwrap_or_else(|| Err(gone()))
}

/// A Python object used as a backend.
#[derive(Debug)]
pub struct PyBackend {
    obj: Py<PyAny>,
    name: String,
    n_vocab: u32,
    fingerprint: ModelFingerprint,
    has: Has,
}

#[derive(Debug, Clone, Copy)]
struct Has {
    adapters: bool,
    embed: bool,
    chat: bool,
    token_bytes: bool,
}

impl PyBackend {
    /// Wraps `obj`, reading its name, vocabulary size and fingerprint now.
    ///
    /// # Errors
    ///
    /// `InvalidInputError` when a required attribute is missing.
    pub fn new(obj: &Bound<'_, PyAny>, label: &str) -> PyResult<Self> {
        let missing = |what: &str| invalid(format!("a backend object needs {what}"));
        for m in ["tokenize", "detokenize", "new_context"] {
            if !obj.getattr(m).is_ok_and(|f| f.is_callable()) {
                return Err(missing(&format!("a {m}() method")));
            }
        }
        let name: String = match obj.getattr("name") {
            Ok(n) => n
                .extract()
                .map_err(|_| invalid("a backend's name must be a str"))?,
            Err(_) => "python".into(),
        };
        let n_vocab_obj = obj
            .getattr("n_vocab")
            .map_err(|_| missing("an int n_vocab >= 1"))?;
        if n_vocab_obj.is_instance_of::<PyBool>() || !n_vocab_obj.is_instance_of::<PyInt>() {
            return Err(missing("an int n_vocab >= 1"));
        }
        let n_vocab: u32 = n_vocab_obj
            .extract::<u32>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| {
                invalid(format!(
                    "a backend's n_vocab must be an int in 1..={}, got {}",
                    u32::MAX,
                    n_vocab_obj
                        .repr()
                        .map_or_else(|_| "?".into(), |r| r.to_string())
                ))
            })?;
        let fingerprint = match obj.hasattr("fingerprint")? {
            true => {
                let b: Vec<u8> = obj
                    .call_method0("fingerprint")?
                    .extract()
                    .map_err(|_| invalid("fingerprint() must return 32 bytes"))?;
                <[u8; 32]>::try_from(b.as_slice())
                    .map_err(|_| invalid("fingerprint() must return 32 bytes"))?
            }
            false => {
                let mut sha = Sha256::new();
                sha.update(b"erllama-python-backend\0");
                sha.update(name.as_bytes());
                sha.update(b"\0");
                sha.update(label.as_bytes());
                sha.finalize().into()
            }
        };
        Ok(Self {
            obj: obj.clone().unbind(),
            name,
            n_vocab,
            fingerprint: ModelFingerprint {
                bytes: fingerprint,
                mode: FingerprintMode::FastUnsafe,
                quant: QuantType::F32,
            },
            has: Has {
                adapters: obj.hasattr("load_adapter")?,
                embed: obj.hasattr("embed")?,
                chat: obj.hasattr("chat_tokens")?,
                token_bytes: obj.hasattr("token_bytes")?,
            },
        })
    }
}

impl Backend for PyBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint.clone()
    }

    fn n_vocab(&self) -> u32 {
        self.n_vocab
    }

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError> {
        call(&self.obj, "tokenize", (text, add_bos))
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        call(&self.obj, "detokenize", (tokens.to_vec(),))
    }

    fn token_bytes(&self, token: u32) -> Result<Vec<u8>, BackendError> {
        if self.has.token_bytes {
            call(&self.obj, "token_bytes", (token,))
        } else {
            self.detokenize(&[token]).map(String::into_bytes)
        }
    }

    fn chat_tokens(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<Vec<u32>, BackendError> {
        if !self.has.chat {
            return Err(BackendError::NotSupported("chat_template"));
        }
        call(&self.obj, "chat_tokens", (messages.to_vec(), add_assistant))
    }

    fn load_adapter(&self, path: &std::path::Path) -> Result<AdapterHandle, BackendError> {
        if !self.has.adapters {
            return Err(BackendError::NotSupported("lora"));
        }
        let handle: Py<PyAny> = call(&self.obj, "load_adapter", (path.to_path_buf(),))?;
        Ok(std::sync::Arc::new(handle))
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
        if !self.has.embed {
            return Err(BackendError::NotSupported("embed"));
        }
        call(&self.obj, "embed", (tokens.to_vec(),))
    }

    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError> {
        let ctx: Py<PyAny> = call(
            &self.obj,
            "new_context",
            (params.n_ctx, params.n_batch, params.n_seq),
        )?;
        let (missing, has_sampling, has_eog, backend) = enter_python(|py| {
            let c = ctx.bind(py);
            let missing: Vec<&str> = CONTEXT_METHODS
                .into_iter()
                .filter(|m| !c.getattr(*m).is_ok_and(|f| f.is_callable()))
                .collect();
            (
                missing,
                c.hasattr("set_sampling").unwrap_or(false),
                self.obj.bind(py).hasattr("is_eog").unwrap_or(false),
                self.obj.clone_ref(py),
            )
        })
        .ok_or_else(gone)?;
        if !missing.is_empty() {
            return Err(BackendError::ContextCreate(format!(
                "the Python backend's new_context() returned an object without {}",
                missing.join(", ")
            )));
        }
        Ok(Box::new(PyContext {
            ctx,
            backend,
            tokens: vec![Vec::new(); params.n_seq],
            has_sampling,
            has_eog,
            n_vocab: self.n_vocab,
        }))
    }
}

/// A Python context object; `tokens` mirrors what each sequence holds.
struct PyContext {
    ctx: Py<PyAny>,
    backend: Py<PyAny>,
    tokens: Vec<Vec<u32>>,
    has_sampling: bool,
    has_eog: bool,
    n_vocab: u32,
}

impl PyContext {
    fn check_seq(&self, seq: SeqId) -> Result<(), BackendError> {
        if seq < self.tokens.len() {
            Ok(())
        } else {
            Err(BackendError::InvalidInput(format!(
                "sequence {seq} does not exist (the context holds {})",
                self.tokens.len()
            )))
        }
    }
}

impl BackendContext for PyContext {
    fn n_seq(&self) -> usize {
        self.tokens.len()
    }

    fn tokens(&self, seq: SeqId) -> &[u32] {
        self.tokens.get(seq).map_or(&[], Vec::as_slice)
    }

    fn set_sampling(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), BackendError> {
        self.check_seq(seq)?;
        params.validate()?;
        if !self.has_sampling {
            return if params.is_greedy() {
                Ok(())
            } else {
                Err(BackendError::NotSupported("sampling"))
            };
        }
        enter_python(|py| {
            let d = PyDict::new(py);
            let set = || -> PyResult<()> {
                d.set_item("temperature", params.temperature)?;
                d.set_item("top_k", params.top_k)?;
                d.set_item("top_p", params.top_p)?;
                d.set_item("min_p", params.min_p)?;
                d.set_item("repetition_penalty", params.repetition_penalty)?;
                d.set_item("seed", params.seed)?;
                d.set_item("grammar", params.grammar.as_deref())?;
                self.ctx
                    .bind(py)
                    .call_method1("set_sampling", (seq, d.clone()))?;
                Ok(())
            };
            set().map_err(|e| backend_err(py, e, "set_sampling"))
        })
        .unwrap_or_else(|| Err(gone()))
    }

    fn set_adapters(&mut self, adapters: &[(AdapterHandle, f32)]) -> Result<(), BackendError> {
        let mut pairs = Vec::with_capacity(adapters.len());
        for (h, scale) in adapters {
            let obj = h.downcast_ref::<Py<PyAny>>().ok_or_else(|| {
                BackendError::InvalidInput("not an adapter of this Python backend".into())
            })?;
            pairs.push((obj, *scale));
        }
        let has = enter_python(|py| self.ctx.bind(py).hasattr("set_adapters").unwrap_or(false))
            .ok_or_else(gone)?;
        if !has {
            return if pairs.is_empty() {
                Ok(())
            } else {
                Err(BackendError::NotSupported("lora"))
            };
        }
        let result = enter_python(|py| {
            let list: Vec<(Py<PyAny>, f32)> =
                pairs.iter().map(|(o, s)| (o.clone_ref(py), *s)).collect();
            self.ctx
                .bind(py)
                .call_method1("set_adapters", (list,))
                .map(|_| ())
                .map_err(|e| backend_err(py, e, "set_adapters"))
        })
        .unwrap_or_else(|| Err(gone()));
        // The contract: every sequence is cleared, whatever the backend did.
        for seq in 0..self.tokens.len() {
            self.clear(seq);
        }
        result
    }

    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError> {
        for item in batch {
            self.check_seq(item.seq)?;
        }
        let items: Vec<(usize, Vec<u32>, bool)> = batch
            .iter()
            .map(|b| (b.seq, b.tokens.to_vec(), b.logits))
            .collect();
        call_unit(&self.ctx, "decode", (items,))?;
        for item in batch {
            self.tokens[item.seq].extend_from_slice(item.tokens);
        }
        Ok(())
    }

    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError> {
        self.check_seq(seq)?;
        let t: u32 = call(&self.ctx, "sample", (seq,))?;
        if t >= self.n_vocab {
            return Err(BackendError::Other(format!(
                "the Python backend's sample() returned token {t}, outside its vocabulary of {}",
                self.n_vocab
            )));
        }
        Ok(t)
    }

    fn is_eog(&self, token: u32) -> Result<bool, BackendError> {
        if self.has_eog {
            call::<bool>(&self.backend, "is_eog", (token,))
        } else {
            Ok(false)
        }
    }

    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        self.check_seq(seq)?;
        call(&self.ctx, "kv_pack", (seq,))
    }

    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        self.check_seq(seq)?;
        let result = enter_python(|py| {
            let data = pyo3::types::PyBytes::new(py, bytes);
            self.ctx
                .bind(py)
                .call_method1("kv_unpack", (seq, data, tokens.to_vec()))
                .map(|_| ())
                .map_err(|e| backend_err(py, e, "kv_unpack"))
        })
        .unwrap_or_else(|| Err(gone()));
        match result {
            Ok(()) => {
                self.tokens[seq] = tokens.to_vec();
                Ok(())
            }
            Err(e) => {
                self.clear(seq);
                Err(e)
            }
        }
    }

    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError> {
        self.check_seq(seq)?;
        if n > self.tokens[seq].len() {
            return Err(BackendError::InvalidInput(format!(
                "cannot keep {n} of {} tokens",
                self.tokens[seq].len()
            )));
        }
        call_unit(&self.ctx, "truncate", (seq, n))?;
        self.tokens[seq].truncate(n);
        Ok(())
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError> {
        self.check_seq(src)?;
        self.check_seq(dst)?;
        if src == dst || !self.tokens[dst].is_empty() || n > self.tokens[src].len() {
            return Err(BackendError::InvalidInput(format!(
                "cannot copy {n} tokens of sequence {src} ({}) into sequence {dst}",
                self.tokens[src].len()
            )));
        }
        call_unit(&self.ctx, "copy_prefix", (src, dst, n))?;
        self.tokens[dst] = self.tokens[src][..n].to_vec();
        Ok(())
    }

    fn clear(&mut self, seq: SeqId) {
        if seq < self.tokens.len() {
            let _ = call_unit(&self.ctx, "clear", (seq,));
            self.tokens[seq].clear();
        }
    }
}

/// A Python object with `sample() -> (used_bytes, total_bytes)` as a
/// pressure source; called from the scheduler task with the GIL held only
/// for the call.
pub struct PySampler {
    obj: Py<PyAny>,
    name: String,
}

impl PySampler {
    /// Wraps `obj` (its `name` attribute, else its class name, names it).
    #[must_use]
    pub fn new(obj: &Bound<'_, PyAny>) -> Self {
        let name = obj
            .getattr("name")
            .and_then(|n| n.extract::<String>())
            .or_else(|_| obj.get_type().name().map(|n| n.to_string()))
            .unwrap_or_else(|_| "python".into());
        Self {
            obj: obj.clone().unbind(),
            name,
        }
    }
}

impl erllama_engine::PressureSampler for PySampler {
    fn name(&self) -> &str {
        &self.name
    }

    fn sample(&self) -> Result<erllama_engine::Sample, erllama_engine::SamplerError> {
        use erllama_engine::SamplerError;
        enter_python(|py| {
            let r =
                self.obj.bind(py).call_method0("sample").map_err(|e| {
                    SamplerError::Failed(format!("sample() raised: {}", e.value(py)))
                })?;
            let (used, total): (i64, i64) = r.extract().map_err(|_| {
                SamplerError::Failed("sample() must return (used_bytes, total_bytes) ints".into())
            })?;
            let used = u64::try_from(used)
                .map_err(|_| SamplerError::Failed(format!("used_bytes {used} is negative")))?;
            let total = u64::try_from(total)
                .map_err(|_| SamplerError::Failed(format!("total_bytes {total} is negative")))?;
            Ok(erllama_engine::Sample { used, total })
        })
        .unwrap_or_else(|| {
            Err(SamplerError::Unavailable(
                "the interpreter is shutting down".into(),
            ))
        })
    }
}
