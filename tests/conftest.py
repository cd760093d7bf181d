"""Shared test setup: offline Hub, the real data folder, small helpers."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """The real CT folder from ../shared/data; tests that need it skip cleanly without it."""
    if not (SHARED_DATA / "example_ct.nii.gz").exists():
        pytest.skip(f"real CT not found at {SHARED_DATA}")
    return SHARED_DATA
