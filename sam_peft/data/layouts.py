"""Find (case id, image, label) triples in the folder layouts medical datasets are published in.

Layouts (`detect_layout` names them):
- `nnunet`: MSD / nnU-Net, `imagesTr/X_0000.nii.gz` (or MSD's `imagesTr/X.nii.gz`) + `labelsTr/X.nii.gz`,
  label names in `dataset.json` (FLARE22 ships like this).
- `synapse`: Synapse / BTCV raw data, `img/img0001.nii.gz` + `label/label0001.nii.gz`.
- `totalsegmentator`: a case folder (or a folder of case folders) holding `ct.nii.gz` and either one
  multi-label NIfTI or `segmentations/<organ>.nii.gz` binary masks.
- `sam_med2d`: `images/X.png` + binary masks `masks/X_<organ>_<k>.png`.
- `pairs`: `images/` + `labels/` folders of files matched by name (e.g. 2D PNG + label-map PNG).
- `npz`: a folder of NPZ files, each holding an image and its label.
- `file`: a single NPZ file.
With explicit labels (`discover_cases(images, labels)`), images and labels are files or folders paired by
name; an image folder may hold DICOM series folders, and an image named `X_0000` pairs with label `X`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .label_maps import parse_label_names
from .readers import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, is_volume_path, strip_suffix

logger = logging.getLogger(__name__)

LAYOUTS = ("nnunet", "synapse", "totalsegmentator", "sam_med2d", "pairs", "npz", "file")


@dataclass(frozen=True)
class Case:
    """One labelled case: a label volume (`label_path`) or per-organ binary masks (`mask_paths`)."""

    case_id: str
    image_path: Path
    label_path: Path | None = None
    mask_paths: tuple[tuple[str, Path], ...] = ()  # (organ name, mask file)

    def files(self) -> list[str]:
        """Every file this case reads, for reports."""
        paths = [self.image_path, self.label_path, *(path for _, path in self.mask_paths)]
        return list(dict.fromkeys(str(path) for path in paths if path is not None))


def detect_layout(path: str | Path) -> str:
    """Name the layout of a dataset folder (one of `LAYOUTS`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.name.lower().endswith(".npz"):
            return "file"
        raise ValueError(f"{path} is a single image without labels; pass its label file too (--labels)")
    if (path / "imagesTr").is_dir():
        return "nnunet"
    if (path / "img").is_dir() and (path / "label").is_dir():
        return "synapse"
    if _is_totalseg_case(path) or any(_is_totalseg_case(p) for p in _subdirs(path)):
        return "totalsegmentator"
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return "sam_med2d"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "pairs"
    if any(p.name.lower().endswith(".npz") for p in path.iterdir()):
        return "npz"
    raise ValueError(
        f"{path}: unrecognised dataset layout; expected imagesTr/ + labelsTr/ (nnU-Net), img/ + label/ (Synapse), "
        "ct.nii.gz case folders (TotalSegmentator), images/ + masks/ (SAM-Med2D), images/ + labels/, NPZ files, "
        "or pass the labels explicitly (--labels)"
    )


def discover_cases(images: str | Path, labels: str | Path | None = None) -> list[Case]:
    """All labelled cases under `images` (a layout folder), or `images` paired with `labels` by name."""
    images = Path(images)
    if labels is not None:
        cases = _pair_by_name(images, Path(labels))
    else:
        layout = detect_layout(images)
        cases = {
            "nnunet": lambda: _pair_by_name(images / "imagesTr", images / "labelsTr"),
            "synapse": lambda: _synapse(images),
            "totalsegmentator": lambda: _totalsegmentator(images),
            "sam_med2d": lambda: _sam_med2d(images),
            "pairs": lambda: _pair_by_name(images / "images", images / "labels"),
            "npz": lambda: [Case(strip_suffix(p), p, p) for p in _volume_entries(images)],
            "file": lambda: [Case(strip_suffix(images), images, images)],
        }[layout]()
    if not cases:
        raise ValueError(f"{images}: no labelled cases found")
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{images}: several files give the same case id {duplicates}")
    return sorted(cases, key=lambda case: case.case_id)


def read_dataset_labels(path: str | Path) -> dict[int, str | None] | None:
    """{id: name} from an MSD / nnU-Net `dataset.json` in `path` (either label form), or None without one."""
    file = Path(path) / "dataset.json"
    if not file.is_file():
        return None
    try:
        labels = json.loads(file.read_text()).get("labels")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"cannot read the labels of {file}: {error}") from error
    if not isinstance(labels, dict):
        raise ValueError(f"{file} has no \"labels\" mapping")
    return parse_label_names(labels)


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _volume_entries(folder: Path) -> list[Path]:
    """Readable images in a folder: volume files and DICOM series folders (hidden `._` files skipped)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_volume_path(p))


def _nnunet_match(name: str) -> tuple[str, bool] | None:
    """nnU-Net names an image `X_0000` (channel 0) for label `X`: (X, is channel 0), or None."""
    match = re.fullmatch(r"(.+)_(\d{4})", name)
    return (match.group(1), match.group(2) == "0000") if match else None


def _pair_by_name(images: Path, labels: Path) -> list[Case]:
    if images.is_file() or labels.is_file():
        if not images.exists() or not labels.exists():
            raise FileNotFoundError(f"{images if not images.exists() else labels} does not exist")
        if labels.is_dir() or images.is_dir() and not is_volume_path(images):
            raise ValueError(f"images {images} and labels {labels}: give two files, two folders, "
                             "or a DICOM series folder and a label file")
        name = strip_suffix(images)
        match = _nnunet_match(name)
        return [Case(match[0] if match and match[1] else name, images, labels)]
    if is_volume_path(images):
        raise ValueError(f"images {images} is one DICOM series; give its label file, not the folder {labels}")
    label_by_key = {strip_suffix(p): p for p in _volume_entries(labels)}
    cases = []
    for image in _volume_entries(images):
        key = strip_suffix(image)
        match = _nnunet_match(key)
        if key not in label_by_key and match and match[0] in label_by_key:
            if not match[1]:
                continue  # an extra nnU-Net channel (X_0001...): only channel 0 is used
            key = match[0]
        if key not in label_by_key:
            raise FileNotFoundError(f"no label for image {image} in {labels} (expected {key} with a volume suffix)")
        cases.append(Case(key, image, label_by_key[key]))
    return cases


def _synapse(root: Path) -> list[Case]:
    label_by_number = {strip_suffix(p).removeprefix("label"): p for p in _volume_entries(root / "label")}
    cases = []
    for image in _volume_entries(root / "img"):
        number = strip_suffix(image).removeprefix("img")
        label = label_by_number.get(number)
        if label is None:
            raise FileNotFoundError(f"no label for image {image} (expected {root / 'label'}/label{number}.nii.gz)")
        cases.append(Case(number, image, label))
    return cases


def _is_totalseg_case(folder: Path) -> bool:
    return any((folder / f"ct{suffix}").is_file() for suffix in NIFTI_SUFFIXES)


def _totalsegmentator(root: Path) -> list[Case]:
    folders = [root] if _is_totalseg_case(root) else [p for p in _subdirs(root) if _is_totalseg_case(p)]
    return [_totalseg_case(folder) for folder in folders]


def _totalseg_case(folder: Path) -> Case:
    image = next(folder / f"ct{s}" for s in NIFTI_SUFFIXES if (folder / f"ct{s}").is_file())
    others = [p for p in _volume_entries(folder) if p != image and p.name.lower().endswith(NIFTI_SUFFIXES)]
    if len(others) > 1:
        raise ValueError(f"{folder}: several label files {[p.name for p in others]}; keep one multi-label file")
    if others:
        return Case(folder.name, image, others[0])
    masks_dir = folder / "segmentations"
    masks = _volume_entries(masks_dir) if masks_dir.is_dir() else []
    if not masks:
        raise FileNotFoundError(f"{folder}: no label file next to {image.name} and no segmentations/*.nii.gz")
    return Case(folder.name, image, mask_paths=tuple((strip_suffix(p), p) for p in masks))


def _sam_med2d(root: Path) -> list[Case]:
    images = {
        strip_suffix(p): p for p in _volume_entries(root / "images") if p.name.lower().endswith(IMAGE_2D_SUFFIXES)
    }
    masks: dict[str, list[tuple[str, Path]]] = {key: [] for key in images}
    for mask in _volume_entries(root / "masks"):
        key, organ = _split_mask_name(strip_suffix(mask), images)
        if key is None:
            raise ValueError(f"mask {mask} matches no image in {root / 'images'} (expected <image>_<organ>_<k>.png)")
        masks[key].append((organ, mask))
    unlabelled = sorted(key for key, found in masks.items() if not found)
    if unlabelled:
        logger.warning("%s: %d images have no mask and are left out (e.g. %s)", root, len(unlabelled), unlabelled[0])
    return [Case(key, images[key], mask_paths=tuple(found)) for key, found in masks.items() if found]


def _split_mask_name(stem: str, image_keys: dict) -> tuple[str | None, str]:
    """`X_<organ>_<k>` -> (X, organ), with X the longest image name that prefixes the mask name."""
    match = re.fullmatch(r"(.+)_\d+", stem)
    if match is None:
        return None, ""
    body = match.group(1)
    for cut in sorted((m.start() for m in re.finditer("_", body)), reverse=True):
        if body[:cut] in image_keys:
            return body[:cut], body[cut + 1 :]
    return None, ""
