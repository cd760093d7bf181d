"""The CPU memory policy `sam-peft` sets at start."""
import sys

import pytest

from sam_peft.memory import return_large_blocks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_return_large_blocks_sets_the_threshold_unless_the_user_did(monkeypatch):
    assert return_large_blocks() is True  # glibc accepted the fixed threshold
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_large_blocks() is False  # the user's own setting wins
