"""Image preprocessing and coordinate transforms that match a base model's training input.

Each base was trained on images prepared its own way, and a model fed differently prepared pixels
silently loses Dice, so the recipe comes from the base (`processor_for`), never chosen by hand:

- SAM (`facebook/sam-vit-*`, segment-anything's `ResizeLongestSide` + `Sam.preprocess`): longest side
  resized to 1024 with PIL's bilinear filter (uint8 result), ImageNet mean/std, zero padding to a square;
- MedSAM (`wanglab/medsam-vit-base`, `MedSAM_Inference.py`): the whole image resized to a 1024 square with
  scikit-image's order-3 spline (clipped, truncated to uint8), then min-max scaled to [0, 1]; boxes and
  masks scale by 1024 / W and 1024 / H separately;
- LiteMedSAM (`CVPR24_LiteMedSAM_infer.py` and its training loader): longest side resized to 256 with
  OpenCV's INTER_AREA (uint8 result), min-max scaled to [0, 1], zero padding to a square;
- a Hugging Face directory or Hub model with a `preprocessor_config.json` (`SamImageProcessor`): what it says.

The resampling is reimplemented here (numpy, scipy, PIL) so that neither OpenCV nor scikit-image is needed
at run time; the tests compare every recipe with the reference code itself on a real CT slice.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
LOW_RES = 256  # the mask decoder's output side for every SAM-family model here

RESIZES = ("longest_side", "square")
# PIL filters (the Hugging Face / segment-anything convention), OpenCV's INTER_AREA, scikit-image's order-3 spline.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
RESAMPLES = (*_PIL_FILTERS, "area", "spline3")
NORMALIZES = ("mean_std", "min_max", "rescale")


@dataclass(frozen=True)
class SamInputProcessor:
    """One base's preprocessing recipe and the coordinate transforms it implies; coordinates are (x, y) pixels.

    resize: "longest_side" (aspect kept, zero padding bottom/right) or "square" (each axis scaled on its own).
    resample: a PIL filter name, "area" (OpenCV INTER_AREA) or "spline3" (scikit-image order 3). A uint8
    image stays uint8 after resizing, rounded (PIL, OpenCV) or truncated (scikit-image), as in the references.
    normalize: "mean_std" (`pixel_mean` / `pixel_std`, 0-255 units), "min_max" (each image to [0, 1]) or
    "rescale" (/ 255).
    """

    image_size: int = 1024
    pixel_mean: tuple[float, float, float] | None = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] | None = IMAGENET_STD
    resize: str = "longest_side"
    resample: str = "bilinear"
    normalize: str = "mean_std"

    def __post_init__(self):
        for name, value, allowed in (("resize", self.resize, RESIZES), ("resample", self.resample, RESAMPLES),
                                     ("normalize", self.normalize, NORMALIZES)):
            if value not in allowed:
                raise ValueError(f"preprocessing {name} {value!r}: expected one of {', '.join(allowed)}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"preprocessing image_size must be a positive integer, got {self.image_size!r}")
        stats = (self.pixel_mean, self.pixel_std)
        if self.normalize == "mean_std" and any(s is None or len(s) != 3 for s in stats):
            raise ValueError("preprocessing normalize 'mean_std' needs pixel_mean and pixel_std (3 values each)")
        if self.normalize != "mean_std" and any(s is not None for s in stats):
            raise ValueError(f"preprocessing normalize {self.normalize!r} takes no pixel_mean / pixel_std")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "preprocessing") -> "SamInputProcessor":
        """The inverse of `to_dict` (as recorded in an adapter's sam_peft.json), with errors naming `source`."""
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"{source}: expected a preprocessing record with keys {sorted(known)}, got {values!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    def resized_shape(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the image inside the model input (segment-anything's rounding for the longest side)."""
        if self.resize == "square":
            return self.image_size, self.image_size
        h, w = original_hw
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(H, W) grayscale or (H, W, 1 or 3) image, uint8 (0-255) -> (3, S, S) float32 model input."""
        x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3) or 0 in x.shape:
            raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {x.shape}")
        channels = [x] if x.ndim == 2 else [x[..., c] for c in range(3)]  # grayscale: resize once
        new_h, new_w = self.resized_shape(x.shape[:2])
        resized = torch.from_numpy(np.stack([self._resize(c, (new_h, new_w)) for c in channels])).float()
        if self.normalize == "min_max":  # over the resized image, before padding, as LiteMedSAM and MedSAM do
            low = resized.min()
            resized = (resized - low) / (resized.max() - low).clamp(min=1e-8)
        resized = resized.expand(3, new_h, new_w)
        if self.normalize == "mean_std":
            resized = (resized - torch.tensor(self.pixel_mean).view(3, 1, 1)) / torch.tensor(self.pixel_std).view(3, 1, 1)
        elif self.normalize == "rescale":
            resized = resized / 255.0
        return F.pad(resized, (0, self.image_size - new_w, 0, self.image_size - new_h)).contiguous()

    def _resize(self, channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One (H, W) channel -> `size`; a uint8 channel comes back uint8, as the reference resizers return it."""
        is_uint8 = channel.dtype == np.uint8
        if self.resample == "area":
            return _area_resize(channel, size)
        if self.resample == "spline3":
            out = _spline3_resize(channel.astype(np.float64), size)
            return out.astype(np.uint8) if is_uint8 else out.astype(np.float32)  # clipped to the input range
        from PIL import Image

        pil = Image.fromarray(channel if is_uint8 else channel.astype(np.float32))
        return np.asarray(pil.resize((size[1], size[0]), resample=_PIL_FILTERS[self.resample]))

    def _scale(self, original_hw: tuple[int, int]) -> tuple[float, float]:
        new_h, new_w = self.resized_shape(original_hw)
        return new_w / original_hw[1], new_h / original_hw[0]

    def transform_coords(self, coords: np.ndarray | torch.Tensor, original_hw: tuple[int, int]):
        """(..., 2) (x, y) in the original frame -> the model-input frame."""
        sx, sy = self._scale(original_hw)
        out = coords.clone().float() if isinstance(coords, torch.Tensor) else np.asarray(coords, dtype=np.float32).copy()
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
        return out

    def transform_boxes(self, boxes: np.ndarray | torch.Tensor, original_hw: tuple[int, int]):
        """(..., 4) (x0, y0, x1, y1) in the original frame -> the model-input frame."""
        shape = boxes.shape
        return self.transform_coords(boxes.reshape(*shape[:-1], 2, 2), original_hw).reshape(shape)

    def mask_to_low_res(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., H, W) binary mask(s) in the original frame -> (..., 256, 256) float targets, framed like the image.

        The decoder's 256-side output is the model input at a quarter of its side (padding included), so a
        mask is resized exactly as the image is. Area interpolation keeps thin structures as fractional
        values; the caller thresholds at 0.5.
        """
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
        lead, (h, w) = m.shape[:-2], m.shape[-2:]
        new_h, new_w = (int(side * LOW_RES / self.image_size + 0.5) for side in self.resized_shape((h, w)))
        shrinks = new_h < h or new_w < w
        m = F.interpolate(m.reshape(-1, 1, h, w), size=(new_h, new_w), mode="area" if shrinks else "nearest")
        m = F.pad(m, (0, LOW_RES - new_w, 0, LOW_RES - new_h))
        return m.reshape(*lead, LOW_RES, LOW_RES)

    def postprocess_masks(self, low_res_logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 256, 256) decoder logits -> (..., H, W) logits in the original frame, as the base's reference does.

        Longest side: SAM's postprocessing (up to the input size, crop the padding, down to the original).
        Square: one bilinear resize to the original size (MedSAM's inference code).
        """
        lead = low_res_logits.shape[:-2]
        x = low_res_logits.reshape(-1, 1, *low_res_logits.shape[-2:]).float()
        if self.resize == "longest_side":
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            new_h, new_w = self.resized_shape(original_hw)
            x = x[..., :new_h, :new_w]
        x = F.interpolate(x, size=tuple(original_hw), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *original_hw)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of OpenCV's INTER_AREA along one axis: the share of each output pixel's span
    [i s, (i + 1) s) (s = n_in / n_out) that input pixel j covers. For the uniform scaling of a longest-side
    resize this is what OpenCV computes both when shrinking and when enlarging."""
    scale = n_in / n_out
    start = np.arange(n_out)[:, None] * scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(start + scale, j + 1) - np.maximum(start, j), 0, None)
    return overlap / scale


def _area_resize(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's `cv2.resize(..., interpolation=INTER_AREA)`, bit-exact for uint8 (LiteMedSAM's input).

    Shrinking averages over the area weights and rounds (half up for OpenCV's 2x fast path, to even
    otherwise); enlarging uses OpenCV's fixed-point arithmetic: 11-bit weights, rows combined with the
    vectorised rounding `((w * (row >> 4)) >> 16 + ... + 2) >> 2`.
    """
    (h, w), (new_h, new_w) = channel.shape, size
    wy, wx = _area_matrix(h, new_h), _area_matrix(w, new_w)
    if channel.dtype != np.uint8:
        return (wy @ channel.astype(np.float64) @ wx.T).astype(np.float32)
    if new_h <= h and new_w <= w:
        mean = wy @ channel.astype(np.float64) @ wx.T
        rounded = np.floor(mean + 0.5) if (h, w) == (2 * new_h, 2 * new_w) else np.rint(mean)
        return np.clip(rounded, 0, 255).astype(np.uint8)
    wy, wx = (np.rint(m * 2048).astype(np.int64) for m in (wy, wx))
    rows = (channel.astype(np.int64) @ wx.T) >> 4
    first = (wy != 0).argmax(1)
    second = np.minimum(first + 1, h - 1)
    taps = np.arange(new_h)
    w0, w1 = wy[taps, first], np.where(second > first, wy[taps, second], 0)
    out = ((w0[:, None] * rows[first]) >> 16) + ((w1[:, None] * rows[second]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def _spline3_resize(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """scikit-image's `resize(order=3, anti_aliasing=True, preserve_range=True)` (mode "reflect", clipped to
    the input range), which MedSAM's inference code uses."""
    from scipy import ndimage

    factors = np.divide(channel.shape, size)
    sigma = np.maximum(0, (factors - 1) / 2)
    filtered = ndimage.gaussian_filter(channel, sigma, mode="mirror") if np.any(sigma > 0) else channel
    out = ndimage.zoom(filtered, 1 / factors, order=3, mode="mirror", grid_mode=True)
    return np.clip(out, channel.min(), channel.max())


def from_hf_preprocessor_config(path: str | Path) -> SamInputProcessor:
    """A `SamImageProcessor` `preprocessor_config.json` -> the same recipe (errors name the file)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable preprocessor config ({err}); fix or delete the file") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    longest = (config.get("size") or {}).get("longest_edge")
    pad = config.get("pad_size") or {}
    if not config.get("do_resize", True) or not isinstance(longest, int):
        raise ValueError(f"{path}: sam_peft needs a longest-edge resize (size.longest_edge), got size={config.get('size')!r}")
    if not config.get("do_pad", True) or pad.get("height", longest) != longest or pad.get("width", longest) != longest:
        raise ValueError(f"{path}: sam_peft needs padding to a {longest} square, got do_pad={config.get('do_pad')}, "
                         f"pad_size={pad}")
    resample = {v: k for k, v in _PIL_FILTERS.items()}.get(config.get("resample", 2))
    if resample is None:
        raise ValueError(f"{path}: unknown resample {config.get('resample')!r}; expected a PIL filter number 0-5")
    rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
    if not config.get("do_normalize", True):
        if abs(rescale - 1 / 255) > 1e-9:
            raise ValueError(f"{path}: rescale_factor {rescale} without normalisation is not supported (only 1/255)")
        return SamInputProcessor(image_size=longest, pixel_mean=None, pixel_std=None, resample=resample,
                                 normalize="rescale")
    mean, std = config.get("image_mean"), config.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise ValueError(f"{path}: do_normalize needs image_mean and image_std with 3 values each")
    to_255 = [tuple(round(v / rescale, 6) for v in stats) for stats in (mean, std)]  # 0-255 units
    return SamInputProcessor(image_size=longest, pixel_mean=to_255[0], pixel_std=to_255[1], resample=resample)


SAM_PROCESSOR = SamInputProcessor(image_size=1024)
MEDSAM_PROCESSOR = SamInputProcessor(image_size=1024, pixel_mean=None, pixel_std=None, resize="square",
                                     resample="spline3", normalize="min_max")
LITEMEDSAM_PROCESSOR = SamInputProcessor(image_size=256, pixel_mean=None, pixel_std=None, resample="area",
                                         normalize="min_max")
KNOWN_PREPROCESSING = {"sam": SAM_PROCESSOR, "medsam": MEDSAM_PROCESSOR, "litemedsam": LITEMEDSAM_PROCESSOR}
