"""The HTTP server (real model: SmolLM2-135M), driven by the official
``openai`` client and, for what a client library hides, raw HTTP.

Each test starts a server on a free loopback port (``port=0``) over its own
engine and stops it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

import erllama

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

SYSTEM = "You are a careful assistant. " + " ".join(
    f"Fact {i}: station {i} on the northern line has {i % 5 + 2} platforms." for i in range(40)
)


@dataclass
class Served:
    engine: erllama.Engine
    server: erllama.Server
    model: erllama.Model

    @property
    def base(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def client(self, key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)


async def _served(
    model_path: Path, tmp_path: Path, api_key: str | None = None, max_queue: int = 64
) -> AsyncIterator[Served]:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="smol", n_ctx=2048, n_batch=256, n_threads=2, parallel=2
        )
        server = await engine.serve("127.0.0.1", 0, api_key=api_key, max_queue=max_queue)
        try:
            yield Served(engine, server, model)
        finally:
            await server.stop()


@pytest_asyncio.fixture
async def served(model_path: Path, tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _served(model_path, tmp_path):
        yield s


def _messages(question: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_chat_repeats_from_the_cache_and_streams_the_same_text(served: Served) -> None:
    async with served.client() as client:
        await _repeat_and_stream(client, served)


async def _repeat_and_stream(client: openai.AsyncOpenAI, served: Served) -> None:
    messages = _messages("How many platforms has station 7?")
    first = await client.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=12,
        temperature=0,
    )
    assert first.choices[0].message.role == "assistant"
    text = first.choices[0].message.content
    assert text
    assert first.usage is not None
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens > 400
    assert first.usage.completion_tokens == 12 or first.choices[0].finish_reason == "stop"
    assert first.usage.total_tokens == prompt_tokens + first.usage.completion_tokens
    # Free the sequences: the repeat is restored from the cache (once the
    # prompt's row, written off the request path, is in).
    assert served.engine.cache.settle()
    await served.model.evict()
    again = await client.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=12,
        temperature=0,
    )
    assert again.choices[0].message.content == text
    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    # Exactly the prompt tokens not computed: all of them for an exact hit.
    assert again.usage.prompt_tokens_details.cached_tokens == prompt_tokens
    # Streamed: the same text, the role first, usage last when asked for.
    stream = await client.chat.completions.create(
        model="smol",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, roles, finish, usage = [], [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert roles == ["assistant"]
    assert finish == first.choices[0].finish_reason
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert cached > 0


async def test_completions_models_and_content_parts(served: Served) -> None:
    async with served.client() as client:
        await _completions_and_parts(client, served)


async def _completions_and_parts(client: openai.AsyncOpenAI, served: Served) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smol"]
    tokens = await served.model.tokenize("The northern line opened in")
    by_text = await client.completions.create(
        model="smol", prompt="The northern line opened in", max_tokens=6, temperature=0
    )
    by_tokens = await client.completions.create(
        model="smol", prompt=tokens, max_tokens=6, temperature=0
    )
    assert by_text.choices[0].text == by_tokens.choices[0].text != ""
    assert by_text.object == "text_completion"
    streamed = await client.completions.create(
        model="smol", prompt=tokens, max_tokens=6, temperature=0, stream=True
    )
    text = "".join([c.choices[0].text async for c in streamed if c.choices])
    assert text == by_text.choices[0].text
    # Content parts are the same text as a string.
    parts = await client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        max_tokens=5,
        temperature=0,
    )
    plain = await client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        temperature=0,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    # A fixed seed repeats at temperature > 0.
    seeded = [
        await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=6,
            temperature=1.0,
            seed=11,
        )
        for _ in range(2)
    ]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content


async def test_bad_requests_get_openai_errors_naming_the_field(served: Served) -> None:
    async with served.client() as client:
        await _bad_requests(client, served)


async def _bad_requests(client: openai.AsyncOpenAI, served: Served) -> None:
    msgs: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, object], str | None]] = [
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": "high"}, "top_p"),
        ({"stop": [1, 2]}, "stop"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": _deep(40)},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 7}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ]
    for extra, param in cases:
        body = {"model": "smol", "messages": msgs, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(**body)  # type: ignore[call-overload]
        assert err.value.status_code == 400
        error = err.value.body
        assert isinstance(error, dict)
        if param is not None:
            assert error["param"] == param, extra
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as nf:
        await client.chat.completions.create(model="nope", messages=msgs, max_tokens=2)
    assert isinstance(nf.value.body, dict)
    assert nf.value.body["code"] == "model_not_found"
    long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as ctx:
        await client.chat.completions.create(model="smol", messages=long, max_tokens=8)
    assert isinstance(ctx.value.body, dict)
    assert ctx.value.body["code"] == "context_length_exceeded"
    async with httpx.AsyncClient(base_url=served.base) as http:
        bad = await http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400
        assert "not valid JSON" in bad.json()["error"]["message"]
        huge = await http.post("/v1/completions", content=b"x" * (9 << 20))
        assert huge.status_code == 413
        assert (await http.get("/health")).json() == {"status": "ok"}
        assert (await http.get("/nowhere")).status_code == 404
    # The engine served every bad request without harm.
    ok = await client.chat.completions.create(model="smol", messages=msgs, max_tokens=2)
    assert ok.choices[0].message.content is not None


async def test_api_key_and_overload(model_path: Path, tmp_path: Path) -> None:
    async for s in _served(model_path, tmp_path, api_key="sesame", max_queue=1):
        async with s.client("wrong") as wrong, s.client("sesame") as right:
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
            assert [m.id for m in (await right.models.list()).data] == ["smol"]
        async with httpx.AsyncClient(base_url=s.base, timeout=120) as http:
            assert (
                await http.get("/v1/models", headers={"x-api-key": "sesame"})
            ).status_code == 200
            body = {
                "model": "smol",
                "messages": [{"role": "user", "content": "Count to fifty."}],
                "max_tokens": 40,
            }
            auth = {"authorization": "Bearer sesame"}
            replies = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body, headers=auth) for _ in range(4))
            )
        codes = sorted(r.status_code for r in replies)
        assert 200 in codes, codes
        assert 429 in codes, codes
        assert set(codes) <= {200, 429}
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["message"]["content"]


async def test_a_client_that_leaves_cancels_its_generation(served: Served) -> None:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Tell a very long story about trains."}],
        "max_tokens": 1500,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=served.base, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                seen += 1
            if seen >= 3:
                break
        assert served.model.info().running == 1
    # The connection is gone: the request is cancelled and its sequence
    # freed within a step.
    for _ in range(400):
        if not served.engine.inflight() and served.model.info().running == 0:
            break
        await asyncio.sleep(0.05)
    assert served.engine.inflight() == []
    assert served.model.info().running == 0


def _deep(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


async def test_json_schema_holds_the_output(served: Served) -> None:
    async with served.client() as client:
        for question in ("Describe a person as JSON.", "Invent a sailor called Ann."):
            r = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": question}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
                },
                max_tokens=120,
                temperature=0,
            )
            assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
            value = json.loads(r.choices[0].message.content or "")
            assert set(value) == {"name", "age", "pets"}
            assert isinstance(value["name"], str)
            assert len(value["name"]) <= 20
            assert isinstance(value["age"], int)
            assert 0 <= value["age"] <= 120
            assert all(p in ("cat", "dog") for p in value["pets"])
            assert len(value["pets"]) <= 3


async def test_json_mode_and_embeddings(served: Served) -> None:
    async with served.client() as client:
        r = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
            response_format={"type": "json_object"},
            max_tokens=80,
            temperature=0,
        )
        text = r.choices[0].message.content
        assert text is not None
        assert text.lstrip().startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        emb = await client.embeddings.create(model="smol", input=["a lighthouse", "a train"])
        assert [d.index for d in emb.data] == [0, 1]
        vectors = [d.embedding for d in emb.data]
        assert len(vectors[0]) == len(vectors[1]) > 0
        for v in vectors:
            assert abs(sum(x * x for x in v) - 1.0) < 1e-3
        assert vectors[0] != vectors[1]
        # The same as the engine's own embedding of those tokens.
        tokens = await served.model.tokenize("a lighthouse")
        by_ids = await client.embeddings.create(model="smol", input=tokens)
        own = await served.model.embed(tokens)
        assert by_ids.data[0].embedding == pytest.approx(own, abs=1e-6)
        assert by_ids.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
        assert emb.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError) as err:
            await client.embeddings.create(model="smol", input=[])
        assert isinstance(err.value.body, dict)
        assert err.value.body["param"] == "input"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_move(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.base, timeout=120) as http:
        before = _samples((await http.get("/metrics")).text)
        body = {"model": "smol", "prompt": "The northern line", "max_tokens": 4}
        for _ in range(2):
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        assert (await http.post("/v1/completions", json={"model": "nope"})).status_code == 400
        after = _samples((await http.get("/metrics")).text)
    ok = ("erllama_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    bad = ("erllama_http_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    assert after[ok] - before.get(ok, 0.0) == 2
    assert after[bad] - before.get(bad, 0.0) == 1
    ttft = ("erllama_time_to_first_token_seconds_count", (("model", "smol"),))
    assert after[ttft] - before.get(ttft, 0.0) == 2
    per_token = ("erllama_time_per_output_token_seconds_count", (("model", "smol"),))
    assert after[per_token] >= 2
    # Every cache counter is there, and they moved.
    counters = served.engine.cache.counters()
    for name in counters:
        key = f"erllama_cache_{name}"
        assert (key, ()) in after or (key + "_total", ()) in after, name
    misses = ("erllama_cache_misses_total", ())
    assert after[misses] > before[misses]
    assert after[("erllama_requests_running", (("model", "smol"),))] == 0
    assert ("erllama_requests_queued", (("model", "smol"),)) in after


async def test_a_system_prompt_is_reused_exactly(served: Served) -> None:
    """The leading system message is a breakpoint: a second question over it
    reuses exactly its tokens (shared or restored), and answers as it does
    cold."""
    full = await served.model.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Station 4?"}]
    )
    alone = await served.model.apply_chat_template(
        [{"role": "system", "content": SYSTEM}], add_assistant=False
    )
    b = next(
        (i for i, (x, y) in enumerate(zip(full, alone, strict=False)) if x != y),
        min(len(full), len(alone)),
    )
    assert b > 400
    async with served.client() as client:

        async def ask(question: str) -> tuple[str, int]:
            r = await client.chat.completions.create(
                model="smol", messages=_messages(question), max_tokens=8, temperature=0
            )
            assert r.usage is not None
            assert r.usage.prompt_tokens_details is not None
            cached = r.usage.prompt_tokens_details.cached_tokens
            assert cached is not None
            return r.choices[0].message.content or "", cached

        _, cached = await ask("How many platforms has station 4?")
        assert cached == 0
        warm, cached = await ask("How many platforms has station 9?")
        assert cached == b
        assert served.engine.cache.settle()
        await served.model.evict()
        served.engine.cache.gc()
        cold, cached = await ask("How many platforms has station 9?")
        assert cached == 0
        assert cold == warm
