"""File I/O: atomic output (a crashed or failed write never leaves a half-written file in place), and
naming the file when one cannot be read."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import yaml
from pyarrow import ArrowException
from safetensors import SafetensorError

# what reading a truncated or corrupt weight, checkpoint, cache, dataset or config file raises
UNREADABLE = (SafetensorError, EOFError, pickle.UnpicklingError, zlib.error, yaml.YAMLError, json.JSONDecodeError,
              UnicodeDecodeError, ArrowException)
UNREADABLE_FIX = "the file may be truncated or corrupt: save, copy or download it again"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) that replaces `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Name `what` (a file, or an option and its value) when what it points to cannot be read."""
    try:
        yield
    except UNREADABLE as err:
        raise ValueError(f"{what}: cannot be read ({type(err).__name__}: {err}); {UNREADABLE_FIX}") from err
