"""Model files: size, save and load time of skad's safe format against joblib.

Each detector is fitted with the command line's ``--offline`` settings
(``skad.cli.OFFLINE``: tf_efficientnet_lite0 and its offline ImageNet weights,
256 px) on synthetic textures, one short epoch (training length does not change
what is saved), then saved with :func:`skad.save` and with ``joblib.dump``, and
loaded back ``--repeat`` times each; the table gives the median times and the
ratio safe / joblib measured in the same run. Also checks that both files score
the images identically.

    python examples/benchmarks/model_files.py [--methods patchcore mmr ...] [--out FILE.md]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import joblib
import numpy as np

import skad
from skad.cli import make_detector
from skad.datasets import make_textures
from skad.thresholds import CalibrationWarning

#: one short epoch each: what is saved does not depend on how long a detector trained
SHORT = {
    "patchcore": {},
    "generalad": {"n_epochs": 1},
    "mmr": {"n_epochs": 1},
    "globallocal": {"n_distill_epochs": 1, "n_finetune_epochs": 1, "n_epochs": 1},
    "metacomparer": {"n_epochs": 1, "n_episodes": 4},
}


def _timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(method, data, folder, repeat):
    det = make_detector(method, [f"{k}={v}" for k, v in SHORT[method].items()], offline=True,
                        seed=0)
    if det._one_class:
        det.fit(data.images[data.y == 0])
    else:
        det.fit(data.images, data.y, groups=data.groups)
        det.set_reference(data.images[(data.y == 0) & (data.groups == data.groups[0])])
    safe, pickled = os.path.join(folder, f"{method}.skad"), os.path.join(folder, f"{method}.joblib")
    save_safe, _ = _timed(lambda: skad.save(det, safe), repeat)
    save_joblib, _ = _timed(lambda: joblib.dump(det, pickled), repeat)
    load_safe, a = _timed(lambda: skad.load(safe), repeat)
    load_joblib, b = _timed(lambda: joblib.load(pickled), repeat)
    same = np.array_equal(a.decision_function(data.images[:4]),
                          b.decision_function(data.images[:4]))
    return {"detector": type(det).__name__, "safe_mb": os.path.getsize(safe) / 2**20,
            "joblib_mb": os.path.getsize(pickled) / 2**20, "save_safe_s": save_safe,
            "save_joblib_s": save_joblib, "load_safe_s": load_safe,
            "load_joblib_s": load_joblib, "load_ratio": load_safe / load_joblib,
            "identical_scores": same}


def table(rows):
    head = ("| detector | safe file (MB) | joblib file (MB) | save safe / joblib (s) | "
            "load safe / joblib (s) | load ratio | identical scores |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['detector']} | {r['safe_mb']:.1f} | {r['joblib_mb']:.1f} | "
                     f"{r['save_safe_s']:.2f} / {r['save_joblib_s']:.2f} | "
                     f"{r['load_safe_s']:.2f} / {r['load_joblib_s']:.2f} | "
                     f"{r['load_ratio']:.2f} | {'yes' if r['identical_scores'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(SHORT), choices=list(SHORT))
    ap.add_argument("--n-images", type=int, default=12, help="per domain (default: 12)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", CalibrationWarning)
    os.environ["SKAD_OFFLINE"] = "1"
    data = make_textures(n_domains=2, n_normal=args.n_images, n_anomalous=4, image_size=256,
                         random_state=0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            rows.append(measure(method, data, folder, args.repeat))
            print(rows[-1], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
