"""Adapters shared on the Hub load elsewhere: the card names the repository, nothing recorded is a local path,
and a fresh offline process loads a pushed adapter (and its base) by repository id from another folder."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import SamModel

from sam_peft.data import load_prepared, phantom_cases, prepare_volumes
from sam_peft.models import apply_lora, load_adapter, load_base_model, processor_for, save_adapter
from sam_peft.training import TrainConfig, export_adapter, push_to_hub, train, write_model_card
from test_models import tiny_sam_config


class LocalHub:
    """`HfApi.create_repo` / `upload_folder` writing real files into a folder laid out as the Hugging Face cache
    (`models--owner--name/refs/main` -> `snapshots/<commit>/`): what `from_pretrained` and `snapshot_download`
    read offline, so loading by repository id runs the real code."""

    def __init__(self, root: Path):
        self.root = root

    def repo(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def create_repo(self, repo_id, private=False, exist_ok=True):
        (self.repo(repo_id) / "refs").mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message):
        commit = uuid.uuid4().hex + "00000000"  # 40 hex digits, as a commit id
        shutil.copytree(folder_path, self.repo(repo_id) / "snapshots" / commit)
        (self.repo(repo_id) / "refs" / "main").write_text(commit)

    def snapshot(self, repo_id: str) -> Path:
        return self.repo(repo_id) / "snapshots" / (self.repo(repo_id) / "refs" / "main").read_text()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return dict(pixel_values=torch.rand(1, 3, 128, 128, generator=g), input_boxes=torch.tensor([[[10.0, 20, 90, 100]]]),
                multimask_output=False)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny SAM published on the local hub as me/tiny-sam, an adapter trained on it, and that adapter pushed."""
    root = tmp_path_factory.mktemp("hub")
    hub = LocalHub(root / "hub")
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(root / "tiny-sam")
    hub.create_repo("me/tiny-sam")
    hub.upload_folder(root / "tiny-sam", "me/tiny-sam", "base")
    prepare_volumes(phantom_cases(2, seed=1, shape=(6, 64, 64), spacing=(3.0, 2.5, 2.5)), output=root / "data",
                    label_map="flare22", val_fraction=0.5, seed=0, min_pixels=20)
    run = root / "run"
    train(TrainConfig(model=str(hub.snapshot("me/tiny-sam")), data=str(root / "data"), epochs=1, batch_size=2,
                      rounds=1, max_regions=2, pruning="none", log_with=None, output_dir=str(run),
                      cache_dir=str(root / "cache"), eval_behaviours=["tight_box"], num_workers=0))
    url = push_to_hub(run, "me/ct-adapter", api=hub)
    with torch.no_grad():
        expected = load_adapter(run / "adapter", base=load_base_model(root / "tiny-sam"))(**_inputs()).pred_masks
    return {"root": root, "hub": hub, "run": run, "url": url, "expected": expected}


def test_push_writes_the_card_for_the_repository(published):
    assert published["url"] == "local://me/ct-adapter"
    pushed = published["hub"].snapshot("me/ct-adapter")
    card = (pushed / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and front["base_model"] == "me/tiny-sam"
    assert 'model = sam_peft.load_adapter("me/ct-adapter")' in card and "Preprocessing:** longest_side resize to 128" in card
    assert 'PeftModel.from_pretrained(SamModel.from_pretrained("me/tiny-sam"), "me/ct-adapter")' in card
    assert "**PHPG:** 1 round (the first prompt + 0 rounds of error-guided clicks)" in card
    with pytest.raises(FileNotFoundError, match="not a finished sam_peft run"):
        push_to_hub(published["root"], "me/x", api=published["hub"])
    info = json.loads((pushed / "sam_peft.json").read_text())
    split = load_prepared(published["root"] / "data")["train"]
    trained = sorted({organ for organs in split["organs"] for organ in organs})
    assert sorted(info["trained_organs"]) == trained and len(trained) < len(info["organ_names"]) == 13
    assert f"**Organs trained on ({len(trained)}):** " in card and "label map `flare22` (13 structures)" in card
    assert (info["base"], info["base_kind"]) == ("me/tiny-sam", "hub") and info["recipe"]["rounds"] == 1
    root = str(published["root"])
    for path in pushed.iterdir():  # nothing uploaded names a folder of the machine it was trained on
        if path.suffix in (".json", ".md"):
            assert root not in path.read_text(), path.name


def test_pushed_adapter_loads_by_repo_id_in_a_fresh_offline_process_elsewhere(published, tmp_path):
    elsewhere = tmp_path / "other_machine" / "hf_cache"
    shutil.copytree(published["hub"].root, elsewhere)  # the module's hub stays for the other tests
    torch.save({"inputs": _inputs(), "expected": published["expected"]}, tmp_path / "io.pt")
    torch.manual_seed(7)
    SamModel(tiny_sam_config()).save_pretrained(tmp_path / "other_base")
    script = """
import sys, torch, sam_peft
io = torch.load(sys.argv[1])
model = sam_peft.load_adapter("me/ct-adapter")  # base me/tiny-sam comes from the (offline) Hub cache too
with torch.no_grad():
    print("max difference", float((model(**io["inputs"]).pred_masks - io["expected"]).abs().max()))
try:
    sam_peft.load_adapter("me/ct-adapter", base=sam_peft.load_base_model(sys.argv[2]))
except ValueError as err:
    print("refused:", err)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(elsewhere), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "io.pt"), str(tmp_path / "other_base")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    difference = float(done.stdout.split("max difference")[1].split()[0])
    assert difference < 1e-5
    assert "refused:" in done.stdout and "has different weights" in done.stdout


def test_card_for_a_local_base_says_to_bring_the_same_weights(tmp_path):
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(tmp_path / "my_sam")
    save_adapter(apply_lora(load_base_model(tmp_path / "my_sam"), preset="decoder", r=2, verbose=False),
                 tmp_path / "adapter")
    card = write_model_card(tmp_path / "adapter", {"organ_names": ["liver"]}, TrainConfig(), repo_id="me/x").read_text()
    assert 'base = sam_peft.load_base_model("path/to/my_sam")' in card
    assert 'model = sam_peft.load_adapter("me/x", base=base)' in card
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # the Hub's base_model names Hub models only
    assert "**Organs trained on (1):** liver" in card and "LoRA r=8" in card
    assert "needs sam_peft (`pip install sam_peft`): its base is a local directory" in card


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_export_writes_exactly_what_push_uploads_and_the_run_is_never_changed(published, tmp_path):
    adapter = published["run"] / "adapter"
    before = {name: (data, (adapter / name).stat().st_mtime_ns) for name, data in _files(adapter).items()}
    export_adapter(published["run"], tmp_path / "export", repo_id="me/ct-adapter")
    assert _files(tmp_path / "export") == _files(published["hub"].snapshot("me/ct-adapter"))
    assert {"preprocessor_config.json", "README.md", "adapter_model.safetensors"} <= set(_files(tmp_path / "export"))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_adapter(published["run"], tmp_path / "export", repo_id="me/ct-adapter")
    export_adapter(published["run"], tmp_path / "no_repo")  # the card then loads from that folder
    assert f'sam_peft.load_adapter("{tmp_path / "no_repo"}")' in (tmp_path / "no_repo" / "README.md").read_text()
    with pytest.raises(ValueError, match="repository id 'me/a b' is not valid"):
        export_adapter(published["run"], tmp_path / "export2", repo_id="me/a b")
    assert not (tmp_path / "export2").exists()
    after = {name: (data, (adapter / name).stat().st_mtime_ns) for name, data in _files(adapter).items()}
    assert after == before  # push and export wrote their card into copies


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "sam-peft push: error: HF_HUB_OFFLINE is set, so nothing was uploaded to me/x; write "
                              "the files with `sam-peft push {run} --repo-id me/x --to-folder DIR`"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "sam-peft push: error: the Hugging Face Hub cannot be reached at http://127.0.0.1:9 (ConnectError); nothing "
     "was uploaded"),
])
def test_push_without_a_hub_ends_in_one_line_and_leaves_the_run_alone(published, tmp_path, env, message):
    """The real HfApi against no network (offline mode) and against a closed port; then the offline path."""
    run = tmp_path / "run"
    shutil.copytree(published["run"] / "adapter", run / "adapter")
    before = _files(run / "adapter")
    cli = [sys.executable, "-m", "sam_peft.cli", "push", str(run)]
    environment = {**os.environ, **env, "HF_TOKEN": "hf_not_a_real_token", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cli, "--repo-id", "me/x"], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message.format(run=run))
    bad = subprocess.run([*cli, "--repo-id", "me/bad id"], env=environment, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "sam-peft push: error: repository id 'me/bad id' is not valid")
    export = subprocess.run([*cli, "--repo-id", "me/x", "--to-folder", str(tmp_path / "out")], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert 'sam_peft.load_adapter("me/x")' in (tmp_path / "out" / "README.md").read_text()
    assert _files(run / "adapter") == before


def test_sam_base_adapter_loads_with_plain_peft_and_transformers_without_sam_peft(published, tmp_path):
    """What the card shows a peft user: PeftModel / AutoPeftModel and SamProcessor by repository id, in a fresh
    offline process where `import sam_peft` fails; same masks, same model input as sam_peft's."""
    elsewhere = tmp_path / "hf_cache"
    shutil.copytree(published["hub"].root, elsewhere)
    image = (np.random.default_rng(0).random((90, 128, 3)) * 255).astype(np.uint8)  # an RGB slice render
    model = load_adapter(published["run"] / "adapter", base=load_base_model(published["root"] / "tiny-sam"))
    torch.save({"inputs": _inputs(), "expected": published["expected"], "image": image,
                "pixels": processor_for(model).preprocess(image)}, tmp_path / "io.pt")
    script = """
import sys
sys.modules["sam_peft"] = None  # as on a machine without sam_peft
import torch
from peft import AutoPeftModel, PeftModel
from transformers import SamModel, SamProcessor
io = torch.load(sys.argv[1], weights_only=False)
model = PeftModel.from_pretrained(SamModel.from_pretrained("me/tiny-sam"), "me/ct-adapter").eval()
auto = AutoPeftModel.from_pretrained("me/ct-adapter").eval()
pixels = SamProcessor.from_pretrained("me/ct-adapter")(images=io["image"], return_tensors="pt")["pixel_values"][0]
with torch.no_grad():
    for name, m in (("peft", model), ("auto", auto)):
        print(name, float((m(**io["inputs"]).pred_masks - io["expected"]).abs().max()))
print("pixels", float((pixels - io["pixels"]).abs().max()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(elsewhere), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "io.pt")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    values = dict(line.split() for line in done.stdout.strip().splitlines())
    assert float(values["peft"]) < 1e-5 and float(values["auto"]) < 1e-5
    assert float(values["pixels"]) < 1e-4


def test_litemedsam_adapter_without_sam_peft_fails_naming_sam_peft(tmp_path):
    """A LiteMedSAM base is built into sam_peft: peft's AutoPeftModel must stop (naming the package), not
    load some other base."""
    from sam_peft.models.lora import bundled_adapter_dir

    script = """
import sys
sys.modules["sam_peft"] = None
from peft import AutoPeftModel
for allow in (None, ["sam_peft"]):
    try:
        AutoPeftModel.from_pretrained(sys.argv[1], import_allowlist=allow)
        print("loaded")
    except Exception as err:
        print(type(err).__name__, err)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script, str(bundled_adapter_dir("litemedsam-phpg"))], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and "loaded" not in lines, done.stdout + done.stderr[-2000:]
    assert "wants to import 'sam_peft.models.tinyvit'" in lines[0]
    assert lines[1].startswith("ModuleNotFoundError") and "sam_peft" in lines[1]


@pytest.mark.parametrize("name", ["sam", "medsam", "litemedsam"])
def test_preprocessor_config_is_written_exactly_where_sam_processor_can_express_it(name, tmp_path):
    """SAM's recipe round-trips through preprocessor_config.json; MedSAM's (square spline resize) and
    LiteMedSAM's (INTER_AREA, min-max) have no SamProcessor equivalent, so no file claims them."""
    from sam_peft.models.loading import hf_image_processor
    from sam_peft.models.processor import KNOWN_PREPROCESSING, from_hf_preprocessor_config

    recipe = KNOWN_PREPROCESSING[name]
    image_processor = hf_image_processor(recipe.to_dict())
    assert (image_processor is None) == (name != "sam")
    if image_processor is not None:
        image_processor.save_pretrained(tmp_path)
        assert from_hf_preprocessor_config(tmp_path / "preprocessor_config.json") == recipe
