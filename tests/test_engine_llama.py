"""The asyncio engine on the real model (SmolLM2-135M, llama.cpp).

The point of the product: a completion served from the cache is the very
completion a cold prefill gives, on every tier, and the engine survives bad
input. Prompts are a few hundred tokens so the suite stays quick on a CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import erllama
from erllama.errors import (
    ContextOverflowError,
    EmptyInputError,
    GrammarError,
    ModelFileNotFoundError,
    ModelLoadError,
    TokenOutOfRangeError,
)

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(
    min_tokens=64,
    cold_min_tokens=64,
    boundary_trim_tokens=8,
    boundary_align_tokens=64,
    session_resume_wait_ms=5000,
)

SYSTEM = (
    "You are a careful assistant. Answer briefly and precisely. "
    "Here are some facts about the solar system. "
    + " ".join(
        f"Fact {i}: planet number {i % 8 + 1} has {i % 5 + 1} notable features." for i in range(18)
    )
)


@pytest_asyncio.fixture
async def engine(tmp_path: Path) -> AsyncIterator[erllama.Engine]:
    cache = erllama.CacheConfig(ram_file_dir=tmp_path / "shm", disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as e:
        yield e


async def load(engine: erllama.Engine, path: Path, tier: str = "ram") -> erllama.Model:
    return await engine.load_model(path, n_ctx=2048, n_batch=256, n_threads=2, tier=tier)  # type: ignore[arg-type]


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
async def test_a_cache_hit_gives_the_cold_completion(
    engine: erllama.Engine, model_path: Path, tier: str
) -> None:
    model = await load(engine, model_path, tier)
    prompts = [
        SYSTEM + " Question: which planet is number 3?",
        SYSTEM + " Question: name one feature of planet 5.",
    ]
    for prompt in prompts:
        await model.evict()
        cold = await model.complete(prompt, max_tokens=12)
        assert cold.stats.cache_hit_kind in ("cold", "partial")
        assert engine.cache.settle()
        # The finished sequence, kept warm and taken over.
        shared = await model.complete(prompt, max_tokens=12)
        assert (shared.stats.cache_hit_kind, shared.stats.hit_source) == ("exact", "shared")
        assert shared.tokens == cold.tokens
        # The cached row, once the sequences are gone.
        await model.evict()
        warm = await model.complete(prompt, max_tokens=12)
        assert warm.stats.cache_hit_kind == "exact"
        assert warm.stats.cache_tier == tier
        assert warm.stats.cached_tokens == warm.stats.prompt_tokens
        assert warm.tokens == cold.tokens
        assert warm.text == cold.text
    # The second prompt shares the system prompt: a longest-prefix hit.
    counters = engine.cache.counters()
    assert counters["hits_exact"] == 2
    assert counters["hits_shared"] == 2
    assert counters["hits_longest_prefix"] >= 1
    assert counters[f"bytes_{tier}"] > 0


async def test_resume_a_chat_turn(engine: erllama.Engine, model_path: Path) -> None:
    model = await load(engine, model_path, "disk")
    turn1 = await model.apply_chat_template(
        [{"role": "user", "content": "Which planet is number 3?"}], system=SYSTEM
    )
    r1 = await model.complete(turn1, max_tokens=10)
    assert r1.finish_key is not None
    follow = await model.tokenize(" Thanks. And number 4?", add_bos=False)
    turn2 = [*turn1, *r1.tokens, *follow]
    # Turn 1's sequence, kept warm, is taken over and continued.
    shared = await model.complete(turn2, max_tokens=10, parent_key=r1.finish_key)
    assert shared.stats.hit_source == "shared"
    assert shared.stats.cached_tokens == len(turn1) + len(r1.tokens) - 1
    # Once it is gone, another turn 2 resumes from the saved row (not this
    # one: its own prompt row, saved meanwhile, would be an exact hit).
    await model.evict()
    follow_b = await model.tokenize(" Thanks. And number 5?", add_bos=False)
    turn2b = [*turn1, *r1.tokens, *follow_b]
    r2 = await model.complete(turn2b, max_tokens=10, parent_key=r1.finish_key)
    assert r2.stats.hit_source == "resume"
    # The row holds turn 1 and its answer but the answer's last token.
    assert r2.stats.cached_tokens == len(turn1) + len(r1.tokens) - 1
    # The same turns without any cache give the same tokens.
    for turn, served in ((turn2, shared), (turn2b, r2)):
        async with erllama.Engine(policy=POLICY) as fresh:
            other = await load(fresh, model_path)
            assert (await other.complete(turn, max_tokens=10)).tokens == served.tokens


async def test_stream_and_cancel(engine: erllama.Engine, model_path: Path) -> None:
    model = await load(engine, model_path)
    stream = model.stream(SYSTEM + " Tell a long story.", max_tokens=400)
    pieces = []
    async for piece in stream:
        pieces.append(piece)
        if len(pieces) == 4:
            await engine.cancel(stream.request_id)
    assert stream.stats is not None
    assert stream.stats.finish_reason == "cancelled"
    assert stream.completion is not None
    assert "".join(pieces) == stream.completion.text
    assert stream.completion.finish_key is not None


async def test_sampling_seed_grammar_and_stop(engine: erllama.Engine, model_path: Path) -> None:
    model = await load(engine, model_path)
    prompt = "Write a short poem about the sea."
    a = await model.complete(prompt, max_tokens=16, temperature=0.9, seed=7)
    b = await model.complete(prompt, max_tokens=16, temperature=0.9, seed=7)
    assert a.tokens == b.tokens
    yn = await model.complete(
        "Is the sea wet? Answer:", max_tokens=8, grammar='root ::= "yes" | "no"'
    )
    assert yn.text in ("yes", "no")
    with pytest.raises(GrammarError):
        await model.complete(prompt, max_tokens=4, grammar="root ::= (")
    story = "Once upon a time, in a small village by the sea,"
    free = await model.complete(story, max_tokens=24)
    assert len(free.text.split()) >= 4, free.text
    word = free.text.split()[2]
    cut = await model.complete(story, max_tokens=24, stop=[word])
    assert cut.stats.finish_reason == "stop"
    assert word not in cut.text
    assert free.text.startswith(cut.text)


async def test_tokenize_chat_embed(engine: erllama.Engine, model_path: Path) -> None:
    model = await load(engine, model_path)
    toks = await model.tokenize("Hello, world")
    assert (await model.detokenize(toks)).endswith("Hello, world")
    chat = await model.apply_chat_template([{"role": "user", "content": "hi"}])
    assert len(chat) > 3
    emb = await model.embed(toks)
    assert len(emb) > 100
    assert all(isinstance(x, float) for x in emb)
    info = model.info()
    assert info.backend == "llama"
    assert info.quant_type == "q4_1"
    assert info.n_ctx == 2048


async def test_bad_input_and_the_engine_keeps_serving(
    engine: erllama.Engine, model_path: Path, tmp_path: Path
) -> None:
    model = await load(engine, model_path)
    with pytest.raises(EmptyInputError):
        await model.complete("")
    with pytest.raises(TokenOutOfRangeError):
        await model.complete([1, 10**7])
    with pytest.raises(ContextOverflowError):
        await model.complete("hello", max_tokens=5000)
    with pytest.raises(ModelFileNotFoundError):
        await engine.load_model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelLoadError):
        await engine.load_model(junk)
    ok = await model.complete("The sea is", max_tokens=3)
    assert len(ok.tokens) == 3


async def test_concurrent_requests_on_one_model(engine: erllama.Engine, model_path: Path) -> None:
    model = await load(engine, model_path)
    results = await asyncio.gather(
        *(model.complete(f"Count to {i}:", max_tokens=4) for i in range(6))
    )
    assert len({r.request_id for r in results}) == 6
    assert all(len(r.tokens) == 4 or r.stats.finish_reason == "stop" for r in results)


async def test_lora_adapters_change_output_and_isolate_the_cache(
    engine: erllama.Engine, model_path: Path, tmp_path: Path
) -> None:
    from lora_fixture import make_lora

    adapter = tmp_path / "adapter.gguf"
    make_lora(adapter, model_path)
    model = await load(engine, model_path)
    prompt = SYSTEM + " Question: which planet is number 2?"
    base = await model.complete(prompt, max_tokens=8)
    assert engine.cache.settle()
    info = await model.load_adapter(adapter, scale=1.0)
    assert [a.id for a in await model.adapters()] == [info.id]
    tuned = await model.complete(prompt, max_tokens=8)
    assert tuned.stats.cache_hit_kind != "exact", "base-model rows must not serve the adapter"
    assert tuned.tokens != base.tokens
    await model.set_adapter_scale(info.id, 0.0)
    off = await model.complete(prompt, max_tokens=8)
    assert off.stats.cache_hit_kind == "exact"
    assert off.tokens == base.tokens
    await model.unload_adapter(info.id)
    with pytest.raises(ModelLoadError):
        await model.load_adapter(model_path)  # a model, not an adapter
    assert (await model.complete(prompt, max_tokens=8)).tokens == base.tokens
