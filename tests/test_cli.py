"""The skad command: fit, score, benchmark and clear errors."""

import argparse
import csv
import os
import pickle
import re
import shlex
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import skad
from skad.cli import COLUMNS, main, make_detector
from skad.datasets import make_textures

TINY = ["--param", "backbone=\"test_resnet\"", "--param", "weights=null",
        "--param", "image_size=32", "--param", "random_state=0"]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    """A tiny MVTec-layout tree with two categories."""
    root = tmp_path_factory.mktemp("mvtec")
    data = make_textures(n_domains=2, n_normal=8, n_anomalous=3, image_size=32, random_state=0)
    for g in np.unique(data.groups):
        sel = np.flatnonzero(data.groups == g)
        for j, i in enumerate(sel):
            if data.y[i] == 0:
                sub = root / g / ("train" if j < 5 else "test") / "good"
            else:
                sub = root / g / "test" / "defect"
                (root / g / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
                Image.fromarray(data.masks[i] * 255).save(
                    root / g / "ground_truth" / "defect" / f"{j:03d}_mask.png")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i]).save(sub / f"{j:03d}.png")
    return root


def test_fit_then_score(mvtec, tmp_path, capsys):
    model = tmp_path / "m.skad"
    cat = sorted(p for p in mvtec.iterdir())[0]
    assert main(["fit", "--train", str(cat), "--out", str(model), *TINY]) == 0
    assert model.is_file() and not list(tmp_path.glob("*.tmp"))
    out = tmp_path / "res"
    assert main(["score", "--model", str(model), "--images", str(cat / "test"),
                 "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == list(COLUMNS) == [
        "path", "score", "p_value", "predicted_label", "threshold", "n_regions",
        "largest_region_area", "map", "raw_map", "error"]
    assert len(rows) == len(list((cat / "test").rglob("*.png")))
    # the threshold used is in the results, and predicted_label is its comparison
    (threshold,) = {float(r["threshold"]) for r in rows}
    assert all(r["predicted_label"] == str(int(float(r["score"]) > threshold)) for r in rows)
    # the p-values and regions are the detector's own
    det = skad.load(model)
    paths = [r["path"] for r in rows]
    np.testing.assert_allclose([float(r["p_value"]) for r in rows], det.predict_pvalue(paths),
                               rtol=1e-5)
    regions = det.predict_regions(paths)
    assert [int(r["n_regions"]) for r in rows] == [len(rs) for rs in regions]
    assert [int(r["largest_region_area"]) for r in rows] == [
        max((x.area for x in rs), default=0) for rs in regions]
    assert all(Path(r["path"]).is_file() and (out / r["map"]).is_file() for r in rows)
    assert "scored" in capsys.readouterr().out


def _subparsers(parser):
    return [sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for sub in action.choices.values()]


def test_every_option_has_help_and_help_has_no_markup():
    from skad.cli import _parser

    parser = _parser()
    commands = [parser, *_subparsers(parser)]
    assert [c.prog for c in commands] == ["skad", "skad fit", "skad score", "skad export",
                                          "skad demo", "skad benchmark"]
    missing = [f"{c.prog} {'/'.join(a.option_strings)}" for c in commands for a in c._actions
               if a.option_strings and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing, f"options without help text: {missing}"
    for text in (c.format_help() for c in commands):
        assert "``" not in text and ":func:" not in text, text


def test_score_help_names_every_column():
    from skad.cli import _parser

    (score,) = [sp for sp in _subparsers(_parser()) if sp.prog == "skad score"]
    assert all(f"  {column} " in score.format_help() for column in COLUMNS)


def test_benchmark_help_names_every_column_of_its_table(mvtec, capsys):
    from skad._benchmark import COLUMNS as TABLE
    from skad.cli import _parser

    (bench,) = [sp for sp in _subparsers(_parser()) if sp.prog == "skad benchmark"]
    text = bench.format_help()
    assert all(f"  {column} " in text for column in TABLE)
    assert "domains rows equal its fewshot rows" in text
    # and the table has exactly those columns
    assert main(["benchmark", "--data", str(mvtec), *TINY, "--categories",
                 min(p.name for p in mvtec.iterdir())]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert [c.strip() for c in head.strip("|").split("|")] == list(TABLE)


def test_two_fits_with_the_default_seed_are_identical(mvtec, tmp_path, capsys):
    """No --seed: the same model twice (random_state 0), and the output says which seed."""
    cat = min(mvtec.iterdir())
    # TINY without its random_state: the default --seed must seed the fit
    tiny = [a for a in TINY if a != "random_state=0"][:-1]
    images = [str(p) for p in sorted((cat / "test").rglob("*.png"))]
    scores = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.skad"
        assert main(["fit", "--train", str(cat), "--out", str(path), *tiny,
                     "--param", "coreset_ratio=0.5"]) == 0
        det = skad.load(path)
        assert det.random_state == 0
        scores.append(det.decision_function(images))
    assert "random_state=0" in capsys.readouterr().out
    np.testing.assert_array_equal(scores[0], scores[1])
    path = tmp_path / "c.skad"
    assert main(["fit", "--train", str(cat), "--out", str(path), *tiny, "--seed", "3"]) == 0
    assert skad.load(path).random_state == 3


def test_offline_forbids_downloads_for_the_command(mvtec, tmp_path, monkeypatch, capsys):
    """--offline sets SKAD_OFFLINE for the command, and only for it."""
    import skad._backbone

    seen = []
    real = skad._backbone._downloads_disabled

    def spy():
        seen.append(real())
        return seen[-1]

    monkeypatch.delenv("SKAD_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(skad._backbone, "_downloads_disabled", spy)
    monkeypatch.setattr(skad._backbone, "_cached_hub_file", lambda name: None)  # no cache
    cat = min(mvtec.iterdir())
    assert main(["fit", "--train", str(cat), "--out", str(tmp_path / "m.skad"), "--offline",
                 "--param", "backbone=\"resnet18.a1_in1k\"", "--param", "image_size=32"]) == 1
    assert seen == [True] and "SKAD_OFFLINE" not in os.environ
    assert "downloads are disabled" in capsys.readouterr().err


def test_demo_writes_into_a_fresh_folder_not_the_current_one(tmp_path, monkeypatch, capsys):
    """By default the demo writes under the system's temporary folder, never into the
    current folder (a source checkout); its scores.csv paths are real image files."""
    import skad.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(skad.cli, "make_detector", _tiny_detector)
    monkeypatch.setattr("skad.datasets.make_textures", _small_textures)
    assert main(["demo"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # nothing in the cwd
    (out,) = (tmp_path / "tmp").glob("skad-demo-*")  # other libraries may write there too
    assert str(out) in capsys.readouterr().out
    tables = sorted(out.glob("*/scores.csv"))
    assert len(tables) == 3
    for table in tables:
        rows = _rows(table.parent)
        assert rows and all(Path(r["path"]).is_file() for r in rows)
        assert all(r["threshold"] and r["predicted_label"] in "01" for r in rows)
        # the images sit in an MVTec AD tree that says which are defective
        texture = table.parent.name
        kinds = {Path(r["path"]).parent.relative_to(out / "data" / texture) for r in rows}
        assert kinds == {Path("test/good"), Path("test/defect")}
        assert b"\r" not in table.read_bytes()  # plain "\n" rows
    # the README's examples read the demo's tree as they read real data
    from skad.datasets import load_mvtec

    for texture in ("checker", "stone", "stripes"):
        train = load_mvtec(out / "data", texture, "train")
        test = load_mvtec(out / "data", texture, "test", return_masks=True)
        assert len(train.paths) == 20 and set(test.y) == {0, 1}
        assert all(m.any() == bool(label) for m, label in zip(test.masks, test.y))
    # a chosen folder: new or empty, unless --overwrite
    assert main(["demo", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0


def _tiny_detector(method, params=(), **kwargs):
    kwargs["offline"] = False
    return make_detector(method, ["backbone=\"test_resnet\"", "weights=null",
                                  "image_size=32"], **kwargs)


def _small_textures(**kwargs):
    kwargs.update(n_normal=24, n_anomalous=3, image_size=32)
    return make_textures(**kwargs)


def test_benchmark_prints_a_table(mvtec, capsys):
    assert main(["benchmark", "--data", str(mvtec), "--protocol", "domains",
                 "--n-references", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| category |" in out and "**mean**" in out


@pytest.mark.parametrize("suffix", [".csv", ".json", ".md"])
def test_benchmark_table_files_hold_the_sign_off_metrics(mvtec, tmp_path, capsys, suffix):
    """The rates at the operating threshold agree with the detector's own predictions,
    in every format the table is written in."""
    import json

    from skad._benchmark import COLUMNS as TABLE

    cat = min(p.name for p in mvtec.iterdir())
    out = tmp_path / f"table{suffix}"
    assert main(["benchmark", "--data", str(mvtec), "--categories", cat, *TINY,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    if suffix == ".csv":
        with open(out, newline="") as fh:
            reader = csv.DictReader(fh)
            (row,) = list(reader)
        assert reader.fieldnames == list(TABLE) and b"\r" not in out.read_bytes()
    elif suffix == ".json":
        (row,) = json.loads(out.read_text())
        assert set(row) == set(TABLE)
    else:
        head, _, line, *_ = out.read_text().splitlines()
        row = dict(zip([c.strip() for c in head.strip("|").split("|")],
                       [c.strip() for c in line.strip("|").split("|")]))
    # the same detector, fitted as the benchmark fits it, predicts those rates
    from skad.datasets import load_mvtec

    det = make_detector("patchcore", [a for a in TINY if a != "--param"], seed=0)
    det.fit(load_mvtec(mvtec, cat, "train").paths)
    test = load_mvtec(mvtec, cat, "test")
    predicted = det.predict(test.paths)
    frr = predicted[test.y == 0].mean()
    escape = 1 - predicted[test.y == 1].mean()
    assert float(row["frr"]) == pytest.approx(frr, abs=1e-3)
    assert float(row["escape"]) == pytest.approx(escape, abs=1e-3)
    assert 0 <= float(row["f1"]) <= 1
    assert 0 < float(row["p50_ms"]) <= float(row["p95_ms"])


@pytest.mark.parametrize("argv, message", [
    (["fit", "--train", "/nonexistent", "--out", "x.skad"], "not a folder"),
    (["score", "--model", "/no/model.skad", "--images", ".", "--out", "r"], "does not exist"),
    (["score", "--model", "/", "--images", ".", "--out", "r"], "/ is not a file"),
    (["benchmark", "--data", "/nonexistent"], "does not exist"),
])
def test_errors_are_one_line_with_status_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and message in err


@pytest.mark.parametrize("case", ["downloads disabled", "host unreachable", "missing file",
                                  "missing relative file"])
def test_missing_weights_are_one_line_with_command_line_remedies(mvtec, tmp_path, monkeypatch,
                                                                 capsys, case):
    """Every way weights can be missing ends in one line naming the cause and the
    command line's remedies (not the library's Python ones)."""
    import skad._backbone

    monkeypatch.setattr(skad._backbone, "_cached_hub_file", lambda name: None)  # no cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    params = ["--param", "backbone=\"resnet18.a1_in1k\"", "--param", "image_size=32"]
    if case == "downloads disabled":
        monkeypatch.setenv("SKAD_OFFLINE", "1")
        cause = "downloads are disabled"
    elif case == "host unreachable":
        monkeypatch.delenv("SKAD_OFFLINE", raising=False)
        monkeypatch.setattr(skad._backbone, "_unreachable", lambda url: "no network here")
        cause = "no network here"
    else:
        path = "/no/such/weights.pth" if case == "missing file" else "weights.pth"
        monkeypatch.chdir(tmp_path)
        params += ["--param", f"weights=\"{path}\""]
        cause = f"weights file '{path}' does not exist"
    model = tmp_path / "m.skad"
    assert main(["fit", "--train", str(min(mvtec.iterdir())), "--out", str(model),
                 *params]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and err.count("\n") == 1, err
    assert cause in err and "--offline" in err and "--param weights=" in err
    assert "weights=None" not in err and not model.exists()


def test_unknown_parameter(mvtec, tmp_path, capsys):
    assert main(["fit", "--train", str(mvtec), "--out", str(tmp_path / "m"),
                 "--param", "colour=1"]) == 1
    err = capsys.readouterr().err
    assert "has no parameter colour;" in err  # nothing close to it: no guess
    assert main(["fit", "--train", str(mvtec), "--out", str(tmp_path / "m"),
                 "--param", "coreset_ration=0.1", "--param", "sigm=2"]) == 1
    assert ("has no parameter coreset_ration, sigm (did you mean coreset_ratio, sigma?)"
            in capsys.readouterr().err)
    offered = err.split("its parameters: ")[1].split(", ")
    assert "coreset_ratio" in offered and "false_reject_rate" in offered
    # deprecated ones are not offered: the replaced threshold_quantile, renamed names
    assert "threshold_quantile" not in offered and "n_reweight" not in offered


def test_unknown_parameter_without_the_source(mvtec, tmp_path, capsys, monkeypatch):
    """Where the detector's source cannot be read (bytecode only), the loaded class names
    the unknown parameter, with the same list."""
    import skad.cli

    monkeypatch.setattr(skad.cli, "_declared_parameters", lambda name: None)
    assert main(["fit", "--train", str(mvtec), "--out", str(tmp_path / "m"),
                 "--param", "coreset_ration=0.1"]) == 1
    err = capsys.readouterr().err
    assert "has no parameter coreset_ration (did you mean coreset_ratio?)" in err
    offered = err.split("its parameters: ")[1].strip().split(", ")
    assert "coreset_ratio" in offered and "threshold_quantile" not in offered


def test_none_is_told_to_be_null(mvtec, tmp_path, capsys):
    assert main(["fit", "--method", "metacomparer", "--train", str(mvtec), "--out",
                 str(tmp_path / "m"), "--param", "max_reference_patches=None"]) == 1
    err = capsys.readouterr().err
    assert "max_reference_patches" in err and "None is written null" in err


@pytest.mark.parametrize("method, param, spelled", [
    ("patchcore", "image_size=(640, 256)", "--param image_size=[640,256]"),
    ("mmr", "teacher_layers=(1,2,3)", "--param teacher_layers=[1,2,3]"),
])
def test_a_tuple_is_told_to_be_a_list(mvtec, tmp_path, capsys, method, param, spelled):
    assert main(["fit", "--method", method, "--train", str(mvtec), "--out",
                 str(tmp_path / "m"), "--param", param]) == 1
    err = capsys.readouterr().err
    assert f"a tuple is written as a list: {spelled})" in err


@pytest.mark.parametrize("command", ["fit", "benchmark"])
@pytest.mark.parametrize("param, name", [("batch_size=0", "batch_size"),
                                         ("coreset_ratio=1.5", "coreset_ratio"),
                                         ("image_size=[0,32]", "image_size"),
                                         ("embedding_dim=[64]", "embedding_dim")])
def test_bad_parameter_value_is_one_line_before_any_work(mvtec, tmp_path, capsys, command,
                                                         param, name):
    model = tmp_path / "m.skad"
    where = (["--train", str(mvtec), "--out", str(model)] if command == "fit"
             else ["--data", str(mvtec)])
    assert main([command, *where, *TINY, "--param", param]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"skad: error: The '{name}' parameter of PatchCore must be")
    assert err.count("\n") == 1 and not out and not model.exists()


def test_fit_with_the_released_embedding_saves_and_scores(mvtec, tmp_path, capsys):
    """--param embedding_dim (a JSON list for the pair) reaches PatchCore and its model file."""
    model = tmp_path / "m.skad"
    assert main(["fit", "--train", str(mvtec), "--out", str(model), *TINY,
                 "--param", "embedding_dim=[32,16]"]) == 0
    det = skad.load(model)
    assert list(det.embedding_dim) == [32, 16] and det.memory_bank_.shape[1] == 16
    capsys.readouterr()


def test_benchmark_rows_are_reproducible(mvtec):
    from skad import GeneralAD
    from skad._benchmark import run_benchmark

    def make():  # random_state left None: the row's seed seeds the detector
        return GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,),
                         hidden_dim=32, n_epochs=2, image_size=32)

    cat = sorted(p.name for p in mvtec.iterdir())[:1]
    runs = [run_benchmark(make, str(mvtec), cat, protocol="fewshot", n_references=(3,),
                          seeds=(0, 1), log=lambda line: None) for _ in range(2)]
    metrics = [[(r["image_auroc"], r["pixel_auroc"], r["pro"]) for r in rows] for rows in runs]
    assert metrics[0] == metrics[1]
    assert [r["seed"] for r in runs[0]] == [0, 1]


def test_domains_benchmark_needs_sources(mvtec, capsys):
    from skad._benchmark import run_benchmark

    cat = sorted(p.name for p in mvtec.iterdir())[:1]
    with pytest.raises(ValueError, match=r"two or more categories, got \['[^']+'\]"):
        run_benchmark(lambda: None, str(mvtec), cat, protocol="domains")
    assert main(["benchmark", "--data", str(mvtec), "--method", "metacomparer", "--protocol",
                 "domains", "--categories", cat[0]]) == 1
    assert "skad: error: the domains protocol holds each category out" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["generalad", "mmr", "globallocal"])
@pytest.mark.parametrize("protocol", ["fewshot", "domains"])
def test_benchmark_refuses_too_few_references_before_reading_images(method, protocol,
                                                                    tmp_path, capsys):
    """Position statistics need 3 images: a k below that stops the run before any work,
    wherever it stands in --n-references (last, it used to fail after the others ran)."""
    for cat in ("a", "b"):  # categories whose files cannot be read: none is
        (tmp_path / cat / "train" / "good").mkdir(parents=True)
        (tmp_path / cat / "test").mkdir()
    args = ["benchmark", "--data", str(tmp_path), "--method", method, "--protocol", protocol,
            "--n-references", "4", "8", "2", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "standardize_positions=True) needs at least 3 reference images" in err
    assert "asks for 1, 2. Drop them from n_references (--n-references)" in err
    assert "--param standardize_positions=false" in err
    # without position statistics, the same run goes on to the (empty) data
    assert main([*args, "--param", "standardize_positions=false"]) == 1
    assert "needs at least 3" not in capsys.readouterr().err


def test_oneclass_benchmark_rows_show_their_seed(mvtec):
    """Every row says the seed its detector was given: oneclass rows too (they were blank)."""
    from skad import PatchCore
    from skad._benchmark import markdown_table, run_benchmark

    def make():
        return PatchCore(backbone="test_resnet", weights=None, image_size=32)

    cat = sorted(p.name for p in mvtec.iterdir())[:1]
    rows = run_benchmark(make, str(mvtec), cat, protocol="oneclass", seeds=(0, 1),
                         log=lambda line: None)
    assert [(r["k"], r["seed"]) for r in rows] == [("all", 0), ("all", 1)]
    assert markdown_table(rows).splitlines()[2].startswith(f"| {cat[0]} | all | 0 |")


# ------------------------------------------------------------ batch runs
@pytest.fixture(scope="module")
def model(mvtec, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.skad"
    cat = min(mvtec.iterdir())
    assert main(["fit", "--train", str(cat), "--out", str(path), *TINY]) == 0
    return path


def _images(folder, n=3, size=(32, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    return folder


def _rows(out):
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs_and_model_inside_the_images_are_never_scored(model, tmp_path):
    images = _images(tmp_path / "images")
    inside = images / "model.png"  # a model file named like an image, inside the folder
    inside.write_bytes(model.read_bytes())
    out = images / "results"
    for extra in ([], ["--overwrite"], ["--overwrite"]):
        argv = ["score", "--model", str(inside), "--images", str(images), "--out", str(out)]
        assert main(argv + extra) == 0
        rows = _rows(out)
        assert [Path(r["path"]).name for r in rows] == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [r["map"] for r in rows] + ["scores.csv", "skad-run.json"])
    assert main(["score", "--model", str(model), "--images", str(images), "--out",
                 str(images)]) == 1


def test_overlays_of_earlier_runs_inside_the_images_are_never_scored(model, tmp_path, capsys):
    images = _images(tmp_path / "images")
    originals = ["000.png", "001.png", "002.png"]
    for run in ("run1", "run2", "run3"):  # each run's folder a new one inside the images
        argv = ["score", "--model", str(model), "--images", str(images), "--out",
                str(images / run)]
        assert main(argv) == 0
        assert [Path(r["path"]).name for r in _rows(images / run)] == originals
    # nor fitted on; a scores.csv of the user's own hides nothing
    own = _images(images / "theirs", n=1)
    (own / "scores.csv").write_text("path,score\n000.png,0.5\n")
    from skad.cli import list_images

    assert [Path(p).relative_to(images).as_posix() for p in list_images(images)] == [
        *originals, "theirs/000.png"]
    capsys.readouterr()
    assert main(["score", "--model", str(model), "--images", str(images / "run1"), "--out",
                 str(tmp_path / "out")]) == 1
    assert "3 overlays that earlier skad score runs wrote" in capsys.readouterr().err


def test_unreadable_images_are_rows_and_the_run_goes_on(model, tmp_path, capsys):
    images = _images(tmp_path / "images", n=4)
    good = (images / "001.png").read_bytes()
    (images / "001.png").write_bytes(good[: len(good) // 2])  # truncated
    (images / "002.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(images / "003.tif")  # beyond [0, 1]
    out = tmp_path / "out"
    status = main(["score", "--model", str(model), "--images", str(images), "--out", str(out)])
    assert status == 3
    rows = _rows(out)
    assert len(rows) == 6  # 000.png to 003.png, 002.jpg and 003.tif, in order
    failed = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert sorted(failed) == ["001.png", "002.jpg", "003.tif"]
    assert "003.tif" in failed["003.tif"] and "[0, 1]" in failed["003.tif"]
    for r in rows:
        assert bool(r["error"]) != bool(r["score"]) and bool(r["map"]) == bool(r["score"])
        assert not r["map"] or (out / r["map"]).is_file()
    printed = capsys.readouterr().out
    assert "scored 3 of 6 images" in printed and "3 could not be read" in printed


def test_each_run_writes_into_a_folder_of_its_own(model, tmp_path, capsys):
    images = _images(tmp_path / "images", n=3)
    out = tmp_path / "out"
    argv = ["score", "--model", str(model), "--images", str(images), "--out", str(out)]
    assert main(argv) == 0
    first = {r["map"] for r in _rows(out)}
    (out / "notes.txt").write_text("the user's own file")
    (out / ".DS_Store").write_bytes(b"")
    capsys.readouterr()
    assert main(argv) == 1  # never mixed silently with the previous run's files
    assert "holds a previous run's results" in capsys.readouterr().err
    (images / "000.png").unlink()
    (images / "001.png").rename(images / "a new name.png")
    assert main(argv + ["--overwrite"]) == 0
    second = {r["map"] for r in _rows(out)}
    assert not first & second and len(second) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*second, "scores.csv", "skad-run.json", "notes.txt", ".DS_Store"])
    # a new folder is fine; a folder holding something else needs --overwrite too
    assert main([*argv[:-1], str(tmp_path / "new")]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("")
    assert main([*argv[:-1], str(tmp_path / "busy")]) == 1


def test_output_names_are_always_valid(model, tmp_path):
    images = tmp_path / "images"
    names = ["a" * 246 + ".png", "b" * 246 + ".png", "é" * 120 + ".png", 'x:y"z|w?.png',
             os.fsdecode(b"undecodable-\xff.png"), "dup.png", "sub/dup.png"]
    rng = np.random.default_rng(0)
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "out"
    assert main(["score", "--model", str(model), "--images", str(images), "--out",
                 str(out)]) == 0
    maps = [r["map"] for r in _rows(out)]
    assert len(set(maps)) == len(names)
    for name in maps:
        assert len(name.encode()) <= 255 and not set('<>:"/\\|?*') & set(name)
        assert (out / name).is_file()


def test_files_are_written_with_the_users_umask(mvtec, tmp_path):
    old = os.umask(0o022)
    try:
        model = tmp_path / "m.skad"
        cat = min(mvtec.iterdir())
        assert main(["fit", "--train", str(cat / "train"), "--out", str(model), *TINY]) == 0
        out = tmp_path / "out"
        assert main(["score", "--model", str(model), "--images", str(cat / "test"),
                     "--out", str(out)]) == 0
    finally:
        os.umask(old)
    for path in [model, out / "scores.csv", *out.glob("*.png")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert {p.name for p in tmp_path.iterdir()} == {"m.skad", "out"}  # no temporary file left


def test_fit_on_one_image_says_its_threshold_guarantees_nothing(tmp_path, capsys):
    train = _images(tmp_path / "train", n=1)
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "m.skad"), *TINY]) == 0
    captured = capsys.readouterr()
    assert "fitted PatchCore on 1 image in" in captured.out
    assert "with no false-reject guarantee" in captured.out
    assert "false-reject rate of" not in captured.out
    assert "scored against its own patches" in captured.err


def test_a_remedy_the_library_names_in_python_is_also_given_as_a_param(tmp_path, capsys):
    """GeneralAD's position statistics need 3 images: the error's remedy
    (standardize_positions=False) is written as the command line takes it, and works."""
    train = _images(tmp_path / "train", n=2)
    args = ["fit", "--method", "generalad", "--train", str(train), "--out",
            str(tmp_path / "m.skad"), "--param", "backbone=\"test_efficientnet\"", "--param",
            "weights=null", "--param", "layers=[2]", "--param", "hidden_dim=16", "--param",
            "n_epochs=1", "--param", "image_size=32"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "or standardize_positions=False (on the command line: --param " \
           "standardize_positions=false)" in err
    assert main([*args, "--param", "standardize_positions=false"]) == 0


_TINY_GAD = ["--method", "generalad", "--param", "backbone=\"test_efficientnet\"", "--param",
             "weights=null", "--param", "layers=[2]", "--param", "hidden_dim=16", "--param",
             "n_epochs=1", "--param", "image_size=32"]


def test_fit_checks_its_reference_count_before_training(tmp_path, capsys, monkeypatch):
    """--reference with 2 images cannot calibrate GeneralAD's position statistics: said
    before the training (minutes on real images), not after it."""
    train, reference = _images(tmp_path / "train", n=6), _images(tmp_path / "ref", n=2)
    monkeypatch.setattr(skad.GeneralAD, "_fit", lambda *a: pytest.fail("trained first"))
    assert main(["fit", "--train", str(train), "--reference", str(reference), "--out",
                 str(tmp_path / "m.skad"), *_TINY_GAD]) == 1
    err = capsys.readouterr().err
    assert "needs at least 3 reference images" in err and f"got 2 in --reference {reference}" in err
    assert not (tmp_path / "m.skad").exists()


def test_fit_says_a_training_set_reference_guarantees_no_rate(tmp_path, capsys):
    """GeneralAD calibrated on its own training images promises no rate and says why;
    with --reference the held-out images calibrate and nothing is said of the training set."""
    train, reference = _images(tmp_path / "train", n=6), _images(tmp_path / "ref", n=11)
    for i in range(6):  # the same pixels as the training images (one random sequence)
        (reference / f"{i:03d}.png").unlink()
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "a.skad"),
                 "--false-reject-rate", "0.4", *_TINY_GAD]) == 0
    captured = capsys.readouterr()
    assert "with no false-reject guarantee" in captured.out
    assert "skad: warning: GeneralAD: threshold_ and pixel_threshold_ were calibrated on the " \
           "training images" in captured.err and "(skad fit --reference)" in captured.err
    assert main(["fit", "--train", str(train), "--reference", str(reference), "--out",
                 str(tmp_path / "b.skad"), "--false-reject-rate", "0.4", *_TINY_GAD]) == 0
    captured = capsys.readouterr()
    assert "at a false-reject rate of 0.333" in captured.out
    assert "training images" not in captured.err
    assert skad.load(tmp_path / "b.skad").n_references_trained_on_ == 0
    # the training folder again as --reference is told by its pixels: no rate either
    assert main(["fit", "--train", str(train), "--reference", str(train), "--out",
                 str(tmp_path / "c.skad"), "--false-reject-rate", "0.4", *_TINY_GAD]) == 0
    captured = capsys.readouterr()
    assert "with no false-reject guarantee" in captured.out
    assert "6 of which are training images" not in captured.err  # all: as fit
    assert "calibrated on the training images" in captured.err
    # scoring says it too, in its last line
    for name, said in [("a", "(with no false-reject guarantee: give good images the model "
                              "was not trained on with --reference)"),
                       ("b", "(set for a false-reject rate of at most 0.333 on good parts "
                              "like its references)")]:
        assert main(["score", "--model", str(tmp_path / f"{name}.skad"), "--images",
                     str(reference), "--out", str(tmp_path / f"res_{name}")]) == 0
        assert said in capsys.readouterr().out.splitlines()[-1]
    # --reference given, but its images are the training images: it names them, not asks
    assert main(["score", "--model", str(tmp_path / "b.skad"), "--reference", str(train),
                 "--images", str(reference), "--out", str(tmp_path / "res_c")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert f"(with no false-reject guarantee: --reference {train} holds images the model " \
           "was trained on, or a single image scored against itself" in last


@pytest.mark.parametrize("message, hint", [
    ("Label some defective images or set synthesize_anomalies='auto' (or True)",
     "--param synthesize_anomalies=auto"),
    ("too few for it, or set false_reject_rate=0.2.", "--param false_reject_rate=0.2"),
    ("or max_reference_patches=None", "--param max_reference_patches=null"),
    ("or set batch_size=1e-3x", None),  # not a value: no hint
    ("X has standardize_positions=True but its reference was set without it", None),
])
def test_python_remedies_are_translated_to_params(message, hint):
    from skad.cli import CLIError, _one_line

    line = _one_line(ValueError(message))
    assert line == (message if hint is None else f"{message} (on the command line: {hint})")
    assert _one_line(CLIError(message)) == message  # the command line's own words stay


def test_training_folders_skip_debris_and_say_so_with_verbose(mvtec, tmp_path, capsys):
    train = _images(tmp_path / "train", n=4)
    copies = _images(train / ".ipynb_checkpoints", n=4)
    (train / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (train / "Thumbs.db").write_bytes(b"")
    _images(train / "__MACOSX", n=2)
    assert copies.is_dir()
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "m.skad"),
                 "-v", *TINY]) == 0
    captured = capsys.readouterr()
    assert "fitted PatchCore on 4 images" in captured.out
    assert ".ipynb_checkpoints" in captured.err and "._000.png" in captured.err
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "m.skad"),
                 "--overwrite", *TINY]) == 0
    assert "skipped" not in capsys.readouterr().err  # quiet without --verbose


def _model_file(tmp_path, content):
    path = tmp_path / "bad.skad"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "EOFError"),
    (b"\x80\x04\x95\x10\x00\x00", "cannot load model file"),        # truncated pickle
    (b"PK\x03\x04 a zip archive", "cannot load model file"),
    (b"cnonexistent_module\nFoo\n)\x81.", "ModuleNotFoundError"),
    (b"cskad\nNoSuchClass\n)\x81.", "AttributeError"),
    (pickle.dumps({"not": "a detector"}), "holds an object of type dict, not a skad detector"),
])
def test_bad_pickles_with_allow_pickle_are_one_line_errors(model, tmp_path, capsys, content,
                                                           message):
    bad = _model_file(tmp_path, content)
    assert main(["score", "--model", str(bad), "--images", str(_images(tmp_path / "i")),
                 "--out", str(tmp_path / "out"), "--allow-pickle"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: not a skad model file"),
    (b"PK\x03\x04 a zip archive", "is not a skad model file"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", "not a readable safetensors file"),
    # a pickle that would create a file when unpickled: refused unread
    (pickle.dumps(["a list"]), "is a pickle"),
    (b"cos\nsystem\n(S'touch ran'\ntR.", "is a pickle"),  # protocol 0
    (b"\x80\x04\x95\x10\x00\x00", "is a pickle"),
])
def test_model_files_are_read_safely(model, tmp_path, capsys, content, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _model_file(tmp_path, content)
    assert main(["score", "--model", str(bad), "--images", str(_images(tmp_path / "i")),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "ran").exists()
    if message == "is a pickle":
        assert "--allow-pickle" in err and "RUNS" not in err


def test_a_pickled_model_loads_with_allow_pickle(model, tmp_path):
    import joblib

    path = tmp_path / "m.joblib"
    joblib.dump(skad.load(model), path)
    argv = ["score", "--model", str(path), "--images", str(_images(tmp_path / "i")),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert main([*argv, "--allow-pickle"]) == 0


def test_truncated_real_model_is_a_one_line_error(model, tmp_path, capsys):
    data = model.read_bytes()
    bad = _model_file(tmp_path, data[: len(data) // 3])
    assert main(["score", "--model", str(bad), "--images", str(_images(tmp_path / "i")),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and "(is it complete?)" in err
    assert err.count("\n") == 1


def test_diverging_fit_and_unreadable_folders_are_one_line_errors(mvtec, tmp_path, capsys,
                                                                  monkeypatch):
    import skad._files

    def diverge(self, images, y, groups):
        raise FloatingPointError("PatchCore: the loss became nan at epoch 1; lower the "
                                 "learning rate or check the input images")

    train = _images(tmp_path / "train")
    monkeypatch.setattr(skad.PatchCore, "_fit", diverge)
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "m"), *TINY]) == 1
    assert capsys.readouterr().err.startswith("skad: error: PatchCore: the loss became nan")
    monkeypatch.undo()

    listing = skad._files._entries

    def locked(folder):
        if Path(folder).name == "locked":
            raise PermissionError(13, "Permission denied", str(folder))
        return listing(folder)

    (train / "locked").mkdir()
    monkeypatch.setattr(skad._files, "_entries", locked)
    assert main(["fit", "--train", str(train), "--out", str(tmp_path / "m"), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and "locked" in err and err.count("\n") == 1


def test_help_imports_no_torch():
    """``skad --help`` and argument errors must not wait for torch, timm or scikit-learn."""
    code = ("import sys, skad.cli; skad.cli._parser().format_help(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'sklearn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [
    ["score", "--model", "/no/model.skad", "--images", ".", "--out", "r"],
    ["fit", "--train", "/no/folder", "--out", "m.skad"],
    ["benchmark", "--data", "/no/folder"],
    ["fit", "--train", ".", "--out", "m.skad", "--param", "colour=1"],
    ["fit", "--method", "mmr", "--train", ".", "--out", "m.skad", "--param", "n_epoch=1"],
    ["benchmark", "--data", ".", "--method", "generalad", "--param", "layer=[3]"],
    ["benchmark", "--data", ".", "--method", "patchcore", "--param", "coreset_ration=0.1"],
])
def test_usage_errors_do_not_wait_for_torch(argv, tmp_path):
    """A mistyped path or parameter name is reported before torch and timm load (seconds on
    a busy machine)."""
    code = ("import sys, skad.cli; rc = skad.cli.main(sys.argv[1:]); "
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm'}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "1 []" and out.stderr.startswith("skad: error:")


def test_parameter_names_read_from_the_source_are_the_detectors_own():
    """The names the command line checks before importing a detector (read from its
    module's source) are those of its get_params, deprecated ones marked."""
    from skad._params import is_set
    from skad.cli import METHODS, _declared_parameters

    for name in METHODS.values():
        params = getattr(skad, name)().get_params()
        assert _declared_parameters(name) == {k: is_set(v) for k, v in params.items()}, name
    assert _declared_parameters("PatchCore")["coreset_ratio"]
    assert not _declared_parameters("GlobalLocal")["lambda_s"]  # deprecated: not offered


def test_the_same_image_gets_the_same_picture_alone_or_with_others(model, mvtec, tmp_path):
    """Overlays are on the model's colour scale, not the run's: a good image scored with
    others and scored alone gives the same PNG, pixel for pixel."""
    cat = min(mvtec.iterdir())
    first = min((cat / "test" / "good").glob("*.png"))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / first.name).write_bytes(first.read_bytes())
    pictures = []
    for images, out in ((cat / "test", tmp_path / "all"), (alone, tmp_path / "one")):
        assert main(["score", "--model", str(model), "--images", str(images),
                     "--out", str(out)]) == 0
        (row,) = [r for r in _rows(out) if Path(r["path"]).name == first.name]
        pictures.append(np.asarray(Image.open(out / row["map"])))
    np.testing.assert_array_equal(pictures[0], pictures[1])


def _band_height(text):
    from PIL import ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((2, 1), text)[3] + 2


@pytest.mark.parametrize("image_threshold", ["low", "high"])
def test_the_verdict_says_how_the_two_thresholds_fell(model, tmp_path, monkeypatch,
                                                      image_threshold):
    """The image threshold decides; regions above the pixel threshold on a pass are said
    to be below the image threshold, and a reject without any says so."""
    import skad.viz

    det = skad.load(model)
    images = _images(tmp_path / "images", n=3, size=(64, 96))
    paths = [str(p) for p in sorted(images.iterdir())]
    maps, scores = det.predict_map(paths), det.decision_function(paths)
    det.pixel_threshold_ = float(np.median(maps))  # regions on every image
    det.threshold_ = float(scores.min() - 1 if image_threshold == "low" else scores.max() + 1)
    if image_threshold == "low":  # and none: every pixel below the pixel threshold
        det.pixel_threshold_ = float(np.max(maps) + 1)
    skad.save(det, tmp_path / "t.skad")
    texts = []
    draw = skad.viz.overlay
    monkeypatch.setattr(skad.viz, "overlay", lambda *a, text, **k: texts.append(text) or
                        draw(*a, text=text, **k))
    assert main(["score", "--model", str(tmp_path / "t.skad"), "--images", str(images),
                 "--out", str(tmp_path / "res"), "--overlays", "all"]) == 0
    verdicts = [t.split("  ")[-1] for t in texts]
    rows = _rows(tmp_path / "res")
    assert len(verdicts) == len(rows) == 3
    for row, verdict in zip(rows, verdicts):
        n = int(row["n_regions"])
        if image_threshold == "low":
            assert row["predicted_label"] == "1" and n == 0 and verdict == "REJECT, no region"
        else:
            assert row["predicted_label"] == "0" and n > 0
            assert verdict == f"pass, {n} region{'s' if n > 1 else ''} below the image threshold"


def test_overlays_carry_the_verdict_and_outline_the_regions(model, tmp_path):
    from scipy import ndimage

    det = skad.load(model)
    images = _images(tmp_path / "images", n=3, size=(64, 96))
    # a pixel threshold at the maps' median, so that there are regions to outline
    det.pixel_threshold_ = float(np.median(det.predict_map([str(p) for p in
                                                            sorted(images.iterdir())])))
    model = tmp_path / "low.skad"
    skad.save(det, model)
    out = tmp_path / "res"
    assert main(["score", "--model", str(model), "--images", str(images), "--out", str(out)]) == 0
    assert all(int(r["n_regions"]) > 0 for r in _rows(out))
    for row in _rows(out):
        picture = np.asarray(Image.open(out / row["map"]).convert("RGB"))
        n = int(row["n_regions"])
        verdict = ("REJECT" if row["predicted_label"] == "1" else
                   f"pass, {n} region{'s' if n > 1 else ''} below the image threshold")
        text = f"{float(row['score']):.4g}  p={float(row['p_value']):.3g}  {verdict}"
        band = _band_height(text)
        # the text on a band above the image, which keeps every pixel of it
        assert picture.shape[0] == 64 + band and picture.shape[1] >= 96
        assert (picture[:band, 0] == 0).all() and (picture[band:, 96:] == 0).all()
        # the white pixels of the image are exactly the outlines of the predicted regions
        mask = det.predict_mask([row["path"]])[0]
        outline = mask & ~ndimage.binary_erosion(mask, border_value=1)
        white = (picture[band:, :96] == 255).all(axis=-1)
        np.testing.assert_array_equal(white, outline)
        assert (int(row["n_regions"]) > 0) == bool(mask.any())


@pytest.mark.parametrize("fmt", ["npy", "tiff"])
def test_raw_maps_on_request_equal_predict_map(model, tmp_path, fmt):
    det = skad.load(model)
    images = _images(tmp_path / "images", n=3, size=(24, 40))
    out = tmp_path / "res"
    argv = ["score", "--model", str(model), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--save-maps", fmt]) == 0
    for row in _rows(out):
        path = out / row["raw_map"]
        saved = np.load(path) if fmt == "npy" else np.asarray(Image.open(path))
        assert saved.dtype == np.float32 and saved.shape == (24, 40)
        np.testing.assert_allclose(saved, det.predict_map([row["path"]])[0], rtol=1e-5,
                                   atol=1e-6)
    # --overwrite removes them with the rest of the previous run; no maps unless asked
    assert main([*argv, "--overwrite"]) == 0
    assert not list(out.glob(f"*.{fmt}")) and all(r["raw_map"] == "" for r in _rows(out))


def test_min_area_drops_small_regions(model, tmp_path):
    images = _images(tmp_path / "images", n=3)
    counts = {}
    for min_area in (1, 10_000):
        out = tmp_path / f"res{min_area}"
        assert main(["score", "--model", str(model), "--images", str(images), "--out", str(out),
                     "--min-area", str(min_area)]) == 0
        counts[min_area] = [int(r["n_regions"]) for r in _rows(out)]
    assert counts[10_000] == [0, 0, 0] and len(counts[1]) == 3
    with pytest.raises(SystemExit):
        main(["score", "--model", str(model), "--images", str(images),
              "--out", str(tmp_path / "bad"), "--min-area", "0"])


@pytest.mark.parametrize("argv, message", [
    (["fit", "--method", "patchcor", "--train", ".", "--out", "x"],
     "unknown method 'patchcor'; did you mean patchcore?"),
    (["benchmark", "--method", "nope", "--data", "."], "unknown method 'nope'"),
    (["fit", "--train", ".", "--out", "x", "--param", "coreset_ratio"],
     "expected NAME=VALUE; got 'coreset_ratio'"),
    (["benchmark", "--data", ".", "--param", "k"], "expected NAME=VALUE"),
])
def test_command_line_mistakes_exit_2_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_mvtec_root_gives_one_class_methods_train_good_only(mvtec, tmp_path, capsys):
    """From a root, PatchCore fits on every category's train/good, never on test images."""
    n_train = sum(len(list((c / "train" / "good").glob("*.png"))) for c in mvtec.iterdir())
    assert main(["fit", "--train", str(mvtec), "--out", str(tmp_path / "m.skad"), *TINY]) == 0
    out = capsys.readouterr().out
    assert f"fitted PatchCore on {n_train} images" in out
    assert "RANDOM backbone weights: for tests only" in out  # TINY has weights=null


@pytest.mark.parametrize("command", ["score", "demo"])
def test_an_output_that_is_a_file_is_a_one_line_error(model, tmp_path, capsys, command):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    argv = (["score", "--model", str(model), "--images", str(tmp_path), "--out", str(target)]
            if command == "score" else ["demo", "--out", str(target)])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"skad: error: --out must be a folder; {target} is a file\n"
    assert target.read_text() == "mine"


def test_progress_bars_on_a_terminal_by_default_and_as_asked(model, tmp_path, capsys,
                                                              monkeypatch):
    """Bars when stderr is a terminal or with --progress; none in a log by default or with
    --no-progress. The run's bar counts batches; the detector's own bars stay off inside."""
    images = _images(tmp_path / "images", n=5)

    def score(name, *options):
        assert main(["score", "--model", str(model), "--images", str(images),
                     "--out", str(tmp_path / name), *options]) == 0
        return capsys.readouterr().err

    assert score("quiet") == ""  # stderr captured: not a terminal
    err = score("forced", "--progress")
    # the listing is lazy: the bar counts chunks without a total, the images beside
    assert "scoring: 1 [" in err and "chunk/s, (5 images" in err and "\r" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    err = score("terminal")
    assert "\rscoring: 1chunk" in err and "(5 images" in err
    assert "reference" not in err and "batch" not in err  # no detector bar per chunk
    assert score("off", "--no-progress") == ""


def test_a_log_file_gets_plain_progress_lines_and_the_records_asked_for(mvtec, tmp_path):
    """``skad fit --progress -vv 2> log``: whole lines (no carriage returns), the
    detector's parameters at DEBUG; -v and --progress are independent."""
    cat = min(mvtec.iterdir())
    argv = ["fit", "--train", str(cat), "--out", str(tmp_path / "m.skad"), "--overwrite",
            *TINY]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "skad.cli", *argv]
    log = subprocess.run([*run, "--progress", "-vv"], capture_output=True, text=True,
                         env=env, check=True).stderr
    assert "\r" not in log and "\x1b" not in log
    lines = log.splitlines()
    assert "skad: detector: PatchCore(" in lines[0]
    assert any(re.match(r"coreset: 100% \d+/\d+ \[", line) for line in lines)
    quiet = subprocess.run([*run, "-v"], capture_output=True, text=True, env=env,
                           check=True).stderr
    assert "coreset" not in quiet and "detector:" not in quiet  # no bars, INFO only


def test_fit_out_is_checked_before_the_fit(mvtec, tmp_path, capsys, monkeypatch):
    cat = min(mvtec.iterdir())
    monkeypatch.setattr("skad.BaseDetector.fit", lambda *a, **k: pytest.fail("fitted"))
    (tmp_path / "folder").mkdir()
    existing = tmp_path / "old.skad"
    existing.write_bytes(b"a model to keep")
    for out, message in [(tmp_path / "folder", "is a folder"), (existing, "--overwrite")]:
        assert main(["fit", "--train", str(cat), "--out", str(out), *TINY]) == 1
        err = capsys.readouterr().err
        assert err.startswith("skad: error:") and message in err and err.count("\n") == 1
    assert existing.read_bytes() == b"a model to keep"


def test_a_metacomparer_fit_without_reference_says_so(mvtec, tmp_path, capsys):
    out = tmp_path / "mc.skad"
    assert main(["fit", "--method", "metacomparer", "--train", str(mvtec), "--out", str(out),
                 *TINY, "--param", "fpn_width=8", "--param", "n_fpn_cells=1",
                 "--param", "hidden_layer_sizes=[8]", "--param", "attention_dim=4",
                 "--param", "n_epochs=1", "--param", "n_episodes=1"]) == 0
    assert "no reference yet: pass --reference to skad score" in capsys.readouterr().out
    assert not hasattr(skad.load(out), "threshold_")


def test_a_version_mismatch_is_one_warning_line(model, tmp_path, capsys):
    from test_serialization import _rewrite

    path = tmp_path / "old.skad"
    path.write_bytes(model.read_bytes())
    _rewrite(path, lambda h, t: h["versions"].update({"skad": "0.1.0"}))
    assert main(["score", "--model", str(path), "--images", str(_images(tmp_path / "i")),
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "0.1.0" in x]
    assert line.startswith("skad: warning:") and "written with skad 0.1.0" in line


@pytest.mark.parametrize("name", ["model.joblib", "line 2's model.joblib", "evil.skad"])
def test_the_conversion_command_runs_as_printed(model, tmp_path, capsys, name):
    import joblib

    pickled = tmp_path / name
    joblib.dump(skad.load(model), pickled)
    assert main(["score", "--model", str(pickled), "--images", str(_images(tmp_path / "i")),
                 "--out", str(tmp_path / "out")]) == 1
    command = capsys.readouterr().err.split("to the safe format: ", 1)[1].strip()
    assert command.startswith("python -c ")
    argv = shlex.split(command)
    subprocess.run([sys.executable, *argv[1:]], check=True, cwd=tmp_path)
    converted = [p for p in tmp_path.iterdir() if p.suffix == ".skad" and p != pickled]
    assert len(converted) == 1 and pickled.is_file()  # a new file; the pickle is left alone
    assert main(["score", "--model", str(converted[0]), "--images", str(tmp_path / "i"),
                 "--out", str(tmp_path / "out2")]) == 0


@pytest.mark.parametrize("extra,named", [
    ([], ["false_reject_rate"]),  # 5 training images: too few for 0.05
    (["--param", "max_calibration_references=3", "--reference", "REFS"],
     ["max_calibration_references", "false_reject_rate"]),  # 20 references, 3 calibrate
])
def test_calibration_warnings_are_lines_that_name_the_command_line(mvtec, tmp_path, capsys,
                                                                   extra, named):
    cat = sorted(p for p in mvtec.iterdir())[0]
    refs = str(_images(tmp_path / "refs", n=20))
    extra = [refs if x == "REFS" else x for x in extra]
    assert main(["fit", "--train", str(cat), "--out", str(tmp_path / "m.skad"), *TINY,
                 *extra]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "cannot support false_reject_rate" in x]
    assert lines and all(x.startswith("skad: warning: PatchCore:") for x in lines)
    hint = " or ".join("--false-reject-rate ..." if n == "false_reject_rate" else
                       f"--param {n}=..." for n in named)
    if "max_calibration_references" in named:  # "set it to at least 19 (or None)"
        hint += "; None is null there"
    assert lines[-1].endswith(f"(on the command line: {hint})")
    assert "CalibrationWarning" not in err and "warnings.warn" not in err


@pytest.mark.parametrize("extra,rate", [
    (["--false-reject-rate", "0.2"], 0.2),
    (["--false-reject-rate", "0.2", "--param", "false_reject_rate=0.3"], 0.3),  # --param wins
])
def test_fit_calibrates_for_the_false_reject_rate_given(mvtec, tmp_path, capsys, extra, rate):
    cat = sorted(p for p in mvtec.iterdir())[0]
    out = tmp_path / "m.skad"
    assert main(["fit", "--train", str(cat), "--out", str(out), *TINY, *extra]) == 0
    det = skad.load(out)
    assert det.false_reject_rate == rate
    printed = capsys.readouterr().out
    # 5 references calibrate: steps of 1/6, so 0.167 for 0.2 and 0.167 for 0.3 asked
    assert (f"at a false-reject rate of {det.false_reject_rate_:.3g} ({rate:g} asked; 5 "
            "references calibrate it, in steps of 1/6)") in printed
    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit):
            main(["fit", "--train", str(cat), "--out", str(tmp_path / "b.skad"),
                  "--false-reject-rate", bad])


@pytest.mark.parametrize("mask_paths,n_masks", [
    (["ground_truth/crack/000_mask.png"], 1),  # MVTec AD's layout
    (["masks/a.png", "b_mask.png", "Sub/GT/c.png"], 3),  # other folders, a *_mask name
    (["masked/000.png", "gtx/001.png"], 0),  # names that only contain a mask word
])
def test_fit_warns_when_a_folder_of_good_parts_holds_masks(tmp_path, capsys, mask_paths,
                                                           n_masks):
    train, refs = _images(tmp_path / "train", n=5), _images(tmp_path / "refs", n=5)
    for folder in (train, refs):
        for rel in mask_paths:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / rel)
    assert main(["fit", "--train", str(train), "--reference", str(refs), "--out",
                 str(tmp_path / "m.skad"), *TINY, "--false-reject-rate", "0.25"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "look like defect masks" in x]
    if not n_masks:
        assert not lines
        return
    for line, option, folder in zip(lines, ["--train", "--reference"], [train, refs], strict=True):
        assert line.startswith(f"skad: warning: {option} {folder}: {n_masks} of its "
                               f"{5 + len(mask_paths)} images look like defect masks")
        assert f"first {folder / sorted(mask_paths)[0]};" in line  # the listing's order


def test_progress_is_the_commands_choice_not_the_models(mvtec, tmp_path, capsys):
    """fit --progress saves a silent model; score --no-progress is silent with a model
    saved to show bars (--param verbose=1), also while it sets a new reference."""
    cat = sorted(p for p in mvtec.iterdir())[0]
    quiet, loud = tmp_path / "quiet.skad", tmp_path / "loud.skad"
    assert main(["fit", "--train", str(cat), "--out", str(quiet), *TINY, "--progress"]) == 0
    assert skad.load(quiet).verbose == 0
    assert main(["fit", "--train", str(cat), "--out", str(loud), *TINY, "--param",
                 "verbose=1"]) == 0
    assert skad.load(loud).verbose == 1
    refs, images = _images(tmp_path / "refs", n=5), _images(tmp_path / "i")
    capsys.readouterr()
    for progress, bars in (("--progress", True), ("--no-progress", False)):
        assert main(["score", "--model", str(loud), "--images", str(images), "--reference",
                     str(refs), "--out", str(tmp_path / progress), progress]) == 0
        err = capsys.readouterr().err
        assert ("leave-one-out scores" in err) == bars, err


def test_other_library_warnings_are_kept_as_python_warnings(capsys):
    from skad.cli import _warnings_as_lines

    with pytest.warns(DeprecationWarning, match="a library's"), _warnings_as_lines():
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    with _warnings_as_lines():
        warnings.warn("a user warning without parameters", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "skad: warning: a user warning without parameters\n"


def test_benchmark_mean_row_rounds_every_column():
    from skad._benchmark import COLUMNS, markdown_table

    base = {k: 0.5 for k in COLUMNS}
    rows = [{**base, "category": c, "k": "all", "seed": 0, "n_good": n}
            for c, n in (("a", 34), ("b", 47), ("c", 96))]
    mean = markdown_table(rows).splitlines()[-1].split(" | ")
    assert mean[0] == "| **mean**" and mean[list(COLUMNS).index("n_good")] == "59"
    assert all(len(cell) <= 6 for cell in mean[1:])  # no float printed in full


def test_warning_lines_come_when_warned_and_once_per_place(capsys):
    from skad.cli import _warnings_as_lines

    with _warnings_as_lines():
        for _ in range(3):
            warnings.warn("left out 2 images", UserWarning, stacklevel=1)
        assert capsys.readouterr().err == "skad: warning: left out 2 images\n"  # not at the end


def test_score_warnings_say_the_option_that_sets_the_rate(model, tmp_path, capsys):
    refs = str(_images(tmp_path / "refs", n=5))
    assert main(["score", "--model", str(model), "--images", str(_images(tmp_path / "i")),
                 "--reference", refs, "--out", str(tmp_path / "out")]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "cannot support" in x]
    assert line.startswith("skad: warning: ")
    assert line.endswith("(on the command line: --false-reject-rate ...)")
    from skad.cli import _on_the_command_line

    advice = "raise max_calibration_references or false_reject_rate"
    assert _on_the_command_line(advice, "fit").endswith(
        "(on the command line: --param max_calibration_references=... or "
        "--false-reject-rate ...)")
    assert _on_the_command_line(advice, "export").endswith(
        "(on the command line: skad fit --param max_calibration_references=... or "
        "--false-reject-rate ...)")


def test_score_recalibrates_for_another_false_reject_rate(model, tmp_path, capsys):
    """--false-reject-rate: the thresholds calibrated for it on the stored reference scores
    (or on --reference's images), without training; the model file is unchanged."""
    import skad
    from skad.thresholds import conformal_threshold

    images = str(_images(tmp_path / "i", n=4))
    before = model.read_bytes()
    det = skad.load(model)
    for rate in (0.2, 0.5):
        out = tmp_path / f"out{rate}"
        assert main(["score", "--model", str(model), "--images", images, "--out", str(out),
                     "--false-reject-rate", str(rate)]) == 0
        (threshold,) = {float(r["threshold"]) for r in _rows(out)}
        expected = conformal_threshold(det.reference_scores_, rate)
        assert threshold == pytest.approx(expected, rel=1e-5)  # written to 6 digits
        rows = _rows(out)
        assert all(r["predicted_label"] == str(int(float(r["score"]) > threshold))
                   for r in rows)
    assert float(_rows(tmp_path / "out0.5")[0]["threshold"]) < float(
        _rows(tmp_path / "out0.2")[0]["threshold"])
    assert model.read_bytes() == before
    # with new references, calibrated on them at that rate
    refs = str(_images(tmp_path / "refs", n=9, size=(40, 40)))
    assert main(["score", "--model", str(model), "--images", images, "--out",
                 str(tmp_path / "outr"), "--reference", refs, "--false-reject-rate", "0.3"]) == 0
    det.set_params(false_reject_rate=0.3).set_reference(
        sorted(str(p) for p in (tmp_path / "refs").iterdir()))
    assert float(_rows(tmp_path / "outr")[0]["threshold"]) == pytest.approx(det.threshold_,
                                                                           rel=1e-5)
    for bad in ("0", "1", "1.5", "abc"):
        with pytest.raises(SystemExit):
            main(["score", "--model", str(model), "--images", images, "--out",
                  str(tmp_path / "x"), "--false-reject-rate", bad])
        assert "expected a rate between 0 and 1" in capsys.readouterr().err


def test_a_renamed_parameter_is_one_line_with_its_new_param(mvtec, tmp_path, capsys):
    cat = sorted(p for p in mvtec.iterdir())[0]
    assert main(["fit", "--train", str(cat), "--out", str(tmp_path / "m.skad"), *TINY,
                 "--param", "n_reweight=3"]) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "n_reweight" in x]
    assert line.startswith("skad: warning: PatchCore's parameter 'n_reweight' was renamed")
    assert line.endswith("use --param n_reweight_neighbors=3")
    assert "FutureWarning" not in err


def test_a_missing_weights_file_is_said_as_such(mvtec, tmp_path, capsys):
    cat = sorted(p for p in mvtec.iterdir())[0]
    args = ["fit", "--train", str(cat), "--out", str(tmp_path / "m.skad"), "--offline",
            "--param", "weights=/no/such/weights.pth", "--param", "image_size=32"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "/no/such/weights.pth" in err and "does not exist" in err
    assert "Add --offline" not in err and "--param weights=" in err


def test_offline_settings_documented_as_they_are():
    """docs/usage.md's ``--offline`` table lists each method's settings exactly as
    :data:`skad.cli.OFFLINE` holds them (it once named a student the code no longer used)."""
    import ast

    from skad.cli import OFFLINE

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    table = text[text.index("| method | settings under `--offline` |"):]
    table = table[:table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        method, settings = (cell.strip() for cell in row.strip("|").split("|"))
        pairs = re.findall(r"`(\w+)=([^`]+)`", settings)
        documented[method.strip("`")] = {k: ast.literal_eval(v) for k, v in pairs}
    assert documented == OFFLINE


def test_fit_says_how_to_keep_the_images_ratio(tmp_path, capsys):
    """Images the resize would squash: a warning line with the --param that keeps their
    ratio, and that setting, passed back, fits without it."""
    train = str(_images(tmp_path / "train", n=4, size=(80, 32)))
    args = ["fit", "--method", "patchcore", "--train", train, *TINY[:4]]
    assert main([*args, "--param", "image_size=32", "--out", str(tmp_path / "a.skad")]) == 0
    err = capsys.readouterr().err
    assert "4 of 4 training images change their height-to-width ratio" in err
    hint = re.search(r"on the command line: --param (image_size=\[\d+,\d+\])\)", err)
    assert hint and hint[1] == "image_size=[96,32]"
    assert main([*args, "--param", hint[1], "--out", str(tmp_path / "b.skad")]) == 0
    assert "height-to-width" not in capsys.readouterr().err


def test_score_warns_when_it_scores_the_models_references(model, mvtec, tmp_path, capsys):
    """skad score on the references (here the training folder of a PatchCore) says their
    scores are in-sample, naming files, once; on other images it says nothing."""
    cat = min(mvtec.iterdir())
    assert main(["score", "--model", str(model), "--images", str(cat / "train"), "--out",
                 str(tmp_path / "a"), "--chunk-size", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "references of" in line]
    assert len(lines) == 1 and lines[0].startswith("skad: warning: scoring images with the same")
    assert str(cat / "train" / "good") in lines[0] and "leave them out of --images" in lines[0]
    assert main(["score", "--model", str(model), "--images", str(_images(tmp_path / "new")),
                 "--out", str(tmp_path / "b")]) == 0
    assert "references of" not in capsys.readouterr().err


def test_score_refuses_a_model_saved_with_a_changed_scoring_parameter(model, mvtec, tmp_path,
                                                                         capsys):
    """A model whose sigma changed after its reference was set: its thresholds do not hold
    for the new maps, so skad score refuses (saying how on the command line) until
    --reference sets them again; saving it warned."""
    det = skad.load(model)
    det.set_params(sigma=det.sigma / 2)
    stale = tmp_path / "stale.skad"
    with pytest.warns(skad.thresholds.CalibrationWarning,
                      match=f"changed sigma from {det.sigma * 2!r} to {det.sigma!r}"):
        skad.save(det, stale)
    cat = min(mvtec.iterdir())
    images = str(cat / "test")
    assert main(["score", "--model", str(stale), "--images", images, "--out",
                 str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"changed sigma from {det.sigma * 2!r} to {det.sigma!r}" in err
    assert "pass --reference with a folder of good images" in err
    assert "set it back" not in err  # the command line cannot
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert main(["score", "--model", str(stale), "--reference", str(cat / "train"), "--images",
                 images, "--out", str(tmp_path / "b")]) == 0
