"""Anthropic's Messages API on ``erllama serve`` (real model: SmolLM2-135M),
driven by the official ``anthropic`` client, and explicit cache breakpoints
(``cache_control`` over HTTP, ``breakpoints=`` from Python) with their pins.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import pytest_asyncio

import erllama
from erllama.errors import InvalidInputError

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

# The current client has no sampling parameters; the server still takes
# Anthropic's temperature (0 is greedy).
GREEDY: dict[str, object] = {"temperature": 0}

SYSTEM = "You are a careful assistant. " + " ".join(
    f"Fact {i}: station {i} on the southern line opened in {1900 + 3 * i}." for i in range(40)
)


class Served:
    def __init__(self, engine: erllama.Engine, server: erllama.Server, model: erllama.Model):
        self.engine, self.server, self.model = engine, server, model

    @property
    def base(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def client(self, key: str = "unused") -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.base, api_key=key, max_retries=0)


async def _served(
    model_path: Path, tmp_path: Path, api_key: str | None = None
) -> AsyncIterator[Served]:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="smol", n_ctx=2048, n_batch=256, n_threads=2, parallel=2
        )
        server = await engine.serve("127.0.0.1", 0, api_key=api_key)
        try:
            yield Served(engine, server, model)
        finally:
            await server.stop()


@pytest_asyncio.fixture
async def served(model_path: Path, tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _served(model_path, tmp_path):
        yield s


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def _breakpoint_of_system(model: erllama.Model, question: str) -> tuple[int, int]:
    """(the system block's breakpoint, the prompt's length), computed here
    independently of the server: the prompt and the system turn rendered
    alone share exactly the breakpoint's tokens."""
    full = await model.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    )
    alone = await model.apply_chat_template(
        [{"role": "system", "content": SYSTEM}], add_assistant=False
    )
    return _common_prefix(full, alone), len(full)


def _system(ttl: str | None = "5m") -> list[Any]:
    block: dict[str, Any] = {"type": "text", "text": SYSTEM}
    if ttl is not None:
        block["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return [block]


def _quiet(served: Served) -> None:
    # Rows are written off the request path; a later request (or an
    # assertion about rows) must see them in.
    assert served.engine.cache.settle()


async def test_cache_control_writes_then_reads_the_breakpoint_exactly(served: Served) -> None:
    q1, q2 = "When did station 7 open?", "When did station 12 open?"
    b, n1 = await _breakpoint_of_system(served.model, q1)
    _, n2 = await _breakpoint_of_system(served.model, q2)
    assert 400 < b < n1
    async with served.client() as client:
        first = await client.messages.create(
            model="smol",
            max_tokens=10,
            extra_body=GREEDY,
            system=_system(),
            messages=[{"role": "user", "content": q1}],
        )
        assert first.type == "message"
        assert first.role == "assistant"
        assert first.content[0].type == "text"
        assert first.content[0].text
        assert first.stop_reason in ("end_turn", "max_tokens")
        u = first.usage
        assert u.cache_creation_input_tokens == b
        assert u.cache_read_input_tokens == 0
        assert u.input_tokens == n1 - b
        assert u.cache_creation is not None
        assert u.cache_creation.ephemeral_5m_input_tokens == b
        assert u.cache_creation.ephemeral_1h_input_tokens == 0
        _quiet(served)
        # The breakpoint's row: exactly b tokens, pinned for about 5 minutes.
        rows = [r for r in served.engine.cache.dump() if r.tokens == b]
        assert len(rows) == 1
        pins = served.engine.cache.pins()
        assert rows[0].key in pins
        assert 200 < pins[rows[0].key] <= 300
        # Another question over the same system block reads it.
        await served.model.evict()
        second = await client.messages.create(
            model="smol",
            max_tokens=10,
            extra_body=GREEDY,
            system=_system("1h"),
            messages=[{"role": "user", "content": q2}],
        )
        u2 = second.usage
        assert u2.cache_read_input_tokens == b
        assert u2.cache_creation_input_tokens == 0
        assert u2.input_tokens == n2 - b
        # A read renews the pin, here to the longer TTL asked.
        assert served.engine.cache.pins()[rows[0].key] > 3000
        # Exactness: the same question computed cold (every row gone) with
        # the same breakpoint answers the same text, and writes b again.
        _quiet(served)
        assert served.engine.cache.unpin(rows[0].key)
        await served.model.evict()
        served.engine.cache.gc()
        assert served.engine.cache.dump() == []
        cold = await client.messages.create(
            model="smol",
            max_tokens=10,
            extra_body=GREEDY,
            system=_system("1h"),
            messages=[{"role": "user", "content": q2}],
        )
        assert cold.usage.cache_read_input_tokens == 0
        assert cold.usage.cache_creation_input_tokens == b
        assert cold.usage.cache_creation is not None
        assert cold.usage.cache_creation.ephemeral_1h_input_tokens == b
        assert cold.content[0].text == second.content[0].text  # type: ignore[union-attr]


async def test_streaming_gives_the_same_text_and_usage(served: Served) -> None:
    q = "When did station 3 open?"
    b, n = await _breakpoint_of_system(served.model, q)
    async with served.client() as client:
        whole = await client.messages.create(
            model="smol",
            max_tokens=12,
            extra_body=GREEDY,
            system=_system(),
            messages=[{"role": "user", "content": q}],
        )
        _quiet(served)
        await served.model.evict()
        kinds: list[str] = []
        async with client.messages.stream(
            model="smol",
            max_tokens=12,
            extra_body=GREEDY,
            system=_system(),
            messages=[{"role": "user", "content": q}],
        ) as stream:
            pieces = []
            async for event in stream:
                kinds.append(event.type)
                if event.type == "message_start":
                    # The prompt's accounting is known at the first token.
                    assert event.message.usage.cache_read_input_tokens is not None
                    assert event.message.usage.cache_read_input_tokens >= b
                if event.type == "text":
                    pieces.append(event.text)
            final = await stream.get_final_message()
    assert "".join(pieces) == whole.content[0].text  # type: ignore[union-attr]
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds
    assert "message_delta" in kinds
    # The repeat is an exact hit of the whole prompt (saved with the same
    # breakpoint): nothing to write, everything read.
    assert final.usage.cache_creation_input_tokens == 0
    assert final.usage.cache_read_input_tokens is not None
    assert final.usage.cache_read_input_tokens >= n - 1
    assert final.usage.output_tokens == whole.usage.output_tokens


async def test_stop_sequences_and_max_tokens(served: Served) -> None:
    async with served.client() as client:
        free = await client.messages.create(
            model="smol",
            max_tokens=30,
            extra_body=GREEDY,
            messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        )
        text = free.content[0].text  # type: ignore[union-attr]
        words = [w.strip(",.") for w in text.split() if len(w.strip(",.")) > 2]
        assert len(words) >= 3, text
        stop = words[2]
        stopped = await client.messages.create(
            model="smol",
            max_tokens=30,
            extra_body=GREEDY,
            stop_sequences=[stop],
            messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        )
        assert stopped.stop_reason == "stop_sequence"
        assert stopped.stop_sequence == stop
        assert stop not in stopped.content[0].text  # type: ignore[union-attr]
        short = await client.messages.create(
            model="smol",
            max_tokens=2,
            messages=[{"role": "user", "content": "Hello"}],
        )
        assert short.stop_reason == "max_tokens"
        assert short.usage.output_tokens == 2


async def test_bad_requests_get_anthropic_errors(served: Served) -> None:
    user = [{"role": "user", "content": "hi"}]
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"cache_control": {"type": "persistent"}}, "request.cache_control.type"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "system": [
                    {
                        "type": "text",
                        "text": "x",
                        "cache_control": {"type": "ephemeral", "ttl": "2h"},
                    }
                ]
            },
            "system.0.cache_control.ttl",
        ),
        ({"system": [block] * 5}, "maximum of 4 blocks"),
        ({"tools": [{"name": "t", "input_schema": {"type": "object"}}]}, "tools"),
    ]
    async with served.client() as client:
        for extra, needle in cases:
            body: dict[str, Any] = {"model": "smol", "max_tokens": 4, "messages": user, **extra}
            with pytest.raises(anthropic.BadRequestError) as err:
                await client.messages.create(**body)
            assert err.value.status_code == 400
            error = err.value.body
            assert isinstance(error, dict)
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"
            assert needle in error["error"]["message"], (extra, error)
        with pytest.raises(anthropic.NotFoundError) as nf:
            await client.messages.create(model="nope", max_tokens=2, messages=user)  # type: ignore[arg-type]
        assert isinstance(nf.value.body, dict)
        assert nf.value.body["error"]["type"] == "not_found_error"
        long = [{"role": "user", "content": "word " * 3000}]
        with pytest.raises(anthropic.BadRequestError) as ctx:
            await client.messages.create(model="smol", max_tokens=8, messages=long)  # type: ignore[arg-type]
        assert isinstance(ctx.value.body, dict)
        assert "exceed n_ctx" in ctx.value.body["error"]["message"]
    async with httpx.AsyncClient(base_url=served.base) as http:
        bad = await http.post("/v1/messages", content=b"{oops")
        assert bad.status_code == 400
        assert bad.json()["type"] == "error"
    # The engine took every bad request calmly.
    async with served.client() as client:
        ok = await client.messages.create(model="smol", max_tokens=2, messages=user)  # type: ignore[arg-type]
        assert ok.usage.output_tokens >= 1


async def test_x_api_key(model_path: Path, tmp_path: Path) -> None:
    async for s in _served(model_path, tmp_path, api_key="sesame"):
        user: list[Any] = [{"role": "user", "content": "hi"}]
        async with s.client("wrong") as wrong, s.client("sesame") as right:
            with pytest.raises(anthropic.AuthenticationError) as err:
                await wrong.messages.create(model="smol", max_tokens=2, messages=user)
            assert isinstance(err.value.body, dict)
            assert err.value.body["error"]["type"] == "authentication_error"
            ok = await right.messages.create(model="smol", max_tokens=2, messages=user)
            assert ok.content


async def test_a_pinned_row_outlives_eviction_until_its_ttl(
    model_path: Path, tmp_path: Path
) -> None:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="smol", n_ctx=2048, n_threads=2)
        tokens = await model.tokenize(SYSTEM + " Which station opened in 1921?")
        n = len(tokens)
        b = 300
        # The TTL runs from the breakpoint's save, in the middle of prefill.
        first = await model.complete(tokens, max_tokens=6, breakpoints=[(b, 4.0)])
        assert first.stats.breakpoint_written == b
        assert engine.cache.settle()
        keys = {r.tokens: r.key for r in engine.cache.dump()}
        assert b in keys
        assert n in keys
        assert list(engine.cache.pins()) == [keys[b]]
        await model.evict()
        # An eviction pass keeps the pinned row and takes the rest.
        engine.cache.gc()
        assert [r.tokens for r in engine.cache.dump()] == [b]
        left = engine.cache.pins()[keys[b]]
        assert 0 < left < 4
        await asyncio.sleep(left + 0.1)
        engine.cache.gc()
        assert engine.cache.dump() == []
        assert engine.cache.pins() == {}
        # Cold again, the same breakpoint gives the same text and writes its
        # row again (not pinned: no TTL asked).
        again = await model.complete(tokens, max_tokens=6, breakpoints=[b])
        assert again.stats.breakpoint_written == b
        assert again.text == first.text
        assert engine.cache.pins() == {}
        assert engine.cache.settle()
        await model.evict()
        # A longer prompt with the same breakpoint restores it.
        other = await model.complete(tokens + tokens[-5:], max_tokens=6, breakpoints=[b])
        assert other.stats.breakpoint_written == 0
        assert other.stats.cached_tokens == b
        assert other.stats.hit_source == "longest_prefix"
        # A pin of a missing row, and bad breakpoints, are refused clearly.
        with pytest.raises(InvalidInputError):
            engine.cache.pin("0" * 64, 10)
        for bad in ([0], [n + 1], [5, 5], [(5, -1.0)], "12"):
            with pytest.raises(InvalidInputError):
                await model.complete(tokens, max_tokens=1, breakpoints=bad)  # type: ignore[arg-type]


async def test_breakpoint_rows_never_answer_a_prompt_without_them(
    model_path: Path, tmp_path: Path
) -> None:
    """A prompt prefilled with a breakpoint rounds differently past it, so
    its rows past the breakpoint are keyed apart: a request without the
    breakpoint never restores them (and one with it does)."""
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(model_path, model_id="smol", n_ctx=2048, n_threads=2)
        tokens = await model.tokenize(SYSTEM + " Which station opened in 1930?")
        n = len(tokens)
        with_bp = await model.complete(tokens, max_tokens=6, breakpoints=[300])
        assert engine.cache.settle()
        await model.evict()
        plain = await model.complete(tokens, max_tokens=6)
        assert plain.stats.cached_tokens < 300
        assert engine.cache.settle()
        await model.evict()
        repeat = await model.complete(tokens, max_tokens=6, breakpoints=[300])
        assert repeat.stats.cache_hit_kind == "exact"
        assert repeat.stats.cached_tokens == n
        assert repeat.text == with_bp.text


async def test_top_level_cache_control_marks_the_last_block(served: Served) -> None:
    msgs: list[Any] = [
        {"role": "user", "content": SYSTEM},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "When did station 9 open?"},
    ]
    full = await served.model.apply_chat_template(msgs)
    upto = await served.model.apply_chat_template(msgs, add_assistant=False)
    b = _common_prefix(full, upto)
    assert len(full) - 8 < b < len(full)
    async with served.client() as client:
        r = await client.messages.create(
            model="smol",
            max_tokens=4,
            messages=msgs,
            cache_control={"type": "ephemeral", "ttl": "1h"},
            extra_body=GREEDY,
        )
    assert r.usage.cache_creation_input_tokens == b
    assert r.usage.input_tokens == len(full) - b
    assert r.usage.cache_creation is not None
    assert r.usage.cache_creation.ephemeral_1h_input_tokens == b
