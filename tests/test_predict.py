"""Interactive prediction and volume inference with the real LiteMedSAM on the real CT (NIfTI and DICOM)."""
import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sam_peft.cli import main
from sam_peft.data import Volume, prepare, read_volume, to_display
from sam_peft.demo import demo_config, demo_data
from sam_peft.data.readers import reorient
from sam_peft.evaluation import MultiOrganPredictor, Prediction, evaluate, predict_volume
from sam_peft.models import load_adapter
from sam_peft.models.decoding import sam_of
from sam_peft.prompts import make_prompt
from sam_peft.training import train

TOTALSEG_IDS = {"spleen": 1, "kidney_right": 2, "liver": 5, "stomach": 6}
CROP = (98, 102)  # display axial slices: liver and spleen throughout, the right kidney ends at slice 101

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ct_slice(totalseg_dir, tmp_path_factory):
    """Display slice 96 of the real CT, prepared as `sam-peft prepare` does."""
    prepared = prepare(totalseg_dir / "example_ct.nii.gz", totalseg_dir / "example_seg_fast_force_split.nii.gz",
                       output=tmp_path_factory.mktemp("ct") / "prepared", label_map="totalsegmentator")["train"]
    return prepared.select([prepared["slice_index"].index(96)])


@pytest.fixture(scope="module")
def ct_crop(totalseg_dir) -> tuple[Volume, Volume]:
    """The CROP slices of the real CT and its labels, in display orientation, with the matching affine."""
    image = to_display(read_volume(totalseg_dir / "example_ct.nii.gz"))
    label = to_display(read_volume(totalseg_dir / "example_seg_fast_force_split.nii.gz", "label"))
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 0] * CROP[0]  # voxel (CROP[0], 0, 0) becomes the first
    return (Volume(image.array[CROP[0]:CROP[1]], affine, "ct"),
            Volume(label.array[CROP[0]:CROP[1]].astype(np.uint8), affine, "seg"))


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------------------------------ predictor


def test_predictor_matches_evaluate_and_refines(litemedsam, ct_slice):
    metrics = evaluate(litemedsam, ct_slice, behaviours=["tight_box", "center_click"], noc=False,
                       organs=list(TOTALSEG_IDS), progress=False)
    row = ct_slice.with_format("numpy")[0]
    image, label = row["image"], row["label"]
    masks = {organ: label == k for organ, k in TOTALSEG_IDS.items() if (label == k).sum() >= 100}
    prompts = {behaviour: {} for behaviour in ("tight_box", "center_click")}
    for behaviour, per_organ in prompts.items():
        for organ, mask in masks.items():
            points, labels = make_prompt(behaviour, mask, np.random.default_rng(0))
            per_organ[organ] = {"box": points.ravel().tolist()} if behaviour == "tight_box" else \
                {"points": points.tolist(), "labels": labels.tolist()}

    encoded = []
    hook = sam_of(litemedsam).vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    try:
        predictor = MultiOrganPredictor(litemedsam)
        predictor.set_image(image)
        results = {behaviour: predictor.predict(p) for behaviour, p in prompts.items()}
        mixed = predictor.predict({"liver": prompts["tight_box"]["liver"], "spleen": prompts["center_click"]["spleen"]})
    finally:
        hook.remove()
    assert encoded == [1]  # one embedding for every prompt
    for behaviour, predictions in results.items():
        assert list(predictions) == list(masks)
        for organ, prediction in predictions.items():
            assert isinstance(prediction, Prediction) and prediction.mask.shape == label.shape
            assert prediction.low_res_logits.shape == (256, 256) and isinstance(prediction.score, float)
            expected = metrics["dice"][behaviour]["per_organ"][organ]
            assert _dice(prediction.mask, masks[organ]) == pytest.approx(expected, abs=1e-6)
    assert metrics["dice"]["tight_box"]["per_organ"]["liver"] > 0.8
    np.testing.assert_array_equal(mixed["liver"].mask, results["tight_box"]["liver"].mask)
    np.testing.assert_array_equal(mixed["spleen"].mask, results["center_click"]["spleen"].mask)

    # refinement: the previous logits as mask prompt, box and clicks together
    liver = results["tight_box"]["liver"]
    refined = predictor.predict({"liver": {**prompts["tight_box"]["liver"], **prompts["center_click"]["liver"]}},
                                mask_inputs={"liver": liver.low_res_logits})
    assert refined["liver"].mask.shape == label.shape
    assert not np.array_equal(refined["liver"].low_res_logits, liver.low_res_logits)


def test_predictor_rejects_bad_prompts(litemedsam):
    predictor = MultiOrganPredictor(litemedsam)
    box = {"box": [10, 10, 40, 30]}
    with pytest.raises(RuntimeError, match="call set_image"):
        predictor.predict({"liver": box})
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (60, 80), dtype=np.uint8))
    bad = [
        ({"liver": {"box": [10, 10, 90, 30]}}, r"organ 'liver': coordinates \[\[90.0, 30.0\]\] lie outside the 80x60 "),
        ({"liver": box, "spleen": {"points": [[5, -1]], "labels": [1]}},
         r"organ 'spleen': coordinates \[\[5.0, -1.0\]\]"),
        ({"liver": {"box": [40, 10, 10, 30]}}, "x0 < x1"),
        ({"liver": {"box": [1, 2, 3]}}, r"box must be \[x0, y0, x1, y1\]"),
        ({"liver": {"points": [[5, 5]]}}, "'points' and 'labels'"),
        ({"liver": {"points": [[5, 5]], "labels": [2]}}, "each 1 \\(positive\\) or 0"),
        ({"liver": {"mask": 1}}, "a prompt is"),
        ({}, "at least one organ"),
    ]
    for prompts, message in bad:
        with pytest.raises(ValueError, match=message):
            predictor.predict(prompts)
    with pytest.raises(ValueError, match=r"mask_inputs for \['spleen'\] have no prompt"):
        predictor.predict({"liver": box}, mask_inputs={"spleen": torch.zeros(256, 256)})
    with pytest.raises(ValueError, match=r"must be \(256, 256\) low-res logits"):
        predictor.predict({"liver": box}, mask_inputs={"liver": torch.zeros(64, 64)})
    out = predictor.predict({"liver": box, "spleen": {"points": [[50, 40], [60, 45]], "labels": [1, 0]}})
    assert out["liver"].mask.shape == (60, 80) and out["spleen"].low_res_logits.shape == (256, 256)


def test_set_image_takes_display_images_and_windowed_hounsfield_units(litemedsam, ct_slice, totalseg_dir):
    """HU with a window must give exactly what `prepare`'s uint8 slice gives; ambiguous images are refused."""
    row = ct_slice.with_format("numpy")[0]
    hu = to_display(read_volume(totalseg_dir / "example_ct.nii.gz")).array[row["slice_index"]]
    prompts = {"liver": {"box": _box(row["label"] == TOTALSEG_IDS["liver"])}}
    predictor = MultiOrganPredictor(litemedsam)
    predictor.set_image(row["image"].astype(np.uint8))
    embedding, expected = predictor.embeddings, predictor.predict(prompts)["liver"]
    for image, window in [(hu.astype(np.float32), "abdomen"), (hu.astype(np.int16), (40, 400)),
                          (row["image"].astype(np.int64), None),  # how `datasets` hands out a uint8 column
                          (np.repeat(row["image"][..., None], 3, axis=-1).astype(np.uint8), None)]:  # RGB
        predictor.set_image(image, window=window)
        assert torch.equal(predictor.embeddings, embedding), (image.dtype, window)
        np.testing.assert_array_equal(predictor.predict(prompts)["liver"].mask, expected.mask)

    nan = hu.astype(np.float32)
    nan[3, 4] = np.nan
    bad = [
        (hu / hu.max(), None, r"float64 image of shape \(101, 122\) with values in \[-1.42\d*, 1.0\] without a "
         "window; pass window="),
        (hu.astype(np.int16), None, r"int16 image .* with values in \[-1039, 730\] without a window"),
        (np.full((8, 8), 256), None, "without a window"),
        (nan, "abdomen", r"1 pixel\(s\) of the float32 image .* are NaN or infinite"),
        (np.full((4, 4), np.inf), "abdomen", "NaN or infinite"),
        (np.zeros((0, 0), np.float32), "abdomen", "empty float32 image of shape \\(0, 0\\)"),
        (np.zeros((0, 5), np.uint8), None, "empty uint8 image"),
        (np.zeros((8, 8, 4), np.uint8), None, r"expected \(H, W\), \(H, W, 1\) or \(H, W, 3\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), None, "expected"),
        (np.zeros(8, np.uint8), None, "expected"),
        (row["label"] > 0, None, "bool image"),
        (np.zeros((8, 8), np.complex64), "abdomen", "complex64 image"),
        (row["image"].astype(np.uint8), "abdomen", "a window applies to Hounsfield units only"),
        (np.zeros((8, 8, 3), np.float32), "abdomen", "Hounsfield units have one channel"),
        (hu.astype(np.float32), "narrow", "window must be one of"),
    ]
    for image, window, message in bad:
        with pytest.raises(ValueError, match=message):
            predictor.set_image(image, window=window)
    assert predictor.embeddings is not None and torch.equal(predictor.embeddings, embedding)  # the last good image


def test_predictor_sends_every_input_to_the_models_device(litemedsam, tmp_path):
    """A model on the meta device runs nothing, but raises a device mismatch as soon as a CPU tensor reaches it:
    the encoder must get its pixels there, and the decoder must get its prompts and mask inputs there, so that
    decoding stops only at an operator the meta device lacks (unique, used to group regions by prompt)."""
    cpu = MultiOrganPredictor(litemedsam)
    cpu.set_image(np.zeros((60, 80), np.uint8))
    first = cpu.predict({"liver": {"box": [10, 10, 40, 30]}})["liver"]
    assert isinstance(first.mask, np.ndarray) and isinstance(first.low_res_logits, np.ndarray)
    assert first.low_res_logits.dtype == np.float32 and isinstance(first.score, float)

    predictor = MultiOrganPredictor(copy.deepcopy(litemedsam).to("meta"))
    predictor.set_image(np.zeros((60, 80), np.uint8))
    assert predictor.embeddings.device.type == "meta"
    for prompts, mask_inputs in [({"liver": {"box": [10, 10, 40, 30]}}, None),
                                 ({"liver": {"points": [[20, 20]], "labels": [1]}},
                                  {"liver": first.low_res_logits})]:
        with pytest.raises(NotImplementedError, match="Meta"):
            predictor.predict(prompts, mask_inputs=mask_inputs)


# ------------------------------------------------------------------------------------------ volumes


def test_predict_volume_non_ras_nifti(litemedsam, ct_crop, tmp_path):
    image, label = (reorient(v, ("P", "I", "R")) for v in ct_crop)  # stored neither RAS nor in display order
    nib.save(nib.Nifti1Image(image.array.astype(np.int16), image.affine), tmp_path / "ct.nii.gz")
    seed = 1  # display slice 99
    shown = ct_crop[1].array[seed]
    prompts = {organ: {"slices": {str(seed): {"box": _box(shown == TOTALSEG_IDS[organ])}}}
               for organ in ("liver", "spleen", "kidney_right")}
    info = predict_volume(litemedsam, tmp_path / "ct.nii.gz", prompts, "totalsegmentator", tmp_path / "labels.nii.gz",
                          progress=False)

    written = nib.load(tmp_path / "labels.nii.gz")
    assert written.shape == image.array.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    sidecar = json.loads((tmp_path / "labels.json").read_text())
    assert sidecar == info and sidecar["labels"] == {"1": "spleen", "2": "kidney_right", "5": "liver"}
    out = np.asarray(written.dataobj)
    for organ in ("liver", "spleen"):
        assert _dice(out == TOTALSEG_IDS[organ], label.array == TOTALSEG_IDS[organ]) > 0.8
    shown_out = to_display(Volume(out, written.affine, "out")).array
    assert all((shown_out[z] == TOTALSEG_IDS["liver"]).sum() > 500 for z in range(len(shown_out)))  # propagated
    kidney = [z for z in range(len(shown_out)) if (shown_out[z] == TOTALSEG_IDS["kidney_right"]).any()]
    assert kidney == [0, 1, 2]  # down to the crop's end and up to slice 100: the kidney ends at 101
    assert info["voxels"]["liver"] == (out == TOTALSEG_IDS["liver"]).sum()


def test_predict_volume_keeps_a_prompted_slice_below_min_pixels(litemedsam, ct_crop, tmp_path, capsys):
    nib.save(nib.Nifti1Image(ct_crop[0].array.astype(np.int16), ct_crop[0].affine), tmp_path / "ct.nii.gz")
    kidney = ct_crop[1].array[1] == TOTALSEG_IDS["kidney_right"]
    info = predict_volume(litemedsam, tmp_path / "ct.nii.gz", {"kidney_right": {"slices": {"1": {"box": _box(kidney)}}}},
                          "totalsegmentator", tmp_path / "labels.nii.gz", min_pixels=10**6)
    out = np.asarray(nib.load(tmp_path / "labels.nii.gz").dataobj)  # the crop is stored in display order
    assert [z for z in range(len(out)) if out[z].any()] == [1]  # kept, though far below min_pixels
    assert _dice(out[1] == TOTALSEG_IDS["kidney_right"], kidney) > 0.8
    stops = info["propagation"]["kidney_right"]
    assert stops["slices"] == [1, 1]
    assert [(s["slice"], s["direction"]) for s in stops["stops"]] == [(0, "down"), (2, "up")]
    assert all("pixels (< 1000000)" in s["reason"] for s in stops["stops"])
    printed = capsys.readouterr().out
    assert "kidney_right: stopped at slice 2 (up): the mask has" in printed


def _chain_of(mask: np.ndarray, scores=(0.9,)):
    from sam_peft.evaluation.volume import _Chain

    return _Chain(0, np.flatnonzero(mask), int(mask.sum()), tuple(scores))


def test_stop_rule_reasons():
    """Each way an organ ends stops propagation with its reason; a uniformly low IoU estimate does not."""
    from sam_peft.evaluation.volume import StopRule

    rule = StopRule()
    organ = np.zeros((40, 40), bool)
    organ[10:30, 10:30] = True  # 400 px
    chain = _chain_of(organ, scores=(0.9, 0.92, 0.91))
    shifted = np.roll(organ, 2, axis=1)
    assert rule.reason(np.flatnonzero(shifted), 0.9, chain) is None  # the organ, moved a little
    assert rule.reason(np.flatnonzero(shifted), 0.76, chain) is None  # lower estimate, still above min_score
    assert "IoU estimate 0.70 is below 0.75 and more than 0.1 below the organ's median 0.91" in \
        rule.reason(np.flatnonzero(shifted), 0.70, chain)
    low = _chain_of(organ, scores=(0.66, 0.70, 0.68))  # a fine-tuned head that rates every mask low
    assert rule.reason(np.flatnonzero(shifted), 0.65, low) is None
    assert "below 0.75" in rule.reason(np.flatnonzero(shifted), 0.5, low)
    elsewhere = np.zeros_like(organ)
    elsewhere[0:10, 30:40] = True
    assert "shares 0% of its pixels with slice 0's (< 50%): it left the organ" in \
        rule.reason(np.flatnonzero(elsewhere), 0.95, chain)
    remnant = np.zeros_like(organ)
    remnant[15:20, 15:20] = True  # 25 px inside the organ: 6% of its largest
    assert "is 6% of the organ's largest (400 px, < 10%): the organ ended" in \
        rule.reason(np.flatnonzero(remnant), 0.95, chain)
    assert rule.reason(np.flatnonzero(remnant)[:5], 0.95, chain).startswith("the mask has 5 pixels (< 10)")


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory):
    """An adapter from the short demo recipe (`sam-peft demo`'s data and `demo_config`: 9 optimizer steps on
    cached embeddings); validated on tight boxes only, which does not change the adapter."""
    config = demo_config(tmp_path_factory.mktemp("demo"), eval_behaviours=["tight_box"])
    demo_data(config)
    train(config, overwrite=True)
    return load_adapter(Path(config.output_dir) / "adapter")


@pytest.mark.slow
def test_demo_adapter_propagates_the_liver_as_far_as_the_base(litemedsam, demo_adapter, totalseg_dir, tmp_path):
    """The demo's adapter rates good masks lower than the base (its IoU head is calibrated on the training mix
    after 9 steps); a plain IoU threshold stopped its propagation after a slice or two. One box on the liver's
    middle slice must carry it as far and as well as the base: the margin (0.05 volume Dice, 90% of the base's
    slices) allows the adapter's own per-slice Dice on this CT, which it never saw, and would fail if
    propagation lost more than a few of the liver's 43 slices."""
    label = to_display(read_volume(totalseg_dir / "example_seg_fast_force_split.nii.gz", "label")).array
    liver = label == TOTALSEG_IDS["liver"]
    prompts = {"liver": {"slices": {"90": {"box": _box(liver[90])}}}}
    results = {}
    for name, model in (("base", litemedsam), ("adapter", demo_adapter)):
        output = tmp_path / f"{name}.nii.gz"
        info = predict_volume(model, totalseg_dir / "example_ct.nii.gz", prompts, "totalsegmentator", output,
                              progress=False)
        out = to_display(read_volume(output, "label")).array == TOTALSEG_IDS["liver"]
        kept = {z for z in range(len(out)) if out[z].any()}
        results[name] = (_dice(out, liver), kept, info["propagation"]["liver"])
    (base_dice, base_kept, _), (dice, kept, record) = results["base"], results["adapter"]
    assert base_dice > 0.4 and len(base_kept) >= 20  # the base itself carries the box through the liver
    assert dice >= base_dice - 0.05, (results, record)
    assert len(kept & base_kept) >= 0.9 * len(base_kept), (results, record)


def _write_dicom_series(folder, hu: np.ndarray, spacing: float) -> None:
    """(slices, rows, cols) in display orientation as an axial CT series (LPS: rows run +y, columns +x)."""
    folder.mkdir()
    series = generate_uid()
    for k, pixels in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-150.0, -120.0, 40.0 + k * spacing], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], spacing
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (pixels + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)


def test_cli_predict_dicom_series_with_box3d(ct_crop, tmp_path, capsys):
    image, label = (v.array for v in ct_crop)
    _write_dicom_series(tmp_path / "series", image.astype(np.int16), 3.0)
    x0, y0, x1, y1 = _box((label[2:4] == TOTALSEG_IDS["liver"]).any(0))
    (tmp_path / "prompts.json").write_text(json.dumps({"Liver": {"box3d": [x0, y0, 2, x1, y1, 3]}}))
    code = main(["predict", "--input", str(tmp_path / "series"), "--prompts", str(tmp_path / "prompts.json"),
                 "--output", str(tmp_path / "out" / "labels.nii.gz")])
    assert code == 0 and "liver" in capsys.readouterr().out
    source = read_volume(tmp_path / "series")
    written = nib.load(tmp_path / "out" / "labels.nii.gz")
    assert written.shape == source.array.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    out = np.asarray(written.dataobj)  # the DICOM grid is the display grid here
    assert all(_dice(out[z] == 5, label[z] == 5) > 0.8 for z in (2, 3)) and not out[:2].any()  # only z0..z1
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["labels"] == {"5": "liver"}


def test_predict_volume_bad_input(litemedsam, ct_crop, tmp_path):
    nib.save(nib.Nifti1Image(ct_crop[0].array.astype(np.int16), ct_crop[0].affine), tmp_path / "ct.nii.gz")
    box = {"box": [10, 10, 40, 30]}
    bad = [
        ({"brain_stem": {"slices": {"2": box}}}, r"organ 'brain_stem' \(did you mean 'brain'\?\) is not in the label "
         r"map 'totalsegmentator'; valid organs are \['spleen', 'kidney_right'"),
        ({"liver": {"slices": {"40": box}}}, r"slice index '40' is out of range: the volume has 4 axial slices"),
        ({"liver": {"slices": {"2": {"box": [0, 0, 500, 50]}}}}, r"organ 'liver' on slice 2: coordinates "
         r"\[\[500.0, 50.0\]\] lie outside the 122x101 image"),
        ({"liver": {"box3d": [1, 2, 3, 4, 5]}}, r"box3d must be \[x0, y0, z0, x1, y1, z1\]"),
        ({"liver": {"box3d": [1, 2, 3, 4, 5, 2]}}, "z0 <= z1"),
        ({"liver": {"slices": [box]}}, "expected {'slices'"),
        ({}, "prompts must map organ names"),
    ]
    for prompts, message in bad:
        with pytest.raises(ValueError, match=message):
            predict_volume(litemedsam, tmp_path / "ct.nii.gz", prompts, "totalsegmentator", tmp_path / "out.nii.gz")
    with pytest.raises(ValueError, match="must be a NIfTI file name"):
        predict_volume(litemedsam, tmp_path / "ct.nii.gz", {"liver": {"slices": {"2": box}}}, "totalsegmentator",
                       tmp_path / "out.png")
    with pytest.raises(FileNotFoundError, match="prompts file"):
        predict_volume(litemedsam, tmp_path / "ct.nii.gz", tmp_path / "none.json", ["liver"], tmp_path / "out.nii.gz")
    (tmp_path / "broken.json").write_text("{liver")
    with pytest.raises(ValueError, match="is not valid JSON"):
        predict_volume(litemedsam, tmp_path / "ct.nii.gz", tmp_path / "broken.json", ["liver"], tmp_path / "out.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "ct.nii.gz"]  # nothing half-written
