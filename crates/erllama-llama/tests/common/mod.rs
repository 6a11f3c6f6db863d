//! Shared by the real-model integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use erllama_cache::FingerprintMode;
use erllama_llama::{LlamaBackend, ModelParams};

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The test model: `$ERLLAMA_TEST_MODEL`, else the erllama model cache
/// (where `python -m erllama fetch-model` puts it).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ERLLAMA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("ERLLAMA_MODEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("erllama/models"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/erllama/models"))
        })
        .expect("no HOME");
    let p = dir.join(FILE);
    assert!(
        p.is_file(),
        "test model missing at {}: run `python -m erllama fetch-model` or set ERLLAMA_TEST_MODEL",
        p.display()
    );
    p
}

/// The test model as an engine backend, loaded once per test binary.
pub fn backend() -> &'static LlamaBackend {
    static B: OnceLock<LlamaBackend> = OnceLock::new();
    B.get_or_init(|| {
        LlamaBackend::open(
            model_path(),
            &ModelParams::default(),
            FingerprintMode::GgufChunked,
        )
        .expect("load model")
    })
}
