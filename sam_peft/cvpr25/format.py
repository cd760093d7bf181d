"""The CVPR 2025 interactive 3D challenge's case files (.npz), read and written.

A case holds `imgs` (D, H, W) uint8 already windowed to 0-255, `spacing` (mm, array order) and usually
`boxes`: per class a dict with the slice range `z_min`..`z_max`, the middle labelled slice `z_mid` and
the 2D box on it (`z_mid_x_min`, `z_mid_y_min`, `z_mid_x_max`, `z_mid_y_max`, pixel indices, enlarged by
0-5 px at a 256 scale as the organisers' `get_boxes.py` makes them). The evaluator adds `clicks` (per
class {"fg": [[z, y, x], ...], "bg": [...]}), `clicks_order` and `prev_pred` before each refinement step.
Training and scoring files also hold `gts` (D, H, W) with values 1..K; predictions are `segs` with the
value k + 1 for the k-th class. `write_cases` turns any layout `prepare` reads into such files.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.label_maps import LabelMap, load_label_map
from ..data.layouts import discover_cases
from ..data.prepare import PrepareOptions, _load, _match_grids, to_unit_range
from ..io import UNREADABLE, atomic_path

BOX_SEED = 2025  # the organisers' seed for the box enlargement
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
POINT = tuple[int, int, int]  # (z, y, x) voxel index


@dataclass
class ChallengeCase:
    """One case as the participant's program sees it (and `gts` where the file holds it)."""

    name: str
    imgs: np.ndarray
    spacing: tuple[float, float, float]
    boxes: list[dict] | None = None
    clicks: list[dict] | None = None  # per class {"fg": [(z, y, x), ...], "bg": [...]}
    clicks_order: list[list] | None = None
    prev_pred: np.ndarray | None = None
    gts: np.ndarray | None = None
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Classes to segment: one per box, per click list, or per label value."""
        for known in (self.boxes, self.clicks):
            if known is not None:
                return len(known)
        if self.gts is not None:
            return int(self.gts.max())
        raise ValueError(f"case {self.name}: neither boxes, clicks nor gts say how many classes to segment")


def _object(value):
    """np.load's 0-d / 1-d object arrays -> plain Python lists and dicts."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _points(points) -> list[POINT]:
    return [tuple(int(v) for v in point) for point in (points if points is not None else [])]


def read_case(path: str | Path) -> ChallengeCase:
    """Read one challenge .npz; a missing or malformed key is a ValueError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=True) as data:
            fields = {key: data[key] for key in data.files}
    except (OSError, ValueError, *UNREADABLE) as error:
        raise ValueError(f"{path}: cannot be read as a challenge .npz ({type(error).__name__}: {error})") from error
    if "imgs" not in fields or "spacing" not in fields:
        raise ValueError(f"{path}: a challenge case needs 'imgs' and 'spacing', found {sorted(fields)}")
    imgs = np.asarray(fields["imgs"])
    if imgs.ndim != 3:
        raise ValueError(f"{path}: 'imgs' must be (D, H, W), got shape {imgs.shape}")
    spacing = tuple(float(s) for s in np.asarray(fields["spacing"], dtype=np.float64).ravel())
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{path}: 'spacing' must hold 3 positive voxel sizes (mm), got {spacing}")
    boxes = _object(fields.get("boxes"))
    if boxes is not None:
        if not all(isinstance(b, Mapping) and set(BOX_KEYS) <= set(b) for b in boxes):
            raise ValueError(f"{path}: every entry of 'boxes' must hold {BOX_KEYS}")
        boxes = [{key: int(b[key]) for key in BOX_KEYS} for b in boxes]
    clicks = _object(fields.get("clicks"))
    if clicks is not None:
        clicks = [{"fg": _points(c.get("fg")), "bg": _points(c.get("bg"))} for c in clicks]
    names = fields.get("class_names")
    return ChallengeCase(
        name=path.name[: -len(".npz")] if path.name.endswith(".npz") else path.stem,
        imgs=imgs.astype(np.uint8, copy=False),
        spacing=spacing,
        boxes=boxes,
        clicks=clicks,
        clicks_order=_object(fields.get("clicks_order")),
        prev_pred=fields.get("prev_pred"),
        gts=fields.get("gts"),
        class_names=None if names is None else [str(n) for n in names],
    )


def write_npz(path: str | Path, **arrays) -> None:
    """np.savez_compressed, atomically (a crash never leaves half a case for the next step to read)."""
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def write_segmentation(path: str | Path, segs: np.ndarray) -> None:
    """The participant's output: `segs` (D, H, W) uint8."""
    write_npz(path, segs=np.asarray(segs, dtype=np.uint8))


def box_of(mask: np.ndarray, rng: np.random.RandomState) -> dict:
    """The organisers' box of one 3D class mask: its slice range, the middle of its labelled slices, and the
    2D box on that slice enlarged by 0-5 px at a 256 scale (one `rng.randint(0, 6)` per class), clipped."""
    z, _, _ = np.nonzero(mask)
    if z.size == 0:
        raise ValueError("box_of: the class mask is empty")
    labelled = np.unique(z)
    z_mid = int(labelled[len(labelled) // 2])
    ys, xs = np.nonzero(mask[z_mid])
    h, w = mask.shape[1:]
    shift = int(rng.randint(0, 6, 1)[0])
    dx, dy = int(shift * w / 256), int(shift * h / 256)
    return {"z_min": int(labelled[0]), "z_max": int(labelled[-1]), "z_mid": z_mid,
            "z_mid_x_min": max(0, int(xs.min()) - dx), "z_mid_y_min": max(0, int(ys.min()) - dy),
            "z_mid_x_max": min(w - 1, int(xs.max()) + dx), "z_mid_y_max": min(h - 1, int(ys.max()) + dy)}


def boxes_of(gts: np.ndarray, seed: int = BOX_SEED) -> list[dict]:
    """One box per class 1..K of a sequentially labelled `gts`, drawn as `get_boxes.py` draws them."""
    rng = np.random.RandomState(seed)
    return [box_of(gts == k, rng) for k in range(1, int(gts.max()) + 1)]


def write_case(path: str | Path, imgs: np.ndarray, gts: np.ndarray, spacing: Sequence[float],
               class_names: Sequence[str] | None = None, boxes: bool = True, seed: int = BOX_SEED) -> None:
    """A challenge case with ground truth (`gts` values 1..K, every class present) and, unless `boxes` is
    False (a clicks-only case), the organisers' boxes. `class_names` are kept under 'class_names'."""
    gts = np.asarray(gts)
    present = np.unique(gts[gts > 0])
    if not np.array_equal(present, np.arange(1, len(present) + 1)) or len(present) == 0:
        raise ValueError(f"{path}: gts must hold every class 1..K at least once, got values {present.tolist()}")
    if imgs.shape != gts.shape or imgs.dtype != np.uint8:
        raise ValueError(f"{path}: imgs must be uint8 of the gts' shape {gts.shape}, got {imgs.dtype} {imgs.shape}")
    arrays = {"imgs": imgs, "gts": gts.astype(np.uint8), "spacing": np.asarray(spacing, dtype=np.float64)}
    if boxes:
        arrays["boxes"] = np.array(boxes_of(gts, seed), dtype=object)
    if class_names is not None:
        arrays["class_names"] = np.asarray(list(class_names))
    write_npz(path, **arrays)


def write_cases(images: str | Path, labels: str | Path | None, output: str | Path,
                label_map: LabelMap | str | Path | Mapping = "totalsegmentator", organs: Sequence[str] | None = None,
                min_voxels: int = 1000, window: str | Sequence[float] = "abdomen", modality: str = "auto",
                boxes: bool = True, seed: int = BOX_SEED) -> list[Path]:
    """Every case `prepare` finds under `images` (and `labels`) -> `<output>/<case>.npz` in the challenge format.

    The volume is reoriented to the display orientation and windowed as `prepare` does; its classes are the
    label map's organs (only `organs` if given) with at least `min_voxels` voxels, numbered 1..K in label
    map order. Returns the files written.
    """
    options = PrepareOptions(label_map=load_label_map(label_map), window=window, modality=modality)
    names = options.label_map.organ_names
    if organs is not None:
        unknown = [o for o in organs if options.label_map.index(o) is None]
        if unknown:
            raise ValueError(f"organs {unknown} are not in the label map {options.label_map.name!r}")
        wanted = {options.label_map.index(o) for o in organs}
    else:
        wanted = set(range(1, len(names) + 1))
    written = []
    for case in discover_cases(images, labels):
        image, label = _match_grids(*_load(case, options))
        scaled, _ = to_unit_range(image.array, options)
        indices, counts = np.unique(label.array, return_counts=True)
        keep = [int(i) for i, n in zip(indices, counts) if i in wanted and n >= min_voxels]
        if not keep:
            raise ValueError(f"case {case.case_id}: no class with at least {min_voxels} voxels to write")
        lut = np.zeros(int(label.array.max()) + 1, dtype=np.uint8)
        lut[keep] = np.arange(1, len(keep) + 1)
        path = Path(output) / f"{case.case_id}.npz"
        write_case(path, np.rint(scaled).astype(np.uint8), lut[label.array], image.spacing,
                   [names[i - 1] for i in keep], boxes, seed)
        written.append(path)
    return written
