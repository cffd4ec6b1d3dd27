"""Scoring speed of the five detectors on the same images, beside the backbone's forward pass.

    python examples/benchmarks/scoring_speed.py [--data ROOT] [--category mt] [--n-images 40]
        [--methods patchcore generalad mmr metacomparer globallocal] [--device cpu]

The offline settings of ``skad --offline`` (``tf_efficientnet_lite0`` with its packaged
weights, 256 px; MMR's ViT-S student and GlobalLocal's networks from scratch), trained
briefly on ``--n-train`` images of ``<category>/train/good`` (scoring speed does not depend
on training length, except PatchCore's, whose nearest-neighbour search grows with its memory
bank: ``--n-train`` images' patches at 10 %). MetaComparer trains on them as two domains
with synthetic anomalies and takes 10 of them as references. Then ``--n-images`` images drawn from ``<category>/test``
(seed 0) are scored twice: ``decision_function`` (scores) and ``score_and_map`` (scores
and maps). The reference is lite0's own forward pass (levels 2 and 3) over the same images,
read and resized the same way, measured before and after the detectors (the faster kept).
Times include reading the files. The machine may be shared: compare the ratios.

Beside the time, the work: the floating-point operations of the matrix products,
convolutions and attention of ``decision_function`` per image (counted on ``--n-flop-images``
images by :class:`torch.utils.flop_counter.FlopCounterMode`; element-wise work, reading and
resizing are not counted), as a multiple of the backbone's. A detector whose time ratio is
near its FLOP ratio spends its time in its networks' arithmetic, not in overhead.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from skad import GeneralAD, GlobalLocal, MetaComparer, MMR, PatchCore
from skad._backbone import create_backbone
from skad._images import check_images, iter_batches
from skad.datasets import load_mvtec

REPO = Path(__file__).resolve().parents[2]
LITE0 = "tf_efficientnet_lite0"


def make(method, device):
    common = {"image_size": 256, "device": device, "random_state": 0}
    return {
        "patchcore": lambda: PatchCore(backbone=LITE0, **common),
        "generalad": lambda: GeneralAD(backbone=LITE0, layers=(3,), n_epochs=1, **common),
        "mmr": lambda: MMR(teacher=LITE0, student="vit_small_patch16_224", student_weights=None,
                           n_epochs=1, **common),
        "metacomparer": lambda: MetaComparer(backbone=LITE0, n_epochs=1, n_episodes=5,
                                             **common),
        "globallocal": lambda: GlobalLocal(teacher=LITE0, n_distill_epochs=1,
                                           n_finetune_epochs=1, n_epochs=1, **common),
    }[method]()


def backbone_seconds(paths, device):
    """lite0's forward pass (levels 2 and 3) over ``paths``, as PatchCore runs it."""
    backbone = create_backbone(LITE0, layers=(2, 3)).to(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, batch in iter_batches(check_images(paths), 16, 256):
            backbone(batch.to(device))
    return time.perf_counter() - t0


def backbone_flops(images):
    """Floating-point operations of lite0's forward pass (levels 2 and 3) per image."""
    backbone = create_backbone(LITE0, layers=(2, 3))
    return flops(lambda x: [backbone(b) for _, b in iter_batches(check_images(x), 16, 256)],
                 images)


def flops(call, images):
    """Floating-point operations of ``call(images)`` per image, as FlopCounterMode counts
    them (matrix products, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
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
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category).is_dir():
        print(f"scoring_speed: {args.data}/{args.category} not found; nothing to do")
        return 0
    rng = np.random.default_rng(0)
    train = load_mvtec(args.data, args.category, "train").paths
    train = [train[i] for i in rng.permutation(len(train))[:args.n_train]]
    test = load_mvtec(args.data, args.category, "test").paths
    test = [test[i] for i in rng.permutation(len(test))[:args.n_images]]
    ref = backbone_seconds(test, args.device)
    rows = []
    for method in args.methods:
        det = fit(make(method, args.device), method, train)
        det.decision_function(test[:2])  # warm-up: first-call allocations
        seconds = []
        for call in (det.decision_function, det.score_and_map):
            t0 = time.perf_counter()
            call(test)
            seconds.append(time.perf_counter() - t0)
        rows.append((method, *seconds, flops(det.decision_function, test[:args.n_flop_images])))
        print(f"{method}: {seconds[0]:.1f} s scores, {seconds[1]:.1f} s scores and maps",
              file=sys.stderr, flush=True)
    ref = min(ref, backbone_seconds(test, args.device))
    ref_flops = backbone_flops(test[:args.n_flop_images])
    n = len(test)
    print(f"backbone (lite0, levels 2-3) forward pass: {ref:.1f} s, {n / ref:.1f} images/s, "
          f"{ref_flops / 1e9:.2f} GFLOP/image\n")
    print("| detector | scores: images/s | / backbone | scores and maps: images/s | "
          "/ backbone | GFLOP/image (scores) | / backbone |")
    print("|---|---|---|---|---|---|---|")
    for method, s_scores, s_maps, work in rows:
        print(f"| {method} | {n / s_scores:.1f} | {s_scores / ref:.2f} | {n / s_maps:.1f} | "
              f"{s_maps / ref:.2f} | {work / 1e9:.2f} | {work / ref_flops:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
