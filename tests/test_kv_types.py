"""Quantized KV caches (real model: SmolLM2-135M, llama.cpp).

``cache_type_k`` / ``cache_type_v`` pick the KV cache's element types; the
types are part of every cache key, so rows of one type are never restored
into a model of another, and a hit under a quantized cache still gives that
model's cold output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import erllama
from cache_checks import cold_then_exact
from erllama.errors import InvalidInputError

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

TEXT = "The keeper logged every ship that passed, the weather at each watch and the lamp. "


async def _load(engine: erllama.Engine, path: Path, kv: str) -> erllama.Model:
    return await engine.load_model(
        path,
        n_ctx=1024,
        n_batch=64,
        n_threads=2,
        tier="disk",
        cache_type_k=kv,  # type: ignore[arg-type]
        cache_type_v=kv,  # type: ignore[arg-type]
    )


async def test_rows_of_one_kv_type_never_serve_another(model_path: Path, tmp_path: Path) -> None:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    answers: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    seen: set[str] = set()
    for kv in ("f16", "q8_0", "q4_0"):
        async with erllama.Engine(cache=cache, policy=POLICY) as engine:
            model = await _load(engine, model_path, kv)
            prompt = (await model.tokenize(TEXT * 12))[:200]
            # Another type's row of this very prompt is on disk: not a hit.
            answers[kv] = await cold_then_exact(engine, model, prompt, kv)
            # This type's row of the prompt: a key of its own.
            (row,) = [
                r for r in engine.cache.dump() if r.tokens == len(prompt) and r.key not in seen
            ]
            seen.add(row.key)
            sizes[kv] = row.size
    # One row per type, each smaller than the last.
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]
    # And each type still hits its own row.
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await _load(engine, model_path, "f16")
        prompt = (await model.tokenize(TEXT * 12))[:200]
        again = await model.complete(prompt, max_tokens=12)
        assert again.stats.cache_hit_kind == "exact"
        assert again.tokens == answers["f16"]


async def test_a_bad_kv_type_is_refused(model_path: Path) -> None:
    async with erllama.Engine() as engine:
        with pytest.raises(InvalidInputError, match="cache_type_v must be one of"):
            await engine.load_model(model_path, cache_type_v="q3_k")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="cache_type_k"):
            await engine.load_model(model_path, cache_type_k=8)  # type: ignore[arg-type]
