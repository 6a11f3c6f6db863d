"""Cold versus warm time to first token, per cache tier, on the real model.

Run with ``.venv/bin/python benches/ttft.py`` after ``./dev build`` (the
README's ``./dev bench`` does both). For each tier (``ram``, ``ram_file`` under
/dev/shm, ``disk`` under a temp directory on the same file system as the
target directory) and each prompt length, a model whose saves go to that tier
completes a fresh prompt with ``max_tokens=1`` (cold: prefill, then the prompt
state is packed and saved off the request path), waits for the save to land,
and completes the same prompt again (warm: an exact hit restored from that
tier). Time to first token is the wall time of the whole ``complete`` call as
a client sees it. Ratios are measured side by side in one run; each figure is
the median of ``--repeats`` runs (cold runs use a different prompt each time).

Also reported: the restore time inside the warm request, the pack time the
cold request paid on its own path (to compare with the prefill it saves), and
the state size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import erllama
from erllama.testmodel import fetch_test_model

PARAGRAPH = (
    "The history of the lighthouse is a story of engineering, weather and patience. "
    "Keepers climbed the stairs every evening to trim the wicks, polish the lenses and "
    "log the passing ships. "
)


async def prompt_tokens(model: erllama.Model, n: int, salt: int) -> list[int]:
    text = f"Document {salt}. " + PARAGRAPH * (n // 30 + 2)
    tokens = await model.tokenize(text)
    while len(tokens) < n:
        text += PARAGRAPH
        tokens = await model.tokenize(text)
    return tokens[:n]


async def timed(model: erllama.Model, tokens: list[int]) -> tuple[float, erllama.Completion]:
    t0 = time.perf_counter()
    result = await model.complete(tokens, max_tokens=1)
    return (time.perf_counter() - t0) * 1e3, result


async def bench_tier(
    tier: str,
    sizes: list[int],
    repeats: int,
    threads: int | None,
    root: Path,
    path: Path,
) -> list[dict[str, Any]]:
    cache = erllama.CacheConfig(
        ram_quota=8 << 30,
        ram_file_dir=root / "shm" if tier == "ram_file" else None,
        disk_dir=root / "disk" if tier == "disk" else None,
        ram_file_quota=8 << 30,
        disk_quota=32 << 30,
    )
    rows = []
    async with erllama.Engine(cache=cache) as engine:
        model = await engine.load_model(
            path,
            n_ctx=max(sizes) + 64,
            n_batch=512,
            n_threads=threads,
            tier=tier,  # type: ignore[arg-type]
        )
        for n in sizes:
            cold_ms, warm_ms, restore_ms, pack_ms, prefill_ms = [], [], [], [], []
            state_bytes = 0
            for r in range(repeats):
                tokens = await prompt_tokens(model, n, salt=r * 1000 + n)
                pack0 = engine.cache.counters()["pack_total_ns"]
                t_cold, cold = await timed(model, tokens)
                pack1 = engine.cache.counters()["pack_total_ns"]
                assert cold.stats.cache_hit_kind == "cold", cold.stats
                if not engine.cache.settle(120):
                    raise RuntimeError("saves did not land")
                rows_now = {row["key"]: row for row in engine.cache.dump()}
                t_warm, warm = await timed(model, tokens)
                assert warm.stats.cache_hit_kind == "exact", warm.stats
                assert warm.stats.cache_tier == tier
                assert warm.tokens == cold.tokens, "a hit must not change the output"
                cold_ms.append(t_cold)
                warm_ms.append(t_warm)
                restore_ms.append(warm.stats.restore_ms)
                prefill_ms.append(cold.stats.prefill_ms)
                pack_ms.append((pack1 - pack0) / 1e6)
                state_bytes = max(
                    (row["size"] for row in rows_now.values() if row["tokens"] == n), default=0
                )
                engine.cache.gc()
            cold_m = statistics.median(cold_ms)
            warm_m = statistics.median(warm_ms)
            rows.append(
                {
                    "tier": tier,
                    "prompt_tokens": n,
                    "cold_ms": round(cold_m, 1),
                    "warm_ms": round(warm_m, 1),
                    "speedup": round(cold_m / warm_m, 1),
                    "restore_ms": round(statistics.median(restore_ms), 1),
                    "pack_ms": round(statistics.median(pack_ms), 1),
                    "pack_pct_of_prefill": round(
                        100 * statistics.median(pack_ms) / statistics.median(prefill_ms), 2
                    ),
                    "state_mb": round(state_bytes / 1e6, 1),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| tier | prompt | cold TTFT | warm TTFT | speed-up | restore "
        "| pack (% of prefill) | state |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['tier']} | {r['prompt_tokens']} | {r['cold_ms'] / 1e3:.2f} s | "
            f"{r['warm_ms']:.0f} ms | {r['speedup']:.0f}x | {r['restore_ms']:.0f} ms | "
            f"{r['pack_ms']:.0f} ms ({r['pack_pct_of_prefill']:.1f} %) | {r['state_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--tiers", nargs="+", default=["ram", "ram_file", "disk"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()

    path = fetch_test_model()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix="erllama-ttft-", dir=shm))
    disk_root = Path(tempfile.mkdtemp(prefix="erllama-ttft-"))
    try:
        rows: list[dict[str, Any]] = []
        for tier in args.tiers:
            base = disk_root if tier == "disk" else root
            rows += asyncio.run(
                bench_tier(tier, args.sizes, args.repeats, args.threads, base, path)
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(disk_root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown CPU",
        )
        print(f"{cpu}, {os.cpu_count()} cores, threads={args.threads or 'all'}")
        print(table(rows))


if __name__ == "__main__":
    main()
