"""Read one medical image or label file into a `Volume`: an array plus the affine that places it in space.

Every reader returns a 3D array with a 4x4 voxel-to-world affine in RAS+ millimetres (the NIfTI
convention), so that image and label can be matched in world space and reoriented to the radiological
display (`to_display`) whatever order their voxels were stored in.

Supported inputs:
- NIfTI `.nii` / `.nii.gz` (nibabel; scaling slope/intercept applied).
- A DICOM series folder (or one `.dcm` file): slices ordered by `ImagePositionPatient` along the slice
  normal, `RescaleSlope`/`RescaleIntercept` applied (Hounsfield units for CT), affine built from the
  DICOM geometry and converted from LPS to RAS.
- NPZ: keys `image` (or `imgs`) and `label` (or `gts`), arrays (D, H, W) stored in display orientation
  (slices inferior to superior, rows anterior to posterior, columns patient right to left); optional
  `affine` (4x4, RAS) or `spacing` (3 floats in mm, in array axis order).
- PNG / JPG 2D slices, taken to be in display orientation, returned as one-slice volumes (1, H, W) with
  1 mm pixels. Images are converted to 8-bit grey; label PNGs must be single-channel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image

Role = Literal["image", "label"]

# Array axes of a volume in display orientation: slices run inferior -> superior, rows anterior -> posterior,
# columns patient right -> patient left, so volume[k] is an axial slice as radiology viewers show it.
DISPLAY_AXES = ("S", "P", "L")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".npz", ".dcm", *IMAGE_2D_SUFFIXES)
_NPZ_KEYS = {"image": ("image", "imgs"), "label": ("label", "gts")}


@dataclass
class Volume:
    """A 3D array and its voxel-to-world affine (RAS+, mm); `path` names the source in error messages."""

    array: np.ndarray
    affine: np.ndarray
    path: str

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(
                f"{self.path}: expected a 3D volume, got a {self.array.ndim}D array of shape {self.array.shape}"
            )
        if self.array.size == 0:
            raise ValueError(f"{self.path}: the volume is empty (shape {self.array.shape})")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"{self.path}: the affine must be 4x4, got shape {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def display_affine(spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Affine of an array stored in display orientation (`DISPLAY_AXES`) with the given voxel size."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = spacing[0], -spacing[1], -spacing[2]
    affine[3, 3] = 1.0
    return affine


def reorient(volume: Volume, axcodes: Sequence[str] = DISPLAY_AXES) -> Volume:
    """Permute/flip the array so its axes point along `axcodes`; the affine follows, world space is unchanged."""
    transform = ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(axcodes)))
    array = apply_orientation(volume.array, transform)
    affine = volume.affine @ inv_ornt_aff(transform, volume.array.shape)
    return Volume(np.ascontiguousarray(array), affine, volume.path)


def to_display(volume: Volume) -> Volume:
    """The volume in display orientation: `volume.array[k]` is axial slice k as a radiologist sees it."""
    return reorient(volume, DISPLAY_AXES)


def strip_suffix(path: str | Path) -> str:
    """File name without its volume suffix (`case.nii.gz` -> `case`)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_path(path: Path) -> bool:
    """Whether `path` is something `read_volume` can read: a file with a known suffix or a DICOM folder."""
    if path.is_dir():
        return any(_is_dicom_file(p) for p in path.iterdir())
    return path.name.lower().endswith(VOLUME_SUFFIXES) and not path.name.startswith(".")


def read_volume(path: str | Path, role: Role = "image") -> Volume:
    """Read an image (`role="image"`) or a label volume (`role="label"`) from any supported file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return _read_dicom(path)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(".npz"):
        return _read_npz(path, role)
    if name.endswith(IMAGE_2D_SUFFIXES):
        return _read_2d(path, role)
    raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")


def _squeeze_to_3d(array: np.ndarray) -> np.ndarray:
    """Drop trailing length-1 axes beyond the third (a (X, Y, Z, 1) NIfTI is a 3D volume)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise many types for one broken file
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error
    return Volume(_squeeze_to_3d(array), image.affine, str(path))


def _read_npz(path: Path, role: Role) -> Volume:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:
        raise ValueError(f"cannot read NPZ file {path}: {error}") from error
    key = next((k for k in _NPZ_KEYS[role] if k in arrays), None)
    if key is None:
        raise ValueError(f"{path}: no {role} array; expected one of the keys {_NPZ_KEYS[role]}, found {sorted(arrays)}")
    if "affine" in arrays:
        affine = arrays["affine"]
    else:
        affine = display_affine(arrays["spacing"] if "spacing" in arrays else (1.0, 1.0, 1.0))
    return Volume(arrays[key], affine, str(path))


def _read_2d(path: Path, role: Role) -> Volume:
    try:
        with Image.open(path) as image:
            image.load()
            if role == "image":
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image)
    except Exception as error:
        raise ValueError(f"cannot read image file {path}: {error}") from error
    if array.ndim == 3:  # an RGB(A) label: accept it only when it is grey
        if not (array[..., :3] == array[..., :1]).all():
            raise ValueError(f"{path}: a label image must be single-channel, got a colour image")
        array = array[..., 0]
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return Volume(array[None], display_affine(), str(path))


def _is_dicom_file(path: Path) -> bool:
    """`.dcm`/`.ima` files, and suffix-less files that carry the DICOM preamble (not README, LICENSE...)."""
    if not path.is_file() or path.name.startswith(".") or path.name == "DICOMDIR":
        return False
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    if path.suffix:
        return False
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_dicom_file(p))


def _read_dicom(path: Path) -> Volume:
    files = _dicom_files(path) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no DICOM files found (*.dcm, *.ima, or suffix-less files with a DICM preamble)")
    slices = []
    for file in files:
        try:
            ds = pydicom.dcmread(file)
            pixels = ds.pixel_array
            position = np.array(ds.ImagePositionPatient, dtype=float)
            orientation = np.array(ds.ImageOrientationPatient, dtype=float)
            pixel_spacing = np.array(ds.PixelSpacing, dtype=float)
        except Exception as error:
            raise ValueError(f"cannot read DICOM file {file}: {error}") from error
        if pixels.ndim != 2:
            raise ValueError(f"{file}: multi-frame or colour DICOM is not supported (pixel array shape {pixels.shape})")
        slope, intercept = float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))
        hu = pixels.astype(np.float32) * slope + intercept
        slices.append((ds, hu, position, orientation, pixel_spacing))
    series = {getattr(ds, "SeriesInstanceUID", None) for ds, *_ in slices}
    if len(series) > 1:
        raise ValueError(f"{path}: holds {len(series)} DICOM series; give one series folder at a time")
    return _stack_dicom(path, slices)


def _stack_dicom(path: Path, slices: list) -> Volume:
    """Sort the slices along the normal, check their spacing, and build the RAS affine."""
    orientation, pixel_spacing = slices[0][3], slices[0][4]
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    slices.sort(key=lambda s: float(s[2] @ normal))
    positions = np.array([s[2] for s in slices])
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.any(gaps <= 1e-6 * max(1.0, abs(gaps).max())):
            raise ValueError(f"{path}: two DICOM slices share one position")
        if gaps.max() - gaps.min() > 0.1 * np.median(gaps):
            raise ValueError(
                f"{path}: non-uniform slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm); a slice may be missing"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        ds = slices[0][0]
        step = normal * float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None) or 1.0)
    shapes = {s[1].shape for s in slices}
    if len(shapes) > 1:
        raise ValueError(f"{path}: DICOM slices have different sizes {sorted(shapes)}")
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = column_cosine * pixel_spacing[0]  # moving down one row follows the column direction
    lps[:3, 2] = row_cosine * pixel_spacing[1]
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return Volume(np.stack([s[1] for s in slices]), ras, str(path))
