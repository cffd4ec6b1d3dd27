"""PatchCore fit time and peak memory against the backbone's own forward pass, by training size.

    python examples/benchmarks/patchcore_fit.py [--data ROOT] [--category mt]
        [--sizes 60 120 240 480] [--old-rev REV --old-sizes 60 120] [--params JSON]

For each size, fresh subprocesses (so that the peak resident memory is each one's own):
``backbone`` reads, resizes and runs the backbone over the images and nothing else (the
reference), ``new`` fits PatchCore from this checkout, ``old`` fits it from the git revision
``--old-rev`` (extracted into a temporary folder with ``git archive``). The images are drawn
at random (seed 0) from ``<category>/train/good``, repeated when the category has fewer.
Setting: ``tf_efficientnet_lite0`` (offline weights), 256 px, coreset 10 %, CPU, the other
parameters at their defaults (``--params '{"coreset_chunk_size": null}'`` overrides some).
Columns: wall seconds, fit / backbone, the seconds of the fit's phases (``features``:
reading, backbone and patch features; ``coreset``: ``greedy_coreset``; ``calibration``: the
leave-one-out scores of the references that calibrate the thresholds), peak resident memory
(MiB) of the process (``ru_maxrss``: with the pages of the shared libraries it touched) and
the peak of its anonymous memory (its own allocations, ``RssAnon``, sampled every 5 ms) in
each phase. The machine may be shared: compare the ratios, not the seconds.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _paths(data, category, size):
    train = sorted(str(p) for p in (Path(data) / category / "train" / "good").iterdir())
    order = np.random.default_rng(0).permutation(len(train))
    return [train[i] for i in np.resize(order, size)]


class _Phases:
    """Seconds and peak resident memory (MiB) of named phases of a run, the rest as "other".

    A thread samples the resident memory every 5 ms from ``/proc/self/status`` (Linux; no
    peaks elsewhere) and charges it to the phase running then: ``peak``, all of it (as
    ``ru_maxrss``), and ``peak_anon``, the anonymous part (``RssAnon``: the process's own
    allocations, without the pages of the shared libraries it has touched).
    """

    def __init__(self):
        self.current, self.seconds, self.peak, self.peak_anon = "other", {}, {}, {}
        self._stop = threading.Event()
        if Path("/proc/self/status").is_file():
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(0.005):
            with open("/proc/self/status") as fh:
                kib = {k: int(v.split()[0]) for k, v in
                       (line.split(":", 1) for line in fh if line.startswith("Rss"))}
            for peak, value in ((self.peak, kib["RssAnon"] + kib["RssFile"] + kib["RssShmem"]),
                                (self.peak_anon, kib["RssAnon"])):
                peak[self.current] = max(peak.get(self.current, 0.0), value / 1024)

    def wrap(self, owner, name, phase):
        """Charge every call of ``owner.name`` to ``phase``."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            before, self.current = self.current, phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0
                self.current = before

        setattr(owner, name, timed)

    def stop(self):
        self._stop.set()


def worker(mode, data, category, size, params):
    """One measurement in this process; prints a JSON line."""
    import torch

    import skad._patchcore as pc
    from skad import PatchCore
    from skad._backbone import create_backbone
    from skad._images import check_images, iter_batches

    paths = _paths(data, category, size)
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=256, coreset_ratio=0.1,
                    device="cpu", random_state=0)
    if mode == "new":
        det.set_params(**params)
    phases = _Phases()
    phases.wrap(pc.PatchCore, "_map_images", "features")
    phases.wrap(pc, "greedy_coreset", "coreset")
    phases.wrap(pc.PatchCore, "_leave_one_out_scores", "calibration")
    if mode == "backbone":
        backbone = create_backbone(det.backbone, det.weights, det.layers, random_state=0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, batch in iter_batches(check_images(paths), det.batch_size, det.image_size):
                backbone(batch)
    else:
        t0 = time.perf_counter()
        det.fit(paths)
    seconds = time.perf_counter() - t0
    phases.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "size": size, "seconds": seconds, "phases": phases.seconds,
                      "phase_peak_mib": phases.peak, "phase_peak_anon_mib": phases.peak_anon,
                      "rss_mib": rss,
                      "torch_threads": torch.get_num_threads()}))


def _run(mode, src, args, size):
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, __file__, "--worker", mode, "--data", args.data,
           "--category", args.category, "--sizes", str(size), "--params", args.params]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


_PHASES = ("features", "coreset", "calibration")


def _cells(fit, ref):
    """Seconds, ratio, phase seconds and memory of one fit, as table cells."""
    phases = fit["phases"]
    other = fit["seconds"] - sum(phases.get(p, 0.0) for p in _PHASES)
    anon = fit["phase_peak_anon_mib"]
    return [f"{fit['seconds']:.1f}", f"{fit['seconds'] / ref['seconds']:.2f}",
            " / ".join(f"{phases.get(p, 0.0):.1f}" for p in _PHASES) + f" / {other:.1f}",
            f"{fit['rss_mib']:.0f}",
            " / ".join(f"{anon[p]:.0f}" if p in anon else "-" for p in _PHASES)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="mt")
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 120, 240, 480])
    ap.add_argument("--old-rev", help="git revision of the implementation to compare with")
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[60, 120],
                    help="sizes to fit with --old-rev (its coreset is quadratic and slow)")
    ap.add_argument("--params", default="{}",
                    help="PatchCore parameters of the new fit, as JSON (default: none)")
    ap.add_argument("--worker", choices=["backbone", "new", "old"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category / "train" / "good").is_dir():
        print(f"patchcore_fit: {args.data}/{args.category} not found; nothing to do")
        return 0
    if args.worker:
        worker(args.worker, args.data, args.category, args.sizes[0], json.loads(args.params))
        return 0
    with tempfile.TemporaryDirectory() as old_src:
        if args.old_rev:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_rev, "skad"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old_src], input=archive, check=True)
        print("| images | backbone s | fit s | fit / backbone | features / coreset / "
              "calibration / other s | peak MiB | anon. MiB: features / coreset / calibration "
              "| backbone peak MiB (anon.) | old fit s | old / backbone | old phases s | "
              "old peak MiB | old anon. MiB |")
        print("|---" * 13 + "|")
        for size in args.sizes:
            ref = _run("backbone", REPO, args, size)
            row = [str(size), f"{ref['seconds']:.1f}"]
            row += _cells(_run("new", REPO, args, size), ref)
            row.append(f"{ref['rss_mib']:.0f} ({ref['phase_peak_anon_mib'].get('other', 0):.0f})")
            if args.old_rev and size in args.old_sizes:
                row += _cells(_run("old", old_src, args, size), ref)
            else:
                row += ["-"] * 5
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
