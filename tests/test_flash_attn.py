"""Flash attention on, off or llama.cpp's choice (real model: SmolLM2-135M).

``flash_attn`` changes the attention arithmetic and the V cache's layout, so
each setting is part of every cache key: a row written under one is never
restored under another, and each setting's hits give its own cold output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import erllama
from cache_checks import cold_then_exact
from erllama.errors import InvalidInputError
from test_cli import run_cli

pytestmark = pytest.mark.real_model

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)
TEXT = "The keeper logged every ship that passed, the weather at each watch and the lamp. "


@pytest.mark.asyncio
async def test_each_setting_keys_rows_of_its_own(model_path: Path, tmp_path: Path) -> None:
    cache = erllama.CacheConfig(disk_dir=tmp_path / "disk")
    keys: dict[str, str] = {}
    for fa in ("auto", "off", "on"):
        async with erllama.Engine(cache=cache, policy=POLICY) as engine:
            model = await engine.load_model(
                model_path, n_ctx=1024, n_batch=64, n_threads=2, tier="disk", flash_attn=fa
            )
            assert model.info().flash_attn == fa
            prompt = (await model.tokenize(TEXT * 12))[:200]
            # The other settings' rows of this very prompt are on disk.
            await cold_then_exact(engine, model, prompt, fa)
            (row,) = [
                r
                for r in engine.cache.dump()
                if r.tokens == len(prompt) and r.key not in keys.values()
            ]
            keys[fa] = row.key
            assert engine.cache.counters()["restore_failures"] == 0


@pytest.mark.asyncio
async def test_bad_settings_are_refused(model_path: Path) -> None:
    async with erllama.Engine() as engine:
        with pytest.raises(InvalidInputError, match="flash_attn must be one of auto, on, off"):
            await engine.load_model(model_path, flash_attn="fast")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="flash_attn"):
            await engine.load_model(model_path, flash_attn=1)  # type: ignore[arg-type]
        # llama.cpp cannot run a quantized V cache without flash attention.
        with pytest.raises(InvalidInputError, match="quantized V cache"):
            await engine.load_model(model_path, flash_attn="off", cache_type_v="q8_0")
        assert engine.models() == []


def test_the_cli_passes_the_setting(model_path: Path) -> None:
    outputs = {}
    for fa in ("on", "off"):
        proc = run_cli(
            "generate",
            "--model",
            str(model_path),
            "--max-tokens",
            "8",
            "--flash-attn",
            fa,
            "--json",
            "The capital of France is",
        )
        assert proc.returncode == 0, proc.stderr
        outputs[fa] = json.loads(proc.stdout)["tokens"]
    assert all(len(t) == 8 for t in outputs.values())
    bad = run_cli("generate", "--model", str(model_path), "--flash-attn", "fast", "Hi")
    assert bad.returncode == 2
    assert "--flash-attn" in bad.stderr
