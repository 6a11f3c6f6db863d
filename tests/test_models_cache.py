"""The cache's promise on both test models: a hit gives the cold completion.

SmolLM2-135M is a plain full-attention transformer; Gemma 3 270M is a
sliding-window (iSWA) model whose state has two memory sections, the
full-attention layers and the sliding-window layers, the latter holding only
the last 512 positions. The prompts here are longer than that window, so the
sliding section of every saved row is a strict suffix of the sequence.

For each model and tier: exact, longest-prefix and ``parent_key`` resume hits,
and a new process over the same files, all give exactly what a model that
never caches gives, and no restore ever fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import erllama

pytestmark = [pytest.mark.asyncio, pytest.mark.real_model]

ALIGN = 256
POLICY = erllama.Policy(
    min_tokens=64,
    cold_min_tokens=64,
    boundary_trim_tokens=0,
    boundary_align_tokens=ALIGN,
    session_resume_wait_ms=5000,
)
# Saves nothing: every request of a reference engine is a cold prefill.
NEVER = erllama.Policy(
    min_tokens=1 << 30,
    cold_min_tokens=1 << 30,
    cold_max_tokens=1 << 30,
    boundary_align_tokens=ALIGN,
)
MAX_TOKENS = 12
LOAD = {"n_ctx": 2048, "n_batch": 256, "n_threads": 2}

FACTS = " ".join(
    f"Station {i} on the northern line opened in {1870 + 3 * i} and serves {i % 7 + 2} "
    f"platforms, with the {['east', 'west', 'north', 'south'][i % 4]} entrance closed on "
    "Sundays."
    for i in range(40)
)


def _prompt_tokens(model_tokens: Sequence[int], n: int) -> list[int]:
    assert len(model_tokens) >= n, "the fact text is too short for this model"
    return list(model_tokens[:n])


@pytest.fixture(params=["smollm2", "gemma3-270m"])
def model_file(request: pytest.FixtureRequest) -> Path:
    fixture = "model_path" if request.param == "smollm2" else "gemma_path"
    path: Path = request.getfixturevalue(fixture)
    return path


async def _reference(model_file: Path, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """What a model that never caches answers to each prompt."""
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(model_file, **LOAD)  # type: ignore[arg-type]
        out = []
        for p in prompts:
            r = await model.complete(list(p), max_tokens=MAX_TOKENS)
            assert r.stats.cache_hit_kind == "cold"
            out.append(r.tokens)
            # Nothing kept warm for the next prompt to share.
            await model.evict()
        assert engine.cache.counters()["saves_cold"] == 0
        return out


async def _continued(model_file: Path, prompt: Sequence[int], turn2: Sequence[int]) -> list[int]:
    """What a model that never caches answers to the second turn of a chat,
    continuing in the sequence that answered the first (as llama.cpp's
    server continues in its slot): the first turn's output is in its KV as
    decoded, not as a prefill of the second prompt would compute it, which
    rounds differently."""
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(model_file, **LOAD)  # type: ignore[arg-type]
        await model.complete(list(prompt), max_tokens=MAX_TOKENS)
        r = await model.complete(list(turn2), max_tokens=MAX_TOKENS)
        assert r.stats.hit_source == "shared"
        assert r.stats.cached_tokens == len(prompt) + MAX_TOKENS - 1
        assert engine.cache.counters()["saves_cold"] == 0
        return list(r.tokens)


RESTART = r"""
import asyncio, json, sys
import erllama

async def main() -> None:
    path, tier, directory, tokens = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    cache = erllama.CacheConfig(**{f"{tier}_dir": directory})
    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64, boundary_trim_tokens=0,
                            boundary_align_tokens=256)
    async with erllama.Engine(cache=cache, policy=policy) as engine:
        model = await engine.load_model(path, n_ctx=2048, n_batch=256, n_threads=2, tier=tier)
        r = await model.complete(tokens, max_tokens=12)
        print(json.dumps({"tokens": list(r.tokens), "kind": r.stats.cache_hit_kind,
                          "counters": engine.cache.counters()}))

asyncio.run(main())
"""


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
async def test_hits_give_the_cold_completion(model_file: Path, tier: str, tmp_path: Path) -> None:
    directory = tmp_path / tier
    cache = erllama.CacheConfig(
        ram_file_dir=directory if tier == "ram_file" else None,
        disk_dir=directory if tier == "disk" else None,
    )
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(model_file, tier=tier, **LOAD)  # type: ignore[arg-type]
        info = model.info()
        assert info.cacheable, info.cache_reason
        facts = await model.tokenize(FACTS)
        # 600 tokens: longer than Gemma's 512-token window.
        prompt = _prompt_tokens(facts, 600)
        # Shares the first 512 tokens (two aligned prefixes) with `prompt`.
        other = [*prompt[:530], *await model.tokenize(" Which station opened last?", add_bos=False)]

        first = await model.complete(prompt, max_tokens=MAX_TOKENS)
        assert first.stats.cache_hit_kind == "cold"
        assert engine.cache.settle()
        turn2 = [
            *prompt,
            *first.tokens,
            *await model.tokenize(" And the first one?", add_bos=False),
        ]
        if info.memory == "kv_iswa":
            # A restored sliding-window row holds only the window, in fewer
            # cells than the live sequence it was saved from, so attention
            # splits its cells otherwise than the live continuation; it
            # gives the tokens of the second prompt computed cold.
            ref_prompt, ref_other, ref_turn2 = await _reference(model_file, [prompt, other, turn2])
        else:
            ref_prompt, ref_other = await _reference(model_file, [prompt, other])
            ref_turn2 = await _continued(model_file, prompt, turn2)
        assert first.tokens == ref_prompt

        # No warm sequence to take over: the hit comes from the tier.
        await model.evict()
        exact = await model.complete(prompt, max_tokens=MAX_TOKENS)
        assert (exact.stats.cache_hit_kind, exact.stats.hit_source) == ("exact", "exact")
        assert exact.stats.cache_tier == tier
        assert exact.tokens == ref_prompt

        await model.evict()
        prefix = await model.complete(other, max_tokens=MAX_TOKENS)
        assert (prefix.stats.cache_hit_kind, prefix.stats.hit_source) == (
            "partial",
            "longest_prefix",
        )
        assert prefix.stats.cached_tokens == 512
        assert prefix.tokens == ref_other

        await model.evict()
        resumed = await model.complete(turn2, max_tokens=MAX_TOKENS, parent_key=first.finish_key)
        assert resumed.stats.hit_source == "resume"
        # The finish row holds all but the last generated token (never fed).
        assert resumed.stats.cached_tokens == len(prompt) + len(first.tokens) - 1
        assert resumed.tokens == ref_turn2

        counters = engine.cache.counters()
        assert counters["restore_failures"] == 0
        assert counters["corrupt_files"] == 0
        assert engine.cache.settle()

    if tier == "ram":
        return
    # A new process over the same files: the exact row is a hit there too.
    proc = subprocess.run(
        [sys.executable, "-c", RESTART, str(model_file), tier, str(directory), json.dumps(prompt)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["kind"] == "exact"
    assert again["tokens"] == ref_prompt
    assert again["counters"]["restore_failures"] == 0


async def test_model_info_reports_the_memory_kind(model_path: Path, gemma_path: Path) -> None:
    async with erllama.Engine() as engine:
        smol = await engine.load_model(model_path, **LOAD)  # type: ignore[arg-type]
        gemma = await engine.load_model(gemma_path, **LOAD)  # type: ignore[arg-type]
        assert (smol.info().memory, smol.info().cacheable) == ("kv", True)
        assert (gemma.info().memory, gemma.info().cacheable) == ("kv_iswa", True)
        assert gemma.info().cache_reason is None
    low = erllama.LlamaModel(str(gemma_path)).info()
    assert (low.memory, low.cacheable, low.n_swa) == ("kv_iswa", True, 512)


async def test_a_recurrent_model_is_refused_at_load_and_saves_nothing(tmp_path: Path) -> None:
    from recurrent_fixture import write_tiny_mamba

    path = write_tiny_mamba(tmp_path / "mamba.gguf")
    low = erllama.LlamaModel(str(path)).info()
    assert (low.memory, low.cacheable) == ("recurrent", False)
    assert "recurrent" in str(low.cache_reason)
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(path, tier="disk", n_ctx=512, n_batch=256, n_threads=2)
        info = model.info()
        assert (info.memory, info.cacheable) == ("recurrent", False)
        assert info.cache_reason is not None
        prompt = list(range(3, 200))
        first = await model.complete(prompt, max_tokens=4)
        second = await model.complete(prompt, max_tokens=4)
        assert first.tokens == second.tokens
        assert (first.stats.cache_hit_kind, second.stats.cache_hit_kind) == ("cold", "cold")
        assert first.finish_key is None
        assert engine.cache.settle()
        counters = engine.cache.counters()
        assert all(v == 0 for k, v in counters.items() if k.startswith(("saves_", "hits_")))
        assert counters["misses"] == 0
        assert list((tmp_path / "disk").iterdir()) == []
