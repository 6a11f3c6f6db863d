//! Rust futures as asyncio awaitables, safe at interpreter exit.
//!
//! Futures run on the one tokio runtime of pyo3-async-runtimes. We do not
//! use its `future_into_py`: it hands results back from a detached blocking
//! task, which can still be inside Python when the interpreter finalizes
//! and then crashes the process (`PyGILState_Release: thread state must be
//! current`, pyo3-async-runtimes#40; reproduced here in about 1 run in 10
//! of a short script). Instead every hand-back into Python — result
//! delivery here and the calls of a Python backend — goes through
//! [`enter_python`], which counts the threads inside Python and refuses
//! once the interpreter is closing. [`_quiesce`] (registered with `atexit`
//! by the `erllama` package) marks it closing and waits, without the GIL,
//! until no such thread is left; finalization then never races one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

static INSIDE: AtomicUsize = AtomicUsize::new(0);
static CLOSING: AtomicBool = AtomicBool::new(false);

/// The runtime every engine future runs on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// Runs `f` with the GIL from a thread Python did not start, unless the
/// interpreter is closing (then `None`: the caller drops its result).
pub fn enter_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    INSIDE.fetch_add(1, Ordering::SeqCst);
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            INSIDE.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _leave = Leave;
    if CLOSING.load(Ordering::SeqCst) {
        return None;
    }
    Some(Python::attach(f))
}

/// An asyncio future resolved with `fut`'s output. Must be called with a
/// running event loop (from a coroutine).
pub fn future_into_py<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    let py_fut = event_loop.call_method0("create_future")?;
    let resolve = py.import("erllama._bridge")?.getattr("resolve")?.unbind();
    let target = py_fut.clone().unbind();
    let event_loop = event_loop.unbind();
    runtime().spawn(async move {
        // The work runs as its own task so a panic in it is caught (as a
        // failed join) and becomes an InternalError instead of a Python
        // future that never resolves.
        let result = match runtime().spawn(fut).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                Err(crate::error::internal("an engine call", &e.into_panic()))
            }
            Err(e) => Err(crate::error::err(
                crate::error::Kind::Internal,
                format!("an engine task was cancelled: {e}"),
            )),
        };
        // Results arriving while the interpreter closes are dropped (their
        // Python references are released by pyo3 without the GIL).
        let _ = enter_python(move |py| {
            let (ok, value) = match result.and_then(|v| v.into_py_any(py)) {
                Ok(v) => (true, v),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            if let Err(e) = event_loop.bind(py).call_method1(
                "call_soon_threadsafe",
                (resolve.bind(py), target.bind(py), ok, value),
            ) {
                // The loop is closed: nobody awaits this future any more.
                drop(e);
            }
        });
    });
    Ok(py_fut)
}

/// Marks the interpreter closing and waits (without the GIL) until no
/// thread is inside Python on erllama's behalf, at most `timeout_s`
/// seconds; true when none is left.
#[pyfunction]
#[pyo3(signature = (timeout_s=5.0))]
pub fn _quiesce(py: Python<'_>, timeout_s: f64) -> bool {
    CLOSING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
        loop {
            if INSIDE.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}
