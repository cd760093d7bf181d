"""`predict_volume`: segment organs in a CT / MR volume from a few prompts, slice by slice.

The volume (NIfTI file or DICOM series) is reoriented to the display orientation of prepared slices and
windowed as `prepare` does, so the model sees what it was trained on. Prompts live in that frame: `z` is
the axial slice index from inferior to superior (a prepared slice's `slice_index`), `x` the column
(patient right -> left) and `y` the row (anterior -> posterior). Each prompted slice is segmented, and its
mask's bounding box, slightly enlarged, prompts the next slice in both directions until the organ ends
(`StopRule`: the mask vanishes, fades to a remnant, leaves the previous slice's mask, or the IoU head's
estimate drops well below this organ's own): one box segments a whole organ. A `box3d` prompts
its middle slice and propagates within its slice range. Labels go back to the input's grid and affine
(overlaps go to the organ with the higher logit) and are written as NIfTI with a sidecar JSON label map;
where and why each organ's propagation stopped is printed and recorded in the sidecar.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import aff2axcodes
from tqdm.auto import tqdm

from ..data.label_maps import LabelMap, load_label_map, organ_key
from ..data.prepare import PrepareOptions, Window, check_image, check_writable, to_unit_range
from ..data.readers import (
    NIFTI_SUFFIXES,
    Volume,
    read_volume,
    reorient,
    strip_suffix,
    to_display,
)
from ..io import atomic_path
from ..names import did_you_mean
from .predictor import MultiOrganPredictor, parse_prompt

logger = logging.getLogger(__name__)

LABEL_LIKE_VALUES = 128  # a TotalSegmentator label volume holds at most 118 values; a CT or MR scan thousands
PROPAGATION_MARGIN = 12.0  # px at 1024 scale around the previous slice's mask box (3 px at LiteMedSAM's 256)


@dataclass(frozen=True)
class _Chain:
    """What one propagation has accepted so far: its last slice and mask, its largest mask, its scores."""

    z: int
    pixels: np.ndarray  # flat indices of the last accepted mask's pixels
    largest: int  # pixels of the largest accepted mask
    scores: tuple[float, ...]  # the IoU head's estimates of the accepted masks

    def then(self, z: int, pixels: np.ndarray, score: float) -> _Chain:
        return _Chain(z, pixels, max(self.largest, len(pixels)), (*self.scores, score))


@dataclass(frozen=True)
class StopRule:
    """When a propagated mask ends its organ; `reason` says why, in words printed to the user.

    Box-trained models fill any box they are given, even past the organ's end, so the end shows in the
    masks: the mask vanishes (`min_pixels`), fades to a remnant of the organ's largest cross-section so far
    (`min_area_fraction`), or slides off the previous slice's mask onto a neighbour (`min_overlap`, of the
    smaller mask's pixels). The IoU head's estimate drops there too, but a fine-tuned head can be low
    everywhere (adapters from the demo recipe rate masks of true IoU 0.95 at 0.8 and stop after one slice
    with a plain threshold), so a low estimate ends an organ only when it is below `min_score` and also
    `score_drop` below this organ's median estimate so far, which a uniformly shifted head shifts too.
    """

    min_pixels: int = 10
    min_score: float = 0.75
    score_drop: float = 0.1
    min_overlap: float = 0.5
    min_area_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.min_pixels, int) and self.min_pixels >= 1):
            raise ValueError(f"min_pixels must be an integer >= 1, got {self.min_pixels!r}")
        for name in ("min_score", "score_drop", "min_overlap", "min_area_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # also refuses NaN
                option = " (--min-score)" if name == "min_score" else ""
                raise ValueError(f"{name}{option} must lie in [0, 1], got {getattr(self, name)!r}")

    def reason(self, pixels: np.ndarray, score: float, chain: _Chain) -> str | None:
        """None to keep the mask `pixels` (flat indices) that continues `chain`, else why the organ ends."""
        if len(pixels) < self.min_pixels:
            return f"the mask has {len(pixels)} pixels (< {self.min_pixels})"
        shared = np.intersect1d(pixels, chain.pixels, assume_unique=True).size / min(len(pixels), len(chain.pixels))
        if shared < self.min_overlap:
            return (f"the mask shares {shared:.0%} of its pixels with slice {chain.z}'s (< {self.min_overlap:.0%}): "
                    "it left the organ")
        if len(pixels) < self.min_area_fraction * chain.largest:
            return (f"the mask ({len(pixels)} px) is {len(pixels) / chain.largest:.0%} of the organ's largest "
                    f"({chain.largest} px, < {self.min_area_fraction:.0%}): the organ ended")
        median = float(np.median(chain.scores))
        if score < self.min_score and score < median - self.score_drop:
            return (f"the IoU estimate {score:.2f} is below {self.min_score} and more than {self.score_drop} below "
                    f"the organ's median {median:.2f}")
        return None


@dataclass
class _Seed:
    organ: str
    z: int
    prompt: Mapping  # a slice prompt, see `parse_prompt`
    reach: tuple[int, int]  # the slices propagation from this seed may visit
    chain: _Chain | None = None  # None: prompted by the user; else the propagation this slice continues


def predict_volume(
    model,
    input_path: str | Path,
    prompts: Mapping | str | Path,
    label_map: LabelMap | Sequence[str] | str | Path | Mapping | None,
    output_path: str | Path,
    window: Window | str | Sequence[float] = "abdomen",
    modality: str = "auto",
    propagate: bool = True,
    min_pixels: int = 10,
    min_score: float = 0.75,
    progress: bool = True,
) -> dict:
    """Segment the prompted organs of `input_path` and write a label NIfTI on its grid plus `<output>.json`.

    model: the model, or a function returning it, called only once the volume, the prompts and the output
    path have passed their checks (the command line loads its model then, so bad input fails at once).
    prompts (a dict or a JSON file), per organ name: {"slices": {"<z>": {"box": [x0, y0, x1, y1]} or
    {"points": [[x, y], ...], "labels": [1 | 0, ...]} or both}} and/or {"box3d": [x0, y0, z0, x1, y1, z1]}.
    label_map: a list of organ names (label values 1, 2, ...), or a label map preset / file / dict whose
    ids the output uses; None: the adapter's training label map, else TotalSegmentator's. window /
    modality: the intensity conversion of `prepare` (match the training data). propagate: carry every
    prompted slice's mask to the neighbouring slices until `StopRule` (with `min_pixels` and `min_score`)
    ends the organ; a prompted slice is always kept. progress: show a progress bar and print where and why
    each organ's propagation stopped. Returns the sidecar's content, which records those stops under
    "propagation". A volume that cannot be a scan (NaN voxels, one value everywhere) is refused; one that
    looks like a label volume is warned about.
    """
    output_path = Path(output_path)
    if not output_path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"output {output_path} must be a NIfTI file name ending in .nii.gz or .nii")
    check_writable(output_path, "output", folder=False)
    rule = StopRule(min_pixels=min_pixels, min_score=min_score)
    if isinstance(label_map, Sequence) and not isinstance(label_map, str):
        label_map = LabelMap.from_ids(dict(enumerate(label_map, 1)), "organ names")
    label_map = None if label_map is None else load_label_map(label_map)
    volume = read_volume(input_path, "image")
    check_scan(volume)
    display = to_display(volume)
    requested = _read_prompts(prompts)
    seeds = _seeds(requested, display.array.shape)
    if label_map is not None:
        _check_organs(requested, label_map)
    scaled, _ = to_unit_range(display.array, PrepareOptions(window=window, modality=modality))
    model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    if label_map is None:
        label_map = load_label_map(model_label_map(model))
        _check_organs(requested, label_map)
    ids = output_ids(label_map, {seed.organ for seed in seeds})
    segmenter = _Segmenter(MultiOrganPredictor(model), np.rint(scaled).astype(np.uint8), ids, rule)
    segmenter.run(seeds, propagate, progress)
    if progress:
        for organ, record in segmenter.record().items():
            for stop in record["stops"]:
                print(f"{organ}: stopped at slice {stop['slice']} ({stop['direction']}): {stop['reason']}")
    return save_labels(segmenter.labels, display.affine, volume, ids, output_path,
                       input=str(input_path), label_map=label_map.name, propagation=segmenter.record())


def model_label_map(model) -> Mapping | str:
    """The label map (ids) an adapter was trained with, recorded in it; else TotalSegmentator's."""
    return (getattr(model, "sam_peft_info", {}).get("label_map") or {}).get("ids") or "totalsegmentator"


def check_scan(volume: Volume) -> None:
    """`prepare`'s image checks (no NaN, not one value everywhere), and a loud warning for a volume of a few
    integer values: a label volume passed as the image would be 'segmented' without complaint."""
    check_image(volume)
    sample = volume.array.ravel()[:: max(1, volume.array.size // 2**20)]  # distinct values show in a sample
    values = np.unique(sample)
    if len(values) <= LABEL_LIKE_VALUES and np.array_equal(values, np.round(values)):
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        logger.warning("WARNING: %s holds only %d distinct integer values (%s): it looks like a label volume, not a "
                       "CT or MR image; if so the segmentation means nothing: pass the scan itself", volume.path,
                       len(values), shown)


def save_labels(labels: np.ndarray, display_affine: np.ndarray, source: Volume, ids: Mapping[str, int],
                output_path: str | Path, **info) -> dict:
    """Write `labels` (display orientation, organ ids `ids`) on the grid and affine of `source` as read, and
    the sidecar `<output>.json` ({"labels": {id: organ}, "voxels": {organ: count}} plus `info`), atomically.
    Returns the sidecar's content."""
    output_path = Path(output_path)
    labels = reorient(Volume(labels, display_affine, source.path), aff2axcodes(source.affine)).array
    image = nib.Nifti1Image(labels, source.affine)
    image.set_qform(source.affine, code=1)
    info = {**info, "output": str(output_path),
            "labels": {str(ids[organ]): organ for organ in sorted(ids, key=ids.get)},
            "voxels": {organ: int((labels == ids[organ]).sum()) for organ in sorted(ids, key=ids.get)}}
    sidecar = output_path.with_name(strip_suffix(output_path) + ".json")
    with atomic_path(output_path) as labels_tmp, atomic_path(sidecar) as sidecar_tmp:
        nib.save(image, labels_tmp)
        sidecar_tmp.write_text(json.dumps(info, indent=2))
    return info


def _read_prompts(prompts: Mapping | str | Path) -> Mapping:
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        try:
            prompts = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"prompts file {path} is not valid JSON: {error}") from error
    if not isinstance(prompts, Mapping) or not prompts:
        raise ValueError(f"prompts must map organ names to {{'slices': ...}} and/or {{'box3d': ...}}, got {prompts!r}")
    return prompts


def _slice_index(value, depth: int, where: str) -> int:
    try:
        z = int(value)
    except (TypeError, ValueError):
        z = None
    if z is None or z != float(value) or not 0 <= z < depth:
        raise ValueError(f"{where}: slice index {value!r} is out of range: the volume has {depth} axial slices "
                         f"(0 = most inferior .. {depth - 1})")
    return z


def _check_organs(prompts: Mapping, label_map: LabelMap) -> None:
    for organ in prompts:
        if label_map.index(organ) is None:
            hint = did_you_mean(organ_key(organ), label_map.organ_names)
            raise ValueError(f"organ {organ!r}{hint} is not in the label map {label_map.name!r}; valid organs are "
                             f"{list(label_map.organ_names)}")


def _seeds(prompts: Mapping, shape: tuple[int, int, int]) -> list[_Seed]:
    """Every prompt checked against the volume before any model work (the organ names: `_check_organs`)."""
    depth, h, w = shape
    seeds: dict[tuple[str, int], _Seed] = {}
    for organ, spec in prompts.items():
        where = f"organ {organ!r}"
        name = organ_key(organ)
        slices = spec.get("slices", {}) if isinstance(spec, Mapping) else None
        if not isinstance(slices, Mapping) or not spec or set(spec) - {"slices", "box3d"}:
            raise ValueError(f"{where}: expected {{'slices': {{'<z>': prompt, ...}}}} and/or "
                             f"{{'box3d': [x0, y0, z0, x1, y1, z1]}}, got {spec!r}")
        for key, prompt in slices.items():
            z = _slice_index(key, depth, where)
            parse_prompt(prompt, (h, w), f"{where} on slice {z}")
            seeds.setdefault((name, z), _Seed(name, z, prompt, (0, depth - 1)))
        if "box3d" in spec:
            box = spec["box3d"]
            if not isinstance(box, Sequence) or len(box) != 6:
                raise ValueError(f"{where}: box3d must be [x0, y0, z0, x1, y1, z1], got {box!r}")
            z0, z1 = (_slice_index(z, depth, f"{where} box3d") for z in (box[2], box[5]))
            if z0 > z1:
                raise ValueError(f"{where}: box3d {box} must have z0 <= z1")
            prompt = {"box": [box[0], box[1], box[3], box[4]]}
            parse_prompt(prompt, (h, w), f"{where} box3d")
            seeds.setdefault((name, (z0 + z1) // 2), _Seed(name, (z0 + z1) // 2, prompt, (z0, z1)))
    return list(seeds.values())


def output_ids(label_map: LabelMap, organs: set[str]) -> dict[str, int]:
    """Organ -> its (smallest) raw id in the label map: the value it gets in the output."""
    ids = {}
    for raw_id, index in sorted(label_map.index_of_id.items()):
        if index and label_map.organ_names[index - 1] in organs:
            ids.setdefault(label_map.organ_names[index - 1], raw_id)
    return ids


def _bounding_box(mask: np.ndarray, margin: float) -> list[float]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return [max(0.0, xs.min() - margin), max(0.0, ys.min() - margin),
            min(w - 1.0, xs.max() + margin), min(h - 1.0, ys.max() + margin)]


class _Segmenter:
    """The label volume in display orientation, filled slice by slice: one encoder pass per visited slice,
    all organs of that slice in one `predict`. Where organs overlap, the higher logit wins.

    A propagated mask is kept until `rule` ends its organ; a slice the user prompted is always kept (an
    empty mask there has nothing to propagate and is reported instead).
    """

    def __init__(self, predictor: MultiOrganPredictor, pixels: np.ndarray, ids: dict[str, int], rule: StopRule):
        self.predictor, self.pixels, self.ids, self.rule = predictor, pixels, ids, rule
        self.labels = np.zeros(pixels.shape, dtype=np.uint8 if max(ids.values()) < 256 else np.uint16)
        self.best = np.zeros(pixels.shape, dtype=np.float32)  # winning logit per voxel (> 0 where labelled)
        # organ -> z -> (mask box, reach, chain), or None where the organ was not kept
        self.found: dict[str, dict[int, tuple | None]] = defaultdict(dict)
        self.stops: dict[str, list[dict]] = defaultdict(list)  # organ -> where and why its propagation stopped
        self.margin = PROPAGATION_MARGIN * max(pixels.shape[1:]) / 1024

    def run(self, seeds: list[_Seed], propagate: bool, progress: bool) -> None:
        """Upwards through the volume, then downwards; a slice prompted by the user is never overridden."""
        depth = self.pixels.shape[0]
        at = defaultdict(list)
        for seed in seeds:
            at[seed.z].append(seed)
        sweeps = [(1, range(depth))] + ([(-1, range(depth - 1, -1, -1))] if propagate else [])
        with tqdm(total=len(sweeps) * depth, desc="Predicting", unit="slice", disable=not progress) as bar:
            for step, zs in sweeps:
                for z in zs:
                    tasks = {seed.organ: seed for seed in at[z] if z not in self.found[seed.organ]}
                    if propagate:
                        tasks = {**self._propagated(z, z - step), **tasks}
                    if tasks:
                        self._segment(z, tasks)
                    bar.update()

    def _propagated(self, z: int, previous: int) -> dict[str, _Seed]:
        """Prompts for slice z from each organ's mask on the previous slice of the sweep."""
        out = {}
        for organ, found in self.found.items():
            if z not in found and found.get(previous) is not None:
                box, reach, chain = found[previous]
                if reach[0] <= z <= reach[1]:
                    out[organ] = _Seed(organ, z, {"box": box}, reach, chain)
        return out

    def _segment(self, z: int, tasks: dict[str, _Seed]) -> None:
        self.predictor.set_image(self.pixels[z])
        predictions = self.predictor.predict({organ: task.prompt for organ, task in tasks.items()})
        for organ, prediction in predictions.items():
            task = tasks[organ]
            pixels = np.flatnonzero(prediction.mask)
            if task.chain is None:  # prompted by the user: kept whatever its size
                reason = None if len(pixels) else "the prompt gave an empty mask"
                chain = _Chain(z, pixels, len(pixels), (prediction.score,))
            else:
                reason = self.rule.reason(pixels, prediction.score, task.chain)
                chain = task.chain.then(z, pixels, prediction.score)
            if reason is not None:
                direction = "prompted" if task.chain is None else "up" if z > task.chain.z else "down"
                self.stops[organ].append({"slice": z, "direction": direction, "reason": reason})
                self.found[organ][z] = None
                continue
            self.found[organ][z] = (_bounding_box(prediction.mask, self.margin), task.reach, chain)
            low_res = torch.from_numpy(prediction.low_res_logits)
            logits = self.predictor.processor.postprocess_masks(low_res, prediction.mask.shape).numpy()
            wins = logits > self.best[z]
            self.labels[z][wins] = self.ids[organ]
            self.best[z][wins] = logits[wins]

    def record(self) -> dict[str, dict]:
        """Organ -> {"slices": [first, last] kept (display z) or None, "stops": [{"slice", "direction", "reason"}]}:
        "up" runs towards higher (superior) slice indices."""
        out = {}
        for organ in sorted(set(self.found) | set(self.stops)):
            kept = [z for z, entry in self.found[organ].items() if entry is not None]
            out[organ] = {"slices": [min(kept), max(kept)] if kept else None,
                          "stops": sorted(self.stops[organ], key=lambda stop: stop["slice"])}
        return out
