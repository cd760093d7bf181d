"""The CVPR 2025 interactive 3D protocol: case files, simulated clicks, scores, and the 3D segmenter."""
import csv
import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.integrate import cumulative_trapezoid
from transformers import SamModel

from sam_peft.cvpr25 import (auc, boxes_of, error_click, evaluate_protocol, read_case, run_challenge, step_scores,
                             write_case, write_cases)
from sam_peft.cli import main
from test_models import tiny_sam_config
from sam_peft.cvpr25.format import write_npz, write_segmentation
from sam_peft.cvpr25.segmenter import ClassState, EmbeddingCache, Segmenter, Wand, collapse, disk
from sam_peft.evaluation.predictor import MultiOrganPredictor

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_sam() -> SamModel:
    """A random tiny SAM: the segmenter's logic must hold for any model."""
    torch.manual_seed(0)
    return SamModel(tiny_sam_config()).eval()


def _volume(shape=(8, 64, 72)) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipsoid (class 1) and a small dark block (class 2) on a noisy background."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gts = np.zeros(shape, dtype=np.uint8)
    gts[((z - 4) / 3.5) ** 2 + ((y - 30) / 14) ** 2 + ((x - 30) / 16) ** 2 <= 1] = 1
    gts[2:6, 40:50, 52:64] = 2
    imgs = np.clip(80 + 100 * (gts == 1) - 50 * (gts == 2) + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
    return imgs, gts


# ---------------------------------------------------------------------------------------------- format


def test_boxes_follow_get_boxes(tmp_path):
    """z range, the middle of the labelled slices, the 2D box enlarged by 0-5 px at 256 and clipped."""
    gts = np.zeros((9, 300, 260), dtype=np.uint8)
    gts[[1, 2, 3, 7], 100:150, 20:90] = 1  # slices 1-3 and 7: the middle labelled slice is 3, not (1 + 7) // 2
    gts[4, 0:10, 250:260] = 2  # touches the border: clipped
    boxes = boxes_of(gts)
    assert boxes == boxes_of(gts)  # seeded
    first, second = boxes
    assert (first["z_min"], first["z_max"], first["z_mid"]) == (1, 7, 3)
    shift_x, shift_y = 20 - first["z_mid_x_min"], 100 - first["z_mid_y_min"]
    assert 0 <= shift_x <= 5 * 260 // 256 and 0 <= shift_y <= 5 * 300 // 256
    assert (first["z_mid_x_max"] - 89, first["z_mid_y_max"] - 149) == (shift_x, shift_y)
    assert second["z_mid_y_min"] == 0 and second["z_mid_x_max"] == 259
    write_case(tmp_path / "c.npz", np.zeros(gts.shape, np.uint8), gts, (2.5, 0.8, 0.8), ["a", "b"])
    case = read_case(tmp_path / "c.npz")
    assert case.boxes == boxes and case.spacing == (2.5, 0.8, 0.8) and case.class_names == ["a", "b"]
    assert case.num_classes == 2 and case.clicks is None


def test_case_files_refuse_bad_input(tmp_path):
    write_npz(tmp_path / "no_spacing.npz", imgs=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="no_spacing.npz.*'imgs' and 'spacing'"):
        read_case(tmp_path / "no_spacing.npz")
    write_npz(tmp_path / "flat.npz", imgs=np.zeros((2, 4, 4), np.uint8), spacing=np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"flat.npz: 'spacing' must hold 3 positive voxel sizes \(mm\), got \(0.0"):
        read_case(tmp_path / "flat.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz: cannot be read"):
        read_case(tmp_path / "broken.npz")
    gts = np.zeros((2, 4, 4), np.uint8)
    gts[0, 0, 0] = 2  # class 1 missing
    with pytest.raises(ValueError, match="every class 1..K"):
        write_case(tmp_path / "x.npz", np.zeros((2, 4, 4), np.uint8), gts, (1, 1, 1))


def test_write_cases_from_nifti(tmp_path):
    """A NIfTI pair -> display orientation, CT window, classes >= min_voxels numbered in label-map order."""
    hu = np.full((20, 16, 6), -1000, dtype=np.int16)
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[2:12, 3:13, 1:5] = 5  # liver, 400 voxels
    label[14:16, 2:4, 2:4] = 1  # spleen, 8 voxels: below min_voxels
    hu[label == 5] = 60
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "seg.nii.gz")
    [path] = write_cases(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "out", min_voxels=100)
    case = read_case(path)
    assert case.class_names == ["liver"] and case.gts.max() == 1 and case.gts.sum() == 400
    assert case.imgs.shape == (6, 16, 20) and case.spacing == (4.0, 1.5, 1.5)  # slices first, in array order
    assert set(np.unique(case.imgs[case.gts == 1])) == {int(round((60 - 40 + 200) * 255 / 400))}
    assert len(case.boxes) == 1 and (case.boxes[0]["z_min"], case.boxes[0]["z_max"]) == (1, 4)
    with pytest.raises(ValueError, match="no class with at least"):
        write_cases(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "out2", min_voxels=10_000)


# ---------------------------------------------------------------------------------------------- protocol


def test_error_click_finds_the_largest_error_centre():
    truth = np.zeros((12, 20, 20), dtype=bool)
    truth[2:9, 2:15, 2:15] = True
    pred = truth.copy()
    pred[3:8, 4:9, 6:11] = False  # a missed 5x5x5 cube: the largest error, one deepest voxel
    pred[10, 0:2, 0:2] = True  # a small over-segmentation
    kind, point = error_click(truth, pred)
    assert kind == "fg" and point == (5, 6, 8)
    assert error_click(truth, truth) is None
    over = truth.copy()
    over[9:12, 0:20, 0:20] = True  # over-segmented up to the volume's end: the border counts as outside
    kind, point = error_click(truth, over)
    assert kind == "bg" and point[0] == 10  # the middle of slices 9-11, not the last slice
    assert error_click(truth, over) == (kind, point)  # ties broken with a fixed seed


def test_scores_and_auc():
    gts = np.zeros((4, 10, 10), dtype=np.uint8)
    gts[1:3, 2:6, 2:6], gts[1:3, 6:9, 6:9] = 1, 2
    perfect = step_scores(gts, gts, (1.0, 1.0, 1.0))
    assert perfect["dsc"] == 1.0 and perfect["nsd"] == 1.0 and perfect["class_dsc"] == [1.0, 1.0]
    poor = step_scores(gts, (gts == 1).astype(np.uint8) * 2, (1.0, 1.0, 1.0))  # class 1 predicted as 2
    assert poor["dsc"] == 0.0 and poor["nsd"] == 0.0  # NSD not counted at DSC <= 0.2
    series = [0.0, 0.5, 0.6, 0.62, 0.7, 0.71]
    assert auc(series) == pytest.approx(cumulative_trapezoid(series[-5:], np.arange(5))[-1])
    assert auc([1.0] * 6) == 4.0


def _oracle(miss: int):
    """A predictor that misses `miss` slices of each class at first and restores one slice per click."""
    def predict(inputs, outputs):
        for path in inputs.glob("*.npz"):
            case = read_case(path)
            segs = case.gts.copy()
            clicks = sum(len(c["fg"]) + len(c["bg"]) for c in case.clicks or [])
            for k in range(1, case.gts.max() + 1):
                zs = np.unique(np.nonzero(case.gts == k)[0])
                for z in zs[: max(0, miss - clicks // case.gts.max())]:
                    segs[z][segs[z] == k] = 0
            write_segmentation(outputs / path.name, segs)
    return predict


def test_protocol_runs_six_steps(tmp_path):
    imgs, gts = _volume()
    write_case(tmp_path / "cases" / "box.npz", imgs, gts, (2.0, 1.0, 1.0), ["blob", "block"])
    write_case(tmp_path / "cases" / "clicks.npz", imgs, gts, (2.0, 1.0, 1.0), boxes=False)
    result = evaluate_protocol(tmp_path / "cases", _oracle(miss=3), tmp_path / "eval")
    box, clicks_only = result["cases"]
    assert box["dsc"][0] < box["dsc"][1] < box["dsc"][3] == 1.0 and box["dsc"][-1] == 1.0
    assert clicks_only["dsc"][0] == 0.0 and clicks_only["times"][0] == 0.0  # no box: the box step scores 0
    assert all(order == ["fg", "fg", "fg", None, None] for order in box["clicks_order"])
    assert box["dsc_auc"] == pytest.approx(auc(box["dsc"])) and box["dsc_final"] == 1.0
    with open(tmp_path / "eval" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["CaseName"] for r in rows] == ["box.npz", "clicks.npz"] and float(rows[0]["DSC_6"]) == 1.0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]["dsc_final"] == 1.0
    assert (tmp_path / "eval" / "dice_vs_interaction.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- segmenter


@pytest.fixture(scope="module")
def tiny():
    return _tiny_sam()


def _case_with_clicks(path, source, clicks, order):
    case = read_case(source)
    write_npz(path, imgs=case.imgs, spacing=np.asarray(case.spacing), boxes=np.array(case.boxes, dtype=object),
              clicks=np.array(clicks, dtype=object), clicks_order=np.array(order, dtype=object))


def test_challenge_steps_reuse_their_cache(tiny, tmp_path):
    """Step outputs are (D, H, W) uint8 labels; a click step reuses the embeddings and masks of the box step
    and gives what a replay from scratch gives; a click changes the voxel it points at."""
    imgs, gts = _volume()
    write_case(tmp_path / "source.npz", imgs, gts, (2.0, 1.0, 1.0))
    inputs, outputs, cache = tmp_path / "in", tmp_path / "out", tmp_path / "cache"
    inputs.mkdir()
    read = read_case(tmp_path / "source.npz")
    write_npz(inputs / "c.npz", imgs=imgs, spacing=np.asarray(read.spacing), boxes=np.array(read.boxes, dtype=object))
    lines = []
    run_challenge(inputs, outputs, tiny, "tiny", cache, log=lines.append)
    first = read_case_segs(outputs / "c.npz")
    assert first.shape == gts.shape and first.dtype == np.uint8
    assert "7 slices encoded" in lines[0]  # slices 1-7 hold a class
    fg, bg = (3, 10, 10), (4, 30, 30)  # a background-only voxel (class 1), and the blob's centre (class 2)
    clicks = [{"fg": [list(fg)], "bg": []}, {"fg": [], "bg": [list(bg)]}]
    _case_with_clicks(inputs / "c.npz", tmp_path / "source.npz", clicks, [["fg"], ["bg"]])
    run_challenge(inputs, outputs, tiny, "tiny", cache, log=lines.append)
    cached = read_case_segs(outputs / "c.npz")
    assert "0 slices encoded" in lines[1]
    assert cached[fg] == 1 and cached[bg] != 2
    run_challenge(inputs, tmp_path / "fresh", tiny, "tiny", "", log=lines.append)  # no cache: replayed
    assert np.array_equal(read_case_segs(tmp_path / "fresh" / "c.npz"), cached)


def read_case_segs(path):
    with np.load(path) as data:
        return data["segs"]


def _ring_slice() -> tuple[np.ndarray, np.ndarray]:
    """A vertebra-like slice: a bright ring (bone) around a darker hole (canal) on a grey background, and a
    mask that fills the ring, hole included, as the 2D model does."""
    y, x = np.ogrid[:48, :48]
    r2 = (y - 24) ** 2 + (x - 24) ** 2
    image = np.full((48, 48), 60.0)
    image[r2 <= 14 ** 2] = 230
    image[r2 <= 7 ** 2] = 120
    return image.astype(np.uint8), r2 <= 14 ** 2


def test_wand_takes_the_clicks_intensity_region():
    image, mask = _ring_slice()
    hole = (np.ogrid[:48, :48][0] - 24) ** 2 + (np.ogrid[:48, :48][1] - 24) ** 2 <= 7 ** 2
    wand = Wand.at(image, mask, "bg", 24, 24)  # a background click in the hole the mask filled
    seed = np.zeros_like(mask)
    seed[24, 24] = True
    assert wand is not None and (wand.region(image, mask, "bg", seed) == hole).all()  # the hole, not the ring
    missed = mask & ~hole
    missed[:, :24] = False  # the mask left out the right half of the ring
    kept = mask & ~missed
    seed = np.zeros_like(mask)
    seed[24, 34] = True
    added = Wand.at(image, kept, "fg", 24, 34).region(image, kept, "fg", seed)
    assert added.any() and not (added & ~missed).any()  # grows over the ring only, not into the background
    flat = np.full_like(image, 100)
    assert Wand.at(flat, mask, "bg", 24, 24) is None  # no contrast: the wand does not guess


def _state(masks: np.ndarray, size: int | None = None) -> ClassState:
    return ClassState(masks, 0, masks.shape[0] - 1, size=size)


def test_a_foreground_click_settles_an_overlap():
    large, small = np.zeros((5, 20, 20), dtype=bool), np.zeros((5, 20, 20), dtype=bool)
    large[:, 2:16, 2:16] = True
    small[:, 10:18, 10:18] = True
    states = [_state(large), _state(small)]
    segs = collapse(states, large.shape)
    assert (segs[:, 12, 12] == 2).all()  # the smaller structure wins an overlap
    segs = collapse(states, large.shape, [[("fg", (2, 12, 12))], []])
    overlap = large & small
    assert (segs[overlap] == 1).all()  # the click on the large one's side gives it the overlap, on every slice
    assert (segs[small & ~large] == 2).all()
    # which class is "smaller" is fixed by the box step, not by masks that clicks have since resized
    states = [_state(large, size=int(large.sum())), _state(small.copy(), size=int(small.sum()))]
    states[0].masks[:, :10, :] = False
    states[0].masks[:, :, :10] = False  # the large one is now the smaller mask (36 voxels a slice against 64)
    assert (collapse(states, large.shape)[overlap] == 2).all()


def test_clicks_only_case_starts_from_the_first_foreground_click(tiny, tmp_path):
    imgs, gts = _volume()
    inputs = tmp_path / "in"
    clicks = [{"fg": [], "bg": [[4, 30, 30]]}, {"fg": [[3, 45, 57]], "bg": []}]
    write_npz(inputs / "c.npz", imgs=imgs, spacing=np.array([2.0, 1.0, 1.0]), clicks=np.array(clicks, dtype=object),
              clicks_order=np.array([["bg"], ["fg"]], dtype=object))
    run_challenge(inputs, tmp_path / "out", tiny, "tiny", "")
    segs = read_case_segs(tmp_path / "out" / "c.npz")
    assert not (segs == 1).any()  # a background click alone segments nothing
    assert segs[3, 45, 57] == 2


def test_an_extension_goes_as_far_as_the_structure_is_deep(tiny):
    """Onto slices without the structure a correction stops `reach` slices from the click, even where the model
    would find "the structure" on every slice (a 2D model drifting into a neighbour); a foreground click's
    addition is checked against the nearest slice holding the structure, and a first click against nothing."""
    imgs, _ = _volume()
    predictor = MultiOrganPredictor(tiny)
    segmenter = Segmenter(predictor, EmbeddingCache(predictor, imgs, None), imgs.shape, "box", spacing=(2.0, 1.0, 1.0))
    state = ClassState(np.zeros(imgs.shape, dtype=bool), 1, 1, {1}, 1)
    edit = disk(imgs.shape[1:], 30, 30, 6)
    state.masks[1] = edit
    segmenter._carry_correction(state, "fg", edit, 1, 1, lambda z, old, previous: previous, reach=3.0)
    assert state.masks.any(axis=(1, 2)).tolist() == [False, True, True, True, True, False, False, False]
    assert Segmenter._area_near(state, 7) == edit.sum()  # an empty slice: the nearest slice's area
    assert Segmenter._area_near(ClassState(np.zeros(imgs.shape, dtype=bool), 0, 0), 3) == float("inf")


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["challenge", "--inputs", str(tmp_path / "in"), "--outputs", str(tmp_path / "out"),
                 "--model", "litemedsam", "--no-adapter"]) == 2
    assert "sam-peft challenge: error: --inputs" in capsys.readouterr().err
    imgs, gts = _volume()
    write_npz(tmp_path / "in" / "c.npz", imgs=imgs, spacing=np.array([1.0, 1.0, 1.0]),
              clicks=np.array([{"fg": [[99, 0, 0]], "bg": []}], dtype=object))
    assert main(["challenge", "--inputs", str(tmp_path / "in"), "--outputs", str(tmp_path / "out"),
                 "--model", "litemedsam", "--no-adapter"]) == 2
    assert "class 1 fg click [99, 0, 0] is not a [z, y, x] voxel" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_on_a_ct_crop(totalseg_dir, litemedsam, tmp_path):
    """LiteMedSAM zero-shot on 8 slices of the real CT (liver, spleen): the box step segments both well and
    the five clicks do not lower the Dice; as a clicks-only case the clicks raise it."""
    from sam_peft.data.readers import read_volume, to_display
    from sam_peft.data.prepare import PrepareOptions, to_unit_range

    ct = to_display(read_volume(totalseg_dir / "example_ct.nii.gz"))
    label = to_display(read_volume(totalseg_dir / "example_seg_fast_force_split.nii.gz", "label")).array
    crop = slice(90, 98)
    imgs = np.rint(to_unit_range(ct.array[crop], PrepareOptions())[0]).astype(np.uint8)
    gts = np.zeros(imgs.shape, dtype=np.uint8)
    gts[label[crop] == 5], gts[label[crop] == 1] = 1, 2  # liver, spleen
    write_case(tmp_path / "cases" / "crop.npz", imgs, gts, ct.spacing)

    def predict(inputs, outputs):
        run_challenge(inputs, outputs, litemedsam, "litemedsam", tmp_path / "cache", log=lambda _: None)

    record = evaluate_protocol(tmp_path / "cases", predict, tmp_path / "eval")["cases"][0]
    assert record["dsc"][0] > 0.85
    assert record["dsc_final"] >= record["dsc"][1] - 0.005
    # clicks only (same slices, cached embeddings): started by the first click, grown by the next four
    write_case(tmp_path / "clicks" / "crop.npz", imgs, gts, ct.spacing, boxes=False)
    record = evaluate_protocol(tmp_path / "clicks", predict, tmp_path / "eval_clicks")["cases"][0]
    assert record["dsc"][1] > 0.3 and record["dsc_final"] > record["dsc"][1] + 0.15, record["dsc"]


def test_evaluate_protocol_cvpr25_from_the_command_line(tmp_path, capsys):
    """`sam-peft evaluate --protocol cvpr25` runs the participant's --command six times, each a fresh process."""
    imgs, gts = _volume()
    write_case(tmp_path / "cases" / "c.npz", imgs, gts, (2.0, 1.0, 1.0), ["blob", "block"])
    program = tmp_path / "predict.py"  # a participant that segments the block everywhere and nothing else
    program.write_text(
        "import sys, pathlib, numpy as np\n"
        "inputs, outputs = map(pathlib.Path, sys.argv[1:])\n"
        "outputs.mkdir(parents=True, exist_ok=True)\n"
        "for case in inputs.glob('*.npz'):\n"
        "    segs = np.zeros(np.load(case, allow_pickle=True)['imgs'].shape, np.uint8)\n"
        "    segs[2:6, 40:50, 52:64] = 2\n"
        "    np.savez_compressed(outputs / case.name, segs=segs)\n")
    code = main(["evaluate", "--protocol", "cvpr25", "--data", str(tmp_path / "cases"), "--output",
                 str(tmp_path / "eval"), "--command", f"{sys.executable} {program} {{inputs}} {{outputs}}"])
    out = capsys.readouterr().out
    assert code == 0 and "DSC per step 0.5000 0.5000" in out, out
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    assert summary["dsc_per_step"] == pytest.approx([0.5] * 6)  # class 2 perfect, class 1 missed, every step
    assert (tmp_path / "eval" / "metrics.csv").exists()


def test_auto_propagation_follows_the_model():
    from sam_peft.cvpr25.options import propagation_for

    assert propagation_for("auto", has_adapter=True) == "box+mask+point"
    assert propagation_for("auto", has_adapter=False) == "box"
    assert propagation_for("box+mask", has_adapter=True) == "box+mask"
