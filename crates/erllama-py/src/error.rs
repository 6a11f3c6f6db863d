//! The one place where Rust errors become Python exceptions.
//!
//! The exception classes live in `erllama.errors` (Python), so a
//! pure-Python backend raises the very same types. [`Kind`] lists them once
//! (the `exceptions!` table); every engine and llama.cpp error variant maps
//! to exactly one kind in the two exhaustive `match`es below, so an error
//! keeps its class whichever API it comes through. The table is exported
//! as `_erllama.EXCEPTION_CLASSES`, and a test checks it against the
//! Python module, so the two can never disagree.
//!
//! A Python backend's own exception is carried through the engine as a
//! [`ForeignError`] and handed back unchanged. A Rust panic never reaches
//! Python as `PanicException`: [`guard`] turns it into an `InternalError`
//! with context, and the engine goes on serving.

use std::panic::{catch_unwind, AssertUnwindSafe};

use erllama_engine::{EngineError, ForeignError};
use erllama_llama::LlamaError;
use pyo3::exceptions::{PyPermissionError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyModule, PyType};

/// Declares [`Kind`] and its class names in one place.
macro_rules! exceptions {
    ($($(#[$doc:meta])* $kind:ident => $class:literal,)+) => {
        /// A Python exception class of `erllama.errors`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind {
            $($(#[$doc])* $kind,)+
        }

        impl Kind {
            /// Every kind, in table order.
            pub const ALL: &'static [Kind] = &[$(Kind::$kind,)+];

            /// The class name in `erllama.errors`.
            #[must_use]
            pub const fn class_name(self) -> &'static str {
                match self {
                    $(Kind::$kind => $class,)+
                }
            }
        }
    };
}

exceptions! {
    /// The base class.
    Erllama => "ErllamaError",
    /// A bad argument (also a `ValueError`).
    InvalidInput => "InvalidInputError",
    /// A token id outside the vocabulary.
    TokenOutOfRange => "TokenOutOfRangeError",
    /// Tokens that do not fit the context.
    ContextOverflow => "ContextOverflowError",
    /// An empty prompt or token list.
    EmptyInput => "EmptyInputError",
    /// A grammar that does not parse, or a grammar step that failed.
    Grammar => "GrammarError",
    /// A tier that does not exist or is not configured.
    UnknownTier => "UnknownTierError",
    /// A model (or adapter) file that cannot be loaded.
    ModelLoad => "ModelLoadError",
    /// A model path that does not exist.
    ModelFileNotFound => "ModelFileNotFoundError",
    /// An unknown id.
    NotFound => "NotFoundError",
    /// An id that is taken.
    AlreadyLoaded => "AlreadyLoadedError",
    /// A context that could not be created.
    Context => "ContextError",
    /// A failed `llama_decode`.
    Decode => "DecodeError",
    /// KV state bytes that are not valid.
    KvState => "KvStateError",
    /// A capability the backend lacks.
    NotSupported => "NotSupportedError",
    /// A model without a chat template.
    NoTemplate => "NoTemplateError",
    /// A model task that stopped.
    Worker => "WorkerError",
    /// A model whose queue is full (back pressure).
    Busy => "BusyError",
    /// A backend failure.
    Backend => "BackendError",
    /// A cache failure.
    Cache => "CacheError",
    /// A bug (a caught panic).
    Internal => "InternalError",
}

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The class of `kind`, from `erllama.errors`.
fn class<'py>(py: Python<'py>, kind: Kind) -> PyResult<Bound<'py, PyType>> {
    let module = ERRORS.get_or_try_init(py, || py.import("erllama.errors").map(Bound::unbind))?;
    module
        .bind(py)
        .getattr(kind.class_name())?
        .cast_into::<PyType>()
        .map_err(PyErr::from)
}

/// Raises `erllama.errors.<kind>(message)`.
pub fn err(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    // From a runtime thread this enters Python through the bridge, so an
    // error built while the interpreter closes never touches it.
    let msg = message.clone();
    crate::bridge::enter_python(|py| match class(py, kind) {
        Ok(cls) => PyErr::from_type(cls, msg),
        // Only reachable with a broken installation.
        Err(_) => PyRuntimeError::new_err(format!("{}: {msg}", kind.class_name())),
    })
    .unwrap_or_else(|| PyRuntimeError::new_err(format!("{}: {message}", kind.class_name())))
}

/// `InvalidInputError` naming a parameter.
pub fn invalid(message: impl Into<String>) -> PyErr {
    err(Kind::InvalidInput, message)
}

/// The exception class of an engine error (exhaustive: a new variant must
/// be given its class here).
#[must_use]
pub const fn engine_kind(e: &EngineError) -> Kind {
    match e {
        EngineError::InvalidInput(_) => Kind::InvalidInput,
        EngineError::EmptyPrompt => Kind::EmptyInput,
        EngineError::TokenOutOfRange { .. } => Kind::TokenOutOfRange,
        EngineError::ContextOverflow { .. } => Kind::ContextOverflow,
        EngineError::NotFound(_) => Kind::NotFound,
        EngineError::AlreadyLoaded(_) => Kind::AlreadyLoaded,
        EngineError::NotSupported(_) => Kind::NotSupported,
        EngineError::NoTemplate => Kind::NoTemplate,
        EngineError::Grammar(_) => Kind::Grammar,
        EngineError::KvState(_) => Kind::KvState,
        EngineError::UnknownTier(_) => Kind::UnknownTier,
        EngineError::Context(_) => Kind::Context,
        EngineError::Decode(_) => Kind::Decode,
        EngineError::Backend(_) | EngineError::Foreign(_) => Kind::Backend,
        EngineError::ModelLoad(_) => Kind::ModelLoad,
        EngineError::FileNotFound(_) => Kind::ModelFileNotFound,
        EngineError::ModelGone(..) => Kind::Worker,
        EngineError::Busy(_) => Kind::Busy,
        EngineError::SaveTimeout(..) | EngineError::Cache(_) => Kind::Cache,
        EngineError::Internal(_) => Kind::Internal,
    }
}

/// The exception class of a llama.cpp-layer error (exhaustive).
#[must_use]
pub const fn llama_kind(e: &LlamaError) -> Kind {
    match e {
        LlamaError::BackendInit(_) | LlamaError::ChatTemplate(_) => Kind::Erllama,
        LlamaError::ModelNotFound(_) => Kind::ModelFileNotFound,
        LlamaError::ModelUnreadable { .. }
        | LlamaError::NotGguf { .. }
        | LlamaError::ModelLoad { .. }
        | LlamaError::LoraLoad { .. } => Kind::ModelLoad,
        LlamaError::ContextCreate(_) => Kind::Context,
        LlamaError::InvalidParam { .. } | LlamaError::NoLogits | LlamaError::TextTooLarge(_) => {
            Kind::InvalidInput
        }
        LlamaError::TokenOutOfRange { .. } => Kind::TokenOutOfRange,
        LlamaError::EmptyInput(_) => Kind::EmptyInput,
        LlamaError::ContextOverflow { .. } => Kind::ContextOverflow,
        LlamaError::NoChatTemplate => Kind::NoTemplate,
        LlamaError::Decode(_) => Kind::Decode,
        LlamaError::KvState(_) => Kind::KvState,
        LlamaError::LoraApply(_) => Kind::NotSupported,
        LlamaError::WorkerGone(_) => Kind::Worker,
    }
}

/// Maps an engine error to its Python exception; a foreign backend's own
/// exception comes back as it was raised.
pub fn engine_err(e: EngineError) -> PyErr {
    if let EngineError::Foreign(f) = &e {
        if let Some(original) = foreign_pyerr(f) {
            return original;
        }
    }
    err(engine_kind(&e), e.to_string())
}

/// The Python exception a Python backend raised, if `f` carries one.
fn foreign_pyerr(f: &ForeignError) -> Option<PyErr> {
    let original = f.payload.downcast_ref::<PyErr>()?;
    crate::bridge::enter_python(|py| original.clone_ref(py))
}

/// Maps a llama.cpp-layer error to its Python exception (a file that
/// cannot be read for lack of permission is a `PermissionError`).
pub fn llama_err(e: LlamaError) -> PyErr {
    if let LlamaError::ModelUnreadable { source, .. } = &e {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            return PyPermissionError::new_err(e.to_string());
        }
    }
    err(llama_kind(&e), e.to_string())
}

/// Runs `f`, turning a panic into an `InternalError` that says where it
/// happened (a panic is a bug; the engine goes on serving).
pub fn guard<R>(what: &str, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(internal(what, &panic)),
    }
}

/// The `InternalError` for a caught panic.
pub fn internal(what: &str, panic: &Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(call = what, panic = %msg, "internal error (a bug)");
    err(
        Kind::Internal,
        format!("internal error in {what} (a bug; please report it): {msg}"),
    )
}

/// The class names of [`Kind`], for `_erllama.EXCEPTION_CLASSES`.
#[must_use]
pub fn class_names() -> Vec<&'static str> {
    Kind::ALL.iter().map(|k| k.class_name()).collect()
}
