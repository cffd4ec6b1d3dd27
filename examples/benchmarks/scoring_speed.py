"""Scoring speed of the five detectors on the same images, beside the backbone's forward pass.

    python examples/benchmarks/scoring_speed.py [--data ROOT] [--category mt] [--n-images 40]
        [--methods patchcore generalad mmr metacomparer globallocal] [--device cpu]
        [--globallocal-strides 24 32] [--variant mmr:student_depth=null ...] [--no-split]

The detectors ``skad fit --method METHOD --offline`` builds (:data:`skad.cli.OFFLINE`:
``tf_efficientnet_lite0`` with its packaged weights, 256 px; MMR's student and GlobalLocal's
networks from scratch; docs/usage.md lists them), trained
briefly on ``--n-train`` images of ``<category>/train/good`` (scoring speed does not depend
on training length, except PatchCore's, whose nearest-neighbour search grows with its memory
bank: ``--n-train`` images' patches at 10 %). MetaComparer trains on them as two domains
with synthetic anomalies and takes 10 of them as references. Then ``--n-images`` images drawn from ``<category>/test``
(seed 0) are scored twice: ``decision_function`` (scores) and ``score_and_map`` (scores
and maps). The reference is lite0's own forward pass (levels 2 and 3) over the same images,
read and resized the same way, run right before and after each of a detector's two
timings: each ratio is against the mean of the two passes beside it. On more than one
thread skad's scoring splits each batch's images over Python threads that run PyTorch on
one thread each (:mod:`skad._threads`); the plain pass does not, and the script prints
how much faster lite0 itself runs split.
``--globallocal-strides`` rescores the same GlobalLocal fit at other strides (after
``set_reference`` on its training images at each: the position statistics follow the raster).
``--variant METHOD:NAME=VALUE[,NAME=VALUE]`` adds a row: that detector with those
settings changed (as ``skad fit --param``), fitted and timed like the others.
``--no-split`` scores each batch whole on PyTorch's threads (skad before :mod:`skad._threads`).
Times include reading the files. The machine may be shared: compare the ratios.

Beside the time, the work: the floating-point operations of the matrix products,
convolutions and attention of ``decision_function`` per image (counted on ``--n-flop-images``
images by :class:`torch.utils.flop_counter.FlopCounterMode`; element-wise work, reading and
resizing are not counted), as a multiple of the backbone's. A detector whose time ratio is
near its FLOP ratio spends its time in its networks' arithmetic, not in overhead.
"""

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import skad._layers
from skad._backbone import create_backbone
from skad._images import check_images, iter_batches
from skad._threads import split_batch
from skad.cli import make_detector
from skad.datasets import load_mvtec
from skad.thresholds import CalibrationWarning

REPO = Path(__file__).resolve().parents[2]
LITE0 = "tf_efficientnet_lite0"


# short training: scoring speed does not depend on it (PatchCore's bank aside)
SHORT_TRAINING = {
    "patchcore": [],
    "generalad": ["n_epochs=1"],
    "mmr": ["n_epochs=1"],
    "metacomparer": ["n_epochs=1", "n_episodes=5"],
    "globallocal": ["n_distill_epochs=1", "n_finetune_epochs=1", "n_epochs=1"],
}


def make(method, device, params=()):
    """The detector ``skad fit --method METHOD --offline [--param P ...]`` builds, trained
    briefly."""
    return make_detector(method, [*SHORT_TRAINING[method], *params], offline=True,
                         device=device, seed=0)


def backbone_seconds(paths, device, split=False):
    """lite0's forward pass (levels 2 and 3) over ``paths`` in batches of 16: as PyTorch runs
    it, or with ``split`` each batch's images split over PyTorch's thread count as skad's
    scoring splits them (:func:`skad._threads.split_batch`; the same on one thread)."""
    backbone = create_backbone(LITE0, layers=(2, 3)).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, batch in iter_batches(check_images(paths), 16, 256):
            if split:
                split_batch(backbone, batch.to(device))
            else:
                backbone(batch.to(device))
    return time.perf_counter() - t0


def backbone_flops(images):
    """Floating-point operations of lite0's forward pass (levels 2 and 3) per image."""
    backbone = create_backbone(LITE0, layers=(2, 3))
    return flops(lambda x: [backbone(b) for _, b in iter_batches(check_images(x), 16, 256)],
                 images)


def flops(call, images):
    """Floating-point operations of ``call(images)`` per image, as FlopCounterMode counts
    them (matrix products, convolutions, attention), with every convolution direct:
    FlopCounterMode does not see NNPACK's, which :func:`skad._layers.conv2d` takes on one
    thread (and which multiply about half as often). On the calling thread: the counter
    does not see the threads that :mod:`skad._threads` splits batches over."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode(), mock.patch.object(skad._layers, "_nnpack",
                                                            lambda: False), \
            mock.patch("skad.base.split_batch", _whole):
        call(images)
    return counter.get_total_flops() / len(images)


def fit(det, method, train):
    if method == "metacomparer":  # two "domains", anomalies synthesized
        groups = np.arange(len(train)) % 2
        det.fit(train, np.zeros(len(train), dtype=int), groups=groups)
        det.set_reference(train[:10])
    else:
        det.fit(train)
    return det


def time_scoring(det, name, test, n_flop_images, reference):
    """``(name, scores / backbone, scores and maps / backbone, seconds of the three
    timings, FLOP per image)``. Each of the detector's two timings is bracketed by backbone
    passes (``reference()`` seconds) and set against their mean: a machine whose speed
    drifts (other jobs, clocks) moves both alike."""
    det.decision_function(test[:2])  # warm-up: first-call allocations
    times = [reference()]
    for call in (det.decision_function, det.score_and_map):
        t0 = time.perf_counter()
        call(test)
        times += [time.perf_counter() - t0, reference()]
    b0, scores, b1, maps, b2 = times
    print(f"{name}: {scores:.1f} s scores, {maps:.1f} s scores and maps; backbone "
          f"{b0:.1f}, {b1:.1f}, {b2:.1f} s", file=sys.stderr, flush=True)
    return (name, scores / ((b0 + b1) / 2), maps / ((b1 + b2) / 2), (scores, maps, b0, b1, b2),
            flops(det.decision_function, test[:n_flop_images]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--n-images", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--methods", nargs="+",
                    default=["patchcore", "generalad", "mmr", "metacomparer", "globallocal"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-flop-images", type=int, default=4)
    ap.add_argument("--globallocal-strides", type=int, nargs="*", default=[],
                    help="also rescore the GlobalLocal fit at these strides (no refit)")
    ap.add_argument("--variant", action="append", default=[],
                    help="METHOD:NAME=VALUE[,NAME=VALUE]: one more row, those settings changed")
    ap.add_argument("--no-split", action="store_true",
                    help="score each batch on PyTorch's own threads, as skad did before "
                         "skad._threads (the same on one thread)")
    args = ap.parse_args(argv)
    if args.no_split:
        with mock.patch("skad.base.split_batch", _whole):
            return _run(args)
    return _run(args)


def _whole(fn, batch):
    """``split_batch`` that does not split: ``fn(batch)`` on PyTorch's threads."""
    return fn(batch)


def _run(args):
    if not (Path(args.data) / args.category).is_dir():
        print(f"scoring_speed: {args.data}/{args.category} not found; nothing to do")
        return 0
    rng = np.random.default_rng(0)
    train = load_mvtec(args.data, args.category, "train").paths
    train = [train[i] for i in rng.permutation(len(train))[:args.n_train]]
    test = load_mvtec(args.data, args.category, "test").paths
    test = [test[i] for i in rng.permutation(len(test))[:args.n_images]]
    reference = functools.partial(backbone_seconds, test, args.device)
    reference()  # warm-up
    rows = []
    for method in args.methods:
        det = fit(make(method, args.device), method, train)
        rows.append(time_scoring(det, method, test, args.n_flop_images, reference))
        if method == "globallocal":  # the same fit, rescored at other strides
            for stride in args.globallocal_strides:
                det.set_params(stride=stride)
                with warnings.catch_warnings():  # calibrated on its training images: speed only
                    warnings.simplefilter("ignore", CalibrationWarning)
                    det.set_reference(train)
                rows.append(time_scoring(det, f"globallocal, stride {stride}", test,
                                         args.n_flop_images, reference))
    for variant in args.variant:
        method, _, params = variant.partition(":")
        det = fit(make(method, args.device, params.split(",")), method, train)
        rows.append(time_scoring(det, f"{method} ({params})", test, args.n_flop_images,
                                 reference))
    ref_flops = backbone_flops(test[:args.n_flop_images])
    n = len(test)
    # the reference is the plain pass; skad's scoring splits its batches over the threads,
    # which speeds the backbone up too: how much, in alternating passes
    plain, split = [], []
    for _ in range(3):
        plain.append(reference())
        split.append(backbone_seconds(test, args.device, split=True))
    print(f"backbone split over {torch.get_num_threads()} thread(s) as skad scores: "
          f"{n / min(split):.1f} images/s against {n / min(plain):.1f} plain, "
          f"{min(plain) / min(split):.2f} times as fast (the faster of 3 alternating passes)")
    print(f"backbone (lite0, levels 2-3) forward pass: {ref_flops / 1e9:.2f} GFLOP/image\n")
    print("| detector | scores: images/s | / backbone | scores and maps: images/s | "
          "/ backbone | backbone images/s (beside it) | GFLOP/image (scores) | / backbone |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r_scores, r_maps, (scores, maps, *backbone), work in rows:
        print(f"| {name} | {n / scores:.1f} | {r_scores:.2f} | {n / maps:.1f} | {r_maps:.2f} | "
              f"{n / max(backbone):.1f}-{n / min(backbone):.1f} | {work / 1e9:.2f} | "
              f"{work / ref_flops:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
