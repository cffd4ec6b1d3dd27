"""MetaComparer (Chen et al., "Domain-Generalized Textured Surface Anomaly Detection", ICME 2022).

A backbone and a BiFPN give patch features at several scales; an MLP, the
meta-comparer, scores a query patch against normal reference patches (Eq. 1)
and a co-attention module supplies patch-level guidance (Eq. 3-4). It is
trained episodically on several source domains with image-level labels only,
then adapts to a new domain through :meth:`MetaComparer.set_reference` with a
handful of its normal images, without retraining.
"""

import warnings
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import StrOptions
from torch import nn

from ._backbone import backbone_constraints, create_backbone
from ._docstrings import fill_doc
from ._images import ImageSets, check_images, load_resized
from ._layers import BiFPN, BiFPNCell, FastFusion, SeparableConv  # noqa: F401 (old pickles)
from ._maps import adjacent, gaussian_blur, upsample
from ._params import DEPRECATED, Ints, Reals, Sequences, deprecated
from ._patchcore import (augmented_bank, greedy_coreset, locally_aware_features, nearest,
                         nearest_in_bank, nearest_outside)
from ._random import seed_from, torch_seed
from ._textures import synthetic_anomalies
from ._training import cosine_schedule, make_optimizer, train
from .base import BaseDetector, is_exporting, row_blocks

__all__ = ["MetaComparer", "BiFPN", "PairComparer", "CoAttention"]

# elements of one (queries x references x hidden) block of the pair scorer, and its
# reference rows: on the CPU 2 MiB of 128 query x 64 reference rows, 1.7-2.0 times as fast
# as 16 x 1024 (examples/benchmarks/pair_blocks.py); large on a GPU
_PAIR_BLOCK = {"cpu": 2**19, "cuda": 2**26}
_REF_ROWS = {"cpu": 64, "cuda": 8192}
# logits of one row of blocks, reduced at once: few running reductions, bounded memory
_LOGIT_BLOCK = {"cpu": 2**20, "cuda": 2**26}
# reference rows per block in an exported graph (skad._onnx), whose blocks hold every query
# row of the batch: 16 MiB per image for 1024 patches and 64 hidden units
_EXPORT_REF_ROWS = 64
_GRAD_CLIP = 1.0
_REFERENCE_ATTRS = ("threshold_", "reference_scores_", "n_references_", "reference_hidden_",
                    "reference_map_maxima_", "pixel_threshold_", "false_reject_rate_",
                    "patch_score_", "reference_features_", "score_mean_", "score_std_",
                    "calibration_indices_", "max_reference_patches_", "map_centring_")
# the learned and the nearest-reference parts of patch_score="fused": no spread below this
_MIN_STD = 1e-6


# ------------------------------------------------------------------ meta-comparer and co-attention
class PairComparer(nn.Module):
    """The meta-comparer MLP of Eq. 1, on the concatenation ``[q, r]``, sigmoid output.

    The first layer ``W [q, r] + b`` is split into ``query(q) = W_q q + b`` and
    ``reference(r) = W_r r``, computed once per patch and broadcast over pairs;
    ``forward`` returns logits (the sigmoid is applied where Eq. 2/4 need it:
    it is monotone, so maxima and rankings are those of the logits).
    """

    def __init__(self, dim, hidden_layer_sizes=(64,)):
        super().__init__()
        self.query = nn.Linear(dim, hidden_layer_sizes[0])
        self.reference = nn.Linear(dim, hidden_layer_sizes[0], bias=False)
        layers = []
        for a, b in zip(hidden_layer_sizes, [*hidden_layer_sizes[1:], 1]):
            layers += [nn.ReLU(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*layers)

    def from_hidden(self, hidden):
        """Logits from first-layer pre-activations ``(..., H)``."""
        return self.rest(hidden).squeeze(-1)

    def forward(self, q, r):
        """Logits of aligned pairs ``q[..., :]`` with ``r[..., :]``."""
        return self.from_hidden(self.query(q) + self.reference(r))

    def _block_logits(self, q, r, weight, buffer):
        """Logits ``(n, m)`` of the query rows ``q (n, H)`` with the reference rows ``r (m,
        H)``, no autograd; with one hidden layer, ``weight`` is its output weights and the
        output bias is left out (added to a row of blocks at once). The ``(n, m, H)``
        pre-activations are written into ``buffer`` (flat, or None to allocate them)."""
        out = None
        if buffer is not None:
            out = buffer[:q.shape[0] * r.shape[0] * q.shape[1]].view(q.shape[0], r.shape[0], -1)
        hidden = torch.add(q[:, None, :], r[None, :, :], out=out).relu_()
        if weight is None:
            return self.rest[1:](hidden).squeeze(-1)
        if is_exporting():  # ONNX Runtime multiplies and sums 2.4 times as fast
            return (hidden * weight).sum(-1)
        return hidden @ weight  # one hidden layer: a matrix-vector product

    def reduce(self, qh, rh, reduction="max", exclude=None):
        """For every query row, the max (Eq. 1) or min logit over all reference rows.

        ``qh (n_q, H)`` and ``rh (n_r, H)`` are ``query(q)`` and ``reference(r)``.
        Pairs are scored in cache-sized blocks (``_PAIR_BLOCK`` elements of ``(queries,
        references, H)``, written into one buffer), whose logits are joined into a row of
        up to ``_LOGIT_BLOCK`` and reduced at once, with a running reduction across such
        rows (no autograd); ``exclude(q_rows, r_rows) -> bool (n, m)`` masks pairs out.
        Returns the values ``(n_q,)`` and the index of the reference row reaching them
        (the first of equal ones).
        """
        # the number of query rows grows with the batch size: qh.shape[0], not len(qh),
        # leaves it open in a graph of this code (skad._onnx)
        n_q, n_r, hidden = qh.shape[0], len(rh), qh.shape[1]
        device = "cpu" if qh.device.type == "cpu" else "cuda"
        rows_r = max(1, min(n_r, _REF_ROWS[device], _PAIR_BLOCK[device] // hidden))
        rows_q = max(1, _PAIR_BLOCK[device] // (rows_r * hidden))
        cols = max(1, _LOGIT_BLOCK[device] // (rows_q * rows_r)) * rows_r
        buffer = None
        if is_exporting():  # one block of all query rows (row_blocks), reduced block by block
            rows_r = cols = min(n_r, _EXPORT_REF_ROWS)
        sign = 1.0 if reduction == "max" else -1.0
        best = torch.full((n_q,), -torch.inf, device=qh.device)
        where = torch.zeros(n_q, dtype=torch.long, device=qh.device)
        dtype = torch.promote_types(qh.dtype, rh.dtype)
        with torch.no_grad():
            weight = self.rest[1].weight[0].to(dtype) if len(self.rest) == 2 else None
            if not is_exporting():
                buffer = torch.empty(min(n_q, rows_q) * rows_r * hidden, device=qh.device,
                                     dtype=dtype)
            for qs in row_blocks(n_q, rows_q):
                q = qh[qs]
                for c0 in range(0, n_r, cols):
                    c1 = min(c0 + cols, n_r)
                    z = torch.cat([self._block_logits(q, rh[r0:r0 + rows_r], weight, buffer)
                                   for r0 in range(c0, c1, rows_r)], dim=1)
                    z = (z if weight is None else z + self.rest[1].bias[0]).float()
                    z = z if sign > 0 else z.neg_()
                    if exclude is not None:
                        z = z.masked_fill_(exclude(qs, slice(c0, c1)), -torch.inf)
                    val, idx = z.max(dim=1)
                    better = val > best[qs]
                    best[qs] = torch.where(better, val, best[qs])
                    where[qs] = torch.where(better, idx + c0, where[qs])
        return sign * best, where


class CoAttention(nn.Module):
    """Co-attention (paper 2.3): a shared projection, cosine affinity mapped to [0, 1]."""

    def __init__(self, dim, attention_dim=64):
        super().__init__()
        self.proj = nn.Linear(dim, attention_dim)

    def embed(self, x):
        return F.normalize(self.proj(x).float(), dim=-1)

    def forward(self, q, r):
        """Affinity ``a = (1 + cos) / 2`` of aligned pairs."""
        return 0.5 * (1.0 + (self.embed(q) * self.embed(r)).sum(-1))

    def matrix(self, q, r):
        """Affinity matrix ``A (n_q, n_r)`` of all pairs."""
        return 0.5 * (1.0 + self.embed(q) @ self.embed(r).T)


class MetaComparerHead(nn.Module):
    """BiFPN, meta-comparer and co-attention: everything trained on top of the backbone."""

    def __init__(self, in_channels, width, n_levels, n_cells, scales, hidden_layer_sizes,
                 attention_dim):
        super().__init__()
        self.bifpn = BiFPN(in_channels, width, n_levels, n_cells)
        self.comparer = PairComparer(width, hidden_layer_sizes)
        self.coattention = CoAttention(width, attention_dim)
        self.scales = list(scales)

    def forward(self, levels):
        """The selected pyramid levels, each as patches ``(B, h, w, width)``."""
        pyramid = self.bifpn(levels)
        return [pyramid[s].permute(0, 2, 3, 1) for s in self.scales]


# ------------------------------------------------------------------ losses (Eq. 2-4)
def classification_loss(logits, y):
    """Eq. 2 at one scale: BCE of ``max_j s^j`` (given as a logit) against ``y``."""
    return F.binary_cross_entropy_with_logits(logits.float(), y.float())


def attention_loss(min_affinity, y, eps=1e-6):
    """Eq. 3 at one scale: ``-y log(1 - min a) - (1 - y) log(min a)``."""
    m = min_affinity.clamp(eps, 1 - eps)
    return -(y * torch.log(1 - m) + (1 - y) * torch.log(m)).mean()


def rank_loss(s_u, s_v, a_u, a_v, lam=1.0):
    """Eq. 4 at one scale, averaged over pairs: ``w max(0, 1 - sigma (s_u - s_v))``.

    ``w = lam (exp|a_u - a_v| - 1)``, ``sigma = -sgn(a_u - a_v)``; the affinities are
    guidance and receive no gradient.
    """
    a_u, a_v = a_u.detach(), a_v.detach()
    w = lam * (torch.exp((a_u - a_v).abs()) - 1)
    sigma = -torch.sign(a_u - a_v)
    return (w * F.relu(1 - sigma * (s_u - s_v))).mean()


def episode_losses(head, patches, n_queries, y, *, reduction, n_reference_patches,
                   n_rank_pairs, lam, generator):
    """``(L_cls, L_att, L_rank)`` of one episode at one scale.

    ``patches (B, h, w, D)`` holds the queries first, then the references. Maxima
    and minima over pairs are located without gradient over all pairs (chunked),
    then only the pairs reaching them are recomputed with gradient: a max's
    gradient flows to its argmax only, so this is exact at a fraction of the memory (in
    float32; under CUDA's bfloat16 autocast a near-tie may pick a neighbouring maximum).
    """
    dim = patches.shape[-1]
    q = patches[:n_queries].reshape(n_queries, -1, dim)
    r = patches[n_queries:].reshape(-1, dim)
    if n_reference_patches and len(r) > n_reference_patches:
        r = r[torch.randperm(len(r), generator=generator)[:n_reference_patches].to(r.device)]
    n_patches, rows = q.shape[1], torch.arange(n_queries, device=q.device)[:, None]
    cmp = head.comparer
    with torch.no_grad():
        z, k = cmp.reduce(cmp.query(q.reshape(-1, dim)), cmp.reference(r), reduction)
        z, k = z.view(n_queries, n_patches), k.view(n_queries, n_patches)
        j_cls = z.argmax(dim=1, keepdim=True)  # Eq. 2: max over the query patches
        aff = torch.stack([head.coattention.matrix(qi, r) for qi in q])  # (n_q, N, M)
        a = aff.amax(dim=2)  # a^j = max_k a^{j,k}
        flat = aff.flatten(1).argmin(dim=1)  # Eq. 3: the least similar pair
        j_att, k_att = flat // aff.shape[2], flat % aff.shape[2]
        uv = torch.randint(n_patches, (2, n_queries, n_rank_pairs), generator=generator)
        u, v = uv.to(q.device)
    l_cls = classification_loss(cmp(q[rows, j_cls], r[k.gather(1, j_cls)])[:, 0], y)
    m = head.coattention(q[rows[:, 0], j_att], r[k_att])
    l_att = attention_loss(m, y.float())
    s_u = torch.sigmoid(cmp(q[rows, u], r[k.gather(1, u)]).float())
    s_v = torch.sigmoid(cmp(q[rows, v], r[k.gather(1, v)]).float())
    l_rank = rank_loss(s_u, s_v, a.gather(1, u), a.gather(1, v), lam)
    return l_cls, l_att, l_rank


# ------------------------------------------------------------------ scoring
def median_cell(dist):
    """The median cell ``(n, 1, 1)`` of each distance grid of ``dist (n, h, w)``, its
    infinite cells (no reference patch allowed) left out: the lower of the two middle
    values, as ``torch.median``, taken by sorting, which an ONNX graph can hold (it
    cannot hold ``aten::median``)."""
    values = dist.flatten(1)
    middle = (torch.isfinite(values).sum(dim=1, keepdim=True) - 1).clamp(min=0) // 2
    return values.sort(dim=1).values.gather(1, middle)[:, :, None]  # +inf sorts last


# ------------------------------------------------------------------ the estimator
@fill_doc(trained_on="normal and anomalous",
          reference_scores="Leave-one-image-out scores of the reference images.",
          calibration_cost=(" Scoring each reference against the other references grows"
                            " as the square of their number; the subset makes it grow"
                            " linearly."))
class MetaComparer(BaseDetector):
    """Domain-generalized anomaly detector that learns to compare queries with normal references.

    Trained on several source domains (``groups``) with image-level labels
    only, it scores images of a new domain against a few of that domain's
    normal images given to :meth:`set_reference`, without retraining, and
    localizes defects (Chen et al., ICME 2022).

    Parameters
    ----------
    backbone : str, default="resnet18.tv_in1k"
        timm CNN with ``features_only`` support, optionally with its pretrained tag:
        the paper's ImageNet ResNet-18, with torchvision's weights (the paper does not
        say which; torchvision's were the usual ones in 2022, timm's default tag for
        ``resnet18`` is another training recipe).
    weights : "pretrained", str, path-like or None, default="pretrained"
        Backbone weights: timm's pretrained tag, another tag, a checkpoint
        file, or None (random; tests only). Resolved offline first.
    layers : tuple of int, default=(2, 3, 4)
        Backbone levels fed to the BiFPN (strides 8, 16, 32: P3-P5).
    train_backbone : bool, default=False
        Fine-tune the backbone (at ``learning_rate * backbone_learning_rate_ratio``). A frozen
        backbone's features are computed once and cached for the whole fit.
    image_size : int or (int, int), default=256
        Working size images are resized to.
        %(image_size_pair)s
    fpn_width : int, default=64
        BiFPN channels, the patch dimension (EfficientDet-D0's).
    n_fpn_cells : int, default=3
        BiFPN cells (EfficientDet-D0's); 0 keeps lateral 1x1 convs only.
    n_fpn_levels : int, default=5
        Pyramid levels (P3-P7 with three backbone levels).
    scales : tuple of int, default=(0, 1, 2)
        Pyramid levels compared (the paper's L scales; 0 = P3).
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden layer sizes of the meta-comparer MLP (as scikit-learn's MLPs).
    attention_dim : int, default=64
        Dimension of the co-attention space.
    reference_reduction : {"max", "min"}, default="max"
        How a query patch's pair scores are reduced over the reference patches:
        "max" is Eq. 1; "min" (ours, beyond the paper) scores a patch by its
        best-matching reference patch, nearest-neighbour style.
    patch_score : {"fused", "learned", "nearest"}, default="fused"
        How a query patch is scored against the references (the image score is
        the maximum of the patch scores, Eq. 5; the map is made of them, Eq. 6).

        - "learned": the meta-comparer alone, Eq. 1 (Chen et al., ICME 2022), reduced
          over the reference patches by ``reference_reduction``. It learns on the
          source domains what a defective patch looks like; measured on held-out
          surfaces, its ranking of the images hardly depends on the references
          (docs/benchmarks.md, MetaComparer).
        - "nearest" (ours, beyond the paper): the distance of the patch's locally aware
          backbone features (the first two ``layers``, 3 x 3 averaged, as PatchCore's)
          to the nearest reference patch; no learned part.
        - "fused" (ours, beyond the paper): the sum of the two, each standardised with
          the mean and standard deviation of the references' own leave-one-out patch
          values (``score_mean_``, ``score_std_``; of the references that calibrate,
          ``calibration_indices_``), so that neither dominates and the
          sum is calibrated per domain without training on it. The learned part brings
          what transfers from the source domains, the nearest-reference part the
          target's normality: more references lower the scores of normal patches.
          With a single reference its leave-one-out values are distances to its own
          patches, far closer than a new good image's (docs/benchmarks.md, "References
          that count"), so the maps (not the scores) then centre the nearest part on
          each image's median cell (``map_centring_``).
    attention_weight, rank_weight : float, default=1.0
        Weights of L_att (Eq. 3) and L_rank (Eq. 4) next to L_cls (Eq. 2);
        ``rank_weight`` is also Eq. 4's λ, which scales L_rank the same way.
    mismatch_ratio : float, default=0.0
        Fraction of episodes (beyond the paper) whose references come from another
        source domain than their queries, with every query labelled anomalous. The
        paper's episodes can be solved by recognising defects without looking at
        the references (a defect is a defect in any source domain); these episodes
        reward telling a query from the references, so that the score depends on
        them. Needs two or more source domains. Deprecated since 0.2 (FutureWarning
        at ``fit``), removed in 0.3: measured on a held-out fabric it did not make
        more references help, and with Eq. 1's max more references lowered the
        image AUROC (docs/benchmarks.md, MetaComparer ablations).
    n_epochs : int, default=10
    n_episodes : int, default=50
        Episodes (optimiser steps) per epoch.
    n_episode_queries : int, default=8
        Query images per episode, half normal, half anomalous.
    n_episode_references : int, default=4
        Normal reference images per episode, from the queries' domain.
    n_reference_patches : int or None, default=256
        Reference patches sampled per scale and episode for training (None: all).
    max_reference_patches : int or None, default=1024
        Reference patches kept per scale and part by :meth:`set_reference` (ours, beyond
        the paper): when the references have more, a greedy k-center coreset of them
        (PatchCore's Alg. 1: of the comparer's reference vectors ``W_r r`` for the learned
        part, of the locally aware features for the nearest part), so that scoring time
        stops growing with the number of references (1024 = one reference image at
        256 px). None keeps every patch (the paper's Eq. 1 over all of them). Measured:
        docs/benchmarks.md, "References that count" and "Scoring speed".
    n_rank_pairs : int, default=128
        Query patch pairs (u, v) sampled per query and scale for L_rank.
    learning_rate : float, default=1e-3
    weight_decay : float, default=1e-4
    backbone_learning_rate_ratio : float, default=0.1
        The backbone's learning rate, as a fraction of ``learning_rate``
        (``train_backbone=True`` only).
    synthesize_anomalies : {"auto", True, False}, default="auto"
        Add synthetic anomalous images (pasted regions of other images, noise
        blobs, scratches; beyond the paper): "auto" for domains without any
        anomalous image, True for every domain, False never.
    n_synthetic : int, default=32
        Synthetic anomalous images per domain that gets them.
    sigma : float, default=0.0
        Gaussian smoothing of the maps; 0 gives Eq. 6 exactly.
    %(false_reject_rate)s
    batch_size : int, default=16
    %(device)s
    %(verbose)s
    random_state : int, Generator or None, default=None
        Seeds initialisation, episodes, patch sampling and synthetic anomalies.
    %(deprecated)s

    Attributes
    ----------
    %(n_samples_fit)s
    backbone_ : skad._backbone.Backbone
    head_ : MetaComparerHead
        BiFPN, meta-comparer and co-attention.
    domains_ : ndarray of str
        Source domains trained on.
    n_synthetic_ : int
        Synthetic anomalous images added.
    loss_history_ : list of float
        Mean loss of each epoch.
    patch_score_ : str
        The ``patch_score`` the reference was set with (scoring needs the same).
    max_reference_patches_ : int or None
        The ``max_reference_patches`` the reference was set with (scoring needs the same).
    reference_hidden_ : list of torch.Tensor
        Per scale, ``W_r r`` of the reference patches kept (all of them, or
        ``max_reference_patches`` in coreset order) ``(n_patches, hidden_layer_sizes[0])``
        (``patch_score`` "learned" and "fused").
    reference_features_ : torch.Tensor of shape (n_patches, n_channels)
        Locally aware features of the reference patches kept, likewise (``patch_score``
        "nearest" and "fused").
    score_mean_, score_std_ : ndarray of shape (2,)
        Mean and standard deviation of the references' leave-one-out patch values,
        learned part then nearest-reference part, that standardise them
        (``patch_score="fused"``).
    map_centring_ : bool
        Whether the maps subtract from the nearest-reference part its median over
        each image's cells (``patch_score="fused"`` with a single reference). The
        image scores never do: the whole image's distance from the reference is
        evidence about the image, not about where in it a defect lies.
    %(thresholds)s

    Notes
    -----
    Scores are logits: ``decision_function`` is Eq. 5 before the sigmoid
    (monotone, so rankings and thresholds are the same, without saturation ties).
    The authors released no code; where the paper is silent, the choices are
    ours: the backbone (ResNet-18 with torchvision's ImageNet weights) and its
    levels, every default of the BiFPN, MLP, co-attention, loss weights, λ,
    episodes, patch sampling, optimiser (AdamW, cosine decay to 0.1 x, gradient
    clipping at 1) and ``scales``. Eq. 1-2 are
    computed on sampled reference patches during training and, at inference, on all
    of them up to ``max_reference_patches`` per scale (a coreset above that: scoring
    time then stays that of about one reference image at 256 px whatever their
    number). Without metadata routing, ``GridSearchCV``/``cross_validate`` do
    not pass ``groups`` to ``fit``: it warns and treats all images as one domain.

    References
    ----------
    S.-F. Chen, Y.-M. Liu, C.-C. Lin, T. P.-C. Chen, Y.-C. F. Wang, "Domain-Generalized
    Textured Surface Anomaly Detection", ICME 2022.

    Examples
    --------
    >>> from skad import MetaComparer, datasets
    >>> data = datasets.make_textures(n_domains=3, n_normal=8, n_anomalous=4,
    ...                               image_size=32, random_state=0)
    >>> src = data.groups != data.groups[-1]
    >>> # 3 references calibrate false-reject rates of 1/4 and above
    >>> det = MetaComparer(backbone="test_resnet", weights=None, image_size=32, n_epochs=1,
    ...                    n_episodes=2, false_reject_rate=0.25, random_state=0)
    >>> det = det.fit(data.images[src], data.y[src], groups=data.groups[src])
    >>> target = data.images[~src]
    >>> det = det.set_reference(target[:3])
    >>> det.decision_function(target[3:]).shape, det.predict_map(target[3:5]).shape
    ((9,), (2, 32, 32))
    """

    _one_class = False
    _compares_with_references = True

    #: read by scoring: changed after set_reference, the calibration no longer holds
    #: (patch_score, like max_reference_patches, also changes what set_reference keeps:
    #: _check_reference_settings refuses to score then)
    _scoring_parameters: ClassVar[tuple] = (*BaseDetector._scoring_parameters, "sigma")

    _parameter_constraints: ClassVar[dict] = {
        **BaseDetector._parameter_constraints,
        **backbone_constraints(),
        "train_backbone": ["boolean"],
        "fpn_width": [Ints(1)],
        "n_fpn_cells": [Ints(0)],
        "n_fpn_levels": [Ints(1)],
        # indices of pyramid levels; that they exist is checked with n_fpn_levels and layers
        "scales": [Sequences(Ints(0))],
        "hidden_layer_sizes": [Sequences(Ints(1))],
        "attention_dim": [Ints(1)],
        "reference_reduction": [StrOptions({"max", "min"})],
        "patch_score": [StrOptions({"fused", "learned", "nearest"})],
        "attention_weight": [Reals(0)],
        "rank_weight": [Reals(0)],
        "mismatch_ratio": [Reals(0, 1)],
        "n_epochs": [Ints(1)],
        "n_episodes": [Ints(1)],
        # an episode needs a normal and an anomalous query
        "n_episode_queries": [Ints(2)],
        "n_episode_references": [Ints(1)],
        "n_reference_patches": [Ints(1), None],
        "max_reference_patches": [Ints(1), None],
        "n_rank_pairs": [Ints(1)],
        "learning_rate": [Reals(0, None, closed="neither")],
        "weight_decay": [Reals(0)],
        "backbone_learning_rate_ratio": [Reals(0)],
        "synthesize_anomalies": [StrOptions({"auto"}), "boolean"],
        "n_synthetic": [Ints(1)],
        "sigma": [Reals(0)],
        "hidden_sizes": deprecated(Sequences(Ints(1))),
        "fpn_cells": deprecated(Ints(0)),
        "fpn_levels": deprecated(Ints(1)),
        "episode_queries": deprecated(Ints(2)),
        "episode_references": deprecated(Ints(1)),
        "backbone_lr_ratio": deprecated(Reals(0)),
        "rank_lambda": deprecated(Reals(0)),
    }
    # counts are n_*, the MLP's sizes are scikit-learn's, the learning rate is spelled out
    _deprecated_parameters: ClassVar[dict] = {
        "hidden_sizes": "hidden_layer_sizes", "fpn_cells": "n_fpn_cells",
        "fpn_levels": "n_fpn_levels", "episode_queries": "n_episode_queries",
        "episode_references": "n_episode_references",
        "backbone_lr_ratio": "backbone_learning_rate_ratio",
        # Eq. 4's lambda multiplied L_rank exactly as rank_weight does: one of the two stays
        "rank_lambda": "rank_weight"}

    def __init__(self, *, backbone="resnet18.tv_in1k", weights="pretrained", layers=(2, 3, 4),
                 train_backbone=False, image_size=256, fpn_width=64, n_fpn_cells=3,
                 n_fpn_levels=5, scales=(0, 1, 2), hidden_layer_sizes=(64,), attention_dim=64,
                 reference_reduction="max", patch_score="fused", attention_weight=1.0,
                 rank_weight=1.0, mismatch_ratio=0.0, n_epochs=10, n_episodes=50,
                 n_episode_queries=8, n_episode_references=4, n_reference_patches=256,
                 max_reference_patches=1024, n_rank_pairs=128,
                 learning_rate=1e-3, weight_decay=1e-4, backbone_learning_rate_ratio=0.1,
                 synthesize_anomalies="auto", n_synthetic=32, sigma=0.0,
                 false_reject_rate=0.05, max_calibration_references=200,
                 threshold_quantile=DEPRECATED, batch_size=16,
                 device="auto", verbose=0, random_state=None, hidden_sizes=DEPRECATED,
                 fpn_cells=DEPRECATED, fpn_levels=DEPRECATED, episode_queries=DEPRECATED,
                 episode_references=DEPRECATED, backbone_lr_ratio=DEPRECATED,
                 rank_lambda=DEPRECATED):
        # scikit-learn's constructor: the parameters stored as given, nothing else
        self._store_parameters(locals())

    # ------------------------------------------------------------ fit
    def _check_param_relations(self):
        """What ``_parameter_constraints`` cannot say: ``scales`` within the pyramid; and
        the deprecation of ``mismatch_ratio``."""
        if self.mismatch_ratio > 0:
            warnings.warn(
                "MetaComparer's mismatch_ratio (episodes with other-domain references, beyond "
                "the paper) is deprecated since 0.2 and will be removed in 0.3: measured, it "
                "did not make more references help and lowered the image AUROC with Eq. 1 "
                "(docs/benchmarks.md, MetaComparer ablations)", FutureWarning, stacklevel=3)
        fpn_levels = self._param("n_fpn_levels")
        n_levels = max(fpn_levels, len(self.layers))
        if any(s >= n_levels for s in self.scales):
            raise ValueError(f"scales={self.scales} must index the {n_levels} pyramid levels "
                             f"(n_fpn_levels={fpn_levels}, {len(self.layers)} layers)")

    def _fit(self, images, y, groups):
        if y is None:
            raise ValueError("MetaComparer learns from image-level labels: call "
                             "fit(X, y, groups=domains) with y (0 = normal, 1 = anomalous)")
        for name in _REFERENCE_ATTRS:  # a new fit invalidates the previous reference
            self.__dict__.pop(name, None)
        if groups is None:
            warnings.warn(
                "MetaComparer.fit got no groups: all training images are treated as one "
                "domain. Pass groups=domains; inside GridSearchCV/cross_validate this needs "
                "sklearn.set_config(enable_metadata_routing=True).", UserWarning, stacklevel=3)
            groups = np.zeros(len(images), dtype=int)
        seed = seed_from(self.random_state)
        rng = np.random.default_rng(seed)
        plan, names, synthetic = self._plan_domains(images, y, np.asarray(groups), rng)
        n_syn = len(synthetic) if synthetic is not None else 0
        labels = np.r_[y, np.ones(n_syn, dtype=np.int64)]
        with torch_seed(seed) as gen:
            self.backbone_ = self._create_backbone(seed, load_weights=True)
            self.head_ = self._create_head(self.backbone_.channels)
            fetch = self._feature_source(ImageSets(images, synthetic))
            self.loss_history_ = self._train(fetch, plan, labels, rng, gen)
        self.domains_ = np.asarray(names)
        self.n_synthetic_ = n_syn

    def _create_backbone(self, seed, load_weights):
        return create_backbone(self.backbone, self.weights, self.layers,
                               trainable=self.train_backbone, random_state=seed,
                               load_weights=load_weights)

    def _create_head(self, channels):
        return MetaComparerHead(channels, self.fpn_width, self._param("n_fpn_levels"),
                                self._param("n_fpn_cells"), self.scales,
                                tuple(self._param("hidden_layer_sizes")), self.attention_dim)

    def _empty_networks(self, shapes):
        """Backbone and comparer head architectures, for :func:`skad.load` to fill."""
        backbone = self._create_backbone(None, load_weights=False)
        return {"backbone_": backbone, "head_": self._create_head(backbone.channels)}

    def _plan_domains(self, images, y, groups, rng):
        """Per usable domain ``[normal indices, anomalous indices]``, names, synthetic images."""
        plan, names, bases = [], [], []
        for name in np.unique(groups):
            normal = np.flatnonzero((groups == name) & (y == 0))
            anomalous = np.flatnonzero((groups == name) & (y == 1))
            synth = self.synthesize_anomalies is True or (
                self.synthesize_anomalies == "auto" and len(anomalous) == 0)
            if len(normal) < 2 or not (len(anomalous) or synth):
                warnings.warn(f"MetaComparer: domain {str(name)!r} ({len(normal)} normal, "
                              f"{len(anomalous)} anomalous images) is left out: an episode "
                              "needs 2 normal images and an anomalous one (real or synthetic)",
                              UserWarning, stacklevel=4)
                continue
            if synth:
                bases.append((len(plan), rng.choice(normal, self.n_synthetic)))
            plan.append([normal, anomalous])
            names.append(name)
        if not plan:
            raise ValueError(
                "MetaComparer cannot train: no domain has at least 2 normal images and an "
                "anomalous image. Label some defective images (y == 1) per domain or set "
                "synthesize_anomalies='auto' (or True)")
        return plan, names, self._synthesize(images, y, plan, bases, rng)

    def _synthesize(self, images, y, plan, bases, rng):
        """Synthetic anomalous images (uint8, at ``image_size``) appended after ``images``."""
        normals = np.flatnonzero(y == 0)

        def read(i):
            return load_resized(images, int(i), self.image_size).permute(1, 2, 0).numpy()

        arrays = []
        for d, idx in bases:
            start = len(images) + len(arrays)
            arrays += synthetic_anomalies(read, idx, normals, rng)
            plan[d][1] = np.r_[plan[d][1], np.arange(start, start + len(idx))]
        return check_images(arrays, name="synthetic") if arrays else None

    def _feature_source(self, images):
        """``fetch(indices) -> backbone levels``: cached once when the backbone is frozen."""
        device = self._device()
        self._to_device(device)
        if not self.train_backbone:
            def backbone(batch):
                with self._autocast(batch.device):
                    return [f.half() for f in self.backbone_(batch)]  # half: the cache's size
            cache = self._map_images_multi(images, backbone, desc="backbone features")
            return lambda idx: [f[torch.as_tensor(idx)].to(device).float() for f in cache]

        def fetch(idx):
            batch = torch.stack([load_resized(images, int(i), self.image_size) for i in idx])
            return self.backbone_(batch.to(device))
        return fetch

    def _draw_episode(self, plan, labels, rng):
        """Paper 2.4: a source domain, balanced queries and normal references from it.

        Returns ``(queries, references, y)``. With probability ``mismatch_ratio``
        (beyond the paper) the references come from another domain and every
        query is labelled anomalous: it does not match them.
        """
        d = rng.integers(len(plan))
        normal, anomalous = plan[d]
        perm = rng.permutation(normal)
        n_queries, n_references = (self._param("n_episode_queries"),
                                   self._param("n_episode_references"))
        n_ref = min(n_references, len(normal) - 1)
        refs, rest = perm[:n_ref], perm[n_ref:]
        n_anom = n_queries // 2
        n_norm = n_queries - n_anom
        queries = np.r_[rng.choice(rest, n_norm, replace=len(rest) < n_norm),
                        rng.choice(anomalous, n_anom, replace=len(anomalous) < n_anom)]
        y = labels[queries]
        if self.mismatch_ratio > 0 and len(plan) > 1 and rng.random() < self.mismatch_ratio:
            other = plan[(d + rng.integers(1, len(plan))) % len(plan)][0]
            refs = rng.choice(other, min(n_references, len(other)), replace=False)
            y = np.ones_like(y)
        return queries, refs, y

    def _train(self, fetch, plan, labels, rng, gen):
        device = self._device()
        head = self.head_
        module = nn.ModuleList([self.backbone_, head]) if self.train_backbone else head
        opt = make_optimizer(head, self.learning_rate, self.weight_decay)
        if self.train_backbone:
            for p in self.backbone_.parameters():
                opt.add_param_group({"params": [p], "lr": self.learning_rate *
                                     self._param("backbone_learning_rate_ratio"),
                                     "weight_decay": self.weight_decay if p.ndim > 1 else 0.0})
        sched = cosine_schedule(opt, self.n_epochs, final_ratio=0.1)

        def step(episode):
            queries, refs, y = episode
            y = torch.as_tensor(y, dtype=torch.float32, device=device)
            loss = 0.0
            for patches in head(fetch(np.r_[queries, refs])):
                l_cls, l_att, l_rank = episode_losses(
                    head, patches, len(queries), y, reduction=self.reference_reduction,
                    n_reference_patches=self.n_reference_patches,
                    n_rank_pairs=self.n_rank_pairs, lam=1.0, generator=gen)
                # Eq. 4's lambda scales L_rank as rank_weight does: one parameter for both
                loss = (loss + l_cls + self.attention_weight * l_att
                        + self._param("rank_weight") * l_rank)
            return loss

        return train(module, step, n_epochs=self.n_epochs,
                     batches=lambda epoch: [self._draw_episode(plan, labels, rng)
                                            for _ in range(self.n_episodes)],
                     optimizer=opt, scheduler=sched, device=device, verbose=self.verbose,
                     desc="MetaComparer", grad_clip=_GRAD_CLIP)

    # ------------------------------------------------------------ reference and scoring
    def _uses(self, part):
        """Whether ``patch_score`` needs the "learned" or the "nearest" part."""
        return self.patch_score in (part, "fused")

    def _embed(self, batch):
        """Per scale, the query part and the reference part of the MLP's first layer (when
        ``patch_score`` uses the learned part), then the locally aware features
        ``(B, h, w, C)`` of the first two backbone levels (when it uses the nearest part)."""
        with self._autocast(batch.device):
            levels = self.backbone_(batch)
            pyramid = self.head_(levels) if self._uses("learned") else []
        cmp = self.head_.comparer
        out = [t for p in pyramid for t in (cmp.query(p.float()), cmp.reference(p.float()))]
        if self._uses("nearest"):
            out.append(locally_aware_features(levels[:2]).permute(0, 2, 3, 1).contiguous())
        return out

    def _patch_values(self, qh, bank, exclude=None):
        return self.head_.comparer.reduce(qh, bank, self.reference_reduction, exclude)[0]

    def _set_reference(self, images, calibration):
        parts = self._map_images_multi(images, self._embed, desc="reference features",
                                       split=True)
        learned = parts[:-1] if self.patch_score == "fused" else parts
        for name in ("reference_hidden_", "reference_features_", "score_mean_", "score_std_"):
            self.__dict__.pop(name, None)
        self.patch_score_ = self.patch_score
        self.map_centring_ = self.patch_score == "fused" and len(images) == 1
        self.max_reference_patches_ = self.max_reference_patches
        gen = torch.Generator().manual_seed(seed_from(self.random_state))
        with torch.inference_mode():
            if self._uses("learned"):
                banks = [self._reference_rows(r, gen) for r in learned[1::2]]
                self.reference_hidden_ = [bank for bank, _ in banks]
                kept = [rows for _, rows in banks]
            if self.patch_score == "learned":
                return self._leave_one_out_scores(learned[0::2], kept, calibration)
            feats = parts[-1]
            self.reference_features_, rows = self._reference_rows(feats, gen)
            grid = self._nearest_leave_one_out(feats, rows, calibration)
            sizes = [q.shape[1:3] for q in parts[0:-1:2]] or None
            if self.patch_score == "nearest":
                return self._grid_scores(grid, len(feats), sizes)
            learned_grid = self._on_grid(
                self._learned_leave_one_out(learned[0::2], kept, calibration), grid.shape[1:])
            return self._fused_leave_one_out_scores(learned_grid, grid, len(feats), sizes)

    def _fused_leave_one_out_scores(self, learned, dist, n_references, sizes):
        """``score_mean_``/``score_std_`` from the references' leave-one-out grids of the
        two parts ``(n, h, w)``, and the references' fused scores and map maxima."""
        mean, std = [], []
        for g in (learned, dist):
            v = g[torch.isfinite(g)].double()
            mean.append(float(v.mean()))
            std.append(max(float(v.std()) if len(v) > 1 else 0.0, _MIN_STD))
        self.score_mean_, self.score_std_ = np.array(mean), np.array(std)
        scores, maxima = self._grid_scores(self._fuse(learned, dist), n_references, sizes)
        if self.map_centring_:  # the maps' maxima as the maps are made
            centred = self._fuse(learned, dist, centred=True)
            top = torch.where(torch.isfinite(centred), centred, -torch.inf)
            maxima = self._map_maxima([centred], top.flatten(1).amax(dim=1))
        return scores, maxima

    def _reference_rows(self, maps, generator):
        """The rows kept of the reference patches ``maps (n, h, w, dim)``: all of them, or
        a greedy coreset of ``max_reference_patches`` (PatchCore's), and their indices
        among the ``n * h * w`` patches (image ``i // (h * w)``, cell ``i % (h * w)``)."""
        rows = maps.flatten(0, 2)
        cap = self.max_reference_patches
        if cap is None or len(rows) <= cap:
            return rows.contiguous(), torch.arange(len(rows))
        kept = greedy_coreset(rows.to(self._device()), cap, generator=generator,
                              verbose=self.verbose)
        return rows[kept].contiguous(), kept

    def _grid_scores(self, grid, n_references, sizes):
        """The scores and map maxima of the references that calibrate, from their
        leave-one-out grids ``(n, h, w)`` (non-finite cells do not count)."""
        finite = torch.isfinite(grid)
        scores = torch.where(finite, grid, -torch.inf).flatten(1).amax(dim=1)
        if not torch.isfinite(scores).all():
            raise ValueError(self._no_leave_one_out(n_references, sizes or [grid.shape[1:]]))
        return scores.numpy(), self._map_maxima([grid], scores)

    def _no_leave_one_out(self, n_references, sizes):
        """Why a reference cannot be scored without its own patches, and what to change."""
        if n_references > 1:  # the coreset kept one image's patches only
            return ("MetaComparer cannot calibrate threshold_: the max_reference_patches="
                    f"{self.max_reference_patches} reference patches kept all come from one "
                    "reference image, which then has no other image's patch to be scored "
                    "against. Raise max_reference_patches (or set it to None)")
        sizes = ", ".join(f"{h} x {w}" for h, w in sizes)
        return ("MetaComparer cannot calibrate threshold_ on one reference image with patch "
                f"grids of {sizes}: every reference patch lies in the 3 x 3 neighbourhood of "
                "every patch, so the image would be scored against itself. Pass at least 2 "
                "reference images (or raise image_size)")

    def _learned_leave_one_out(self, queries, kept, calibration):
        """Per scale, the patch values ``(len(calibration), h, w)`` of the references at
        ``calibration`` against the other references' patches among those ``kept`` (per
        scale, :meth:`_reference_rows`); with a single reference, without the reference
        patches of its own 3 x 3 neighbourhood (non-finite: patches with none left
        outside it)."""
        device = self._device()
        n = len(queries[0])
        grids = []
        for qh, bank, rows in zip(queries, self.reference_hidden_, kept):
            _, h, w, _ = qh.shape
            owner = rows // (h * w)
            pos, bank_pos = torch.arange(h * w, device=device), (rows % (h * w)).to(device)
            values = torch.empty(len(calibration), h * w)
            for k, i in enumerate(calibration.tolist()):
                q = qh[i].flatten(0, 1).to(device)
                if n > 1:
                    z = self._patch_values(q, bank[owner != i].to(device))
                else:
                    def exclude(qs, rs):
                        return adjacent(pos[qs], bank_pos[rs], w)
                    z = self._patch_values(q, bank.to(device), exclude)
                values[k] = z.cpu()
            grids.append(values.view(len(calibration), h, w))
        return grids

    def _leave_one_out_scores(self, queries, kept, calibration):
        """Each reference at ``calibration`` scored against the other references' patches
        (Eq. 5), and the maximum of its map so scored (Eq. 6; it calibrates
        ``pixel_threshold_``).

        With a single reference, a patch is scored without the reference
        patches of its own 3 x 3 neighbourhood instead; patches with none left
        outside it do not count.
        """
        grids = self._learned_leave_one_out(queries, kept, calibration)
        scores = torch.full((len(calibration),), -torch.inf)
        for g in grids:
            z = torch.where(torch.isfinite(g), g, -torch.inf).flatten(1).amax(dim=1)
            scores = torch.maximum(scores, z)
        if not torch.isfinite(scores).all():
            # scoring the reference against its own patches would calibrate on self-matches
            raise ValueError(self._no_leave_one_out(len(queries[0]),
                                                    [q.shape[1:3] for q in queries]))
        return scores.numpy(), self._map_maxima(grids, scores)

    def _nearest_leave_one_out(self, feats, kept, calibration):
        """The nearest-reference-patch distances ``(len(calibration), h, w)`` of the
        references at ``calibration`` to the other references' patches among those
        ``kept`` (with a single reference: outside its 3 x 3 neighbourhood, inf where none
        is left)."""
        device = self._device()
        n, h, w, _ = feats.shape
        bank = self.reference_features_.to(device)
        owner = kept // (h * w)
        pos, bank_pos = torch.arange(h * w, device=device), (kept % (h * w)).to(device)
        bank_aug, workspace = augmented_bank(bank), {}  # PatchCore's leave-one-out search
        out = torch.empty(len(calibration), h * w)
        for k, i in enumerate(calibration.tolist()):
            q = feats[i].flatten(0, 1).to(device)
            if n > 1:  # the reference's own rows of the bank left out, the bank not copied
                own = torch.nonzero(owner == i).flatten().to(device)
                d = nearest_outside(q, bank_aug, own, workspace)[0]
            else:
                d = nearest(q, bank, lambda rows: adjacent(pos[rows], bank_pos, w))[0]
            out[k] = d.cpu()
        return out.view(len(calibration), h, w)

    @staticmethod
    def _on_grid(grids, size):
        """Per-scale grids ``(n, h_s, w_s)`` on one grid ``size`` (nearest), max over scales
        (Eq. 6's max, before the upsampling to the image)."""
        out = None
        for g in grids:
            g = g if tuple(g.shape[1:]) == tuple(size) else upsample(g, size, mode="nearest")
            out = g if out is None else torch.maximum(out, g)
        return out

    def _fuse(self, learned, dist, centred=False):
        """The standardised sum of the learned and the nearest-reference grids ``(n, h,
        w)``; ``centred``: the nearest part less its median over each image's cells."""
        mean = torch.as_tensor(self.score_mean_, dtype=torch.float32, device=learned.device)
        std = torch.as_tensor(self.score_std_, dtype=torch.float32, device=learned.device)
        dist = dist.float()
        centre = median_cell(dist) if centred else mean[1]
        return (learned.float() - mean[0]) / std[0] + (dist - centre) / std[1]

    def _map_maxima(self, grids, scores):
        """The maximum of each reference's map (Eq. 6, as ``_score_batch``) from its patch
        values per scale; patches that do not count take the image's largest value, so
        that the maximum errs high rather than low."""
        maxima = []
        for i, top in enumerate(scores):
            amap = None
            for g in grids:
                z = torch.where(torch.isfinite(g[i]), g[i], top)[None]
                m = upsample(z, self.image_size, mode="nearest")
                amap = m if amap is None else torch.maximum(amap, m)
            if self.sigma > 0:
                amap = gaussian_blur(amap, self.sigma)
            maxima.append(float(amap.max()))
        return np.array(maxima)

    def _check_reference_settings(self):
        """Scoring reads what ``set_reference`` kept for ``patch_score`` and
        ``max_reference_patches``: the same ones."""
        # skad < 0.3 kept the learned part, and every reference patch
        made = {"patch_score": getattr(self, "patch_score_", "learned"),
                "max_reference_patches": getattr(self, "max_reference_patches_", None)}
        for name, value in made.items():
            if getattr(self, name) != value:
                raise RuntimeError(
                    f"MetaComparer's reference was set with {name}={value!r}, and {name} is "
                    f"now {getattr(self, name)!r}: call set_reference(normals) again")

    def _learned_grids(self, parts, device):
        """Per scale, the patch values ``(n, h, w)`` of Eq. 1 (reduced over the references)."""
        grids = []
        for qh, bank in zip(parts[0::2], self.reference_hidden_):
            n, h, w, _ = qh.shape
            grids.append(self._patch_values(qh.flatten(0, 2), bank.to(device)).view(n, h, w))
        return grids

    def _nearest_grid(self, feats, device):
        """Distances ``(n, h, w)`` of the patches to their nearest reference patch."""
        n, h, w, c = feats.shape
        bank = self.reference_features_.to(device)
        return nearest_in_bank(feats.reshape(-1, c), bank)[0].view(n, h, w)

    def _score_batch(self, batch, return_maps):
        self._check_reference_settings()
        parts = self._embed(batch)
        if self.patch_score == "learned":
            grids = self._learned_grids(parts, batch.device)
        else:
            dist = self._nearest_grid(parts[-1], batch.device)
            grids = [dist]
            if self.patch_score == "fused":
                learned = self._on_grid(self._learned_grids(parts[:-1], batch.device),
                                        dist.shape[1:])
                grids = [self._fuse(learned, dist)]
        scores = torch.stack([z.flatten(1).amax(dim=1) for z in grids]).amax(dim=0)  # Eq. 5
        if not return_maps:
            return scores, None
        if getattr(self, "map_centring_", False):  # a single reference (set since 0.2)
            grids = [self._fuse(learned, dist, centred=True)]
        out = None
        for z in grids:  # Eq. 6: a pixel takes the max over the cells containing it
            m = upsample(z, batch.shape[-2:], mode="nearest")
            out = m if out is None else torch.maximum(out, m)
        if self.sigma > 0:
            out = gaussian_blur(out, self.sigma)
        return scores, out

    def __setstate__(self, state):
        # pickles of skad < 0.3 have no patch_score: their reference holds the learned
        # part only, and they keep scoring with it (the paper's Eq. 1)
        state.setdefault("patch_score", "learned")
        # before max_reference_patches every reference patch was kept; a pickle of then
        # keeps doing so at its next set_reference
        state.setdefault("max_reference_patches", None)
        super().__setstate__(state)
