"""The participant's side of the challenge: `inputs/*.npz` -> `outputs/<case>.npz` with `segs`, once per step.

Each step is a fresh process, so what a later step reuses lives in a cache folder (by default
`<outputs>/.sam_peft_cache`, the one folder besides the inputs that survives between runs of a container):
per case (keyed by the hash of its image and the model) the slice embeddings, and the per-class 3D masks
with the clicks that made them, so a click step applies only its new click.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..evaluation.predictor import MultiOrganPredictor
from ..io import atomic_path
from .format import ChallengeCase, read_case, write_segmentation
from .options import DEFAULT_PROPAGATION, Propagation, propagation_for
from .segmenter import ClassState, EmbeddingCache, Segmenter, collapse, content_key, ordered_clicks

STATE_VERSION = 6  # bump when the segmenter changes what a click does: saved masks of older rules are not reused


def _check_clicks(case: ChallengeCase) -> None:
    depth, h, w = case.imgs.shape
    for k, clicks in enumerate(case.clicks or []):
        for kind in ("fg", "bg"):
            for point in clicks[kind]:
                if len(point) != 3 or not (0 <= point[0] < depth and 0 <= point[1] < h and 0 <= point[2] < w):
                    raise ValueError(f"case {case.name}: class {k + 1} {kind} click {list(point)} is not a [z, y, x] "
                                     f"voxel of the {case.imgs.shape} image")


def _load_states(path: Path, shape: tuple) -> tuple[list, list]:
    """Saved per-class states and the clicks each had seen; nothing when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            packed = data["masks"]
        states = []
        for k, info in enumerate(meta["states"]):
            if info is None:
                states.append(None)
                continue
            masks = np.unpackbits(packed[k], count=int(np.prod(shape))).reshape(shape).astype(bool)
            states.append(ClassState(masks, info["low"], info["high"], set(info["anchors"]), info["centre"],
                                     info["boxed"], info["size"]))
        return states, meta["clicks"]
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return [], []


def _save_states(path: Path, states: list, applied: list) -> None:
    meta = {"states": [None if s is None else {"low": s.low, "high": s.high, "anchors": sorted(s.anchors),
                                                 "centre": s.centre, "boxed": s.boxed, "size": s.size} for s in states],
            "clicks": applied}
    shape = next((s.masks.shape for s in states if s is not None), (0,))
    empty = np.zeros(int(np.prod(shape)), dtype=bool)
    masks = np.stack([np.packbits((empty if s is None else s.masks).ravel()) for s in states])
    with atomic_path(path) as tmp:
        np.savez(tmp, masks=masks, meta=np.array(json.dumps(meta)))


def segment_case(case: ChallengeCase, segmenter: Segmenter, saved: tuple[list, list] = ([], [])) -> tuple[list, list]:
    """Every class of `case` after its box and clicks; `saved`: states and applied clicks from an earlier
    step, reused where their clicks are a prefix of this step's. Returns the states and applied clicks."""
    saved_states, saved_clicks = saved
    states, applied = [], []
    for k in range(case.num_classes):
        clicks = [[kind, list(point)] for kind, point in ordered_clicks(case, k)]
        done = saved_clicks[k] if k < len(saved_clicks) else None
        if done is not None and clicks[: len(done)] == done:
            state, start = saved_states[k], len(done)
        else:
            state = segmenter.box_step(case.boxes[k]) if case.boxes is not None else None
            start = 0
        seen = {"fg": [], "bg": []}
        for kind, point in clicks[:start]:
            seen[kind].append(tuple(point))
        for kind, point in clicks[start:]:
            seen[kind].append(tuple(point))
            state = segmenter.click_step(state, kind, tuple(point), seen)
        states.append(state)
        applied.append(clicks)
    return states, applied


def run_challenge(inputs: str | Path, outputs: str | Path, model, model_id: str, cache: str | Path | None = None,
                  propagation: Propagation | str = DEFAULT_PROPAGATION, log=print) -> list[Path]:
    """The predict.sh contract: segment every `inputs/*.npz` into `outputs/<case>.npz`. `model_id` names the
    model in the cache key; `cache` defaults to `<outputs>/.sam_peft_cache` (False-y string "" disables it);
    `propagation`: a variant of `PROPAGATION`, or "auto" (`propagation_for`)."""
    propagation = propagation_for(propagation, has_adapter=hasattr(model, "disable_adapter"))
    inputs, outputs = Path(inputs), Path(outputs)
    files = sorted(inputs.glob("*.npz")) if inputs.is_dir() else []
    if not files:
        raise ValueError(f"--inputs {inputs}: no .npz case files found")
    cache = outputs / ".sam_peft_cache" if cache is None else (Path(cache) if str(cache) else None)
    predictor = MultiOrganPredictor(model)
    written = []
    for file in files:
        start = time.perf_counter()
        case = read_case(file)
        _check_clicks(case)
        if case.boxes is None and case.clicks is None:
            raise ValueError(f"{file}: neither 'boxes' nor 'clicks': nothing says what to segment")
        folder = None if cache is None else cache / content_key(case.imgs, model_id)
        embeddings = EmbeddingCache(predictor, case.imgs, None if folder is None else folder / "embeddings")
        segmenter = Segmenter(predictor, embeddings, case.imgs.shape, propagation, case.spacing)
        state_file = None if folder is None else folder / f"states-v{STATE_VERSION}-{propagation}.npz"
        saved = _load_states(state_file, case.imgs.shape) if state_file is not None else ([], [])
        states, applied = segment_case(case, segmenter, saved)
        if state_file is not None:
            _save_states(state_file, states, applied)
        path = outputs / file.name
        write_segmentation(path, collapse(states, case.imgs.shape, applied))
        written.append(path)
        log(f"{file.name}: {case.num_classes} classes, {embeddings.encoded} slices encoded, {segmenter.decoded} "
            f"decoded, {time.perf_counter() - start:.1f} s")
    return written
