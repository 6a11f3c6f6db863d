"""Prefill and decode speed of several builds of erllama, side by side in one run.

Each build is a Python interpreter with erllama installed (a venv), given as
``NAME=PYTHON`` or ``NAME=PYTHON@VARIANT`` (sets ``ERLLAMA_CPU_VARIANT``, to
pick one build inside a wheel with several). Every round runs one
measurement per build, each in a fresh process, in turn, so the builds share
the machine's state (frequency, cache, other load) as evenly as possible; the
table gives the median over rounds.

    python benches/builds.py --builds portable=/tmp/v3/bin/python \\
        native=/tmp/native/bin/python --rounds 5 --threads 2

Used for the README's table of the portable (x86-64-v3) wheel against a
``target-cpu=native`` build, and of OpenMP against ggml's own thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Runs inside each build's interpreter: one prefill of --prompt tokens, then
# --decode greedy tokens, reported as JSON.
PROBE = r"""
import json, sys, time
from erllama._erllama import Model, system_info
path = sys.argv[1]
n_prompt, n_decode, threads = (int(a) for a in sys.argv[2:5])
model = Model(path)
text = "The history of the lighthouse is a story of engineering, weather and patience. " * 400
tokens = model.tokenize(text)[:n_prompt]
ctx = model.new_context(n_ctx=n_prompt + n_decode + 8, n_batch=512, n_threads=threads)
ctx.prefill(tokens[:64])          # warm-up: first-touch of weights and buffers
ctx.clear()
t0 = time.perf_counter()
ctx.prefill(tokens)
t1 = time.perf_counter()
out = ctx.generate(n_decode)
t2 = time.perf_counter()
print(json.dumps({"prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": len(out) / (t2 - t1),
                  "system_info": system_info()}))
"""


def measure(python: str, model: str, prompt: int, decode: int, threads: int) -> dict[str, float]:
    env = dict(os.environ)
    if "@" in python:
        python, env["ERLLAMA_CPU_VARIANT"] = python.split("@", 1)
    out = subprocess.run(
        [python, "-c", PROBE, model, str(prompt), str(decode), str(threads)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", nargs="+", required=True, metavar="NAME=PYTHON")
    parser.add_argument("--model", default=None, help="GGUF file (default: the test model)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.model is None:
        from erllama.testmodel import fetch_test_model

        args.model = str(fetch_test_model())
    builds = dict(b.split("=", 1) for b in args.builds)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    for r in range(args.rounds):
        for name, python in builds.items():
            runs[name].append(measure(python, args.model, args.prompt, args.decode, args.threads))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    base = next(iter(builds))
    print(f"| build | prefill tok/s ({args.prompt}) | decode tok/s | vs {base} |")
    print("|---|---:|---:|---:|")
    med = {
        name: (
            statistics.median(x["prefill_tok_s"] for x in rs),
            statistics.median(x["decode_tok_s"] for x in rs),
        )
        for name, rs in runs.items()
    }
    for name, (p, d) in med.items():
        bp, bd = med[base]
        gain = f"prefill {p / bp - 1:+.0%}, decode {d / bd - 1:+.0%}"
        print(f"| {name} | {p:.0f} | {d:.1f} | {gain} |")


if __name__ == "__main__":
    main()
