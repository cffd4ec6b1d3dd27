"""Scoring at scale (issue 18): skad score's peak memory by number of images, 1 and 2 Dask
workers on the same images, and the time to resume a run interrupted half-way.

    OMP_NUM_THREADS=1 python examples/benchmarks/scoring_scale.py --out scale.json

The images are generated 64 px PNGs: 50 distinct noise images, hard-linked to as many
files as a run needs, in folders of 1,000 (one folder per hour of a line camera, say).
The model is tiny: PatchCore on timm's ``test_resnet`` with random weights, fitted on 10
of them. Each image costs what a real one of its size costs (decoding, the network, the
map, the regions, the overlay PNG), but the scores mean nothing. Every skad score run is a
subprocess, timed from its start (Python, torch and the model loading included) to its
exit; its peak memory is its maximum resident set size, as the launcher below counts it. The
Dask runs use a ``LocalCluster`` on the loopback interface (workers of one thread), warmed
(skad imported, the model loaded) before the clock starts, with Dask's default worker
settings and with those of ``WORKER_SETTINGS``.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

N_DISTINCT = 50
PER_FOLDER = 1000
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                      os.environ.get("PYTHONPATH", "")])}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def make_model(work, size):
    import skad

    src = work / "distinct"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N_DISTINCT):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            src / f"{i:02d}.png")
    det = skad.PatchCore(backbone="test_resnet", weights=None, image_size=size,
                         random_state=0).fit([str(src / f"{i:02d}.png") for i in range(10)])
    return skad.save(det, work / "model.skad"), src


def make_images(work, src, n):
    """``n`` image files (hard links to the distinct ones) in folders of PER_FOLDER."""
    folder = work / f"images_{n}"
    if folder.is_dir():
        return folder
    tmp = work / f".images_{n}"
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        sub = tmp / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True)
        os.link(src / f"{i % N_DISTINCT:02d}.png", sub / f"{i:07d}.png")
    tmp.rename(folder)
    return folder


# Runs a command and prints its peak memory (KiB) and status. A process's peak memory as
# Linux counts it includes the memory of the process it was forked from, until its exec:
# this script, holding torch, would add its own to every measure. Forked from this small
# launcher instead, a command's peak is its own.
LAUNCHER = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); "
            "print('launcher', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)")


def measured(cmd):
    """Run ``cmd`` through the launcher: wall seconds, peak RSS (MiB), its stdout."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, cmd)], env=ENV,
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    *lines, last = done.stdout.strip().splitlines()
    _, rss, status = last.split()
    if int(status) not in (0, 3):
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({status}):\n{done.stderr}")
    return seconds, int(rss) / 1024, "\n".join(lines)


def skad_score(*argv):
    """``skad score ARGV``: wall seconds, peak RSS (MiB), its last line."""
    return measured([sys.executable, "-m", "skad.cli", "score", *argv])


def killed_skad_score(*argv, at_rows):
    """``skad score ARGV``, killed (SIGKILL) once its scores.csv holds ``at_rows`` rows:
    seconds until the kill."""
    table = Path(argv[list(argv).index("--out") + 1]) / "scores.csv"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "skad.cli", "score", *map(str, argv)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if count_rows(table) >= at_rows:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return time.perf_counter() - t0


def count_rows(table):
    try:
        with open(table, "rb") as fh:
            return max(sum(1 for _ in fh) - 1, 0)
    except FileNotFoundError:
        return 0


def rate(line):
    found = re.search(r"([\d.]+) images/s", line)
    return float(found.group(1)) if found else None


def memory(work, model, src, sizes, full_overlays_up_to):
    rows = []
    for n in sizes:
        images = make_images(work, src, n)
        for overlays in ("none", "all"):
            if overlays == "all" and n > full_overlays_up_to:
                continue
            out = work / f"out_{n}_{overlays}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss, line = skad_score("--model", model, "--images", images, "--out", out,
                                            "--overlays", overlays, "--chunk-size", 32)
            rows.append({"images": n, "overlays": overlays, "seconds": round(seconds, 1),
                         "peak_rss_mib": round(rss), "images_per_s": rate(line)})
            log(rows[-1])
        if n == max(sizes):  # resuming a finished run: listing and checking every row
            seconds, rss, line = skad_score("--model", model, "--images", images, "--out",
                                            work / f"out_{n}_none", "--overlays", "none",
                                            "--chunk-size", 32, "--resume")
            rows.append({"images": n, "overlays": "none", "resume_of_finished_run_s":
                         round(seconds, 1), "peak_rss_mib": round(rss)})
            log(rows[-1])
    return rows


def listing_memory(work, src, n):
    """Peak RSS of walking ``n`` files in one flat folder and in folders of 1,000, no torch."""
    flat = work / f"flat_{n}"
    if not flat.is_dir():
        tmp = work / f".flat_{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i in range(n):
            os.link(src / f"{i % N_DISTINCT:02d}.png", tmp / f"{i:07d}.png")
        tmp.rename(flat)
    rows = []
    code = ("import sys, time; from skad.scoring import ImageFolder; "
            "t = time.perf_counter(); n = sum(1 for _ in ImageFolder(sys.argv[1])); "
            "print(n, time.perf_counter() - t)")
    _, base, _ = measured([sys.executable, "-c", "import skad.scoring"])
    for layout, folder in (("flat", flat), ("folders of 1,000", make_images(work, src, n))):
        _, rss, line = measured([sys.executable, "-c", code, folder])
        count, seconds = line.split()
        rows.append({"layout": layout, "files": int(count), "seconds": round(float(seconds), 2),
                     "peak_rss_mib": round(rss), "rss_importing_skad_scoring_mib": round(base)})
        log(rows[-1])
    return rows


# Dask's workers as they start by default, and as a scoring cluster had better start them:
# without the MALLOC_TRIM_THRESHOLD_ their nanny sets (any value turns off glibc's
# adaptive mmap threshold, so that every batch's large tensors are mapped and faulted in
# afresh) and without the statistical profiler that samples the task thread every 10 ms
WORKER_SETTINGS = {
    "Dask's defaults": {},
    "no malloc trim, no profiler": {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.worker.profile.enabled": False},
}


def throughput(work, model, src, n, rounds):
    """Images/s of one process and of 1 and 2 local Dask workers on the same images,
    with each of WORKER_SETTINGS, alternated round by round."""
    import dask
    import torch
    from distributed import Client, LocalCluster

    import skad
    from skad._serialization import fingerprint
    from skad.scoring import score_files

    torch.set_num_threads(1)  # as each worker (1 thread)
    images = make_images(work, src, n)
    digest = fingerprint(skad.load(model))
    # each worker imports skad and loads the model before the clock starts
    warm = ("import skad._cluster as c; "
            f"c._worker_detector(('file', {str(Path(model).resolve())!r}, {digest!r}), None)")
    runs = [(0, None)] + [(w, name) for name in WORKER_SETTINGS for w in (1, 2)]
    rows = []
    for k in range(rounds):
        for workers, setting in runs:
            out = work / f"throughput_{workers}"
            shutil.rmtree(out, ignore_errors=True)
            if workers == 0:
                summary = score_files(model, images, out, chunk_size=32)
            else:
                # a nanny sets its variables in this process's environment too, where the
                # next nanny would find them: start each cluster from a clean one
                os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
                with dask.config.set(WORKER_SETTINGS[setting]), \
                        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     host="127.0.0.1", dashboard_address=None) as cluster, \
                        Client(cluster) as client:
                    client.run(exec, warm, {})
                    summary = score_files(model, images, out, chunk_size=32,
                                          scheduler=client)
            rows.append({"round": k, "workers": workers or "one process, no Dask",
                         "setting": setting, "images": summary.n_images,
                         "seconds": round(summary.seconds, 1),
                         "images_per_s": round(summary.images_per_second, 1)})
            log(rows[-1])
    return rows


def resume(work, model, src, n):
    images = make_images(work, src, n)
    argv = ["--model", model, "--images", images, "--chunk-size", 32]
    out = work / "resume_full"
    shutil.rmtree(out, ignore_errors=True)
    full, _, line = skad_score(*argv, "--out", out)
    nothing, _, _ = skad_score(*argv, "--out", out, "--resume")
    out = work / "resume_cut"
    shutil.rmtree(out, ignore_errors=True)
    cut = killed_skad_score(*argv, "--out", out, at_rows=n // 2)
    at = count_rows(out / "scores.csv")
    resumed, _, resumed_line = skad_score(*argv, "--out", out, "--resume")
    identical = (out / "scores.csv").read_bytes() == (work / "resume_full" /
                                                     "scores.csv").read_bytes()
    row = {"images": n, "full_run_s": round(full, 1), "full_run_images_per_s": rate(line),
           "killed_after_s": round(cut, 1), "rows_at_kill": at,
           "resume_s": round(resumed, 1), "resume_images_per_s": rate(resumed_line),
           "resume_of_finished_run_s": round(nothing, 1), "same_scores_csv": identical}
    log(row)
    return [row]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="folder for the images and results (default: a new "
                                   "temporary folder, removed at the end)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--overlays-up-to", type=int, default=10000,
                    help="also measure --overlays all up to this many images")
    ap.add_argument("--throughput-images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--resume-images", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=64)
    parts = ["memory", "listing", "throughput", "resume"]
    ap.add_argument("--only", nargs="+", choices=parts, default=parts)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="skad-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model, src = make_model(work, args.image_size)
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_average_at_start": os.getloadavg()}
    if "throughput" in args.only:
        results["throughput"] = throughput(work, model, src, args.throughput_images,
                                           args.rounds)
    if "resume" in args.only:
        results["resume"] = resume(work, model, src, args.resume_images)
    if "listing" in args.only:
        results["listing"] = listing_memory(work, src, max(args.sizes))
    if "memory" in args.only:
        results["memory"] = memory(work, model, src, args.sizes, args.overlays_up_to)
    results["load_average_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
