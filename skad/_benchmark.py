"""Benchmark protocols on MVTec-layout data, behind ``skad benchmark``.

Three protocols, each a loop over target categories:

``oneclass``
    Fit on the category's train/good, score its test/.
``fewshot``
    Fit on ``k`` images drawn from train/good (per seed), score test/.
``domains``
    Leave one domain out: fit on all images, with labels, of the other
    categories; ``set_reference`` with ``k`` images drawn from the target's
    train/good (per seed); score the target's test/. Detectors whose ``fit``
    learns nothing beyond the reference (:data:`FIT_IS_REFERENCE`) are fitted
    on the ``k`` references directly, which is the same model at a fraction of
    the cost; the others are trained once per target and given each draw of
    references with ``set_reference`` (``fit_s`` includes the training on
    every row).
"""

import time
import warnings

import numpy as np

from ._maps import maps_at
from .datasets import load_labelled_domains, load_mvtec
from .metrics import evaluate
from .thresholds import CalibrationWarning

__all__ = ["FIT_IS_REFERENCE", "draw_references", "evaluate_detector", "markdown_table",
           "run_benchmark"]

#: detectors whose ``fit`` is ``set_reference`` on the training images: PatchCore's
#: memory bank is all it learns, and ``set_reference`` replaces it
FIT_IS_REFERENCE = frozenset({"PatchCore"})


def evaluate_detector(det, test, eval_size):
    """Image AUROC, pixel AUROC and PRO of ``det`` on ``test`` (a :func:`load_mvtec` Bunch
    with masks at ``eval_size``), and the images scored per second (``score_ips``)."""
    t0 = time.perf_counter()
    scores, maps = det.score_and_map(test.paths)
    elapsed = time.perf_counter() - t0
    row = evaluate(test.y, scores, masks=test.masks, maps=maps_at(maps, eval_size))
    row["score_ips"] = len(test.paths) / elapsed
    return row


def draw_references(paths, k, seed):
    """``k`` of ``paths`` drawn without replacement with ``seed``, in their order."""
    rng = np.random.default_rng(seed)
    if k > len(paths):
        raise ValueError(f"asked for {k} reference images; the category has {len(paths)}")
    return [paths[i] for i in np.sort(rng.choice(len(paths), size=k, replace=False))]


def run_benchmark(make_detector, root, categories, *, protocol="oneclass", n_references=(10,),
                  seeds=(0,), eval_size=256, log=print):
    """Run a protocol; return one dict per (category, k, seed).

    Parameters
    ----------
    make_detector : callable
        Returns a fresh, unfitted detector.
    root : str
        MVTec-layout data root.
    categories : list of str
    protocol : {"oneclass", "fewshot", "domains"}
    n_references : sequence of int
        ``k`` for the fewshot and domains protocols.
    seeds : sequence of int
        Seeds of the reference draws; each also becomes the ``random_state`` of
        the row's detector where that is None, so that a row can be
        reproduced; ``oneclass`` fits on every training image once per seed.
    eval_size : int
        Masks and maps are compared at ``eval_size`` x ``eval_size`` pixels.
    log : callable
        Receives one line per finished row.
    """
    if protocol not in ("oneclass", "fewshot", "domains"):
        raise ValueError(f"unknown protocol {protocol!r}")
    rows = []
    for cat in categories:
        test = load_mvtec(root, cat, "test", return_masks=True, mask_size=eval_size)
        train = load_mvtec(root, cat, "train").paths
        if protocol == "oneclass":
            runs = [("all", s, train) for s in seeds]
        else:
            runs = [(k, s, draw_references(train, k, s)) for k in n_references for s in seeds]
        trained, train_s = None, 0.0  # domains: one fit on the sources serves every draw
        for k, seed, refs in runs:
            det = _seeded(make_detector(), seed)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                # the metrics rank scores and maps: no threshold, so no rate, is used
                warnings.simplefilter("ignore", CalibrationWarning)
                if protocol in ("oneclass", "fewshot") or type(det).__name__ in FIT_IS_REFERENCE:
                    det.fit(refs)
                else:
                    if trained is None:
                        sources = load_labelled_domains(root, [c for c in categories if c != cat])
                        trained = det.fit(sources.paths, sources.y, groups=sources.groups)
                        train_s = time.perf_counter() - t0
                        t0 = time.perf_counter()
                    det = trained.set_reference(refs)
            fit_s = train_s + time.perf_counter() - t0
            row = {"category": cat, "k": k, "seed": seed,
                   **evaluate_detector(det, test, eval_size),
                   "fit_s": fit_s}
            rows.append(row)
            log(_format_row(row))
    return rows


def _seeded(det, seed):
    """The row's seed also seeds the detector, unless its ``random_state`` is set already."""
    params = det.get_params()
    if "random_state" in params and params["random_state"] is None:
        det.set_params(random_state=seed)
    return det


_COLUMNS = [("category", "{}"), ("k", "{}"), ("seed", "{}"), ("image_auroc", "{:.3f}"),
            ("pixel_auroc", "{:.3f}"), ("pro", "{:.3f}"), ("fit_s", "{:.1f}"),
            ("score_ips", "{:.1f}")]


def _format_row(row):
    return " | ".join(f"{k}={fmt.format(row[k])}" for k, fmt in _COLUMNS if k in row)


def markdown_table(rows):
    """Rows as a markdown table, with a mean row per k (over categories and seeds)."""
    head = "| " + " | ".join(k for k, _ in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "" for k, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    for k in sorted({r["k"] for r in rows}):
        sel = [r for r in rows if r["k"] == k]
        cells = ["**mean**", str(k), ""]
        for key, fmt in _COLUMNS[3:]:
            vals = [r[key] for r in sel if r.get(key) is not None]
            cells.append(fmt.format(np.mean(vals)) if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
