//! The deterministic Rust stub backend: no model file, instant, and exact,
//! so cache behaviour can be tested in milliseconds.
//!
//! - one token per word: the word's 32-bit FNV-1a hash modulo
//!   [`STUB_VOCAB`] (stable across runs and machines). A word is a maximal
//!   run of characters that are not Unicode `White_Space` ([`stub_words`];
//!   the Python stub splits on exactly the same characters);
//! - greedy only: temperature, repetition penalty and grammar are refused
//!   with `NotSupported`, like the Python stub (top-k/p and min-p never
//!   change a greedy choice and are accepted);
//! - `decode_one` derives the next token from the FNV-1a hash of the whole
//!   context (its tokens as u32 little-endian) and never ends generation;
//! - `kv_pack` is the token list as u32 little-endian; `kv_unpack` restores it;
//! - `embed` returns 16 deterministic floats in `[0, 1]`.

use std::collections::HashMap;
use std::sync::Mutex;

use erllama_cache::{FingerprintMode, QuantType};

use crate::backend::{
    AdapterHandle, Backend, BackendContext, BackendError, ContextParams, ModelFingerprint,
    SamplingParams,
};

/// Vocabulary size of the stub.
pub const STUB_VOCAB: u32 = 65_536;
/// The stub's beginning-of-sequence token.
pub const STUB_BOS: u32 = 1;

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

fn fnv1a(state: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u32::from(b)).wrapping_mul(FNV_PRIME))
}

/// The words of `text`: maximal runs of characters that are not Unicode
/// `White_Space` (`char::is_whitespace`). The Python stub's definition is
/// the same set, written out (`erllama.backends.stub.WHITE_SPACE`).
pub fn stub_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(char::is_whitespace).filter(|w| !w.is_empty())
}

/// The stub token of one word.
#[must_use]
pub fn stub_word_token(word: &str) -> u32 {
    fnv1a(FNV_OFFSET, word.as_bytes()) % STUB_VOCAB
}

/// The token the stub generates after `context`.
#[must_use]
pub fn stub_next_token(context: &[u32]) -> u32 {
    context_hash(context) % STUB_VOCAB
}

fn context_hash(context: &[u32]) -> u32 {
    context
        .iter()
        .fold(FNV_OFFSET, |h, t| fnv1a(h, &t.to_le_bytes()))
}

/// The stub model. `label` stands where a model path would.
#[derive(Debug)]
pub struct StubBackend {
    label: String,
    /// Words seen by `tokenize`, so `detokenize` can spell them back.
    words: Mutex<HashMap<u32, String>>,
}

impl StubBackend {
    /// A stub "model"; `label` is only a name (no file is read).
    #[must_use]
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            words: Mutex::new(HashMap::new()),
        }
    }

    /// The label given at creation.
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }
}

fn check_ids(tokens: &[u32]) -> Result<(), BackendError> {
    match tokens.iter().position(|&t| t >= STUB_VOCAB) {
        Some(i) => Err(BackendError::InvalidInput(format!(
            "token id {} at index {i} is out of range (vocabulary size {STUB_VOCAB})",
            tokens[i]
        ))),
        None => Ok(()),
    }
}

impl Backend for StubBackend {
    fn name(&self) -> &str {
        "stub"
    }

    fn fingerprint(&self) -> ModelFingerprint {
        use sha2::{Digest, Sha256};
        let mut sha = Sha256::new();
        sha.update(b"erllama-stub\0");
        sha.update(self.label.as_bytes());
        ModelFingerprint {
            bytes: sha.finalize().into(),
            mode: FingerprintMode::FastUnsafe,
            quant: QuantType::F32,
        }
    }

    fn n_vocab(&self) -> u32 {
        STUB_VOCAB
    }

    /// Any readable file is an "adapter" (it changes the fingerprint, not
    /// the output).
    fn load_adapter(&self, path: &std::path::Path) -> Result<AdapterHandle, BackendError> {
        std::fs::metadata(path)
            .map_err(|e| BackendError::InvalidInput(format!("{}: {e}", path.display())))?;
        Ok(std::sync::Arc::new(path.to_path_buf()))
    }

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, BackendError> {
        let mut words = self
            .words
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        if add_bos {
            out.push(STUB_BOS);
        }
        for w in stub_words(text) {
            let t = stub_word_token(w);
            words.entry(t).or_insert_with(|| w.to_owned());
            out.push(t);
        }
        Ok(out)
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, BackendError> {
        check_ids(tokens)?;
        let words = self
            .words
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(tokens
            .iter()
            .filter(|&&t| t != STUB_BOS)
            .map(|t| words.get(t).cloned().unwrap_or_else(|| format!("<{t}>")))
            .collect::<Vec<_>>()
            .join(" "))
    }

    fn new_context(&self, params: &ContextParams) -> Result<Box<dyn BackendContext>, BackendError> {
        if params.n_ctx == 0 || params.n_batch == 0 {
            return Err(BackendError::InvalidInput(
                "n_ctx and n_batch must be positive".into(),
            ));
        }
        Ok(Box::new(StubContext {
            tokens: Vec::new(),
            hash: FNV_OFFSET,
            n_ctx: params.n_ctx,
            has_logits: false,
        }))
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
        check_ids(tokens)?;
        let mut h = context_hash(tokens);
        Ok((0..16)
            .map(|i: u32| {
                h = fnv1a(h, &i.to_le_bytes());
                // 24 high-quality bits -> [0, 1]
                (h >> 8) as f32 / ((1u32 << 24) - 1) as f32
            })
            .collect())
    }
}

/// A stub sequence: the tokens plus their running hash.
#[derive(Debug)]
struct StubContext {
    tokens: Vec<u32>,
    hash: u32,
    n_ctx: usize,
    has_logits: bool,
}

impl StubContext {
    fn push(&mut self, t: u32) {
        self.hash = fnv1a(self.hash, &t.to_le_bytes());
        self.tokens.push(t);
    }
}

impl BackendContext for StubContext {
    /// Greedy only: the values are validated, and anything that would
    /// change a greedy choice (temperature, repetition penalty, grammar) is
    /// `NotSupported`, exactly as for a Python backend without
    /// `set_sampling`.
    fn set_sampling(&mut self, params: &SamplingParams) -> Result<(), BackendError> {
        params.validate()?;
        if params.is_greedy() {
            Ok(())
        } else {
            Err(BackendError::NotSupported("sampling"))
        }
    }

    fn set_adapters(&mut self, adapters: &[(AdapterHandle, f32)]) -> Result<(), BackendError> {
        if adapters
            .iter()
            .any(|(h, _)| h.downcast_ref::<std::path::PathBuf>().is_none())
        {
            return Err(BackendError::InvalidInput(
                "not an adapter of the stub backend".into(),
            ));
        }
        Ok(())
    }

    fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<(), BackendError> {
        if tokens.is_empty() {
            return Err(BackendError::InvalidInput(
                "prefill needs at least one token".into(),
            ));
        }
        check_ids(tokens)?;
        if self.tokens.len() + tokens.len() > self.n_ctx {
            return Err(BackendError::ContextOverflow {
                have: self.tokens.len(),
                adding: tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        for &t in tokens {
            self.push(t);
        }
        self.has_logits = true;
        Ok(())
    }

    fn decode_one(&mut self) -> Result<u32, BackendError> {
        if !self.has_logits {
            return Err(BackendError::InvalidInput(
                "no logits: prefill at least one token first".into(),
            ));
        }
        if self.tokens.len() >= self.n_ctx {
            return Err(BackendError::ContextOverflow {
                have: self.tokens.len(),
                adding: 1,
                n_ctx: self.n_ctx,
            });
        }
        let t = self.hash % STUB_VOCAB;
        self.push(t);
        Ok(t)
    }

    fn is_eog(&self, _token: u32) -> Result<bool, BackendError> {
        Ok(false)
    }

    fn kv_pack(&self) -> Result<Vec<u8>, BackendError> {
        Ok(self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
    }

    fn kv_unpack(&mut self, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        if bytes.len() % 4 != 0 {
            return Err(BackendError::KvState(format!(
                "{} bytes is not a whole number of u32 tokens",
                bytes.len()
            )));
        }
        let packed: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if packed != tokens {
            return Err(BackendError::KvState(
                "the state does not hold the given tokens".into(),
            ));
        }
        check_ids(&packed)?;
        if packed.len() > self.n_ctx {
            return Err(BackendError::ContextOverflow {
                have: 0,
                adding: packed.len(),
                n_ctx: self.n_ctx,
            });
        }
        self.clear();
        for t in packed {
            self.push(t);
        }
        self.has_logits = false;
        Ok(())
    }

    fn remove_last(&mut self) -> Result<(), BackendError> {
        if self.tokens.pop().is_none() {
            return Err(BackendError::InvalidInput("the sequence is empty".into()));
        }
        self.hash = context_hash(&self.tokens);
        self.has_logits = false;
        Ok(())
    }

    fn clear(&mut self) {
        self.tokens.clear();
        self.hash = FNV_OFFSET;
        self.has_logits = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(b: &StubBackend) -> Box<dyn BackendContext> {
        b.new_context(&ContextParams::default()).unwrap()
    }

    #[test]
    fn tokens_are_stable_word_hashes() {
        let b = StubBackend::new("stub");
        let t = b.tokenize("hello  world\nhello", false).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], t[2]);
        // FNV-1a("hello") = 0x4f9f2cab, independently known.
        assert_eq!(stub_word_token("hello"), 0x4f9f_2cab % STUB_VOCAB);
        assert_eq!(b.detokenize(&t).unwrap(), "hello world hello");
        assert_eq!(b.tokenize("a", true).unwrap()[0], STUB_BOS);
    }

    #[test]
    fn generation_is_a_function_of_the_context() {
        let b = StubBackend::new("stub");
        let prompt = b.tokenize("the quick brown fox", true).unwrap();
        let mut a = ctx(&b);
        a.prefill(&prompt).unwrap();
        let gen: Vec<u32> = (0..8).map(|_| a.decode_one().unwrap()).collect();
        assert_eq!(gen[0], stub_next_token(&prompt));
        // Restore the prompt elsewhere, re-feed the last token: same tokens.
        let packed = {
            let mut p = ctx(&b);
            p.prefill(&prompt).unwrap();
            p.kv_pack().unwrap()
        };
        assert_eq!(packed.len(), prompt.len() * 4);
        let mut c = ctx(&b);
        c.kv_unpack(&packed, &prompt).unwrap();
        assert!(c.decode_one().is_err(), "no logits right after a restore");
        c.remove_last().unwrap();
        c.prefill(&prompt[prompt.len() - 1..]).unwrap();
        let again: Vec<u32> = (0..8).map(|_| c.decode_one().unwrap()).collect();
        assert_eq!(gen, again);
    }

    #[test]
    fn bad_input_is_an_error() {
        let b = StubBackend::new("stub");
        let mut c = b
            .new_context(&ContextParams {
                n_ctx: 4,
                ..ContextParams::default()
            })
            .unwrap();
        assert!(matches!(c.prefill(&[]), Err(BackendError::InvalidInput(_))));
        assert!(matches!(
            c.prefill(&[STUB_VOCAB]),
            Err(BackendError::InvalidInput(_))
        ));
        assert!(matches!(
            c.prefill(&[1; 5]),
            Err(BackendError::ContextOverflow { .. })
        ));
        assert!(matches!(
            c.kv_unpack(&[1, 2, 3], &[]),
            Err(BackendError::KvState(_))
        ));
        assert!(matches!(
            c.kv_unpack(&[1, 0, 0, 0], &[2]),
            Err(BackendError::KvState(_))
        ));
        assert!(matches!(
            c.remove_last(),
            Err(BackendError::InvalidInput(_))
        ));
        c.prefill(&[1, 2, 3, 4]).unwrap();
        assert!(matches!(
            c.decode_one(),
            Err(BackendError::ContextOverflow { .. })
        ));
    }

    #[test]
    fn embeddings_are_deterministic_in_unit_range() {
        let b = StubBackend::new("stub");
        let e = b.embed(&[1, 2, 3]).unwrap();
        assert_eq!(e.len(), 16);
        assert!(e.iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(e, b.embed(&[1, 2, 3]).unwrap());
        assert_ne!(e, b.embed(&[1, 2, 4]).unwrap());
    }
}
