"""Benchmark MetaComparer beside PatchCore: leave one domain out on the six categories.

Usage (from the repository root)::

    python examples/benchmarks/meta_comparer_bench.py --out meta_comparer_bench.md  # full, GPU
    python examples/benchmarks/meta_comparer_bench.py --quick                       # smoke, CPU
    python examples/benchmarks/meta_comparer_bench.py --no-rank --no-att --out abl.md  # ablation

For every target category: MetaComparer is fitted once on all labelled images
(train/good + test/*) of the other five categories (``groups`` = category);
then, for each k in ``--ks`` and each seed, k references drawn from the
target's train/good go to ``set_reference`` and the target's test/ is scored.
PatchCore is fed the same k references (it has nothing to train). Reported:
image AUROC per domain and mean, pixel AUROC, PRO (30 % FPR), fit seconds,
training seconds per epoch and scoring images/s (maps included).

Ablation flags: ``--no-att`` (L_att off), ``--no-rank`` (L_rank off),
``--no-bifpn`` (lateral 1x1 convs only), ``--train-backbone``,
``--anomalies synthetic`` (source anomalies replaced by synthetic ones) or
``both`` (synthetic added to the real ones), ``--reduction min`` (nearest
reference patch instead of Eq. 1's max), ``--mismatch R`` (a fraction R of the
episodes take their references from another domain, all queries anomalous;
beyond the paper), ``--sigma`` (map smoothing).
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

import skad._meta_comparer as meta_comparer
from skad import MetaComparer, PatchCore
from skad._benchmark import draw_references, evaluate_detector, markdown_table
from skad.datasets import load_labelled_domains, load_mvtec

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["mt", "aitex_00", "aitex_01", "aitex_02", "aitex_03", "aitex_04"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the markdown tables to this file")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: target aitex_00, small aitex sources, k in (1, 10), 2 epochs")
    ap.add_argument("--categories", nargs="+", default=CATEGORIES, help="target categories")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 25])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="pretrained")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--references", type=int, default=4)
    ap.add_argument("--ref-patches", type=int, default=1024, help="0 = all")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--reduction", choices=["max", "min"], default="max")
    ap.add_argument("--mismatch", type=float, default=0.0,
                    help="MetaComparer's mismatch_ratio: episodes with other-domain references")
    ap.add_argument("--no-att", action="store_true")
    ap.add_argument("--no-rank", action="store_true")
    ap.add_argument("--no-bifpn", action="store_true")
    ap.add_argument("--train-backbone", action="store_true")
    ap.add_argument("--anomalies", choices=["real", "synthetic", "both"], default="real")
    ap.add_argument("--sigma", type=float, default=0.0)
    ap.add_argument("--skip-patchcore", action="store_true")
    ap.add_argument("--verbose", type=int, default=0)
    return ap.parse_args(argv)


def make_meta_comparer(args):
    return MetaComparer(
        backbone=args.backbone, weights=args.weights, image_size=args.image_size,
        train_backbone=args.train_backbone, n_fpn_cells=0 if args.no_bifpn else 3,
        reference_reduction=args.reduction, attention_weight=0.0 if args.no_att else 1.0,
        rank_weight=0.0 if args.no_rank else 1.0, mismatch_ratio=args.mismatch,
        n_epochs=args.epochs,
        n_episodes=args.episodes, n_episode_queries=args.queries,
        n_episode_references=args.references, n_reference_patches=args.ref_patches or None,
        learning_rate=args.learning_rate,
        synthesize_anomalies=True if args.anomalies == "both" else "auto", sigma=args.sigma,
        device=args.device, verbose=args.verbose, random_state=0)


@contextlib.contextmanager
def timed_training():
    """Seconds MetaComparer spends in its training loop (feature caching excluded), in a
    one-item list filled as the loop ends."""
    seconds, train = [0.0], meta_comparer.train

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return train(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - t0

    meta_comparer.train = timed
    try:
        yield seconds
    finally:
        meta_comparer.train = train


def make_patchcore(args):
    return PatchCore(backbone=args.backbone, weights=args.weights, image_size=args.image_size,
                     device=args.device, verbose=args.verbose, random_state=0)


def source_data(args, target, present):
    src = load_labelled_domains(args.data, [c for c in present if c != target])
    paths, y, groups = np.asarray(src.paths), src.y, src.groups
    keep = np.ones(len(y), bool)
    if args.quick:  # at most 60 images per source domain, both classes kept
        rng = np.random.default_rng(0)
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            drop = rng.permutation(idx)[60:]
            keep[drop[y[drop] == 0]] = False
            keep[drop[y[drop] == 1][20:]] = False
    if args.anomalies == "synthetic":  # as if no defect had ever been labelled
        keep &= y == 0
    return list(paths[keep]), y[keep], groups[keep]


def run(args, present, log=print):
    rows = {"MetaComparer": [], "PatchCore": []}
    extra = []
    for target in args.categories:
        test = load_mvtec(args.data, target, "test", return_masks=True, mask_size=256)
        train = load_mvtec(args.data, target, "train").paths
        paths, y, groups = source_data(args, target, present)
        det = make_meta_comparer(args)
        t0 = time.perf_counter()
        with timed_training() as training_s:
            det.fit(paths, y, groups=groups)
        fit_s = time.perf_counter() - t0
        epoch_s = training_s[0] / args.epochs
        extra.append((target, len(paths), int(y.sum()), det.n_synthetic_, fit_s, epoch_s))
        log(f"{target}: fitted on {len(paths)} images of {list(det.domains_)} in {fit_s:.1f}s "
            f"({epoch_s:.1f}s/epoch, {det.n_synthetic_} synthetic), losses "
            f"{np.round(det.loss_history_, 3).tolist()}")
        for k in args.ks:
            for seed in args.seeds:
                refs = draw_references(train, k, seed)
                t0 = time.perf_counter()
                det.set_reference(refs)
                row = {"category": target, "k": k, "seed": seed,
                       **evaluate_detector(det, test, 256), "fit_s": fit_s}
                rows["MetaComparer"].append(row)
                log(f"  MetaComparer k={k} seed={seed}: {_short(row)}")
                if not args.skip_patchcore:
                    t0 = time.perf_counter()
                    pc = make_patchcore(args).fit(refs)
                    row = {"category": target, "k": k, "seed": seed,
                           **evaluate_detector(pc, test, 256), "fit_s": time.perf_counter() - t0}
                    rows["PatchCore"].append(row)
                    log(f"  PatchCore    k={k} seed={seed}: {_short(row)}")
    return rows, extra


def _short(row):
    return " ".join(f"{k}={row[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "pro",
                                                   "score_ips"))


def report(args, rows, extra):
    lines = ["# MetaComparer vs PatchCore, leave one domain out", "",
             f"Settings: `{' '.join(sys.argv[1:])}`; backbone {args.backbone}, "
             f"{args.image_size} px, {args.epochs} epochs x {args.episodes} episodes.", ""]
    for name, sel in rows.items():
        if sel:
            lines += [f"## {name}", "", markdown_table(sel), ""]
    if rows["PatchCore"]:
        lines += ["## Mean image AUROC by k", "", "| k | MetaComparer | PatchCore |", "|---|---|---|"]
        for k in args.ks:
            mc = np.mean([r["image_auroc"] for r in rows["MetaComparer"] if r["k"] == k])
            pc = np.mean([r["image_auroc"] for r in rows["PatchCore"] if r["k"] == k])
            lines.append(f"| {k} | {mc:.3f} | {pc:.3f} |")
        lines.append("")
    lines += ["## Training", "", "| target | source images | anomalous | synthetic | fit s | "
              "s / epoch |", "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {n} | {a} | {s} | {f:.1f} | {e:.2f} |" for t, n, a, s, f, e in extra]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    present = [c for c in CATEGORIES if (Path(args.data) / c).is_dir()]
    if len(present) < 2:
        print(f"no MVTec-layout data under {args.data}: skipping the MetaComparer benchmark")
        return 0
    if args.quick:
        args.categories, args.ks, args.epochs, args.episodes = ["aitex_00"], [1, 10], 2, 10
        present = [c for c in present if c.startswith("aitex")]
    args.categories = [c for c in args.categories if c in present]
    rows, extra = run(args, present)
    text = report(args, rows, extra)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
