//! Real llama.cpp on the real test model (SmolLM2-135M-Instruct Q4_1).
//!
//! The model path comes from `ERLLAMA_TEST_MODEL`, else the default model
//! cache (`python -m erllama fetch-model` puts it there). These tests never
//! skip: without the model they fail and say how to fetch it.

use std::sync::OnceLock;
use std::time::Instant;

use erllama_llama::{LlamaError, Model, ModelParams, Session, SessionParams, SessionWorker};

mod common;
use common::model_path;

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(model_path(), &ModelParams::default()).expect("load model"))
}

fn params(n_ctx: u32) -> SessionParams {
    SessionParams {
        n_ctx,
        n_batch: 512,
        n_threads: None,
        n_seq_max: 1,
        ..SessionParams::default()
    }
}

/// About `n` tokens of ordinary English.
fn long_prompt(n: usize) -> Vec<u32> {
    common::long_prompt(n, |text| model().tokenize(text, true, false).unwrap())
}

#[test]
fn metadata_is_read() {
    let m = model().meta();
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.quant_type, "q4_1");
    assert_eq!(m.n_vocab, 49152);
    assert_eq!(m.n_layer, 30);
    assert!(m.n_ctx_train >= 2048);
    assert!(m.has_chat_template);
    assert!(
        erllama_llama::system_info().contains("AVX2 = 1"),
        "{}",
        erllama_llama::system_info()
    );
}

#[test]
fn tokenize_round_trip() {
    let m = model();
    for text in [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces and\nnew lines\ttabs",
        "unicode: café, naïve, 日本語, emoji 🦀",
    ] {
        let toks = m.tokenize(text, false, false).unwrap();
        assert!(!toks.is_empty());
        assert_eq!(m.detokenize(&toks, false).unwrap(), text);
    }
}

#[test]
fn user_text_cannot_inject_control_tokens() {
    let m = model();
    let control = m.tokenize("<|im_start|>", false, true).unwrap();
    assert_eq!(
        control.len(),
        1,
        "with special=true it is one control token"
    );
    let typed = m.tokenize("<|im_start|>", false, false).unwrap();
    assert!(
        typed.len() > 1,
        "typed by a user it is plain text: {typed:?}"
    );
    assert!(!typed.contains(&control[0]));
    assert_eq!(m.detokenize(&typed, false).unwrap(), "<|im_start|>");
}

#[test]
fn packed_state_continues_identically() {
    let m = model();
    let prompt = long_prompt(700);
    let (head, last) = prompt.split_at(prompt.len() - 1);

    // Cold: prefill all but the last token, then the last token on its own.
    let mut a = Session::new(m, &params(2048)).unwrap();
    let t0 = Instant::now();
    a.prefill(head).unwrap();
    a.prefill(last).unwrap();
    let prefill_s = t0.elapsed().as_secs_f64();
    let packed = a.kv_pack().unwrap();
    let t1 = Instant::now();
    let cold = a.generate(16).unwrap();
    let decode_s = t1.elapsed().as_secs_f64();
    assert_eq!(
        cold.len(),
        16,
        "the test wants 16 tokens without an early end"
    );

    // Warm: restore into a fresh context, drop the last cell, re-feed it.
    let mut b = Session::new(m, &params(2048)).unwrap();
    let t2 = Instant::now();
    b.kv_unpack(&packed, &prompt).unwrap();
    let unpack_s = t2.elapsed().as_secs_f64();
    assert_eq!(b.tokens(), &prompt[..]);
    assert!(!b.has_logits());
    b.remove_last().unwrap();
    b.prefill(last).unwrap();
    let warm = b.generate(16).unwrap();
    assert_eq!(cold, warm, "warm continuation differs from cold");
    eprintln!(
        "packed {} tokens into {} bytes ({} bytes/token); prefill {:.0} tok/s, decode {:.1} tok/s, unpack {:.2} ms",
        prompt.len(),
        packed.len(),
        packed.len() / prompt.len(),
        prompt.len() as f64 / prefill_s,
        16.0 / decode_s,
        unpack_s * 1e3
    );
    println!("{}", m.detokenize(&cold, false).unwrap());
}

#[test]
fn restore_replaces_stale_cells() {
    // Unpacking into a context that already holds other tokens must give the
    // same result as unpacking into a fresh one.
    let m = model();
    let prompt = long_prompt(200);
    let mut a = Session::new(m, &params(1024)).unwrap();
    a.prefill(&prompt).unwrap();
    let packed = a.kv_pack().unwrap();
    let cold = a.generate(8).unwrap();

    let mut b = Session::new(m, &params(1024)).unwrap();
    b.prefill(&long_prompt(300)).unwrap();
    b.kv_unpack(&packed, &prompt).unwrap();
    b.remove_last().unwrap();
    b.prefill(&prompt[prompt.len() - 1..]).unwrap();
    // Cold path fed the prompt in one batch; compare against the same shape.
    let mut c = Session::new(m, &params(1024)).unwrap();
    c.prefill(&prompt[..prompt.len() - 1]).unwrap();
    c.prefill(&prompt[prompt.len() - 1..]).unwrap();
    assert_eq!(b.generate(8).unwrap(), c.generate(8).unwrap());
    assert_eq!(cold.len(), 8);
}

#[test]
fn bad_inputs_are_errors_and_the_process_lives() {
    let m = model();
    let mut s = Session::new(m, &params(256)).unwrap();

    let err = s.kv_unpack(&[0x5a; 4096], &[1, 2, 3]).unwrap_err();
    assert!(matches!(err, LlamaError::KvState(_)), "{err}");
    // A real state with one byte flipped in the cell metadata, or cut short.
    s.prefill(&long_prompt(20)).unwrap();
    let good = s.kv_pack().unwrap();
    let toks = s.tokens().to_vec();
    let mut flipped = good.clone();
    flipped[16] ^= 0x40;
    assert!(matches!(
        s.kv_unpack(&flipped, &toks),
        Err(LlamaError::KvState(_))
    ));
    assert!(matches!(
        s.kv_unpack(&good[..good.len() - 3], &toks),
        Err(LlamaError::KvState(_))
    ));
    assert!(matches!(
        s.kv_unpack(&good, &toks[..10]),
        Err(LlamaError::KvState(_))
    ));
    assert_eq!(
        s.tokens(),
        &toks[..],
        "a rejected state leaves the sequence untouched"
    );
    s.clear();
    s.kv_unpack(&good, &toks).unwrap();
    assert_eq!(s.n_past(), 20);

    let too_long = long_prompt(300);
    let err = s.prefill(&too_long).unwrap_err();
    assert!(matches!(err, LlamaError::ContextOverflow { .. }), "{err}");

    let n_vocab = m.n_vocab();
    let err = s.prefill(&[1, n_vocab]).unwrap_err();
    assert!(
        matches!(err, LlamaError::TokenOutOfRange { index: 1, .. }),
        "{err}"
    );
    assert!(matches!(
        m.detokenize(&[n_vocab + 7], false),
        Err(LlamaError::TokenOutOfRange { .. })
    ));
    assert!(matches!(s.prefill(&[]), Err(LlamaError::EmptyInput(_))));

    let mut fresh = Session::new(m, &params(256)).unwrap();
    assert!(matches!(fresh.decode_one(), Err(LlamaError::NoLogits)));
    assert!(matches!(
        fresh.remove_last(),
        Err(LlamaError::EmptyInput(_))
    ));

    assert!(matches!(
        Model::load("/nonexistent/dir/model.gguf", &ModelParams::default()),
        Err(LlamaError::ModelNotFound(_))
    ));
    let junk = std::env::temp_dir().join(format!("erllama-junk-{}.gguf", std::process::id()));
    std::fs::write(&junk, vec![0x42u8; 4096]).unwrap();
    assert!(matches!(
        Model::load(&junk, &ModelParams::default()),
        Err(LlamaError::NotGguf { .. })
    ));
    // Right magic, garbage after it: llama.cpp itself must refuse, not abort.
    let mut fake = b"GGUF\x03\x00\x00\x00".to_vec();
    fake.extend(std::iter::repeat_n(0xFFu8, 4096));
    std::fs::write(&junk, fake).unwrap();
    assert!(matches!(
        Model::load(&junk, &ModelParams::default()),
        Err(LlamaError::ModelLoad { .. })
    ));
    std::fs::remove_file(&junk).unwrap();

    assert!(matches!(
        Session::new(
            m,
            &SessionParams {
                n_ctx: 0,
                ..params(256)
            }
        ),
        Err(LlamaError::InvalidParam { name: "n_ctx", .. })
    ));

    assert!(matches!(
        Session::new(
            m,
            &SessionParams {
                n_seq_max: 0,
                ..params(256)
            }
        ),
        Err(LlamaError::InvalidParam {
            name: "n_seq_max",
            ..
        })
    ));
    // Several sequences, each with cells of its own; sequence 0 works as
    // before.
    let mut multi = Session::new(
        m,
        &SessionParams {
            n_seq_max: 4,
            ..params(512)
        },
    )
    .unwrap();
    multi.prefill(&long_prompt(100)).unwrap();
    let mut single = Session::new(m, &params(512)).unwrap();
    single.prefill(&long_prompt(100)).unwrap();
    assert_eq!(multi.kv_pack().unwrap(), single.kv_pack().unwrap());

    // Still serving after all of that.
    let mut s = Session::new(m, &params(256)).unwrap();
    s.prefill(&m.tokenize("The capital of France is", true, false).unwrap())
        .unwrap();
    assert_eq!(s.generate(4).unwrap().len(), 4);
}

#[test]
fn worker_thread_owns_the_session() {
    let m = model();
    let w = SessionWorker::spawn(m, &params(512)).unwrap();
    let prompt = m.tokenize("Once upon a time", true, false).unwrap();
    let p2 = prompt.clone();
    let out = w
        .call(move |s| {
            s.prefill(&p2)?;
            s.generate(5)
        })
        .unwrap()
        .unwrap();
    assert_eq!(out.len(), 5);
    assert_eq!(w.call(|s| s.n_past()).unwrap(), prompt.len() + 5);
    // A panicking job stops the worker; later calls get an error, not a hang.
    assert!(matches!(
        w.call(|_| panic!("boom")),
        Err(LlamaError::WorkerGone(_))
    ));
    assert!(matches!(
        w.call(|s| s.n_past()),
        Err(LlamaError::WorkerGone(_))
    ));
}
