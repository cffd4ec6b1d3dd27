"""The estimator contract of DESIGN.md, checked for every detector.

Each entry of ``DETECTORS`` builds a tiny, fast configuration (random weights,
32-64 px) and gives the keyword arguments ``fit`` needs besides X and y.
"""

import pickle
import re
import threading
import warnings

import joblib
import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate

import skad
import skad._threads
from skad import MMR, BaseDetector, GeneralAD, GlobalLocal, MetaComparer, PatchCore
from skad.datasets import make_textures
from skad.model_selection import ReferenceScorer
from skad.thresholds import CalibrationWarning, conformal_threshold

SIZE = 32


def _patchcore():
    return PatchCore(backbone="test_resnet", weights=None, image_size=SIZE, random_state=0)


def _mmr():
    return MMR(teacher="test_efficientnet", teacher_weights=None, student="test_vit",
               student_weights=None, student_depth=1, n_epochs=1, image_size=SIZE,
               random_state=0)


def _general_ad():
    return GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,), hidden_dim=32,
                     n_epochs=1, image_size=SIZE, random_state=0)


def _global_local():
    return GlobalLocal(teacher="test_efficientnet", teacher_weights=None, teacher_size=SIZE,
                       patch_size=8, stride=4, embed_dim=16, width=8, n_distill_patches=8,
                       n_distill_epochs=1, n_finetune_epochs=1, n_epochs=1, image_size=SIZE,
                       random_state=0)


def _meta_comparer():
    return MetaComparer(backbone="test_resnet", weights=None, image_size=SIZE, fpn_width=16,
                        n_fpn_cells=1, hidden_layer_sizes=(16,), attention_dim=8, n_epochs=1,
                        n_episodes=2, random_state=0)


DETECTORS = [
    pytest.param(_patchcore, {}, id="PatchCore"),
    pytest.param(_mmr, {}, id="MMR"),
    pytest.param(_general_ad, {}, id="GeneralAD"),
    pytest.param(_global_local, {}, id="GlobalLocal"),
    pytest.param(_meta_comparer, {}, id="MetaComparer"),
]


@pytest.fixture(scope="module")
def data():
    return make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=SIZE, random_state=0)


#: the last normal images are held out of one-class training: references that the
#: detector did not learn from, for the tests of its thresholds
N_HELD_OUT = 5


def _fit(factory, fit_kwargs, data, **overrides):
    det = factory()
    det.set_params(**overrides)
    if det._one_class:
        return det.fit(data.images[data.y == 0][:-N_HELD_OUT], **fit_kwargs)
    return det.fit(data.images, data.y, groups=data.groups, **fit_kwargs)


def _ready(det, data):
    """A fitted detector with references set (non-one-class detectors need them)."""
    if not hasattr(det, "threshold_"):
        det.set_reference(data.images[data.y == 0][:4])
    return det


@pytest.fixture(params=[pytest.param(p.values, id=p.id) for p in DETECTORS])
def fitted(request, data):
    factory, fit_kwargs = request.param
    return factory, fit_kwargs, _ready(_fit(factory, fit_kwargs, data), data)


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_constructor_stores_each_argument_as_given_and_nothing_else(factory, fit_kwargs):
    cls = type(factory())
    names = cls._get_param_names()
    given = {name: object() for name in names}
    det = cls(**given)
    assert set(vars(det)) == set(names)
    assert [n for n in names if getattr(det, n) is not given[n]] == []
    assert det.get_params() == given


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_constructor_only_stores_params(factory, fit_kwargs):
    det = factory()
    params = det.get_params()
    clone_params = clone(det).get_params()
    assert params.keys() == clone_params.keys()
    assert repr(det).startswith(type(det).__name__)
    assert not [k for k in vars(det) if k.endswith("_") and not k.startswith("_")]
    with pytest.raises(NotFittedError):
        det.decision_function(np.zeros((1, SIZE, SIZE), np.uint8))


def test_outputs_shapes_and_forms(fitted, data, tmp_path):
    factory, fit_kwargs, det = fitted
    X = data.images[-4:]
    scores = det.decision_function(X)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    maps = det.predict_map(X)
    assert maps.shape == (4, SIZE, SIZE) and np.isfinite(maps).all()
    assert set(np.unique(det.predict(X))) <= {0, 1}
    assert np.array_equal(det.predict(X), (scores > det.threshold_).astype(int))
    # grayscale ndarray, a list of arrays of mixed sizes, file paths
    grey = data.images[-2:].mean(axis=3).astype(np.uint8)
    assert det.decision_function(grey).shape == (2,)
    mixed = [data.images[0], data.images[1][: SIZE - 8, : SIZE - 4] / 255.0]
    mixed_maps = det.predict_map(mixed)
    assert isinstance(mixed_maps, list)
    assert [m.shape for m in mixed_maps] == [(SIZE, SIZE), (SIZE - 8, SIZE - 4)]
    paths = []
    for i, img in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    np.testing.assert_allclose(det.decision_function(paths), scores, rtol=1e-5, atol=1e-6)


def test_input_errors_name_the_item(fitted, data, tmp_path):
    _, _, det = fitted
    bad = data.images[:3].astype(np.float32) / 255
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"X\[1\].*NaN"):
        det.decision_function(bad)
    with pytest.raises(ValueError, match="shape"):
        det.decision_function(np.zeros((SIZE, SIZE)))
    with pytest.raises(ValueError, match="empty"):
        det.decision_function([])
    with pytest.raises(ValueError, match="missing.png"):
        det.decision_function([str(tmp_path / "missing.png")])
    with pytest.raises(TypeError, match=r"X\[0\]"):
        det.decision_function([object()])
    with pytest.raises(ValueError, match="0 \\(normal\\) and 1"):
        det.score(data.images[:3], [0, 2, 1])
    with pytest.raises(ValueError, match="labels"):
        det.score(data.images[:3], [0, 1])


def test_failed_fit_leaves_detector_as_it_was(fitted, data, tmp_path):
    factory, fit_kwargs, det = fitted
    before = det.decision_function(data.images[:4])
    state = sorted(vars(det))
    # a corrupt file passes the up-front checks and fails mid-fit, while reading
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    idx = np.r_[np.flatnonzero(data.y == 0)[:5], np.flatnonzero(data.y == 1)[:2]]
    broken = [*data.images[idx], str(tmp_path / "corrupt.png")]
    y = np.concatenate([data.y[idx], [0]])
    groups = np.concatenate([data.groups[idx], data.groups[idx][:1]])
    with pytest.raises(ValueError, match="corrupt.png"):
        det.fit(broken, y, groups=groups, **fit_kwargs)
    assert sorted(vars(det)) == state
    np.testing.assert_allclose(det.decision_function(data.images[:4]), before)


def test_pickle_round_trip(fitted, data, tmp_path):
    _, _, det = fitted
    X = data.images[-3:]
    expected = det.decision_function(X), det.predict_map(X)
    joblib.dump(det, tmp_path / "det.joblib")
    loaded = joblib.load(tmp_path / "det.joblib")
    np.testing.assert_allclose(loaded.decision_function(X), expected[0], rtol=1e-6)
    np.testing.assert_allclose(loaded.predict_map(X), expected[1], rtol=1e-5, atol=1e-6)
    assert loaded.threshold_ == det.threshold_
    loaded2 = pickle.loads(pickle.dumps(det))
    np.testing.assert_allclose(loaded2.decision_function(X), expected[0], rtol=1e-6)


#: (detector, scoring parameter, a new value): scoring reads them, so the calibration of
#: set_reference holds at their values then
SCORING_CHANGES = [
    ("PatchCore", "sigma", 2.0), ("PatchCore", "n_reweight_neighbors", 3),
    ("PatchCore", "image_size", 48), ("GeneralAD", "top_k", 3), ("GeneralAD", "sigma", 2.0),
    ("MMR", "sigma", 2.0), ("MMR", "image_size", 48), ("MetaComparer", "sigma", 1.0),
    ("MetaComparer", "image_size", (32, 48)), ("GlobalLocal", "stride", 8),
    ("GlobalLocal", "iad_score_weight", 0.5), ("GlobalLocal", "n_idw_neighbors", 2),
    ("GlobalLocal", "idw_power", 1.0),
]


def test_a_scoring_parameter_changed_since_calibration_is_named(fitted, data, tmp_path):
    _, _, det = fitted
    X, normals = data.images[:3], data.images[data.y == 0][-N_HELD_OUT:]
    changes = [(p, v) for name, p, v in SCORING_CHANGES if name == type(det).__name__]
    assert changes and det.calibrated_params_ == det._scoring_values()
    for param, value in changes:
        old, before = det.get_params()[param], det.decision_function(X)
        det.set_params(**{param: value})
        named = re.escape(f"set_params changed {param} from {det.calibrated_params_[param]!r}")
        for decide in (det.predict, det.predict_pvalue, det.predict_mask,
                       lambda X: det.recalibrate()):
            with pytest.raises(ValueError, match=named):  # a stale threshold: no decision
                decide(X)
        if det._standardizes_positions():  # the statistics of maps at the old value
            with pytest.raises(ValueError, match=named + ".* and the position statistics"):
                det.decision_function(X)
        else:  # right scores at the new value, with a word on the thresholds
            with pytest.warns(CalibrationWarning, match=named + ".*refuses until "
                              r"set_reference\(normals\) calibrates at it, or it is set back"):
                det.decision_function(X)
        skad.save(det, tmp_path / "stale.skad")  # what was calibrated travels with the model
        with pytest.raises(ValueError, match=named):
            skad.load(tmp_path / "stale.skad").predict(X)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)
            np.testing.assert_allclose(det.set_params(**{param: old}).decision_function(X),
                                       before, rtol=1e-6)  # set back: as calibrated
            warnings.simplefilter("ignore", CalibrationWarning)  # few references
            det.set_params(**{param: value}).set_reference(normals)  # calibrated at the new one
            warnings.simplefilter("error", CalibrationWarning)
            assert det.predict(X).shape == (3,) and det.calibrated_params_[param] != old
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            det.set_params(**{param: old}).set_reference(normals)
    (first, a), (second, b) = changes[:2]
    before = det.get_params()
    det.set_params(**{first: a, second: b})  # both named, the remedy in the plural
    with pytest.raises(ValueError, match="at the earlier values: call set_reference.* new "
                                         "values, or set them back") as raised:
        det.predict(X)
    assert f"{first} from " in str(raised.value) and f"{second} from " in str(raised.value)
    det.set_params(**{first: before[first], second: before[second]})


def test_set_reference_recalibrates(fitted, data):
    _, _, det = fitted
    other = data.images[(data.y == 0) & (data.groups == data.groups[-1])][:5]
    det.set_reference(other)
    assert det.n_references_ == 5
    assert det.reference_scores_.shape == (5,)
    assert det.reference_map_maxima_.shape == (5,)
    assert det.threshold_ == conformal_threshold(det.reference_scores_, det.false_reject_rate,
                                                 warn=False)
    assert det.pixel_threshold_ == conformal_threshold(det.reference_map_maxima_,
                                                       det.false_reject_rate, warn=False)
    with pytest.raises(ValueError, match="normals"):
        det.set_reference([])


def _one_part_after_the_other(n_parts):
    """skad._threads.split_batch's parts for ``n_parts`` threads (two images a part at least),
    computed one after the other on the calling thread."""
    def join(outs):
        if outs[0] is None or isinstance(outs[0], torch.Tensor):
            return None if outs[0] is None else torch.cat(outs)
        return type(outs[0])(join(list(parts)) for parts in zip(*outs))

    return lambda fn, batch: join([fn(part) for part in batch.tensor_split(
        skad._threads.n_parts(len(batch), n_parts))])


def test_scoring_on_several_threads_gives_the_scores_of_one(fitted, data, monkeypatch):
    """Scoring and calibration split each batch's images over PyTorch's thread count, one
    Python thread per part with one PyTorch thread (skad._threads): the scores and maps of
    scoring on one thread, to the last bit, in the images' order; the calibration of the
    same parts computed one after the other on one thread (a reference's features can
    round differently in another batch: MetaComparer's)."""
    _, _, det = fitted
    images, references = data.images[:7], data.images[data.y == 0][:4]
    before = torch.get_num_threads()

    def score(n_threads, calibrate_in_parts=None):
        torch.set_num_threads(n_threads)
        with monkeypatch.context() as patch:
            if calibrate_in_parts:
                patch.setattr(skad.base, "split_batch", _one_part_after_the_other(3))
            det.set_reference(references)
        return (det.reference_scores_, det.threshold_, det.decision_function(images),
                np.stack(det.predict_map(images)))

    score_batch, parts = type(det)._score_batch, []

    def recorded(self, batch, return_maps):
        parts.append((len(batch), threading.get_ident(), torch.get_num_threads()))
        return score_batch(self, batch, return_maps)

    try:
        one = score(1, calibrate_in_parts=True)
        monkeypatch.setattr(type(det), "_score_batch", recorded)
        three = score(3)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(b, a)
    scoring = [n for n, _, _ in parts[-6:]]  # decision_function's and predict_map's parts
    assert scoring == [3, 2, 2, 3, 2, 2]
    assert {n for _, _, n in parts} == {1}
    assert threading.get_ident() not in {ident for _, ident, _ in parts}


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_calibration_on_a_random_subset_of_the_references(factory, fit_kwargs, data):
    det = _ready(_fit(factory, fit_kwargs, data), data)
    if getattr(det, "patch_score", None) == "fused":  # standardised by the calibrating ones
        det.set_params(patch_score="nearest")
    refs = data.images[data.y == 0][:10]
    full = det.set_params(max_calibration_references=None).set_reference(refs)
    scores, maxima = full.reference_scores_.copy(), full.reference_map_maxima_.copy()
    assert np.array_equal(full.calibration_indices_, np.arange(10))
    # as many as there are references, or more: all of them, nothing drawn, the same scores
    for size in (10, 11):
        det.set_params(max_calibration_references=size).set_reference(refs)
        assert np.array_equal(det.calibration_indices_, np.arange(10))
        np.testing.assert_array_equal(det.reference_scores_, scores)
        np.testing.assert_array_equal(det.reference_map_maxima_, maxima)
    det.set_params(max_calibration_references=4).set_reference(refs)
    idx = det.calibration_indices_
    assert len(idx) == 4 and np.array_equal(idx, np.unique(idx)) and 0 <= idx.min()
    assert idx.max() < 10 and det.n_references_ == 10
    assert det.reference_scores_.shape == det.reference_map_maxima_.shape == (4,)
    # each is the score it gets when all calibrate: the subset is scored, nothing else changes
    np.testing.assert_allclose(det.reference_scores_, scores[idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.reference_map_maxima_, maxima[idx], rtol=1e-5, atol=1e-6)
    assert det.threshold_ == conformal_threshold(det.reference_scores_, det.false_reject_rate,
                                                 warn=False)
    # drawn from random_state: the same draw again, other draws for other seeds
    assert np.array_equal(det.set_reference(refs).calibration_indices_, idx)
    draws = {tuple(det.set_params(random_state=seed).set_reference(refs).calibration_indices_)
             for seed in range(1, 6)}
    assert len(draws) > 1


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_random_state_and_global_rng(factory, fit_kwargs, data):
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.random.get_rng_state().clone()
    a = _ready(_fit(factory, fit_kwargs, data), data).decision_function(data.images[-4:])
    assert np.array_equal(np.random.get_state()[1], np_state), "numpy global RNG was used"
    assert torch.equal(torch.random.get_rng_state(), torch_state), "torch global RNG was used"
    b = _ready(_fit(factory, fit_kwargs, data), data).decision_function(data.images[-4:])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_domain_cross_validation_with_routing(factory, fit_kwargs, data):
    scorer = ReferenceScorer(n_references=3, random_state=0)
    with sklearn.config_context(enable_metadata_routing=True):
        search = GridSearchCV(factory(), {"false_reject_rate": [0.1, 0.3]},
                              cv=LeaveOneGroupOut(), scoring=scorer, refit=False)
        search.fit(data.images, data.y, groups=data.groups, **fit_kwargs)
    scores = search.cv_results_["mean_test_score"]
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_one_class_warns_about_left_out_anomalies(data):
    with pytest.warns(UserWarning, match="left out 4 anomalous"):
        _patchcore().fit(data.images[:12], data.y[:12])


def test_cross_validate_in_parallel(data):
    res = cross_validate(_patchcore(), data.images, data.y, groups=data.groups,
                         cv=LeaveOneGroupOut(), scoring=ReferenceScorer(n_references=3),
                         n_jobs=2)
    assert np.isfinite(res["test_score"]).all()


# ------------------------------------------------------------------ parameters
SHARED = ("image_size", "batch_size", "false_reject_rate", "max_calibration_references",
          "threshold_quantile", "device", "verbose", "random_state")

BAD_SHARED = [("batch_size", 0), ("batch_size", -1), ("batch_size", 1.5),
              ("threshold_quantile", 1.5), ("threshold_quantile", -0.1),
              ("threshold_quantile", "auto"), ("false_reject_rate", 0.0),
              ("false_reject_rate", 1.0), ("false_reject_rate", "5%"),
              ("max_calibration_references", 0), ("max_calibration_references", 2.5),
              ("max_calibration_references", True), ("device", 123),
              ("device", "gpu0"), ("verbose", -1), ("image_size", 0), ("image_size", (0, SIZE)),
              ("image_size", (SIZE,)), ("random_state", "x")]

# values each detector's own constraints refuse (relations between parameters are
# checked in each detector's tests)
BAD_OWN = {
    "PatchCore": [("coreset_ratio", 0), ("coreset_ratio", 1.5), ("layers", 2),
                  ("layers", ("2", "3")), ("projection_dim", -1), ("coreset_chunk_size", 0),
                  ("n_reweight_neighbors", True), ("sigma", -1.0), ("weights", 3),
                  ("embedding_dim", 0), ("embedding_dim", (1024,))],
    "MMR": [("mask_ratio", 1.0), ("n_epochs", 0), ("n_epochs", 2.0), ("crop_scale", (0.0, 1.0)),
            ("crop_scale", (0.5,)), ("hflip", "yes"), ("student_depth", 0),
            ("learning_rate_milestones", (0.6, 1.5)), ("standardize_positions", 1)],
    "GeneralAD": [("distortions", "bogus"), ("distortions", ()), ("top_k", 0), ("top_k", True),
                  ("dropout", 1.0), ("norm", None), ("learning_rate", 0.0), ("sigma", -1.0),
                  ("standardize_positions", "yes")],
    "GlobalLocal": [("stride", 0), ("stride", 4.0), ("context", 0.5), ("context", True),
                    ("dad_input", "sum"), ("iad_score_weight", 1.5), ("idw_power", 0),
                    ("local_net", torch.nn.Linear(2, 2)), ("n_distill_epochs", -1),
                    ("distill_images", "folder"), ("standardize_positions", None)],
    "MetaComparer": [("n_epochs", 0), ("reference_reduction", "mean"),
                     ("hidden_layer_sizes", ()), ("hidden_layer_sizes", (16.0,)),
                     ("n_episode_queries", 1), ("mismatch_ratio", 1.5),
                     ("synthesize_anomalies", "always"), ("train_backbone", 1),
                     ("n_reference_patches", 0), ("patch_score", "knn")],
}


def _no_training(monkeypatch, det):
    """Make any training fail the test: parameter errors must come before it."""
    def _fit(*args, **kwargs):
        raise AssertionError("training started before the parameters were checked")
    monkeypatch.setattr(type(det), "_fit", _fit)


def _fit_all(det, data):
    return det.fit(data.images, data.y, groups=data.groups)


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_every_parameter_has_a_constraint(factory, fit_kwargs):
    det = factory()
    assert set(det._parameter_constraints) == set(det.get_params(deep=False))
    for name in SHARED:  # declared once, in the base class
        assert det._parameter_constraints[name] is BaseDetector._parameter_constraints[name]
    det._check_params()  # the defaults and the tiny configurations are valid
    type(det)()._check_params()


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_constructors_are_keyword_only(factory, fit_kwargs):
    cls = type(factory())
    first = next(iter(cls().get_params()))
    with pytest.raises(TypeError, match="positional"):
        cls(getattr(cls(), first))


def test_reference_scorer_is_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        ReferenceScorer(3)


@pytest.mark.parametrize("name,value", BAD_SHARED, ids=[f"{n}={v!r}" for n, v in BAD_SHARED])
@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_bad_shared_parameter_is_named_before_training(factory, fit_kwargs, name, value, data,
                                                      monkeypatch):
    det = factory().set_params(**{name: value})
    _no_training(monkeypatch, det)
    with pytest.raises(ValueError, match=rf"'{name}' parameter of {type(det).__name__} must be"):
        _fit_all(det, data)
    assert not [k for k in vars(det) if k.endswith("_") and not k.startswith("_")]


@pytest.mark.parametrize("factory,fit_kwargs,name,value", [
    pytest.param(*p.values, name, value, id=f"{p.id}-{name}={value!r}")
    for p in DETECTORS for name, value in BAD_OWN[p.id]])
def test_bad_own_parameter_is_named_before_training(factory, fit_kwargs, name, value, data,
                                                   monkeypatch):
    det = factory().set_params(**{name: value})
    _no_training(monkeypatch, det)
    with pytest.raises(ValueError, match=rf"'{name}' parameter of {type(det).__name__} must be"):
        _fit_all(det, data)


BAD_GROUPS = {
    "None": (lambda g: np.array([None, *g[1:]], dtype=object), r"groups\[0\] is None"),
    "short": (lambda g: g[:-1], r"groups has shape"),
    "2-D": (lambda g: np.c_[g, g], r"groups has shape"),
    # an int among str: numpy would not sort them
    "mixed": (lambda g: np.array([1, *g[1:]], dtype=object), r"groups must hold domains of one"),
}


@pytest.mark.parametrize("kind", BAD_GROUPS)
@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_bad_groups_are_named(factory, fit_kwargs, kind, data, monkeypatch):
    det = factory()
    _no_training(monkeypatch, det)
    make, match = BAD_GROUPS[kind]
    with pytest.raises(ValueError, match=match):
        det.fit(data.images, data.y, groups=make(data.groups))


def test_parameters_changed_after_fit_are_named_before_use(fitted, data):
    _, _, det = fitted
    threshold = det.threshold_
    det.set_params(batch_size=0)
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        det.decision_function(data.images[:2])
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        det.set_reference(data.images[data.y == 0][:4])
    assert det.threshold_ == threshold  # the reference is kept
    det.set_params(batch_size=4, device="tpu:x")
    with pytest.raises(ValueError, match="'device' parameter"):
        det.predict_map(data.images[:2])


def test_validation_can_be_skipped_as_in_sklearn():
    det = _patchcore().set_params(batch_size=0)
    with sklearn.config_context(skip_parameter_validation=True):
        det._check_params()
    with pytest.raises(ValueError, match="'batch_size' parameter"):
        det._check_params()


# ------------------------------------------------------------------ decisions (issue 15)
def test_decisions_agree_with_the_thresholds(fitted, data):
    """Conformal threshold_ and pixel_threshold_, p-values, masks and regions, per detector."""
    _, _, det = fitted
    refs = data.images[data.y == 0][-5:]
    # 5 references support 1/6 at best: a warning, the largest score, and the rate recorded
    det.set_params(false_reject_rate=0.05)
    with pytest.warns(CalibrationWarning, match="5 reference images cannot support"):
        det.set_reference(refs)
    assert det.threshold_ == det.reference_scores_.max()
    assert det.pixel_threshold_ == det.reference_map_maxima_.max()
    assert det.false_reject_rate_ == pytest.approx(1 / 6)
    # 0.4: (1 + 1) / 6 <= 0.4, the second largest score; applied without reading an image
    det.set_params(false_reject_rate=0.4)
    score_batch = det._score_batch
    det._score_batch = lambda *a: pytest.fail("recalibrate scored images")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        det.recalibrate()
    det._score_batch = score_batch
    assert det.threshold_ == np.sort(det.reference_scores_)[-2]
    assert det.pixel_threshold_ == np.sort(det.reference_map_maxima_)[-2]
    assert det.false_reject_rate_ <= 0.4

    X = data.images[np.r_[0:3, -8:-5, 8:12]]  # normal and anomalous, none a reference
    scores, maps = det.score_and_map(X)
    p = det.predict_pvalue(X)
    assert p.min() >= 1 / 6 and p.max() <= 1
    order = np.argsort(scores)
    assert np.all(np.diff(p[order]) <= 0)
    pred = det.predict(X)
    assert np.array_equal(pred, (scores > det.threshold_).astype(int))
    assert np.array_equal(pred, (p <= det.false_reject_rate_).astype(int))

    masks = det.predict_mask(X)
    assert masks.dtype == bool and masks.shape == maps.shape
    assert np.array_equal(masks, maps > det.pixel_threshold_)
    regions = det.predict_regions(X)
    assert [sum(r.area for r in rs) for rs in regions] == list(masks.sum(axis=(1, 2)))
    for rs, amap in zip(regions, maps):
        for r in rs:
            r0, c0, r1, c1 = r.bbox
            assert 0 <= r0 < r1 <= amap.shape[0] and 0 <= c0 < c1 <= amap.shape[1]
            assert r.peak_score == pytest.approx(amap[r0:r1, c0:c1].max())
            assert r.peak_score > det.pixel_threshold_
    big = det.predict_regions(X, min_area=20)
    assert all(r.area >= 20 for rs in big for r in rs)
    assert np.array_equal(det.predict_mask(X, min_area=20).sum(axis=(1, 2)),
                          [sum(r.area for r in rs) for rs in big])

    # masks aligned with each input, as predict_map: mixed sizes give a list
    mixed = [data.images[0], data.images[9][: SIZE - 8, : SIZE - 4], data.images[10][:20]]
    mixed_masks = det.predict_mask(mixed)
    assert isinstance(mixed_masks, list)
    assert [m.shape for m in mixed_masks] == [(SIZE, SIZE), (SIZE - 8, SIZE - 4), (20, SIZE)]
    mixed_regions = det.predict_regions(mixed)
    assert [sum(r.area for r in rs) for rs in mixed_regions] == [m.sum() for m in mixed_masks]
    with pytest.raises(ValueError, match="min_area"):
        det.predict_mask(X, min_area=0)


def test_threshold_quantile_still_works_with_a_future_warning(data):
    det = _patchcore().set_params(threshold_quantile=0.9)
    with pytest.warns(FutureWarning, match="threshold_quantile is deprecated"):
        det.fit(data.images[data.y == 0][:8])
    assert det.threshold_ == pytest.approx(np.quantile(det.reference_scores_, 0.9))
    assert det.pixel_threshold_ == pytest.approx(np.quantile(det.reference_map_maxima_, 0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        det.set_params(threshold_quantile="deprecated", false_reject_rate=0.25).recalibrate()
    assert det.threshold_ == conformal_threshold(det.reference_scores_, 0.25)


def test_a_detector_pickled_before_false_reject_rate_loads(data):
    det = _patchcore().fit(data.images[data.y == 0][:8])
    X = data.images[-3:]
    expected = det.predict(X), det.predict_pvalue(X)
    state = det.__getstate__()
    for name in ("false_reject_rate", "false_reject_rate_", "pixel_threshold_",
                 "reference_map_maxima_"):
        del state[name]
    state["threshold_quantile"] = 0.99  # the default then
    old = type(det).__new__(type(det))
    old.__setstate__(state)
    assert old.get_params()["false_reject_rate"] == 0.05
    np.testing.assert_array_equal(old.predict(X), expected[0])
    np.testing.assert_allclose(old.predict_pvalue(X), expected[1])
    with pytest.raises(RuntimeError, match="set_reference"):
        old.predict_mask(X)
    with pytest.raises(RuntimeError, match="set_reference"):
        old.recalibrate()
    with pytest.warns(FutureWarning, match="threshold_quantile"):
        old.set_reference(data.images[data.y == 0][:8])
    assert old.predict_mask(X).shape == (3, SIZE, SIZE)


def test_a_detector_pickled_before_max_calibration_references_loads(data):
    normals = data.images[data.y == 0]
    det = _patchcore().fit(normals[:8])
    state = det.__getstate__()
    for name in ("max_calibration_references", "calibration_indices_"):
        del state[name]
    old = type(det).__new__(type(det))
    old.__setstate__(state)
    # every reference calibrated then, and still does at the next set_reference
    assert old.max_calibration_references is None
    assert np.array_equal(old.calibration_indices_, np.arange(8))
    assert np.array_equal(old.set_reference(normals[:12]).calibration_indices_, np.arange(12))


@pytest.mark.parametrize("factory,fit_kwargs", DETECTORS)
def test_a_reference_the_networks_trained_on_guarantees_no_rate(factory, fit_kwargs, data,
                                                                 tmp_path):
    """After a one-class fit, GeneralAD, MMR and GlobalLocal are calibrated on the images
    they learned from: no rate is promised (false_reject_rate_ 1.0, a warning) until
    set_reference brings images they did not train on. PatchCore learns nothing from them
    (each reference is scored without its own patches): its rate stands."""
    normals = data.images[data.y == 0]
    det = factory().set_params(false_reject_rate=0.4)  # 5 references support 1/6
    if not det._one_class:  # MetaComparer: fit sets no reference
        _fit(lambda: det, fit_kwargs, data)
        assert not hasattr(det, "threshold_") and not hasattr(det, "n_references_trained_on_")
        return
    learns = not det._compares_with_references
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        det.fit(normals[:-5], **fit_kwargs)
    said = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    assert det.n_references_trained_on_ == (len(normals) - 5 if learns else 0)
    assert (det.false_reject_rate_ == 1.0) is learns
    assert bool(said) is learns
    if learns:
        assert f"{type(det).__name__}: threshold_ and pixel_threshold_ were calibrated on " \
               "the training images" in said[0] and "at least 2 defect-free" in said[0]
        with pytest.warns(CalibrationWarning, match="calibrated on the training images"):
            det.recalibrate()  # a new rate does not make the training images held out
        assert det.false_reject_rate_ == 1.0
        # training images among the references are told by their pixels, read from files
        # or passed as arrays; and the digests travel with the model file
        files = []
        for i, image in enumerate(normals[-6:]):  # one of them a training image
            files.append(tmp_path / f"{i}.png")
            Image.fromarray(image).save(files[-1])
        skad.save(det, tmp_path / "m.skad")
        det = skad.load(tmp_path / "m.skad")
        with pytest.warns(CalibrationWarning, match="calibrated on 6 reference images, 1 of "
                          r"which is a training image \(the same decoded pixels"):
            det.set_reference(files)
        assert det.n_references_trained_on_ == 1 and det.false_reject_rate_ == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        det.set_reference(normals[-5:])  # images it did not train on: the promise stands
    assert det.n_references_trained_on_ == 0
    assert det.false_reject_rate_ == pytest.approx(1 / 3)


@pytest.mark.parametrize("factory", [_general_ad, _mmr, _global_local])
def test_too_few_images_for_position_statistics_fail_before_training(factory, data,
                                                                     monkeypatch):
    """standardize_positions=True needs 3 references: a fit on 2 fails at once, not after
    its training (minutes on real images), and keeps the detector as it was."""
    det = factory()
    monkeypatch.setattr(type(det), "_fit", lambda *a: pytest.fail("trained first"))
    with pytest.raises(ValueError, match=rf"{type(det).__name__}\(standardize_positions=True"
                                         r"\) needs at least 3 reference images.*got 2 "
                                         r"training images \(its first references\)"):
        det.fit(data.images[data.y == 0][:2])
    assert not hasattr(det, "threshold_")
    # labelled images count their normal ones only
    with pytest.raises(ValueError, match="got 2"), pytest.warns(UserWarning, match="left out"):
        det.fit(data.images[np.r_[0:2, -3:0]], data.y[np.r_[0:2, -3:0]])


def test_a_single_reference_scored_against_itself_guarantees_no_rate(fitted, data):
    """PatchCore and MetaComparer can score one reference only against its own other
    patches, not as a new image: they warn at any rate; the others score it as a new image,
    and one reference supports 1/2 there. Two references are scored against each other."""
    _, _, det = fitted
    normals = data.images[data.y == 0]
    det.set_params(false_reject_rate=0.6)  # 1 / (1 + 1) <= 0.6: one reference would do
    if det._standardizes_positions():
        det.set_params(standardize_positions=False)  # else 3 references at least
    if type(det).__name__ in ("PatchCore", "MetaComparer"):
        with pytest.warns(CalibrationWarning, match=(
                r"its one reference image was scored against its own patches.*no "
                r"false-reject guarantee, whatever the rate.*at least 2 defect-free")):
            det.set_reference(normals[-1:])
        assert det.false_reject_rate_ == 1.0  # nothing guaranteed
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)
            det.set_reference(normals[-1:])
        assert det.false_reject_rate_ == 0.5
    assert np.isfinite(det.threshold_)
    for n in (2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)
            det.set_reference(normals[-n:])
        assert det.false_reject_rate_ <= 0.6
    # at a rate one reference cannot support, one warning says both
    det.set_params(false_reject_rate=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        det.set_reference(normals[-1:])
    messages = [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]
    assert len(messages) == 1 and "at least 19 defect-free" in messages[0]


def _uniform_warnings(caught):
    return [str(w.message) for w in caught if "one uniform value" in str(w.message)]


def test_uniform_reference_images_are_named(fitted, data, tmp_path):
    """Blank references (one value in every pixel: a tile past the part's edge) warn, once,
    with their count, indices and paths (five at most); textured ones do not."""
    _, _, det = fitted
    normals = list(data.images[data.y == 0][:4])
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 255, np.uint8)).save(blank)
    refs = [normals[0], str(blank), *normals[1:3], np.full((SIZE, SIZE), 7, np.uint8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.set_reference(refs)
    assert _uniform_warnings(caught) == [
        f"{type(det).__name__}: 2 of the 5 reference images are one uniform value (every "
        f"pixel alike): normals[1] ({str(blank)!r}), normals[4]. A blank image holds no "
        "texture to compare with: leave such images out of the reference images unless blank "
        "parts are normal here"]
    assert caught[[str(w.message) for w in caught].index(_uniform_warnings(caught)[0])
                  ].filename == __file__  # points at the caller
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.set_reference(np.stack(normals))
    assert _uniform_warnings(caught) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.set_reference(refs[:4])
    assert "1 of the 4 reference images is one uniform value" in _uniform_warnings(caught)[0]
    if det._one_class:  # its training images are its first references: named as such
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clone(det).fit(refs)
        (message,) = _uniform_warnings(caught)
        assert "2 of the 5 training images" in message and "alike): X[1] (" in message
        assert "out of the training images unless" in message
        # many: five named, the others counted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clone(det).fit([*normals, *[np.full((SIZE, SIZE), v, np.uint8) for v in range(7)]])
        (message,) = _uniform_warnings(caught)
        assert "7 of the 11 training images" in message
        assert "X[4], X[5], X[6], X[7], X[8] and 2 more." in message


def test_too_few_calibrating_references_say_which_parameter_limits_them(data):
    det = _patchcore().set_params(max_calibration_references=4)
    with pytest.warns(CalibrationWarning, match="max_calibration_references=4 of the 10 "
                      "references calibrate: even all 10 \\(None\\) are fewer than 19"):
        det.fit(data.images[data.y == 0][:10])
    det.set_params(false_reject_rate=0.2)  # needs 4: reached by all 10, not by the cap of 3
    with pytest.warns(CalibrationWarning, match="set it to at least 4 \\(or None\\)"):
        det.set_params(max_calibration_references=3).set_reference(data.images[data.y == 0][:10])
