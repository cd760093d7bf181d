"""Sharing adapters on the Hugging Face Hub: a model card and `push_to_hub` for a run directory.

The card is rendered from the adapter's `sam_peft.json` alone (the trainer records the recipe there), so
`push_to_hub` can write it again with the repository id users will load it by.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..io import atomic_path
from ..models.loading import read_json
from ..models.lora import SAM_PEFT_FILE, portable

_CARD = """---
{front_matter}---

# {title}

LoRA adapter for interactive multi-organ segmentation with SAM, trained with
[sam_peft](https://pypi.org/project/sam_peft/) (PHPG prompts + CBDP pruning).

- **Base model:** `{base}`{base_note}
- **Adapter:** LoRA r={r}, preset `{preset}`{heads}
- **Preprocessing:** {preprocessing}
- **Training data:** {data}
- **Organs ({n_organs}):** {organs}
- **PHPG:** {rounds} refinement rounds, behaviours: {behaviours}
- **CBDP:** strategy `{pruning}`, prune ratio {prune_ratio}, anneal {anneal}

## Validation Dice (simulated users)

| behaviour | Dice |
|---|---|
{metrics}

## Usage

```python
import sam_peft

{load_line}
predictor = sam_peft.MultiOrganPredictor(model)
predictor.set_image(ct_slice_uint8)
masks = predictor.predict({{"liver": {{"box": [x0, y0, x1, y1]}}}})
```

Inputs are axial CT slices windowed as at training (see `sam_peft.json`), in radiological orientation.
"""
# TrainConfig fields the card shows, kept in sam_peft.json under "recipe".
RECIPE_FIELDS = ("lora_r", "lora_preset", "train_heads", "rounds", "behaviours", "pruning", "prune_ratio", "anneal")


def write_model_card(adapter_dir: str | Path, info: dict | None = None, config=None, repo_id: str | None = None) -> Path:
    """README.md with Hub metadata (`library_name: peft`, `base_model`, tags) beside the adapter weights.

    `info` and `config` (a TrainConfig), given at the end of training, are recorded in sam_peft.json first;
    `repo_id` is the Hub repository the usage line loads from (default: the adapter folder itself).
    """
    adapter_dir = Path(adapter_dir)
    record_file = adapter_dir / SAM_PEFT_FILE
    record = read_json(record_file, "sam_peft adapter record")
    if info is not None or config is not None:
        record.update({key: portable(value) for key, value in (info or {}).items()})
        if config is not None:
            record["recipe"] = {name: getattr(config, name) for name in RECIPE_FIELDS}
        with atomic_path(record_file) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    recipe = record.get("recipe") or {}
    base, kind = record.get("base") or "unknown", record.get("base_kind")
    front = {"library_name": "peft", "base_model": base if kind == "hub" else None,
             "tags": ["sam", "lora", "medical-imaging", "segmentation", "sam_peft", "interactive-segmentation"],
             "pipeline_tag": "mask-generation", "license": "apache-2.0"}
    front = {k: v for k, v in front.items() if v is not None}
    source = repo_id or str(adapter_dir)
    if kind in ("builtin", "hub"):
        load_line = f'model = sam_peft.load_adapter("{source}")  # rebuilds the base and attaches the adapter'
        base_note = ""
    else:  # a local checkpoint does not travel with the adapter: users bring the same file
        load_line = (f'base = sam_peft.load_base_model("path/to/{base}")  # the same weights: the fingerprint is '
                     f'checked\nmodel = sam_peft.load_adapter("{source}", base=base)')
        base_note = f" (a local {kind}; weights fingerprint `{record.get('base_fingerprint')}`)"
    metrics = record.get("metrics") or {}
    heads = recipe.get("train_heads") or record.get("train_heads") or []
    organs = record.get("organ_names", [])
    card = _CARD.format(
        front_matter=yaml.safe_dump(front, sort_keys=False),
        title=f"sam_peft adapter for {base}", base=base, base_note=base_note,
        r=recipe.get("lora_r", "?"), preset=recipe.get("lora_preset", record.get("preset", "?")),
        heads=f", heads trained in full: {', '.join(heads)}" if heads else "",
        preprocessing=_describe(record.get("preprocessing")),
        data=portable(str(record.get("data", "unknown"))), n_organs=len(organs), organs=", ".join(organs),
        rounds=recipe.get("rounds", "?"), behaviours=recipe.get("behaviours") or "all, equal weights",
        pruning=recipe.get("pruning", "?"), prune_ratio=recipe.get("prune_ratio", "?"),
        anneal=recipe.get("anneal", "?"),
        metrics="\n".join(f"| {b} | {d:.4f} |" for b, d in metrics.items()) or "| (not evaluated) | |",
        load_line=load_line,
    )
    with atomic_path(adapter_dir / "README.md") as tmp:
        tmp.write_text(card)
    return adapter_dir / "README.md"


def _describe(preprocessing: dict | None) -> str:
    if not preprocessing:
        return "not recorded (the base's own)"
    p = preprocessing
    stats = f", mean {p['pixel_mean']} / std {p['pixel_std']}" if p.get("normalize") == "mean_std" else ""
    return (f"{p.get('resize')} resize to {p.get('image_size')} ({p.get('resample')}), "
            f"normalisation {p.get('normalize')}{stats}")


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                api=None) -> str:
    """Upload a run's adapter (weights, sam_peft.json, model card for `repo_id`) to `repo_id`; returns the repo URL.

    `api`: anything with `HfApi`'s `create_repo` and `upload_folder` (default: an `HfApi` with `token`).
    """
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    missing = [f for f in ("adapter_config.json", SAM_PEFT_FILE) if not (adapter / f).exists()]
    if missing:
        raise FileNotFoundError(f"{adapter}: not a finished sam_peft run or adapter (missing {', '.join(missing)})")
    write_model_card(adapter, repo_id=repo_id)
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(adapter), repo_id=repo_id, commit_message="Upload sam_peft adapter")
    return str(url)
