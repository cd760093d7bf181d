"""Error-guided clicks and the batched distance transform, checked against scipy's exact EDT."""
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from sam_peft.prompts import distance_transform, next_clicks
from sam_peft.prompts.clicks import PERFECT, _clicks_batched


def reference_distance(mask: np.ndarray) -> np.ndarray:
    """The issue's reference: the image border counts as boundary."""
    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One of: ellipse blob, thin line, single pixel, border-touching rectangle, speckle, empty, full."""
    kind = rng.integers(7)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    if kind == 0:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.5, h / 2 + 0.5), rng.uniform(0.5, w / 2 + 0.5)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    elif kind == 1:
        angle, offset, width = rng.uniform(0, np.pi), rng.uniform(-w / 2, w / 2), rng.uniform(0.5, 2)
        mask = np.abs(np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2) - offset) < width
    elif kind == 2:
        mask[rng.integers(h), rng.integers(w)] = True
    elif kind == 3:
        y, x = rng.integers(h), rng.integers(w)
        rows = slice(0, y + 1) if rng.random() < 0.5 else slice(y, h)
        cols = slice(0, x + 1) if rng.random() < 0.5 else slice(x, w)
        mask[rows, cols] = True
    elif kind == 4:
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.9)
    elif kind == 6:
        mask[:] = True
    return mask


def random_pair(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, target) with perfect, only-FN, only-FP and mixed errors."""
    target = random_mask(rng, h, w)
    other = random_mask(rng, h, w)
    choice = rng.choice(5, p=[0.1, 0.25, 0.25, 0.25, 0.15])
    pred = [target, target & ~other, target | other, other, np.zeros_like(target)][choice]
    return pred, target


def test_distance_transform_is_exact():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (1, 9), (9, 1), (2, 2), (17, 5), (31, 64), (64, 31)]:
        masks = np.stack([random_mask(rng, h, w) for _ in range(40)])
        got = distance_transform(torch.from_numpy(masks).view(4, 10, h, w)).view(40, h, w).numpy()
        assert got.dtype == np.float32
        for mask, dist in zip(masks, got):
            np.testing.assert_allclose(dist, reference_distance(mask), atol=1e-4)


def standard_click(pred: np.ndarray, target: np.ndarray, clicked: np.ndarray) -> tuple[int, int, int] | None:
    """The RITM / f-BRS clicker written plainly: (label, y, x), or None when no unclicked error pixel is left."""
    fn_dist = reference_distance(target & ~pred) * ~clicked
    fp_dist = reference_distance(pred & ~target) * ~clicked
    if max(fn_dist.max(), fp_dist.max()) == 0:
        return None
    positive = fn_dist.max() > fp_dist.max()  # a tie gives a negative click
    dist = fn_dist if positive else fp_dist
    ys, xs = np.where(dist == dist.max())
    return int(positive), int(ys[0]), int(xs[0])


def random_clicked(rng: np.random.Generator, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pixels clicked earlier: none, a few random ones, or the error maxima themselves (the case that matters)."""
    clicked = np.zeros_like(pred)
    kind = rng.integers(3)
    if kind == 1:
        clicked.flat[rng.choice(clicked.size, size=min(3, clicked.size), replace=False)] = True
    elif kind == 2:
        for error in (target & ~pred, pred & ~target):
            dist = reference_distance(error)
            if dist.max() > 0:
                ys, xs = np.where(dist == dist.max())
                pick = rng.integers(len(ys), size=rng.integers(1, 3))
                clicked[ys[pick], xs[pick]] = True
    return clicked


@pytest.mark.parametrize("clicker", ["scipy on crops (CPU)", "batched torch (accelerators)"])
def test_deterministic_clicks_are_the_standard_clicker(clicker):
    """>= 1000 random cases per implementation, 100% agreement, with ties, thin and border errors, repeats."""
    rng = np.random.default_rng(1)
    seen = Counter()
    for h, w in [(24, 24), (13, 40), (40, 7), (1, 12), (2, 3)]:
        pairs = [random_pair(rng, h, w) for _ in range(300)]
        clicked = np.stack([random_clicked(rng, p, t) for p, t in pairs])
        pred = torch.from_numpy(np.stack([p for p, _ in pairs])).view(15, 20, h, w)
        target = torch.from_numpy(np.stack([t for _, t in pairs])).view(15, 20, h, w)
        done = torch.from_numpy(clicked).view(15, 20, h, w)
        if clicker.startswith("scipy"):
            points, labels = next_clicks(pred, target, clicked=done)
        else:
            points, labels = _clicks_batched(target & ~pred, pred & ~target, done, False, None)
        for (p, t), c, (x, y), label in zip(pairs, clicked, points.view(-1, 2).long().tolist(), labels.view(-1).tolist()):
            expected = standard_click(p, t, c)
            assert (label, y, x) == ((PERFECT, 0, 0) if expected is None else expected)
            fn, fp = reference_distance(t & ~p).max(), reference_distance(p & ~t).max()
            seen["cases"] += 1
            seen["tie"] += bool(fn == fp > 0)
            seen["area rule differs"] += expected is not None and expected[0] != int((t & ~p).sum() >= (p & ~t).sum())
            seen["thin error"] += 0 < max(fn, fp) <= 1
            seen["on the border"] += expected is not None and (y in (0, h - 1) or x in (0, w - 1))
            seen["maximum already clicked"] += expected is not None and (c & (reference_distance(
                t & ~p if expected[0] else p & ~t) == max(fn, fp))).any()
            seen["nothing left to click"] += expected is None and (fn > 0 or fp > 0)
    assert seen["cases"] >= 1000 and min(seen.values()) >= 20, seen


def test_click_sign_follows_the_farthest_error_not_the_area():
    target = torch.zeros(1, 4, 20, 30, dtype=torch.bool)
    target[..., 5:15, 5:15] = True
    pred = target.clone()
    pred[0, 0, 5:15, 5:10] = False  # 50 px missed, 5 px thick -> positive click
    pred[0, 0, 0, 20:30] = True  # 10 px spurious, 1 px thick
    pred[0, 1, 5:15, 14] = False  # 10 px missed, 1 px thick
    pred[0, 1, 0:4, 20:24] = True  # 16 px spurious, 4 px thick -> negative click
    pred[0, 2, 5:15, 5:7] = False  # a 2 px thick miss against a 2 px thick spurious strip: the tie goes negative
    pred[0, 2, 0:2, 20:30] = True
    points, labels = next_clicks(pred, target)  # region 3 is perfect
    assert labels.tolist() == [[1, 0, 0, PERFECT]]
    x, y = points[0, 0].long().tolist()
    assert 5 <= x < 10 and 5 <= y < 15
    x, y = points[0, 1].long().tolist()
    assert 20 <= x < 24 and 0 <= y < 4 and not target[0, 1, y, x]
    assert points[0, 3].tolist() == [0.0, 0.0]
    clicked = torch.zeros_like(pred)
    clicked[0, 1, y, x] = True  # the same pixel is never clicked twice: the next farthest one is chosen
    again, _ = next_clicks(pred, target, clicked=clicked)
    assert again[0, 1].tolist() != [x, y] and pred[0, 1, int(again[0, 1, 1]), int(again[0, 1, 0])]
    one_pixel = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    one_pixel[0, 0, 2, 2] = True
    assert next_clicks(torch.zeros_like(one_pixel), one_pixel, clicked=one_pixel)[1].item() == PERFECT


def test_random_clicks_stay_in_the_interior_half():
    rng = np.random.default_rng(2)
    pairs = [random_pair(rng, 32, 32) for _ in range(200)]
    pred = torch.from_numpy(np.stack([p for p, _ in pairs])).view(10, 20, 32, 32)
    target = torch.from_numpy(np.stack([t for _, t in pairs])).view(10, 20, 32, 32)
    points, labels = next_clicks(pred, target, random=True, generator=torch.Generator().manual_seed(0))
    for (p, t), (x, y), label in zip(pairs, points.view(-1, 2).long().tolist(), labels.view(-1).tolist()):
        expected = standard_click(p, t, np.zeros_like(p))
        if expected is None:
            assert label == PERFECT
            continue
        assert label == expected[0]  # the standard clicker's sign
        ref = reference_distance(t & ~p if label == 1 else p & ~t)
        assert ref[y, x] >= 0.5 * ref.max() > 0


def test_random_clicks_are_seeded_and_spread():
    pred = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    target = torch.zeros_like(pred)
    target[..., 8:56, 8:56] = True
    draws = [next_clicks(pred, target, random=True, generator=torch.Generator().manual_seed(s))[0] for s in range(10)]
    again = next_clicks(pred, target, random=True, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(draws[0], again)
    assert len({tuple(d.view(-1).tolist()) for d in draws}) > 5
    fixed = next_clicks(pred, target)[0]
    dist = reference_distance(target[0, 0].numpy())
    assert dist[int(fixed[0, 0, 1]), int(fixed[0, 0, 0])] == dist.max()


def test_shapes_dtypes_and_bad_input():
    pred = torch.zeros(3, 5, 17, 23, dtype=torch.bool)
    target = torch.ones_like(pred)
    points, labels = next_clicks(pred, target)
    assert points.shape == (3, 5, 2) and points.dtype == torch.float32
    assert labels.shape == (3, 5) and labels.dtype == torch.int64
    assert (labels == 1).all()
    with pytest.raises(ValueError, match="bool"):
        next_clicks(pred.float(), target)
    with pytest.raises(ValueError, match="B, K, H, W"):
        next_clicks(pred, target[..., :-1])
    with pytest.raises(ValueError, match="B, K, H, W"):
        next_clicks(pred[0], target[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_next_clicks_on_cuda_match_cpu():
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng, 40, 40) for _ in range(64)]
    pred = torch.from_numpy(np.stack([p for p, _ in pairs])).view(8, 8, 40, 40)
    target = torch.from_numpy(np.stack([t for _, t in pairs])).view(8, 8, 40, 40)
    points, labels = next_clicks(pred.cuda(), target.cuda())
    assert points.device.type == "cuda"
    cpu_points, cpu_labels = next_clicks(pred, target)
    assert torch.equal(points.cpu(), cpu_points) and torch.equal(labels.cpu(), cpu_labels)
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert next_clicks(pred.cuda(), target.cuda(), random=True, generator=generator)[0].device.type == "cuda"
