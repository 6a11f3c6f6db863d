//! Untrusted GBNF grammars, made unable to hurt the process.
//!
//! llama.cpp's grammar engine is a set of parse stacks advanced one code
//! point at a time. Its cost is not proportional to the grammar text: the
//! 34-byte `root ::= (("a"{0,12}){0,12}){0,12}` keeps 1700 stacks alive and
//! one apply over the vocabulary runs 8 to 16 s; `"a"{2,1}` underflows the
//! repetition count and allocates until `bad_alloc` or the OOM killer; a run
//! of optional items makes every step advance thousands of stacks; a left
//! recursion hidden behind a rule that can match nothing (llama.cpp's own
//! check only sees literally empty alternatives) makes its stack walk push
//! forever (2.4 GB in 5 s). None of these calls can be interrupted once
//! started. This module keeps every llama.cpp grammar call short:
//!
//! - [`check_grammar`] / [`grammar_stats`]: a static precheck, linear in
//!   the text (milliseconds; about 50 ms for 50 KiB). A port of llama.cpp's
//!   GBNF parser (`llama_grammar_parser`: same syntax, escapes, comments and
//!   rewrite of `*`, `+`, `?`, `{m,n}` into rules, under an element budget)
//!   builds the rules llama.cpp will hold; the analysis below bounds their
//!   cost. A refused grammar gets a message naming the offending text.
//! - [`build_grammar`]: llama.cpp parses the grammar on a worker thread, and
//!   one apply over the whole vocabulary is timed there, within a time
//!   budget; the caller's thread never waits longer than the budget.
//! - [`GrammarStep`]: applies a grammar in chunks of candidates, checking a
//!   cancel callback and a deadline between chunks; accepts a token only once
//!   a one-candidate apply shows the grammar allows it (llama.cpp aborts the
//!   process on a rejected token, an end-of-generation token included).
//!
//! # Why chunking is exact
//!
//! `llama_grammar_apply_impl` decides every candidate on its own: `-inf` for
//! an end-of-generation token unless some stack is complete (a property of
//! the stacks, not of the other candidates), for an empty text, or when
//! `llama_grammar_reject_candidates` rejects it. That function filters the
//! candidate list stack by stack and code point by code point, so a
//! candidate's fate depends on its own code points and the stacks only. It
//! writes nothing but those logits (not `selected`, not `sorted`). Applying
//! it to consecutive slices gives bit for bit the array one call gives.
//!
//! # The cost model
//!
//! For every stack, each apply walks the candidates' first code points and
//! then *advances the stack past its top* (`llama_grammar_advance_stack`,
//! whose result is deduplicated by linear search) whether or not a candidate
//! matched: that part is paid again by every chunk. Accepting a token
//! advances every surviving stack once per code point. So the analysis
//! computes, on the expanded rules:
//!
//! - `breadth`: the most stacks one advance opens (the epsilon closure
//!   through rules that can match nothing, up through callers when a rule
//!   ends);
//! - `stacks`: a bound on the stacks alive at once — distinct stacks a rule
//!   can hold, and where a boundary is ambiguous (what can continue the left
//!   part can also start the right part, computed with first / "can
//!   continue" character sets) the stacks of several parses at once;
//! - `work`: over the stacks one advance opens, the sum of the square of
//!   what each of them opens when advanced in turn — what the next step
//!   costs for the stacks one advance made (several advancing stacks, in an
//!   ambiguous grammar, are bounded by `stacks`).
//!
//! Measured on this project's 2-core x86 machine (49152-token vocabulary),
//! a whole [`GrammarStep::apply`] of 24 chunks takes: llama.cpp's
//! `json.gbnf` (work 165) 3 ms; an array of an enum of 60 strings (work
//! 7443) 4 ms; `("a"{0,4}){0,4}){0,4}` (work 4625) 17 ms; 24 optional
//! items in a row (work 4901) 22 ms; 32 of them (work 11441) 49 ms; 48
//! (work 38025) 180 ms; `{0,12}` nested three deep (work 3 million) 8 s for
//! a single unchunked apply. Hence [`MAX_GRAMMAR_WORK`] 8192.
//!
//! # Limits of the analysis
//!
//! The bounds are exact upper bounds for grammars without recursion through
//! a non-final position (JSON's `value` inside `array` is such recursion).
//! For those, an ambiguous boundary in front of a recursive rule counts the
//! recursive rule once, and nesting is assumed not to multiply the stacks:
//! a grammar that is ambiguous *through* recursion (`.* value` where `value`
//! is JSON, say) can keep more stacks than `stacks` says. The probe in
//! [`build_grammar`] catches those that are slow from the start; the
//! deadline of [`GrammarStep::apply`] bounds the rest to one chunk past it.
//! The cost of one candidate also grows with the length of its text when
//! many stacks match the same run of characters (each match forks the
//! walk); `work` bounds the forks per step, not their product over a long
//! token.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use crate::model::Model;

/// Largest grammar text accepted, in bytes. llama.cpp's grammar parser and
/// its stack walk are recursive; bounding the text bounds their depth.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// Deepest parenthesis nesting accepted in a grammar (llama.cpp's parser
/// recurses once per group).
pub const MAX_GRAMMAR_NESTING: usize = 64;

/// Largest count accepted in `{m}`, `{m,}` and `{m,n}`: llama.cpp's
/// `MAX_REPETITION_THRESHOLD`. llama.cpp refuses a larger `m` and quietly
/// turns a larger `n` into "unbounded"; both are refused here.
pub const MAX_GRAMMAR_REPETITION: u64 = 2000;

/// Most grammar elements (8 bytes each in llama.cpp) the expanded grammar
/// may have. `"x"{0,2000}` costs 2000 rules of a few elements each.
pub const MAX_GRAMMAR_ELEMENTS: usize = 1 << 18;

/// Most stacks one advance of a parse stack may open (alternatives reached
/// through rules that can match nothing, e.g. a run of optional items, or
/// the alternatives of a large enumeration). llama.cpp deduplicates each
/// advance's result with a linear search, so one advance costs the square
/// of this; [`MAX_GRAMMAR_WORK`] bounds what is paid on every step, this
/// bounds the rest (the first advance, made when the grammar is built).
pub const MAX_GRAMMAR_BREADTH: u64 = 1024;

/// Bound on the parse stacks alive at once. Every stack is walked for every
/// candidate token, and accepting a token deduplicates the new stacks in
/// quadratic time.
pub const MAX_GRAMMAR_STACKS: u64 = 1024;

/// Bound on [`GrammarStats::work`], the cost of one step. Measured on a
/// 2-core x86 machine with a 49152-token vocabulary, a whole
/// [`GrammarStep::apply`] takes about 3 ms per 1000 units (plus a few ms for
/// the candidates' own walk), and its longest chunk of
/// [`DEFAULT_GRAMMAR_CHUNK`] well under a tenth of that. Grammars within this
/// limit take at most about 25 ms per step; llama.cpp's own grammars and
/// JSON-schema-derived ones measure under 600.
pub const MAX_GRAMMAR_WORK: u64 = 8192;

/// Candidates handed to llama.cpp per call by [`GrammarStep`] unless told
/// otherwise.
pub const DEFAULT_GRAMMAR_CHUNK: usize = 2048;

/// Longest that one apply over the whole vocabulary may take when
/// [`build_grammar`] times it. Grammars within the static limits take a few
/// milliseconds on a 2-core machine.
pub const MAX_GRAMMAR_PROBE: Duration = Duration::from_millis(250);

/// Stack of the thread that runs llama.cpp's grammar parser: its
/// left-recursion check recurses once per rule in a chain of leftmost
/// references.
const GRAMMAR_THREAD_STACK: usize = 64 << 20;

/// "Unbounded" in the analysis' counts.
const INF: u64 = u64::MAX;

// ---------------------------------------------------------------------------
// Public surface
// ---------------------------------------------------------------------------

/// What the precheck measured on the grammar as llama.cpp will expand it.
/// The counts are upper bounds; `u64::MAX` means unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarStats {
    /// Rules after expansion (named, groups, repetitions).
    pub rules: usize,
    /// Elements after expansion (what llama.cpp allocates, 8 bytes each).
    pub elements: usize,
    /// Most stacks one advance can open.
    pub breadth: u64,
    /// Most stacks alive at once.
    pub stacks: u64,
    /// The cost of one step (see the module docs): over the stacks one
    /// advance can open, the sum of the square of what each of them opens
    /// when it is advanced in turn.
    pub work: u64,
}

/// Checks grammar text before llama.cpp parses it: size, NUL, nesting, a
/// `root` rule, syntax, every rule defined, every repetition well formed
/// (`m <= n <=` [`MAX_GRAMMAR_REPETITION`]), no left recursion (also those
/// llama.cpp's own check misses), and the expanded grammar within
/// [`MAX_GRAMMAR_ELEMENTS`], [`MAX_GRAMMAR_BREADTH`], [`MAX_GRAMMAR_STACKS`]
/// and [`MAX_GRAMMAR_WORK`] (see the module docs for what they measure).
/// Runs in time about linear in the expanded grammar: milliseconds, tens of
/// them for 64 KiB.
///
/// # Errors
///
/// A message naming the offending part (line, column and text) when the
/// grammar is refused.
pub fn check_grammar(text: &str) -> Result<(), String> {
    grammar_stats(text).map(|_| ())
}

/// [`check_grammar`] that also returns what it measured.
///
/// # Errors
///
/// As [`check_grammar`].
pub fn grammar_stats(text: &str) -> Result<GrammarStats, String> {
    if text.trim().is_empty() {
        return Err("the grammar is empty".into());
    }
    if text.len() > MAX_GRAMMAR_BYTES {
        return Err(format!(
            "the grammar is {} bytes, more than {MAX_GRAMMAR_BYTES}",
            text.len()
        ));
    }
    if text.contains('\0') {
        return Err("the grammar contains a NUL character".into());
    }
    let parsed = Parser::new(text).run().map_err(|r| r.render(text))?;
    let stats = analyse(&parsed).map_err(|r| r.render(text))?;
    Ok(stats)
}

/// Parses `text` into a llama.cpp grammar sampler for `model`, off the
/// caller's thread and within `budget`.
///
/// The text passes [`check_grammar`] first. Then a worker thread runs
/// llama.cpp's parser and times one apply over the whole vocabulary (a
/// grammar whose first step takes longer than [`MAX_GRAMMAR_PROBE`] is
/// refused). `LlamaSampler` is `Send` (llama-cpp-2 implements it: a grammar
/// sampler is plain heap data plus a pointer to the model's immutable
/// vocabulary), so the worker hands the sampler back. On timeout the worker
/// is left to finish on its own and its result is dropped; the precheck
/// bounds how long that can take and how much memory it holds. The worker
/// keeps a clone of `model` until it ends.
///
/// The sampler reads `model`'s vocabulary: keep the model alive while the
/// sampler is used. Do not call `reset` on it on a thread with a small
/// stack (it re-runs llama.cpp's recursive parser).
///
/// # Errors
///
/// The precheck's message, llama.cpp's refusal (syntax, a `<token>` that is
/// not one token of this vocabulary, left recursion), a probe over
/// [`MAX_GRAMMAR_PROBE`], or the budget running out.
pub fn build_grammar(model: &Model, text: &str, budget: Duration) -> Result<LlamaSampler, String> {
    let started = Instant::now();
    check_grammar(text)?;
    let (tx, rx) = mpsc::sync_channel(1);
    let worker_model = model.clone();
    let owned = text.to_owned();
    std::thread::Builder::new()
        .name("erllama-grammar".into())
        .stack_size(GRAMMAR_THREAD_STACK)
        .spawn(move || {
            let result = parse_and_probe(&worker_model, &owned);
            // The caller may have given up: then the sampler is dropped here.
            let _ = tx.send(result);
        })
        .map_err(|e| format!("could not start the grammar thread: {e}"))?;
    match rx.recv_timeout(budget.saturating_sub(started.elapsed())) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "llama.cpp did not build the grammar within {} ms",
            budget.as_millis()
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err("the grammar thread ended without a result".into())
        }
    }
}

fn parse_and_probe(model: &Model, text: &str) -> Result<LlamaSampler, String> {
    let mut sampler =
        LlamaSampler::grammar(&model.inner.model, text, "root").map_err(|e| match e {
            llama_cpp_2::GrammarError::NullGrammar => "llama.cpp could not parse the grammar \
                 (syntax error, undefined rule, a <token> that is not one token of this \
                 vocabulary, or left recursion)"
                .to_owned(),
            other => other.to_string(),
        })?;
    let n_vocab = i32::try_from(model.n_vocab()).unwrap_or(i32::MAX);
    let mut all = LlamaTokenDataArray::new(
        (0..n_vocab)
            .map(|i| LlamaTokenData::new(LlamaToken(i), 0.0, 0.0))
            .collect(),
        false,
    );
    let t = Instant::now();
    all.apply_sampler(&mut sampler);
    let took = t.elapsed();
    if took > MAX_GRAMMAR_PROBE {
        return Err(format!(
            "the grammar is too expensive: its first step over the vocabulary took {} ms \
             (at most {} ms)",
            took.as_millis(),
            MAX_GRAMMAR_PROBE.as_millis()
        ));
    }
    if !all.data.iter().any(|d| d.logit() > f32::NEG_INFINITY) {
        return Err("the grammar allows no token of this vocabulary".into());
    }
    Ok(sampler)
}

/// Why [`GrammarStep`] stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarStepError {
    /// The interrupt callback asked to stop (checked between chunks).
    #[error("cancelled while applying the grammar")]
    Cancelled,
    /// The deadline passed (checked between chunks).
    #[error("applying the grammar took {} ms, past its deadline", elapsed.as_millis())]
    TooSlow {
        /// Time spent in this apply.
        elapsed: Duration,
    },
    /// The grammar allows none of the candidates.
    #[error("the grammar allows no next token")]
    NoCandidate,
    /// The grammar does not allow this token now; accepting it would abort
    /// the process inside llama.cpp.
    #[error("the grammar does not allow token {token} here")]
    Rejected {
        /// The token id.
        token: i32,
    },
    /// A candidate id outside the vocabulary (llama.cpp would throw).
    #[error("token {token} is outside the vocabulary of {n_vocab}")]
    InvalidToken {
        /// The token id.
        token: i32,
        /// The vocabulary size.
        n_vocab: u32,
    },
}

/// Applies a grammar sampler in bounded steps. Create one per model (it
/// keeps a scratch buffer) and use it on the thread that owns the sampler.
#[derive(Debug)]
pub struct GrammarStep {
    chunk: usize,
    n_vocab: u32,
    scratch: LlamaTokenDataArray,
}

impl GrammarStep {
    /// A stepper for grammars of `model`, [`DEFAULT_GRAMMAR_CHUNK`]
    /// candidates per llama.cpp call.
    #[must_use]
    pub fn new(model: &Model) -> Self {
        Self {
            chunk: DEFAULT_GRAMMAR_CHUNK,
            n_vocab: model.n_vocab(),
            scratch: LlamaTokenDataArray::new(Vec::new(), false),
        }
    }

    /// The same with `chunk` candidates per call (at least 1). Smaller
    /// chunks react sooner to cancel and deadline; each call also pays a
    /// fixed cost per parse stack.
    #[must_use]
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// Candidates per llama.cpp call.
    #[must_use]
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Applies `grammar` to `cands` chunk by chunk: the result is bit for
    /// bit that of `cands.apply_sampler(grammar)` (see the module docs).
    /// Before each chunk, `interrupted` is called and the `deadline`
    /// checked. `selected` and `sorted` are left as they are.
    ///
    /// # Errors
    ///
    /// [`GrammarStepError::Cancelled`], [`GrammarStepError::TooSlow`] (the
    /// candidates are then partly masked: discard them),
    /// [`GrammarStepError::NoCandidate`] when every logit ends `-inf`, and
    /// [`GrammarStepError::InvalidToken`] before anything runs.
    pub fn apply(
        &mut self,
        grammar: &mut LlamaSampler,
        cands: &mut LlamaTokenDataArray,
        deadline: Instant,
        mut interrupted: impl FnMut() -> bool,
    ) -> Result<(), GrammarStepError> {
        let started = Instant::now();
        self.check_ids(cands.data.iter().map(|d| d.id().0))?;
        for part in cands.data.chunks_mut(self.chunk) {
            if interrupted() {
                return Err(GrammarStepError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GrammarStepError::TooSlow {
                    elapsed: now - started,
                });
            }
            self.scratch.data.clear();
            self.scratch.data.extend_from_slice(part);
            self.scratch.selected = None;
            self.scratch.sorted = false;
            self.scratch.apply_sampler(grammar);
            // The grammar only masks logits; it never resizes the array.
            if self.scratch.data.len() == part.len() {
                part.copy_from_slice(&self.scratch.data);
            } else {
                for (dst, src) in part.iter_mut().zip(&self.scratch.data) {
                    *dst = *src;
                }
            }
        }
        if cands.data.iter().any(|d| d.logit() > f32::NEG_INFINITY) {
            Ok(())
        } else {
            Err(GrammarStepError::NoCandidate)
        }
    }

    /// Advances `grammar` past `token` once the grammar allows it: a
    /// one-candidate apply checks first, because llama.cpp aborts the
    /// process when asked to accept a token its grammar rejects (an
    /// end-of-generation token while the grammar is incomplete included).
    /// Under the precheck's limits both calls are short.
    ///
    /// # Errors
    ///
    /// [`GrammarStepError::InvalidToken`], [`GrammarStepError::Rejected`];
    /// the grammar is then unchanged.
    pub fn accept(
        &mut self,
        grammar: &mut LlamaSampler,
        token: LlamaToken,
    ) -> Result<(), GrammarStepError> {
        if !self.allows(grammar, token)? {
            return Err(GrammarStepError::Rejected { token: token.0 });
        }
        grammar.accept(token);
        Ok(())
    }

    /// Whether `grammar` allows `token` next (one-candidate apply).
    ///
    /// # Errors
    ///
    /// [`GrammarStepError::InvalidToken`].
    pub fn allows(
        &mut self,
        grammar: &mut LlamaSampler,
        token: LlamaToken,
    ) -> Result<bool, GrammarStepError> {
        self.check_ids(std::iter::once(token.0))?;
        self.scratch.data.clear();
        self.scratch.data.push(LlamaTokenData::new(token, 0.0, 0.0));
        self.scratch.selected = None;
        self.scratch.sorted = false;
        self.scratch.apply_sampler(grammar);
        Ok(self
            .scratch
            .data
            .first()
            .is_some_and(|d| d.logit() > f32::NEG_INFINITY))
    }

    fn check_ids(&self, mut ids: impl Iterator<Item = i32>) -> Result<(), GrammarStepError> {
        match ids.find(|&t| u32::try_from(t).ok().is_none_or(|t| t >= self.n_vocab)) {
            Some(token) => Err(GrammarStepError::InvalidToken {
                token,
                n_vocab: self.n_vocab,
            }),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// A refusal at a byte offset (or about the whole grammar).
#[derive(Debug)]
struct Refusal {
    at: Option<(usize, usize)>,
    msg: String,
}

impl Refusal {
    fn at(start: usize, end: usize, msg: impl Into<String>) -> Self {
        Self {
            at: Some((start, end.max(start))),
            msg: msg.into(),
        }
    }

    fn render(&self, text: &str) -> String {
        let Some((start, end)) = self.at else {
            return self.msg.clone();
        };
        let start = floor_char(text, start.min(text.len()));
        let end = floor_char(text, end.min(text.len()));
        let line = text[..start].matches('\n').count() + 1;
        let col = text[..start].rfind('\n').map_or(start, |nl| start - nl - 1) + 1;
        let mut shown: String = text[start..end.max(start)]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(60)
            .collect();
        if text[start..end].chars().count() > 60 {
            shown.push('…');
        }
        if shown.trim().is_empty() {
            shown = text[start..]
                .chars()
                .take_while(|&c| c != '\n')
                .take(40)
                .collect();
        }
        format!(
            "{} (line {line}, column {col}: `{}`)",
            self.msg,
            shown.trim()
        )
    }
}

fn floor_char(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

// ---------------------------------------------------------------------------
// Parser: a port of llama.cpp's `llama_grammar_parser` (llama-grammar.cpp)
// ---------------------------------------------------------------------------

/// One grammar element, as llama.cpp's `llama_grammar_element`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum El {
    End,
    Alt,
    Ref(u32),
    Char(u32),
    CharNot(u32),
    RngUpper(u32),
    CharAlt(u32),
    Any,
    Token,
}

/// The grammar as llama.cpp will hold it.
#[derive(Debug)]
struct Parsed {
    rules: Vec<Vec<El>>,
    /// Source span of each rule (definition, group or repetition).
    spans: Vec<(usize, usize)>,
    root: u32,
    elements: usize,
}

struct Parser<'a> {
    src: &'a [u8],
    symbols: HashMap<String, u32>,
    rules: Vec<Vec<El>>,
    spans: Vec<(usize, usize)>,
    /// Elements allocated so far (an upper bound of what llama.cpp holds).
    used: usize,
    depth: usize,
}

type PResult<T> = Result<T, Refusal>;

fn is_word_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-'
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            src: text.as_bytes(),
            symbols: HashMap::new(),
            rules: Vec::new(),
            spans: Vec::new(),
            used: 0,
            depth: 0,
        }
    }

    /// The byte at `i`, 0 past the end (llama.cpp reads a C string).
    fn at(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn syntax(&self, pos: usize, what: &str) -> Refusal {
        let end = (pos + 20).min(self.src.len());
        Refusal::at(pos, end, format!("grammar syntax error: {what}"))
    }

    fn charge(&mut self, n: usize, span: (usize, usize)) -> PResult<()> {
        self.used = self.used.saturating_add(n);
        if self.used > MAX_GRAMMAR_ELEMENTS {
            return Err(Refusal::at(
                span.0,
                span.1,
                format!(
                    "the grammar expands to more than {MAX_GRAMMAR_ELEMENTS} elements; \
                     reduce the repetition counts"
                ),
            ));
        }
        Ok(())
    }

    fn run(mut self) -> PResult<Parsed> {
        let mut pos = self.parse_space(0, true);
        while self.at(pos) != 0 {
            pos = self.parse_rule(pos)?;
        }
        // Every rule defined, every reference to a defined rule.
        let mut names: Vec<Option<&str>> = vec![None; self.symbols.len().max(self.rules.len())];
        for (name, &id) in &self.symbols {
            if let Some(slot) = names.get_mut(id as usize) {
                *slot = Some(name.as_str());
            }
        }
        for (id, rule) in self.rules.iter().enumerate() {
            if rule.is_empty() {
                let name = names.get(id).copied().flatten().unwrap_or("?");
                return Err(Refusal {
                    at: None,
                    msg: format!("the grammar uses rule `{name}` but does not define it"),
                });
            }
            for el in rule {
                if let El::Ref(r) = *el {
                    if self.rules.get(r as usize).is_none_or(Vec::is_empty) {
                        let name = names.get(r as usize).copied().flatten().unwrap_or("?");
                        let span = self.spans.get(id).copied().unwrap_or((0, 0));
                        return Err(Refusal::at(
                            span.0,
                            span.1,
                            format!("the grammar uses rule `{name}` but does not define it"),
                        ));
                    }
                }
            }
        }
        let Some(&root) = self.symbols.get("root") else {
            return Err(Refusal {
                at: None,
                msg: "the grammar has no `root ::= ...` rule".into(),
            });
        };
        let elements = self.rules.iter().map(Vec::len).sum();
        self.spans.resize(self.rules.len(), (0, 0));
        Ok(Parsed {
            rules: self.rules,
            spans: self.spans,
            root,
            elements,
        })
    }

    fn parse_space(&self, mut pos: usize, newline_ok: bool) -> usize {
        loop {
            match self.at(pos) {
                b' ' | b'\t' => pos += 1,
                b'\r' | b'\n' if newline_ok => pos += 1,
                b'#' => {
                    while !matches!(self.at(pos), 0 | b'\r' | b'\n') {
                        pos += 1;
                    }
                }
                _ => return pos,
            }
        }
    }

    fn parse_name(&self, src: usize) -> PResult<usize> {
        let mut pos = src;
        while is_word_char(self.at(pos)) {
            pos += 1;
        }
        if pos == src {
            return Err(self.syntax(src, "expecting a rule name"));
        }
        Ok(pos)
    }

    fn parse_int(&self, src: usize) -> PResult<(u64, usize)> {
        let mut pos = src;
        let mut value: u64 = 0;
        while self.at(pos).is_ascii_digit() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(self.at(pos) - b'0')))
                .ok_or_else(|| self.syntax(src, "number too large"))?;
            pos += 1;
        }
        if pos == src {
            return Err(self.syntax(src, "expecting an integer"));
        }
        Ok((value, pos))
    }

    fn parse_hex(&self, src: usize, size: usize) -> PResult<(u32, usize)> {
        let end = src + size;
        let mut pos = src;
        let mut value: u32 = 0;
        while pos < end && self.at(pos) != 0 {
            let Some(d) = char::from(self.at(pos)).to_digit(16) else {
                break;
            };
            value = value.wrapping_shl(4).wrapping_add(d);
            pos += 1;
        }
        if pos != end {
            return Err(self.syntax(src, &format!("expecting {size} hex digits")));
        }
        Ok((value, pos))
    }

    /// llama.cpp's `decode_utf8` for one code point of the grammar text.
    fn decode_utf8(&self, src: usize) -> (u32, usize) {
        const LOOKUP: [usize; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4];
        let first = self.at(src);
        let len = LOOKUP[usize::from(first >> 4)];
        let mask = (1u32 << (8 - len)) - 1;
        let mut value = u32::from(first) & mask;
        let end = src + len;
        let mut pos = src + 1;
        while pos < end && self.at(pos) != 0 {
            value = (value << 6) + (u32::from(self.at(pos)) & 0x3F);
            pos += 1;
        }
        (value, pos)
    }

    fn parse_char(&self, src: usize) -> PResult<(u32, usize)> {
        if self.at(src) == b'\\' {
            return match self.at(src + 1) {
                b'x' => self.parse_hex(src + 2, 2),
                b'u' => self.parse_hex(src + 2, 4),
                b'U' => self.parse_hex(src + 2, 8),
                b't' => Ok((u32::from(b'\t'), src + 2)),
                b'r' => Ok((u32::from(b'\r'), src + 2)),
                b'n' => Ok((u32::from(b'\n'), src + 2)),
                c @ (b'\\' | b'"' | b'[' | b']' | b'-') => Ok((u32::from(c), src + 2)),
                _ => Err(self.syntax(src, "unknown escape")),
            };
        }
        if self.at(src) != 0 {
            return Ok(self.decode_utf8(src));
        }
        Err(self.syntax(src, "unexpected end of input"))
    }

    /// `<[id]>` or `<text>`; which token `<text>` is needs the vocabulary,
    /// so only the syntax is checked here (llama.cpp checks the rest).
    fn parse_token(&self, src: usize) -> PResult<usize> {
        let mut pos = src;
        if self.at(pos) != b'<' {
            return Err(self.syntax(pos, "expecting '<'"));
        }
        pos += 1;
        if self.at(pos) == b'[' {
            pos += 1;
            let (id, end) = self.parse_int(pos)?;
            if id > u64::from(u32::MAX) {
                return Err(self.syntax(pos, "token id too large"));
            }
            pos = end;
            if self.at(pos) != b']' {
                return Err(self.syntax(pos, "expecting ']'"));
            }
            pos += 1;
            if self.at(pos) != b'>' {
                return Err(self.syntax(pos, "expecting '>'"));
            }
            return Ok(pos + 1);
        }
        while self.at(pos) != 0 && self.at(pos) != b'>' {
            pos += 1;
        }
        if self.at(pos) != b'>' {
            return Err(self.syntax(pos, "expecting '>'"));
        }
        Ok(pos + 1)
    }

    fn get_symbol_id(&mut self, name: &str) -> u32 {
        let next = u32::try_from(self.symbols.len()).unwrap_or(u32::MAX);
        *self.symbols.entry(name.to_owned()).or_insert(next)
    }

    /// As llama.cpp: `base_N`, where N is the current symbol count. Rule
    /// names cannot contain `_`, so these never collide with user names.
    fn generate_symbol_id(&mut self, base: &str, span: (usize, usize)) -> u32 {
        let next = u32::try_from(self.symbols.len()).unwrap_or(u32::MAX);
        self.symbols.insert(format!("{base}_{next}"), next);
        self.set_span(next, span);
        next
    }

    fn set_span(&mut self, id: u32, span: (usize, usize)) {
        let id = id as usize;
        if self.spans.len() <= id {
            self.spans.resize(id + 1, (0, 0));
        }
        self.spans[id] = span;
    }

    fn add_rule(&mut self, id: u32, rule: Vec<El>) {
        let id = id as usize;
        if self.rules.len() <= id {
            self.rules.resize(id + 1, Vec::new());
        }
        self.rules[id] = rule;
    }

    fn parse_rule(&mut self, src: usize) -> PResult<usize> {
        let name_end = self.parse_name(src)?;
        let mut pos = self.parse_space(name_end, false);
        let name = std::str::from_utf8(&self.src[src..name_end])
            .unwrap_or_default()
            .to_owned();
        let rule_id = self.get_symbol_id(&name);
        if !(self.at(pos) == b':' && self.at(pos + 1) == b':' && self.at(pos + 2) == b'=') {
            return Err(self.syntax(pos, "expecting ::="));
        }
        pos = self.parse_space(pos + 3, true);
        pos = self.parse_alternates(pos, &name, rule_id, false)?;
        self.set_span(rule_id, (src, pos));
        match self.at(pos) {
            b'\r' => pos += if self.at(pos + 1) == b'\n' { 2 } else { 1 },
            b'\n' => pos += 1,
            0 => {}
            _ => return Err(self.syntax(pos, "expecting newline or end")),
        }
        Ok(self.parse_space(pos, true))
    }

    fn parse_alternates(
        &mut self,
        src: usize,
        rule_name: &str,
        rule_id: u32,
        is_nested: bool,
    ) -> PResult<usize> {
        let mut rule = Vec::new();
        let mut pos = self.parse_sequence(src, rule_name, &mut rule, is_nested)?;
        while self.at(pos) == b'|' {
            self.charge(1, (pos, pos + 1))?;
            rule.push(El::Alt);
            pos = self.parse_space(pos + 1, true);
            pos = self.parse_sequence(pos, rule_name, &mut rule, is_nested)?;
        }
        self.charge(1, (src, pos))?;
        rule.push(El::End);
        self.add_rule(rule_id, rule);
        Ok(pos)
    }

    fn parse_sequence(
        &mut self,
        src: usize,
        rule_name: &str,
        rule: &mut Vec<El>,
        is_nested: bool,
    ) -> PResult<usize> {
        let mut last_sym_start = rule.len();
        // Where the last symbol starts in the text, for messages.
        let mut last_sym_src = src;
        let mut pos = src;
        let mut n_prev_rules: u64 = 1;
        while self.at(pos) != 0 {
            let c = self.at(pos);
            if c == b'"' {
                last_sym_src = pos;
                pos += 1;
                last_sym_start = rule.len();
                n_prev_rules = 1;
                while self.at(pos) != b'"' {
                    if self.at(pos) == 0 {
                        return Err(self.syntax(last_sym_src, "unterminated string literal"));
                    }
                    let (ch, next) = self.parse_char(pos)?;
                    pos = next;
                    self.charge(1, (last_sym_src, pos))?;
                    rule.push(El::Char(ch));
                }
                pos = self.parse_space(pos + 1, is_nested);
            } else if c == b'[' {
                last_sym_src = pos;
                pos += 1;
                let negated = self.at(pos) == b'^';
                if negated {
                    pos += 1;
                }
                last_sym_start = rule.len();
                n_prev_rules = 1;
                while self.at(pos) != b']' {
                    if self.at(pos) == 0 {
                        return Err(self.syntax(last_sym_src, "unterminated character class"));
                    }
                    let (ch, next) = self.parse_char(pos)?;
                    pos = next;
                    let el = if last_sym_start < rule.len() {
                        El::CharAlt(ch)
                    } else if negated {
                        El::CharNot(ch)
                    } else {
                        El::Char(ch)
                    };
                    self.charge(1, (last_sym_src, pos))?;
                    rule.push(el);
                    if self.at(pos) == b'-' && self.at(pos + 1) != b']' {
                        if self.at(pos + 1) == 0 {
                            return Err(self.syntax(pos, "unexpected end of input"));
                        }
                        let (hi, next) = self.parse_char(pos + 1)?;
                        pos = next;
                        self.charge(1, (last_sym_src, pos))?;
                        rule.push(El::RngUpper(hi));
                    }
                }
                pos = self.parse_space(pos + 1, is_nested);
            } else if c == b'<' || c == b'!' {
                last_sym_src = pos;
                if c == b'!' {
                    pos += 1;
                }
                let end = self.parse_token(pos)?;
                last_sym_start = rule.len();
                n_prev_rules = 1;
                self.charge(1, (last_sym_src, end))?;
                rule.push(El::Token);
                pos = self.parse_space(end, is_nested);
            } else if is_word_char(c) {
                last_sym_src = pos;
                let name_end = self.parse_name(pos)?;
                let name = std::str::from_utf8(&self.src[pos..name_end])
                    .unwrap_or_default()
                    .to_owned();
                let ref_id = self.get_symbol_id(&name);
                pos = self.parse_space(name_end, is_nested);
                last_sym_start = rule.len();
                n_prev_rules = 1;
                self.charge(1, (last_sym_src, name_end))?;
                rule.push(El::Ref(ref_id));
            } else if c == b'(' {
                last_sym_src = pos;
                self.depth += 1;
                if self.depth > MAX_GRAMMAR_NESTING {
                    return Err(Refusal::at(
                        pos,
                        pos + 1,
                        format!(
                            "the grammar nests parentheses more than {MAX_GRAMMAR_NESTING} deep"
                        ),
                    ));
                }
                pos = self.parse_space(pos + 1, true);
                let n_rules_before = self.symbols.len();
                let sub_id = self.generate_symbol_id(rule_name, (last_sym_src, last_sym_src));
                pos = self.parse_alternates(pos, rule_name, sub_id, true)?;
                self.set_span(sub_id, (last_sym_src, pos + 1));
                n_prev_rules = (self.symbols.len() - n_rules_before).max(1) as u64;
                last_sym_start = rule.len();
                self.charge(1, (last_sym_src, pos))?;
                rule.push(El::Ref(sub_id));
                if self.at(pos) != b')' {
                    return Err(self.syntax(pos, "expecting ')'"));
                }
                self.depth -= 1;
                pos = self.parse_space(pos + 1, is_nested);
            } else if c == b'.' {
                last_sym_src = pos;
                last_sym_start = rule.len();
                n_prev_rules = 1;
                self.charge(1, (pos, pos + 1))?;
                rule.push(El::Any);
                pos = self.parse_space(pos + 1, is_nested);
            } else if c == b'*' || c == b'+' || c == b'?' {
                let op_end = pos + 1;
                pos = self.parse_space(pos + 1, is_nested);
                let (min, max) = match c {
                    b'*' => (0, None),
                    b'+' => (1, None),
                    _ => (0, Some(1)),
                };
                let rep = Repetition {
                    min,
                    max,
                    span: (last_sym_src, op_end),
                };
                self.handle_repetitions(rule, rule_name, last_sym_start, &mut n_prev_rules, &rep)?;
            } else if c == b'{' {
                let brace = pos;
                pos = self.parse_space(pos + 1, is_nested);
                if !self.at(pos).is_ascii_digit() {
                    return Err(self.syntax(pos, "expecting an integer after '{'"));
                }
                let (min, end) = self.parse_int(pos)?;
                pos = self.parse_space(end, is_nested);
                let max = match self.at(pos) {
                    b'}' => Some(min),
                    b',' => {
                        pos = self.parse_space(pos + 1, is_nested);
                        let mut max = None;
                        if self.at(pos).is_ascii_digit() {
                            let (n, end) = self.parse_int(pos)?;
                            max = Some(n);
                            pos = self.parse_space(end, is_nested);
                        }
                        if self.at(pos) != b'}' {
                            return Err(self.syntax(pos, "expecting '}'"));
                        }
                        max
                    }
                    _ => return Err(self.syntax(pos, "expecting ',' or '}'")),
                };
                let op_end = pos + 1;
                pos = self.parse_space(pos + 1, is_nested);
                let span = (last_sym_src, op_end);
                let shown = (brace, op_end);
                if let Some(n) = max.filter(|&n| n < min) {
                    return Err(Refusal::at(
                        shown.0,
                        shown.1,
                        format!("a repetition's minimum {min} is above its maximum {n}"),
                    ));
                }
                if min > MAX_GRAMMAR_REPETITION {
                    return Err(Refusal::at(
                        shown.0,
                        shown.1,
                        format!(
                            "a repetition's minimum is above {MAX_GRAMMAR_REPETITION}, llama.cpp's \
                             limit"
                        ),
                    ));
                }
                // As llama.cpp does: a maximum above its limit means no
                // maximum (`{m,}`), so JSON-schema lengths beyond 2000 work.
                let max = max.filter(|&n| n <= MAX_GRAMMAR_REPETITION);
                let rep = Repetition { min, max, span };
                self.handle_repetitions(rule, rule_name, last_sym_start, &mut n_prev_rules, &rep)?;
            } else {
                break;
            }
        }
        Ok(pos)
    }

    /// llama.cpp's `handle_repetitions`: `S{m,n}` becomes `S` m times
    /// followed by a chain of n-m optional rules; `S{m,}` becomes `S` m
    /// times and one recursive rule.
    fn handle_repetitions(
        &mut self,
        rule: &mut Vec<El>,
        rule_name: &str,
        last_sym_start: usize,
        n_prev_rules: &mut u64,
        rep: &Repetition,
    ) -> PResult<()> {
        let (min, max) = (rep.min, rep.max);
        if last_sym_start == rule.len() {
            return Err(Refusal::at(
                rep.span.0,
                rep.span.1,
                "grammar syntax error: a repetition follows nothing",
            ));
        }
        let prev: Vec<El> = rule[last_sym_start..].to_vec();
        let total_rules = match max {
            Some(n) if n > 0 => n,
            _ if min > 0 => min,
            _ => 1,
        };
        if n_prev_rules.saturating_mul(total_rules) > MAX_GRAMMAR_REPETITION {
            return Err(Refusal::at(
                rep.span.0,
                rep.span.1,
                format!(
                    "this repetition copies {n_prev_rules} rules {total_rules} times, more than \
                     llama.cpp's limit of {MAX_GRAMMAR_REPETITION}"
                ),
            ));
        }
        let n_opt = match max {
            None => 1,
            Some(n) => n - min,
        };
        let copies = (min.saturating_sub(1) as usize).saturating_mul(prev.len());
        let optional = (n_opt as usize).saturating_mul(prev.len() + 3);
        self.charge(copies.saturating_add(optional), rep.span)?;
        if min == 0 {
            rule.truncate(last_sym_start);
        } else {
            for _ in 1..min {
                rule.extend_from_slice(&prev);
            }
        }
        let mut last_rec = 0;
        for i in 0..n_opt {
            let mut rec = prev.clone();
            let id = self.generate_symbol_id(rule_name, rep.span);
            if i > 0 || max.is_none() {
                rec.push(El::Ref(if max.is_none() { id } else { last_rec }));
            }
            rec.push(El::Alt);
            rec.push(El::End);
            self.add_rule(id, rec);
            last_rec = id;
        }
        if n_opt > 0 {
            rule.push(El::Ref(last_rec));
        }
        *n_prev_rules = n_prev_rules.saturating_mul(total_rules);
        Ok(())
    }
}

/// `{min,max}` (`max` `None`: unbounded) and the text it applies to.
struct Repetition {
    min: u64,
    max: Option<u64>,
    span: (usize, usize),
}

// ---------------------------------------------------------------------------
// Character sets
// ---------------------------------------------------------------------------

/// A set of code points as sorted, disjoint, non-adjacent inclusive ranges.
/// Every use only needs a superset, so a set with many ranges is widened
/// to its hull to keep the analysis linear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CharSet(Vec<(u32, u32)>);

const MAX_RANGES: usize = 32;

impl CharSet {
    fn all() -> Self {
        Self(vec![(0, u32::MAX)])
    }

    fn from_ranges(mut v: Vec<(u32, u32)>) -> Self {
        v.retain(|&(lo, hi)| lo <= hi);
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if u64::from(lo) <= u64::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        if out.len() > MAX_RANGES {
            let lo = out[0].0;
            let hi = out[out.len() - 1].1;
            out = vec![(lo, hi)];
        }
        Self(out)
    }

    fn union(&self, other: &Self) -> Self {
        if other.0.is_empty() || self == other {
            return self.clone();
        }
        if self.0.is_empty() {
            return other.clone();
        }
        let mut v = self.0.clone();
        v.extend_from_slice(&other.0);
        Self::from_ranges(v)
    }

    fn intersects(&self, other: &Self) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            if a.1 < b.0 {
                i += 1;
            } else if b.1 < a.0 {
                j += 1;
            } else {
                return true;
            }
        }
        false
    }

    fn complement(&self) -> Self {
        let mut out = Vec::new();
        let mut next: u64 = 0;
        for &(lo, hi) in &self.0 {
            if u64::from(lo) > next {
                out.push((next as u32, lo - 1));
            }
            next = u64::from(hi) + 1;
        }
        if next <= u64::from(u32::MAX) {
            out.push((next as u32, u32::MAX));
        }
        Self::from_ranges(out)
    }
}

/// Most total weight on any one code point: `sets` weighted. Used for "how
/// many of these can consume the same character".
fn max_coverage<'s>(sets: impl Iterator<Item = (&'s CharSet, u64)>) -> u64 {
    let mut events: Vec<(u64, i128)> = Vec::new();
    for (set, w) in sets {
        if w == 0 {
            continue;
        }
        for &(lo, hi) in &set.0 {
            events.push((u64::from(lo), i128::from(w)));
            events.push((u64::from(hi) + 1, -i128::from(w)));
        }
    }
    // Ends before starts at the same point: [a,b] and [b+1,c] do not overlap.
    events.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut best) = (0i128, 0i128);
    for (_, d) in events {
        cur += d;
        best = best.max(cur);
    }
    u64::try_from(best).unwrap_or(INF)
}

// ---------------------------------------------------------------------------
// Analysis of the expanded grammar
// ---------------------------------------------------------------------------

/// One symbol of an alternative: a terminal (its set of code points; a
/// `<token>` counts as any) or a rule reference (`tail`: last of its
/// alternative, so llama.cpp pushes no continuation for it).
#[derive(Debug, Clone)]
enum Sym {
    T(CharSet),
    R { id: u32, tail: bool },
}

/// Splits llama.cpp's element vector of one rule into alternatives of
/// symbols, grouping a character class (`[a-z0-9]`: CHAR, RNG_UPPER,
/// CHAR_ALT, ...) into one terminal as `llama_grammar_match_char` reads it.
fn symbols_of(rule: &[El]) -> Vec<Vec<Sym>> {
    let mut alts = vec![Vec::new()];
    let mut i = 0;
    while i < rule.len() {
        let cur = alts.last_mut().expect("one alternative at least");
        match rule[i] {
            El::End => break,
            El::Alt => {
                alts.push(Vec::new());
                i += 1;
            }
            El::Ref(id) => {
                let tail = matches!(rule.get(i + 1), Some(El::Alt | El::End) | None);
                cur.push(Sym::R { id, tail });
                i += 1;
            }
            El::Token => {
                cur.push(Sym::T(CharSet::all()));
                i += 1;
            }
            El::Char(_) | El::CharNot(_) | El::Any | El::CharAlt(_) | El::RngUpper(_) => {
                let negated = matches!(rule[i], El::CharNot(_));
                let mut ranges = Vec::new();
                loop {
                    let v = match rule[i] {
                        El::Char(v) | El::CharNot(v) | El::CharAlt(v) | El::RngUpper(v) => v,
                        _ => 0,
                    };
                    if let Some(El::RngUpper(hi)) = rule.get(i + 1) {
                        ranges.push((v, *hi));
                        i += 2;
                    } else if rule[i] == El::Any {
                        ranges.push((0, u32::MAX));
                        i += 1;
                    } else {
                        ranges.push((v, v));
                        i += 1;
                    }
                    if !matches!(rule.get(i), Some(El::CharAlt(_))) {
                        break;
                    }
                }
                let set = CharSet::from_ranges(ranges);
                cur.push(Sym::T(if negated { set.complement() } else { set }));
            }
        }
    }
    alts
}

/// What the analysis knows of a rule (or of a sequence of symbols).
///
/// Languages are over code points. `cont` is the set of characters `c`
/// such that some word `a` of the language is followed by `c` inside a
/// longer word (so after reading `a`, "the rule is done" and "the rule goes
/// on with c" are both possible); it is empty exactly when the language is
/// prefix-free. A boundary `A B` is deterministic when `cont(A)` and
/// `first(B)` are disjoint: then how far `A` reached is never ambiguous.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Lang {
    nullable: bool,
    first: CharSet,
    alpha: CharSet,
    cont: CharSet,
}

impl Lang {
    fn terminal(set: &CharSet) -> Self {
        Self {
            nullable: false,
            first: set.clone(),
            alpha: set.clone(),
            cont: CharSet::default(),
        }
    }

    /// The empty word.
    fn epsilon() -> Self {
        Self {
            nullable: true,
            ..Self::default()
        }
    }

    /// Whether the boundary between `self` and `next` is ambiguous.
    fn ambiguous_before(&self, next_first: &CharSet) -> bool {
        self.cont.intersects(next_first)
    }

    /// `self` followed by `b`.
    fn then(&self, b: &Lang) -> Lang {
        let mut cont = b.cont.clone();
        if b.nullable {
            cont = cont.union(&self.cont);
        }
        if self.cont.intersects(&b.first) {
            // a1 b1 a proper prefix of a2 b2 with a1 != a2: the next
            // character lies somewhere in a2 or b2.
            cont = cont.union(&self.alpha).union(&b.alpha);
        }
        Lang {
            nullable: self.nullable && b.nullable,
            first: if self.nullable {
                self.first.union(&b.first)
            } else {
                self.first.clone()
            },
            alpha: self.alpha.union(&b.alpha),
            cont,
        }
    }
}

/// `a | b | ...`.
fn alternation(alts: &[Lang]) -> Lang {
    let mut out = Lang::default();
    for l in alts {
        out.nullable |= l.nullable;
        out.first = out.first.union(&l.first);
        out.alpha = out.alpha.union(&l.alpha);
        out.cont = out.cont.union(&l.cont);
    }
    if out.nullable {
        // The empty word is a proper prefix of every other word.
        out.cont = out.cont.union(&out.first);
    }
    if max_coverage(alts.iter().map(|l| (&l.first, 1))) > 1 {
        out.cont = out.cont.union(&out.alpha);
    }
    out
}

/// Per-rule results.
#[derive(Debug, Clone, Default)]
struct RuleInfo {
    lang: Lang,
    /// Distinct stacks possible inside one activation (INF: unbounded).
    states: u64,
    /// Stacks alive at once inside one activation.
    alive: u64,
    /// Stacks opened by advancing into the rule (its epsilon closure).
    breadth: u64,
}

fn add(a: u64, b: u64) -> u64 {
    a.saturating_add(b)
}

/// Tarjan's strongly connected components, iteratively; components come
/// out callees first.
fn sccs(adj: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let n = adj.len();
    let mut index = vec![u32::MAX; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut next = 0u32;
    for start in 0..n {
        if index[start] != u32::MAX {
            continue;
        }
        let mut work: Vec<(usize, usize)> = vec![(start, 0)];
        index[start] = next;
        low[start] = next;
        next += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(top) = work.last_mut() {
            let v = top.0;
            if let Some(&w) = adj[v].get(top.1) {
                top.1 += 1;
                let w = w as usize;
                if index[w] == u32::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                work.pop();
                if let Some(&(parent, _)) = work.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut comp = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        comp.push(w as u32);
                        if w == v {
                            break;
                        }
                    }
                    out.push(comp);
                }
            }
        }
    }
    out
}

struct Analysis<'p> {
    parsed: &'p Parsed,
    alts: Vec<Vec<Vec<Sym>>>,
    info: Vec<RuleInfo>,
    /// Component of each rule in the reference graph.
    comp: Vec<usize>,
}

impl Analysis<'_> {
    fn lang(&self, s: &Sym) -> Lang {
        match s {
            Sym::T(set) => Lang::terminal(set),
            Sym::R { id, .. } => self.info[*id as usize].lang.clone(),
        }
    }

    fn seq_lang(&self, syms: &[Sym]) -> Lang {
        syms.iter()
            .fold(Lang::epsilon(), |acc, s| acc.then(&self.lang(s)))
    }

    fn rule_lang(&self, id: usize) -> Lang {
        let langs: Vec<Lang> = self.alts[id].iter().map(|a| self.seq_lang(a)).collect();
        alternation(&langs)
    }

    /// Distinct stacks inside `id`, counting references into its own
    /// component: at the tail they add nothing new (llama.cpp pushes no
    /// continuation, so the stacks repeat), elsewhere they grow the stack
    /// without bound.
    fn local_states(&self, id: usize) -> u64 {
        let mut n = 0u64;
        for alt in &self.alts[id] {
            for s in alt {
                n = add(
                    n,
                    match s {
                        Sym::T(_) => 1,
                        Sym::R { id: r, tail } if self.comp[*r as usize] == self.comp[id] => {
                            if *tail {
                                0
                            } else {
                                INF
                            }
                        }
                        Sym::R { id: r, .. } => self.info[*r as usize].states,
                    },
                );
            }
        }
        n
    }

    fn breadth_of(&self, s: &Sym) -> u64 {
        match s {
            Sym::T(_) => 1,
            Sym::R { id, .. } => self.info[*id as usize].breadth,
        }
    }

    /// Stacks alive at once inside one activation of `id`, the closure
    /// after each character included (the stacks opened after the rule
    /// ends are counted by its callers).
    ///
    /// Within an alternative, a deterministic boundary splits it: every
    /// stack is on one side, plus the closure reaching past the boundary.
    /// Behind an ambiguous boundary an item may run several activations
    /// (started at different points) at once; they are bounded by its
    /// distinct stacks. Alternatives that can consume the same first
    /// character are alive together while their first segments last; past
    /// that each counts on its own. All of this is exact as an upper bound
    /// while `states` is finite (which bounds the result anyway); a
    /// recursive reference counts as one stack (see `measure`).
    fn local_alive(&self, id: usize) -> u64 {
        let mut per_alt = Vec::with_capacity(self.alts[id].len());
        let mut entry = 0u64;
        for alt in &self.alts[id] {
            let k = alt.len();
            // first, breadth of s_i ... s_end, through nullable symbols.
            let mut suffix_first = vec![CharSet::default(); k + 1];
            let mut suffix_breadth = vec![0u64; k + 1];
            for i in (0..k).rev() {
                let l = self.lang(&alt[i]);
                let b = self.breadth_of(&alt[i]);
                if l.nullable {
                    suffix_first[i] = l.first.union(&suffix_first[i + 1]);
                    suffix_breadth[i] = add(b, suffix_breadth[i + 1]);
                } else {
                    suffix_first[i] = l.first;
                    suffix_breadth[i] = b;
                }
            }
            entry = add(entry, suffix_breadth[0]);
            let mut prefix = Lang::epsilon();
            let (mut best, mut seg) = (0u64, 0u64);
            let mut head = None;
            for (i, s) in alt.iter().enumerate() {
                let (alive, states) = match s {
                    Sym::T(_) => (1, 1),
                    Sym::R { id: r, .. } => {
                        let info = &self.info[*r as usize];
                        if self.comp[*r as usize] == self.comp[id] && info.states == INF {
                            (1, 1)
                        } else {
                            (info.alive, info.states)
                        }
                    }
                };
                if i > 0 && prefix.ambiguous_before(&suffix_first[i]) {
                    seg = add(seg, if states == INF { alive } else { states });
                } else {
                    if i > 0 {
                        let closed = add(seg, suffix_breadth[i]);
                        head.get_or_insert(closed);
                        best = best.max(closed);
                    }
                    seg = alive;
                }
                prefix = prefix.then(&self.lang(s));
            }
            best = best.max(seg);
            per_alt.push((suffix_first[0].clone(), head.unwrap_or(seg), best));
        }
        let single = per_alt.iter().map(|&(_, _, c)| c).max().unwrap_or(0);
        single
            .max(entry)
            .max(max_coverage(per_alt.iter().map(|(f, h, _)| (f, *h))))
    }
}

/// Re-evaluates every rule of component `c` with `update` (true when the
/// rule's value changed) until a round changes nothing or `len + 3` rounds
/// (at most 200) have passed; false when it did not settle.
fn settle<'p>(
    an: &mut Analysis<'p>,
    c: &[u32],
    mut update: impl FnMut(&mut Analysis<'p>, usize) -> bool,
) -> bool {
    for _ in 0..(c.len() + 3).min(200) {
        let mut changed = false;
        for &r in c {
            changed |= update(an, r as usize);
        }
        if !changed {
            return true;
        }
    }
    false
}
fn measure(parsed: &Parsed) -> Result<Measured, Refusal> {
    let n = parsed.rules.len();
    let alts: Vec<Vec<Vec<Sym>>> = parsed
        .rules
        .iter()
        .map(Vec::as_slice)
        .map(symbols_of)
        .collect();
    let adj: Vec<Vec<u32>> = alts
        .iter()
        .map(|a| {
            a.iter()
                .flatten()
                .filter_map(|s| match s {
                    Sym::R { id, .. } => Some(*id),
                    Sym::T(_) => None,
                })
                .collect()
        })
        .collect();
    let components = sccs(&adj);
    let mut comp = vec![0usize; n];
    for (ci, c) in components.iter().enumerate() {
        for &r in c {
            comp[r as usize] = ci;
        }
    }
    let mut an = Analysis {
        parsed,
        alts,
        info: vec![RuleInfo::default(); n],
        comp,
    };

    // Synthesised attributes, callees first; a fixpoint inside each
    // component, widened to "anything" / unbounded if it does not settle.
    for c in &components {
        let settled = settle(&mut an, c, |an, r| {
            let l = an.rule_lang(r);
            let changed = l != an.info[r].lang;
            an.info[r].lang = l;
            changed
        });
        if !settled {
            for &r in c {
                let l = &mut an.info[r as usize].lang;
                l.first = CharSet::all();
                l.alpha = CharSet::all();
                l.cont = CharSet::all();
            }
        }
        let total = c
            .iter()
            .fold(0u64, |acc, &r| add(acc, an.local_states(r as usize)));
        for &r in c {
            an.info[r as usize].states = total;
        }
    }

    // One stack per terminal: how many stacks each advance opens.
    let ones: Weights = an
        .alts
        .iter()
        .map(|alts| alts.iter().map(|alt| vec![1; alt.len()]).collect())
        .collect();
    let entry = closure_entry(&an, &ones)?;
    for (r, &e) in entry.iter().enumerate() {
        an.info[r].breadth = e;
    }
    for c in &components {
        // With unbounded recursion (`states` INF), each recursive reference
        // counts as one stack and one pass settles: the analysis assumes
        // nesting does not multiply the stacks (its known blind spot;
        // `build_grammar`'s probe and `GrammarStep`'s deadline are the
        // backstop). Loops (tail recursion only) keep finite `states` and
        // iterate to a fixpoint.
        let settled = settle(&mut an, c, |an, r| {
            let v = an.local_alive(r);
            let changed = v != an.info[r].alive;
            an.info[r].alive = v;
            changed
        });
        if !settled {
            for &r in c {
                an.info[r as usize].alive = INF;
            }
        }
    }

    let exit = closure_exit(&an, &ones, &entry, 1)?;
    let after = continuations(&an, &ones, &entry, &exit);

    // Rules reachable from root: the others are never on a stack.
    let root = parsed.root as usize;
    let mut reachable = vec![false; n];
    let mut todo = vec![root];
    reachable[root] = true;
    while let Some(r) = todo.pop() {
        for &q in &adj[r] {
            if !reachable[q as usize] {
                reachable[q as usize] = true;
                todo.push(q as usize);
            }
        }
    }
    let widest_of = |entry: &[u64], after: &Weights| {
        let mut widest = (
            add(entry[root], u64::from(an.info[root].lang.nullable)),
            root,
        );
        for r in (0..n).filter(|&r| reachable[r]) {
            for &w in after[r].iter().flatten() {
                if w > widest.0 {
                    widest = (w, r);
                }
            }
        }
        widest
    };
    // Widest advance: entering root, and every continuation point (where a
    // stack's top goes after a character or a rule is matched).
    let widest = widest_of(&entry, &after);

    // A stack with terminal t on top costs, each apply, one advance past t:
    // the closure there, deduplicated in quadratic time. The work of one
    // advance's result is the sum of that over the closure.
    let squares: Weights = after
        .iter()
        .zip(&an.alts)
        .map(|(per_alt, alts)| {
            per_alt
                .iter()
                .zip(alts)
                .map(|(per_sym, alt)| {
                    per_sym
                        .iter()
                        .zip(alt)
                        .map(|(&w, s)| match s {
                            Sym::T(_) => w.saturating_mul(w),
                            Sym::R { .. } => 0,
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let entry2 = closure_entry(&an, &squares)?;
    let exit2 = closure_exit(&an, &squares, &entry2, 1)?;
    let after2 = continuations(&an, &squares, &entry2, &exit2);
    let work = widest_of(&entry2, &after2).0;
    let breadth = widest.0;
    // The reachable rule whose own bound is largest; among equals the
    // widest text (the outermost repetition).
    let bound = |r: usize| {
        let i = &an.info[r];
        i.states.min(i.alive)
    };
    // Plus the empty stack once root is complete; at least the widest
    // closure.
    let stacks = add(bound(root), 1).max(breadth);
    let worst = (0..n)
        .filter(|&r| reachable[r] && r != root)
        .max_by_key(|&r| {
            let s = parsed.spans[r];
            (bound(r), s.1 - s.0)
        })
        .filter(|&r| bound(r) > MAX_GRAMMAR_STACKS)
        .unwrap_or(root);
    Ok(Measured {
        stats: GrammarStats {
            rules: n,
            elements: parsed.elements,
            breadth,
            stacks,
            work,
        },
        widest: parsed.spans[widest.1],
        worst: parsed.spans[worst],
    })
}

/// The numbers, and where the largest come from.
struct Measured {
    stats: GrammarStats,
    widest: (usize, usize),
    worst: (usize, usize),
}

fn analyse(parsed: &Parsed) -> Result<GrammarStats, Refusal> {
    let m = measure(parsed)?;
    let s = m.stats;
    if s.stacks > MAX_GRAMMAR_STACKS || s.work > MAX_GRAMMAR_WORK {
        return Err(Refusal::at(
            m.worst.0,
            m.worst.1,
            format!(
                "the grammar is too ambiguous: up to {} parse stacks alive at once and {} \
                 units of work per step (at most {MAX_GRAMMAR_STACKS} and \
                 {MAX_GRAMMAR_WORK}); nested or adjacent repetitions that can match the same \
                 text multiply them",
                show(s.stacks),
                show(s.work)
            ),
        ));
    }
    if s.breadth > MAX_GRAMMAR_BREADTH {
        return Err(Refusal::at(
            m.widest.0,
            m.widest.1,
            format!(
                "the grammar is too ambiguous: one step can open {} alternatives at once \
                 (at most {MAX_GRAMMAR_BREADTH}), e.g. a long run of optional items",
                show(s.breadth)
            ),
        ));
    }
    Ok(s)
}

fn show(v: u64) -> String {
    if v == INF {
        "unboundedly many".into()
    } else {
        v.to_string()
    }
}

/// A weight per symbol of every alternative of every rule (0 for
/// references): what one stack with that terminal on top costs.
type Weights = Vec<Vec<Vec<u64>>>;

/// Per rule, alternative and position: the closure of the rest, and
/// whether the rest can match nothing.
type Rests = Vec<Vec<Vec<(u64, bool)>>>;

/// The epsilon closure entering each rule, summed by `weights`, over the
/// graph of references that can be reached without consuming a character.
/// A cycle in that graph through a non-tail reference is a left recursion:
/// llama.cpp's stack walk would push forever (its own check misses those
/// hidden behind rules that can match nothing), so it is refused. Through
/// tail references only, a cycle repeats the same stacks (llama.cpp's walk
/// dedups them): each component counts its members' terminals once.
fn closure_entry(an: &Analysis<'_>, weights: &Weights) -> Result<Vec<u64>, Refusal> {
    let n = an.alts.len();
    // Edges: (target, tail) for references in a nullable prefix.
    let mut eps: Vec<Vec<(u32, bool)>> = vec![Vec::new(); n];
    for (r, edges) in eps.iter_mut().enumerate() {
        for alt in &an.alts[r] {
            for s in alt {
                match s {
                    Sym::T(_) => break,
                    Sym::R { id, tail } => {
                        edges.push((*id, *tail));
                        if !an.info[*id as usize].lang.nullable {
                            break;
                        }
                    }
                }
            }
        }
    }
    let adj: Vec<Vec<u32>> = eps
        .iter()
        .map(|e| e.iter().map(|&(t, _)| t).collect())
        .collect();
    let components = sccs(&adj);
    let mut comp = vec![0usize; n];
    for (ci, c) in components.iter().enumerate() {
        for &r in c {
            comp[r as usize] = ci;
        }
    }
    let mut entry = vec![0u64; n];
    for (ci, c) in components.iter().enumerate() {
        let mut total = 0u64;
        for &r in c {
            let r = r as usize;
            if eps[r]
                .iter()
                .any(|&(t, tail)| comp[t as usize] == ci && !tail)
            {
                let span = an.parsed.spans[r];
                return Err(Refusal::at(
                    span.0,
                    span.1,
                    "the grammar is left-recursive: a rule can reach itself without \
                     consuming a character",
                ));
            }
            for (ai, alt) in an.alts[r].iter().enumerate() {
                for (si, s) in alt.iter().enumerate() {
                    match s {
                        Sym::T(_) => {
                            total = add(total, weights[r][ai][si]);
                            break;
                        }
                        Sym::R { id, .. } => {
                            if comp[*id as usize] != ci {
                                total = add(total, entry[*id as usize]);
                            }
                            if !an.info[*id as usize].lang.nullable {
                                break;
                            }
                        }
                    }
                }
            }
        }
        for &r in c {
            entry[r as usize] = total;
        }
    }
    Ok(entry)
}

/// What an advance opens after each rule completes, summed like `entry`:
/// the rest of each caller's alternative and, through it, the caller's own
/// exit (`root_exit` after root: the empty stack). Callers first, a
/// fixpoint inside each component. A caller that can nest the rule inside
/// itself with an optional tail (`a ::= "x" a "y"? | "z"`) makes this grow
/// with the nesting depth: refused.
fn closure_exit(
    an: &Analysis<'_>,
    weights: &Weights,
    entry: &[u64],
    root_exit: u64,
) -> Result<Vec<u64>, Refusal> {
    let n = an.alts.len();
    // Callers of each rule: (caller, alternative, position).
    let mut callers: Vec<Vec<(u32, u32, u32)>> = vec![Vec::new(); n];
    let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (r, (alts, out)) in an.alts.iter().zip(adj.iter_mut()).enumerate() {
        for (ai, alt) in alts.iter().enumerate() {
            for (si, s) in alt.iter().enumerate() {
                if let Sym::R { id, .. } = s {
                    callers[*id as usize].push((r as u32, ai as u32, si as u32));
                    out.push(*id);
                }
            }
        }
    }
    let rest = suffixes(an, weights, entry);
    let root = an.parsed.root as usize;
    let mut exit = vec![0u64; n];
    exit[root] = root_exit;
    let components = sccs(&adj);
    // Tarjan emits callees first; exits flow from callers.
    for c in components.iter().rev() {
        // Max-plus without a positive cycle settles within |c| passes.
        let cap = c.len() + 3;
        let mut settled = false;
        for _ in 0..cap {
            let mut changed = false;
            for &q in c {
                let q = q as usize;
                let mut best = if q == root { root_exit } else { 0 };
                for &(r, ai, si) in &callers[q] {
                    let (w, nullable) = rest[r as usize][ai as usize][si as usize + 1];
                    let w = if nullable {
                        add(w, exit[r as usize])
                    } else {
                        w
                    };
                    best = best.max(w);
                }
                if best != exit[q] {
                    exit[q] = best;
                    changed = true;
                }
            }
            if !changed {
                settled = true;
                break;
            }
        }
        if !settled {
            let span = an.parsed.spans[c[0] as usize];
            return Err(Refusal::at(
                span.0,
                span.1,
                "the grammar is too ambiguous: the alternatives open after a rule ends \
                 grow with how deeply it is nested (a recursive rule followed by an \
                 optional part)",
            ));
        }
    }
    Ok(exit)
}

/// The closure of the rest of every alternative from every position `k`
/// (`0..=len`), summed by `weights`, and whether that rest can match
/// nothing: `[rule][alternative][k]`. One backward pass per alternative.
fn suffixes(an: &Analysis<'_>, weights: &Weights, entry: &[u64]) -> Rests {
    an.alts
        .iter()
        .enumerate()
        .map(|(r, alts)| {
            alts.iter()
                .enumerate()
                .map(|(ai, alt)| {
                    let mut out = vec![(0u64, true); alt.len() + 1];
                    for k in (0..alt.len()).rev() {
                        out[k] = match &alt[k] {
                            Sym::T(_) => (weights[r][ai][k], false),
                            Sym::R { id, .. } => {
                                let e = entry[*id as usize];
                                if an.info[*id as usize].lang.nullable {
                                    (add(e, out[k + 1].0), out[k + 1].1)
                                } else {
                                    (e, false)
                                }
                            }
                        };
                    }
                    out
                })
                .collect()
        })
        .collect()
}

/// The closure opened at every continuation point (after each symbol of
/// each alternative): `[rule][alternative][symbol]`.
fn continuations(an: &Analysis<'_>, weights: &Weights, entry: &[u64], exit: &[u64]) -> Weights {
    suffixes(an, weights, entry)
        .into_iter()
        .enumerate()
        .map(|(r, alts)| {
            alts.into_iter()
                .map(|rest| {
                    rest[1..]
                        .iter()
                        .map(|&(w, nullable)| if nullable { add(w, exit[r]) } else { w })
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grammars of llama.cpp's `grammars/` directory (as shipped in
    /// llama-cpp-2's sources) and the JSON-schema-derived examples of its
    /// `grammars/README.md`.
    const CORPUS: &[(&str, &str)] = &[
        (
            "arithmetic",
            include_str!("../tests/data/grammars/arithmetic.gbnf"),
        ),
        ("c", include_str!("../tests/data/grammars/c.gbnf")),
        ("chess", include_str!("../tests/data/grammars/chess.gbnf")),
        (
            "japanese",
            include_str!("../tests/data/grammars/japanese.gbnf"),
        ),
        ("json", include_str!("../tests/data/grammars/json.gbnf")),
        (
            "json_arr",
            include_str!("../tests/data/grammars/json_arr.gbnf"),
        ),
        ("list", include_str!("../tests/data/grammars/list.gbnf")),
        (
            "readme-qa-schema",
            include_str!("../tests/data/grammars/readme_qa_schema.gbnf"),
        ),
        (
            "readme-email-schema",
            include_str!("../tests/data/grammars/readme_email_schema.gbnf"),
        ),
        (
            "readme-actors-schema",
            include_str!("../tests/data/grammars/readme_actors_schema.gbnf"),
        ),
        (
            "schema-arrays",
            include_str!("../tests/data/grammars/schema_arrays.gbnf"),
        ),
    ];

    fn refused(text: &str) -> String {
        let t = Instant::now();
        let e = check_grammar(text).expect_err(text);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "precheck took {:?}",
            t.elapsed()
        );
        e
    }

    #[test]
    fn corpus_is_accepted() {
        for (name, text) in CORPUS {
            let t = Instant::now();
            let stats = grammar_stats(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(t.elapsed() < Duration::from_millis(200), "{name}");
            assert!(stats.stacks <= MAX_GRAMMAR_STACKS, "{name}: {stats:?}");
        }
    }

    #[test]
    fn basics() {
        assert!(check_grammar("root ::= \"yes\" | \"no\"").is_ok());
        assert!(check_grammar("  ").is_err());
        assert!(check_grammar("root ::= \"a\0\"").is_err());
        assert!(check_grammar("start ::= \"a\"")
            .unwrap_err()
            .contains("root"));
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(80), ")".repeat(80));
        assert!(refused(&deep).contains("nests"));
        let lit = format!("root ::= \"{}\"", "(".repeat(80));
        assert!(check_grammar(&lit).is_ok());
        assert!(check_grammar("root ::= item\n")
            .unwrap_err()
            .contains("item"));
        assert!(check_grammar(&"x".repeat(MAX_GRAMMAR_BYTES + 1)).is_err());
    }

    #[test]
    fn lexing_skips_strings_classes_and_comments() {
        // Parentheses, quotes, brackets and `#` inside literals, classes
        // and comments are not structure.
        for ok in [
            r##"root ::= "(((" "\"(" [(] [\]] [\\] "#" # ((( "unclosed"##,
            "root ::= [^\"\\\\] \"a\\\"b\" # comment with ) and \"\nx ::= \"y\"",
            r#"root ::= [\x41-\x5A\u00e9\U0001F600] "\t\n\r\[\]\-""#,
            "root ::= \"é日本\" [ぁ-ゟ]",
            "root ::= ( \"a\"\n  | \"b\" )  # newline inside a group\n",
            "root ::= <[5]> !<[7]>* \"x\"",
            "root ::= \"a\" {2} \"b\"{ 1 , 3 }",
        ] {
            check_grammar(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            r#"root ::= "unterminated"#,
            r#"root ::= [abc"#,
            r#"root ::= "\q""#,
            r#"root ::= "\x4""#,
            "root ::= (\"a\"",
            "root ::= \"a\" )",
            "root ::= *",
            "root ::= \"\"*",
            "root ::= \"a\"{}",
            "root ::= \"a\"{1,2",
            "root = \"a\"",
        ] {
            assert!(check_grammar(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repetitions_are_checked() {
        let e = refused(r#"root ::= "a"{2,1}"#);
        assert!(e.contains("minimum 2 is above its maximum 1"), "{e}");
        assert!(e.contains("{2,1}"), "{e}");
        for bad in [r#"root ::= "a"{2001}"#, r#"root ::= "a"{2001,}"#] {
            assert!(refused(bad).contains("above"), "{bad}");
        }
        // A maximum above llama.cpp's limit is no maximum, as llama.cpp has it.
        check_grammar(r#"root ::= "a"{0,2001}"#).unwrap();
        check_grammar(r#"root ::= [a-z]{1,4096}"#).unwrap();
        assert!(refused(r#"root ::= "a"{0,99999999999999999999999}"#).contains("too large"));
        for ok in [
            r#"root ::= "a"{2000}"#,
            r#"root ::= "a"{0,2000}"#,
            r#"root ::= "a"{5,}"#,
            r#"root ::= "a"{3,3}"#,
            r#"root ::= "a"{0}"#,
        ] {
            check_grammar(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // llama.cpp's own limit on rules times repetitions.
        assert!(refused(r#"root ::= ("a" "b"{0,100}){0,100}"#).contains("2000"));
    }

    #[test]
    fn expansion_is_bounded() {
        let big = format!("root ::= \"{}\"{{0,2000}}", "x".repeat(500));
        assert!(refused(&big).contains("elements"));
        let many = format!("root ::= {}", r#""ab"{0,2000} "#.repeat(200));
        assert!(refused(&many).contains("elements"));
    }

    #[test]
    fn hostile_grammars_are_refused() {
        // Nested bounded repetitions: thousands of stacks.
        let e = refused(r#"root ::= (("a"{0,12}){0,12}){0,12}"#);
        assert!(e.contains("ambiguous"), "{e}");
        assert!(e.contains("(\"a\"{0,12})"), "{e}");
        // A long run of optional items: one advance opens all of them.
        let opt = format!("root ::= {}\"b\"", r#""a"? "#.repeat(12_000));
        assert!(opt.len() > 48 * 1024);
        assert!(refused(&opt).contains("ambiguous"));
        let opt = format!("root ::= \"x\" {}", r#"("a" "b"?)? "#.repeat(5_000));
        assert!(refused(&opt).contains("ambiguous"));
        // A left recursion llama.cpp's own check misses (its "can be
        // empty" test does not look through `e`): its stack walk would
        // push forever.
        let e = refused("root ::= e root \"x\" | \"z\"\ne ::= f\nf ::= \"\" | \"e\"");
        assert!(e.contains("left-recursive"), "{e}");
        assert!(refused("root ::= root \"a\" | \"b\"").contains("left-recursive"));
        // Exits that grow with the nesting depth.
        let e = refused("root ::= \"a\" root \"b\"? | \"c\"");
        assert!(e.contains("nested"), "{e}");
    }

    #[test]
    fn json_schema_shapes_are_accepted() {
        for ok in [
            // Strings of bounded length inside arrays of bounded length.
            r#"root ::= "[" ( str ( "," str ){0,50} )? "]"
str ::= "\"" char{0,100} "\""
char ::= [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#,
            r#"root ::= "[" space ( item ( "," space item ){0,9} )? "]" space
item ::= "{" space "\"name\"" space ":" space str "," space "\"tags\"" space ":" space tags "}" space
tags ::= "[" space ( str ( "," space str ){0,19} )? "]" space
str ::= "\"" [^"\\\x7F\x00-\x1F]{0,100} "\"" space
space ::= | " " | "\n" [ \t]{0,20}"#,
            r#"root ::= [0-9]{1,15} ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?"#,
            r#"root ::= ("a" | "b" | "c"){0,2000}"#,
            "root ::= ws* \"x\"\nws ::= [ \\t]*",
        ] {
            let s = grammar_stats(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(s.stacks <= 64, "{ok}: {s:?}");
        }
    }

    #[test]
    fn limits_fall_between_the_calibration_points() {
        // See the module docs: accepted ones take at most ~25 ms per step.
        let run = |n: usize| format!("root ::= {}\"b\"", r#""a"? "#.repeat(n));
        let nested = |n: u32| format!(r#"root ::= (("a"{{0,{n}}}){{0,{n}}}){{0,{n}}}"#);
        let words: Vec<String> = (0..60).map(|i| format!("\"\\\"w{i}x\\\"\"")).collect();
        let enum_array = format!(
            "root ::= \"[\" space (item (\",\" space item)*)? \"]\"\nitem ::= ({}) space\n\
             space ::= | \" \"",
            words.join(" | ")
        );
        for ok in [run(24), nested(4), enum_array] {
            let s = grammar_stats(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(s.work <= MAX_GRAMMAR_WORK, "{s:?}");
        }
        for bad in [run(32), nested(5)] {
            assert!(refused(&bad).contains("work"), "{bad}");
        }
        for (name, text) in CORPUS {
            let s = grammar_stats(text).unwrap();
            assert!(s.work < 1000, "{name}: {s:?}");
        }
    }

    #[test]
    fn precheck_is_fast_on_large_inputs() {
        let near = |unit: &str, head: &str| {
            let n = (MAX_GRAMMAR_BYTES - head.len() - 16) / unit.len();
            format!("{head}{}", unit.repeat(n))
        };
        let classes: String = (0..3000u32)
            .map(|i| format!("[\\u{:04x}-\\u{:04x}] ", 0x100 + 7 * i, 0x100 + 7 * i + 3))
            .collect();
        let rules: String = (0..4000)
            .map(|i| format!("r{i} ::= r{} \"x\"?\n", i + 1))
            .collect();
        for text in [
            near(r#""a"? "#, "root ::= "),
            near(r#"("ab" | "ac" | [a-z]) "#, "root ::= "),
            near(r#""abcdefgh"{0,3} "#, "root ::= "),
            format!("root ::= {classes}"),
            format!("root ::= r0\n{rules}r4000 ::= \"end\"\n"),
            near("(\"x\" ", "root ::= ") + &")".repeat(10),
            near(r#""\u00e9\x41\n" "#, "root ::= "),
        ] {
            let t = Instant::now();
            let r = grammar_stats(&text);
            let took = t.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "{took:?} for {}",
                &text[..40]
            );
            let _ = r;
        }
    }

    #[test]
    fn stats_follow_llama_cpp_expansion() {
        // "a"{2,4}: a a R2 with R1 ::= "a" | , R2 ::= "a" R1 | .
        let s = grammar_stats(r#"root ::= "a"{2,4}"#).unwrap();
        assert_eq!(s.rules, 3);
        assert_eq!(s.elements, 4 + 3 + 4);
        assert!(s.stacks <= 3, "{s:?}");
        let s = grammar_stats(r#"root ::= (("a"{0,3}){0,3}){0,3}"#).unwrap();
        assert!(s.stacks >= 27, "{s:?}");
    }

    #[test]
    fn charset_and_coverage() {
        let a = CharSet::from_ranges(vec![(10, 20), (21, 30), (40, 50)]);
        assert_eq!(a.0, vec![(10, 30), (40, 50)]);
        assert!(a.intersects(&CharSet::from_ranges(vec![(30, 35)])));
        assert!(!a.intersects(&CharSet::from_ranges(vec![(31, 39)])));
        assert_eq!(a.complement().complement(), a);
        assert_eq!(CharSet::default().complement(), CharSet::all());
        let b = CharSet::from_ranges(vec![(25, 45)]);
        assert_eq!(max_coverage([(&a, 1), (&b, 1)].into_iter()), 2);
        let c = CharSet::from_ranges(vec![(31, 39)]);
        assert_eq!(max_coverage([(&a, 1), (&c, 5)].into_iter()), 5);
    }
}
