"""Exact hits answer at restore speed, and a row means the same state whoever
saved it (real model: SmolLM2-135M, llama.cpp).

- A prompt's own row stores the logits that follow it, so an exact hit
  restores the state and samples its first token without any decode; the
  completion is the cold one, greedy and at a fixed seed, on every tier.
- A sampled token is fed only when the next one is wanted: ``max_tokens=1``
  decodes nothing after the prompt.
- Rows without logits (older files) keep the re-feed path; a corrupted
  logits section is caught by the payload CRC like any corruption.
- Processes with different save policies share one directory: the state
  after t tokens depends on the model, the context and the tokens only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import erllama
from erllama._erllama import kvc_list, kvc_verify

pytestmark = pytest.mark.asyncio

POLICY = erllama.Policy(min_tokens=64, cold_min_tokens=64)

TEXT = (
    "The keeper of the northern lighthouse kept a log of every ship that passed, "
    "the weather at each watch and the state of the lamp. "
)


async def _prompt(model: erllama.Model, salt: str, n: int) -> list[int]:
    tokens = await model.tokenize(f"Log {salt}. " + TEXT * (n // 25 + 2))
    assert len(tokens) >= n
    return tokens[:n]


def _cache(root: Path) -> erllama.CacheConfig:
    return erllama.CacheConfig(ram_file_dir=root / "shm", disk_dir=root / "disk")


async def _load(engine: erllama.Engine, path: Path, tier: str = "disk") -> erllama.Model:
    return await engine.load_model(
        path,
        n_ctx=1024,
        n_batch=64,
        n_threads=2,
        tier=tier,  # type: ignore[arg-type]
    )


SAMPLING: list[dict[str, Any]] = [{}, {"temperature": 0.9, "seed": 1234}]


@pytest.mark.parametrize("tier", ["ram", "ram_file", "disk"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seeded"])
async def test_an_exact_hit_samples_from_the_stored_logits(
    model_path: Path, tmp_path: Path, tier: str, sampling: dict[str, Any]
) -> None:
    async with erllama.Engine(cache=_cache(tmp_path), policy=POLICY) as engine:
        model = await _load(engine, model_path, tier)
        prompt = await _prompt(model, tier, 150)
        cold = await model.complete(prompt, max_tokens=10, **sampling)
        assert cold.stats.cache_hit_kind == "cold"
        assert cold.stats.prefill_tokens == len(prompt)
        assert cold.stats.decode_tokens == cold.stats.completion_tokens - 1
        # Free the sequences so the repeat must come from the tier.
        await model.evict()
        assert engine.cache.settle()
        rows = [r for r in engine.cache.dump() if r.tokens == len(prompt)]
        assert len(rows) == 1
        if tier != "ram":
            folder = tmp_path / ("shm" if tier == "ram_file" else "disk")
            (listed,) = [f for f in kvc_list(folder) if f.key == rows[0].key]
            assert listed.logits == model.info().n_vocab
        warm = await model.complete(prompt, max_tokens=10, **sampling)
        assert (warm.stats.cache_hit_kind, warm.stats.hit_source) == ("exact", "exact")
        assert warm.stats.cache_tier == tier
        # No prompt token was computed: the first token came from the row.
        assert warm.stats.prefill_tokens == 0
        assert warm.tokens == cold.tokens
        assert warm.text == cold.text


async def test_max_tokens_1_decodes_nothing_after_the_prompt(
    model_path: Path, tmp_path: Path
) -> None:
    async with erllama.Engine(cache=_cache(tmp_path), policy=POLICY) as engine:
        model = await _load(engine, model_path, "ram")
        prompt = await _prompt(model, "one", 120)
        cold = await model.complete(prompt, max_tokens=1)
        assert cold.stats.completion_tokens == 1
        assert (cold.stats.prefill_tokens, cold.stats.decode_tokens) == (len(prompt), 0)
        # The prompt's row is written off the request path: wait for it.
        assert engine.cache.settle()
        await model.evict()
        warm = await model.complete(prompt, max_tokens=1)
        assert warm.stats.cache_hit_kind == "exact"
        assert (warm.stats.prefill_tokens, warm.stats.decode_tokens) == (0, 0)
        assert warm.tokens == cold.tokens
        # A stop on the first token decodes nothing either.
        assert cold.text.strip(), "the first token has text to stop on"
        stopped = await model.complete(prompt, max_tokens=5, stop=[cold.text])
        assert (stopped.stats.finish_reason, stopped.stats.completion_tokens) == ("stop", 1)
        assert stopped.stats.decode_tokens == 0


def _crc32c(data: bytes) -> int:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _strip_logits(path: Path) -> int:
    """Rewrites a KVC file as a writer without stored logits wrote it (no TLV
    0x0A, the payload only the state); returns how many logits it dropped."""
    f = path.read_bytes()
    payload_offset, payload_len = struct.unpack_from("<QQ", f, 48)
    (prompt_len,) = struct.unpack_from("<I", f, 72)
    tlv_at = 76 + prompt_len
    (tlv_len,) = struct.unpack_from("<I", f, tlv_at)
    records, pos, dropped = b"", tlv_at + 4, 0
    while pos < tlv_at + 4 + tlv_len:
        tag = f[pos]
        (length,) = struct.unpack_from("<I", f, pos + 1)
        if tag == 0x0A:
            (dropped,) = struct.unpack_from("<I", f, pos + 5)
        else:
            records += f[pos : pos + 5 + length]
        pos += 5 + length
    assert dropped > 0, "the row has no logits to strip"
    payload = f[payload_offset + 4 * dropped : payload_offset + payload_len]
    header = bytearray(f[:tlv_at] + struct.pack("<I", len(records)) + records)
    struct.pack_into("<Q", header, 40, len(payload))
    struct.pack_into("<QQI", header, 48, len(header), len(payload), _crc32c(payload))
    path.write_bytes(bytes(header) + payload)
    return dropped


async def _cold_row(model_path: Path, root: Path, n: int) -> tuple[list[int], list[int], Path]:
    """A cold completion whose prompt row is on disk: (prompt, tokens, file)."""
    async with erllama.Engine(cache=_cache(root), policy=POLICY) as engine:
        model = await _load(engine, model_path)
        prompt = await _prompt(model, "disk", n)
        cold = await model.complete(prompt, max_tokens=8)
        assert engine.cache.settle()
        (row,) = [r for r in engine.cache.dump() if r.tokens == len(prompt)]
        return prompt, cold.tokens, root / "disk" / f"{row.key}.kvc"


async def test_a_row_without_logits_is_still_an_exact_hit(model_path: Path, tmp_path: Path) -> None:
    prompt, cold, file = await _cold_row(model_path, tmp_path, 90)
    assert _strip_logits(file) > 0
    assert kvc_verify(file) is None, "the rewritten file is a valid old-format row"
    async with erllama.Engine(cache=_cache(tmp_path), policy=POLICY) as engine:
        model = await _load(engine, model_path)
        warm = await model.complete(prompt, max_tokens=8)
        assert (warm.stats.cache_hit_kind, warm.stats.hit_source) == ("exact", "exact")
        # Its last prompt token is fed again for the first token's logits.
        assert warm.stats.prefill_tokens == 1
        assert warm.tokens == cold


async def test_corrupted_logits_are_detected_deleted_and_counted(
    model_path: Path, tmp_path: Path
) -> None:
    prompt, cold, file = await _cold_row(model_path, tmp_path, 90)
    f = bytearray(file.read_bytes())
    (payload_offset,) = struct.unpack_from("<Q", f, 48)
    f[payload_offset + 5] ^= 0x40  # inside the first logit
    file.write_bytes(bytes(f))
    async with erllama.Engine(cache=_cache(tmp_path), policy=POLICY) as engine:
        model = await _load(engine, model_path)
        again = await model.complete(prompt, max_tokens=8)
        assert engine.cache.counters()["corrupt_files"] == 1
        assert again.stats.hit_source != "exact"
        assert again.stats.fallback_reason is not None
        assert "crc" in again.stats.fallback_reason.lower()
        assert again.tokens == cold
        # The corrupt file was deleted; the fallback's prefill saved the
        # prompt's row again, whole.
        assert engine.cache.settle()
    assert kvc_verify(file) is None


async def _run(
    model_path: Path, root: Path, policy: erllama.Policy, prompts: Sequence[Sequence[int]]
) -> list[tuple[list[int], str]]:
    """Each prompt in a fresh engine over ``root`` (so nothing stays warm),
    in chunks of 32 tokens: (tokens, how the cache served it)."""
    out: list[tuple[list[int], str]] = []
    for prompt in prompts:
        async with erllama.Engine(cache=_cache(root), policy=policy) as engine:
            model = await engine.load_model(
                model_path, n_ctx=1024, n_batch=32, n_threads=2, tier="disk"
            )
            c = await model.complete(list(prompt), max_tokens=6)
            out.append((c.tokens, c.stats.cache_hit_kind))
            assert engine.cache.settle()
    return out


async def test_rows_are_interchangeable_between_save_policies(
    model_path: Path, tmp_path: Path
) -> None:
    """Two policies that save at different boundaries, over one directory:
    whatever one saved, the other restores into the cold answer."""
    a = erllama.Policy(
        min_tokens=32, cold_min_tokens=32, boundary_align_tokens=64, boundary_trim_tokens=0
    )
    b = erllama.Policy(
        min_tokens=32, cold_min_tokens=32, boundary_align_tokens=32, boundary_trim_tokens=0
    )
    async with erllama.Engine(policy=POLICY) as engine:
        model = await _load(engine, model_path, "ram")
        base = await _prompt(model, "shared", 100)
        longer = base + (await _prompt(model, "more", 120))[5:]
        third = longer + (await _prompt(model, "third", 70))[5:]
    prompts = [base, longer, third]
    # The cold answers: every prompt alone, nothing cached.
    cold = [
        (await _run(model_path, tmp_path / f"cold{i}", a, [p]))[0] for i, p in enumerate(prompts)
    ]
    assert [k for _, k in cold] == ["cold"] * 3
    reference = [t for t, _ in cold]
    # Each policy in a directory of its own: base is saved at 64 tokens by
    # a and at 96 by b, and each longer prompt continues its own rows.
    own_a = await _run(model_path, tmp_path / "a", a, prompts)
    own_b = await _run(model_path, tmp_path / "b", b, prompts)
    for own in (own_a, own_b):
        assert [t for t, _ in own] == reference
        assert [k for _, k in own] == ["cold", "partial", "partial"]
    # Each policy over the other's rows: exact hits, the cold answers.
    for served in (
        await _run(model_path, tmp_path / "b", a, prompts),
        await _run(model_path, tmp_path / "a", b, prompts),
    ):
        assert [k for _, k in served] == ["exact"] * 3
        assert [t for t, _ in served] == reference
    # A prompt only partly cached, over the other policy's prefix rows.
    fourth = third + base[5:40]
    (hit,) = await _run(model_path, tmp_path / "a", b, [fourth])
    (miss,) = await _run(model_path, tmp_path / "cold4", a, [fourth])
    assert miss[1] == "cold"
    assert hit[1] == "partial"
    assert hit[0] == miss[0]
