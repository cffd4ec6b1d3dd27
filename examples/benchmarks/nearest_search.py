"""The nearest-neighbour search of scoring: ``nearest`` against ``nearest_in_bank``.

    OMP_NUM_THREADS=1 python examples/benchmarks/nearest_search.py \
        [--dim 152] [--banks 3072 20480 61440] [--n-images 4] [--repeats 3]

PatchCore's maps (and MetaComparer's nearest part) search every patch of a batch against
the memory bank. ``nearest`` takes the distances block by block as ``torch.cdist`` does
(every distance's square root, then the minimum); ``nearest_in_bank`` takes the minimum of
the squared distances in cache-sized blocks and the square root of the minima only. Both
run here on the same random features, ``--n-images`` images of 1,024 patches (a 32 x 32
grid: lite0 levels 2 + 3 at 256 px, 152 values per patch) against banks of the given
sizes (3,072: the 10 % coreset of 30 such images; 20,480: of 200). The faster of
``--repeats`` runs is kept, for each, in the same process; the table gives their ratio and
the largest difference of the distances.
"""

import argparse
import time

import torch

from skad._patchcore import nearest, nearest_in_bank


def best_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=152)
    ap.add_argument("--banks", type=int, nargs="+", default=[3072, 20480, 61440])
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(args.n_images * 1024, args.dim, generator=gen)
    print(f"torch threads: {torch.get_num_threads()}; {len(queries)} queries of {args.dim}")
    print("| bank rows | nearest s | nearest_in_bank s | speed-up | max abs diff |")
    print("|---|---|---|---|---|")
    for n_bank in args.banks:
        bank = torch.randn(n_bank, args.dim, generator=gen)
        plain = best_seconds(lambda bank=bank: nearest(queries, bank), args.repeats)
        blocked = best_seconds(lambda bank=bank: nearest_in_bank(queries, bank), args.repeats)
        diff = (nearest(queries, bank)[0] - nearest_in_bank(queries, bank)[0]).abs().max()
        print(f"| {n_bank} | {plain:.2f} | {blocked:.2f} | {plain / blocked:.2f}x | "
              f"{float(diff):.1e} |")


if __name__ == "__main__":
    main()
