//! The one process-wide llama.cpp backend.
//!
//! llama.cpp must be initialised exactly once per process; `llama-cpp-2`
//! enforces that by failing a second `LlamaBackend::init`. We keep the only
//! instance in a `OnceLock`, route llama.cpp's logs to `tracing` (silent
//! unless the host installs a subscriber) and hand out `&'static` references.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::{send_logs_to_tracing, LogOptions};

use crate::error::{LlamaError, Result};

static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();

/// Returns the process-wide llama.cpp backend, initialising it on first use.
///
/// # Errors
///
/// [`LlamaError::BackendInit`] when llama.cpp was already initialised by
/// someone else in this process or refuses to start.
pub fn backend() -> Result<&'static LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlamaError::BackendInit(e.clone()))
}

/// llama.cpp's system information line (SIMD features compiled in and
/// detected, e.g. `AVX2 = 1 | FMA = 1`).
#[must_use]
pub fn system_info() -> String {
    // Initialising the backend first registers the CPU backend so the line
    // lists its features.
    let _ = backend();
    // SAFETY: llama_print_system_info returns a pointer to a static,
    // NUL-terminated buffer owned by llama.cpp; we copy it out at once.
    let ptr = unsafe { llama_cpp_sys_2::llama_print_system_info() };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated (see above), valid until the next call
    // on this thread; we do not keep the borrow.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}
