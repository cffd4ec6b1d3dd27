"""Position standardisation (``standardize_positions``) of GeneralAD, MMR and GlobalLocal.

Each map position is compared with the same position in the references' maps; the
image score is the standardised map's maximum; the references' own scores are computed
leave one image out. Tiny random-weight detectors: these tests check the arithmetic and
the errors, ``tests/test_borders.py`` what it is for.
"""

import numpy as np
import pytest

from skad import MMR, GeneralAD, GlobalLocal
from skad.datasets import make_textures
from skad.thresholds import conformal_threshold

SIZE = 32


def _general_ad(**kw):
    return GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,), hidden_dim=32,
                     n_epochs=1, image_size=SIZE, random_state=0, **kw)


def _mmr(**kw):
    return MMR(teacher="test_efficientnet", teacher_weights=None, student="test_vit",
               student_weights=None, student_depth=1, n_epochs=1, image_size=SIZE,
               random_state=0, **kw)


def _global_local(**kw):
    return GlobalLocal(teacher="test_efficientnet", teacher_weights=None, teacher_size=SIZE,
                       patch_size=8, stride=4, embed_dim=16, width=8, n_distill_patches=8,
                       n_distill_epochs=1, n_finetune_epochs=1, n_epochs=1, image_size=SIZE,
                       random_state=0, **kw)


FACTORIES = [pytest.param(f, id=f.__name__.strip("_")) for f in (_general_ad, _mmr,
                                                                 _global_local)]


@pytest.fixture(scope="module")
def data():
    return make_textures(n_domains=1, n_normal=10, n_anomalous=4, image_size=SIZE,
                         random_state=0)


@pytest.mark.parametrize("factory", FACTORIES)
def test_maps_and_scores_are_standardised_per_position(factory, data):
    normals = data.images[data.y == 0]
    det = factory().fit(normals[:6])
    assert det.position_mean_.shape == det.position_std_.shape == (SIZE, SIZE)
    assert np.all(det.position_std_ > 0)
    scores, maps = det.score_and_map(data.images)
    raw_scores, raw = det.set_params(standardize_positions=False).score_and_map(data.images)
    expected = (raw - det.position_mean_) / det.position_std_
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, expected.reshape(len(expected), -1).max(axis=1),
                               rtol=1e-4, atol=1e-4)
    # the paper's score is not the standardised one
    assert not np.allclose(scores, raw_scores)


def test_statistics_and_leave_one_out_reference_scores(data):
    normals = data.images[data.y == 0]
    det = _general_ad().fit(normals[:6])
    refs = normals[4:10]
    det.set_reference(refs)
    raw = det.set_params(standardize_positions=False).predict_map(refs).astype(np.float64)
    np.testing.assert_allclose(det.position_mean_, raw.mean(axis=0), rtol=1e-4, atol=1e-5)
    # floored at a tenth of the spread over all positions
    floor = 0.1 * np.sqrt(raw.var(axis=0).mean())
    np.testing.assert_allclose(det.position_std_, np.maximum(raw.std(axis=0), floor),
                               rtol=1e-3, atol=1e-5)
    for i in range(len(refs)):
        others = np.delete(raw, i, axis=0)
        std = np.maximum(others.std(axis=0), 0.1 * np.sqrt(others.var(axis=0).mean()))
        z = (raw[i] - others.mean(axis=0)) / std
        assert det.reference_scores_[i] == pytest.approx(z.max(), rel=1e-3, abs=1e-3)
    # the scores are the maxima of the standardised maps: they calibrate both thresholds
    np.testing.assert_array_equal(det.reference_map_maxima_, det.reference_scores_)
    assert det.threshold_ == conformal_threshold(det.reference_scores_, det.false_reject_rate,
                                                 warn=False)
    assert det.pixel_threshold_ == det.threshold_


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_references_raise_and_keep_the_reference(data, n):
    normals = data.images[data.y == 0]
    det = _general_ad().fit(normals[:6])
    before = det.threshold_, det.position_mean_.copy()
    with pytest.raises(ValueError, match=f"at least 3 reference images.*got {n}"):
        det.set_reference(normals[6:6 + n])
    assert det.threshold_ == before[0]
    np.testing.assert_array_equal(det.position_mean_, before[1])
    with pytest.raises(ValueError, match="got 2"):
        _general_ad().fit(normals[:2])
    _general_ad(standardize_positions=False).fit(normals[:2])  # the paper's scores need 1


def test_switching_the_option_needs_a_new_reference(data):
    normals = data.images[data.y == 0]
    det = _general_ad(standardize_positions=False).fit(normals[:6])
    assert not hasattr(det, "position_mean_")
    det.set_params(standardize_positions=True)
    with pytest.raises(ValueError, match="changed standardize_positions from False to True "
                                         ".*call set_reference"):
        det.decision_function(normals[:2])
    det.set_reference(normals[6:])
    assert det.decision_function(normals[:2]).shape == (2,)
    # a reference set without the option drops the statistics of the earlier one
    det.set_params(standardize_positions=False).set_reference(normals[6:])
    assert not hasattr(det, "position_mean_")
    # the references only calibrate: their own scores and map maxima, as a new image's
    scores, maps = det.score_and_map(normals[6:])
    np.testing.assert_allclose(det.reference_scores_, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.reference_map_maxima_, maps.reshape(len(maps), -1).max(1),
                               rtol=1e-5, atol=1e-6)
    assert det.pixel_threshold_ in det.reference_map_maxima_


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_invalid_option_is_named(data, value):
    with pytest.raises(ValueError, match="'standardize_positions' parameter of GeneralAD must be "
                                         "an instance of 'bool'"):
        _general_ad(standardize_positions=value).fit(data.images[data.y == 0][:4])
