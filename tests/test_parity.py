"""PatchCore against the reference implementation (anomalib's PatchcoreModel).

Skipped where anomalib is not installed (``pip install -e ".[dev]"`` installs it). The
helpers that drive anomalib live in ``examples/benchmarks/patchcore_parity.py``, which
records the comparison on real images in docs/benchmarks.md.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from skad import PatchCore
from skad.datasets import make_textures

pytest.importorskip("anomalib")

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "patchcore_parity.py"
_spec = importlib.util.spec_from_file_location("patchcore_parity", _SCRIPT)
parity = importlib.util.module_from_spec(_spec)
# the script imports its sibling `common`, as when it is run from its folder
sys.path.insert(0, str(_SCRIPT.parent))
try:
    _spec.loader.exec_module(parity)
finally:
    sys.path.remove(str(_SCRIPT.parent))

SIZE = 64


@pytest.fixture(scope="module")
def textures():
    data = make_textures(n_domains=1, n_normal=24, n_anomalous=12, image_size=SIZE,
                         random_state=3)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    normal = np.flatnonzero(data.y == 0)
    test = np.r_[normal[12:], np.flatnonzero(data.y == 1)]
    return images[normal[:12]], images[test], data.y[test]


def _both(textures, coreset_ratio, n_neighbors=9, backbone="test_resnet"):
    train, test, _ = textures
    model, ours = parity.anomalib_model(backbone, None, (2, 3), n_neighbors)
    theirs = parity.anomalib_scores(model, lambda x: (x - ours.mean) / ours.std, train, test,
                                    coreset_ratio)
    det = PatchCore(backbone=backbone, weights=None, image_size=SIZE,
                    coreset_ratio=coreset_ratio, n_reweight_neighbors=n_neighbors,
                    random_state=0)
    arrays = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return det.fit(arrays(train)).decision_function(arrays(test)), theirs


@pytest.mark.parametrize("n_neighbors", [9, 1])
def test_full_memory_bank_scores_equal_anomalib(textures, n_neighbors):
    """Same features (zero-padded 3x3 aggregation, bilinear level join), same nearest
    neighbours, same Eq. 7 re-weighting: the scores agree to float precision."""
    ours, theirs = _both(textures, 1.0, n_neighbors)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_coreset_scores_rank_as_anomalib(textures):
    """Both coresets are greedy k-centre selections on (different) random projections:
    the image scores rank alike and give about the same image AUROC."""
    ours, theirs = _both(textures, 0.1)
    y = textures[2]
    from sklearn.metrics import roc_auc_score

    assert spearmanr(ours, theirs).statistic > 0.9
    assert abs(roc_auc_score(y, ours) - roc_auc_score(y, theirs)) <= 0.05


def test_anomalib_coreset_is_seeded_whatever_ran_before(textures):
    """anomalib's projection draws columns from NumPy's global generator: the comparison
    seeds it (and leaves the caller's state as it was), so the coreset is the same whatever
    the tests before it drew."""
    train, test, _ = textures
    scores = []
    for draws in (1, 7):
        np.random.rand(draws)  # the global state that must not matter
        state = np.random.get_state()
        model, ours = parity.anomalib_model("test_resnet", None, (2, 3), 9)
        mean, std = ours.mean, ours.std
        scores.append(parity.anomalib_scores(model, lambda x, m=mean, s=std: (x - m) / s,
                                             train, test, 0.1))
        after = np.random.get_state()
        assert all(np.array_equal(a, b) for a, b in zip(state, after))
    np.testing.assert_array_equal(scores[0], scores[1])
