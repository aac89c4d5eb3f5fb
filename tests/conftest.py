"""Fixtures: tiny random-weight models of each supported architecture (see tiny_models.py)."""

from __future__ import annotations

import pytest
import torch

from browser import driver  # noqa: F401  (the headless Chromium fixture of the page tests)
from tiny_models import ARCHS, make_model


@pytest.fixture(params=ARCHS)
def arch_model(request) -> torch.nn.Module:
    return make_model(request.param)


@pytest.fixture
def llama() -> torch.nn.Module:
    return make_model("llama")
