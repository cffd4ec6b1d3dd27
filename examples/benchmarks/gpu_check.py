"""Every detector on a CUDA device at its paper's resolution: fit, CPU agreement, throughput.

    python examples/benchmarks/gpu_check.py OUT_DIR [--tiny] [--download] [--n-images 128]

For each detector: a short fit (one epoch: throughput does not depend on training length)
on synthetic textures at the paper's working size with the paper's backbone family, then

- agreement: the same ``--n-check`` images scored on CUDA and on the CPU (the fitted
  detector moved with ``set_params(device=...)``): largest difference as a share of the
  scores' range, and Spearman's rank correlation;
- throughput: ``decision_function`` (scores) and ``score_and_map`` (scores and maps) on
  ``--n-images`` in-memory images after a warm-up, in images/s, beside the paper's figure.

Pretrained weights are looked for offline only (``SKAD_OFFLINE=1``: no download attempt,
which can take minutes where there is no network); where none are found the backbone is
built with random weights and the table says so (speed is the same). ``--download`` lets
timm download instead. ``--tiny`` runs test-sized models at 32-64 px, on the CPU when there
is no GPU, so that the script is known to run anywhere; CPU/CUDA agreement needs CUDA.
Results go to ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md``; progress to stderr.
Sized to finish in well under 8 minutes on one H200.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# name: (class, parameters, weights parameters, image size, paper's figure)
PAPER = {
    "PatchCore": ("PatchCore", {"backbone": "wide_resnet50_2"}, ("weights",), 224,
                  "76 images/s (as cited in issue 12)"),
    "GeneralAD": ("GeneralAD", {"backbone": "vit_small_patch14_dinov2.lvd142m", "n_epochs": 1},
                  ("weights",), 518, "154 FPS, GeneralAD-S at 518 px, A100"),
    "MMR": ("MMR", {"teacher": "wide_resnet50_2", "student": "vit_base_patch16_224.mae",
                    "n_epochs": 1}, ("teacher_weights", "student_weights"), 224,
            "118 images/s at 224 px, RTX 2080 Ti"),
    "MetaComparer": ("MetaComparer", {"backbone": "resnet18", "n_epochs": 1, "n_episodes": 10},
                     ("weights",), 256, "-"),
    "GlobalLocal": ("GlobalLocal", {"teacher": "resnet18", "n_distill_epochs": 1,
                                    "n_finetune_epochs": 1, "n_epochs": 1},
                    ("teacher_weights",), 256, "-"),
}
TINY = {
    "PatchCore": {"backbone": "test_resnet", "image_size": 64},
    "GeneralAD": {"backbone": "test_efficientnet", "layers": (2,), "hidden_dim": 32,
                  "n_epochs": 1, "image_size": 32},
    "MMR": {"teacher": "test_efficientnet", "student": "test_vit", "student_depth": 2,
            "n_epochs": 1, "image_size": 32},
    "MetaComparer": {"backbone": "test_resnet", "fpn_width": 16, "n_fpn_cells": 1,
                     "hidden_layer_sizes": (16,), "attention_dim": 8, "n_epochs": 1,
                     "n_episodes": 2, "image_size": 32},
    "GlobalLocal": {"teacher": "test_efficientnet", "teacher_size": 32, "patch_size": 8,
                    "stride": 4, "embed_dim": 16, "width": 8, "n_distill_patches": 8,
                    "n_distill_epochs": 1, "n_finetune_epochs": 1, "n_epochs": 1,
                    "image_size": 32},
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(name, args, device):
    """The detector, fitted on synthetic textures, and how its weights were obtained."""
    import skad
    from skad import WeightsNotFoundError
    from skad.datasets import make_textures

    cls_name, params, weight_params, size, _ = PAPER[name]
    params = dict(TINY[name]) if args.tiny else {**params, "image_size": size}
    size = params["image_size"]
    data = make_textures(n_domains=2, n_normal=args.n_train, n_anomalous=4, image_size=size,
                         random_state=0)
    attempts = [None] if args.tiny else ["pretrained", None]
    for weights in attempts:
        det = getattr(skad, cls_name)(**params, **{p: weights for p in weight_params},
                                      batch_size=args.batch_size, device=device,
                                      random_state=0)
        try:
            t0 = time.perf_counter()
            if name == "MetaComparer":
                det.fit(data.images, data.y, groups=data.groups)
                det.set_reference(data.images[(data.y == 0) & (data.groups == data.groups[0])][:10])
            else:
                det.fit(data.images[(data.y == 0) & (data.groups == data.groups[0])])
            return det, size, "pretrained" if weights else "random", time.perf_counter() - t0
        except WeightsNotFoundError as exc:
            log(f"{name}: no pretrained weights offline ({str(exc).splitlines()[0]}); "
                "random weights instead")
    raise AssertionError("unreachable")


def agreement(det, images):
    """Scores on CUDA and on the CPU: (max |diff| / range, Spearman rho)."""
    from scipy.stats import spearmanr

    device = det.device
    cuda = det.decision_function(images)
    cpu = det.set_params(device="cpu").decision_function(images)
    det.set_params(device=device)
    rng = float(np.ptp(cpu)) or 1.0
    return float(np.abs(cuda - cpu).max() / rng), float(spearmanr(cuda, cpu)[0])


def throughput(det, images):
    """images/s of decision_function and score_and_map after a warm-up."""
    import torch

    det.decision_function(images[:det.batch_size])
    out = []
    for call in (det.decision_function, det.score_and_map):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call(images)
        out.append(len(images) / (time.perf_counter() - t0))
    return out


def run(name, args, device):
    from skad.datasets import make_textures

    log(f"{name}: fitting")
    det, size, weights, fit_s = build(name, args, device)
    test = make_textures(n_domains=1, n_normal=args.n_images, n_anomalous=0, image_size=size,
                         random_state=1).images
    row = {"detector": name, "image_size": size, "weights": weights, "fit_s": round(fit_s, 1),
           "paper": PAPER[name][4]}
    if device == "cuda":
        log(f"{name}: CPU/CUDA agreement on {args.n_check} images")
        row["max_diff_share"], row["spearman"] = agreement(det, test[:args.n_check])
    log(f"{name}: throughput on {len(test)} images")
    row["scores_ips"], row["maps_ips"] = throughput(det, test)
    log(f"{name}: {row['scores_ips']:.1f} images/s (scores), {row['maps_ips']:.1f} (with maps)")
    return row


def markdown(rows, header):
    lines = [header, "", "| detector | px | weights | fit s | scores images/s | "
             "scores and maps images/s | CPU/CUDA max diff (share of range) | Spearman | "
             "paper |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['detector']} | error: {r['error']} ||||||||")
            continue
        diff = f"{r['max_diff_share']:.4f}" if "max_diff_share" in r else "-"
        rho = f"{r['spearman']:.4f}" if "spearman" in r else "-"
        lines.append(f"| {r['detector']} | {r['image_size']} | {r['weights']} | {r['fit_s']} | "
                     f"{r['scores_ips']:.1f} | {r['maps_ips']:.1f} | {diff} | {rho} | "
                     f"{r['paper']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="test-sized models (runs on a CPU)")
    ap.add_argument("--download", action="store_true", help="let timm download weights")
    ap.add_argument("--detectors", nargs="+", default=list(PAPER), choices=list(PAPER))
    ap.add_argument("--n-images", type=int, default=128, help="images per throughput run")
    ap.add_argument("--n-check", type=int, default=8, help="images scored on CPU and CUDA")
    ap.add_argument("--n-train", type=int, default=24, help="normal images per domain")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if not args.download:
        os.environ["SKAD_OFFLINE"] = "1"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("gpu_check: no CUDA device here; use --tiny to try the script on the CPU")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    header = (f"gpu_check {time.strftime('%Y-%m-%d %H:%M')}: device {gpu}, torch "
              f"{torch.__version__}, {os.cpu_count()} CPUs, python {platform.python_version()}"
              f"{', tiny models' if args.tiny else ''}, batch {args.batch_size}")
    log(header)
    t0 = time.perf_counter()
    rows = []
    for name in args.detectors:
        try:
            rows.append(run(name, args, device))
        except Exception as exc:  # one failing detector must not hide the others' numbers
            log(f"{name}: {type(exc).__name__}: {exc}")
            rows.append({"detector": name, "error": f"{type(exc).__name__}: {exc}"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (out / "gpu_check.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
