"""Every dataset layout written tiny, in its real file formats, then discovered and prepared."""
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from sam_peft.data import detect_layout, discover_cases, prepare
from sam_peft.data.label_maps import load_label_map
from sam_peft.data.layouts import read_dataset_labels
from sam_peft.data.readers import Volume, display_affine, read_volume, reorient
from test_data_readers import write_dicom_series

SHAPE = (3, 6, 5)  # slices, rows, columns in display order


def tiny_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """HU image and FLARE22 label (1 liver on the image left, 3 spleen on the right) in display order."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-200, 300, SHAPE).astype(np.int16)
    image[0, 0, 0] = -1000  # air, so `modality="auto"` picks CT
    label = np.zeros(SHAPE, np.uint8)
    label[:, 1:4, 0:2] = 1
    label[1:, 2:5, 3:5] = 3
    return image, label


def save_nifti(array: np.ndarray, path, spacing=(3.0, 1.0, 1.0)) -> None:
    """Save a display-order array as a conventional RAS NIfTI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ras = reorient(Volume(array, display_affine(spacing), str(path)), ("R", "A", "S"))
    nib.save(nib.Nifti1Image(ras.array, ras.affine), path)


def prepared_labels(dataset) -> dict[str, np.ndarray]:
    """case id -> label volume (slices stacked) of a prepared dataset."""
    rows = dataset["train"].with_format("numpy")
    cases = {}
    for row in rows:
        cases.setdefault(str(row["case_id"]), []).append(row["label"])
    return {case: np.stack(slices) for case, slices in cases.items()}


def to_names(compact: np.ndarray, label_map) -> np.ndarray:
    return np.array(["background", *load_label_map(label_map).organ_names])[compact]


FLARE_NAMES = np.array(["background", *load_label_map("flare22").organ_names])


def test_nnunet_layout(tmp_path):
    for i in (1, 2):
        image, label = tiny_case(i)
        save_nifti(image, tmp_path / f"imagesTr/FLARE22_Tr_000{i}_0000.nii.gz")
        save_nifti(image, tmp_path / f"imagesTr/FLARE22_Tr_000{i}_0001.nii.gz")  # a second channel: ignored
        save_nifti(label, tmp_path / f"labelsTr/FLARE22_Tr_000{i}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 3}}))
    assert detect_layout(tmp_path) == "nnunet"
    assert [c.case_id for c in discover_cases(tmp_path)] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert read_dataset_labels(tmp_path) == {0: None, 1: "liver", 3: "spleen"}
    dataset = prepare(tmp_path, label_map="flare22", output=tmp_path / "out", min_pixels=1)
    for i, labels in enumerate(prepared_labels(dataset).values(), 1):
        np.testing.assert_array_equal(FLARE_NAMES[labels], FLARE_NAMES[tiny_case(i)[1]])
    by_dataset_json = prepare(tmp_path, label_map="dataset", output=tmp_path / "out2", min_pixels=1)
    assert by_dataset_json["train"].info.description and prepared_labels(by_dataset_json)["FLARE22_Tr_0001"].max() == 2


def test_msd_layout_without_channel_suffix_and_junk_files(tmp_path):
    image, label = tiny_case(0)
    save_nifti(image, tmp_path / "imagesTr/liver_0.nii.gz")
    save_nifti(label, tmp_path / "labelsTr/liver_0.nii.gz")
    (tmp_path / "imagesTr/._liver_0.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "3": "spleen"}}))
    (case,) = discover_cases(tmp_path)
    assert case.case_id == "liver_0"
    labels = prepared_labels(prepare(tmp_path, label_map="dataset", output=tmp_path / "out", min_pixels=1))
    np.testing.assert_array_equal(to_names(labels["liver_0"], {1: "liver", 3: "spleen"}), FLARE_NAMES[label])


def test_missing_label_is_named(tmp_path):
    image, _ = tiny_case(0)
    save_nifti(image, tmp_path / "imagesTr/c_0000.nii.gz")
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(FileNotFoundError, match="no label for image .*c_0000.nii.gz"):
        discover_cases(tmp_path)


def test_synapse_layout(tmp_path):
    image, label = tiny_case(0)
    btcv = np.array([0, 6, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.uint8)[label]  # liver 6, spleen 1 in BTCV
    save_nifti(image, tmp_path / "img/img0001.nii.gz")
    save_nifti(btcv, tmp_path / "label/label0001.nii.gz")
    assert detect_layout(tmp_path) == "synapse"
    labels = prepared_labels(prepare(tmp_path, label_map="synapse8", output=tmp_path / "out", min_pixels=1))
    np.testing.assert_array_equal(to_names(labels["0001"], "synapse8"), FLARE_NAMES[label])


def test_totalsegmentator_layout_multilabel_and_segmentations(tmp_path):
    image, label = tiny_case(0)
    save_nifti(image, tmp_path / "s0001/ct.nii.gz")  # per-organ binary masks
    save_nifti((label == 1).astype(np.uint8), tmp_path / "s0001/segmentations/liver.nii.gz")
    save_nifti((label == 3).astype(np.uint8), tmp_path / "s0001/segmentations/spleen.nii.gz")
    save_nifti(image, tmp_path / "s0002/ct.nii.gz")  # one multi-label file with TotalSegmentator ids
    save_nifti(np.array([0, 5, 0, 1], np.uint8)[label], tmp_path / "s0002/seg.nii.gz")
    assert detect_layout(tmp_path) == "totalsegmentator"
    cases = discover_cases(tmp_path)
    assert [len(c.mask_paths) for c in cases] == [2, 0] and cases[1].label_path.name == "seg.nii.gz"
    labels = prepared_labels(prepare(tmp_path, output=tmp_path / "out", min_pixels=1))
    for case in ("s0001", "s0002"):
        np.testing.assert_array_equal(to_names(labels[case], "totalsegmentator"), FLARE_NAMES[label])
    save_nifti(label, tmp_path / "s0002/other.nii.gz")
    with pytest.raises(ValueError, match="several label files"):
        discover_cases(tmp_path)


def test_segmentations_with_organs_outside_the_map(tmp_path):
    image, label = tiny_case(0)
    save_nifti(image, tmp_path / "case/ct.nii.gz")
    save_nifti((label == 1).astype(np.uint8), tmp_path / "case/segmentations/liver.nii.gz")
    save_nifti((label == 3).astype(np.uint8), tmp_path / "case/segmentations/brain_stem.nii.gz")
    with pytest.raises(ValueError, match="'brain_stem' is not in the label map 'flare22'"):
        prepare(tmp_path, label_map="flare22", output=tmp_path / "out", min_pixels=1)
    kept = prepare(tmp_path, label_map="flare22", output=tmp_path / "out", min_pixels=1, ignore_unknown_labels=True)
    np.testing.assert_array_equal(prepared_labels(kept)["case"], (label == 1).astype(np.uint8))


def test_sam_med2d_layout(tmp_path):
    image, label = tiny_case(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    grey = (image[1] - image[1].min()).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "images/ct_slice_7.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "images/ct_slice.png")  # a prefix of the other name
    Image.fromarray((label[1] == 1).astype(np.uint8) * 255).save(tmp_path / "masks/ct_slice_7_liver_000.png")
    spleen = (label[1] == 3).astype(np.uint8) * 255
    for k, columns in enumerate((np.arange(5) < 4, np.arange(5) >= 4)):  # two spleen instances
        instance = Image.fromarray(np.where(columns, spleen, 0).astype(np.uint8))
        instance.save(tmp_path / f"masks/ct_slice_7_spleen_00{k}.png")
    assert detect_layout(tmp_path) == "sam_med2d"
    (case,) = discover_cases(tmp_path)  # ct_slice has no mask: left out
    assert case.case_id == "ct_slice_7" and sorted(o for o, _ in case.mask_paths) == ["liver", "spleen", "spleen"]
    dataset = prepare(tmp_path, label_map="dataset", output=tmp_path / "out", min_pixels=1)
    row = dataset["train"].with_format("numpy")[0]
    np.testing.assert_array_equal(row["image"], grey)  # 8-bit input is kept as is
    np.testing.assert_array_equal(to_names(row["label"], {1: "liver", 2: "spleen"}), FLARE_NAMES[label[1]])
    Image.fromarray(spleen).save(tmp_path / "masks/unknown_liver_000.png")
    with pytest.raises(ValueError, match="matches no image"):
        discover_cases(tmp_path)


def test_png_pairs_layout(tmp_path):
    image, label = tiny_case(0)
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    Image.fromarray((image[2] % 256).astype(np.uint8)).save(tmp_path / "images/a.png")
    Image.fromarray(label[2]).save(tmp_path / "labels/a.png")
    assert detect_layout(tmp_path) == "pairs"
    labels = prepared_labels(prepare(tmp_path, label_map="flare22", output=tmp_path / "out", min_pixels=1))
    np.testing.assert_array_equal(labels["a"][0], label[2])


def test_npz_folder_and_single_npz(tmp_path):
    image, label = tiny_case(0)
    np.savez(tmp_path / "case1.npz", imgs=image, gts=label, spacing=np.array([3.0, 1.0, 1.0]))
    assert detect_layout(tmp_path) == "npz" and detect_layout(tmp_path / "case1.npz") == "file"
    for images in (tmp_path, tmp_path / "case1.npz"):
        labels = prepared_labels(prepare(images, label_map="flare22", output=tmp_path / "out", min_pixels=1,
                                         overwrite=True))
        np.testing.assert_array_equal(labels["case1"], label)


def test_explicit_dicom_series_with_nifti_label(tmp_path):
    image, label = tiny_case(0)
    write_dicom_series(tmp_path / "dicom/patient1", image)
    geometry = read_volume(tmp_path / "dicom/patient1").affine
    ras = reorient(Volume(label, geometry, "label"), ("R", "A", "S"))  # label saved the usual NIfTI way
    nib.save(nib.Nifti1Image(ras.array, ras.affine), tmp_path / "patient1.nii.gz")
    (case,) = discover_cases(tmp_path / "dicom/patient1", tmp_path / "patient1.nii.gz")
    assert case.case_id == "patient1"
    labels = prepared_labels(prepare(case.image_path, case.label_path, label_map="flare22",
                                     output=tmp_path / "out", min_pixels=1))
    np.testing.assert_array_equal(labels["patient1"], label)
    # A folder of series folders pairs with a folder of label files by name.
    (tmp_path / "labels").mkdir()
    (tmp_path / "patient1.nii.gz").rename(tmp_path / "labels/patient1.nii.gz")
    assert [c.case_id for c in discover_cases(tmp_path / "dicom", tmp_path / "labels")] == ["patient1"]


def test_unrecognised_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unrecognised dataset layout"):
        detect_layout(tmp_path)
