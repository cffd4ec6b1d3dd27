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

import logging
import time

import numpy as np

# torch and scikit-learn (through ._maps, .datasets and .metrics) are imported where the
# protocols run, so that `skad benchmark --help` prints COLUMNS without them

__all__ = ["COLUMNS", "FIT_IS_REFERENCE", "draw_references", "evaluate_detector", "markdown_table",
           "run_benchmark", "write_table"]

logger = logging.getLogger(__name__)

#: detectors whose ``fit`` is ``set_reference`` on the training images: PatchCore's
#: memory bank is all it learns, and ``set_reference`` replaces it
FIT_IS_REFERENCE = frozenset({"PatchCore"})


def evaluate_detector(det, test, eval_size, n_latency=10):
    """Ranking metrics and the sign-off metrics of ``det`` on ``test``.

    ``test`` is a :func:`load_mvtec` Bunch with masks at ``eval_size``. Returns
    image AUROC, pixel AUROC and PRO; at the detector's ``threshold_``, the
    false-reject rate on the good images (``frr``, beside the rate the threshold
    guarantees, ``frr_bound``, and the number of good images, ``n_good``), the
    escape rate on the defective ones (``escape``) and the F1 score of the
    defective class; the
    test images scored per second in batches (``score_ips``); and the median and
    95th percentile of the time to score one image alone, map included
    (``p50_ms``, ``p95_ms``, over the first ``n_latency`` test images, after one
    warm-up call): what a line that inspects one part at a time waits.
    """
    from sklearn.metrics import f1_score

    from ._maps import maps_at
    from .metrics import evaluate

    t0 = time.perf_counter()
    scores, maps = det.score_and_map(test.paths)
    elapsed = time.perf_counter() - t0
    row = evaluate(test.y, scores, masks=test.masks, maps=maps_at(maps, eval_size))
    y, rejected = np.asarray(test.y), scores > det.threshold_
    row["frr"] = float(rejected[y == 0].mean()) if (y == 0).any() else None
    row["frr_bound"] = float(det.false_reject_rate_)
    row["n_good"] = int((y == 0).sum())
    row["escape"] = float((~rejected[y == 1]).mean()) if (y == 1).any() else None
    row["f1"] = float(f1_score(y, rejected, zero_division=0.0))
    row["score_ips"] = len(test.paths) / elapsed
    row.update(_latency(det, test.paths[:n_latency]))
    return row


def _latency(det, paths):
    """Median and 95th percentile (ms) of scoring one image alone, after a warm-up."""
    if not paths:
        return {"p50_ms": None, "p95_ms": None}
    det.score_and_map(paths[:1])  # first-call costs (allocations, thread pools) are not latency
    times = []
    for path in paths:
        t0 = time.perf_counter()
        det.score_and_map([path])
        times.append(1000 * (time.perf_counter() - t0))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def draw_references(paths, k, seed):
    """``k`` of ``paths`` drawn without replacement with ``seed``, in their order."""
    rng = np.random.default_rng(seed)
    if k > len(paths):
        raise ValueError(f"asked for {k} reference images; the category has {len(paths)}")
    return [paths[i] for i in np.sort(rng.choice(len(paths), size=k, replace=False))]


def run_benchmark(make_detector, root, categories, *, protocol="oneclass", n_references=(10,),
                  seeds=(0,), eval_size=256, log=None):
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
    log : callable, optional
        Receives one line per finished row; by default the line is an INFO
        record of the ``skad._benchmark`` logger.
    """
    from .datasets import load_labelled_domains, load_mvtec

    if protocol not in ("oneclass", "fewshot", "domains"):
        raise ValueError(f"unknown protocol {protocol!r}")
    categories = list(categories)
    if protocol == "domains" and len(categories) < 2:
        raise ValueError(
            f"the domains protocol holds each category out in turn and fits on the others: "
            f"it needs two or more categories, got {categories} (the categories given are "
            "both the targets and their sources)")
    if protocol != "oneclass":
        _check_references(make_detector(), n_references)
    if log is None:
        log = logger.info
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
            # too few references for the false_reject_rate warn (CalibrationWarning):
            # the frr column then shows what the threshold does
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


def _check_references(det, n_references):
    """Every ``k`` the detector can take, checked before any image is read: a run that
    stops at its last ``k`` loses the hours before it."""
    need, param = det._min_references()
    few = sorted({k for k in n_references if k < need})
    if few:
        raise ValueError(
            f"{type(det).__name__}({param}=True) needs at least {need} reference images; "
            f"n_references asks for {', '.join(map(str, few))}. Drop them from "
            f"n_references (--n-references), or set {param}=False (--param {param}=false "
            "on the command line)")


def _seeded(det, seed):
    """The row's seed also seeds the detector, unless its ``random_state`` is set already."""
    params = det.get_params()
    if "random_state" in params and params["random_state"] is None:
        det.set_params(random_state=seed)
    return det


# the table's columns, in order: (format, what the column holds); `skad benchmark --help`
# prints the descriptions
COLUMNS = {
    "category": ("{}", "the target category (a folder under --data)"),
    "k": ("{}", ("normal images of the target the detector saw: drawn from train/good "
                 "(fewshot, domains), or 'all' of them (oneclass)")),
    "seed": ("{}", "drew the k images and is the detector's random_state"),
    "image_auroc": ("{:.3f}", "image ROC AUC of the scores on test/ (0.5 = chance, 1 = perfect)"),
    "pixel_auroc": ("{:.3f}", "pixel ROC AUC of the maps against ground_truth/"),
    "pro": ("{:.3f}", ("per-region overlap (PRO), area under the curve up to a "
                       "false-positive rate of 0.3, normalised to [0, 1]")),
    "frr": ("{:.3f}", ("false-reject rate: share of the good test images scored above the "
                       "detector's threshold_")),
    "frr_bound": ("{:.3f}", ("the false-reject rate threshold_ guarantees for good parts "
                             "exchangeable with the references (false_reject_rate_); frr "
                             "on n_good images scatters around it. 1.000: none (GeneralAD, "
                             "MMR and GlobalLocal calibrated on their own training images, "
                             "a single PatchCore or MetaComparer reference)")),
    "n_good": ("{:.0f}", "good test images, over which frr is counted (mean row: their mean)"),
    "escape": ("{:.3f}", ("escape rate: share of the defective test images scored at or "
                          "below the threshold_ (missed defects)")),
    "f1": ("{:.3f}", "F1 score of the defective class at the threshold_"),
    "fit_s": ("{:.1f}", ("seconds to fit (domains: the training on the other categories "
                         "included, on every row) and set the reference")),
    "score_ips": ("{:.1f}", "test images scored per second in batches, maps included"),
    "p50_ms": ("{:.0f}", ("median milliseconds to score one image alone, map included "
                          "(10 test images, after a warm-up)")),
    "p95_ms": ("{:.0f}", "95th percentile of the same"),
}
_COLUMNS = [(name, fmt) for name, (fmt, _) in COLUMNS.items()]


def _format_row(row):
    return " | ".join(f"{k}={fmt.format(row[k])}" for k, fmt in _COLUMNS
                      if row.get(k) is not None)


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


def write_table(rows, path):
    """Write the rows to ``path``: CSV (``.csv``, the rows only, :data:`COLUMNS` in
    order, empty where a value does not apply), JSON (``.json``, a list of objects
    with the full-precision values), else the markdown table with its mean rows."""
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=1, default=_json_value) + "\n")
    elif suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(markdown_table(rows) + "\n")


def _json_value(value):
    # numpy scalars (a seed, a count) as plain numbers
    return value.item() if isinstance(value, np.generic) else str(value)
