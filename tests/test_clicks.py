"""Error-guided clicks and the batched distance transform, checked against scipy's exact EDT."""
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from sam_peft.prompts import distance_transform, next_clicks


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


def test_next_clicks_agree_with_scipy_reference():
    rng = np.random.default_rng(1)
    seen_labels, checked = set(), 0
    for h, w in [(24, 24), (13, 40), (40, 7), (1, 12)]:
        pairs = [random_pair(rng, h, w) for _ in range(420)]
        pred = torch.from_numpy(np.stack([p for p, _ in pairs])).view(21, 20, h, w)
        target = torch.from_numpy(np.stack([t for _, t in pairs])).view(21, 20, h, w)
        points, labels = next_clicks(pred, target)
        for (p, t), (x, y), label in zip(pairs, points.view(-1, 2).long().tolist(), labels.view(-1).tolist()):
            fn, fp = t & ~p, p & ~t
            seen_labels.add(label)
            if not (fn.any() or fp.any()):
                assert label == -10
                continue
            assert label == int(fn.sum() >= fp.sum())
            error = fn if label == 1 else fp
            ref = reference_distance(error)
            assert error[y, x], "the click must land on the error it corrects"
            assert ref[y, x] >= ref.max() - 1
            checked += 1
    assert seen_labels == {-10, 0, 1} and checked >= 1000


def test_click_labels_follow_the_larger_error_area():
    target = torch.zeros(1, 4, 20, 30, dtype=torch.bool)
    target[..., 5:15, 5:15] = True
    pred = target.clone()
    pred[0, 0, 5:15, 5:10] = False  # 50 px missed -> positive click
    pred[0, 1, 0:10, 20:30] = True  # 100 px spurious -> negative click
    pred[0, 2, 5:15, 5:7] = False  # 20 px missed vs 20 px spurious: a tie goes positive
    pred[0, 2, 0:2, 20:30] = True
    points, labels = next_clicks(pred, target)  # region 3 is perfect
    assert labels.tolist() == [[1, 0, 1, -10]]
    x, y = points[0, 0].long().tolist()
    assert 5 <= x < 10 and 5 <= y < 15
    x, y = points[0, 1].long().tolist()
    assert 20 <= x < 30 and 0 <= y < 10 and not target[0, 1, y, x]
    assert points[0, 3].tolist() == [0.0, 0.0]


def test_random_clicks_stay_in_the_interior_half():
    rng = np.random.default_rng(2)
    pairs = [random_pair(rng, 32, 32) for _ in range(200)]
    pred = torch.from_numpy(np.stack([p for p, _ in pairs])).view(10, 20, 32, 32)
    target = torch.from_numpy(np.stack([t for _, t in pairs])).view(10, 20, 32, 32)
    points, labels = next_clicks(pred, target, random=True, generator=torch.Generator().manual_seed(0))
    for (p, t), (x, y), label in zip(pairs, points.view(-1, 2).long().tolist(), labels.view(-1).tolist()):
        if label == -10:
            continue
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
