"""Shared fixtures: tiny random transformers models, real assets, registry isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
PACKAGE_ASSETS = REPO / "quark" / "torch" / "llm" / "assets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_assets() -> Path:
    """``../shared/assets`` beside the checkout; tests needing it skip when it is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"real assets not found at {SHARED_ASSETS}")
    return SHARED_ASSETS


@pytest.fixture
def stories_dir() -> Path:
    """The embedded stories260K model folder shipped inside the package."""
    return PACKAGE_ASSETS / "stories260K"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
