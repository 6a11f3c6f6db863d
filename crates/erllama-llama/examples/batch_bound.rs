//! What llama.cpp itself allows on this machine for the `agents` and
//! `parallel` figures of `erllama bench`: the same [`Session`] calls the
//! engine makes, timed with no scheduler, cache or Python around them.
//!
//! ```text
//! cargo run --release -p erllama-llama --example batch_bound -- MODEL.gguf [THREADS] [auto|on|off]
//! ```
//!
//! - `decode`: tokens/s of one-token steps for 1 and for 4 sequences in one
//!   `llama_decode` (short prompts, and prompts of 2048 tokens).
//! - `suffix`: one 70-token suffix after a 2048-token prefix; and one
//!   280-token chunk at the same place, which is the arithmetic of four
//!   agents' suffixes computed in one step. If the chunk costs about four
//!   suffixes, no batch composition can answer four agents much sooner
//!   than one after another.
//!
//! The third argument is the flash-attention setting (default `auto`).
//! Each figure is the median of 5 runs.

use std::time::Instant;

use erllama_engine::FlashAttn;
use erllama_llama::{Model, ModelParams, SeqTokens, Session, SessionParams};

const PREFIX: usize = 2048;
const SUFFIX: usize = 70;
const STEPS: usize = 64;
const RUNS: usize = 5;

fn tokens(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| u32::try_from(100 + (i * 7919 + salt * 104_729) % (vocab - 200)).unwrap_or(100))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per one-token step of sequences `0..k`, each `len` tokens long
/// before and truncated back after.
fn decode_step_s(s: &mut Session, k: usize, len: usize, vocab: usize) -> f64 {
    let next = tokens(STEPS, 99, vocab);
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        for tok in &next {
            let step: Vec<SeqTokens<'_>> = (0..k)
                .map(|seq| SeqTokens {
                    seq,
                    tokens: std::slice::from_ref(tok),
                    logits: true,
                })
                .collect();
            s.decode_batch(&step).expect("decode");
        }
        runs.push(t.elapsed().as_secs_f64() / STEPS as f64);
        for seq in 0..k {
            s.seq_truncate(seq, len).expect("truncate");
        }
    }
    median(runs)
}

/// Seconds to compute `chunk` after sequence 0's tokens (truncated back).
fn chunk_s(s: &mut Session, chunk: &[u32]) -> f64 {
    let len = s.seq_tokens(0).len();
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        s.decode_batch(&[SeqTokens {
            seq: 0,
            tokens: chunk,
            logits: true,
        }])
        .expect("chunk");
        runs.push(t.elapsed().as_secs_f64());
        s.seq_truncate(0, len).expect("truncate");
    }
    median(runs)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: batch_bound MODEL.gguf [THREADS] [auto|on|off]";
    let path = args.next().expect(usage);
    let threads = args.next().map(|t| t.parse::<u32>().expect(usage));
    let flash_attn = args
        .next()
        .map_or(FlashAttn::Auto, |f| f.parse::<FlashAttn>().expect(usage));
    let model = Model::load(&path, &ModelParams::default()).expect("model");
    let vocab = model.n_vocab() as usize;
    let mut s = Session::new(
        &model,
        &SessionParams {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: threads,
            n_seq_max: 4,
            flash_attn,
            ..SessionParams::default()
        },
    )
    .expect("session");
    let n_threads = SessionParams {
        n_threads: threads,
        ..SessionParams::default()
    }
    .threads();
    println!("model {path}, {n_threads} threads, flash attention {flash_attn}");

    for seq in 0..4 {
        s.decode_batch(&[SeqTokens {
            seq,
            tokens: &tokens(32, seq, vocab),
            logits: true,
        }])
        .expect("prompt");
    }
    let one = 1.0 / decode_step_s(&mut s, 1, 32, vocab);
    let four = 4.0 / decode_step_s(&mut s, 4, 32, vocab);
    println!(
        "decode, 32-token prompts: 1 seq {one:.1} tok/s, 4 seqs {four:.1} tok/s, ratio {:.2}",
        four / one
    );

    for seq in 0..4 {
        s.seq_clear(seq);
    }
    let prefix = tokens(PREFIX, 7, vocab);
    s.prefill(&prefix).expect("prefix");
    for seq in 1..4 {
        s.seq_copy_prefix(0, seq, PREFIX).expect("copy");
    }
    let one = 1.0 / decode_step_s(&mut s, 1, PREFIX, vocab);
    let four = 4.0 / decode_step_s(&mut s, 4, PREFIX, vocab);
    println!(
        "decode, 2048-token prompts: 1 seq {one:.1} tok/s, 4 seqs {four:.1} tok/s, ratio {:.2}",
        four / one
    );

    // The same lone decode in a context of one sequence.
    let one_ctx = {
        let mut lone = Session::new(
            &model,
            &SessionParams {
                n_ctx: 4096,
                n_batch: 512,
                n_threads: threads,
                flash_attn,
                ..SessionParams::default()
            },
        )
        .expect("session");
        lone.prefill(&prefix).expect("prefix");
        1.0 / decode_step_s(&mut lone, 1, PREFIX, vocab)
    };
    println!("decode, 2048-token prompt, context of one sequence: {one_ctx:.1} tok/s");

    let suffix = chunk_s(&mut s, &tokens(SUFFIX, 11, vocab));
    let four_suffixes = chunk_s(&mut s, &tokens(4 * SUFFIX, 13, vocab));
    let bare = {
        s.seq_clear(0);
        chunk_s(&mut s, &tokens(SUFFIX, 11, vocab))
    };
    println!(
        "suffix of {SUFFIX} after {PREFIX}: {:.1} ms ({:.1} ms with no prefix); \
         {} tokens at once: {:.1} ms = {:.2} suffixes",
        suffix * 1e3,
        bare * 1e3,
        4 * SUFFIX,
        four_suffixes * 1e3,
        four_suffixes / suffix
    );
    // The mean wait of four agents: one after another, (1+2+3+4)/4 = 2.5
    // suffixes; all in one step, the whole chunk.
    println!(
        "4 agents' mean time to first token over one agent's, at best: \
         2.50 one after another, {:.2} in one step",
        four_suffixes / suffix
    );
}
