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

/// About `n` tokens of ordinary English (exactly `n`), tokenized by
/// `tokenize` (with BOS).
pub fn long_prompt(n: usize, tokenize: impl Fn(&str) -> Vec<u32>) -> Vec<u32> {
    let para = "The history of the lighthouse is a story of engineering, weather and \
                patience. Keepers climbed the stairs every evening to trim the wicks, \
                polish the lenses and log the passing ships. ";
    let mut text = String::new();
    let mut toks = Vec::new();
    while toks.len() < n {
        text.push_str(para);
        toks = tokenize(&text);
    }
    toks.truncate(n);
    toks
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

use erllama_engine::{BackendContext, BackendError, BatchItem, SeqId};

/// The prefill pieces the engine decodes for `len` prompt tokens appended
/// to a sequence that holds `start`: chunks that end at multiples of
/// `n_batch` counted from position 0, never including the prompt's last
/// token, which comes on its own. Ranges into the appended tokens.
pub fn prefill_pieces(start: usize, len: usize, n_batch: usize) -> Vec<std::ops::Range<usize>> {
    assert!(n_batch > 0);
    let mut pieces = Vec::new();
    if len == 0 {
        return pieces;
    }
    let mut at = 0;
    while at + 1 < len {
        let pos = start + at;
        let end = ((pos / n_batch + 1) * n_batch - start).min(len - 1);
        pieces.push(at..end);
        at = end;
    }
    pieces.push(len - 1..len);
    pieces
}

/// Prefills `tokens` into `seq` as the engine does ([`prefill_pieces`],
/// the last token with logits). An empty slice goes to `decode` as is (the
/// backend answers `EmptyInput`). On error the sequence is cut back to
/// what it held before.
pub fn prefill(
    ctx: &mut dyn BackendContext,
    seq: SeqId,
    tokens: &[u32],
    n_batch: usize,
) -> Result<(), BackendError> {
    if tokens.is_empty() {
        return ctx.decode(&[BatchItem {
            seq,
            tokens,
            logits: true,
        }]);
    }
    let start = ctx.tokens(seq).len();
    for piece in prefill_pieces(start, tokens.len(), n_batch) {
        let logits = piece.end == tokens.len();
        let item = BatchItem {
            seq,
            tokens: &tokens[piece],
            logits,
        };
        if let Err(e) = ctx.decode(&[item]) {
            if ctx.tokens(seq).len() > start {
                ctx.truncate(seq, start).expect("cut back a failed prefill");
            }
            return Err(e);
        }
    }
    Ok(())
}

/// One generation step as the engine runs it: samples `seq`'s next token,
/// feeds it (with logits) and returns it.
pub fn decode_one(ctx: &mut dyn BackendContext, seq: SeqId) -> Result<u32, BackendError> {
    let t = ctx.sample(seq)?;
    ctx.decode(&[BatchItem {
        seq,
        tokens: &[t],
        logits: true,
    }])?;
    Ok(t)
}

/// Up to `n` tokens from `seq` (an end-of-generation token ends it and is
/// included; it is sampled, never fed).
pub fn generate(ctx: &mut dyn BackendContext, seq: SeqId, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < n {
        let t = ctx.sample(seq).expect("sample");
        out.push(t);
        if ctx.is_eog(t).expect("is_eog") || out.len() == n {
            break;
        }
        ctx.decode(&[BatchItem {
            seq,
            tokens: &[t],
            logits: true,
        }])
        .expect("decode");
    }
    out
}
