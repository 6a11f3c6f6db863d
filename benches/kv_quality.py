"""What a quantized KV cache costs in quality, against f16.

For each of 50 chat prompts, the f16 context generates 64 greedy tokens;
each quantized context (q8_0, q4_0; K and V alike) is then fed the same
prompt and the same 64 tokens (teacher forcing), and at each position we
compare:

- greedy agreement: whether the quantized context's most likely next token
  is f16's;
- the chosen token's log-probability: mean |log p_q(t) - log p_f16(t)| over
  the 3 200 positions (t = f16's greedy token).

Also, free-running: how many of the 50 quantized greedy continuations are
identical to f16's over all 64 tokens, and the mean length of the common
prefix.

Run on an idle machine (llama.cpp's threads spin)::

    .venv/bin/python benches/kv_quality.py [--model PATH] [--threads 2]

numpy (a dev dependency) computes the log-softmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from erllama._erllama import Context, Model
from erllama.testmodel import fetch_test_model

TOPICS = [
    "lighthouses",
    "bread baking",
    "the water cycle",
    "chess openings",
    "volcanoes",
    "honeybees",
    "the printing press",
    "tides",
    "compound interest",
    "photosynthesis",
]
ASKS = [
    "Explain {} to a ten-year-old.",
    "Write three short facts about {}.",
    "What is the most common misconception about {}?",
    "Give a one-paragraph history of {}.",
    "List the steps someone would follow to learn about {}.",
]
N_PROMPTS = 50
N_TOKENS = 64


def log_softmax(logits: list[float]) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    out: np.ndarray = x - m - np.log(np.exp(x - m).sum())
    return out


def context(model: Model, kv: str, threads: int) -> Context:
    return model.new_context(
        n_ctx=1024, n_batch=512, n_threads=threads, cache_type_k=kv, cache_type_v=kv
    )


def reference(ctx: Context, prompt: list[int]) -> tuple[list[int], list[float]]:
    """f16's greedy tokens and their log-probabilities."""
    ctx.clear()
    ctx.prefill(prompt)
    tokens, lps = [], []
    for _ in range(N_TOKENS):
        lp = log_softmax(ctx.logits())
        t = int(lp.argmax())
        tokens.append(t)
        lps.append(float(lp[t]))
        ctx.prefill([t])
    return tokens, lps


def forced(ctx: Context, prompt: list[int], tokens: list[int]) -> tuple[int, list[float]]:
    """Agreements and log-probabilities of f16's tokens under ``ctx``."""
    ctx.clear()
    ctx.prefill(prompt)
    agree, lps = 0, []
    for t in tokens:
        lp = log_softmax(ctx.logits())
        agree += int(lp.argmax()) == t
        lps.append(float(lp[t]))
        ctx.prefill([t])
    return agree, lps


def free_run(ctx: Context, prompt: list[int]) -> list[int]:
    ctx.clear()
    ctx.prefill(prompt)
    # Past an end-of-generation token too, as the reference does.
    return [ctx.decode_one() for _ in range(N_TOKENS)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or fetch_test_model()
    model = Model(str(path))
    prompts = [
        model.chat_tokens([("user", ask.format(topic))], add_assistant=True)
        for topic in TOPICS
        for ask in ASKS
    ][:N_PROMPTS]
    t0 = time.perf_counter()
    base = context(model, "f16", args.threads)
    refs = [reference(base, p) for p in prompts]
    del base
    results = {}
    for kv in ("q8_0", "q4_0"):
        ctx = context(model, kv, args.threads)
        agree, diffs, same, common = 0, [], 0, []
        for p, (toks, lps) in zip(prompts, refs, strict=True):
            a, q_lps = forced(ctx, p, toks)
            agree += a
            diffs += [abs(x - y) for x, y in zip(q_lps, lps, strict=True)]
            run = free_run(ctx, p)
            n = next(
                (i for i, (x, y) in enumerate(zip(run, toks, strict=True)) if x != y), len(toks)
            )
            common.append(n)
            same += n == len(toks)
        results[kv] = {
            "greedy_agreement_pct": round(100 * agree / (N_PROMPTS * N_TOKENS), 2),
            "mean_abs_logprob_diff": round(float(np.mean(diffs)), 4),
            "max_abs_logprob_diff": round(float(np.max(diffs)), 3),
            "identical_continuations": f"{same}/{N_PROMPTS}",
            "mean_common_prefix_tokens": round(float(np.mean(common)), 1),
        }
        print(f"[kv_quality] {kv}: {results[kv]}", file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "model": path.name,
                "prompts": N_PROMPTS,
                "tokens": N_TOKENS,
                "threads": args.threads,
                "seconds": round(time.perf_counter() - t0, 1),
                "vs_f16": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
