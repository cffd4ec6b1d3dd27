"""MMR: sin-cos grid, simple FPN, masking without leaks, Eq. 1-2, training, estimator."""

import numpy as np
import pytest
import torch
from timm.layers import LayerNorm2d

import skad._mmr as mmr_module
from skad import WeightsNotFoundError
from skad._backbone import _cached_hub_file, create_model
from skad._layers import SimpleFPNLevel, sincos_2d
from skad._mmr import (
    MMR,
    MaskedStudent,
    cosine_distance_maps,
    random_resized_crop_flip,
    reconstruction_loss,
)
from skad._threads import n_parts
from skad.datasets import make_textures

TINY = {"teacher": "test_efficientnet", "teacher_weights": None, "student": "test_vit",
        "student_weights": None, "student_depth": 2, "image_size": 32, "n_epochs": 2,
        "random_state": 0}


@pytest.fixture(scope="module")
def textures():
    return make_textures(n_domains=1, n_normal=16, n_anomalous=8, image_size=64,
                         random_state=3)


def _student(mask_channels=(8, 12, 16), factors=(4, 2, 1), seed=0):
    torch.manual_seed(seed)  # test-only module init; the estimator seeds locally
    vit, _ = create_model("test_vit", None, dynamic_img_size=True, num_classes=0)
    vit.blocks = vit.blocks[:2]
    return MaskedStudent(vit, mask_channels, factors, (0.5,) * 3, (0.5,) * 3).eval()


# ------------------------------------------------------------------ building blocks
def test_sincos_2d_encodes_rows_and_columns_separately():
    pe = sincos_2d(3, 5, 16).view(3, 5, 16)
    assert pe.shape == (3, 5, 16)
    # first half depends on the row only, second half on the column only
    assert torch.allclose(pe[:, :1, :8].expand(-1, 5, -1), pe[..., :8])
    assert torch.allclose(pe[:1, :, 8:].expand(3, -1, -1), pe[..., 8:])
    # position 0: sin = 0, cos = 1; omega_0 = 1: row 2 has sin(2) in channel 0
    assert torch.allclose(pe[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert pe[2, 0, 0].item() == pytest.approx(np.sin(2.0), abs=1e-6)
    assert len({tuple(v.tolist()) for v in pe.view(15, 16)}) == 15
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


@pytest.mark.parametrize("factor,size", [(4, 12), (2, 6), (1, 3), (0.5, 1), (8, 24)])
def test_simple_fpn_level_scales_and_channels(factor, size):
    level = SimpleFPNLevel(32, 10, factor)
    out = level(torch.randn(2, 32, 3, 3))
    assert out.shape == (2, 10, size, size)


def test_simple_fpn_x4_follows_vitdet():
    kinds = [type(m) for m in SimpleFPNLevel(32, 10, 4)]
    assert kinds == [torch.nn.ConvTranspose2d, LayerNorm2d, torch.nn.GELU,
                     torch.nn.ConvTranspose2d, torch.nn.Conv2d, LayerNorm2d, torch.nn.Conv2d,
                     LayerNorm2d]
    with pytest.raises(ValueError, match="scale factor"):
        SimpleFPNLevel(32, 10, 3)


def test_masked_patches_do_not_leak_into_the_student():
    student = _student()
    x = torch.rand(2, 3, 64, 64)  # 4 x 4 patches of 16 px
    gen = lambda: torch.Generator().manual_seed(5)
    grid, visible = student.encode(x, 0.5, gen())
    assert visible.sum(dim=1).tolist() == [8, 8]
    # change every masked patch's pixels: nothing of the output may change
    pixel_mask = visible.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 16, 4, 16).reshape(2, 3, 64, 64)
    x2 = torch.where(pixel_mask, x, torch.rand_like(x))
    grid2, visible2 = student.encode(x2, 0.5, gen())
    assert torch.equal(visible, visible2)
    assert torch.allclose(grid, grid2, atol=1e-6)
    feats, feats2 = student(x, 0.5, gen()), student(x2, 0.5, gen())
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(feats, feats2))
    # masked positions hold the mask token plus the fixed position embedding
    pe = sincos_2d(4, 4, 64)
    flat = grid.flatten(2).transpose(1, 2)
    hidden = ~visible
    assert torch.allclose(flat[hidden], (student.mask_token[0] + pe.expand(2, -1, -1))[hidden],
                          atol=1e-6)
    # while a visible patch does change it
    x3 = torch.where(pixel_mask, torch.rand_like(x), x)
    assert not torch.allclose(student.encode(x3, 0.5, gen())[0], grid, atol=1e-4)


def test_no_masking_at_test_time():
    student = _student()
    x = torch.rand(1, 3, 48, 48)
    g1, vis = student.encode(x, 0.0, torch.Generator().manual_seed(1))
    g2, _ = student.encode(x, 0.0, torch.Generator().manual_seed(2))
    assert vis.all() and torch.equal(g1, g2)
    # 48 px: a 3 x 3 grid, position embeddings interpolated from the 10 x 10 default
    assert g1.shape == (1, 64, 3, 3)
    assert [f.shape[-1] for f in student(x)] == [12, 6, 3]


def test_loss_and_maps_on_hand_made_features():
    t = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2),  # two positions
         torch.ones(1, 3, 2, 2)]
    same = [f.clone() * 3 for f in t]  # cos is scale-free
    assert reconstruction_loss(same, t).item() == pytest.approx(0.0, abs=1e-6)
    opposite = [-f for f in t]
    assert reconstruction_loss(opposite, t).item() == pytest.approx(4.0)  # 2 per level
    # level 0: one position matches, one is orthogonal -> mean 0.5; level 1: exact -> 0
    mixed = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2), t[1]]
    dist = cosine_distance_maps(mixed, t)
    assert torch.allclose(dist[0], torch.tensor([[[0.0, 1.0]]]))
    assert reconstruction_loss(mixed, t).item() == pytest.approx(0.5)


def test_schedule_is_the_released_one():
    """Warm-up from 0 (epoch e at e/50 of the rate), then / 10 from the epochs numbered
    120 and 160 counting from 1 (mmr_adjust_learning_rate in the released code)."""
    from skad._training import warmup_step_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_step_schedule(opt, 50, (120, 160), 0.1)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1 / 50) and lrs[49] == pytest.approx(0.98)
    assert lrs[50] == lrs[118] == 1.0
    assert lrs[119] == lrs[158] == pytest.approx(0.1)
    assert lrs[159] == lrs[199] == pytest.approx(0.01)


def test_random_resized_crop_flip():
    x = torch.rand(4, 3, 16, 16)
    same = random_resized_crop_flip(x, None, False, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-5)
    flipped = random_resized_crop_flip(x, None, True, torch.Generator().manual_seed(0))
    kinds = {("same" if torch.allclose(f, o, atol=1e-5) else
              "flip" if torch.allclose(f, o.flip(-1), atol=1e-5) else "other")
             for f, o in zip(flipped, x)}
    assert kinds <= {"same", "flip"}
    cropped = random_resized_crop_flip(x, (0.5, 0.6), False, torch.Generator().manual_seed(0))
    assert cropped.shape == x.shape and not torch.allclose(cropped, x, atol=1e-3)
    assert cropped.min() >= 0 and cropped.max() <= 1


# ------------------------------------------------------------------ the estimator
def test_fit_trains_and_scores(textures):
    normals = textures.images[textures.y == 0]
    # the paper's maps and score (Eq. 2); the standardised ones: test_position_standardization
    det = MMR(**{**TINY, "image_size": 64, "n_epochs": 4, "standardize_positions": False})
    det.fit(normals[:12])
    assert len(det.loss_history_) == 4
    assert det.loss_history_[-1] < det.loss_history_[0]
    assert det.scale_factors_ == [4.0, 2.0, 1.0]
    assert not det.student_.training and not det.teacher_.training
    assert det.student_.vit.pos_embed.requires_grad is False
    scores, maps = det.score_and_map(textures.images)
    assert scores.shape == (24,) and maps.shape == (24, 64, 64)
    # image score = maximum of the smoothed map
    np.testing.assert_allclose(scores, maps.reshape(24, -1).max(axis=1), rtol=1e-4)
    np.testing.assert_allclose(det.reference_scores_, det.decision_function(normals[:12]),
                               rtol=1e-5)


def test_detects_synthetic_defects(textures):
    """A few epochs with the offline ImageNet teacher: defects score higher than normals."""
    normals = textures.images[textures.y == 0]
    det = MMR(teacher="tf_efficientnet_lite0", student="test_vit", student_weights=None,
              student_depth=2, image_size=64, n_epochs=15, learning_rate=2e-3, random_state=0)
    det.fit(normals[:12])
    test = np.r_[np.flatnonzero(textures.y == 0)[12:], np.flatnonzero(textures.y == 1)]
    auc = det.score(textures.images[test], textures.y[test])
    assert auc > 0.75, auc


def test_teacher_features_cached_without_augmentation(textures, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        bb = create(*args, **kwargs)
        bb.register_forward_hook(lambda *a: calls.append(1))
        return bb

    create = mmr_module.create_backbone
    monkeypatch.setattr(mmr_module, "create_backbone", counting)
    X = textures.images[:10]
    MMR(**{**TINY, "n_epochs": 3, "batch_size": 5, "crop_scale": None, "hflip": False}).fit(X)
    # the reference scores: 2 batches of 5, each split over the threads (two images a part
    # at least: skad._threads.split_batch)
    scoring = 2 * n_parts(5, torch.get_num_threads())
    cached = len(calls)
    assert cached == 2 + scoring  # one caching pass (2 batches) + the reference scores
    calls.clear()
    MMR(**{**TINY, "n_epochs": 3, "batch_size": 5}).fit(X)
    assert len(calls) == 3 * 2 + scoring  # every step of every epoch + the reference scores


def test_random_state_reproducible(textures):
    X = textures.images[:8]
    a = MMR(**TINY).fit(X).decision_function(X)
    b = MMR(**TINY).fit(X).decision_function(X)
    c = MMR(**{**TINY, "random_state": 1}).fit(X).decision_function(X)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(a, c)


def test_odd_image_sizes(textures):
    det = MMR(**{**TINY, "image_size": 40, "n_epochs": 1}).fit(textures.images[:4])
    assert det.predict_map(textures.images[:2]).shape == (2, 64, 64)


@pytest.mark.parametrize("params,match", [
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"student": "test_resnet"}, "VisionTransformer"),
    ({"teacher": "test_vit"}, "CNN"),
    ({"student_depth": 99}, "student_depth"),
])
def test_bad_parameters(textures, params, match):
    with pytest.raises(ValueError, match=match):
        MMR(**{**TINY, **params}).fit(textures.images[:4])


def test_missing_student_weights_say_how_to_supply(textures, monkeypatch):
    if _cached_hub_file("vit_base_patch16_224.mae") is not None:
        pytest.skip("MAE weights are cached on this machine")
    monkeypatch.setenv("SKAD_OFFLINE", "1")
    det = MMR(**{**TINY, "student": "vit_base_patch16_224.mae", "student_weights": "pretrained"})
    with pytest.raises(WeightsNotFoundError, match="weights="):
        det.fit(textures.images[:4])
    assert not hasattr(det, "student_")
