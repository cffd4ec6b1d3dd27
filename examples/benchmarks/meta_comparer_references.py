"""Does MetaComparer learn from its references? Leave one domain out, every ``patch_score``.

Usage (from the repository root)::

    python examples/benchmarks/meta_comparer_references.py --image-size 128 \
        --models ../cache/meta --out refs.md          # fits (or loads) one model per target
    python examples/benchmarks/meta_comparer_references.py --quick   # smoke run, CPU

For every target category, one MetaComparer is fitted on all labelled images of
the other categories (``groups`` = category), with the settings of
``meta_comparer_bench.py --epochs 10 --episodes 50 --ref-patches 256``, or
loaded from ``--models`` (``lodo_<target>_<size>px_seed<seed>.skad``, written
there after a fit). The learned part does not depend on ``patch_score``, so
this one fit serves every variant, k and draw: the target's test images are
embedded once (the meta-comparer's query parts per scale and the backbone's
locally aware features), then for each k in ``--ks`` and each draw in
``--draws`` the k references go to ``set_reference(patch_score="fused")``,
which keeps both reference parts and their leave-one-out statistics, and the
test images are scored three ways from the same patch values:

- ``learned``: the paper's Eq. 1 (max over reference patches), Eq. 5-6;
- ``nearest``: the distance to the nearest reference patch in the locally aware
  backbone features;
- ``fused``: the sum of the two, each standardised with the references'
  leave-one-out statistics (``score_mean_``, ``score_std_``); with a single
  reference its maps centre the nearest part on each image's median cell, as
  the detector's do (``map_centring_``).

PatchCore (same backbone, ``--image-size``, coreset 0.1, Eq. 7 reweighting,
sigma 4) is fed the same references; its test features are the cached locally
aware features (PatchCore's layers (2, 3) are the first two levels of the
MetaComparer's backbone). Maps are brought to 256 x 256 bilinearly for pixel
AUROC and PRO (30 % FPR), as ``evaluate_detector`` does.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import skad
from skad import MetaComparer, PatchCore
from skad._benchmark import draw_references
from skad._images import check_images
from skad._maps import upsample
from skad.datasets import load_mvtec
from skad.metrics import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_comparer_bench as bench

VARIANTS = ("learned", "nearest", "fused")
EVAL_SIZE = 256


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(bench.REPO.parent / "shared" / "data"))
    ap.add_argument("--models", help="folder of fitted models to load, and to save fits to")
    ap.add_argument("--categories", nargs="+", default=bench.CATEGORIES)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 25])
    ap.add_argument("--draws", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="training seed (random_state)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--ref-patches", type=int, default=256)
    ap.add_argument("--fuse-weights", nargs="*", type=float, default=[],
                    help="also score fused variants 'fused_w<w>': z_learned + w * z_nearest")
    ap.add_argument("--max-reference-patches", default=MetaComparer().max_reference_patches,
                    type=lambda v: None if v.lower() == "none" else int(v),
                    help="MetaComparer's max_reference_patches (default: its default; 'none': "
                         "every reference patch, as before it existed)")
    ap.add_argument("--skip-patchcore", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: target aitex_00, small aitex sources, k 1 and 5, 1 draw")
    ap.add_argument("--out", help="markdown report")
    ap.add_argument("--json", help="append every row to this file, as JSON lines")
    ap.add_argument("--from-json", nargs="+",
                    help="summarise these JSON-lines files of earlier runs; run nothing")
    return ap.parse_args(argv)


def fitted_model(args, target, present, log):
    path = (Path(args.models) / f"lodo_{target}_{args.image_size}px_seed{args.seed}.skad"
            if args.models else None)
    if path is not None and path.exists() and not args.quick:
        log(f"{target}: loading {path}")
        det = skad.load(path, device="cpu")
        return det
    margs = bench.parse_args(["--image-size", str(args.image_size), "--epochs", str(args.epochs),
                              "--episodes", str(args.episodes), "--ref-patches",
                              str(args.ref_patches)] + (["--quick"] if args.quick else []))
    if args.quick:
        margs.epochs, margs.episodes = 2, 10
    paths, y, groups = bench.source_data(margs, target, present)
    det = bench.make_meta_comparer(margs).set_params(random_state=args.seed)
    t0 = time.perf_counter()
    det.fit(paths, y, groups=groups)
    log(f"{target}: fitted on {len(paths)} images in {time.perf_counter() - t0:.0f}s")
    if path is not None and not args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        skad.save(det, path)
    return det


def to_eval(grids, image_size, sigma=0.0):
    """Patch grids ``(n, h, w)`` -> maps at ``image_size`` (nearest, Eq. 6) -> 256 x 256."""
    maps = upsample(grids, image_size, mode="nearest")
    return upsample(maps, EVAL_SIZE).numpy()


def variant_outputs(det, parts, fuse_weights=()):
    """Image scores and 256-px maps of the three variants (and of the fused sums weighted by
    ``fuse_weights``) from the cached test parts."""
    learned = det._on_grid(det._learned_grids(parts[:-1], torch.device("cpu")),
                           parts[-1].shape[1:3])
    dist = det._nearest_grid(parts[-1], torch.device("cpu"))
    fused = det._fuse(learned, dist)
    (m_l, m_n), (s_l, s_n) = det.score_mean_, det.score_std_
    weighted = [(f"fused_w{w:g}", (learned - m_l) / s_l + w * (dist - m_n) / s_n)
                for w in fuse_weights]
    out = {}
    for name, g in (("learned", learned), ("nearest", dist), ("fused", fused), *weighted):
        out[name] = (g.flatten(1).amax(dim=1).numpy(), to_eval(g, det.image_size))
    if det.map_centring_:  # a single reference: the fused maps as the detector makes them
        out["fused"] = (out["fused"][0], to_eval(det._fuse(learned, dist, centred=True),
                                                 det.image_size))
    return out


def patchcore_outputs(args, refs, feats):
    pc = PatchCore(backbone=args.backbone, weights="pretrained", image_size=args.image_size,
                   device="cpu", random_state=0).fit(refs)
    pc._embed = lambda batch: batch  # the cached locally aware features
    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(feats), 32):
            s, m = pc._score_batch(feats[i:i + 32].permute(0, 3, 1, 2), True)
            scores.append(s.float())
            maps.append(upsample(m, EVAL_SIZE))
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def run(args, present, log):
    rows = []
    for target in args.categories:
        test = load_mvtec(args.data, target, "test", return_masks=True, mask_size=EVAL_SIZE)
        train = load_mvtec(args.data, target, "train").paths
        det = fitted_model(args, target, present, log)
        det.set_params(patch_score="fused", max_reference_patches=args.max_reference_patches,
                       device="cpu", verbose=0)
        args.backbone = det.backbone
        t0 = time.perf_counter()
        with torch.inference_mode():
            parts = det._map_images_multi(check_images(test.paths), det._embed,
                                          desc="test features")
        parts = [*parts[0:-1:2], parts[-1]]  # the query parts per scale, the features
        parts = [p for q in parts[:-1] for p in (q, None)] + [parts[-1]]
        log(f"{target}: {len(test.paths)} test images embedded in {time.perf_counter() - t0:.0f}s")
        for draw in args.draws:  # every k of a draw first: a cut-short run has whole curves
            for k in args.ks:
                refs = draw_references(train, k, draw)
                t0 = time.perf_counter()
                det.set_reference(refs)
                with torch.inference_mode():
                    outs = variant_outputs(det, parts, args.fuse_weights)
                    if not args.skip_patchcore:
                        outs["PatchCore"] = patchcore_outputs(args, refs, parts[-1])
                elapsed = time.perf_counter() - t0
                for name, (scores, maps) in outs.items():
                    row = {"category": target, "k": k, "draw": draw, "seed": args.seed,
                           "variant": name, "max_reference_patches": args.max_reference_patches,
                           **evaluate(test.y, scores, masks=test.masks, maps=maps)}
                    rows.append(row)
                log(f"  k={k} draw={draw} ({elapsed:.0f}s): " + "  ".join(
                    f"{r['variant']} {r['image_auroc']:.3f}/{r['pixel_auroc']:.3f}/{r['pro']:.3f}"
                    for r in rows[-len(outs):]))
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.writelines(json.dumps(r) + "\n" for r in rows[-len(outs):])
    return rows


def summarize(rows, ks, variants):
    """Markdown: per target and k, mean over draws (and seeds) of each metric per variant."""
    cats = list(dict.fromkeys(r["category"] for r in rows))

    def mean(metric, **sel):
        v = [r[metric] for r in rows if all(r[a] == b for a, b in sel.items())]
        return float(np.mean(v)) if v else float("nan")

    lines = []
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        lines += [f"{metric.replace('_', ' ')} ({' / '.join(variants)}), mean over draws:", "",
                  "| target | " + " | ".join(f"k = {k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for c in [*cats, None]:
            cells = []
            for k in ks:
                vals = [mean(metric, variant=v, k=k, **({"category": c} if c else {}))
                        if c else np.mean([mean(metric, variant=v, k=k, category=t) for t in cats])
                        for v in variants]
                cells.append(" / ".join(f"{x:.3f}" for x in vals))
            lines.append(f"| {c or '**mean**'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def criteria(rows, ks, variants):
    """The issue's criteria per variant, on the mean image AUROC over targets (each target
    first averaged over draws), and the localization against the paper's variant."""
    cats = list(dict.fromkeys(r["category"] for r in rows))

    def m(metric, v, k, c=None):
        sel = [c] if c else cats
        return float(np.mean([np.mean([r[metric] for r in rows if r["variant"] == v
                                       and r["k"] == k and r["category"] == t]) for t in sel]))

    k0, k1, k10 = ks[0], ks[-1], 10 if 10 in ks else ks[len(ks) // 2]
    header = (f"| variant | image AUROC k = {k1} - k = {k0} | beats PatchCore at every k "
              f"(mean image AUROC margin per k) | worst target vs PatchCore at k = {k10} | "
              "pixel AUROC vs learned, per k | PRO vs learned, per k |")
    lines = [header, "|---|---|---|---|---|---|"]
    for v in variants:
        if v == "PatchCore":
            continue
        gain = m("image_auroc", v, k1) - m("image_auroc", v, k0)
        margins = [m("image_auroc", v, k) - m("image_auroc", "PatchCore", k) for k in ks]
        worst = min(cats, key=lambda c: m("image_auroc", v, k10, c)
                    - m("image_auroc", "PatchCore", k10, c))
        loss = m("image_auroc", v, k10, worst) - m("image_auroc", "PatchCore", k10, worst)
        loc = [" / ".join(f"{m(metric, v, k) - m(metric, 'learned', k):+.3f}" for k in ks)
               for metric in ("pixel_auroc", "pro")]
        lines.append(f"| {v} | {gain:+.3f} | {'yes' if min(margins) > 0 else 'no'} ("
                     + " / ".join(f"{x:+.3f}" for x in margins) + f") | {worst} {loss:+.3f} | "
                     + " | ".join(loc) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    present = [c for c in bench.CATEGORIES if (Path(args.data) / c).is_dir()]
    if len(present) < 2:
        print(f"no MVTec-layout data under {args.data}: skipping")
        return 0
    if args.quick:
        args.categories, args.ks, args.draws = ["aitex_00"], [1, 5], [0]
        present = [c for c in present if c.startswith("aitex")]
    args.categories = [c for c in args.categories if c in present]
    if args.from_json:
        rows = [json.loads(line) for f in args.from_json for line in Path(f).read_text().split("\n")
                if line.strip()]
        rows = [r for r in rows if r["category"] in args.categories and r["k"] in args.ks]
    else:
        rows = run(args, present, log=lambda m: print(m, flush=True))
    weighted = sorted({r["variant"] for r in rows if r["variant"].startswith("fused_w")},
                      key=lambda v: float(v[len("fused_w"):]))
    variants = [v for v in (*VARIANTS, *weighted, "PatchCore")
                if any(r["variant"] == v for r in rows)]
    text = (f"Settings: `{' '.join(sys.argv[1:])}`\n\n" + summarize(rows, args.ks, variants))
    if "PatchCore" in variants and "learned" in variants:
        text += "\n" + criteria(rows, args.ks, variants)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
