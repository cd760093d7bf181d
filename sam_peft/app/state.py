"""One browser session of the web app: the opened volume, its prompts and masks, and every handler on them.

Nothing here imports the UI, so each handler is a plain method a test or a benchmark calls directly. The
volume is held in the display frame of `prepare` (axial slice k from inferior to superior, rows anterior
-> posterior, columns patient right -> left), converted to the model's 8-bit input exactly as `prepare`
and `predict_volume` convert it. The image encoder runs the first time a slice is clicked and its
embedding is kept (one `MultiOrganPredictor` per visited slice), so later clicks on that slice only run
the mask decoder. Each click refines its organ from the organ's previous low-res logits and all of its
earlier clicks on the slice, as `evaluate`'s click series does. "Propagate" hands the organs prompted on
a slice to `predict_volume`, seeded with the boxes of the masks the person accepted.
"""
from __future__ import annotations

import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from ..data.label_maps import LabelMap, load_label_map
from ..data.phantom import make_phantom
from ..data.prepare import PrepareOptions, Window, parse_window, to_unit_range
from ..data.readers import IMAGE_2D_SUFFIXES, NIFTI_SUFFIXES, Volume, read_volume, to_display
from ..evaluation.predictor import MultiOrganPredictor, Prediction
from ..evaluation.volume import output_ids, predict_volume, save_labels
from ..models import SamInputProcessor, processor_for
from .options import MAX_UPLOAD_MB

EXAMPLE_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalseg_ct" / "example_ct.nii.gz"
VIEW_WINDOWS = ("abdomen", "liver", "lung", "bone")
MODES = ("positive click", "negative click", "box corner")
UPLOAD_SUFFIXES = (*NIFTI_SUFFIXES, ".zip", *IMAGE_2D_SUFFIXES)
MAX_VOXELS = 512 * 512 * 2048  # a decompressed volume beyond this would not fit a session's memory
MAX_ENCODED_SLICES = 256  # embeddings kept per session (LiteMedSAM: 4 MB each)
DISPLAY_SIDE = 640  # slices are drawn at least this large, so the browser only ever shrinks them


@dataclass(frozen=True)
class AppModel:
    """What all sessions share, read-only: the model, the organs it knows and the window it was trained with."""

    model: torch.nn.Module
    label_map: LabelMap
    window: Window
    note: str  # the model, as the page names it

    @classmethod
    def create(cls, model: torch.nn.Module, note: str, window: Window | str = "abdomen",
               label_map: LabelMap | str | None = None) -> AppModel:
        """The label map defaults to the adapter's training label map, else TotalSegmentator's (as `predict`)."""
        if label_map is None:
            recorded = (getattr(model, "sam_peft_info", {}).get("label_map") or {}).get("ids")
            label_map = recorded or "totalsegmentator"
        return cls(model.eval(), load_label_map(label_map), parse_window(window), note)

    def warm_up(self) -> None:
        """One encoder pass at start-up, so that the first visitor's first click does not pay torch's set-up."""
        MultiOrganPredictor(self.model).set_image(np.zeros((64, 64), np.uint8))

    @cached_property
    def ids(self) -> dict[str, int]:
        """Organ -> the value it gets in the label volumes (its smallest id in the label map)."""
        return output_ids(self.label_map, set(self.label_map.organ_names))

    @cached_property
    def organ_of_id(self) -> dict[int, str]:
        return {i: organ for organ, i in self.ids.items()}

    @cached_property
    def processor(self) -> SamInputProcessor:
        return processor_for(self.model)


@dataclass
class Step:
    """One prompt of an organ on a slice (all its clicks and box so far) and the mask it gave."""

    prompt: dict
    prediction: Prediction


@dataclass
class Session:
    """One opened volume and everything a person did to it (see the module docstring)."""

    name: str
    source: Path  # the file or folder `predict_volume` reads for propagation
    original: Volume  # as read: its grid and affine are those of the exported labels
    display: Volume  # display orientation, original values (Hounsfield units for CT)
    pixels: np.ndarray  # (D, H, W) uint8 model input
    modality: str
    workdir: tempfile.TemporaryDirectory
    labels: np.ndarray = field(init=False)  # (D, H, W) organ ids: what the page shows and exports
    propagated: np.ndarray = field(init=False)  # the labels `predict_volume` gave, under the slices' edits
    edits: dict[int, dict[str, list[Step]]] = field(default_factory=dict)
    corner: tuple[int, str, tuple[int, int]] | None = None  # the first corner of a box being drawn
    encoded: OrderedDict[int, MultiOrganPredictor] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.labels = np.zeros(self.pixels.shape, np.uint16)
        self.propagated = np.zeros_like(self.labels)

    @property
    def depth(self) -> int:
        return self.pixels.shape[0]

    @property
    def display_scale(self) -> int:
        """Rendered pixels per slice pixel: the page maps a click back to the slice by this factor."""
        return max(1, -(-DISPLAY_SIDE // max(self.pixels.shape[1:])))

    def close(self) -> None:
        self.workdir.cleanup()

    # ---------------------------------------------------------------------------------------- prompting

    def predictor(self, app: AppModel, z: int) -> MultiOrganPredictor:
        """Slice z's predictor; the encoder runs only the first time (least recently used dropped first)."""
        if z in self.encoded:
            self.encoded.move_to_end(z)
        else:
            predictor = MultiOrganPredictor(app.model)
            predictor.set_image(self.pixels[z])
            self.encoded[z] = predictor
            while len(self.encoded) > MAX_ENCODED_SLICES:
                self.encoded.popitem(last=False)
        return self.encoded[z]

    def click(self, app: AppModel, z: int, x: int, y: int, organ: str, mode: str) -> str:
        """A click at pixel (x, y) of slice z: refine `organ` (positive / negative) or place a box corner."""
        z = self._slice(z)
        _, h, w = self.pixels.shape
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"the click at ({x}, {y}) lies outside the {w}x{h} slice")
        if app.label_map.index(organ) is None:
            raise ValueError(f"organ {organ!r} is not in the label map {app.label_map.name!r}")
        if mode not in MODES:
            raise ValueError(f"prompt mode must be one of {MODES}, got {mode!r}")
        steps = self.edits.setdefault(z, {}).setdefault(organ, [])
        prompt = {key: list(value) for key, value in (steps[-1].prompt if steps else {}).items()}
        if mode == "box corner":
            if self.corner is None or self.corner[:2] != (z, organ):
                self.corner = (z, organ, (x, y))
                return f"{organ}: first box corner at ({x}, {y}) on slice {z}; click the opposite corner"
            (x0, y0), self.corner = self.corner[2], None
            prompt["box"] = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
        else:
            prompt["points"] = prompt.get("points", []) + [[x, y]]
            prompt["labels"] = prompt.get("labels", []) + [1 if mode == "positive click" else 0]
        mask_inputs = {organ: steps[-1].prediction.low_res_logits} if steps else None
        prediction = self.predictor(app, z).predict({organ: prompt}, mask_inputs=mask_inputs)[organ]
        steps.append(Step(prompt, prediction))
        self._compose(app, z)
        return (f"{organ}: {mode} at ({x}, {y}) on slice {z} -> {int(prediction.mask.sum())} px "
                f"(IoU estimate {prediction.score:.2f})")

    def undo(self, app: AppModel, z: int, organ: str) -> str:
        """Drop the last prompt of `organ` on slice z (a half-drawn box first)."""
        z = self._slice(z)
        if self.corner is not None and self.corner[:2] == (z, organ):
            self.corner = None
            return f"{organ}: box corner removed"
        steps = self.edits.get(z, {}).get(organ)
        if not steps:
            return f"{organ}: nothing to undo on slice {z}"
        steps.pop()
        self._compose(app, z)
        return f"{organ}: last prompt on slice {z} undone"

    def clear(self, app: AppModel, organ: str) -> str:
        """Remove `organ` everywhere: its prompts on every slice and its propagated mask."""
        self.propagated[self.propagated == app.ids[organ]] = 0
        for organs in self.edits.values():
            organs.pop(organ, None)
        self.corner = None if self.corner and self.corner[1] == organ else self.corner
        self.labels[self.labels == app.ids[organ]] = 0
        for z in self.edits:
            self._compose(app, z)
        return f"{organ}: cleared"

    def _compose(self, app: AppModel, z: int) -> None:
        """Slice z's labels: propagated masks, replaced by the organs prompted there (higher logit wins)."""
        labels = self.propagated[z].copy()
        edited = {organ: steps[-1].prediction for organ, steps in self.edits.get(z, {}).items() if steps}
        labels[np.isin(labels, [app.ids[organ] for organ in edited])] = 0
        best = np.zeros(labels.shape, np.float32)
        for organ, prediction in edited.items():
            logits = app.processor.postprocess_masks(torch.as_tensor(prediction.low_res_logits), labels.shape).numpy()
            wins = logits > best
            labels[wins] = app.ids[organ]
            best[wins] = logits[wins]
        self.labels[z] = labels

    # --------------------------------------------------------------------------------- whole volume

    def propagate(self, app: AppModel, z: int, reach: int = 0, progress: bool = False) -> str:
        """Carry the masks of the organs prompted on slice z through the volume with `predict_volume`: until
        each organ ends, or at most `reach` slices each way (reach > 0)."""
        z = self._slice(z)
        if reach < 0:
            raise ValueError(f"reach must be 0 (until the organ ends) or a number of slices, got {reach}")
        seeds = {organ: steps[-1].prediction.mask for organ, steps in self.edits.get(z, {}).items()
                 if steps and steps[-1].prediction.mask.any()}
        if not seeds:
            raise ValueError(f"no organ has a mask on slice {z} yet: prompt one here, then propagate")
        if reach:  # a box3d centred on z: predict_volume prompts its middle slice and stays within it
            k = min(reach, z, self.depth - 1 - z)
            prompts = {organ: {"box3d": [x0, y0, z - k, x1, y1, z + k]}
                       for organ, (x0, y0, x1, y1) in ((o, _bounding_box(m)) for o, m in seeds.items())}
        else:
            prompts = {organ: {"slices": {str(z): {"box": _bounding_box(mask)}}} for organ, mask in seeds.items()}
        output = Path(self.workdir.name) / "propagated.nii.gz"
        predict_volume(app.model, self.source, prompts, app.label_map, output, window=app.window,
                       progress=progress)
        result = to_display(read_volume(output, "label")).array
        ids = [app.ids[organ] for organ in seeds]
        self.propagated[np.isin(self.propagated, ids)] = 0
        reached = np.isin(result, ids)
        self.propagated[reached] = result[reached]
        self.labels = self.propagated.copy()
        for edited in self.edits:
            self._compose(app, edited)
        spans = {organ: np.flatnonzero((self.labels == app.ids[organ]).any(axis=(1, 2))) for organ in seeds}
        return "propagated: " + ", ".join(f"{organ} on slices {s.min()}-{s.max()}" for organ, s in spans.items())

    def volumes_ml(self, app: AppModel) -> dict[str, float]:
        """Organ -> its volume in mL, for the organs present."""
        voxel_ml = float(np.prod(self.display.spacing)) / 1000
        counts = np.bincount(self.labels.ravel(), minlength=max(app.ids.values()) + 1)
        return {organ: counts[i] * voxel_ml for organ, i in app.ids.items() if counts[i]}

    def export(self, app: AppModel) -> tuple[Path, Path]:
        """The label volume on the input's grid and affine (NIfTI) and its label map JSON beside it."""
        present = set(self.volumes_ml(app))
        ids = {organ: i for organ, i in app.ids.items() if organ in present}
        stem = self.name.split(".")[0] or "volume"
        output = Path(self.workdir.name) / f"{stem}_labels.nii.gz"
        save_labels(self.labels, self.display.affine, self.original, ids, output, input=self.name,
                    label_map=app.label_map.name, volumes_ml={o: round(v, 2) for o, v in self.volumes_ml(app).items()})
        return output, output.with_name(f"{stem}_labels.json")

    # ---------------------------------------------------------------------------------------- display

    def render(self, app: AppModel, z: int, window: str = "abdomen", overlay: bool = True) -> np.ndarray:
        """Slice z as an RGB image: the view window, coloured organ overlays with outlines, and the prompts."""
        z = self._slice(z)
        if self.modality == "ct":
            grey, _ = to_unit_range(self.display.array[z], PrepareOptions(window=window, modality="ct"))
            grey = np.rint(grey).astype(np.uint8)
        else:  # MR and 8-bit images have no Hounsfield window: they are shown as the model sees them
            grey = self.pixels[z]
        scale = self.display_scale
        rgb = np.repeat(np.repeat(np.stack([grey] * 3, -1), scale, 0), scale, 1).astype(np.float32)
        if overlay:
            labels = np.repeat(np.repeat(self.labels[z], scale, 0), scale, 1)
            for i in np.unique(self.labels[z][self.labels[z] > 0]):  # the organs on this slice
                mask, colour = labels == i, organ_colour(app, app.organ_of_id[int(i)])
                rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour
                rgb[mask & ~ndimage.binary_erosion(mask, iterations=2)] = colour
        image = Image.fromarray(rgb.astype(np.uint8))
        self._draw_prompts(ImageDraw.Draw(image), app, z, scale)
        return np.asarray(image)

    def _draw_prompts(self, draw: ImageDraw.ImageDraw, app: AppModel, z: int, scale: int) -> None:
        def at(x, y):
            return (x + 0.5) * scale, (y + 0.5) * scale

        r = max(4, scale * 1.5)
        for organ, steps in self.edits.get(z, {}).items():
            if steps:
                prompt = steps[-1].prompt
                if "box" in prompt:
                    x0, y0, x1, y1 = prompt["box"]
                    draw.rectangle([*at(x0, y0), *at(x1, y1)], outline=tuple(organ_colour(app, organ)), width=2)
                for (x, y), label in zip(prompt.get("points", []), prompt.get("labels", [])):
                    cx, cy = at(x, y)
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(0, 220, 0) if label else (230, 0, 0),
                                 outline=(255, 255, 255))
        if self.corner is not None and self.corner[0] == z:
            cx, cy = at(*self.corner[2])
            draw.line([cx - 2 * r, cy, cx + 2 * r, cy], fill=(255, 255, 0), width=2)
            draw.line([cx, cy - 2 * r, cx, cy + 2 * r], fill=(255, 255, 0), width=2)

    def _slice(self, z) -> int:
        if not 0 <= int(z) < self.depth:
            raise ValueError(f"slice {z} is outside the volume (0 .. {self.depth - 1})")
        return int(z)


def organ_colour(app: AppModel, organ: str) -> np.ndarray:
    """A fixed colour per organ (its label map index through tab20), the same in overlay and legend."""
    rgba = colormaps["tab20"]((app.label_map.index(organ) - 1) % 20)
    return (np.asarray(rgba[:3]) * 255).round().astype(np.uint8)


def _bounding_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


# -------------------------------------------------------------------------------------------- opening


def open_upload(app: AppModel, path: str | Path, max_mb: float = MAX_UPLOAD_MB) -> Session:
    """An uploaded file -> a session: NIfTI, a zipped DICOM series or a PNG/JPEG slice; anything else, too
    large, unreadable or not 3D raises a ValueError naming the file (never its server-side path)."""
    path = Path(path)
    name = path.name
    if path.stat().st_size > max_mb * 2**20:
        raise ValueError(f"{name}: {path.stat().st_size / 2**20:.0f} MB is over this app's upload limit of "
                         f"{max_mb:g} MB")
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise ValueError(f"{name}: not a file this app opens; upload a NIfTI volume (.nii, .nii.gz), a zipped "
                         "DICOM series (.zip) or a PNG/JPEG slice")
    workdir = tempfile.TemporaryDirectory(prefix="sam_peft_app_")
    source = Path(workdir.name) / "dicom" if name.lower().endswith(".zip") else path
    try:
        if source != path:
            _unzip_dicom(path, source, max_mb)
        if name.lower().endswith(NIFTI_SUFFIXES):
            _check_nifti_size(source)
        return _session(app, name, source, read_volume(source, "image"), workdir)
    except (ValueError, OSError) as error:
        workdir.cleanup()
        raise ValueError(str(error).replace(str(source), name)) from error  # the page never shows server paths
    except BaseException:
        workdir.cleanup()
        raise


def open_example(app: AppModel) -> Session:
    """The bundled example: the shared real CT when this checkout has it, else a generated phantom case."""
    workdir = tempfile.TemporaryDirectory(prefix="sam_peft_app_")
    if EXAMPLE_CT.is_file():
        return _session(app, EXAMPLE_CT.name, EXAMPLE_CT, read_volume(EXAMPLE_CT), workdir)
    hu, _, affine = make_phantom(0)
    source = Path(workdir.name) / "phantom_ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), source)
    return _session(app, source.name, source, read_volume(source), workdir)


def _session(app: AppModel, name: str, source: Path, volume: Volume, workdir) -> Session:
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        raise ValueError(f"{name}: {int((~np.isfinite(volume.array)).sum())} voxels are NaN or infinite")
    display = to_display(volume)
    scaled, modality = to_unit_range(display.array, PrepareOptions(window=app.window))
    return Session(name, source, volume, display, np.rint(scaled).astype(np.uint8), modality, workdir)


def _check_nifti_size(path: Path) -> None:
    """The header tells the size before anything is decompressed (a small .nii.gz can hold a huge volume)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as error:  # nibabel raises many types for a file that is not NIfTI
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error
    if np.prod(shape, dtype=np.float64) > MAX_VOXELS:
        raise ValueError(f"{path}: a volume of shape {shape} is over this app's limit of {MAX_VOXELS} voxels")


def _unzip_dicom(path: Path, folder: Path, max_mb: float) -> None:
    """Every file of the zip, flattened into `folder` under safe names (no path from the archive is used)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > 4 * max_mb * 2**20:
                raise ValueError(f"{path.name}: unpacks to more than {4 * max_mb:g} MB")
            folder.mkdir(parents=True)
            for i, member in enumerate(members):
                suffix = Path(member.filename).suffix
                suffix = suffix if suffix.lower() in (".dcm", ".ima") else ""
                (folder / f"{i:06d}{suffix}").write_bytes(archive.read(member))
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path.name}: not a readable zip archive ({error})") from error


def legend_rows(app: AppModel, session: Session | None) -> list[tuple[str, str, float]]:
    """(organ, #rrggbb, mL) for every organ in the volume, in label-map order."""
    if session is None:
        return []
    return [(organ, "#%02x%02x%02x" % tuple(organ_colour(app, organ)), ml)
            for organ, ml in session.volumes_ml(app).items()]

