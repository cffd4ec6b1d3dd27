"""
Domain generalization with MetaComparer: tune on source domains, detect on a new one
====================================================================================

One domain is held out as the "new surface". On the others, a small
``GridSearchCV`` with ``LeaveOneGroupOut`` picks MetaComparer's settings: each
fold trains on all but one source domain and is scored by ``ReferenceScorer``,
which gives the fold's held-out source domain a few normal references and
scores the rest. The best setting is refitted on every source domain, then the
new domain gets a handful of normal references (``set_reference``: no
retraining) and is scored. A figure of its anomaly maps is saved when
matplotlib is installed.

Run it::

    python examples/domain_generalization.py                      # synthetic textures, CPU
    python examples/domain_generalization.py ../shared/data aitex_00 aitex_01 aitex_02

With real data the last category named is the new domain; expect a GPU to
be needed for the full settings (see docs/methods/meta_comparer.md).

The documentation shows this example without running it: its grid search trains
MetaComparer seven times, which takes minutes on a CPU.
"""

import sys

import numpy as np
import sklearn
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut

from skad._maps import maps_at
from skad import MetaComparer
from skad.datasets import load_domains, make_textures
from skad.metrics import evaluate
from skad.model_selection import ReferenceScorer
from skad.viz import plot_maps

N_REFERENCES = 5


def synthetic():
    data = make_textures(n_domains=4, n_normal=20, n_anomalous=10, image_size=64,
                         random_state=0)
    return data.images, data.y, data.groups, data.masks, 64


def real(root, categories):
    train = load_domains(root, categories, "train")
    test = load_domains(root, categories, "test", return_masks=True, mask_size=256)
    X = list(train.paths) + list(test.paths)  # a list: skad reads paths lazily
    masks = [np.zeros((256, 256), np.uint8)] * len(train.paths) + list(test.masks)
    return (X, np.r_[train.y, test.y], np.r_[train.groups, test.groups],
            np.stack(masks), 256)


def take(X, idx):
    return X[idx] if isinstance(X, np.ndarray) else [X[i] for i in idx]


def main(argv):
    X, y, groups, masks, size = real(argv[0], argv[1:]) if argv else synthetic()
    new, src = np.flatnonzero(groups == groups[-1]), np.flatnonzero(groups != groups[-1])
    sklearn.set_config(enable_metadata_routing=True)  # groups reach fit inside the search
    det = MetaComparer(backbone="tf_efficientnet_lite0", image_size=size, n_epochs=5,
                       n_episodes=20, random_state=0)
    search = GridSearchCV(det, {"reference_reduction": ["max", "min"]}, cv=LeaveOneGroupOut(),
                          scoring=ReferenceScorer(n_references=N_REFERENCES))
    search.fit(take(X, src), y[src], groups=groups[src])

    print("| reference_reduction | " + " | ".join(
        f"held-out {g}" for g in np.unique(groups[src])) + " | mean |")
    print("|---" * (len(np.unique(groups[src])) + 2) + "|")
    res = search.cv_results_
    for i, params in enumerate(res["params"]):
        folds = [res[f"split{k}_test_score"][i] for k in range(search.n_splits_)]
        print(f"| {params['reference_reduction']} | " + " | ".join(f"{s:.3f}" for s in folds)
              + f" | {res['mean_test_score'][i]:.3f} |")

    best = search.best_estimator_  # refitted on every source domain
    refs, scored = ReferenceScorer(n_references=N_REFERENCES).split_references(y[new])
    refs, scored = new[refs], new[scored]
    best.set_reference(take(X, refs))
    scores, maps = best.score_and_map(take(X, scored))
    maps = maps_at(maps, size)  # the masks' size (real images may differ in size)
    result = evaluate(y[scored], scores, masks[scored], maps)
    print(f"new domain {str(groups[-1])!r} with {search.best_params_}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    top = np.argsort(-scores)[:6]
    try:
        plot_maps(take(X, scored[top]), maps[top], masks[scored[top]],
                  path="meta_comparer_maps.png")
        print("saved the maps of the 6 highest-scored images to meta_comparer_maps.png")
    except ImportError as err:  # matplotlib is optional
        print(err)


if __name__ == "__main__":
    main(sys.argv[1:])
