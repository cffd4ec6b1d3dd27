"""Scoring many images (skad.scoring, skad score): lazy listings, streaming, resume, Parquet.

The Dask cluster's tests are in tests/test_dask.py.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skad
from skad import PatchCore
from skad._tables import Journal
from skad.cli import main
from skad.scoring import COLUMNS, FileList, Glob, ImageFolder, ScoringSummary, score_files

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 23  # not a multiple of the chunk size: the last chunk is short


def _write_images(folder, names, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    train = _write_images(root / "train", [f"{i}.png" for i in range(5)], seed=1)
    det = PatchCore(backbone="test_resnet", weights=None, image_size=32, random_state=0)
    det.fit([str(p) for p in sorted(train.iterdir())])
    return skad.save(det, root / "m.skad")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images in nested folders, and one file that is not a readable image."""
    root = tmp_path_factory.mktemp("images")
    names = [f"{d}/{i:02d}.png" for d in ("a", "b/c", "b") for i in range(7)] + ["z.png", "y.png"]
    _write_images(root, names[:N_IMAGES - 1])
    (root / "b" / "03.png").write_bytes(b"not a png")  # unreadable: an error row
    for name in ("a/05.png", "b/c/02.png"):  # unlike the training images: rejects
        Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(root / name)
    (root / "b" / "zz.png").write_bytes((root / "a" / "00.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def reference_run(model, images, tmp_path_factory):
    """One uninterrupted run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = score_files(model, images, out, chunk_size=4)
    return out, summary


def _table(out):
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _files(out):
    """The run's files and their bytes, the manifest aside (it names the run's inputs)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "skad-run.json"}


def _same_results(out, reference):
    assert _table(out) == _table(reference)
    assert _files(out) == _files(reference)


# ------------------------------------------------------------------- listings
def test_listings_are_lazy_sorted_and_as_list_images(images, monkeypatch):
    import skad._files
    from skad._files import list_images

    listing = [str(p) for p in list_images(images, recursive=True)]
    assert list(ImageFolder(images)) == listing
    assert [Path(p).relative_to(images).as_posix() for p in listing][:3] == [
        "a/00.png", "a/01.png", "a/02.png"]
    # the walk reads a folder when it gets there: the first image needs two folders read
    read = []
    entries = skad._files._entries
    monkeypatch.setattr(skad._files, "_entries", lambda folder: read.append(folder) or
                        entries(folder))
    first = next(iter(ImageFolder(images)))
    assert first == listing[0] and len(read) == 2


def test_globs_and_file_lists(images, tmp_path):
    every = list(ImageFolder(images))
    assert list(Glob(f"{images}/**/*.png")) == every
    assert list(Glob(f"{images}/b/*.png")) == [p for p in every if Path(p).parent == images / "b"]
    assert list(Glob(f"{images}/b/**/0[0-1].png")) == [
        str(images / s) for s in ("b/00.png", "b/01.png", "b/c/00.png", "b/c/01.png")]
    assert list(Glob(f"{images}/?/0?.png")) == [
        p for p in every if Path(p).parent in (images / "a", images / "b")
        and Path(p).name.startswith("0")]
    assert list(Glob(f"{images}/none/*.png")) == []
    # a file list: its order, relative to its folder, blank lines skipped, any path a row
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text(f"{images}/b/01.png\n\n../missing.png\n{images}/a/00.png\n")
    assert list(FileList(lists / "l.txt")) == [
        f"{images}/b/01.png", str(lists / "../missing.png"), f"{images}/a/00.png"]


def test_a_glob_or_a_list_scores_like_its_folder(model, images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in ImageFolder(images)))
    ref = tmp_path / "ref"
    assert main(["score", "--model", str(model), "--images", str(images), "--out", str(ref),
                 "--chunk-size", "4"]) == 3
    for option, value in (("--glob", f"{images}/**/*.png"), ("--file-list", str(listing))):
        out = tmp_path / option.strip("-")
        assert main(["score", "--model", str(model), option, value, "--out", str(out),
                     "--chunk-size", "4"]) == 3
        _same_results(out, ref)
    assert main(["score", "--model", str(model), "--glob", f"{images}/*.bmp", "--out",
                 str(tmp_path / "none")]) == 1
    assert f"no image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff) match {images}/*.bmp" in \
        capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing written before an image is found


# ------------------------------------------------------------------ streaming
def test_rows_are_appended_a_chunk_at_a_time(model, images, reference_run, tmp_path):
    out = tmp_path / "out"
    seen = []

    def callback(summary):
        # what the table holds at each chunk's end: the rows so far, complete
        seen.append((summary.n_images, len(_table(out)) - 1))

    summary = score_files(model, images, out, chunk_size=4, callback=callback)
    assert seen == [(n, n) for n in [4, 8, 12, 16, 20, 23]]
    assert isinstance(summary, ScoringSummary) and summary.complete
    assert (summary.n_images, summary.n_scored, summary.n_failed) == (N_IMAGES, N_IMAGES - 1, 1)
    assert summary.images_per_second > 0
    _same_results(out, reference_run[0])
    rows = _table(out)
    assert rows[0] == list(COLUMNS)
    assert [r[0] for r in rows[1:]] == list(ImageFolder(images))
    (error,) = [r for r in rows[1:] if r[-1]]
    assert error[0].endswith("b/03.png") and "cannot read image file" in error[-1]


@pytest.mark.parametrize("overlays", ["rejects", "none"])
def test_fewer_overlays_on_request(model, images, reference_run, tmp_path, overlays):
    out = tmp_path / "out"
    score_files(model, images, out, chunk_size=4, overlays=overlays)
    rows, reference = _table(out), _table(reference_run[0])
    drawn = [r[7] for r in rows[1:] if r[7]]
    if overlays == "none":
        assert drawn == []
    else:
        assert drawn == [r[7] for r in reference[1:] if r[3] == "1"] and drawn
    assert sorted(p.name for p in out.glob("*.png")) == sorted(drawn)
    # every other column is the full run's
    assert [r[:7] + r[8:] for r in rows] == [r[:7] + r[8:] for r in reference]


# --------------------------------------------------------------------- resume
class _Stop(Exception):
    pass


def _interrupt_after(n_chunks):
    def callback(summary):
        callback.calls += 1
        if callback.calls == n_chunks:
            raise _Stop
    callback.calls = 0
    return callback


def test_an_interrupted_run_resumes_where_it_stopped(model, images, reference_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        score_files(model, images, out, chunk_size=4, callback=_interrupt_after(2))
    assert len(_table(out)) == 1 + 8
    scored = []
    summary = score_files(model, images, out, chunk_size=4, resume=True,
                          callback=lambda s: scored.append(s.n_images))
    assert scored == [12, 16, 20, 23]  # the first 8 were not scored again
    assert (summary.n_resumed, summary.n_images, summary.n_failed) == (8, N_IMAGES, 1)
    _same_results(out, reference_run[0])
    # a finished run resumes to nothing
    assert score_files(model, images, out, resume=True).n_resumed == N_IMAGES


def test_a_row_cut_short_by_a_kill_is_scored_again(model, images, reference_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        score_files(model, images, out, chunk_size=4, callback=_interrupt_after(1))
    rows = _table(reference_run[0])
    # what a kill in the middle of writing leaves: half a row, half an overlay
    with open(out / "scores.csv", "a", encoding="utf-8") as fh:
        fh.write(",".join(rows[5])[:20])
    (out / rows[5][7]).write_bytes(b"\x89PNG half")
    journal = Journal(out / "scores.csv")
    assert journal.n_rows == 4 and journal.size > journal.end
    score_files(model, images, out, chunk_size=4, resume=True)
    _same_results(out, reference_run[0])


def test_a_killed_command_resumes_to_the_same_results(model, images, tmp_path):
    """skad score killed (SIGKILL) half-way, then skad score --resume: the same results as
    one uninterrupted run. All three run in fresh processes with one thread each, so that
    the scores are summed alike (a test process's torch threads, or the thread variables an
    earlier test's Dask cluster left in its environment, could change their last digit)."""
    def argv(out):
        return ["score", "--model", str(model), "--images", str(images), "--out", str(out),
                "--chunk-size", "4"]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cli = "import sys; from skad.cli import main; sys.exit(main(sys.argv[1:]))"
    reference = tmp_path / "reference"
    assert subprocess.run([sys.executable, "-c", cli, *argv(reference)], env=env,
                          capture_output=True).returncode == 3  # one unreadable image
    out = tmp_path / "out"
    # chunks slowed down, so that the kill falls in the middle of the run
    code = ("import sys, time, skad._results as r; chunk = r.score_chunk; "
            "r.score_chunk = lambda *a: time.sleep(0.3) or chunk(*a); "
            "from skad.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *argv(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "scores.csv").is_file() and len(_table(out)) > 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    n_done = len(_table(out)) - 1
    assert 8 <= n_done < N_IMAGES
    resumed = subprocess.run([sys.executable, "-c", cli, *argv(out), "--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 3, resumed.stderr  # one unreadable image, as in one run
    _same_results(out, reference)


def test_resume_refuses_another_run(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["score", "--model", str(model), "--images", str(images), "--out", str(out),
            "--chunk-size", "4", "--limit", "6"]
    assert main(argv) == 0
    assert "stopped at --limit 6 (--resume continues)" in capsys.readouterr().out
    other_model = tmp_path / "other.skad"
    det = skad.load(model)
    det.threshold_ = det.threshold_ + 1
    skad.save(det, other_model)
    other_images = _write_images(tmp_path / "other", ["0.png"])
    renamed = tmp_path / "renamed"
    _write_images(renamed, [f"{i}.png" for i in range(3)])
    cases = [
        (["--model", str(other_model)], "its run scored with another model"),
        (["--images", str(other_images)],
         f"its run scored the folder {images}, not the folder {other_images}"),
        (["--min-area", "5"], "its run had min_area=1, not 5"),
        (["--overlays", "none"], "its run had overlays='all', not 'none'"),
    ]
    for change, message in cases:
        changed = list(argv)
        for k in range(0, len(change), 2):
            if change[k] in changed:
                changed[changed.index(change[k]) + 1] = change[k + 1]
            else:
                changed += change[k:k + 2]
        assert main([*changed, "--resume"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"skad: error: cannot resume {out}: ") and message in err, err
        assert err.count("\n") == 1
    # the same folder, but an image renamed before the resume point
    assert main([*argv[:4], str(renamed), *argv[5:6], str(tmp_path / "r"), "--limit", "2"]) == 0
    (renamed / "1.png").rename(renamed / "10.png")
    assert main([*argv[:4], str(renamed), *argv[5:6], str(tmp_path / "r"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"row 2 of its scores.csv is {renamed}/1.png, but the inputs now list " \
           f"{renamed}/10.png there" in err
    # nothing to resume; a folder without a manifest; --resume with --overwrite
    assert main([*argv[:6], str(tmp_path / "new"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    (out / "skad-run.json").unlink()
    assert main([*argv, "--resume"]) == 1
    assert "it holds no run manifest (skad-run.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--resume", "--overwrite"])


def test_a_run_in_progress_cannot_be_resumed_beside_it(model, images, reference_run, tmp_path):
    out = tmp_path / "out"
    refused = []

    def resume_now(summary):
        if not refused:
            with pytest.raises(ValueError, match="is being written by another skad score run"):
                score_files(model, images, out, chunk_size=4, resume=True)
            refused.append(summary.n_images)

    score_files(model, images, out, chunk_size=4, callback=resume_now)
    assert refused == [4]
    _same_results(out, reference_run[0])
    assert not (out / ".skad-score.lock").exists()


@pytest.mark.parametrize("limit", [10, 15])
def test_a_run_stopped_by_its_limit_continues_with_resume(model, images, reference_run,
                                                          tmp_path, limit):
    """The rows of an uninterrupted run, byte for byte, though the resumed run's chunks hold
    other images together than the uninterrupted run's (15: 15-18 against 12-15, 16-19)."""
    out = tmp_path / "out"
    first = score_files(model, images, out, chunk_size=4, limit=limit)
    assert (first.n_images, first.complete) == (limit, False)
    exact = score_files(model, images, out, chunk_size=4, limit=N_IMAGES, resume=True)
    assert (exact.n_images, exact.n_resumed, exact.complete) == (N_IMAGES, limit, True)
    _same_results(out, reference_run[0])


# -------------------------------------------------------------------- Parquet
def test_parquet_holds_the_rows_typed_and_survives_a_kill(model, images, reference_run,
                                                          tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    with pytest.raises(_Stop):
        score_files(model, images, out, chunk_size=4, output_format="parquet",
                    callback=_interrupt_after(3))
    # an exception closes the file: it holds the rows written so far
    assert pq.read_table(out / "scores.parquet").num_rows == 12
    # a kill leaves it without its footer; resume writes it again from scores.csv
    data = (out / "scores.parquet").read_bytes()
    (out / "scores.parquet").write_bytes(data[: len(data) // 2])
    summary = score_files(model, images, out, chunk_size=4, output_format="parquet",
                          resume=True)
    assert summary.parquet_path == out / "scores.parquet"
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == list(COLUMNS)
    assert str(table.schema.field("score").type) == "double"
    assert str(table.schema.field("predicted_label").type) == "int8"
    rows = _table(reference_run[0])[1:]
    data = table.to_pylist()
    assert [d["path"] for d in data] == [r[0] for r in rows]
    assert [d["score"] for d in data] == [float(r[1]) if r[1] else None for r in rows]
    assert [d["error"] or "" for d in data] == [r[-1] for r in rows]
    assert _table(out) == _table(reference_run[0])


def test_options_are_checked_before_any_work(model, images, tmp_path):
    for kwargs, message in (({"output_format": "xlsx"}, "output_format must be one of"),
                            ({"overlays": "some"}, "overlays must be one of"),
                            ({"chunk_size": 0}, "chunk_size must be an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            score_files(model, images, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        score_files(model, images, tmp_path / "out", resume=True, overwrite=True)
    with pytest.raises(ValueError, match="is a file: for a list of paths"):
        score_files(model, model, tmp_path / "out")
    with pytest.raises(ValueError, match="the model has no reference yet: call set_reference"):
        score_files(PatchCore(), images, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_of_a_listing_of_unknown_length(capsys):
    """skad score's listing has no length: its progress lines count without a total."""
    from skad._progress import progress

    steps = progress((k for k in range(3)), desc="scoring", unit="chunk", verbose=1,
                     interval=0, status=lambda: "(x images)")
    assert list(steps) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    # a count without a total: no percentage, no time left; the status after the rate
    assert [line.split(" [")[0] for line in lines] == [f"scoring: {k}" for k in (0, 1, 2, 3)]
    assert all("%" not in line for line in lines)
    assert lines[-1].endswith("chunk/s, (x images)]")


# -------------------------------------------------------------------- what the command says
def test_the_command_says_when_a_resumed_run_had_nothing_left(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    first = ["score", "--model", str(model), "--images", str(images), "--out", str(out),
             "--no-progress"]
    assert main(first) == 3  # one unreadable file
    capsys.readouterr()
    assert main([*first, "--resume"]) == 3
    said = capsys.readouterr().out
    assert "nothing left to score" in said and f"all {N_IMAGES} images; 1 could not" in said
    assert "interrupted run" not in said


def test_ctrl_c_in_the_command_points_to_resume(model, images, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("skad.scoring.score_files", interrupt)
    assert main(["score", "--model", str(model), "--images", str(images), "--out",
                 str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume continues" in err
