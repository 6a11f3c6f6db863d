"""The peer side of ``erllama bench --peer llama-cpp-python``.

Runs under the Python of a separate venv that has llama-cpp-python (it does
not import erllama). For each prompt length: a cold completion of prompt A
(``max_tokens=1``), then B, then A again — alternating, so the repeat of A
must come from the cache, not from the context llama-cpp-python keeps — once
with ``LlamaRAMCache`` and once with ``LlamaDiskCache``. Prints JSON rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

PARAGRAPH = (
    "The history of the lighthouse is a story of engineering, weather and patience. "
    "Keepers climbed the stairs every evening to trim the wicks, polish the lenses and "
    "log the passing ships. "
)


def tokens_of(llm: Any, n: int, salt: int) -> list[int]:
    text = f"Document {salt}. " + PARAGRAPH * (n // 30 + 2)
    toks = llm.tokenize(text.encode())
    while len(toks) < n:
        text += PARAGRAPH
        toks = llm.tokenize(text.encode())
    return [int(t) for t in toks[:n]]


def timed(llm: Any, toks: list[int]) -> float:
    t0 = time.perf_counter()
    llm.create_completion(toks, max_tokens=1, temperature=0.0)
    return (time.perf_counter() - t0) * 1e3


def speed(model: str, tokens: list[int], decode: int, threads: int) -> None:
    """One prefill of ``tokens`` and ``decode`` greedy tokens; prints JSON.

    The same work as erllama's side of ``erllama bench --only speed``: the
    prompt in 512-token batches with logits for its last token only, then one
    token per decode, each chosen by argmax over the last logits.
    """
    import llama_cpp  # type: ignore[import-not-found]  # only in the peer venv
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=len(tokens) + decode + 16,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_logits() -> Any:
        # The logits of the last decoded token, read in place (llama.cpp's buffer).
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    llm.eval(tokens[:8])  # warm-up: first touch of weights and buffers
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    t1 = time.perf_counter()
    out = []
    for _ in range(decode):
        t = int(np.argmax(last_logits()))
        out.append(t)
        llm.eval([t])
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "version": f"llama-cpp-python {llama_cpp.__version__}",
                "prefill_tok_s": len(tokens) / (t1 - t0),
                "decode_tok_s": decode / (t2 - t1),
                "tokens": out,
            }
        )
    )


def main() -> None:
    import llama_cpp  # only in the peer venv (speed() carries the type: ignore)

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--speed-tokens", default=None, help="JSON token list: run speed() only")
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    if args.speed_tokens is not None:
        speed(args.model, json.loads(args.speed_tokens), args.decode, args.threads)
        return
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=max(args.sizes) + 64,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    rows = []
    for n in args.sizes:
        colds: list[float] = []
        rams: list[float] = []
        disks: list[float] = []
        for r in range(args.repeats):
            for kind in ("ram", "disk"):
                if kind == "ram":
                    llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=8 << 30))
                    tmp = None
                else:
                    tmp = tempfile.TemporaryDirectory(prefix="llama-cpp-disk-cache-")
                    llm.set_cache(llama_cpp.LlamaDiskCache(cache_dir=tmp.name))
                a = tokens_of(llm, n, salt=1000 * r + (1 if kind == "ram" else 2))
                b = tokens_of(llm, n, salt=1000 * r + 7 + (1 if kind == "ram" else 2))
                llm.reset()
                cold = timed(llm, a)
                timed(llm, b)
                warm = timed(llm, a)
                colds.append(cold)
                (rams if kind == "ram" else disks).append(warm)
                if tmp is not None:
                    tmp.cleanup()
        rows.append(
            {
                "version": f"llama-cpp-python {llama_cpp.__version__}",
                "prompt_tokens": n,
                "cold_ms": round(statistics.median(colds), 1),
                "ram_warm_ms": round(statistics.median(rams), 1),
                "disk_warm_ms": round(statistics.median(disks), 1),
            }
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
