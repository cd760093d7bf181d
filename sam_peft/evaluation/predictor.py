"""`MultiOrganPredictor`: segment-anything's `SamPredictor`, for every organ of an image at once.

`set_image` runs the image encoder once; `predict` then answers prompts for any number of organs, as
often as a person clicks, all organs through the mask decoder together. Images are what users hold: a
uint8 display image (grayscale or RGB), or CT in Hounsfield units with the `window` that `prepare` used
for the training data; anything else (a float image in [0, 1], NaN pixels, a mask) is refused, because
the model would silently see another image than the one it was trained on. Prompts follow SAM's
conventions: (x, y) pixel coordinates in the original image, and a lone click (ambiguous: part, organ
or neighbour) takes the best of SAM's three candidate masks by the IoU head's estimate. `decode_prompts`
is the decoding `evaluate` uses too, so interactive use and the benchmark numbers agree.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..data.prepare import PrepareOptions, Window, to_unit_range
from ..models.decoding import PAD_LABEL, decode_regions, encode_images
from ..models.loading import processor_for
from ..models.processor import SamInputProcessor
from ..prompts.behaviours import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, POSITIVE

PROMPT_KEYS = ("box", "points", "labels")


class Prediction(NamedTuple):
    mask: np.ndarray  # bool (H, W) at original resolution
    score: float  # the IoU head's estimate of the mask's IoU
    low_res_logits: np.ndarray  # float32 (256, 256): pass back through `mask_inputs` with the next click


def display_image(image: np.ndarray | torch.Tensor, window: Window | str | Sequence[float] | None = None) -> np.ndarray:
    """What a user holds -> the uint8 display image the model was trained on, or a ValueError saying why not.

    uint8 (H, W), (H, W, 1) or (H, W, 3): used as it is, and so is an integer image whose values all lie in
    [0, 255] (a prepared dataset's uint8 column comes out of `datasets` as int64). Integer or float CT in
    Hounsfield units (H, W) with `window` (a preset name such as "abdomen", "level,width" or (level, width)):
    windowed exactly as `prepare` windows volumes. Other images are ambiguous (is 1.0 white, or 1 HU?) and
    are refused.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    kind = f"{image.dtype} image of shape {image.shape}"
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image: got a {kind}; give a uint8 display image, or Hounsfield units with window=")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise ValueError(f"image: got a {kind}; expected (H, W), (H, W, 1) or (H, W, 3)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image: got an empty {kind}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"image: {int((~np.isfinite(image)).sum())} pixel(s) of the {kind} are NaN or infinite")
    if image.dtype == np.uint8:
        if window is not None:
            raise ValueError(f"image: got a uint8 display image and window={window!r}; a window applies to "
                             "Hounsfield units only (pass the HU image, or no window)")
        return image
    if window is None:
        low, high = image.min(), image.max()
        if np.issubdtype(image.dtype, np.integer) and low >= 0 and high <= 255:
            return image.astype(np.uint8)
        raise ValueError(f"image: got a {kind} with values in [{low}, {high}] without a window; pass window= "
                         "(e.g. 'abdomen' or (level, width)) for CT in Hounsfield units, or a uint8 display image "
                         "(a float image in [0, 1] would be read as black)")
    if image.ndim == 3 and image.shape[-1] != 1:
        raise ValueError(f"image: got a {kind} with window={window!r}; Hounsfield units have one channel")
    scaled, _ = to_unit_range(image.reshape(image.shape[:2]), PrepareOptions(window=window, modality="ct"))
    return np.rint(scaled).astype(np.uint8)


def stack_prompts(prompts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region SAM tokens (points (P_i, 2), labels (P_i,)) -> points (N, P, 2), labels (N, P), padded with -1."""
    p = max(len(labels) for _, labels in prompts)
    points = torch.zeros(len(prompts), p, 2)
    labels = torch.full((len(prompts), p), PAD_LABEL, dtype=torch.int64)
    for i, (xy, tokens) in enumerate(prompts):
        points[i, : len(tokens)] = torch.as_tensor(xy)
        labels[i, : len(tokens)] = torch.as_tensor(tokens)
    return points, labels


def decode_prompts(
    model,
    image_embeddings: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    mask_inputs: torch.Tensor | None = None,
    multimask: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask per region: low-res logits (B, K, h, w) and the IoU head's estimates (B, K).

    Inputs as for `decode_regions` (model-input frame). `multimask=None` decodes SAM's three candidates
    for the one-click regions and keeps the one the IoU head rates best; True / False force it for all.
    """
    logits, iou = decode_regions(model, image_embeddings, points, labels, mask_inputs,
                                 multimask_output="auto" if multimask is None else multimask)
    best = iou.argmax(-1, keepdim=True)
    chosen = torch.take_along_dim(logits, best[..., None, None], dim=2)[:, :, 0]
    return chosen, torch.take_along_dim(iou, best, -1)[..., 0]


def _is_number(value) -> bool:
    """A real number, not a bool (JSON `true` would otherwise read as 1) nor a numeric string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _all_numbers(value) -> bool:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
    if isinstance(value, (list, tuple)):
        return all(_all_numbers(item) for item in value)
    return _is_number(value)


def _numbers(value, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64) if _all_numbers(value) else None
    if array is None or array.ndim != len(shape) or array.shape[-1] != shape[-1] or not np.isfinite(array).all():
        raise ValueError(f"{where}: {what} must be {'[[x, y], ...]' if len(shape) == 2 else '[x0, y0, x1, y1]'} "
                         f"(finite numbers, not true/false or strings), got {value!r}")
    return array


def parse_prompt(spec: Mapping, image_hw: tuple[int, int], where: str,
                 refining: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """{"box": [x0, y0, x1, y1]} and/or {"points": [[x, y], ...], "labels": [1 | 0, ...]} -> SAM tokens.

    Returns points (P, 2) float32 (x, y) and labels (P,) int64 (clicks, then the box corners) in the
    image's pixel frame. Anything malformed or outside the (H, W) image raises a ValueError that starts
    with `where` (e.g. "organ 'liver' on slice 12"), and so does a prompt that does not say where the organ
    is: a box of zero width or height, or negative clicks alone (allowed only when `refining` a previous
    mask, which says where the organ is).
    """
    if not isinstance(spec, Mapping) or not ({"box", "points"} & set(spec)) or set(spec) - set(PROMPT_KEYS):
        raise ValueError(f"{where}: a prompt is {{'box': [x0, y0, x1, y1]}} and/or {{'points': [[x, y], ...], "
                         f"'labels': [1 or 0, ...]}}, got {spec!r}")
    if ("points" in spec) != ("labels" in spec):
        raise ValueError(f"{where}: 'points' and 'labels' (1 positive, 0 negative, one per point) go together")
    points, labels = np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    if "points" in spec:
        points = _numbers(spec["points"], (-1, 2), "points", where)
        labels = np.asarray(spec["labels"]) if _all_numbers(spec["labels"]) else None
        if (points.shape[0] == 0 or labels is None or labels.shape != (len(points),)
                or not np.isin(labels, (POSITIVE, NEGATIVE)).all()):
            raise ValueError(f"{where}: give at least one point and one label per point, each 1 (positive) or 0 "
                             f"(negative); got {len(points)} points and labels {spec['labels']!r}")
    if "box" in spec:
        box = _numbers(spec["box"], (4,), "box", where)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{where}: box {spec['box']} must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1 (a box "
                             "of zero width or height holds no organ)")
        points = np.concatenate([points, box.reshape(2, 2)])
        labels = np.concatenate([labels, [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]])
    elif not refining and not (labels == POSITIVE).any():
        raise ValueError(f"{where}: negative clicks alone say only where the organ is not; add a positive click "
                         "(label 1) on the organ or a box")
    h, w = image_hw
    outside = (points < 0).any(1) | (points[:, 0] > w - 1) | (points[:, 1] > h - 1)
    if outside.any():
        raise ValueError(f"{where}: coordinates {points[outside].tolist()} lie outside the {w}x{h} image "
                         f"(x in [0, {w - 1}], y in [0, {h - 1}])")
    return points.astype(np.float32), labels.astype(np.int64)


class MultiOrganPredictor:
    """Interactive multi-organ segmentation of one image at a time (see the module docstring).

    >>> predictor = MultiOrganPredictor(model)
    >>> predictor.set_image(ct_slice)  # (H, W) or (H, W, 3) uint8; the encoder runs here, once
    >>> predictor.set_image(hu_slice, window="abdomen")  # or CT in Hounsfield units
    >>> out = predictor.predict({"liver": {"box": [20, 30, 80, 90]}, "spleen": {"points": [[95, 60]], "labels": [1]}})
    >>> out = predictor.predict({"spleen": {"points": [[95, 60], [99, 70]], "labels": [1, 0]}},
    ...                         mask_inputs={"spleen": out["spleen"].low_res_logits})  # refine with a click
    """

    def __init__(self, model, processor: SamInputProcessor | None = None):
        self.model = model.eval()
        self.processor = processor or processor_for(model)
        self.embeddings: torch.Tensor | None = None
        self.original_hw: tuple[int, int] | None = None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray | torch.Tensor, window: Window | str | Sequence[float] | None = None) -> None:
        """Compute and keep the image embedding; every `predict` until the next `set_image` reuses it.

        image: uint8 (H, W) / (H, W, 3), or (H, W) Hounsfield units with `window` (see `display_image`).
        """
        image = display_image(image, window)
        parameter = next(self.model.parameters())
        pixels = self.processor.preprocess(image)[None].to(parameter.device, parameter.dtype)
        self.embeddings = encode_images(self.model, pixels)
        self.original_hw = tuple(image.shape[:2])

    @torch.inference_mode()
    def predict(
        self,
        prompts: Mapping[str, Mapping],
        mask_inputs: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        multimask: bool | None = None,
    ) -> dict[str, Prediction]:
        """organ -> prompt (see `parse_prompt`) -> organ -> `Prediction`, as numpy on the CPU whatever the model's
        device. `mask_inputs`: organ -> its previous `low_res_logits` (refinement). `multimask`: force SAM's
        multimask choice on or off (default: on exactly for one-click prompts)."""
        if self.embeddings is None:
            raise RuntimeError("call set_image(image) before predict")
        if not prompts:
            raise ValueError("prompts must name at least one organ")
        mask_inputs = dict(mask_inputs or {})
        if set(mask_inputs) - set(prompts):
            raise ValueError(f"mask_inputs for {sorted(set(mask_inputs) - set(prompts))} have no prompt")
        tokens = {organ: parse_prompt(spec, self.original_hw, f"organ {organ!r}", refining=organ in mask_inputs)
                  for organ, spec in prompts.items()}
        out = {}
        for organs in ([o for o in prompts if o in mask_inputs], [o for o in prompts if o not in mask_inputs]):
            if organs:  # a mask prompt is all or nothing within one decoder call
                out.update(self._decode(organs, [tokens[o] for o in organs], mask_inputs, multimask))
        return {organ: out[organ] for organ in prompts}

    def _decode(self, organs: list[str], tokens: list, mask_inputs: dict, multimask: bool | None) -> dict:
        device = self.embeddings.device
        points, labels = stack_prompts(tokens)
        points = self.processor.transform_coords(points, self.original_hw)[None].to(device)
        labels = labels[None].to(device)
        masks = None
        if organs[0] in mask_inputs:
            side = 4 * self.embeddings.shape[-1]  # the decoder's low-res output side
            masks = [torch.as_tensor(mask_inputs[organ]) for organ in organs]
            wrong = [organ for organ, mask in zip(organs, masks) if mask.shape != (side, side)]
            if wrong:
                raise ValueError(f"mask_inputs for {wrong} must be ({side}, {side}) low-res logits from predict")
            masks = torch.stack(masks)[None].to(device, self.embeddings.dtype)
        logits, scores = decode_prompts(self.model, self.embeddings, points, labels, masks, multimask)
        full = (self.processor.postprocess_masks(logits[0], self.original_hw) > 0).cpu().numpy()
        low_res = logits[0].float().cpu().numpy()
        return {organ: Prediction(full[i], float(scores[0, i]), low_res[i]) for i, organ in enumerate(organs)}
