"""What PatchCore's ``embedding_dim`` costs: fit and scoring time, memory bank size.

    python examples/benchmarks/embedding_cost.py --backbone wide_resnet50_2.tv_in1k \
        --image-size 224 --embedding-dims none 1024

Times only: the backbone's weights are random (``weights=None``; speed does not depend on
them, and the machine needs none), the images synthetic textures (``make_textures``). Each
setting fits on ``--n-train`` images (coreset 10 %, seed 0) and scores ``--n-test`` others
with their maps (``score_and_map``), in one process, one setting after the other; the
backbone is built once beforehand, so that the first setting does not pay for it.
"""

import argparse
import json
import time

from skad import PatchCore
from skad.datasets import make_textures


def _dims(text):
    return None if text.lower() == "none" else int(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="wide_resnet50_2.tv_in1k")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--embedding-dims", type=_dims, nargs="+", default=[None, 1024])
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=20)
    args = ap.parse_args()
    data = make_textures(n_domains=1, n_normal=args.n_train + args.n_test, n_anomalous=0,
                         image_size=args.image_size, random_state=0)
    train, test = data.images[:args.n_train], data.images[args.n_train:]
    params = {"backbone": args.backbone, "weights": None, "image_size": args.image_size,
              "random_state": 0}
    PatchCore(**params).fit(train[:2])  # imports, thread pools, first allocations
    rows = []
    for dims in args.embedding_dims:
        det = PatchCore(embedding_dim=dims, **params)
        t0 = time.perf_counter()
        det.fit(train)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        det.score_and_map(test)
        score_ips = len(test) / (time.perf_counter() - t0)
        bank = det.memory_bank_
        rows.append({"backbone": args.backbone, "image_size": args.image_size,
                     "embedding_dim": dims, "features": bank.shape[1], "bank_patches": len(bank),
                     "bank_mib": bank.numel() * bank.element_size() / 2**20,
                     "fit_s": fit_s, "score_ips": score_ips})
        print(json.dumps(rows[-1]), flush=True)
    print("| backbone | px | embedding_dim | features | bank MiB | fit s | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['image_size']} | {r['embedding_dim']} | {r['features']} "
              f"| {r['bank_mib']:.1f} | {r['fit_s']:.1f} | {r['score_ips']:.2f} |")


if __name__ == "__main__":
    main()
