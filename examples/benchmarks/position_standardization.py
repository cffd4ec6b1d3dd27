"""Position standardisation on real images: the same fitted detector scored with and without.

    python examples/benchmarks/position_standardization.py --method mmr \
        --categories aitex_00 aitex_01 --param n_epochs=15 [--data ../shared/data]

For each category the detector (``skad fit --offline`` settings, ``--param`` overrides,
seed 0) is fitted once on train/good with ``standardize_positions=True``; its test images
are then scored twice, with the standardisation (each map position against the references'
maps at that position) and without it (the paper's maps and image score). Columns: image
AUROC, pixel AUROC and PRO of each, and the share of the normal test images whose map
maximum lies on the outer ring (one-sixteenth of the side; chance: its share of the pixels).
``--method patchcore`` gives PatchCore's ring share for comparison (it has no
standardisation: its row fills the paper's columns). ``--held-out N`` fits on all but the
last N training images and sets those N as the reference, so that the position statistics
come from images the detector was not fitted on. Skips cleanly when the data folder is
absent.
"""

import sys
import time
import warnings

import numpy as np
from common import data_categories, data_parser

from skad._maps import maps_at
from skad.cli import make_detector
from skad.datasets import load_mvtec
from skad.metrics import evaluate

EVAL_SIZE = 256


def ring_share(maps, y):
    """Share of the normal images' maps (at ``EVAL_SIZE``) whose maximum lies on the ring."""
    ring = EVAL_SIZE // 16
    on_ring = []
    for amap in maps[y == 0]:
        r, c = np.unravel_index(np.argmax(amap), amap.shape)
        on_ring.append(min(r, c) < ring or max(r, c) >= EVAL_SIZE - ring)
    return float(np.mean(on_ring))


def measure(det, test):
    scores, maps = det.score_and_map(test.paths)
    maps = maps_at(maps, EVAL_SIZE)
    row = evaluate(test.y, scores, masks=test.masks, maps=maps)
    row["ring"] = ring_share(maps, test.y)
    return row


def main():
    ap = data_parser(__doc__, out_help=None, params=True)
    ap.add_argument("--method", required=True,
                    choices=["generalad", "mmr", "globallocal", "patchcore"])
    ap.add_argument("--held-out", type=int, default=0, metavar="N",
                    help="fit on all but the last N training images; they are the reference")
    args = ap.parse_args()
    _, categories = data_categories(args, missing_ok=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    ring_chance = 1 - (1 - 2 / 16) ** 2
    print(f"method {args.method}, params {args.param}, held out {args.held_out}; "
          f"ring chance {ring_chance:.2f}")
    print("| category | standardised: image / pixel AUROC / PRO / ring "
          "| paper's: image / pixel AUROC / PRO / ring | fit s |")
    print("|---|---|---|---|")
    rows = []
    for cat in categories:
        test = load_mvtec(args.data, cat, "test", return_masks=True, mask_size=EVAL_SIZE)
        train = load_mvtec(args.data, cat, "train").paths
        standardizes = args.method != "patchcore"
        extra = ["standardize_positions=true"] if standardizes else []
        det = make_detector(args.method, [*args.param, *extra], offline=True, seed=0)
        fitted, held_out = (train[:-args.held_out], train[-args.held_out:]) if args.held_out \
            else (train, None)
        t0 = time.perf_counter()
        det.fit(fitted)
        if held_out is not None:
            det.set_reference(held_out)
        fit_s = time.perf_counter() - t0
        on = measure(det, test) if standardizes else None
        if standardizes:
            det.set_params(standardize_positions=False)
            if held_out is not None:  # the paper's maps with the same reference
                det.set_reference(held_out)
        off = measure(det, test)
        rows.append((on, off))
        cells = [" / ".join(f"{r[k]:.3f}" if k != "ring" else f"{r[k]:.2f}"
                            for k in ("image_auroc", "pixel_auroc", "pro", "ring"))
                 if r is not None else "n/a" for r in (on, off)]
        print(f"| {cat} | {cells[0]} | {cells[1]} | {fit_s:.0f} |", flush=True)
    if len(rows) > 1:
        means = [" / ".join(f"{np.mean([r[i][k] for r in rows]):.3f}"
                            for k in ("image_auroc", "pixel_auroc", "pro", "ring"))
                 if rows[0][i] is not None else "n/a" for i in (0, 1)]
        print(f"| **mean** | {means[0]} | {means[1]} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
