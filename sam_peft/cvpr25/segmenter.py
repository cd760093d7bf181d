"""3D interactive segmentation from a 2D promptable model: a 3D box, then corrective 3D clicks.

Box step: the box's middle slice is segmented from its box, and each mask's bounding box (slightly
enlarged) prompts the next slice, both ways, within the box's slice range. `PROPAGATION` names what else a
slice may pass on (its low-res logits as mask prompt, a point inside its mask); the default is chosen by
measuring per-slice Dice against the distance to the middle slice (benchmarks/cvpr25_protocol.py --study).

Click step: the clicked slice is decoded again from its mask (as a mask prompt), its box and all its
clicks, and only the part of the change connected to the click is kept (a background click removes only
around itself). A background click, and a foreground click the model ignores, take the click's intensity
region (`Wand`) instead where it differs enough from the other side: asked to drop a vertebra's disc or
spinal canal, the model drops bone with it or nothing. The correction is then carried slice by slice while
the neighbour's change overlaps the previous slice's and changes less than half of its mask, within the 3D
box's slice range. A foreground click where the structure is absent extends it from there; a background
click that empties its slice ends the structure there; without a box the first foreground click starts the
structure. Onto slices without the structure a correction is carried at most as many slices as the structure
is deep (in mm) at the click: the evaluator clicks the centre of what is missing, which reaches about that far
every way, while a 2D model carried on unchecked drifts into a neighbour for the rest of the volume (which
later clicks barely undo); a missing end draws the next foreground click instead. Clicks are replayed in
order, so a fresh process reaches the same masks; the per-class masks are also kept on disk to skip the
replay. Classes are merged into one label volume by `collapse`, where a foreground click also settles who owns
an overlap.

Image embeddings are computed once per slice and case and kept on disk (`EmbeddingCache`), keyed by the
hash of the image volume and the model, because each challenge step is a new process.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, label as connected_components

from ..evaluation.metrics import dice_from_counts
from ..evaluation.predictor import MultiOrganPredictor, decode_prompts
from ..evaluation.volume import PROPAGATION_MARGIN
from ..io import atomic_path
from ..prompts.behaviours import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, POSITIVE
from .format import POINT, ChallengeCase
from .options import PROPAGATION, Propagation

CLICK_PROMPT = os.environ.get("SAMPEFT_CLICK_PROMPT", "mask")
MAX_GROWTH = 2.0  # a carried correction larger than this times the previous slice's (+ 20 px) has leaked
MAX_ADDITION = 1.0  # a foreground click adds at most this times the mask of its slice (or the nearest one), >= 50 px
MAX_CARRIED_CHANGE = 0.5  # a carried correction adds or removes at most this share of a neighbour's mask
MIN_OVERLAP = 0.5  # of the smaller of two consecutive slices' masks, for an extension to go on
EXTENSION_REACH = 1.0  # onto slices without the structure: at most this times its depth at the click
WAND_MIN_CONTRAST = 20.0  # intensity steps (of 255) between a click and the other side for the wand to act
WAND_NEAR = 13.0  # px: the other side's intensity is read within this distance of the click
WAND_REACH = 3.0  # a wand region stays within this times its thickness at the click


def content_key(imgs: np.ndarray, model_id: str) -> str:
    """The cache key of a case: its voxels, shape and the model that embeds them."""
    digest = hashlib.sha256(np.ascontiguousarray(imgs).tobytes())
    digest.update(f"{imgs.shape}|{model_id}".encode())
    return digest.hexdigest()[:24]


class EmbeddingCache:
    """Image embeddings of one case's slices, computed on first use and kept on disk as float16."""

    def __init__(self, predictor: MultiOrganPredictor, imgs: np.ndarray, folder: Path | None):
        self.predictor, self.imgs, self.folder = predictor, imgs, folder
        self.memory: dict[int, torch.Tensor] = {}
        self.encoded = 0  # slices run through the encoder in this process
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, z: int) -> torch.Tensor:
        if z not in self.memory:
            path = None if self.folder is None else self.folder / f"z{z:04d}.npy"
            if path is not None and path.is_file():
                try:
                    self.memory[z] = torch.from_numpy(np.load(path).astype(np.float32))
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)
            if z not in self.memory:
                self.predictor.set_image(self.imgs[z])
                self.memory[z] = self.predictor.embeddings.float().cpu()
                self.encoded += 1
                if path is not None:
                    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                        np.save(handle, self.memory[z].numpy().astype(np.float16))
        return self.memory[z]


def mask_box(mask: np.ndarray, margin: float) -> np.ndarray:
    """[x0, y0, x1, y1] around a 2D mask, enlarged by `margin` px and clipped to the image."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([max(0.0, xs.min() - margin), max(0.0, ys.min() - margin),
                     min(w - 1.0, xs.max() + margin), min(h - 1.0, ys.max() + margin)])


def inner_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its boundary: a click a person would place inside it."""
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(distance.argmax(), mask.shape)
    return np.array([x, y], dtype=np.float64)


def disk(shape: tuple[int, int], y: int, x: int, radius: float) -> np.ndarray:
    """The pixels of a `shape` image within `radius` of (y, x)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2


def _depth(mask: np.ndarray, y: int, x: int) -> float:
    """Distance (px) from (y, x) to the edge of `mask`."""
    return float(distance_transform_edt(np.pad(mask, 1))[1 + y, 1 + x])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(dice_from_counts((a & b).sum(), a.sum(), b.sum()))


@dataclass
class SliceResult:
    mask: np.ndarray
    score: float
    logits: np.ndarray  # low-res (256, 256)


@dataclass
class ClassState:
    """One class's 3D mask and what shaped it."""

    masks: np.ndarray  # bool (D, H, W)
    low: int  # slice range the structure may occupy
    high: int
    anchors: set[int] = field(default_factory=set)  # slices the user prompted (box middle, clicked slices)
    centre: int | None = None  # the first anchor: "outwards" runs away from it
    boxed: bool = False  # the range came from a 3D box: the structure does not reach beyond it
    size: int | None = None  # the box step's voxel count: fixes which class wins an overlap


@dataclass
class Wand:
    """A click's intensity region, for clicks the 2D model answers badly (a vertebra's disc or spinal canal
    kept inside its mask, a process left out): the pixels whose intensity is nearer the click's than the
    other side's (the mask for a background click, the background around it for a foreground one), within
    a disk of `WAND_REACH` times the region's thickness at the click."""

    value: float  # the click's intensity (median of its 3 x 3 neighbourhood)
    threshold: float  # halfway to the other side's median
    centre: tuple[int, int]
    radius: float

    @classmethod
    def at(cls, image: np.ndarray, old: np.ndarray, kind: str, y: int, x: int) -> "Wand | None":
        """The wand of a click at (y, x), or None where the two sides' intensities are too close to tell."""
        image = image.astype(np.float64)
        value = float(np.median(image[max(0, y - 1): y + 2, max(0, x - 1): x + 2]))
        other = disk(old.shape, y, x, WAND_NEAR) & (old if kind == "bg" else ~old)  # what stays as it is
        other &= np.abs(image - value) > WAND_MIN_CONTRAST
        if other.sum() < 5:
            return None
        wand = cls(value, (value + float(np.median(image[other]))) / 2, (y, x), 0.0)
        inside = wand._similar(image) & (old if kind == "bg" else ~old)
        if not inside[y, x]:
            return None
        wand.radius = max(3.0, WAND_REACH * _depth(inside, y, x))
        return wand

    def _similar(self, image: np.ndarray) -> np.ndarray:
        """Pixels on the click's side of the threshold."""
        image = np.asarray(image, dtype=np.float64)
        return image >= self.threshold if self.value >= self.threshold else image < self.threshold

    def region(self, image: np.ndarray, old: np.ndarray, kind: str, touching: np.ndarray) -> np.ndarray:
        """The wand's connected region on a slice (with its mask `old`) that meets `touching`."""
        candidate = self._similar(image) & (old if kind == "bg" else ~old)
        candidate &= disk(old.shape, *self.centre, self.radius)
        components, _ = connected_components(candidate)
        hit = np.unique(components[touching & candidate])
        return np.isin(components, hit[hit > 0])


class Segmenter:
    """3D box and click interaction for every class of one case (see the module docstring)."""

    def __init__(self, predictor: MultiOrganPredictor, embeddings: EmbeddingCache, shape: tuple[int, int, int],
                 propagation: Propagation = "box", spacing: Sequence[float] = (1.0, 1.0, 1.0)):
        if propagation not in PROPAGATION:
            raise ValueError(f"propagation must be one of {PROPAGATION}, got {propagation!r}")
        self.predictor, self.embeddings, self.shape = predictor, embeddings, shape
        self.spacing = tuple(float(s) for s in spacing)
        self.imgs = embeddings.imgs
        self.propagation = propagation
        self.margin = PROPAGATION_MARGIN * max(shape[1:]) / 1024
        self.decoded = 0

    # ------------------------------------------------------------------------------------------ one slice

    def segment(self, z: int, box=None, fg: Sequence = (), bg: Sequence = (), mask_logits=None) -> SliceResult:
        """One slice from a box [x0, y0, x1, y1] and/or (x, y) clicks, optionally with a low-res mask prompt."""
        points = [*fg, *bg]
        labels = [POSITIVE] * len(fg) + [NEGATIVE] * len(bg)
        if box is not None:
            points += [box[:2], box[2:]]
            labels += [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]
        self.predictor.embeddings = self.embeddings(z)
        self.predictor.original_hw = self.shape[1:]
        points = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(1, -1, 2)
        tokens = torch.as_tensor(labels, dtype=torch.int64)[None]
        masks = None if mask_logits is None else torch.as_tensor(mask_logits, dtype=torch.float32)[None, None]
        processor = self.predictor.processor
        with torch.inference_mode():
            logits, score = decode_prompts(self.predictor.model, self.predictor.embeddings,
                                           processor.transform_coords(points, self.shape[1:])[None],
                                           tokens[None], masks)
            full = processor.postprocess_masks(logits[0], self.shape[1:])[0] > 0
        self.decoded += 1
        return SliceResult(full.numpy(), float(score[0, 0]), logits[0, 0].numpy())

    def _carry(self, previous: SliceResult, z: int) -> SliceResult:
        """Slice z from the neighbouring slice's result, by the propagation variant."""
        box = mask_box(previous.mask, self.margin)
        fg = [inner_point(previous.mask)] if "point" in self.propagation else []
        logits = previous.logits if "mask" in self.propagation else None
        return self.segment(z, box, fg, (), logits)

    # ------------------------------------------------------------------------------------------ box step

    def box_step(self, box: dict) -> ClassState:
        """The class from its 3D box: its middle slice, then propagation both ways within its slice range."""
        depth = self.shape[0]
        low, high = max(0, box["z_min"]), min(depth - 1, box["z_max"])
        z_mid = min(max(box["z_mid"], low), high)
        state = ClassState(np.zeros(self.shape, dtype=bool), low, high, {z_mid}, z_mid, boxed=True)
        start = self.segment(z_mid, np.array([box["z_mid_x_min"], box["z_mid_y_min"],
                                              box["z_mid_x_max"], box["z_mid_y_max"]], dtype=np.float64))
        state.masks[z_mid] = start.mask
        for step in (1, -1):
            self._propagate(state, start, z_mid, step)
        state.size = int(state.masks.sum())
        return state

    def _propagate(self, state: ClassState, start: SliceResult, z0: int, step: int) -> None:
        """Carry slice z0's result to z0 + step, z0 + 2 step, ... to the end of the slice range; an empty mask
        is skipped (the box says the structure is there) and the last non-empty one carried on."""
        previous, z = start, z0 + step
        while state.low <= z <= state.high and previous.mask.any():
            result = self._carry(previous, z)
            if result.mask.any():
                state.masks[z] = result.mask
                previous = result
            z += step

    # ------------------------------------------------------------------------------------------ clicks

    def click_step(self, state: ClassState | None, kind: str, point: POINT, clicks: dict) -> ClassState | None:
        """Apply one click ("fg" | "bg", (z, y, x)); `clicks`: all of this class's clicks so far, this one
        included. Returns the new state (None while a clicks-only class has no foreground click yet).

        The clicked slice is decoded from its mask's box (reaching the click) and all its clicks; of the
        difference to the old mask only the part connected to the click is taken (added for a foreground
        click, removed for a background one), so a click changes what it points at and nothing else. A
        background click, or a foreground one the model ignores, takes the `Wand` region where there is one."""
        z, y, x = point
        if state is None:
            if kind != "fg":
                return None
            state = ClassState(np.zeros(self.shape, dtype=bool), z, z, set(), z)
        old = state.masks[z]
        seed = np.zeros(old.shape, dtype=bool)
        seed[y, x] = True
        fg = [(px, py) for pz, py, px in clicks["fg"] if pz == z]
        bg = [(px, py) for pz, py, px in clicks["bg"] if pz == z]
        box = mask_box(old | seed, self.margin) if old.any() else None
        edit = np.zeros_like(old)
        limit = MAX_ADDITION * max(self._area_near(state, z), 50)
        for prompt in self._click_prompts(z, old, box):
            edit = self._edit(kind, old, self.segment(z, fg=fg, bg=bg, **prompt).mask, seed)
            if kind == "fg" and edit.sum() > limit:
                edit[:] = False  # more than the slice's mask again: a leak, not the missed part
            if edit.any():
                break
        if kind == "bg":  # only around the click: a negative click made the model drop whole organ parts
            edit &= self._reach(old, y, x)
        # the model ignored the click, or removes (it drops bone with a disc): the click's intensity region
        wand = Wand.at(self.imgs[z], old, kind, y, x) if kind == "bg" or not edit.any() else None
        region = None if wand is None else wand.region(self.imgs[z], old, kind, seed)
        if region is not None and region.any():
            edit = region
        else:
            wand = None
        if not edit.any():  # nor does the intensity single out a region: change the click and its 4 neighbours
            edit = self._cross(old.shape, y, x) & (~old if kind == "fg" else old)
        state.anchors.add(z)
        state.masks[z] = old | edit if kind == "fg" else old & ~edit
        if kind == "bg" and not state.masks[z].any():  # the slice was wrong as a whole: the structure ends
            self._cut(state, z)
            return state
        state.low, state.high = min(state.low, z), max(state.high, z)
        if wand is not None:
            propose = self._wand_change(kind, wand)
        else:
            # (`old` views the state: the carried removal's reach is measured on the slice after the click)
            propose = self._model_change(kind, self._reach(state.masks[z], y, x) if kind == "bg" else None)
        reach = EXTENSION_REACH * _depth(edit, y, x) * self.spacing[1] / self.spacing[0]
        for step in (1, -1):
            self._carry_correction(state, kind, edit, z, step, propose, reach)
        if state.size is None:
            state.size = int(state.masks.sum())  # a clicks-only structure's first extent orders overlaps
        return state

    @staticmethod
    def _area_near(state: ClassState, z: int) -> float:
        """The mask area of the slice nearest to z that holds the structure (z itself where it does): the size
        a foreground click's addition is checked against; inf before the structure's first voxel."""
        areas = state.masks.sum(axis=(1, 2))
        held = np.nonzero(areas)[0]
        return float(areas[held[np.abs(held - z).argmin()]]) if len(held) else float("inf")

    @staticmethod
    def _reach(old: np.ndarray, y: int, x: int) -> np.ndarray:
        """Where a background click may remove: a disk around it 1.5 times its distance to the mask's edge
        (the over-segmented part it sits in is about that thick), at least 2 px."""
        return disk(old.shape, y, x, max(2.0, 1.5 * _depth(old, y, x)))

    @staticmethod
    def _cross(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
        cross = np.zeros(shape, dtype=bool)
        for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1]:
                cross[y + dy, x + dx] = True
        return cross

    def _click_prompts(self, z: int, old: np.ndarray, box: np.ndarray | None) -> list[dict]:
        """What goes with a slice's clicks, in order of preference until one changes the clicked pixel: the
        refinement prompt (`CLICK_PROMPT`), then the box alone, then nothing (a misleading box)."""
        if box is None:
            return [{}]
        low = self.predictor.processor.mask_to_low_res(old)[None, None]
        side = 4 * self.embeddings(z).shape[-1]  # the decoder's mask side (256 for SAM models)
        low = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        logits = torch.logit(low[0, 0].clamp(0.001, 0.999)).numpy()  # the old mask as confident logits
        prompts = {"mask": {"box": box, "mask_logits": logits}, "box": {"box": box}, "none": {}}
        order = dict.fromkeys([CLICK_PROMPT, "box", "none"])
        return [prompts[name] for name in order]

    @staticmethod
    def _edit(kind: str, old: np.ndarray, new: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """The pixels a click changes: the components of (new - old) for "fg", (old - new) for "bg", that touch
        `seed`."""
        changed = new & ~old if kind == "fg" else old & ~new
        components, _ = connected_components(changed, structure=np.ones((3, 3), dtype=bool))
        hit = np.unique(components[seed & changed])
        return np.isin(components, hit[hit > 0])

    def _carry_correction(self, state: ClassState, kind: str, edit: np.ndarray, z: int, step: int,
                          propose, reach: float = float("inf")) -> None:
        """Carry a click's correction to z + step, z + 2 step, ... while the same correction shows there:
        `propose(z, old, edit)` gives slice z's change from the previous slice's `edit`. It ends where the
        change is empty, more than doubles, or adds or removes more than half of the slice's mask, at an
        anchor, at the end of a 3D box's slice range (the box spans the structure) or of the volume, or,
        extending a structure past its slices, where the new slice shares under half of the last one's
        pixels, or farther than `reach` slices from the click."""
        start, z = z, z + step
        while 0 <= z < self.shape[0] and z not in state.anchors:
            if state.boxed and not state.low <= z <= state.high:
                break
            old = state.masks[z]
            carried = propose(z, old, edit)
            if not carried.any() or carried.sum() > MAX_GROWTH * edit.sum() + 20:
                break
            if old.any() and carried.sum() > MAX_CARRIED_CHANGE * old.sum():
                break  # a slice grows or shrinks by more than half: the correction has left the error it fixes
            if not old.any() and (not _continues(carried, edit) or abs(z - start) > reach):
                break  # extending past the structure: the new slice must continue the last one, not far away
            edit = carried
            state.masks[z] = old | edit if kind == "fg" else old & ~edit
            if kind == "fg":
                state.low, state.high = min(state.low, z), max(state.high, z)
            z += step

    def _model_change(self, kind: str, reach: np.ndarray | None):
        """Proposes a slice's change by decoding it towards the correction (its mask's box and a click inside
        the previous slice's change) and keeping the changed part that overlaps that change; `reach`: where a
        background correction may remove."""
        def propose(z: int, old: np.ndarray, edit: np.ndarray) -> np.ndarray:
            if kind == "fg":
                new = self.segment(z, mask_box(old | edit, self.margin), [inner_point(edit)]).mask
            else:
                target = old & edit
                if not target.any():
                    return target
                new = self.segment(z, mask_box(old, self.margin), (), [inner_point(target)]).mask
            carried = self._edit(kind, old, new, edit)
            return carried if reach is None else carried & reach

        return propose

    def _wand_change(self, kind: str, wand: Wand):
        """Proposes a slice's change as the wand's region that overlaps the previous slice's change (by at least
        half of the smaller: barely touching it is another part of the image)."""
        def propose(z: int, old: np.ndarray, edit: np.ndarray) -> np.ndarray:
            carried = wand.region(self.imgs[z], old, kind, edit)
            return carried if _continues(carried, edit) else np.zeros_like(carried)

        return propose

    def _cut(self, state: ClassState, z: int) -> None:
        """Remove slice z and everything beyond it, away from the structure's first anchor."""
        centre = state.centre if state.centre is not None else z
        if z > centre:
            state.masks[z:] = False
            state.high = z - 1
        elif z < centre:
            state.masks[: z + 1] = False
            state.low = z + 1


def _continues(change: np.ndarray, previous: np.ndarray) -> bool:
    """Whether a slice's change overlaps the previous slice's by at least `MIN_OVERLAP` of the smaller."""
    return (change & previous).sum() >= MIN_OVERLAP * min(change.sum(), previous.sum())


def collapse(states: Sequence[ClassState | None], shape: tuple[int, int, int],
             clicks: Sequence[Sequence] = ()) -> np.ndarray:
    """Per-class masks -> `segs` (value k + 1 for class k). Where classes overlap the smaller structure (by its
    box step, so that an overlap does not change hands as clicks resize the masks) wins, since a large
    neighbour's mask spilling onto a small one is the usual overlap, except where the user said otherwise: a
    foreground click of class k on a voxel another class holds gives k the part of that overlap connected to
    the click (`clicks[k]`: class k's (kind, (z, y, x)) clicks in order)."""
    segs = np.zeros(shape, dtype=np.uint8)
    present = [(s.masks.sum() if s.size is None else s.size, k) for k, s in enumerate(states) if s is not None]
    for _, k in sorted(present, reverse=True):
        segs[states[k].masks] = k + 1
    for k, class_clicks in enumerate(clicks):
        for kind, point in class_clicks:
            point = tuple(point)
            if kind != "fg" or states[k] is None or not states[k].masks[point] or segs[point] in (0, k + 1):
                continue
            _claim(segs, states[k].masks & (segs == segs[point]), point, k + 1)
    return segs


def _claim(segs: np.ndarray, held: np.ndarray, point: tuple[int, int, int], value: int) -> None:
    """Give `value` the 2D component of `held` at `point`, and slice by slice the components that overlap the
    previous slice's claim while they do not more than double it (the same rule that carries a correction)."""
    z = point[0]
    components, _ = connected_components(held[z])
    claim = components == components[point[1:]]
    segs[z][claim] = value
    for step in (1, -1):
        previous, zz = claim, z + step
        while 0 <= zz < segs.shape[0]:
            components, _ = connected_components(held[zz])
            hit = np.unique(components[previous & held[zz]])
            current = np.isin(components, hit[hit > 0])
            if not current.any() or current.sum() > MAX_GROWTH * previous.sum() + 20:
                break
            segs[zz][current] = value
            previous, zz = current, zz + step


def ordered_clicks(case: ChallengeCase, k: int) -> list[tuple[str, POINT]]:
    """Class k's clicks in the order given, from `clicks` and `clicks_order` (fg then bg without an order)."""
    clicks = case.clicks[k] if case.clicks is not None else {"fg": [], "bg": []}
    order = [kind for kind in (case.clicks_order[k] if case.clicks_order is not None else []) if kind in ("fg", "bg")]
    if sorted(order) != sorted(["fg"] * len(clicks["fg"]) + ["bg"] * len(clicks["bg"])):
        order = ["fg"] * len(clicks["fg"]) + ["bg"] * len(clicks["bg"])
    taken = {"fg": 0, "bg": 0}
    out = []
    for kind in order:
        out.append((kind, clicks[kind][taken[kind]]))
        taken[kind] += 1
    return out
