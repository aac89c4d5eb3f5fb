"""Shared fixtures for the integration tests, which run the embedded SmolLM2-135M model on CPU.

Everything under tests/integration/ is marked ``integration`` (deselect with ``-m "not integration"``).
The first run converts the GGUF file into the kvsieve cache (about 30 s); later runs load in under a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvsieve.models import load_model, load_tokenizer

torch.set_num_threads(2)

_HERE = Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the items collected from this folder (the hook sees every item of the session)."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, float32 on CPU, loaded once."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The tokenizer of the embedded SmolLM2-135M-Instruct, loaded once."""
    return load_tokenizer("smollm2-135m")
