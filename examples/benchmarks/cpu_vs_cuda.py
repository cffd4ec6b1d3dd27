"""Fit and score one category on CUDA and on the CPU; compare scores and speed.

    python examples/benchmarks/cpu_vs_cuda.py --data ../shared/data --category aitex_00
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skad import PatchCore
from skad.datasets import load_mvtec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    ap.add_argument("--category", default="aitex_00")
    args = ap.parse_args()
    if not Path(args.data, args.category).is_dir():
        sys.exit(f"no data at {args.data}/{args.category}: nothing to compare")
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available here: nothing to compare")
    train = load_mvtec(args.data, args.category, "train")
    test = load_mvtec(args.data, args.category, "test")
    scores = {}
    for device in ("cuda", "cpu"):
        det = PatchCore(backbone="tf_efficientnet_lite0", image_size=256, device=device,
                        random_state=0)
        t0 = time.perf_counter()
        det.fit(train.paths)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores[device] = det.decision_function(test.paths)
        ips = len(test.paths) / (time.perf_counter() - t0)
        print(f"{device}: fit {fit_s:.1f}s, scoring {ips:.1f} img/s, "
              f"image AUROC {det.score(test.paths, test.y):.4f}")
    diff = np.abs(scores["cuda"] - scores["cpu"]).max() / np.ptp(scores["cpu"])
    print(f"largest |cuda - cpu| score difference: {100 * diff:.2f} % of the score range")


if __name__ == "__main__":
    main()
