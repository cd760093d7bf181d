"""The trainer: config errors, an end-to-end run, resume after a kill, 2-process accelerate, Hub push."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import SamModel

from accelerate.state import AcceleratorState
from datasets import DatasetDict

from sam_peft.data import load_prepared, phantom_cases, prepare_volumes, read_metadata
from sam_peft.models import load_adapter, load_base_model, processor_for
from sam_peft.training import PHPGRecipe, TrainConfig, train
from sam_peft.training.embedding_cache import encode_dataset
from sam_peft.training.recipe import organs_per_sample
from sam_peft.training.cli import parse_train_args
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
        TrainConfig.from_dict({"pruning": "cbdp", "anneal": 0.0})
    with pytest.raises(ValueError, match="prune_budget must be one of"):
        TrainConfig.from_dict({"prune_budget": "all"})
    with pytest.raises(ValueError, match="frozen_encoder"):
        TrainConfig.from_dict({"lora_preset": "encoder+decoder", "frozen_encoder": True})
    config, _ = parse_train_args(["--lr", "1e-4", "--frozen-encoder", "false", "--lora-preset", "encoder",
                                  "--behaviours", "{tight_box: 1}"])
    assert (config.lr, config.frozen_encoder, config.behaviours) == (1e-4, False, {"tight_box": 1})
    with pytest.raises(ValueError, match="lr.*number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})


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
    assert info["organ_names"] and (info["base"], info["base_kind"]) == ("tiny_sam", "directory")
    model = load_adapter(out / "adapter", base=load_base_model(setup / "tiny_sam"))  # a local base is given
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert len(result["history"]) == 4 and all(0 <= h["val_dice"] <= 1 for h in result["history"])
    for record in result["history"]:  # organ-mean Dice: each organ's Dice (mean over behaviours) counts once
        per_organ = record["val_dice_per_organ"]
        organ_dice = {o: np.mean([per_organ[b][o] for b in per_organ]) for o in per_organ["tight_box"]}
        assert record["val_dice"] == pytest.approx(np.mean(list(organ_dice.values())))
        assert record["val_worst_organ"] == min(organ_dice, key=organ_dice.get)
        assert record["val_worst_organ_dice"] == pytest.approx(min(organ_dice.values()))
    assert result["best_val_dice"] == max(h["val_dice"] for h in result["history"])
    # the CBDP sampler kept N - floor(N / 2) of the N = 21 slices (budget "dataset") in every epoch (all lie
    # before the anneal point 0.875 * 4), epoch 0 included: the warm start scored every slice before it
    assert [h["kept_fraction"] for h in result["history"]] == [pytest.approx(11 / 21)] * 4

    with pytest.raises(FileExistsError, match="holds another run"):
        train(TrainConfig.from_dict(_config(setup, out)))


def test_train_reproduces_the_reference_adapter(setup, tmp_path):
    """tests/data/train_reference_adapter.safetensors is the final adapter of this run made by the trainer
    before it was built on `PHPGRecipe` (one process, grad_accum 1, 2 rounds with seeded refinement clicks,
    max_steps 5 of 2 planned epochs of 6 steps): the refactored loop takes the same steps."""
    out = tmp_path / "run"
    train(TrainConfig.from_dict(_config(setup, out, epochs=2, pruning="none", grad_accum=1, max_steps=5)))
    expected = load_file(str(REPO / "tests" / "data" / "train_reference_adapter.safetensors"))
    _assert_same_adapter(expected, _adapter_weights(out), rtol=0, atol=1e-6)


def test_embedding_cache_encodes_on_the_models_device(setup):
    """The meta device stands in for a GPU: with the weights there, the pixels must reach the encoder there too
    (they used to go to a separate device argument, and on a GPU the default run died before its first step)."""
    model = SamModel.from_pretrained(setup / "tiny_sam")
    processor = processor_for(model)
    model.to("meta")
    seen = []
    model.vision_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    with pytest.raises(NotImplementedError, match="meta tensor"):  # meta outputs hold no data to copy back
        encode_dataset(model, load_prepared(setup / "data")["train"].select(range(2)), processor, progress=False)
    assert seen == [torch.device("meta")]


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """accelerate keeps its device choice process-wide: start and leave each device test with none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield monkeypatch
    AcceleratorState._reset_state(reset_partial_state=True)


needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device, frozen", [("cpu", True), pytest.param("cuda", True, marks=needs_cuda),
                                            pytest.param("cuda", False, marks=needs_cuda)])
def test_bf16_training_runs_on_the_accelerator_device(setup, tmp_path, fresh_accelerate, device, frozen):
    """bf16 autocast end to end (cache, steps, validation, adapter), every layer on the accelerator's device."""
    if device == "cpu":
        fresh_accelerate.setenv("ACCELERATE_USE_CPU", "1")
    seen = set()  # (device type, dtype) of every Linear output

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen.add((output.device.type, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        preset = {} if frozen else dict(frozen_encoder=False, lora_preset="encoder+decoder")
        result = train(TrainConfig.from_dict(_config(setup, tmp_path / "run", epochs=1, pruning="none",
                                                     mixed_precision="bf16", max_regions=2, **preset)))
    finally:
        handle.remove()
    assert result["steps"] > 0 and 0 <= result["final"]["dice"]["tight_box"]["mean"] <= 1
    assert {d for d, _ in seen} == {device}
    assert (device, torch.bfloat16) in seen  # autocast really ran the layers in bf16
    weights = _adapter_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(expected: dict, actual: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=key)


def _launch(config: dict, path: Path, processes: int = 1, *extra: str) -> subprocess.Popen:
    """`sam-peft train` in a new session (so a kill reaches every process), on the CPU; under
    `accelerate launch` (gloo) for several processes."""
    path.write_text(yaml.safe_dump(config))
    path_ = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path_}
    head = [sys.executable]
    if processes > 1:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "0"]
    # SIGINT back to its default: a shell's background job (CI, say) starts with it ignored, and the child
    # would inherit that and never see a Ctrl-C
    return subprocess.Popen([*head, "-m", "sam_peft.cli", "train", "--config", str(path), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _finish_ok(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]


def _kill_after(proc: subprocess.Popen, marker: Path) -> None:
    """SIGKILL every process of the run once `marker` exists."""
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_run_resumes_to_the_same_adapter(setup, tmp_path):
    settings = _config(setup, tmp_path / "x", pruning="cbdp", epochs=3, checkpoint_every=1, eval_every=3)
    _finish_ok(_launch({**settings, "output_dir": str(tmp_path / "full")}, tmp_path / "full.yaml"))
    killed = {**settings, "output_dir": str(tmp_path / "killed")}
    _kill_after(_launch(killed, tmp_path / "killed.yaml"), tmp_path / "killed" / "checkpoints" / "step-0000003" / "done")
    assert not (tmp_path / "killed" / "adapter").exists()  # it really died before the end
    _finish_ok(_launch(killed, tmp_path / "killed.yaml", 1, "--resume"))
    _assert_same_adapter(_adapter_weights(tmp_path / "full"), _adapter_weights(tmp_path / "killed"), rtol=0)


@pytest.fixture(scope="module")
def even(setup) -> Path:
    """16 training slices of 2+ organs: with max_regions 2 every micro-batch holds the same number of regions,
    so the mean of micro-batch means (over accumulation steps or processes) is the mean over their union."""
    data = load_prepared(setup / "data")
    keep = [i for i, organs in enumerate(data["train"]["organs"]) if len(organs) >= 2][:16]
    assert len(keep) == 16
    DatasetDict(train=data["train"].select(keep), validation=data["validation"].select(range(4))).save_to_disk(
        str(setup / "even"))
    return setup / "even"


def _exact(setup, even, out, **kw) -> dict:
    """A deterministic recipe: tight boxes, one round (no random clicks), no pruning, validation at the end."""
    return _config(setup, out, **{**dict(data=str(even), behaviours={"tight_box": 1.0}, rounds=1, max_regions=2,
                                         pruning="none", eval_every=10), **kw})


@pytest.fixture(scope="module")
def reference(setup, even, tmp_path_factory) -> dict:
    """Adapter of one process, batch 8, 2 epochs: 4 optimizer steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(TrainConfig.from_dict(_exact(setup, even, out, epochs=2, batch_size=8)))["steps"] == 4
    return _adapter_weights(out)


def test_gradient_accumulation_matches_the_larger_batch(setup, even, reference, tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig.from_dict(_exact(setup, even, out, epochs=2, batch_size=4, grad_accum=2)))
    assert result["steps"] == 4
    _assert_same_adapter(reference, _adapter_weights(out))


def test_steps_checkpoints_and_resume_fallback(setup, even, tmp_path, capsys):
    """batch 4 x grad_accum 3 over 16 slices: an epoch's 4 micro-batches make 2 optimizer steps (3 + the last
    one, which must not spill into the next epoch); max_steps, checkpoint_every and the logged steps count
    those. A resume skips checkpoints that do not load and says why."""
    out = tmp_path / "run"
    config = TrainConfig.from_dict(_exact(setup, even, out, epochs=3, batch_size=4, grad_accum=3, checkpoint_every=1,
                                          keep_checkpoints=10, max_steps=5, eval_every=1))
    result = train(config)
    assert (result["steps"], result["epochs"]) == (5, 2)
    # the epochs' validations, then the final weights' (step 5, mid-epoch), which competes for the best adapter
    assert [h["step"] for h in result["history"]] == [2, 4, 5]
    assert result["best_val_dice"] == max(h["val_dice"] for h in result["history"])
    assert (out / "best_adapter" / "adapter_model.safetensors").exists()
    saved = json.loads((out / "metrics.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert saved["best_val_dice"] == result["best_val_dice"]
    marks = {p.name: json.loads((p / "done").read_text()) for p in sorted((out / "checkpoints").glob("step-*"))}
    assert list(marks) == [f"step-{s:07d}" for s in range(1, 6)]
    # (epoch, micro-batches done in it): step 2 ends epoch 0, so its folder holds the epoch-end state only
    assert [(m["epoch"], m["batch"]) for m in marks.values()] == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3)]

    finished = _adapter_weights(out)
    for name in ("step-0000005/model.safetensors", "step-0000004/custom_checkpoint_0.pkl"):
        path = out / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    capsys.readouterr()
    assert train(config, resume=True)["steps"] == 5
    said = capsys.readouterr().out
    assert "skipping checkpoint" in said and "step-0000005" in said and "model.safetensors" in said
    assert "step-0000004" in said and f"resumed from {out / 'checkpoints' / 'step-0000003'}" in said
    _assert_same_adapter(finished, _adapter_weights(out), rtol=0)


def _refuse(name):
    raise ValueError(f"metrics.json holds {name}, which is not JSON")


def test_interrupted_start_reruns_and_resume_refuses_before_caching(setup, tmp_path):
    """Ctrl-C before the first checkpoint: the run says so, the same command then simply starts again, and a
    resume is refused before the embedding cache is computed."""
    settings = _config(setup, tmp_path / "run", epochs=2, pruning="none", cache_dir=str(tmp_path / "cache"))
    proc = _launch(settings, tmp_path / "run.yaml")
    while not (tmp_path / "run" / "config.yaml").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) != 0
    assert "no checkpoint was written yet: rerun the same command" in proc.stderr.read().decode()
    assert not list((tmp_path / "run").glob("checkpoints/*/done"))

    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainConfig.from_dict({**settings, "cache_dir": str(tmp_path / "other_cache")}), resume=True)
    assert not (tmp_path / "other_cache").exists()
    assert train(TrainConfig.from_dict({**settings, "max_steps": 1}))["steps"] == 1


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(setup, even, reference, tmp_path):
    """2 processes x batch 4 under `accelerate launch` (CPU, gloo) take the same steps as the reference's one
    process x batch 8; a 2-process run killed mid-epoch resumes to the uninterrupted run's adapter."""
    config = _exact(setup, even, tmp_path / "two", epochs=2, batch_size=4, checkpoint_every=1)
    _finish_ok(_launch(config, tmp_path / "two.yaml", 2))
    two = _adapter_weights(tmp_path / "two")
    _assert_same_adapter(reference, two)  # gradients averaged by the all-reduce: only float rounding differs

    killed = {**config, "output_dir": str(tmp_path / "killed")}
    _kill_after(_launch(killed, tmp_path / "killed.yaml", 2), tmp_path / "killed" / "checkpoints" / "step-0000001" / "done")
    assert not (tmp_path / "killed" / "adapter").exists()
    _finish_ok(_launch(killed, tmp_path / "killed.yaml", 2, "--resume"))
    _assert_same_adapter(two, _adapter_weights(tmp_path / "killed"), rtol=0)




def test_a_diverging_run_stops_and_keeps_its_checkpoints(setup, tmp_path):
    """A huge (finite) learning rate: the run stops at the first non-finite loss, says where and what to lower,
    and leaves the checkpoints it completed as they were, with no final adapter."""
    out = tmp_path / "run"
    config = TrainConfig.from_dict(_config(setup, out, epochs=2, pruning="none", lr=1e30, checkpoint_every=1,
                                           keep_checkpoints=100))
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at optimizer step (\d+) .*lower lr") as err:
        train(config)
    failed = int(re.search(r"optimizer step (\d+)", str(err.value)).group(1))
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == [f"step-{s:07d}" for s in range(1, failed)]
    assert all((p / "done").exists() for p in saved)
    assert not (out / "adapter").exists()


@pytest.fixture(scope="module")
def uneven(setup) -> Path:
    """16 training slices whose micro-batches of 4 hold different numbers of regions (max_regions 3)."""
    data = load_prepared(setup / "data")
    DatasetDict(train=data["train"].select(range(16)), validation=data["validation"].select(range(4))).save_to_disk(
        str(setup / "uneven"))
    return setup / "uneven"


def _uneven(setup, uneven, out, **kw) -> dict:
    """One epoch of tight boxes, one round (no random clicks), no pruning: only the loss's normalisation can
    tell the batch layouts apart."""
    return _config(setup, out, **{**dict(data=str(uneven), behaviours={"tight_box": 1.0}, rounds=1, max_regions=3,
                                         pruning="none", epochs=1, eval_every=10), **kw})


@pytest.fixture(scope="module")
def uneven_reference(setup, uneven, tmp_path_factory) -> dict:
    """One process, batch 8: 2 optimizer steps; and the region counts of the 4-slice halves of those batches."""
    out = tmp_path_factory.mktemp("uneven") / "run"
    config = TrainConfig.from_dict(_uneven(setup, uneven, out, batch_size=8))
    assert train(config)["steps"] == 2
    train_set = load_prepared(uneven)["train"]
    recipe = PHPGRecipe.from_config(config, None, train_set, read_metadata(train_set)["organ_names"])
    recipe.on_epoch(0)
    organs = organs_per_sample(train_set, recipe.min_pixels)
    regions = [min(len(organs[i]), 3) for i in recipe.sampler]
    halves = [sum(regions[i:i + 4]) for i in range(0, 16, 4)]
    assert len(set(halves)) > 1, halves  # the old per-micro-batch mean would weigh regions unequally
    return _adapter_weights(out)


def _relative_difference(expected: dict, actual: dict) -> float:
    assert expected.keys() == actual.keys()
    return max(float((actual[k] - expected[k]).norm() / expected[k].norm().clamp(min=1e-12)) for k in expected)


def test_accumulation_with_unequal_region_counts_matches_the_larger_batch(setup, uneven, uneven_reference, tmp_path):
    out = tmp_path / "run"
    assert train(TrainConfig.from_dict(_uneven(setup, uneven, out, batch_size=4, grad_accum=2)))["steps"] == 2
    assert _relative_difference(uneven_reference, _adapter_weights(out)) < 0.01


@pytest.mark.slow
def test_two_processes_with_unequal_region_counts_match_the_larger_batch(setup, uneven, uneven_reference, tmp_path):
    config = _uneven(setup, uneven, tmp_path / "two", batch_size=4)
    _finish_ok(_launch(config, tmp_path / "two.yaml", 2))
    assert _relative_difference(uneven_reference, _adapter_weights(tmp_path / "two")) < 0.01
