"""Sharing adapters on the Hugging Face Hub: a model card and `push_to_hub` for a run directory."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..io import atomic_path
from ..models.lora import SAM_PEFT_FILE

_CARD = """---
{front_matter}---

# {title}

LoRA adapter for interactive multi-organ segmentation with SAM, trained with
[sam_peft](https://pypi.org/project/sam_peft/) (PHPG prompts + CBDP pruning).

- **Base model:** `{base}`
- **Adapter:** LoRA r={r}, preset `{preset}`{heads}
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

model = sam_peft.load_adapter("{repo}")  # rebuilds the base and attaches the adapter
predictor = sam_peft.MultiOrganPredictor(model)
predictor.set_image(ct_slice_uint8)
masks = predictor.predict({{"liver": {{"box": [x0, y0, x1, y1]}}}})
```

Inputs are axial CT slices windowed as at training (see `sam_peft.json`), in radiological orientation.
"""


def write_model_card(adapter_dir: str | Path, info: dict, config) -> Path:
    """README.md with Hub metadata (`library_name: peft`, `base_model`, tags) beside the adapter weights."""
    adapter_dir = Path(adapter_dir)
    base = json.loads((adapter_dir / SAM_PEFT_FILE).read_text()).get("base", config.model)
    front = {"library_name": "peft", "base_model": base if "/" in str(base) and not Path(str(base)).exists() else None,
             "tags": ["sam", "lora", "medical-imaging", "segmentation", "sam_peft", "interactive-segmentation"],
             "pipeline_tag": "mask-generation", "license": "apache-2.0"}
    front = {k: v for k, v in front.items() if v is not None}
    metrics = info.get("metrics") or {}
    card = _CARD.format(
        front_matter=yaml.safe_dump(front, sort_keys=False),
        title=f"sam_peft adapter for {base}",
        base=base, r=config.lora_r, preset=config.lora_preset,
        heads=f", heads trained in full: {', '.join(config.train_heads)}" if config.train_heads else "",
        data=info.get("data", "unknown"), n_organs=len(info.get("organ_names", [])),
        organs=", ".join(info.get("organ_names", [])), rounds=config.rounds,
        behaviours=config.behaviours or "all, equal weights", pruning=config.pruning,
        prune_ratio=config.prune_ratio, anneal=config.anneal,
        metrics="\n".join(f"| {b} | {d:.4f} |" for b, d in metrics.items()) or "| (not evaluated) | |",
        repo=adapter_dir.name,
    )
    with atomic_path(adapter_dir / "README.md") as tmp:
        tmp.write_text(card)
    return adapter_dir / "README.md"


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                api=None) -> str:
    """Upload a run's adapter (weights, sam_peft.json, model card) to `repo_id`; returns the repo URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    missing = [f for f in ("adapter_config.json", SAM_PEFT_FILE, "README.md") if not (adapter / f).exists()]
    if missing:
        raise FileNotFoundError(f"{adapter}: not a finished sam_peft run or adapter (missing {', '.join(missing)})")
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(adapter), repo_id=repo_id, commit_message="Upload sam_peft adapter")
    return str(url)
