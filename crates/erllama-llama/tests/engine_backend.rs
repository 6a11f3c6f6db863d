//! The engine's `Backend` trait over real llama.cpp, on the real test model
//! (SmolLM2-135M-Instruct Q4_1): sampling chain, grammars, embeddings, chat
//! template, KV round trips, and one full engine run with a cache hit.
//!
//! The model path comes from `ERLLAMA_TEST_MODEL`, else the default model
//! cache. These tests never skip.

use std::sync::Arc;
use std::time::Duration;

use erllama_cache::{
    ctx_params_hash, Cache, CacheConfig, FingerprintMode, PolicyConfig, QuantType, TierKind,
};
use erllama_engine::{
    Backend, BackendContext, BackendError, BatchItem, ContextParams, Engine, FlashAttn, HitKind,
    HitSource, KvType, ModelConfig, Prompt, RequestOptions, SamplingParams,
};
use erllama_llama::{LlamaBackend, LlamaError, ModelParams, Session, SessionParams};

mod common;
use common::{backend, decode_one, model_path};

const N_BATCH: usize = 256;

fn cparams() -> ContextParams {
    ContextParams {
        n_ctx: 1024,
        n_batch: N_BATCH,
        n_threads: None,
        n_seq: 4,
        ..ContextParams::default()
    }
}

/// Prefills `tokens` into sequence 0 as the engine does.
fn prefill(ctx: &mut dyn BackendContext, tokens: &[u32]) -> Result<(), BackendError> {
    common::prefill(ctx, 0, tokens, N_BATCH)
}

fn ctx() -> Box<dyn BackendContext> {
    backend().new_context(&cparams()).expect("context")
}

fn chat_prompt(question: &str) -> Vec<u32> {
    backend()
        .chat_tokens(&[("user".into(), question.into())], true)
        .expect("chat tokens")
}

/// One request on sequence 0: reset, configure, prefill, decode up to `n`
/// tokens (an end-of-generation token ends it and is included; every
/// token is fed).
fn run(
    ctx: &mut dyn BackendContext,
    prompt: &[u32],
    sampling: &SamplingParams,
    n: usize,
) -> Vec<u32> {
    ctx.set_sampling(0, sampling).expect("sampling");
    ctx.clear(0);
    prefill(ctx, prompt).expect("prefill");
    let mut out = Vec::new();
    while out.len() < n {
        let t = decode_one(ctx, 0).expect("decode");
        out.push(t);
        if ctx.is_eog(t).unwrap() {
            break;
        }
    }
    out
}

fn sampled(temperature: f32, seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        temperature,
        seed,
        ..SamplingParams::default()
    }
}

fn grammar(text: &str) -> SamplingParams {
    SamplingParams {
        grammar: Some(text.into()),
        ..SamplingParams::default()
    }
}

#[test]
fn greedy_through_the_trait_equals_session_generate() {
    let b = backend();
    assert_eq!(b.name(), "llama");
    let prompt = b.tokenize("The capital of France is", true).unwrap();
    let mut s = Session::new(
        b.model(),
        &SessionParams {
            n_ctx: 1024,
            n_batch: 256,
            ..SessionParams::default()
        },
    )
    .unwrap();
    // The trait decodes a prompt's last token on its own; so does this.
    let (last, head) = prompt.split_last().unwrap();
    s.prefill(head).unwrap();
    s.prefill(&[*last]).unwrap();
    let expected = s.generate(16).unwrap();
    let mut c = ctx();
    let got = run(c.as_mut(), &prompt, &SamplingParams::default(), 16);
    assert_eq!(got, expected);
    assert_eq!(c.tokens(0).len(), prompt.len() + got.len());
    // A top-k of 1 through the full chain (temperature, dist) is greedy too.
    let top1 = SamplingParams {
        temperature: 1.0,
        top_k: 1,
        seed: Some(7),
        ..SamplingParams::default()
    };
    assert_eq!(run(c.as_mut(), &prompt, &top1, 16), expected);
}

#[test]
fn seeded_sampling_repeats_and_seeds_differ() {
    let prompt = chat_prompt("Write a short story about a dragon who learns to bake bread.");
    let mut c = ctx();
    let a = run(c.as_mut(), &prompt, &sampled(0.8, Some(42)), 24);
    let b = run(c.as_mut(), &prompt, &sampled(0.8, Some(42)), 24);
    let other = run(c.as_mut(), &prompt, &sampled(0.8, Some(43)), 24);
    assert_eq!(
        a, b,
        "same seed, same tokens (the chain is reset per request)"
    );
    assert_ne!(a, other, "another seed, other tokens");
    assert!(a.len() >= 8, "{a:?}");
    // No seed: a fixed default, so runs repeat too.
    let d1 = run(c.as_mut(), &prompt, &sampled(0.8, None), 24);
    let d2 = run(c.as_mut(), &prompt, &sampled(0.8, None), 24);
    assert_eq!(d1, d2);
    // A fresh context with the same seed agrees.
    let mut fresh = ctx();
    assert_eq!(run(fresh.as_mut(), &prompt, &sampled(0.8, Some(42)), 24), a);
}

#[test]
fn a_grammar_constrains_the_output() {
    let b = backend();
    let prompt = chat_prompt("Is the sky blue? Answer yes or no.");
    let mut c = ctx();
    for params in [
        grammar(r#"root ::= "yes" | "no""#),
        SamplingParams {
            temperature: 0.9,
            seed: Some(3),
            ..grammar("root ::= answer\nanswer ::= (\"yes\" | \"no\")  # a comment (")
        },
    ] {
        let out = run(c.as_mut(), &prompt, &params, 12);
        let last = *out.last().unwrap();
        assert!(
            c.is_eog(last).unwrap(),
            "a finished grammar allows only end tokens: {out:?}"
        );
        let text = b.detokenize(&out).unwrap();
        assert!(text == "yes" || text == "no", "{text:?} from {out:?}");
    }
    // A grammar the model must spell out character by character.
    let out = run(
        c.as_mut(),
        &prompt,
        &grammar(r#"root ::= [0-9] [0-9] "-" [a-z]+ "!""#),
        24,
    );
    let text = b.detokenize(&out).unwrap();
    let bytes = text.as_bytes();
    assert!(
        bytes.len() >= 4 && bytes[0].is_ascii_digit() && bytes[1].is_ascii_digit(),
        "{text:?}"
    );
    assert_eq!(bytes[2], b'-', "{text:?}");
    if c.is_eog(*out.last().unwrap()).unwrap() {
        assert!(text.ends_with('!'), "{text:?}");
    }
}

#[test]
fn invalid_grammars_are_errors_and_the_context_lives_on() {
    let prompt = chat_prompt("Say something.");
    let mut c = ctx();
    let greedy = run(c.as_mut(), &prompt, &SamplingParams::default(), 8);
    for bad in [
        "root ::= (",
        "root ::= undefined_rule",
        "root ::= undefined-rule",
        "root ::= \"a\" x{3000}\nx ::= \"b\"",
        "",
        "   \n",
        "start ::= \"a\"",
        "root ::= \"a\0\"",
        "root ::= root \"a\"",
        "root ::= \"unterminated",
    ] {
        match c.set_sampling(0, &grammar(bad)) {
            Err(BackendError::Grammar(msg)) => assert!(!msg.is_empty()),
            other => panic!("{bad:?}: expected a grammar error, got {other:?}"),
        }
        // The failed configuration leaves plain greedy decoding in place.
        c.clear(0);
        prefill(c.as_mut(), &prompt).unwrap();
        assert_eq!(decode_one(c.as_mut(), 0).unwrap(), greedy[0], "{bad:?}");
    }
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(500), ")".repeat(500));
    assert!(matches!(
        c.set_sampling(0, &grammar(&deep)),
        Err(BackendError::Grammar(_))
    ));
    assert_eq!(
        run(c.as_mut(), &prompt, &SamplingParams::default(), 8),
        greedy
    );
    // A grammar that parses but allows no token of this vocabulary: found
    // when it is built (llama.cpp's own sampling would abort on it).
    assert!(matches!(
        c.set_sampling(0, &grammar("root ::= <[999999]>")),
        Err(BackendError::Grammar(m)) if m.contains("no token")
    ));
    assert_eq!(
        run(c.as_mut(), &prompt, &SamplingParams::default(), 8),
        greedy
    );
}

#[test]
fn sampler_values_are_checked() {
    let prompt = chat_prompt("List some fruits.");
    let mut c = ctx();
    let n_vocab = backend().n_vocab();
    let full = SamplingParams {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.05,
        repetition_penalty: 1.3,
        seed: Some(1),
        grammar: None,
    };
    let a = run(c.as_mut(), &prompt, &full, 16);
    assert!(a.iter().all(|&t| t < n_vocab));
    assert_eq!(run(c.as_mut(), &prompt, &full, 16), a);
    // Extremes that are still valid.
    for ok in [
        SamplingParams {
            top_k: 1_000_000,
            top_p: 1e-6,
            min_p: 1.0,
            temperature: 5.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 0.5,
            ..SamplingParams::default()
        },
    ] {
        let out = run(c.as_mut(), &prompt, &ok, 4);
        assert!(!out.is_empty());
    }
    for bad in [
        sampled(-1.0, None),
        sampled(f32::NAN, None),
        sampled(f32::INFINITY, None),
        SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 1.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            min_p: 1.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            min_p: -0.1,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: f32::NAN,
            ..SamplingParams::default()
        },
    ] {
        assert!(
            matches!(c.set_sampling(0, &bad), Err(BackendError::InvalidInput(_))),
            "{bad:?}"
        );
    }
    // Every sequence has its own sampler; there is none past n_seq.
    assert!(matches!(
        c.set_sampling(c.n_seq(), &full),
        Err(BackendError::InvalidInput(_))
    ));
}

#[test]
fn the_repetition_penalty_changes_a_repetitive_continuation() {
    let b = backend();
    let prompt = b
        .tokenize("one one one one one one one one one one one one", true)
        .unwrap();
    let mut c = ctx();
    let plain = run(c.as_mut(), &prompt, &SamplingParams::default(), 12);
    let penalised = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::default()
    };
    let p1 = run(c.as_mut(), &prompt, &penalised, 12);
    assert_ne!(plain, p1, "{}", b.detokenize(&p1).unwrap());
    assert_eq!(
        run(c.as_mut(), &prompt, &penalised, 12),
        p1,
        "deterministic"
    );
    // The prompt counts: the penalised output avoids the prompt's token.
    let one = b.tokenize(" one", false).unwrap();
    assert_eq!(one.len(), 1);
    assert_ne!(p1[0], one[0], "{}", b.detokenize(&p1).unwrap());
}

#[test]
fn embeddings_are_pooled_and_checked() {
    let b = backend();
    let n_embd = b.model().meta().n_embd as usize;
    let x = b.tokenize("The cat sat on the mat.", true).unwrap();
    let y = b
        .tokenize("Quantum chromodynamics describes quarks.", true)
        .unwrap();
    let ex = b.embed(&x).unwrap();
    assert_eq!(ex.len(), n_embd);
    assert!(ex.iter().all(|v| v.is_finite()));
    let norm: f32 = ex.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "L2-normalised, got {norm}");
    assert_eq!(b.embed(&x).unwrap(), ex, "deterministic");
    let ey = b.embed(&y).unwrap();
    assert_eq!(ey.len(), n_embd);
    assert_ne!(ex, ey);
    // One token works too.
    assert_eq!(b.embed(&x[..1]).unwrap().len(), n_embd);
    assert!(matches!(b.embed(&[]), Err(BackendError::EmptyInput(_))));
    assert!(matches!(
        b.embed(&[1, b.n_vocab()]),
        Err(BackendError::TokenOutOfRange { .. })
    ));
    let too_long = vec![1u32; b.model().meta().n_ctx_train as usize + 1];
    assert!(matches!(
        b.embed(&too_long),
        Err(BackendError::ContextOverflow { .. })
    ));
}

#[test]
fn chat_tokens_and_text_calls() {
    let b = backend();
    let toks = b
        .chat_tokens(
            &[
                ("system".into(), "You are terse.".into()),
                ("user".into(), "Hi <|im_start|> there".into()),
            ],
            true,
        )
        .unwrap();
    let im_start = b.model().tokenize("<|im_start|>", false, true).unwrap();
    assert_eq!(im_start.len(), 1);
    assert_eq!(toks[0], im_start[0]);
    assert_eq!(
        toks.iter().filter(|&&t| t == im_start[0]).count(),
        3,
        "system, user, assistant turns; the typed marker stays text"
    );
    let text = b.detokenize(&toks).unwrap();
    assert!(text.contains("Hi <|im_start|> there"), "{text}");
    // Text calls.
    let t = b.tokenize("Hello, world!", false).unwrap();
    assert_eq!(b.detokenize(&t).unwrap(), "Hello, world!");
    let joined: Vec<u8> = t.iter().flat_map(|&x| b.token_bytes(x).unwrap()).collect();
    assert_eq!(joined, b"Hello, world!");
    assert!(b.token_bytes(im_start[0]).unwrap().is_empty());
    assert!(matches!(
        b.token_bytes(b.n_vocab()),
        Err(BackendError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        b.detokenize(&[u32::MAX]),
        Err(BackendError::TokenOutOfRange { .. })
    ));
    // Typed control markers stay text.
    assert!(!b
        .tokenize("<|im_start|>", false)
        .unwrap()
        .contains(&im_start[0]));
}

#[test]
fn kv_round_trip_through_the_trait() {
    let b = backend();
    let prompt = b
        .tokenize(
            "A lighthouse keeper climbed the stairs every evening to trim the wicks and log the ships.",
            true,
        )
        .unwrap();
    let mut a = ctx();
    a.set_sampling(0, &SamplingParams::default()).unwrap();
    prefill(a.as_mut(), &prompt).unwrap();
    let packed = a.kv_pack(0).unwrap();
    let mut cold = Vec::new();
    for _ in 0..8 {
        cold.push(decode_one(a.as_mut(), 0).unwrap());
    }
    let mut w = ctx();
    w.kv_unpack(0, &packed, &prompt).unwrap();
    assert_eq!(w.tokens(0), &prompt[..]);
    assert!(
        matches!(w.sample(0), Err(BackendError::InvalidInput(_))),
        "no logits after a restore"
    );
    // Drop the last cell (what `remove_last` was) and re-feed its token.
    w.truncate(0, prompt.len() - 1).unwrap();
    assert_eq!(w.tokens(0), &prompt[..prompt.len() - 1]);
    prefill(w.as_mut(), &prompt[prompt.len() - 1..]).unwrap();
    let mut warm = Vec::new();
    for _ in 0..8 {
        warm.push(decode_one(w.as_mut(), 0).unwrap());
    }
    assert_eq!(warm, cold);
    // Bad states are refused and leave a usable context.
    assert!(matches!(
        w.kv_unpack(0, &packed[..packed.len() / 2], &prompt),
        Err(BackendError::KvState(_))
    ));
    assert!(matches!(
        w.kv_unpack(0, &packed, &prompt[1..]),
        Err(BackendError::KvState(_))
    ));
    w.clear(0);
    assert!(w.tokens(0).is_empty());
    // Cutting an empty sequence back past its length (what `remove_last`
    // on an empty sequence was) is refused; keeping 0 of 0 is fine.
    assert!(matches!(
        w.truncate(0, 1),
        Err(BackendError::InvalidInput(_))
    ));
    w.truncate(0, 0).unwrap();
    // Input checks.
    assert!(matches!(
        prefill(w.as_mut(), &[]),
        Err(BackendError::EmptyInput(_))
    ));
    assert!(matches!(
        prefill(w.as_mut(), &[b.n_vocab()]),
        Err(BackendError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        w.decode(&[BatchItem {
            seq: 0,
            tokens: &vec![1u32; 1025],
            logits: true,
        }]),
        Err(BackendError::ContextOverflow {
            n_ctx: 1024,
            adding: 1025,
            ..
        })
    ));
    assert!(w.tokens(0).is_empty(), "refused input changes nothing");
    // The restored context still serves.
    prefill(w.as_mut(), &prompt).unwrap();
    assert_eq!(decode_one(w.as_mut(), 0).unwrap(), cold[0]);
    // Sequences outside the context, and a batch larger than one step.
    assert!(matches!(w.kv_pack(4), Err(BackendError::InvalidInput(_))));
    assert!(matches!(
        w.kv_unpack(4, &packed, &prompt),
        Err(BackendError::InvalidInput(_))
    ));
    assert!(matches!(
        w.truncate(4, 0),
        Err(BackendError::InvalidInput(_))
    ));
    assert!(matches!(w.sample(4), Err(BackendError::InvalidInput(_))));
    assert!(matches!(
        w.set_sampling(4, &SamplingParams::default()),
        Err(BackendError::InvalidInput(_))
    ));
    assert!(matches!(
        w.decode(&[BatchItem {
            seq: 4,
            tokens: &prompt,
            logits: true,
        }]),
        Err(BackendError::InvalidInput(_))
    ));
    assert!(matches!(
        w.decode(&[BatchItem {
            seq: 1,
            tokens: &vec![1u32; N_BATCH + w.n_seq() + 1],
            logits: true,
        }]),
        Err(BackendError::InvalidInput(_))
    ));
    assert!(w.tokens(1).is_empty());
    assert_eq!(w.tokens(0).len(), prompt.len() + 1);
}

#[test]
fn fingerprint_and_ctx_params_are_stable() {
    let a = backend();
    let b = LlamaBackend::open(
        model_path(),
        &ModelParams::default(),
        FingerprintMode::GgufChunked,
    )
    .unwrap();
    let fa = a.fingerprint();
    assert_eq!(fa, b.fingerprint());
    assert_eq!(fa.mode, FingerprintMode::GgufChunked);
    assert_eq!(fa.quant, QuantType::Q4_1);
    assert_ne!(fa.bytes, [0u8; 32]);
    assert_eq!(a.ctx_params(&cparams()), b.ctx_params(&cparams()));
    let cp = a.ctx_params(&ContextParams {
        n_ctx: 256,
        n_batch: 512,
        n_threads: Some(2),
        n_seq: 4,
        ..ContextParams::default()
    });
    assert_eq!((cp.n_ctx, cp.n_batch, cp.n_ubatch), (256, 256, 256));
    assert_eq!((cp.type_k.as_str(), cp.type_v.as_str()), ("f16", "f16"));
    assert!(cp.kv_unified);
    assert_eq!(cp.n_seq_max, 1);
    assert!(cp
        .extra
        .contains(&("backend".to_owned(), "llama".to_owned())));
    // Each flash-attention setting keys its own rows; `on` and `auto` with
    // a quantized type are the same explicit setting.
    let attn = |flash_attn, type_k| {
        let cp = a.ctx_params(&ContextParams {
            flash_attn,
            type_k,
            ..cparams()
        });
        let label = cp.extra.iter().find(|(k, _)| k == "flash_attn").unwrap();
        (label.1.clone(), ctx_params_hash(&cp))
    };
    let auto = attn(FlashAttn::Auto, KvType::F16);
    let on = attn(FlashAttn::On, KvType::F16);
    let off = attn(FlashAttn::Off, KvType::F16);
    assert_eq!(
        (auto.0.as_str(), on.0.as_str(), off.0.as_str()),
        ("auto", "enabled", "disabled")
    );
    assert!(auto.1 != on.1 && on.1 != off.1 && auto.1 != off.1);
    assert_eq!(
        attn(FlashAttn::Auto, KvType::Q8_0),
        attn(FlashAttn::On, KvType::Q8_0)
    );
    // Off computes, with an f16 or a quantized K cache alike.
    for type_k in [KvType::F16, KvType::Q8_0] {
        let mut ctx = a
            .new_context(&ContextParams {
                flash_attn: FlashAttn::Off,
                type_k,
                ..cparams()
            })
            .unwrap();
        let prompt = a.tokenize("The capital of France is", true).unwrap();
        ctx.decode(&[BatchItem {
            seq: 0,
            tokens: &prompt,
            logits: true,
        }])
        .unwrap();
        assert_eq!(ctx.tokens(0), prompt.as_slice());
    }
    // The same weights fingerprinted whole differ in mode and bytes.
    let safe = LlamaBackend::open(model_path(), &ModelParams::default(), FingerprintMode::Safe)
        .unwrap()
        .fingerprint();
    assert_eq!(safe.mode, FingerprintMode::Safe);
    assert_ne!(safe.bytes, fa.bytes);
    // fast_unsafe needs a digest: refused by open, given to load.
    assert!(matches!(
        LlamaBackend::open(
            model_path(),
            &ModelParams::default(),
            FingerprintMode::FastUnsafe
        ),
        Err(LlamaError::InvalidParam { .. })
    ));
    let given = erllama_engine::ModelFingerprint {
        bytes: [7; 32],
        mode: FingerprintMode::FastUnsafe,
        quant: QuantType::Q4_1,
    };
    let l = LlamaBackend::load(model_path(), &ModelParams::default(), given.clone()).unwrap();
    assert_eq!(l.fingerprint(), given);
    // Bad context parameters are errors, not aborts.
    for bad in [
        ContextParams {
            n_ctx: 0,
            ..cparams()
        },
        ContextParams {
            n_ctx: usize::MAX,
            ..cparams()
        },
        ContextParams {
            n_batch: 0,
            ..cparams()
        },
        ContextParams {
            n_threads: Some(0),
            ..cparams()
        },
        // llama.cpp needs flash attention for a quantized V cache.
        ContextParams {
            flash_attn: FlashAttn::Off,
            type_v: KvType::Q8_0,
            ..cparams()
        },
    ] {
        assert!(
            matches!(a.new_context(&bad), Err(BackendError::InvalidInput(_))),
            "{bad:?}"
        );
    }
}

/// About `n` tokens of ordinary English.
fn long_text(n: usize) -> String {
    let para = "The history of the lighthouse is a story of engineering, weather and \
                patience. Keepers climbed the stairs every evening to trim the wicks, \
                polish the lenses and log the passing ships. ";
    let mut text = String::new();
    while backend().tokenize(&text, true).unwrap().len() < n {
        text.push_str(para);
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_llama_and_hits_its_cache() {
    let policy = PolicyConfig {
        min_tokens: 64,
        cold_min_tokens: 64,
        boundary_align_tokens: 64,
        boundary_trim_tokens: 8,
        ..PolicyConfig::default()
    };
    let engine = Engine::new(Cache::open(CacheConfig::default()).unwrap(), policy.clone()).unwrap();
    let model = engine
        .load_model(
            Arc::new(backend().clone()),
            Some("smol".into()),
            ModelConfig {
                context: cparams(),
                tier: TierKind::Ram,
                policy,
            },
        )
        .await
        .expect("load");
    let prompt = Prompt::Text(long_text(300));
    let opts = RequestOptions {
        max_tokens: 8,
        ..RequestOptions::default()
    };
    let cold = engine
        .complete(&model, prompt.clone(), opts.clone())
        .await
        .expect("cold");
    assert_eq!(cold.stats.cache_hit_kind, HitKind::Cold);
    assert!(cold.stats.prompt_tokens >= 300);
    assert!(!cold.tokens.is_empty());
    // Wait for the asynchronous saves.
    for _ in 0..1000 {
        if TierKind::ALL
            .iter()
            .all(|&t| engine.cache().reserved_bytes(t) == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The finished sequence is kept warm: the repeat shares its cells.
    let shared = engine
        .complete(&model, prompt.clone(), opts.clone())
        .await
        .expect("shared");
    assert_eq!(shared.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(shared.stats.hit_source, Some(HitSource::Shared));
    assert_eq!(shared.stats.cached_tokens, shared.stats.prompt_tokens);
    assert_eq!(shared.tokens, cold.tokens, "sharing changes nothing");
    // Once the sequences are evicted, the repeat restores the cached row.
    engine.evict(&model).await.expect("evict");
    let warm = engine.complete(&model, prompt, opts).await.expect("warm");
    assert_eq!(warm.stats.cache_hit_kind, HitKind::Exact);
    assert_eq!(warm.stats.hit_source, Some(HitSource::Exact));
    assert_eq!(warm.stats.cache_tier, Some(TierKind::Ram));
    assert_eq!(warm.stats.cached_tokens, warm.stats.prompt_tokens);
    assert_eq!(warm.tokens, cold.tokens, "a restore changes nothing");
    assert_eq!(warm.text, cold.text);
    engine.shutdown().await;
}

/// A row whose bytes are intact (CRC and key check out) but whose state the
/// model refuses: the restore fails, is counted and logged, the row is
/// removed (never tried again) and the request answers exactly as cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_to_restore_is_counted_removed_and_falls_back() {
    let policy = PolicyConfig {
        min_tokens: 1 << 20,
        cold_min_tokens: 1 << 20,
        cold_max_tokens: 1 << 20,
        ..PolicyConfig::default()
    };
    let engine = Engine::new(Cache::open(CacheConfig::default()).unwrap(), policy.clone()).unwrap();
    let model = engine
        .load_model(
            Arc::new(backend().clone()),
            Some("smol".into()),
            ModelConfig {
                context: cparams(),
                tier: TierKind::Ram,
                policy,
            },
        )
        .await
        .expect("load");
    let tokens = backend().tokenize(&long_text(200), true).unwrap();
    let opts = RequestOptions {
        max_tokens: 8,
        ..RequestOptions::default()
    };
    let cold = engine
        .complete(&model, Prompt::Tokens(tokens.clone()), opts.clone())
        .await
        .expect("cold");
    assert_eq!(cold.stats.cache_hit_kind, HitKind::Cold);
    // No warm sequence to share: the repeat must go to the cache.
    engine.evict(&model).await.expect("evict");

    // A real state of these tokens, with one cell's position moved.
    let mut ctx = ctx();
    prefill(ctx.as_mut(), &tokens).unwrap();
    let mut state = ctx.kv_pack(0).unwrap();
    // magic, seq id, n_stream, cell_count, then cell 1's position.
    state[16 + 12] ^= 0x40;
    let identity = engine.identity(&model).unwrap();
    let key = identity.key(&tokens);
    let pending = engine
        .cache()
        .begin_save(erllama_cache::SaveRequest {
            identity,
            tier: TierKind::Ram,
            tokens: tokens.clone().into(),
            payload: state,
            logits_count: 0,
            reason: erllama_cache::SaveReason::Cold,
            prompt_text: String::new(),
            detail: None,
        })
        .expect("reserve");
    pending.run().expect("write");
    assert!(engine.cache().contains(&key));

    let again = engine
        .complete(&model, Prompt::Tokens(tokens.clone()), opts.clone())
        .await
        .expect("fallback");
    assert_eq!(again.stats.cache_hit_kind, HitKind::Cold);
    let failure = again.stats.restore_failure.clone().expect("reported");
    assert_eq!(failure.source, HitSource::Exact);
    assert!(failure.reason.contains("position"), "{}", failure.reason);
    assert_eq!(again.tokens, cold.tokens, "the fallback is the cold answer");
    let counters = engine.cache().counters().snapshot();
    assert_eq!(counters["restore_failures"], 1);
    assert!(!engine.cache().contains(&key), "the row is removed");

    // Never retried: the next request is a plain miss.
    engine.evict(&model).await.expect("evict");
    let third = engine
        .complete(&model, Prompt::Tokens(tokens), opts)
        .await
        .expect("third");
    assert!(third.stats.restore_failure.is_none());
    assert_eq!(third.stats.cache_hit_kind, HitKind::Cold);
    assert_eq!(engine.cache().counters().snapshot()["restore_failures"], 1);
    engine.shutdown().await;
}
