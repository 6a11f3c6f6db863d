"""The memory-pressure scheduler from Python: scripted samplers drive every
outcome, the built-in samplers on this machine, and a pressure ramp while
the real model keeps completing."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import erllama
from erllama.errors import InvalidInputError, NotSupportedError
from erllama.pressure import PressureSource, details, sample

POLICY = erllama.Policy(
    min_tokens=8, cold_min_tokens=8, boundary_trim_tokens=2, boundary_align_tokens=16
)


class Scripted:
    """A pressure source whose reading the test sets."""

    def __init__(self, used: int = 0, total: int = 100) -> None:
        self.reading = (used, total)
        self.calls = 0
        self.lock = threading.Lock()

    def sample(self) -> tuple[int, int]:
        with self.lock:
            self.calls += 1
            return self.reading


class Broken:
    def sample(self) -> tuple[int, int]:
        raise RuntimeError("sensor on fire")


def words(n: int, salt: str) -> str:
    return " ".join(f"w{i}{salt}" for i in range(n))


def engine(source: object, **kw: object) -> erllama.Engine:
    cfg = erllama.SchedulerConfig(pressure_source=source, min_evict_bytes=1, **kw)  # type: ignore[arg-type]
    return erllama.Engine(policy=POLICY, scheduler=cfg)


async def fill(e: erllama.Engine, n: int) -> erllama.Model:
    model = await e.load_model("m", backend="stub")
    for i in range(n):
        await model.complete(words(20, str(i)), max_tokens=2)
    assert e.cache.settle()
    return model


def test_a_scripted_source_is_a_pressure_source() -> None:
    assert isinstance(Scripted(), PressureSource)
    assert not isinstance(object(), PressureSource)


@pytest.mark.asyncio
async def test_every_force_check_outcome() -> None:
    src = Scripted(10, 100)
    e = engine(src)
    try:
        assert e.scheduler.force_check().outcome == "skipped(disabled)"
        e.scheduler.enable()
        assert e.scheduler.force_check().outcome == "skipped(below_watermark)"
        src.reading = (95, 100)
        assert e.scheduler.force_check().outcome == "skipped(nothing_to_evict)"
        await fill(e, 2)
        result = e.scheduler.force_check()
        assert result.outcome == "evicted"
        assert result.count >= 1
        assert result.bytes >= 10
        src.reading = (0, 0)
        assert e.scheduler.force_check().outcome == "skipped(below_watermark)"
        status = e.scheduler.status()
        assert status.pressure_source == "Scripted"
        assert status.checks == 4
        assert status.available is True
    finally:
        await e.shutdown()


@pytest.mark.asyncio
async def test_eviction_frees_the_target_lru_first() -> None:
    src = Scripted(95, 100)
    e = engine(src, enabled=True)
    try:
        model = await fill(e, 3)
        rows = e.cache.dump()  # least recently used first
        before = {r.key for r in rows}
        result = e.scheduler.force_check()
        assert result.outcome == "evicted"
        assert result.bytes >= 10  # floor((0.85 - 0.75) * 100)
        after = {r.key for r in e.cache.dump()}
        gone = before - after
        assert len(gone) == result.count
        assert rows[0].key in gone, "the least recently used row goes first"
        status = e.scheduler.status()
        assert (status.last_used, status.last_total) == (95, 100)
        assert status.last_ratio == pytest.approx(0.95)
        assert status.last_evicted_bytes == result.bytes
        assert status.last_evicted_at is not None
        assert status.sampled_at is not None
        assert status.tier_bytes["ram"] == e.cache.bytes()["ram"]
        # The model keeps serving.
        assert len((await model.complete("still ok", max_tokens=2)).tokens) == 2
    finally:
        await e.shutdown()


@pytest.mark.asyncio
async def test_disk_is_untouched_unless_all_tiers(tmp_path: Path) -> None:
    for tiers, expect_evicted in (("all", True), (("ram", "ram_file"), False)):
        cfg = erllama.SchedulerConfig(
            enabled=True, pressure_source=Scripted(99, 100), min_evict_bytes=1, evict_tiers=tiers
        )
        cache = erllama.CacheConfig(disk_dir=tmp_path / str(expect_evicted))
        async with erllama.Engine(cache=cache, policy=POLICY, scheduler=cfg) as e:
            model = await e.load_model("m", backend="stub", tier="disk")
            await model.complete(words(20, "d"), max_tokens=2)
            assert e.cache.settle()
            before = e.cache.bytes()["disk"]
            assert before > 0
            result = e.scheduler.force_check()
            assert (result.outcome == "evicted") is expect_evicted
            assert (e.cache.bytes()["disk"] < before) is expect_evicted


@pytest.mark.asyncio
async def test_thresholds_change_live_and_bad_values_are_refused() -> None:
    src = Scripted(60, 100)
    e = engine(src, enabled=True)
    try:
        await fill(e, 1)
        assert e.scheduler.force_check().outcome == "skipped(below_watermark)"
        e.scheduler.set_thresholds(0.5, 0.4)
        assert e.scheduler.force_check().outcome == "evicted"
        for high, low in ((0.5, 0.5), (0.3, 0.4), (1.2, 0.1), (0.9, -0.1)):
            with pytest.raises(InvalidInputError):
                e.scheduler.set_thresholds(high, low)
        status = e.scheduler.status()
        assert (status.high_watermark, status.low_watermark) == (0.5, 0.4)
        with pytest.raises(InvalidInputError):
            e.scheduler.set_interval(0)
    finally:
        await e.shutdown()
    with pytest.raises(InvalidInputError):
        engine("system", high_watermark=0.5, low_watermark=0.6)
    with pytest.raises(InvalidInputError):
        engine("quantum")
    with pytest.raises(InvalidInputError):
        engine(object())


@pytest.mark.asyncio
async def test_periodic_checks_run_while_enabled_and_stop_when_disabled() -> None:
    src = Scripted(1, 100)
    e = engine(src, interval_ms=20)
    try:
        time.sleep(0.2)
        assert e.scheduler.status().checks == 0
        e.scheduler.enable()
        deadline = time.monotonic() + 30
        while e.scheduler.status().checks < 3:
            assert time.monotonic() < deadline, "periodic checks did not run"
            await asyncio.sleep(0.01)
        e.scheduler.enable(False)
        await asyncio.sleep(0.1)  # a check in flight may finish
        calls = src.calls
        await asyncio.sleep(0.3)
        assert src.calls == calls
    finally:
        await e.shutdown()


@pytest.mark.asyncio
async def test_a_failing_source_is_a_skip_not_a_crash() -> None:
    e = engine(Broken(), enabled=True)
    try:
        assert e.scheduler.force_check().outcome == "skipped(unavailable)"
        status = e.scheduler.status()
        assert status.available is False
        assert status.unavailable_reason is not None
        assert "sensor on fire" in status.unavailable_reason
    finally:
        await e.shutdown()


def test_the_system_sampler_on_this_machine() -> None:
    used, total = sample("system")
    assert 0 < used <= total
    assert "source" in details("system")
    assert sample("noop") == (0, 1)


@pytest.mark.asyncio
async def test_nvml_without_a_gpu_reports_unavailable_and_never_raises() -> None:
    try:
        used, total = sample("nvml")
    except NotSupportedError as err:
        reason = str(err)
        gpu = False
    else:
        reason = ""
        gpu = True
    if gpu:
        assert 0 <= used <= total
    else:
        assert "nvml" in reason
    e = engine("nvml", enabled=True)
    try:
        result = e.scheduler.force_check()
        status = e.scheduler.status()
        if gpu:
            assert status.available is True
            assert any(k.startswith("gpu") for k, _ in status.sampler_details)
        else:
            assert result.outcome == "skipped(unavailable)"
            assert status.available is False
            assert status.unavailable_reason
    finally:
        await e.shutdown()


@pytest.mark.asyncio
async def test_a_pressure_ramp_while_the_real_model_completes(model_path: Path) -> None:
    src = Scripted(10, 100)
    cfg = erllama.SchedulerConfig(
        enabled=True, pressure_source=src, interval_ms=10, min_evict_bytes=1
    )
    policy = erllama.Policy(
        min_tokens=32, cold_min_tokens=32, boundary_trim_tokens=4, boundary_align_tokens=32
    )
    async with erllama.Engine(policy=policy, scheduler=cfg) as e:
        model = await e.load_model(model_path, n_ctx=1024, n_batch=64, n_threads=2)
        story = "once upon a time there was a lighthouse keeper. "
        prompts = [f"Story {i}: " + story * 3 for i in range(6)]
        for p in prompts[:3]:
            await model.complete(p, max_tokens=4)
        assert e.cache.settle()
        held = e.cache.bytes()["ram"]
        assert held > 0
        # Ramp the pressure up while completions keep running.
        src.reading = (99, 100)
        results = []
        for p in prompts[3:]:
            results.append(await model.complete(p, max_tokens=4))
        # Under pressure the periodic checks drain the ram tier, LRU first.
        deadline = time.monotonic() + 30
        while e.cache.bytes()["ram"] >= held:
            assert time.monotonic() < deadline, "the ram tier did not shrink"
            await asyncio.sleep(0.01)
        assert all(len(r.tokens) >= 1 for r in results)
        assert e.cache.counters()["evictions"] > 0
        assert e.scheduler.status().last_evicted_bytes > 0
        src.reading = (10, 100)
        # The model still serves, and a fresh request works.
        final = await model.complete(prompts[0], max_tokens=4)
        assert len(final.tokens) >= 1
