"""The `sam-peft` command as a user meets it: generated train options, config checks, help text, unreadable
files and Ctrl-C, each through the real `sam_peft.cli.main` on real files."""
import _thread
import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import SamModel

from sam_peft.cli import COMMANDS, command_parser, main
from sam_peft.data import phantom_cases, prepare_volumes, write_phantom
from sam_peft.models import apply_lora, load_base_model, save_adapter
from sam_peft.training import TrainConfig, train
from sam_peft.training.cli import parse_train_args, train_parser
from test_models import tiny_sam_config


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `sam-peft ARGV`, whether it returns or argparse exits."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    """The message the user reads: the last line, with no traceback before it."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_train_help_lists_every_setting_with_its_help(capsys):
    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    flat = "".join(out.split())  # help text is wrapped at the terminal width, also inside words with hyphens
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in flat, field.name
        assert field.metadata.get("help") and "".join(field.metadata["help"].split()) in flat, field.name
    for option in ("--configYAML", "--resume", "--overwrite"):
        assert option in flat


def test_every_option_of_every_command_has_help():
    parsers = {name: command_parser(name) for name in COMMANDS if name != "train"} | {"train": train_parser()}
    for name, parser in parsers.items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"sam-peft {name} {'/'.join(action.option_strings) or action.dest} has no help"


def test_yaml_settings_with_command_line_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: 1e-4\nepochs: 4\nbatch_size: 2\nbehaviours: {tight_box: 1, center_click: 3}\n"
                           "eval_behaviours: [tight_box, center_click]\nmax_regions: 3\nlog_with: tensorboard\n")
    assert yaml.safe_load(config_file.read_text())["lr"] == "1e-4"  # YAML 1.1: a string, converted below
    config, args = parse_train_args(["--config", str(config_file), "--epochs", "6", "--eval_behaviours", "tight_box",
                                     "clicks_3", "--log-with", "none", "--max-regions", "none", "--no-frozen-encoder",
                                     "--lora-preset", "encoder", "--resume"])
    assert (config.lr, config.batch_size, config.behaviours) == (1e-4, 2, {"tight_box": 1.0, "center_click": 3.0})
    assert (config.epochs, config.eval_behaviours, config.log_with, config.max_regions) == (
        6, ["tight_box", "clicks_3"], None, None)
    assert (config.frozen_encoder, config.lora_preset, args.resume, args.overwrite) == (False, "encoder", True, False)
    config, _ = parse_train_args(["--behaviours", "{tight_box: 2}", "--frozen_encoder", "true", "--lora_r", "4"])
    assert (config.behaviours, config.frozen_encoder, config.lora_r, config.lr) == ({"tight_box": 2.0}, True, 4, 5e-4)


@pytest.mark.parametrize("argv, message", [
    (["--batchsize", "4"], "unrecognized argument --batchsize (did you mean '--batch-size'?)"),
    (["--lr"], "argument --lr: expected one argument"),
    (["--lr", "--epochs", "3"], "argument --lr: expected one argument"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--behaviours", "[tight_box]"], "expected a YAML mapping such as"),
    (["--lora-preset", "enc"], "invalid choice: 'enc'"),
    (["stray"], "unexpected argument 'stray'"),
    (["--eval-every", "0"], "eval_every must be >= 1"),
    (["--behaviours", "{tight_bx: 1}"], "behaviours must be a mapping of names from"),
])
def test_bad_train_options_end_in_one_clear_line(argv, message, capsys):
    code, _, err = _run(["train", *argv], capsys)
    assert code == 2 and message in _error_line(err)


@pytest.mark.parametrize("text, message", [
    ("batchsize: 4\n", "unknown settings: 'batchsize' (did you mean 'batch_size'?)"),
    ("epochs: ten\n", "epochs must be an integer, got 'ten'"),
    ("lr: [1e-4\n", "not valid YAML (line 2, column 1: expected ',' or ']'"),
    ("- lr\n", "expected a mapping of settings, got list"),
])
def test_bad_config_files_are_named(text, message, tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    code, _, err = _run(["train", "--config", str(config_file)], capsys)
    assert code == 2 and _error_line(err).startswith(f"sam-peft train: error: config file {config_file}: {message}")


def test_python_types_give_the_yaml_message(tmp_path):
    with pytest.raises(ValueError) as from_python:
        TrainConfig(epochs="ten")
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("epochs: ten\n")
    with pytest.raises(ValueError) as from_yaml:
        TrainConfig.from_yaml(config_file)
    assert str(from_python.value) == "epochs must be an integer, got 'ten'"
    assert str(from_yaml.value) == f"config file {config_file}: {from_python.value}"
    config = TrainConfig(lr="1e-4", output_dir=tmp_path / "run")  # YAML 1.1 number strings and paths are converted
    assert (config.lr, config.output_dir) == (1e-4, str(tmp_path / "run"))
    config.batch_size = "eight"  # edited after construction: train checks again before any work
    with pytest.raises(ValueError, match="^batch_size must be an integer, got 'eight'$"):
        train(config)
    assert not (tmp_path / "run").exists()
    for bad, message in ((dict(frozen_encoder="no"), "frozen_encoder must be true or false"),
                         (dict(lr=True), "lr must be a number, got True"),
                         (dict(eval_behaviours="tight_box"), "eval_behaviours must be a list"),
                         (dict(behaviours={"tight_box": "x"}), "behaviours must be a number, got 'x'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


@pytest.mark.parametrize("setting, value", [
    ("eval_every", 0), ("keep_checkpoints", 0), ("warmup_ratio", -0.1), ("warmup_ratio", 1.0), ("max_steps", 0),
    ("num_workers", -1), ("lora_r", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("batch_size", 0),
    ("grad_accum", 0), ("epochs", 0), ("rounds", 0), ("max_regions", 0), ("min_pixels", 0), ("phantom_cases", 1),
    ("seed", -1), ("weight_decay", -0.01), ("max_grad_norm", -1.0), ("checkpoint_every", -1), ("lr", 0.0),
    ("behaviours", {}), ("behaviours", {"tight_box": 0}), ("eval_behaviours", []), ("train_heads", ["decoder"]),
    ("schedule", "linear"), ("mixed_precision", "fp8"),
])
def test_out_of_range_settings_are_refused_by_name(setting, value):
    with pytest.raises(ValueError, match=rf"^{setting}\b"):
        TrainConfig(**{setting: value}, pruning="none")


FLOAT_SETTINGS = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_by_name_in_every_float_setting(value, tmp_path, capsys):
    """inf passes `lr > 0` and trains NaN weights: each float setting (and behaviour weight) refuses it, from
    Python, YAML and the command line, before anything is written."""
    assert {"lr", "weight_decay", "warmup_ratio", "prune_ratio", "anneal", "max_grad_norm"} <= set(FLOAT_SETTINGS)
    for setting in FLOAT_SETTINGS:
        wrong = {"tight_box": float(value)} if setting == "behaviours" else float(value)
        with pytest.raises(ValueError, match=rf"^{setting} must be a finite number, got {value.lstrip('+')}$"):
            TrainConfig(**{setting: wrong})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"lr: {value}\n")  # YAML 1.1 reads .inf; a bare inf/nan is a string, converted
    with pytest.raises(ValueError, match=rf"config file {config_file}: lr must be a finite number"):
        TrainConfig.from_yaml(config_file)
    code, _, err = _run(["train", f"--lr={value}", "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and _error_line(err) == f"sam-peft train: error: lr must be a finite number, got {value}"
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random SAM directory, a LoRA adapter saved for it, a prepared phantom dataset, a NIfTI volume
    with prompts: what `evaluate` and `predict` read."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(root / "base")
    save_adapter(apply_lora(load_base_model(str(root / "base")), "decoder", r=4, verbose=False), root / "adapter")
    prepare_volumes(phantom_cases(2, seed=1, shape=(4, 64, 64)), output=root / "data", label_map="flare22",
                    test_fraction=0.5, seed=0, min_pixels=20)
    write_phantom(root / "volumes", 1, seed=2, shape=(4, 64, 64))
    (root / "prompts.json").write_text(json.dumps({"liver": {"slices": {"2": {"box": [10, 10, 40, 40]}}}}))
    return root


def _truncated_copy(source: Path, target: Path, name: str) -> Path:
    """`source` folder copied to `target` with its file `name` cut to half its size, as an interrupted copy
    or download leaves it."""
    target.mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        (target / file.name).write_bytes(data[:len(data) // 2] if file.name == name else data)
    return target


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_truncated_adapter_ends_in_one_line_naming_it(files, tmp_path, command, capsys):
    adapter = _truncated_copy(files / "adapter", tmp_path / "adapter", "adapter_model.safetensors")
    inputs = {"evaluate": ["--data", str(files / "data"), "--output", str(tmp_path / "eval")],
              "predict": ["--input", str(files / "volumes" / "imagesTr" / "phantom_0001_0000.nii.gz"),
                          "--prompts", str(files / "prompts.json"), "--output", str(tmp_path / "labels.nii.gz")]}
    code, _, err = _run([command, "--model", str(files / "base"), "--adapter", str(adapter), "--device", "cpu",
                         *inputs[command]], capsys)
    line = _error_line(err)
    assert code == 2 and line.startswith(f"sam-peft {command}: error: ") and str(adapter) in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "labels.nii.gz").exists()


def test_truncated_base_weights_end_in_one_line_naming_them(files, tmp_path, capsys):
    base = _truncated_copy(files / "base", tmp_path / "base", "model.safetensors")
    code, _, err = _run(["evaluate", "--model", str(base), "--data", str(files / "data"), "--output",
                         str(tmp_path / "eval"), "--device", "cpu"], capsys)
    line = _error_line(err)
    assert code == 2 and str(base) in line and "truncated" in line


def test_corrupt_dataset_file_ends_in_one_line_naming_it(files, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in (files / "data").iterdir():
        if split.is_dir():
            _truncated_copy(split, data / split.name, next(f.name for f in split.glob("*.arrow")))
        else:
            (data / split.name).write_bytes(split.read_bytes())
    code, _, err = _run(["evaluate", "--data", str(data), "--output", str(tmp_path / "eval")], capsys)
    line = _error_line(err)
    assert code == 2 and str(data) in line and "run `sam-peft prepare` again" in line


def test_ctrl_c_ends_with_a_short_message_and_status_130(tmp_path, capsys):
    """Ctrl-C (SIGINT, raised in the main thread as a terminal would) once `phantom` has begun writing
    files: one line, exit status 130, and its half-written folder is gone."""
    output = tmp_path / "phantom"

    def interrupt_when_writing():
        deadline = time.monotonic() + 300
        while not any(tmp_path.glob(".phantom.partial-*/*/*.nii.gz")) and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when ignored
    try:
        threading.Thread(target=interrupt_when_writing, daemon=True).start()
        code, _, err = _run(["phantom", "--output", str(output), "--cases", "20"], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and _error_line(err) == "sam-peft phantom: interrupted"
    assert not output.exists() and not list(tmp_path.iterdir())
