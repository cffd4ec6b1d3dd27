"""GlobalLocal: partial convolution, no peeking, losses, stains, IDW, heads, estimator."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import skad._global_local as gl_module
from skad._global_local import (
    DADHead,
    GlobalLocal,
    GlobalNet,
    LocalNet,
    add_stains,
    compactness_loss,
    crop_windows,
    dad_loss,
    distillation_loss,
    edge_strips,
    iad_score,
    idw_interpolate,
    idw_weights,
    jittered_starts,
    patch_starts,
    stem_regions,
    stem_step,
    window_stems,
)
from skad._layers import PartialConv2d, partial_conv2d
from skad.datasets import make_textures
from skad.metrics import evaluate
from skad.thresholds import CalibrationWarning

TINY = {"teacher": "test_efficientnet", "teacher_weights": None, "teacher_size": 32,
        "patch_size": 8, "stride": 4, "embed_dim": 16, "width": 8, "n_distill_patches": 8,
        "n_distill_epochs": 2, "n_finetune_epochs": 1, "n_epochs": 2, "image_size": 32,
        "random_state": 0}


@pytest.fixture(scope="module")
def textures():
    return make_textures(n_domains=1, n_normal=24, n_anomalous=12, image_size=32,
                         random_state=3)


@pytest.fixture(scope="module")
def fitted(textures):
    return GlobalLocal(**TINY).fit(textures.images[textures.y == 0][:10])


# ------------------------------------------------------------------ partial convolution
def _notes_partial_conv(x, mask, weight, bias, padding, stride=1):
    """NOTES.md's formula with a C-channel mask, written out independently."""
    c, k = x.shape[1], weight.shape[-1]
    m = mask.expand(-1, c, -1, -1)
    update = F.conv2d(m, torch.ones(1, c, k, k), stride=stride, padding=padding)
    ratio = k * k * c / (update + 1e-8)
    update = update.clamp(0, 1)
    raw = F.conv2d(x * m, weight, bias, stride=stride, padding=padding)
    b = bias.view(1, -1, 1, 1)
    return (raw - b) * ratio * update + b * update, update


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_conv_matches_the_notes_formula(stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=g)
    mask = (torch.rand(2, 1, 7, 7, generator=g) > 0.4).float()
    mask[0, :, :4, :4] = 0  # a hole larger than the kernel: outputs there must be 0
    weight, bias = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    out, update = partial_conv2d(x, mask, weight, bias, stride=stride, padding=1)
    ref, ref_update = _notes_partial_conv(x, mask, weight, bias, 1, stride)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(update, ref_update)
    assert set(update.unique().tolist()) <= {0.0, 1.0}
    inside = {1: 3, 2: 2}[stride]  # outputs whose 3 x 3 window lies in the hole
    assert torch.all(out[0, :, :inside, :inside] == 0)
    assert torch.all(update[0, :, :inside, :inside] == 0)
    # with nothing masked (and no padding) it is an ordinary convolution
    plain, _ = partial_conv2d(x, torch.ones_like(mask), weight, bias)
    torch.testing.assert_close(plain, F.conv2d(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_global_net_masks_only_its_input():
    """Later layers take their input as masked (x_masked): the same as masking it again."""
    net = GlobalNet(embed_dim=16, width=8).eval()
    g = torch.Generator().manual_seed(1)
    windows = torch.rand(4, 3, 24, 24, generator=g)
    mask = (torch.rand(4, 1, 24, 24, generator=g) > 0.3).float()
    mask[:, :, 6:18, 6:18] = 0
    with torch.no_grad():
        x, m = (windows - 0.5) / 0.25, mask
        for conv, pool in zip(net.convs, net.pool_after):
            x, m = conv(x, m)  # masks its input every time
            x = F.leaky_relu(x, 0.1)
            if pool:
                x, m = F.max_pool2d(x, 2, ceil_mode=True), F.max_pool2d(m, 2, ceil_mode=True)
            assert torch.all(x[m.expand_as(x) == 0] == 0)
        expected = net.head(F.adaptive_avg_pool2d(x, net.grid).flatten(1))
        assert torch.equal(net(windows, mask), expected)
        # channels-last windows (as scoring crops them) give the same features up to rounding
        torch.testing.assert_close(
            net(windows.contiguous(memory_format=torch.channels_last), mask), expected)

def test_partial_conv_keeps_no_state():
    conv = PartialConv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    full, half = torch.ones(1, 1, 6, 6), torch.ones(1, 1, 6, 6)
    half[..., :3] = 0
    a = conv(x, full)[0]
    conv(x, half)
    torch.testing.assert_close(conv(x, full)[0], a)
    assert not [k for k, v in vars(conv).items() if isinstance(v, torch.Tensor)]


def _windows(det, image, top, left):
    padded, valid = det._pad(image[None])
    owner = torch.zeros(len(top), dtype=torch.long)
    return det._crop(padded, valid, owner, torch.tensor(top), torch.tensor(left))


@pytest.mark.parametrize("context", [3, 2.5, "image"])
def test_global_net_never_sees_the_patch(context):
    det = GlobalLocal(patch_size=8, context=context, image_size=32)
    net = GlobalNet(embed_dim=16, width=8).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=g)
    top, left = [0, 12, 24], [5, 12, 24]  # corners of the image and its middle
    windows, mask, patch = _windows(det, image, top, left)
    m, size = det._margin(), det.patch_size + 2 * det._margin()
    assert windows.shape == (3, 3, size, size) and patch.shape == (3, 3, 8, 8)
    assert torch.equal(patch[1], image[:, 12:20, 12:20])
    assert torch.all(mask[:, :, m:m + 8, m:m + 8] == 0)
    assert torch.all(mask[0, :, :m, :] == 0)  # above the image: masked too
    with torch.no_grad():
        z = net(windows, mask)
        for i, (t, lf) in enumerate(zip(top, left)):
            other = image.clone()
            other[:, t:t + 8, lf:lf + 8] = torch.rand(3, 8, 8, generator=g)
            z_other = net(*_windows(det, other, top, left)[:2])
            assert torch.equal(z[i], z_other[i]), "Z_g changed with the hidden patch's pixels"
            assert not torch.equal(_windows(det, other, top, left)[2][i], patch[i])
        context_changed = image.clone()
        context_changed[:, 20:23, 12:20] = 1 - context_changed[:, 20:23, 12:20]
        z_ctx = net(*_windows(det, context_changed, top, left)[:2])
        assert not torch.allclose(z[1], z_ctx[1])


def _stem_pair(height, width, patch, stride, margin, n_images=2, seed=0):
    """The Global-Net's stem on every raster window: run on each window, and shared (each
    window its own edge bands, and the bands by raster row and column where they can be)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = GlobalNet(embed_dim=16, width=8).eval()
    images = torch.rand(n_images, 3, height, width, generator=g)
    padded = F.pad(images, (margin,) * 4)
    valid = F.pad(torch.ones(n_images, 1, height, width), (margin,) * 4)
    ys, xs = patch_starts(height, patch, stride), patch_starts(width, patch, stride)
    top, left = (t.flatten() for t in torch.meshgrid(ys, xs, indexing="ij"))
    owner = torch.arange(n_images).repeat_interleave(len(top))
    raster = torch.arange(len(top)).repeat(n_images)
    row, col = owner * len(ys) + raster // len(xs), owner * len(xs) + raster % len(xs)
    top, left = top.repeat(n_images), left.repeat(n_images)
    size = patch + 2 * margin
    windows = crop_windows(padded, owner, top, left, size)
    mask = crop_windows(valid, owner, top, left, size)
    mask[:, :, margin:margin + patch, margin:margin + patch] = 0.0
    regions = stem_regions(net, size, margin, patch)
    at = (padded, valid, owner, top, left, size, (margin, margin + patch), regions)
    with torch.no_grad():
        each = net.stem(windows, mask)
        stem = net.stem(padded, valid)
        shared = [window_stems(net, *stem, *at)]
        if regions.bands is not None:
            strips = edge_strips(net, padded, valid, ys.tolist(), xs.tolist(), size, regions)
            shared.append(window_stems(net, *stem, *at, strips, row, col))
    return each, shared, regions


@pytest.mark.parametrize("height, width, patch, stride, margin, by_rows", [
    (256, 256, 32, 24, 32, True),  # the defaults: 11 x 11 windows of 96 px
    (64, 48, 16, 8, 16, True),     # a rectangular image
    (40, 40, 8, 4, 32, True),      # windows far past the image (context "image")
    (64, 64, 16, 16, 8, True),     # a thin context
    (60, 44, 12, 4, 12, True),     # odd grids: a pooling of one cell at the window's end
    (48, 40, 16, 8, 4, False),     # the edge bands read the hole: each window its own
    (52, 60, 16, 8, 8, True),      # windows of 32 px: 8 x 8 stems
    (48, 56, 16, 4, 10, True),     # windows of 36 px: 9 x 9 stems, a pooling of one cell
])
def test_shared_stem_equals_the_stem_on_each_window(monkeypatch, height, width, patch, stride,
                                                     margin, by_rows):
    monkeypatch.setattr(gl_module, "_MAX_RECOMPUTED", 1.0)  # share the small ones too
    each, shared, regions = _stem_pair(height, width, patch, stride, margin)
    assert regions is not None and stem_step(GlobalNet(16, 8)) == 4
    assert len(shared) == 1 + by_rows  # edge bands by raster row and column where they can be
    for x, mask in shared:
        assert x.shape == each[0].shape and mask.shape == each[1].shape
        torch.testing.assert_close(mask, each[1], rtol=0, atol=0)  # masks: exactly
        torch.testing.assert_close(x, each[0], rtol=1e-5, atol=1e-5)
    assert each[0].abs().amax() > 0.1 and (each[1] == 0).any()  # not all zeros, holes masked


def test_shared_stem_recomputes_under_a_third_of_the_default_window():
    """96 px windows: a band of one cell along each edge and a ring round the hole's zeros;
    the bands but their corners once per raster row and column."""
    regions = stem_regions(GlobalNet(16, 32), 96, 32, 32)
    area = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in regions.recomputed)
    assert area == 4 + 4 * 16  # four corners and the ring, of the stem grid's 24 x 24
    assert regions.bands == (((0, 1), (23, 24)), (1, 23))
    assert regions.zeros == ((9, 15), (9, 15))  # the stem's cells that see nothing but the hole
    # the tests' tiny windows (24 px, a 6 x 6 stem) would recompute all: not shared
    assert stem_regions(GlobalNet(16, 8), 24, 8, 8) is None


def test_scoring_shares_the_stem_only_on_its_grid(fitted, textures, monkeypatch):
    det = fitted
    X = textures.images[-3:]
    plain = det.predict_map(X)
    monkeypatch.setattr(gl_module, "_MAX_RECOMPUTED", 1.0)
    calls = []
    original = gl_module.window_stems
    monkeypatch.setattr(gl_module, "window_stems", lambda *a: calls.append(1) or original(*a))
    np.testing.assert_allclose(det.predict_map(X), plain, rtol=1e-5, atol=1e-6)
    assert calls  # shared: the raster's starts (stride 4) are multiples of the stem's step
    calls.clear()
    # starts 0, 6, 12, ...: off the stem's grid, each window alone; the position statistics
    # follow the maps, so the reference is set at the new stride
    normals = textures.images[textures.y == 0][:10]
    det.set_params(stride=6)
    try:
        with pytest.raises(ValueError, match="changed stride from 4 to 6"):
            det.predict_map(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)  # its training images
            det.set_reference(normals)
        calls.clear()
        assert det.predict_map(X).shape == plain.shape and not calls
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            det.set_params(stride=4).set_reference(normals)


@pytest.mark.parametrize("channels, layout", [(3, "nchw"), (3, "channels_last"), (1, "nchw"),
                                               (5, "strided")])
def test_crop_windows_and_raster_grid(channels, layout):
    images = torch.arange(2 * channels * 9 * 10, dtype=torch.float32).view(2, channels, 9, 10)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        images = torch.cat([images, images], dim=3)[..., ::2]
    owner, top, left = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 5]), torch.tensor([5, 3, 6])
    out = crop_windows(images, owner, top, left, 4)
    for k in range(3):  # the last one reaches the far corner
        assert torch.equal(out[k], images[owner[k], :, top[k]:top[k] + 4, left[k]:left[k] + 4])
    assert out.is_contiguous()
    last = crop_windows(images, owner, top, left, 4, channels_last=True)
    assert torch.equal(last, out) and last.is_contiguous(memory_format=torch.channels_last)
    wide = crop_windows(images, owner, top, left, (3, 4))  # (height, width)
    assert wide.shape == (3, channels, 3, 4) and torch.equal(wide, out[:, :, :3])
    for owner, top, left in ([2, 0, 6], [0, 6, 0], [0, 0, 7], [0, -1, 0], [0, 0, -1]):
        with pytest.raises(IndexError, match="reach past the images"):  # not a wrapped read
            crop_windows(images, torch.tensor([owner]), torch.tensor([top]), torch.tensor([left]), 4)
    assert patch_starts(256, 32, 16).tolist() == list(range(0, 225, 16))  # 15 per axis
    assert patch_starts(50, 32, 16).tolist() == [0, 16, 18]  # the last one ends at the border


def test_training_positions_reach_the_raster_borders():
    """Border and corner windows are trained as often as scoring meets them."""
    gen = torch.Generator().manual_seed(0)
    pos = jittered_starts(256, 32, 16, 20000, gen)
    assert pos.min() == 0 and pos.max() == 224
    # 15 raster starts, a border one drawn 1/15 of the time, clamped half of that
    assert 0.02 < (pos == 0).float().mean() < 0.05
    assert 0.02 < (pos == 224).float().mean() < 0.05
    assert len(pos.unique()) > 200  # the jitter covers the positions between raster starts


def test_scoring_with_another_window_than_fitted_raises(fitted, textures):
    X = textures.images[:2]
    try:
        for change in ({"patch_size": 16}, {"context": 2}):
            fitted.set_params(**change)
            with pytest.raises(ValueError, match="patch_size and context.*fit again"):
                fitted.decision_function(X)
            fitted.set_params(**{k: TINY.get(k, 3) for k in change})
    finally:
        fitted.set_params(patch_size=TINY["patch_size"], context=3)
    assert fitted.decision_function(X).shape == (2,)


# ------------------------------------------------------------------ losses, stains, heads
def test_losses_on_hand_made_tensors():
    decoded = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert distillation_loss(decoded, target).item() == pytest.approx((5 + 25) / 2)  # Eq. 1
    assert iad_score(decoded, target).tolist() == pytest.approx([2.5, 12.5])  # Eq. 7: / n
    z = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    corr = np.corrcoef(z.numpy(), rowvar=False)
    expected = corr.sum() - np.trace(corr)  # Eq. 2: sum over i != j
    assert compactness_loss(z).item() == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert compactness_loss(torch.cat([z[:, :1]] * 3, 1)).item() == pytest.approx(6, rel=1e-3)
    # Eq. 9: clean patches against target 0, stained against 1; a head that outputs the
    # first coordinate of Z* gives logits 2 (clean) and -1 (stained)
    def head(z_star, z_global):
        return z_star[:, 0]

    clean, stained = torch.full((3, 2), 2.0), torch.full((3, 2), -1.0)
    expected = (np.log1p(np.exp(2.0)) + np.log1p(np.exp(1.0))) / 2
    assert dad_loss(head, clean, stained, torch.zeros(3, 2)).item() == pytest.approx(expected)


def test_stains_are_small_random_and_seeded():
    patches = torch.full((64, 3, 32, 32), 0.5)
    a = add_stains(patches, torch.Generator().manual_seed(1))
    b = add_stains(patches, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    changed = ((a - patches).abs().amax(dim=1) > 0.02).float().mean(dim=(1, 2))
    assert torch.all(changed > 0.005) and torch.all(changed < 0.6)  # a stain, not the patch
    assert changed.std() > 0.01  # random sizes
    assert not torch.equal(a, add_stains(patches, torch.Generator().manual_seed(2)))
    # grey patches get grey stains, darker or lighter (no new hue to spot them by)
    assert torch.allclose(a[:, 0], a[:, 1]) and torch.allclose(a[:, 1], a[:, 2])
    assert a.min() < 0.4 and a.max() > 0.6


def test_dad_head_and_local_net_shapes():
    local = LocalNet(embed_dim=16, teacher_dim=24, width=8)
    p = torch.rand(5, 3, 16, 16)
    assert local(p).shape == (5, 16) and local.decoder(local(p)).shape == (5, 24)
    local.z_mean.fill_(1.0)
    local.z_std.fill_(2.0)
    torch.testing.assert_close(local.embed(p), (local(p) - 1) / 2)
    assert DADHead(16)(local(p), local(p)).shape == (5,)


def test_dad_head_on_differences_sees_only_the_disagreement():
    head = DADHead(16, inputs="difference")
    z, z_g, shift = torch.randn(5, 16), torch.randn(5, 16), torch.randn(1, 16)
    # a patch and a context that move together look the same to it; the joint head sees them
    torch.testing.assert_close(head(z + shift, z_g + shift), head(z, z_g))
    joint = DADHead(16)
    assert not torch.allclose(joint(z + shift, z_g + shift), joint(z, z_g))


# ------------------------------------------------------------------ IDW interpolation
def test_idw_weights_and_interpolation():
    index, weight = idw_weights(40, 36, 8, 4, 4, 2.0)
    n_patches = len(patch_starts(40, 8, 4)) * len(patch_starts(36, 8, 4))
    assert index.shape == weight.shape == (40 * 36, 4) and int(index.max()) < n_patches
    torch.testing.assert_close(weight.sum(dim=1), torch.ones(40 * 36))
    scores = torch.rand(2, n_patches, generator=torch.Generator().manual_seed(0))
    maps = idw_interpolate(scores, index, weight, (40, 36))
    assert maps.shape == (2, 40, 36)
    assert maps.min() >= scores.min() - 1e-6 and maps.max() <= scores.max() + 1e-6
    const = idw_interpolate(torch.full((1, n_patches), 3.0), index, weight, (40, 36))
    torch.testing.assert_close(const, torch.full_like(const, 3.0))
    # linear in the scores: what lets iad_score_weight change without refitting
    mix = idw_interpolate(0.3 * scores[:1] + 0.7 * scores[1:], index, weight, (40, 36))
    torch.testing.assert_close(mix, 0.3 * maps[:1] + 0.7 * maps[1:])
    # next to a patch centre that centre dominates: patch (0, 0) is centred at 3.5
    idx, w = idw_weights(40, 36, 8, 4, 4, 8.0)
    one = torch.zeros(1, n_patches)
    one[0, 0] = 1.0
    assert idw_interpolate(one, idx, w, (40, 36))[0, 3, 3] > 0.9


# ------------------------------------------------------------------ the estimator
def test_fit_trains_every_stage_and_scores(fitted, textures):
    det = fitted
    assert [len(det.loss_history_[k]) for k in ("distill", "finetune", "global")] == [2, 1, 2]
    assert all(np.isfinite(v).all() for v in det.loss_history_.values())
    assert det.window_size_ == 24 and not det.local_net_.project.weight.requires_grad
    # the teacher is used in fit only: no fitted attribute holds it
    assert not [k for k, v in vars(det).items() if type(v).__name__ == "Backbone"]
    scores, maps = det.score_and_map(textures.images[-6:])
    assert scores.shape == (6,) and maps.shape == (6, 32, 32)
    np.testing.assert_allclose(scores, maps.reshape(6, -1).max(axis=1), rtol=1e-5)
    s_iad, s_dad = det._patch_scores(torch.rand(2, 3, 32, 32))
    assert s_iad.shape == s_dad.shape == (2, 49)  # 7 x 7 patches
    assert torch.all(s_dad >= 0) and torch.all(s_dad <= 1) and torch.all(s_iad >= 0)


def test_iad_score_weight_rescores_without_refit(fitted, textures):
    """Read at scoring: the raw maps (without position statistics) are linear in it (Eq. 13),
    with a word that the calibration holds at the earlier value."""
    det = fitted
    X = textures.images[-5:]
    maps = {}
    det.set_params(standardize_positions=False)
    try:
        for lam in (0.0, 0.5, 1.0):
            with pytest.warns(CalibrationWarning, match=f"iad_score_weight from 0.8 to {lam}"):
                maps[lam] = det.set_params(iad_score_weight=lam).predict_map(X)
        np.testing.assert_allclose(maps[0.5], 0.5 * (maps[0.0] + maps[1.0]), rtol=1e-4,
                                   atol=1e-5)
        assert not np.allclose(maps[0.0], maps[1.0])
        with pytest.raises(ValueError, match="iad_score_weight"):
            det.set_params(iad_score_weight=1.5).decision_function(X)
    finally:
        det.set_params(iad_score_weight=0.8, standardize_positions=True)


def test_scoring_in_chunks_and_other_strides(fitted, textures, monkeypatch):
    det = fitted
    X, normals = textures.images[-3:], textures.images[textures.y == 0][:10]
    expected = det.decision_function(X)
    monkeypatch.setattr(gl_module, "_CHUNK", 7)  # many small chunks, same windows
    np.testing.assert_allclose(det.decision_function(X), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():  # a stride chosen at scoring time, recalibrated at it
        warnings.simplefilter("ignore", CalibrationWarning)  # on its training images
        coarse = det.set_params(stride=8).set_reference(normals).predict_map(X)
        det.set_params(stride=4).set_reference(normals)
    assert coarse.shape == (3, 32, 32) and not np.allclose(coarse, det.predict_map(X))
    np.testing.assert_allclose(det.decision_function(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dad_input", ["joint", "difference"])
def test_detects_synthetic_defects(textures, dad_input):
    normal = np.flatnonzero(textures.y == 0)
    det = GlobalLocal(**{**TINY, "embed_dim": 32, "n_distill_patches": 32,
                         "n_distill_epochs": 20, "n_finetune_epochs": 0, "n_epochs": 20,
                         "dad_input": dad_input})
    det.fit(textures.images[normal[:16]])
    test = np.r_[normal[16:], np.flatnonzero(textures.y == 1)]
    scores, maps = det.score_and_map(textures.images[test])
    result = evaluate(textures.y[test], scores, textures.masks[test], maps)
    assert result["image_auroc"] > 0.75 and result["pixel_auroc"] > 0.6, result


def test_pre_distilled_local_net_is_copied_and_fine_tuned(fitted, textures):
    normals = textures.images[textures.y == 0][:6]
    given = fitted.local_net_
    before = {k: v.clone() for k, v in given.state_dict().items()}
    # no fine-tuning: the teacher is never built (these weights do not exist)
    det = GlobalLocal(**{**TINY, "teacher_weights": "/no/such/file.pth", "local_net": given,
                         "n_finetune_epochs": 0}).fit(normals)
    assert det.loss_history_["distill"] == [] and det.loss_history_["finetune"] == []
    assert det.local_net_ is not given
    torch.testing.assert_close(det.local_net_.project.weight, given.project.weight)
    tuned = GlobalLocal(**{**TINY, "local_net": given}).fit(normals)
    assert len(tuned.loss_history_["finetune"]) == 1
    assert not torch.allclose(tuned.local_net_.project.weight, given.project.weight)
    assert all(torch.equal(v, before[k]) for k, v in given.state_dict().items())
    with pytest.raises(ValueError, match="decodes to"):
        GlobalLocal(**{**TINY, "teacher": "test_resnet", "local_net": given}).fit(normals)


def test_distill_images_are_used_first(textures):
    extra = make_textures(n_domains=1, n_normal=4, n_anomalous=0, image_size=48,
                          random_state=9).images
    det = GlobalLocal(**{**TINY, "distill_images": list(extra)}).fit(textures.images[:6])
    assert len(det.loss_history_["distill"]) == 2 and len(det.loss_history_["finetune"]) == 1
    with pytest.raises(ValueError, match="distill_images"):
        GlobalLocal(**{**TINY, "distill_images": []}).fit(textures.images[:6])


def test_whole_image_context_and_rectangular_images(textures):
    det = GlobalLocal(**{**TINY, "context": "image", "image_size": (32, 40)})
    det.fit(textures.images[:4])
    assert det.window_size_ == 2 * 40 - 8
    assert det.predict_map(textures.images[:2]).shape == (2, 32, 32)


def test_several_teacher_levels_join_their_pooled_maps(textures):
    det = GlobalLocal(**{**TINY, "teacher_layers": (-2, -1)}).fit(textures.images[:4])
    deepest = GlobalLocal(**TINY).fit(textures.images[:4])
    # R(p): both levels' pooled maps side by side, so the decoder predicts more values
    assert det.local_net_.decoder.out_features > deepest.local_net_.decoder.out_features
    assert det.decision_function(textures.images[:2]).shape == (2,)
    with pytest.raises(ValueError, match="teacher_layers"):
        GlobalLocal(**{**TINY, "teacher_layers": ()}).fit(textures.images[:2])


def test_random_state_reproducible(textures):
    X = textures.images[:6]
    a = GlobalLocal(**TINY).fit(X).decision_function(X)
    b = GlobalLocal(**TINY).fit(X).decision_function(X)
    c = GlobalLocal(**{**TINY, "random_state": 1}).fit(X).decision_function(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("params, match", [
    ({"patch_size": 40}, "patch_size"),
    ({"context": 0.5}, "context"),
    ({"context": "window"}, "context"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"n_distill_epochs": -1}, "n_distill_epochs"),
    ({"stride": 0}, "stride"),
    ({"stride": 4.0}, "stride"),
    ({"patch_size": 8.0}, "patch_size"),
    ({"context": True}, "context"),
    ({"iad_score_weight": -0.1}, "iad_score_weight"),
    ({"idw_power": 0}, "idw_power"),
    ({"dad_input": "sum"}, "dad_input"),
])
def test_bad_parameters(textures, params, match):
    with pytest.raises(ValueError, match=match):
        GlobalLocal(**{**TINY, **params}).fit(textures.images[:2])


def test_local_net_must_be_a_local_net(textures):
    with pytest.raises(TypeError, match="LocalNet"):
        GlobalLocal(**{**TINY, "local_net": torch.nn.Linear(2, 2)}).fit(textures.images[:2])
