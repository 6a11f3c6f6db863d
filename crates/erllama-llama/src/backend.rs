//! The one process-wide llama.cpp backend.
//!
//! llama.cpp must be initialised exactly once per process; `llama-cpp-2`
//! enforces that by failing a second `LlamaBackend::init`. We keep the only
//! instance in a `OnceLock`, route llama.cpp's logs to `tracing` (silent
//! unless the host installs a subscriber) and hand out `&'static` references.

use std::sync::{Mutex, MutexGuard, OnceLock};

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

/// The CPU part of [`system_info`] (`SSE3 = 1 | ... | AVX2 = 1 | ...`), the
/// instruction sets this build's kernels use; computed once.
#[must_use]
pub fn cpu_features() -> &'static str {
    static FEATURES: OnceLock<String> = OnceLock::new();
    FEATURES.get_or_init(|| {
        let info = system_info();
        let cpu = info
            .split_once("CPU :")
            .map_or(info.as_str(), |(_, rest)| rest);
        // The line may list other backends after the CPU's features.
        cpu.split(" CPU")
            .next()
            .unwrap_or("")
            .trim()
            .trim_end_matches('|')
            .trim()
            .to_owned()
    })
}

/// Held around every `llama_decode` in this process: one context computes
/// at a time.
///
/// Each decode already uses every thread it was given (every core, by
/// default), and ggml's CPU threads spin at the barriers between
/// operations. Two contexts computing at once on the same cores therefore
/// do not share them: each one's spinning threads keep the other's from
/// running, and both slow down by 10 to 100 times. Measured on 2 cores
/// (SmolLM2, 512-token prefill then 64 tokens, 2 threads each): one
/// process decodes 64 tokens in 0.53 s; two at once took 98 s each with
/// ggml's thread pool and 17 s with OpenMP. Taking turns costs nothing in
/// throughput and keeps every model's latency proportional to its work.
pub(crate) fn compute_lock() -> MutexGuard<'static, ()> {
    static COMPUTE: Mutex<()> = Mutex::new(());
    COMPUTE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
