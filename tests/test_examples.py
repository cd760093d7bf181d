"""The downstream examples (transformers.Trainer, plain accelerate loop) train and write loadable adapters."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accelerate.state import AcceleratorState
from sam_peft.data import load_prepared
from sam_peft.models import load_adapter, load_base_model
from test_train import setup  # noqa: F401 - the tiny SAM and prepared phantom fixture

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_trained_adapter(folder: Path, base_dir: Path) -> None:
    """LoRA B starts at zero: non-zero saved B weights moved, and load_adapter reads them back."""
    saved = {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert saved and all(v.abs().max() > 0 for v in saved.values())
    model = load_adapter(folder, base=load_base_model(base_dir))
    loaded = {n.replace(".default.", "."): p.detach() for n, p in model.named_parameters() if "lora_B" in n}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert model.sam_peft_info["organ_names"] and model.sam_peft_info["data"] == "data"


@pytest.mark.parametrize("name", ["hf_trainer", "accelerate_loop"])
def test_example_writes_a_trained_adapter(setup, tmp_path, name):  # noqa: F811 - setup is the fixture
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        _example(name).main(["--model", str(setup / "tiny_sam"), "--data", str(setup / "data"), "--max-steps", "2",
                             "--batch-size", "2", "--output", str(tmp_path / "out")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    _assert_trained_adapter(tmp_path / "out", setup / "tiny_sam")


@pytest.mark.slow
def test_accelerate_loop_runs_on_two_processes(setup, tmp_path):  # noqa: F811
    """`accelerate launch` with 2 CPU processes (gloo; on GPUs: `accelerate launch --num_processes 2`); the
    Trainer example's PHPGTrainer runs on 2 processes in test_hf_trainer.py."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(EXAMPLES / "accelerate_loop.py"), "--model", str(setup / "tiny_sam"), "--data", str(setup / "data"),
               "--max-steps", "3", "--batch-size", "2", "--output", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    batches = math.ceil(len(load_prepared(setup / "data")["train"]) / 2)
    assert f"epoch 0: {math.ceil(batches / 2)} steps" in done.stdout  # each process takes half of the batches
    _assert_trained_adapter(tmp_path / "out", setup / "tiny_sam")
