"""Cache checks several test files repeat."""

from __future__ import annotations

from collections.abc import Sequence

import erllama


async def cold_then_exact(
    engine: erllama.Engine, model: erllama.Model, prompt: Sequence[int], label: str
) -> list[int]:
    """Runs ``prompt`` cold (rows of other settings for it may be stored: they
    must not serve it), then, with the sequence evicted and the save landed,
    again as an exact hit from the tier that computes nothing; returns the
    cold tokens, which the hit must repeat."""
    cold = await model.complete(list(prompt), max_tokens=12)
    assert cold.stats.cache_hit_kind == "cold", label
    await model.evict()
    assert engine.cache.settle()
    warm = await model.complete(list(prompt), max_tokens=12)
    assert (warm.stats.cache_hit_kind, warm.stats.prefill_tokens) == ("exact", 0)
    assert warm.tokens == cold.tokens
    return list(cold.tokens)
