"""MetaComparer's pairwise comparison in scoring: the shapes of its blocks.

    OMP_NUM_THREADS=1 python examples/benchmarks/pair_blocks.py [--n-images 16] [--repeats 3]

Scoring compares every query patch with every reference patch of its scale through the
meta-comparer MLP (``PairComparer.reduce``, Eq. 1: the maximum logit over the references),
block by block: ``(query rows, reference rows, hidden units)`` pre-activations written into
one buffer of ``_PAIR_BLOCK`` elements, of at most ``_REF_ROWS`` reference rows. Random
first-layer values of ``--n-images`` images at 256 px (the default settings: scales P3-P5,
1,024 + 256 + 64 patches per image, 64 hidden units) against references of 1,024 patches
per scale (``max_reference_patches``), each block shape timed in turn, ``--repeats``
rounds; the results must be identical to the first shape's.
"""

import argparse
import time

import torch

import skad._meta_comparer as mc

# (pair block elements, reference rows): the first is the reference (skad's until 2026-12-02)
SHAPES = [(2**18, 1024), (2**19, 64), (2**18, 64), (2**19, 128), (2**20, 64), (2**18, 32)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    comparer = mc.PairComparer(args.hidden, (args.hidden,)).eval()
    queries = [torch.randn(args.n_images * n, args.hidden, generator=gen) for n in (1024, 256, 64)]
    banks = [torch.randn(1024, args.hidden, generator=gen) for _ in queries]
    saved = dict(mc._PAIR_BLOCK), dict(mc._REF_ROWS)
    times, first = {shape: [] for shape in SHAPES}, None
    try:
        for _ in range(args.repeats):
            for shape in SHAPES:
                mc._PAIR_BLOCK["cpu"], mc._REF_ROWS["cpu"] = shape
                t0 = time.perf_counter()
                values = [comparer.reduce(q, r)[0] for q, r in zip(queries, banks)]
                times[shape].append(time.perf_counter() - t0)
                first = first or values
                if not all(torch.equal(a, b) for a, b in zip(values, first)):
                    raise AssertionError(f"block shape {shape} changed the maxima")
    finally:
        (mc._PAIR_BLOCK, mc._REF_ROWS) = saved
    now = (mc._PAIR_BLOCK["cpu"], mc._REF_ROWS["cpu"])
    base = min(times[SHAPES[0]])
    print(f"{args.n_images} images, {torch.get_num_threads()} thread(s); fastest of "
          f"{args.repeats} rounds, all identical to the first shape's\n")
    print("| pair block | reference rows | seconds (rounds) | speed-up |")
    print("|---|---|---|---|")
    for shape, ts in times.items():
        mark = " (skad's)" if shape == now else ""
        print(f"| 2^{shape[0].bit_length() - 1}{mark} | {shape[1]} | {min(ts):.2f} "
              f"({' / '.join(f'{t:.2f}' for t in ts)}) | {base / min(ts):.2f}x |")


if __name__ == "__main__":
    main()
