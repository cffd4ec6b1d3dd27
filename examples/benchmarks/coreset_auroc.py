"""PatchCore's image AUROC with the plain greedy coreset, the new one and its chunked approximation.

    python examples/benchmarks/coreset_auroc.py [--data ROOT] [--categories mt aitex_00 ...]
        [--chunk-sizes 65536 262144] [--plain-max-patches 150000] [--max-train N]

One-class, per category: fit on train/good, score test/ (``tf_efficientnet_lite0`` offline
weights, 256 px, coreset 10 %, random_state 0). The features of both splits are computed
once; each coreset variant then builds the bank from the same reference patches and scores
the same test patches the way ``decision_function`` does:

- ``plain``: the implementation before issue 12 (below, verbatim: one full distance update
  per step), run where the category has at most ``--plain-max-patches`` reference patches;
- ``exact``: :func:`skad._patchcore.greedy_coreset`;
- ``chunk=N``: ``greedy_coreset(..., chunk_size=N)`` (``PatchCore(coreset_chunk_size=N)``).

Prints a markdown table: AUROC and selection seconds per variant, and whether ``exact``
selected the very rows ``plain`` did.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from skad import PatchCore
from skad._backbone import create_backbone
from skad._images import check_images, iter_batches
from skad._patchcore import farthest_patch, greedy_coreset, locally_aware_features, reweighted_score
from skad._progress import progress
from skad._random import seed_from
from skad.datasets import load_mvtec

REPO = Path(__file__).resolve().parents[2]


def plain_greedy_coreset(features, n_select, projection_dim=128, generator=None):
    """skad's greedy_coreset before issue 12 (commit 92b09da), verbatim but for ``verbose``."""
    n, dim = features.shape
    if n_select >= n:
        return torch.arange(n)
    if projection_dim and dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        features = features @ proj.to(features.device, features.dtype)
    start = int(torch.randint(n, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = start
    min_dist = torch.linalg.vector_norm(features - features[start], dim=1)
    for k in progress(range(1, n_select), desc="plain coreset", verbose=1):
        idx = torch.argmax(min_dist)
        selected[k] = idx
        dist = torch.linalg.vector_norm(features - features[idx], dim=1)
        torch.minimum(min_dist, dist, out=min_dist)
    return selected


def _features(det, backbone, paths):
    """Channels-last patch features ``(n, h, w, dim)``, as ``PatchCore`` computes them (CPU)."""
    with torch.inference_mode():
        return torch.cat([locally_aware_features(backbone(batch)).permute(0, 2, 3, 1)
                          for _, batch in iter_batches(check_images(paths), det.batch_size,
                                                       det.image_size)])


def _auroc(det, bank, test_feats, y):
    b = det.n_reweight_neighbors
    scores = [float(reweighted_score(q, *farthest_patch(q, bank), bank, b))
              for q in test_feats.flatten(1, 2)]
    return roc_auc_score(y, scores)


def run_category(data, category, chunk_sizes, plain_max, max_train=None):
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=256, device="cpu",
                    random_state=0)
    backbone = create_backbone(det.backbone, det.weights, det.layers, random_state=0)
    train = load_mvtec(data, category, "train").paths
    if max_train is not None and len(train) > max_train:  # a random subset (seed 0)
        train = [train[i] for i in np.sort(np.random.default_rng(0).choice(len(train), max_train,
                                                                            replace=False))]
    test = load_mvtec(data, category, "test")
    patches = _features(det, backbone, train).flatten(0, 2)
    test_feats = _features(det, backbone, test.paths)
    n_keep = int(np.ceil(0.1 * len(patches)))
    variants = {"exact": lambda g: greedy_coreset(patches, n_keep, 128, g)}
    if len(patches) <= plain_max:
        variants = {"plain": lambda g: plain_greedy_coreset(patches, n_keep, 128, g),
                    **variants}
    for size in chunk_sizes:
        if size < len(patches):
            variants[f"chunk={size}"] = (
                lambda g, size=size: greedy_coreset(patches, n_keep, 128, g, chunk_size=size))
    row = {"category": category, "images": len(train), "patches": len(patches)}
    keep = {}
    for name, select in variants.items():
        t0 = time.perf_counter()
        keep[name] = select(torch.Generator().manual_seed(seed_from(0)))
        row[f"{name} s"] = time.perf_counter() - t0
        row[name] = _auroc(det, patches[keep[name]], test_feats, test.y)
        print(f"{category} {name}: AUROC {row[name]:.4f}, {row[f'{name} s']:.1f} s",
              file=sys.stderr, flush=True)
    row["same rows"] = (torch.equal(keep["plain"], keep["exact"]) if "plain" in keep else None)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--categories", nargs="+",
                    default=["aitex_00", "aitex_01", "aitex_02", "aitex_03", "aitex_04", "mt"])
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[65536, 262144])
    ap.add_argument("--plain-max-patches", type=int, default=150000)
    ap.add_argument("--max-train", type=int, default=None,
                    help="fit on this many train/good images at most (drawn with seed 0)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"coreset_auroc: {args.data} not found; nothing to do")
        return 0
    rows = [run_category(args.data, c, args.chunk_sizes, args.plain_max_patches, args.max_train)
            for c in args.categories if (Path(args.data) / c).is_dir()]
    names = ["plain", "exact", *[f"chunk={s}" for s in args.chunk_sizes]]
    print("| category | images | patches | " + " | ".join(f"{n} AUROC (s)" for n in names)
          + " | exact selects plain's rows |")
    print("|---" * (len(names) + 4) + "|")
    for r in rows:
        cells = [f"{r[n]:.4f} ({r[f'{n} s']:.0f})" if n in r else "-" for n in names]
        same = {True: "yes", False: "no", None: "-"}[r["same rows"]]
        print(f"| {r['category']} | {r['images']} | {r['patches']} | " + " | ".join(cells)
              + f" | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
