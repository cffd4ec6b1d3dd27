"""Does the conformal threshold keep its promise on real images? Requested against measured
false-reject rates, with the escape rates that come with them.

    python examples/benchmarks/false_reject_rates.py --method patchcore [--data ../shared/data]
    python examples/benchmarks/false_reject_rates.py --method mmr --param n_epochs=15 \
        --param student=vit_tiny_patch16_224 --param student_depth=4

A quarter of each category's train/good (drawn with seed 0) is held out: good images
exchangeable with the references by construction, on which the guarantee must hold. The
test set's good images come from the dataset's own split and may differ from train/good
(other rolls of fabric, other lighting): the guarantee then says nothing, and the table
shows how far it is off.

For each category, each number of references ``k`` (10, 50 and all) and each seed, the
detector (``skad fit --offline`` settings, ``--param`` overrides) gets ``k`` good images
as its reference and scores the held-out and the test images once; then, for each
requested ``false_reject_rate`` (0.01, 0.05, 0.1), ``recalibrate()`` sets the threshold,
and the good images above it (false rejects) and the defective ones at or below it
(escapes) are counted. PatchCore is fitted on the ``k`` images (its fit is its
reference), drawn from the rest of train/good. A trained detector needs references it was
not trained on: it is fitted once per category on half of the rest, and its ``k``
references are drawn from the other half ("all" is that half). The guarantee is on average
over reference draws: ``k < all`` is drawn with ``--seeds`` (default 0 1 2) and the table
gives the mean over the draws (and the largest test rate). A rate the ``k`` references
cannot support (``k < 1 / rate - 1``) is marked ``*``: skad warned, and the threshold is
the largest reference score. Skips cleanly when the data folder is absent.
"""

import sys
import time
import warnings

import numpy as np
from common import data_categories, data_parser

from skad.cli import make_detector
from skad.datasets import load_mvtec
from skad.thresholds import CalibrationWarning, min_references

RATES = (0.01, 0.05, 0.1)
FIT_IS_REFERENCE = {"patchcore"}


def rates_at(det, scores, y, rate):
    """False-reject and escape rates of ``scores`` (labels ``y``) at the threshold for
    ``rate``; an escape rate of nan where there is no defective image."""
    det.set_params(false_reject_rate=rate)
    det.recalibrate()
    rejected = scores > det.threshold_
    escape = float((~rejected[y == 1]).mean()) if (y == 1).any() else float("nan")
    return float(rejected[y == 0].mean()), escape


def run_category(args, category):
    """Rows ``(label, k, rate, held-out frr per draw, test frr per draw, test escape per
    draw, n held out, n good test)`` of one category."""
    test = load_mvtec(args.data, category, "test")
    train = np.array(load_mvtec(args.data, category, "train").paths)
    y = np.asarray(test.y)
    order = np.random.default_rng(0).permutation(len(train))
    n_held = len(train) // 4
    held, rest = train[order[:n_held]], train[order[n_held:]]
    if args.method in FIT_IS_REFERENCE:
        pool, trained = rest, None
    else:  # fit on one half of the rest, references from the other
        fit_on, pool = rest[: len(rest) // 2], rest[len(rest) // 2:]
        trained = make_detector(args.method, args.param, offline=True, seed=0)
        t0 = time.perf_counter()
        trained.fit(list(fit_on))
        print(f"{category}: trained on {len(fit_on)} images in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    images = [*held, *test.paths]
    rows = []
    for k in (*[k for k in args.ks if k < len(pool)], len(pool)):
        seeds = args.seeds if k < len(pool) else (0,)
        per_rate = {rate: ([], [], []) for rate in RATES}
        for seed in seeds:
            refs = list(np.random.default_rng(seed).choice(pool, size=k, replace=False))
            if trained is None:
                det = make_detector(args.method, args.param, offline=True, seed=seed)
                det.fit(refs)
            else:
                det = trained.set_reference(refs)
            scores = det.decision_function(images)
            for rate in RATES:
                held_frr, _ = rates_at(det, scores[:n_held], np.zeros(n_held), rate)
                frr, escape = rates_at(det, scores[n_held:], y, rate)
                for values, value in zip(per_rate[rate], (held_frr, frr, escape)):
                    values.append(value)
        label = f"{k} (all)" if k == len(pool) else str(k)
        rows += [(label, k, rate, *per_rate[rate], n_held, int((y == 0).sum()))
                 for rate in RATES]
        print(f"{category} k={label} done", file=sys.stderr, flush=True)
    return rows


def within(frrs, rate, n):
    """Is the mean measured rate at most ``rate`` plus two binomial standard errors?"""
    return float(np.mean(frrs)) <= rate + 2 * np.sqrt(rate * (1 - rate) / n)


def main():
    ap = data_parser(__doc__, out_help=None, params=True)
    ap.add_argument("--method", default="patchcore")
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    _, categories = data_categories(args, missing_ok=True)
    warnings.filterwarnings("ignore", message=".*one-class detector")
    # rates the references cannot support are marked "*" in the table instead
    warnings.filterwarnings("ignore", category=CalibrationWarning)
    print(f"method {args.method}, params {args.param}, seeds {args.seeds}")
    print("| category | k | requested | held-out good: false rejects | test good: false "
          "rejects, mean (max) | test defective: escapes | within rate + 2 SE: held-out / "
          "test |")
    print("|---|---|---|---|---|---|---|")
    verdicts = {"held-out": [], "test": []}
    for category in categories:
        for label, k, rate, held, frrs, escapes, n_held, n_good in run_category(args, category):
            supported = k >= min_references(rate)
            ok = within(held, rate, n_held), within(frrs, rate, n_good)
            if supported:
                verdicts["held-out"].append(ok[0])
                verdicts["test"].append(ok[1])
            verdict = " / ".join("yes" if v else "no" for v in ok)
            print(f"| {category} | {label} | {rate:g}{'' if supported else '*'} | "
                  f"{np.mean(held):.3f} (n={n_held}) | {np.mean(frrs):.3f} ({max(frrs):.3f}, "
                  f"n={n_good}) | {np.mean(escapes):.3f} | "
                  f"{verdict if supported else f'({verdict}: unsupported)'} |", flush=True)
    for name, values in verdicts.items():
        print(f"\n{name} good images: {sum(values)} of {len(values)} supported cells within "
              "the requested rate + 2 binomial SE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
