"""LoRA adapters on a SamModel through `peft`, with presets and base-aware save/load.

An adapter directory holds peft's files plus `sam_peft.json`, which records the base (built-in name,
Hub id or checkpoint path) and a fingerprint of its weights, so `load_adapter(path)` rebuilds base +
adapter in one call and refuses a base the adapter was not made for.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import SamModel

from .loading import load_base_model

# Module-name regexes (peft matches a string target_modules with re.fullmatch on the full name).
_DECODER = r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)"
_ENCODER = r"vision_encoder\..*attn\.qkv"  # ViT blocks and TinyViT attention alike
PRESETS = {
    "decoder": _DECODER,
    "encoder": _ENCODER,
    "encoder+decoder": f"({_ENCODER})|({_DECODER})",
}
# Small heads trainable in full. Never `prompt_encoder`: wrapping it unties the shared positional embedding.
HEADS = {
    "iou": ["iou_prediction_head"],
    "hypernetworks": [f"output_hypernetworks_mlps.{i}" for i in range(4)],
}
SAM_PEFT_FILE = "sam_peft.json"


def apply_lora(
    model: SamModel,
    preset: str = "encoder+decoder",
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    train_heads: tuple[str, ...] | list[str] = (),
    verbose: bool = True,
) -> PeftModel:
    """Wrap `model` with LoRA adapters; only adapters (and the chosen `train_heads`) stay trainable.

    `preset` picks targets ("decoder", "encoder", "encoder+decoder"); `target_modules` (a regex or a list
    of module-name suffixes, as peft takes them) overrides it for experts. `alpha` defaults to `2 * r`.
    """
    if target_modules is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown LoRA preset {preset!r}; choose one of {sorted(PRESETS)}")
        target_modules = PRESETS[preset]
    unknown = [h for h in train_heads if h not in HEADS]
    if unknown:
        raise ValueError(f"unknown train_heads {unknown}; choose from {sorted(HEADS)}")
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=[name for h in train_heads for name in HEADS[h]] or None,
        base_model_name_or_path=getattr(model, "name_or_path", None),
    )
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(model, config)
    peft_model.sam_peft_info = {"base": config.base_model_name_or_path, "base_fingerprint": fingerprint,
                                "preset": preset if target_modules == PRESETS.get(preset) else "custom",
                                "train_heads": list(train_heads)}
    if verbose:
        peft_model.print_trainable_parameters()
    return peft_model


def base_fingerprint(model: SamModel) -> str:
    """A short hash of the frozen base weights: tells apart bases with identical architectures."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if "lora_" in key or "modules_to_save" in key:
            continue
        tensor = state[key].detach().float().flatten()[:64].cpu().contiguous()
        digest.update(key.removeprefix("base_model.model.").replace(".base_layer", "").encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_adapter(model: PeftModel, output_dir: str | Path, **extra_info) -> Path:
    """`save_pretrained` + `sam_peft.json`, written to a temporary directory and renamed into place."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    model.save_pretrained(tmp)
    info = {**getattr(model, "sam_peft_info", {}), **extra_info}
    (tmp / SAM_PEFT_FILE).write_text(json.dumps(info, indent=2))
    if output_dir.exists():
        old = output_dir.with_name(output_dir.name + ".old")
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)
    return output_dir


def load_adapter(path_or_id: str | Path, base: SamModel | None = None, is_trainable: bool = False) -> PeftModel:
    """Rebuild base + adapter from an adapter directory (or Hub id); `base` skips loading the recorded base."""
    adapter_dir = _resolve_adapter(path_or_id)
    info_file = adapter_dir / SAM_PEFT_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    if base is None:
        recorded = info.get("base") or json.loads((adapter_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not recorded:
            raise ValueError(f"{adapter_dir}: the adapter records no base model; pass base=load_base_model(...)")
        base = load_base_model(recorded)
    expected = info.get("base_fingerprint")
    if expected and base_fingerprint(base) != expected:
        raise ValueError(
            f"{adapter_dir}: adapter was made for base {info.get('base')!r} (fingerprint {expected}), but the "
            f"given base {getattr(base, 'name_or_path', '?')!r} has different weights (fingerprint "
            f"{base_fingerprint(base)})"
        )
    try:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    except RuntimeError as err:  # shape mismatches from load_state_dict
        raise ValueError(f"{adapter_dir}: adapter does not fit base {getattr(base, 'name_or_path', '?')!r}: {err}") from err
    model.sam_peft_info = info
    return model.eval()


def _resolve_adapter(path_or_id: str | Path) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path}: no adapter_config.json: not a peft adapter directory")
        return path
    if path.exists():
        raise ValueError(f"{path}: an adapter is a directory (from save_pretrained), not a file")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as err:
        raise FileNotFoundError(f"adapter {path_or_id!r}: not a local directory and not downloadable ({err})") from err
