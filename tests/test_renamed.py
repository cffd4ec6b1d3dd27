"""Renamed parameters: the old names work for one release, with a FutureWarning.

Each detector lists its renames in ``_deprecated_parameters`` (skad._params). For
every entry: the old name warns, names the new one and resolves to the same value;
set for a whole fit, the old names give what the new names give; ``clone`` and
``get_params`` keep them; a pickle written with the old attribute names loads and
scores; the command line's ``--param old=...`` works and warns.
"""

import contextlib
import pickle
import warnings

import joblib
import numpy as np
import pytest
from sklearn.base import clone

from skad import MMR, GeneralAD, GlobalLocal, MetaComparer, PatchCore
from skad._params import DEPRECATED
from skad.cli import CLIError, make_detector
from skad.datasets import make_textures
from skad.model_selection import ReferenceScorer

SIZE = 32

TINY = {
    PatchCore: dict(backbone="test_resnet", weights=None, image_size=SIZE, random_state=0),
    MetaComparer: dict(backbone="test_resnet", weights=None, image_size=SIZE, fpn_width=16,
                       attention_dim=8, n_epochs=1, n_episodes=2, random_state=0),
    GeneralAD: dict(backbone="test_efficientnet", weights=None, layers=(2,), hidden_dim=32,
                    n_epochs=2, image_size=SIZE, random_state=0),
    MMR: dict(teacher="test_efficientnet", teacher_weights=None, student="test_vit",
              student_weights=None, student_depth=1, n_epochs=2, image_size=SIZE,
              random_state=0),
    GlobalLocal: dict(teacher="test_efficientnet", teacher_weights=None, teacher_size=SIZE,
                      patch_size=8, stride=4, embed_dim=16, width=8, n_distill_patches=8,
                      n_distill_epochs=1, n_finetune_epochs=1, n_epochs=2, image_size=SIZE,
                      random_state=0),
}

# a value other than the default for every old name, and what the new name then holds
OLD_VALUES = {
    PatchCore: {"n_projections": (16, 16), "n_reweight": (3, 3)},
    MetaComparer: {"hidden_sizes": ((16,), (16,)), "fpn_cells": (1, 1), "fpn_levels": (4, 4),
                   "episode_queries": (4, 4), "episode_references": (2, 2),
                   "backbone_lr_ratio": (0.5, 0.5), "rank_lambda": (2.0, 2.0)},
    GeneralAD: {"lr": (1e-3, 1e-3), "lr_final_ratio": (0.5, 0.5)},
    MMR: {"lr": (2e-3, 2e-3), "lr_milestones": ((0.5,), (0.5,))},
    GlobalLocal: {"teacher_layer": (-2, (-2,)), "lambda_k": (0.5, 0.5),
                  "lambda_c": (0.25, 0.25), "lambda_t": (2.0, 2.0), "lambda_s": (0.5, 0.5),
                  "lr": (2e-3, 2e-3), "idw_neighbors": (2, 2)},
}

RENAMES = [pytest.param(cls, old, id=f"{cls.__name__}-{old}")
           for cls in OLD_VALUES for old in OLD_VALUES[cls]]


def _new_name(cls, old):
    spec = cls._deprecated_parameters[old]
    return spec if isinstance(spec, str) else spec[0]


def _settings(cls, names="old"):
    """Every renamed parameter of ``cls`` set, under its old or its new name."""
    values = OLD_VALUES[cls]
    if names == "old":
        return {old: value for old, (value, _) in values.items()}
    return {_new_name(cls, old): new for old, (_, new) in values.items()}


@pytest.fixture(scope="module")
def data():
    return make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=SIZE, random_state=0)


@contextlib.contextmanager
def _no_rename_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if "was renamed" in str(w.message)]


def _fit(det, data):
    if det._one_class:
        return det.fit(data.images[data.y == 0])
    det.fit(data.images, data.y, groups=data.groups)
    return det.set_reference(data.images[data.y == 0][:4])


@pytest.mark.parametrize("cls", list(TINY))
def test_every_rename_is_tested(cls):
    assert set(OLD_VALUES[cls]) == set(cls._deprecated_parameters)
    for old in cls._deprecated_parameters:
        # the old name is a keyword that defaults to "not set", with its own constraints
        assert cls().get_params()[old] == DEPRECATED
        assert old in cls._parameter_constraints
        assert _new_name(cls, old) in cls().get_params()


@pytest.mark.parametrize("cls, old", RENAMES)
def test_old_name_warns_and_gives_the_new_names_value(cls, old):
    value, expected = OLD_VALUES[cls][old]
    new = _new_name(cls, old)
    det = cls(**TINY[cls], **{old: value})
    assert det.get_params()[old] == value  # stored as given, as scikit-learn wants
    with pytest.warns(FutureWarning, match=rf"'{old}' was renamed '{new}'.*removed in"):
        det._check_params()
    assert det._param(new) == expected
    assert cls(**TINY[cls], **{new: expected})._param(new) == expected
    # clone and get_params round-trip the old name; repr shows it
    twin = clone(det)
    assert twin.get_params() == det.get_params()
    assert twin._param(new) == expected
    assert f"{old}=" in repr(det)


@pytest.mark.parametrize("cls, old", RENAMES)
def test_old_and_new_name_both_set_is_an_error(cls, old):
    value, expected = OLD_VALUES[cls][old]
    new = _new_name(cls, old)
    det = cls(**TINY[cls], **{old: value, new: expected})
    with pytest.raises(ValueError, match=rf"both {old}=.* and {new}=.*set {new} only"):
        det._check_params()


@pytest.mark.parametrize("cls, old, bad", [(PatchCore, "n_reweight", True),
                                           (GeneralAD, "lr", 0.0),
                                           (GlobalLocal, "teacher_layer", (-1,)),
                                           (MetaComparer, "episode_queries", 1)])
def test_a_bad_old_value_names_the_old_parameter(cls, old, bad):
    with pytest.raises(ValueError, match=rf"'{old}' parameter of {cls.__name__} must be"):
        cls(**{old: bad})._check_params()


@pytest.mark.parametrize("cls", list(TINY))
def test_old_names_fit_as_the_new_names(cls, data):
    """All renamed parameters at once: the same fit, the same scores."""
    with pytest.warns(FutureWarning):
        old = _fit(cls(**TINY[cls], **_settings(cls, "old")), data)
    with _no_rename_warning():
        new = _fit(cls(**TINY[cls], **_settings(cls, "new")), data)
    if hasattr(new, "loss_history_"):
        assert old.loss_history_ == new.loss_history_
    with pytest.warns(FutureWarning):
        old_scores = old.decision_function(data.images[:6])
    np.testing.assert_array_equal(old_scores, new.decision_function(data.images[:6]))


def _as_old_pickle(det):
    """``det``'s pickle as an earlier version wrote it: renamed attributes under the old names."""
    clone_ = pickle.loads(pickle.dumps(det))
    state = clone_.__dict__
    for old in type(det)._deprecated_parameters:
        new = _new_name(type(det), old)
        value = state.pop(new)
        state[old] = value[0] if old == "teacher_layer" else value  # it was an int
    return clone_


@pytest.mark.parametrize("cls", [PatchCore, GlobalLocal])
def test_pickle_with_old_attribute_names_loads_and_scores(cls, data, tmp_path):
    det = _fit(cls(**TINY[cls], **_settings(cls, "new")), data)
    expected = det.decision_function(data.images[:6])
    path = tmp_path / "old.joblib"
    joblib.dump(_as_old_pickle(det), path)
    with _no_rename_warning():  # nothing the user set: no warning
        loaded = joblib.load(path)
        np.testing.assert_array_equal(loaded.decision_function(data.images[:6]), expected)
    assert loaded.get_params() == det.get_params()
    assert all(loaded.get_params()[old] == DEPRECATED for old in cls._deprecated_parameters)


def test_command_line_param_takes_the_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="'n_reweight' was renamed 'n_reweight_neighbors'"):
        det = make_detector("patchcore", ["n_reweight=3"])
    assert det._param("n_reweight_neighbors") == 3
    with pytest.warns(FutureWarning) as record:
        det = make_detector("globallocal", ["teacher_layer=-2", "lambda_s=0.5"])
    messages = " ".join(str(w.message) for w in record)
    assert "use teacher_layers=(-2,)" in messages and "use iad_score_weight=0.5" in messages
    assert det._param("teacher_layers") == (-2,) and det._param("iad_score_weight") == 0.5
    with pytest.raises(CLIError) as err:  # the old names are not offered
        make_detector("patchcore", ["colour=1"])
    assert "n_reweight_neighbors" in str(err.value) and "n_reweight," not in str(err.value)


def test_reference_scorer_split_is_split_references():
    y = np.r_[np.zeros(8, int), np.ones(3, int)]
    scorer = ReferenceScorer(n_references=3)
    with pytest.warns(FutureWarning, match="split_references"):
        refs, scored = scorer.split(y)
    expected = scorer.split_references(y)
    np.testing.assert_array_equal(refs, expected[0])
    np.testing.assert_array_equal(scored, expected[1])
