"""MMR (Zhang et al., "Industrial Anomaly Detection with Domain Shift: A Real-world
Dataset and Masked Multi-scale Reconstruction", 2023).

A frozen ImageNet CNN (the teacher) encodes an image into features of three
scales. A ViT (the student) sees only the unmasked patches of the same image
(MAE-style masking: the masked tokens are removed before the encoder, so
nothing of them leaks in), a learned mask token fills the removed positions and
a simple FPN decodes the token grid into the teacher's scales. Training aligns
the two by cosine similarity (paper Eq. 1); at test nothing is masked and the
per-scale cosine distances form the anomaly map (Eq. 2). Reconstructing hidden
patches from their context models how the parts of a normal image depend on
one another, which the paper argues survives a change of illumination,
background or viewpoint better than a model of the normal features alone.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._backbone import backbone_constraints, create_backbone, create_model, is_vit
from ._docstrings import fill_doc
from ._layers import SimpleFPNLevel, sincos_2d
from ._maps import grid_to_map
from ._params import DEPRECATED, Ints, Reals, Sequences, deprecated
from ._random import seed_from, torch_seed
from ._training import iter_minibatches, make_optimizer, train, warmup_step_schedule
from .base import BaseDetector

__all__ = [
    "MMR",
    "MaskedStudent",
    "SimpleFPNLevel",
    "cosine_distance_maps",
    "random_resized_crop_flip",
    "reconstruction_loss",
    "sincos_2d",
]


# ------------------------------------------------------------------ modules
class MaskedStudent(nn.Module):
    """timm ViT encoder on the visible patches, mask tokens, sin-cos grid, simple FPN.

    Parameters
    ----------
    vit : timm VisionTransformer
        Built with ``dynamic_img_size=True`` (its position embeddings are
        interpolated to any input size).
    out_channels, factors : sequence
        Channels and scale factors (patch size / teacher stride) of the levels.
    mean, std : sequence of float
        Input normalisation of the ViT's weights.
    """

    def __init__(self, vit, out_channels, factors, mean, std):
        super().__init__()
        self.vit = vit
        dim = vit.embed_dim
        # Psi in Sec. 4.1: the learned embedding of a removed patch (MAE init)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.levels = nn.ModuleList(SimpleFPNLevel(dim, c, f)
                                    for c, f in zip(out_channels, factors))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def encode(self, x, mask_ratio=0.0, generator=None):
        """Token grid ``(B, D, h, w)`` and the kept-patch mask ``(B, h*w)`` (True = visible).

        Phi(x; eta) of Sec. 4.1: a random ``mask_ratio`` of the patches (per
        image, drawn with the CPU ``generator``) is removed *before* the
        encoder, so the encoder never sees them; the mask token then fills
        their places.
        """
        vit = self.vit
        tokens = vit.patch_embed((x - self.mean) / self.std)  # (B, h, w, D)
        b, h, w, dim = tokens.shape
        tokens = vit._pos_embed(tokens)  # prefix tokens + encoder position embeddings
        n_prefix, n = vit.num_prefix_tokens, h * w
        prefix, patches = tokens[:, :n_prefix], tokens[:, n_prefix:]
        n_keep = n if mask_ratio <= 0 else max(1, int(n * (1 - mask_ratio)))
        visible_mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if n_keep < n:
            noise = torch.rand(b, n, generator=generator).to(x.device)
            keep = noise.argsort(dim=1)[:, :n_keep]  # MAE: a random subset per image
            patches = patches.gather(1, keep[..., None].expand(-1, -1, dim))
        out = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prefix, patches], dim=1))))
        grid = out[:, n_prefix:]
        if n_keep < n:
            index = keep[..., None].expand(-1, -1, dim)
            grid = self.mask_token.to(grid.dtype).expand(b, n, dim).scatter(1, index, grid)
            visible_mask = torch.zeros_like(visible_mask).scatter_(1, keep, True)
        grid = grid + sincos_2d(h, w, dim).to(grid)  # fixed decoder position embeddings
        return grid.transpose(1, 2).reshape(b, dim, h, w), visible_mask

    def forward(self, x, mask_ratio=0.0, generator=None, sizes=None):
        """The reconstructed features of every level, ``[(B, C_l, h_l, w_l), ...]``.

        ``sizes`` are the teacher's grid sizes: a level whose size differs
        (image size not a multiple of the strides) is resized bilinearly.
        """
        grid, _ = self.encode(x, mask_ratio, generator)
        outs = [level(grid) for level in self.levels]
        if sizes is not None:
            outs = [o if tuple(o.shape[-2:]) == tuple(s) else
                    F.interpolate(o, size=tuple(s), mode="bilinear", align_corners=False)
                    for o, s in zip(outs, sizes)]
        return outs


# ------------------------------------------------------------------ losses and maps
def cosine_distance_maps(student_feats, teacher_feats):
    """Per level ``1 - cos`` over channels (paper Eq. 2), float32 ``[(B, h_l, w_l), ...]``."""
    return [1.0 - F.cosine_similarity(s.float(), t.float(), dim=1)
            for s, t in zip(student_feats, teacher_feats)]


def reconstruction_loss(student_feats, teacher_feats):
    """Paper Eq. 1: sum over levels of the mean over all positions of ``1 - cos``."""
    return sum(d.mean() for d in cosine_distance_maps(student_feats, teacher_feats))


def random_resized_crop_flip(x, scale=(0.7, 1.0), hflip=True, generator=None,
                             ratio=(3 / 4, 4 / 3)):
    """Random resized crop (area fraction in ``scale``) and horizontal flip, back to x's size.

    Parameters are drawn per image with the CPU ``generator``; the crop is an
    affine resampling of ``x`` (B, 3, H, W), bilinear.
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator, dtype=torch.float64)
    sx = sy = torch.ones(b, dtype=torch.float64)  # crop width, height / image's
    if scale is not None:
        area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
        sx = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
        sy = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    tx = (1 - sx) * (2 * u[:, 2] - 1)  # crop centre, in [-1, 1] coordinates
    ty = (1 - sy) * (2 * u[:, 3] - 1)
    flip = torch.where((u[:, 4] < 0.5) & bool(hflip), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------ the detector
def _to_uint8(batch):
    return (batch * 255).round_().to(torch.uint8)


@fill_doc(border_cells="the teacher's convolutions see zero padding", equation="Eq. 2")
class MMR(BaseDetector):
    """Masked multi-scale reconstruction: a ViT rebuilds a frozen CNN's features from a masked view.

    Parameters
    ----------
    teacher : str, default="wide_resnet50_2.tv_in1k"
        Frozen timm CNN whose features are reconstructed, optionally with its
        pretrained tag (the paper's WideResNet-50-2 with torchvision's ImageNet
        weights, as the released code loads it; ``"tf_efficientnet_lite0"`` has
        offline weights).
    teacher_weights : "pretrained", str, path-like or None, default="pretrained"
        The teacher's weights (see :func:`skad._backbone.resolve_weights`).
    teacher_layers : tuple of int, default=(1, 2, 3)
        Teacher levels (``features_only`` indices; ResNets: layer1-3, strides
        4/8/16; ``tf_efficientnet_lite0``: also strides 4/8/16).
    student : str, default="vit_base_patch16_224.mae_visualize"
        timm ViT of the student, optionally with its pretrained tag: the paper's
        MAE ViT-B/16 with the MAE "visualize" checkpoint that the released configs
        load (see :data:`skad._backbone.EXTRA_WEIGHTS`; timm's ``.mae`` tag is
        MAE's "pretrain" checkpoint).
    student_weights : "pretrained", str, path-like or None, default="pretrained"
        The student's initial weights; None trains it from scratch (the paper's
        Table 7 ablation), with fixed sin-cos encoder position embeddings.
    student_depth : int or None, default=None
        Keep only the first ``student_depth`` transformer blocks (None: all).
    mask_ratio : float, default=0.4
        Fraction of the patches removed from the student's input in training.
    n_epochs : int, default=200
        Passes over the training images (the paper's 200).
    learning_rate : float, default=1e-3
        AdamW's peak learning rate, after the warm-up.
    weight_decay : float, default=0.05
        AdamW weight decay, on weight matrices and kernels only.
    warmup_ratio : float, default=0.25
        Linear warm-up over this fraction of ``n_epochs`` (50 of 200 in the paper).
    learning_rate_milestones : tuple of float, default=(0.6, 0.8)
        Fractions of ``n_epochs`` after which the learning rate is divided by
        10 (epochs 120 and 160 of 200 in the paper).
    crop_scale : tuple of float or None, default=(0.7, 1.0)
        Area range of the training random resized crop; None: no crop.
    hflip : bool, default=True
        Random horizontal flips in training.
    sigma : float, default=4
        Gaussian smoothing of the maps at ``image_size``.
    image_size : int or (int, int), default=224
        Working size of both networks.
        %(image_size_pair)s
    %(standardize_positions)s
    %(false_reject_rate)s
    batch_size : int, default=16
        Training minibatch (the paper's 16) and scoring batch.
    %(device)s
    %(verbose)s
    random_state : int, Generator or None, default=None
        Seeds the student's initialisation, the minibatch order, the masks and
        the augmentation.
    %(deprecated)s

    Attributes
    ----------
    %(n_samples_fit)s
    teacher_ : skad._backbone.Backbone
        The frozen teacher.
    student_ : MaskedStudent
        The trained ViT, mask token and simple FPN.
    scale_factors_ : list of float
        FPN factor of each level: student patch size / teacher stride.
    loss_history_ : list of float
        Mean training loss (Eq. 1) of each epoch.
    %(position_statistics)s
    %(thresholds)s

    Notes
    -----
    Paper settings (the authors' configuration; docs/methods/mmr.md): WideResNet-50-2
    layer1-3, MAE ViT-B/16, masking 0.4, AdamW (0.9, 0.95), learning rate 1e-3,
    weight decay 0.05, batch 16, 200 epochs with 50 of warm-up and the learning rate
    / 10 at 120 and 160, crop scale 0.7-1.0 and flips, sigma 4, score = map maximum. The
    network, loss, warm-up and step schedule, map upsampling
    (``align_corners=True``) and default weights are those of the released code
    (zhangzilongc/MMR). It differs from the released code:

    - test images are resized whole to ``image_size``; the released code resizes
      to 256 and keeps the central 224 px, so that 6 % of each border is never
      scored, and a defect there is never found. Measured on two fabrics, 15
      epochs, one seed (docs/benchmarks.md, "MMR: the released centre crop and
      bicubic training crop"): the crop loses 0.056 image AUROC on the mean;
    - the random training crop is taken from the image resized to ``image_size``
      (bilinear) instead of the original file (bicubic): training keeps the
      resized images in memory as uint8 instead of decoding every file every
      epoch. The interpolation alone, measured on two fabrics already at
      ``image_size`` (same section): image AUROC within 0.001, PRO +0.004 and
      +0.013 with bicubic; the crop from a larger original was not measured;
    - the schedule's epochs (50 warm-up, decays at 120 and 160 of 200) scale with
      ``n_epochs``;
    - the encoder's position embeddings are frozen (fixed sin-cos in the original);
    - ``standardize_positions=True``: each map position is scored against the references'
      maps at that position, the image by the standardised map's maximum (the released
      code: the raw map's maximum). Measured on the five fabrics, one-class, 15 epochs
      (docs/benchmarks.md, "Position standardisation"): mean image AUROC 0.804 against
      0.743 (aitex_03: 0.701 against 0.422), PRO 0.593 against 0.576, pixel AUROC 0.894
      against 0.897; normal images whose maximum lies on the border ring 60 % against
      85 % (chance: 23 %).

    With augmentation on, the teacher runs on every augmented batch; with
    ``crop_scale=None, hflip=False`` its features are computed once per fit.
    ``set_reference`` does not retrain: it sets the position statistics and
    ``threshold_``. After ``fit`` the reference is the training set, whose maps
    run lower than unseen normals': set a held-out reference for a calibrated
    threshold.

    References
    ----------
    Z. Zhang, Z. Zhao, X. Zhang, C. Sun, X. Chen. "Industrial Anomaly Detection
    with Domain Shift: A Real-world Dataset and Masked Multi-scale
    Reconstruction". Computers in Industry 151, 2023. arXiv:2304.02216.

    Examples
    --------
    >>> from skad import MMR, datasets
    >>> data = datasets.make_textures(n_domains=1, n_normal=12, n_anomalous=2,
    ...                               image_size=32, random_state=0)
    >>> normal = data.images[data.y == 0]
    >>> det = MMR(teacher="test_efficientnet", teacher_weights=None, student="test_vit",
    ...           student_weights=None, student_depth=1, n_epochs=1, image_size=32,
    ...           false_reject_rate=0.2, random_state=0).fit(normal[:8])
    >>> # held-out good images calibrate the threshold (its training images promise no rate)
    >>> det.set_reference(normal[8:]).false_reject_rate_
    0.2
    >>> scores, maps = det.score_and_map(data.images)  # one pass for both
    >>> scores.shape, maps.shape
    ((14,), (14, 32, 32))
    """

    #: read by scoring: changed after set_reference, the calibration no longer holds
    _scoring_parameters: ClassVar[tuple] = (*BaseDetector._scoring_parameters, "sigma")

    _parameter_constraints: ClassVar[dict] = {
        **BaseDetector._parameter_constraints,
        **backbone_constraints("teacher", "teacher_weights", "teacher_layers"),
        **backbone_constraints("student", "student_weights", None),
        # at most the student's blocks: checked when it is built
        "student_depth": [Ints(1), None],
        "mask_ratio": [Reals(0, 1, closed="left")],
        "n_epochs": [Ints(1)],
        "learning_rate": [Reals(0, None, closed="neither")],
        "weight_decay": [Reals(0)],
        "warmup_ratio": [Reals(0, 1)],
        "learning_rate_milestones": [Sequences(Reals(0, 1), min_length=0)],
        # lo <= hi: _check_param_relations
        "crop_scale": [Sequences(Reals(0, 1, closed="right"), length=2), None],
        "hflip": ["boolean"],
        "sigma": [Reals(0)],
        "standardize_positions": ["boolean"],
        "lr": deprecated(Reals(0, None, closed="neither")),
        "lr_milestones": deprecated(Sequences(Reals(0, 1), min_length=0)),
    }
    # scikit-learn's learning_rate, as every detector spells it
    _deprecated_parameters: ClassVar[dict] = {"lr": "learning_rate",
                                              "lr_milestones": "learning_rate_milestones"}

    def __init__(self, *, teacher="wide_resnet50_2.tv_in1k", teacher_weights="pretrained",
                 teacher_layers=(1, 2, 3), student="vit_base_patch16_224.mae_visualize",
                 student_weights="pretrained", student_depth=None, mask_ratio=0.4,
                 n_epochs=200, learning_rate=1e-3, weight_decay=0.05, warmup_ratio=0.25,
                 learning_rate_milestones=(0.6, 0.8), crop_scale=(0.7, 1.0), hflip=True,
                 sigma=4.0, standardize_positions=True, image_size=224, false_reject_rate=0.05,
                 max_calibration_references=200,
                 threshold_quantile=DEPRECATED, batch_size=16, device="auto", verbose=0,
                 random_state=None, lr=DEPRECATED, lr_milestones=DEPRECATED):
        # scikit-learn's constructor: the parameters stored as given, nothing else
        self._store_parameters(locals())

    # ----------------------------------------------------------- fitting
    def _check_param_relations(self):
        """What ``_parameter_constraints`` cannot say: ``crop_scale``'s bounds in order."""
        if self.crop_scale is not None and self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be None or (lo, hi) with 0 < lo <= hi <= 1; "
                             f"got {self.crop_scale}")

    def _build(self, seed, load_weights=True):
        """Teacher and student, seeded; the FPN follows the teacher's strides and channels.

        ``load_weights=False``: the architectures only, for :func:`skad.load` to fill.
        """
        teacher = create_backbone(self.teacher, self.teacher_weights, self.teacher_layers,
                                  random_state=seed, load_weights=load_weights)
        if teacher.is_vit:
            raise ValueError(f"teacher must be a hierarchical CNN; {self.teacher!r} is a ViT")
        with torch_seed(seed):
            not_vit = ValueError(f"student must be a timm VisionTransformer; got {self.student!r}")
            try:  # the dynamic size options exist for ViTs only
                vit, _ = create_model(self.student, self.student_weights,
                                      load_weights=load_weights, dynamic_img_size=True,
                                      dynamic_img_pad=True, num_classes=0)
            except TypeError as exc:
                raise not_vit from exc
            # MaskedStudent drives the encoder step by step: VisionTransformer's _pos_embed
            if not is_vit(vit) or not hasattr(vit, "_pos_embed"):
                raise not_vit
            if self.student_depth is not None:
                if not 1 <= self.student_depth <= len(vit.blocks):
                    raise ValueError(f"student_depth must be in [1, {len(vit.blocks)}] for "
                                     f"{self.student!r}; got {self.student_depth}")
                vit.blocks = vit.blocks[:self.student_depth]
            _freeze_position_embeddings(vit, from_scratch=self.student_weights is None)
            patch = vit.patch_embed.patch_size[0]
            factors = [patch / s for s in teacher.strides]
            cfg = vit.pretrained_cfg
            student = MaskedStudent(vit, teacher.channels, factors, cfg.get("mean"),
                                    cfg.get("std"))
        return teacher, student.eval(), factors

    def _empty_networks(self, shapes):
        """Teacher and student architectures, for :func:`skad.load` to fill."""
        teacher, student, _ = self._build(0, load_weights=False)
        return {"teacher_": teacher, "student_": student}

    def _fit(self, images, y, groups):
        seed = seed_from(self.random_state)
        teacher, student, factors = self._build(seed)
        self.teacher_, self.student_, self.scale_factors_ = teacher, student, factors
        augment = self.crop_scale is not None or self.hflip
        # one pass over the files: resized images (uint8) and, when nothing
        # changes them between epochs, the frozen teacher's features
        def cache(batch):
            u8 = _to_uint8(batch)
            if augment:
                return (u8,)
            with self._autocast(batch.device):
                return (u8, *(f.half() for f in self.teacher_(u8.float() / 255)))
        cached = self._map_images_multi(images, cache, desc="caching images")
        self.loss_history_ = self._train(cached, augment, seed)

    def _train(self, cached, augment, seed):
        device = self._device()
        images_u8, targets = cached[0], cached[1:]
        n, bs = len(images_u8), min(self.batch_size, len(images_u8))
        with torch_seed(seed + 1) as gen:
            opt = make_optimizer(self.student_, self._param("learning_rate"), self.weight_decay,
                                 betas=(0.9, 0.95))
            n_warm = round(self.warmup_ratio * self.n_epochs)
            milestones = [round(m * self.n_epochs) for m in self._param("learning_rate_milestones")]
            sched = warmup_step_schedule(opt, n_warm, milestones, 0.1)

            def step(idx):
                x = images_u8[idx].to(device).float() / 255
                if augment:
                    x = random_resized_crop_flip(x, self.crop_scale, self.hflip, gen)
                    with torch.no_grad():
                        target = self.teacher_(x)
                else:
                    target = [t[idx].to(device) for t in targets]
                pred = self.student_(x, self.mask_ratio, gen, [t.shape[-2:] for t in target])
                return reconstruction_loss(pred, target)

            return train(self.student_, step, n_epochs=int(self.n_epochs),
                         batches=lambda epoch: iter_minibatches(n, bs, gen), optimizer=opt,
                         scheduler=sched, device=device, verbose=self.verbose,
                         desc="MMR training")

    # ----------------------------------------------------------- scoring
    def _score_batch(self, batch, return_maps):
        """Eq. 2: per level 1 - cos, upsampled and summed, smoothed; score = maximum."""
        with self._autocast(batch.device):
            target = self.teacher_(batch)
            pred = self.student_(batch, 0.0, None, [t.shape[-2:] for t in target])
        dist = cosine_distance_maps(pred, target)
        # align_corners=True as in the released code's map upsampling
        amap = grid_to_map(dist, self.image_size, self.sigma, align_corners=True)
        return amap.flatten(1).amax(dim=1), (amap if return_maps else None)


def _freeze_position_embeddings(vit, from_scratch):
    """Fixed encoder position embeddings, as in MAE and the MMR code.

    Pretrained weights keep theirs (MAE's are sin-cos); a student trained from
    scratch gets 2-D sin-cos ones (zeros for the class token), not random ones.
    """
    if getattr(vit, "pos_embed", None) is None:
        return
    if from_scratch:
        h, w = vit.patch_embed.grid_size
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        with torch.no_grad():
            vit.pos_embed.zero_()
            vit.pos_embed[0, n_prefix:] = sincos_2d(h, w, vit.embed_dim)
    vit.pos_embed.requires_grad_(False)
