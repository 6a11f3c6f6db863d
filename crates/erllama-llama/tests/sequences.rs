//! Several sequences in one llama.cpp context (each in a KV stream of its
//! own), on
//! the real test model (SmolLM2-135M-Instruct Q4_1): sequences decoded in
//! one batch answer as if each ran alone, a copied prefix continues as the
//! prompt run alone, one sequence packs and restores beside others, and a
//! bad batch is refused before anything runs.
//!
//! Prompts are prefilled as the engine does (tests/common `prefill`):
//! chunks ending at multiples of `n_batch` counted from position 0, the
//! last token on its own. The model path comes from `ERLLAMA_TEST_MODEL`,
//! else the default model cache. These tests never skip.

use erllama_engine::{
    Backend, BackendContext, BackendError, BatchItem, ContextParams, SamplingParams, SeqId,
};
use erllama_llama::{LlamaError, SeqTokens, Session, SessionParams};

mod common;
use common::{backend, generate, prefill, prefill_pieces};

/// Tokens generated per sequence.
const N_GEN: usize = 16;

fn context(n_batch: usize, n_seq: usize) -> Box<dyn BackendContext> {
    backend()
        .new_context(&ContextParams {
            n_ctx: 1024,
            n_batch,
            n_threads: Some(2),
            n_seq,
            ..ContextParams::default()
        })
        .expect("context")
}

fn tokens(text: &str) -> Vec<u32> {
    backend().tokenize(text, true).expect("tokenize")
}

/// About `n` tokens of ordinary English.
fn long_prompt(n: usize) -> Vec<u32> {
    common::long_prompt(n, tokens)
}

/// Greedy output of `prompt` run alone in a fresh single-sequence context.
fn alone(prompt: &[u32], n_batch: usize) -> Vec<u32> {
    let mut c = context(n_batch, 1);
    prefill(c.as_mut(), 0, prompt, n_batch).expect("prefill");
    generate(c.as_mut(), 0, N_GEN)
}

/// Drops `seq`'s last token and feeds it again, so that its next token can
/// be sampled (after a restore, or after another sequence's decode took the
/// logits).
fn refeed_last(c: &mut dyn BackendContext, seq: SeqId) {
    let toks = c.tokens(seq).to_vec();
    let (last, head) = toks.split_last().expect("a token to re-feed");
    c.truncate(seq, head.len()).unwrap();
    c.decode(&[BatchItem {
        seq,
        tokens: std::slice::from_ref(last),
        logits: true,
    }])
    .unwrap();
}

/// A packed one-section state with the sequence ids it records (in the
/// header and in each of its `n_cells` cells) zeroed: `u32 magic | i32
/// seq_id | u32 n_stream | u32 cell_count | cells x { i32 pos | u32 n_seq
/// | i32 seq_id } | ...` (src/state.rs).
fn without_seq_ids(state: &[u8], n_cells: usize) -> Vec<u8> {
    let mut s = state.to_vec();
    s[4..8].fill(0);
    for i in 0..n_cells {
        let at = 16 + 12 * i + 8;
        s[at..at + 4].fill(0);
    }
    s
}

/// Generates up to `n` tokens for each of `seqs` (which have logits), in
/// steps of one decode that holds every sequence still generating (a
/// sampled token is fed only if its sequence goes on). Returns the outputs
/// and the number of decodes.
fn generate_together(
    c: &mut dyn BackendContext,
    seqs: &[SeqId],
    n: usize,
) -> (Vec<Vec<u32>>, usize) {
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
    let mut steps = 0;
    loop {
        let mut feed: Vec<(SeqId, [u32; 1])> = Vec::new();
        for (&seq, out) in seqs.iter().zip(outs.iter_mut()) {
            if out.len() == n || out.last().is_some_and(|&t| c.is_eog(t).unwrap()) {
                continue;
            }
            let t = c.sample(seq).unwrap();
            out.push(t);
            if out.len() < n && !c.is_eog(t).unwrap() {
                feed.push((seq, [t]));
            }
        }
        if feed.is_empty() {
            return (outs, steps);
        }
        let batch: Vec<BatchItem<'_>> = feed
            .iter()
            .map(|(seq, t)| BatchItem {
                seq: *seq,
                tokens: t,
                logits: true,
            })
            .collect();
        c.decode(&batch).unwrap();
        steps += 1;
    }
}

#[test]
fn prefill_pieces_end_at_multiples_of_n_batch() {
    assert_eq!(prefill_pieces(0, 1, 4), vec![0..1]);
    assert_eq!(prefill_pieces(0, 4, 4), [0..3, 3..4]);
    assert_eq!(prefill_pieces(0, 5, 4), [0..4, 4..5]);
    assert_eq!(prefill_pieces(0, 10, 4), [0..4, 4..8, 8..9, 9..10]);
    // Continuing after 6 tokens: the first piece ends at position 8.
    assert_eq!(prefill_pieces(6, 7, 4), [0..2, 2..6, 6..7]);
    assert!(prefill_pieces(3, 0, 4).is_empty());
}

#[test]
fn batched_sequences_generate_as_if_alone() {
    const N_BATCH: usize = 64;
    let p0 = tokens("The capital of France is");
    let p1 = tokens("Once upon a time, in a small village by the sea, there lived an old");
    assert!(
        p0.len() + p1.len() - 2 <= N_BATCH,
        "both heads fit one step"
    );
    let want0 = alone(&p0, N_BATCH);
    let want1 = alone(&p1, N_BATCH);
    assert_eq!((want0.len(), want1.len()), (N_GEN, N_GEN), "no early end");

    let mut c = context(N_BATCH, 4);
    // One step with both prompts' heads (each one engine chunk), one with
    // both last tokens.
    let (l0, h0) = p0.split_last().unwrap();
    let (l1, h1) = p1.split_last().unwrap();
    c.decode(&[
        BatchItem {
            seq: 0,
            tokens: h0,
            logits: false,
        },
        BatchItem {
            seq: 1,
            tokens: h1,
            logits: false,
        },
    ])
    .unwrap();
    c.decode(&[
        BatchItem {
            seq: 0,
            tokens: std::slice::from_ref(l0),
            logits: true,
        },
        BatchItem {
            seq: 1,
            tokens: std::slice::from_ref(l1),
            logits: true,
        },
    ])
    .unwrap();
    // Then one step per token, holding every sequence still generating.
    let (outs, steps) = generate_together(c.as_mut(), &[0, 1], N_GEN);
    assert_eq!(steps, N_GEN - 1, "both sequences in every step");
    assert_eq!(outs[0], want0, "sequence 0 differs from its prompt alone");
    assert_eq!(outs[1], want1, "sequence 1 differs from its prompt alone");
    assert_eq!(c.tokens(0).len(), p0.len() + N_GEN - 1);
    assert_eq!(c.tokens(1).len(), p1.len() + N_GEN - 1);
    assert!(c.tokens(2).is_empty() && c.tokens(3).is_empty());
}

#[test]
fn a_copied_prefix_continues_as_the_prompt_alone() {
    const N_BATCH: usize = 32;
    const K: usize = 2 * N_BATCH;
    let a = long_prompt(100);
    let mut b = a[..K].to_vec();
    b.extend(
        backend()
            .tokenize(
                " Today the lamps are electric and the keepers are gone.",
                false,
            )
            .unwrap(),
    );
    assert_ne!(b[K..], a[K..b.len().min(a.len())]);
    let want_a = alone(&a, N_BATCH);
    let want_b = alone(&b, N_BATCH);

    let mut c = context(N_BATCH, 4);
    prefill(c.as_mut(), 0, &a, N_BATCH).unwrap();
    assert_eq!(generate(c.as_mut(), 0, N_GEN), want_a);
    let a_held = c.tokens(0).to_vec();

    c.copy_prefix(0, 1, K).unwrap();
    assert_eq!(c.tokens(1), &a[..K]);
    assert!(
        matches!(c.sample(1), Err(BackendError::InvalidInput(_))),
        "no logits after a copy"
    );
    // The rest of b, chunked as the engine continues from K.
    prefill(c.as_mut(), 1, &b[K..], N_BATCH).unwrap();
    assert_eq!(c.tokens(1), &b[..]);
    assert_eq!(
        generate(c.as_mut(), 1, N_GEN),
        want_b,
        "a copied prefix continues as the prompt alone"
    );
    assert_eq!(c.tokens(0), &a_held[..], "the source is untouched");

    // Refused copies change nothing.
    for (src, dst, n) in [
        (0, 1, 1),                // dst is not empty
        (0, 0, 1),                // src == dst
        (0, 2, a_held.len() + 1), // more than src holds
        (0, 4, 1),                // no such dst
        (4, 2, 0),                // no such src
    ] {
        assert!(
            matches!(
                c.copy_prefix(src, dst, n),
                Err(BackendError::InvalidInput(_))
            ),
            "copy_prefix({src}, {dst}, {n})"
        );
    }
    assert_eq!(c.tokens(0), &a_held[..]);
    assert_eq!(c.tokens(1).len(), b.len() + N_GEN - 1);
    assert!(c.tokens(2).is_empty());
    c.copy_prefix(0, 2, 0).unwrap();
    assert!(c.tokens(2).is_empty());

    // The copied cells outlive their source: clear sequence 0, and b
    // still continues as before.
    c.clear(0);
    assert!(c.tokens(0).is_empty());
    c.truncate(1, b.len()).unwrap();
    refeed_last(c.as_mut(), 1);
    assert_eq!(generate(c.as_mut(), 1, N_GEN), want_b);
}

#[test]
fn a_sequence_packs_and_restores_beside_others() {
    const N_BATCH: usize = 32;
    let x = tokens("Write a haiku about the autumn wind in the mountains.");
    let p = long_prompt(80);

    let mut c = context(N_BATCH, 4);
    prefill(c.as_mut(), 0, &x, N_BATCH).unwrap();
    let x_out = generate(c.as_mut(), 0, N_GEN);
    prefill(c.as_mut(), 1, &p, N_BATCH).unwrap();
    let packed = c.kv_pack(1).unwrap();
    let cold = generate(c.as_mut(), 1, N_GEN);
    assert_eq!(cold, alone(&p, N_BATCH), "beside seq 0 as alone");
    // The packed state is the one p alone writes: byte for byte from the
    // same sequence of a fresh context, and but for the sequence ids it
    // records from a single-sequence context.
    let mut fresh = context(N_BATCH, 4);
    prefill(fresh.as_mut(), 1, &p, N_BATCH).unwrap();
    assert!(
        fresh.kv_pack(1).unwrap() == packed,
        "seq 1's state beside seq 0 differs from seq 1's alone"
    );
    let mut solo = context(N_BATCH, 1);
    prefill(solo.as_mut(), 0, &p, N_BATCH).unwrap();
    let solo_state = solo.kv_pack(0).unwrap();
    assert!(
        without_seq_ids(&solo_state, p.len()) == without_seq_ids(&packed, p.len()),
        "seq 1's state differs from p's alone in a single-sequence context"
    );
    drop((fresh, solo));

    let x_held = c.tokens(0).to_vec();
    let x_state = c.kv_pack(0).unwrap();
    c.clear(1);
    assert!(c.tokens(1).is_empty());
    c.kv_unpack(2, &packed, &p).unwrap();
    assert_eq!(c.tokens(2), &p[..]);
    assert!(
        matches!(c.sample(2), Err(BackendError::InvalidInput(_))),
        "no logits after a restore"
    );
    c.truncate(2, p.len() - 1).unwrap();
    prefill(c.as_mut(), 2, &p[p.len() - 1..], N_BATCH).unwrap();
    assert_eq!(generate(c.as_mut(), 2, N_GEN), cold, "warm equals cold");

    // Sequence 0 is undisturbed: the same tokens, the same state, and
    // the same output once its last prompt token is re-fed.
    assert_eq!(c.tokens(0), &x_held[..]);
    assert!(c.kv_pack(0).unwrap() == x_state, "seq 0's state changed");
    assert!(c.tokens(1).is_empty() && c.tokens(3).is_empty());
    c.truncate(0, x.len()).unwrap();
    refeed_last(c.as_mut(), 0);
    assert_eq!(generate(c.as_mut(), 0, N_GEN), x_out);

    // A refused state leaves the other sequences alone too.
    let held2 = c.tokens(2).to_vec();
    assert!(matches!(
        c.kv_unpack(3, &packed[..packed.len() / 2], &p),
        Err(BackendError::KvState(_))
    ));
    assert_eq!(c.tokens(2), &held2[..]);
    assert_eq!(c.tokens(0).len(), x.len() + N_GEN - 1);
}

fn session() -> Session {
    Session::new(
        backend().model(),
        &SessionParams {
            n_ctx: 256,
            n_batch: 32,
            n_threads: Some(2),
            n_seq_max: 4,
            ..SessionParams::default()
        },
    )
    .expect("session")
}

#[test]
fn a_bad_batch_is_refused_before_anything_runs() {
    let m = backend().model();
    let mut s = session();
    assert_eq!(s.n_seq(), 4);
    assert_eq!(s.batch_capacity(), 32 + 4);
    let a = m.tokenize("The capital of France is", true, false).unwrap();
    let b = m.tokenize("Once upon a time", true, false).unwrap();
    s.decode_batch(&[
        SeqTokens {
            seq: 0,
            tokens: &a,
            logits: true,
        },
        SeqTokens {
            seq: 1,
            tokens: &b,
            logits: true,
        },
    ])
    .unwrap();
    let before: Vec<Vec<u32>> = (0..4).map(|q| s.seq_tokens(q).to_vec()).collect();
    let logits: Vec<Vec<f32>> = (0..2).map(|q| s.seq_logits(q).unwrap().to_vec()).collect();
    let states: Vec<Vec<u8>> = (0..2).map(|q| s.seq_kv_pack(q).unwrap()).collect();
    let one = [a[1]];
    let over = [a[1]; 30];
    let out_of_range = [m.n_vocab()];
    let too_many = vec![1u32; 256];
    let item = |seq, tokens| SeqTokens {
        seq,
        tokens,
        logits: true,
    };

    let cases: Vec<(&str, Vec<SeqTokens<'_>>)> = vec![
        (
            "over capacity",
            vec![item(0, &over[..]), item(1, &over[..7])],
        ),
        (
            "a sequence twice",
            vec![item(0, &one[..]), item(0, &one[..])],
        ),
        (
            "no such sequence",
            vec![item(0, &one[..]), item(4, &one[..])],
        ),
        ("no tokens", vec![item(0, &one[..]), item(1, &one[..0])]),
        ("no items", vec![]),
        (
            "a token out of range",
            vec![item(0, &one[..]), item(1, &out_of_range[..])],
        ),
        ("no room", vec![item(0, &one[..]), item(1, &too_many[..])]),
    ];
    for (what, batch) in &cases {
        let err = s.decode_batch(batch).unwrap_err();
        let kind_ok = match *what {
            "over capacity" => matches!(err, LlamaError::InvalidParam { name: "batch", .. }),
            "a sequence twice" | "no such sequence" => {
                matches!(err, LlamaError::InvalidParam { name: "seq", .. })
            }
            "no tokens" | "no items" => matches!(err, LlamaError::EmptyInput(_)),
            "a token out of range" => matches!(err, LlamaError::TokenOutOfRange { .. }),
            _ => matches!(err, LlamaError::ContextOverflow { .. }),
        };
        assert!(kind_ok, "{what}: {err:?}");
        for (q, toks) in before.iter().enumerate() {
            assert_eq!(s.seq_tokens(q), &toks[..], "{what}: sequence {q} changed");
        }
        for (q, l) in logits.iter().enumerate() {
            let now = s
                .seq_logits(q)
                .unwrap_or_else(|e| panic!("{what}: seq {q}: {e}"));
            assert!(
                now.iter().zip(l).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: sequence {q}'s logits changed"
            );
        }
        for (q, st) in states.iter().enumerate() {
            assert!(
                s.seq_kv_pack(q).unwrap() == *st,
                "{what}: state {q} changed"
            );
        }
    }
    // A batch of exactly the capacity runs.
    s.decode_batch(&[item(2, &over[..28]), item(3, &over[..8])])
        .unwrap();
    assert_eq!(s.seq_tokens(2).len(), 28);
    assert_eq!(s.seq_tokens(3).len(), 8);
    assert!(
        !s.has_logits(),
        "sequence 0's logits are gone after another decode"
    );
    assert!(matches!(s.seq_logits(1), Err(LlamaError::NoLogits)));
    assert!(s.seq_logits(3).is_ok());
}

/// Cell positions of a packed one-section state with `n` cells, in the
/// order it lists them (the cache's slot order).
fn positions(state: &[u8], n: usize) -> Vec<i32> {
    (0..n)
        .map(|i| {
            let at = 16 + 12 * i;
            i32::from_le_bytes(state[at..at + 4].try_into().unwrap())
        })
        .collect()
}

#[test]
fn a_sequence_keeps_its_cells_in_order_beside_others() {
    const N_BATCH: usize = 32;
    let b = backend();
    let x = long_prompt(100);
    let p = tokens("Once upon a time, in a small village by the sea,");
    let mut c = context(N_BATCH, 2);
    prefill(c.as_mut(), 0, &x, N_BATCH).unwrap();
    prefill(c.as_mut(), 1, &p, N_BATCH).unwrap();
    // Sequence 0 ends and frees its cells. In a unified cache llama.cpp
    // would put sequence 1's next tokens there, out of position order (and
    // its attention would sum in another order than alone); each sequence
    // has cells of its own, so they stay in order.
    c.clear(0);
    let gen = generate(c.as_mut(), 1, N_GEN);
    let held = c.tokens(1).to_vec();
    let n = held.len();
    assert_eq!(n, p.len() + N_GEN - 1);
    let packed = c.kv_pack(1).unwrap();
    let pos = positions(&packed, n);
    assert_eq!(pos, (0..n as i32).collect::<Vec<_>>());
    assert_eq!(gen, alone(&p, N_BATCH));
    let cold = generate(c.as_mut(), 1, 8);
    assert_eq!(gen.len(), N_GEN);

    // Restored into the other sequence, and into a fresh context.
    let mut fresh = b
        .new_context(&ContextParams {
            n_ctx: 256,
            n_batch: N_BATCH,
            n_threads: Some(2),
            n_seq: 1,
            ..ContextParams::default()
        })
        .unwrap();
    for (ctx, seq) in [(&mut c, 0), (&mut fresh, 0)] {
        ctx.kv_unpack(seq, &packed, &held).unwrap();
        assert_eq!(ctx.tokens(seq), &held[..]);
        refeed_last(ctx.as_mut(), seq);
        assert_eq!(generate(ctx.as_mut(), seq, 8), cold, "warm equals cold");
    }
}

#[test]
fn a_prefill_beside_generation_changes_neither() {
    // The engine's step: one sequence's prefill chunk and another's next
    // token in the same decode.
    const N_BATCH: usize = 32;
    let p0 = tokens("The capital of France is");
    let p1 = long_prompt(100);
    let want0 = alone(&p0, N_BATCH);
    let want1 = alone(&p1, N_BATCH);

    let mut c = context(N_BATCH, 4);
    prefill(c.as_mut(), 0, &p0, N_BATCH).unwrap();
    let pieces = prefill_pieces(0, p1.len(), N_BATCH);
    assert_eq!(pieces.len(), 5);
    let mut out0 = Vec::new();
    for piece in pieces {
        let t = c.sample(0).unwrap();
        out0.push(t);
        let last = piece.end == p1.len();
        c.decode(&[
            BatchItem {
                seq: 1,
                tokens: &p1[piece],
                logits: last,
            },
            BatchItem {
                seq: 0,
                tokens: &[t],
                logits: true,
            },
        ])
        .unwrap();
    }
    assert_eq!(c.tokens(1), &p1[..]);
    let rest = N_GEN - out0.len();
    out0.extend(generate(c.as_mut(), 0, rest));
    assert_eq!(out0, want0, "generation beside a prefill");
    // Sequence 0's decode took sequence 1's logits; re-feed its last token.
    refeed_last(c.as_mut(), 1);
    assert_eq!(
        generate(c.as_mut(), 1, N_GEN),
        want1,
        "a prefill beside generation"
    );
}

#[test]
fn each_sequence_samples_with_its_own_chain() {
    let alone_greedy = |prompt: &[u32]| alone(prompt, N_BATCH);
    const N_BATCH: usize = 32;
    let seeded = SamplingParams {
        temperature: 0.8,
        seed: Some(42),
        ..SamplingParams::default()
    };
    let penalised = SamplingParams {
        repetition_penalty: 1.5,
        ..SamplingParams::default()
    };
    let yes_no = SamplingParams {
        grammar: Some(r#"root ::= "yes" | "no""#.into()),
        ..SamplingParams::default()
    };
    let b = backend();
    let chat = |q: &str| {
        b.chat_tokens(&[("user".into(), q.into())], true)
            .expect("chat tokens")
    };
    let runs = [
        (chat("Write a short story about a dragon."), seeded),
        (
            tokens("one one one one one one one one one one one one"),
            penalised,
        ),
        (chat("Is the sky blue? Answer yes or no."), yes_no),
        (
            tokens("The capital of France is"),
            SamplingParams::default(),
        ),
    ];
    let alone: Vec<Vec<u32>> = runs
        .iter()
        .map(|(prompt, params)| {
            let mut c = context(N_BATCH, 1);
            c.set_sampling(0, params).unwrap();
            prefill(c.as_mut(), 0, prompt, N_BATCH).unwrap();
            generate(c.as_mut(), 0, N_GEN)
        })
        .collect();

    let mut c = context(N_BATCH, 4);
    // Every prompt's chunks but its last token, then one step with all
    // four last tokens.
    for (seq, (prompt, params)) in runs.iter().enumerate() {
        c.set_sampling(seq, params).unwrap();
        let pieces = prefill_pieces(0, prompt.len(), N_BATCH);
        for piece in &pieces[..pieces.len() - 1] {
            c.decode(&[BatchItem {
                seq,
                tokens: &prompt[piece.clone()],
                logits: false,
            }])
            .unwrap();
        }
    }
    let lasts: Vec<BatchItem<'_>> = runs
        .iter()
        .enumerate()
        .map(|(seq, (prompt, _))| BatchItem {
            seq,
            tokens: &prompt[prompt.len() - 1..],
            logits: true,
        })
        .collect();
    c.decode(&lasts).unwrap();
    let (outs, _) = generate_together(c.as_mut(), &[0, 1, 2, 3], N_GEN);
    assert_eq!(outs, alone, "each sequence as its request alone");
    let answer = b.detokenize(&outs[2]).unwrap();
    assert!(answer == "yes" || answer == "no", "{answer:?}");
    assert_ne!(outs[1], alone_greedy(&runs[1].0), "the penalty applies");
}
