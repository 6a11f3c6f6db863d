"""One cache directory shared by several processes (real model): a row
another process publishes after this one started is a hit here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import erllama
from erllama.errors import InvalidInputError

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

PROMPT = "The depot keeps a log of every train. " * 40 + "Which train left first?"

WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    import erllama

    async def main(model, disk, prompt):
        cache = erllama.CacheConfig(disk_dir=disk)
        policy = erllama.Policy(min_tokens=64, cold_min_tokens=64)
        async with erllama.Engine(cache=cache, policy=policy) as engine:
            m = await engine.load_model(
                model, model_id="m", n_ctx=2048, n_threads=1, tier="disk"
            )
            c = await m.complete(prompt, max_tokens=8)
            assert engine.cache.settle()
            print(json.dumps({"text": c.text, "kind": c.stats.cache_hit_kind}))

    asyncio.run(main(*sys.argv[1:4]))
    """
)


def _write_in_another_process(model_path: Path, disk: Path, prompt: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(model_path), str(disk), prompt],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


async def test_a_row_published_by_another_process_is_a_hit(
    model_path: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    cache = erllama.CacheConfig(disk_dir=disk)
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="m", n_ctx=2048, n_threads=1, tier="disk"
        )
        # This process's index is built now, before the other one writes.
        assert engine.cache.dump() == []
        other = _write_in_another_process(model_path, disk, PROMPT)
        assert other["kind"] == "cold"
        here = await model.complete(PROMPT, max_tokens=8)
        assert here.stats.cache_hit_kind == "exact"
        assert here.stats.cache_tier == "disk"
        assert here.text == other["text"]
        assert engine.cache.counters()["files_adopted"] >= 1
        # A corrupt file published the same way is deleted and counted,
        # never restored.
        before = engine.cache.counters()["corrupt_files"]
        other2 = _write_in_another_process(model_path, disk, PROMPT + " And last?")
        mine = {r.key for r in engine.cache.dump()}
        foreign = [p for p in disk.glob("*.kvc") if p.stem not in mine]
        assert foreign
        for p in foreign:
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
        again = await model.complete(PROMPT + " And last?", max_tokens=8)
        assert again.stats.cache_hit_kind != "exact"
        assert again.text == other2["text"]
        assert engine.cache.counters()["corrupt_files"] > before


async def test_ram_file_rows_restore_from_a_mapping(model_path: Path, tmp_path: Path) -> None:
    cache = erllama.CacheConfig(ram_file_dir=tmp_path / "shm", ram_file_load="mmap")
    async with erllama.Engine(cache=cache, policy=POLICY) as engine:
        model = await engine.load_model(
            model_path, model_id="m", n_ctx=2048, n_threads=1, tier="ram_file"
        )
        cold = await model.complete(PROMPT, max_tokens=8)
        assert engine.cache.settle()
        await model.evict()
        warm = await model.complete(PROMPT, max_tokens=8)
        assert warm.stats.cache_hit_kind == "exact"
        assert warm.stats.cache_tier == "ram_file"
        assert warm.tokens == cold.tokens
    with pytest.raises(InvalidInputError):
        erllama.CacheConfig(ram_file_load="copy")  # type: ignore[arg-type]
