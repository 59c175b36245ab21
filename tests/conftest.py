"""Shared fixtures. Real data lives in ``../shared/data`` (override: ``CFWS_JAX_SHARED_DATA``);
tests that need it skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CFWS_JAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a file in the shared data folder, or skip the calling test if it is absent."""
    path = shared_data_dir() / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not present")
    return path


@pytest.fixture
def shared_data():
    """Callable fixture: ``shared_data("mobileone_s0_deploy_awkrail.npz") -> Path`` (or skip)."""
    return shared_file
