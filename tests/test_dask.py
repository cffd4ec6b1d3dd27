"""skad on Dask: skad score on a cluster, a worker killed mid-run, cross-validation and grid
search through joblib's Dask backend.

One LocalCluster for the module, on the loopback interface: 2 worker processes of 1
thread each, shut down at the end. Functions sent to the workers are builtins or
skad's (``exec`` of a line of code, in a namespace of its own): this file is not
importable on a worker.
"""

import csv
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skad
from skad import PatchCore
from skad.cli import main
from skad.datasets import make_textures
from skad.model_selection import ReferenceScorer
from skad.scoring import score_files

# an optional extra (pip install "skad[dask]"), which CI installs with .[dev]
distributed = pytest.importorskip("distributed")

CHUNK = 3


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  env={"OMP_NUM_THREADS": "1"}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster) as client:
        # torch, timm and skad imported once per worker, before any test counts on them
        client.run(exec, "import skad.scoring, skad._serialization, skad._patchcore", {})
        yield client


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    det = PatchCore(backbone="test_resnet", weights=None, image_size=32, random_state=0)
    return skad.save(det.fit(np.stack(train)), root / "m.skad")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        folder = root / ("a" if i < 8 else "b")
        folder.mkdir(exist_ok=True)
        pixels = (np.full((32, 32, 3), 250, np.uint8) if i % 5 == 0 else
                  rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (root / "a" / "03.png").write_bytes(b"truncated")  # an error row
    return root


@pytest.fixture(scope="module")
def one_process(model, images, tmp_path_factory):
    """The run in this process, with one thread as on the workers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("one") / "out"
        score_files(model, images, out, chunk_size=CHUNK, output_format="parquet")
    finally:
        torch.set_num_threads(threads)
    return out


def _table(out):
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _same_results(out, reference):
    """The same rows and files, byte for byte (the manifest aside: it names the run)."""
    assert _table(out) == _table(reference)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix != ".json"}
    assert files == {p.name: p.read_bytes() for p in reference.iterdir()
                     if p.suffix != ".json"}


def test_the_cluster_writes_what_one_process_writes(model, images, client, cluster,
                                                    one_process, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    out = tmp_path / "python"
    summary = score_files(model, images, out, chunk_size=CHUNK, scheduler=client,
                          output_format="parquet", window=2)
    assert (summary.n_images, summary.n_failed) == (16, 1)
    _same_results(out, one_process)
    # the command line, given the scheduler's address
    out = tmp_path / "cli"
    assert main(["score", "--model", str(model), "--images", str(images), "--out", str(out),
                 "--chunk-size", str(CHUNK), "--format", "parquet",
                 "--scheduler", cluster.scheduler_address]) == 3
    assert "scored 15 of 16 images" in capsys.readouterr().out
    _same_results(out, one_process)


def test_skad_score_reaches_a_scheduler_by_its_address(model, images, cluster, one_process,
                                                      tmp_path):
    """In a process of its own, as a user runs it: no default Dask client exists there."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "skad.cli", "score", "--model", str(model),
                          "--images", str(images), "--out", str(out), "--chunk-size",
                          str(CHUNK), "--scheduler", cluster.scheduler_address],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 3, run.stderr  # 3: the one unreadable image
    assert "scored 15 of 16 images" in run.stdout
    assert _table(out) == _table(one_process)


def test_a_resumed_run_may_finish_on_the_cluster(model, images, client, one_process,
                                                 tmp_path):
    out = tmp_path / "out"
    score_files(model, images, out, chunk_size=CHUNK, output_format="parquet", limit=7)
    summary = score_files(model, images, out, chunk_size=CHUNK, output_format="parquet",
                          scheduler=client, resume=True)
    assert (summary.n_resumed, summary.n_images) == (7, 16)
    # the chunks after a resume start at row 7: the same rows, other batches
    rows, reference = _table(out), _table(one_process)
    assert [r[0] for r in rows] == [r[0] for r in reference]
    assert [r[7] for r in rows] == [r[7] for r in reference]
    np.testing.assert_allclose([float(r[1] or "nan") for r in rows[1:]],
                               [float(r[1] or "nan") for r in reference[1:]], rtol=1e-5)


def test_an_unreachable_scheduler_is_one_error_before_anything_is_written(model, images,
                                                                         tmp_path):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(OSError, match="cannot reach the Dask scheduler tcp://127.0.0.1:1"):
        score_files(model, images, tmp_path / "out", scheduler="tcp://127.0.0.1:1")
    assert not (tmp_path / "out").exists()


def test_a_detector_in_memory_is_broadcast(model, images, client, one_process, tmp_path):
    det = skad.load(model)
    out = tmp_path / "out"
    score_files(det, images, out, chunk_size=CHUNK, scheduler=client, output_format="parquet")
    _same_results(out, one_process)


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(model, images, client,
                                                              one_process, tmp_path):
    # every chunk takes 0.5 s more on the workers as they are now, so that the kill falls
    # while both are busy; the worker that replaces the killed one scores at full speed
    client.run(exec, "import time, skad._results as r; r.unslowed = r.score_chunk; "
                     "r.score_chunk = lambda *a: time.sleep(0.5) or r.unslowed(*a)", {})
    pids = client.run(os.getpid)
    killed = []

    def kill_a_busy_worker(summary):
        if not killed:
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append((busy[0], summary.n_images))

    out = tmp_path / "out"
    try:
        summary = score_files(model, images, out, chunk_size=CHUNK, scheduler=client,
                              output_format="parquet", callback=kill_a_busy_worker)
    finally:
        client.run(exec, "import skad._results as r; r.score_chunk = getattr(r, 'unslowed', "
                         "r.score_chunk)", {})
    assert killed and killed[0][1] == CHUNK  # killed after the first chunk, mid-run
    assert summary.n_images == 16
    _same_results(out, one_process)


def test_cross_validation_and_grid_search_on_dask(client):
    import joblib
    import sklearn
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate

    data = make_textures(n_domains=3, n_normal=8, n_anomalous=3, image_size=32,
                         random_state=0)
    det = PatchCore(backbone="test_resnet", weights=None, image_size=32, random_state=0)
    cv = {"cv": LeaveOneGroupOut(), "scoring": ReferenceScorer(n_references=3)}
    with warnings.catch_warnings():
        # one-class PatchCore leaves the training folds' defective images out, and says so
        warnings.filterwarnings("ignore", message=".*one-class detector")
        here = cross_validate(det, data.images, data.y, groups=data.groups, **cv)
        with distributed.get_task_stream(client) as stream, joblib.parallel_backend("dask"):
            there = cross_validate(det, data.images, data.y, groups=data.groups, n_jobs=-1,
                                   **cv)
        assert len(stream.data) >= 3  # the three folds ran on the cluster
        np.testing.assert_allclose(there["test_score"], here["test_score"], atol=1e-12)
        with sklearn.config_context(enable_metadata_routing=True):
            grid = {"false_reject_rate": [0.1, 0.3], "n_reweight_neighbors": [3, 9]}
            search = GridSearchCV(det, grid, refit=False, **cv)
            with joblib.parallel_backend("dask"):
                search.fit(data.images, data.y, groups=data.groups)
            alone = GridSearchCV(det, grid, refit=False, **cv).fit(
                data.images, data.y, groups=data.groups)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"],
                               alone.cv_results_["mean_test_score"], atol=1e-12)
    assert search.best_params_ == alone.best_params_
