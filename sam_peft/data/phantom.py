"""A synthetic abdominal CT phantom of our own, for demos and tests that must run without real scans.

Each case is a stack of axial slices in display orientation (rows anterior -> posterior, columns patient
right -> left, slices inferior -> superior) with FLARE22 label ids, all 13 organs present. Organs are
deformed ellipsoids whose cross-sections change smoothly over slices, painted in anatomical order so that
they touch where real organs do (liver/IVC/right kidney, spleen/stomach, pancreas/duodenum). Liver and spleen, and
pancreas and duodenum, have close HU values, so intensity alone cannot tell them apart (organ ambiguity).
Bowel loops, fat, muscle and a vertebra (bone, unlabelled) give distractors; blur and correlated noise give
a CT look. Everything is drawn from one seeded generator, so a seed always gives the same case.
"""
from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from datasets import DatasetDict
from scipy import ndimage

from .label_maps import PRESETS
from .options import PHANTOM_LAYOUTS
from .prepare import VolumeCase, claim_output, prepare_volumes, publish
from .readers import Volume, display_affine, reorient

FLARE22_IDS = {name: i for i, name in PRESETS["flare22"].items()}


@dataclass
class _Grid:
    """Normalised coordinates: u in [-1, 1] from patient right to left, v from anterior to posterior, z in (0, 1)."""

    u: np.ndarray  # (1, 1, W)
    v: np.ndarray  # (1, H, 1)
    z: np.ndarray  # (D, 1, 1)


class _Painter:
    """Draws organs into HU and label volumes; later organs cover earlier ones, as in an anatomical atlas."""

    def __init__(self, shape: Sequence[int], rng: np.random.Generator):
        d, h, w = shape
        self.grid = _Grid(
            np.linspace(-1, 1, w, dtype=np.float32)[None, None, :],
            np.linspace(-1, 1, h, dtype=np.float32)[None, :, None],
            ((np.arange(d, dtype=np.float32) + 0.5) / d)[:, None, None],
        )
        self.rng = rng
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def radius(self, centre, radii, z_range, drift=(0.0, 0.0), wobble=0.06, power=2.0) -> np.ndarray:
        """Normalised radial distance (<= 1 inside) of a deformed ellipsoid with per-case random jitter.

        Computed only inside the ellipsoid's bounding box (inf elsewhere), which keeps a case fast.
        """
        g, rng = self.grid, self.rng
        cx, cy = (float(c) for c in np.add(centre, rng.uniform(-0.03, 0.03, 2)))
        ax, ay = (float(r) for r in np.multiply(radii, rng.uniform(0.88, 1.12, 2)))
        z0, z1 = (float(z) for z in np.add(z_range, rng.uniform(-0.04, 0.04, 2)))
        a2, a3, p2, p3 = (float(x) for x in (*rng.uniform(0, wobble, 2), *rng.uniform(0, 2 * np.pi, 2)))
        middle, half = (z0 + z1) / 2, max((z1 - z0) / 2, 1e-3)
        reach = 1 + a2 + a3
        box = (
            _span(g.z.ravel(), z0, z1),
            _span(g.v.ravel(), cy - ay * reach - abs(drift[1]) * half, cy + ay * reach + abs(drift[1]) * half),
            _span(g.u.ravel(), cx - ax * reach - abs(drift[0]) * half, cx + ax * reach + abs(drift[0]) * half),
        )
        out = np.full(self.hu.shape, np.inf, dtype=np.float32)
        z, v, u = g.z[box[0]], g.v[:, box[1]], g.u[:, :, box[2]]
        if not (z.size and v.size and u.size):
            return out
        profile = np.sqrt(np.clip(1 - ((z - middle) / half) ** 2, 0, None)) ** 0.6
        du = (u - (cx + drift[0] * (z - middle))) / ax
        dv = (v - (cy + drift[1] * (z - middle))) / ay
        rho = np.hypot(du, dv) if power == 2 else (np.abs(du) ** power + np.abs(dv) ** power) ** (1 / power)
        theta = np.arctan2(dv, du)
        shape_change = 1 + a2 * np.cos(2 * theta + p2 + 4 * z) + a3 * np.cos(3 * theta + p3)
        out[box] = rho / (np.maximum(profile, 1e-6) * shape_change)
        return out

    def paint(self, mask: np.ndarray, hu: float, organ: str | None = None) -> None:
        self.hu[mask] = hu
        self.label[mask] = FLARE22_IDS[organ] if organ else 0


def _span(coords: np.ndarray, low: float, high: float) -> slice:
    """Index range of sorted `coords` within [low, high]."""
    return slice(int(np.searchsorted(coords, low)), int(np.searchsorted(coords, high, side="right")))


def make_phantom(
    seed: int | Sequence[int],
    shape: Sequence[int] = (32, 160, 160),
    spacing: Sequence[float] = (3.0, 1.5, 1.5),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One abdominal CT case: (HU int16 (D, H, W), FLARE22 label uint8 (D, H, W), 4x4 RAS affine).

    The anatomy fills the field of view whatever `shape` is; `spacing` only sets the affine (the default
    is a 240 mm field of view at 160 pixels and 96 mm of abdomen over 32 slices).
    """
    rng = np.random.default_rng(seed)
    p = _Painter(shape, rng)
    contrast = rng.uniform(0.85, 1.15)  # enhancement phase: scales how far organs rise above water

    def enhanced(hu: float) -> float:
        return 40 + (hu - 40) * contrast + rng.normal(0, 4)

    body = p.radius((0, 0.02), (0.88, 0.66), (-1.0, 2.0), wobble=0.02, power=2.4)
    p.paint(body <= 1, -105)  # subcutaneous fat
    p.paint(body <= 0.93, 45)  # abdominal wall muscle
    p.paint(body <= 0.88, -90)  # intra-abdominal fat
    for _ in range(10):  # bowel loops (unlabelled), some with gas
        loop = p.radius((rng.uniform(-0.5, 0.5), rng.uniform(-0.45, 0.1)), (0.09, 0.08), (-0.2, 0.8), wobble=0.1)
        p.paint(loop <= 1, rng.uniform(15, 45))
        p.paint(loop <= 0.45, -850 if rng.random() < 0.4 else rng.uniform(0, 20))
    for side in (-1, 1):
        p.paint(p.radius((0.18 * side, 0.56), (0.12, 0.1), (-1.0, 2.0), wobble=0.03) <= 1, 50)  # paraspinal
        p.paint(p.radius((0.15 * side, 0.3), (0.06, 0.06), (-0.6, 0.55), drift=(0.2 * side, 0)) <= 1, 50)  # psoas

    for organ, side, z_range in (("kidney_right", -1, (0.12, 0.55)), ("kidney_left", 1, (0.18, 0.62))):
        kidney = p.radius((0.36 * side, 0.36), (0.12, 0.16), z_range, drift=(0.05 * side, 0))
        p.paint(kidney <= 1, enhanced(185), organ)  # cortex
        p.paint(kidney <= 0.62, enhanced(125), organ)  # medulla
        p.paint(p.radius((0.27 * side, 0.33), (0.05, 0.06), z_range) <= 1, -60)  # renal sinus fat (hilum)

    liver_hu = enhanced(105)
    p.paint(p.radius((-0.38, -0.02), (0.42, 0.5), (0.38, 1.25), drift=(0.1, 0)) <= 1, liver_hu, "liver")
    p.paint(p.radius((0.05, -0.28), (0.26, 0.15), (0.68, 1.1)) <= 1, liver_hu, "liver")  # left lobe
    p.paint(p.radius((-0.28, -0.22), (0.07, 0.1), (0.42, 0.62), wobble=0.03) <= 1, rng.uniform(0, 20), "gallbladder")
    p.paint(p.radius((0.6, 0.2), (0.16, 0.25), (0.55, 0.98), drift=(0.0, -0.1)) <= 1, enhanced(112), "spleen")

    stomach = p.radius((0.36, -0.12), (0.24, 0.2), (0.55, 0.95))
    p.paint(stomach <= 1, enhanced(75), "stomach")  # wall
    p.paint(stomach <= 0.8, rng.uniform(10, 35), "stomach")  # fluid / oral contrast
    gas = p.radius((0.36, -0.24), (0.17, 0.08), (0.68, 0.95), wobble=0.02) <= 1
    p.paint(gas & (stomach <= 0.8), -880, "stomach")  # gas rises to the anterior wall

    p.paint(p.radius((0.08, 0.17), (0.035, 0.035), (0.84, 1.3), wobble=0.02) <= 1, 45, "esophagus")
    for organ, centre in (("adrenal_gland_right", (-0.22, 0.24)), ("adrenal_gland_left", (0.2, 0.27))):
        p.paint(p.radius(centre, (0.05, 0.025), (0.55, 0.75), wobble=0.1) <= 1, enhanced(60), organ)
    p.paint(_pancreas(p) <= 1, enhanced(100), "pancreas")
    p.paint(_duodenum(p), enhanced(80), "duodenum")
    p.paint(p.radius((-0.13, 0.21), (0.06, 0.045), (-1.0, 2.0), wobble=0.03) <= 1, enhanced(135), "inferior_vena_cava")
    p.paint(p.radius((0.05, 0.24), (0.05, 0.05), (-1.0, 2.0), wobble=0.01) <= 1, enhanced(175), "aorta")

    vertebra = p.radius((0.0, 0.4), (0.11, 0.1), (-1.0, 2.0), wobble=0.02)
    p.paint(p.radius((0.0, 0.56), (0.1, 0.07), (-1.0, 2.0), wobble=0.02) <= 1, 450)  # posterior arch
    p.paint(vertebra <= 1, 650)  # cortical bone
    p.paint(vertebra <= 0.8, 260)  # cancellous bone
    p.paint(p.radius((0.0, 0.53), (0.045, 0.04), (-1.0, 2.0), wobble=0.0) <= 1, 25)  # spinal canal

    image = ndimage.gaussian_filter(p.hu, (0, 0.7, 0.7))  # partial volume at organ borders
    noise = ndimage.gaussian_filter(rng.normal(0, 28, p.hu.shape).astype(np.float32), (0, 0.8, 0.8))
    image = np.clip(image + noise, -1024, 3071).round().astype(np.int16)
    affine = display_affine(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)  # centre the volume at the origin
    return image, p.label, affine


def _pancreas(p: _Painter) -> np.ndarray:
    """A tube from the head (by the duodenum) to the tail (at the splenic hilum), rising towards the tail."""
    g, rng = p.grid, p.rng
    points = np.array([[-0.14, 0.06], [0.1, 0.1], [0.46, 0.1]]) + rng.uniform(-0.03, 0.03, (3, 2))
    distance = np.full((1, g.v.size, g.u.size), np.inf, np.float32)
    along = np.zeros_like(distance)
    lengths = np.linalg.norm(np.diff(points, axis=0), axis=1)
    start = 0.0
    for (a, b), length in zip(zip(points[:-1], points[1:]), lengths):
        t = np.clip(((g.u - a[0]) * (b[0] - a[0]) + (g.v - a[1]) * (b[1] - a[1])) / length**2, 0, 1)
        d = np.hypot(g.u - (a[0] + t * (b[0] - a[0])), g.v - (a[1] + t * (b[1] - a[1])))
        closer = d < distance
        distance = np.where(closer, d, distance)
        along = np.where(closer, (start + t * length) / lengths.sum(), along)
        start += length
    thickness = 0.075 - 0.03 * along  # the head is thicker than the tail
    middle = rng.uniform(0.48, 0.54) + 0.08 * along
    profile = np.sqrt(np.clip(1 - ((g.z - middle) / 0.11) ** 2, 0, None))
    return distance / (thickness * np.maximum(profile, 1e-6))


def _duodenum(p: _Painter) -> np.ndarray:
    """The C-loop around the pancreatic head: a ring open towards the patient's left."""
    g, rng = p.grid, p.rng
    cx, cy = -0.19 + rng.uniform(-0.02, 0.02), 0.07 + rng.uniform(-0.02, 0.02)
    ring = np.abs(np.hypot(g.u - cx, g.v - cy) - 0.12)
    arc = (g.u - cx) < 0.03
    z = (g.z > 0.36 + rng.uniform(-0.03, 0.03)) & (g.z < 0.6 + rng.uniform(-0.03, 0.03))
    return (ring < 0.04) & arc & z


def phantom_cases(n_cases: int, seed: int = 0, **phantom_kwargs) -> list[VolumeCase]:
    """`n_cases` phantoms as in-memory cases `phantom_0001`, ...; case i is drawn from the seed (seed, i)."""
    cases = []
    for i in range(n_cases):
        image, label, affine = make_phantom((seed, i), **phantom_kwargs)
        case_id = f"phantom_{i + 1:04d}"
        cases.append(VolumeCase(case_id, Volume(image, affine, case_id), Volume(label, affine, case_id)))
    return cases


def phantom_dataset(
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = (32, 160, 160),
    spacing: Sequence[float] = (3.0, 1.5, 1.5),
    **options,
) -> DatasetDict:
    """Phantoms prepared in memory with the FLARE22 label map; `options` as for `prepare_volumes`."""
    cases = phantom_cases(n_cases, seed, shape=shape, spacing=spacing)
    return prepare_volumes(cases, label_map="flare22", **{"seed": seed, **options})


def write_phantom(
    output_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    layout: str = "nnunet",
    overwrite: bool = False,
    **phantom_kwargs,
) -> Path:
    """Write phantoms as NIfTI (RAS) in the nnU-Net/FLARE22 layout, or Synapse's with BTCV ids, atomically."""
    if layout not in PHANTOM_LAYOUTS:
        raise ValueError(f"layout must be one of {PHANTOM_LAYOUTS}, got {layout!r}")
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    output = Path(output_dir)
    claim_output(output, overwrite, ["dataset.json", "img"])
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for i, case in enumerate(phantom_cases(n_cases, seed, **phantom_kwargs), 1):
            image, label = (reorient(v, ("R", "A", "S")) for v in (case.image, case.label))
            if layout == "nnunet":
                paths = (f"imagesTr/{case.case_id}_0000.nii.gz", f"labelsTr/{case.case_id}.nii.gz")
            else:
                paths = (f"img/img{i:04d}.nii.gz", f"label/label{i:04d}.nii.gz")
                label.array = _FLARE22_TO_BTCV[label.array]
            for volume, relative in zip((image, label), paths):
                (work / relative).parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(volume.array, volume.affine), work / relative)
        if layout == "nnunet":
            labels = {"0": "background", **{str(i): name for i, name in PRESETS["flare22"].items()}}
            info = {"name": "sam_peft phantom", "modality": {"0": "CT"}, "labels": labels,
                    "numTraining": n_cases, "file_ending": ".nii.gz"}
            (work / "dataset.json").write_text(json.dumps(info, indent=2))
        publish(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _flare22_to_btcv() -> np.ndarray:
    btcv = {name: i for i, name in PRESETS["btcv"].items()}
    lut = np.zeros(256, np.uint8)
    for i, name in PRESETS["flare22"].items():
        lut[i] = btcv.get(name, 0)  # FLARE22's duodenum has no BTCV id
    return lut


_FLARE22_TO_BTCV = _flare22_to_btcv()
