"""The asyncio engine over the stub backends (Rust and pure Python).

Fast cache-flow tests: exact / partial / resume hits, cross-process disk
hits, cancel, FIFO, concurrency, bad input, and a Python backend failing one
request only. The same flows on the real model are in test_engine_llama.py.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama.backends.stub import StubBackend, next_token, word_token
from erllama.errors import (
    AlreadyLoadedError,
    BackendError,
    ContextOverflowError,
    EmptyInputError,
    InvalidInputError,
    NoTemplateError,
    NotFoundError,
    TokenOutOfRangeError,
    UnknownTierError,
)

pytestmark = pytest.mark.asyncio

# A small policy so short stub prompts are cached.
POLICY = erllama.Policy(
    min_tokens=8,
    cold_min_tokens=8,
    boundary_trim_tokens=2,
    boundary_align_tokens=16,
    continued_interval=64,
    session_resume_wait_ms=2000,
)


def words(n: int, salt: str) -> str:
    return " ".join(f"w{i}{salt}" for i in range(n))


@pytest.fixture(params=["stub", "python"])
def backend(request: pytest.FixtureRequest) -> Any:
    """The Rust stub by name, and the pure-Python stub object."""
    return "stub" if request.param == "stub" else StubBackend()


async def test_cold_then_exact_then_partial(backend: Any) -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("label", backend=backend, n_ctx=2048, n_batch=8)
        prompt = words(40, "a")
        cold = await model.complete(prompt, max_tokens=12)
        assert cold.stats.cache_hit_kind == "cold"
        assert cold.stats.prompt_tokens == 41
        assert len(cold.tokens) == 12
        assert cold.stats.finish_reason == "length"
        assert engine.cache.settle()
        # The finished sequence is kept: the repeat takes it over.
        shared = await model.complete(prompt, max_tokens=12)
        assert (shared.stats.cache_hit_kind, shared.stats.hit_source) == ("exact", "shared")
        assert shared.stats.cached_tokens == 41
        assert shared.stats.cache_tier is None
        assert shared.tokens == cold.tokens
        # Once the sequences are evicted, the repeat restores the cached row.
        await model.evict()
        warm = await model.complete(prompt, max_tokens=12)
        assert (warm.stats.cache_hit_kind, warm.stats.hit_source) == ("exact", "exact")
        assert warm.stats.cached_tokens == 41
        assert warm.stats.cache_tier == "ram"
        assert warm.tokens == cold.tokens
        assert warm.text == cold.text
        await model.evict()
        longer = await model.complete(prompt + " and more words", max_tokens=3)
        assert longer.stats.cache_hit_kind == "partial"
        assert longer.stats.hit_source == "longest_prefix"
        counters = engine.cache.counters()
        assert counters["hits_exact"] == 1
        assert counters["hits_shared"] == 1
        assert counters["hits_longest_prefix"] == 1
        assert counters["misses"] == 1
        assert counters["saves_cold"] >= 2
        assert counters["bytes_ram"] == engine.cache.bytes()["ram"] > 0


async def test_the_python_stub_matches_the_rust_stub() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        rust = await engine.load_model("r", backend="stub")
        py = await engine.load_model("p", backend=StubBackend())
        a = await rust.complete("the quick brown fox", max_tokens=8)
        b = await py.complete("the quick brown fox", max_tokens=8)
        assert a.tokens == b.tokens
        toks = [1] + [word_token(w) for w in ["the", "quick", "brown", "fox"]]
        assert a.tokens[0] == next_token(toks)
        assert await rust.embed([1, 2, 3]) == pytest.approx(await py.embed([1, 2, 3]))


async def test_parent_key_resumes_a_turn(tmp_path: Path, backend: Any) -> None:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model("chat", backend=backend, tier="disk")
        # Another model of the same weights: the same keys, none of the
        # first one's sequences (no warm sequence to take over).
        other = await engine.load_model("chat", backend=backend, tier="disk")
        turn1 = await model.tokenize(words(20, "t1"))
        r1 = await model.complete(turn1, max_tokens=6)
        assert r1.finish_key is not None
        turn2 = [*turn1, *r1.tokens, *await model.tokenize(words(5, "t2"), add_bos=False)]
        # No settle: the resume waits for the row being written.
        r2 = await other.complete(turn2, max_tokens=6, parent_key=r1.finish_key)
        assert r2.stats.cache_hit_kind == "partial"
        assert r2.stats.hit_source == "resume"
        # The row holds turn 1 and its answer but the answer's last token
        # (sampled, never fed).
        assert r2.stats.cached_tokens == len(turn1) + 5
        assert r2.stats.cache_tier == "disk"
        assert engine.cache.counters()["hits_resume"] == 1
        # Once r2's rows are published, turn 2 itself is an exact hit anywhere.
        assert engine.cache.settle()
        # On the first model turn 1's sequence is still warm, and no row of
        # another second turn is longer: the sequence is taken over and
        # continued, with the answer a fresh context computes.
        turn2b = [*turn1, *r1.tokens, *await model.tokenize(words(5, "t3"), add_bos=False)]
        r2b = await model.complete(turn2b, max_tokens=6, parent_key=r1.finish_key)
        assert r2b.stats.hit_source == "shared"
        assert r2b.stats.cached_tokens == len(turn1) + 5
        assert engine.cache.counters()["hits_shared"] == 1
        fresh = await engine.load_model("fresh", backend=backend, tier="disk")
        assert (await fresh.complete(turn2b, max_tokens=6)).tokens == r2b.tokens
        r2c = await model.complete(turn2, max_tokens=6, parent_key=r1.finish_key)
        assert r2c.stats.hit_source == "exact"
        assert r2c.tokens == r2.tokens


CHILD = """
import asyncio, sys, json, erllama
async def main():
    cache = erllama.CacheConfig(disk_dir=sys.argv[1])
    policy = erllama.Policy(min_tokens=8, cold_min_tokens=8, boundary_trim_tokens=2,
                            boundary_align_tokens=16)
    async with erllama.Engine(cache=cache, policy=policy) as engine:
        model = await engine.load_model("label", backend="stub", tier="disk")
        r = await model.complete(sys.argv[2], max_tokens=5)
        print(json.dumps({"kind": r.stats.cache_hit_kind, "tier": r.stats.cache_tier,
                          "tokens": list(r.tokens)}))
asyncio.run(main())
"""


async def test_a_new_process_gets_hits_from_the_disk_tier(tmp_path: Path) -> None:
    import json

    def run() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "disk"), words(40, "x")],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return dict(json.loads(out.stdout))

    first = await asyncio.to_thread(run)
    second = await asyncio.to_thread(run)
    assert first["kind"] == "cold"
    assert second["kind"] == "exact"
    assert second["tier"] == "disk"
    assert second["tokens"] == first["tokens"]


async def test_cancel_mid_stream_still_saves(backend: Any) -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend=backend, n_ctx=200_000)
        stream = model.stream(words(20, "c"), max_tokens=100_000)
        assert isinstance(stream.request_id, int)
        seen = 0
        async for piece in stream:
            assert piece
            seen += 1
            if seen == 3:
                assert await engine.cancel(stream.request_id)
                assert await engine.cancel(stream.request_id)  # idempotent
        assert stream.stats is not None
        assert stream.stats.finish_reason == "cancelled"
        assert stream.stats.cancelled
        assert stream.completion is not None
        assert stream.completion.finish_key
        assert not await engine.cancel(stream.request_id)
        assert not await engine.cancel(10**9)
        assert engine.inflight() == []


async def test_cancel_before_the_first_token() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        # One sequence, busy with a slow request: the next one is queued.
        model = await engine.load_model("m", backend=Logging(), parallel=1)
        busy = model.stream("x y z", max_tokens=50)
        stream = model.stream("a b c", max_tokens=10)
        assert await engine.cancel(stream.request_id)
        result = await stream.result()
        assert result.stats.finish_reason == "cancelled"
        assert result.tokens == []
        assert len((await busy.result()).tokens) == 50


class Logging(StubBackend):
    """A Python backend logging which request each sample serves."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[int] = []

    def new_context(self, n_ctx: int, n_batch: int, n_seq: int = 1) -> Any:
        ctx = super().new_context(n_ctx, n_batch, n_seq)
        original = ctx.sample

        def sample(seq: int) -> int:
            self.log.append(ctx.seqs[seq][1])  # the request's first word
            time.sleep(0.001)  # long enough for the next submission to arrive
            return original(seq)

        ctx.sample = sample  # type: ignore[method-assign]
        return ctx


async def _three_at_once(parallel: int) -> tuple[list[int], list[int]]:
    backend = Logging()
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend=backend, parallel=parallel)
        # Each stream is submitted when it is created, in this order.
        streams = [model.stream(f"req{i} a b", max_tokens=30) for i in range(3)]
        ids = [s.request_id for s in streams]
        assert ids == sorted(ids)
        results = await asyncio.gather(*(s.result() for s in streams))
        assert [len(r.tokens) for r in results] == [30, 30, 30]
    return [word_token(f"req{i}") for i in range(3)], backend.log


async def test_with_parallel_1_queued_streams_run_one_at_a_time_in_fifo_order() -> None:
    tags, log = await _three_at_once(1)
    blocks = [t for i, t in enumerate(log) if i == 0 or log[i - 1] != t]
    assert blocks == tags


async def test_with_parallel_4_streams_decode_together() -> None:
    tags, log = await _three_at_once(4)
    assert [log.count(t) for t in tags] == [30, 30, 30]
    switches = sum(1 for a, b in itertools.pairwise(log) if a != b)
    assert switches >= 30, log
    # The last request started before the first one ended.
    assert log.index(tags[2]) < len(log) - 1 - log[::-1].index(tags[0])


async def test_eight_tasks_times_twenty_requests_each_answered_once() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub")

        async def worker(t: int) -> list[int]:
            ids = []
            for r in range(20):
                c = await model.complete(words(12, f"{t}-{r % 3}"), max_tokens=3)
                assert len(c.tokens) == 3
                ids.append(c.request_id)
            return ids

        results = await asyncio.gather(*(worker(t) for t in range(8)))
        ids = [i for r in results for i in r]
        assert len(ids) == 160 == len(set(ids))
        assert engine.inflight() == []


async def test_bad_input_raises_specific_errors_and_the_engine_keeps_serving(
    tmp_path: Path,
) -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("label", "m", backend="stub", n_ctx=64)
        assert model.id == "m"
        with pytest.raises(EmptyInputError):
            await model.complete("")
        with pytest.raises(TokenOutOfRangeError):
            await model.complete([1, 70_000])
        with pytest.raises(TokenOutOfRangeError):
            await model.complete([1, -5])
        with pytest.raises(ContextOverflowError):
            await model.complete("a b c", max_tokens=100)
        with pytest.raises(InvalidInputError, match="temperature"):
            await model.complete("a", temperature=-1.0)
        with pytest.raises(TypeError):
            await model.complete("a", bogus=1)  # type: ignore[call-arg]
        with pytest.raises(NotFoundError):
            engine.model("nope")
        with pytest.raises(NotFoundError):
            await engine.unload("nope")
        with pytest.raises(AlreadyLoadedError):
            await engine.load_model("x", "m", backend="stub")
        with pytest.raises(UnknownTierError):
            await engine.load_model("x", backend="stub", tier="disk")
        with pytest.raises(UnknownTierError):
            await engine.load_model("x", backend="stub", tier="floppy")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            await engine.load_model("x", backend="nonsense")
        with pytest.raises(NoTemplateError):
            await model.apply_chat_template([{"role": "user", "content": "hi"}])
        ok = await model.complete("still fine", max_tokens=2)
        assert len(ok.tokens) == 2


class Exploding(StubBackend):
    """A Python backend whose sampling fails for one marked prompt."""

    def new_context(self, n_ctx: int, n_batch: int, n_seq: int = 1) -> Any:
        ctx = super().new_context(n_ctx, n_batch, n_seq)
        original = ctx.sample
        boom = word_token("boom")

        def sample(seq: int) -> int:
            if boom in ctx.seqs[seq]:
                raise RuntimeError("decode exploded")
            return original(seq)

        ctx.sample = sample  # type: ignore[method-assign]
        return ctx


async def test_a_python_backend_that_raises_fails_only_that_request() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend=Exploding())
        before = await model.complete("fine one", max_tokens=3)
        with pytest.raises(BackendError, match="decode exploded"):
            await model.complete("this will boom", max_tokens=3)
        after = await model.complete("fine one", max_tokens=3)
        assert after.tokens == before.tokens
        assert model.status() == "idle"


async def test_models_info_status_evict_unload() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        a = await engine.load_model("label", backend="stub")
        b = await engine.load_model("label", backend="stub")
        assert (a.id, b.id) == ("erllama_model_1", "erllama_model_2")
        assert engine.models() == ["erllama_model_1", "erllama_model_2"]
        info = a.info()
        assert info.backend == "stub"
        assert info.tier == "ram"
        assert len(info.fingerprint) == 64
        assert a.status() == "idle"
        assert await a.evict() == []
        await a.complete(words(4, "e"), max_tokens=2)
        # BOS + 4 words + the first generated token (the last is never fed).
        saved = await a.evict()
        assert [s.tokens for s in saved] == [6]
        assert engine.cache.counters()["saves_evict"] == 1
        assert await a.evict() == []
        await a.complete(words(4, "f"), max_tokens=2)
        summary = await engine.unload(a.id)
        assert [s.tokens for s in summary] == [6]
        assert engine.cache.counters()["saves_shutdown"] == 1
        assert engine.models() == ["erllama_model_2"]


async def test_cache_inspection() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub")
        await model.complete(words(40, "d"), max_tokens=4)
        assert engine.cache.settle()
        rows = engine.cache.dump()
        assert rows
        assert {r.tier for r in rows} == {"ram"}
        assert {r.save_reason for r in rows} >= {"cold", "finish"}
        count, freed = engine.cache.evict_bytes(1, ["ram"])
        assert count == 1
        assert freed > 0
        with pytest.raises(UnknownTierError):
            engine.cache.evict_bytes(1, ["tape"])
        assert engine.cache.gc() == len(rows) - 1
        assert engine.cache.bytes()["ram"] == 0
        engine.cache.reset_counters()
        assert engine.cache.counters()["misses"] == 0


async def test_adapters_isolate_cache_rows(tmp_path: Path, backend: Any) -> None:
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"an adapter")
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend=backend)
        prompt = words(40, "lora")
        await model.complete(prompt, max_tokens=3)
        assert engine.cache.settle()
        assert model.info().warm_sequences == 1
        info = await model.load_adapter(adapter, scale=1.0)
        # The new weights freed every sequence, as info() says at once.
        assert (model.info().warm_sequences, model.info().kv_cells_used) == (0, 0)
        assert info.id == "adapter_1"
        assert len(info.sha256) == 64
        assert [a.id for a in await model.adapters()] == ["adapter_1"]
        with_adapter = await model.complete(prompt, max_tokens=3)
        assert with_adapter.stats.cache_hit_kind == "cold"
        await model.unload_adapter("adapter_1")
        assert await model.adapters() == []
        again = await model.complete(prompt, max_tokens=3)
        assert again.stats.cache_hit_kind == "exact"
        with pytest.raises(erllama.ModelFileNotFoundError):
            await model.load_adapter(tmp_path / "missing.gguf")
        with pytest.raises(NotFoundError):
            await model.unload_adapter("nope")
        with pytest.raises(NotFoundError):
            await model.set_adapter_scale("nope", 0.5)


async def test_a_request_cancelled_while_queued_saves_nothing_and_has_no_finish_key() -> None:
    # Regression: a request cancelled before admission used to finish-save the
    # previous request's context and return that row as its own finish_key.
    backend = Logging()
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend=backend, parallel=1)
        first = await model.complete(words(20, "first"), max_tokens=4)
        assert first.finish_key is not None
        assert engine.cache.settle()
        finishes = engine.cache.counters()["saves_finish"]
        busy = model.stream(words(20, "busy"), max_tokens=200)
        queued = model.stream(words(20, "queued"), max_tokens=4)
        assert await engine.cancel(queued.request_id)
        r = await queued.result()
        assert (r.stats.finish_reason, r.tokens, r.finish_key) == ("cancelled", [], None)
        await busy.result()
        assert engine.cache.settle()
        assert engine.cache.counters()["saves_finish"] == finishes + 1, "only the busy one's"


async def test_continued_saves_count_from_the_end_of_the_prompt() -> None:
    # Regression: for a prompt longer than cold_max_tokens the first
    # generated token triggered a "continued" save of the whole context.
    policy = erllama.Policy(
        min_tokens=8, cold_min_tokens=8, cold_max_tokens=32, continued_interval=16
    )
    async with erllama.Engine(policy=policy) as engine:
        model = await engine.load_model("m", backend="stub")
        await model.complete(words(100, "long"), max_tokens=10)
        assert engine.cache.settle()
        assert engine.cache.counters()["saves_continued"] == 0
        await model.evict()
        await model.complete(words(100, "other"), max_tokens=40)
        assert engine.cache.settle()
        # After 16 and 32 generated tokens.
        assert engine.cache.counters()["saves_continued"] == 2
