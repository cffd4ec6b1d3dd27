"""Generic network layers that the detectors build on, one small module each (as timm's).

Each layer says where it comes from. The detectors' own networks, which hold
a method's idea, stay in their method's file; what is here is reusable and
method-neutral:

* :class:`BiFPN` (with :class:`BiFPNCell`, :class:`FastFusion`,
  :class:`SeparableConv`): EfficientDet's bidirectional feature pyramid;
* :class:`PartialConv2d` and :func:`partial_conv2d`: convolutions over the
  valid pixels of a mask (Liu et al. 2018), through :func:`conv2d`: ``F.conv2d``,
  by Winograd's transform where that is faster on the CPU;
* :class:`PatchAttention`: multi-head self-attention over the patches of an image;
* :class:`SimpleFPNLevel` and :func:`sincos_2d`: ViTDet's simple feature
  pyramid on a ViT's token grid, and MAE's fixed 2-D position embeddings;
* :func:`adaptive_average` and :func:`neighbourhoods`: adaptive average pooling
  along any dimension, and each cell's unfolded 3 x 3 neighbourhood (the
  pieces of the released PatchCore code's patch embedding).

Fitted detectors pickled before these moved here name them by their method
module (``skad._meta_comparer.BiFPN``, ...); those modules import them, so
that such pickles still load.
"""

import functools
import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .base import is_exporting

__all__ = ["BiFPN", "BiFPNCell", "FastFusion", "PartialConv2d", "PatchAttention",
           "SeparableConv", "SimpleFPNLevel", "adaptive_average", "conv2d", "max_pool2x2",
           "neighbourhoods", "partial_conv2d", "sincos_2d"]


# ------------------------------------------------------------------ BiFPN
class SeparableConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 + BatchNorm (EfficientDet's BiFPN conv).

    Tan, Pang, Le, "EfficientDet: Scalable and Efficient Object Detection", CVPR 2020, Sec. 3.
    """

    def __init__(self, channels):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                         nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))


class FastFusion(nn.Module):
    """A BiFPN node: ``sum_i w_i x_i`` with ``w = relu(w) / (sum relu(w) + 1e-4)``, swish, conv.

    EfficientDet's "fast normalized fusion" (Tan et al. 2020, Sec. 3.3).
    """

    def __init__(self, n_inputs, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_inputs))
        self.conv = SeparableConv(channels)

    def forward(self, inputs):
        w = F.relu(self.weight)
        w = w / (w.sum() + 1e-4)
        return self.conv(F.silu(sum(wi * x for wi, x in zip(w, inputs))))


def _up(x, size):
    return F.interpolate(x, size=size, mode="nearest")


def _down(x, size):
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    return x if x.shape[-2:] == size else F.adaptive_max_pool2d(x, size)


class BiFPNCell(nn.Module):
    """One top-down then bottom-up pass over ``n_levels`` maps of equal width (Tan et al.
    2020, Fig. 2d)."""

    def __init__(self, n_levels, channels):
        super().__init__()
        self.top_down = nn.ModuleList(FastFusion(2, channels) for _ in range(n_levels - 1))
        self.bottom_up = nn.ModuleList(FastFusion(3 if i < n_levels - 1 else 2, channels)
                                       for i in range(1, n_levels))

    def forward(self, feats):
        n = len(feats)
        td = list(feats)
        for i in range(n - 2, -1, -1):
            td[i] = self.top_down[i]([feats[i], _up(td[i + 1], feats[i].shape[-2:])])
        out = [td[0]]
        for i in range(1, n):
            middle = [td[i]] if i < n - 1 else []
            out.append(self.bottom_up[i - 1]([feats[i], *middle,
                                              _down(out[-1], feats[i].shape[-2:])]))
        return out


class BiFPN(nn.Module):
    """Lateral 1x1 convs to ``width``, extra levels by max-pooling, then ``n_cells`` cells.

    With backbone levels P3-P5 and ``n_levels=5`` this is EfficientDet's BiFPN
    on P3-P7 (Tan et al. 2020): P6 = maxpool(BN(conv1x1(C5))), P7 = maxpool(P6).
    ``n_cells=0`` keeps the laterals and extra levels only (no fusion; an ablation).
    """

    def __init__(self, in_channels, width=64, n_levels=5, n_cells=3):
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 1), nn.BatchNorm2d(width)) for c in in_channels)
        self.n_extra = max(0, n_levels - len(in_channels))
        self.extra = (nn.Sequential(nn.Conv2d(in_channels[-1], width, 1), nn.BatchNorm2d(width))
                      if self.n_extra else None)
        self.cells = nn.ModuleList(BiFPNCell(max(n_levels, len(in_channels)), width)
                                   for _ in range(n_cells))

    def forward(self, feats):
        levels = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        if self.n_extra:
            levels.append(F.max_pool2d(self.extra(feats[-1]), 3, stride=2, padding=1))
        for _ in range(self.n_extra - 1):
            levels.append(F.max_pool2d(levels[-1], 3, stride=2, padding=1))
        for cell in self.cells:
            levels = cell(levels)
        return levels


# ------------------------------------------------------------------ convolution on the CPU
_WINOGRAD_BLOCK = 2**19  # input values per NNPACK call: blocks of a few MB ran fastest
_WINOGRAD_THREADS = 1    # NNPACK on up to this many threads: on two it ran slower than oneDNN


@functools.lru_cache(maxsize=1)
def _nnpack():
    """Whether PyTorch's NNPACK is there and initialised (its convolution fails before)."""
    return hasattr(torch, "_nnpack_spatial_convolution") and torch.backends.nnpack.is_available()


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """``F.conv2d``, by Winograd's transform (NNPACK, in PyTorch) where that is faster.

    A 3 x 3 convolution of stride 1 with at least 32 input and 64 output
    channels, in float32 on the CPU on one thread, without gradients, runs
    through NNPACK (Lavin and Gray, "Fast Algorithms for Convolutional Neural
    Networks", CVPR 2016), which PyTorch uses itself when oneDNN is off: it
    multiplies about half as often, and ran these convolutions 1.6 to 2.4 times
    as fast as oneDNN on 24 x 24 to 6 x 6 maps. On more threads its own thread
    pool competed with PyTorch's and GlobalLocal scored slower than with oneDNN
    (docs/benchmarks.md, "GlobalLocal's scoring"). It rounds differently: up to
    about 1e-5 of the output's largest value. Elsewhere (other shapes, several
    threads, CUDA, training, ``torch.export``'s trace) this is ``F.conv2d``.
    Returns ``(N, C_out, H_out, W_out)``, contiguous (NCHW) where NNPACK ran:
    pool it with :func:`max_pool2x2`.
    """
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    step = stride if isinstance(stride, int) else stride[0]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
            or torch.get_num_threads() > _WINOGRAD_THREADS
            or tuple(weight.shape[2:]) != (3, 3) or step != 1 or max(pad) > 1
            or weight.shape[1] < 32 or weight.shape[0] < 64 or len(x) == 0
            or is_exporting() or not _nnpack()):
        return F.conv2d(x, weight, bias, stride, padding)
    bias = weight.new_zeros(len(weight)) if bias is None else bias
    n, _, h, w = x.shape
    # NCHW out, as NNPACK gives it, written in place: a channels-last copy took about a fifth as
    # long as the convolution
    out = torch.empty(n, len(weight), h + 2 * pad[0] - 2, w + 2 * pad[1] - 2, dtype=x.dtype)
    rows = max(1, _WINOGRAD_BLOCK // x[0].numel())
    for start in range(0, n, rows):
        _winograd(x[start:start + rows].contiguous(), weight, bias, list(pad),
                  out[start:start + rows])
    return out


def _winograd(x, weight, bias, padding, out):
    """NNPACK's convolution of NCHW ``x`` (stride 1) written into ``out``."""
    return torch.ops.aten._nnpack_spatial_convolution.out(x, weight, bias, padding, [1, 1],
                                                          out=out)


def max_pool2x2(x):
    """``F.max_pool2d(x, 2, ceil_mode=True)``: 2 x 2 max pooling of stride 2 that keeps the
    last row and column of an odd side. ``(N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))``.

    On NCHW CPU tensors without gradients (what :func:`conv2d` gives where
    NNPACK ran, and single-channel masks) it is the maximum of four strided
    views, which ran 3.5 to 9 times as fast as PyTorch's NCHW kernel (ad-hoc timings on
    GlobalLocal's shapes, 2026-12-03, not kept as a benchmark); the same
    values (NaN propagates in both).
    """
    if (x.device.type != "cpu" or torch.is_grad_enabled() or is_exporting()
            or (x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last))):
        return F.max_pool2d(x, 2, ceil_mode=True)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    return torch.maximum(torch.maximum(x[..., ::2, ::2], x[..., ::2, 1::2]),
                         torch.maximum(x[..., 1::2, ::2], x[..., 1::2, 1::2]))


# ------------------------------------------------------------------ partial convolution
def partial_conv2d(x, mask, weight, bias=None, stride=1, padding=0, x_masked=False):
    """Partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial
    Convolutions", ECCV 2018, Eq. 1-2). Stateless.

    ``x`` (B, C, H, W), ``mask`` (B, 1, H, W) binary, 1 = valid. Returns the
    output and the next layer's mask. Where the window holds valid pixels,
    ``W^T (X * M) * sum(1) / sum(M) + b``; elsewhere 0. The mask arithmetic runs
    in float32 outside autocast (1e-8 is 0 in float16). ``x_masked`` says that
    ``x`` is already 0 wherever ``mask`` is (true of a partial convolution's own
    output, also after an activation that keeps 0 and a max pooling of both),
    which saves the product ``X * M``.
    """
    kernel = weight.shape[-2:]
    with torch.autocast(x.device.type, enabled=False):
        ones = torch.ones(1, 1, *kernel, device=mask.device)
        count = F.conv2d(mask.float(), ones, stride=stride, padding=padding)  # sum(M)
    update = count.clamp(0.0, 1.0)
    ratio = kernel.numel() / (count + 1e-8) * update  # sum(1) / sum(M), 0 where no valid pixel
    out = conv2d(x if x_masked else x * mask.to(x.dtype), weight, None, stride, padding)
    out.mul_(ratio.to(out.dtype))  # in place: no second tensor of the output's size
    if bias is not None:
        out.addcmul_(bias.view(1, -1, 1, 1).to(out.dtype), update.to(out.dtype))  # b * {0, 1}
    return out, update


class PartialConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``forward(x, mask)`` is :func:`partial_conv2d`; keeps no mask."""

    def forward(self, x, mask, x_masked=False):
        return partial_conv2d(x, mask, self.weight, self.bias, self.stride, self.padding,
                              x_masked)


# ------------------------------------------------------------------ attention
class PatchAttention(nn.Module):
    """Multi-head self-attention over the patches of each image (batch first).

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, with a fused
    ``qkv`` projection as timm's ``Attention``; initialised and regularised as
    ``torch.nn.MultiheadAttention`` (xavier-uniform input projections, zero
    biases, dropout on the attention weights).
    """

    def __init__(self, dim, n_heads, dropout=0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"the token dimension {dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


# ------------------------------------------------------------------ ViT feature pyramid
def sincos_2d(h, w, dim):
    """Fixed 2-D sin-cos position embeddings (as in MAE) for an ``h x w`` grid, ``(h*w, dim)``.

    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
    (their ``get_2d_sincos_pos_embed``). The first half of the channels encodes
    the row, the second half the column, each as ``[sin(p * omega), cos(p * omega)]``
    with ``omega_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class SimpleFPNLevel(nn.Sequential):
    """One level of the simple feature pyramid on a ViT's token grid.

    Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for
    Object Detection" (ViTDet), ECCV 2022, Fig. 2. Rescales the ``(B, dim, h, w)``
    token grid by ``factor``: x4 = ConvT(2, s2) + LayerNorm2d + GELU + ConvT(2, s2),
    x2 = ConvT(2, s2), x1 = identity, x1/2 = max-pool 2 (and x8 one more ConvT);
    each halving the channels per ConvT. Then a 1x1 conv + LayerNorm2d and a 3x3
    conv + LayerNorm2d give ``out_channels``.
    """

    def __init__(self, dim, out_channels, factor):
        k = math.log2(factor)
        if k != int(k) or not -1 <= k <= 3:
            raise ValueError(f"simple FPN scale factor must be 1/2, 1, 2, 4 or 8; got {factor} "
                             "(patch size / teacher stride)")
        layers, ch = [], dim
        if k < 0:
            layers.append(nn.MaxPool2d(2, stride=2))
        for i in range(int(max(k, 0))):
            if i:
                layers += [LayerNorm2d(ch), nn.GELU()]
            layers.append(nn.ConvTranspose2d(ch, max(ch // 2, 1), 2, stride=2))
            ch = max(ch // 2, 1)
        layers += [nn.Conv2d(ch, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                   nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                   LayerNorm2d(out_channels)]
        super().__init__(*layers)


# ------------------------------------------------------------------ pooling
def adaptive_average(x, size, dim=-1):
    """``torch.nn.functional.adaptive_avg_pool1d`` along dimension ``dim`` of ``x``.

    With ``n = x.shape[dim]``, output ``i`` is the mean of the inputs
    ``floor(i n / size)`` to ``ceil((i + 1) n / size) - 1``: neighbouring bins
    share an input where ``size`` does not divide ``n``, and inputs repeat
    where ``size > n``. Computed as a weighted sum of at most
    ``ceil(n / size) + 1`` gathers along ``dim``, with the bins' bounds worked
    out in Python from the shape, so that a traced graph (ONNX) holds it for
    any other dimension's size.
    """
    dim = dim % x.ndim
    offsets, counts = _adaptive_bins(x.shape[dim], size)
    shape = [1] * x.ndim
    shape[dim] = size
    total = None
    for index, weight in offsets:
        term = x.index_select(dim, torch.tensor(index, device=x.device))
        term = term * torch.tensor(weight, dtype=x.dtype, device=x.device).view(shape)
        total = term if total is None else total + term
    return total / torch.tensor(counts, dtype=x.dtype, device=x.device).view(shape)


@functools.lru_cache(maxsize=64)
def _adaptive_bins(n, size):
    """Bins of :func:`adaptive_average`: ``(index, weight)`` per offset within a bin, and
    each bin's count. A bin shorter than the offset repeats its last input with weight 0."""
    start = [i * n // size for i in range(size)]
    end = [-(-(i + 1) * n // size) for i in range(size)]
    offsets = tuple((tuple(min(s + k, e - 1) for s, e in zip(start, end)),
                     tuple(float(s + k < e) for s, e in zip(start, end)))
                    for k in range(max(e - s for s, e in zip(start, end))))
    return offsets, tuple(float(e - s) for s, e in zip(start, end))


def neighbourhoods(x, size=3):
    """Each cell's zero-padded ``size x size`` neighbourhood, unfolded: ``(B, C * size**2, h, w)``.

    ``x`` is ``(B, C, h, w)`` and ``size`` odd; channel ``c * size**2 + dy * size
    + dx`` holds channel ``c`` at offset ``(dy, dx)`` of the neighbourhood, the
    order of ``torch.nn.Unfold`` (``padding = size // 2``, stride 1). Built from
    shifted views of the padded map: slices and a stack, which the ONNX export
    translates (tests/test_onnx.py).
    """
    h, w = x.shape[-2:]
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    shifted = [padded[..., dy:dy + h, dx:dx + w] for dy in range(size) for dx in range(size)]
    return torch.stack(shifted, dim=2).flatten(1, 2)
