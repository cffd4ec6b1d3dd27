"""Border cells: are normal images' anomaly maps peaked on the outer ring of the image?

    python examples/benchmarks/border_cells.py [--methods patchcore generalad mmr ...]

The images are three synthetic surfaces (``make_textures``), each a textured band across
the whole height on a uniform grey background (left and right fifths), at 128 px: texture
meets the top and bottom borders, background the left and right ones. Each detector is
fitted on 20 normal images of a surface and maps 20 more; the row gives, per surface, the
share of those maps whose maximum lies on the outer ring (8 px, one cell of a stride-8
patch grid). A detector that treats border cells like any other puts its maxima there by
chance, about as often as the ring's share of the pixels (0.23); 1.00 means that every
normal image's score is set by its border. Backbone ``tf_efficientnet_lite0`` with the
offline weights; settings per method below (short trainings: this is a CPU benchmark).
GeneralAD, MMR and GlobalLocal standardise each map position by the references' maps
(``standardize_positions=True``, their default); ``--paper-maps`` measures them without.
``tests/test_borders.py`` runs every row, with shorter trainings, with the same functions.
"""

import argparse
import time
import warnings

import numpy as np

from skad.datasets import make_textures

SIZE = 128
RING = SIZE // 16  # 8 px: one cell of a stride-8 feature grid
RING_SHARE = 1 - ((SIZE - 2 * RING) / SIZE) ** 2  # 0.23
LITE0 = "tf_efficientnet_lite0"


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
    """Whether the map's maximum lies within ``RING`` pixels of its edge."""
    r, c = np.unravel_index(np.argmax(amap), amap.shape)
    h, w = amap.shape
    return r < RING or c < RING or r >= h - RING or c >= w - RING


def ring_fractions(make_detector, n_train=20, n_test=20, fit=None):
    """Per surface, the share of normal test images whose map maximum lies on the ring.

    ``make_detector(i)`` builds the detector for surface ``i``; ``fit(det, i, images)``
    fits it (default: ``det.fit(images)``).
    """
    out = []
    for i, images in enumerate(surfaces(n_train + n_test)):
        det = make_detector(i)
        det = fit(det, i, images[:n_train]) if fit else det.fit(images[:n_train])
        out.append(float(np.mean([on_ring(m) for m in det.predict_map(images[n_train:])])))
    return out


def _fit_meta_comparer(det, i, references):
    """Trained on labelled band images of the two other surfaces, references from surface i."""
    data = make_textures(n_domains=3, n_normal=20, n_anomalous=10, image_size=SIZE,
                         random_state=1)
    images = data.images.copy()
    images[:, :, :SIZE // 5] = 128
    images[:, :, -SIZE // 5:] = 128
    source = data.groups != np.unique(data.groups)[i]
    det.fit(images[source], data.y[source], groups=data.groups[source])
    return det.set_reference(references)


def detectors():
    """``name -> (make_detector, fit)`` with each surface's own seed."""
    from skad import MMR, GeneralAD, GlobalLocal, MetaComparer, PatchCore

    return {
        "patchcore": (lambda i: PatchCore(backbone=LITE0, image_size=SIZE, random_state=i),
                      None),
        "generalad": (lambda i: GeneralAD(backbone=LITE0, layers=(3,), image_size=SIZE,
                                          hidden_dim=256, n_epochs=40, batch_size=4,
                                          random_state=i), None),
        "mmr": (lambda i: MMR(teacher=LITE0, student="vit_small_patch16_224",
                              student_weights=None, student_depth=2, n_epochs=40, batch_size=4,
                              image_size=SIZE, random_state=i), None),
        "metacomparer": (lambda i: MetaComparer(backbone=LITE0, image_size=SIZE, n_epochs=5,
                                                random_state=i), _fit_meta_comparer),
        "globallocal": (lambda i: GlobalLocal(teacher=LITE0, patch_size=16, stride=8,
                                              n_distill_epochs=3, n_finetune_epochs=1,
                                              n_epochs=10, image_size=SIZE, random_state=i),
                        None),
    }


def _without_standardization(make):
    return lambda i: make(i).set_params(standardize_positions=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(detectors()))
    ap.add_argument("--paper-maps", action="store_true",
                    help="standardize_positions=False where a detector has it")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"| method | ring share of maxima, per surface (chance: {RING_SHARE:.2f}) | seconds |")
    print("|---|---|---|")
    for name in args.methods:
        make, fit = detectors()[name]
        if args.paper_maps and "standardize_positions" in make(0).get_params():
            make = _without_standardization(make)
        t0 = time.perf_counter()
        fractions = ring_fractions(make, fit=fit)
        print(f"| {name} | {' / '.join(f'{f:.2f}' for f in fractions)} "
              f"| {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
