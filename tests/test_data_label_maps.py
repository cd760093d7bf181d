"""Label maps: presets, custom files, several ids per organ, unknown ids."""
import json

import numpy as np
import pytest
import yaml

from sam_peft.data.label_maps import PRESETS, LabelMap, load_label_map, organ_key, parse_label_names


def test_flare22_and_btcv_presets():
    flare = load_label_map("flare22")
    assert flare.organ_names[:3] == ("liver", "kidney_right", "spleen") and len(flare.organ_names) == 13
    assert flare.organ_names[-1] == "kidney_left"
    btcv = load_label_map("BTCV")
    assert btcv.organ_names[5] == "liver" and btcv.organ_names[9] == "portal_vein_and_splenic_vein"
    np.testing.assert_array_equal(btcv.compact(np.arange(14)), np.arange(14))


def test_synapse8_maps_other_btcv_ids_to_background():
    synapse = load_label_map("synapse8")
    assert synapse.organ_names == ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
                                   "aorta", "pancreas")
    compact = synapse.compact(np.arange(14, dtype=np.uint8))
    names = ["background", *synapse.organ_names]
    # BTCV ids 5 esophagus, 9 IVC, 10 portal/splenic vein, 12/13 adrenal glands -> background
    assert [names[i] for i in compact] == [
        "background", "spleen", "kidney_right", "kidney_left", "gallbladder", "background", "liver", "stomach",
        "aorta", "background", "background", "pancreas", "background", "background",
    ]


def test_totalsegmentator_preset_matches_the_published_class_map(totalseg_dir):
    class_map = json.loads((totalseg_dir / "class_map_total_v2.json").read_text())
    assert PRESETS["totalsegmentator"] == {int(i): name for i, name in class_map.items()}
    mr_map = json.loads((totalseg_dir / "class_map_total_mr.json").read_text())
    assert PRESETS["totalsegmentator_mr"] == {int(i): name for i, name in mr_map.items()}
    total = load_label_map("totalsegmentator")
    assert total.index("vertebrae_L5") == total.index("vertebrae_l5") == 27


def test_several_ids_one_organ_and_unknown_ids():
    label_map = LabelMap.from_ids({1: "Kidney Left", 2: "kidney-left", 7: "liver"}, "custom")
    assert label_map.organ_names == ("kidney_left", "liver")
    np.testing.assert_array_equal(label_map.compact(np.array([0, 1, 2, 7])), [0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"label ids 3, 9 are not in the label map 'custom'"):
        label_map.compact(np.array([[0, 3], [9, 7]]), source="seg.nii.gz")
    np.testing.assert_array_equal(label_map.compact(np.array([0, 3, 900, 7]), ignore_unknown=True), [0, 0, 0, 2])


def test_compact_rejects_non_integer_and_negative_values():
    label_map = load_label_map("flare22")
    with pytest.raises(ValueError, match="non-integer"):
        label_map.compact(np.array([0.0, 1.5]))
    with pytest.raises(ValueError, match="negative"):
        label_map.compact(np.array([-1, 1]))
    np.testing.assert_array_equal(label_map.compact(np.array([0.0, 3.0])), [0, 3])


def test_custom_json_yaml_and_dataset_json(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"1": "liver", "2": "Spleen", "3": "background"}))
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"liver": 1, "spleen": 2}))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    maps = [load_label_map(tmp_path / name) for name in ("map.json", "map.yaml", "dataset.json")]
    assert all(m.organ_names == ("liver", "spleen") for m in maps)
    np.testing.assert_array_equal(maps[0].compact(np.array([3, 2, 1])), [0, 2, 1])
    (tmp_path / "list.yaml").write_text("- liver\n- spleen\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_label_map(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="not a preset"):
        load_label_map("no_such_map")


def test_parse_label_names_and_organ_key():
    assert parse_label_names({"0": "background", "1": "liver"}) == {0: None, 1: "liver"}
    assert parse_label_names({"background": 0, "liver": 1}) == {0: None, 1: "liver"}
    with pytest.raises(ValueError, match="map ids to names"):
        parse_label_names({"liver": "one"})
    assert organ_key(" Inferior Vena-Cava ") == "inferior_vena_cava"


def test_large_maps_use_int16():
    label_map = LabelMap.from_ids({i: f"organ {i}" for i in range(1, 301)}, "big")
    assert label_map.dtype == np.int16
    assert label_map.compact(np.array([300]))[0] == 300
