"""Tests for skad.metrics, checked against direct brute-force computations."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from skad.metrics import evaluate, image_roc_auc, pixel_roc_auc, pro_score


def brute_force_pro(masks, maps, max_fpr):
    """Reference AUPRO: one explicit pass per distinct threshold."""
    masks = [np.asarray(m) != 0 for m in masks]
    maps = [np.asarray(a, dtype=float) for a in maps]
    regions = []
    for mask, amap in zip(masks, maps):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labels == k] for k in range(1, n + 1)]
    normal_scores = np.concatenate([a[~m] for m, a in zip(masks, maps)])
    all_scores = np.concatenate([a.ravel() for a in maps])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fprs.append(np.mean(normal_scores >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_blobs(rng, shape, n_blobs):
    """Mask with a few random rectangles (they may touch or overlap)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_blobs):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, 4, size=2)
        mask[r : r + h, c : c + w] = 1
    return mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_pro_matches_brute_force_with_ties(seed, max_fpr):
    rng = np.random.default_rng(seed)
    masks = np.stack([random_blobs(rng, (12, 10), rng.integers(0, 4)) for _ in range(5)])
    masks[0, 2:5, 2:4] = 1  # at least one region overall
    # Integer-valued maps, shifted upwards on defects: many tied scores.
    maps = rng.integers(0, 6, size=masks.shape) + 2 * masks
    expected = brute_force_pro(masks, maps, max_fpr)
    assert pro_score(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pro_matches_brute_force_on_lists_of_different_sizes(seed):
    rng = np.random.default_rng(100 + seed)
    shapes = [(9, 14), (16, 7), (11, 11), (5, 6)]
    masks = [random_blobs(rng, s, 3) * 255 for s in shapes]
    masks[3][:] = 0  # an image without defects
    maps = [rng.normal(size=s) + (m > 0) for s, m in zip(shapes, masks)]
    expected = brute_force_pro(masks, maps, 0.3)
    assert pro_score(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pro_counts_diagonal_pixels_as_one_region():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # one 8-connected region of 2 pixels
    mask[3, 3] = True  # a second region
    amap = np.zeros((4, 4))
    amap[0, 0] = 2.0  # half of region 1 is found first
    amap[3, 3] = 1.0
    masks, maps = mask[None], amap[None]
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(brute_force_pro(masks, maps, 1.0))


def test_pro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks = np.stack([random_blobs(rng, (16, 16), 3) for _ in range(4)])
    maps = masks + 0.1 * rng.random(masks.shape)
    assert pro_score(masks, maps) == pytest.approx(1.0)


def test_pro_constant_map():
    # All pixels tie: the curve jumps from (0, 0) to (1, 1), so the area up to
    # max_fpr is max_fpr**2 / 2 and the normalized score is max_fpr / 2.
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    masks[0, :2, :2] = 1
    maps = np.full(masks.shape, 0.7)
    assert pro_score(masks, maps, max_fpr=0.3) == pytest.approx(0.15)
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(0.5)


def test_pro_inverted_map_is_zero_below_max_fpr():
    masks = np.zeros((2, 10, 10), dtype=np.uint8)
    masks[1, 4:6, 4:6] = 1
    assert pro_score(masks, 1.0 - masks, max_fpr=0.5) == pytest.approx(0.0)


def test_pro_accepts_bool_and_0_255_masks():
    rng = np.random.default_rng(3)
    masks = np.stack([random_blobs(rng, (10, 10), 2) for _ in range(3)])
    maps = rng.random(masks.shape)
    ref = pro_score(masks, maps)
    assert pro_score(masks.astype(bool), maps) == pytest.approx(ref)
    assert pro_score(masks * 255, maps) == pytest.approx(ref)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_roc_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = np.stack([random_blobs(rng, (12, 12), 2) for _ in range(4)])
    maps = rng.integers(0, 5, size=masks.shape) + masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_roc_auc(masks * 255, maps) == pytest.approx(expected)
    assert pixel_roc_auc(list(masks), list(maps)) == pytest.approx(expected)


def test_pixel_roc_auc_lists_of_different_sizes():
    rng = np.random.default_rng(7)
    masks = [random_blobs(rng, (8, 5), 2), random_blobs(rng, (3, 9), 1)]
    maps = [rng.random(m.shape) for m in masks]
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([a.ravel() for a in maps])
    assert pixel_roc_auc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps))


def test_shape_mismatch_names_index():
    masks = [np.zeros((4, 4)), np.ones((4, 4))]
    maps = [np.zeros((4, 4)), np.zeros((4, 5))]
    for metric in (pixel_roc_auc, pro_score):
        with pytest.raises(ValueError, match="mask 1"):
            metric(masks, maps)


def test_nan_in_map_names_index():
    masks = np.zeros((3, 4, 4))
    masks[0, 0, 0] = 1
    maps = np.zeros((3, 4, 4))
    maps[2, 1, 1] = np.nan
    for metric in (pixel_roc_auc, pro_score):
        with pytest.raises(ValueError, match=r"maps\[2\]"):
            metric(masks, maps)
    maps[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        pro_score(masks, maps)


@pytest.mark.parametrize("fill", [0, 1])
def test_single_class_pixels_raise(fill):
    masks = np.full((2, 4, 4), fill)
    maps = np.random.default_rng(0).random((2, 4, 4))
    for metric in (pixel_roc_auc, pro_score):
        with pytest.raises(ValueError, match="no defect"):
            metric(masks, maps)


def test_bad_inputs():
    masks = np.zeros((2, 4, 4))
    masks[0, 0, 0] = 1
    maps = np.zeros((2, 4, 4))
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_fpr"):
            pro_score(masks, maps, max_fpr=bad)
    with pytest.raises(ValueError, match="same number"):
        pro_score(masks, maps[:1])
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        pixel_roc_auc(masks[0], maps[0])
    with pytest.raises(ValueError, match=r"masks\[1\] must be 2-D"):
        pro_score([masks[0], masks], [maps[0], maps[1]])


def test_image_roc_auc():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.5, 0.4, 0.7])
    assert image_roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert image_roc_auc(y.astype(bool), s) == pytest.approx(roc_auc_score(y, s))
    with pytest.raises(ValueError, match="both"):
        image_roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        image_roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        image_roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="only 0 and 1"):
        image_roc_auc([0, 2], [0.1, 0.2])


def test_evaluate():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), dtype=np.uint8)
    masks[2, 1:4, 1:4] = 1
    masks[3, 5:, 5:] = 1
    maps = rng.random(masks.shape) + masks
    y, scores = [0, 0, 1, 1], [0.1, 0.3, 0.2, 0.9]
    res = evaluate(y, scores, masks, maps, max_fpr=0.2)
    assert res == pytest.approx(
        {
            "image_auroc": roc_auc_score(y, scores),
            "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
            "pro": pro_score(masks, maps, max_fpr=0.2),
        }
    )
    assert set(evaluate(y, scores)) == {"image_auroc"}
    with pytest.raises(ValueError, match="together"):
        evaluate(y, scores, masks=masks)
    with pytest.raises(ValueError, match="one mask per image"):
        evaluate(y, scores, masks[:3], maps[:3])


def test_pro_runs_on_200_full_size_maps():
    # Scale check only (no timing assertion): 200 maps of 256 x 256.
    rng = np.random.default_rng(0)
    masks = np.zeros((200, 256, 256), dtype=np.uint8)
    masks[::2, 100:140, 60:90] = 1
    masks[1::4, 10:20, 200:250] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    score = pro_score(masks, maps)
    assert 0.0 < score < 1.0
