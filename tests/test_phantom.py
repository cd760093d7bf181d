"""The synthetic abdominal phantom: determinism, anatomy, HU, files on disk, and the CLI."""
import argparse
import json

import numpy as np
import pytest
from scipy import ndimage

from sam_peft.data import (
    detect_layout,
    load_prepared,
    make_phantom,
    phantom_dataset,
    prepare,
    read_metadata,
    write_phantom,
)
from sam_peft.data.cli import add_phantom_parser, add_prepare_parser, run_phantom, run_prepare
from sam_peft.data.phantom import FLARE22_IDS


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(1)


def test_seeded_and_deterministic():
    a, b, c = make_phantom(4), make_phantom(4), make_phantom(5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_types_and_every_flare22_organ(phantom):
    image, label, affine = phantom
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape == (32, 160, 160)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), (3.0, 1.5, 1.5))
    assert set(np.unique(label)) == {0, *FLARE22_IDS.values()}


def test_anatomy_in_display_orientation(phantom):
    _, label, _ = phantom

    def centre(organ):
        return np.argwhere(label == FLARE22_IDS[organ]).mean(axis=0)  # (slice, row, column)

    assert centre("liver")[2] < 80 < centre("spleen")[2]  # patient right on the image left
    assert centre("kidney_right")[2] < 80 < centre("kidney_left")[2]
    assert centre("stomach")[1] < centre("aorta")[1]  # anterior above posterior
    assert centre("kidney_right")[0] < centre("liver")[0] < centre("esophagus")[0]  # inferior to superior


def test_hu_values_noise_and_organ_ambiguity(phantom):
    image, label, _ = phantom

    def hu(organ):
        return image[ndimage.binary_erosion(label == FLARE22_IDS[organ], iterations=2)]

    liver, spleen = hu("liver"), hu("spleen")
    assert 70 < liver.mean() < 140 and 5 < liver.std() < 30  # enhanced parenchyma with CT-like noise
    assert abs(liver.mean() - spleen.mean()) < 25  # neighbours of similar HU
    assert abs(hu("pancreas").mean() - hu("duodenum").mean()) < 40
    assert hu("gallbladder").mean() < 40 and hu("aorta").mean() > liver.mean()
    assert (image[label == FLARE22_IDS["stomach"]] < -500).any()  # gas in the stomach
    assert (image[label == 0] > 300).sum() > 500  # bone (the vertebra) is not labelled
    assert image.min() <= -950  # air around the body


def test_neighbours_touch(phantom):
    _, label, _ = phantom
    for a, b in (("pancreas", "duodenum"), ("liver", "inferior_vena_cava"), ("liver", "kidney_right"),
                 ("spleen", "stomach")):
        grown = ndimage.binary_dilation(label == FLARE22_IDS[a], iterations=2)
        assert (grown & (label == FLARE22_IDS[b])).any(), (a, b)


def test_phantom_dataset():
    dataset = phantom_dataset(3, seed=0, val_fraction=0.3, shape=(8, 64, 64))
    assert set(dataset) == {"train", "validation"}
    metadata = read_metadata(dataset)
    assert metadata["label_map"]["name"] == "flare22"
    assert {o for organs in dataset["train"]["organs"] for o in organs} >= {"liver", "spleen", "kidney_left"}
    row = dataset["train"].with_format("numpy")[0]
    assert row["image"].shape == (64, 64) and 0 <= row["image"].min() and row["image"].max() <= 255


def test_written_phantom_prepares_like_the_in_memory_one(tmp_path):
    write_phantom(tmp_path / "flare", 2, seed=7, shape=(6, 48, 48))
    assert detect_layout(tmp_path / "flare") == "nnunet"
    labels = json.loads((tmp_path / "flare" / "dataset.json").read_text())["labels"]
    assert labels["1"] == "liver" and labels["13"] == "kidney_left"
    from_files = prepare(tmp_path / "flare", label_map="dataset", output=tmp_path / "out")
    in_memory = phantom_dataset(2, seed=7, shape=(6, 48, 48))
    assert from_files["train"]["case_id"] == in_memory["train"]["case_id"]
    for a, b in zip(from_files["train"].with_format("numpy"), in_memory["train"].with_format("numpy")):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    with pytest.raises(FileExistsError):
        write_phantom(tmp_path / "flare", 1)


def test_synapse_phantom_uses_btcv_ids(tmp_path):
    write_phantom(tmp_path / "synapse", 1, seed=0, layout="synapse", shape=(6, 48, 48))
    assert detect_layout(tmp_path / "synapse") == "synapse"
    dataset = prepare(tmp_path / "synapse", label_map="btcv", output=tmp_path / "out", min_pixels=1)
    organs = {o for organs in dataset["train"]["organs"] for o in organs}
    assert "liver" in organs and "duodenum" not in organs  # BTCV has no duodenum


def test_cli_phantom_then_prepare(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    add_phantom_parser(subparsers)
    add_prepare_parser(subparsers)
    args = parser.parse_args(["phantom", "--output", str(tmp_path / "ph"), "--cases", "2", "--seed", "1"])
    run_phantom(args)
    args = parser.parse_args(["prepare", "--images", str(tmp_path / "ph"), "--label-map", "flare22",
                              "--output", str(tmp_path / "ds"), "--window", "50,350", "--val-fraction", "0.5",
                              "--planes", "axial", "coronal"])
    run_prepare(args)
    assert "train: " in capsys.readouterr().out
    dataset = load_prepared(tmp_path / "ds")
    assert set(dataset) == {"train", "validation"}
    assert read_metadata(dataset)["intensity"]["window"] == {"level": 50.0, "width": 350.0, "name": "custom"}
    assert set(dataset["train"]["plane"]) == {"axial", "coronal"}
