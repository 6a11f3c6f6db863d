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

import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from erllama import _erllama
from erllama.config import CacheConfig, Policy, SchedulerConfig
from erllama.errors import InvalidInputError, WorkerError

__all__ = [
    "AdapterInfo",
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
    "Stats",
    "Stream",
]

HitKind = Literal["exact", "partial", "cold"]
FinishReason = Literal["stop", "length", "cancelled"]
Tier = Literal["ram", "ram_file", "disk"]


@dataclass(frozen=True)
class Stats:
    """What happened to one request."""

    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    """Admission to the first token's logits: lookup, restore and prefill."""
    generation_ms: float
    restore_ms: float
    """Time spent restoring from the cache (part of ``prefill_ms``)."""
    queue_ms: float
    """Time waiting behind earlier requests of the same model."""
    cache_hit_kind: HitKind
    hit_source: Literal["exact", "resume", "longest_prefix"] | None
    cached_tokens: int
    """Prompt tokens whose KV state came from the cache."""
    cache_tier: Tier | None
    """The tier that served them."""
    finish_reason: FinishReason
    cancelled: bool
    fallback_from: Literal["exact", "resume", "longest_prefix"] | None = None
    """A cached row was found by this lookup but could not be restored (it
    was removed and counted in ``restore_failures``); the request fell back
    to the next lookup or to prefill."""
    fallback_reason: str | None = None
    """Why that row could not be restored."""


@dataclass(frozen=True)
class Completion:
    """A finished request."""

    request_id: int
    text: str
    tokens: tuple[int, ...]
    stats: Stats
    finish_key: str | None
    """Key (hex) of the state saved at the end; pass it as the next turn's
    ``parent_key`` to resume from it."""


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model."""

    id: str
    backend: str
    status: str
    n_ctx: int
    n_vocab: int
    quant_type: str
    quant_bits: int
    tier: str
    fingerprint: str
    fingerprint_mode: str
    cacheable: bool = True
    """Whether the model's state is cached; when not (see ``cache_reason``),
    no lookup or save is ever made for it."""
    memory: str = "kv"
    """The model's memory kind: ``kv`` (full attention), ``kv_iswa``
    (sliding window, e.g. Gemma 3), ``recurrent``, ``hybrid`` or ``unknown``."""
    cache_reason: str | None = None
    """Why the state is not cacheable."""


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter loaded on a model."""

    id: str
    path: str
    sha256: str
    """SHA-256 of the adapter file; with the scale it enters the model's
    effective fingerprint, so cache rows of different adapter sets never mix."""
    scale: float


def _adapter(t: tuple[str, str, str, float]) -> AdapterInfo:
    return AdapterInfo(id=t[0], path=t[1], sha256=t[2], scale=t[3])


@dataclass(frozen=True)
class SaveSummary:
    """What an ``evict``, ``save_now`` or ``unload`` saved."""

    key: str
    tokens: int
    already_present: bool


def _completion(d: Mapping[str, Any]) -> Completion:
    return Completion(
        request_id=d["request_id"],
        text=d["text"],
        tokens=tuple(d["tokens"]),
        stats=Stats(**d["stats"]),
        finish_key=d["finish_key"],
    )


def _summary(t: tuple[str, int, bool] | None) -> SaveSummary | None:
    return None if t is None else SaveSummary(key=t[0], tokens=t[1], already_present=t[2])


class CompletionOptions(TypedDict, total=False):
    """The keyword options of :meth:`Model.complete` and :meth:`Model.stream`."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    grammar: str | None
    stop: str | Sequence[str] | None
    parent_key: str | None


class LoadOptions(TypedDict, total=False):
    """The keyword options of :meth:`Engine.load_model`."""

    backend: str | object
    n_ctx: int
    n_batch: int
    n_threads: int | None
    n_gpu_layers: int
    use_mmap: bool
    tier: Tier
    policy: Policy | None
    fingerprint_mode: Literal["safe", "gguf_chunked"]


_SAMPLING_DEFAULTS: dict[str, Any] = {
    "max_tokens": 128,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "grammar": None,
    "stop": None,
    "parent_key": None,
}


class Stream:
    """The pieces of text of a running request, as an async iterator.

    ``request_id`` is known at once (cancel it with :meth:`Engine.cancel`
    before or during the stream); ``completion`` and ``stats`` are set when
    the iteration ends.

    >>> async def show(model: "Model") -> None:   # doctest: +SKIP
    ...     stream = model.stream("Tell me a story", max_tokens=64)
    ...     async for piece in stream:
    ...         print(piece, end="")
    ...     print(stream.stats.finish_reason)
    """

    def __init__(self, model: Model, prompt: str | Sequence[int], options: dict[str, Any]) -> None:
        self._model = model
        self._prompt = prompt
        self._options = options
        self.request_id: int = model._native.reserve_request(model.id)
        self._native_stream: _erllama.Stream | None = None
        self._done = False
        self.completion: Completion | None = None

    def __del__(self) -> None:
        # A stream that was never iterated gives its reserved id back.
        if getattr(self, "_native_stream", True) is None:
            with contextlib.suppress(Exception):  # nothing to report to at GC time
                self._model._native.release_request(self.request_id)

    @property
    def stats(self) -> Stats | None:
        """The request's stats once it ended."""
        return None if self.completion is None else self.completion.stats

    async def _start(self) -> _erllama.Stream:
        if self._native_stream is None:
            native = self._model._native
            try:
                fut = native.submit(
                    self.request_id,
                    self._model.id,
                    _prompt_arg(self._prompt),
                    **self._options,
                )
            except BaseException:
                native.release_request(self.request_id)
                raise
            self._native_stream = await fut
        return self._native_stream

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        stream = await self._start()
        while not self._done:
            try:
                event = await stream.next()
            except StopAsyncIteration:
                raise WorkerError(
                    f"model {self._model.id!r} stopped without finishing request {self.request_id}"
                ) from None
            if len(event) == 3:
                if event[2]:
                    yield event[2]
            else:
                self._done = True
                self.completion = _completion(event[1])

    async def result(self) -> Completion:
        """Consumes the rest of the stream and returns the completion."""
        async for _ in self:
            pass
        if self.completion is None:
            raise WorkerError(f"request {self.request_id} ended without a result")
        return self.completion


def _prompt_arg(prompt: str | Sequence[int]) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, bytes | bytearray):
        raise InvalidInputError("prompt must be str or a sequence of int token ids, not bytes")
    return [int(t) for t in prompt]


class Model:
    """A loaded model; get one from :meth:`Engine.load_model`."""

    def __init__(self, engine: Engine, model_id: str) -> None:
        self._engine = engine
        self._native = engine._native
        self.id = model_id

    def __repr__(self) -> str:
        return f"Model(id={self.id!r})"

    def info(self) -> ModelInfo:
        """Id, backend, status, context size, quant type/bits, tier, fingerprint."""
        return ModelInfo(**self._native.info(self.id))

    def status(self) -> str:
        """``idle``, ``prefilling`` or ``generating`` (answered at once)."""
        return str(self._native.status(self.id))

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - set(_SAMPLING_DEFAULTS)
        if unknown:
            raise InvalidInputError(f"unknown option(s): {', '.join(sorted(unknown))}")
        opts = {**_SAMPLING_DEFAULTS, **kwargs}
        if opts["stop"] is not None:
            stop = opts["stop"]
            opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return opts

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        grammar: str | None = None,
        stop: str | Sequence[str] | None = None,
        parent_key: str | None = None,
    ) -> Completion:
        """Completes ``prompt`` (text, or token ids) and returns the result.

        Sampling: ``temperature`` 0 is greedy; otherwise the chain is grammar
        -> repetition penalty -> top-k -> top-p -> min-p -> temperature ->
        seeded sampling. ``stop`` strings end generation before they appear.
        ``parent_key`` is an earlier turn's ``finish_key`` to resume from.

        Raises :class:`~erllama.errors.InvalidInputError` (or a subclass) for
        bad input, before anything runs.
        """
        return await self.stream(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            grammar=grammar,
            stop=stop,
            parent_key=parent_key,
        ).result()

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        grammar: str | None = None,
        stop: str | Sequence[str] | None = None,
        parent_key: str | None = None,
    ) -> Stream:
        """Like :meth:`complete` (same options), as a :class:`Stream` of text pieces.

        The request id is allocated at once; the request is queued when the
        stream is first iterated.
        """
        return Stream(
            self,
            prompt,
            self._options(
                {
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "top_k": top_k,
                    "top_p": top_p,
                    "min_p": min_p,
                    "repetition_penalty": repetition_penalty,
                    "seed": seed,
                    "grammar": grammar,
                    "stop": stop,
                    "parent_key": parent_key,
                }
            ),
        )

    async def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (control-token markup in it stays plain text)."""
        return list(await self._native.tokenize(self.id, text, add_bos))

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``."""
        return str(await self._native.detokenize(self.id, [int(t) for t in tokens]))

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
        return list(await self._native.chat_tokens(self.id, pairs, add_assistant))

    async def embed(self, tokens: Sequence[int]) -> list[float]:
        """A pooled embedding of ``tokens`` (last-token fallback)."""
        return list(await self._native.embed(self.id, [int(t) for t in tokens]))

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
        t = await self._native.load_adapter(self.id, os.fspath(path), float(scale), adapter_id)
        return _adapter(t)

    async def set_adapter_scale(self, adapter_id: str, scale: float) -> AdapterInfo:
        """Changes an adapter's scale (0 keeps it loaded but inactive)."""
        return _adapter(await self._native.set_adapter_scale(self.id, adapter_id, float(scale)))

    async def unload_adapter(self, adapter_id: str) -> None:
        """Unloads an adapter (:class:`~erllama.errors.NotFoundError` if unknown)."""
        await self._native.unload_adapter(self.id, adapter_id)

    async def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, in load order."""
        return [_adapter(t) for t in await self._native.adapters(self.id)]

    async def evict(self) -> SaveSummary | None:
        """Saves the live context (reason ``evict``) and releases it."""
        return _summary(await self._native.evict(self.id))

    async def save_now(self) -> SaveSummary | None:
        """Saves the live context now (reason ``shutdown``) and keeps it."""
        return _summary(await self._native.save_now(self.id))

    async def unload(self) -> SaveSummary | None:
        """Unloads the model (see :meth:`Engine.unload`)."""
        return await self._engine.unload(self.id)


class CacheView:
    """Inspection and control of the engine's cache (plain, non-async calls)."""

    def __init__(self, native: _erllama.Engine) -> None:
        self._native = native

    def counters(self) -> dict[str, int]:
        """Every counter of docs/counters.md by name (hits, misses, saves, bytes per tier…)."""
        return dict(self._native.cache_counters())

    def reset_counters(self) -> None:
        """Zeroes the event counters (the live-byte gauges stay true)."""
        self._native.cache_reset_counters()

    def dump(self) -> list[dict[str, Any]]:
        """Every row, least recently used first."""
        return [dict(r) for r in self._native.cache_dump()]

    def gc(self) -> int:
        """Evicts every unpinned row; returns how many."""
        return int(self._native.cache_gc())

    def evict_bytes(self, n: int, tiers: Sequence[str] | None = None) -> tuple[int, int]:
        """Evicts LRU rows of ``tiers`` (default all) until ``n`` bytes are freed.

        Returns (rows, bytes) evicted; pinned rows are never evicted.
        """
        count, freed = self._native.cache_evict_bytes(
            int(n), None if tiers is None else list(tiers)
        )
        return int(count), int(freed)

    def bytes(self) -> dict[str, int]:
        """Bytes held per tier now."""
        return dict(self._native.cache_bytes())

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Waits until no background save is in flight; False on timeout."""
        return bool(self._native.cache_settle(timeout_s))


@dataclass(frozen=True)
class CheckResult:
    """What one scheduler check did."""

    outcome: Literal[
        "skipped(disabled)",
        "skipped(below_watermark)",
        "skipped(nothing_to_evict)",
        "skipped(unavailable)",
        "evicted",
    ]
    count: int = 0
    """Cache rows evicted."""
    bytes: int = 0
    """Bytes those rows held."""
    contexts: int = 0
    """Idle model contexts saved and released (``evict_idle_models``)."""


@dataclass(frozen=True)
class SchedulerStatus:
    """The scheduler's settings and its last readings."""

    enabled: bool
    interval_ms: int
    high_watermark: float
    low_watermark: float
    min_evict_bytes: int
    evict_tiers: tuple[str, ...]
    evict_idle_models: bool
    pressure_source: str
    available: bool | None
    """Whether the last sample worked (None before the first check)."""
    unavailable_reason: str | None
    sampler_details: tuple[tuple[str, str], ...]
    last_used: int
    last_total: int
    last_ratio: float
    last_evicted_bytes: int
    sampled_at: float | None
    """Unix time of the last sample."""
    last_evicted_at: float | None
    checks: int
    last_outcome: str | None
    tier_bytes: dict[str, int]
    """Bytes held per cache tier now."""


class SchedulerView:
    """Inspection and control of the memory-pressure scheduler (plain calls)."""

    def __init__(self, native: _erllama.Engine) -> None:
        self._native = native

    def status(self) -> SchedulerStatus:
        """Settings, the last sample and eviction, bytes per tier."""
        d = dict(self._native.scheduler_status())
        d["evict_tiers"] = tuple(d["evict_tiers"])
        d["sampler_details"] = tuple(tuple(p) for p in d["sampler_details"])
        return SchedulerStatus(**d)

    def force_check(self) -> CheckResult:
        """Runs one check now (``skipped(disabled)`` when disabled)."""
        outcome, count, nbytes, contexts = self._native.scheduler_force_check()
        return CheckResult(outcome=outcome, count=count, bytes=nbytes, contexts=contexts)  # type: ignore[arg-type]

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
        self._native.scheduler_set_thresholds(
            float(high_watermark), float(low_watermark), min_evict_bytes
        )

    def set_interval(self, interval_ms: int) -> None:
        """Changes the check interval live (must be positive)."""
        self._native.scheduler_set_interval(int(interval_ms))


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
            ram_file_dir=None if c.ram_file_dir is None else os.fspath(c.ram_file_dir),
            ram_file_quota=c.ram_file_quota,
            disk_dir=None if c.disk_dir is None else os.fspath(c.disk_dir),
            disk_quota=c.disk_quota,
            writer_limit=c.writer_limit,
            policy=self.policy.to_dict(),
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
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        tier: Tier = "ram",
        policy: Policy | None = None,
        fingerprint_mode: Literal["safe", "gguf_chunked"] = "gguf_chunked",
    ) -> Model:
        """Loads a model and returns it.

        ``backend`` is ``"llama"`` (a GGUF file at ``path``), ``"stub"`` (the
        deterministic Rust stub; ``path`` is only a label) or a backend object
        such as :class:`erllama.backends.stub.StubBackend`. ``model_id``
        defaults to ``erllama_model_<N>``; a taken id raises
        :class:`~erllama.errors.AlreadyLoadedError`. ``tier`` is where this
        model's saves go; ``policy`` overrides the engine's.
        """
        if n_gpu_layers < 0:
            raise InvalidInputError(f"n_gpu_layers must be >= 0, got {n_gpu_layers}")
        mid = await self._native.load_model(
            backend,
            path=os.fspath(path),
            model_id=model_id,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            use_mmap=use_mmap,
            tier=tier,
            policy=None if policy is None else policy.to_dict(),
            fingerprint_mode=fingerprint_mode,
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
        return list(self._native.models())

    def inflight(self) -> list[tuple[int, str]]:
        """(request id, model id) of every live request."""
        return list(self._native.inflight())

    async def cancel(self, request_id: int) -> bool:
        """Cancels a request (idempotent; unknown ids are fine).

        Observed between tokens; the request ends with finish_reason
        ``cancelled`` and its finish save still runs. Returns whether the id
        was live.
        """
        return bool(self._native.cancel(int(request_id)))

    async def unload(self, model_id: str) -> SaveSummary | None:
        """Unloads a model: its running request is cancelled, queued ones fail,
        its live context is saved (reason ``shutdown``)."""
        summary = _summary(await self._native.unload(model_id))
        self._models.pop(model_id, None)
        return summary

    async def shutdown(self) -> None:
        """Unloads every model and waits for background saves to land."""
        await self._native.shutdown()
        self._models.clear()
