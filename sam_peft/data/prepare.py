"""Medical volumes -> a `datasets.DatasetDict` of 2D slices on disk, the input of training and evaluation.

Each case is read, reoriented to the radiological display (image and label matched in world space through
their affines), mapped to compact organ indices, converted to 8-bit (CT window or MR percentiles), sliced
along the requested planes, and the slices holding an organ are written to Arrow.

Columns: `image` (H, W) uint8; `label` (H, W) compact organ indices (0 = background, k = organ_names[k-1]),
uint8 or int16 for label maps of more than 255 organs; `case_id`; `slice_index` (index along the plane's
normal in display orientation: axial slices from inferior to superior); `plane`; `spacing`
[row_mm, col_mm, slice_mm]; `organs` (names of organs with at least `min_pixels` pixels, in label order);
`organ_pixels` (their pixel counts).

`image` and `label` are stored as `Array2D` when every slice has one shape (fastest to load: zero-copy)
and as nested lists otherwise; either way `with_format("numpy")` / `("torch")` return 2D arrays
(as int64, the `datasets` default for integers; the values stay 0..255 and organ indices).

Slice display convention: axial rows run anterior -> posterior and columns patient right -> patient left;
coronal rows superior -> inferior, columns right -> left; sagittal rows superior -> inferior, columns
anterior -> posterior. Metadata (organ names, label map, intensity conversion, sources) is stored as JSON
in each split's `info.description`; `read_metadata` returns it.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import multiprocessing
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Array2D, Dataset, DatasetDict, Features, Sequence as ListOf, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from scipy import ndimage
from tqdm.auto import tqdm

from ..io import UNREADABLE
from .label_maps import PRESET_HELP, LabelMap, load_label_map, organ_key
from .layouts import Case, detect_layout, discover_cases, read_dataset_labels
from .options import MODALITIES, PLANES, Window, parse_window
from .readers import Volume, read_volume, to_display

logger = logging.getLogger(__name__)

FORMAT_KEY = "sam_peft_prepared"  # marks (and versions) the metadata of a prepared dataset
SPLITS = ("train", "validation", "test")
TOTALSEGMENTATOR_TASKS = {"totalsegmentator": "ct", "totalsegmentator_mr": "mr"}  # label map preset -> modality
SINGLE_CASE_HINT = (" With one case, prepare without --val-fraction / --test-fraction and use its train split: "
                    "`sam-peft evaluate --split train`, `sam-peft train --val-split train` (scores on slices the "
                    "model trained on, not on held-out ones)")
MR_PERCENTILES = (0.5, 99.5)
_WRITER_BATCH = 64  # rows buffered before an Arrow write: bounds memory for 512x512 slices


@dataclass
class PrepareOptions:
    """How cases become slices; the keywords of `prepare` and `prepare_volumes`.

    label_map: preset name, JSON/YAML file, {id: name} dict or LabelMap; required, because raw label ids do not
      say which organ they are (TotalSegmentator's CT and MR tasks number organs differently, FLARE22 and BTCV
      differently again). `prepare` also takes "dataset" (the names in the layout's dataset.json or per-organ
      mask files) and, given no label map, uses those names, or TotalSegmentator's map for its case folders.
    window: CT window, preset name or "level,width"; modality: "ct", "mr" (percentile normalisation) or
      "auto" (8-bit input kept as is; CT when the volume holds air below -500 HU; otherwise MR).
    planes: any of axial/coronal/sagittal; min_pixels: an organ counts on a slice from this many pixels;
    empty_fraction: share of the slices without an organ kept anyway (seeded); spacing: optional in-plane
      resampling to this pixel size in mm; val_fraction / test_fraction / seed: split by case;
    skip_bad: leave out (and report) cases whose files cannot be read or fail the checks;
    ignore_unknown_labels: label ids or mask names not in the map become background instead of an error.
    """

    label_map: LabelMap | str | Path | Mapping | None = None
    window: Window | str | Sequence[float] = "abdomen"
    modality: str = "auto"
    planes: Sequence[str] = ("axial",)
    min_pixels: int = 10
    empty_fraction: float = 0.0
    spacing: float | None = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    skip_bad: bool = False
    ignore_unknown_labels: bool = False

    def __post_init__(self) -> None:
        self.label_map = None if self.label_map is None else load_label_map(self.label_map)
        self.window = parse_window(self.window)
        self.planes = tuple(dict.fromkeys(self.planes))
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not self.planes or not set(self.planes) <= set(PLANES):
            raise ValueError(f"planes must be a non-empty subset of {PLANES}, got {self.planes}")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels must be at least 1, got {self.min_pixels}")
        if self.spacing is not None and not 0 < self.spacing < math.inf:
            raise ValueError(f"spacing must be a positive size in mm, got {self.spacing}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("empty_fraction", "val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {
            "label_map": self.label_map.to_dict(),
            "intensity": {"modality": self.modality, "window": self.window._asdict(), "mr_percentiles": MR_PERCENTILES},
            "planes": list(self.planes),
            "min_pixels": self.min_pixels,
            "empty_fraction": self.empty_fraction,
            "spacing": self.spacing,
            "seed": self.seed,
        }


@dataclass
class VolumeCase:
    """An in-memory case for `prepare_volumes`: an image and its raw label volume (ids of the label map)."""

    case_id: str
    image: Volume
    label: Volume


@dataclass
class _CaseResult:
    case_id: str
    rows: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    error: str | None = None


def prepare(
    images: str | Path,
    labels: str | Path | None = None,
    *,
    output: str | Path,
    overwrite: bool = False,
    num_proc: int = 1,
    **options,
) -> DatasetDict:
    """Prepare every case found under `images` (a dataset layout, or files/folders paired with `labels`).

    `options` are the fields of `PrepareOptions`. Writes `output` atomically and returns it memory-mapped.
    """
    check_writable(output)  # before reading anything
    cases = discover_cases(images, labels)
    if options.get("label_map") in (None, "dataset"):
        options["label_map"] = _dataset_label_map(Path(images), labels, cases, options.get("label_map") is None)
    source = {"images": str(images), "labels": None if labels is None else str(labels)}
    _build(cases, PrepareOptions(**options), Path(output), source, overwrite, num_proc)
    return load_from_disk(str(output))


def prepare_volumes(
    cases: Iterable[VolumeCase],
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    num_proc: int = 1,
    **options,
) -> DatasetDict:
    """`prepare` for volumes already in memory (phantoms, demos, tests); held in memory when `output` is None."""
    options, cases, source = PrepareOptions(**options), list(cases), {"images": "in-memory volumes"}
    if output is not None:
        check_writable(output)
        _build(cases, options, Path(output), source, overwrite, num_proc)
        return load_from_disk(str(output))
    with tempfile.TemporaryDirectory(prefix="sam_peft_prepare_") as scratch:
        path = Path(scratch) / "dataset"
        _build(cases, options, path, source, overwrite, num_proc)
        return load_from_disk(str(path), keep_in_memory=True)


def read_metadata(dataset: Dataset | DatasetDict) -> dict:
    """The preparation metadata (organ_names, label_map, intensity, planes, cases...) of a prepared dataset."""
    first = next(iter(dataset.values()), None) if isinstance(dataset, DatasetDict) else dataset
    try:
        metadata = json.loads(first.info.description or "")
    except (AttributeError, json.JSONDecodeError):
        metadata = None
    if not isinstance(metadata, dict) or FORMAT_KEY not in metadata:
        raise ValueError("not a dataset made by sam_peft prepare: its info.description holds no sam_peft metadata")
    return metadata


def load_prepared(path: str | Path) -> DatasetDict:
    """Load a dataset written by `prepare` (memory-mapped), with a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prepared dataset {path} does not exist")
    if not (path / "dataset_dict.json").is_file():
        raise ValueError(f"{path} is not a prepared dataset (no dataset_dict.json); make one with `sam-peft prepare`")
    try:
        dataset = load_from_disk(str(path))
    except (*UNREADABLE, OSError) as error:  # pyarrow reports a truncated table as a bare OSError
        raise ValueError(f"{path}: cannot be read as a prepared dataset ({type(error).__name__}: {error}); a file "
                         "may be missing, truncated or corrupt: run `sam-peft prepare` again") from error
    try:
        read_metadata(dataset)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return dataset


# ---------------------------------------------------------------------------------------------- one case


def _prepare_case(source: Case | VolumeCase, options: PrepareOptions) -> _CaseResult:
    """Read, check, reorient, convert and slice one case (runs in worker processes)."""
    try:
        image, label = _load(source, options)
        return _slice_case(source.case_id, image, label, options)
    except (ValueError, OSError) as error:
        if not options.skip_bad:
            raise
        return _CaseResult(source.case_id, error=f"{type(error).__name__}: {error}")


def _load(source: Case | VolumeCase, options: PrepareOptions) -> tuple[Volume, Volume]:
    """The image and its label as compact organ indices."""
    label_map, ignore = options.label_map, options.ignore_unknown_labels
    if isinstance(source, VolumeCase):
        image, raw = source.image, source.label
    else:
        image = read_volume(source.image_path, "image")
        if source.mask_paths:
            return image, _masks_to_label(source, image, label_map, ignore)
        raw = read_volume(source.label_path, "label")
    return image, Volume(label_map.compact(raw.array, ignore, raw.path), raw.affine, raw.path)


def _masks_to_label(case: Case, image: Volume, label_map: LabelMap, ignore_unknown: bool) -> Volume:
    """One label volume from per-organ binary masks (later files win where masks overlap)."""
    label, first = None, None
    for organ, path in case.mask_paths:
        index = label_map.index(organ)
        if index is None:
            if ignore_unknown:
                continue
            raise ValueError(
                f"mask {path}: organ {organ_key(organ)!r} is not in the label map {label_map.name!r} "
                "(pass ignore_unknown_labels / --ignore-unknown-labels to leave it out)"
            )
        mask = read_volume(path, "label")
        if label is None:
            label, first = Volume(np.zeros(mask.array.shape, label_map.dtype), mask.affine, str(path.parent)), path
        elif mask.array.shape != label.array.shape or not np.allclose(mask.affine, label.affine, atol=1e-3):
            raise ValueError(f"mask {path} (shape {mask.array.shape}) is not on the grid of mask {first} "
                             f"(shape {label.array.shape})")
        label.array[mask.array != 0] = index
    if label is None:  # every mask was left out: an all-background label on the image's grid
        label = Volume(np.zeros(image.array.shape, label_map.dtype), image.affine, image.path)
    return label


def _match_grids(image: Volume, label: Volume) -> tuple[Volume, Volume]:
    """Both volumes in display orientation; they must cover the same voxels in world space."""
    shown_image, shown_label = to_display(image), to_display(label)
    if shown_image.array.shape != shown_label.array.shape:
        raise ValueError(f"image {image.path} has shape {image.array.shape} but label {label.path} has shape "
                         f"{label.array.shape}, which differ even after reorientation")
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shown_image.array.shape] + [(1,)])))
    distance = np.abs((corners @ shown_image.affine.T - corners @ shown_label.affine.T)[:, :3]).max()
    if distance > 0.1 * min(shown_image.spacing):
        raise ValueError(f"image {image.path} and label {label.path} (shapes {image.array.shape} and "
                         f"{label.array.shape}) lie on different grids: corners {distance:.3g} mm apart in world "
                         "space; the label must share the image's grid up to a reorientation")
    return shown_image, shown_label


def check_image(image: Volume) -> None:
    """Refuse an image no scan can be: NaN or infinite voxels (any conversion would spread them over the whole
    slice), or one value everywhere (an empty volume has nothing to segment)."""
    if np.issubdtype(image.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image.array)))
        if bad:
            raise ValueError(f"{image.path}: {bad} voxels are NaN or infinite")
    low, high = image.array.min(), image.array.max()
    if low == high:
        raise ValueError(f"{image.path}: every voxel is {low}; the image is empty")


def _check_modality(path: str, modality: str, options: PrepareOptions) -> None:
    """TotalSegmentator's CT and MR tasks give the same ids to different organs (MR 15 is the colon, CT 15 the
    esophagus): refuse the map of the other modality (as a preset or as its class map file) rather than name
    every organ wrongly."""
    ids = options.label_map.to_dict()["ids"]
    task = next((name for name in TOTALSEGMENTATOR_TASKS if load_label_map(name).to_dict()["ids"] == ids), None)
    expected = TOTALSEGMENTATOR_TASKS.get(task)
    if expected and modality in ("ct", "mr") and modality != expected:
        found = "--modality" if options.modality != "auto" else "its intensities"
        right = next(name for name, kind in TOTALSEGMENTATOR_TASKS.items() if kind == modality)
        raise ValueError(f"{path}: the image is {modality.upper()} (by {found}), but label map "
                         f"{options.label_map.name!r} is TotalSegmentator's {expected.upper()} task, whose ids name "
                         f"other organs: pass --label-map {right} (or --modality {expected} if the image is "
                         f"{expected.upper()})")


def to_unit_range(array: np.ndarray, options: PrepareOptions) -> tuple[np.ndarray, str]:
    """Intensities scaled to [0, 255] (float32) and the modality that decided how."""
    modality = options.modality
    if modality == "auto":
        modality = "8bit" if array.dtype == np.uint8 else "ct" if array.min() < -500 else "mr"
    if modality == "8bit":
        return array.astype(np.float32), modality
    if modality == "ct":
        low = options.window.level - options.window.width / 2
        high = low + options.window.width
    else:
        low, high = np.percentile(array, MR_PERCENTILES)
        high = max(high, low + 1e-6)
    scaled = (np.clip(array.astype(np.float32), low, high) - np.float32(low)) * np.float32(255.0 / (high - low))
    return scaled, modality


# Per plane: the axes of the display volume as (slice, row, column), and whether rows are flipped so that
# superior is at the top.
_PLANE_AXES = {"axial": ((0, 1, 2), False), "coronal": ((1, 0, 2), True), "sagittal": ((2, 0, 1), True)}


def _plane_stack(array: np.ndarray, plane: str) -> np.ndarray:
    axes, flip = _PLANE_AXES[plane]
    stack = array.transpose(axes)
    return stack[:, ::-1] if flip else stack


def _slice_case(case_id: str, image: Volume, label: Volume, options: PrepareOptions) -> _CaseResult:
    check_image(image)
    image, label = _match_grids(image, label)
    scaled, modality = to_unit_range(image.array, options)
    _check_modality(image.path, modality, options)
    planes = options.planes if image.array.shape[0] > 1 else ("axial",)  # a 2D image has one plane
    rows = []
    for plane in planes:
        axes = _PLANE_AXES[plane][0]
        pixels, organs = _plane_stack(scaled, plane), _plane_stack(label.array, plane)
        spacing = [image.spacing[axes[1]], image.spacing[axes[2]], image.spacing[axes[0]]]
        if options.spacing is not None:
            pixels, organs, spacing = _resample(pixels, organs, spacing, options.spacing)
        pixels = np.rint(pixels).astype(np.uint8)
        rows += _slice_rows(case_id, plane, pixels, organs, spacing, options)
    info = {"image": image.path, "label": label.path, "modality": modality,
            "shape": list(image.array.shape), "spacing": list(image.spacing)}
    return _CaseResult(case_id, rows, info)


def _resample(pixels: np.ndarray, organs: np.ndarray, spacing: list[float], target: float):
    """Resample the rows and columns of a slice stack to `target` mm (linear for pixels, nearest for labels)."""
    shape = [organs.shape[0], *(max(1, round(n * s / target)) for n, s in zip(organs.shape[1:], spacing[:2]))]
    factors = [new / old for new, old in zip(shape, organs.shape)]
    pixels = ndimage.zoom(pixels, factors, order=1, mode="nearest", grid_mode=True)
    organs = ndimage.zoom(organs, factors, order=0, mode="nearest", grid_mode=True)
    return pixels, organs, [spacing[0] / factors[1], spacing[1] / factors[2], spacing[2]]


def _slice_rows(case_id, plane, pixels, organs, spacing, options: PrepareOptions) -> list[dict]:
    names = options.label_map.organ_names
    counts = np.stack([np.bincount(s.ravel(), minlength=len(names) + 1)[1:] for s in organs])
    has_organ = (counts >= options.min_pixels).any(axis=1)
    empty = np.flatnonzero(~has_organ)
    rng = np.random.default_rng([options.seed, zlib.crc32(f"{case_id}/{plane}".encode())])
    keep = np.flatnonzero(has_organ).tolist()
    keep += rng.choice(empty, round(options.empty_fraction * len(empty)), replace=False).tolist()
    rows = []
    for k in sorted(keep):
        present = np.flatnonzero(counts[k] >= options.min_pixels)
        rows.append({
            "image": np.ascontiguousarray(pixels[k]),
            "label": np.ascontiguousarray(organs[k]),
            "case_id": case_id,
            "slice_index": k,
            "plane": plane,
            "spacing": spacing,
            "organs": [names[i] for i in present],
            "organ_pixels": counts[k, present].tolist(),
        })
    return rows


# --------------------------------------------------------------------------------------- whole dataset


def _dataset_label_map(images: Path, labels, cases: list[Case], optional: bool) -> LabelMap | None:
    """Organ names the dataset itself provides: its dataset.json, (when `optional`, no label map given) the
    TotalSegmentator map for TotalSegmentator's folder layout, or the names of its mask files; None when it has
    none and `optional` (`_build` then stops)."""
    names = read_dataset_labels(images) if labels is None and images.is_dir() else None
    if names:
        return LabelMap.from_ids(names, str(images / "dataset.json"))
    if optional and labels is None and images.is_dir() and detect_layout(images) == "totalsegmentator":
        return load_label_map("totalsegmentator")  # its own layout: its CT ids and mask names (MR is refused)
    organs = sorted({organ_key(organ) for case in cases for organ, _ in case.mask_paths})
    if organs:
        return LabelMap.from_ids(dict(enumerate(organs, 1)), "mask file names")
    if optional:
        return None
    raise ValueError(f"label_map='dataset': {images} has no dataset.json with labels nor per-organ mask files")


def assign_splits(case_ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """case id -> split. Whole cases go to one split; a positive fraction gets at least one case."""
    n = len(case_ids)
    n_test, n_val = (math.ceil(n * f - 1e-9) for f in (test_fraction, val_fraction))
    if n_test + n_val >= n:
        raise ValueError(f"{n} case(s) cannot fill val_fraction={val_fraction} and test_fraction={test_fraction} "
                         "and keep a training case: splits hold whole cases, so that no patient's slices are both "
                         "trained and scored on." + (SINGLE_CASE_HINT if n == 1 else ""))
    order = np.random.default_rng(seed).permutation(n)
    splits = ["test"] * n_test + ["validation"] * n_val + ["train"] * (n - n_test - n_val)
    return {case_ids[i]: split for i, split in zip(order, splits)}


def _features(image: Array2D | ListOf, label: Array2D | ListOf) -> Features:
    return Features({
        "image": image,
        "label": label,
        "case_id": Value("string"),
        "slice_index": Value("int32"),
        "plane": Value("string"),
        "spacing": ListOf(Value("float32"), length=3),
        "organs": ListOf(Value("string")),
        "organ_pixels": ListOf(Value("int64")),
    })


def _map_cases(sources: list, options: PrepareOptions, num_proc: int) -> Iterable[_CaseResult]:
    work = functools.partial(_prepare_case, options=options)
    if num_proc <= 1 or len(sources) <= 1:
        yield from map(work, sources)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_proc, len(sources))) as pool:
        yield from pool.imap(work, sources)


def check_writable(output: str | Path, what: str = "output", folder: bool = True) -> None:
    """Fail before any work when `output` (a folder, or a file when not `folder`) cannot be written: a file
    where a folder must be, or a folder no file can be created in. Creates nothing."""
    output = Path(output)
    if output.exists() and output.is_dir() != folder:
        raise ValueError(f"{what} {output} is a file; give a folder path (or delete the file)" if folder else
                         f"{what} {output} is a folder; give a file path")
    existing = next(p for p in (output if folder else output.parent, *output.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what} {output}: {existing} is a file, so no folder can be made there")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise PermissionError(f"{what} {output}: cannot write in {existing} ({error.strerror}); choose a folder you "
                              "can write to") from error


def claim_output(output: Path, overwrite: bool, markers: Sequence[str]) -> None:
    """Refuse an existing `output` unless `overwrite`; even then replace only a folder holding one of `markers`
    (something this package wrote) or an empty one, never an unrelated folder."""
    if not output.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {output} already exists; pass overwrite=True (--overwrite) to replace it")
    if not (output.is_dir() and (not any(output.iterdir()) or any((output / m).exists() for m in markers))):
        raise FileExistsError(f"output {output} exists and was not written by sam_peft; refusing to replace it")


def publish(work: Path, output: Path) -> None:
    """Rename a finished folder to `output`; an old output is moved aside first and then deleted."""
    if output.exists():
        trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(trash)
        shutil.rmtree(trash)
    work.rename(output)


def _build(sources: list, options: PrepareOptions, output: Path, source: dict, overwrite: bool,
           num_proc: int) -> None:
    """Slice every case into per-split Arrow files in a temporary folder beside `output`, then rename it."""
    if options.label_map is None:
        raise ValueError(f"no label map: the labels of {source['labels'] or source['images']} are raw ids, and no "
                         "dataset.json or mask file names say which organ each id is; pass label_map / --label-map: "
                         f"{', '.join(PRESET_HELP)} or a JSON/YAML {{id: name}} file")
    claim_output(output, overwrite, ["dataset_dict.json"])
    ids = [s.case_id for s in sources]
    if len(set(ids)) != len(ids):
        raise ValueError(f"case ids must be unique, got duplicates {sorted({i for i in ids if ids.count(i) > 1})}")
    splits = assign_splits(ids, options.val_fraction, options.test_fraction, options.seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    work_dir = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    work_dir.mkdir()
    try:
        _write(sources, options, splits, work_dir, source, num_proc)
        publish(work_dir / "dataset", output)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _write(sources: list, options: PrepareOptions, splits: dict[str, str], work_dir: Path, source: dict,
           num_proc: int) -> None:
    label_type = ListOf(ListOf(Value(options.label_map.dtype.name)))
    scratch_features = _features(ListOf(ListOf(Value("uint8"))), label_type)
    writers: dict[str, ArrowWriter] = {}
    shapes, cases, skipped = set(), {}, []
    results = tqdm(_map_cases(sources, options, num_proc), total=len(sources), desc="Preparing cases", unit="case")
    with contextlib.ExitStack() as open_writers:
        for result in results:
            if result.error is not None:
                files = _files(sources, result.case_id)
                skipped.append({"case_id": result.case_id, "files": files, "error": result.error})
                logger.warning("skipped case %s: %s", result.case_id, result.error)
                continue
            split = splits[result.case_id]
            cases[result.case_id] = {"split": split, **result.info}
            if result.rows and split not in writers:
                writers[split] = open_writers.enter_context(ArrowWriter(
                    features=scratch_features, path=str(work_dir / f"{split}.arrow"), writer_batch_size=_WRITER_BATCH))
            for row in result.rows:
                shapes.add(row["image"].shape)
                writers[split].write(row)
        for writer in writers.values():
            writer.finalize()
    if not writers:
        raise ValueError(f"no slice holds an organ of at least {options.min_pixels} pixels in {source['images']} "
                         f"(label map {options.label_map.name!r}); nothing to write")
    metadata = {FORMAT_KEY: 1, "organ_names": list(options.label_map.organ_names), **options.to_dict(),
                "source": source, "cases": cases, "skipped": skipped}
    final = None
    if len(shapes) == 1:  # one shape everywhere: fixed-size arrays load zero-copy
        (shape,) = shapes
        final = _features(Array2D(shape, "uint8"), Array2D(shape, options.label_map.dtype.name))
    dataset = DatasetDict()
    for split in (s for s in SPLITS if s in writers):
        part = Dataset.from_file(str(work_dir / f"{split}.arrow"))
        part = part.cast(final) if final is not None else part
        part.info.description = json.dumps(metadata)
        dataset[split] = part
    dataset.save_to_disk(str(work_dir / "dataset"))
    if options.skip_bad:
        (work_dir / "dataset" / "skipped.json").write_text(json.dumps(skipped, indent=2))


def _files(sources: list, case_id: str) -> list[str]:
    source = next(s for s in sources if s.case_id == case_id)
    return source.files() if isinstance(source, Case) else [source.image.path, source.label.path]
