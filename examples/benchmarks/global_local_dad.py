"""Why GlobalLocal's DAD head ranks AITEX defects low: a diagnosis on one category.

Usage (from the repository root)::

    python examples/benchmarks/global_local_dad.py --category aitex_00

1. Fits GlobalLocal with the shortened schedule of docs/benchmarks.md (Local-Net
   10 + 3 epochs, Global-Net and DAD head 10 epochs), or loads ``--model``.
2. Scores the 15 x 15 raster of every test image and relates each patch's s_DAD
   and s_IAD to the patch's grey-level mean and standard deviation (Spearman),
   and ranks defect patches (over 10 % defect pixels) against the patches of the
   normal test images (AUROC) by each of them.
3. Retrains only the DAD head, ``--steps`` steps on the frozen Local-Net and
   Global-Net, with the paper's input ``[Z*, Z_g]`` and with ``[Z* - Z_g,
   |Z* - Z_g|]``, and evaluates each at iad_score_weight (lambda_s) = 0 and 0.8.
"""

import argparse
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from skad import GlobalLocal
from skad._global_local import (
    DADHead,
    add_stains,
    crop_windows,
    dad_loss,
    iad_score,
    jittered_starts,
    patch_starts,
)
from skad._images import check_images, load_resized
from skad._maps import maps_at
from skad._random import torch_seed
from skad._training import train as train_loop
from skad.datasets import load_mvtec
from skad.metrics import evaluate
from skad.thresholds import CalibrationWarning

REPO = Path(__file__).resolve().parents[2]


def fit_or_load(args, train):
    if args.model and Path(args.model).is_file():
        return joblib.load(args.model)
    det = GlobalLocal(teacher="tf_efficientnet_lite0", image_size=256, n_distill_epochs=10,
                      n_finetune_epochs=3, n_epochs=args.epochs, random_state=0).fit(train)
    if args.model:
        joblib.dump(det, args.model)
    return det


def windows_at(det, images, owner, top, left):
    """Context windows, their masks M0 and the patches at ``(top, left)`` of ``images[owner]``,
    cut as the fitted ``det`` cuts them (a margin of context on every side of the patch)."""
    p, size = det.patch_size, det.window_size_
    m = (size - p) // 2
    padded = F.pad(images, (m, m, m, m))
    valid = F.pad(torch.ones_like(images[:, :1]), (m, m, m, m))
    windows = crop_windows(padded, owner, top, left, size)
    mask = crop_windows(valid, owner, top, left, size)
    mask[:, :, m:m + p, m:m + p] = 0.0  # M0: the Global-Net never sees the patch
    return windows, mask, windows[:, :, m:m + p, m:m + p]


def patch_scores(det, image):
    """s_IAD and s_DAD (Eq. 11-12) of the raster-scanned patches of one image ``(3, H, W)``."""
    _, h, w = image.shape
    ys, xs = (patch_starts(n, det.patch_size, det.stride) for n in (h, w))
    top, left = (t.flatten() for t in torch.meshgrid(ys, xs, indexing="ij"))
    windows, mask, patch = windows_at(det, image[None], torch.zeros_like(top), top, left)
    z_l, z_g = det.local_net_.embed(patch), det.global_net_(windows, mask)
    return iad_score(z_l, z_g), torch.sigmoid(det.dad_head_(z_l, z_g).float())


def training_windows(det, images, gen):
    """Windows, masks and patches at ``n_patches`` positions per image around the raster."""
    _, _, h, w = images.shape
    p, stride = det.patch_size, int(det.stride)
    owner = torch.arange(len(images)).repeat_interleave(det.n_patches)
    top = jittered_starts(h, p, stride, len(owner), gen)
    left = jittered_starts(w, p, stride, len(owner), gen)
    return windows_at(det, images, owner, top, left)


def patch_table(det, test):
    """Per raster patch: defect fraction, s_IAD, s_DAD, grey std and mean, normal image.

    ``test.masks`` must be at the detector's ``image_size``.
    """
    images = check_images(list(test.paths))
    p, size = det.patch_size, det.image_size
    starts = patch_starts(size, p, det.stride)
    rows = []
    for i in range(len(images)):
        image = load_resized(images, i, size)
        with torch.no_grad():
            s_iad, s_dad = patch_scores(det, image)
        grey = image.mean(0).numpy()
        mask = test.masks[i] > 0
        k = 0
        for t in starts.tolist():
            for left in starts.tolist():
                patch = grey[t:t + p, left:left + p]
                rows.append((mask[t:t + p, left:left + p].mean(), float(s_iad[k]),
                             float(s_dad[k]), patch.std(), patch.mean(), test.y[i] == 0))
                k += 1
    return np.array(rows, dtype=float)


def retrain_dad(det, train, inputs, steps, seed=0):
    """A new DAD head trained ``steps`` steps on the fitted, frozen Local-Net and Global-Net.

    One epoch of ``steps`` batches of 16 images drawn with replacement, plain AdamW
    (learning rate 1e-3), through skad's shared training loop.
    """
    gen = torch.Generator().manual_seed(seed)
    images = check_images(train)
    imgs = torch.stack([load_resized(images, i, det.image_size) for i in range(len(images))])
    with torch_seed(seed):
        head = DADHead(det.local_net_.project.out_features, inputs=inputs)

    def step(idx):
        windows, mask, patch = training_windows(det, imgs[idx], gen)
        with torch.no_grad():
            z_l = det.local_net_.embed(patch)
            z_neg = det.local_net_.embed(add_stains(patch, gen))
            z_g = det.global_net_(windows, mask)
        return dad_loss(head, z_l, z_neg, z_g)

    train_loop(head, step, n_epochs=1, optimizer=torch.optim.AdamW(head.parameters(), 1e-3),
               batches=lambda epoch: (torch.randint(len(imgs), (16,), generator=gen)
                                      for _ in range(steps)),
               device=torch.device("cpu"), desc="DAD head")
    return head.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--category", default="aitex_00")
    ap.add_argument("--model", help="joblib file: loaded if it exists, else the fit is saved there")
    ap.add_argument("--epochs", type=int, default=10, help="Global-Net and DAD head")
    ap.add_argument("--steps", type=int, default=400, help="DAD head retraining steps")
    args = ap.parse_args(argv)
    if not (Path(args.data) / args.category).is_dir():
        print(f"global_local_dad: {args.data}/{args.category} not found; nothing to do")
        return 0
    train = load_mvtec(args.data, args.category, "train").paths
    det = fit_or_load(args, train)
    test = load_mvtec(args.data, args.category, "test", return_masks=True,
                      mask_size=det.image_size)

    r = patch_table(det, test)
    defect, normal = r[:, 0] > 0.1, r[:, 5] == 1
    sel = defect | normal
    print(f"{int(defect.sum())} defect patches, {int(normal.sum())} patches of normal images")
    for name, col in (("s_IAD", 1), ("s_DAD", 2), ("grey std", 3), ("grey mean", 4)):
        auc = roc_auc_score(defect[sel], r[sel, col])
        print(f"{name}: defect-patch AUROC {auc:.3f}; Spearman with grey std "
              f"{spearmanr(r[:, col], r[:, 3])[0]:.2f}, with grey mean "
              f"{spearmanr(r[:, col], r[:, 4])[0]:.2f}")

    fitted_head = det.dad_head_
    for inputs in ("fitted", "joint", "difference"):
        det.dad_head_ = (fitted_head if inputs == "fitted"
                         else retrain_dad(det, train, inputs, args.steps))
        for lam in (0.0, 0.8):
            # the position statistics and thresholds follow the maps: set again at each lambda_s
            with warnings.catch_warnings():  # calibrated on its training images, as after fit
                warnings.simplefilter("ignore", CalibrationWarning)
                det.set_params(iad_score_weight=lam).set_reference(train)
            s, m = det.score_and_map(test.paths)
            res = evaluate(test.y, s, test.masks, maps_at(m, det.image_size))
            print(f"DAD head {inputs}, lambda_s {lam}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
