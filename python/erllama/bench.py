"""``erllama bench``: the cache's edge, measured side by side in one run.

Parts (each figure the median of ``repeats`` runs):

- **ttft** — cold versus warm time to first token per tier and prompt
  length (``max_tokens=1``; the whole ``complete`` call as a client sees
  it; the warm request is an exact hit from the tier, its sequence freed
  first), the pack time the cold request paid, and the restore time beside
  the bound it would actually hit, measured on the same bytes in the same
  run: a copy between buffers already faulted in (``ram``: llama.cpp copies
  the state into its KV tensors), plus a read of the cached file into such
  a buffer (file tiers); for ``disk`` also the cold-disk bound (an
  ``O_DIRECT`` read plus the copy);
- **kv** — quantized KV caches against f16 at one prompt length: bytes per
  token of a row, restore time and warm time to first token from ``ram``
  and ``disk``, and whether each hit gave its cold tokens;
- **http** — a warm exact hit in-process against the same hit through
  ``erllama serve``'s ``/v1/completions`` (a stdlib client on loopback);
- **agents** — 4 and 8 concurrent agents (``parallel`` = their number)
  whose prompts share a 2048-token prefix saved by a first, cold agent, each
  with its own ~70-token suffix and 32 generated tokens: min / p50 / p99 /
  mean time to first token against one warm agent alone on the same model,
  and how many shared the prefix (``seq_cp``) instead of restoring it;
- **parallel** — aggregate decode tok/s of 4 concurrent sequences against
  one, and a lone request on ``parallel=4`` against ``parallel=1`` (TTFT of
  a 512-token prompt and decode tok/s), runs alternating;
- **restart** — warm time to first token in a fresh process over the disk
  tier written by another;
- **clients** — 16 concurrent chat clients (2 streamed requests each, a
  shared 2048-token system prompt, 32 tokens each) against ``erllama serve
  --parallel 4`` and, with ``--peer llama-cpp-python``, against
  ``llama_cpp.server --cache true --interrupt_requests false`` (one server
  at a time): TTFT p50 / p99 and aggregate tok/s;
- **peer** (``--peer llama-cpp-python``) — the same prompts through
  llama-cpp-python (from a separate venv) with ``LlamaRAMCache`` and
  ``LlamaDiskCache``, prompts alternating so a repeat must come from the
  cache, same model file and thread count.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import erllama
from erllama.engine import FlashAttn, KvType, Tier

__all__ = ["prompt_tokens", "run_bench"]

PARAGRAPH = (
    "The history of the lighthouse is a story of engineering, weather and patience. "
    "Keepers climbed the stairs every evening to trim the wicks, polish the lenses and "
    "log the passing ships. "
)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


async def prompt_tokens(model: erllama.Model, n: int, salt: int) -> list[int]:
    """A prompt of exactly ``n`` tokens, different for each ``salt``."""
    text = f"Document {salt}. " + PARAGRAPH * (n // 30 + 2)
    tokens = await model.tokenize(text)
    while len(tokens) < n:
        text += PARAGRAPH
        tokens = await model.tokenize(text)
    return tokens[:n]


async def _complete_timed(
    model: erllama.Model, tokens: list[int]
) -> tuple[float, erllama.Completion]:
    t0 = time.perf_counter()
    c = await model.complete(tokens, max_tokens=1)
    return (time.perf_counter() - t0) * 1e3, c


def _timed_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    """The median time of ``fn()`` in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _copy_bound_ms(size: int) -> float:
    """A copy of ``size`` bytes between buffers that are already faulted in:
    what restoring a row held in memory must do at least (llama.cpp copies
    the state into its KV tensors). A fresh destination would add a page
    fault per 4 KiB and understate the bound several times over. The source
    is a ``bytearray`` too: assigning a ``bytes`` object to a slice makes
    CPython copy it into a fresh temporary first, which measured a fresh
    allocation and two copies (about ten times a warm copy) rather than
    the copy."""
    src = bytearray(b"\x5a" * size)
    dst = bytearray(size)
    dst[:] = src  # touch every page before timing

    def copy() -> None:
        dst[:] = src

    return _timed_ms(copy)


def _read_bound_ms(path: Path) -> float:
    """A read of ``path`` from the page cache into a buffer that is already
    faulted in: the least a file tier's load does before the copy."""
    size = path.stat().st_size
    buf = bytearray(size)
    view = memoryview(buf)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n

    read()  # the file and the buffer warm
    return _timed_ms(read)


def _direct_read_ms(path: Path) -> float | None:
    """A read of ``path`` with ``O_DIRECT`` (past the page cache, from the
    device): what a cold disk costs. ``None`` where the file system refuses
    ``O_DIRECT`` (tmpfs)."""
    import mmap

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    size = path.stat().st_size
    length = (size + 4095) // 4096 * 4096
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    buf.write(b"\x00" * length)
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:

        def read() -> None:
            done = 0
            while done < size:
                n = os.preadv(fd, [memoryview(buf)[done:]], done)
                if n <= 0:
                    break
                done += n

        read()
        return _timed_ms(read)
    except OSError:
        return None
    finally:
        os.close(fd)
        buf.close()


async def _ttft_tier(
    tier: str, sizes: list[int], repeats: int, threads: int | None, root: Path, path: Path
) -> list[dict[str, Any]]:
    cache = erllama.CacheConfig(
        ram_quota=8 << 30,
        ram_file_dir=root / "shm" if tier == "ram_file" else None,
        disk_dir=root / "disk" if tier == "disk" else None,
        ram_file_quota=8 << 30,
        disk_quota=32 << 30,
    )
    rows = []
    # Save prompts of every benchmarked length (the default skips < 512).
    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
    async with erllama.Engine(cache=cache, policy=policy) as engine:
        model = await engine.load_model(
            path,
            n_ctx=max(sizes) + 64,
            n_batch=512,
            n_threads=threads,
            tier=tier,  # type: ignore[arg-type]
        )
        tier_dir = {"ram_file": root / "shm", "disk": root / "disk"}.get(tier)
        for n in sizes:
            cold_ms, warm_ms, restore_ms, pack_ms, prefill_ms = [], [], [], [], []
            bound_ms: list[float] = []
            direct_ms: list[float] = []
            prefill_after: list[int] = []
            state = 0
            for r in range(repeats):
                _say(f"ttft {tier} {n} tokens, run {r + 1}/{repeats}")
                tokens = await prompt_tokens(model, n, salt=r * 1000 + n)
                pack0 = engine.cache.counters()["pack_total_ns"]
                t_cold, cold = await _complete_timed(model, tokens)
                pack1 = engine.cache.counters()["pack_total_ns"]
                engine.cache.settle(300)
                row = next((x for x in engine.cache.dump() if x.tokens == n), None)
                if row is None:
                    raise RuntimeError(f"the {n}-token prompt was not saved")
                # The finished sequence is freed: the repeat comes from the tier.
                await model.evict()
                t_warm, warm = await _complete_timed(model, tokens)
                if warm.stats.cache_hit_kind != "exact" or warm.tokens != cold.tokens:
                    raise RuntimeError(f"warm run was not an identical exact hit: {warm.stats}")
                state = row.size
                cold_ms.append(t_cold)
                warm_ms.append(t_warm)
                restore_ms.append(warm.stats.restore_ms)
                prefill_ms.append(cold.stats.prefill_ms)
                pack_ms.append((pack1 - pack0) / 1e6)
                prefill_after.append(warm.stats.prefill_tokens)
                # The bound a restore from this tier hits: the bytes copied
                # into the KV tensors, after a read of the (cached) file.
                bound = _copy_bound_ms(state)
                if tier_dir is not None:
                    file = tier_dir / f"{row.key}.kvc"
                    bound += _read_bound_ms(file)
                    if tier == "disk":
                        direct = _direct_read_ms(file)
                        if direct is not None:
                            direct_ms.append(direct + _copy_bound_ms(state))
                bound_ms.append(bound)
                await model.evict()
                engine.cache.gc()
            med = statistics.median
            row_out: dict[str, Any] = {
                "tier": tier,
                "prompt_tokens": n,
                "cold_ms": round(med(cold_ms), 1),
                "warm_ms": round(med(warm_ms), 1),
                "speedup": round(med(cold_ms) / med(warm_ms), 1),
                "restore_ms": round(med(restore_ms), 2),
                "state_mb": round(state / 1e6, 1),
                "restore_mb_s": round(state / 1e6 / (med(restore_ms) / 1e3), 0),
                "bound_ms": round(med(bound_ms), 2),
                "restore_vs_bound_pct": round(100 * med(bound_ms) / med(restore_ms), 0),
                "cold_disk_bound_ms": round(med(direct_ms), 2) if direct_ms else None,
                "warm_prefill_tokens": max(prefill_after),
                "pack_ms": round(med(pack_ms), 1),
                "pack_pct_of_prefill": round(100 * med(pack_ms) / med(prefill_ms), 2),
            }
            rows.append(row_out)
    return rows


async def _kv_types(
    path: Path, n: int, threads: int | None, repeats: int, root: Path
) -> list[dict[str, Any]]:
    """Rows and restores of an ``n``-token prompt under each KV type."""
    out: list[dict[str, Any]] = []
    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
    kv: KvType
    tier: Tier
    for kv in ("f16", "q8_0", "q4_0"):
        for tier in ("ram", "disk"):
            cache = erllama.CacheConfig(ram_quota=8 << 30, disk_dir=root / f"{kv}-{tier}")
            async with erllama.Engine(cache=cache, policy=policy) as engine:
                model = await engine.load_model(
                    path,
                    n_ctx=n + 64,
                    n_batch=512,
                    n_threads=threads,
                    tier=tier,
                    cache_type_k=kv,
                    cache_type_v=kv,
                )
                warm_ms, restore_ms = [], []
                size, same = 0, True
                for r in range(repeats):
                    _say(f"kv {kv} {tier}: run {r + 1}/{repeats}")
                    tokens = await prompt_tokens(model, n, salt=500 + r)
                    _, cold = await _complete_timed(model, tokens)
                    await model.evict()
                    engine.cache.settle(300)
                    row = next(x for x in engine.cache.dump() if x.tokens == n)
                    size = row.size
                    t_warm, warm = await _complete_timed(model, tokens)
                    same = same and warm.tokens == cold.tokens
                    same = same and warm.stats.cache_hit_kind == "exact"
                    warm_ms.append(t_warm)
                    restore_ms.append(warm.stats.restore_ms)
                    await model.evict()
                    engine.cache.gc()
            out.append(
                {
                    "kv": kv,
                    "tier": tier,
                    "prompt_tokens": n,
                    "row_mb": round(size / 1e6, 1),
                    "bytes_per_token": round(size / n),
                    "restore_ms": round(statistics.median(restore_ms), 2),
                    "warm_ms": round(statistics.median(warm_ms), 1),
                    "hits_equal_cold": same,
                }
            )
    f16: dict[str, int] = {x["tier"]: x["bytes_per_token"] for x in out if x["kv"] == "f16"}
    for x in out:
        x["bytes_vs_f16_pct"] = round(100 * x["bytes_per_token"] / f16[x["tier"]], 0)
    return out


async def _http(path: Path, n: int, threads: int | None, repeats: int) -> dict[str, Any]:
    """A warm exact hit of an ``n``-token prompt from ``ram`` in-process and
    through the HTTP server (``/v1/completions``, ``max_tokens=1``, a plain
    stdlib client on loopback), runs alternating, each after an evict."""
    import urllib.request

    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
    async with erllama.Engine(policy=policy) as engine:
        model = await engine.load_model(
            path, model_id="m", n_ctx=n + 64, n_batch=512, n_threads=threads
        )
        server = await engine.serve("127.0.0.1", 0)
        try:
            tokens = await prompt_tokens(model, n, salt=900)
            _say(f"http: the cold {n}-token prompt")
            await model.complete(tokens, max_tokens=1)
            engine.cache.settle(300)
            url = f"http://{server.host}:{server.port}/v1/completions"
            body = json.dumps(
                {"model": "m", "prompt": tokens, "max_tokens": 1, "temperature": 0}
            ).encode()

            def post() -> dict[str, Any]:
                req = urllib.request.Request(
                    url, data=body, headers={"content-type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=300) as r:
                    return dict(json.load(r))

            inproc, http = [], []
            for r in range(repeats):
                _say(f"http: run {r + 1}/{repeats}")
                await model.evict()
                t, c = await _complete_timed(model, tokens)
                if c.stats.cache_hit_kind != "exact":
                    raise RuntimeError(f"the in-process repeat was not an exact hit: {c.stats}")
                inproc.append(t)
                await model.evict()
                t0 = time.perf_counter()
                answer = await asyncio.to_thread(post)
                http.append((time.perf_counter() - t0) * 1e3)
                cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                if cached != n:
                    raise RuntimeError(f"the HTTP repeat reported {cached} cached tokens")
        finally:
            await server.stop()
    med = statistics.median
    return {
        "prompt_tokens": n,
        "in_process_ms": round(med(inproc), 1),
        "http_ms": round(med(http), 1),
        "http_overhead_ms": round(med(http) - med(inproc), 1),
    }


async def _ram_file_modes(
    path: Path, n: int, threads: int | None, repeats: int, root: Path
) -> dict[str, Any]:
    """A warm ``n``-token exact hit from ``ram_file`` read back with
    ``read(2)`` and with ``mmap`` (restored straight from the mapping): two
    engines over one directory, runs alternating, each after an evict."""
    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)

    def config(load: str) -> erllama.CacheConfig:
        return erllama.CacheConfig(
            ram_file_dir=root / "shm",
            ram_file_quota=8 << 30,
            ram_file_load=load,  # type: ignore[arg-type]
        )

    async with (
        erllama.Engine(cache=config("read"), policy=policy) as read_engine,
        erllama.Engine(cache=config("mmap"), policy=policy) as map_engine,
    ):
        models = {}
        for name, engine in (("read", read_engine), ("mmap", map_engine)):
            models[name] = await engine.load_model(
                path, n_ctx=n + 64, n_batch=512, n_threads=threads, tier="ram_file"
            )
        tokens = await prompt_tokens(models["read"], n, salt=4242)
        _say(f"ram_file modes: the cold {n}-token prompt")
        cold = await models["read"].complete(tokens, max_tokens=1)
        read_engine.cache.settle(300)
        await models["read"].evict()
        ttft: dict[str, list[float]] = {"read": [], "mmap": []}
        restore: dict[str, list[float]] = {"read": [], "mmap": []}
        for r in range(repeats):
            _say(f"ram_file modes: run {r + 1}/{repeats}")
            for name in ("read", "mmap") if r % 2 == 0 else ("mmap", "read"):
                t, c = await _complete_timed(models[name], tokens)
                if c.stats.cache_hit_kind != "exact" or c.tokens != cold.tokens:
                    raise RuntimeError(f"{name}: not an identical exact hit: {c.stats}")
                ttft[name].append(t)
                restore[name].append(c.stats.restore_ms)
                await models[name].evict()
    med = statistics.median
    return {
        "prompt_tokens": n,
        "read_warm_ms": round(med(ttft["read"]), 1),
        "mmap_warm_ms": round(med(ttft["mmap"]), 1),
        "read_restore_ms": round(med(restore["read"]), 2),
        "mmap_restore_ms": round(med(restore["mmap"]), 2),
    }


async def _remote(
    path: Path, n: int, threads: int | None, repeats: int, root: Path
) -> dict[str, Any]:
    """A warm ``n``-token exact hit from the remote tier (a loopback
    redis-server) against the cold prompt and a hit from ``disk``, in one run:
    a writer engine saves to disk and Redis; a reader with only Redis (its
    ``ram`` tier emptied before each run) and a reader over the writer's
    directory answer the same prompt alternately, each run after 0.5 s idle. Also how long after the
    writer's answer its rows are published everywhere (a reader's next
    lookup hits: there is no polling)."""
    from erllama.redis_server import RedisServer

    policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
    with RedisServer(root) as server:
        writer_cache = erllama.CacheConfig(
            disk_dir=root / "disk", disk_quota=32 << 30, remote_url=server.url, remote_quota=8 << 30
        )
        far_cache = erllama.CacheConfig(remote_url=server.url, remote_quota=8 << 30)
        async with (
            erllama.Engine(cache=writer_cache, policy=policy) as writer,
            erllama.Engine(cache=far_cache, policy=policy) as far,
            erllama.Engine(
                cache=erllama.CacheConfig(disk_dir=root / "disk", disk_quota=32 << 30),
                policy=policy,
            ) as near,
        ):
            load = {"n_ctx": n + 64, "n_batch": 512, "n_threads": threads}
            w = await writer.load_model(path, tier="disk", **load)  # type: ignore[arg-type]
            engines = {"remote": far, "disk": near}
            models = {
                "remote": await far.load_model(path, tier="ram", **load),  # type: ignore[arg-type]
                "disk": await near.load_model(path, tier="disk", **load),  # type: ignore[arg-type]
            }
            cold_ms: list[float] = []
            publish_ms: list[float] = []
            ttft: dict[str, list[float]] = {"remote": [], "disk": []}
            restore: dict[str, list[float]] = {"remote": [], "disk": []}
            for r in range(repeats):
                _say(f"remote: run {r + 1}/{repeats} (cold prompt on the writer)")
                tokens = await prompt_tokens(w, n, salt=7000 + r)
                t_cold, cold = await _complete_timed(w, tokens)
                answered = time.perf_counter()
                writer.cache.settle(300)
                publish_ms.append((time.perf_counter() - answered) * 1e3)
                cold_ms.append(t_cold)
                for rep in range(3):
                    order = ("remote", "disk") if (r + rep) % 2 == 0 else ("disk", "remote")
                    for name in order:
                        # Freed (an evict saves the sequence: let that save
                        # land), then the reader's own rows dropped: the hit
                        # is remote.
                        await models[name].evict()
                        engines[name].cache.settle(300)
                        far.cache.gc()
                        # Start idle: the other engines' llama.cpp threads
                        # spin for a while after they compute, and on two
                        # cores that would slow whichever run comes next.
                        await asyncio.sleep(0.5)
                        t, c = await _complete_timed(models[name], tokens)
                        if c.stats.cache_tier != name or c.tokens != cold.tokens:
                            raise RuntimeError(f"{name}: not an identical hit: {c.stats}")
                        ttft[name].append(t)
                        restore[name].append(c.stats.restore_ms)
                await w.evict()
                writer.cache.gc()
            counters = far.cache.counters()
    med = statistics.median
    return {
        "prompt_tokens": n,
        "cold_ms": round(med(cold_ms), 1),
        "remote_warm_ms": round(med(ttft["remote"]), 1),
        "remote_restore_ms": round(med(restore["remote"]), 1),
        "disk_warm_ms": round(med(ttft["disk"]), 1),
        "disk_restore_ms": round(med(restore["disk"]), 1),
        "remote_speedup": round(med(cold_ms) / med(ttft["remote"]), 1),
        "disk_speedup": round(med(cold_ms) / med(ttft["disk"]), 1),
        "publish_ms": round(med(publish_ms), 1),
        "remote_samples_ms": [round(x, 1) for x in ttft["remote"]],
        "disk_samples_ms": [round(x, 1) for x in ttft["disk"]],
        "remote_mb": round(
            counters["remote_bytes_read"] / max(1, counters["remote_hits"]) / 1e6, 1
        ),
    }


async def _stream_timed(model: erllama.Model, tokens: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed request: time to first token, end, and its stats."""
    t0 = time.perf_counter()
    stream = model.stream(tokens, max_tokens=max_tokens)
    first: float | None = None
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    c = stream.completion
    assert c is not None
    return {
        "ttft_ms": ((first or end) - t0) * 1e3,
        "start": t0,
        "first": first or end,
        "end": end,
        "tokens": c.stats.completion_tokens,
        "hit_source": c.stats.hit_source,
        "cached": c.stats.cached_tokens,
    }


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def _agents(
    path: Path,
    threads: int | None,
    repeats: int,
    flash_attn: FlashAttn = "auto",
    counts: tuple[int, ...] = (4, 8),
) -> list[dict[str, Any]]:
    """N concurrent agents sharing a 2048-token prefix (in the cache), each
    with its own ~70-token suffix and 32 generated tokens, on one model with
    ``parallel=N``, against one warm agent alone on the same model."""
    out = []
    for n in counts:
        async with erllama.Engine() as engine:
            model = await engine.load_model(
                path,
                n_ctx=4096,
                n_batch=512,
                n_threads=threads,
                parallel=n,
                flash_attn=flash_attn,
            )
            prefix = await prompt_tokens(model, 2048, salt=7)
            suffixes = [
                await model.tokenize(
                    f" Agent {i} asks about keeper number {i} and the storms of that winter." * 5,
                    add_bos=False,
                )
                for i in range(1 + repeats * (n + 1))
            ]
            _say(f"agents x{n}: the first agent computes and saves the shared prefix")
            await model.complete([*prefix, *suffixes[0]], max_tokens=1)
            engine.cache.settle(300)
            used = 1
            singles: list[float] = []
            ttfts: list[float] = []
            shared = 0
            for r in range(repeats):
                _say(f"agents x{n}: run {r + 1}/{repeats}")
                # Both start from the cache alone (no warm sequence).
                await model.evict()
                one = await _stream_timed(model, [*prefix, *suffixes[used]], 32)
                used += 1
                assert one["cached"] >= 2048, one
                singles.append(one["ttft_ms"])
                await model.evict()
                runs = await asyncio.gather(
                    *(_stream_timed(model, [*prefix, *suffixes[used + k]], 32) for k in range(n))
                )
                used += n
                ttfts += [x["ttft_ms"] for x in runs]
                shared += sum(1 for x in runs if x["hit_source"] == "shared")
            single = statistics.median(singles)
            mean = statistics.fmean(ttfts)
            out.append(
                {
                    "agents": n,
                    "shared_prefix_tokens": 2048,
                    "suffix_tokens": len(suffixes[1]),
                    "single_warm_ms": round(single, 1),
                    "min_ms": round(min(ttfts), 1),
                    "p50_ms": round(statistics.median(ttfts), 1),
                    "p99_ms": round(_pct(ttfts, 0.99), 1),
                    "mean_ms": round(mean, 1),
                    "mean_over_single": round(mean / single, 2),
                    "shared_hits": shared,
                    "requests": len(ttfts),
                }
            )
    return out


async def _parallel(
    path: Path, threads: int | None, repeats: int, flash_attn: FlashAttn = "auto"
) -> dict[str, Any]:
    """Decode throughput of 1 and 4 concurrent sequences, and a lone request
    on ``parallel=4`` against ``parallel=1`` (TTFT of a 512-token prompt,
    decode tok/s over 128 tokens), runs alternating, medians."""
    prompts_text = [
        f"Count slowly from {i} to one thousand, one number per line:" for i in range(9)
    ]
    lone: dict[int, dict[str, list[float]]] = {
        1: {"ttft": [], "decode": []},
        4: {"ttft": [], "decode": []},
    }
    agg: dict[int, list[float]] = {1: [], 4: []}
    async with erllama.Engine() as engine:
        models = {
            par: await engine.load_model(
                path,
                model_id=f"p{par}",
                n_ctx=4096,
                n_batch=512,
                n_threads=threads,
                parallel=par,
                flash_attn=flash_attn,
            )
            for par in (1, 4)
        }
        long_prompts = [
            await prompt_tokens(models[1], 512, salt=100 + i) for i in range(2 * repeats)
        ]
        shorts = [await models[4].tokenize(t) for t in prompts_text]
        for r in range(repeats):
            _say(f"parallel: run {r + 1}/{repeats}")
            for par in (1, 4):
                m = models[par]
                await m.evict()
                x = await _stream_timed(m, long_prompts[2 * r + (par == 4)], 128)
                lone[par]["ttft"].append(x["ttft_ms"])
                lone[par]["decode"].append((x["tokens"] - 1) / (x["end"] - x["first"]))
            for k in (1, 4):
                m = models[4]
                await m.evict()
                runs = await asyncio.gather(*(_stream_timed(m, shorts[i], 128) for i in range(k)))
                # From the moment every sequence decodes to the first end.
                first = max(x["first"] for x in runs)
                end = min(x["end"] for x in runs)
                agg[k].append(_decoded_between(runs, first, end) / (end - first))
    med = statistics.median
    return {
        "lone_parallel1_ttft_ms": round(med(lone[1]["ttft"]), 1),
        "lone_parallel4_ttft_ms": round(med(lone[4]["ttft"]), 1),
        "lone_parallel1_decode_tok_s": round(med(lone[1]["decode"]), 1),
        "lone_parallel4_decode_tok_s": round(med(lone[4]["decode"]), 1),
        "decode_1_seq_tok_s": round(med(agg[1]), 1),
        "decode_4_seq_tok_s": round(med(agg[4]), 1),
        "decode_4_over_1": round(med(agg[4]) / med(agg[1]), 2),
    }


def _decoded_between(runs: list[dict[str, Any]], since: float, until: float) -> float:
    """Tokens the runs generated between ``since`` and ``until``, each at its
    steady rate between its first token and its end."""
    total = 0.0
    for x in runs:
        span = x["end"] - x["first"]
        if span <= 0:
            continue
        inside = min(until, x["end"]) - max(since, x["first"])
        total += (x["tokens"] - 1) * max(inside, 0.0) / span
    return total


async def _restart_once(path: Path, cache_dir: Path, n: int, threads: int | None) -> float:
    async with erllama.Engine(cache=erllama.CacheConfig(disk_dir=cache_dir)) as engine:
        model = await engine.load_model(
            path, n_ctx=n + 64, n_batch=512, n_threads=threads, tier="disk"
        )
        tokens = await prompt_tokens(model, n, salt=42)
        t, c = await _complete_timed(model, tokens)
        return t if c.stats.cache_hit_kind == "exact" else -t


def _restart(path: Path, n: int, threads: int | None) -> dict[str, Any]:
    cache_dir = Path(tempfile.mkdtemp(prefix="erllama-bench-restart-"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "erllama.bench",
            "--restart-child",
            os.fspath(path),
            os.fspath(cache_dir),
            str(n),
            str(threads or 0),
        ]
        _say("restart: process 1 (cold, writes the disk tier)")
        cold = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        _say("restart: process 2 (warm from disk)")
        warm = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "prompt_tokens": n,
        "cold_ms": round(-cold, 1),
        "warm_after_restart_ms": round(warm, 1),
        "speedup": round(-cold / warm, 1) if warm > 0 else None,
        "warm_was_exact_hit": warm > 0,
    }


def _peer(
    python: Path, path: Path, sizes: list[int], threads: int | None, repeats: int
) -> list[dict[str, Any]]:
    script = Path(__file__).with_name("_peer_llama_cpp.py")
    cmd = [
        os.fspath(python),
        os.fspath(script),
        "--model",
        os.fspath(path),
        "--sizes",
        *map(str, sizes),
        "--threads",
        str(threads or os.cpu_count() or 1),
        "--repeats",
        str(repeats),
    ]
    _say(f"peer: llama-cpp-python via {python}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return list(json.loads(out.stdout))


_SPEED_PROBE = r"""
import json, sys, time
from erllama._erllama import Model
path, tokens = sys.argv[1], json.loads(sys.argv[2])
decode, threads = int(sys.argv[3]), int(sys.argv[4])
model = Model(path)
ctx = model.new_context(n_ctx=len(tokens) + decode + 16, n_batch=512, n_threads=threads)
ctx.prefill(tokens[:8])  # warm-up: first touch of weights and buffers
ctx.clear()
t0 = time.perf_counter()
ctx.prefill(tokens)
t1 = time.perf_counter()
out = [ctx.decode_one() for _ in range(decode)]
t2 = time.perf_counter()
print(json.dumps({"prefill_tok_s": len(tokens) / (t1 - t0), "decode_tok_s": decode / (t2 - t1),
                  "tokens": out}))
"""


def _speed(
    path: Path,
    n: int,
    decode: int,
    threads: int | None,
    repeats: int,
    peer_python: Path | None,
) -> dict[str, Any]:
    """Cold prefill and decode tok/s, erllama and (optionally) llama-cpp-python
    in turn, each run in a fresh process on the same tokens and threads."""
    from erllama._erllama import Model

    text = " ".join(
        f"Station {i} on the northern line opened in {1870 + 3 * i} and serves {i % 7 + 2} "
        "platforms."
        for i in range(4 * n // 10 + 50)
    )
    tokens = Model(os.fspath(path)).tokenize(text)[:n]
    threads = threads or os.cpu_count() or 1
    runs: dict[str, list[dict[str, Any]]] = {"erllama": [], "peer": []}
    peer_script = Path(__file__).with_name("_peer_llama_cpp.py")
    for _ in range(repeats):
        own = [sys.executable, "-c", _SPEED_PROBE, os.fspath(path), json.dumps(tokens)]
        own += [str(decode), str(threads)]
        out = subprocess.run(own, check=True, capture_output=True, text=True).stdout
        runs["erllama"].append(json.loads(out.strip().splitlines()[-1]))
        if peer_python is not None:
            cmd = [os.fspath(peer_python), os.fspath(peer_script), "--model", os.fspath(path)]
            cmd += ["--threads", str(threads), "--decode", str(decode)]
            cmd += ["--speed-tokens", json.dumps(tokens)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs["peer"].append(json.loads(out.strip().splitlines()[-1]))
    result: dict[str, Any] = {"prompt_tokens": n, "decode_tokens": decode, "threads": threads}
    for who, rs in runs.items():
        if rs:
            result[who] = {
                "prefill_tok_s": round(statistics.median(r["prefill_tok_s"] for r in rs), 1),
                "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 1),
                "version": rs[0].get("version", "erllama"),
            }
    if runs["peer"]:
        # Same greedy tokens: the two runtimes compute the same thing.
        result["same_tokens"] = runs["erllama"][0]["tokens"] == runs["peer"][0]["tokens"]
    return result


def run_bench(
    *,
    model_path: Path,
    sizes: list[int],
    tiers: list[str],
    repeats: int,
    threads: int | None,
    peer: str | None,
    peer_python: Path | None,
    as_json: bool,
    parts: list[str],
    flash_attn: FlashAttn = "auto",
) -> int:
    """Runs the chosen parts and prints tables (or one JSON object)."""
    result: dict[str, Any] = {
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "threads": threads,
        "model": model_path.name,
        "flash_attn": flash_attn,
    }
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    if "ttft" in parts:
        rows: list[dict[str, Any]] = []
        for tier in tiers:
            root = Path(
                tempfile.mkdtemp(prefix="erllama-bench-", dir=shm if tier == "ram_file" else None)
            )
            try:
                rows += asyncio.run(_ttft_tier(tier, sizes, repeats, threads, root, model_path))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        result["ttft"] = rows
        _say("ttft results: " + json.dumps(rows))
    if "kv" in parts:
        root = Path(tempfile.mkdtemp(prefix="erllama-bench-kv-"))
        try:
            n = 2048 if 2048 in sizes else max(sizes)
            result["kv"] = asyncio.run(_kv_types(model_path, n, threads, repeats, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        _say("kv results: " + json.dumps(result["kv"]))
    if "http" in parts:
        n = 2048 if 2048 in sizes else max(sizes)
        result["http"] = asyncio.run(_http(model_path, n, threads, max(repeats, 5)))
        _say("http results: " + json.dumps(result["http"]))
    if "ram_file" in parts:
        root = Path(tempfile.mkdtemp(prefix="erllama-bench-modes-", dir=shm))
        try:
            n = 2048 if 2048 in sizes else max(sizes)
            result["ram_file"] = asyncio.run(
                _ram_file_modes(model_path, n, threads, max(repeats, 5), root)
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        _say("ram_file results: " + json.dumps(result["ram_file"]))
    if "remote" in parts:
        root = Path(tempfile.mkdtemp(prefix="erllama-bench-remote-"))
        try:
            n = 2048 if 2048 in sizes else max(sizes)
            result["remote"] = asyncio.run(_remote(model_path, n, threads, repeats, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        _say("remote results: " + json.dumps(result["remote"]))
    if "agents" in parts:
        result["agents"] = asyncio.run(_agents(model_path, threads, repeats, flash_attn))
        _say("agents results: " + json.dumps(result["agents"]))
    if "parallel" in parts:
        result["parallel"] = asyncio.run(_parallel(model_path, threads, repeats, flash_attn))
        _say("parallel results: " + json.dumps(result["parallel"]))
    if "restart" in parts:
        result["restart"] = _restart(model_path, 2048, threads)
        _say("restart results: " + json.dumps(result["restart"]))
    python: Path | None = None
    if peer == "llama-cpp-python":
        python = peer_python or Path.home() / ".cache/erllama/peer-venv/bin/python"
        if not python.exists():
            raise FileNotFoundError(
                f"{python} not found: create a venv with llama-cpp-python "
                "(python -m venv ~/.cache/erllama/peer-venv && "
                "~/.cache/erllama/peer-venv/bin/pip install llama-cpp-python==0.3.36)"
            )
    if "clients" in parts:
        result["clients"] = _clients(model_path, threads, python)
        _say("clients results: " + json.dumps(result["clients"]))
    if "speed" in parts:
        result["speed"] = [_speed(model_path, n, 64, threads, repeats, python) for n in sizes]
        _say("speed results: " + json.dumps(result["speed"]))
    if python is not None and "ttft" in parts:
        result["peer"] = _peer(python, model_path, sizes, threads, repeats)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


_CLIENT_PARAGRAPH = (
    "Operations handbook. Every request is logged with its time, its route and its "
    "outcome; an operator reviews the logs each morning and files an incident for any "
    "route whose error rate rose. "
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready after {timeout_s} s")


def _stream_chat(base: str, body: dict[str, Any]) -> tuple[float, int, float]:
    """One streamed chat: (ms to the first content, content chunks, ms to the end)."""
    import urllib.request

    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    t0 = time.perf_counter()
    first: float | None = None
    chunks = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = (time.perf_counter() - t0) * 1e3
    end = (time.perf_counter() - t0) * 1e3
    return (first if first is not None else end), chunks, end


def _drive(base: str, model: str, system: str, clients: int, rounds: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``rounds`` chats in turn (a shared
    system prompt, its own question); TTFT percentiles and aggregate tok/s."""
    from concurrent.futures import ThreadPoolExecutor

    def client(i: int) -> list[tuple[float, int, float]]:
        out = []
        for j in range(rounds):
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Client {i}, question {j}: what is rule {i + j}?"},
                ],
                "max_tokens": 32,
                "temperature": 0,
                "stream": True,
            }
            out.append(_stream_chat(base, body))
        return out

    # Warm-up: the shared prefix computed once on each server.
    _stream_chat(
        base,
        {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "Ready?"},
            ],
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        },
    )
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(results),
        "ttft_p50_ms": round(_pct(ttft, 0.5), 0),
        "ttft_p99_ms": round(_pct(ttft, 0.99), 0),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "aggregate_tok_s": round(tokens / wall, 1),
    }


def _clients(
    path: Path,
    threads: int | None,
    peer_python: Path | None,
    clients: int = 16,
    rounds: int = 2,
    parallel: int = 4,
) -> dict[str, Any]:
    """``clients`` concurrent chat clients against ``erllama serve
    --parallel`` and, with a peer, llama-cpp-python's server (its RAM
    cache on), one server at a time on the same machine."""
    from erllama._erllama import Model as _Tokenizer

    t = str(threads or os.cpu_count() or 1)
    # A system prompt of 2048 tokens (and a few more: whole paragraphs).
    tokenizer = _Tokenizer(os.fspath(path))
    system = "You follow the handbook. "
    while len(tokenizer.tokenize(system, add_bos=False)) < 2048:
        system += _CLIENT_PARAGRAPH
    system_tokens = len(tokenizer.tokenize(system, add_bos=False))
    del tokenizer
    out: dict[str, Any] = {
        "clients": clients,
        "rounds": rounds,
        "parallel": parallel,
        "system_tokens": system_tokens,
    }
    servers: list[tuple[str, list[str]]] = []
    port = _free_port()
    servers.append(
        (
            "erllama",
            [
                sys.executable,
                "-m",
                "erllama",
                "serve",
                "--model",
                os.fspath(path),
                "--model-id",
                "m",
                "--port",
                str(port),
                "--parallel",
                str(parallel),
                "--n-ctx",
                "4096",
                "--threads",
                t,
            ],
        )
    )
    if peer_python is not None:
        port2 = _free_port()
        servers.append(
            (
                "llama-cpp-python",
                [
                    os.fspath(peer_python),
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    os.fspath(path),
                    "--model_alias",
                    "m",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port2),
                    "--n_ctx",
                    "4096",
                    "--n_batch",
                    "512",
                    "--n_threads",
                    t,
                    "--n_threads_batch",
                    t,
                    "--cache",
                    "true",
                    "--cache_type",
                    "ram",
                    # Its default drops a running stream when a new request
                    # arrives; queue them instead, as a server for many
                    # clients must.
                    "--interrupt_requests",
                    "false",
                ],
            )
        )
    for name, cmd in servers:
        base = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        _say(f"clients: {clients} clients x {rounds} against {name}")
        # Logs go to a file: a pipe nobody reads would fill and stall the server.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            try:
                _wait_ready(base, proc)
                out[name] = _drive(base, "m", system, clients, rounds)
            except Exception:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                _say(f"clients: {name} failed; its log ends with:\n{tail}")
                raise
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _say(f"clients: {name}: {json.dumps(out[name])}")
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def render(r: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    out = [
        f"{r['cpu']}, {r['cores']} cores, threads={r['threads'] or 'all'}, {r['model']}, "
        f"flash_attn={r.get('flash_attn', 'auto')}",
        "",
    ]
    if "ttft" in r:
        out += [
            "| tier | prompt | cold TTFT | warm TTFT | speed-up | restore | bound "
            "| bound/restore | state | pack (% of prefill) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["ttft"]:
            cold_disk = x.get("cold_disk_bound_ms")
            bound = f"{x['bound_ms']:.1f} ms" + (
                f" ({cold_disk:.0f} ms cold)" if cold_disk is not None else ""
            )
            out.append(
                f"| {x['tier']} | {x['prompt_tokens']} | {x['cold_ms'] / 1e3:.2f} s | "
                f"{x['warm_ms']:.1f} ms | {x['speedup']:.0f}x | {x['restore_ms']:.1f} ms | "
                f"{bound} | {x['restore_vs_bound_pct']:.0f} % | {x['state_mb']:.0f} MB | "
                f"{x['pack_ms']:.0f} ms ({x['pack_pct_of_prefill']:.1f} %) |"
            )
        out.append("")
    if "kv" in r:
        out += [
            "| KV type | tier | prompt | row | bytes/token | vs f16 | restore | warm TTFT "
            "| hits = cold |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for x in r["kv"]:
            out.append(
                f"| {x['kv']} | {x['tier']} | {x['prompt_tokens']} | {x['row_mb']:.1f} MB | "
                f"{x['bytes_per_token']} | {x['bytes_vs_f16_pct']:.0f} % | "
                f"{x['restore_ms']:.1f} ms | {x['warm_ms']:.1f} ms | "
                f"{'yes' if x['hits_equal_cold'] else 'NO'} |"
            )
        out.append("")
    if "http" in r:
        x = r["http"]
        out += [
            f"warm {x['prompt_tokens']}-token exact hit from ram: in-process "
            f"{x['in_process_ms']:.1f} ms, through HTTP {x['http_ms']:.1f} ms "
            f"(+{x['http_overhead_ms']:.1f} ms)",
            "",
        ]
    if "ram_file" in r:
        x = r["ram_file"]
        out += [
            f"warm {x['prompt_tokens']}-token exact hit from ram_file: read(2) "
            f"{x['read_warm_ms']:.1f} ms (restore {x['read_restore_ms']:.1f} ms), mmap "
            f"{x['mmap_warm_ms']:.1f} ms (restore {x['mmap_restore_ms']:.1f} ms)",
            "",
        ]
    if "remote" in r:
        x = r["remote"]
        out += [
            f"warm {x['prompt_tokens']}-token exact hit ({x['remote_mb']:.0f} MB row), "
            f"cold {x['cold_ms']:.0f} ms: remote (loopback Redis) {x['remote_warm_ms']:.1f} ms "
            f"({x['remote_speedup']:.0f}x, restore {x['remote_restore_ms']:.1f} ms), disk "
            f"{x['disk_warm_ms']:.1f} ms ({x['disk_speedup']:.0f}x); the writer's rows are "
            f"on disk and in Redis {x['publish_ms']:.0f} ms after its answer",
            "",
        ]
    if "agents" in r:
        out += [
            "| agents | one warm agent alone | TTFT min | p50 | p99 | mean | mean / alone "
            "| shared hits |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for a in r["agents"]:
            out.append(
                f"| {a['agents']} | {a['single_warm_ms']:.0f} ms | {a['min_ms']:.0f} ms | "
                f"{a['p50_ms']:.0f} ms | {a['p99_ms']:.0f} ms | {a['mean_ms']:.0f} ms | "
                f"{a['mean_over_single']:.2f}x | {a['shared_hits']}/{a['requests']} |"
            )
        out.append("")
    if "parallel" in r:
        x = r["parallel"]
        out += [
            "| | parallel=1 | parallel=4 |",
            "|---|---:|---:|",
            f"| lone request, 512-token TTFT | {x['lone_parallel1_ttft_ms']:.0f} ms | "
            f"{x['lone_parallel4_ttft_ms']:.0f} ms |",
            f"| lone request, decode | {x['lone_parallel1_decode_tok_s']:.1f} tok/s | "
            f"{x['lone_parallel4_decode_tok_s']:.1f} tok/s |",
            "",
            f"aggregate decode: 1 sequence {x['decode_1_seq_tok_s']:.1f} tok/s, 4 sequences "
            f"{x['decode_4_seq_tok_s']:.1f} tok/s ({x['decode_4_over_1']:.2f}x)",
            "",
        ]
    if "clients" in r:
        x = r["clients"]
        out += [
            f"{x['clients']} concurrent chat clients x {x['rounds']} requests (a shared "
            f"{x['system_tokens']}-token system prompt, 32 tokens each, streamed):",
            "",
            "| server | TTFT p50 | TTFT p99 | aggregate | wall |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("erllama", "llama-cpp-python"):
            if name in x:
                y = x[name]
                label = (
                    f"erllama serve --parallel {x['parallel']}"
                    if name == "erllama"
                    else ("llama_cpp.server --cache")
                )
                out.append(
                    f"| {label} | {y['ttft_p50_ms']:.0f} ms | {y['ttft_p99_ms']:.0f} ms | "
                    f"{y['aggregate_tok_s']:.1f} tok/s | {y['wall_s']:.1f} s |"
                )
        out.append("")
    if "restart" in r:
        x = r["restart"]
        out += [
            f"restart ({x['prompt_tokens']} tokens, disk tier): cold {x['cold_ms'] / 1e3:.2f} s "
            f"in process 1, warm {x['warm_after_restart_ms']:.0f} ms in process 2 "
            f"({x['speedup']}x)",
            "",
        ]
    if "speed" in r:
        out += [
            "| prompt | erllama prefill tok/s | erllama decode tok/s | peer prefill tok/s "
            "| peer decode tok/s | same greedy tokens |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for x in r["speed"]:
            e, p = x["erllama"], x.get("peer", {})
            out.append(
                f"| {x['prompt_tokens']} | {e['prefill_tok_s']:.0f} | {e['decode_tok_s']:.1f} | "
                f"{p.get('prefill_tok_s', float('nan')):.0f} | "
                f"{p.get('decode_tok_s', float('nan')):.1f} | {x.get('same_tokens', '-')} |"
            )
        out.append("")
    if "peer" in r:
        out += [
            "| llama-cpp-python | prompt | cold TTFT | LlamaRAMCache warm | LlamaDiskCache warm |",
            "|---|---:|---:|---:|---:|",
        ]
        for x in r["peer"]:
            out.append(
                f"| {x['version']} | {x['prompt_tokens']} | {x['cold_ms'] / 1e3:.2f} s | "
                f"{x['ram_warm_ms']:.0f} ms | {x['disk_warm_ms']:.0f} ms |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--restart-child":
        model, cache_dir, n, threads = sys.argv[2:6]
        print(
            asyncio.run(_restart_once(Path(model), Path(cache_dir), int(n), int(threads) or None))
        )
