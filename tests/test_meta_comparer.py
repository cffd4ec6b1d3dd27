"""MetaComparer: BiFPN, the split meta-comparer, co-attention, losses (Eq. 1-6), the estimator."""

import copy
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.model_selection import LeaveOneGroupOut, cross_validate

import skad
import skad._meta_comparer as mc
from skad._layers import BiFPN, FastFusion
from skad._meta_comparer import (CoAttention, MetaComparer, MetaComparerHead, PairComparer,
                                 attention_loss, classification_loss, episode_losses, rank_loss)
from skad._textures import synthesize_anomaly
from skad.datasets import make_textures
from skad.model_selection import ReferenceScorer

TINY = dict(backbone="test_resnet", weights=None, image_size=32, fpn_width=16, n_fpn_cells=1,
            hidden_layer_sizes=(16,), attention_dim=8, n_epochs=1, n_episodes=2, random_state=0)


@pytest.fixture(scope="module")
def data():
    return make_textures(n_domains=3, n_normal=10, n_anomalous=5, image_size=32, random_state=0)


@pytest.fixture(scope="module")
def split(data):
    target = data.groups == data.groups[-1]
    return ~target, target


@pytest.fixture(scope="module")
def fitted(data, split):
    src, _ = split
    return MetaComparer(**TINY).fit(data.images[src], data.y[src], groups=data.groups[src])


# ------------------------------------------------------------------ modules
def test_bifpn_levels_and_shapes():
    feats = [torch.randn(2, c, s, s) for c, s in ((8, 16), (12, 8), (20, 4))]
    for n_cells in (0, 2):
        out = BiFPN([8, 12, 20], width=16, n_levels=5, n_cells=n_cells)(feats)
        assert [tuple(o.shape) for o in out] == [(2, 16, s, s) for s in (16, 8, 4, 2, 1)]
    # odd sizes: extra levels and the cells' resampling still line up
    odd = [torch.randn(2, 8, 9, 7), torch.randn(2, 12, 5, 4), torch.randn(2, 20, 3, 2)]
    out = BiFPN([8, 12, 20], width=4, n_levels=5, n_cells=1)(odd)
    assert [tuple(o.shape[-2:]) for o in out] == [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)]


def test_fast_fusion_is_normalised_weighted_sum():
    node = FastFusion(2, 4).eval()
    with torch.no_grad():
        node.weight.copy_(torch.tensor([3.0, -1.0]))  # relu drops the negative weight
    a, b = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    expected = node.conv(torch.nn.functional.silu(3.0 / (3.0 + 1e-4) * a))
    assert torch.allclose(node([a, b]), expected, atol=1e-6)


def test_split_first_layer_equals_mlp_on_concatenation():
    torch.manual_seed(0)
    cmp = PairComparer(6, (5, 3))
    full = torch.nn.Linear(12, 5)
    with torch.no_grad():
        full.weight.copy_(torch.cat([cmp.query.weight, cmp.reference.weight], dim=1))
        full.bias.copy_(cmp.query.bias)
    q, r = torch.randn(7, 6), torch.randn(7, 6)
    expected = cmp.rest(full(torch.cat([q, r], dim=1))).squeeze(-1)
    assert torch.allclose(cmp(q, r), expected, atol=1e-6)


@pytest.mark.parametrize("hidden", [(8,), (8, 4)])
@pytest.mark.parametrize("reduction", ["max", "min"])
def test_chunked_reduction_matches_brute_force(monkeypatch, hidden, reduction):
    monkeypatch.setattr(mc, "_PAIR_BLOCK", {"cpu": 50, "cuda": 50})  # many tiny blocks
    monkeypatch.setattr(mc, "_REF_ROWS", {"cpu": 3, "cuda": 3})
    torch.manual_seed(0)
    cmp = PairComparer(5, hidden)
    q, r = torch.randn(11, 5), torch.randn(13, 5)
    with torch.no_grad():
        pairs = cmp(q[:, None].expand(-1, 13, -1), r[None].expand(11, -1, -1))
        val, idx = cmp.reduce(cmp.query(q), cmp.reference(r), reduction)
    ref = pairs.max(dim=1) if reduction == "max" else pairs.min(dim=1)
    assert torch.allclose(val, ref.values, atol=1e-5) and torch.equal(idx, ref.indices)
    banned = torch.zeros(11, 13, dtype=torch.bool)
    banned[torch.arange(11), ref.indices] = True  # exclude each row's best pair
    val2, idx2 = cmp.reduce(cmp.query(q), cmp.reference(r), reduction,
                            exclude=lambda qs, rs: banned[qs, rs])
    assert not banned[torch.arange(11), idx2].any()
    assert torch.all(val2 <= val) if reduction == "max" else torch.all(val2 >= val)


def plain_reduce(cmp, qh, rh, reduction="max", exclude=None):
    """PairComparer.reduce written plainly: one reference row at a time, then the max/min."""
    with torch.no_grad():
        z = torch.stack([cmp.from_hidden(qh + r) for r in rh], dim=1)  # (n_q, n_r)
        if exclude is not None:
            banned = exclude(slice(None), slice(None)).expand_as(z)
            z = z.masked_fill(banned, -torch.inf if reduction == "max" else torch.inf)
        out = z.max(dim=1) if reduction == "max" else z.min(dim=1)
    return out.values, out.indices


@pytest.mark.parametrize("blocks", [None, (64, 3, 200), (40, 4, 40), (7, 5, 7)])
@pytest.mark.parametrize("hidden", [(8,), (8, 4)])
@pytest.mark.parametrize("reduction", ["max", "min"])
def test_blocked_reduction_equals_a_plain_loop(monkeypatch, blocks, hidden, reduction):
    """The pair blocks, their rows of logits reduced at once and the running reduction
    across rows (_PAIR_BLOCK, _REF_ROWS, _LOGIT_BLOCK forced small: blocks and rows cut
    through the queries and references at uneven places) give the plain loop's values and
    indices, with and without excluded pairs."""
    if blocks is not None:
        pair, ref_rows, logit = blocks
        monkeypatch.setattr(mc, "_PAIR_BLOCK", {"cpu": pair, "cuda": pair})
        monkeypatch.setattr(mc, "_REF_ROWS", {"cpu": ref_rows, "cuda": ref_rows})
        monkeypatch.setattr(mc, "_LOGIT_BLOCK", {"cpu": logit, "cuda": logit})
    gen = torch.Generator().manual_seed(len(hidden))
    cmp = PairComparer(5, hidden)
    for n_q, n_r in ((1, 1), (3, 17), (23, 9), (31, 64)):
        qh, rh = torch.randn(n_q, hidden[0], generator=gen), torch.randn(n_r, hidden[0],
                                                                           generator=gen)
        banned = torch.rand(n_q, n_r, generator=gen) < 0.3
        banned[:, 0] = False  # every query row keeps a pair

        def exclude(qs, rs, banned=banned):
            return banned[qs, rs]

        for ex in (None, exclude):
            val, idx = cmp.reduce(qh, rh, reduction, exclude=ex)
            ref_val, ref_idx = plain_reduce(cmp, qh, rh, reduction, exclude=ex)
            torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
            assert torch.equal(idx, ref_idx), (n_q, n_r, ex)


def test_coattention_affinity_in_unit_interval():
    att = CoAttention(4, 3)
    x = torch.randn(6, 4)
    a = att.matrix(x, torch.randn(9, 4))
    assert a.shape == (6, 9) and a.min() >= 0 and a.max() <= 1
    assert torch.allclose(att(x, x), torch.ones(6), atol=1e-6)
    # a point projecting to the opposite direction has affinity 0
    with torch.no_grad():
        att.proj.bias.zero_()
    assert torch.allclose(att(x, -x), torch.zeros(6), atol=1e-6)
    assert torch.allclose(att.matrix(x, x).diagonal(), att(x, x))


# ------------------------------------------------------------------ losses
def test_classification_and_attention_losses_by_hand():
    z, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    s = torch.sigmoid(z)
    expected = -(torch.log(s[0]) + torch.log(1 - s[1])) / 2  # Eq. 2, averaged over queries
    assert torch.allclose(classification_loss(z, y), expected)
    m = torch.tensor([0.2, 0.9])
    expected = -(np.log(0.8) + np.log(0.9)) / 2  # Eq. 3
    assert attention_loss(m, y).item() == pytest.approx(expected, rel=1e-5)


def test_rank_loss_orders_by_coattention():
    s_u, s_v = torch.tensor([0.3], requires_grad=True), torch.tensor([0.6])
    a_u, a_v = torch.tensor([0.1], requires_grad=True), torch.tensor([0.9])
    # a_u < a_v: sigma = +1, u should score higher; w = lam (e^0.8 - 1)
    loss = rank_loss(s_u, s_v, a_u, a_v, lam=2.0)
    assert loss.item() == pytest.approx(2.0 * (np.exp(0.8) - 1) * (1 - (0.3 - 0.6)), rel=1e-5)
    loss.backward()
    assert s_u.grad.item() < 0 and a_u.grad is None  # raising s_u lowers it; a is guidance
    assert rank_loss(s_u, s_v, a_v, a_v).item() == 0.0  # equal affinities: weight 0


def test_episode_losses_give_exact_max_gradients():
    """Locating the max without gradient, then recomputing its pair, is exact (Eq. 2)."""
    torch.manual_seed(0)
    head = MetaComparerHead([4, 4, 4], 6, 3, 0, (0,), (5,), 4)
    patches = torch.randn(5, 3, 3, 6, requires_grad=True)  # 3 queries, 2 references
    y = torch.tensor([0.0, 1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    l_cls, l_att, l_rank = episode_losses(head, patches, 3, y, reduction="max",
                                          n_reference_patches=None, n_rank_pairs=4,
                                          lam=1.0, generator=gen)
    g_cls = torch.autograd.grad(l_cls, patches, retain_graph=True)[0]
    q, r = patches[:3].reshape(3, 9, 1, 6), patches[3:].reshape(1, 1, 18, 6)
    z = head.comparer(q.expand(-1, -1, 18, -1), r.expand(3, 9, -1, -1))
    full = classification_loss(z.flatten(1).amax(dim=1), y)
    assert torch.allclose(l_cls, full, atol=1e-6)
    assert torch.allclose(g_cls, torch.autograd.grad(full, patches)[0], atol=1e-6)
    a = head.coattention.matrix(patches[:3].reshape(27, 6), patches[3:].reshape(18, 6))
    assert torch.allclose(l_att, attention_loss(a.view(3, -1).amin(dim=1), y), atol=1e-6)
    assert torch.isfinite(l_rank) and l_rank >= 0


def test_synthetic_anomaly_changes_only_its_mask():
    rng = np.random.default_rng(0)
    image, donor = np.full((40, 30, 3), 0.5), rng.uniform(0, 1, (40, 30, 3))
    for _ in range(6):
        out, mask = synthesize_anomaly(image, donor, rng)
        assert mask.shape == (40, 30) and mask.any() and mask.mean() < 0.5
        assert np.array_equal(out[~mask], image[~mask])
        assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out[mask], 0.5)


def test_synthetic_anomalies_on_grey_images_stay_grey():
    rng = np.random.default_rng(1)
    grey, donor = (np.repeat(rng.uniform(0, 1, (40, 30, 1)), 3, axis=2) for _ in range(2))
    for _ in range(12):  # all three kinds of defect come up
        out, _ = synthesize_anomaly(grey, donor, rng)
        assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2])


# ------------------------------------------------------------------ estimator
def test_fit_reference_and_outputs(fitted, data, split):
    _, tgt = split
    X = data.images[tgt]
    with pytest.raises(RuntimeError, match="set_reference"):
        fitted.decision_function(X)
    det = fitted.set_reference(X[:3])
    scores, maps = det.score_and_map(X[3:])
    assert scores.shape == (12,) and maps.shape == (12, 32, 32)
    # sigma = 0: Eq. 6's map peaks exactly at Eq. 5's image score
    np.testing.assert_allclose(maps.reshape(12, -1).max(axis=1), scores, rtol=1e-5, atol=1e-5)
    assert list(det.domains_) == sorted(set(data.groups[~tgt]))
    assert len(det.loss_history_) == 1 and det.n_synthetic_ == 0
    assert [len(h) for h in det.reference_hidden_] == [3 * 16, 3 * 4, 3 * 1]


@pytest.mark.parametrize("patch_score", ["learned", "nearest"])
def test_leave_one_out_reference_scores(fitted, data, split, patch_score):
    refs = data.images[split[1]][:4]
    det = copy.deepcopy(fitted).set_params(patch_score=patch_score).set_reference(refs)
    loo = det.reference_scores_.copy()
    loo_maxima = det.reference_map_maxima_.copy()
    for i in range(4):
        others = np.delete(refs, i, axis=0)
        alone, amap = det.set_reference(others).score_and_map(refs[i:i + 1])
        assert alone[0] == pytest.approx(loo[i], rel=1e-4, abs=1e-4)
        # the map maxima that calibrate pixel_threshold_ are left out alike
        assert amap.max() == pytest.approx(loo_maxima[i], rel=1e-4, abs=1e-4)
    single = det.set_reference(refs[:1])
    assert single.reference_scores_.shape == (1,) and np.isfinite(single.reference_scores_).all()


def test_refit_drops_the_old_reference(data, split):
    src, tgt = split
    det = MetaComparer(**TINY).fit(data.images[src], data.y[src], groups=data.groups[src])
    det.set_reference(data.images[tgt][:3])
    det.fit(data.images[src], data.y[src], groups=data.groups[src])
    with pytest.raises(RuntimeError, match="set_reference"):
        det.predict(data.images[:2])


def test_detects_defects_on_a_held_out_domain():
    data = make_textures(n_domains=4, n_normal=16, n_anomalous=8, image_size=48, random_state=3)
    tgt = data.groups == data.groups[-1]
    det = MetaComparer(**{**TINY, "image_size": 48, "n_epochs": 4, "n_episodes": 12,
                          "fpn_width": 32, "hidden_layer_sizes": (32,)})
    det.fit(data.images[~tgt], data.y[~tgt], groups=data.groups[~tgt])
    assert det.loss_history_[-1] < det.loss_history_[0]
    X, y = data.images[tgt], data.y[tgt]
    scores = det.set_reference(X[:6]).decision_function(X[6:])
    assert scores[y[6:] == 1].mean() > scores[y[6:] == 0].mean()


def test_deterministic_with_random_state(data, split):
    src, tgt = split
    out = []
    for _ in range(2):
        det = MetaComparer(**{**TINY, "synthesize_anomalies": True, "n_synthetic": 3})
        det.fit(data.images[src], data.y[src], groups=data.groups[src])
        out.append(det.set_reference(data.images[tgt][:3]).decision_function(data.images[-4:]))
    np.testing.assert_array_equal(out[0], out[1])


def test_synthetic_anomalies_for_domains_without_defects(data, split):
    src = split[0] & ((data.y == 0) | (data.groups == data.groups[0]))  # domain 2: no defects
    det = MetaComparer(**{**TINY, "n_synthetic": 4})
    det.fit(data.images[src], data.y[src], groups=data.groups[src])
    assert det.n_synthetic_ == 4 and len(det.domains_) == 2
    normal_only = split[0] & (data.y == 0)
    det = MetaComparer(**{**TINY, "n_synthetic": 2, "synthesize_anomalies": True})
    assert det.fit(data.images[normal_only], data.y[normal_only],
                   groups=data.groups[normal_only]).n_synthetic_ == 4
    with pytest.raises(ValueError, match="cannot train"), pytest.warns(UserWarning, match="left"):
        MetaComparer(**{**TINY, "synthesize_anomalies": False}).fit(
            data.images[normal_only], data.y[normal_only], groups=data.groups[normal_only])


def test_mismatched_episodes_take_other_domain_references():
    det = MetaComparer(mismatch_ratio=1.0, n_episode_queries=4, n_episode_references=3)
    plan = [[np.arange(0, 6), np.arange(6, 9)], [np.arange(10, 16), np.arange(16, 19)]]
    labels = np.r_[np.zeros(6), np.ones(4), np.zeros(6), np.ones(3)].astype(np.int64)
    rng = np.random.default_rng(0)
    for _ in range(20):
        queries, refs, y = det._draw_episode(plan, labels, rng)
        same = (queries < 10).all() or (queries >= 10).all()
        assert same and len(refs) == 3 and (y == 1).all()
        assert (refs < 10).all() != (queries < 10).all()  # the references: the other domain
    det.set_params(mismatch_ratio=0.0)
    queries, refs, y = det._draw_episode(plan, labels, rng)
    assert ((refs < 10) == (queries[0] < 10)).all() and y.tolist() == [0, 0, 1, 1]


def test_mismatched_episodes_train(data, split):
    src = split[0]
    det = MetaComparer(**{**TINY, "mismatch_ratio": 0.5})
    with pytest.warns(FutureWarning, match="mismatch_ratio .* is deprecated"):
        det.fit(data.images[src], data.y[src], groups=data.groups[src])
    assert np.isfinite(det.loss_history_).all()
    with warnings.catch_warnings():  # the paper's episodes: no warning
        warnings.simplefilter("error", FutureWarning)
        det.set_params(mismatch_ratio=0.0).fit(data.images[src], data.y[src],
                                               groups=data.groups[src])


def test_train_backbone_updates_it(data, split):
    src = split[0]
    det = MetaComparer(**{**TINY, "train_backbone": True, "learning_rate": 1e-2})
    det.fit(data.images[src], data.y[src], groups=data.groups[src])
    fresh = MetaComparer(**TINY).fit(data.images[src], data.y[src], groups=data.groups[src])
    a = next(det.backbone_.parameters())
    b = next(fresh.backbone_.parameters())
    assert not torch.equal(a, b) and not det.backbone_.training


def test_input_errors(data, split):
    src = split[0]
    X, y, g = data.images[src], data.y[src], data.groups[src]
    with pytest.raises(ValueError, match="image-level labels"):
        MetaComparer(**TINY).fit(X)
    with pytest.raises(ValueError, match="reference_reduction"):
        MetaComparer(**{**TINY, "reference_reduction": "mean"}).fit(X, y, groups=g)
    with pytest.raises(ValueError, match="scales"):
        MetaComparer(**{**TINY, "scales": (0, 7)}).fit(X, y, groups=g)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        MetaComparer(**{**TINY, "hidden_layer_sizes": ()}).fit(X, y, groups=g)
    with pytest.raises(ValueError, match="mismatch_ratio"):
        MetaComparer(**{**TINY, "mismatch_ratio": 1.5}).fit(X, y, groups=g)
    with pytest.warns(UserWarning, match="left out"):
        keep = (g == g[0]) | (np.arange(len(g)) == np.flatnonzero(g != g[0])[0])
        MetaComparer(**TINY).fit(X[keep], y[keep], groups=g[keep])


def test_groups_without_routing_warn_and_pool_domains(data):
    with sklearn.config_context(enable_metadata_routing=False):
        with pytest.warns(UserWarning, match="no groups"):
            res = cross_validate(MetaComparer(**TINY), data.images, data.y, groups=data.groups,
                                 cv=LeaveOneGroupOut(), scoring=ReferenceScorer(n_references=3))
    assert np.isfinite(res["test_score"]).all()
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # groups reach fit: no warning
        cross_validate(MetaComparer(**TINY), data.images, data.y,
                       cv=LeaveOneGroupOut(), scoring=ReferenceScorer(n_references=3),
                       params={"groups": data.groups})


def test_one_reference_that_would_match_itself_is_refused(fitted, data, split):
    refs = data.images[split[1]][:2]
    det = copy.deepcopy(fitted).set_params(image_size=16)  # patch grids of 2 x 2 and less
    before = det.set_reference(refs).threshold_  # two references: each left out in turn
    assert np.isfinite(before)
    with pytest.raises(ValueError, match=r"one reference image with patch grids of 2 x 2.*at "
                                         "least 2 reference images"):
        det.set_reference(refs[:1])
    assert det.threshold_ == before


# ------------------------------------------------------------------ patch_score (ours: fused)
@pytest.fixture(scope="module")
def variants(fitted):
    """The fitted model under each patch_score (the fit does not depend on it)."""
    return {p: copy.deepcopy(fitted).set_params(patch_score=p)
            for p in ("learned", "nearest", "fused")}


def test_default_patch_score_is_fused():
    assert MetaComparer().patch_score == "fused"


@pytest.mark.parametrize("patch_score", ["nearest", "fused"])
def test_scores_change_when_the_references_change(variants, data, split, patch_score):
    X = data.images[split[1]]
    det = variants[patch_score]
    a = det.set_reference(X[:3]).decision_function(X[6:])
    b = det.set_reference(X[3:6]).decision_function(X[6:])
    assert not np.allclose(a, b, rtol=1e-3, atol=1e-3)
    # not a shift of every score alike: the ranking of the queries changes too
    assert not np.allclose(a - a.mean(), b - b.mean(), rtol=1e-3, atol=1e-3)


def test_learned_patch_score_is_the_papers_eq_1(variants, data, split):
    """patch_score="learned": the image score is max over scales, query patches and
    reference patches of the meta-comparer's logit on [q, r] (Eq. 1 and 5)."""
    X = data.images[split[1]]
    det = variants["learned"].set_reference(X[:3])
    scores = det.decision_function(X[6:9])
    head = det.head_
    with torch.no_grad():
        def patches(images):
            batch = torch.stack([torch.as_tensor(im).permute(2, 0, 1).float() / 255
                                 for im in images])
            return [p.flatten(1, 2) for p in head(det.backbone_(batch))]
        refs = [p.flatten(0, 1) for p in patches(X[:3])]
        expected = np.full(3, -np.inf)
        for qs, r in zip(patches(X[6:9]), refs):
            for i, q in enumerate(qs):
                pairs = head.comparer(q[:, None].expand(-1, len(r), -1),
                                      r[None].expand(len(q), -1, -1))
                expected[i] = max(expected[i], float(pairs.max()))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert not hasattr(det, "reference_features_") and not hasattr(det, "score_mean_")


@pytest.mark.parametrize("patch_score", ["nearest", "fused"])
def test_a_query_among_the_references_scores_lower(variants, data, split, patch_score):
    """Adding a query's own appearance to the references lowers its score: the
    references carry the domain's normality."""
    X = data.images[split[1]]
    det = variants[patch_score]
    before = det.set_reference(X[:3]).decision_function(X[6:9])
    after = det.set_reference(np.concatenate([X[:3], X[6:9]])).decision_function(X[6:9])
    assert (after < before).all()
    if patch_score == "nearest":  # its own patches are in the reference: distance 0
        np.testing.assert_allclose(after, 0.0, atol=1e-3)


@pytest.mark.parametrize("patch_score", ["learned", "nearest", "fused"])
def test_patch_score_maps_and_positions(variants, data, split, patch_score):
    X = data.images[split[1]]
    det = copy.deepcopy(variants[patch_score]).set_reference(X[:4])
    scores, maps = det.score_and_map(X[4:8])
    assert scores.shape == (4,) and maps.shape == (4, 32, 32)
    # sigma = 0: the map peaks at the image score
    np.testing.assert_allclose(maps.reshape(4, -1).max(axis=1), scores, rtol=1e-5, atol=1e-5)
    # maps come back at each input's own size
    big = np.repeat(np.repeat(X[4:6], 2, axis=1), 2, axis=2)
    assert [m.shape for m in det.predict_map(list(big))] == [(64, 64), (64, 64)]
    if patch_score != "learned":
        # a reference with a corner replaced by noise: the map peaks in that corner
        query = X[0].copy()
        query[:12, :12] = np.random.default_rng(0).integers(0, 256, (12, 12, 3))
        amap = det.predict_map(query[None])[0]
        r, c = np.unravel_index(amap.argmax(), amap.shape)
        assert r < 16 and c < 16


def test_fused_leave_one_out_scores(variants, data, split):
    """A reference's score is its fused score against the other references, standardised
    with the statistics of every reference's leave-one-out values; the nearest part's
    is its distance to the other references."""
    refs = data.images[split[1]][:4]
    det = copy.deepcopy(variants["fused"]).set_reference(refs)
    loo, mean, std = det.reference_scores_.copy(), det.score_mean_.copy(), det.score_std_.copy()
    assert mean.shape == std.shape == (2,) and (std > 0).all()
    for i in range(4):
        det.set_reference(np.delete(refs, i, axis=0))
        det.score_mean_, det.score_std_ = mean, std
        assert det.decision_function(refs[i:i + 1])[0] == pytest.approx(loo[i], rel=1e-4,
                                                                          abs=1e-4)
    near = copy.deepcopy(variants["nearest"]).set_reference(refs)
    for i in range(4):
        alone = copy.deepcopy(near).set_reference(np.delete(refs, i, axis=0))
        assert alone.decision_function(refs[i:i + 1])[0] == pytest.approx(
            near.reference_scores_[i], rel=1e-4, abs=1e-4)
    single = det.set_reference(refs[:1])
    assert np.isfinite(single.reference_scores_).all() and np.isfinite(single.score_std_).all()


def test_fused_maps_of_a_single_reference_are_centred(variants, data, split):
    """With one reference, the fused maps (not the scores) subtract the nearest part's
    median over each image's cells, and pixel_threshold_ is calibrated on maps so made."""
    X = data.images[split[1]]
    det = copy.deepcopy(variants["fused"]).set_reference(X[:1])
    assert det.map_centring_ and not copy.deepcopy(det).set_reference(X[:2]).map_centring_
    scores, maps = det.score_and_map(X[4:8])
    plain = copy.deepcopy(det)
    plain.map_centring_ = False
    plain_scores, plain_maps = plain.score_and_map(X[4:8])
    np.testing.assert_array_equal(scores, plain_scores)  # the scores are never centred

    def lower_median(a):  # of every cell, each repeated alike in a map (sigma = 0)
        a = a.reshape(len(a), -1)
        return np.sort(a, axis=1)[:, (a.shape[1] - 1) // 2]

    near = copy.deepcopy(variants["nearest"])
    shift = (lower_median(near.set_reference(X[:1]).predict_map(X[4:8])) - det.score_mean_[1]) \
        / det.score_std_[1]
    np.testing.assert_allclose(maps, plain_maps - shift[:, None, None], rtol=1e-4, atol=1e-4)
    assert np.ptp(shift) > 1e-3  # a shift per image, not one for all
    # the reference's own map maximum is that of its centred leave-one-out map
    grids = []
    leave_one_out = near._nearest_leave_one_out
    near._nearest_leave_one_out = lambda *a: grids.append(leave_one_out(*a)) or grids[-1]
    near.set_reference(X[:1])
    loo = grids[0].flatten().numpy()
    own = (lower_median(loo[np.isfinite(loo)][None]) - det.score_mean_[1]) / det.score_std_[1]
    np.testing.assert_allclose(det.reference_map_maxima_, det.reference_scores_ - own,
                               rtol=1e-4, atol=1e-4)


def test_patch_score_changed_after_reference_asks_for_a_new_one(variants, data, split):
    X = data.images[split[1]]
    det = copy.deepcopy(variants["fused"]).set_reference(X[:3])
    det.set_params(patch_score="learned")
    with pytest.raises(RuntimeError, match="patch_score='fused'.*set_reference"):
        det.decision_function(X[3:5])
    det.set_reference(X[:3])
    assert det.decision_function(X[3:5]).shape == (2,)
    with pytest.raises(ValueError, match="patch_score"):
        det.set_params(patch_score="knn").set_reference(X[:3])


def test_old_pickles_keep_the_learned_score(variants, data, split):
    det = copy.deepcopy(variants["learned"]).set_reference(data.images[split[1]][:3])
    state = det.__getstate__()
    del state["patch_score"], state["patch_score_"]
    del state["max_reference_patches"], state["max_reference_patches_"]
    old = MetaComparer.__new__(MetaComparer)
    old.__setstate__(state)
    assert old.patch_score == "learned"
    assert old.max_reference_patches is None  # every reference patch, as before 0.3
    np.testing.assert_array_equal(old.decision_function(data.images[:3]),
                                  det.decision_function(data.images[:3]))


# ------------------------------------------------------------------ max_reference_patches
def _banks(det):
    """The reference rows scoring searches: per scale of the learned part, then the nearest
    part's."""
    nearest = [det.reference_features_] if hasattr(det, "reference_features_") else []
    return [*getattr(det, "reference_hidden_", []), *nearest]


def _set_banks(det, banks):
    n_learned = len(getattr(det, "reference_hidden_", []))
    if n_learned:
        det.reference_hidden_ = banks[:n_learned]
    if hasattr(det, "reference_features_"):
        det.reference_features_ = banks[-1]


def _kept_rows(det, every):
    """For each kept row of ``det``'s banks, its index among ``every`` (all the rows)."""
    rows = []
    for kept, full in zip(_banks(det), every):
        match = (kept[:, None, :] == full[None]).all(-1)
        assert (match.sum(1) == 1).all()  # each kept row is one reference patch
        rows.append(match.float().argmax(1))
    return rows


@pytest.mark.parametrize("patch_score", ["learned", "nearest", "fused"])
def test_reference_coreset_and_its_leave_one_out(variants, data, split, patch_score):
    """Above max_reference_patches, set_reference keeps a greedy coreset of the reference
    patches of each scale and part (rows of the whole set, the coreset's order), and
    each reference's calibration score is its score against the other references'
    kept patches."""
    refs = data.images[split[1]][:4]  # 4 x 16 patches at the finest scale, 4 x 4, 4 x 1
    every = _banks(copy.deepcopy(variants[patch_score])
                   .set_params(max_reference_patches=None).set_reference(refs))
    det = copy.deepcopy(variants[patch_score]).set_params(max_reference_patches=10)
    det.set_reference(refs)
    kept = _kept_rows(det, every)
    assert [len(k) for k in kept] == [min(10, len(e)) for e in every]
    for rows, full in zip(kept, every):
        if len(full) > 10:  # a coreset: not the first rows, spread over the images
            assert not torch.equal(rows, torch.arange(10))
            assert len(set((rows // (len(full) // 4)).tolist())) > 1
    for i in range(4):
        alone = copy.deepcopy(det)
        _set_banks(alone, [b[r // (len(e) // 4) != i]
                           for b, r, e in zip(_banks(det), kept, every)])
        assert alone.decision_function(refs[i:i + 1])[0] == pytest.approx(
            det.reference_scores_[i], rel=1e-4, abs=1e-4)
    # the scores of new images: against the kept rows (fewer: the nearest part's distances
    # can only grow)
    if patch_score == "nearest":
        full = copy.deepcopy(variants["nearest"]).set_params(max_reference_patches=None)
        X = data.images[split[1]][4:]
        near_all = full.set_reference(refs).decision_function(X)
        assert (det.decision_function(X) >= near_all - 1e-5).all()


def test_reference_coreset_of_a_single_reference(variants, data, split):
    """One reference with more patches than max_reference_patches: each of its patches is
    calibrated against the kept patches outside its own 3 x 3 neighbourhood."""
    ref = data.images[split[1]][:1]
    full = copy.deepcopy(variants["nearest"]).set_params(max_reference_patches=None)
    every = full.set_reference(ref).reference_features_  # 4 x 4 grid, in order
    det = copy.deepcopy(variants["nearest"]).set_params(max_reference_patches=6)
    det.set_reference(ref)
    (pos,) = _kept_rows(det, [every])
    assert len(pos) == 6
    grid = torch.arange(16)
    allowed = ~mc.adjacent(grid, pos, 4)
    dist = torch.cdist(every.double(), det.reference_features_.double())
    dist = torch.where(allowed, dist, torch.inf).amin(dim=1)
    assert det.reference_scores_[0] == pytest.approx(float(dist[torch.isfinite(dist)].max()),
                                                     rel=1e-4, abs=1e-4)


def test_max_reference_patches_changed_after_reference_asks_for_a_new_one(variants, data, split,
                                                                         tmp_path):
    X = data.images[split[1]]
    det = copy.deepcopy(variants["fused"]).set_params(max_reference_patches=10)
    det.set_reference(X[:4])
    det.set_params(max_reference_patches=None)  # would keep every patch: the reference did not
    with pytest.raises(RuntimeError, match=r"max_reference_patches=10.*now None.*set_reference"):
        det.decision_function(X[4:6])
    det.set_reference(X[:4])
    assert det.max_reference_patches_ is None and len(det.reference_features_) == 4 * 16
    loaded = skad.load(skad.save(det, tmp_path / "m.skad"))
    assert loaded.max_reference_patches_ is None
    np.testing.assert_array_equal(loaded.decision_function(X[4:6]), det.decision_function(X[4:6]))


def test_reference_coreset_of_one_image_is_refused(variants, data, split):
    refs = data.images[split[1]][:4]
    det = copy.deepcopy(variants["nearest"]).set_params(max_reference_patches=1)
    with pytest.raises(ValueError, match=r"max_reference_patches=1 reference patches kept all "
                                         r"come from one reference image.*Raise "
                                         r"max_reference_patches"):
        det.set_reference(refs)


@pytest.mark.parametrize("patch_score", ["learned", "fused"])
@pytest.mark.parametrize("reduction", ["max", "min"])
def test_scores_equal_those_of_a_plain_pair_loop(monkeypatch, variants, data, split,
                                                 patch_score, reduction):
    """Reference calibration, scores and maps with the blocked pair scorer (also with tiny
    blocks) are those of a plain loop over the reference patches.

    Blocks of other sizes may sum a logit's terms in another order (float32 rounding,
    ~1e-7 of a logit of order 1); "fused" divides the learned part by its spread
    ``score_std_[0]`` (7e-4 for this briefly trained detector), and its tolerance with it.
    """
    X = data.images[split[1]]

    def run():
        det = copy.deepcopy(variants[patch_score]).set_params(reference_reduction=reduction)
        det.set_reference(X[:4])
        scores, maps = det.score_and_map(X[4:9])
        return [det.reference_scores_, det.reference_map_maxima_, scores, maps,
                getattr(det, "score_mean_", 0.0), getattr(det, "score_std_", 1.0)]

    blocked = run()
    monkeypatch.setattr(mc, "_PAIR_BLOCK", {"cpu": 96, "cuda": 96})
    monkeypatch.setattr(mc, "_REF_ROWS", {"cpu": 5, "cuda": 5})
    monkeypatch.setattr(mc, "_LOGIT_BLOCK", {"cpu": 150, "cuda": 150})
    tiny = run()
    monkeypatch.setattr(mc.PairComparer, "reduce", plain_reduce)
    plain = run()
    atol = 1e-6 if patch_score == "learned" else 2e-7 / plain[-1][0]
    for a, b, c in zip(blocked, tiny, plain):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=atol)
