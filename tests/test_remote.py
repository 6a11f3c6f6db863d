"""The remote tier with a real redis-server (real model): one cache shared
by processes that share no directory, a server killed and restarted under
load, a corrupted value, and the CLI's view of the tier.

The server is Debian's ``redis-server`` (``./dev`` installs it), started on
a free loopback port in a temp directory without persistence and stopped
by each test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import erllama
from erllama import _erllama
from erllama.redis_server import RedisServer

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

PROMPT = "The harbour master writes down every ship that docks. " * 30 + "Which ship came first?"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _config(url: str) -> erllama.CacheConfig:
    return erllama.CacheConfig(remote_url=url, remote_prefix="t", remote_retry_s=0.2)


WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    import erllama

    async def main(model, url, prompt):
        cache = erllama.CacheConfig(remote_url=url, remote_prefix="t")
        policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
        async with erllama.Engine(cache=cache, policy=policy) as engine:
            m = await engine.load_model(model, model_id="m", n_ctx=2048, n_threads=1)
            c = await m.complete(prompt, max_tokens=8)
            assert engine.cache.settle()
            counters = engine.cache.counters()
            print(json.dumps({"tokens": c.tokens, "kind": c.stats.cache_hit_kind,
                              "writes": counters["remote_writes"]}))

    asyncio.run(main(*sys.argv[1:4]))
    """
)


def _cold_in_another_process(model_path: Path, url: str, prompt: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(model_path), url, prompt],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def test_another_processs_cold_prompt_is_a_remote_hit_here(
    model_path: Path, redis: RedisServer
) -> None:
    async with erllama.Engine(cache=_config(redis.url), policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="m", n_ctx=2048, n_threads=1)
        other = _cold_in_another_process(model_path, redis.url, PROMPT)
        assert other["kind"] == "cold"
        assert isinstance(other["writes"], int)
        assert other["writes"] >= 1
        here = await model.complete(PROMPT, max_tokens=8)
        assert here.stats.cache_hit_kind == "exact"
        assert here.stats.cache_tier == "remote"
        assert here.tokens == other["tokens"]
        counters = engine.cache.counters()
        assert counters["remote_hits"] == 1
        assert counters["remote_bytes_read"] > 0
        # Stored in the model's tier on the way: the next hit is local.
        await model.evict()
        again = await model.complete(PROMPT, max_tokens=8)
        assert again.stats.cache_tier == "ram"
        assert again.tokens == other["tokens"]
        # The CLI sees the rows and their hits.
        rows, size = _erllama.remote_stats(redis.url, "t")
        assert rows >= 1
        assert size > 0
        listed = _erllama.remote_rows(redis.url, "t")
        assert sum(hits for _, _, hits, _ in listed) >= 1
        cli = ["cache", "ls", "--remote", redis.url, "--remote-prefix", "t", "--json"]
        out = subprocess.run(
            [sys.executable, "-m", "erllama", *cli],
            check=True,
            capture_output=True,
            text=True,
        )
        assert {r["key"] for r in json.loads(out.stdout)} == {k for k, _, _, _ in listed}


async def test_a_server_killed_mid_run_never_fails_a_request(
    model_path: Path, redis: RedisServer
) -> None:
    async with erllama.Engine(cache=_config(redis.url), policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="m", n_ctx=2048, n_threads=1)
        first = await model.complete(PROMPT, max_tokens=4)
        assert engine.cache.settle()
        assert engine.cache.counters()["remote_writes"] >= 1
        redis.stop()
        # Misses and failed writes, never a failed request.
        for i in range(3):
            c = await model.complete(f"Ship {i}. " + PROMPT, max_tokens=4)
            assert c.stats.cache_hit_kind == "cold"
        assert engine.cache.settle()
        assert engine.cache.counters()["remote_errors"] >= 1
        # Restarted empty: after the breaker's pause, rows are shared again.
        redis.start()
        time.sleep(0.3)
        second = await model.complete("Later. " + PROMPT, max_tokens=4)
        assert engine.cache.settle()
        await model.evict()
        engine.cache.gc()
        hit = await model.complete("Later. " + PROMPT, max_tokens=4)
        assert hit.stats.cache_tier == "remote"
        assert hit.tokens == second.tokens
        # A corrupted value is detected, deleted and counted; the request
        # is answered cold, with the cold answer.
        await model.evict()
        engine.cache.gc()
        keys = redis.command(b"KEYS", b"{t}:row:*").split(b"\r\n")
        rows = [k for k in keys if k.startswith(b"{t}:row:")]
        assert rows
        for k in rows:
            # Inside the payload (its last bytes): the CRC32C catches it.
            size = int(redis.command(b"STRLEN", k)[1:].strip())
            at = str(size - 100).encode()
            assert redis.command(b"SETRANGE", k, at, b"garbage").startswith(b":")
        again = await model.complete("Later. " + PROMPT, max_tokens=4)
        assert again.stats.cache_hit_kind == "cold", str(again.stats.to_dict())
        assert again.tokens == second.tokens
        assert engine.cache.counters()["remote_corrupt"] >= 1
        assert first.tokens


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("remote_url", "http://127.0.0.1:1/", "remote url"),
        ("remote_url", "redis://127.0.0.1:1/notadb", "remote url"),
        ("remote_prefix", "a{b}", "remote prefix"),
        ("remote_prefix", "", "remote prefix"),
        ("remote_quota", 0, "remote_quota"),
        ("remote_quota", -5, "remote_quota"),
        ("remote_ttl_s", float("nan"), "remote_ttl_s"),
        ("remote_timeout_s", 0, "remote_timeout_s"),
        ("remote_timeout_s", 1e9, "remote_timeout_s"),
        ("remote_connect_timeout_s", -1.0, "remote_connect_timeout_s"),
        ("remote_retry_s", "soon", "remote_retry_s"),
    ],
)
async def test_bad_remote_settings_are_refused_clearly(
    field: str, value: object, message: str
) -> None:
    from erllama.errors import InvalidInputError

    settings: dict[str, object] = {"remote_url": "redis://127.0.0.1:1/0", field: value}
    with pytest.raises(InvalidInputError, match=message):
        erllama.Engine(cache=erllama.CacheConfig(**settings))  # type: ignore[arg-type]


async def test_a_server_that_is_down_never_fails_a_request(model_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = erllama.CacheConfig(remote_url=f"redis://127.0.0.1:{port}/0", remote_retry_s=60)
    async with erllama.Engine(cache=config, policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="m", n_ctx=2048, n_threads=1)
        for i in range(2):
            c = await model.complete(f"{i}. " + PROMPT, max_tokens=2)
            assert c.stats.cache_hit_kind == "cold"
        assert engine.cache.settle()
        counters = engine.cache.counters()
        assert counters["remote_errors"] >= 1
        assert counters["remote_hits"] == 0


def _patient_config(url: str) -> erllama.CacheConfig:
    """Timeouts far longer than the tests wait on a stopped server."""
    return erllama.CacheConfig(
        remote_url=url, remote_prefix="t", remote_timeout_s=30.0, remote_connect_timeout_s=30.0
    )


def _pid(redis: RedisServer) -> int:
    assert redis.proc is not None
    return redis.proc.pid


async def test_a_hung_server_holds_up_only_the_request_that_asks_it(
    model_path: Path, redis: RedisServer
) -> None:
    """The remote lookup runs off the model's thread: while one request's
    lookup waits on a stopped (SIGSTOP) redis-server, the request beside it
    keeps decoding to its end, and a request cancelled during its lookup
    ends without waiting for the server."""
    pid = _pid(redis)
    async with erllama.Engine(cache=_patient_config(redis.url), policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="m", n_ctx=2048, n_threads=2, parallel=3
        )
        # The lookup lane is connected, and the live server said "miss".
        first = await model.complete("0. " + PROMPT, max_tokens=1)
        assert first.stats.cache_hit_kind == "cold"
        running = model.stream("Count from one to one hundred:", max_tokens=40)
        pieces = [await running.__anext__()]
        os.kill(pid, signal.SIGSTOP)
        try:
            asking = asyncio.create_task(model.complete("1. " + PROMPT, max_tokens=2))
            cancelled = model.stream("2. " + PROMPT, max_tokens=2)
            await asyncio.sleep(0.2)  # both are admitted and ask the server
            pieces += [p async for p in running]
            done = await running.result()
            assert done.stats.completion_tokens == 40, done.stats
            # Neither lookup has ended: no timeout, no answer.
            assert not asking.done()
            assert engine.cache.counters()["remote_errors"] == 0
            await engine.cancel(cancelled.request_id)
            gone = await cancelled.result()
            assert gone.stats.cancelled
            assert gone.stats.completion_tokens == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        answered = await asking
        # The server answered once it ran again: a miss, computed cold.
        assert answered.stats.cache_hit_kind == "cold"
        assert engine.cache.counters()["remote_errors"] == 0


async def test_requests_for_one_remote_row_fetch_it_once(
    model_path: Path, redis: RedisServer
) -> None:
    """A request whose prefix another request is fetching waits for that
    fetch and copies the restored cells: one remote read for both."""
    other = _cold_in_another_process(model_path, redis.url, PROMPT)
    async with erllama.Engine(cache=_config(redis.url), policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="m", n_ctx=2048, n_threads=2, parallel=2
        )
        first, second = await asyncio.gather(
            model.complete(PROMPT, max_tokens=8), model.complete(PROMPT, max_tokens=8)
        )
        assert first.stats.cache_tier == "remote", first.stats
        assert (second.stats.hit_source, second.stats.cache_hit_kind) == ("shared", "exact")
        assert first.tokens == second.tokens == other["tokens"]
        assert engine.cache.counters()["remote_hits"] == 1


async def test_unloading_during_a_hung_lookup_does_not_wait_for_the_server(
    model_path: Path, redis: RedisServer
) -> None:
    pid = _pid(redis)
    async with erllama.Engine(cache=_patient_config(redis.url), policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="m", n_ctx=2048, n_threads=2)
        await model.complete("0. " + PROMPT, max_tokens=1)  # connects the lookup lane
        os.kill(pid, signal.SIGSTOP)
        try:
            stream = model.stream("1. " + PROMPT, max_tokens=2)
            await asyncio.sleep(0.2)  # admitted, asking the stopped server
            await engine.unload("m")
            # Unloaded with the server still stopped: the request was
            # cancelled, not left waiting for the lookup.
            done = await stream.result()
            assert done.stats.cancelled
            assert engine.models() == []
            assert engine.cache.counters()["remote_errors"] == 0
        finally:
            os.kill(pid, signal.SIGCONT)
