//! `erllama._erllama`, the native module behind the `erllama` package.
//!
//! Private: the public API is the typed Python package around it. Every
//! blocking call releases the GIL; errors become the exception classes of
//! `erllama.errors` in one place ([`error`]).

mod bridge;
mod engine;
mod error;
mod kvc;
mod llama;
mod pybackend;

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

#[pymodule]
fn _erllama(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(bridge::_quiesce, m)?)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyStream>()?;
    m.add_function(wrap_pyfunction!(engine::sample_pressure, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_list, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_verify, m)?)?;
    m.add_function(wrap_pyfunction!(kvc::kvc_gc, m)?)?;
    llama::register(m)
}
