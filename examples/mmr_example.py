"""
MMR in a few lines: fit on normal images, score new ones, look at a map
=======================================================================

The teacher is the offline ImageNet ``tf_efficientnet_lite0``; the student ViT
is trained from scratch (the paper's MAE ViT-B/16 needs downloaded weights:
pass ``student="vit_base_patch16_224.mae", student_weights="pretrained"`` where
they can be had). A few epochs on a CPU show the mechanics; the paper trains 200.

Run it::

    python examples/mmr_example.py                          # synthetic textures
    python examples/mmr_example.py ../shared/data/aitex_00  # an MVTec-layout category

The documentation shows this example without running it: training the student
takes about half a minute on two CPU cores, longer than the documentation build
gives an example.
"""

import sys

import numpy as np

from skad import MMR
from skad.datasets import load_mvtec, make_textures
from skad.metrics import evaluate


def main(category_dir=None):
    det = MMR(teacher="tf_efficientnet_lite0", student="vit_tiny_patch16_224",
              student_weights=None, student_depth=4, n_epochs=10, image_size=128,
              verbose=1, random_state=0)
    if category_dir is None:
        data = make_textures(n_domains=1, n_normal=40, n_anomalous=10, image_size=128,
                             random_state=0)
        normal = np.flatnonzero(data.y == 0)
        det.fit(data.images[normal[:30]])
        test = np.r_[normal[30:], np.flatnonzero(data.y == 1)]
        X, y, masks = data.images[test], data.y[test], data.masks[test]
    else:
        root, _, category = category_dir.rstrip("/").rpartition("/")
        det.fit(load_mvtec(root, category, "train").paths)
        test = load_mvtec(root, category, "test", return_masks=True)
        X, y, masks = test.paths, test.y, test.masks
    scores, maps = det.score_and_map(X)
    print(f"training loss per epoch: {np.round(det.loss_history_, 3).tolist()}")
    print(f"threshold {det.threshold_:.3f}; flagged {int((scores > det.threshold_).sum())} "
          f"of {len(scores)} test images")
    print({k: round(v, 3) for k, v in evaluate(y, scores, masks, maps).items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
