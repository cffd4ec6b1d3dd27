"""Time pro_score and pixel_roc_auc on 200 random maps of 256 x 256 with blob masks.

    python examples/benchmarks/pro_speed.py
"""

import time

import numpy as np
from scipy.ndimage import gaussian_filter

from skad.metrics import pixel_roc_auc, pro_score


def main(n=200, size=256, seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size)).astype(np.float32)
    masks = gaussian_filter(rng.random((n, size, size)), (0, 6, 6)) > 0.53
    for name, fn in (("pro_score", pro_score), ("pixel_roc_auc", pixel_roc_auc)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(masks, maps)
            times.append(time.perf_counter() - t0)
        print(f"{name}: {n} maps of {size}x{size}, best of 3: {min(times):.2f}s")


if __name__ == "__main__":
    main()
