"""Conformal thresholds and p-values, tuned thresholds and defect regions (skad.thresholds).

The calibration functions are checked where the truth is known: scores drawn
exchangeably (i.i.d.) for the references and the new image, many times over.
"""

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from skad import PatchCore
from skad.datasets import make_textures
from skad.thresholds import (
    CalibrationWarning,
    Region,
    conformal_pvalues,
    conformal_threshold,
    false_reject_bound,
    find_regions,
    min_references,
    threshold_map,
    tune_threshold,
)


def _frr_over_calibrations(n, rate, draw, n_trials, seed):
    """The share of calibrations (each: n references and one new normal score, exchangeable)
    whose threshold rejects the new score; the marginal false-reject rate."""
    rng = np.random.default_rng(seed)
    rejected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        for _ in range(n_trials):
            scores = draw(rng, n + 1)
            rejected += scores[-1] > conformal_threshold(scores[:-1], rate)
    return rejected / n_trials


def _continuous(rng, size):
    return rng.normal(size=size)


def _ties(rng, size):
    return rng.integers(0, 4, size=size).astype(float)  # heavy ties


@pytest.mark.parametrize("n, rate", [(30, 0.1), (19, 0.05), (9, 0.25), (50, 0.02)])
def test_conformal_threshold_guarantees_the_rate(n, rate):
    n_trials = 20000
    frr = _frr_over_calibrations(n, rate, _continuous, n_trials, seed=n)
    # exactly (1 + m) / (n + 1) for continuous scores, m = n - k the references allowed above
    k = int(np.ceil((n + 1) * (1 - rate)))
    expected = (n + 1 - k) / (n + 1)
    assert expected <= rate
    se = np.sqrt(expected * (1 - expected) / n_trials)
    assert frr <= rate + 3 * se
    assert abs(frr - expected) <= 4 * se  # not conservative beyond the order statistic
    # ties only make it conservative
    assert _frr_over_calibrations(n, rate, _ties, 5000, seed=n + 1) <= rate + 3 * np.sqrt(
        rate * (1 - rate) / 5000)


def test_a_quantile_without_the_correction_breaks_the_guarantee():
    """The test above can fail: np.quantile at 1 - rate rejects too many good parts."""
    rng = np.random.default_rng(0)
    n, rate, n_trials = 30, 0.1, 20000
    scores = rng.normal(size=(n_trials, n + 1))
    plain = np.quantile(scores[:, :-1], 1 - rate, axis=1)
    frr = np.mean(scores[:, -1] > plain)
    assert frr > rate + 3 * np.sqrt(rate * (1 - rate) / n_trials)


def test_too_few_references_warn_and_give_the_largest_score():
    scores = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    with pytest.warns(CalibrationWarning, match=r"5 reference images cannot support "
                      r"false_reject_rate=0.05.*1/\(n\+1\) = 0.167.*at least 19"):
        t = conformal_threshold(scores, 0.05)
    assert t == 5.0
    assert false_reject_bound(scores, t) == pytest.approx(1 / 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        assert conformal_threshold(scores, 0.05, warn=False) == 5.0
        # 1/6 is supported: the largest score, without a warning
        assert conformal_threshold(scores, 1 / 6) == 5.0
        assert conformal_threshold(scores, 0.34) == 4.0  # (1 + 1) / 6 <= 0.34
    assert [min_references(r) for r in (0.5, 0.2, 0.1, 0.05, 0.01)] == [1, 4, 9, 19, 99]
    with pytest.raises(ValueError, match="false_reject_rate"):
        conformal_threshold(scores, 1.0)
    with pytest.raises(ValueError, match="reference_scores"):
        conformal_threshold([], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold([1.0, np.nan], 0.5)


def test_pvalues_range_monotone_and_valid():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=19)
    s = np.sort(rng.normal(size=200) * 2)
    p = conformal_pvalues(refs, s)
    assert p.min() >= 1 / 20 and p.max() <= 1
    assert np.all(np.diff(p) <= 0)  # non-increasing in the score
    assert conformal_pvalues(refs, [refs.max() + 1])[0] == pytest.approx(1 / 20)
    assert conformal_pvalues(refs, [refs.min() - 1])[0] == 1
    # super-uniform for exchangeable normal scores: P(p <= u) <= u
    n_trials = 20000
    draws = rng.normal(size=(n_trials, 20))
    ps = np.array([conformal_pvalues(d[:-1], d[-1:])[0] for d in draws])
    for u in (0.05, 0.1, 0.3):
        assert np.mean(ps <= u) <= u + 3 * np.sqrt(u * (1 - u) / n_trials)


@pytest.mark.parametrize("draw", [_continuous, _ties])
def test_pvalue_rule_and_threshold_agree_exactly(draw):
    """p <= false_reject_bound(threshold) if and only if score > threshold, ties and float
    boundaries (rates like k / (n + 1)) included."""
    rng = np.random.default_rng(1)
    for n in (1, 2, 9, 19, 99, 100):
        refs = draw(rng, n)
        s = np.r_[draw(rng, 300), refs]  # scores equal to references too
        rates = [j / (n + 1) for j in range(1, n + 1)] + [0.01, 0.05, 0.1, 0.3, 0.999]
        for rate in rates:
            t = conformal_threshold(refs, rate, warn=False)
            bound = false_reject_bound(refs, t)
            p = conformal_pvalues(refs, s)
            assert np.array_equal(p <= bound, s > t)
            if rate >= 1 / (n + 1):
                assert bound <= rate
                assert np.array_equal(p <= rate, s > t)


# ------------------------------------------------------------------ regions
def _blobs():
    amap = np.zeros((20, 30))
    amap[2:5, 3:7] = 2.0          # a 3 x 4 rectangle, peak 3 at one pixel
    amap[3, 4] = 3.0
    for i in range(3):            # a diagonal of 3 pixels: one region, 8-connected
        amap[10 + i, 20 + i] = 5.0
    amap[17, 1] = 1.5             # a single pixel
    amap[15:20, 25:30] = 0.5      # below the threshold
    return amap


def test_regions_of_known_blobs():
    regions = find_regions(_blobs(), 1.0)
    assert regions == [
        Region(bbox=(10, 20, 13, 23), area=3, peak_score=5.0, mean_score=5.0),
        Region(bbox=(2, 3, 5, 7), area=12, peak_score=3.0, mean_score=pytest.approx(25 / 12)),
        Region(bbox=(17, 1, 18, 2), area=1, peak_score=1.5, mean_score=1.5),
    ]
    r0, c0, r1, c1 = regions[1].bbox
    assert (_blobs()[r0:r1, c0:c1] > 1.0).all()  # half-open, as slices
    mask = threshold_map(_blobs(), 1.0)
    assert mask.dtype == bool and mask.sum() == sum(r.area for r in regions) == 16
    assert find_regions(_blobs(), 10.0) == [] and not threshold_map(_blobs(), 10.0).any()


def test_min_area_drops_small_regions():
    assert [r.area for r in find_regions(_blobs(), 1.0, min_area=3)] == [3, 12]
    assert [r.area for r in find_regions(_blobs(), 1.0, min_area=4)] == [12]
    mask = threshold_map(_blobs(), 1.0, min_area=4)
    assert mask.sum() == 12 and mask[2:5, 3:7].all()
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="min_area"):
            find_regions(_blobs(), 1.0, min_area=bad)


@pytest.mark.parametrize(("threshold", "min_area"), [(1.0, 1), (1.0, 4), (10.0, 1)])
def test_regions_with_their_mask(threshold, min_area):
    regions, mask = find_regions(_blobs(), threshold, min_area=min_area, return_mask=True)
    assert regions == find_regions(_blobs(), threshold, min_area=min_area)
    assert np.array_equal(mask, threshold_map(_blobs(), threshold, min_area=min_area))


# ------------------------------------------------------------------ tuned thresholds
@pytest.fixture(scope="module")
def tuned_setup():
    data = make_textures(n_domains=1, n_normal=24, n_anomalous=12, image_size=32,
                         random_state=0)
    normal = np.flatnonzero(data.y == 0)
    det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
                    false_reject_rate=0.2, random_state=0).fit(data.images[normal[:10]])
    val = np.r_[normal[10:], np.flatnonzero(data.y == 1)]
    return det, data.images[val], data.y[val]


def _best_over_thresholds(scores, y, metric):
    cands = np.r_[scores.min() - 1, np.unique(scores)]
    return max(metric(y, (scores > t).astype(int)) for t in cands)


def test_tune_threshold_for_f1(tuned_setup):
    det, X, y = tuned_setup
    conformal = det.threshold_
    scores = det.decision_function(X)
    tune_threshold(det, X, y, objective="f1")
    pred = det.predict(X)
    assert np.array_equal(pred, (scores > det.threshold_).astype(int))
    assert f1_score(y, pred) == pytest.approx(_best_over_thresholds(scores, y, f1_score))
    assert det.false_reject_rate_ == false_reject_bound(det.reference_scores_, det.threshold_)
    # a callable objective: the same threshold
    t = det.threshold_
    assert tune_threshold(det, X, y, objective=f1_score).threshold_ == t
    # recalibrate brings the conformal threshold back
    assert det.recalibrate().threshold_ == conformal


def test_tune_threshold_for_recall_at_a_false_reject_rate_and_cost(tuned_setup):
    det, X, y = tuned_setup
    scores = det.decision_function(X)
    normal, anomalous = scores[y == 0], scores[y == 1]
    for cap in (0.0, 0.25):
        t = tune_threshold(det, X, y, objective="recall_at_frr",
                           max_false_reject_rate=cap).threshold_
        assert np.mean(normal > t) <= cap
        # the best catch rate under the cap: no lower threshold keeps to it and catches more
        better = [u for u in np.unique(scores) if u < t and np.mean(normal > u) <= cap
                  and np.mean(anomalous > u) > np.mean(anomalous > t)]
        assert not better
    # misses costing far more than false rejects: every defective part rejected
    t = tune_threshold(det, X, y, objective="cost", miss_cost=1000.0).threshold_
    assert (anomalous > t).all()
    t = tune_threshold(det, X, y, objective="cost", false_reject_cost=1000.0).threshold_
    assert not (normal > t).any()
    det.recalibrate()


def test_tune_threshold_checks_before_scoring(tuned_setup, monkeypatch):
    det, X, y = tuned_setup
    monkeypatch.setattr(type(det), "decision_function",
                        lambda *a: pytest.fail("scored before the arguments were checked"))
    with pytest.raises(ValueError, match="objective"):
        tune_threshold(det, X, y, objective="accuracy")
    with pytest.raises(ValueError, match="miss_cost"):
        tune_threshold(det, X, y, objective="cost", miss_cost=-1)
    with pytest.raises(ValueError, match="both normal"):
        tune_threshold(det, X, np.zeros(len(y)))


def _scored_reference_warnings(det, X):
    from skad import ReferenceScoredWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.decision_function(X)
    return [w.message for w in caught if isinstance(w.message, ReferenceScoredWarning)]


@pytest.mark.parametrize("method", ["PatchCore", "MMR"])
def test_scoring_a_reference_warns_its_score_is_in_sample(tmp_path, method):
    """A reference scores lower than a new good part (it is in the memory bank, or in the
    position statistics): scoring one says so, named, for arrays and files alike, also after
    a save and load; images held out of the references do not warn."""
    import skad

    kwargs = ({"backbone": "test_resnet", "weights": None} if method == "PatchCore" else
              {"teacher": "test_efficientnet", "teacher_weights": None, "student": "test_vit",
               "student_weights": None, "student_depth": 1, "n_epochs": 1})
    rng = np.random.default_rng(0)
    train = [rng.random((32, 32, 3)) for _ in range(6)]
    held = [rng.random((32, 32, 3)) for _ in range(6)]
    det = getattr(skad, method)(image_size=32, random_state=0, **kwargs).fit(train)
    det.set_reference(held[:4])
    assert not _scored_reference_warnings(det, held[4:] + train)
    found, = _scored_reference_warnings(det, held[4:] + held[:2])
    assert found.indices == [2, 3]
    assert "2 of the 4 images scored have the same decoded pixels as references" in str(found)
    assert "X[2], X[3]" in str(found)

    paths = []
    for i, image in enumerate(held[3:5]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    det.set_reference(held[:3] + [paths[0]])  # a file among the references
    skad.save(det, tmp_path / "m.skad")
    loaded = skad.load(tmp_path / "m.skad")
    found, = _scored_reference_warnings(loaded, paths)
    assert found.indices == [0] and "0.png" in str(found) and "1.png" not in str(found)
    if method == "MMR":  # references that only calibrate: a reference's score is its own
        loaded.set_params(standardize_positions=False).set_reference(held[:4])
        assert not _scored_reference_warnings(loaded, held[:4])
