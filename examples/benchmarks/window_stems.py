"""GlobalLocal's scoring: the windows sharing the Global-Net's stem, Winograd, and before.

    OMP_NUM_THREADS=1 python examples/benchmarks/window_stems.py [--data ROOT] [--category mt]
        [--n-images 16] [--strides 16 24 32] [--repeats 3]

At each stride, the patch scores of the raster (``GlobalLocal._patch_scores``: the Local-Net
on every patch, the Global-Net on every context window) of the same images, computed in
turn in several ways, ``--repeats`` rounds, the fastest round of each:

* **skad**: the windows' stems shared (:func:`skad._global_local.window_stems`: one pass of
  the stem over the padded images, the edge bands once per raster row and column
  (:func:`skad._global_local.edge_strips`), the ring round the hole and the corners
  recomputed per window), 256 windows per forward, and the convolutions from 32 to 64
  channels and wider through NNPACK's Winograd transform where
  :func:`skad._layers.conv2d` takes it (one thread);
* **edge bands per window**: the same with each window's edge bands recomputed (skad's
  scoring on 2026-12-03 until 08:00);
* **oneDNN only**: skad's way without Winograd;
* **Winograd on every thread** (on more than one thread only): skad's way with NNPACK also
  where skad leaves it out (:data:`skad._layers._WINOGRAD_THREADS`);
* **before**: the scoring until 2026-12-03: the stem on each window, 1,024 windows per
  forward, oneDNN only (with the faster crops and pooling of 2026-12-03 07:30, which all
  ways share).

The networks have GlobalLocal's default sizes (``--width``, ``embed_dim`` 128) and random
weights: the arithmetic does not depend on training. The images: ``--n-images`` of
``<category>/test`` under ``--data`` at ``--image-size``, or random ones where the folder is
absent. Fails if the scores of two ways differ by more than 1e-4 of their largest.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import skad._global_local as gl
import skad._layers as layers
from skad._images import check_images, iter_batches
from skad.datasets import load_mvtec

REPO = Path(__file__).resolve().parents[2]


def _images(args):
    folder = Path(args.data) / args.category
    if not folder.is_dir():
        print(f"{folder} not found: random images")
        return torch.rand(args.n_images, 3, args.image_size, args.image_size,
                          generator=torch.Generator().manual_seed(0)), "random"
    paths = load_mvtec(args.data, args.category, "test").paths
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:args.n_images]]
    batches = iter_batches(check_images(paths), len(paths), args.image_size)
    return torch.cat([batch for _, batch in batches]), f"{args.category}/test"


def _detector(args, stride):
    """A GlobalLocal with fitted-shaped networks of random weights (scoring only)."""
    det = gl.GlobalLocal(patch_size=args.patch_size, stride=stride, context=args.context,
                         width=args.width, image_size=args.image_size, device="cpu")
    torch.manual_seed(0)
    det.local_net_ = gl.LocalNet(128, 512, args.width).eval()
    det.global_net_, det.dad_head_ = (net.eval() for net in det._create_heads(det.local_net_))
    det.geometry_ = (det.patch_size, det.context)
    det.window_size_ = det.patch_size + 2 * det._margin()
    return det


# (stems shared: "bands" with the edge bands by raster row and column, "windows" each window
# its own; Winograd: "skad" where skad takes it, "always" on any number of threads; windows
# per forward)
WAYS = {"skad": ("bands", "skad", gl._CHUNK),
        "edge bands per window": ("windows", "skad", gl._CHUNK),
        "oneDNN only": ("bands", None, gl._CHUNK),
        "Winograd on every thread": ("bands", "always", gl._CHUNK),
        "before": (None, None, 1024)}


def _time(det, images, way):
    """Seconds and patch scores of one way."""
    shared, winograd, chunk = WAYS[way]
    saved = (gl.GlobalLocal._shared_stem, gl.edge_strips, layers._nnpack,
             layers._WINOGRAD_THREADS, gl._CHUNK)
    if shared is None:
        gl.GlobalLocal._shared_stem = lambda self, *a: None
    elif shared == "windows":
        gl.edge_strips = lambda *a: None
    if winograd is None:
        layers._nnpack = lambda: False
    elif winograd == "always":
        layers._WINOGRAD_THREADS = torch.get_num_threads()
    gl._CHUNK = chunk
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = det._patch_scores(images)
            return time.perf_counter() - t0, out
    finally:
        (gl.GlobalLocal._shared_stem, gl.edge_strips, layers._nnpack,
         layers._WINOGRAD_THREADS, gl._CHUNK) = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--context", default="3", help='a number of patch sizes, or "image"')
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--strides", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.context = args.context if args.context == "image" else float(args.context)
    images, source = _images(args)
    print(f"{len(images)} images ({source}) at {args.image_size} px, patch {args.patch_size}, "
          f"context {args.context}, width {args.width}; {torch.get_num_threads()} thread(s), "
          f"fastest of {args.repeats} rounds\n")
    ways = [way for way in WAYS if torch.get_num_threads() > 1 or way != "Winograd on every thread"]
    print("| stride | windows per image | stem shared | " + " | ".join(
        f"{way}: ms/image" for way in ways) + " | skad / before | max difference |")
    print("|---" * (len(ways) + 5) + "|")
    for stride in args.strides:
        det = _detector(args, stride)
        times, outs = {way: [] for way in ways}, {}
        for _ in range(args.repeats):
            for way in ways:
                seconds, outs[way] = _time(det, images, way)
                times[way].append(seconds)
        diff = max(float((a - b).abs().max() / b.abs().max())
                   for way in ways for a, b in zip(outs[way], outs["before"]))
        if diff > 1e-4:
            raise AssertionError(f"stride {stride}: the scores changed by {diff} of their largest")
        starts = gl._starts(args.image_size, args.patch_size, stride)
        used = det._shared_stem(*det._pad(images[:1]), starts, starts) is not None
        ms = {way: min(ts) / len(images) * 1000 for way, ts in times.items()}
        print(f"| {stride} | {len(starts) ** 2} | {'yes' if used else 'no'} | "
              + " | ".join(f"{ms[way]:.0f}" for way in ways)
              + f" | {ms['before'] / ms['skad']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
