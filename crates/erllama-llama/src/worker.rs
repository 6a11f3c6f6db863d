//! A dedicated thread that owns one [`Session`].
//!
//! A llama.cpp context must stay on one thread (the session is `!Send`), and
//! its calls block for milliseconds to seconds, so they must run neither on
//! an async runtime's threads nor while holding Python's GIL. The worker
//! owns the session for its whole life and runs closures sent to it, one at
//! a time, in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::{LlamaError, Result};
use crate::model::Model;
use crate::session::{Session, SessionParams};

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// Handle to the thread owning a [`Session`]. Dropping it stops the thread
/// after the queued jobs and frees the context.
#[derive(Debug)]
pub struct SessionWorker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl SessionWorker {
    /// Starts a thread and creates the session on it.
    ///
    /// # Errors
    ///
    /// What [`Session::new`] returns, or [`LlamaError::WorkerGone`] if the
    /// thread cannot be started.
    pub fn spawn(model: &Model, params: &SessionParams) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let model = model.clone();
        let params = params.clone();
        let thread = std::thread::Builder::new()
            .name("erllama-ctx".into())
            .spawn(move || {
                let mut session = match Session::new(&model, &params) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for job in rx {
                    // A panic inside a job leaves the context in an unknown
                    // state: stop serving. Callers waiting on the job see
                    // their reply channel close; later calls see WorkerGone.
                    if catch_unwind(AssertUnwindSafe(|| job(&mut session))).is_err() {
                        tracing::error!("a job panicked on the context thread; stopping it");
                        break;
                    }
                }
            })
            .map_err(|e| LlamaError::WorkerGone(format!("cannot start thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(LlamaError::WorkerGone(
                    "the thread died while creating the context".into(),
                ))
            }
        }
    }

    /// Queues `f` to run on the session thread without waiting for it. The
    /// closure delivers its own result (e.g. over an async oneshot channel).
    ///
    /// # Errors
    ///
    /// [`LlamaError::WorkerGone`] when the thread has stopped.
    pub fn submit(&self, f: impl FnOnce(&mut Session) + Send + 'static) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(|| LlamaError::WorkerGone("the worker is shut down".into()))?
            .send(Box::new(f))
            .map_err(|_| LlamaError::WorkerGone("the context thread has stopped".into()))
    }

    /// Runs `f` on the session thread and waits for its result. Blocks the
    /// calling thread: release the GIL / leave the async runtime first.
    ///
    /// # Errors
    ///
    /// [`LlamaError::WorkerGone`] when the thread has stopped or `f` panicked.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> R + Send + 'static,
    ) -> Result<R> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.submit(move |s| {
            let _ = rtx.send(f(s));
        })?;
        rrx.recv().map_err(|_| {
            LlamaError::WorkerGone("the context thread stopped while running the call".into())
        })
    }
}

impl Drop for SessionWorker {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
