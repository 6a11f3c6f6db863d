"""``erllama demo``: the cache at work on a real model, in four steps.

1. **cold** — a question under a long (~2000-token) system prompt: full
   prefill, then the prompt state is saved (to the disk tier) off the
   request path;
2. **warm** — the same request again: an exact hit, restored in
   milliseconds;
3. **follow-up** — the next chat turn, resumed from the state saved at the
   end of turn 1 (``parent_key``): only the new tokens are computed;
4. **restart** — a fresh process over the same cache directory: an exact
   hit from the files the first process wrote.

Each step reports time to first token, hit kind, cached tokens and the tier
that served it; the cache counters follow. Before steps 2 and 3 the model's
sequences are evicted: a finished request's sequence stays in memory and
the next request would simply take it over (hit source ``shared``), while
the demo shows what the cache tier gives once that memory is reused.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import erllama

__all__ = ["long_system_prompt", "run_demo"]

_FACTS = [
    "The lighthouse at {p} was built in {y} and its lamp can be seen {d} nautical miles out.",
    "Keeper {n} of {p} logged {k} storms during the winter of {y}.",
    "The fog signal at {p} sounds every {s} seconds and was last replaced in {y}.",
    "Ships passing {p} report the tide turning {t} minutes after the harbour clock.",
]
_PLACES = ["Northpoint", "Gull Rock", "Cape Mora", "Saltmarsh", "Iron Head", "Westbay"]
_NAMES = ["Ada", "Bram", "Cora", "Dov", "Elin", "Finn", "Greta", "Hale"]


def long_system_prompt(target_words: int = 1200, salt: str = "") -> str:
    """A deterministic, varied system prompt of about ``target_words`` words."""
    lines = [
        "You are the archivist of a coastal lighthouse society. Answer questions "
        f"about the records below briefly and precisely.{salt}"
    ]
    words = len(lines[0].split())
    i = 0
    while words < target_words:
        fact = _FACTS[i % len(_FACTS)].format(
            p=_PLACES[i % len(_PLACES)],
            y=1850 + (i * 7) % 150,
            d=10 + i % 20,
            n=_NAMES[i % len(_NAMES)],
            k=3 + i % 11,
            s=15 + i % 45,
            t=5 + i % 50,
        )
        lines.append(f"Record {i + 1}: {fact}")
        words += len(fact.split()) + 2
        i += 1
    return "\n".join(lines)


QUESTION = "When was the lighthouse at Cape Mora built?"
FOLLOW_UP = "And how often does its fog signal sound?"


@dataclass
class Step:
    """One row of the demo table."""

    name: str
    ttft_ms: float
    hit_kind: str
    cached_tokens: int
    prompt_tokens: int
    tier: str | None
    answer: str


async def _timed(
    model: erllama.Model, prompt: list[int], max_tokens: int, parent_key: str | None = None
) -> tuple[float, erllama.Completion]:
    start = time.perf_counter()
    stream = model.stream(prompt, max_tokens=max_tokens, parent_key=parent_key)
    first: float | None = None
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
    completion = stream.completion
    assert completion is not None
    ttft = ((first or time.perf_counter()) - start) * 1e3
    return ttft, completion


def _step(name: str, ttft: float, c: erllama.Completion) -> Step:
    return Step(
        name=name,
        ttft_ms=ttft,
        hit_kind=c.stats.cache_hit_kind,
        cached_tokens=c.stats.cached_tokens,
        prompt_tokens=c.stats.prompt_tokens,
        tier=c.stats.cache_tier,
        answer=" ".join(c.text.split())[:60],
    )


async def _turns(
    model_path: Path, cache_dir: Path, threads: int | None, restart_only: bool
) -> tuple[list[Step], dict[str, int]]:
    cache = erllama.CacheConfig(disk_dir=cache_dir)
    async with erllama.Engine(cache=cache) as engine:
        model = await engine.load_model(model_path, n_ctx=4096, n_threads=threads, tier="disk")
        chat = await model.apply_chat_template(
            [{"role": "user", "content": QUESTION}], system=long_system_prompt()
        )
        steps = []
        if restart_only:
            ttft, c = await _timed(model, chat, max_tokens=24)
            steps.append(_step("restart (new process)", ttft, c))
        else:
            ttft, cold = await _timed(model, chat, max_tokens=24)
            steps.append(_step("cold", ttft, cold))
            engine.cache.settle()
            await model.evict()
            ttft, warm = await _timed(model, chat, max_tokens=24)
            steps.append(_step("warm (same request)", ttft, warm))
            engine.cache.settle()
            await model.evict()
            turn2 = await model.apply_chat_template(
                [
                    {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": cold.text},
                    {"role": "user", "content": FOLLOW_UP},
                ],
                system=long_system_prompt(),
            )
            ttft, follow = await _timed(model, turn2, max_tokens=24, parent_key=cold.finish_key)
            steps.append(_step("follow-up turn", ttft, follow))
        await engine.shutdown()
        return steps, engine.cache.counters()


def run_demo(
    *,
    model_path: Path,
    cache_dir: Path | None = None,
    threads: int | None = None,
    as_json: bool = False,
    keep: bool = False,
) -> int:
    """Runs the four steps and prints the table (or JSON); returns 0."""
    owned = cache_dir is None
    base = Path(tempfile.mkdtemp(prefix="erllama-demo-")) if cache_dir is None else cache_dir
    try:
        steps, counters = asyncio.run(_turns(model_path, base, threads, restart_only=False))
        # A fresh process over the same directory: the disk tier's files.
        cmd = [
            sys.executable,
            "-m",
            "erllama.demo",
            "--restart-child",
            os.fspath(model_path),
            os.fspath(base),
            str(threads or 0),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        child = json.loads(out.stdout)
        steps.append(Step(**child["step"]))
    finally:
        if owned and not keep:
            shutil.rmtree(base, ignore_errors=True)
    if as_json:
        print(
            json.dumps(
                {"steps": [s.__dict__ for s in steps], "counters": counters}, ensure_ascii=False
            )
        )
        return 0
    print(f"model {model_path.name}, cache {'(temporary)' if owned else base}")
    head = f"{'step':<24}{'TTFT':>10}  {'hit':<8}{'cached':>14}  {'tier':<6}  answer"
    print(head)
    print("-" * len(head))
    for s in steps:
        print(
            f"{s.name:<24}{s.ttft_ms:>8.0f} ms  {s.hit_kind:<8}"
            f"{s.cached_tokens:>6}/{s.prompt_tokens:<7}  {s.tier or '-':<6}  {s.answer}"
        )
    cold = steps[0].ttft_ms
    for s in steps[1:]:
        print(f"  {s.name}: {cold / max(s.ttft_ms, 1e-3):.0f}x faster than cold")
    shown = {k: v for k, v in counters.items() if v and not k.endswith("_ns")}
    print("counters:", ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return 0


def _child(argv: list[str]) -> None:
    model_path, cache_dir, threads = Path(argv[0]), Path(argv[1]), int(argv[2]) or None
    steps, _ = asyncio.run(_turns(model_path, cache_dir, threads, restart_only=True))
    print(json.dumps({"step": steps[0].__dict__}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--restart-child":
        _child(sys.argv[2:])
