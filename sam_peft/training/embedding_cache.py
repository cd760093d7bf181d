"""Frozen-encoder mode: image embeddings computed once, cached on disk, then looked up by sample id.

The image encoder is most of a step's cost; when only decoder adapters train, its output never changes,
so it is computed once per (model weights, dataset, processor) and memory-mapped afterwards.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..io import atomic_path
from ..models.decoding import encode_images
from ..models.lora import base_fingerprint
from ..models.processor import SamInputProcessor


def cache_key(model, dataset: Dataset, processor: SamInputProcessor) -> str:
    text = json.dumps([base_fingerprint(model), dataset._fingerprint, len(dataset), processor.to_dict()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def image_embeddings(
    model, dataset: Dataset, processor: SamInputProcessor, cache_dir: str | Path,
    batch_size: int = 8, progress: bool = True,
) -> torch.Tensor:
    """(N, C, h, w) float16 embeddings of every row's `image`, from `cache_dir` when already computed."""
    path = Path(cache_dir) / f"embeddings-{cache_key(model, dataset, processor)}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path, mmap_mode="r"))
    if progress:
        print(f"caching image embeddings of {len(dataset)} slices in {path} (delete the folder to free the space)")
    array = encode_dataset(model, dataset, processor, batch_size, progress)
    with atomic_path(path) as tmp:
        np.save(tmp, array)
    return torch.from_numpy(array)


@torch.inference_mode()
def encode_dataset(model, dataset: Dataset, processor: SamInputProcessor, batch_size: int = 8,
                   progress: bool = True) -> np.ndarray:
    """(N, C, h, w) float16 encoder outputs of every row's `image`, computed wherever `model` is: the pixels
    follow its parameters, so no caller can send them to another device than the weights."""
    parameter = next(model.parameters())
    images = dataset.with_format("numpy")
    chunks = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="caching image embeddings", disable=not progress):
        rows = images[start:start + batch_size]["image"]
        pixels = torch.stack([processor.preprocess(np.asarray(im, dtype=np.uint8)) for im in rows])
        pixels = pixels.to(parameter.device, parameter.dtype)
        chunks.append(encode_images(model, pixels).to("cpu", torch.float16).numpy())
    return np.concatenate(chunks)
