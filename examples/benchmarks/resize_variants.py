"""GeneralAD's and MMR's image resizing against the authors' released code's, one change at a time.

    OMP_NUM_THREADS=1 python examples/benchmarks/resize_variants.py --method generalad \
        --categories aitex_00 aitex_01 --param image_size=224 --param n_epochs=40
    OMP_NUM_THREADS=1 python examples/benchmarks/resize_variants.py --method mmr \
        --categories aitex_00 aitex_01 --param n_epochs=15 \
        --param student=vit_tiny_patch16_224 --param student_depth=4

One-class (fit on train/good, score test/), ``skad fit --offline`` settings with the
``--param`` overrides, seed 0; every variant of a category has the same seed and settings.
Each image set is given to the detector as arrays already at ``image_size``: skad's reader
leaves such an image unchanged (:func:`skad._images.load_resized` resizes only when the
size differs), so the resizing measured is the one done here.

``--method generalad``:

``skad``
    Each image resized as skad's reader resizes it (bilinear with antialiasing, float32,
    :func:`skad._images.load_resized`): what fitting on the files does.
``lanczos``
    Each image resized as the released code (LucStrater/GeneralAD) resizes it: PIL's
    ``Image.resize((s, s), Image.LANCZOS)`` on the 8-bit image, kept as uint8.

``--method mmr`` (one fit per category for ``skad`` and ``centre-crop``):

``skad``
    Test images resized whole to ``image_size``.
``centre-crop``
    The released code's test preprocessing (zhangzilongc/MMR: resize 256, centre crop 224)
    scaled to ``image_size``: resized to ``image_size * 256 / 224``, the central
    ``image_size`` pixels kept; the same fitted detector. Its pixel AUROC and PRO are computed
    on the cropped masks, the central region only, as the released code computes them.
``bicubic-crop``
    A second fit whose random training crop is resampled bicubically (clamped to [0, 1]), as
    the released code's (torchvision's ``RandomResizedCrop`` on the file, bicubic) instead of
    skad's bilinear one. On files already at ``image_size`` (the AITEX tiles at 256 px) the
    image the crop is taken from is the file itself, so this is the whole difference there.

Columns: image AUROC, pixel AUROC and PRO (masks and maps at ``image_size``), fit seconds.
Skips cleanly when the data folder is absent.
"""

import sys
import time
import warnings
from unittest import mock

import numpy as np
import torch
from common import data_categories, data_parser
from PIL import Image

import skad._mmr
from skad._images import check_images, load_resized
from skad._maps import maps_at
from skad.cli import make_detector
from skad.datasets import load_mvtec
from skad.metrics import evaluate

VARIANTS = {"generalad": ["skad", "lanczos"], "mmr": ["skad", "centre-crop", "bicubic-crop"]}


def skad_resized(paths, size):
    """The images as skad's reader resizes them: float32 (size, size, 3) in [0, 1]."""
    images = check_images(paths)
    return [load_resized(images, i, size).permute(1, 2, 0).numpy() for i in range(len(images))]


def lanczos_resized(paths, size):
    """The images as the released GeneralAD resizes them: PIL Lanczos, uint8 (size, size, 3)."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS)))
    return out


def centre_cropped(paths, size):
    """Resized to ``size * 256 / 224`` (skad's reader), the central ``size`` pixels kept."""
    big = round(size * 256 / 224)
    start = (big - size) // 2
    return [im[start:start + size, start:start + size] for im in skad_resized(paths, big)]


def cropped_masks(masks, size):
    """The masks resized (nearest) to ``size * 256 / 224``, their central ``size`` pixels."""
    big = round(size * 256 / 224)
    start = (big - size) // 2
    return [np.asarray(Image.fromarray(m).resize((big, big), Image.NEAREST))
            [start:start + size, start:start + size] for m in masks]


def _bicubic_crop(original):
    """``random_resized_crop_flip`` resampling bicubically instead of bilinearly."""
    grid_sample = torch.nn.functional.grid_sample

    def bicubic(*args, **kwargs):
        return grid_sample(*args, **{**kwargs, "mode": "bicubic"}).clamp_(0, 1)

    def crop(*args, **kwargs):
        with mock.patch.object(torch.nn.functional, "grid_sample", bicubic):
            return original(*args, **kwargs)
    return crop


def measure(det, images, y, masks, size):
    scores, maps = det.score_and_map(images)
    return evaluate(y, scores, masks=masks, maps=maps_at(maps, size))


def fit(method, params, train, bicubic=False):
    det = make_detector(method, params, offline=True, seed=0)
    t0 = time.perf_counter()
    if bicubic:
        patched = _bicubic_crop(skad._mmr.random_resized_crop_flip)
        with mock.patch.object(skad._mmr, "random_resized_crop_flip", patched):
            det.fit(train)
    else:
        det.fit(train)
    return det, time.perf_counter() - t0


def run(method, params, root, category, variants):
    """``{variant: row}`` of one category."""
    size = make_detector(method, params, offline=True).image_size
    train = load_mvtec(root, category, "train").paths
    test = load_mvtec(root, category, "test", return_masks=True)
    masks = [np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST))
             for m in test.masks]
    rows = {}
    if method == "generalad":
        for variant in variants:
            resize = lanczos_resized if variant == "lanczos" else skad_resized
            det, fit_s = fit(method, params, resize(train, size))
            rows[variant] = {**measure(det, resize(test.paths, size), test.y, masks, size),
                             "fit_s": fit_s}
        return rows
    if {"skad", "centre-crop"} & set(variants):
        det, fit_s = fit(method, params, skad_resized(train, size))
        if "skad" in variants:
            rows["skad"] = {**measure(det, skad_resized(test.paths, size), test.y, masks,
                                      size), "fit_s": fit_s}
        if "centre-crop" in variants:
            rows["centre-crop"] = {**measure(det, centre_cropped(test.paths, size), test.y,
                                             cropped_masks(test.masks, size), size),
                                   "fit_s": fit_s}
    if "bicubic-crop" in variants:
        det, fit_s = fit(method, params, skad_resized(train, size), bicubic=True)
        rows["bicubic-crop"] = {**measure(det, skad_resized(test.paths, size), test.y, masks,
                                          size), "fit_s": fit_s}
    return rows


def _cells(row):
    return " / ".join(f"{row[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro"))


def main():
    ap = data_parser(__doc__, out_help=None, params=True)
    ap.add_argument("--method", required=True, choices=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", default=None,
                    help="default: every variant of the method")
    args = ap.parse_args()
    _, categories = data_categories(args, missing_ok=True)
    variants = args.variants or VARIANTS[args.method]
    if unknown := set(variants) - set(VARIANTS[args.method]):
        ap.error(f"unknown {args.method} variants: {sorted(unknown)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"method {args.method}, params {args.param}; image AUROC / pixel AUROC / PRO (fit s)")
    print("| category | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    rows = []
    for cat in categories:
        rows.append(run(args.method, args.param, args.data, cat, variants))
        print(f"| {cat} | " + " | ".join(f"{_cells(rows[-1][v])} ({rows[-1][v]['fit_s']:.0f})"
                                          for v in variants) + " |", flush=True)
    if len(rows) > 1:
        means = [{k: np.mean([r[v][k] for r in rows])
                  for k in ("image_auroc", "pixel_auroc", "pro")} for v in variants]
        print("| **mean** | " + " | ".join(_cells(m) for m in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
