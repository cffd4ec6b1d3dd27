"""GeneralAD (Sträter et al., "GeneralAD: Anomaly Detection Across Domains by
Attending to Distorted Features", ECCV 2024).

Patch tokens of a frozen backbone (paper §3.1) are distorted in feature space
(§3.2: Gaussian noise on all or on a random subset of patches, or a shuffle of
some patches); a small transformer, the cross-patch attention discriminator
(§3.3), learns to tell each distorted patch from a real one. At test time
nothing is distorted: the discriminator's patch logits are the anomaly map and
the mean of the top-K logits is the image score (§3.4). The backbone is frozen
and nothing is augmented, so its tokens (and the class-token attention that a
shuffle needs) are computed once per ``fit`` and the discriminator trains on
that cache.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import StrOptions
from torch import nn

from ._backbone import backbone_constraints, create_backbone, join_levels
from ._docstrings import fill_doc
from ._images import image_hw
from ._layers import PatchAttention
from ._maps import grid_to_map
from ._params import DEPRECATED, Ints, Reals, Sequences, deprecated
from ._random import seed_from, torch_seed
from ._training import cosine_schedule, iter_minibatches, make_optimizer, train
from .base import BaseDetector

__all__ = ["GeneralAD", "Discriminator", "distort", "balanced_bce", "top_k_mean",
           "DISTORTIONS"]

DISTORTIONS = ("noise_all", "noise_random", "attention_shuffle", "random_shuffle")
# the released smoothing at 518 px: sigma 16, the kernel cut at 18 px
_SIGMA_AT_518 = 16.0
_RADIUS_AT_518 = 18.0


# ---------------------------------------------------------------- discriminator
class Discriminator(nn.Module):
    """Cross-patch attention discriminator (paper §3.3, Eq. 3-4): one logit per patch.

    ``x + E_pos`` -> [attention, dropout, residual, LayerNorm] -> [MLP D -> hidden -> D
    with GELU and dropout, dropout, residual] -> ``Linear(D, 1, bias=False)``.

    Parameters
    ----------
    dim : int
        Token dimension ``D``.
    n_patches : int
        Number of patches ``N`` (one learnable position vector each).
    n_heads, hidden_dim, dropout : int, int, float
    """

    def __init__(self, dim, n_patches, n_heads=4, hidden_dim=2048, dropout=0.1):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(n_patches, dim))  # E_pos, randn as released
        # initialised as torch's MultiheadAttention, which the released discriminator uses
        self.attn = PatchAttention(dim, n_heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim))
        self.drop2 = nn.Dropout(dropout)
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, x):
        """``(B, N, D)`` patch tokens -> ``(B, N)`` patch logits (higher = anomalous)."""
        x = x + self.pos_embed
        x = self.norm(x + self.drop1(self.attn(x)))  # Eq. 3 and the LN of Eq. 4
        x = x + self.drop2(self.mlp(x))  # Eq. 4's MLP: D -> hidden -> D, then the head
        return self.head(x)[..., 0]


# ---------------------------------------------------------------- distortions (§3.2)
def _counts(n_images, n_patches, low, generator, device):
    """How many patches to distort in each image: uniform in ``low .. n_patches``."""
    return torch.randint(low, n_patches + 1, (n_images,), generator=generator, device=device)


def _noise(feats, std, generator):
    return std * torch.randn(feats.shape, generator=generator, device=feats.device,
                             dtype=feats.dtype)


def noise_all(feats, std, generator=None):
    """Gaussian noise N(0, std^2) on every patch; every patch is anomalous."""
    mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    return feats + _noise(feats, std, generator), mask


def noise_random(feats, std, generator=None):
    """Gaussian noise on a random subset of ``k`` patches, ``k`` uniform in 1..N per image."""
    b, n, _ = feats.shape
    k = _counts(b, n, 1, generator, feats.device)
    rank = torch.rand(b, n, generator=generator, device=feats.device).argsort(1).argsort(1)
    mask = rank < k[:, None]
    return feats + _noise(feats, std, generator) * mask[..., None], mask


def _shuffle_leading(feats, order, k, generator):
    """Move the features among the patches ``order[:, :k]`` along a random cycle.

    A cycle leaves no selected patch in place, so that every patch labelled
    anomalous has changed (a plain random permutation has fixed points).
    """
    b, n, d = feats.shape
    j = torch.arange(n, device=feats.device).expand(b, n)
    chosen = j < k[:, None]
    # random order inside the chosen set; the others keep theirs, after it
    key = torch.where(chosen, torch.rand(b, n, generator=generator, device=feats.device),
                      1.0 + j.to(torch.float32))
    order = order.gather(1, key.argsort(1))
    source = order.gather(1, torch.where(chosen, (j + 1) % k[:, None], j))
    out = feats.clone()
    out.scatter_(1, order[..., None].expand(b, n, d), feats.gather(1, source[..., None].expand(b, n, d)))
    mask = torch.zeros(b, n, dtype=torch.bool, device=feats.device).scatter_(1, order, chosen)
    return out, mask


def random_shuffle(feats, generator=None):
    """Permute ``k`` random patches of each image, ``k`` uniform in 2..N."""
    b, n, _ = feats.shape
    order = torch.rand(b, n, generator=generator, device=feats.device).argsort(1)
    return _shuffle_leading(feats, order, _counts(b, n, 2, generator, feats.device), generator)


def attention_shuffle(feats, attention, generator=None):
    """Permute the top-``k`` patches by class-token attention of a random head.

    ``attention`` is ``(B, n_heads, N)``; ``k`` is uniform in 2..N per image.
    """
    b, h, n = attention.shape
    head = torch.randint(h, (b,), generator=generator, device=feats.device)
    scores = attention.to(feats.device).gather(1, head.view(b, 1, 1).expand(b, 1, n))[:, 0]
    order = scores.float().argsort(1, descending=True)
    return _shuffle_leading(feats, order, _counts(b, n, 2, generator, feats.device), generator)


def distort(kind, feats, *, attention=None, noise_std=0.25, generator=None):
    """One distorted copy of ``feats`` (B, N, D) and its mask (B, N) (paper Eq. 2)."""
    if kind == "noise_all":
        return noise_all(feats, noise_std, generator)
    if kind == "noise_random":
        return noise_random(feats, noise_std, generator)
    if kind == "random_shuffle":
        return random_shuffle(feats, generator)
    if kind == "attention_shuffle":
        return attention_shuffle(feats, attention, generator)
    raise ValueError(f"unknown distortion {kind!r}; choose from {DISTORTIONS}")


# ---------------------------------------------------------------- loss and scores
def balanced_bce(logits, mask):
    """BCE-with-logits, averaged separately over the normal (0) and distorted (1) patches.

    The two means are added (an empty class adds nothing), as in the released
    training: a copy with few distorted patches still weighs them fully.
    """
    logits, target = logits.float().flatten(), mask.flatten()
    loss = logits.new_zeros(())
    for cls in (False, True):
        sel = target == cls
        if sel.any():
            loss = loss + F.binary_cross_entropy_with_logits(
                logits[sel], torch.full_like(logits[sel], float(cls)))
    return loss


def top_k_mean(logits, k):
    """Paper Eq. 5: the mean of the ``k`` highest patch logits of each image (all if None)."""
    logits = logits.float()
    if k is None or k >= logits.shape[1]:
        return logits.mean(dim=1)
    return logits.topk(k, dim=1).values.mean(dim=1)


# ---------------------------------------------------------------- class-token attention
class _ClassAttention:
    """Forward hook on a timm ViT block's ``attn``: class-token attention per head.

    Recomputes ``softmax(q_cls k^T / sqrt(d))`` from the block's ``qkv`` (the
    fused kernel does not expose the weights) and keeps the patch columns.
    """

    def __init__(self, model, block):
        attn = model.blocks[block].attn
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
            raise ValueError(f"attention_shuffle needs a timm ViT with a fused qkv projection; "
                             f"{type(model).__name__}'s block {block} has {type(attn).__name__}")
        if getattr(model, "cls_token", None) is None:
            raise ValueError("attention_shuffle needs a ViT with a class token")
        self.module, self.prefix, self.maps = attn, model.num_prefix_tokens, []

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, output):
        x = args[0]
        b, t, _ = x.shape
        qkv = module.qkv(x).view(b, t, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0][:, :, :1]), module.k_norm(qkv[1])
        weights = ((q * module.scale) @ k.transpose(-2, -1)).float().softmax(-1)
        self.maps.append(weights[:, :, 0, self.prefix:])  # class token (index 0) -> patches


# ---------------------------------------------------------------- estimator
@fill_doc(border_cells="the backbone's convolutions see zero padding", equation="Eq. 5")
class GeneralAD(BaseDetector):
    """GeneralAD: a cross-patch attention discriminator trained on distorted features.

    Parameters
    ----------
    backbone : str, default="vit_large_patch14_dinov2.lvd142m"
        Frozen timm model: a ViT (the paper's DINOv2 ViT-L/14; ``vit_small_patch14_dinov2``
        and ``vit_base_patch14_dinov2`` are its small and base variants) or a CNN, whose
        feature-map cells serve as patch tokens (``tf_efficientnet_lite0`` runs offline).
    weights : "pretrained", str, path-like or None, default="pretrained"
        Backbone weights (see :func:`skad._backbone.resolve_weights`); None: random (tests).
    layers : tuple of int, default=(-1,)
        ViT blocks or CNN feature levels whose tokens are used (concatenated along the
        channels, coarser levels upsampled to the first one's grid). The paper: the last block.
        For ``tf_efficientnet_lite0`` use ``(3,)`` (stride 16, 112 channels) or ``(2, 3)``.
    image_size : int or (int, int), default=518
        Working size; it fixes the patch grid, hence the discriminator's positions.
        %(image_size_pair)s
        For a ViT, each side must be a multiple of its patch size.
    norm : bool, default=True
        ViTs: tokens through the model's final norm (the paper). CNNs: a layer norm without
        parameters over each cell's channels (our choice), so ``noise_std`` has the scale
        it has for DINOv2 tokens.
    distortions : str or tuple of str, default=("noise_all", "noise_random")
        Distorted copies made of every training image, each beside the real features:
        ``"noise_all"``, ``"noise_random"``, ``"attention_shuffle"`` (ViT only),
        ``"random_shuffle"``. The default is the released setting for industrial data (the
        paper's "Noise Random Patches"); semantic data: ``"noise_all"``; logical anomalies:
        add ``"attention_shuffle"``.
    noise_std : float, default=0.25
        Standard deviation of the Gaussian feature noise.
    n_heads : int, default=4
    hidden_dim : int, default=2048
    dropout : float, default=0.1
        Discriminator sizes (paper §4.2).
    n_epochs : int, default=160
    learning_rate : float, default=5e-4
    weight_decay : float, default=1e-5
    final_learning_rate_ratio : float, default=0.2
        AdamW; the learning rate follows a cosine from ``learning_rate`` to
        ``final_learning_rate_ratio * learning_rate``.
    top_k : int or None, default=10
        Image score = mean of the ``top_k`` highest patch logits (paper Eq. 5); None: all
        patches (semantic anomalies).
    sigma : float or None, default=None
        Gaussian smoothing of the maps at ``image_size``; None: ``16 * image_size / 518``.
    %(standardize_positions)s
    %(false_reject_rate)s
    batch_size : int, default=16
        Images per feature batch and per training step.
    %(device)s
    %(verbose)s
    random_state : int, Generator or None, default=None
        Seeds the discriminator's initialisation, the distortions, dropout and the order of
        the training images (and random backbone weights, for tests).
    %(deprecated)s

    Attributes
    ----------
    %(n_samples_fit)s
    backbone_ : skad._backbone.Backbone
        The frozen feature extractor.
    discriminator_ : Discriminator
        The trained discriminator.
    feature_grid_ : tuple of int
        ``(h, w)`` patch grid at ``image_size``.
    n_features_ : int
        Token dimension.
    loss_history_ : list of float
        Mean training loss of each epoch.
    %(position_statistics)s
    %(thresholds)s

    Notes
    -----
    Defaults follow the paper and the authors' released code (LucStrater/GeneralAD and its
    jobs; docs/methods/general_ad.md): the attention discriminator's xavier initialisation
    with zero biases, weight decay on every parameter, dropped last partial batches, the map
    smoothing's Gaussian truncated at ``round(sigma * 18 / 16)`` px. It differs from the
    released code:

    - images are resized with skad's shared reader (bilinear with antialiasing), the
      released code with PIL's Lanczos filter: one reader for every detector, so that a
      file reads the same whichever detector scores it. Measured on two fabrics at 224 px,
      40 epochs, one seed (docs/benchmarks.md, "GeneralAD: Lanczos against skad's
      resize"): with Lanczos, image AUROC +0.011, PRO +0.019, pixel AUROC +0.003 on the
      mean, small beside the spread over seeds;
    - ``norm`` for CNN backbones, which the released code does not run;
    - ``sigma`` scales with ``image_size`` from the paper's 16 px at 518 px (the released
      code keeps 16 px at any size, 3 % of a 518 px image but 6 % of a 256 px one);
    - shuffles move every selected patch along a random cycle with ``k`` in 2..N: a
      one-patch "shuffle" changes nothing, yet the released code labels it anomalous;
    - a fixed number of epochs: the released code keeps its best epoch on the test set,
      which a user without labelled defects cannot do.
    - ``standardize_positions=True``: each map position is scored against the references'
      maps at that position, the image by the standardised map's maximum (the released
      code: Eq. 5 on the raw logits). Measured on the five fabrics, one-class, 40 epochs
      (docs/benchmarks.md, "Position standardisation"): mean image AUROC 0.799 against
      0.753, PRO 0.565 against 0.542, pixel AUROC 0.870 against 0.869; normal images whose
      maximum lies on the border ring 46 % against 61 % (chance: 23 %).

    ``set_reference`` does not retrain the discriminator: it sets the position
    statistics and ``threshold_``.

    References
    ----------
    L. P. J. Sträter, M. Salehi, E. Gavves, C. G. M. Snoek, Y. M. Asano, "GeneralAD:
    Anomaly Detection Across Domains by Attending to Distorted Features", ECCV 2024.

    Examples
    --------
    >>> from skad import GeneralAD, datasets
    >>> data = datasets.make_textures(n_domains=1, n_normal=12, n_anomalous=4,
    ...                               image_size=32, random_state=0)
    >>> normal = data.images[data.y == 0]
    >>> det = GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,), image_size=32,
    ...                 hidden_dim=32, n_epochs=2, false_reject_rate=0.2,
    ...                 random_state=0).fit(normal[:8])  # warns: no rate on its training set
    >>> # good images it was not trained on calibrate: 4 of them support 1/5
    >>> det.set_reference(normal[8:]).false_reject_rate_
    0.2
    >>> det.predict(data.images[:3]).shape  # 1 = rejected at false_reject_rate
    (3,)
    >>> det.predict_mask(data.images[:2]).shape  # pixels above pixel_threshold_
    (2, 32, 32)
    """

    #: read by scoring: changed after set_reference, the calibration no longer holds
    _scoring_parameters: ClassVar[tuple] = (*BaseDetector._scoring_parameters, "top_k",
                                            "sigma")

    _parameter_constraints: ClassVar[dict] = {
        **BaseDetector._parameter_constraints,
        **backbone_constraints(),
        "norm": ["boolean"],
        "distortions": [StrOptions(set(DISTORTIONS)), Sequences(StrOptions(set(DISTORTIONS)))],
        # > 0 where a noise distortion is asked for (_check_param_relations)
        "noise_std": [Reals(0)],
        "n_heads": [Ints(1)],
        "hidden_dim": [Ints(1)],
        "dropout": [Reals(0, 1, closed="left")],
        "n_epochs": [Ints(1)],
        "learning_rate": [Reals(0, None, closed="neither")],
        "weight_decay": [Reals(0)],
        "final_learning_rate_ratio": [Reals(0)],
        "top_k": [Ints(1), None],
        "sigma": [Reals(0), None],
        "standardize_positions": ["boolean"],
        "lr": deprecated(Reals(0, None, closed="neither")),
        "lr_final_ratio": deprecated(Reals(0)),
    }
    # scikit-learn's learning_rate, as every detector spells it
    _deprecated_parameters: ClassVar[dict] = {"lr": "learning_rate",
                                              "lr_final_ratio": "final_learning_rate_ratio"}

    def __init__(self, *, backbone="vit_large_patch14_dinov2.lvd142m", weights="pretrained",
                 layers=(-1,), image_size=518, norm=True,
                 distortions=("noise_all", "noise_random"), noise_std=0.25, n_heads=4,
                 hidden_dim=2048, dropout=0.1, n_epochs=160, learning_rate=5e-4,
                 weight_decay=1e-5, final_learning_rate_ratio=0.2, top_k=10, sigma=None,
                 standardize_positions=True, false_reject_rate=0.05,
                 max_calibration_references=200, threshold_quantile=DEPRECATED, batch_size=16,
                 device="auto", verbose=0, random_state=None,
                 lr=DEPRECATED, lr_final_ratio=DEPRECATED):
        # scikit-learn's constructor: the parameters stored as given, nothing else
        self._store_parameters(locals())

    # ------------------------------------------------------------ checks
    def _distortion_kinds(self):
        """``distortions`` as a tuple."""
        kinds = self.distortions
        return (kinds,) if isinstance(kinds, str) else tuple(kinds)

    def _check_param_relations(self):
        """What ``_parameter_constraints`` cannot say: noise distortions need noise."""
        # with no noise the distorted copies equal the real tokens yet are labelled anomalous
        if not self.noise_std > 0 and any(k.startswith("noise") for k in self._distortion_kinds()):
            raise ValueError(f"noise_std must be > 0 for the noise distortions; "
                             f"got {self.noise_std!r}")

    # ------------------------------------------------------------ features (§3.1)
    def _feature_map(self, batch):
        """Patch features ``(B, D, h, w)`` of a batch of images (float16 on CUDA)."""
        with self._autocast(batch.device):
            levels = self.backbone_(batch)
        fmap = join_levels([f.float() for f in levels])
        if self.norm and not self.backbone_.is_vit:
            fmap = F.layer_norm(fmap.movedim(1, -1), fmap.shape[1:2]).movedim(-1, 1)
        return fmap.half() if batch.device.type == "cuda" else fmap

    def _feature_map_and_attention(self, batch):
        with _ClassAttention(self.backbone_.model, self.backbone_.layers[-1]) as hook:
            fmap = self._feature_map(batch)
        attention = hook.maps[-1]
        return fmap, attention.half() if batch.device.type == "cuda" else attention

    # ------------------------------------------------------------ fitting
    def _fit(self, images, y, groups):
        kinds = self._distortion_kinds()
        seed = seed_from(self.random_state)
        self.backbone_ = self._create_backbone(seed, load_weights=True)
        patch = self.backbone_.strides[-1]
        if self.backbone_.is_vit and any(side % patch for side in image_hw(self.image_size)):
            # the ViT would drop the border that does not fill a patch: maps would drift
            raise ValueError(f"image_size={self.image_size} is not a multiple of the "
                             f"{patch}-pixel patches of {self.backbone!r}")
        use_attention = "attention_shuffle" in kinds
        if use_attention and not self.backbone_.is_vit:
            raise ValueError(f"distortion 'attention_shuffle' needs a ViT backbone (class-token "
                             f"attention); {self.backbone!r} is a CNN: use 'random_shuffle'")
        if use_attention:
            fmaps, attention = self._map_images_multi(images, self._feature_map_and_attention,
                                                      desc="features and attention")
        else:
            fmaps, attention = self._map_images(images, self._feature_map, desc="features"), None
        dim, h, w = fmaps.shape[1:]
        if h * w < 2 and any(k.endswith("shuffle") for k in kinds):
            raise ValueError(f"a shuffle needs at least 2 patches; image_size={self.image_size} "
                             f"gives {h * w}")
        self.feature_grid_ = (int(h), int(w))
        self.n_features_ = int(dim)
        feats = fmaps.flatten(2).transpose(1, 2).contiguous()  # (n_images, N, D), row-major
        device = self._device()
        with torch_seed(seed) as gen:
            self.discriminator_ = self._create_discriminator().to(device)
            self.loss_history_ = self._train(feats, attention, kinds, gen, seed, device)

    def _create_backbone(self, seed, load_weights):
        return create_backbone(self.backbone, self.weights, self.layers,
                               image_size=self.image_size, norm=self.norm, random_state=seed,
                               load_weights=load_weights)

    def _create_discriminator(self):
        h, w = self.feature_grid_
        return Discriminator(self.n_features_, h * w, self.n_heads, self.hidden_dim,
                             self.dropout)

    def _empty_networks(self, shapes):
        """Backbone and discriminator architectures, for :func:`skad.load` to fill."""
        return {"backbone_": self._create_backbone(None, load_weights=False),
                "discriminator_": self._create_discriminator()}

    def _train(self, feats, attention, kinds, gen, seed, device):
        """Train the discriminator on the cached tokens (paper §3.3, §4.2)."""
        feats = feats.to(device)
        attention = attention.to(device) if attention is not None else None
        # the distortions draw on the compute device, from their own seeded generator
        dgen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
        # weight decay on every parameter, norms and biases too, as the released AdamW
        opt = make_optimizer(self.discriminator_, self._param("learning_rate"),
                             self.weight_decay, decay_norm_and_bias=True)
        sched = cosine_schedule(opt, self.n_epochs, self._param("final_learning_rate_ratio"))

        def step(idx):
            idx = idx.to(device)
            real = feats[idx].float()
            copies, masks = [real], [torch.zeros(real.shape[:2], dtype=torch.bool, device=device)]
            for kind in kinds:
                att = attention[idx] if attention is not None else None
                x, m = distort(kind, real, attention=att, noise_std=self.noise_std,
                               generator=dgen)
                copies.append(x)
                masks.append(m)
            # one batched forward over the real and all distorted copies
            logits = self.discriminator_(torch.cat(copies)).split(len(idx))
            return sum(balanced_bce(lg, m) for lg, m in zip(logits, masks))

        return train(self.discriminator_, step, n_epochs=self.n_epochs,
                     batches=lambda epoch: iter_minibatches(len(feats), self.batch_size, gen,
                                                            drop_last=True),
                     optimizer=opt, scheduler=sched, device=device, verbose=self.verbose,
                     desc="GeneralAD discriminator")

    # ------------------------------------------------------------ scoring (§3.4)
    def _smoothing(self):
        """Gaussian sigma of the maps and its kernel radius, in pixels at ``image_size``.

        The released 16 px at 518 px, scaled with the image, cut at the released
        18 / 16 sigma (scipy's default would be 4 sigma).
        """
        sigma = (_SIGMA_AT_518 * max(image_hw(self.image_size)) / 518.0 if self.sigma is None
                 else float(self.sigma))
        return sigma, max(1, round(sigma * _RADIUS_AT_518 / _SIGMA_AT_518))

    def _score_batch(self, batch, return_maps):
        tokens = self._feature_map(batch).flatten(2).transpose(1, 2)
        with self._autocast(batch.device):
            logits = self.discriminator_(tokens).float()
        scores = top_k_mean(logits, self.top_k)
        if not return_maps:
            return scores, None
        grid = logits.unflatten(1, self.feature_grid_)
        return scores, grid_to_map(grid, self.image_size, *self._smoothing())

