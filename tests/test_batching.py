"""Many requests at once on one model (``parallel``), on the real models.

What holds, and is asserted here:

- a lone request gives the same tokens whatever ``parallel`` is;
- a prompt's KV cells are computed exactly as alone, whatever runs beside it:
  each sequence has cells of its own (a llama.cpp stream each), and each
  prefill chunk is computed in a step of its own, so the rows a batch saves
  are the rows a lone run saves, and restore to the lone continuation;
- a request computed in a batch with others gives exactly the tokens it gives
  alone while its sequence holds at most 256 cells. Past that, alone, the one
  query row of a decode step attends with llama.cpp's split-KV kernel (one
  row, one stream, 512 or more cells: the cells split between the threads,
  partial sums merged); in a step of several sequences it takes the
  row-by-row kernel, which sums in another order. Tokens then agree until a
  near-even choice goes the other way (docs/api.md, "Parallel requests").
  Weights llama.cpp repacks for the CPU (Gemma 3's Q4_K here) are multiplied
  by a GEMM kernel in a step of several rows and a GEMV kernel in a step of
  one, which round differently too: such a model's batched tokens can differ
  at any length;
- with ``flash_attn="off"`` none of that applies to SmolLM2 (attention is a
  matrix product that sums alike in any step; Q4_1 weights are multiplied
  row by row): every request gives its lone tokens, at any length;
- a prefix another sequence holds is copied (not computed) and reported as
  cached tokens, whole chunks;
- cancelling one sequence frees its cells, the others finish;
- sixteen requests on four sequences all finish, queued for a sequence;
- the rows a batch saves restore exactly, on every tier.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import erllama

pytestmark = [pytest.mark.asyncio, pytest.mark.real_model]

NEVER = erllama.Policy(min_tokens=1 << 30, cold_min_tokens=1 << 30, cold_max_tokens=1 << 30)
SAVING = erllama.Policy(
    min_tokens=64, cold_min_tokens=64, boundary_trim_tokens=0, boundary_align_tokens=64
)
N_BATCH = 128
LOAD: dict[str, Any] = {"n_ctx": 4096, "n_batch": N_BATCH, "n_threads": 2}
MAX_TOKENS = 16
# Cells up to which a lone decode step takes the same attention kernel as
# a batched one (llama.cpp pads the cells it attends over to 256 and splits
# them between threads from 512).
SAME_KERNEL_CELLS = 256

FACTS = " ".join(
    f"Station {i} on the northern line opened in {1870 + 3 * i} and serves {i % 7 + 2} "
    f"platforms, with the {['east', 'west', 'north', 'south'][i % 4]} entrance closed on "
    "Sundays."
    for i in range(12)
)
YEAR = re.compile(r"^Station [0-9][0-9]? opened in [0-9]{4}\.$")
GRAMMAR = 'root ::= "Station " [0-9] [0-9]? " opened in " [0-9] [0-9] [0-9] [0-9] "."'

# Three share a long prefix; one has a grammar, two stop strings.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    (FACTS + " Question: when did station 3 open? Answer:", {}),
    (FACTS + " Question: how many platforms does station 5 serve? Answer:", {}),
    (FACTS + " Question: which entrance of station 2 is closed? Answer:", {}),
    ("Write a haiku about the sea.", {}),
    ("List three colours:", {"stop": ["\n\n"]}),
    (FACTS + " Question: name a station that opened before 1880.", {"grammar": GRAMMAR}),
    ("The capital of France is", {}),
    ("Once upon a time, in a small village by the river,", {"stop": ["."]}),
]


@pytest.fixture(params=["smollm2", "gemma3-270m"])
def model_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(
        "model_path" if request.param == "smollm2" else "gemma_path"
    )
    return path


async def _alone(
    path: Path,
    prompts: Sequence[Sequence[int]],
    parallel: int,
    options: Sequence[dict[str, Any]],
    evict: bool = True,
    load: dict[str, Any] = LOAD,
) -> list[erllama.Completion]:
    """Each request on its own, one after the other."""
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(path, parallel=parallel, **load)
        out = []
        for p, o in zip(prompts, options, strict=True):
            out.append(await model.complete(list(p), max_tokens=MAX_TOKENS, **o))
            if evict:
                await model.evict()
        return out


async def test_a_lone_request_is_the_same_on_any_parallelism(model_file: Path) -> None:
    async with erllama.Engine(policy=NEVER) as engine:
        m = await engine.load_model(model_file, parallel=1, **LOAD)
        prompts = [await m.tokenize(p) for p, _ in REQUESTS[3:6]]
    options = [o for _, o in REQUESTS[3:6]]
    one = await _alone(model_file, prompts, 1, options)
    four = await _alone(model_file, prompts, 4, options)
    assert [r.tokens for r in four] == [r.tokens for r in one]
    # Without evicting in between, finished sequences stay warm next to
    # the new request: still the same tokens.
    warm = await _alone(model_file, prompts, 4, options, evict=False)
    assert [r.tokens for r in warm] == [r.tokens for r in one]


async def test_concurrent_requests_give_their_lone_tokens(model_file: Path) -> None:
    async with erllama.Engine(policy=NEVER) as engine:
        m = await engine.load_model(model_file, parallel=1, **LOAD)
        prompts = [await m.tokenize(p) for p, _ in REQUESTS]
    options = [o for _, o in REQUESTS]
    alone = await _alone(model_file, prompts, 4, options)
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(model_file, parallel=4, **LOAD)
        batched = await asyncio.gather(
            *(
                model.complete(p, max_tokens=MAX_TOKENS, **o)
                for p, o in zip(prompts, options, strict=True)
            )
        )
        info = model.info()
        assert (info.running, info.queued) == (0, 0)
        sliding = info.memory == "kv_iswa"
    # llama.cpp repacks Gemma 3's Q4_K weights on this CPU, not SmolLM2's Q4_1.
    repacked = "gemma" in model_file.name
    exact = 0
    for p, a, b, (_, o) in zip(prompts, alone, batched, REQUESTS, strict=True):
        if len(p) + MAX_TOKENS <= SAME_KERNEL_CELLS and not repacked:
            assert b.tokens == a.tokens
            exact += 1
        if "grammar" in o:
            assert YEAR.match(b.text), b.text
        for stop in o.get("stop", []):
            assert stop not in b.text
    assert exact == (0 if repacked else 4)
    # The requests on the shared prefix were admitted together: the first
    # prefilled it, the others copied its whole chunks. A sliding-window
    # model's sequence can be copied only whole (or but its last token), so
    # there it happens only if a newcomer finds one holding just that.
    facts = [b for b, (p, _) in zip(batched, REQUESTS, strict=True) if p.startswith(FACTS)]
    shared = [b for b in facts if b.stats.hit_source == "shared"]
    assert shared or sliding, [b.stats for b in facts]
    if not sliding:
        # Every one but the first: those admitted with it waited for its
        # chunks, the later ones found them computed.
        assert len(shared) == len(facts) - 1, [b.stats for b in facts]
    for b in shared:
        assert b.stats.cache_hit_kind == "partial"
        assert b.stats.cached_tokens > 0
        assert b.stats.cached_tokens % N_BATCH == 0


async def test_without_flash_attention_every_request_gives_its_lone_tokens(
    model_path: Path,
) -> None:
    """SmolLM2 with ``flash_attn="off"``: attention is a matrix product and
    a softmax, whose every element sums the same terms in the same order
    whatever else the step holds, and SmolLM2's Q4_1 weights are
    multiplied row by row, so all eight requests give their lone tokens,
    including those past the cells where flash attention's kernels part."""
    load = {**LOAD, "flash_attn": "off"}
    async with erllama.Engine(policy=NEVER) as engine:
        m = await engine.load_model(model_path, parallel=1, **load)
        prompts = [await m.tokenize(p) for p, _ in REQUESTS]
    assert any(len(p) + MAX_TOKENS > SAME_KERNEL_CELLS for p in prompts)
    options = [o for _, o in REQUESTS]
    alone = await _alone(model_path, prompts, 4, options, load=load)
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(model_path, parallel=4, **load)
        batched = await asyncio.gather(
            *(
                model.complete(p, max_tokens=MAX_TOKENS, **o)
                for p, o in zip(prompts, options, strict=True)
            )
        )
        assert model.info().flash_attn == "off"
    assert [b.tokens for b in batched] == [a.tokens for a in alone]
    for b, (_, o) in zip(batched, REQUESTS, strict=True):
        if "grammar" in o:
            assert YEAR.match(b.text), b.text


async def test_cancelling_one_sequence_frees_its_cells(model_path: Path) -> None:
    prompts = ["Tell me about the sea.", "Tell me about the mountains.", "Tell me about rivers."]
    async with erllama.Engine(policy=NEVER) as engine:
        model = await engine.load_model(model_path, parallel=4, **LOAD)
        tokens = [await model.tokenize(p) for p in prompts]
        streams = [model.stream(t, max_tokens=64, stop=[]) for t in tokens]
        seen = 0
        async for _ in streams[1]:
            seen += 1
            if seen == 3:
                assert await engine.cancel(streams[1].request_id)
        cancelled = streams[1].completion
        assert cancelled is not None
        assert cancelled.stats.finish_reason == "cancelled"
        others = [await s.result() for s in (streams[0], streams[2])]
        for r in others:
            assert r.stats.finish_reason in ("length", "stop")
        info = model.info()
        assert (info.running, info.warm_sequences) == (0, 2)
        # The warm sequences hold their prompt and output, but the last token
        # when the length ran out (it was never fed; an end-of-generation
        # token is not output); the cancelled one holds nothing.
        held = sum(
            len(t) + len(r.tokens) - (r.stats.finish_reason == "length")
            for t, r in zip((tokens[0], tokens[2]), others, strict=True)
        )
        assert info.kv_cells_used == held
    for t, r in zip((tokens[0], tokens[2]), others, strict=True):
        [a] = await _alone(model_path, [t], 1, [{}])
        assert len(t) + len(r.tokens) <= SAME_KERNEL_CELLS
        assert list(r.tokens[: len(a.tokens)]) == list(a.tokens)


async def test_sixteen_requests_on_four_sequences_queue_for_one(model_path: Path) -> None:
    async with erllama.Engine(policy=NEVER) as engine:
        # Each sequence has 1024 cells of its own: four requests run, the
        # others wait for a sequence, not for cells.
        model = await engine.load_model(
            model_path, parallel=4, n_ctx=1024, n_batch=N_BATCH, n_threads=2
        )
        prompts = [f"Fact {i}: " + FACTS[: 400 + 7 * i] for i in range(16)]
        tokens = [await model.tokenize(p) for p in prompts]
        peak_running = 0
        saw_queue = False
        done = False

        async def watch() -> None:
            nonlocal peak_running, saw_queue
            while not done:
                info = model.info()
                peak_running = max(peak_running, info.running)
                saw_queue = saw_queue or info.queued > 0
                assert info.kv_cells_used <= 4 * 1024
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(model.complete(t, max_tokens=100) for t in tokens))
        done = True
        await watcher
        assert len({r.request_id for r in results}) == 16
        for r in results:
            assert r.stats.finish_reason in ("length", "stop")
            assert len(r.tokens) == 100 or r.stats.finish_reason == "stop"
        assert saw_queue
        assert peak_running == 4
        # One that cannot fit even alone fails at once.
        with pytest.raises(erllama.errors.ContextOverflowError):
            await model.complete(tokens[0], max_tokens=1025 - len(tokens[0]))


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
async def test_rows_saved_by_a_batch_restore_exactly(
    model_path: Path, tier: str, tmp_path: Path
) -> None:
    prompts = [FACTS + f" Question: what about station {i}? Answer:" for i in (1, 4, 7)]
    cache = erllama.CacheConfig(ram_file_dir=tmp_path / "shm", disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=SAVING) as engine:
        model = await engine.load_model(model_path, parallel=4, tier=tier, **LOAD)  # type: ignore[arg-type]
        tokens = [await model.tokenize(p) for p in prompts]
        await asyncio.gather(*(model.complete(t, max_tokens=MAX_TOKENS) for t in tokens))
        assert engine.cache.settle()
        await model.evict()
        for t in tokens:
            again = await model.complete(t, max_tokens=MAX_TOKENS)
            assert (again.stats.cache_hit_kind, again.stats.hit_source) == ("exact", "exact")
            assert again.stats.cache_tier == tier
            await model.evict()
            # The row holds the prompt as a lone run computes it: the restore
            # continues as the lone run does.
            [alone] = await _alone(model_path, [t], 1, [{}])
            assert again.tokens == alone.tokens
        assert engine.cache.counters()["restore_failures"] == 0


async def test_rows_restore_across_parallelism(model_file: Path, tmp_path: Path) -> None:
    """A row is stored in one form whatever ``parallel`` wrote it: saved by a
    four-sequence context, it restores into a one-sequence one, and back."""
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    prompts = [FACTS + " Question: what about station 9? Answer:", FACTS + " Summary:"]
    outs: list[list[int]] = []
    runs = [(4, prompts[0]), (1, prompts[0]), (1, prompts[1]), (4, prompts[1])]
    for i, (parallel, prompt) in enumerate(runs):
        async with erllama.Engine(cache=cache, policy=SAVING) as engine:
            model = await engine.load_model(model_file, parallel=parallel, tier="disk", **LOAD)
            r = await model.complete(prompt, max_tokens=MAX_TOKENS)
            if i % 2 == 1:
                # The second run of each prompt: an exact hit from the other form.
                assert (r.stats.cache_hit_kind, r.stats.cache_tier) == ("exact", "disk")
                assert r.tokens == outs[-1]
            assert engine.cache.settle()
            assert engine.cache.counters()["restore_failures"] == 0
            outs.append(list(r.tokens))
