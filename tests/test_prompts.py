"""Simulated human behaviours and the PHPG collator, on synthetic label maps and slices of the real CT."""
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from torch.utils.data import DataLoader

from sam_peft.models.processor import LITEMEDSAM_PROCESSOR, SAM_PROCESSOR, SamInputProcessor
from sam_peft.prompts import BEHAVIOURS, BehaviourMixture, PHPGCollator, make_prompt

BOX = [2, 3]


def rect_mask(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def inside(mask, points):
    return all(mask[int(y), int(x)] for x, y in points)


def outside(mask, points):
    return not any(mask[int(y), int(x)] for x, y in points)


# --- behaviours -------------------------------------------------------------------------------------


def test_tight_box_is_the_bounding_box():
    mask = rect_mask((60, 80), 10, 30, 20, 70)
    mask[40, 5] = True
    points, labels = make_prompt("tight_box", mask, np.random.default_rng(0))
    assert points.dtype == np.float32 and labels.dtype == np.int64
    assert points.tolist() == [[5, 10], [69, 40]] and labels.tolist() == BOX


def test_jitter_box_noise_is_capped_at_20px_at_1024_scale():
    mask = rect_mask((512, 512), 100, 400, 100, 400)  # side 300: SD 30 px, far above the 10 px cap at 512
    rng = np.random.default_rng(0)
    moves = np.stack([make_prompt("jitter_box", mask, rng)[0] - [[100, 100], [399, 399]] for _ in range(200)])
    assert np.abs(moves).max() == pytest.approx(20 * 512 / 1024)
    assert np.isclose(np.abs(moves), 10).mean() > 0.5
    small = rect_mask((512, 512), 100, 120, 100, 120)  # side 20: SD 2 px, rarely capped
    moves = np.stack([make_prompt("jitter_box", small, rng)[0] - [[100, 100], [119, 119]] for _ in range(200)])
    assert 1 < moves.std() < 3
    wide = np.stack([make_prompt("jitter_box", mask, rng, frame_side=1024)[0] for _ in range(50)])
    assert np.abs(wide - [[100, 100], [399, 399]]).max() == pytest.approx(20)


def test_loose_box_pushes_each_side_out_by_10_to_30_percent():
    mask = rect_mask((200, 300), 50, 150, 100, 200)  # sides 100 x 100, far from the image border
    rng = np.random.default_rng(0)
    for _ in range(50):
        (x0, y0), (x1, y1) = make_prompt("loose_box", mask, rng)[0]
        margins = np.array([100 - x0, 50 - y0, x1 - 199, y1 - 149])
        assert ((margins >= 10) & (margins <= 30)).all()


def test_shifted_box_keeps_its_size_and_overlaps_the_organ():
    mask = rect_mask((200, 200), 50, 150, 60, 110)  # 50 wide, 100 tall
    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(50):
        (x0, y0), (x1, y1) = make_prompt("shifted_box", mask, rng)[0]
        assert (x1 - x0, y1 - y0) == pytest.approx((49, 99))
        shifts.append((x0 - 60, y0 - 50))
    shifts = np.abs(shifts)
    assert (shifts[:, 0] <= 10).all() and (shifts[:, 1] <= 20).all() and shifts.max() > 5
    corners = np.zeros((100, 100), dtype=bool)  # two diagonal pixels: most shifts would miss both
    corners[10, 10] = corners[89, 89] = True
    for _ in range(50):
        (x0, y0), (x1, y1) = np.rint(make_prompt("shifted_box", corners, rng)[0]).astype(int)
        assert corners[y0 : y1 + 1, x0 : x1 + 1].any()


def test_center_click_is_the_most_interior_pixel():
    mask = rect_mask((50, 60), 5, 45, 10, 30)
    mask[20:30, 30:58] = True  # a thinner arm
    (x, y), = make_prompt("center_click", mask, np.random.default_rng(0))[0]
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert dist[int(y), int(x)] == dist.max()


def test_interior_clicks_land_on_the_organ():
    mask = np.zeros((80, 90), dtype=bool)
    yy, xx = np.mgrid[:80, :90]
    mask[((yy - 40) / 30) ** 2 + ((xx - 45) / 20) ** 2 <= 1] = True
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rng = np.random.default_rng(0)
    random_points = [make_prompt("random_click", mask, rng) for _ in range(30)]
    assert all(labels.tolist() == [1] and inside(mask, points) for points, labels in random_points)
    assert len({tuple(points[0]) for points, _ in random_points}) > 20
    for _ in range(30):
        points, labels = make_prompt("boundary_click", mask, rng, frame_side=1024)
        (x, y), = points
        assert labels.tolist() == [1] and 1 <= dist[int(y), int(x)] <= 6


def test_multi_click_negatives_fall_on_neighbouring_organs():
    label = np.zeros((100, 120), dtype=int)
    label[30:70, 30:60] = 1  # the organ
    label[30:70, 60:75] = 2  # touching neighbour
    label[0:10, 110:120] = 3  # far away organ
    mask = label == 1
    rng = np.random.default_rng(0)
    for _ in range(30):
        points, labels = make_prompt("multi_click", mask, rng, neighbours=(label > 0) & ~mask)
        positives, negatives = points[labels == 1], points[labels == 0]
        assert 2 <= len(positives) <= 4 and 1 <= len(negatives) <= 3
        assert labels.tolist() == [1] * len(positives) + [0] * len(negatives)
        assert inside(mask, positives) and inside(label == 2, negatives)
    for _ in range(30):  # no neighbour: background close to the organ
        points, labels = make_prompt("multi_click", mask, rng)
        negatives = points[labels == 0]
        assert len(negatives) >= 1 and outside(mask, negatives)
        assert all(np.min(np.hypot(*(np.argwhere(mask)[:, ::-1] - p).T)) <= 0.25 * 40 for p in negatives)


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_one_pixel_and_border_masks(behaviour):
    rng = np.random.default_rng(0)
    corner = np.zeros((30, 40), dtype=bool)
    corner[29, 39] = True
    edge = rect_mask((30, 40), 0, 30, 0, 3)  # touches three borders
    for mask in (corner, edge):
        for _ in range(10):
            points, labels = make_prompt(behaviour, mask, rng, neighbours=np.zeros_like(mask))
            assert points.shape == (len(labels), 2) and len(labels) >= 1
            assert (points >= 0).all() and (points[:, 0] <= 39).all() and (points[:, 1] <= 29).all()
            if behaviour.endswith("_box"):
                assert labels.tolist() == BOX and (points[0] <= points[1]).all()
            else:
                assert inside(mask, points[labels == 1]) and outside(mask, points[labels == 0])


def test_bad_behaviour_input():
    mask = rect_mask((10, 10), 2, 5, 2, 5)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="tight_box"):
        make_prompt("tight_boxx", mask, rng)
    with pytest.raises(ValueError, match="empty"):
        make_prompt("center_click", np.zeros((10, 10), dtype=bool), rng)
    with pytest.raises(ValueError, match="2D"):
        make_prompt("tight_box", mask[None], rng)
    with pytest.raises(ValueError, match="neighbours"):
        make_prompt("multi_click", mask, rng, neighbours=np.zeros((5, 5), dtype=bool))


def test_behaviour_mixture():
    rng = np.random.default_rng(0)
    assert set(BehaviourMixture().names) == set(BEHAVIOURS)
    draws = [BehaviourMixture({"tight_box": 3, "center_click": 1, "loose_box": 0}).sample(rng) for _ in range(2000)]
    assert set(draws) == {"tight_box", "center_click"}
    assert 0.7 < draws.count("tight_box") / len(draws) < 0.8
    assert BehaviourMixture(["random_click"]).sample(rng) == "random_click"
    with pytest.raises(ValueError, match="valid behaviours are"):
        BehaviourMixture({"tight_box": 1, "lasso": 1})
    with pytest.raises(ValueError, match=">= 0"):
        BehaviourMixture({"tight_box": -1, "loose_box": 2})
    with pytest.raises(ValueError, match="all be zero"):
        BehaviourMixture({"tight_box": 0})
    with pytest.raises(ValueError, match="list of names"):
        BehaviourMixture("tight_box")


# --- collator ---------------------------------------------------------------------------------------

CT_ORGANS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 6: "stomach", 20: "colon", 52: "aorta"}


@pytest.fixture(scope="module")
def ct_items(totalseg_dir):
    """Axial slices of the real CT, windowed 40/400, labels mapped to compact indices (1 = liver, ...)."""
    ct = np.asanyarray(nib.load(totalseg_dir / "example_ct.nii.gz").dataobj)
    seg = np.asanyarray(nib.load(totalseg_dir / "example_seg_fast_force_split.nii.gz").dataobj)
    items = []
    for z in (0, 80, 90, 100, 110):  # slice 0 holds none of these organs
        image = np.clip((ct[:, :, z] - (40 - 200)) / 400 * 255, 0, 255).astype(np.uint8)
        label = np.zeros(image.shape, dtype=np.int64)
        for k, ts_id in enumerate(CT_ORGANS, start=1):
            label[seg[:, :, z] == ts_id] = k
        items.append({"image": image, "label": label, "sample_id": z})
    return items


def synthetic_items():
    """Odd sizes and aspect ratios, grayscale and RGB, a 1-pixel organ and an organ-free slice."""
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(37, 91), (300, 17), (600, 410), (64, 64)]):
        label = np.zeros((h, w), dtype=np.int64)
        label[h // 4 : h // 2, w // 4 : w // 2] = 1
        label[h // 2 : 3 * h // 4, w // 4 : 3 * w // 4] = 2
        label[: h // 5, : w // 5] = 3  # touches the border
        label[h - 1, w - 1] = 4  # a single pixel
        shape = (h, w, 3) if i % 2 else (h, w)
        items.append({"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": label, "sample_id": 10 + i})
    empty = np.zeros((50, 40), dtype=np.int64)
    items.append({"image": empty.astype(np.uint8), "label": empty, "sample_id": 20})
    return items


def check_batch(batch, items, processor, organ_names, min_pixels):
    b = len(items)
    s = processor.image_size
    k = batch["region_valid"].shape[1]
    assert batch["pixel_values"].shape == (b, 3, s, s) and batch["pixel_values"].dtype == torch.float32
    assert batch["original_sizes"].tolist() == [list(item["label"].shape) for item in items]
    assert batch["sample_ids"].tolist() == [item["sample_id"] for item in items]
    p = batch["points"].shape[2]
    assert batch["points"].shape == (b, k, p, 2) and batch["points"].dtype == torch.float32
    assert batch["point_labels"].shape == (b, k, p) and batch["point_labels"].dtype == torch.int64
    assert batch["targets"].shape == (b, k, 256, 256) and batch["targets"].dtype == torch.bool
    for i, item in enumerate(items):
        ids, counts = np.unique(item["label"][item["label"] > 0], return_counts=True)
        expected = ids[counts >= min_pixels] - 1
        valid = batch["region_valid"][i]
        n = len(expected)
        assert valid.tolist() == [True] * n + [False] * (k - n)
        assert batch["organ_ids"][i, :n].tolist() == expected.tolist() and (batch["organ_ids"][i, n:] == -1).all()
        assert (batch["behaviour_ids"][i, :n] >= 0).all() and (batch["behaviour_ids"][i, n:] == -1).all()
        assert not batch["targets"][i, n:].any() and (batch["point_labels"][i, n:] == -1).all()
        low_res = processor.mask_to_low_res(item["label"][None] == expected[:, None, None] + 1)
        for j in range(n):
            half = low_res[j] >= 0.5  # an organ too small to cover half a low-res pixel keeps every one it touches
            assert torch.equal(batch["targets"][i, j], half if half.any() else low_res[j] > 0)
            assert batch["targets"][i, j].any()
            labels = batch["point_labels"][i, j]
            assert (labels >= 0).sum() >= 1 and (labels[(labels >= 0).sum() :] == -1).all()
            h, w = item["label"].shape
            new_h, new_w = processor.resized_shape((h, w))
            pts = batch["points"][i, j, labels >= 0]
            assert (pts[:, 0] <= new_w).all() and (pts[:, 1] <= new_h).all() and (pts >= 0).all()
    assert batch["organ_ids"].max() < len(organ_names)


def test_collator_on_real_ct(ct_items):
    organ_names = list(CT_ORGANS.values())
    collator = PHPGCollator(LITEMEDSAM_PROCESSOR, organ_names, min_pixels=10)
    batch = collator(ct_items)
    check_batch(batch, ct_items, LITEMEDSAM_PROCESSOR, organ_names, 10)
    assert not batch["region_valid"][0].any() and batch["region_valid"][1:].any(-1).all()
    assert batch["point_labels"].shape[2] >= 2


@pytest.mark.parametrize("processor", [LITEMEDSAM_PROCESSOR, SamInputProcessor(image_size=512)])
def test_collator_on_odd_shapes_and_rgb(processor):
    items = synthetic_items()
    names = ["a", "b", "c", "dot"]
    batch = PHPGCollator(processor, names, min_pixels=1)(items)
    check_batch(batch, items, processor, names, 1)
    assert batch["organ_ids"][2].tolist() == [0, 1, 2, 3]  # the 600 x 410 slice keeps its 1-pixel organ


def test_tight_boxes_and_centre_clicks_match_the_low_res_targets(ct_items):
    names = list(CT_ORGANS.values())
    to_low_res = 256 / SAM_PROCESSOR.image_size
    boxes = PHPGCollator(SAM_PROCESSOR, names, behaviours=["tight_box"])(ct_items)
    clicks = PHPGCollator(SAM_PROCESSOR, names, behaviours={"center_click": 1.0}, max_points=7)(ct_items)
    assert clicks["points"].shape[2] == 7 and (clicks["point_labels"][..., 1:] == -1).all()
    assert (boxes["behaviour_ids"][boxes["region_valid"]] == BEHAVIOURS.index("tight_box")).all()
    for i, j in boxes["region_valid"].nonzero().tolist():
        ys, xs = boxes["targets"][i, j].nonzero().T
        (x0, y0), (x1, y1) = (boxes["points"][i, j, :2] * to_low_res).tolist()
        # corners are pixel indices, so the far side of the last pixel lies one original pixel further
        tol = max(1.0, 256 / max(ct_items[i]["label"].shape))
        assert boxes["point_labels"][i, j, :2].tolist() == BOX
        assert x0 - 1 <= xs.min() and xs.max() <= x1 + tol and y0 - 1 <= ys.min() and ys.max() <= y1 + tol
        assert xs.min() <= x0 + 1 and ys.min() <= y0 + 1 and xs.max() >= x1 - 1 and ys.max() >= y1 - 1
        x, y = (clicks["points"][i, j, 0] * to_low_res).long().tolist()
        assert clicks["targets"][i, j, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any()


def test_collator_is_reproducible_per_sample(ct_items):
    collator = PHPGCollator(LITEMEDSAM_PROCESSOR, list(CT_ORGANS.values()), seed=3, max_points=7)
    alone = collator(ct_items[2:3])
    mixed = collator([ct_items[4], ct_items[2], ct_items[1]])
    k = alone["region_valid"].shape[1]
    for key in ("points", "point_labels", "targets", "organ_ids", "behaviour_ids"):
        assert torch.equal(alone[key][0], mixed[key][1, :k]), key
    assert not mixed["region_valid"][1, k:].any()
    collator.set_epoch(1)
    assert not torch.equal(collator(ct_items[2:3])["points"], alone["points"])
    collator.set_epoch(0)
    assert torch.equal(collator(ct_items[2:3])["points"], alone["points"])
    other_seed = PHPGCollator(LITEMEDSAM_PROCESSOR, list(CT_ORGANS.values()), seed=4, max_points=7)
    assert not torch.equal(other_seed(ct_items[2:3])["points"], alone["points"])


def test_dataloader_workers_match_a_single_process(ct_items):
    collator = PHPGCollator(LITEMEDSAM_PROCESSOR, list(CT_ORGANS.values()), seed=1)
    collator.set_epoch(2)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ct_items, batch_size=2, collate_fn=collator, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == 3
    # spawn-based workers (macOS, Windows) receive a pickled copy instead of a forked one
    batches["pickled"] = [pickle.loads(pickle.dumps(collator))(ct_items[i : i + 2]) for i in range(0, 5, 2)]
    for serial, parallel, pickled in zip(batches[0], batches[2], batches["pickled"]):
        assert serial.keys() == parallel.keys() == pickled.keys()
        assert all(torch.equal(serial[key], parallel[key]) and torch.equal(serial[key], pickled[key]) for key in serial)


def test_max_regions_picks_organs_evenly(ct_items):
    item = ct_items[3]
    present = np.unique(item["label"][item["label"] > 0]) - 1
    assert len(present) > 3
    collator = PHPGCollator(LITEMEDSAM_PROCESSOR, list(CT_ORGANS.values()), max_regions=2, include_pixels=False)
    picks = []
    for epoch in range(60):
        collator.set_epoch(epoch)
        batch = collator([item])
        assert "pixel_values" not in batch and batch["region_valid"].sum() == 2
        picks += batch["organ_ids"][0].tolist()
    counts = np.array([picks.count(o) for o in present])
    assert set(picks) <= set(present.tolist()) and counts.min() > 0.4 * counts.max()


def test_organ_free_batch_has_one_invalid_region():
    item = {"image": np.zeros((40, 30), dtype=np.uint8), "label": np.zeros((40, 30), dtype=np.int64), "sample_id": 0}
    batch = PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver"])([item, {**item, "sample_id": 1}])
    assert batch["region_valid"].shape == (2, 1) and not batch["region_valid"].any()
    assert batch["points"].shape == (2, 1, 1, 2) and (batch["point_labels"] == -1).all()
    assert (batch["organ_ids"] == -1).all() and not batch["targets"].any()


def test_bad_collator_input():
    label = np.zeros((20, 20), dtype=np.int64)
    label[5:10, 5:10] = 2
    image = np.zeros((20, 20), dtype=np.uint8)
    collator = PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver", "spleen"])
    with pytest.raises(ValueError, match="sample_id"):
        collator([{"image": image, "label": label}])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver"])([{"image": image, "label": label, "sample_id": 0}])
    with pytest.raises(ValueError, match="same grid"):
        collator([{"image": image[:10], "label": label, "sample_id": 0}])
    with pytest.raises(ValueError, match="max_points"):
        PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver"], max_points=2)
    with pytest.raises(ValueError, match="valid behaviours"):
        PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver"], behaviours={"tight_box": 1, "scribble": 1})
    with pytest.raises(ValueError, match="max_regions"):
        PHPGCollator(LITEMEDSAM_PROCESSOR, ["liver"], max_regions=0)
