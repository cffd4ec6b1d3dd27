"""Scoring split over Python threads (skad._threads) against PyTorch's own threads.

    python examples/benchmarks/split_threads.py [--data ROOT] [--category mt]
        [--n-images 16] [--repeats 5] [--threads 2]

On ``--threads`` PyTorch threads (default: PyTorch's count here), the same batch of
``--n-images`` images at 256 px, computed in turn in two ways, ``--repeats`` rounds, the
fastest round of each:

* **whole**: the batch at once on PyTorch's threads (skad before :mod:`skad._threads`);
* **split**: :func:`skad._threads.split_batch`, the batch's images split over as many
  Python threads, each running PyTorch on one thread (skad's scoring now).

Three computations: ``tf_efficientnet_lite0``'s forward pass (levels 2 and 3; its packaged
weights where installed, else random), the reference of "Scoring speed of the five
detectors"; PatchCore's ``decision_function`` work on a batch (``_score_batch``, lite0,
bank of 10 images); GlobalLocal's (``_score_batch`` at its default stride 24, default
network sizes with random weights: the arithmetic does not depend on training). The
images: ``<category>/test`` under ``--data``, or random ones where the folder is absent.
Prints the outputs' largest difference between the two ways (other kernels on one thread
than on several round differently) and fails where it exceeds 1e-4 of their largest value.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import skad._global_local as gl
from skad import PatchCore
from skad._backbone import create_backbone
from skad._images import check_images, iter_batches
from skad._threads import split_batch
from skad.datasets import load_mvtec

REPO = Path(__file__).resolve().parents[2]


def _images(args):
    folder = Path(args.data) / args.category
    if not folder.is_dir():
        print(f"{folder} not found: random images")
        return torch.rand(args.n_images + 10, 3, 256, 256,
                          generator=torch.Generator().manual_seed(0))
    paths = load_mvtec(args.data, args.category, "test").paths
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]
    paths = paths[:args.n_images + 10]
    return torch.cat([batch for _, batch in iter_batches(check_images(paths), 16, 256)])


def _lite0_weights():
    """lite0's packaged weights where installed (``[offline]``), else None: random ones."""
    try:
        create_backbone("tf_efficientnet_lite0", layers=(2, 3))
    except Exception:  # noqa: BLE001 - whatever stops the weights, the arithmetic is the same
        print("lite0's packaged weights not found: random weights")
        return None
    return "pretrained"


def _lite0(weights):
    return create_backbone("tf_efficientnet_lite0", layers=(2, 3), weights=weights).eval()


def _patchcore(weights, bank_images):
    det = PatchCore(backbone="tf_efficientnet_lite0", weights=weights, image_size=256,
                    random_state=0)
    det.fit((bank_images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    return lambda batch: det._score_batch(batch, False)[0]


def _global_local():
    det = gl.GlobalLocal(device="cpu")
    det.local_net_ = gl.LocalNet(128, 512, 32).eval()
    det.global_net_ = gl.GlobalNet(128, 32).eval()
    det.dad_head_ = gl.DADHead(128).eval()
    det.geometry_ = (det.patch_size, det.context)
    det.window_size_ = det.patch_size + 2 * det._margin()
    return lambda batch: det._score_batch(batch, False)[0]


def _flat(out):
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = _images(args)
    batch, bank = images[:args.n_images], images[args.n_images:]
    weights = _lite0_weights()
    cases = [("lite0 forward pass", _lite0(weights)),
             ("PatchCore scores", _patchcore(weights, bank)),
             ("GlobalLocal scores (stride 24)", _global_local())]
    print(f"{torch.get_num_threads()} PyTorch threads, {len(batch)} images at 256 px, "
          f"the fastest of {args.repeats} alternating rounds\n")
    print("| computation | whole: ms/image | split: ms/image | split speed-up | max difference |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for name, fn in cases:
            ways = {"whole": fn, "split": lambda b, fn=fn: split_batch(fn, b)}
            best, out = {}, {}
            for way, call in ways.items():  # warm-up: first-call allocations
                out[way] = _flat(call(batch))
            for _ in range(args.repeats):
                for way, call in ways.items():
                    t0 = time.perf_counter()
                    call(batch)
                    best[way] = min(best.get(way, float("inf")), time.perf_counter() - t0)
            diff = (out["whole"] - out["split"]).abs().max().item()
            if diff > 1e-4 * out["whole"].abs().max().item():
                raise SystemExit(f"{name}: split and whole differ by {diff:.2e}")
            whole, split = (best[w] / len(batch) * 1000 for w in ("whole", "split"))
            print(f"| {name} | {whole:.1f} | {split:.1f} | {whole / split:.2f}x | {diff:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
