"""Prefill and decode throughput of the llama.cpp backend on the test model.

Run with ``.venv/bin/python benches/prefill_decode.py`` after ``./dev build``.
Reports the median of ``--runs`` runs for each prompt length, plus the packed
KV state size per token and the pack / unpack time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from erllama._erllama import Model
from erllama.testmodel import fetch_test_model

PARAGRAPH = (
    "The history of the lighthouse is a story of engineering, weather and patience. "
    "Keepers climbed the stairs every evening to trim the wicks, polish the lenses and "
    "log the passing ships. "
)


def prompt_tokens(model: Model, n: int) -> list[int]:
    text = PARAGRAPH
    tokens = model.tokenize(text)
    while len(tokens) < n:
        text += PARAGRAPH
        tokens = model.tokenize(text)
    return tokens[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    model = Model(str(fetch_test_model()))
    rows = []
    for n in args.lengths:
        prefill, decode, pack, unpack = [], [], [], []
        size = 0
        for _ in range(args.runs):
            ctx = model.new_context(n_ctx=n + args.decode + 8, n_threads=args.threads)
            toks = prompt_tokens(model, n)
            t0 = time.perf_counter()
            ctx.prefill(toks)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            state = ctx.kv_pack()
            pack.append(time.perf_counter() - t0)
            size = len(state)
            t0 = time.perf_counter()
            ctx.generate(args.decode)
            decode.append(time.perf_counter() - t0)
            fresh = model.new_context(n_ctx=n + args.decode + 8, n_threads=args.threads)
            t0 = time.perf_counter()
            fresh.kv_unpack(state, toks)
            unpack.append(time.perf_counter() - t0)
        row = {
            "prompt_tokens": n,
            "prefill_tok_s": n / statistics.median(prefill),
            "decode_tok_s": args.decode / statistics.median(decode),
            "state_bytes": size,
            "state_bytes_per_token": size // n,
            "pack_ms": statistics.median(pack) * 1e3,
            "unpack_ms": statistics.median(unpack) * 1e3,
        }
        rows.append(row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
