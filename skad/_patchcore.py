"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two levels of a frozen ImageNet backbone form
a memory bank of normal patches, thinned by a greedy k-center coreset; a query
patch scores its distance to the nearest bank patch. The bank is built from
the reference images, so :meth:`PatchCore.set_reference` adapts the detector to
a new domain without any training.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ._backbone import create_backbone
from ._images import gaussian_blur, progress, upsample
from ._training import seed_from
from .base import BaseDetector

__all__ = ["PatchCore"]

# elements of one distance block (128 MiB of float32): bounds memory whatever the bank size
_BLOCK = 2**25


def greedy_coreset(features, n_select, n_projections=128, generator=None, verbose=0):
    """Indices of a greedy k-center coreset (paper Alg. 1) on a random projection.

    The projection (Johnson-Lindenstrauss) only speeds up the distance
    computations; the selected rows index ``features`` itself.
    """
    n, dim = features.shape
    if n_select >= n:
        return torch.arange(n)
    if n_projections and dim > n_projections:
        proj = torch.randn(dim, n_projections, generator=generator) / n_projections**0.5
        features = features @ proj.to(features.device, features.dtype)
    start = int(torch.randint(n, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = start
    min_dist = torch.linalg.vector_norm(features - features[start], dim=1)
    for k in progress(range(1, n_select), desc="coreset", verbose=verbose):
        idx = torch.argmax(min_dist)
        selected[k] = idx
        dist = torch.linalg.vector_norm(features - features[idx], dim=1)
        torch.minimum(min_dist, dist, out=min_dist)
    return selected


def nearest(queries, bank, excluded=None):
    """Distance to, and index of, the nearest bank row for each query row, in blocks.

    ``excluded(rows) -> bool (len(rows), len(bank))`` masks bank rows a query may
    not match (its own image's patches, for leave-one-out scores).
    """
    rows = max(1, _BLOCK // max(len(bank), 1))
    dists, index = [], []
    for start in range(0, len(queries), rows):
        d = torch.cdist(queries[start:start + rows], bank)
        if excluded is not None:
            d.masked_fill_(excluded(slice(start, start + rows)), float("inf"))
        dmin, imin = d.min(dim=1)
        dists.append(dmin)
        index.append(imin)
    return torch.cat(dists), torch.cat(index)


class PatchCore(BaseDetector):
    """PatchCore anomaly detector: nearest-neighbour distance to a coreset of normal patches.

    Parameters
    ----------
    backbone : str, default="wide_resnet50_2.tv_in1k"
        timm CNN, optionally with its pretrained tag: the paper's WideResNet-50-2 with
        torchvision's ImageNet weights, as the authors' code loads it.
    weights : "pretrained", str, path-like or None, default="pretrained"
        Backbone weights: timm's pretrained tag, another tag, a checkpoint file,
        or None (random; tests only). Resolved offline first.
    layers : tuple of int, default=(2, 3)
        Backbone levels (``features_only`` indices; ResNets: layer2, layer3).
    image_size : int, default=224
        Working size images are resized to.
    coreset_ratio : float, default=0.1
        Fraction of the reference patches kept in the memory bank (1.0 keeps all).
    n_projections : int, default=128
        Dimension of the random projection used to select the coreset.
    n_reweight : int, default=9
        Bank neighbourhood ``b`` of the image-score reweighting (paper Eq. 7);
        0 disables the reweighting (score = largest patch distance).
    sigma : float, default=4
        Gaussian smoothing of the maps at ``image_size``.
    threshold_quantile : float, default=0.99
        ``threshold_`` is this quantile of the references' leave-one-image-out scores.
    batch_size : int, default=16
    device : str, default="auto"
        "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    verbose : int, default=0
        Progress on stderr when > 0.
    random_state : int, Generator or None, default=None
        Seeds the coreset's projection and starting point (and random backbone
        weights, for tests).

    Attributes
    ----------
    backbone_ : skad._backbone.Backbone
        The frozen feature extractor.
    memory_bank_ : torch.Tensor of shape (n_patches, n_features)
        Coreset of the reference patches.
    memory_owner_ : torch.Tensor of shape (n_patches,)
        Index of the reference image each bank patch comes from.
    memory_position_ : torch.Tensor of shape (n_patches,)
        Flat feature-grid position of each bank patch.
    feature_grid_ : tuple of int
        ``(h, w)`` of the patch grid at ``image_size``.
    reference_scores_ : ndarray of shape (n_references,)
        Leave-one-image-out scores of the reference images.
    threshold_ : float
        ``predict`` flags images scoring above it.

    Examples
    --------
    >>> from skad import PatchCore
    >>> from skad.datasets import make_textures
    >>> data = make_textures(n_domains=1, n_normal=12, n_anomalous=6, image_size=64,
    ...                      random_state=0)
    >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=64,
    ...                 random_state=0).fit(data.images[data.y == 0][:8])
    >>> det.decision_function(data.images[8:]).shape
    (10,)
    >>> det.predict_map(data.images[:2]).shape
    (2, 64, 64)
    """

    # fit learns nothing beyond the memory bank, which set_reference rebuilds
    _reference_only = True

    def __init__(self, backbone="wide_resnet50_2.tv_in1k", weights="pretrained", layers=(2, 3),
                 image_size=224, coreset_ratio=0.1, n_projections=128, n_reweight=9,
                 sigma=4.0, threshold_quantile=0.99, batch_size=16, device="auto",
                 verbose=0, random_state=None):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.image_size = image_size
        self.coreset_ratio = coreset_ratio
        self.n_projections = n_projections
        self.n_reweight = n_reweight
        self.sigma = sigma
        self.threshold_quantile = threshold_quantile
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.random_state = random_state

    def _fit(self, images, y, groups):
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1]; got {self.coreset_ratio}")
        self.backbone_ = create_backbone(self.backbone, self.weights, self.layers,
                                         random_state=self.random_state)

    def _embed(self, batch):
        """Locally aware patch features (paper Eq. 2-3): 3x3 average, levels upsampled, joined."""
        with self._autocast(batch.device):
            levels = self.backbone_(batch)
        size = levels[0].shape[-2:]
        out = []
        for f in levels:
            # zero padding counts in the average, as in the authors' code (unfold with zero
            # padding) and anomalib; averaging the border cells over fewer neighbours made
            # them the noisiest patches and set the image score (docs/methods/patchcore.md)
            f = F.avg_pool2d(f.float(), 3, stride=1, padding=1, count_include_pad=True)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out.append(f)
        return torch.cat(out, dim=1)

    def _set_reference(self, images):
        feats = self._map_images(images, self._embed, desc="reference features")
        n, dim, h, w = feats.shape
        patches = feats.permute(0, 2, 3, 1).reshape(-1, dim)
        owner = torch.arange(n).repeat_interleave(h * w)
        position = torch.arange(h * w).repeat(n)
        device = self._device()
        gen = torch.Generator().manual_seed(seed_from(self.random_state))
        n_keep = max(1, int(np.ceil(self.coreset_ratio * len(patches))))
        keep = greedy_coreset(patches.to(device), n_keep, self.n_projections, gen,
                              verbose=self.verbose).cpu()
        self.memory_bank_ = patches[keep].contiguous()
        self.memory_owner_ = owner[keep]
        self.memory_position_ = position[keep]
        self.feature_grid_ = (h, w)
        return self._leave_one_out_scores(feats)

    def _leave_one_out_scores(self, feats):
        """Each reference scored against the bank without its own patches (Eq. 7 included).

        With a single reference there is no other image: a patch is scored
        without the bank patches of its own 3 x 3 neighbourhood (which share its
        averaged features), and patches with none left outside it do not count.
        """
        device = self._device()
        bank = self.memory_bank_.to(device)
        owner, pos = self.memory_owner_.to(device), self.memory_position_.to(device)
        h, w = self.feature_grid_
        scores = []
        for i, f in enumerate(feats):
            q = f.to(device).flatten(1).T
            if len(feats) > 1:
                def excluded(rows, i=i):
                    return (owner == i)[None, :]  # broadcast over the query rows
            else:
                qpos = torch.arange(h * w, device=device)

                def excluded(rows, qpos=qpos):
                    qp = qpos[rows]
                    return (((qp[:, None] // w) - (pos[None] // w)).abs() <= 1) & (
                        ((qp[:, None] % w) - (pos[None] % w)).abs() <= 1)
            dist, idx = nearest(q, bank, excluded)
            if not torch.isfinite(dist).any():
                raise ValueError(self._no_leave_one_out(i, len(feats)))
            scores.append(self._image_score(q, dist, idx, bank, excluded=excluded))
        return torch.stack(scores).cpu().numpy()

    def _no_leave_one_out(self, i, n_references):
        """Why reference ``i`` cannot be scored without its own patches, and what to change."""
        h, w = self.feature_grid_
        if n_references == 1:
            return (
                f"PatchCore cannot calibrate threshold_ on one reference image with a {h} x {w} "
                f"patch grid and {len(self.memory_bank_)} bank patches: every bank patch lies in "
                "the 3 x 3 neighbourhood of every patch, so the image would be scored against "
                "itself. Pass at least 2 reference images (or raise image_size or coreset_ratio)"
            )
        return (
            f"PatchCore cannot calibrate threshold_: the memory bank's {len(self.memory_bank_)} "
            f"patches all come from reference image {i}, which then has no other image's patch "
            f"to be scored against. Raise coreset_ratio (now {self.coreset_ratio}) so that the "
            f"bank keeps patches of at least 2 of the {n_references} reference images"
        )

    def _image_score(self, q, dist, idx, bank, excluded=None):
        """Paper Eq. 7: the largest patch distance, reweighted by the bank's local density.

        For leave-one-out scores, ``excluded`` leaves the image's own bank patches
        out of the neighbourhood ``N_b(m*)`` as well as out of the nearest-neighbour
        search; patches without any bank patch (distance inf) do not count.
        """
        j = torch.argmax(torch.where(torch.isfinite(dist), dist, -torch.inf))
        s_star = dist[j]
        # the b nearest allowed bank neighbours of m* (m* first: its own nearest)
        m_star = bank[idx[j]][None]
        d_bank = torch.cdist(m_star, bank)[0]
        if excluded is not None:
            d_bank = d_bank.masked_fill(excluded(slice(int(j), int(j) + 1))[0], float("inf"))
            d_bank[idx[j]] = 0.0
        b = min(self.n_reweight, int(torch.isfinite(d_bank).sum()))
        if b < 2:
            return s_star
        support = torch.topk(d_bank, b, largest=False).indices
        d_support = torch.cdist(q[j][None], bank[support])[0]
        weight = 1.0 - torch.softmax(d_support, dim=0)[0]
        return weight * s_star

    def _score_batch(self, batch, maps):
        feats = self._embed(batch)
        bank = self.memory_bank_.to(batch.device)
        scores, grids = [], []
        for f in feats:
            q = f.flatten(1).T
            dist, idx = nearest(q, bank)
            scores.append(self._image_score(q, dist, idx, bank))
            grids.append(dist.view(f.shape[1:]))
        out_maps = None
        if maps:
            out_maps = gaussian_blur(upsample(torch.stack(grids), self.image_size), self.sigma)
        return torch.stack(scores), out_maps

    def _to_device(self, device):
        self.backbone_.to(device)
