"""The skad command: fit, score, benchmark and clear errors."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skad.cli import main
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
    model = tmp_path / "m.joblib"
    cat = sorted(p for p in mvtec.iterdir())[0]
    assert main(["fit", "--train", str(cat), "--out", str(model), *TINY]) == 0
    assert model.is_file() and not list(tmp_path.glob("*.tmp"))
    out = tmp_path / "res"
    assert main(["score", "--model", str(model), "--images", str(cat / "test"),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == len(list((cat / "test").rglob("*.png")))
    assert {r["label"] for r in rows} <= {"0", "1"}
    assert all((out / r["map"]).is_file() for r in rows)
    assert "scored" in capsys.readouterr().out


def test_benchmark_prints_a_table(mvtec, capsys):
    assert main(["benchmark", "--data", str(mvtec), "--protocol", "domains",
                 "--n-references", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| category |" in out and "**mean**" in out


@pytest.mark.parametrize("argv, message", [
    (["fit", "--train", "/nonexistent", "--out", "x.joblib"], "not a folder"),
    (["fit", "--method", "nope", "--train", ".", "--out", "x"], "unknown method"),
    (["score", "--model", "/no/model.joblib", "--images", ".", "--out", "r"], "does not exist"),
    (["benchmark", "--data", "/nonexistent"], "does not exist"),
])
def test_errors_are_one_line_with_status_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("skad: error:") and message in err


def test_unknown_parameter(mvtec, tmp_path, capsys):
    assert main(["fit", "--train", str(mvtec), "--out", str(tmp_path / "m"),
                 "--param", "colour=1"]) == 1
    assert "has no parameter colour" in capsys.readouterr().err


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


def test_help_imports_no_torch():
    """``skad --help`` and argument errors must not wait for torch, timm or scikit-learn."""
    code = ("import sys, skad.cli; skad.cli._parser().format_help(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'sklearn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
