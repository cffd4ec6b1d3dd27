"""PatchCore fit time and peak memory against the backbone's own forward pass, by training size.

    python examples/benchmarks/patchcore_fit.py [--data ROOT] [--category mt]
        [--sizes 60 120 240 480] [--old-rev REV --old-sizes 60 120]

For each size, fresh subprocesses (so that the peak resident memory is each one's own):
``backbone`` reads, resizes and runs the backbone over the images and nothing else (the
reference), ``new`` fits PatchCore from this checkout, ``old`` fits it from the git revision
``--old-rev`` (extracted into a temporary folder with ``git archive``). The images are drawn
at random (seed 0) from ``<category>/train/good``, repeated when the category has fewer.
Setting: ``tf_efficientnet_lite0`` (offline weights), 256 px, coreset 10 %, CPU. Columns:
wall seconds, the part of it in ``greedy_coreset``, peak resident memory (MiB) and
fit / backbone. The machine may be shared: compare the ratios, not the seconds.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _paths(data, category, size):
    train = sorted(str(p) for p in (Path(data) / category / "train" / "good").iterdir())
    order = np.random.default_rng(0).permutation(len(train))
    return [train[i] for i in np.resize(order, size)]


def worker(mode, data, category, size):
    """One measurement in this process; prints a JSON line."""
    import torch

    import skad._patchcore as pc
    from skad import PatchCore
    from skad._backbone import create_backbone
    from skad._images import check_images, iter_batches

    paths = _paths(data, category, size)
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=256, coreset_ratio=0.1,
                    device="cpu", random_state=0)
    coreset_s = [0.0]
    greedy = pc.greedy_coreset

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = greedy(*args, **kwargs)
        coreset_s[0] += time.perf_counter() - t0
        return out

    pc.greedy_coreset = timed
    if mode == "backbone":
        backbone = create_backbone(det.backbone, det.weights, det.layers, random_state=0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, batch in iter_batches(check_images(paths), det.batch_size, det.image_size):
                backbone(batch)
    else:
        t0 = time.perf_counter()
        det.fit(paths)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "size": size, "seconds": seconds,
                      "coreset_s": coreset_s[0], "rss_mib": rss,
                      "torch_threads": torch.get_num_threads()}))


def _run(mode, src, args, size):
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, __file__, "--worker", mode, "--data", args.data,
           "--category", args.category, "--sizes", str(size)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 120, 240, 480])
    ap.add_argument("--old-rev", help="git revision of the implementation to compare with")
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[60, 120],
                    help="sizes to fit with --old-rev (its coreset is quadratic and slow)")
    ap.add_argument("--worker", choices=["backbone", "new", "old"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category / "train" / "good").is_dir():
        print(f"patchcore_fit: {args.data}/{args.category} not found; nothing to do")
        return 0
    if args.worker:
        worker(args.worker, args.data, args.category, args.sizes[0])
        return 0
    with tempfile.TemporaryDirectory() as old_src:
        if args.old_rev:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_rev, "skad"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old_src], input=archive, check=True)
        print("| images | backbone s | fit s (coreset s) | fit / backbone | peak MiB "
              "(backbone only) | old fit s (coreset s) | old / backbone | old peak MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for size in args.sizes:
            ref = _run("backbone", REPO, args, size)
            new = _run("new", REPO, args, size)
            row = (f"| {size} | {ref['seconds']:.1f} | {new['seconds']:.1f} "
                   f"({new['coreset_s']:.1f}) | {new['seconds'] / ref['seconds']:.2f} | "
                   f"{new['rss_mib']:.0f} ({ref['rss_mib']:.0f}) |")
            if args.old_rev and size in args.old_sizes:
                old = _run("old", old_src, args, size)
                row += (f" {old['seconds']:.1f} ({old['coreset_s']:.1f}) | "
                        f"{old['seconds'] / ref['seconds']:.2f} | {old['rss_mib']:.0f} |")
            else:
                row += " - | - | - |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
