"""The estimator contract of DESIGN.md, checked for every detector.

Each entry of ``DETECTORS`` builds a tiny, fast configuration (random weights,
32-64 px) and gives the keyword arguments ``fit`` needs besides X and y.
"""

import pickle

import joblib
import numpy as np
import pytest
import sklearn
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate

from skad import MMR, BaseDetector, GeneralAD, GlobalLocal, MetaComparer, PatchCore
from skad.datasets import make_textures
from skad.model_selection import ReferenceScorer

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


def _fit(factory, fit_kwargs, data, **overrides):
    det = factory()
    det.set_params(**overrides)
    if det._one_class:
        normal = data.y == 0
        return det.fit(data.images[normal], **fit_kwargs)
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


def test_set_reference_recalibrates(fitted, data):
    _, _, det = fitted
    other = data.images[(data.y == 0) & (data.groups == data.groups[-1])][:5]
    det.set_reference(other)
    assert det.n_references_ == 5
    assert det.reference_scores_.shape == (5,)
    assert det.threshold_ == pytest.approx(np.quantile(det.reference_scores_,
                                                       det.threshold_quantile))
    with pytest.raises(ValueError, match="normals"):
        det.set_reference([])


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
        search = GridSearchCV(factory(), {"threshold_quantile": [0.9, 0.99]},
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
SHARED = ("image_size", "batch_size", "threshold_quantile", "device", "verbose", "random_state")

BAD_SHARED = [("batch_size", 0), ("batch_size", -1), ("batch_size", 1.5),
              ("threshold_quantile", 1.5), ("threshold_quantile", -0.1), ("device", 123),
              ("device", "gpu0"), ("verbose", -1), ("image_size", 0), ("image_size", (0, SIZE)),
              ("image_size", (SIZE,)), ("random_state", "x")]

# values each detector's own constraints refuse (relations between parameters are
# checked in each detector's tests)
BAD_OWN = {
    "PatchCore": [("coreset_ratio", 0), ("coreset_ratio", 1.5), ("layers", 2),
                  ("layers", ("2", "3")), ("projection_dim", -1), ("coreset_chunk_size", 0),
                  ("n_reweight_neighbors", True), ("sigma", -1.0), ("weights", 3)],
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
                     ("n_reference_patches", 0)],
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
