"""Untrusted grammars cannot hurt the process (real model).

Each hostile grammar found by the bad-input sweep used to stall a model for
seconds to minutes (or allocate gigabytes); now each is refused before
llama.cpp sees it, within a bounded wall time, and a request queued behind
it is not held up. A grammar-constrained request is cancelled promptly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import erllama
from erllama.errors import GrammarError

pytestmark = [pytest.mark.asyncio, pytest.mark.real_model]

HOSTILE = {
    "nested bounded repetitions": 'root ::= (("a"{0,12}){0,12}){0,12}',
    "minimum above maximum": 'root ::= "a"{2,1}',
    "50 KB of optional sequences": "root ::= " + ' ("a" "b"?)?' * 4500,
    "hidden left recursion": 'root ::= e "a"\ne ::= "" | root',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_grammar_is_refused_quickly_and_blocks_no_one(
    model_path: Path, name: str
) -> None:
    async with erllama.Engine() as engine:
        model = await engine.load_model(model_path, n_ctx=512, n_threads=2)
        hostile = model.stream("Say a:", grammar=HOSTILE[name], max_tokens=8)
        plain = model.stream("The capital of France is", max_tokens=4)
        # The wall time is bounded (wait_for): unguarded, these took 25 s to
        # minutes, or never ended.
        with pytest.raises(GrammarError):
            await asyncio.wait_for(hostile.result(), timeout=20)
        done = await asyncio.wait_for(plain.result(), timeout=20)
        assert done.stats.completion_tokens > 0


async def test_a_json_grammar_works_and_cancel_ends_it_promptly(model_path: Path) -> None:
    grammar = (
        'root ::= "{" ws "\\"items\\":" ws "[" ws item ("," ws item)* ws "]" ws "}"\n'
        'item ::= "\\"" [a-z]{1,200} "\\""\n'
        "ws ::= [ \\t\\n]*\n"
    )
    async with erllama.Engine() as engine:
        model = await engine.load_model(model_path, n_ctx=1024, n_threads=2)
        short = await model.complete("List fruits as JSON:", grammar=grammar, max_tokens=12)
        assert short.text.startswith("{")
        stream = model.stream("List fruits as JSON:", grammar=grammar, max_tokens=600)
        it = aiter(stream)
        await anext(it)
        assert await engine.cancel(stream.request_id)
        result = await asyncio.wait_for(stream.result(), timeout=20)
        assert result.stats.finish_reason == "cancelled"
