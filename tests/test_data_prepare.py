"""prepare / prepare_volumes: real CT counts, orientation, intensity, slicing, splits, bad input, atomic output."""
import collections
import json

import datasets
import nibabel as nib
import numpy as np
import pytest
import torch

from sam_peft.data import VolumeCase, load_prepared, make_phantom, prepare, prepare_volumes, read_metadata
from sam_peft.data.prepare import assign_splits
from sam_peft.data.readers import Volume, display_affine, reorient

ABDOMEN = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "gallbladder", "pancreas", "aorta",
           "inferior_vena_cava")


def save_nifti(volume: Volume, path, axcodes=("R", "A", "S")) -> None:
    stored = reorient(volume, axcodes)
    nib.save(nib.Nifti1Image(stored.array, stored.affine), path)


def small_phantom(seed=0, shape=(8, 48, 40)):
    image, label, affine = make_phantom(seed, shape=shape, spacing=(3.0, 1.5, 1.5))
    return Volume(image, affine, f"image{seed}"), Volume(label, affine, f"label{seed}")


def case(case_id, image, label, spacing=(3.0, 1.0, 1.0)) -> VolumeCase:
    affine = display_affine(spacing)
    return VolumeCase(case_id, Volume(image, affine, f"{case_id}_image"), Volume(label, affine, f"{case_id}_label"))


def centroid(rows, organ):
    """Mean (row, column) of an organ over a list of prepared rows, as fractions of the slice size."""
    points = [np.argwhere(r["label"] == r["organ_index"][organ]) / r["label"].shape for r in rows
              if organ in r["organ_index"]]
    return np.concatenate(points).mean(axis=0)


@pytest.fixture(scope="module")
def real_ct(totalseg_dir, tmp_path_factory):
    return prepare(totalseg_dir / "example_ct.nii.gz", totalseg_dir / "example_seg_fast_force_split.nii.gz",
                   label_map="totalsegmentator", output=tmp_path_factory.mktemp("ct") / "out", min_pixels=1)


def test_real_ct_axial_slice_counts_per_organ(real_ct):
    rows = real_ct["train"]
    counts = collections.Counter(organ for organs in rows["organs"] for organ in organs)
    assert {organ: counts[organ] for organ in ABDOMEN} == {
        "liver": 43, "spleen": 30, "kidney_right": 36, "kidney_left": 33, "stomach": 31, "gallbladder": 12,
        "pancreas": 19, "aorta": 51, "inferior_vena_cava": 55,
    }
    assert sum(len(set(organs) & set(ABDOMEN)) >= 3 for organs in rows["organs"]) == 46
    metadata = read_metadata(real_ct)
    assert metadata["cases"]["example_ct"]["modality"] == "ct"
    assert metadata["intensity"]["window"] == {"level": 40, "width": 400, "name": "abdomen"}
    assert metadata["organ_names"][:5] == ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver"]


def _rows_with_index(dataset):
    names = read_metadata(dataset)["organ_names"]
    rows = list(dataset["train"].with_format("numpy"))
    for row in rows:
        row["organ_index"] = {str(o): names.index(str(o)) + 1 for o in row["organs"]}
    return rows


def test_real_ct_is_in_radiological_view(real_ct):
    """Patient right (liver) on the image left, spleen on the right, spine (posterior) at the bottom."""
    rows = _rows_with_index(real_ct)
    assert centroid(rows, "liver")[1] < 0.5 < centroid(rows, "spleen")[1]
    assert centroid(rows, "vertebrae_l1")[0] > 0.6 > centroid(rows, "stomach")[0]


def test_real_mr_stored_lps_is_normalised_and_in_radiological_view(totalseg_dir, tmp_path):
    dataset = prepare(totalseg_dir / "example_mr_sm.nii.gz", totalseg_dir / "example_seg_mr.nii.gz",
                      label_map="totalsegmentator_mr", output=tmp_path / "mr", min_pixels=1)
    assert read_metadata(dataset)["cases"]["example_mr_sm"]["modality"] == "mr"
    images = np.stack(dataset["train"].with_format("numpy")["image"])
    assert images.min() == 0 and images.max() == 255
    rows = _rows_with_index(dataset)
    assert centroid(rows, "liver")[1] < 0.5 < centroid(rows, "spleen")[1]
    assert centroid(rows, "vertebrae")[0] > 0.5


@pytest.mark.parametrize("image_codes,label_codes", [(("L", "P", "S"), ("R", "A", "S")),
                                                      (("A", "I", "L"), ("P", "S", "R"))])
def test_stored_orientation_does_not_change_the_slices(tmp_path, image_codes, label_codes):
    image, label = small_phantom()
    save_nifti(image, tmp_path / "ras_ct.nii.gz")
    save_nifti(label, tmp_path / "ras_seg.nii.gz")
    save_nifti(image, tmp_path / "other_ct.nii.gz", image_codes)
    save_nifti(label, tmp_path / "other_seg.nii.gz", label_codes)
    kwargs = dict(label_map="flare22", planes=("axial", "coronal", "sagittal"), min_pixels=1)
    reference = prepare(tmp_path / "ras_ct.nii.gz", tmp_path / "ras_seg.nii.gz", output=tmp_path / "a", **kwargs)
    other = prepare(tmp_path / "other_ct.nii.gz", tmp_path / "other_seg.nii.gz", output=tmp_path / "b", **kwargs)
    a, b = reference["train"].with_format("numpy"), other["train"].with_format("numpy")
    assert len(a) == len(b) > 48
    for column in ("image", "label", "slice_index", "spacing"):
        for x, y in zip(a[column], b[column]):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a["label"][0], label.array[0])  # axial slice 0 is the stored display array


def test_label_on_another_grid_or_shape_is_an_error(tmp_path):
    image, label = small_phantom()
    save_nifti(image, tmp_path / "ct.nii.gz")
    shifted = Volume(label.array, label.affine + np.pad(np.ones((3, 1)) * 4.5, ((0, 1), (3, 0))), "shifted")
    save_nifti(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(ValueError, match=r"ct\.nii\.gz and label .*shifted\.nii\.gz .*different grids"):
        prepare(tmp_path / "ct.nii.gz", tmp_path / "shifted.nii.gz", label_map="flare22", output=tmp_path / "o")
    save_nifti(Volume(label.array[:, :-2], label.affine, "cropped"), tmp_path / "cropped.nii.gz")
    with pytest.raises(ValueError, match=r"ct\.nii\.gz has shape \(40, 48, 8\) but label .*cropped\.nii\.gz has "
                                         r"shape \(40, 46, 8\)"):
        prepare(tmp_path / "ct.nii.gz", tmp_path / "cropped.nii.gz", label_map="flare22", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ct_windows_and_mr_percentiles():
    hu = np.array([[[-1000, -160, 40, 240, 1000, 0]]], np.float32)
    label = np.ones(hu.shape, np.uint8)
    abdomen = prepare_volumes([case("ct", hu, label)], label_map="flare22", min_pixels=1)
    np.testing.assert_array_equal(abdomen["train"]["image"][0], [[0, 0, 128, 255, 255, 102]])
    custom = prepare_volumes([case("ct", hu, label)], label_map="flare22", min_pixels=1, window="0,100")
    np.testing.assert_array_equal(custom["train"]["image"][0], [[0, 0, 230, 255, 255, 128]])
    mr = np.linspace(0, 1000, 200, dtype=np.float32).reshape(1, 10, 20)
    normalised = prepare_volumes([case("mr", mr, np.ones(mr.shape, np.uint8))], label_map="flare22", min_pixels=1)
    pixels = np.asarray(normalised["train"]["image"][0]).ravel()
    assert pixels[0] == 0 and pixels[-1] == 255 and np.all(np.diff(pixels) >= 0)
    assert read_metadata(normalised)["cases"]["mr"]["modality"] == "mr"
    with pytest.raises(ValueError, match="window must be"):
        prepare_volumes([case("ct", hu, label)], label_map="flare22", window="wide")


def test_planes_follow_the_display_convention():
    image = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)  # 8-bit: kept as is, so pixels identify voxels
    dataset = prepare_volumes([case("c", image, np.ones_like(image))], label_map="flare22", min_pixels=1,
                              planes=("axial", "coronal", "sagittal"), spacing=None)
    rows = {(r["plane"], r["slice_index"]): r for r in dataset["train"].with_format("numpy")}
    np.testing.assert_array_equal(rows["axial", 2]["image"], image[2])
    np.testing.assert_array_equal(rows["coronal", 1]["image"], image[::-1, 1, :])  # superior row on top
    np.testing.assert_array_equal(rows["sagittal", 4]["image"], image[::-1, :, 4])  # anterior on the left
    np.testing.assert_allclose(rows["coronal", 1]["spacing"], [3.0, 1.0, 1.0])
    assert isinstance(dataset["train"].features["image"], datasets.Sequence | datasets.List)  # shapes differ


def test_min_pixels_and_empty_fraction():
    image = np.random.default_rng(0).integers(-1000, 400, (10, 8, 8)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[2, :2, :2] = 1  # 4 liver pixels
    label[3, :1, :3] = 1  # 3 liver pixels
    label[3, 4:, 4:] = 3  # 16 spleen pixels
    kept = prepare_volumes([case("c", image, label)], label_map="flare22", min_pixels=4)["train"]
    assert kept["slice_index"] == [2, 3]
    assert kept["organs"] == [["liver"], ["spleen"]] and kept["organ_pixels"] == [[4], [16]]
    for fraction, expected in ((0.5, 2 + 4), (1.0, 10)):
        rows = prepare_volumes([case("c", image, label)], label_map="flare22", min_pixels=4, empty_fraction=fraction)
        assert rows["train"].num_rows == expected


def test_in_plane_resampling():
    image, label = small_phantom()
    dataset = prepare_volumes([VolumeCase("p", image, label)], label_map="flare22", spacing=3.0, min_pixels=1)
    row = dataset["train"].with_format("numpy")[0]
    assert row["image"].shape == (24, 20)
    np.testing.assert_allclose(row["spacing"], [3.0, 3.0, 3.0])
    assert set(np.unique(row["label"])) <= set(np.unique(label.array))


def test_split_by_case(tmp_path):
    cases = [VolumeCase(f"c{i}", *small_phantom(i, shape=(2, 24, 24))) for i in range(6)]
    dataset = prepare_volumes(cases, label_map="flare22", val_fraction=0.2, test_fraction=0.2, seed=3)
    ids = {split: set(part["case_id"]) for split, part in dataset.items()}
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [2, 2, 2]
    assert set.union(*ids.values()) == {f"c{i}" for i in range(6)}
    assert read_metadata(dataset)["cases"]["c0"]["split"] in ids and not ids["train"] & ids["test"]
    assert assign_splits([f"c{i}" for i in range(6)], 0.2, 0.2, 3) == {
        c: split for split, members in ids.items() for c in members}
    with pytest.raises(ValueError, match="keep a training case"):
        assign_splits(["a", "b"], 0.5, 0.5, 0)


def test_bad_intensities_and_skip_bad(tmp_path):
    image, label = np.zeros((2, 4, 4), np.float32), np.ones((2, 4, 4), np.uint8)
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    good = case("good", np.arange(32, dtype=np.float32).reshape(2, 4, 4) - 1000, label)
    with pytest.raises(ValueError, match="nan_image: 1 voxels are NaN or infinite"):
        prepare_volumes([case("nan", nan_image, label), good], label_map="flare22")
    with pytest.raises(ValueError, match="flat_image: every voxel is 0.0; the image is empty"):
        prepare_volumes([case("flat", image, label)], label_map="flare22")
    dataset = prepare_volumes([case("nan", nan_image, label), good], label_map="flare22", skip_bad=True,
                              min_pixels=1, output=tmp_path / "out")
    assert dataset["train"]["case_id"] == ["good", "good"]
    (skipped,) = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert skipped["case_id"] == "nan" and "NaN" in skipped["error"] and "nan_image" in skipped["files"]


def test_unknown_label_ids(tmp_path):
    label = np.full((1, 4, 4), 1, np.uint8)
    label[0, 0, 0] = 42
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4) - 1000
    with pytest.raises(ValueError, match=r"unknown_label: label ids 42 are not in the label map 'flare22'"):
        prepare_volumes([case("unknown", image, label)], label_map="flare22")
    dataset = prepare_volumes([case("unknown", image, label)], label_map="flare22", ignore_unknown_labels=True)
    assert np.asarray(dataset["train"]["label"][0])[0, 0] == 0


def _phantom_files(folder, n=2, corrupt=None, four_d=None):
    for i in range(n):
        image, label = small_phantom(i, shape=(4, 32, 32))
        save_nifti(image, folder / f"imagesTr/p{i}_0000.nii.gz")
        save_nifti(label, folder / f"labelsTr/p{i}.nii.gz")
    if corrupt is not None:
        (folder / f"imagesTr/p{corrupt}_0000.nii.gz").write_bytes(b"\x1f\x8bbroken")
    if four_d is not None:
        four_d_image = nib.Nifti1Image(np.zeros((32, 32, 4, 2), np.int16), np.eye(4))
        nib.save(four_d_image, folder / f"imagesTr/p{four_d}_0000.nii.gz")


def test_failed_run_leaves_nothing_and_skip_bad_reports(tmp_path):
    (tmp_path / "data" / "imagesTr").mkdir(parents=True)
    (tmp_path / "data" / "labelsTr").mkdir()
    _phantom_files(tmp_path / "data", n=3, corrupt=1, four_d=2)
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*p1_0000\.nii\.gz"):
        prepare(tmp_path / "data", label_map="flare22", output=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no output, no partial folder
    dataset = prepare(tmp_path / "data", label_map="flare22", output=tmp_path / "out", skip_bad=True)
    assert set(dataset["train"]["case_id"]) == {"p0"}
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [s["case_id"] for s in skipped] == ["p1", "p2"]
    assert "p1_0000.nii.gz" in skipped[0]["files"][0] and "expected a 3D volume" in skipped[1]["error"]


def test_existing_output_needs_overwrite(tmp_path):
    image, label = small_phantom(shape=(2, 24, 24))
    cases = [VolumeCase("a", image, label)]
    prepare_volumes(cases, label_map="flare22", output=tmp_path / "out", min_pixels=1)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_volumes(cases, label_map="flare22", output=tmp_path / "out", empty_fraction=1.0, min_pixels=10**6)
    assert load_prepared(tmp_path / "out")["train"]["organs"][0]
    prepare_volumes(cases, label_map="flare22", output=tmp_path / "out", empty_fraction=1.0, min_pixels=10**6,
                    overwrite=True)
    assert load_prepared(tmp_path / "out")["train"]["organs"] == [[], []]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not written by sam_peft"):
        prepare_volumes(cases, label_map="flare22", output=tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_load_prepared_formats_and_errors(tmp_path):
    image, label = small_phantom(shape=(3, 24, 20))
    prepare_volumes([VolumeCase("a", image, label)], label_map="flare22", output=tmp_path / "out")
    dataset = load_prepared(tmp_path / "out")
    assert isinstance(dataset["train"].features["image"], datasets.Array2D)
    row = dataset["train"].with_format("numpy")[0]
    assert row["image"].shape == row["label"].shape == (24, 20)
    assert torch.is_tensor(dataset["train"].with_format("torch")[0]["label"])
    assert datasets.load_from_disk(str(tmp_path / "out"))["train"].num_rows == dataset["train"].num_rows
    with pytest.raises(FileNotFoundError):
        load_prepared(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        load_prepared(tmp_path)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not a dataset made by sam_peft"):
        load_prepared(tmp_path / "plain")


def test_num_proc_gives_the_same_dataset(tmp_path):
    (tmp_path / "data" / "imagesTr").mkdir(parents=True)
    (tmp_path / "data" / "labelsTr").mkdir()
    _phantom_files(tmp_path / "data", n=3)
    one = prepare(tmp_path / "data", label_map="flare22", output=tmp_path / "one", val_fraction=0.3)
    two = prepare(tmp_path / "data", label_map="flare22", output=tmp_path / "two", val_fraction=0.3, num_proc=2)
    for split in one:
        assert one[split].to_dict() == two[split].to_dict()
