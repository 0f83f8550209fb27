"""Shared fixtures: real models (fetched into a cache outside the repo) and small graph builders."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import MODELS, ModelUnavailable, model_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_numpy():
    """Reference kernels overflow on purpose in some cases; keep the output readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture(scope="session")
def real_model():
    """``real_model(name) -> Path``: a real model, or a skip saying why it is unavailable."""

    def get(name: str) -> Path:
        try:
            return model_path(name)
        except ModelUnavailable as e:
            pytest.skip(str(e))

    return get


def pytest_collection_modifyitems(items):
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.models)


__all__ = ["MODELS", "REPO"]
