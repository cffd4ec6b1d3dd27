"""Global-local comparison (Wang et al., "Glancing at the Patch: Anomaly Localization
with Global and Local Feature Comparison", CVPR 2021).

A Local-Net embeds a p x p patch; it is distilled from a frozen ImageNet
teacher and then frozen. A Global-Net of partial convolutions sees the patch's
surroundings with the patch itself masked out, so it cannot peek, and learns
to predict the Local-Net's feature of the hidden patch. At test time a patch
whose feature disagrees with what its surroundings predict (IAD head), or that
a small classifier recognises as distorted (DAD head), is anomalous. This
catches defects that look normal inside any single patch: a part in the wrong
place, a swapped colour, a bend.
"""

import copy
import functools
import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import StrOptions
from torch import nn

from ._backbone import backbone_constraints, create_backbone
from ._docstrings import fill_doc
from ._images import check_images, image_hw
from ._layers import PartialConv2d, max_pool2x2, partial_conv2d
from ._params import DEPRECATED, Ints, Reals, deprecated
from ._random import seed_from, torch_seed
from ._training import cosine_schedule, iter_minibatches, make_optimizer
from ._training import train as train_loop
from .base import BaseDetector, is_exporting, row_blocks

__all__ = ["GlobalLocal", "LocalNet", "GlobalNet", "DADHead", "PartialConv2d", "partial_conv2d",
           "distillation_loss", "compactness_loss", "dad_loss", "iad_score", "add_stains",
           "crop_windows", "patch_starts", "jittered_starts", "idw_weights", "idw_interpolate",
           "StemRegions", "edge_strips", "stem_regions", "stem_step", "window_stems"]

_PATCH_BATCH = 128  # Local-Net minibatch (patches); Eq. 2 needs a batch for its correlations
_CHUNK = 256        # windows per Global-Net forward when scoring: their maps stay in the cache
_WEIGHT_DECAY = 1e-5


# ------------------------------------------------------------------ geometry
def patch_starts(size, patch_size, stride):
    """Raster-scan start offsets along one axis (Sec. 3.3); the last patch ends at the border."""
    return torch.tensor(_starts(size, patch_size, stride))


def _starts(size, patch_size, stride):
    """:func:`patch_starts` as a list of ints (no tensor: decided before ``torch.export``'s
    trace, which would take a tensor's values for unknowns)."""
    starts = list(range(0, size - patch_size + 1, stride))
    if starts[-1] != size - patch_size:
        starts.append(size - patch_size)
    return starts


def jittered_starts(size, patch_size, stride, n, generator):
    """``n`` training positions along one axis: raster starts moved by up to half a stride.

    Scoring visits the raster of :func:`patch_starts`, whose first and last
    windows have their context cut by the image edge; uniform positions reach
    those border windows rarely (a corner about once in ``(size - p + 1)^2``
    draws), which left them untrained and scoring high on normal images.
    Drawing around the raster trains them as often as scoring meets them.
    """
    starts = patch_starts(size, patch_size, stride)
    pick = starts[torch.randint(len(starts), (n,), generator=generator)]
    jitter = torch.randint(-(stride // 2), stride // 2 + 1, (n,), generator=generator)
    return (pick + jitter).clamp_(0, size - patch_size)


def crop_windows(images, owner, top, left, size, channels_last=False):
    """``images[owner[k], :, top[k]:top[k]+size, left[k]:left[k]+size]`` for every k, gathered.

    ``size`` is a side or a pair ``(height, width)``. One indexing op for all
    crops: ``(K, C, height, width)``, in the channels-last memory format if
    ``channels_last`` (as gathered: no copy; the faster layout for CPU
    convolutions), else contiguous. Fastest on channels-last ``images``, whose
    pixels' channels are gathered as rows (about twice as fast as gathering
    each value on the CPU, in ad-hoc timings). Raises IndexError if a crop reaches past the images
    (checked where ``owner`` is on the CPU: on a GPU the check would wait for it).
    """
    height, width = (size, size) if isinstance(size, int) else size
    b, c, h, w = images.shape
    dev = images.device
    if not is_exporting() and owner.device.type == "cpu" and len(owner) and bool(
            (top.min() < 0) | (left.min() < 0) | (top.max() + height > h)
            | (left.max() + width > w) | (owner.min() < 0) | (owner.max() >= b)):
        raise IndexError(f"crops of {height} x {width} reach past the images ({h} x {w})")
    pixels = images.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view if channels-last
    corner = (owner.to(dev) * h + top.to(dev)) * w + left.to(dev)
    offsets = (torch.arange(height, device=dev) * w)[:, None] + torch.arange(width, device=dev)
    out = pixels.index_select(0, (corner[:, None, None] + offsets).flatten())
    out = out.view(-1, height, width, c).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


@functools.lru_cache(maxsize=8)
def idw_weights(height, width, patch_size, stride, n_neighbors=4, power=2.0):
    """Inverse-distance weights from the patch centres to every pixel (Sec. 3.3).

    Each pixel takes its ``n_neighbors`` nearest patch centres with weights
    ``d ** -power``, normalised to sum to 1. Returns ``index (H*W, k)`` into the
    raster-ordered patches and ``weight (H*W, k)``; cached per geometry.
    """
    half = (patch_size - 1) / 2
    cy = patch_starts(height, patch_size, stride).double() + half
    cx = patch_starts(width, patch_size, stride).double() + half
    centres = torch.cartesian_prod(cy, cx)
    pixels = torch.cartesian_prod(torch.arange(height).double(), torch.arange(width).double())
    k = min(n_neighbors, len(centres))
    index, weight = [], []
    for start in range(0, len(pixels), 16384):  # blocks bound the distance matrix's memory
        d = torch.cdist(pixels[start:start + 16384], centres)
        dk, ik = torch.topk(d, k, largest=False)
        w = (dk + 1e-6) ** -power
        index.append(ik)
        weight.append((w / w.sum(dim=1, keepdim=True)).float())
    return torch.cat(index), torch.cat(weight)


def idw_interpolate(scores, index, weight, shape):
    """Patch scores ``(B, P)`` -> pixel maps ``(B, H, W)``; linear in the scores."""
    s = scores.float()[:, index.to(scores.device)]  # (B, H*W, k)
    return (s * weight.to(scores.device)).sum(dim=-1).unflatten(1, shape)


# ------------------------------------------------------------------ modules
class LocalNet(nn.Module):
    """Lightweight patch CNN L (Sec. 3.1) with its distillation decoder D (Eq. 1).

    ``forward(p)`` is L(p) (the raw embedding, as distilled); ``embed(p)`` is
    Z_l (Eq. 4), standardised per dimension with the training patches' mean and
    standard deviation (``z_mean``, ``z_std``; our choice, so that the IAD score
    is in units of the features' spread). ``target_mean``/``target_std``
    standardise the teacher's features R(p) for Eq. 1.
    """

    def __init__(self, embed_dim=128, teacher_dim=512, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True))
        self.project = nn.Linear(4 * w, embed_dim)
        self.decoder = nn.Linear(embed_dim, teacher_dim)  # D: L's output to R's dimension
        for name, size in (("target", teacher_dim), ("z", embed_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_std", torch.ones(size))

    def forward(self, patches):
        h = self.features((patches - 0.5) / 0.25)
        return self.project(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def embed(self, patches):
        return (self(patches) - self.z_mean) / self.z_std


class GlobalNet(nn.Module):
    """Global-Net G(I, M0) (Eq. 6): partial convolutions on the masked context window.

    Five 3x3 partial convolutions (the first with stride 2; 2x2 max pooling
    after the 2nd-4th, the mask max-pooled alike, i.e. binarised), then an
    average pool to ``grid x grid`` cells, which keeps where the context lies
    relative to the hole, and two fully connected layers to Z_g.
    """

    def __init__(self, embed_dim=128, width=32, grid=4):
        super().__init__()
        w = width
        chans = [3, w, w, 2 * w, 4 * w, 4 * w]
        self.convs = nn.ModuleList(
            PartialConv2d(cin, cout, 3, stride=2 if i == 0 else 1, padding=1)
            for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])))
        self.pool_after = (False, True, True, True, False)
        self.grid = grid
        self.head = nn.Sequential(nn.Linear(4 * w * grid * grid, 4 * w * 2), nn.LeakyReLU(0.1),
                                  nn.Linear(4 * w * 2, embed_dim))

    def forward(self, windows, mask):
        return self.trunk(*self.stem(windows, mask))

    @property
    def stem_depth(self):
        """Layers up to the first pooling: what :func:`window_stems` shares between windows."""
        return self.pool_after.index(True) + 1

    def layer(self, i, x, mask, padding=True):
        """Partial convolution ``i``, its activation and pooling; each output is 0 where its
        mask is. ``padding=False``: ``x`` and ``mask`` come padded (see :func:`window_stems`)."""
        conv = self.convs[i]
        x, mask = partial_conv2d(x, mask, conv.weight, conv.bias, conv.stride,
                                 conv.padding if padding else 0, x_masked=i > 0)
        x = F.leaky_relu(x, 0.1, inplace=True)
        if self.pool_after[i]:
            x, mask = max_pool2x2(x), max_pool2x2(mask)
        return x, mask

    def stem(self, windows, mask):
        """The first ``stem_depth`` layers on windows in [0, 1] and their masks M0."""
        x = (windows - 0.5) / 0.25  # masked pixels are zeroed inside the first partial conv
        for i in range(self.stem_depth):
            x, mask = self.layer(i, x, mask)
        return x, mask

    def trunk(self, x, mask):
        """The other layers and the head: the stem's output -> Z_g ``(N, embed_dim)``."""
        for i in range(self.stem_depth, len(self.convs)):
            x, mask = self.layer(i, x, mask)
        # channels-last: PyTorch's CPU kernel took ~15x as long (ad hoc) on NCHW, which
        # NNPACK gives
        x = F.adaptive_avg_pool2d(x.contiguous(memory_format=torch.channels_last), self.grid)
        return self.head(x.flatten(1))


class DADHead(nn.Module):
    """DAD classifier C(Z*, Z_g) (Eq. 8): fully connected layers on the joined features.

    Returns the logit of "Z* is distorted"; ``sigmoid(logit) = 1 - C`` is s_DAD (Eq. 12).
    ``inputs="joint"`` feeds ``[Z*, Z_g]`` (the paper); ``"difference"`` feeds
    ``[Z* - Z_g, |Z* - Z_g|]`` (ours), which leaves the head nothing to judge but
    how far the patch is from what its surroundings predict (see
    :class:`GlobalLocal`, ``dad_input``).
    """

    inputs = "joint"  # heads pickled before the option existed are joint

    def __init__(self, embed_dim=128, hidden=128, inputs="joint"):
        super().__init__()
        self.inputs = inputs
        self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, 1))

    def forward(self, z, z_global):
        if self.inputs == "difference":
            d = z - z_global
            return self.mlp(torch.cat([d, d.abs()], dim=1))[:, 0]
        return self.mlp(torch.cat([z, z_global], dim=1))[:, 0]


# ------------------------------------------------------------------ windows sharing the stem
# The context windows of the scoring raster overlap (at stride 24 each pixel lies in 16
# windows of 96 px). Away from its hole and its edges, a window's stem computes what the
# stem computes on the whole padded image there: window_stems takes those outputs from one
# pass over the image and recomputes per window only the regions that read the hole or the
# window's own zero padding. Those along the window's edges read no hole and are the same in
# every window of a raster row (top and bottom) or column (left and right): they are computed
# once per row and column (edge_strips), only the corners per window. The result is the same
# as the stem run on each window.
_MAX_RECOMPUTED = 0.5  # share only where regions under half of a window's stem are recomputed


def stem_step(net):
    """Pixels per cell of the Global-Net's stem output (4: a stride-2 convolution and a pooling)."""
    step = 1
    for i in range(net.stem_depth):
        step *= net.convs[i].stride[0] * (2 if net.pool_after[i] else 1)
    return step


# The regions are worked out in plain Python, not with tensors: torch.export's trace of the
# scoring (skad._onnx) would take a tensor's values for unknowns.
def _stem_reads(net, flags, outside):
    """Along one side of a window (``flags``: a list of bools, one per pixel): which stem
    outputs read a flagged pixel or, if ``outside``, the window's zero padding at any layer."""
    for i in range(net.stem_depth):
        k, s, p = net.convs[i].kernel_size[0], net.convs[i].stride[0], net.convs[i].padding[0]
        flags = [outside] * p + list(flags) + [outside] * p
        flags = [any(flags[o * s:o * s + k]) for o in range((len(flags) - k) // s + 1)]
        if net.pool_after[i]:
            flags = [any(flags[o:o + 2]) for o in range(0, len(flags), 2)]  # ceil_mode
    return flags


def _interval(flags):
    """``(first, last + 1)`` of the true entries of a list of bools; ``(0, 0)`` if none."""
    where = [i for i, f in enumerate(flags) if f]
    return (where[0], where[-1] + 1) if where else (0, 0)


class StemRegions(NamedTuple):
    """Where a window's stem differs from the stem on the whole image (:func:`stem_regions`).

    ``recomputed``: rectangles ``((r0, r1), (c0, c1))`` of the stem's grid that
    each window recomputes; ``zeros``: the one it sets to 0; ``bands``:
    ``(((0, lo), (hi, g)), (lo, hi))``, the rows of its top and bottom edge bands
    and their columns (also the rows of the left and right bands, whose columns
    are the first pair), which :func:`edge_strips` computes once per raster row
    and column, or None where each window recomputes its bands.
    """

    recomputed: list
    zeros: tuple
    bands: tuple = None


def stem_regions(net, window_size, margin, patch_size):
    """Where a window's stem differs from the stem on the whole image: a :class:`StemRegions`,
    or None where sharing would save little.

    Along each side, the outputs that read the window's padding form a band at
    either end, those that read the hole (pixels ``margin`` to ``margin +
    patch_size``) an interval, and those that read nothing but the hole and the
    padding an interval within it. A cell is recomputed if its row or its
    column reads the padding, or both read the hole, and is 0 (no valid pixel:
    :func:`skad._layers.partial_conv2d`) if both read nothing else: four edge
    bands and a ring of four rectangles around a square of zeros. Where the
    bands read no hole, they are the same in every window of a raster row
    (top, bottom) or column (left, right) but for the four corners, which read
    two edges: the windows recompute the corners and take the rest from
    :func:`edge_strips`. None where the rectangles recomputed per window and by
    row and column cover more than half of the grid.
    """
    hole = [margin <= i < margin + patch_size for i in range(window_size)]
    edge = _stem_reads(net, [False] * window_size, outside=True)
    lo, hi = _interval([not f for f in edge])
    if lo == hi:
        return None
    g = len(edge)  # the edge bands: [0, lo) and [hi, g)
    h0, h1 = _interval(_stem_reads(net, hole, outside=False))
    bands_read_hole = h0 < lo or h1 > hi
    h0, h1 = max(h0, lo), min(h1, hi)
    z0, z1 = _interval([not f for f in _stem_reads(net, [not f for f in hole], outside=False)])
    z0, z1 = max(z0, h0), min(z1, h1)
    if z0 >= z1:  # no zeros: the ring's lower side (z1, h1) is the whole box
        z0 = z1 = h0
    ring = [((h0, z0), (h0, h1)), ((z1, h1), (h0, h1)), ((z0, z1), (h0, z0)),
            ((z0, z1), (z1, h1))]
    if bands_read_hole:
        bands = None
        edges = [((0, lo), (0, g)), ((hi, g), (0, g)), ((lo, hi), (0, lo)), ((lo, hi), (hi, g))]
    else:
        bands = (((0, lo), (hi, g)), (lo, hi))
        edges = [(r, c) for r in ((0, lo), (hi, g)) for c in ((0, lo), (hi, g))]  # corners
    recomputed = [(r, c) for r, c in edges + ring if r[0] < r[1] and c[0] < c[1]]
    area = sum((r[1] - r[0]) * (c[1] - c[0]) for r, c in recomputed)
    if bands is not None:
        area += 2 * (lo + g - hi) * (hi - lo)  # the bands, computed by row and column
    if area > _MAX_RECOMPUTED * g * g:
        return None
    return StemRegions(recomputed, ((z0, z1), (z0, z1)), bands)


def _stem_sizes(net, size):
    """Along one side of a window of ``size`` pixels: each stem layer's input and convolution
    output sizes, and the stem's output size."""
    sizes = []
    for i in range(net.stem_depth):
        conv = net.convs[i]
        n_conv = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        sizes.append((size, n_conv))
        size = -(-n_conv // 2) if net.pool_after[i] else n_conv  # ceil_mode pooling
    return sizes, size


def _stem_spans(net, size, start, stop):
    """Back through the stem along one side of a window of ``size`` pixels: for each layer
    (the first first), the interval ``(a, b)`` of its input grid that the stem outputs
    ``[start, stop)`` read, reaching past ``[0, n)`` into the padding, and that grid's size n."""
    sizes, _ = _stem_sizes(net, size)
    spans = []
    for i in reversed(range(net.stem_depth)):
        conv, (n_in, n_conv) = net.convs[i], sizes[i]
        if net.pool_after[i]:
            start, stop = 2 * start, min(2 * stop, n_conv)
        start = start * conv.stride[0] - conv.padding[0]
        stop = (stop - 1) * conv.stride[0] - conv.padding[0] + conv.kernel_size[0]
        spans.append((start, stop, n_in))
        start, stop = max(start, 0), min(stop, n_in)
    return spans[::-1]


def _stem_region(net, padded, valid, owner, top, left, rows, cols, size, hole=None):
    """The stem's outputs ``rows x cols`` on each window, from the pixels they read alone.

    The windows are ``size`` pixels (a side or ``(height, width)``) at
    ``padded[owner, :, top:, left:]``, ``hole`` the first and last + 1 pixel
    of their hole along either side (None: none). Each layer runs unpadded on
    its input, zero-padded (values and mask) only where the region reaches the
    window's edge: there the window's own padding is.
    """
    height, width = (size, size) if isinstance(size, int) else size
    rows, cols = _stem_spans(net, height, *rows), _stem_spans(net, width, *cols)
    (r0, r1, n_rows), (c0, c1, n_cols) = rows[0], cols[0]
    r0, r1, c0, c1 = max(r0, 0), min(r1, n_rows), max(c0, 0), min(c1, n_cols)
    size = (r1 - r0, c1 - c0)
    x = (crop_windows(padded, owner, top + r0, left + c0, size, channels_last=True) - 0.5) / 0.25
    mask = crop_windows(valid, owner, top + r0, left + c0, size, channels_last=True)
    if hole is not None:
        mask[:, :, max(hole[0] - r0, 0):max(hole[1] - r0, 0),
             max(hole[0] - c0, 0):max(hole[1] - c0, 0)] = 0.0  # M0: the hole
    for i, ((a, b, n), (c, d, m)) in enumerate(zip(rows, cols)):
        pad = (max(-c, 0), max(d - m, 0), max(-a, 0), max(b - n, 0))
        if any(pad):
            x, mask = F.pad(x, pad), F.pad(mask, pad)
        x, mask = net.layer(i, x, mask, padding=False)
    return x, mask


def edge_strips(net, padded, valid, ys, xs, window_size, regions):
    """The edge bands of the stems of the raster's windows, once per raster row and column.

    The windows of a raster row (``top`` in ``ys``, a list of ints) share
    their top and bottom bands but for the corners: the stem on a strip as
    wide as ``padded`` (B, 3, H', W'), with the window's zero padding above and
    below. Likewise the left and right bands per column (``left`` in ``xs``).
    Returns ``(rows, cols)``: for the top and the bottom band, the stem's
    output and mask ``(B * len(ys), C, band, W_g - g + hi - lo)`` by image
    then raster row, column 0 the stem's column ``lo``; and for the left and
    right bands ``(B * len(xs), C, H_g - g + hi - lo, band)`` by image then
    column, row 0 the stem's row ``lo`` (``regions.bands``; g: a window's stem
    grid, H_g x W_g: the image's).
    """
    (top_band, bottom_band), (lo, hi) = regions.bands
    b, _, height, width = padded.shape
    g = _stem_sizes(net, window_size)[1]
    span_w, span_h = _stem_sizes(net, width)[1] - g + hi, _stem_sizes(net, height)[1] - g + hi
    dev = padded.device
    owner = torch.arange(b, device=dev)
    zero = torch.zeros(b * len(ys), dtype=torch.long, device=dev)
    tops = torch.tensor(ys, device=dev).repeat(b)
    rows = [_stem_region(net, padded, valid, owner.repeat_interleave(len(ys)), tops, zero,
                         band, (lo, span_w), (window_size, width)) for band in (top_band,
                                                                                bottom_band)]
    zero = torch.zeros(b * len(xs), dtype=torch.long, device=dev)
    lefts = torch.tensor(xs, device=dev).repeat(b)
    cols = [_stem_region(net, padded, valid, owner.repeat_interleave(len(xs)), zero, lefts,
                         (lo, span_h), band, (height, window_size)) for band in (top_band,
                                                                                 bottom_band)]
    return rows, cols


def window_stems(net, stem_map, stem_mask, padded, valid, owner, top, left, window_size, hole,
                 regions, strips=None, row=None, col=None):
    """The Global-Net's stem on context windows, as :meth:`GlobalNet.stem` gives it, shared.

    ``stem_map``, ``stem_mask``: the stem on the whole padded images ``padded``
    (B, 3, H', W') and their validity maps ``valid`` (1 in the image, 0 in the
    padding). Window k is the square of side ``window_size`` at ``padded[owner[k],
    :, top[k]:, left[k]:]``, ``top`` and ``left`` multiples of :func:`stem_step`;
    ``hole``: its patch's first and last + 1 pixel along either side;
    ``regions``: :func:`stem_regions`. ``strips``: :func:`edge_strips`, where
    ``regions.bands`` is set, with ``row[k]`` and ``col[k]`` the index of
    window k's raster row and column in them (``owner[k] * len(ys) + i``);
    without them each window recomputes its bands. Returns the stem's output
    ``(K, C, g, g)`` and its mask ``(K, 1, g, g)``.
    """
    step, (_, g) = stem_step(net), _stem_sizes(net, window_size)
    x = crop_windows(stem_map, owner, top // step, left // step, g, channels_last=True)
    mask = crop_windows(stem_mask, owner, top // step, left // step, g, channels_last=True)
    (rows, cols), recomputed = regions.zeros, list(regions.recomputed)
    x[:, :, slice(*rows), slice(*cols)] = 0.0  # nothing but the hole: no valid pixel
    mask[:, :, slice(*rows), slice(*cols)] = 0.0
    if regions.bands is not None and strips is None:  # each window its own bands
        (top_band, bottom_band), (lo, hi) = regions.bands
        recomputed += [(band, (lo, hi)) for band in (top_band, bottom_band)]
        recomputed += [((lo, hi), band) for band in (top_band, bottom_band)]
    elif regions.bands is not None:
        _take_bands(x, mask, strips, regions.bands, row, col, top // step, left // step)
    for rows, cols in recomputed:
        part = (slice(None), slice(None), slice(*rows), slice(*cols))
        x[part], mask[part] = _stem_region(net, padded, valid, owner, top, left, rows, cols,
                                           window_size, hole)
    return x, mask


def _take_bands(x, mask, strips, bands, row, col, top, left):
    """Write the windows' edge bands (but the corners) from :func:`edge_strips`'s strips;
    ``top``, ``left``: the windows' corners on the stem's grid."""
    (top_band, bottom_band), (lo, hi) = bands
    for band, (strip, strip_mask) in zip((top_band, bottom_band), strips[0]):
        part = (slice(None), slice(None), slice(*band), slice(lo, hi))
        size = (band[1] - band[0], hi - lo)
        x[part] = crop_windows(strip, row, torch.zeros_like(row), left, size, True)
        mask[part] = crop_windows(strip_mask, row, torch.zeros_like(row), left, size, True)
    for band, (strip, strip_mask) in zip((top_band, bottom_band), strips[1]):
        part = (slice(None), slice(None), slice(lo, hi), slice(*band))
        size = (hi - lo, band[1] - band[0])
        x[part] = crop_windows(strip, col, top, torch.zeros_like(col), size, True)
        mask[part] = crop_windows(strip_mask, col, top, torch.zeros_like(col), size, True)


# ------------------------------------------------------------------ losses and stains
def distillation_loss(decoded, target):
    """Eq. 1: ``||D(L(p)) - R(p)||_2^2``, averaged over the batch."""
    return (decoded.float() - target.float()).pow(2).sum(dim=1).mean()


def compactness_loss(z):
    """Eq. 2: sum of the off-diagonal entries of the correlation matrix of ``z`` over the batch."""
    z = z.float()
    z = (z - z.mean(dim=0)) / (z.std(dim=0, unbiased=False) + 1e-6)
    corr = z.T @ z / len(z)
    return corr.sum() - corr.diagonal().sum()


def dad_loss(dad_head, z_clean, z_stained, z_global):
    """Eq. 9: every patch goes to the DAD head both clean (target 0) and stained (1)."""
    logits = dad_head(torch.cat([z_clean, z_stained]), torch.cat([z_global, z_global])).float()
    target = torch.cat([torch.zeros(len(z_clean)), torch.ones(len(z_clean))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def iad_score(z_local, z_global):
    """Eq. 7 / 11: ``(1/n) ||Z_l - Z_g||_2^2`` per row."""
    return (z_local.float() - z_global.float()).pow(2).mean(dim=1)


def add_stains(patches, generator, radius=(0.08, 0.3), alpha=(0.3, 1.0)):
    """Negative patches p- (Sec. 3.2): one random small stain on each patch.

    A stain is a blob of opacity ``alpha``, centred in the middle 60% of the
    patch, with a radius of ``radius`` x the patch size, a random aspect ratio
    (1:2 to 2:1) and orientation, and a boundary wobbled by three random
    harmonics; its edge is soft (about 1 pixel). Its colour is the patch's own
    mean colour moved 30-80% of the way towards black or white: on grayscale
    images a stain of another hue would be told from the patch by its colour
    alone, and the DAD head would learn nothing about real (grey) defects.
    """
    n, _, ph, pw = patches.shape
    u = torch.rand(n, 14, generator=generator).to(patches.device)
    size = min(ph, pw)
    cy, cx = (0.2 + 0.6 * u[:, 0]) * ph, (0.2 + 0.6 * u[:, 1]) * pw
    r0 = (radius[0] + (radius[1] - radius[0]) * u[:, 2]) * size
    aspect = 2.0 ** (2 * u[:, 3] - 1)
    theta = math.pi * u[:, 4]
    yy = torch.arange(ph, device=patches.device).view(1, ph, 1) + 0.5 - cy.view(n, 1, 1)
    xx = torch.arange(pw, device=patches.device).view(1, 1, pw) + 0.5 - cx.view(n, 1, 1)
    cos, sin = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    a, b = xx * cos + yy * sin, -xx * sin + yy * cos
    rho = torch.sqrt((a / aspect.sqrt().view(n, 1, 1)) ** 2 + (b * aspect.sqrt().view(n, 1, 1))
                     ** 2)
    phi = torch.atan2(b, a)
    wobble = 1.0 + sum(0.25 * u[:, 5 + j].view(n, 1, 1) * torch.cos((j + 1) * phi + 2 * math.pi
                                                                      * u[:, 8 + j].view(n, 1, 1))
                       for j in range(3))
    shape = torch.sigmoid((wobble * r0.view(n, 1, 1) - rho) * 2.0)  # soft edge, ~1 px
    opacity = (alpha[0] + (alpha[1] - alpha[0]) * u[:, 11]).view(n, 1, 1, 1)
    tone = patches.mean(dim=(2, 3), keepdim=True)
    target = (u[:, 12] < 0.5).to(patches).view(n, 1, 1, 1)  # black or white
    colour = tone + (0.3 + 0.5 * u[:, 13]).view(n, 1, 1, 1) * (target - tone)
    blend = opacity * shape[:, None]
    return patches * (1 - blend) + colour * blend


# ------------------------------------------------------------------ the detector
def _one_level(layer):
    """``teacher_layer=k`` is ``teacher_layers=(k,)``."""
    return (layer,)


@fill_doc(not_in="the paper", equation="Eq. 13",
          border_cells="the Global-Net's context window reaches past the image and is masked")
class GlobalLocal(BaseDetector):
    """Global-local feature comparison: a patch's feature predicted from its surroundings.

    Parameters
    ----------
    teacher : str, default="resnet18.tv_in1k"
        Frozen timm CNN the Local-Net is distilled from, optionally with its
        pretrained tag: the paper's ImageNet ResNet-18, with torchvision's weights
        (the paper does not say which; timm's default tag for ``resnet18`` is another
        training recipe); ``"tf_efficientnet_lite0"`` has offline weights. Used in
        ``fit`` only; it is not kept.
    teacher_weights : "pretrained", str, path-like or None, default="pretrained"
        The teacher's weights (see :func:`skad._backbone.resolve_weights`).
    teacher_layers : tuple of int, default=(-1,)
        Teacher levels (``features_only`` indices; -1 = the deepest) whose
        globally average-pooled maps, joined along the channels, are R(p). The
        paper: the deepest level alone.
    teacher_size : int, default=128
        Patches are resized to this size for the teacher.
    patch_size : int, default=32
        Side p of the patches, in pixels at ``image_size``.
    stride : int, default=24
        Step of the raster scan at scoring time; training draws its patch
        positions around that raster (:func:`jittered_starts`), and the stride
        may still be changed after ``fit`` (then call ``set_reference``). Patch
        32 at 256 px: 11 x 11 patches (the last flush with the border). Scoring
        time grows with the patches: stride 24 scores 1.8 times faster than 16
        (15 x 15); the same fits rescored at 24 ranked images better on each of
        five fabrics, fits trained at 24 on two of them by 0.018 on the mean; thin
        defects (aitex_04) got 0.06 lower PRO with two seeds: ``stride=16`` where
        their outline matters more than speed. Stride 32 (8 x 8) is 1.7 times
        faster again, within 4 times lite0's forward pass, with a lower mean PRO
        (docs/benchmarks.md, "Scoring stride"). A multiple of 4 (with the image
        size minus ``patch_size``) lets the windows share the Global-Net's first
        layers (:func:`window_stems`), 1.55 to 1.7 times as fast.
    context : float or "image", default=3
        Side of the Global-Net's window in patch sizes, centred on the patch
        (3: one patch of context on every side). ``"image"``: a window of
        ``2 * image_size - p``, which covers the whole image from any patch
        (about 25 times the compute of 3 at 256 px). Pixels outside the image
        are masked like the patch.
    embed_dim : int, default=128
        Dimension n of Z_l and Z_g.
    width : int, default=32
        Base channel width of the Local-Net and the Global-Net. The scoring time
        grows about with its square: 24 took 0.65 times as long and localised far
        worse on two fabrics (docs/benchmarks.md, "Network width").
    n_distill_patches : int, default=32
        Random patches per image for distilling and fine-tuning the Local-Net
        (drawn once per fit; their teacher features are computed once).
    n_distill_epochs : int, default=40
        Epochs of distillation (Eq. 3) on the patches of ``distill_images``,
        or of the training images when it is None. Skipped with ``local_net``.
    n_finetune_epochs : int, default=10
        Epochs of fine-tuning (Eq. 3 again) on the training images' patches.
    distill_images : array, list of arrays or list of paths, optional
        Images to distil the Local-Net on first (the paper uses ImageNet).
    local_net : LocalNet, optional
        A pre-distilled Local-Net (e.g. another fit's ``local_net_``); a copy
        is fine-tuned and the distillation is skipped.
    n_patches : int, default=16
        Random patches per image per epoch in training the Global-Net and DAD head.
    n_epochs : int, default=100
        Epochs of training the Global-Net and the DAD head (Eq. 10).
    distillation_weight, compactness_weight : float, default=1.0
        Weights of the distillation loss (Eq. 1) and the compactness loss (Eq. 2)
        in the Local-Net loss (Eq. 3): the paper's lambda_k and lambda_c.
    dad_weight : float, default=1.0
        Weight of the DAD loss in Eq. 10: the paper's lambda_t.
    dad_input : {"joint", "difference"}, default="joint"
        What the DAD head sees. ``"joint"``: ``[Z*, Z_g]``, the paper's
        C(Z*, Z_g). ``"difference"`` (beyond the paper): ``[Z* - Z_g,
        |Z* - Z_g|]``. With the joint input the head can tell a stained patch
        from a clean one by the patch alone; the difference leaves it only the
        disagreement with the context. The default stays the paper's
        (docs/benchmarks.md, "GlobalLocal", compares the two).
    iad_score_weight : float, default=0.8
        Weight of s_IAD against s_DAD (which gets ``1 - iad_score_weight``) in the
        patch score (Eq. 13): the paper's lambda_s. Read at scoring time, so
        ``set_params(iad_score_weight=...)`` rescores without refitting; call
        ``set_reference`` again to recalibrate the thresholds and the position
        statistics (scoring raises ``ValueError`` until then with
        ``standardize_positions=True``, as for ``stride``, ``n_idw_neighbors`` and
        ``idw_power``).
    learning_rate : float, default=1e-3
        AdamW learning rate of every stage (cosine decay to 5%).
    n_idw_neighbors : int, default=4
        Patch centres (the nearest) each pixel interpolates from.
    idw_power : float, default=2.0
        Inverse-distance weights ``d ** -idw_power``.
    image_size : int or (int, int), default=256
        Working size images are resized to.
        %(image_size_pair)s
    %(standardize_positions)s
    %(false_reject_rate)s
    batch_size : int, default=16
        Images per training step (each gives ``n_patches`` windows) and per
        scoring batch.
    %(device)s
    %(verbose)s
    random_state : int, Generator or None, default=None
        Seeds the networks' initialisation, the patch positions, the stains
        and the minibatch order.
    %(deprecated)s

    Attributes
    ----------
    %(n_samples_fit)s
    local_net_ : LocalNet
        The frozen Local-Net (with its decoder and standardisation).
    global_net_ : GlobalNet
    dad_head_ : DADHead
    window_size_ : int
        Side of the Global-Net's window in pixels.
    geometry_ : tuple
        ``(patch_size, context)`` the networks were trained for; scoring with
        other values raises.
    loss_history_ : dict of list of float
        Mean loss per epoch of the stages ``"distill"``, ``"finetune"``, ``"global"``.
    %(position_statistics)s
    %(thresholds)s

    Notes
    -----
    The paper fixes: the Local-Net distilled from ResNet-18 with Eq. 1-3 then
    frozen, a partial-convolution Global-Net that never sees the patch, the
    IAD and DAD heads (Eq. 7-12), Eq. 10, raster scan with overlap, Eq. 13
    with lambda_s = 0.8 (``iad_score_weight``), IDW interpolation of the patch
    scores. No public code exists; our choices: the network layouts, p = 32,
    stride 24, a context window of 3p (Eq. 6 runs the Global-Net on the whole
    image I with the patch masked, ``context="image"``; 3p does about 25 times
    less Global-Net work at 256 px, which is why it is the default; at half
    size with shortened training and one seed, on aitex_04 and aitex_00, the
    whole image took 27-34 times the Global-Net training time and was not more
    accurate: mean image AUROC 0.562 against 0.544, pixel AUROC 0.535 against
    0.574, PRO 0.175 against 0.183; docs/benchmarks.md, "GlobalLocal"), R(p) = the
    pooled deepest teacher map
    of the patch resized to ``teacher_size``, standardised teacher targets and Z_l, the stain
    generator (:func:`add_stains`), feeding each patch both clean and stained
    to the DAD head, all loss weights, the optimiser and epochs, and IDW over
    the 4 nearest centres with power 2; the image score is the map's maximum. Not in
    the paper: ``standardize_positions=True`` scores each position against the
    references' maps there; on aitex_01 (shortened training) image AUROC 0.872
    against 0.871, PRO 0.515 against 0.501, normal maxima on the border ring 17 %
    against 40 % (docs/benchmarks.md, "Position standardisation").
    The paper distils on ImageNet first, which cannot be done offline here: by
    default the Local-Net is distilled on the training images' patches
    (``distill_images`` and ``local_net`` restore the two-stage scheme).
    ``set_reference`` does not retrain; it sets the position statistics and
    ``threshold_``. After ``fit`` the reference is the training set, whose maps
    run lower than unseen normals': set a held-out reference for a calibrated
    threshold.

    References
    ----------
    S. Wang, L. Wu, L. Cui, Y. Shen. "Glancing at the Patch: Anomaly
    Localization with Global and Local Feature Comparison". CVPR 2021.

    Examples
    --------
    >>> from skad import GlobalLocal, datasets
    >>> data = datasets.make_textures(n_domains=1, n_normal=12, n_anomalous=2,
    ...                               image_size=32, random_state=0)
    >>> normal = data.images[data.y == 0]
    >>> det = GlobalLocal(teacher="test_efficientnet", teacher_weights=None, teacher_size=32,
    ...                   patch_size=8, stride=4, embed_dim=16, width=8, n_distill_epochs=1,
    ...                   n_finetune_epochs=1, n_epochs=1, image_size=32,
    ...                   false_reject_rate=0.2, random_state=0).fit(normal[:8])
    >>> # held-out good images calibrate the threshold (its training images promise no rate)
    >>> det.set_reference(normal[8:]).false_reject_rate_
    0.2
    >>> det.decision_function(data.images).shape
    (14,)
    >>> len(det.predict_regions(data.images[:2]))  # each image's connected anomalous regions
    2
    """

    #: read by scoring: changed after set_reference, the calibration no longer holds
    _scoring_parameters: ClassVar[tuple] = (*BaseDetector._scoring_parameters, "stride",
                                            "iad_score_weight", "n_idw_neighbors", "idw_power")

    _parameter_constraints: ClassVar[dict] = {
        **BaseDetector._parameter_constraints,
        **backbone_constraints("teacher", "teacher_weights", "teacher_layers"),
        "teacher_size": [Ints(1)],
        # at most the image's side: _check_param_relations
        "patch_size": [Ints(2)],
        "stride": [Ints(1)],
        "context": [Reals(1), StrOptions({"image"})],
        "embed_dim": [Ints(1)],
        "width": [Ints(1)],
        "n_distill_patches": [Ints(1)],
        "n_distill_epochs": [Ints(0)],
        "n_finetune_epochs": [Ints(0)],
        "distill_images": ["array-like", None],
        "local_net": [LocalNet, None],
        "n_patches": [Ints(1)],
        "n_epochs": [Ints(1)],
        "distillation_weight": [Reals(0)],
        "compactness_weight": [Reals(0)],
        "dad_weight": [Reals(0)],
        "dad_input": [StrOptions({"joint", "difference"})],
        "iad_score_weight": [Reals(0, 1)],
        "learning_rate": [Reals(0, None, closed="neither")],
        "n_idw_neighbors": [Ints(1)],
        "idw_power": [Reals(0, None, closed="neither")],
        "standardize_positions": ["boolean"],
        "teacher_layer": deprecated(Ints()),
        "lambda_k": deprecated(Reals(0)),
        "lambda_c": deprecated(Reals(0)),
        "lambda_t": deprecated(Reals(0)),
        "lambda_s": deprecated(Reals(0, 1)),
        "lr": deprecated(Reals(0, None, closed="neither")),
        "idw_neighbors": deprecated(Ints(1)),
    }
    # weights named *_weight after what they weigh, as MetaComparer's; counts n_*;
    # teacher levels a tuple, as MMR's; scikit-learn's learning_rate
    _deprecated_parameters: ClassVar[dict] = {
        "teacher_layer": ("teacher_layers", _one_level), "lambda_k": "distillation_weight",
        "lambda_c": "compactness_weight", "lambda_t": "dad_weight",
        "lambda_s": "iad_score_weight", "lr": "learning_rate",
        "idw_neighbors": "n_idw_neighbors"}

    def __init__(self, *, teacher="resnet18.tv_in1k", teacher_weights="pretrained",
                 teacher_layers=(-1,), teacher_size=128, patch_size=32, stride=24, context=3.0,
                 embed_dim=128, width=32, n_distill_patches=32, n_distill_epochs=40,
                 n_finetune_epochs=10, distill_images=None, local_net=None, n_patches=16,
                 n_epochs=100, distillation_weight=1.0, compactness_weight=1.0, dad_weight=1.0,
                 dad_input="joint", iad_score_weight=0.8, learning_rate=1e-3,
                 n_idw_neighbors=4, idw_power=2.0, image_size=256,
                 standardize_positions=True, false_reject_rate=0.05,
                 max_calibration_references=200, threshold_quantile=DEPRECATED, batch_size=16,
                 device="auto", verbose=0, random_state=None,
                 teacher_layer=DEPRECATED, lambda_k=DEPRECATED, lambda_c=DEPRECATED,
                 lambda_t=DEPRECATED, lambda_s=DEPRECATED, lr=DEPRECATED,
                 idw_neighbors=DEPRECATED):
        # scikit-learn's constructor: the parameters stored as given, nothing else
        self._store_parameters(locals())

    # ----------------------------------------------------------- parameters
    def _check_param_relations(self):
        """What ``_parameter_constraints`` cannot say: the patch fits in the image."""
        h, w = image_hw(self.image_size)
        if self.patch_size > min(h, w):
            raise ValueError(f"patch_size must be in [2, {min(h, w)}] (the image_size); "
                             f"got {self.patch_size}")

    def _check_geometry(self):
        """The window scored must be the one the Global-Net was trained on."""
        current = (self.patch_size, self.context)
        if self.geometry_ != current:
            raise ValueError(
                f"patch_size and context were {self.geometry_} at fit and are now {current}: "
                "the Global-Net only knows the window it was trained on; set them back or "
                "fit again")

    def _margin(self):
        """Context on each side of the patch, in pixels."""
        if self.context == "image":
            return max(image_hw(self.image_size)) - self.patch_size
        return int(round((self.context - 1) * self.patch_size / 2))

    def _empty_networks(self, shapes):
        """Local-, Global-Net and DAD head architectures, for :func:`skad.load` to fill.

        The Local-Net's sizes are read from its saved weights (``shapes``): a
        ``local_net`` passed in may have been built with other sizes than
        ``embed_dim`` and ``width``; so is the ``local_net`` parameter's, when
        the detector was fitted with one.
        """
        nets = {}
        for name in ("local_net", "local_net_"):
            if f"{name}.decoder.weight" in shapes:
                teacher_dim, embed_dim = shapes[f"{name}.decoder.weight"]
                nets[name] = LocalNet(embed_dim, teacher_dim, shapes[f"{name}.features.0.weight"][0])
        nets["global_net_"], nets["dad_head_"] = self._create_heads(nets["local_net_"])
        return nets

    def _create_heads(self, local):
        """The Global-Net and the DAD head for the Local-Net ``local``'s embedding."""
        embed_dim = local.project.out_features
        return GlobalNet(embed_dim, self.width), DADHead(embed_dim, inputs=self.dad_input)

    # ----------------------------------------------------------- fitting
    def _fit(self, images, y, groups):
        seed = seed_from(self.random_state)
        needs_teacher = self.local_net is None or self.n_finetune_epochs > 0
        teacher = None
        if needs_teacher:
            teacher = create_backbone(self.teacher, self.teacher_weights,
                                      tuple(self._param("teacher_layers")), random_state=seed)
            if teacher.is_vit:
                raise ValueError(f"teacher must be a CNN; {self.teacher!r} is a ViT")
        with torch_seed(seed):
            if self.local_net is None:
                local = LocalNet(self.embed_dim, sum(teacher.channels), self.width)
            else:
                local = copy.deepcopy(self.local_net).cpu().requires_grad_(True)
                if teacher is not None and local.decoder.out_features != sum(teacher.channels):
                    raise ValueError(
                        f"local_net decodes to {local.decoder.out_features} dimensions but "
                        f"the teacher {self.teacher!r} gives {sum(teacher.channels)}")
            global_net, dad_head = self._create_heads(local)
        gen = torch.Generator().manual_seed(seed + 1)
        train_u8, patches, targets = self._cache(images, teacher, gen, keep_images=True)
        history = {"distill": [], "finetune": []}
        if self.local_net is None:
            if self.distill_images is None:
                d_patches, d_targets = patches, targets
            else:
                extra = check_images(self.distill_images, name="distill_images")
                _, d_patches, d_targets = self._cache(extra, teacher, gen, keep_images=False)
            local.target_mean.copy_(d_targets.mean(dim=0))
            local.target_std.fill_(float(d_targets.var(dim=0).mean().sqrt()) + 1e-6)
            history["distill"] = self._train_local(local, d_patches, d_targets,
                                                   self.n_distill_epochs, gen, "distillation")
        history["finetune"] = self._train_local(local, patches, targets, self.n_finetune_epochs,
                                                gen, "fine-tuning")
        self._standardise(local, patches)
        local.requires_grad_(False).eval()
        history["global"] = self._train_global(local, global_net, dad_head, train_u8, gen)
        self.local_net_, self.global_net_, self.dad_head_ = local, global_net, dad_head
        self.window_size_ = self.patch_size + 2 * self._margin()
        self.geometry_ = (self.patch_size, self.context)
        self.loss_history_ = history

    def _cache(self, images, teacher, gen, keep_images):
        """One pass over the images: uint8 copies, random patches and their teacher features."""
        p, n = self.patch_size, self.n_distill_patches
        device = self._device()
        if teacher is not None:
            teacher.to(device)

        def fn(batch):
            b, _, h, w = batch.shape
            u8 = (batch * 255).round_().to(torch.uint8)
            top = torch.randint(0, h - p + 1, (b * n,), generator=gen)
            left = torch.randint(0, w - p + 1, (b * n,), generator=gen)
            patch = crop_windows(u8, torch.arange(b).repeat_interleave(n), top, left, p)
            out = [u8, patch] if keep_images else [patch]
            if teacher is not None:
                x = F.interpolate(patch.float() / 255, size=self.teacher_size, mode="bilinear",
                                  align_corners=False)
                with self._autocast(device):
                    out.append(torch.cat([F.adaptive_avg_pool2d(f.float(), 1).flatten(1)
                                          for f in teacher(x)], dim=1))
            return out

        out = self._map_images_multi(images, fn, desc="caching patches")
        if not keep_images:
            out = [None, *out]
        return out[0], out[1], (out[2] if teacher is not None else None)

    def _train_local(self, local, patches, targets, n_epochs, gen, desc):
        """Eq. 3: lambda_k * l_k (Eq. 1) + lambda_c * l_c (Eq. 2) on cached patches."""
        lambda_k, lambda_c = self._param("distillation_weight"), self._param("compactness_weight")
        if n_epochs == 0:
            return []
        device = self._device()
        local.to(device)
        opt = make_optimizer(local, self._param("learning_rate"), _WEIGHT_DECAY)
        sched = cosine_schedule(opt, n_epochs, 0.05)

        def step(idx):
            x = patches[idx].to(device).float() / 255
            t = (targets[idx].to(device) - local.target_mean) / local.target_std
            z = local(x)
            return (lambda_k * distillation_loss(local.decoder(z), t)
                    + lambda_c * compactness_loss(z))

        n = len(patches)
        return train_loop(
            local, step, n_epochs=int(n_epochs), optimizer=opt, scheduler=sched, device=device,
            batches=lambda epoch: iter_minibatches(n, min(_PATCH_BATCH, n), gen, drop_last=True),
            verbose=self.verbose, desc=f"GlobalLocal Local-Net {desc}")

    def _standardise(self, local, patches):
        """Z_l statistics over the training patches (see :class:`LocalNet`)."""
        device = self._device()
        local.to(device).eval()
        with torch.no_grad():
            z = torch.cat([local(patches[i:i + _CHUNK].to(device).float() / 255).float()
                           for i in range(0, len(patches), _CHUNK)])
        local.z_mean.copy_(z.mean(dim=0))
        local.z_std.copy_(z.std(dim=0, unbiased=False) + 1e-6)

    def _train_global(self, local, global_net, dad_head, train_u8, gen):
        """Eq. 10: l_IAD (Eq. 7) + lambda_t * l_DAD (Eq. 9) on random patches of each image."""
        lambda_t = self._param("dad_weight")
        device = self._device()
        heads = nn.ModuleList([global_net, dad_head]).to(device)
        local.to(device)
        opt = make_optimizer(heads, self._param("learning_rate"), _WEIGHT_DECAY)
        sched = cosine_schedule(opt, self.n_epochs, 0.05)

        def step(idx):
            windows, mask, patch = self._training_windows(
                train_u8[idx].to(device).float() / 255, gen)
            with torch.no_grad():
                z_l = local.embed(patch)
                z_neg = local.embed(add_stains(patch, gen))
            z_g = global_net(windows, mask)
            l_iad = iad_score(z_l, z_g).mean()
            return l_iad + lambda_t * dad_loss(dad_head, z_l, z_neg, z_g)

        n = len(train_u8)
        return train_loop(heads, step, n_epochs=int(self.n_epochs), optimizer=opt,
                          scheduler=sched, device=device,
                          batches=lambda epoch: iter_minibatches(n, min(self.batch_size, n), gen),
                          verbose=self.verbose, desc="GlobalLocal Global-Net")

    # ----------------------------------------------------------- windows
    def _training_windows(self, images, gen):
        """Windows, masks M0 and patches at ``n_patches`` positions per image (training).

        The positions are drawn around the scoring raster (:func:`jittered_starts`).
        """
        _, _, h, w = images.shape
        p, stride = self.patch_size, int(self.stride)
        padded, valid = self._pad(images)
        owner = torch.arange(len(images)).repeat_interleave(self.n_patches)
        top = jittered_starts(h, p, stride, len(owner), gen)
        left = jittered_starts(w, p, stride, len(owner), gen)
        return self._crop(padded, valid, owner, top, left)

    def _pad(self, images):
        """Images padded by the margin, channels-last (:func:`crop_windows` gathers from them
        twice as fast), and the validity map (0 outside the image)."""
        m = self._margin()
        valid = torch.ones_like(images[:, :1])
        padded = F.pad(images, (m, m, m, m)).contiguous(memory_format=torch.channels_last)
        return padded, F.pad(valid, (m, m, m, m))

    def _crop(self, padded, valid, owner, top, left, channels_last=False):
        """Context windows, their masks M0 (0 in the patch and outside the image) and patches."""
        m, p = self._margin(), self.patch_size
        size = p + 2 * m
        windows = crop_windows(padded, owner, top, left, size, channels_last)
        mask = crop_windows(valid, owner, top, left, size, channels_last)
        mask[:, :, m:m + p, m:m + p] = 0.0  # M0: the Global-Net never sees the patch
        return windows, mask, windows[:, :, m:m + p, m:m + p]

    # ----------------------------------------------------------- scoring
    def _patch_scores(self, batch):
        """s_IAD and s_DAD (Eq. 11-12) of the raster-scanned patches of ``batch``, ``(B, P)`` each.

        ``batch`` is a float tensor ``(B, 3, H, W)`` in [0, 1] at ``image_size``
        on the compute device. All windows run in batches of up to 256; their
        Global-Net stems share one pass over the images (:func:`window_stems`).
        """
        b, _, h, w = batch.shape
        ys, xs = (_starts(size, self.patch_size, self.stride) for size in (h, w))
        top, left = (t.flatten() for t in torch.meshgrid(torch.tensor(ys), torch.tensor(xs),
                                                         indexing="ij"))
        n, dev = len(top), batch.device
        owner = torch.arange(b, device=dev).repeat_interleave(n)
        top, left = top.to(dev).repeat(b), left.to(dev).repeat(b)
        # each window's raster row and column, by image (edge_strips)
        raster = torch.arange(n, device=dev).repeat(b)
        row, col = owner * len(ys) + raster // len(xs), owner * len(xs) + raster % len(xs)
        padded, valid = self._pad(batch)
        m, p = self._margin(), self.patch_size
        s_iad, s_dad = [], []
        with self._autocast(batch.device):
            shared = self._shared_stem(padded, valid, ys, xs)
            for part in row_blocks(owner.shape[0], _CHUNK):
                at = (padded, valid, owner[part], top[part], left[part])
                if shared is None:
                    z_g = self.global_net_(*self._crop(*at, channels_last=True)[:2])
                else:
                    stem_map, stem_mask, regions, strips = shared
                    z_g = self.global_net_.trunk(*window_stems(
                        self.global_net_, stem_map, stem_mask, *at, self.window_size_,
                        (m, m + p), regions, strips, row[part], col[part]))
                z_l = self.local_net_.embed(crop_windows(padded, owner[part], top[part] + m,
                                                         left[part] + m, p, channels_last=True))
                s_iad.append(iad_score(z_l, z_g))
                s_dad.append(torch.sigmoid(self.dad_head_(z_l, z_g).float()))  # 1 - C (Eq. 12)
        return torch.cat(s_iad).view(b, n), torch.cat(s_dad).view(b, n)

    def _shared_stem(self, padded, valid, ys, xs):
        """The Global-Net's stem on the whole padded images, the regions each window
        recomputes and the edge bands by raster row and column (:func:`window_stems`); None
        where the windows would gain little (:func:`stem_regions`) or the raster's starts
        ``ys``, ``xs`` (ints) are off the stem's grid (``stride`` or the image's size minus
        ``patch_size`` not a multiple of :func:`stem_step`: 4)."""
        net = self.global_net_
        regions = stem_regions(net, self.window_size_, self._margin(), self.patch_size)
        if regions is None or any(start % stem_step(net) for start in ys + xs):
            return None
        strips = (None if regions.bands is None else
                  edge_strips(net, padded, valid, ys, xs, self.window_size_, regions))
        return (*net.stem(padded, valid), regions, strips)

    def _score_batch(self, batch, return_maps):
        """Eq. 13 per patch, IDW-interpolated to a map; image score = the map's maximum."""
        self._check_geometry()
        s_iad, s_dad = self._patch_scores(batch)
        lambda_s = self._param("iad_score_weight")
        scores = lambda_s * s_iad + (1.0 - lambda_s) * s_dad
        h, w = batch.shape[-2:]
        index, weight = idw_weights(h, w, self.patch_size, int(self.stride),
                                    int(self._param("n_idw_neighbors")), float(self.idw_power))
        amap = idw_interpolate(scores, index, weight, (h, w))
        return amap.flatten(1).amax(dim=1), (amap if return_maps else None)

    def _to_device(self, device):
        # the fitted networks only: a LocalNet passed as `local_net` is the user's, left alone
        for name in ("local_net_", "global_net_", "dad_head_"):
            if hasattr(self, name):
                getattr(self, name).to(device)
