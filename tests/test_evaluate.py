"""Evaluation with simulated users: metrics, the protocol on real CT with the real LiteMedSAM, batching, report."""
import importlib
import json
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from PIL import Image
from scipy.ndimage import binary_erosion
from transformers import SamConfig, SamModel

from sam_peft.cli import main
from sam_peft.data import Volume, VolumeCase, make_phantom, prepare, prepare_volumes, read_metadata
from sam_peft.evaluation import (EVAL_BEHAVIOURS, MultiOrganPredictor, clicks_to_reach, dice_from_counts, evaluate,
                                 surface_dice)
from sam_peft.evaluation.metrics import iou_from_counts
from sam_peft.models import apply_lora, processor_for, save_adapter
from sam_peft.models.decoding import encode_images, sam_of
from sam_peft.prompts import make_prompt, next_clicks

ORGANS = ["spleen", "kidney_left", "liver"]
evaluate_module = importlib.import_module("sam_peft.evaluation.evaluate")  # the package exports the function
CT_SLICES = [88, 96]  # display axial slices of the real CT, each with 3 of ORGANS (>= 100 px)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_sam() -> SamModel:
    """A random tiny SAM (128 px input, 32 px low-res masks): fast, for logic that any model must satisfy."""
    torch.manual_seed(0)
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=128,
                           patch_size=16, output_channels=32, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=dict(image_size=128, patch_size=16, image_embedding_size=8, hidden_size=32),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    return SamModel(config).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_sam()


@pytest.fixture(scope="module")
def real_ct(totalseg_dir, tmp_path_factory):
    """The real CT prepared as `sam-peft prepare` does, cut down to CT_SLICES."""
    prepared = prepare(totalseg_dir / "example_ct.nii.gz", totalseg_dir / "example_seg_fast_force_split.nii.gz",
                       output=tmp_path_factory.mktemp("ct") / "prepared", label_map="totalsegmentator")
    train = prepared["train"]
    return train.select([train["slice_index"].index(z) for z in CT_SLICES])


@pytest.fixture(scope="module")
def mixed_shapes():
    """Phantom cases of two slice sizes (stored as nested lists), prepared in memory."""
    cases = []
    for i, shape in enumerate([(6, 64, 64), (6, 72, 80)]):
        image, label, affine = make_phantom(i, shape=shape)
        cases.append(VolumeCase(f"case{i}", Volume(image, affine, f"case{i}"), Volume(label, affine, f"case{i}")))
    return prepare_volumes(cases, label_map="flare22")["train"]


def _count_encoded(model) -> tuple[list[int], object]:
    images = []
    hook = sam_of(model).vision_encoder.register_forward_hook(lambda module, args, out: images.append(len(args[0])))
    return images, hook


# ------------------------------------------------------------------------------------------ metrics


def test_dice_and_iou_from_counts():
    np.testing.assert_allclose(dice_from_counts([5, 0, 0], [10, 0, 3], [10, 0, 4]), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(iou_from_counts([5, 0, 0, 4], [10, 0, 3, 4], [10, 0, 4, 8]), [1 / 3, 1.0, 0.0, 0.5])


def _brute_force_nsd(pred, target, spacing, tolerance):
    """NSD from its definition: surface pixels (a 4-neighbour outside the mask) and all pairwise distances."""
    surfaces = [np.argwhere(m & ~binary_erosion(m, border_value=0)) * np.asarray(spacing) for m in (pred, target)]
    d = np.linalg.norm(surfaces[0][:, None] - surfaces[1][None], axis=-1)
    return ((d.min(1) <= tolerance).sum() + (d.min(0) <= tolerance).sum()) / (d.shape[0] + d.shape[1])


def test_surface_dice_matches_its_definition_with_anisotropic_spacing():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :50]
    target = (yy - 20) ** 2 / 150 + (xx - 8) ** 2 / 60 < 1  # touches the left border
    pred = target ^ (rng.random(target.shape) < 0.03)
    pred[5:9, 30:45] = True  # a false-positive blob
    for spacing in [(1.0, 1.0), (3.0, 0.7), (0.5, 2.5)]:
        assert surface_dice(pred, target, spacing, 2.0) == pytest.approx(_brute_force_nsd(pred, target, spacing, 2.0))
    assert surface_dice(target, target, (3.0, 3.0)) == 1.0
    shifted = np.roll(target, 1, axis=1)
    assert surface_dice(shifted, target, (1.0, 1.9)) == 1.0  # 1.9 mm apart: within the 2 mm tolerance
    assert surface_dice(shifted, target, (1.0, 2.1)) < 0.8  # 2.1 mm: the left and right edges no longer count
    empty = np.zeros_like(target)
    assert surface_dice(empty, empty, (1.0, 1.0)) == 1.0
    assert surface_dice(empty, target, (1.0, 1.0)) == 0.0


def test_clicks_to_reach():
    curves = np.array([[0.5, 0.86, 0.95], [0.9, 0.95, 0.99], [0.1, 0.2, 0.3]])
    assert clicks_to_reach(curves, 0.85).tolist() == [2, 1, 3]
    assert clicks_to_reach(curves, 0.90).tolist() == [3, 1, 3]  # never reached: counts the maximum
    with pytest.raises(ValueError, match="at least one click"):
        clicks_to_reach(np.zeros((2, 0)), 0.85)


# ------------------------------------------------------------------------------------------ the protocol


def test_real_ct_protocol_and_report(litemedsam, real_ct, tmp_path):
    data = real_ct.select([1])
    images, hook = _count_encoded(litemedsam)
    try:
        metrics = evaluate(litemedsam, data, behaviours=EVAL_BEHAVIOURS, max_clicks=5, organs=ORGANS,
                           output_dir=tmp_path, progress=False)
    finally:
        hook.remove()
    assert images == [1]  # encoded once, for every behaviour and click
    names = read_metadata(data)["organ_names"]
    expected = Counter(names[k - 1] for label in data.with_format("numpy")["label"]
                       for k, n in enumerate(np.bincount(label.ravel())) if k and n >= 100 and names[k - 1] in ORGANS)
    assert metrics["instances_per_organ"] == expected and metrics["n_instances"] == 3
    assert metrics["n_slices"] == 1 and metrics["n_cases"] == 1

    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for kind in ("dice", "nsd", "dice_3d", "iou_error"):
        assert list(metrics[kind]) == list(EVAL_BEHAVIOURS)
        for values in metrics[kind].values():
            assert 0 <= values["mean"] <= 1 and set(values["per_organ"]) == set(metrics["instances_per_organ"])
            assert all(0 <= v <= 1 for v in values["per_organ"].values())
    assert set(metrics["dice_3d"]["tight_box"]["per_case"]) == {"example_ct"}
    dice = {b: metrics["dice"][b]["mean"] for b in EVAL_BEHAVIOURS}
    assert dice["tight_box"] > 0.75 and dice["tight_box"] > dice["center_click"] + 0.4  # LiteMedSAM: boxes only
    assert metrics["spread"] == pytest.approx(max(list(dice.values())[:5]) - min(list(dice.values())[:5]))
    curve = metrics["dice_vs_clicks"]
    assert len(curve) == 5
    assert curve[0] == pytest.approx(dice["center_click"]) and curve[2] == pytest.approx(dice["clicks_3"])
    assert curve[4] == pytest.approx(dice["clicks_5"])
    assert 1 <= metrics["noc"]["85"] <= metrics["noc"]["90"] <= 5
    assert metrics["slices_per_second"] > 0

    for plot in ("dice_per_organ.png", "dice_vs_clicks.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG" and image.size[0] > 300
    report = (tmp_path / "metrics.md").read_text()
    assert "| organ | instances | tight_box |" in report and "NoC@85" in report and "IoU-head error" in report
    assert not list(tmp_path.glob(".tmp-*"))


def _plain_click_series(model, data, organs: list[str], n_clicks: int, done: float, seed: int = 0) -> dict:
    """The click series written plainly: MultiOrganPredictor, one organ at a time, the standard clicker, never a
    pixel twice, no more clicks once Dice >= `done`. Returns each organ's Dice curve and final |IoU error|."""
    names = read_metadata(data)["organ_names"]
    predictor, out = MultiOrganPredictor(model), {}
    for row, item in enumerate(data.with_format("numpy")):
        predictor.set_image(item["image"].astype(np.uint8))
        for organ in organs:
            k = names.index(organ) + 1
            target = item["label"] == k
            rng = np.random.default_rng([seed, row, k, EVAL_BEHAVIOURS.index("center_click")])
            (xy,), _ = make_prompt("center_click", target, rng)
            points, labels = [xy.tolist()], [1]
            clicked = torch.zeros(1, 1, *target.shape, dtype=torch.bool)
            clicked[0, 0, int(xy[1]), int(xy[0])] = True
            result = predictor.predict({organ: {"points": points, "labels": labels}})[organ]
            curve = []
            while True:
                inter, total = (result.mask & target).sum(), result.mask.sum() + target.sum()
                curve.append(2 * inter / total)
                if curve[-1] >= done or len(curve) == n_clicks:
                    break
                (click,), (label,) = next_clicks(torch.from_numpy(result.mask)[None, None],
                                                 torch.from_numpy(target)[None, None], clicked=clicked)
                x, y = click[0].long().tolist()
                assert not clicked[0, 0, y, x]
                clicked[0, 0, y, x] = True
                points.append([x, y])
                labels.append(int(label[0]))
                result = predictor.predict({organ: {"points": points, "labels": labels}},
                                           mask_inputs={organ: result.low_res_logits})[organ]
            out[row, organ] = (curve + [curve[-1]] * (n_clicks - len(curve)), abs(result.score - inter / (total - inter)))
    return out


def test_click_series_is_the_standard_protocol(litemedsam, real_ct, monkeypatch):
    """evaluate's batched series matches the plain loop, including instances that are done early."""
    done = 0.4  # zero-shot LiteMedSAM rarely reaches the real 0.9 in a few clicks; this shows the stop at work
    monkeypatch.setattr(evaluate_module, "DONE_DICE", done)
    data = real_ct.select([1])
    metrics = evaluate(litemedsam, data, behaviours=["clicks_3", "clicks_5"], max_clicks=5, organs=ORGANS,
                       progress=False)
    plain = _plain_click_series(litemedsam, data, ORGANS, 5, done)
    curves = np.array([curve for curve, _ in plain.values()])
    stopped = [len(set(curve[np.argmax(curve >= done):])) == 1 for curve in curves if (curve >= done).any()]
    assert len(stopped) >= 2 and all(stopped)  # some instances were done early, and stayed as they were
    assert metrics["dice_vs_clicks"] == pytest.approx(curves.mean(0), abs=1e-3)
    for organ in ORGANS:
        assert metrics["dice"]["clicks_5"]["per_organ"][organ] == pytest.approx(plain[0, organ][0][-1], abs=1e-3)
        assert metrics["iou_error"]["clicks_5"]["per_organ"][organ] == pytest.approx(plain[0, organ][1], abs=1e-3)


class _Reached(Exception):
    pass


def test_pixels_reach_the_encoder_on_the_model_device(mixed_shapes):
    """The model on another device than the data: the only other device a CPU machine has is `meta` (no data,
    so the run stops at the encoder's door, after checking what arrived there)."""
    model = _tiny_sam().to("meta")
    arrived = []

    def check(module, args):
        arrived.extend(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
        raise _Reached

    sam_of(model).vision_encoder.register_forward_pre_hook(check)
    with pytest.raises(_Reached):
        evaluate(model, mixed_shapes, behaviours=["tight_box"], noc=False, min_pixels=30, progress=False)
    assert arrived == ["meta"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_matches_cpu(real_ct):
    """Model on the GPU, data and a cached embedding table on the CPU: every tensor reaching a module must
    share that module's device, and the results must match the CPU's."""
    from sam_peft.models import load_base_model

    data, settings = real_ct.select([1]), dict(behaviours=["tight_box", "clicks_3"], max_clicks=3, organs=ORGANS,
                                               progress=False)
    on_cpu = evaluate(load_base_model("litemedsam"), data, **settings)
    model = load_base_model("litemedsam").cuda()
    mismatches = []

    def check(module, args, kwargs):
        own = {t.device for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
        given = {t.device for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)}
        if own and given - own:
            mismatches.append((type(module).__name__, given, own))

    hooks = [m.register_forward_pre_hook(check, with_kwargs=True) for m in model.modules()]
    processor = processor_for(model)
    with torch.inference_mode():
        cache = encode_images(model, torch.stack([processor.preprocess(im) for im in data.with_format("numpy")["image"]])
                              .cuda()).cpu()
    for cached in (None, cache):
        on_gpu = evaluate(model, data, image_embeddings=cached, **settings)
        for behaviour in settings["behaviours"]:
            assert on_gpu["dice"][behaviour]["mean"] == pytest.approx(on_cpu["dice"][behaviour]["mean"], abs=0.01)
        assert on_gpu["noc"]["85"] == pytest.approx(on_cpu["noc"]["85"], abs=0.5)
    for hook in hooks:
        hook.remove()
    assert not mismatches


def test_results_do_not_depend_on_batching(tiny_model, mixed_shapes):
    images, hook = _count_encoded(tiny_model)
    try:
        runs = [evaluate(tiny_model, mixed_shapes, behaviours=["jitter_box", "random_click", "clicks_3"], noc=False,
                         batch_size=batch_size, min_pixels=30, progress=False) for batch_size in (1, 4)]
    finally:
        hook.remove()
    per_case = Counter(case for case, label in zip(mixed_shapes["case_id"], mixed_shapes.with_format("numpy")["label"])
                       if (np.bincount(label.ravel())[1:] >= 30).any())
    assert runs[0]["n_slices"] == runs[1]["n_slices"] == sum(per_case.values())
    assert images == [1] * 2 * sum(per_case.values())  # each slice encoded once; on a CPU one image per call
    for behaviour in ("jitter_box", "random_click", "clicks_3"):
        for kind in ("dice", "nsd"):
            a, b = runs[0][kind][behaviour]["per_organ"], runs[1][kind][behaviour]["per_organ"]
            assert a == pytest.approx(b, abs=1e-6)
    assert runs[0]["dice_vs_clicks"] == pytest.approx(runs[1]["dice_vs_clicks"], abs=1e-6)
    assert runs[0]["noc"] is None and runs[0]["settings"]["split"] is None


def test_cached_embeddings_replace_the_encoder(tiny_model, mixed_shapes):
    processor = processor_for(tiny_model)
    with torch.inference_mode():
        cache = torch.cat([encode_images(tiny_model, processor.preprocess(image)[None])
                           for image in mixed_shapes.with_format("numpy")["image"]])
    settings = dict(behaviours=["jitter_box", "clicks_3"], noc=False, min_pixels=30, progress=False)
    images, hook = _count_encoded(tiny_model)
    try:
        cached = evaluate(tiny_model, mixed_shapes, image_embeddings=cache, **settings)
    finally:
        hook.remove()
    assert images == []
    fresh = evaluate(tiny_model, mixed_shapes, **settings)
    for behaviour in settings["behaviours"]:
        assert cached["dice"][behaviour]["per_organ"] == pytest.approx(fresh["dice"][behaviour]["per_organ"], abs=1e-6)
    with pytest.raises(ValueError, match=f"image_embeddings has 2 rows, the evaluated split {len(mixed_shapes)}"):
        evaluate(tiny_model, mixed_shapes, image_embeddings=cache[:2], **settings)


def test_validation_subset_restores_training_mode(tiny_model, mixed_shapes):
    tiny_model.train()
    metrics = evaluate(tiny_model, DatasetDict(validation=mixed_shapes), split="validation", behaviours=["tight_box"],
                       noc=False, min_pixels=30, progress=False)
    assert tiny_model.training
    tiny_model.eval()
    assert list(metrics["dice"]) == ["tight_box"] and metrics["dice_vs_clicks"] == [] and metrics["spread"] is None


def test_bad_input(tiny_model, mixed_shapes, tmp_path):
    with pytest.raises(ValueError, match=r"unknown behaviour\(s\) \['double_click'\]; valid behaviours are"):
        evaluate(tiny_model, mixed_shapes, behaviours=["tight_box", "double_click"])
    with pytest.raises(ValueError, match="is not a prepared dataset"):
        evaluate(tiny_model, tmp_path)
    with pytest.raises(ValueError, match=r"split 'test' is not in the dataset; it has \['train'\]"):
        evaluate(tiny_model, DatasetDict(train=mixed_shapes))
    with pytest.raises(ValueError, match=r"organ\(s\) 'brain' not in the dataset's label map"):
        evaluate(tiny_model, mixed_shapes, organs=["liver", "brain"])
    with pytest.raises(ValueError, match=r"organ\(s\) 'livr' \(did you mean 'liver'\?\) not in"):
        evaluate(tiny_model, mixed_shapes, organs=["livr"])
    with pytest.raises(ValueError, match="nothing to evaluate: no slice of the dataset holds an organ instance"):
        evaluate(tiny_model, mixed_shapes, min_pixels=10**6, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_evaluate(real_ct, tmp_path, capsys):
    DatasetDict(test=real_ct.select([0])).save_to_disk(str(tmp_path / "data"))
    code = main(["evaluate", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                 "--behaviours", "tight_box", "loose_box", "--no-noc", "--organs", "liver", "spleen"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_instances"] == 2 and metrics["noc"] is None and metrics["settings"]["split"] == "test"
    assert metrics["dice"]["tight_box"]["per_organ"]["spleen"] > 0.8
    assert "tight_box" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    save_adapter(apply_lora(_tiny_sam(), preset="decoder", verbose=False), tmp_path / "tiny_adapter")
    assert main(["evaluate", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "x"),
                 "--adapter", str(tmp_path / "tiny_adapter")]) == 2  # made for another base
    assert "adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()
