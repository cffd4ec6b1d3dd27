"""GeneralAD's speed on this machine: seconds per training epoch and scoring images/s.

    python examples/benchmarks/general_ad_speed.py [--data ROOT] [--category aitex_00]

Two fits (1 and 6 epochs) of the offline setting (lite0 stride-16 tokens, 256 px) on the
category's train/good; their difference gives the time of 5 epochs, the rest is the
backbone's features and the calibration. Then test/ is scored (maps included, files read).
Run it alone: other jobs on the machine slow it down.
"""

import argparse
import sys
import time
from pathlib import Path

from skad import GeneralAD
from skad.datasets import load_mvtec

REPO = Path(__file__).resolve().parents[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="aitex_00")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category).is_dir():
        print(f"general_ad_speed: {args.data}/{args.category} not found; nothing to do")
        return 0
    train = load_mvtec(args.data, args.category, "train").paths
    test = load_mvtec(args.data, args.category, "test").paths
    fit_s = {}
    for n in (1, 6):
        det = GeneralAD(backbone="tf_efficientnet_lite0", layers=(3,), image_size=256,
                        n_epochs=n, device=args.device, random_state=0)
        t0 = time.perf_counter()
        det.fit(train)
        fit_s[n] = time.perf_counter() - t0
    t0 = time.perf_counter()
    det.score_and_map(test)
    ips = len(test) / (time.perf_counter() - t0)
    epoch = (fit_s[6] - fit_s[1]) / 5
    print(f"{args.category}: {len(train)} training images, {epoch:.1f} s per epoch, "
          f"{fit_s[1] - epoch:.1f} s features and calibration; scoring {ips:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
