"""The trainer: config errors, an end-to-end run, resume after a kill, 2-process accelerate, Hub push."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import SamModel

from sam_peft.data import phantom_cases, prepare_volumes
from sam_peft.models import load_adapter
from sam_peft.training import TrainConfig, push_to_hub, train
from sam_peft.training.cli import parse_overrides
from test_models import tiny_sam_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random SAM saved as an HF directory, and a small prepared phantom dataset on disk."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(root / "tiny_sam")
    prepare_volumes(phantom_cases(4, seed=1, shape=(8, 64, 64), spacing=(3.0, 2.5, 2.5)), output=root / "data",
                    label_map="flare22", val_fraction=0.25, seed=0, min_pixels=20)
    return root


def _config(setup, out, **kw) -> dict:
    values = dict(model=str(setup / "tiny_sam"), data=str(setup / "data"), epochs=4, batch_size=4, rounds=2,
                  max_regions=3, lr=1e-3, log_with=None, output_dir=str(out), cache_dir=str(setup / "cache"),
                  eval_behaviours=["tight_box", "center_click"], checkpoint_every=0, num_workers=0)
    values.update(kw)
    return values


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'batchsize' \(did you mean 'batch_size'"):
        TrainConfig.from_dict({"batchsize": 4})
    with pytest.raises(ValueError, match="leaves 0 epoch"):
        TrainConfig.from_dict({"pruning": "cbdp", "epochs": 1})
    with pytest.raises(ValueError, match="prune_budget must be one of"):
        TrainConfig.from_dict({"prune_budget": "all"})
    with pytest.raises(ValueError, match="frozen_encoder"):
        TrainConfig.from_dict({"lora_preset": "encoder+decoder", "frozen_encoder": True})
    config = TrainConfig.from_dict(parse_overrides(["--lr", "1e-4", "--frozen-encoder", "false", "--lora-preset",
                                                    "encoder", "--behaviours", "{tight_box: 1}"]))
    assert (config.lr, config.frozen_encoder, config.behaviours) == (1e-4, False, {"tight_box": 1})
    with pytest.raises(ValueError, match="'lr': expected a number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="'epochs': expected a number, got True"):
        TrainConfig.from_dict(parse_overrides(["--epochs"]))


def test_train_end_to_end_writes_adapter_card_and_metrics(setup, tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig.from_dict(_config(setup, out, pruning="cbdp", prune_ratio=0.5, prune_budget="dataset")))
    assert result["steps"] > 0 and result["epochs"] == 4
    assert 0 <= result["final"]["dice"]["tight_box"]["mean"] <= 1
    for name in ("config.yaml", "metrics.json", "adapter/adapter_config.json", "adapter/sam_peft.json",
                 "adapter/README.md", "best_adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    card = (out / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "tight_box" in card
    info = json.loads((out / "adapter" / "sam_peft.json").read_text())
    assert info["organ_names"] and info["base"] == str(setup / "tiny_sam")
    model = load_adapter(out / "adapter")
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert len(result["history"]) == 4 and all(0 <= h["val_dice"] <= 1 for h in result["history"])
    # the CBDP sampler pruned at most half of the samples once they were scored (epoch 0 only scores them;
    # all 4 epochs lie before the anneal point 0.875 * 4)
    assert result["history"][0]["kept_fraction"] == 1
    assert all(0.5 <= h["kept_fraction"] < 1 for h in result["history"][1:])

    with pytest.raises(FileExistsError, match="holds another run"):
        train(TrainConfig.from_dict(_config(setup, out)))


def _adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_adapter(setup, tmp_path):
    settings = _config(setup, tmp_path / "x", pruning="cbdp", epochs=3, checkpoint_every=1, eval_every=3)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}

    def launch(out: Path, *extra: str) -> subprocess.Popen:
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
        return subprocess.Popen([sys.executable, "-m", "sam_peft.cli", "train", "--config",
                                 str(tmp_path / f"{out.name}.yaml"), *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    assert launch(tmp_path / "full").wait(timeout=300) == 0
    proc = launch(tmp_path / "killed")
    marker = tmp_path / "killed" / "checkpoints" / "step-0000003" / "done"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists()  # it really died before the end
    resumed = launch(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]

    full, again = _adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "killed")
    assert full.keys() == again.keys()
    for key in full:
        assert torch.allclose(full[key], again[key], atol=1e-6), key


@pytest.mark.slow
def test_two_process_accelerate_launch(setup, tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(_config(setup, out, epochs=2, pruning="none")))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "sam_peft.cli", "train", "--config", str(tmp_path / "ddp.yaml")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and (out / "adapter" / "adapter_model.safetensors").exists()


class _LocalHub:
    """Stands in for the network calls of `HfApi` only: the upload lands in a local folder."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, private=False, exist_ok=True):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


def test_push_to_hub_uploads_a_loadable_adapter(setup, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig.from_dict(_config(setup, out, epochs=1, pruning="none")))
    hub = _LocalHub(tmp_path / "hub")
    assert push_to_hub(out, "me/sam-adapter", api=hub) == "local://me/sam-adapter"
    pushed = tmp_path / "hub" / "me" / "sam-adapter"
    front = (pushed / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["library_name"] == "peft"
    assert load_adapter(pushed) is not None
    with pytest.raises(FileNotFoundError, match="not a finished sam_peft run"):
        push_to_hub(tmp_path, "me/x", api=hub)
