//! The one place where Rust errors become Python exceptions.
//!
//! Exception classes live in `erllama.errors` (Python) so the pure-Python
//! backend raises the same types; this module looks them up by name. Each
//! error variant maps to exactly one class.

use erllama_engine::EngineError;
use erllama_llama::LlamaError;
use pyo3::exceptions::{PyPermissionError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Raises `erllama.errors.<class_name>(message)`.
pub fn erllama_err(class_name: &str, message: String) -> PyErr {
    // From a runtime thread this enters Python through the bridge, so an
    // error built while the interpreter closes never touches it.
    let msg = message.clone();
    crate::bridge::enter_python(|py| {
        let cls = py
            .import("erllama.errors")
            .and_then(|m| m.getattr(class_name))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, msg),
            // Only reachable with a broken installation.
            Err(_) => PyRuntimeError::new_err(format!("{class_name}: {msg}")),
        }
    })
    .unwrap_or_else(|| PyRuntimeError::new_err(format!("{class_name}: {message}")))
}

/// Maps a backend error to its Python exception.
pub fn llama_err(e: LlamaError) -> PyErr {
    let class = match &e {
        LlamaError::BackendInit(_) => "ErllamaError",
        LlamaError::ModelNotFound(_) => "ModelFileNotFoundError",
        LlamaError::ModelUnreadable { source, .. } => {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                return PyPermissionError::new_err(e.to_string());
            }
            "ModelLoadError"
        }
        LlamaError::NotGguf { .. } | LlamaError::ModelLoad { .. } => "ModelLoadError",
        LlamaError::ContextCreate(_) => "ContextError",
        LlamaError::InvalidParam { .. } | LlamaError::NoLogits | LlamaError::TextTooLarge(_) => {
            "InvalidInputError"
        }
        LlamaError::TokenOutOfRange { .. } => "TokenOutOfRangeError",
        LlamaError::EmptyInput(_) => "EmptyInputError",
        LlamaError::ContextOverflow { .. } => "ContextOverflowError",
        LlamaError::NoChatTemplate => "NoTemplateError",
        LlamaError::ChatTemplate(_) => "ErllamaError",
        LlamaError::Decode(_) => "DecodeError",
        LlamaError::KvState(_) => "KvStateError",
        LlamaError::LoraLoad { .. } => "ModelLoadError",
        LlamaError::LoraApply(_) => "NotSupportedError",
        LlamaError::WorkerGone(_) => "WorkerError",
    };
    erllama_err(class, e.to_string())
}

/// Maps an engine error to its Python exception.
pub fn engine_err(e: EngineError) -> PyErr {
    let class = match &e {
        EngineError::InvalidInput(_) => "InvalidInputError",
        EngineError::EmptyPrompt => "EmptyInputError",
        EngineError::TokenOutOfRange { .. } => "TokenOutOfRangeError",
        EngineError::ContextOverflow { .. } => "ContextOverflowError",
        EngineError::NotFound(_) => "NotFoundError",
        EngineError::AlreadyLoaded(_) => "AlreadyLoadedError",
        EngineError::NotSupported(_) => "NotSupportedError",
        EngineError::NoTemplate => "NoTemplateError",
        EngineError::Grammar(_) => "GrammarError",
        EngineError::KvState(_) => "KvStateError",
        EngineError::UnknownTier(_) => "UnknownTierError",
        EngineError::Backend(_) => "BackendError",
        EngineError::ModelLoad(_) => "ModelLoadError",
        EngineError::FileNotFound(_) => "ModelFileNotFoundError",
        EngineError::ModelGone(..) => "WorkerError",
        EngineError::SaveTimeout(..) | EngineError::Cache(_) => "CacheError",
    };
    erllama_err(class, e.to_string())
}
