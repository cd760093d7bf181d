"""What a new user trips on, each through the real `sam-peft` command on real file formats (NIfTI written with
nibabel, JSON prompts): inputs that used to give a wrong result with exit status 0 are refused in one line
naming the file, option, organ or slice, before the model is loaded where the input alone shows the problem.
Counted in README "Reliability"."""
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_cli import _error_line, _run
from test_models import tiny_sam_config
from transformers import SamModel

from sam_peft.app.state import AppModel, open_upload
from sam_peft.data import phantom_cases, prepare_volumes
from sam_peft.data.readers import display_affine
from sam_peft.evaluation import MultiOrganPredictor, predict_volume

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 48, 40)  # display slices (z, y, x) of the synthetic scans
GOOD_BOX = {"box": [8, 8, 30, 30]}


def _ct(values: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(values, display_affine((3.0, 1.0, 1.0))), path)
    return path


def _noisy_ct(seed: int = 0) -> np.ndarray:
    """Hounsfield-like values: air, soft tissue and noise (thousands of distinct values, as in any scan)."""
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[:, 8:40, 6:34] = 40 + 30 * rng.standard_normal((SHAPE[0], 32, 28))
    return hu


def _prompts(tmp_path: Path, prompts: dict) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    return path


def _predict(tmp_path, ct: Path, prompts: dict, capsys, *options) -> tuple[int, str, str]:
    return _run(["predict", "--input", str(ct), "--prompts", str(_prompts(tmp_path, prompts)),
                 "--output", str(tmp_path / "out" / "labels.nii.gz"), *options], capsys)


# ------------------------------------------------------------------------------ scans that cannot be a CT


@pytest.mark.parametrize("what, values, message", [
    ("a few NaN voxels", "nan", r"ct.nii.gz: 3 voxels are NaN or infinite"),
    ("an infinite voxel", "inf", r"ct.nii.gz: 1 voxels are NaN or infinite"),
    ("an all-zero CT", "zeros", r"ct.nii.gz: every voxel is 0.0; the image is empty"),
    ("a 2x2x2 blank volume", "blank", r"ct.nii.gz: every voxel is 0; the image is empty"),
])
def test_predict_refuses_a_volume_that_cannot_be_a_scan(what, values, message, tmp_path, capsys):
    hu = _noisy_ct()
    if values == "nan":
        hu[1, 20, 20:23] = np.nan  # used to turn the whole volume into zeros after windowing
    elif values == "inf":
        hu[0, 0, 0] = np.inf
    elif values == "zeros":
        hu = np.zeros(SHAPE, np.float32)
    else:
        hu = np.zeros((2, 2, 2), np.int16)
    code, out, err = _predict(tmp_path, _ct(hu, tmp_path / "ct.nii.gz"), {"liver": {"slices": {"1": GOOD_BOX}}},
                              capsys, "--model", str(tmp_path / "no_model_here"))
    assert code == 2, what
    assert _error_line(err).startswith("sam-peft predict: error: ") and message.replace("\\", "") in err
    assert not (tmp_path / "out").exists()  # refused before the (here missing) model was even looked for


def test_a_label_volume_passed_as_the_ct_is_warned_about_before_any_model_work(totalseg_dir, tmp_path, capsys,
                                                                               caplog):
    """The real TotalSegmentator MR label volume as --input: 24 distinct integer values, no scan has so few."""
    with caplog.at_level(logging.WARNING):
        code, _, err = _predict(tmp_path, totalseg_dir / "example_seg_mr.nii.gz", {"livr": {"slices": {"1": GOOD_BOX}}},
                                capsys, "--label-map", "totalsegmentator", "--model", str(tmp_path / "no_model"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("example_seg_mr.nii.gz holds only 24 distinct integer values (0, 1, 2" in w and
               "looks like a label volume" in w for w in warnings), warnings
    assert code == 2 and "organ 'livr' (did you mean 'liver'?) is not in the label map 'totalsegmentator'" in err
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a real scan is not warned about
        _predict(tmp_path, _ct(_noisy_ct(), tmp_path / "ct.nii.gz"), {"livr": {"slices": {"1": GOOD_BOX}}}, capsys,
                 "--label-map", "totalsegmentator")
    assert not [r for r in caplog.records if "label volume" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("prompt, message", [
    ({"box": [True, 8, 30, 30]}, "box must be [x0, y0, x1, y1] (finite numbers, not true/false or strings), got "
                                 "[True, 8, 30, 30]"),
    ({"box": ["8", 8, 30, 30]}, "not true/false or strings"),
    ({"points": [[20, True]], "labels": [1]}, "points must be [[x, y], ...] (finite numbers, not true/false"),
    ({"points": [[20, 20]], "labels": [True]}, "each 1 (positive) or 0 (negative); got 1 points and labels [True]"),
    ({"box": [30, 30, 30, 30]}, "box [30, 30, 30, 30] must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1 (a box of "
                                "zero width or height holds no organ)"),
    ({"box": [10, 30, 20, 30]}, "with x0 < x1 and y0 < y1"),
    ({"points": [[20, 20]], "labels": [0]}, "negative clicks alone say only where the organ is not; add a positive "
                                            "click (label 1) on the organ or a box"),
])
def test_malformed_prompts_are_refused_naming_organ_and_slice(prompt, message, tmp_path, capsys):
    code, _, err = _predict(tmp_path, _ct(_noisy_ct(), tmp_path / "ct.nii.gz"),
                            {"liver": {"slices": {"2": GOOD_BOX}}, "spleen": {"slices": {"1": prompt}}}, capsys)
    assert code == 2
    line = _error_line(err)
    assert line.startswith("sam-peft predict: error: organ 'spleen' on slice 1: ") and message in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_app():
    torch.manual_seed(0)
    return AppModel.create(SamModel(tiny_sam_config()).eval(), "tiny", label_map="flare22")


def test_the_web_app_shares_the_prompt_checks(tiny_app, tmp_path):
    """The app's clicks go through the same parse_prompt: a lone negative click or a box whose two corners are one
    pixel is a message on the page; a negative click refining a mask (after a box) is fine."""
    session = open_upload(tiny_app, _ct(_noisy_ct().astype(np.int16), tmp_path / "ct.nii.gz"))
    with pytest.raises(ValueError, match="organ 'liver': negative clicks alone say only where the organ is not"):
        session.click(tiny_app, 1, 20, 20, "liver", "negative click")
    session.click(tiny_app, 1, 12, 12, "liver", "box corner")
    with pytest.raises(ValueError, match=r"box \[12, 12, 12, 12\] must be .* x0 < x1 and y0 < y1"):
        session.click(tiny_app, 1, 12, 12, "liver", "box corner")
    session.click(tiny_app, 1, 8, 8, "liver", "box corner")
    session.click(tiny_app, 1, 30, 30, "liver", "box corner")
    assert "negative click at (20, 20) on slice 1 ->" in session.click(tiny_app, 1, 20, 20, "liver", "negative click")


def test_predictor_refuses_lone_negative_clicks_unless_refining(tiny_app):
    predictor = MultiOrganPredictor(tiny_app.model)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (48, 40), dtype=np.uint8))
    negative = {"points": [[20, 20]], "labels": [0]}
    with pytest.raises(ValueError, match="organ 'liver': negative clicks alone"):
        predictor.predict({"liver": negative})
    first = predictor.predict({"liver": GOOD_BOX})["liver"]
    refined = predictor.predict({"liver": negative}, mask_inputs={"liver": first.low_res_logits})["liver"]
    assert refined.mask.shape == (48, 40)


# ---------------------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize("argv, message", [
    (["predict", "--min-score", "-1"], "argument --min-score: must be in [0, 1], got -1"),
    (["predict", "--min-score", "1.5"], "argument --min-score: must be in [0, 1], got 1.5"),
    (["predict", "--min-score", "nan"], "argument --min-score: must be in [0, 1], got nan"),
    (["predict", "--min-score", "high"], "argument --min-score: expected a number, got 'high'"),
    (["predict", "--window", "40,0"], "argument --window: window must be one of"),
    (["predict", "--window", "nan,400"], "argument --window: window must be one of"),
    (["evaluate", "--max-clicks", "0"], "argument --max-clicks: must be >= 1, got 0"),
    (["evaluate", "--min-pixels", "-5"], "argument --min-pixels: must be >= 1, got -5"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["evaluate", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["evaluate", "--max-clicks", "2.5"], "argument --max-clicks: expected an integer, got '2.5'"),
])
def test_every_numeric_option_of_predict_and_evaluate_is_range_checked(argv, message, tmp_path, capsys):
    required = {"predict": ["--input", "ct.nii.gz", "--prompts", "p.json", "--output", "o.nii.gz"],
                "evaluate": ["--data", "data", "--output", str(tmp_path / "out")]}[argv[0]]
    code, _, err = _run([*argv, *required], capsys)
    assert code == 2 and message in _error_line(err)


def test_min_score_is_range_checked_in_the_api_too(tmp_path):
    """--min-score -1 used to let the liver leak 32 slices past its end: refused before any model work."""
    with pytest.raises(ValueError, match=r"min_score \(--min-score\) must lie in \[0, 1\], got -1"):
        predict_volume(None, _ct(_noisy_ct(), tmp_path / "ct.nii.gz"), {"liver": {"slices": {"1": GOOD_BOX}}},
                       "totalsegmentator", tmp_path / "out.nii.gz", min_score=-1)


# ------------------------------------------------------------------------------------------------ devices


def test_bad_devices_are_one_line_errors_naming_the_option(capsys):
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for command in ("evaluate", "predict", "app"):
        code, _, err = _run([command, "--device", "foo"], capsys)
        assert code == 2 and _error_line(err).endswith(
            "argument --device: 'foo' is not a torch device; use cpu, cuda, cuda:N or mps"), command
        code, _, err = _run([command, "--device", missing], capsys)
        assert code == 2 and f"argument --device: {missing}: this machine has" in _error_line(err), command
        code, _, err = _run([command, "--device", "meta"], capsys)
        assert code == 2 and "argument --device: meta: this device holds no data" in _error_line(err), command


# ------------------------------------------------------------------------------------------ output folders


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nobody may create files in: /sys for root (sysfs), a read-only folder for anyone else."""
    folder = Path("/sys")
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
    try:
        (folder / ".probe").touch()
    except OSError:
        return folder
    pytest.skip(f"{folder} is writable here")


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    """A prepared dataset of one phantom case (train split only), as `sam-peft prepare` writes it."""
    path = tmp_path_factory.mktemp("phantom") / "data"
    prepare_volumes(phantom_cases(1, seed=2, shape=(2, 64, 64)), label_map="flare22", output=path, min_pixels=20)
    return path


def test_an_unwritable_output_is_refused_before_any_work(unwritable, phantom_data, tmp_path, capsys):
    ct = _ct(_noisy_ct(), tmp_path / "ct.nii.gz")
    runs = {
        "evaluate": ["--data", str(phantom_data), "--split", "train", "--output", str(unwritable / "eval")],
        "predict": ["--input", str(ct), "--prompts", str(_prompts(tmp_path, {"liver": {"slices": {"1": GOOD_BOX}}})),
                    "--output", str(unwritable / "labels.nii.gz")],
        "prepare": ["--images", str(ct), "--labels", str(ct), "--label-map", "flare22", "--output",
                    str(unwritable / "prepared")],
    }
    for command, argv in runs.items():
        code, out, err = _run([command, *argv], capsys)
        assert code == 2, command
        assert f"cannot write in {unwritable} (" in _error_line(err) and "choose a folder you can write to" in err
        assert command == "predict" or "model:" not in out  # evaluate: refused before it even names the model


def test_a_file_where_a_folder_must_be_is_named(phantom_data, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    code, _, err = _run(["evaluate", "--data", str(phantom_data), "--split", "train", "--output",
                         str(tmp_path / "taken")], capsys)
    assert code == 2 and _error_line(err).endswith(f"--output {tmp_path / 'taken'} is a file; give a folder path "
                                                   "(or delete the file)")
    code, _, err = _run(["prepare", "--images", str(tmp_path / "taken"), "--label-map", "flare22", "--output",
                         str(tmp_path / "taken" / "prepared")], capsys)
    assert code == 2 and "Errno" not in err
    assert _error_line(err).endswith(f"{tmp_path / 'taken'} is a file, so no folder can be made there")
    (tmp_path / "dir.nii.gz").mkdir()
    code, _, err = _run(["predict", "--input", str(_ct(_noisy_ct(), tmp_path / "ct.nii.gz")), "--prompts",
                         str(_prompts(tmp_path, {"liver": {"slices": {"1": GOOD_BOX}}})), "--output",
                         str(tmp_path / "dir.nii.gz")], capsys)
    assert code == 2 and _error_line(err).endswith(f"{tmp_path / 'dir.nii.gz'} is a folder; give a file path")


# -------------------------------------------------------------------------------- prepare: label maps, splits


def _prepare_mr(totalseg_dir, tmp_path, capsys, *options):
    return _run(["prepare", "--images", str(totalseg_dir / "example_mr_sm.nii.gz"), "--labels",
                 str(totalseg_dir / "example_seg_mr.nii.gz"), "--output", str(tmp_path / "mr"), *options], capsys)


def test_mr_labels_are_never_named_with_the_ct_label_map(totalseg_dir, tmp_path, capsys):
    """The CT map used to be the default: it named the MR colon 'esophagus' and the aorta 'kidney_cyst_left'."""
    code, _, err = _prepare_mr(totalseg_dir, tmp_path, capsys)
    assert code == 2 and "no label map: the labels of" in err and "pass label_map / --label-map: totalsegmentator " \
        "(TotalSegmentator CT, class_map_total_v2), totalsegmentator_mr (TotalSegmentator MR" in _error_line(err)
    for ct_map in ("totalsegmentator", str(totalseg_dir / "class_map_total_v2.json")):
        code, _, err = _prepare_mr(totalseg_dir, tmp_path, capsys, "--label-map", ct_map)
        assert code == 2 and _error_line(err).endswith(
            f"example_mr_sm.nii.gz: the image is MR (by its intensities), but label map {ct_map!r} is "
            "TotalSegmentator's CT task, whose ids name other organs: pass --label-map totalsegmentator_mr (or "
            "--modality ct if the image is CT)")
    assert not (tmp_path / "mr").exists()
    for mr_map in ("totalsegmentator_mr", str(totalseg_dir / "class_map_total_mr.json")):
        code, out, _ = _prepare_mr(totalseg_dir, tmp_path, capsys, "--label-map", mr_map, "--overwrite")
        assert code == 0
        found = next(line for line in out.splitlines() if " organs of label map " in line)
        assert found.startswith(f"22 of the 50 organs of label map {mr_map!r} found (slices holding each): spleen 12, ")
        assert "colon 20" in found and "aorta 20" in found and "esophagus" not in found  # only the organs present
        assert "kidney_cyst_left" not in out


def test_a_single_case_cannot_be_split_and_says_what_to_do(totalseg_dir, phantom_data, tmp_path, capsys):
    code, _, err = _prepare_mr(totalseg_dir, tmp_path, capsys, "--label-map", "totalsegmentator_mr",
                               "--test-fraction", "0.2")
    assert code == 2 and "1 case(s) cannot fill val_fraction=0.0 and test_fraction=0.2" in err
    assert "`sam-peft evaluate --split train`, `sam-peft train --val-split train`" in _error_line(err)
    code, out, _ = _prepare_mr(totalseg_dir, tmp_path, capsys, "--label-map", "totalsegmentator_mr")
    assert code == 0 and "only a train split: `sam-peft evaluate --split train`" in out
    code, out, err = _run(["evaluate", "--data", str(phantom_data), "--output", str(tmp_path / "eval")], capsys)
    assert code == 2 and "model:" not in out  # before the model is loaded
    assert _error_line(err).startswith(f"sam-peft evaluate: error: --split test: {phantom_data} has only the split(s) "
                                       "['train']; `sam-peft prepare` splits by case")


# ------------------------------------------------------------------------- which model evaluate and predict ran


@pytest.mark.slow
def test_evaluate_and_predict_default_to_the_bundled_adapter_and_say_so(phantom_data, tmp_path, capsys):
    argv = ["evaluate", "--data", str(phantom_data), "--split", "train", "--behaviours", "tight_box", "--no-noc",
            "--organs", "liver"]
    code, out, _ = _run([*argv, "--output", str(tmp_path / "bundled")], capsys)
    assert code == 0 and out.startswith("model: litemedsam + adapter litemedsam-phpg (the bundled default; "
                                        "--no-adapter for the plain base)\n")
    settings = json.loads((tmp_path / "bundled" / "metrics.json").read_text())["settings"]
    assert (settings["model"], settings["adapter"]) == ("litemedsam", "litemedsam-phpg")
    assert (tmp_path / "bundled" / "metrics.md").read_text().startswith(
        "# Evaluation of litemedsam + adapter litemedsam-phpg on split train")
    code, out, _ = _run([*argv, "--no-adapter", "--output", str(tmp_path / "plain")], capsys)
    assert code == 0 and out.startswith("model: litemedsam (no adapter)\n")
    settings = json.loads((tmp_path / "plain" / "metrics.json").read_text())["settings"]
    assert (settings["model"], settings["adapter"]) == ("litemedsam", None)
    # the bundled adapter answers box prompts with the base: the same Dice, recorded as such
    dice = {run: json.loads((tmp_path / run / "metrics.json").read_text())["dice"]["tight_box"]["mean"]
            for run in ("bundled", "plain")}
    assert dice["bundled"] == pytest.approx(dice["plain"], abs=1e-6)
    bundled = json.loads((tmp_path / "bundled" / "metrics.json").read_text())["settings"]
    assert bundled["box_prompts"] == "base"
    code, out, _ = _predict(tmp_path, tmp_path / "missing.nii.gz", {"liver": {"slices": {"1": GOOD_BOX}}}, capsys)
    assert code == 2 and out.startswith("model: litemedsam + adapter litemedsam-phpg (the bundled default")
