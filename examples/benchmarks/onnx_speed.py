"""ONNX Runtime on the CPU against skad's own scoring, on the same images, per detector.

    python examples/benchmarks/onnx_speed.py [--data ROOT] [--category mt] [--n-images 32]
        [--methods patchcore generalad mmr metacomparer globallocal] [--out FILE]

Each detector is built and trained as in ``scoring_speed.py`` (the ``skad --offline``
settings: ``tf_efficientnet_lite0`` with its packaged weights at 256 px; brief training on
``--n-train`` images of ``<category>/train/good``; MetaComparer with 10 references), then
exported with :func:`skad.export_onnx` (any batch size). ``--n-images`` images drawn from
``<category>/test`` (seed 0) are read and resized to 256 px once, as skad reads them; both
sides then score the same float32 arrays in batches of 16: skad's ``score_and_map`` (the
graph gives scores and maps too) and an ``onnxruntime.InferenceSession`` on the CPU with
as many threads as torch uses. After a warm-up each is timed ``--repeats`` times,
alternating, and the fastest run kept. The error columns are ``max |onnx - skad| /
max |skad|`` over the images. The machine may be shared: compare the ratios, measured in
the same run.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, write_rows
from scoring_speed import fit, make

from skad import export_onnx
from skad._images import check_images, load_resized
from skad.datasets import load_mvtec

BATCH = 16
SIZE = 256


def read(paths):
    """The images as skad scores them: float32 (N, SIZE, SIZE, 3) in [0, 1]."""
    images = check_images(paths)
    return np.stack([load_resized(images, i, SIZE).permute(1, 2, 0).numpy()
                     for i in range(len(images))])


def run_onnx(session, images):
    """Scores and maps of ``images`` (N, H, W, 3) through the graph, in batches."""
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    outs = [session.run(["scores", "maps"], {"images": nchw[s:s + BATCH]})
            for s in range(0, len(nchw), BATCH)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def measure(method, train, images, folder, n_threads, repeats):
    """One row: export time and size, images/s of skad and of onnxruntime, errors."""
    import onnxruntime as ort

    det = fit(make(method, "cpu"), method, train).set_params(batch_size=BATCH)
    export_seconds, path = timed(lambda: export_onnx(det, Path(folder) / f"{method}.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    det.score_and_map(images[:2])  # warm-up: first-call allocations, on both sides
    run_onnx(session, images[:2])
    skad_seconds, onnx_seconds = [], []
    for _ in range(repeats):
        seconds, (scores, maps) = timed(lambda: det.score_and_map(images))
        skad_seconds.append(seconds)
        seconds, (onnx_scores, onnx_maps) = timed(lambda: run_onnx(session, images))
        onnx_seconds.append(seconds)
    n = len(images)
    return {"method": method, "export_s": round(export_seconds, 1),
            "onnx_mb": round(path.stat().st_size / 1e6, 1),
            "skad_images_per_s": round(n / min(skad_seconds), 2),
            "onnx_images_per_s": round(n / min(onnx_seconds), 2),
            "onnx_speed_ratio": round(min(skad_seconds) / min(onnx_seconds), 2),
            "score_error": relative_error(onnx_scores, scores),
            "map_error": relative_error(onnx_maps, maps)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--n-images", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--methods", nargs="+",
                    default=["patchcore", "generalad", "mmr", "metacomparer", "globallocal"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category).is_dir():
        print(f"onnx_speed: {args.data}/{args.category} not found; nothing to do")
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print('onnx_speed: needs onnxruntime (pip install "skad[onnx]"); nothing to do')
        return 0
    rng = np.random.default_rng(0)
    train = load_mvtec(args.data, args.category, "train").paths
    train = [train[i] for i in rng.permutation(len(train))[:args.n_train]]
    test = load_mvtec(args.data, args.category, "test").paths
    images = read([test[i] for i in rng.permutation(len(test))[:args.n_images]])
    n_threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            rows.append(measure(method, train, images, folder, n_threads, args.repeats))
            print(rows[-1], file=sys.stderr, flush=True)
    write_rows(rows, args.out)
    print(f"{len(images)} {args.category} test images at {SIZE} px, batches of {BATCH}, "
          f"{n_threads} thread(s) on each side\n")
    print("| detector | export (s) | .onnx (MB) | skad: images/s | onnxruntime: images/s | "
          "onnxruntime / skad | score error | map error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['export_s']} | {r['onnx_mb']} | {r['skad_images_per_s']} | "
              f"{r['onnx_images_per_s']} | {r['onnx_speed_ratio']:.2f} | "
              f"{r['score_error']:.1e} | {r['map_error']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
