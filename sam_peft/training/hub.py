"""Sharing adapters on the Hugging Face Hub: a model card, `export_adapter` (what would be uploaded, into a
folder) and `push_to_hub` for a run directory.

The card is rendered from the adapter's `sam_peft.json` alone (the trainer records the recipe there), so
the exported or uploaded copy carries a card for the repository id users will load it by, while the run's
own files stay as they are.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from ..io import atomic_path
from ..models.loading import hf_image_processor, read_json
from ..models.lora import SAM_PEFT_FILE, portable

CARD_FILE = "README.md"
_CARD = """---
{front_matter}---

# {title}

LoRA adapter for interactive multi-organ segmentation with SAM, trained with
[sam_peft](https://pypi.org/project/sam_peft/) (PHPG prompts + CBDP pruning).

- **Base model:** `{base}`{base_note}
- **Adapter:** LoRA r={r}, preset `{preset}`{heads}
- **Preprocessing:** {preprocessing}
- **Training data:** {data}, label map {label_map}
- **Organs trained on ({n_organs}):** {organs}
- **PHPG:** {rounds} per training step, behaviours: {behaviours}
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
{plain_usage}
Inputs are axial CT slices windowed as at training (see `sam_peft.json`), in radiological orientation.
"""
_PLAIN_PEFT = """
Without sam_peft, with `peft` and `transformers` only:

```python
from peft import PeftModel
from transformers import SamModel, SamProcessor

model = PeftModel.from_pretrained(SamModel.from_pretrained("{base}"), "{source}")
processor = SamProcessor.from_pretrained("{source}")  # the preprocessing it was trained with
```
"""
_NEEDS_SAM_PEFT = """
This adapter needs sam_peft (`pip install sam_peft`): its base {why}, which plain `peft` / `transformers`
cannot rebuild.
"""
# TrainConfig fields the card shows, kept in sam_peft.json under "recipe".
RECIPE_FIELDS = ("lora_r", "lora_preset", "train_heads", "rounds", "behaviours", "pruning", "prune_ratio", "anneal")


def rounds_text(rounds) -> str:
    """One definition everywhere: round 1 is the first prompt, each further round adds error-guided clicks."""
    if not isinstance(rounds, int):
        return "? rounds"
    clicks = rounds - 1
    return (f"{rounds} round{'s' * (rounds != 1)} (the first prompt + {clicks} round{'s' * (clicks != 1)} of "
            "error-guided clicks)")


def write_model_card(adapter_dir: str | Path, info: dict | None = None, config=None, repo_id: str | None = None) -> Path:
    """README.md with Hub metadata (`library_name: peft`, `base_model`, tags) beside the adapter weights.

    `info` and `config` (a TrainConfig), given at the end of training, are recorded in sam_peft.json first
    (with the organs the training split holds); `repo_id` is the Hub repository the usage lines load from
    (default: the adapter folder itself).
    """
    adapter_dir = Path(adapter_dir)
    record_file = adapter_dir / SAM_PEFT_FILE
    record = read_json(record_file, "sam_peft adapter record")
    if info is not None or config is not None:
        record.update({key: portable(value) for key, value in (info or {}).items()})
        if config is not None:
            record["recipe"] = {name: getattr(config, name) for name in RECIPE_FIELDS}
            trained = _trained_organs(config, record.get("organ_names") or [])
            if trained is not None:
                record["trained_organs"] = trained
        with atomic_path(record_file) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    with atomic_path(adapter_dir / CARD_FILE) as tmp:
        tmp.write_text(model_card(record, repo_id or str(adapter_dir)))
    return adapter_dir / CARD_FILE


def _trained_organs(config, organ_names: list[str]) -> list[str] | None:
    """The label-map organs that occur in the training split (a label map may name many more), in its order."""
    if not config.data:
        return None
    from ..data.prepare import load_prepared

    splits = load_prepared(config.data)
    if config.train_split not in splits:
        return None
    present = {organ for organs in splits[config.train_split]["organs"] for organ in organs}
    return [name for name in organ_names if name in present]


def model_card(record: dict, source: str) -> str:
    """The card text for an adapter record (sam_peft.json), loaded from `source` (a Hub id or a folder)."""
    recipe = record.get("recipe") or {}
    base, kind = record.get("base") or "unknown", record.get("base_kind")
    front = {"library_name": "peft", "base_model": base if kind == "hub" else None,
             "tags": ["sam", "lora", "medical-imaging", "segmentation", "sam_peft", "interactive-segmentation"],
             "pipeline_tag": "mask-generation", "license": "apache-2.0"}
    front = {k: v for k, v in front.items() if v is not None}
    if kind in ("builtin", "hub"):
        load_line = f'model = sam_peft.load_adapter("{source}")  # rebuilds the base and attaches the adapter'
        base_note = ""
    else:  # a local checkpoint does not travel with the adapter: users bring the same file
        load_line = (f'base = sam_peft.load_base_model("path/to/{base}")  # the same weights: the fingerprint is '
                     f'checked\nmodel = sam_peft.load_adapter("{source}", base=base)')
        base_note = f" (a local {kind}; weights fingerprint `{record.get('base_fingerprint')}`)"
    if kind == "hub" and hf_image_processor(record.get("preprocessing")) is not None:
        plain_usage = _PLAIN_PEFT.format(base=base, source=source)
    else:
        why = ("is the LiteMedSAM model built into sam_peft" if kind == "builtin"
               else f"is a local {kind}" if kind not in (None, "hub") else "has a preprocessing SamProcessor cannot express")
        plain_usage = _NEEDS_SAM_PEFT.format(why=why)
    metrics = record.get("metrics") or {}
    heads = recipe.get("train_heads") or record.get("train_heads") or []
    organs = record.get("trained_organs") or record.get("organ_names", [])
    label_map = record.get("label_map") or {}
    n_map = len(label_map.get("organ_names") or record.get("organ_names") or [])
    return _CARD.format(
        front_matter=yaml.safe_dump(front, sort_keys=False),
        title=f"sam_peft adapter for {base}", base=base, base_note=base_note,
        r=recipe.get("lora_r", "?"), preset=recipe.get("lora_preset", record.get("preset", "?")),
        heads=f", heads trained in full: {', '.join(heads)}" if heads else "",
        preprocessing=_describe(record.get("preprocessing")),
        data=record.get("data", "unknown"), label_map=f"`{label_map.get('name', 'unknown')}` ({n_map} structures)",
        n_organs=len(organs), organs=", ".join(organs),
        rounds=rounds_text(recipe.get("rounds")), behaviours=recipe.get("behaviours") or "all, equal weights",
        pruning=recipe.get("pruning", "?"), prune_ratio=recipe.get("prune_ratio", "?"),
        anneal=recipe.get("anneal", "?"),
        metrics="\n".join(f"| {b} | {d:.4f} |" for b, d in metrics.items()) or "| (not evaluated) | |",
        load_line=load_line, plain_usage=plain_usage,
    )


def _describe(preprocessing: dict | None) -> str:
    if not preprocessing:
        return "not recorded (the base's own)"
    p = preprocessing
    stats = f", mean {p['pixel_mean']} / std {p['pixel_std']}" if p.get("normalize") == "mean_std" else ""
    return (f"{p.get('resize')} resize to {p.get('image_size')} ({p.get('resample')}), "
            f"normalisation {p.get('normalize')}{stats}")


def _adapter_of(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    missing = [f for f in ("adapter_config.json", SAM_PEFT_FILE) if not (adapter / f).exists()]
    if missing:
        raise FileNotFoundError(f"{adapter}: not a finished sam_peft run or adapter (missing {', '.join(missing)})")
    return adapter


def _stage(adapter: Path, folder: Path, source: str) -> None:
    """Into the new `folder`: the adapter's files, a card whose usage lines load from `source` (the Hub id or
    the final folder) and, where SamProcessor can express the preprocessing, preprocessor_config.json."""
    folder.mkdir(parents=True)
    for file in adapter.iterdir():
        if file.is_file() and file.name != CARD_FILE:
            shutil.copy2(file, folder / file.name)
    record = read_json(adapter / SAM_PEFT_FILE, "sam_peft adapter record")
    (folder / CARD_FILE).write_text(model_card(record, source))
    processor = hf_image_processor(record.get("preprocessing"))
    if processor is not None:
        processor.save_pretrained(folder)


def export_adapter(run_dir: str | Path, folder: str | Path, repo_id: str | None = None) -> Path:
    """Write exactly what `push_to_hub(run_dir, repo_id)` uploads into the new `folder` (no network), e.g. to
    upload later with `hf upload REPO_ID FOLDER`; the run's files are not changed."""
    adapter, folder = _adapter_of(run_dir), Path(folder)
    if repo_id is not None:
        check_repo_id(repo_id)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty: choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _stage(adapter, staging / "export", repo_id or str(folder))
        if folder.exists():
            folder.rmdir()
        os.replace(staging / "export", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rules for a repository id, as a ValueError naming it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repository id {repo_id!r} is not valid: {str(err).splitlines()[0]}") from None


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                api=None) -> str:
    """Upload a run's adapter (weights, sam_peft.json, a model card for `repo_id`, preprocessor_config.json
    where SamProcessor can express the preprocessing) to `repo_id`; returns the repo URL.

    The repository id is checked first and the files are staged in a temporary copy: the run is never
    changed. A Hub that cannot be reached is an OSError in one line (`export_adapter` is the offline path).
    `api`: anything with `HfApi`'s `create_repo` and `upload_folder` (default: an `HfApi` with `token`).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    adapter = _adapter_of(run_dir)
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sam_peft_push_") as scratch:
        staged = Path(scratch) / "adapter"
        _stage(adapter, staged, repo_id)
        offline_hint = f"write the files with `sam-peft push {run_dir} --repo-id {repo_id} --to-folder DIR` " \
                       "and upload that folder later"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(staged), repo_id=repo_id, commit_message="Upload sam_peft adapter")
        except OfflineModeIsEnabled:
            raise OSError(f"HF_HUB_OFFLINE is set, so nothing was uploaded to {repo_id}; {offline_hint}") from None
        except HfHubHTTPError as err:
            raise OSError(f"the Hub refused the upload to {repo_id}: {str(err).splitlines()[0]}") from None
        except _network_errors() as err:
            from huggingface_hub import constants

            raise OSError(f"the Hugging Face Hub cannot be reached at {constants.ENDPOINT} ({type(err).__name__}); "
                          f"nothing was uploaded; {offline_hint}") from None
    return str(url)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx or a fork of it, requests before 1.0)."""
    from huggingface_hub.utils import get_session

    client = importlib.import_module(type(get_session()).__module__.split(".")[0])
    found = [getattr(client, name, None) for name in ("TransportError", "ConnectionError", "Timeout")]
    return (ConnectionError, TimeoutError, *(e for e in found if isinstance(e, type) and issubclass(e, BaseException)))
