//! The HTTP server for Python: `Engine.serve(...)` starts
//! [`erllama_server`] on the engine's tokio runtime (no token passes
//! through Python) and returns a [`PyServer`] that stops it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use erllama_engine::Engine;
use erllama_server::{Server, ServerConfig};
use pyo3::prelude::*;

use crate::args::{u32_in, usize_in};
use crate::bridge::{future_into_py, runtime};
use crate::error::{err, guard, invalid, Kind};

/// A running HTTP server.
#[pyclass(name = "Server", module = "erllama._erllama", frozen)]
pub struct PyServer {
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

#[pymethods]
impl PyServer {
    /// The host it listens on.
    #[getter]
    fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The port it listens on (the one picked, if 0 was asked).
    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops accepting connections and waits for the requests in flight
    /// to finish; idempotent.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        guard("Server.stop", || {
            let server = self
                .server
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            future_into_py(py, async move {
                if let Some(server) = server {
                    server.shutdown().await;
                }
                Ok(())
            })
        })
    }

    fn __repr__(&self) -> String {
        format!("Server(http://{})", self.addr)
    }
}

/// Checks the arguments and starts the server; resolves to a [`PyServer`].
pub(crate) fn serve<'py>(
    py: Python<'py>,
    engine: Engine,
    host: &str,
    port: &Bound<'py, PyAny>,
    api_key: Option<String>,
    max_queue: &Bound<'py, PyAny>,
    max_body_bytes: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let ip: IpAddr = host
        .parse()
        .map_err(|_| invalid(format!("host must be an IP address, got {host:?}")))?;
    let port = u16::try_from(u32_in(port, "port", 0, 65_535)?).unwrap_or(0);
    let config = ServerConfig {
        addr: SocketAddr::new(ip, port),
        api_key,
        max_queue: usize_in(max_queue, "max_queue", 1, 1 << 20)?,
        max_body_bytes: usize_in(max_body_bytes, "max_body_bytes", 1024, 1 << 30)?,
    };
    let config_addr = config.addr;
    future_into_py(py, async move {
        let server = runtime()
            .spawn(erllama_server::start(engine, config))
            .await
            .map_err(|e| err(Kind::Internal, format!("the server task failed: {e}")))?
            .map_err(|e| {
                pyo3::exceptions::PyOSError::new_err(format!(
                    "cannot listen on {}: {e}",
                    config_addr
                ))
            })?;
        Ok(PyServer {
            addr: server.local_addr(),
            server: Mutex::new(Some(server)),
        })
    })
}
