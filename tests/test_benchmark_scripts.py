"""The benchmark scripts that no other test runs still run, at test size.

``examples/benchmarks/gpu_check.py`` is the check issue 12 asks to run whenever a session has
a GPU: a session with 15 minutes of device time cannot afford to find it broken there.
``--tiny`` runs it with test-sized models on whatever device there is.
"""

import json
import subprocess
import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
_DETECTORS = {"PatchCore", "GeneralAD", "MMR", "MetaComparer", "GlobalLocal"}


def test_gpu_check_runs_every_detector(tmp_path):
    run = subprocess.run([sys.executable, str(_BENCHMARKS / "gpu_check.py"), str(tmp_path),
                          "--tiny", "--n-images", "16"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert {row["detector"] for row in rows} == _DETECTORS
    for row in rows:
        assert row["scores_ips"] > 0 and row["maps_ips"] > 0, row
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in _DETECTORS)


def test_nearest_search_benchmark_runs_and_agrees():
    run = subprocess.run([sys.executable, str(_BENCHMARKS / "nearest_search.py"),
                          "--banks", "300", "--n-images", "1", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = [line for line in run.stdout.splitlines() if line.startswith("| 300 |")]
    assert float(row.split("|")[5]) < 1e-3  # the two searches' distances agree


def test_pair_blocks_benchmark_runs_and_agrees():
    """Every block shape it times gives the maxima of the first (it fails otherwise), and
    skad's own shape is among them."""
    run = subprocess.run([sys.executable, str(_BENCHMARKS / "pair_blocks.py"),
                          "--n-images", "1", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 2^")]
    assert len(rows) == 6
    assert sum("(skad's)" in row for row in rows) == 1


def test_window_stems_benchmark_runs_and_agrees():
    """GlobalLocal scored with the windows' stems shared and without: the same scores (the
    script fails otherwise); shared where the raster is on the stem's grid only."""
    run = subprocess.run([sys.executable, str(_BENCHMARKS / "window_stems.py"),
                          "--data", "/nonexistent", "--n-images", "2", "--image-size", "64",
                          "--patch-size", "16", "--context", "image", "--width", "8",
                          "--strides", "8", "6", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
            for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows == {"stride": "stem shared", "8": "yes", "6": "no"}


def test_split_threads_benchmark_runs_and_agrees():
    """Each computation split over two threads and whole: the same outputs within 1e-4 of
    their largest (the script fails otherwise), a speed-up printed for each."""
    run = subprocess.run([sys.executable, str(_BENCHMARKS / "split_threads.py"),
                          "--data", "/nonexistent", "--n-images", "4", "--repeats", "1",
                          "--threads", "2"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [row[0].strip() for row in rows] == [
        "lite0 forward pass", "PatchCore scores", "GlobalLocal scores (stride 24)"]
    assert all(float(row[3].strip().rstrip("x")) > 0 for row in rows)
