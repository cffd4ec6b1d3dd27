"""PatchCore's remaining differences from the authors' released code, measured one at a time.

    python examples/benchmarks/patchcore_variants.py --data ../shared/data --out variants.json

One-class on every category (fit on train/good, score test/), ``tf_efficientnet_lite0`` with
the offline weights at 256 px, coreset 10 %, seed 0. Each variant changes one thing towards
the authors' code (amazon-science/patchcore-inspection, run as in its README):

``skad``
    skad's defaults: both levels' full channels joined; Eq. 7 re-weighting (b = 9), as the
    paper and anomalib; the whole image resized to 256 px.
``max-score``
    ``n_reweight_neighbors=0``: the image score is the largest patch distance, as the
    authors' code computes it (``anomaly_scorer_num_nn=1``, no re-weighting).
``reduced-1024``
    The authors' embedding: each level's zero-padded 3 x 3 neighbourhoods unfolded, the
    coarser level's upsampled bilinearly to the finer grid, each patch's values averaged down
    to 1024 (adaptive average pooling), the levels stacked and averaged down to 1024 again.
``centre-crop``
    The authors' preprocessing: resize to 256 * 256 / 224 px, keep the central 256 px (their
    resize 256, centre crop 224, scaled to skad's working size). Image AUROC only: the crop
    leaves the border unscored, so pixel metrics are not comparable.
"""

import contextlib
import json

import numpy as np
import torch
import torch.nn.functional as F

import skad._patchcore as patchcore
from skad import PatchCore
from skad._benchmark import evaluate_detector
from skad._images import check_images, load_resized
from skad.datasets import load_mvtec

from common import data_categories, data_parser, write_rows

SIZE = 256


def authors_embedding(levels):
    """The released code's 1024-dimensional patch embedding of the backbone levels."""
    levels = [f.float() for f in levels]
    h, w = levels[0].shape[-2:]
    per_level = []
    for f in levels:
        b, c = f.shape[:2]
        patches = F.unfold(f, 3, padding=1).view(b, c * 9, *f.shape[-2:])
        if patches.shape[-2:] != (h, w):
            patches = F.interpolate(patches, size=(h, w), mode="bilinear",
                                    align_corners=False)
        rows = patches.permute(0, 2, 3, 1).reshape(b * h * w, 1, c * 9)
        per_level.append(F.adaptive_avg_pool1d(rows, 1024))
    joined = F.adaptive_avg_pool1d(torch.cat(per_level, dim=2), 1024)
    return joined.view(len(levels[0]), h, w, 1024).permute(0, 3, 1, 2)


@contextlib.contextmanager
def patch_features(embed):
    """PatchCore computes its patch features with ``embed(levels)`` inside the block."""
    original = patchcore.locally_aware_features
    patchcore.locally_aware_features = embed
    try:
        yield
    finally:
        patchcore.locally_aware_features = original


def _centre_cropped(paths):
    """The images resized to SIZE * 256 / 224 and cropped to their central SIZE pixels."""
    images = check_images(paths)
    big = round(SIZE * 256 / 224)
    start = (big - SIZE) // 2
    return [load_resized(images, i, big)[:, start:start + SIZE, start:start + SIZE]
            .permute(1, 2, 0).numpy() for i in range(len(images))]


def run(category, root, variant):
    train = load_mvtec(root, category, "train")
    test = load_mvtec(root, category, "test", return_masks=True, mask_size=SIZE)
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=SIZE, random_state=0,
                    n_reweight_neighbors=0 if variant == "max-score" else 9)
    if variant == "centre-crop":
        det.fit(_centre_cropped(train.paths))
        return {"image_auroc": det.score(_centre_cropped(test.paths), test.y)}
    embed = authors_embedding if variant == "reduced-1024" else patchcore.locally_aware_features
    with patch_features(embed):
        det.fit(train.paths)
        row = evaluate_detector(det, test, SIZE)
    return {k: row[k] for k in ("image_auroc", "pixel_auroc", "pro")}


def main():
    ap = data_parser(__doc__)
    ap.add_argument("--variants", nargs="+",
                    default=["skad", "max-score", "reduced-1024", "centre-crop"])
    args = ap.parse_args()
    root, categories = data_categories(args)
    rows = []
    for cat in categories:
        for variant in args.variants:
            rows.append({"category": cat, "variant": variant, **run(cat, root, variant)})
            print(json.dumps(rows[-1]), flush=True)
    print("| variant | " + " | ".join(categories) + " | mean |")
    print("|---|" + "---|" * (len(categories) + 1))
    for variant in args.variants:
        sel = [r for r in rows if r["variant"] == variant]
        cells = [" / ".join(f"{r[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro") if k in r)
                 for r in sel]
        means = " / ".join(f"{np.mean([r[k] for r in sel]):.3f}"
                           for k in ("image_auroc", "pixel_auroc", "pro") if k in sel[0])
        print(f"| {variant} | " + " | ".join(cells) + f" | {means} |")
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
