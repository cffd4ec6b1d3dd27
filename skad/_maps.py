"""Operations on anomaly maps and patch grids, shared by the detectors and the benchmark.

Maps are float tensors ``(B, h, w)``, higher = more anomalous. A detector
scores a grid of patches, turns it into a map at its working size
(:func:`grid_to_map`: bilinear upsampling, then Gaussian smoothing as
``scipy.ndimage.gaussian_filter``), and :class:`skad.base.BaseDetector` resizes
that map to each input's own size (:func:`resize_maps`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from ._images import image_hw

__all__ = ["adjacent", "gaussian_blur", "grid_to_map", "maps_at", "resize_maps", "upsample"]


def _blur_axis(maps, sigma, radius, dim):
    """1-D Gaussian along ``dim``, the map reflected about its edge (scipy's "reflect")."""
    radius = min(radius, maps.shape[dim])  # one reflection at most: tiny maps only
    if radius < 1:
        return maps
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    size = maps.shape[dim]
    padded = torch.cat([maps.narrow(dim, 0, radius).flip(dim), maps,
                        maps.narrow(dim, size - radius, radius).flip(dim)], dim=dim)
    shape = [1, 1, 1, 1]
    shape[dim + 1] = -1  # dim counts in (B, h, w); the conv sees (B, 1, h, w)
    return F.conv2d(padded[:, None], kernel.view(shape))[:, 0]


def gaussian_blur(maps, sigma, radius=None):
    """Gaussian smoothing of maps ``(B, h, w)``, as ``scipy.ndimage.gaussian_filter``.

    The same separable kernel (``radius`` cells each side; ``int(4 sigma + 0.5)`` by
    default, scipy's ``truncate=4``) and borders reflected about the edge (scipy's
    default ``mode="reflect"``), which the reference implementations smooth with.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5) if radius is None else int(radius)
    return _blur_axis(_blur_axis(maps, sigma, radius, 2), sigma, radius, 1)


def upsample(maps, size, align_corners=False, mode="bilinear"):
    """Resize maps ``(B, h, w)`` to ``size`` (int or (H, W)); bilinear, or ``mode``."""
    corners = None if mode == "nearest" else align_corners
    return F.interpolate(maps[:, None].float(), size=image_hw(size), mode=mode,
                         align_corners=corners)[:, 0]


def grid_to_map(grids, size, sigma, radius=None, align_corners=False):
    """Patch grids -> an anomaly map ``(B, H, W)`` at ``size``, smoothed.

    ``grids`` is one grid ``(B, h, w)`` or a list of grids of several scales,
    each upsampled bilinearly to ``size`` and summed; the sum is smoothed with
    :func:`gaussian_blur` (``sigma`` and ``radius`` in pixels at ``size``).
    """
    grids = [grids] if isinstance(grids, torch.Tensor) else grids
    amap = sum(upsample(g, size, align_corners) for g in grids)
    return gaussian_blur(amap, sigma, radius)


def resize_maps(maps, sizes):
    """Resize working-size maps ``(B, h, w)`` to each image's own size (bilinear).

    Returns a list of float32 arrays, one per map.
    """
    out = []
    for m, size in zip(maps, sizes):
        m = m.float()[None, None]
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(m[0, 0].cpu().numpy())
    return out


def maps_at(maps, size):
    """Maps (a list of 2-D arrays of any sizes, or an array) resized bilinearly to
    ``size`` x ``size``, as one array: to compare them with masks of that size."""
    tensors = [torch.as_tensor(np.asarray(m, dtype=np.float32))[None] for m in maps]
    return np.stack([resize_maps(t, [(size, size)])[0] for t in tensors])


def adjacent(a, b, width):
    """Whether the cells at flat positions ``a`` and ``b`` of a row-major grid of
    ``width`` columns lie in each other's 3 x 3 neighbourhood: bool ``(len(a), len(b))``.

    A detector whose single reference is also its comparison set scores each
    patch without the reference patches next to it, which share its
    neighbourhood-averaged features.
    """
    a, b = a[:, None], b[None, :]
    return ((a // width - b // width).abs() <= 1) & ((a % width - b % width).abs() <= 1)
