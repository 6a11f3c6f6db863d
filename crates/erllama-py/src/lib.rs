//! `erllama._erllama`, the native module behind the `erllama` package.
//!
//! Private: the public API is the typed Python package around it. Every
//! blocking call releases the GIL; errors become the exception classes of
//! `erllama.errors` in one place ([`error`]).

mod args;
mod bridge;
mod engine;
mod error;
mod kvc;
mod llama;
mod pybackend;
mod records;
mod server;
mod stream;

use pyo3::prelude::*;

/// Routes Rust `tracing` output (including llama.cpp's logs) to stderr when
/// `ERLLAMA_LOG` is set, e.g. `ERLLAMA_LOG=debug`; silent otherwise.
fn init_logging() {
    if let Ok(filter) = std::env::var("ERLLAMA_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Panics inside the boundary guard (for the tests that prove a panic
/// becomes `InternalError`, never `PanicException`).
#[pyfunction]
fn _test_panic() -> PyResult<()> {
    error::guard("_test_panic", || panic!("deliberate test panic"))
}

/// Like [`_test_panic`], inside an awaitable.
#[pyfunction]
fn _test_panic_async(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    bridge::future_into_py(py, async {
        if std::hint::black_box(true) {
            panic!("deliberate test panic");
        }
        Ok(())
    })
}

/// `<arch>:<comma-separated target features>` this module was compiled
/// for, between NUL bytes so that `erllama._cpu` finds it in the file
/// without loading the module (see build.rs).
#[used]
static TARGET_FEATURES: &str = concat!(
    "\0erllama-target-features=",
    env!("ERLLAMA_TARGET_FEATURES"),
    "\0"
);

#[pymodule]
fn _erllama(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Read here through black_box, so the whole marked string stays in the
    // file as written (not folded to its value; and no second copy of the
    // marker's text for erllama._cpu to find first).
    let marked = std::hint::black_box(TARGET_FEATURES).trim_matches('\0');
    let recorded = marked.split_once('=').map_or("", |(_, value)| value);
    m.add("_target_features", recorded)?;
    m.add_function(wrap_pyfunction!(bridge::_quiesce, m)?)?;
    m.add_function(wrap_pyfunction!(_test_panic, m)?)?;
    m.add_function(wrap_pyfunction!(_test_panic_async, m)?)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<stream::PyStream>()?;
    m.add_class::<server::PyServer>()?;
    m.add_class::<records::Stats>()?;
    m.add_class::<records::Completion>()?;
    m.add_class::<records::ModelInfo>()?;
    m.add_class::<records::AdapterInfo>()?;
    m.add_class::<records::SaveSummary>()?;
    m.add_class::<records::CacheRow>()?;
    m.add_class::<records::CheckResult>()?;
    m.add_class::<records::SchedulerStatus>()?;
    m.add_class::<records::LlamaModelInfo>()?;
    m.add_class::<records::KvcFile>()?;
    m.add(
        "EXCEPTION_CLASSES",
        pyo3::types::PyTuple::new(m.py(), error::class_names())?,
    )?;
    m.add("REQUEST_OPTIONS", args::RequestArgs::table(m.py())?)?;
    m.add_function(wrap_pyfunction!(engine::sample_pressure, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_list, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_verify, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_gc, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::remote_rows, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::remote_stats, m)?)?;
    llama::register(m)
}
