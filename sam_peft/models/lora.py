"""LoRA adapters on a SamModel through `peft`, with presets and base-aware save/load.

An adapter directory holds peft's files plus `sam_peft.json`, which records what the adapter needs on any
machine: the base by a portable name (`litemedsam`, a Hub id, or the bare name of a local checkpoint file
or directory, never its path), the fingerprint of the base's weights, and the preprocessing it was trained
with. `load_adapter` rebuilds base + adapter in one call where the base can be found by that name, asks for
`base=` where it cannot, and refuses a base whose weights differ.

Adapters bundled with the package (`BUNDLED_ADAPTERS`, files under `sam_peft/adapters/<name>/`) load by
name with no network: `load_adapter("litemedsam-phpg")`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import SamModel

from .loading import check_safetensors, hf_image_processor, load_base_model, looks_like_hub_id, processor_for, read_json
from .options import HEADS, PRESETS
from .processor import SamInputProcessor

SAM_PEFT_FILE = "sam_peft.json"
BOX_PROMPT_ROUTES = ("adapter", "base")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapters shipped as package data: name -> the base they were trained on.
BUNDLED_ADAPTERS = {"litemedsam-phpg": "litemedsam"}
ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"


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
    base_name, base_kind = getattr(model, "sam_peft_base", (None, None))  # set by load_base_model
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=[name for h in train_heads for name in HEADS[h]] or None,
    )
    fingerprint = base_fingerprint(model)
    processor = processor_for(model)
    with _peft_wrapping():
        peft_model = get_peft_model(model, config)
    config.base_model_name_or_path = base_name  # peft takes the local path from the model; adapters travel
    peft_model.sam_peft_info = {"base": base_name, "base_kind": base_kind, "base_fingerprint": fingerprint,
                                "preprocessing": processor.to_dict(),
                                "preset": preset if target_modules == PRESETS.get(preset) else "custom",
                                "train_heads": list(train_heads)}
    if verbose:
        peft_model.print_trainable_parameters()
    return peft_model


@contextlib.contextmanager
def _peft_wrapping():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning
    for peft's authors that a user of sam_peft can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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


def portable(value):
    """An absolute local path is recorded by its last part (e.g. the training data's folder name): adapters
    travel, and a path of the machine they were trained on means nothing elsewhere."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def save_adapter(model: PeftModel, output_dir: str | Path, **extra_info) -> Path:
    """`save_pretrained` + `sam_peft.json` (`extra_info` added, see `portable`) + preprocessor_config.json
    where SamProcessor can express the preprocessing, written to a temporary directory and renamed into place."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    model.save_pretrained(tmp, save_embedding_layers=False)  # SAM has no vocabulary: no base lookup
    info = {**getattr(model, "sam_peft_info", {}), **{key: portable(value) for key, value in extra_info.items()}}
    (tmp / SAM_PEFT_FILE).write_text(json.dumps(info, indent=2))
    image_processor = hf_image_processor(info.get("preprocessing"))
    if image_processor is not None:  # `SamProcessor.from_pretrained(adapter_dir)` for plain transformers users
        image_processor.save_pretrained(tmp)
    if output_dir.exists():
        old = output_dir.with_name(output_dir.name + ".old")
        os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output_dir)
    return output_dir


def load_adapter(path_or_id: str | Path, base: SamModel | None = None, is_trainable: bool = False,
                 box_prompts: str | None = None) -> PeftModel:
    """Rebuild base + adapter from a bundled adapter's name, an adapter directory or a Hub id.

    `box_prompts`: `"adapter"` answers every prompt through the adapter; `"base"` answers box-only prompts
    (a box, no click) through the base with the adapter switched off, at inference (`decode_regions`);
    `None` takes the adapter's recorded choice (`box_prompts` in its sam_peft.json, else `"adapter"`).

    Without `base`, the recorded base is loaded when it can be found by its name (`litemedsam`, a Hub id);
    a base that was a local file or directory must be given (`base=load_base_model(path)`). Either way a
    base whose weights differ from the recorded fingerprint is refused, and the adapter's recorded
    preprocessing becomes the model's (`processor_for`).
    """
    adapter_dir = _resolve_adapter(path_or_id)
    info_file = adapter_dir / SAM_PEFT_FILE
    info = read_json(info_file, "sam_peft adapter record") if info_file.exists() else {}
    adapter_config = read_json(adapter_dir / "adapter_config.json", "peft adapter config")
    box_prompts = _box_prompt_route(box_prompts, info, info_file, adapter_config)
    if (adapter_dir / ADAPTER_WEIGHTS).exists():
        check_safetensors(adapter_dir / ADAPTER_WEIGHTS, "adapter weights file")
    processor = (SamInputProcessor.from_dict(info["preprocessing"], source=f"{info_file}: preprocessing")
                 if "preprocessing" in info else None)
    if base is None:
        base = _recorded_base(adapter_dir, info, adapter_config)
    expected = info.get("base_fingerprint")
    if expected and base_fingerprint(base) != expected:
        raise ValueError(
            f"{adapter_dir}: adapter was made for base {info.get('base')!r} (weights fingerprint {expected}), but "
            f"the given base {getattr(base, 'name_or_path', '?')!r} has different weights (fingerprint "
            f"{base_fingerprint(base)}): load the base it was trained on (--model / base=)"
        )
    size = base.config.prompt_encoder_config.image_size
    if processor is not None and processor.image_size != size:
        raise ValueError(f"{info_file}: the recorded preprocessing resizes to {processor.image_size} pixels, but the "
                         f"base takes {size}")
    try:
        with _peft_wrapping():
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    except RuntimeError as err:  # shape mismatches from load_state_dict
        raise ValueError(f"{adapter_dir}: adapter does not fit base {getattr(base, 'name_or_path', '?')!r}: {err}") from err
    if processor is not None:
        model.get_base_model().sam_peft_processor = processor
    model.sam_peft_info = info
    model.sam_peft_box_prompts = box_prompts
    model.sam_peft_adapter = str(path_or_id)  # what evaluate records as the adapter it scored
    return model.eval()


def _box_prompt_route(choice: str | None, info: dict, info_file: Path, adapter_config: dict) -> str:
    """The checked `box_prompts` route: the caller's choice, else the adapter's recorded one, else "adapter"."""
    source = "box_prompts" if choice is not None else f"{info_file}: box_prompts"
    choice = choice if choice is not None else info.get("box_prompts", "adapter")
    if choice not in BOX_PROMPT_ROUTES:
        raise ValueError(f"{source} must be one of {', '.join(BOX_PROMPT_ROUTES)}, got {choice!r}")
    if choice == "base" and "vision_encoder" in str(adapter_config.get("target_modules")):
        raise ValueError(f"{source}: 'base' answers boxes from the base's image embeddings, but this adapter "
                         "changes the image encoder; use 'adapter'")
    return choice


def _recorded_base(adapter_dir: Path, info: dict, adapter_config: dict) -> SamModel:
    """Load the base the adapter records, when a name can find it on this machine."""
    name = info.get("base") or adapter_config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter_dir}: the adapter records no base model; pass base=load_base_model(...)")
    kind = info.get("base_kind") or ("builtin" if name == "litemedsam" else "hub" if looks_like_hub_id(name) else "file")
    if kind not in ("builtin", "hub"):
        raise ValueError(
            f"{adapter_dir}: the adapter was trained on the local {kind} {Path(name).name!r} (weights fingerprint "
            f"{info.get('base_fingerprint', 'not recorded')}), which does not travel with it: pass "
            f"base=sam_peft.load_base_model('<path to {Path(name).name}>') (command line: --model <path>)"
        )
    return load_base_model(name)


def bundled_adapter_dir(name: str) -> Path:
    """Where a bundled adapter's files are installed (they may be absent, e.g. in a source checkout)."""
    return ADAPTERS_DIR / name


def default_adapter_for(model_name: str) -> str | None:
    """The bundled adapter to use by default with base `model_name` ("litemedsam" -> "litemedsam-phpg"),
    or None when there is none or its files are not installed."""
    for name, base in BUNDLED_ADAPTERS.items():
        if str(model_name).lower() == base and _missing_files(bundled_adapter_dir(name)) == []:
            return name
    return None


def _missing_files(adapter_dir: Path) -> list[str]:
    return [f for f in ("adapter_config.json", ADAPTER_WEIGHTS, SAM_PEFT_FILE) if not (adapter_dir / f).is_file()]


def _resolve_adapter(path_or_id: str | Path) -> Path:
    """Bundled name, then local directory, then Hub id."""
    if str(path_or_id) in BUNDLED_ADAPTERS:
        adapter_dir = bundled_adapter_dir(str(path_or_id))
        missing = _missing_files(adapter_dir)
        if missing:
            raise FileNotFoundError(
                f"bundled adapter {str(path_or_id)!r}: {', '.join(missing)} missing from {adapter_dir}; the "
                "installation is incomplete: reinstall sam_peft (pip install --force-reinstall sam_peft)"
            )
        return adapter_dir
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path}: no adapter_config.json: not a peft adapter directory")
        return path
    if path.exists():
        raise ValueError(f"{path}: an adapter is a directory (from save_pretrained), not a file")
    if not looks_like_hub_id(str(path_or_id)):
        raise FileNotFoundError(
            f"adapter {str(path_or_id)!r}: not a bundled adapter ({', '.join(BUNDLED_ADAPTERS)}), not an existing "
            "directory, and not a Hub id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id)))
    except Exception as err:  # network, authentication, offline cache miss: all end the same way for the user
        raise FileNotFoundError(f"adapter {path_or_id!r}: not a local directory and not downloadable ({err})") from err
