//! LoRA adapters on the real test model (SmolLM2-135M-Instruct Q4_1): a
//! random adapter written by `tests/lora_fixture.py` changes greedy output,
//! removing it (or scale 0) restores it exactly, and files that are not an
//! adapter of this model are errors, never a crash.
//!
//! The model path comes from `ERLLAMA_TEST_MODEL`, else the default model
//! cache. The fixture runs under `ERLLAMA_PYTHON`, else the repository's
//! `.venv/bin/python`, else `python3`, and needs the `gguf` package
//! (requirements-dev.txt). These tests never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use erllama_engine::{
    AdapterHandle, Backend, BackendContext, BackendError, ContextParams, SamplingParams,
};
use erllama_llama::{
    LlamaContextBackend, LlamaError, LoraAdapter, Model, ModelParams, Session, SessionParams,
};

mod common;
use common::{backend, decode_one, model_path};

const N: usize = 24;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ERLLAMA_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("python3")
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("erllama-lora-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    })
}

/// Runs the fixture; `extra` are more CLI arguments.
fn make_adapter(name: &str, extra: &[&str]) -> PathBuf {
    let out = scratch().join(name);
    let py = python();
    let result = Command::new(&py)
        .arg(repo_root().join("tests/lora_fixture.py"))
        .arg("--model")
        .arg(model_path())
        .arg("--out")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (set ERLLAMA_PYTHON to a Python with the dev requirements): {e}",
                py.display()
            )
        });
    assert!(
        result.status.success(),
        "tests/lora_fixture.py failed under {} ({}); the LoRA tests need the `gguf` package \
         from requirements-dev.txt (set ERLLAMA_PYTHON to a Python that has it):\n{}",
        py.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(out.is_file(), "the fixture wrote no {}", out.display());
    out
}

fn adapter_path() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| make_adapter("adapter.gguf", &[]))
}

const N_BATCH: usize = 128;

fn ctx() -> Box<dyn BackendContext> {
    backend()
        .new_context(&ContextParams {
            n_ctx: 512,
            n_batch: N_BATCH,
            n_threads: None,
            n_seq: 4,
            ..ContextParams::default()
        })
        .expect("context")
}

/// Prefills `tokens` into `seq` as the engine does.
fn prefill(ctx: &mut dyn BackendContext, seq: usize, tokens: &[u32]) {
    common::prefill(ctx, seq, tokens, N_BATCH).expect("prefill");
}

fn prompt() -> Vec<u32> {
    backend()
        .chat_tokens(
            &[(
                "user".into(),
                "Name three colours of the rainbow.".to_string(),
            )],
            true,
        )
        .expect("chat tokens")
}

/// One greedy request on sequence 0, as the engine runs it: adapters,
/// clear, prefill, decode.
fn run(ctx: &mut dyn BackendContext, adapters: &[(AdapterHandle, f32)]) -> Vec<u32> {
    ctx.set_adapters(adapters).expect("set_adapters");
    ctx.set_sampling(0, &SamplingParams::default())
        .expect("sampling");
    ctx.clear(0);
    prefill(ctx, 0, &prompt());
    let mut out = Vec::new();
    while out.len() < N {
        let t = decode_one(ctx, 0).expect("decode");
        out.push(t);
        if ctx.is_eog(t).unwrap() {
            break;
        }
    }
    out
}

fn text(tokens: &[u32]) -> String {
    backend().detokenize(tokens).expect("detokenize")
}

#[test]
fn an_adapter_changes_greedy_output_and_removing_it_restores_it() {
    let handle = backend()
        .load_adapter(adapter_path())
        .expect("load adapter");
    let lora = handle.downcast_ref::<LoraAdapter>().expect("a LoraAdapter");
    assert_eq!(lora.alpha(), Some(4.0));
    assert_eq!(lora.path(), adapter_path());
    let mut c = ctx();

    let base = run(c.as_mut(), &[]);
    assert!(base.len() > 4, "base output too short: {:?}", text(&base));
    let adapted = run(c.as_mut(), &[(handle.clone(), 1.0)]);
    assert_ne!(
        base,
        adapted,
        "the adapter did not change the output: {:?}",
        text(&base)
    );
    // The same adapter again is deterministic.
    assert_eq!(run(c.as_mut(), &[(handle.clone(), 1.0)]), adapted);
    // Removing it restores the base output exactly.
    assert_eq!(run(c.as_mut(), &[]), base);
    // Scale 0 is the same as no adapter.
    assert_eq!(run(c.as_mut(), &[(handle.clone(), 0.0)]), base);
    // A smaller scale is yet another output, and back again.
    let half = run(c.as_mut(), &[(handle.clone(), 0.25)]);
    assert_ne!(half, adapted);
    assert_eq!(run(c.as_mut(), &[(handle.clone(), 1.0)]), adapted);

    // A fresh context with the adapter matches the reused one, and the
    // first context is untouched by it.
    let mut c2 = ctx();
    assert_eq!(run(c2.as_mut(), &[(handle.clone(), 1.0)]), adapted);
    assert_eq!(run(c.as_mut(), &[]), base);
}

#[test]
fn changing_adapters_clears_the_sequence() {
    let handle = backend()
        .load_adapter(adapter_path())
        .expect("load adapter");
    let mut c = ctx();
    let filled = |c: &dyn BackendContext| {
        (0..c.n_seq())
            .map(|s| c.tokens(s).len())
            .collect::<Vec<_>>()
    };
    let p = prompt();
    prefill(c.as_mut(), 0, &p);
    prefill(c.as_mut(), 2, &p[..p.len() / 2]);
    assert_eq!(filled(c.as_ref()), [p.len(), 0, p.len() / 2, 0]);
    // No change: the sequences stay.
    c.set_adapters(&[]).expect("no adapters");
    assert_eq!(filled(c.as_ref()), [p.len(), 0, p.len() / 2, 0]);
    c.set_adapters(&[(handle.clone(), 1.0)]).expect("set");
    assert_eq!(
        filled(c.as_ref()),
        [0; 4],
        "stale KV must not survive in any sequence"
    );
    prefill(c.as_mut(), 0, &p);
    prefill(c.as_mut(), 3, &p);
    c.set_adapters(&[(handle.clone(), 1.0)])
        .expect("same again");
    assert_eq!(filled(c.as_ref()), [p.len(), 0, 0, p.len()]);
    c.set_adapters(&[(handle, 0.0)]).expect("scale 0");
    assert_eq!(filled(c.as_ref()), [0; 4]);
}

#[test]
fn bad_adapter_lists_are_errors_and_change_nothing() {
    let a = backend().load_adapter(adapter_path()).expect("load a");
    let b = backend().load_adapter(adapter_path()).expect("load b");
    let mut c = ctx();
    let base = run(c.as_mut(), &[]);
    let adapted = run(c.as_mut(), &[(a.clone(), 1.0)]);

    let err = c
        .set_adapters(&[(a.clone(), 1.0), (b.clone(), 0.5)])
        .unwrap_err();
    assert!(matches!(err, BackendError::NotSupported(_)), "{err}");
    assert!(err.to_string().contains("one at a time"), "{err}");
    let err = c
        .set_adapters(&[(a.clone(), 1.0), (a.clone(), 1.0)])
        .unwrap_err();
    assert!(matches!(err, BackendError::NotSupported(_)), "{err}");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = c.set_adapters(&[(a.clone(), bad)]).unwrap_err();
        assert!(matches!(err, BackendError::InvalidInput(_)), "{err}");
    }
    let foreign: AdapterHandle = Arc::new(7u32);
    let err = c.set_adapters(&[(foreign, 0.0)]).unwrap_err();
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err}");
    // None of that changed the applied adapter.
    let again = {
        c.set_sampling(0, &SamplingParams::default()).unwrap();
        c.clear(0);
        prefill(c.as_mut(), 0, &prompt());
        (0..adapted.len())
            .map(|_| decode_one(c.as_mut(), 0).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(again, adapted);

    // One active adapter among zero-scale ones is fine: b at scale 1.
    let with_b = run(c.as_mut(), &[(a.clone(), 0.0), (b.clone(), 1.0)]);
    assert_eq!(with_b, adapted, "the same file loaded twice acts the same");
    assert_eq!(run(c.as_mut(), &[(a, 0.0), (b, 0.0)]), base);
}

#[test]
fn files_that_are_not_adapters_of_this_model_are_errors() {
    let dir = scratch();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"definitely not a GGUF file").unwrap();
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    // A GGUF whose general.type has the wrong type: llama.cpp would abort
    // on it.
    let bad_kv = dir.join("bad-kv.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    let key = b"general.type";
    bytes.extend((key.len() as u64).to_le_bytes());
    bytes.extend(key);
    bytes.extend(4u32.to_le_bytes());
    bytes.extend(5u32.to_le_bytes());
    std::fs::write(&bad_kv, &bytes).unwrap();
    // A truncated copy of a real adapter.
    let truncated = dir.join("truncated.gguf");
    let full = std::fs::read(adapter_path()).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let wrong_arch = make_adapter("qwen2.gguf", &["--architecture", "qwen2"]);
    let wrong_target = make_adapter("wrong-target.gguf", &["--targets", "attn_q"]);
    // A valid adapter whose tensors name weights the model lacks
    // (`attn_q` renamed to `attn_x` in the bytes): llama.cpp rejects it.
    let missing_tensor = dir.join("missing-tensor.gguf");
    let patched = replace_all(
        &std::fs::read(&wrong_target).unwrap(),
        b"attn_q.weight",
        b"attn_x.weight",
    );
    std::fs::write(&missing_tensor, patched).unwrap();

    let cases: Vec<(PathBuf, &str)> = vec![
        (dir.join("missing.gguf"), "file not found"),
        (dir.to_path_buf(), "not a regular file"),
        (junk, "not a GGUF file"),
        (empty, "not a GGUF file"),
        (model_path(), "not an adapter"),
        (bad_kv, "must be a string"),
        (truncated, "rejected"),
        (wrong_arch, "architecture"),
        (missing_tensor, "rejected"),
    ];
    for (path, want) in cases {
        let err = backend().load_adapter(&path).unwrap_err();
        assert!(
            matches!(err, BackendError::InvalidInput(_)),
            "{}: {err}",
            path.display()
        );
        assert!(
            err.to_string().contains(want),
            "{}: {err:?} should mention {want:?}",
            path.display()
        );
        let err = backend().model().load_lora(&path).unwrap_err();
        assert!(matches!(err, LlamaError::LoraLoad { .. }), "{err}");
    }
    // The model still works, and a good adapter still loads.
    assert!(backend().model().load_lora(&wrong_target).is_ok());
    let mut c = ctx();
    assert!(!run(c.as_mut(), &[]).is_empty());
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = haystack.to_vec();
    let mut i = 0;
    let mut n = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
            n += 1;
        } else {
            i += 1;
        }
    }
    assert!(n > 0, "nothing to replace");
    out
}

#[test]
fn sessions_keep_their_adapter_alive_and_reject_other_models() {
    let model = backend().model().clone();
    let lora = model.load_lora(adapter_path()).expect("load");
    assert!(lora.belongs_to(&model));
    let params = SessionParams {
        n_ctx: 512,
        n_batch: 128,
        ..SessionParams::default()
    };
    let mut session = Session::new(&model, &params).expect("session");
    let toks = prompt();
    session.prefill(&toks).unwrap();
    let base = session.generate(N).unwrap();

    session.set_lora(Some((&lora, 1.0))).unwrap();
    assert!(session.tokens().is_empty());
    assert_eq!(session.lora().map(|(_, s)| s), Some(1.0));
    // Drop every other handle: the session keeps the adapter alive.
    drop(lora);
    session.prefill(&toks).unwrap();
    let adapted = session.generate(N).unwrap();
    assert_ne!(adapted, base);
    session.set_lora(None).unwrap();
    assert!(session.lora().is_none());
    session.prefill(&toks).unwrap();
    assert_eq!(session.generate(N).unwrap(), base);

    // Through the engine wrapper too.
    let mut wrapped = LlamaContextBackend::new(session);
    assert!(wrapped.set_adapters(&[]).is_ok());

    // Another load of the same file is another model: its adapters do not
    // apply here, and ours do not apply there.
    let other = Model::load(model_path(), &ModelParams::default()).expect("second load");
    let other_lora = other.load_lora(adapter_path()).expect("load for other");
    assert!(!other_lora.belongs_to(&model));
    let mut session = Session::new(&model, &params).expect("session");
    let err = session.set_lora(Some((&other_lora, 1.0))).unwrap_err();
    assert!(matches!(err, LlamaError::InvalidParam { .. }), "{err}");
    let err = session.set_lora(Some((&other_lora, f32::NAN))).unwrap_err();
    assert!(matches!(err, LlamaError::InvalidParam { .. }), "{err}");
    let handle: AdapterHandle = Arc::new(other_lora);
    let err = wrapped.set_adapters(&[(handle, 1.0)]).unwrap_err();
    assert!(matches!(err, BackendError::InvalidInput(_)), "{err}");
    // Dropping the other model's adapter after its model handle is gone
    // is fine: the adapter holds the model.
    drop(other);
}

#[test]
fn adapters_load_and_apply_from_several_threads() {
    let path = adapter_path().to_path_buf();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let handle = backend().load_adapter(&path).expect("load");
                let mut c = ctx();
                let scale = if i % 2 == 0 { 1.0 } else { 0.0 };
                let out = run(c.as_mut(), &[(handle, scale)]);
                (i, out)
            })
        })
        .collect();
    let outs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let even: Vec<_> = outs.iter().filter(|(i, _)| i % 2 == 0).collect();
    let odd: Vec<_> = outs.iter().filter(|(i, _)| i % 2 == 1).collect();
    assert_eq!(even[0].1, even[1].1);
    assert_eq!(odd[0].1, odd[1].1);
    assert_ne!(even[0].1, odd[0].1);
}
