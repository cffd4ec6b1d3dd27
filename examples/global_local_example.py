"""
GlobalLocal in a few lines: fit on normal textures, score new ones, save their maps
===================================================================================

The Local-Net is distilled from the offline ImageNet ``tf_efficientnet_lite0``
on the training images' patches (the paper distils on ImageNet first; see
docs/methods/global_local.md). Small images, patches and a few epochs show the
mechanics; the defaults (256 px, patch 32, 40 + 10 + 100 epochs) want a GPU.
Prints image AUROC, pixel AUROC and PRO, and saves ``global_local_maps.png``
in the current folder when matplotlib is installed.

Run it::

    python examples/global_local_example.py      # synthetic textures, a minute or two on a CPU

The documentation shows this example without running it: its three training
stages take longer than the documentation build gives an example.
"""

import numpy as np

from skad import GlobalLocal
from skad.datasets import make_textures
from skad.metrics import evaluate
from skad.viz import plot_maps


def main():
    data = make_textures(n_domains=1, n_normal=40, n_anomalous=10, image_size=64,
                         random_state=0)
    normal = np.flatnonzero(data.y == 0)
    test = np.r_[normal[30:], np.flatnonzero(data.y == 1)]
    X, y, masks = data.images[test], data.y[test], data.masks[test]

    det = GlobalLocal(teacher="tf_efficientnet_lite0", teacher_size=64, image_size=64,
                      patch_size=16, stride=8, context=3, n_distill_patches=16,
                      n_distill_epochs=20, n_finetune_epochs=5, n_epochs=40, random_state=0)
    det.fit(data.images[normal[:30]])
    for lam in (0.8, 1.0, 0.0):  # Eq. 13: the default, the IAD head alone, the DAD head alone
        if lam != det.iad_score_weight:  # read at scoring: no refit, but the position
            # statistics and thresholds follow the maps, so the reference is set again
            det.set_params(iad_score_weight=lam).set_reference(data.images[normal[:30]])
        s, m = det.score_and_map(X)
        if lam == 0.8:
            scores, maps = s, m
        metrics = evaluate(y, s, masks, m)
        print(f"iad_score_weight {lam}:", {k: round(v, 3) for k, v in metrics.items()})
    print("last loss per stage: " + ", ".join(
        f"{k} {v[-1]:.3f}" for k, v in det.loss_history_.items() if v))
    print(f"window {det.window_size_} px; threshold {det.threshold_:.3f}; flagged "
          f"{int((scores > det.threshold_).sum())} of {len(y)} ({int(y.sum())} anomalous)")
    top = np.argsort(-scores)[:6]
    try:
        plot_maps(X[top], maps[top], masks[top], path="global_local_maps.png")
        print("saved the maps of the 6 highest-scored images to global_local_maps.png")
    except ImportError as err:  # matplotlib is optional
        print(err)


if __name__ == "__main__":
    main()
