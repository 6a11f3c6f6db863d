//! A running request's events for Python, without losing one.
//!
//! Python iterates a stream in two steps per event: `await ready()` waits
//! until an event is buffered, then `take()` hands it over synchronously.
//! The event moves from the engine's channel into the stream's one-event
//! buffer inside the awaited task (which runs to its end on the runtime
//! even when the Python task awaiting it is cancelled, e.g. by
//! `asyncio.wait_for`), and leaves the buffer only in `take()`: a cancelled
//! `await` therefore never drops an event, and the next `await ready()`
//! returns at once with it. Each token's text enters Python once, as a
//! `str`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use erllama_engine::{Event, RequestStream};
use pyo3::prelude::*;

use crate::bridge::future_into_py;
use crate::error::{engine_err, err, guard, Kind};
use crate::records::Completion;

/// What the buffer holds.
enum Slot {
    Empty,
    Event(Box<Event>),
    /// The engine's channel closed without a final event (the model died).
    Closed,
}

struct State {
    events: tokio::sync::Mutex<RequestStream>,
    slot: Mutex<Slot>,
    done: AtomicBool,
    completion: Mutex<Option<Completion>>,
}

impl State {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running request: its id now, its text pieces as they come, its
/// completion at the end. Wrapped by `erllama.Stream`.
#[pyclass(name = "Stream", module = "erllama._erllama", frozen)]
pub struct PyStream {
    /// The request id (cancellable from the moment the stream exists).
    #[pyo3(get)]
    id: u64,
    /// The model serving it.
    #[pyo3(get)]
    model_id: String,
    state: Arc<State>,
}

impl PyStream {
    pub fn new(stream: RequestStream) -> Self {
        Self {
            id: stream.id,
            model_id: stream.model.clone(),
            state: Arc::new(State {
                events: tokio::sync::Mutex::new(stream),
                slot: Mutex::new(Slot::Empty),
                done: AtomicBool::new(false),
                completion: Mutex::new(None),
            }),
        }
    }
}

#[pymethods]
impl PyStream {
    /// Resolves (to `None`) once an event is buffered for `take()`, or at
    /// once when the stream has ended.
    fn ready<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = Arc::clone(&self.state);
        future_into_py(py, async move {
            let buffered = || !matches!(*state.slot(), Slot::Empty);
            if state.done.load(Ordering::Acquire) || buffered() {
                return Ok(());
            }
            let mut events = state.events.lock().await;
            // Another (cancelled) wait may have buffered one meanwhile.
            if buffered() {
                return Ok(());
            }
            let next = events.next().await;
            *state.slot() = next.map_or(Slot::Closed, |e| Slot::Event(Box::new(e)));
            Ok(())
        })
    }

    /// Takes the buffered event: a token's text piece (`str`, possibly
    /// empty while a multi-byte character or a possible stop string is
    /// pending), or `None` when the request ended (then `completion` is
    /// set); raises the request's error.
    ///
    /// Raises `InvalidInputError` when nothing is buffered (await `ready()`
    /// first).
    fn take(&self) -> PyResult<Option<String>> {
        guard("Stream.take", || {
            let slot = std::mem::replace(&mut *self.state.slot(), Slot::Empty);
            match slot {
                Slot::Empty if self.state.done.load(Ordering::Acquire) => Ok(None),
                Slot::Empty => Err(err(
                    Kind::InvalidInput,
                    "no event is buffered: await ready() first",
                )),
                Slot::Event(event) => match *event {
                    Event::Token { text, .. } => Ok(Some(text)),
                    Event::Done(result) => {
                        self.state.done.store(true, Ordering::Release);
                        let completion = result.map_err(engine_err)?;
                        *self
                            .state
                            .completion
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(completion.into());
                        Ok(None)
                    }
                },
                Slot::Closed => {
                    self.state.done.store(true, Ordering::Release);
                    Err(err(
                        Kind::Worker,
                        format!(
                            "model {:?} stopped without finishing request {}",
                            self.model_id, self.id
                        ),
                    ))
                }
            }
        })
    }

    /// The completion, once the request ended successfully.
    #[getter]
    fn completion(&self) -> Option<Completion> {
        self.state
            .completion
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the final event was taken.
    #[getter]
    fn done(&self) -> bool {
        self.state.done.load(Ordering::Acquire)
    }
}
