"""Reading, validating, resizing and batching images.

Every detector takes its images through :func:`check_images`, which accepts the
three input forms of the estimator contract (one ndarray, a list of arrays of
possibly different sizes, a list of file paths) and returns an :class:`ImageSet`
that reads images lazily, one at a time. :func:`iter_batches` turns an
:class:`ImageSet` into resized float tensors, batch by batch, so that no
detector ever needs all images in memory at once.
"""

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ImageSet", "check_images", "check_labels", "iter_batches", "resize_maps", "progress",
           "gaussian_blur", "upsample"]

_PATH_TYPES = (str, os.PathLike)


def _describe(item):
    if isinstance(item, np.ndarray):
        return f"an array of shape {item.shape} and dtype {item.dtype}"
    return f"an object of type {type(item).__name__}"


def _check_array(img, where):
    """Validate one image array (2-D, or 3-D channels last) and return it."""
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{where} has shape {img.shape}; expected (height, width) or "
            "(height, width, n_channels) with 1, 3 or 4 channels (channels last)"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{where} is empty (shape {img.shape})")
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.bool_ or not np.issubdtype(img.dtype, np.floating):
        raise TypeError(
            f"{where} has dtype {img.dtype}; expected uint8 in [0, 255] or float in [0, 1]"
        )
    if not np.isfinite(img).all():
        raise ValueError(f"{where} contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{where} is float with values in [{lo:.3g}, {hi:.3g}]; float images must lie "
            "in [0, 1] (divide uint16 or 0-255 floats accordingly)"
        )
    return img


def _to_float_rgb(img):
    """uint8/float (H, W[, C]) -> float32 (H, W, 3) in [0, 1]; grey is repeated, alpha dropped."""
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def _read_file(path):
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                return np.clip(arr / (65535.0 if arr.max() > 255 else 255.0), 0, 1)
            return np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read image file {os.fspath(path)!r}: {exc}") from exc


class ImageSet:
    """A validated sequence of images, read lazily one at a time.

    Build it with :func:`check_images`. ``read(i)`` returns image ``i`` as a
    float32 array ``(height, width, 3)`` in [0, 1]; ``size(i)`` returns its
    ``(height, width)`` without decoding pixels where it can.
    """

    def __init__(self, items, name="X"):
        self._items = items
        self.name = name

    def __len__(self):
        return len(self._items)

    def _where(self, i):
        item = self._items[i]
        if isinstance(item, _PATH_TYPES):
            return f"{self.name}[{i}] ({os.fspath(item)!r})"
        return f"{self.name}[{i}]"

    def read(self, i):
        item = self._items[i]
        if isinstance(item, _PATH_TYPES):
            item = _check_array(_read_file(item), self._where(i))
        return _to_float_rgb(item)

    def size(self, i):
        item = self._items[i]
        if isinstance(item, _PATH_TYPES):
            try:
                with Image.open(item) as im:
                    return im.size[1], im.size[0]
            except OSError as exc:
                raise ValueError(f"cannot read image file {os.fspath(item)!r}: {exc}") from exc
        return item.shape[0], item.shape[1]

    def sizes(self):
        return [self.size(i) for i in range(len(self))]

    def subset(self, indices):
        """The images at ``indices``, as a new :class:`ImageSet`."""
        return ImageSet([self._items[int(i)] for i in indices], self.name)


def check_images(X, *, name="X"):
    """Validate images and wrap them for lazy, batched reading.

    Parameters
    ----------
    X : ndarray, list of ndarray or list of path-like
        ``(n_samples, height, width)`` or ``(n_samples, height, width,
        n_channels)`` uint8 in [0, 255] or float in [0, 1]; or a list of 2-D /
        3-D such arrays of possibly different sizes; or a list of image file
        paths (read lazily). An :class:`ImageSet` passes through.
    name : str, default="X"
        The argument's name, used in error messages.

    Returns
    -------
    images : ImageSet

    Examples
    --------
    >>> import numpy as np
    >>> images = check_images(np.zeros((2, 8, 8), dtype=np.uint8))
    >>> len(images), images.read(0).shape
    (2, (8, 8, 3))
    """
    if isinstance(X, ImageSet):
        return X
    if isinstance(X, _PATH_TYPES):
        raise TypeError(
            f"{name} is a single path {os.fspath(X)!r}; pass a list of image paths "
            "(e.g. sorted(pathlib.Path(folder).glob('*.png')))"
        )
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            raise ValueError(
                f"{name} has shape {X.shape}; expected (n_samples, height, width) or "
                "(n_samples, height, width, n_channels). For one image use X[None]."
            )
        if len(X) == 0:
            raise ValueError(f"{name} is empty: at least one image is required")
        _check_array(X[0], f"{name}[0]")  # dtype and shape once for the whole array
        if X.dtype != np.uint8:
            for i in range(len(X)):
                _check_array(X[i], f"{name}[{i}]")
        return ImageSet(list(X), name)
    if isinstance(X, (str, bytes)) or not hasattr(X, "__len__"):
        raise TypeError(
            f"{name} must be an ndarray, a list of arrays or a list of file paths; "
            f"got {type(X).__name__}"
        )
    items = list(X)
    if not items:
        raise ValueError(f"{name} is empty: at least one image is required")
    for i, item in enumerate(items):
        if isinstance(item, _PATH_TYPES):
            if not os.path.isfile(item):
                raise ValueError(f"{name}[{i}]: image file {os.fspath(item)!r} does not exist")
        elif isinstance(item, np.ndarray):
            _check_array(item, f"{name}[{i}]")
        else:
            raise TypeError(
                f"{name}[{i}] is {_describe(item)}; expected an image array or a file path"
            )
    return ImageSet(items, name)


def check_labels(y, n_samples, *, name="y"):
    """Validate 0/1 labels of length ``n_samples``; return them as an int array."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {y.shape}")
    if len(y) != n_samples:
        raise ValueError(f"{name} has {len(y)} labels but X has {n_samples} images")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        bad = sorted({str(v) for v in np.unique(y) if v not in (0, 1)})[:5]
        raise ValueError(f"{name} must hold 0 (normal) and 1 (anomalous) only; found {bad}")
    return y.astype(np.int64)


def _size2(image_size):
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    return int(image_size[0]), int(image_size[1])


def load_resized(images, i, image_size):
    """Image ``i`` as a float tensor (3, H, W) resized to ``image_size``."""
    img = torch.from_numpy(np.ascontiguousarray(images.read(i))).permute(2, 0, 1)[None]
    size = _size2(image_size)
    if tuple(img.shape[-2:]) != size:
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    return img[0].clamp_(0, 1)


def iter_batches(images, batch_size, image_size, *, verbose=0, desc="images"):
    """Yield ``(indices, batch)`` with ``batch`` a float tensor (B, 3, H, W) in [0, 1].

    Images are read and resized one batch at a time; with ``verbose`` a
    progress line is written to stderr.
    """
    n = len(images)
    starts = range(0, n, batch_size)
    for start in progress(starts, total=len(starts), desc=desc, verbose=verbose):
        idx = np.arange(start, min(start + batch_size, n))
        yield idx, torch.stack([load_resized(images, int(i), image_size) for i in idx])


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


def progress(iterable, *, total=None, desc="", verbose=0):
    """Iterate, writing ``desc: k/total [elapsed]`` to stderr when ``verbose``.

    The line is rewritten at most twice a second, and once at the end.
    """
    if not verbose:
        yield from iterable
        return
    total = len(iterable) if total is None else total
    t0 = last = time.perf_counter()
    for k, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if k == total or now - last > 0.5:
            last = now
            end = "\n" if k == total else ""
            sys.stderr.write(f"\r{desc}: {k}/{total} [{now - t0:.1f}s]{end}")
            sys.stderr.flush()



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


def upsample(maps, size, align_corners=False):
    """Bilinear resize of maps ``(B, h, w)`` to ``size`` (int or (H, W))."""
    return F.interpolate(maps[:, None].float(), size=_size2(size), mode="bilinear",
                         align_corners=align_corners)[:, 0]
