"""Benchmark GlobalLocal beside PatchCore (one-class) and the lambda_s ablation (paper Table 4).

Usage (from the repository root)::

    python examples/benchmarks/global_local_bench.py --out global_local_bench.md   # full, GPU
    python examples/benchmarks/global_local_bench.py --quick                       # smoke, CPU

Both methods use the offline ImageNet ``tf_efficientnet_lite0`` (GlobalLocal as
the teacher its Local-Net is distilled from, PatchCore as its backbone), at
256 px. Per category of the data root (MVTec layout): fit on ``train/good``,
score ``test/``; image AUROC, pixel AUROC and PRO (FPR <= 0.3) at 256 x 256,
fit seconds and scoring images per second (files read and decoded included).

The ablation fits GlobalLocal once per category and rescores the test set
with lambda_s = 1 (the IAD head alone) and 0 (the DAD head alone)
(``set_params(iad_score_weight=...)``: the paper's lambda_s; no refit). Eq. 13
is linear in the patch scores and so are the IDW interpolation and the map resizing, so the map at
any other lambda_s is ``lambda_s * map(1) + (1 - lambda_s) * map(0)``; its
image score is taken as the maximum of that map at --eval-size (the
detector takes it at --image-size, before resizing: the two agree when the
sizes do). The script checks this against the directly scored lambda_s = 0.8
and prints both.

GlobalLocal's Local-Net is distilled on the training images' patches: the
paper's ImageNet distillation cannot be done offline (see
docs/methods/global_local.md). Split a long run with --categories.

``--context 3 image`` fits one GlobalLocal per context, identical otherwise
(same seed), one after the other in the same process: the rows are named by
their context. ``--skip-ablation`` leaves out the lambda_s rescorings (two
more passes over the test set).

``--score-strides 24 32`` rescores the same fit at other raster strides (the stride may be
changed after ``fit``; ``set_reference`` on the training images again, since the position
statistics and thresholds follow the maps, as after each lambda_s of the ablation): fewer
context windows per image, in proportion faster, at a cost in accuracy the rows show. The scoring rate of lite0's own forward pass
(levels 2 and 3, as PatchCore runs it) over the same test images is printed beside them.
"""

import sys
import time
import warnings
from pathlib import Path

import numpy as np

from skad import GlobalLocal, PatchCore
from skad._global_local import patch_starts
from skad._maps import maps_at
from skad.datasets import load_mvtec
from skad.metrics import evaluate
from skad.thresholds import CalibrationWarning

from common import comparison_parser
from scoring_speed import backbone_seconds

CATEGORIES = ["mt", "aitex_00", "aitex_01", "aitex_02", "aitex_03", "aitex_04"]
LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _context(text):
    """``--context``: a number of patch sizes, or ``image`` (the paper's Eq. 6)."""
    return text if text == "image" else float(text)


def make_global_local(args, context):
    return GlobalLocal(teacher="tf_efficientnet_lite0", teacher_weights=args.weights,
                       teacher_size=args.teacher_size, patch_size=args.patch_size,
                       stride=args.stride, context=context, width=args.width,
                       n_distill_epochs=args.distill_epochs,
                       n_finetune_epochs=args.finetune_epochs, n_patches=args.n_patches,
                       n_epochs=args.epochs, dad_input=args.dad_input,
                       image_size=args.image_size,
                       batch_size=args.batch_size, device=args.device, verbose=args.verbose,
                       random_state=args.seed)


def make_patchcore(args):
    return PatchCore(backbone="tf_efficientnet_lite0", weights=args.weights, image_size=256,
                     coreset_ratio=args.coreset_ratio, device=args.device,
                     verbose=args.verbose, random_state=args.seed)


def _split(root, category, eval_size, n_train, n_test, rng):
    """Train paths and test paths/labels/masks, thinned for --quick (both classes kept)."""
    train = load_mvtec(root, category, "train").paths
    test = load_mvtec(root, category, "test", return_masks=True, mask_size=eval_size)
    paths, y, masks = list(test.paths), np.asarray(test.y), list(test.masks)
    if n_train is not None and len(train) > n_train:
        train = [train[i] for i in np.sort(rng.choice(len(train), n_train, replace=False))]
    if n_test is not None and len(paths) > n_test:
        idx = np.sort(np.r_[rng.choice(np.flatnonzero(y == 0), n_test // 2, replace=False),
                            rng.choice(np.flatnonzero(y == 1), n_test - n_test // 2,
                                       replace=False)])
        paths, y, masks = [paths[i] for i in idx], y[idx], [masks[i] for i in idx]
    return train, paths, y, np.stack(masks)


def _score(det, paths, y, masks, eval_size):
    """Metrics of ``det`` on the test set, and its maps at ``eval_size``."""
    t0 = time.perf_counter()
    scores, maps = det.score_and_map(paths)
    ips = len(paths) / (time.perf_counter() - t0)
    maps = maps_at(maps, eval_size)
    return {**evaluate(y, scores, masks, maps), "score_ips": ips}, maps


def _mixed(lam, maps_iad, maps_dad, y, masks):
    """Metrics at ``lambda_s = lam`` from the IAD-only and DAD-only maps (Eq. 13 is linear)."""
    maps = lam * maps_iad + (1.0 - lam) * maps_dad
    return evaluate(y, maps.reshape(len(maps), -1).max(axis=1), masks, maps)


def _at(det, train, **params):
    """``det`` with ``params`` set, its reference set again on ``train`` (the position
    statistics and thresholds follow the maps) where they changed it."""
    before = det.get_params()
    det.set_params(**params)
    if any(before[k] != v for k, v in params.items()):
        with warnings.catch_warnings():  # calibrated on its training images, as after fit
            warnings.simplefilter("ignore", CalibrationWarning)
            det.set_reference(train)
    return det


def _ablation(det, direct, train, paths, y, masks, eval_size):
    """Metrics for every lambda_s of LAMBDAS from two rescorings (lambda_s = 1 and 0)."""
    lam0 = det.iad_score_weight
    (iad, maps_iad), (dad, maps_dad) = (
        _score(_at(det, train, iad_score_weight=lam), paths, y, masks, eval_size)
        for lam in (1.0, 0.0))
    _at(det, train, iad_score_weight=lam0)
    by_lam = {1.0: iad, 0.0: dad}
    for lam in LAMBDAS:
        if lam not in by_lam:
            by_lam[lam] = _mixed(lam, maps_iad, maps_dad, y, masks)
    if lam0 in by_lam:  # the check: mixed maps against the directly scored lambda_s
        mixed = by_lam[lam0]
        print(f"lambda_s {lam0} mixed from the two heads' maps: image {mixed['image_auroc']:.3f} "
              f"pixel {mixed['pixel_auroc']:.3f} pro {mixed['pro']:.3f}; scored directly: "
              f"image {direct['image_auroc']:.3f} pixel {direct['pixel_auroc']:.3f} "
              f"pro {direct['pro']:.3f}", flush=True)
    by_lam[lam0] = direct
    return by_lam


def run_category(root, category, args, n_train, n_test):
    train, paths, y, masks = _split(root, category, args.eval_size, n_train, n_test,
                                    np.random.default_rng(args.seed))
    rows, ablation = [], {}
    named = len(args.context) > 1
    makers = [(f"GlobalLocal context {c}" if named else "GlobalLocal",
               lambda args, c=c: make_global_local(args, c)) for c in args.context]
    if not args.skip_patchcore:
        makers.append(("PatchCore", make_patchcore))
    for name, make in makers:
        det = make(args)
        t0 = time.perf_counter()
        det.fit(train)
        fit_s = time.perf_counter() - t0
        metrics, _ = _score(det, paths, y, masks, args.eval_size)
        row = {"category": category, "method": name, "n_train": len(train), "n_test": len(y),
               **metrics, "fit_s": fit_s}
        rows.append(row)
        print(f"{category} {name}: image {row['image_auroc']:.3f} pixel {row['pixel_auroc']:.3f} "
              f"pro {row['pro']:.3f} fit {fit_s:.1f}s {row['score_ips']:.1f} img/s", flush=True)
        if name.startswith("GlobalLocal"):
            rows += _other_strides(det, name, row, train, paths, y, masks, args)
        if name.startswith("GlobalLocal") and not args.skip_ablation:
            key = f"{category} ({name})" if named else category
            ablation[key] = _ablation(det, row, train, paths, y, masks,
                                      args.eval_size)
            print(f"{key} lambda_s PRO: " + " ".join(
                f"{lam:.1f}={ablation[key][lam]['pro']:.3f}" for lam in LAMBDAS), flush=True)
    return rows, ablation


def _other_strides(det, name, row, train, paths, y, masks, args):
    """The fit rescored at each of ``--score-strides``, recalibrated on the training images."""
    rows = []
    for stride in args.score_strides:
        t0 = time.perf_counter()
        _at(det, train, stride=stride)
        ref_s = time.perf_counter() - t0
        metrics, _ = _score(det, paths, y, masks, args.eval_size)
        n = len(patch_starts(args.image_size, args.patch_size, stride)) ** 2
        rows.append({**row, **metrics, "method": f"{name}, stride {stride} ({n} windows)",
                     "fit_s": row["fit_s"]})
        print(f"{row['category']} {name} stride {stride}: image {metrics['image_auroc']:.3f} "
              f"pixel {metrics['pixel_auroc']:.3f} pro {metrics['pro']:.3f} "
              f"{metrics['score_ips']:.2f} img/s (set_reference {ref_s:.1f}s)", flush=True)
    _at(det, train, stride=args.stride)
    if args.score_strides:
        backbone_ips = len(paths) / backbone_seconds(paths, det._device())
        print(f"{row['category']} lite0 forward pass alone (levels 2 + 3) over the same "
              f"{len(paths)} test images: {backbone_ips:.2f} img/s", flush=True)
    return rows


def main_table(rows):
    lines = ["| category | method | train | test | image AUROC | pixel AUROC | PRO | fit s | "
             "images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['method']} | {r['n_train']} | {r['n_test']} | "
                     f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['pro']:.3f} | "
                     f"{r['fit_s']:.1f} | {r['score_ips']:.1f} |")
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        means = [np.mean([r[k] for r in sel]) for k in
                 ("image_auroc", "pixel_auroc", "pro", "fit_s", "score_ips")]
        lines.append(f"| **mean** | {method} | | | {means[0]:.3f} | {means[1]:.3f} | "
                     f"{means[2]:.3f} | {means[3]:.1f} | {means[4]:.1f} |")
    return "\n".join(lines)


def ablation_table(ablations, key):
    lines = ["| category | " + " | ".join(f"{lam:.1f}" for lam in LAMBDAS) + " |",
             "|---|" + "---|" * len(LAMBDAS)]
    for cat, by_lam in ablations.items():
        lines.append(f"| {cat} | " + " | ".join(f"{by_lam[lam][key]:.3f}" for lam in LAMBDAS)
                     + " |")
    means = [np.mean([a[lam][key] for a in ablations.values()]) for lam in LAMBDAS]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = comparison_parser(
        __doc__, categories=CATEGORIES,
        quick_help="smoke run: aitex_00, 24 train / 16 test images, 128 px, patch 16, stride 8, "
                   "a few epochs, PatchCore coreset 0.01")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--stride", type=int, default=GlobalLocal().stride,
                        help="default: the detector's")
    parser.add_argument("--context", type=_context, nargs="+", default=[3.0],
                        help="Global-Net window in patch sizes, or 'image' (Eq. 6); "
                             "several: one fit each")
    parser.add_argument("--teacher-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=GlobalLocal().width,
                        help="base channel width of the Local-Net and the Global-Net "
                             "(default: the detector's)")
    parser.add_argument("--distill-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100, help="Global-Net and DAD head")
    parser.add_argument("--n-patches", type=int, default=16, help="per image per epoch")
    parser.add_argument("--dad-input", choices=["joint", "difference"], default="joint",
                        help="the DAD head's input: [Z*, Z_g] (paper) or their difference")
    parser.add_argument("--score-strides", type=int, nargs="*", default=[],
                        help="rescore the fit at these strides too (no refit)")
    parser.add_argument("--skip-patchcore", action="store_true")
    parser.add_argument("--skip-ablation", action="store_true",
                        help="no lambda_s ablation (saves two rescorings of the test set)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"global_local_bench: data folder {args.data} not found; nothing to do "
              "(pass --data ROOT)")
        return 0
    n_train = n_test = None
    if args.quick:
        args.categories, args.coreset_ratio = ["aitex_00"], 0.01
        args.image_size, args.patch_size, args.stride, args.teacher_size = 128, 16, 8, 64
        args.distill_epochs, args.finetune_epochs, args.epochs = 3, 1, 3
        n_train, n_test = 24, 16
    settings = (f"GlobalLocal: teacher tf_efficientnet_lite0 (ImageNet, offline), deepest level "
                f"pooled, patches resized to {args.teacher_size}; image {args.image_size}, patch "
                f"{args.patch_size}, stride {args.stride}, width {args.width}, context "
                f"{' / '.join(str(c) if c == 'image' else f'{c} x patch' for c in args.context)}; "
                f"Local-Net distilled on the training patches {args.distill_epochs} + "
                f"{args.finetune_epochs} epochs; Global-Net + DAD {args.epochs} epochs x "
                f"{args.n_patches} patches per image, batch {args.batch_size}; lambda_s 0.8, "
                f"seed {args.seed}. PatchCore: tf_efficientnet_lite0 layers 2-3, image 256, "
                f"coreset {args.coreset_ratio}." + (" QUICK smoke run: subsets, few epochs."
                                                   if args.quick else ""))
    rows, ablations = [], {}
    for cat in args.categories:
        r, a = run_category(args.data, cat, args, n_train, n_test)
        rows += r
        ablations.update(a)
    out = ["# GlobalLocal benchmark", "", settings, "",
           "## One-class, beside PatchCore (scoring images/s at stride "
           f"{args.stride}: {len(patch_starts(args.image_size, args.patch_size, args.stride))}"
           "^2 patches per image)", "", main_table(rows), ""]
    if ablations:
        out += ["## lambda_s ablation (paper Table 4): PRO, one fit rescored", "",
                ablation_table(ablations, "pro"), "",
                "## lambda_s ablation: pixel AUROC", "", ablation_table(ablations, "pixel_auroc"),
                "", "## lambda_s ablation: image AUROC", "",
                ablation_table(ablations, "image_auroc"), ""]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
