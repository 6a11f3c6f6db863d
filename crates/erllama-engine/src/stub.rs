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
//! - its "logits" are two floats, the context hash's high and low 16 bits,
//!   from which `sample` takes the token; they can be stored and set back
//!   like a real model's;
//! - `embed` returns 16 deterministic floats in `[0, 1]`.

use std::collections::HashMap;
use std::sync::Mutex;

use erllama_cache::{FingerprintMode, QuantType};

use crate::backend::{
    AdapterHandle, Backend, BackendContext, BackendError, BatchItem, ContextParams,
    ModelFingerprint, SeqId,
};
use crate::cells::CellLedger;

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
        Some(index) => Err(BackendError::TokenOutOfRange {
            token: i64::from(tokens[index]),
            index,
            n_vocab: STUB_VOCAB,
        }),
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
        if params.n_seq == 0 || params.n_seq > 256 {
            return Err(BackendError::InvalidInput(format!(
                "n_seq must be in 1..=256, got {}",
                params.n_seq
            )));
        }
        Ok(Box::new(StubContext {
            seqs: vec![StubSeq::default(); params.n_seq],
            cells: CellLedger::new(params.n_seq),
            n_ctx: params.n_ctx,
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
#[derive(Debug, Clone)]
struct StubSeq {
    tokens: Vec<u32>,
    hash: u32,
    has_logits: bool,
    /// The "logits" (valid while `has_logits`): the high and low 16 bits
    /// of the hash that chooses the next token.
    scores: [f32; 2],
}

impl Default for StubSeq {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            hash: FNV_OFFSET,
            has_logits: false,
            scores: [0.0; 2],
        }
    }
}

/// The stub's logits of a context hash.
fn stub_scores(hash: u32) -> [f32; 2] {
    [f32::from((hash >> 16) as u16), f32::from(hash as u16)]
}

impl StubSeq {
    fn push(&mut self, t: u32) {
        self.hash = fnv1a(self.hash, &t.to_le_bytes());
        self.tokens.push(t);
    }
}

/// The stub's context: `n_seq` sequences sharing `n_ctx` cells, counted
/// as llama.cpp's unified cache would hold them (a copied prefix shares
/// cells), so running out of cells fails a decode as it would there.
#[derive(Debug)]
struct StubContext {
    seqs: Vec<StubSeq>,
    cells: CellLedger,
    n_ctx: usize,
}

impl StubContext {
    fn seq(&self, seq: SeqId) -> Result<&StubSeq, BackendError> {
        self.seqs.get(seq).ok_or_else(|| {
            BackendError::InvalidInput(format!(
                "sequence {seq} does not exist (n_seq = {})",
                self.seqs.len()
            ))
        })
    }
}

impl BackendContext for StubContext {
    fn n_seq(&self) -> usize {
        self.seqs.len()
    }

    fn tokens(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(seq).map_or(&[], |s| &s.tokens)
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
        for seq in 0..self.seqs.len() {
            self.clear(seq);
        }
        Ok(())
    }

    fn decode(&mut self, batch: &[BatchItem<'_>]) -> Result<(), BackendError> {
        let mut adding = 0;
        for (i, item) in batch.iter().enumerate() {
            self.seq(item.seq)?;
            if batch[..i].iter().any(|o| o.seq == item.seq) {
                return Err(BackendError::InvalidInput(format!(
                    "sequence {} appears twice in one batch",
                    item.seq
                )));
            }
            if item.tokens.is_empty() {
                return Err(BackendError::EmptyInput("decode".into()));
            }
            check_ids(item.tokens)?;
            adding += item.tokens.len();
        }
        let have = self.cells.used();
        if have + adding > self.n_ctx {
            return Err(BackendError::ContextOverflow {
                have,
                adding,
                n_ctx: self.n_ctx,
            });
        }
        // Like llama.cpp: a step's logits replace every earlier step's.
        for s in &mut self.seqs {
            s.has_logits = false;
        }
        for item in batch {
            let s = &mut self.seqs[item.seq];
            for &t in item.tokens {
                s.push(t);
            }
            s.has_logits = item.logits;
            s.scores = stub_scores(s.hash);
            self.cells.append(item.seq, item.tokens.len());
        }
        Ok(())
    }

    fn sample(&mut self, seq: SeqId) -> Result<u32, BackendError> {
        let s = self.seq(seq)?;
        if !s.has_logits {
            return Err(BackendError::InvalidInput(
                "no logits: prefill at least one token first".into(),
            ));
        }
        // Integral values below 2^16, as `stub_scores` and `set_logits`
        // keep them.
        let [hi, lo] = s.scores.map(|v| v as u32);
        Ok(((hi << 16) | lo) % STUB_VOCAB)
    }

    fn logits(&self, seq: SeqId) -> Option<&[f32]> {
        let s = self.seqs.get(seq)?;
        s.has_logits.then_some(&s.scores[..])
    }

    fn set_logits(&mut self, seq: SeqId, logits: &[f32]) -> Result<(), BackendError> {
        let s = self.seq(seq)?;
        if s.tokens.is_empty() {
            return Err(BackendError::InvalidInput(format!(
                "sequence {seq} is empty: no token has logits to follow"
            )));
        }
        let scores: [f32; 2] = logits.try_into().map_err(|_| {
            BackendError::InvalidInput(format!("{} logits, the stub has 2", logits.len()))
        })?;
        if scores
            .iter()
            .any(|v| !(0.0..65_536.0).contains(v) || v.fract() != 0.0)
        {
            return Err(BackendError::InvalidInput(
                "stub logits are whole numbers below 65536".into(),
            ));
        }
        let s = &mut self.seqs[seq];
        s.scores = scores;
        s.has_logits = true;
        Ok(())
    }

    fn is_eog(&self, _token: u32) -> Result<bool, BackendError> {
        Ok(false)
    }

    fn kv_pack(&self, seq: SeqId) -> Result<Vec<u8>, BackendError> {
        Ok(self
            .seq(seq)?
            .tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect())
    }

    fn kv_unpack(&mut self, seq: SeqId, bytes: &[u8], tokens: &[u32]) -> Result<(), BackendError> {
        self.seq(seq)?;
        self.clear(seq);
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
        let have = self.cells.used();
        if have + packed.len() > self.n_ctx {
            return Err(BackendError::KvState(format!(
                "no room for {} cells ({have} of {} in use)",
                packed.len(),
                self.n_ctx
            )));
        }
        let s = &mut self.seqs[seq];
        for &t in &packed {
            s.push(t);
        }
        s.has_logits = false;
        self.cells.append(seq, packed.len());
        Ok(())
    }

    fn truncate(&mut self, seq: SeqId, n: usize) -> Result<(), BackendError> {
        let len = self.seq(seq)?.tokens.len();
        if n > len {
            return Err(BackendError::InvalidInput(format!(
                "cannot keep {n} of {len} tokens"
            )));
        }
        let s = &mut self.seqs[seq];
        s.tokens.truncate(n);
        s.hash = context_hash(&s.tokens);
        s.has_logits = false;
        self.cells.truncate(seq, n);
        Ok(())
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, n: usize) -> Result<(), BackendError> {
        let src_len = self.seq(src)?.tokens.len();
        if src == dst || !self.seq(dst)?.tokens.is_empty() || n > src_len {
            return Err(BackendError::InvalidInput(format!(
                "cannot copy {n} tokens of sequence {src} ({src_len}) into sequence {dst}"
            )));
        }
        let tokens = self.seqs[src].tokens[..n].to_vec();
        let d = &mut self.seqs[dst];
        for t in tokens {
            d.push(t);
        }
        d.has_logits = false;
        self.cells.copy(src, dst, n);
        Ok(())
    }

    fn clear(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.get_mut(seq) {
            *s = StubSeq::default();
            self.cells.clear(seq);
        }
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

    /// Greedy generation on `seq`, feeding each token before the next.
    fn generate(c: &mut dyn BackendContext, seq: SeqId, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for _ in 0..n {
            let t = c.sample(seq).unwrap();
            out.push(t);
            c.decode(&[BatchItem {
                seq,
                tokens: &[t],
                logits: true,
            }])
            .unwrap();
        }
        out
    }

    fn prefill(c: &mut dyn BackendContext, seq: SeqId, tokens: &[u32]) {
        c.decode(&[BatchItem {
            seq,
            tokens,
            logits: true,
        }])
        .unwrap();
    }

    #[test]
    fn generation_is_a_function_of_the_context() {
        let b = StubBackend::new("stub");
        let prompt = b.tokenize("the quick brown fox", true).unwrap();
        let mut a = ctx(&b);
        prefill(a.as_mut(), 0, &prompt);
        let gen = generate(a.as_mut(), 0, 8);
        assert_eq!(gen[0], stub_next_token(&prompt));
        // Restore the prompt elsewhere, re-feed the last token: same tokens.
        let packed = a.kv_pack(0).unwrap();
        let mut c = ctx(&b);
        prefill(c.as_mut(), 0, &prompt);
        let packed_prompt = c.kv_pack(0).unwrap();
        assert_eq!(packed_prompt.len(), prompt.len() * 4);
        c.kv_unpack(2, &packed_prompt, &prompt).unwrap();
        assert!(c.sample(2).is_err(), "no logits right after a restore");
        c.truncate(2, prompt.len() - 1).unwrap();
        prefill(c.as_mut(), 2, &prompt[prompt.len() - 1..]);
        assert_eq!(generate(c.as_mut(), 2, 8), gen);
        assert!(packed.len() > packed_prompt.len());
    }

    #[test]
    fn sequences_are_independent_and_share_copied_prefixes() {
        let b = StubBackend::new("stub");
        let mut c = b
            .new_context(&ContextParams {
                n_ctx: 20,
                n_seq: 3,
                ..ContextParams::default()
            })
            .unwrap();
        prefill(c.as_mut(), 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        c.copy_prefix(0, 1, 6).unwrap();
        assert_eq!(c.tokens(1), &[1, 2, 3, 4, 5, 6]);
        // Shared cells cost nothing: 8 + 12 more fit in 20.
        c.decode(&[
            BatchItem {
                seq: 1,
                tokens: &[9; 6],
                logits: true,
            },
            BatchItem {
                seq: 2,
                tokens: &[10; 6],
                logits: true,
            },
        ])
        .unwrap();
        assert_eq!(c.tokens(0).len(), 8);
        assert!(matches!(
            c.decode(&[BatchItem {
                seq: 0,
                tokens: &[1],
                logits: true
            }]),
            Err(BackendError::ContextOverflow { .. })
        ));
        c.clear(0);
        assert_eq!(c.tokens(1).len(), 12, "a copy outlives its source");
        assert!(c.copy_prefix(1, 2, 3).is_err(), "dst must be empty");
    }

    #[test]
    fn bad_input_is_an_error() {
        let b = StubBackend::new("stub");
        let mut c = b
            .new_context(&ContextParams {
                n_ctx: 4,
                n_seq: 1,
                ..ContextParams::default()
            })
            .unwrap();
        let one = |t: &'static [u32]| {
            [BatchItem {
                seq: 0,
                tokens: t,
                logits: true,
            }]
        };
        assert!(matches!(
            c.decode(&one(&[])),
            Err(BackendError::EmptyInput(_))
        ));
        assert!(matches!(
            c.decode(&[BatchItem {
                seq: 0,
                tokens: &[STUB_VOCAB],
                logits: true
            }]),
            Err(BackendError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            c.decode(&one(&[1; 5])),
            Err(BackendError::ContextOverflow { .. })
        ));
        assert!(matches!(
            c.kv_unpack(0, &[1, 2, 3], &[]),
            Err(BackendError::KvState(_))
        ));
        assert!(matches!(
            c.kv_unpack(0, &[1, 0, 0, 0], &[2]),
            Err(BackendError::KvState(_))
        ));
        assert!(matches!(
            c.truncate(0, 1),
            Err(BackendError::InvalidInput(_))
        ));
        assert!(matches!(c.sample(0), Err(BackendError::InvalidInput(_))));
        assert!(matches!(c.sample(7), Err(BackendError::InvalidInput(_))));
        c.decode(&one(&[1, 2, 3, 4])).unwrap();
        assert!(matches!(
            c.decode(&one(&[5])),
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
