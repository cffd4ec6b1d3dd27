"""PatchCore's remaining differences from the authors' released code, measured one at a time.

    python examples/benchmarks/patchcore_variants.py --data ../shared/data --out variants.json

One-class on every category (fit on train/good, score test/), ``tf_efficientnet_lite0`` with
the offline weights at 256 px, coreset 10 %, seed 0. Each variant changes one thing towards
the authors' code (amazon-science/patchcore-inspection, run as in its README); a category's
variants run one after the other, so that their seconds (fit, images scored per second with
maps) were measured under about the same load:

``skad``
    skad's defaults: both levels' full channels joined; Eq. 7 re-weighting (b = 9), as the
    paper and anomalib; the whole image resized to 256 px.
``max-score``
    ``n_reweight_neighbors=0``: the image score is the largest patch distance, as the
    authors' code computes it (``anomaly_scorer_num_nn=1``, no re-weighting).
``reduced-1024``
    ``embedding_dim=1024``, the authors' embedding (:func:`skad._patchcore.reduced_features`):
    each level's zero-padded 3 x 3 neighbourhoods unfolded and averaged down to 1024 values
    (adaptive average pooling), the levels joined and averaged down to 1024 again.
``centre-crop``
    The authors' preprocessing: resize to 256 * 256 / 224 px, keep the central 256 px (their
    resize 256, centre crop 224, scaled to skad's working size). Image AUROC only: the crop
    leaves the border unscored, so pixel metrics are not comparable.
"""

import json
import time

import numpy as np

from skad import PatchCore
from skad._benchmark import evaluate_detector
from skad._images import check_images, load_resized
from skad.datasets import load_mvtec

from common import data_categories, data_parser, write_rows

SIZE = 256
#: PatchCore's parameters of each variant, beside the shared ones
PARAMS = {"skad": {}, "max-score": {"n_reweight_neighbors": 0},
          "reduced-1024": {"embedding_dim": 1024}, "centre-crop": {}}
METRICS = ("image_auroc", "pixel_auroc", "pro", "fit_s", "score_ips")


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
                    **PARAMS[variant])
    if variant == "centre-crop":
        det.fit(_centre_cropped(train.paths))
        return {"image_auroc": det.score(_centre_cropped(test.paths), test.y)}
    t0 = time.perf_counter()
    det.fit(train.paths)
    fit_s = time.perf_counter() - t0
    row = evaluate_detector(det, test, SIZE)
    return {"image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"],
            "pro": row["pro"], "fit_s": fit_s, "score_ips": row["score_ips"]}


def _format(key, value):
    return f"{value:.1f}" if key in ("fit_s", "score_ips") else f"{value:.3f}"


def main():
    ap = data_parser(__doc__)
    ap.add_argument("--variants", nargs="+", choices=list(PARAMS), default=list(PARAMS))
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
        keys = [k for k in METRICS if k in sel[0]]
        cells = [" / ".join(_format(k, r[k]) for k in keys) for r in sel]
        means = " / ".join(_format(k, np.mean([r[k] for r in sel])) for k in keys)
        print(f"| {variant} | " + " | ".join(cells) + f" | {means} |")
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
