"""A blocking facade over :class:`erllama.Engine`, for scripts and the command line.

It runs the same asyncio engine on a private event-loop thread and waits for
each call, so there is no duplicated logic:

>>> from erllama.blocking import Engine
>>> with Engine() as engine:
...     model = engine.load_model("demo", backend="stub")
...     print(model.complete("one two", max_tokens=2).stats.completion_tokens)
2
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from erllama import engine as _engine
from erllama.config import CacheConfig, Policy, SchedulerConfig
from erllama.engine import (
    CacheView,
    Completion,
    CompletionOptions,
    LoadOptions,
    ModelInfo,
    SaveSummary,
)

__all__ = ["Engine", "Model"]

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="erllama-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Model:
    """Blocking twin of :class:`erllama.engine.Model`."""

    def __init__(self, loop: _Loop, model: _engine.Model) -> None:
        self._loop = loop
        self._model = model
        self.id = model.id

    def complete(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Completion:
        """See :meth:`erllama.engine.Model.complete`."""
        return self._loop.run(self._model.complete(prompt, **options))

    def stream(
        self, prompt: str | Sequence[int], **options: Unpack[CompletionOptions]
    ) -> Iterator[str]:
        """Yields text pieces as they are generated."""
        stream = self._model.stream(prompt, **options)
        it = aiter(stream)
        while True:
            try:
                yield self._loop.run(anext(it))  # type: ignore[arg-type]
            except StopAsyncIteration:
                return

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._loop.run(self._model.tokenize(text, add_bos=add_bos))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._loop.run(self._model.detokenize(tokens))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_assistant: bool = True,
    ) -> list[int]:
        return self._loop.run(
            self._model.apply_chat_template(
                messages, system=system, tools=tools, add_assistant=add_assistant
            )
        )

    def embed(self, tokens: Sequence[int]) -> list[float]:
        return self._loop.run(self._model.embed(tokens))

    def info(self) -> ModelInfo:
        return self._model.info()

    def status(self) -> str:
        return self._model.status()

    def evict(self) -> list[SaveSummary]:
        return self._loop.run(self._model.evict())


class Engine:
    """Blocking twin of :class:`erllama.Engine`; use as a context manager."""

    def __init__(
        self,
        *,
        cache: CacheConfig | None = None,
        policy: Policy | None = None,
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        self._loop = _Loop()
        self._engine = _engine.Engine(cache=cache, policy=policy, scheduler=scheduler)
        self.cache: CacheView = self._engine.cache

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_model(
        self, path: str, model_id: str | None = None, **kw: Unpack[LoadOptions]
    ) -> Model:
        """See :meth:`erllama.Engine.load_model`."""
        return Model(self._loop, self._loop.run(self._engine.load_model(path, model_id, **kw)))

    def models(self) -> list[str]:
        return self._engine.models()

    def cancel(self, request_id: int) -> bool:
        return self._loop.run(self._engine.cancel(request_id))

    def unload(self, model_id: str) -> list[SaveSummary]:
        return self._loop.run(self._engine.unload(model_id))

    def close(self) -> None:
        """Shuts the engine down (saving live contexts) and stops the loop."""
        if self._loop.thread.is_alive():
            self._loop.run(self._engine.shutdown())
            self._loop.close()
