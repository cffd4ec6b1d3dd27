"""False rejects of good images with one, two and three references: the threshold's promise.

    OMP_NUM_THREADS=1 python examples/benchmarks/single_reference.py --data ../shared/data \
        --categories mt aitex_00 --models ../cache/meta

With ``k`` references the threshold for any rate below ``1 / (k + 1)`` is the largest
reference score, which a new good image exchangeable with the references exceeds with
probability at most ``1 / (k + 1)``. PatchCore and MetaComparer score each reference
against the others' patches; a single reference only against its own other patches
(outside each patch's 3 x 3 neighbourhood), which is not how a new image is scored, so
that promise does not hold for it (skad warns: ``CalibrationWarning``).

For each category, a quarter of train/good (at most 120 images, drawn with seed 0, as
``false_reject_rates.py`` holds it out) is scored and counted above ``threshold_``; the
``k`` references are drawn from the other three quarters with each of ``--draws``.
PatchCore is fitted on its ``k`` references with the ``skad fit --offline`` settings;
MetaComparer is a leave-one-domain-out fit from ``--models``
(``lodo_<category>_128px_seed0.skad``, as ``meta_comparer_references.py --models`` saves
them; skipped with a message where there is none). Skips cleanly when the data folder is
absent.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from common import data_categories, data_parser, write_rows

import skad
from skad.cli import make_detector
from skad.datasets import load_mvtec
from skad.thresholds import CalibrationWarning


def held_out_and_pool(root, category, max_held=120):
    """The held-out good training images and the pool the references are drawn from."""
    train = np.array(load_mvtec(root, category, "train").paths)
    order = np.random.default_rng(0).permutation(len(train))
    n_held = len(train) // 4
    return train[order[:min(n_held, max_held)]], train[order[n_held:]]


def detector(method, category, refs, draw, models):
    """The detector with its ``refs`` set, or None where there is no MetaComparer fit."""
    if method == "patchcore":
        return make_detector("patchcore", [], offline=True, seed=draw).fit(refs)
    path = Path(models or "") / f"lodo_{category}_128px_seed0.skad"
    if not path.exists():
        print(f"{category}: no MetaComparer fit at {path}: skipped", file=sys.stderr)
        return None
    return skad.load(path, device="cpu").set_params(verbose=0).set_reference(refs)


def main():
    ap = data_parser(__doc__)
    ap.add_argument("--methods", nargs="+", default=["patchcore", "metacomparer"],
                    choices=["patchcore", "metacomparer"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--models", help="folder of MetaComparer's leave-one-domain-out fits")
    args = ap.parse_args()
    root, categories = data_categories(args, missing_ok=True)
    rows = []
    print("| category | method | k | promised at most | measured (mean over draws) | per draw |")
    print("|---|---|---|---|---|---|")
    for category in categories:
        held, pool = held_out_and_pool(root, category)
        for method in args.methods:
            for k in args.ks:
                frr = []
                for draw in args.draws:
                    refs = list(np.random.default_rng(draw).choice(pool, size=k, replace=False))
                    with warnings.catch_warnings():  # k < 19: every rate below 1/(k+1) warns
                        warnings.simplefilter("ignore", CalibrationWarning)
                        det = detector(method, category, refs, draw, args.models)
                    if det is None:
                        break
                    frr.append(float((det.decision_function(list(held)) > det.threshold_).mean()))
                if not frr:
                    break
                row = {"category": category, "method": method, "k": k, "n_held_out": len(held),
                       "promised": 1 / (k + 1), "false_rejects": frr}
                rows.append(row)
                print(f"| {category} | {method} | {k} | {1 / (k + 1):.3f} | {np.mean(frr):.3f} "
                      f"| {' '.join(f'{f:.3f}' for f in frr)} |", flush=True)
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
