"""Reading, validating, resizing and batching images.

Every detector takes its images through :func:`check_images`, which accepts the
three input forms of the estimator contract (one ndarray, a list of arrays of
possibly different sizes, a list of file paths) and returns an :class:`ImageSet`
that reads images lazily, one at a time. :func:`iter_batches` turns an
:class:`ImageSet` into resized float tensors, batch by batch, so that no
detector ever needs all images in memory at once.
"""

import contextlib
import hashlib
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from ._progress import progress

__all__ = ["ASPECT_TOLERANCE", "ImageSet", "ImageSets", "aspect_warning", "check_groups",
           "check_images", "check_labels", "displayed_size", "image_hw", "iter_batches",
           "load_resized", "read_decoded", "read_image", "read_mask"]

_PATH_TYPES = (str, os.PathLike)

# The value that reads as 1.0, per integer dtype: arrays of these dtypes, and image
# files that decode to them, are divided by it whatever their content.
_FULL_SCALE = {np.dtype(np.bool_): 1, np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
# Pillow modes read through another one, so that only grey or colour values of a fixed
# range are left: palettes become their colours, other colour spaces RGB, premultiplied
# alpha is undone (alpha is then dropped).
_CONVERT = {"P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
            "HSV": "RGB", "RGBX": "RGB", "RGBa": "RGBA", "La": "LA"}
_ALPHA_MODES = ("LA", "RGBA")
# Grey modes whose samples Pillow keeps as the file stores them, so that the bit depth
# the file declares gives their range (Pillow itself scales 1- to 4-bit samples to 8 bits).
_STORED_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "I;16N")
# Grey modes whose white-is-zero TIFF samples Pillow keeps as stored, and the value of
# white that they are turned around from (Pillow has no other such mode)
_WHITE_IS_ZERO_KEPT = {"I;16": 65535, "F": 1.0}
# what Pillow raises for a file it cannot decode
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _describe(item):
    if isinstance(item, np.ndarray):
        return f"an array of shape {item.shape} and dtype {item.dtype}"
    return f"an object of type {type(item).__name__}"


def _full_scale(dtype):
    """The :data:`_FULL_SCALE` value of ``dtype`` in either byte order, or None."""
    return _FULL_SCALE.get(dtype.newbyteorder("="))


def _show(value):
    """``value`` to 3 significant digits, or in full where those would put it in [0, 1]."""
    text = f"{value:.3g}"
    return text if (0.0 <= float(text) <= 1.0) == (0.0 <= value <= 1.0) else repr(value)


def _check_array(img, where):
    """Validate one image array (2-D, or 3-D channels last) and return it."""
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{where} has shape {img.shape}; expected (height, width) or "
            "(height, width, n_channels) with 1, 3 or 4 channels (channels last)"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{where} is empty (shape {img.shape})")
    if _full_scale(img.dtype) is not None:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(
            f"{where} has dtype {img.dtype}; expected uint8 (0-255), uint16 (0-65535), bool "
            "or float in [0, 1]. Other integer dtypes have no fixed range: convert, e.g. "
            "X.astype(np.uint8) for 0-255 values or X / 4095 for 12-bit values"
        )
    if not np.isfinite(img).all():
        raise ValueError(f"{where} contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{where} is float with values in [{_show(lo)}, {_show(hi)}]; float images must lie "
            "in [0, 1]: divide by the full-scale value of the data (65535 for 16-bit, 255 "
            "for 0-255 values), or rescale from the sensor's known range"
        )
    return img


def _to_float_rgb(img):
    """Image array (H, W[, C]) -> float32 (H, W, 3) in [0, 1]; grey is repeated, alpha dropped."""
    scale = _full_scale(img.dtype)
    img = img.astype(np.float32)
    if scale is not None:
        img /= scale
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def _unreadable(path, exc):
    return ValueError(f"cannot read image file {os.fspath(path)!r}: {exc}")


def _declared_depth(im):
    """``(bits, signed)`` of a grey image's samples as its file declares them, or None."""
    if im.mode not in _STORED_MODES:
        return None
    if hasattr(im, "tag_v2"):  # TIFF: BitsPerSample and SampleFormat (2: signed integers)
        bits = im.tag_v2.get(258, (1,))[0]
        return (bits, im.tag_v2.get(339, (1,))[0] == 2) if bits >= 8 else None
    if im.format == "PPM" and im.mode == "I":
        return 16, False  # Pillow rescales PGM samples of 9 to 16 bits to 16 bits
    return None


def _open(path, stack):
    """``Image.open(path)``, entered on ``stack``, that decodes every TIFF as displayed.

    Pillow memory-maps an uncompressed single-strip TIFF (grey, palette, RGBA,
    CMYK, 16-bit) at its displayed size, which for orientations 5 to 8 (a quarter
    turn) is the stored size transposed: the pixels come out scrambled and
    unturned. Such a file is read from a file object instead, which Pillow never
    maps.
    """
    im = stack.enter_context(Image.open(path))
    if hasattr(im, "tag_v2") and im.tag_v2.get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
        im = stack.enter_context(Image.open(stack.enter_context(open(path, "rb"))))  # noqa: SIM115
    return im


def _decode(path):
    """The first frame of an image file as it is displayed, without alpha.

    Returns ``(array, depth)``: the array (H, W[, C]) as Pillow decodes the mode
    (after :data:`_CONVERT`), EXIF orientation applied, white-is-zero samples
    turned around; ``depth`` as :func:`_declared_depth`.
    """
    try:
        with contextlib.ExitStack() as stack:
            im = _open(path, stack)
            # before the transpose, which drops the TIFF tags
            depth = _declared_depth(im)
            white_is_zero = hasattr(im, "tag_v2") and im.tag_v2.get(262) == 0
            ImageOps.exif_transpose(im, in_place=True)
            mode = _CONVERT.get(im.mode, im.mode)
            arr = np.asarray(im.convert(mode) if mode != im.mode else im)
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    if white_is_zero and mode in _WHITE_IS_ZERO_KEPT:
        # TIFF PhotometricInterpretation 0: 0 is white. Pillow turns 1- to 8-bit samples
        # around itself, but keeps 16-bit and float samples as stored
        arr = _WHITE_IS_ZERO_KEPT[mode] - arr
    return (arr[..., :-1] if mode in _ALPHA_MODES else arr), depth


def _scale_to_depth(arr, depth, path):
    """Integer samples of a declared depth -> a :data:`_FULL_SCALE` dtype, or float32 in [0, 1]."""
    bits, signed = depth
    kind = "i" if signed else "u"
    if arr.dtype.kind != kind and 8 * arr.dtype.itemsize == bits:
        # Pillow keeps the bit pattern of signed 8-bit and unsigned 32-bit samples
        arr = arr.view(f"{kind}{arr.dtype.itemsize}")
    full = 2 ** (bits - signed) - 1
    if _full_scale(arr.dtype) == full:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(
            f"image file {path!r} holds negative values (down to {lo}) in signed {bits}-bit "
            "samples; images are read as intensities from 0 to full scale: save it unsigned "
            "or as float in [0, 1]"
        )
    if hi > full:
        raise ValueError(f"image file {path!r} holds values up to {hi}, beyond the {bits}-bit "
                         "range its header declares")
    return (arr / full).astype(np.float32)


def _read_file(path):
    """Image file -> array (H, W) or (H, W, C) read at its mode's fixed range.

    Integers of the file's own depth come back in a dtype of :data:`_FULL_SCALE`
    (or as float32 in [0, 1] for other depths), floats as stored.
    """
    arr, depth = _decode(path)
    if depth is not None:
        return _scale_to_depth(arr, depth, os.fspath(path))
    if _full_scale(arr.dtype) is None and arr.dtype.kind in "iu":
        raise ValueError(
            f"image file {os.fspath(path)!r} holds {8 * arr.dtype.itemsize}-bit integer "
            "samples without a declared bit depth, so their range is unknown: save it as 8- "
            "or 16-bit PNG or TIFF, or as float TIFF in [0, 1]"
        )
    return arr


def displayed_size(path):
    """``(height, width)`` of an image file as it is displayed (EXIF orientation applied).

    Read from the header; Pillow decodes a PNG file without EXIF before its
    pixel data, since the EXIF chunk may follow them.

    Raises
    ------
    ValueError
        If the file cannot be read.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            # Pillow's TIFF reader turns the picture itself, and its size is the displayed one
            turned = not hasattr(im, "tag_v2") and (
                im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8))
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    # orientations 5 to 8 turn the picture by a quarter
    return (width, height) if turned else (height, width)


def pixel_digest(array):
    """A 63-bit digest of an image's decoded pixels, their shape and dtype: the same
    picture read from a file or passed as the array it decodes to gets the same one."""
    array = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{array.shape}{array.dtype}".encode())
    h.update(array.data)
    return int.from_bytes(h.digest(), "little") >> 1  # fits an int64


def read_mask(path):
    """A ground-truth mask file as a boolean array (H, W): any nonzero pixel is a defect.

    Read like an image (first frame, as displayed, palettes as their colours,
    alpha dropped), so that 0/255, 0/1 and class-index masks (defects coded 1,
    2, 3, ...) of any mode agree with :mod:`skad.metrics`.

    Raises
    ------
    ValueError
        If the file cannot be read.
    """
    arr = _decode(path)[0]
    return (arr != 0).any(axis=2) if arr.ndim == 3 else arr != 0


class ImageSet:
    """A validated sequence of images, read lazily one at a time.

    Build it with :func:`check_images`. ``read(i)`` returns image ``i`` as a
    float32 array ``(height, width, 3)`` in [0, 1]; ``size(i)`` returns its
    ``(height, width)`` as displayed, from the last ``read(i)`` or else from
    the file's header (see :func:`displayed_size`).
    """

    def __init__(self, items, name="X"):
        self._items = items
        self.name = name
        # sizes of files already decoded: maps are resized to them right after
        # scoring, without opening the file again
        self._read_sizes = {}
        # the images read that are one uniform value, as indices of the set that subsets
        # were taken from (its ``constant``): set_reference warns of them
        self.constant = set()
        # once record_digests() is called, a digest of each image read (of its decoded
        # pixels), by index of that set: set_reference tells training images by them
        self._digests = None
        # once watch_for() is called, the digests looked for, and where they were read
        # (indices of that set): scoring tells the detector's references by them
        self._watched, self._found = None, set()
        self._root, self._root_index = self, None

    def __len__(self):
        return len(self._items)

    def describe(self, i):
        """Image ``i`` as errors and warnings name it: ``X[i]``, with its path if a file."""
        item = self._items[i]
        if isinstance(item, _PATH_TYPES):
            return f"{self.name}[{i}] ({os.fspath(item)!r})"
        return f"{self.name}[{i}]"

    def _in_root(self):
        """The index of each of this set's images in the set subsets were taken from."""
        return range(len(self)) if self._root_index is None else self._root_index

    def read(self, i):
        item = self._items[i]
        if isinstance(item, _PATH_TYPES):
            item = _check_array(_read_file(item), self.describe(i))
            self._read_sizes[i] = item.shape[:2]
        root_i = self._in_root()[i]
        root = self._root
        if root._digests is not None or root._watched is not None:
            digest = pixel_digest(item)
            if root._digests is not None:
                root._digests[root_i] = digest
            if root._watched is not None and digest in root._watched:
                root._found.add(root_i)
        image = _to_float_rgb(item)
        if image.min() == image.max():
            self._root.constant.add(root_i)
        return image

    def record_digests(self):
        """From now on, keep the :func:`pixel_digest` of each image read (this set's, and
        those of the sets it was taken from or that were taken from it)."""
        if self._root._digests is None:
            self._root._digests = {}
        return self

    def read_digests(self):
        """The :func:`pixel_digest` of each image of this set read since
        :meth:`record_digests`, as a set."""
        digests = self._root._digests or {}
        return {digests[j] for j in self._in_root() if j in digests}

    def watch_for(self, digests):
        """From now on, note which images read have a :func:`pixel_digest` in ``digests``
        (keeping nothing of the others: a scoring run may read millions)."""
        self._root._watched = set(digests)
        return self

    def found(self):
        """The indices (ascending) of this set's images read since :meth:`watch_for` whose
        digest it looks for."""
        return [i for i, j in enumerate(self._in_root()) if j in self._root._found]

    def size(self, i):
        item = self._items[i]
        if not isinstance(item, _PATH_TYPES):
            return item.shape[0], item.shape[1]
        if i not in self._read_sizes:
            self._read_sizes[i] = displayed_size(item)
        return self._read_sizes[i]

    def sizes(self):
        return [self.size(i) for i in range(len(self))]

    def subset(self, indices):
        """The images at ``indices``, as a new :class:`ImageSet` (whose uniform images
        are recorded in this set's ``constant``)."""
        sub = ImageSet([self._items[int(i)] for i in indices], self.name)
        sub._root = self._root
        in_root = self._in_root()
        sub._root_index = [in_root[int(i)] for i in indices]
        return sub


class ImageSets:
    """Two image sets read as one, ``first`` then ``second`` (None: none)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self):
        return len(self.first) + (len(self.second) if self.second is not None else 0)

    def read(self, i):
        n = len(self.first)
        return self.first.read(i) if i < n else self.second.read(i - n)


def read_decoded(path, *, where):
    """One image file's pixels as decoded and checked, before :func:`read_image` turns them
    to float RGB: an array that :func:`check_images` reads to the same image (and the
    same :func:`pixel_digest`) as the file. ``where`` as for :func:`read_image`."""
    return _check_array(_read_file(path), where)


def read_image(path, *, where):
    """One image file as :meth:`ImageSet.read` reads it: float32 (H, W, 3) in [0, 1].

    ``where`` names the image in error messages (``"images[17] ('a.png')"``): skad
    score reads a chunk at a time and names each image by its place in the whole
    listing.

    Raises
    ------
    ValueError
        If the file cannot be read, or holds values its type does not allow.
    """
    return _to_float_rgb(read_decoded(path, where=where))


def check_images(X, *, name="X"):
    """Validate images and wrap them for lazy, batched reading.

    Parameters
    ----------
    X : ndarray, list of ndarray or list of path-like
        ``(n_samples, height, width)`` or ``(n_samples, height, width,
        n_channels)`` with 1, 3 or 4 channels (alpha is dropped), read by
        dtype: uint8 / 255, uint16 / 65535, bool as 0 and 1, float as is (it
        must lie in [0, 1]); other dtypes are refused. Or a list of 2-D / 3-D
        such arrays of possibly different sizes; or a list of image file paths,
        read lazily at the fixed range of their mode (see ``docs/usage.md``),
        first frame, EXIF orientation applied. Either list may also come as a
        one-dimensional array (of str or object dtype). An :class:`ImageSet` passes
        through.
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
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind in "UO":
        # file paths (np.array(paths), a DataFrame column's values), or arrays of
        # different sizes, in a one-dimensional array: read as the list they hold
        X = X.tolist()
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            raise ValueError(
                f"{name} has shape {X.shape}; expected (n_samples, height, width) or "
                "(n_samples, height, width, n_channels). For one image use X[None]."
            )
        if len(X) == 0:
            raise ValueError(f"{name} is empty: at least one image is required")
        _check_array(X[0], f"{name}[0]")  # dtype and shape once for the whole array
        if X.dtype.kind == "f":  # the value range, image by image
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


def check_groups(groups, n_samples):
    """Validate the domain of each image (one per image, none missing); return an array.

    Domains are compared and sorted (``np.unique``): a missing one (None, NaN)
    or a mix of kinds (str and int) would fail there with an error that does
    not say where it came from.
    """
    try:
        groups = np.asarray(groups)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"groups must hold one domain per image; {exc}") from None
    if groups.shape != (n_samples,):
        raise ValueError(f"groups has shape {groups.shape}; expected ({n_samples},), one per image")
    missing = np.flatnonzero([g is None or (isinstance(g, (float, np.floating)) and np.isnan(g))
                              for g in groups])
    if len(missing):
        raise ValueError(f"groups[{missing[0]}] is {groups[missing[0]]}: every image needs a "
                         "domain (a str or an int)")
    try:
        np.unique(groups)
    except TypeError:
        kinds = sorted({type(g).__name__ for g in groups})
        raise ValueError(f"groups must hold domains of one kind (str or int) that can be "
                         f"sorted; got a mix of {', '.join(kinds)}") from None
    return groups


def image_hw(image_size):
    """``(height, width)`` of an ``image_size`` parameter: an int (a square) or a pair."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    return int(image_size[0]), int(image_size[1])


#: how far resizing may change an image's height-to-width ratio before fit warns
ASPECT_TOLERANCE = 1.5


def _like(length, short):
    """``length`` rounded (halves up) to a multiple of what divides ``short`` among 32 (the
    CNN backbones' largest stride) and 14 (DINOv2's patch), both where both do: a size the
    detector takes wherever ``short`` was taken."""
    step = math.lcm(*[d for d in (32, 14) if short % d == 0] or [1])
    return max(step, int(np.floor(length / step + 0.5)) * step)


def aspect_warning(images, image_size, what="training images"):
    """The warning for ``images`` whose height-to-width ratio resizing to ``image_size``
    changes by more than :data:`ASPECT_TOLERANCE` times, or None.

    Sizes come from the images read, else from the files' headers (no decoding).
    The message names the count, the most distorted image and a remedy: the
    ``(height, width)`` pair at the geometric middle of all the images' ratios
    (long side a multiple of what the short side is), which keeps every one
    within the tolerance where any pair can; where none can (ratios further
    apart than the tolerance squared, such as images of both orientations) it
    says so, with the pair that distorts the worst of them least.
    """
    height, width = image_hw(image_size)
    sizes = images.sizes()
    ratios = np.array([h / w for h, w in sizes])
    stretch = ratios / (height / width)
    factor = np.maximum(stretch, 1 / stretch)
    off = np.flatnonzero(factor > ASPECT_TOLERANCE)
    if not len(off):
        return None
    worst = int(off[np.argmax(factor[off])])
    h, w = sizes[worst]
    msg = (f"{len(off)} of {len(sizes)} {what} change their height-to-width ratio more than "
           f"{ASPECT_TOLERANCE:g} times when resized to {height} x {width} "
           f"(image_size={image_size!r}), which stretches or squashes what they show: "
           f"{images.describe(worst)} is {h} x {w} (height x width)")
    low, high = float(ratios.min()), float(ratios.max())
    middle, short = math.sqrt(low * high), min(height, width)
    pair = ((_like(short * middle, short), short) if middle > 1
            else (short, _like(short / middle, short)))
    advice = []
    if high / low > ASPECT_TOLERANCE ** 2:
        advice.append(f"Their height-to-width ratios span {low:.2f} to {high:.2f}: no one "
                      f"image_size keeps them all within {ASPECT_TOLERANCE:g} times")
        if low < 1 < high:
            advice.append("turn them to one orientation first where the part allows")
    most = max(high / (pair[0] / pair[1]), pair[0] / pair[1] / low)
    if pair == (height, width):  # sizes rounded as they must be: nothing better to offer
        advice.append(f"image_size is already the pair that distorts the worst of them least "
                      f"(at most {most:.1f} times)")
    elif high / low <= ASPECT_TOLERANCE ** 2:
        advice.append(f"Pass image_size as a (height, width) pair in their ratio, e.g. {pair}")
    else:
        advice.append(f"the pair that distorts the worst of them least (at most {most:.1f} "
                      f"times) is e.g. {pair}")
    return f"{msg}. {'; '.join(advice)}"


def load_resized(images, i, image_size):
    """Image ``i`` as a float tensor (3, H, W) resized to ``image_size``."""
    img = torch.from_numpy(np.ascontiguousarray(images.read(i))).permute(2, 0, 1)[None]
    size = image_hw(image_size)
    if tuple(img.shape[-2:]) != size:
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
    return img[0].clamp_(0, 1)


def iter_batches(images, batch_size, image_size, *, verbose=0, desc="images"):
    """Yield ``(indices, batch)`` with ``batch`` a float tensor (B, 3, H, W) in [0, 1].

    Images are read and resized one batch at a time; with ``verbose`` a
    progress bar counts the batches on stderr (:func:`skad._progress.progress`).
    """
    n = len(images)
    starts = range(0, n, batch_size)
    for start in progress(starts, total=len(starts), desc=desc, verbose=verbose,
                          unit="batch"):  # batches of batch_size images, not images
        idx = np.arange(start, min(start + batch_size, n))
        yield idx, torch.stack([load_resized(images, int(i), image_size) for i in idx])
