"""The Python boundary: typed values, one error mapping, checked input, lossless streams.

Every value crossing into the engine is checked (a clear ``InvalidInputError``
naming the parameter, never ``OverflowError`` or a Rust ``PanicException``),
every result is a typed record, every error keeps its class whichever API it
came through, and a stream never loses an event to a cancelled ``await``.
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import erllama
from erllama import _erllama, errors
from erllama.backends.stub import StubBackend, words
from erllama.engine import CompletionOptions

POLICY = erllama.Policy(min_tokens=8, cold_min_tokens=8, boundary_align_tokens=8)


# --- one declaration of the options, one table of the exceptions ---------------------


def test_request_options_are_declared_once_in_step() -> None:
    native = [name for name, _ in _erllama.REQUEST_OPTIONS]
    assert native == list(typing.get_type_hints(CompletionOptions))
    defaults = dict(_erllama.REQUEST_OPTIONS)
    assert defaults["max_tokens"] == 128
    assert defaults["temperature"] == 0.0
    assert defaults["stop"] is None


def test_exception_table_matches_the_python_hierarchy() -> None:
    python_classes = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, errors.ErllamaError)
    }
    native = set(_erllama.EXCEPTION_CLASSES)
    # ModelFetchError is raised by Python code only (erllama.testmodel).
    assert native == python_classes - {"ModelFetchError"}
    assert issubclass(errors.InvalidInputError, ValueError)


# --- checked values --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_out_of_range_values_name_the_parameter() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub")
        bad: list[tuple[dict[str, Any], str]] = [
            ({"max_tokens": 2**63}, "max_tokens"),
            ({"max_tokens": -1}, "max_tokens"),
            ({"max_tokens": 1.5}, "max_tokens"),
            ({"max_tokens": True}, "max_tokens"),
            ({"seed": -1}, "seed"),
            ({"seed": 2**64}, "seed"),
            ({"temperature": math.nan}, "temperature"),
            ({"temperature": math.inf}, "temperature"),
            ({"temperature": 1e300}, "temperature"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_k": -3}, "top_k"),
            ({"min_p": 2}, "min_p"),
            ({"repetition_penalty": 0}, "repetition_penalty"),
            ({"stop": [""]}, "stop"),
            ({"stop": ["x"] * 17}, "stop"),
            ({"stop": 5}, "stop"),
            ({"parent_key": "zz"}, "parent_key"),
            ({"grammar": 7}, "grammar"),
        ]
        for options, name in bad:
            with pytest.raises(errors.InvalidInputError, match=name):
                model.stream("a b", **options)
        with pytest.raises(TypeError, match="bogus"):
            model.stream("a b", bogus=1)  # type: ignore[call-arg]
        for method, args, name in [
            (engine.cache.settle, (math.inf,), "timeout_s"),
            (engine.cache.settle, (math.nan,), "timeout_s"),
            (engine.cache.settle, (-1,), "timeout_s"),
            (engine.cache.evict_bytes, (-1,), "n"),
            (engine.cache.evict_bytes, (2**70,), "n"),
            (engine.scheduler.set_interval, (-1,), "interval_ms"),
            (engine.scheduler.set_thresholds, (math.nan, 0.5), "high_watermark"),
        ]:
            with pytest.raises(errors.InvalidInputError, match=name):
                method(*args)  # type: ignore[operator]
        with pytest.raises(errors.InvalidInputError, match="request_id"):
            await engine.cancel(-1)
        assert not await engine.cancel(2**63)
        with pytest.raises(errors.InvalidInputError, match="n_ctx"):
            await engine.load_model("x", backend="stub", n_ctx=2**40)
        # The engine is fine after all of it.
        assert (await model.complete("a b", max_tokens=2)).stats.completion_tokens == 2


@pytest.mark.parametrize("field", ["ram_quota", "ram_file_quota", "disk_quota", "writer_limit"])
def test_config_integers_are_checked(field: str, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {field: 2**70}
    if field == "disk_quota":
        kwargs["disk_dir"] = tmp_path / "d"
    if field == "ram_file_quota":
        kwargs["ram_file_dir"] = tmp_path / "r"
    with pytest.raises(errors.InvalidInputError, match=field):
        erllama.Engine(cache=erllama.CacheConfig(**kwargs))


# --- arbitrary values: documented exceptions only, never a panic or a hang ------------

_DOCUMENTED = (errors.ErllamaError, TypeError)
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=70_000), max_size=5),
    st.lists(st.text(max_size=5), max_size=3),
)
_OPTION_NAMES = [name for name, _ in _erllama.REQUEST_OPTIONS]


@pytest.fixture(scope="module")
def stub_engine() -> Any:
    """A blocking engine with the Rust stub (``m``) and the Python stub (``p``)."""
    from erllama.blocking import Engine

    with Engine(policy=POLICY) as engine:
        rust = engine.load_model("m", backend="stub", n_ctx=256)
        python = engine.load_model("p", "p", backend=StubBackend(), n_ctx=256)
        yield engine, rust, python


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prompt=st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 70_000), max_size=8)),
    options=st.dictionaries(st.sampled_from(_OPTION_NAMES), _VALUES, max_size=4),
)
def test_arbitrary_request_options_raise_only_documented_errors(
    stub_engine: Any, prompt: Any, options: dict[str, Any]
) -> None:
    _, model, _ = stub_engine
    options.setdefault("max_tokens", 3)
    if isinstance(options["max_tokens"], int) and not isinstance(options["max_tokens"], bool):
        options["max_tokens"] = max(-5, min(options["max_tokens"], 8))
    try:
        result = model.complete(prompt, **options)
    except _DOCUMENTED:
        return
    assert result.stats.completion_tokens <= 8


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(
        ["settle", "evict_bytes", "cancel", "set_interval", "set_thresholds", "dump", "gc"]
    ),
    a=_VALUES,
    b=_VALUES,
)
def test_arbitrary_cache_and_scheduler_calls_raise_only_documented_errors(
    stub_engine: Any, which: str, a: Any, b: Any
) -> None:
    engine, _, _ = stub_engine
    inner = engine._engine
    calls = {
        "settle": lambda: inner.cache.settle(a if a is not None else 0),
        "evict_bytes": lambda: inner.cache.evict_bytes(a, b),
        "cancel": lambda: inner._native.cancel(a),
        "set_interval": lambda: inner.scheduler.set_interval(a),
        "set_thresholds": lambda: inner.scheduler.set_thresholds(a, b),
        "dump": lambda: inner.cache.dump(),
        "gc": lambda: inner.cache.gc(),
    }
    try:
        calls[which]()
    except _DOCUMENTED:
        pass
    else:
        if which == "settle" and a is not None:
            # Only a number in [0, 86400] is accepted.
            assert isinstance(a, int | float)
            assert not isinstance(a, bool)
            assert 0 <= a <= 86_400


# --- the two stubs agree -------------------------------------------------------------------


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_both_stubs_tokenize_alike(stub_engine: Any, text: str) -> None:
    _, rust, python = stub_engine
    assert rust.tokenize(text) == python.tokenize(text)
    assert len(rust.tokenize(text, add_bos=False)) == len(words(text))


@pytest.mark.asyncio
async def test_both_stubs_split_words_and_refuse_sampling_alike() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        rust = await engine.load_model("r", "r", backend="stub")
        python = await engine.load_model("p", "p", backend=StubBackend())
        for text in ["a\x1eb", "a\x1cb c", "x\u3000y", "a\u200bb", "a\x85b"]:
            assert await rust.tokenize(text) == await python.tokenize(text), repr(text)
        assert len(await rust.tokenize("a\x1eb", add_bos=False)) == 1
        for options in [
            {"temperature": 0.7},
            {"repetition_penalty": 1.2},
            {"grammar": 'root ::= "a"'},
        ]:
            for model in (rust, python):
                with pytest.raises(errors.NotSupportedError):
                    await model.complete("a b", **options)  # type: ignore[arg-type]
        # Greedy-neutral options are accepted by both, with equal results.
        a = await rust.complete([1, 5, 9], max_tokens=5, top_k=3, top_p=0.5, seed=7)
        b = await python.complete([1, 5, 9], max_tokens=5, top_k=3, top_p=0.5, seed=7)
        assert a.tokens == b.tokens


# --- errors keep their class ------------------------------------------------------------------


class _Failing(StubBackend):
    """A Python stub whose calls fail in configurable ways."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def is_eog(self, token: int) -> bool:
        if self.mode == "eog":
            raise ZeroDivisionError("is_eog broke")
        return False

    def new_context(self, n_ctx: int, n_batch: int, n_seq: int = 1) -> Any:
        if self.mode == "none":
            return None
        ctx = super().new_context(n_ctx, n_batch, n_seq)
        if self.mode == "decode":

            def decode(batch: Any) -> None:
                raise errors.DecodeError("no KV slot")

            ctx.decode = decode  # type: ignore[method-assign]
        return ctx


@pytest.mark.asyncio
async def test_python_backend_exceptions_come_back_unchanged_or_chained() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        eog = await engine.load_model("e", "e", backend=_Failing("eog"))
        with pytest.raises(errors.BackendError, match="is_eog") as info:
            await eog.complete("a b", max_tokens=3)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        decode = await engine.load_model("d", "d", backend=_Failing("decode"))
        with pytest.raises(errors.DecodeError, match="no KV slot"):
            await decode.complete("a b", max_tokens=3)
        # Both models keep serving (the next request fails the same way, cleanly).
        with pytest.raises(errors.DecodeError):
            await decode.complete("c d", max_tokens=3)


@pytest.mark.asyncio
async def test_python_backends_are_validated_on_load() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        zero = StubBackend()
        zero.n_vocab = 0
        with pytest.raises(errors.InvalidInputError, match="n_vocab"):
            await engine.load_model("z", backend=zero)
        with pytest.raises(errors.ContextError, match="new_context"):
            await engine.load_model("n", backend=_Failing("none"))
        assert engine.models() == []


def test_a_panic_is_an_internal_error_and_the_engine_lives_on() -> None:
    with pytest.raises(errors.InternalError, match="a bug"):
        _erllama._test_panic()

    async def main() -> None:
        with pytest.raises(errors.InternalError, match="a bug"):
            await _erllama._test_panic_async()
        async with erllama.Engine() as engine:
            model = await engine.load_model("m", backend="stub")
            assert (await model.complete("a", max_tokens=1)).stats.completion_tokens == 1

    asyncio.run(main())


# --- streams lose nothing ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_await_loses_no_event() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub")
        reference = await model.complete("a b c", max_tokens=6)
        stream = model.stream("a b c", max_tokens=6)
        pieces: list[str] = []
        it = aiter(stream)
        cancelled = 0
        while True:
            # Cancel the waiting task before it can run: the event it would
            # have taken must still be there for the next await.
            task = asyncio.ensure_future(anext(it))
            await asyncio.sleep(0)
            if task.cancel():
                cancelled += 1
                await asyncio.sleep(0.01)  # let the event arrive meanwhile
            try:
                pieces.append(await anext(it) if task.cancelled() else task.result())
            except StopAsyncIteration:
                break
        assert cancelled > 0
        assert "".join(pieces) == reference.text
        assert stream.completion is not None
        assert stream.completion.tokens == reference.tokens


@pytest.mark.asyncio
async def test_a_cancelled_await_of_the_final_event_loses_nothing() -> None:
    async with erllama.Engine(policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub")
        stream = model.stream("a b c", max_tokens=1)
        native = stream._native
        while not native.done:
            waiting = asyncio.ensure_future(native.ready())
            await asyncio.sleep(0.05)  # the event is buffered by now
            waiting.cancel()
            await asyncio.sleep(0)
            await native.ready()  # returns at once with it
            native.take()
        assert stream.completion is not None
        assert len(stream.completion.tokens) == 1


# --- files and directories ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_fifo_model_path_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    async with erllama.Engine() as engine:
        with pytest.raises(errors.ModelLoadError, match="not a regular file"):
            await asyncio.wait_for(engine.load_model(fifo), timeout=10)
        with pytest.raises(errors.ModelLoadError, match="not a regular file"):
            await asyncio.wait_for(engine.load_model(tmp_path), timeout=10)
    with pytest.raises(errors.ModelLoadError, match="not a regular file"):
        erllama.LlamaModel(str(fifo))


@pytest.mark.parametrize("where", ["/proc/erllama-test", "/sys/erllama-test", "file"])
def test_a_cache_dir_that_cannot_hold_the_tier_is_refused(where: str, tmp_path: Path) -> None:
    path = Path(where)
    if where == "file":
        path = tmp_path / "plain-file"
        path.write_text("x")
    with pytest.raises(errors.CacheError, match="disk"):
        erllama.Engine(cache=erllama.CacheConfig(disk_dir=path))


def test_tier_dirs_are_made_private(tmp_path: Path) -> None:
    d = tmp_path / "disk"
    d.mkdir()
    d.chmod(0o777)
    erllama.Engine(cache=erllama.CacheConfig(disk_dir=d))
    assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0


@pytest.mark.asyncio
async def test_a_save_that_fails_is_counted(tmp_path: Path) -> None:
    d = tmp_path / "disk"
    cache = erllama.CacheConfig(disk_dir=d)
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model("m", backend="stub", tier="disk")
        # The directory goes away after start and a file takes its place.
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        d.write_text("not a directory")
        await model.complete(" ".join(f"w{i}" for i in range(40)), max_tokens=2)
        assert engine.cache.settle()
        assert engine.cache.counters()["saves_failed"] >= 1
