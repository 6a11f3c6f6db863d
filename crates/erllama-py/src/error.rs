//! The one place where Rust errors become Python exceptions.
//!
//! Exception classes live in `erllama.errors` (Python) so the pure-Python
//! backend raises the same types; this module looks them up by name. Each
//! error variant maps to exactly one class.

use erllama_llama::LlamaError;
use pyo3::exceptions::{PyPermissionError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// Raises `erllama.errors.<class_name>(message)`.
pub fn erllama_err(class_name: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let cls = py
            .import("erllama.errors")
            .and_then(|m| m.getattr(class_name))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, message),
            // Only reachable with a broken installation.
            Err(_) => PyRuntimeError::new_err(format!("{class_name}: {message}")),
        }
    })
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
        LlamaError::WorkerGone(_) => "WorkerError",
    };
    erllama_err(class, e.to_string())
}
