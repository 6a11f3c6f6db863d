//! erllama's HTTP server: OpenAI- and Anthropic-compatible endpoints over an
//! [`Engine`], served by axum on the engine's tokio runtime, so no token
//! passes through Python.
//!
//! Routes (docs/server.md):
//!
//! - `GET /health`: `{"status": "ok"}` once a model is loaded, else 503
//!   `{"status": "loading"}`;
//! - `GET /v1/models`: the loaded models;
//! - `POST /v1/chat/completions`: chat through the model's template,
//!   streamed as server-sent events with `stream: true`, held to a JSON
//!   object by a grammar with `response_format: {"type": "json_object"}`;
//! - `POST /v1/completions`: a text or token-array prompt;
//! - `POST /v1/embeddings`: pooled, L2-normalised embeddings;
//! - `POST /v1/messages`: Anthropic's Messages API, with `cache_control`
//!   breakpoints saved at their exact token boundary and pinned for their
//!   TTL ([`anthropic`]);
//! - `GET /metrics`: Prometheus text format ([`metrics`]).
//!
//! Every request body is checked field by field before anything runs; a
//! bad one is a 400 in OpenAI's error shape naming the field. `usage`
//! reports `prompt_tokens_details.cached_tokens`: exactly the prompt tokens
//! whose state was restored from the cache or shared from another
//! sequence, not computed for this request. A client that goes away
//! cancels its generation (the engine request is dropped with the
//! response). More than `max_queue` requests at once are refused with 429
//! and `Retry-After`; bodies over `max_body_bytes` with 413.

mod anthropic;
mod api;
mod error;
mod metrics;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use erllama_engine::Engine;
use tokio::sync::oneshot;

pub use error::ApiError;

/// How a server listens and what it allows.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind (`127.0.0.1:8080`; port 0 picks a free one).
    pub addr: SocketAddr,
    /// When set, every `/v1/` request must carry `Authorization: Bearer
    /// <key>` (or `x-api-key: <key>`).
    pub api_key: Option<String>,
    /// Requests served at once (running or waiting for the model); one
    /// more is refused with 429.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            max_queue: 64,
            max_body_bytes: 8 << 20,
        }
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    pub(crate) api_key: Option<String>,
    pub(crate) max_queue: usize,
    /// Requests being served now.
    pub(crate) active: AtomicUsize,
    /// When the server started (unix seconds), the models' `created`.
    pub(crate) started: u64,
    /// What `/metrics` reports.
    pub(crate) metrics: metrics::Metrics,
}

/// A running server; [`Server::shutdown`] stops it gracefully (dropping it
/// stops it too).
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// The address it listens on (with the port picked, if 0 was asked).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections and waits for the requests in flight to
    /// finish (streams included).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes over `state`.
fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/messages", post(anthropic::messages))
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            api::count_requests,
        ))
        .with_state(state)
}

/// Binds `config.addr` and serves `engine` on the current tokio runtime
/// until [`Server::shutdown`].
///
/// # Errors
///
/// The bind's I/O error (address in use, permission).
pub async fn start(engine: Engine, config: ServerConfig) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState {
        engine,
        api_key: config.api_key.filter(|k| !k.is_empty()),
        max_queue: config.max_queue.max(1),
        active: AtomicUsize::new(0),
        started: unix_now(),
        metrics: metrics::Metrics::new().map_err(std::io::Error::other)?,
    });
    let app = router(state, config.max_body_bytes);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    tracing::info!(%addr, "serving");
    Ok(Server {
        addr,
        stop: Some(stop_tx),
        task: Some(task),
    })
}
