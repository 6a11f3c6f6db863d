"""The blocking facade runs the same engine for scripts."""

from __future__ import annotations

import erllama


def test_blocking_facade() -> None:
    from erllama.blocking import Engine

    with Engine(policy=erllama.Policy(min_tokens=8, cold_min_tokens=8)) as engine:
        model = engine.load_model("m", backend="stub")
        result = model.complete("one two three", max_tokens=3)
        assert len(result.tokens) == 3
        pieces = list(model.stream("one two three", max_tokens=3))
        assert "".join(pieces) == result.text
