"""The asyncio engine: load models, complete and stream, with the KV cache at work.

>>> import asyncio, erllama
>>> async def main() -> str:
...     async with erllama.Engine() as engine:
...         model = await engine.load_model("demo", backend="stub")
...         result = await model.complete("one two three", max_tokens=4)
...         return result.stats.finish_reason
>>> asyncio.run(main())
'length'

One :class:`Engine` holds the cache and any number of models; each
:class:`Model` runs its requests one at a time in arrival order on its own
thread, one token per turn, so cancels and status calls are answered between
tokens. A prompt's KV state is looked up in the cache before prefill (exact
key, then the ``parent_key`` of an earlier turn, then the longest cached
prefix) and saved after, off the request path.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal, TypedDict, Unpack

from erllama import _erllama
from erllama._erllama import (
    AdapterInfo,
    CacheRow,
    CheckResult,
    Completion,
    ModelInfo,
    SaveSummary,
    SchedulerStatus,
    Server,
    Stats,
)
from erllama.config import CacheConfig, Policy, SchedulerConfig
from erllama.errors import InvalidInputError, WorkerError

__all__ = [
    "AdapterInfo",
    "CacheRow",
    "CacheView",
    "CheckResult",
    "Completion",
    "CompletionOptions",
    "Engine",
    "LoadOptions",
    "Model",
    "ModelInfo",
    "SaveSummary",
    "SchedulerStatus",
    "SchedulerView",
    "Server",
    "Stats",
    "Stream",
]

Tier = Literal["ram", "ram_file", "disk"]
KvType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
FlashAttn = Literal["auto", "on", "off"]


class CompletionOptions(TypedDict, total=False):
    """The options of :meth:`Model.complete` and :meth:`Model.stream`.

    Declared once here (for type checkers) and once in the native module,
    which checks every value and holds the defaults; a test keeps the two
    in step (``_erllama.REQUEST_OPTIONS``). Every value is checked before
    anything runs: out of range, not finite or the wrong type raises
    :class:`~erllama.errors.InvalidInputError` naming the option.
    """

    max_tokens: int
    """Generate at most this many tokens (default 128; 0..2**32-1)."""
    temperature: float
    """0 (the default) is greedy; otherwise finite and > 0."""
    top_k: int
    """Keep the k most likely tokens (0, the default, disables it)."""
    top_p: float
    """Nucleus sampling, in (0, 1] (1, the default, disables it)."""
    min_p: float
    """Drop tokens below min_p times the best one's probability, in [0, 1]."""
    repetition_penalty: float
    """Penalise the last 64 tokens' repeats (1, the default, disables it)."""
    seed: int | None
    """Seed of the sampling RNG, 0..2**64-1 (None: a fixed default)."""
    grammar: str | None
    """A GBNF grammar the output must follow (root rule ``root``)."""
    stop: str | Sequence[str] | None
    """Generation ends before any of these strings (at most 16, non-empty)."""
    parent_key: str | None
    """An earlier turn's ``finish_key`` to resume from."""
    breakpoints: Sequence[int | tuple[int, float | None]] | None
    """Explicit cache breakpoints (at most 8, strictly increasing, within the
    prompt): the prompt's state after each of these token counts is saved as
    a row of its own whatever the policy; a ``(tokens, ttl_s)`` pair also pins
    that row against eviction for ``ttl_s`` seconds (docs/policy.md)."""


class LoadOptions(TypedDict, total=False):
    """The keyword options of :meth:`Engine.load_model`."""

    backend: str | object
    n_ctx: int
    n_batch: int
    n_threads: int | None
    parallel: int
    n_gpu_layers: int
    use_mmap: bool
    tier: Tier
    policy: Policy | None
    fingerprint_mode: Literal["safe", "gguf_chunked"]
    cache_type_k: KvType
    cache_type_v: KvType
    flash_attn: FlashAttn


class Stream:
    """The pieces of text of a running request, as an async iterator.

    The request is submitted when the stream is created, so ``request_id``
    is known (and cancellable with :meth:`Engine.cancel`) at once;
    ``completion`` and ``stats`` are set when the iteration ends. Cancelling
    the task that awaits the next piece (for example with
    ``asyncio.wait_for``) loses nothing: the next ``await`` returns it.

    >>> async def show(model: "Model") -> None:   # doctest: +SKIP
    ...     stream = model.stream("Tell me a story", max_tokens=64)
    ...     async for piece in stream:
    ...         print(piece, end="")
    ...     print(stream.stats.finish_reason)
    """

    def __init__(self, native: _erllama.Stream) -> None:
        self._native = native
        self.request_id: int = native.id

    @property
    def completion(self) -> Completion | None:
        """The completion, once the request ended."""
        return self._native.completion

    @property
    def stats(self) -> Stats | None:
        """The request's stats once it ended."""
        c = self._native.completion
        return None if c is None else c.stats

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        native = self._native
        while True:
            if native.done:
                raise StopAsyncIteration
            await native.ready()
            piece = native.take()
            if piece is None:
                raise StopAsyncIteration
            if piece:
                return piece

    async def result(self) -> Completion:
        """Consumes the rest of the stream and returns the completion."""
        async for _ in self:
            pass
        completion = self._native.completion
        if completion is None:
            raise WorkerError(f"request {self.request_id} ended without a result")
        return completion


class Model:
    """A loaded model; get one from :meth:`Engine.load_model`."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        self._engine = engine
        self._native = engine._native
        self.id = model_id

    def __repr__(self) -> str:
        return f"Model(id={self.id!r})"

    def info(self) -> ModelInfo:
        """Id, backend, status, context size, quant, tier, fingerprint, cacheability."""
        return self._native.info(self.id)

    def status(self) -> str:
        """``idle``, ``prefilling``, ``generating`` or ``stopped`` (answered at once)."""
        return self._native.status(self.id)

    async def complete(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """Completes ``prompt`` (text, or token ids) and returns the result.

        Options: see :class:`CompletionOptions`. Sampling: ``temperature`` 0
        is greedy; otherwise the chain is grammar -> repetition penalty ->
        top-k -> top-p -> min-p -> temperature -> seeded sampling. ``stop``
        strings end generation before they appear. ``parent_key`` is an
        earlier turn's ``finish_key`` to resume from.

        Raises :class:`~erllama.errors.InvalidInputError` (or a subclass) for
        bad options before anything runs, and for a bad prompt (empty, ids
        out of range, too long for the context) when the request is
        prepared.
        """
        return await self.stream(prompt, **options).result()

    def stream(self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]) -> Stream:
        """Like :meth:`complete` (same options), as a :class:`Stream` of text pieces.

        The request is submitted at once (one call into the engine, which
        checks the options and returns the request id).
        """
        return Stream(self._native.submit(self.id, prompt, dict(options)))

    async def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (control-token markup in it stays plain text)."""
        return await self._native.tokenize(self.id, text, add_bos)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``."""
        return await self._native.detokenize(self.id, tokens)

    async def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_assistant: bool = True,
    ) -> list[int]:
        """Renders a chat through the model's GGUF chat template and tokenizes it.

        ``messages`` are ``{"role": ..., "content": ...}`` maps; ``system`` is
        prepended as a system message. The built-in templates have no tool
        syntax, so ``tools`` are described as JSON in the system message.
        Raises :class:`~erllama.errors.NoTemplateError` without a template.
        """
        pairs: list[tuple[str, str]] = []
        sys_text = system
        if tools:
            described = "You can call these tools:\n" + json.dumps(list(tools), indent=2)
            sys_text = described if not sys_text else f"{sys_text}\n\n{described}"
        if sys_text:
            pairs.append(("system", sys_text))
        for m in messages:
            try:
                pairs.append((str(m["role"]), str(m["content"])))
            except (KeyError, TypeError):
                raise InvalidInputError(
                    "each message must be a mapping with 'role' and 'content'"
                ) from None
        if not pairs:
            raise InvalidInputError("a chat needs at least one message")
        return await self._native.chat_tokens(self.id, pairs, add_assistant)

    async def embed(self, tokens: Sequence[int]) -> list[float]:
        """A pooled embedding of ``tokens`` (last-token fallback)."""
        return await self._native.embed(self.id, tokens)

    async def load_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        adapter_id: str | None = None,
    ) -> AdapterInfo:
        """Loads a LoRA adapter (GGUF) and applies it with ``scale``.

        The model's effective fingerprint changes with its adapter set, so
        cache rows made under other adapters are never restored; requests
        already admitted finish under the set they started with. Raises
        :class:`~erllama.errors.ModelFileNotFoundError`,
        :class:`~erllama.errors.ModelLoadError` (not an adapter of this
        model), :class:`~erllama.errors.AlreadyLoadedError` (id taken) or
        :class:`~erllama.errors.NotSupportedError`.
        """
        return await self._native.load_adapter(self.id, path, scale, adapter_id)

    async def set_adapter_scale(self, adapter_id: str, scale: float) -> AdapterInfo:
        """Changes an adapter's scale (0 keeps it loaded but inactive)."""
        return await self._native.set_adapter_scale(self.id, adapter_id, scale)

    async def unload_adapter(self, adapter_id: str) -> None:
        """Unloads an adapter (:class:`~erllama.errors.NotFoundError` if unknown)."""
        await self._native.unload_adapter(self.id, adapter_id)

    async def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, in load order."""
        return await self._native.adapters(self.id)

    async def evict(self) -> list[SaveSummary]:
        """Saves every sequence that holds tokens (reason ``evict``) and
        releases them; waits for running requests to end first. One summary
        per row written or already stored."""
        return await self._native.evict(self.id)

    async def save_now(self) -> list[SaveSummary]:
        """Saves every sequence that holds tokens now (reason ``shutdown``)
        and keeps them."""
        return await self._native.save_now(self.id)

    async def unload(self) -> list[SaveSummary]:
        """Unloads the model (see :meth:`Engine.unload`)."""
        return await self._engine.unload(self.id)


class CacheView:
    """Inspection and control of the engine's cache (plain, non-async calls)."""

    def __init__(self, native: _erllama.Engine) -> None:
        self._native = native

    def counters(self) -> dict[str, int]:
        """Every counter of docs/counters.md by name (hits, misses, saves, bytes per tier…)."""
        return self._native.cache_counters()

    def reset_counters(self) -> None:
        """Zeroes the event counters (the live-byte gauges stay true)."""
        self._native.cache_reset_counters()

    def dump(self) -> list[CacheRow]:
        """Every row, least recently used first."""
        return self._native.cache_dump()

    def gc(self) -> int:
        """Evicts every unpinned row; returns how many."""
        return self._native.cache_gc()

    def evict_bytes(self, n: int, tiers: Sequence[str] | None = None) -> tuple[int, int]:
        """Evicts LRU rows of ``tiers`` (default all) until ``n`` bytes are freed.

        Returns (rows, bytes) evicted; pinned rows are never evicted.
        """
        return self._native.cache_evict_bytes(n, tiers)

    def bytes(self) -> dict[str, int]:
        """Bytes held per tier now."""
        return self._native.cache_bytes()

    def pin(self, key: str, ttl_s: float) -> None:
        """Keeps the row ``key`` (64 hex digits) from eviction for ``ttl_s``
        seconds, in (0, 86400]; pinning a pinned row keeps the later deadline.

        The pin lives in this process. Raises
        :class:`~erllama.errors.InvalidInputError` for a key with no
        available row.
        """
        self._native.cache_pin(key, ttl_s)

    def unpin(self, key: str) -> bool:
        """Ends :meth:`pin`'s pin of ``key`` now; False if it had none."""
        return self._native.cache_unpin(key)

    def pins(self) -> dict[str, float]:
        """Keys pinned by :meth:`pin` (or by a breakpoint) and the seconds each has left."""
        return self._native.cache_pins()

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Waits until no background save is in flight (at most ``timeout_s``
        seconds, 0..86400); False on timeout."""
        return self._native.cache_settle(timeout_s)


class SchedulerView:
    """Inspection and control of the memory-pressure scheduler (plain calls)."""

    def __init__(self, native: _erllama.Engine) -> None:
        self._native = native

    def status(self) -> SchedulerStatus:
        """Settings, the last sample and eviction, bytes per tier."""
        return self._native.scheduler_status()

    def force_check(self) -> CheckResult:
        """Runs one check now (``skipped(disabled)`` when disabled)."""
        return self._native.scheduler_force_check()

    def enable(self, on: bool = True) -> None:
        """Starts (or, with ``False``, stops) the periodic checks."""
        self._native.scheduler_enable(on)

    def set_thresholds(
        self, high_watermark: float, low_watermark: float, min_evict_bytes: int | None = None
    ) -> None:
        """Changes the watermarks live (high > low, high <= 1, low >= 0).

        Raises :class:`~erllama.errors.InvalidInputError` otherwise (nothing
        changes then).
        """
        self._native.scheduler_set_thresholds(high_watermark, low_watermark, min_evict_bytes)

    def set_interval(self, interval_ms: int) -> None:
        """Changes the check interval live (1..86400000 ms)."""
        self._native.scheduler_set_interval(interval_ms)


class Engine:
    """The erllama engine: a cache and the models that share it.

    Use it as an async context manager (``async with erllama.Engine() as
    engine``) or call :meth:`shutdown` when done, so live contexts are saved.
    """

    def __init__(
        self,
        *,
        cache: CacheConfig | None = None,
        policy: Policy | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        self.cache_config = cache or CacheConfig()
        self.policy = policy or Policy()
        self.scheduler_config = scheduler or SchedulerConfig()
        c = self.cache_config
        self._native = _erllama.Engine(
            scheduler=self.scheduler_config.to_dict(),
            pressure_source=self.scheduler_config.pressure_source,
            ram_quota=c.ram_quota,
            ram_file_dir=c.ram_file_dir,
            ram_file_quota=c.ram_file_quota,
            ram_file_load=c.ram_file_load,
            disk_dir=c.disk_dir,
            disk_quota=c.disk_quota,
            writer_limit=c.writer_limit,
            policy=self.policy.to_dict(),
            remote=c.remote_dict(),
        )
        self.cache = CacheView(self._native)
        self.scheduler = SchedulerView(self._native)
        self._models: dict[str, Model] = {}

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def load_model(
        self,
        path: str | os.PathLike[str],
        model_id: str | None = None,
        backend: str | object = "llama",
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        parallel: int = 4,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        tier: Tier = "ram",
        policy: Policy | None = None,
        fingerprint_mode: Literal["safe", "gguf_chunked"] = "gguf_chunked",
        cache_type_k: KvType = "f16",
        cache_type_v: KvType = "f16",
        flash_attn: FlashAttn = "auto",
    ) -> Model:
        """Loads a model and returns it.

        ``backend`` is ``"llama"`` (a GGUF file at ``path``), ``"stub"`` (the
        deterministic Rust stub; ``path`` is only a label) or a backend object
        such as :class:`erllama.backends.stub.StubBackend`. ``model_id``
        defaults to ``erllama_model_<N>``; a taken id raises
        :class:`~erllama.errors.AlreadyLoadedError`. ``tier`` is where this
        model's saves go; ``policy`` overrides the engine's.

        ``parallel`` is how many requests the model serves at once (1 to
        256): one context of ``parallel`` sequences, computed together one
        batch per step. On the llama backend each sequence has ``n_ctx`` KV
        cells of its own (KV memory is ``parallel`` times ``n_ctx``), so
        ``n_ctx`` is every request's window and a request waits only for a
        free sequence, in FIFO order; the stub backends share one pool of
        ``n_ctx`` cells between their sequences, and requests that do not
        fit together wait. A request that cannot fit even alone fails at
        once with :class:`~erllama.errors.ContextOverflowError`. Finished
        sequences stay warm (their prefix is shared with later requests)
        until their sequence or cells are needed (docs/api.md, "Parallel
        requests").

        ``cache_type_k`` / ``cache_type_v`` are the KV cache's element types
        (llama.cpp's ``--cache-type-k/-v``): ``"f16"`` (default), ``"q8_0"``
        (about half the bytes per token, in memory and in every cached row),
        ``"q4_0"`` (about a quarter), or ``"f32"``, ``"bf16"``, ``"q5_1"``,
        ``"q5_0"``, ``"q4_1"``. Any type but f16 turns flash attention on (a
        quantized V cache needs it on CPU). The types are part of every cache
        key: rows of one type are never restored into a model of another.

        ``flash_attn`` is llama.cpp's ``--flash-attn``: ``"auto"`` (default;
        llama.cpp's choice, on for the CPU, and on with any KV type but
        f16), ``"on"`` or ``"off"`` (refused with a quantized V cache). It
        changes the arithmetic and the V cache's layout, so it is part of
        every cache key too. With ``"off"``, on the CPU, a request computed
        beside others gives the tokens it gives alone on models whose
        weights are multiplied row by row (SmolLM2's Q4_1; docs/api.md,
        "Parallel requests"); which setting is faster depends on the model
        (docs/api.md, "Flash attention").
        """
        mid = await self._native.load_model(
            backend,
            path=path,
            model_id=model_id,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            parallel=parallel,
            use_mmap=use_mmap,
            tier=tier,
            policy=None if policy is None else policy.to_dict(),
            fingerprint_mode=fingerprint_mode,
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
            flash_attn=flash_attn,
        )
        model = Model(self, mid)
        self._models[mid] = model
        return model

    def model(self, model_id: str) -> Model:
        """The loaded model with this id (:class:`~erllama.errors.NotFoundError` if none)."""
        self._native.status(model_id)  # raises NotFoundError
        return self._models.get(model_id) or Model(self, model_id)

    def models(self) -> list[str]:
        """Ids of the loaded models."""
        return self._native.models()

    def inflight(self) -> list[tuple[int, str]]:
        """(request id, model id) of every live request."""
        return self._native.inflight()

    async def cancel(self, request_id: int) -> bool:
        """Cancels a request (idempotent; unknown ids are fine).

        Observed between tokens (and inside a long grammar step); the request
        ends with finish_reason ``cancelled`` and its finish save still runs.
        Returns whether the id was live.
        """
        return self._native.cancel(request_id)

    async def unload(self, model_id: str) -> list[SaveSummary]:
        """Unloads a model: its running requests are cancelled, queued ones
        fail, every sequence that holds tokens is saved (reason
        ``shutdown``)."""
        summary = await self._native.unload(model_id)
        self._models.pop(model_id, None)
        return summary

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        api_key: str | None = None,
        max_queue: int = 64,
        max_body_bytes: int = 8 << 20,
    ) -> Server:
        """Serves this engine's models over HTTP with OpenAI-compatible routes
        (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
        ``/v1/models``, ``/health``; see docs/server.md) and returns the running
        server.

        The server runs in Rust on the engine's runtime: no token passes
        through Python. ``port=0`` picks a free port (``server.port``).
        ``api_key`` makes every ``/v1/`` request need ``Authorization:
        Bearer <key>``; more than ``max_queue`` requests at once are refused
        with 429; bodies over ``max_body_bytes`` with 413. ``await
        server.stop()`` stops accepting and waits for the requests in
        flight. Raises :class:`OSError` when the address cannot be bound.
        """
        return await self._native.serve(
            host, port, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes
        )

    async def shutdown(self) -> None:
        """Unloads every model and waits for background saves to land."""
        await self._native.shutdown()
        self._models.clear()
