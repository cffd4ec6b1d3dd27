"""Dataset loaders for MVTec-style folders and a synthetic texture generator.

* :func:`load_mvtec` lists one category stored in the MVTec AD layout::

      <root>/<category>/train/good/*
      <root>/<category>/test/<defect_type>/*          ("good" = defect-free)
      <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png

  Images are returned as paths (decoding is left to the estimators, which
  resize anyway); masks can be loaded on request.
* :func:`load_domains` concatenates several such categories and labels every
  image with its category in ``groups``, for leave-one-domain-out studies.
* :func:`make_textures` draws small procedural textured surfaces with
  synthetic defects and exact masks, for tests and examples that need no
  download (see :mod:`skad._textures` for the generators).
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch

from skad._textures import DEFECT_KINDS, make_texture_set

__all__ = ["load_domains", "load_mvtec", "make_textures"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SPLITS = ("train", "test")


def _list_images(folder):
    """Sorted image files in ``folder`` (extension matched case-insensitively)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def _require_dir(path, what):
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")


def _mask_shape(mask_size):
    """Normalize ``mask_size`` to ``(h, w)`` (or None)."""
    if mask_size is None:
        return None
    if isinstance(mask_size, (int, np.integer)) and not isinstance(mask_size, bool):
        shape = (int(mask_size), int(mask_size))
    elif isinstance(mask_size, (tuple, list)) and len(mask_size) == 2:
        shape = tuple(int(s) for s in mask_size)
    else:
        raise TypeError(f"mask_size must be an int or an (h, w) pair; got {mask_size!r}.")
    if min(shape) < 1:
        raise ValueError(f"mask_size must be positive; got {mask_size!r}.")
    return shape


def _read_mask(mask_path, shape):
    """Read a mask file as a uint8 0/1 array of ``shape`` (h, w)."""
    with Image.open(mask_path) as img:
        img = img.convert("L")
        if img.size != (shape[1], shape[0]):
            # Nearest-neighbour keeps the mask binary and its edges sharp.
            img = img.resize((shape[1], shape[0]), Image.NEAREST)
        arr = np.asarray(img)
    # 0/255 masks (possibly with compression noise) are cut at mid-grey;
    # 0/1 masks have a maximum of 1 and only need "nonzero".
    binary = arr >= 128 if arr.max() > 1 else arr > 0
    return binary.astype(np.uint8)


def _load_masks(paths, mask_paths, mask_size):
    """Masks for every image: read from file, or all-zero for normal images."""
    target = _mask_shape(mask_size)
    masks = []
    for path, mask_path in zip(paths, mask_paths):
        if target is None:
            # Opening reads the header only, not the pixel data.
            with Image.open(path) as img:
                width, height = img.size
            shape = (height, width)
        else:
            shape = target
        if mask_path is None:
            masks.append(np.zeros(shape, dtype=np.uint8))
        else:
            masks.append(_read_mask(mask_path, shape))
    return masks


def load_mvtec(root, category, split="test", *, return_masks=False, mask_size=None):
    """List the images of one category stored in the MVTec AD layout.

    Parameters
    ----------
    root : str or Path
        Folder holding one subfolder per category.
    category : str
        Name of the category subfolder, e.g. ``"bottle"``.
    split : {"test", "train"}, default="test"
        ``"train"`` lists ``train/good`` (all normal); ``"test"`` lists every
        subfolder of ``test``, ``good`` being the normal one.
    return_masks : bool, default=False
        Also load the ground-truth masks.
    mask_size : int or (int, int), default=None
        Resize masks (nearest neighbour) to this size, ``(h, w)`` for a pair.
        By default each mask has the size of its image.

    Returns
    -------
    Bunch
        ``paths`` (list of str, sorted by defect type then file name), ``y``
        (int ndarray, 1 = defective), ``defect_types`` (list of str),
        ``mask_paths`` (list of str, None for normal images) and, when
        ``return_masks``, ``masks`` (list of uint8 0/1 arrays; all zero for
        normal images).

    Raises
    ------
    FileNotFoundError
        If a folder is missing, a split holds no image, or a defective image
        has no mask file (the message names the expected path).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from skad.datasets import load_mvtec
    >>> root = Path(tempfile.mkdtemp())
    >>> for sub in ("tile/train/good", "tile/test/good", "tile/test/crack",
    ...             "tile/ground_truth/crack"):
    ...     (root / sub).mkdir(parents=True)
    >>> img = Image.fromarray(np.zeros((8, 8), np.uint8))
    >>> img.save(root / "tile/test/good/000.png")
    >>> img.save(root / "tile/test/crack/000.png")
    >>> img.save(root / "tile/ground_truth/crack/000_mask.png")
    >>> data = load_mvtec(root, "tile", return_masks=True)
    >>> data.defect_types, data.y.tolist(), data.masks[0].shape
    (['crack', 'good'], [1, 0], (8, 8))
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    category_dir = Path(root) / category
    _require_dir(category_dir, f"category {category!r}")
    split_dir = category_dir / split
    _require_dir(split_dir, f"{split!r} split")
    if split == "train":
        _require_dir(split_dir / "good", "train/good")
        type_dirs = [split_dir / "good"]
    else:
        type_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())

    paths, defect_types, mask_paths = [], [], []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        for image_path in _list_images(type_dir):
            mask_path = None
            if defect_type != "good":
                mask_path = (
                    category_dir / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
                )
                if not mask_path.is_file():
                    raise FileNotFoundError(
                        f"mask not found for defective image {image_path}: expected {mask_path}"
                    )
                mask_path = str(mask_path)
            paths.append(str(image_path))
            defect_types.append(defect_type)
            mask_paths.append(mask_path)
    if not paths:
        raise FileNotFoundError(f"no image files found under {split_dir}")

    data = Bunch(
        paths=paths,
        y=np.array([t != "good" for t in defect_types], dtype=int),
        defect_types=defect_types,
        mask_paths=mask_paths,
    )
    if return_masks:
        data.masks = _load_masks(paths, mask_paths, mask_size)
    return data


def _find_categories(root):
    """Subfolders of ``root`` that have both ``train/`` and ``test/``."""
    root = Path(root)
    _require_dir(root, "dataset root")
    found = sorted(
        p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir()
    )
    if not found:
        raise FileNotFoundError(f"no category folder with train/ and test/ found in {root}")
    return found


def load_domains(root, categories=None, split="test", *, return_masks=False, mask_size=None):
    """Concatenate several MVTec-layout categories, labelling each by domain.

    Parameters
    ----------
    root : str or Path
        Folder holding one subfolder per category.
    categories : str or list of str, default=None
        Categories to load, in this order. By default every subfolder of
        ``root`` that has ``train/`` and ``test/``, sorted by name.
    split : {"test", "train"}, default="test"
        Split to load from every category (see :func:`load_mvtec`).
    return_masks : bool, default=False
        Also load the ground-truth masks.
    mask_size : int or (int, int), default=None
        Resize masks to this size (see :func:`load_mvtec`).

    Returns
    -------
    Bunch
        ``paths``, ``y``, ``defect_types``, ``mask_paths`` (and ``masks``) as
        in :func:`load_mvtec`, concatenated, plus ``groups`` (ndarray of str,
        the category of every image, usable with
        :class:`sklearn.model_selection.LeaveOneGroupOut`).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from skad.datasets import load_domains
    >>> root = Path(tempfile.mkdtemp())
    >>> img = Image.fromarray(np.zeros((8, 8), np.uint8))
    >>> for cat in ("cloth", "tile"):
    ...     for split in ("train", "test"):
    ...         (root / cat / split / "good").mkdir(parents=True)
    ...         img.save(root / cat / split / "good" / "000.png")
    >>> data = load_domains(root, split="train")
    >>> data.groups.tolist()
    ['cloth', 'tile']
    """
    if categories is None:
        categories = _find_categories(root)
    elif isinstance(categories, str):
        categories = [categories]
    categories = list(categories)
    if not categories:
        raise ValueError("categories is empty.")

    parts = [
        load_mvtec(root, c, split, return_masks=return_masks, mask_size=mask_size)
        for c in categories
    ]
    data = Bunch(
        paths=[p for part in parts for p in part.paths],
        y=np.concatenate([part.y for part in parts]),
        groups=np.array([c for c, part in zip(categories, parts) for _ in part.paths]),
        defect_types=[t for part in parts for t in part.defect_types],
        mask_paths=[m for part in parts for m in part.mask_paths],
    )
    if return_masks:
        data.masks = [m for part in parts for m in part.masks]
    return data


def make_textures(
    n_domains=3,
    n_normal=20,
    n_anomalous=10,
    image_size=64,
    *,
    defects=DEFECT_KINDS,
    random_state=None,
):
    """Generate synthetic textured surfaces with synthetic defects.

    Every domain is one texture family (stripes, checker weave, stone-like
    smoothed noise, dot lattice, wood rings) with its own random colours and
    parameters; images of a domain differ by small random shifts and noise.
    Anomalous images are normal images with one defect drawn on them:

    * ``"scratch"``: a thin bright or dark line at a random angle;
    * ``"spot"``: a filled ellipse, darker or brighter;
    * ``"cut"``: a thin dark tapered gash;
    * ``"colour"``: an irregular patch whose hue and brightness are shifted.

    Parameters
    ----------
    n_domains : int, default=3
        Number of domains. Beyond the five families, families repeat with new
        parameters and names such as ``"stripes_1"``.
    n_normal : int, default=20
        Normal images per domain.
    n_anomalous : int, default=10
        Anomalous images per domain.
    image_size : int, default=64
        Height and width of the images, at least 16.
    defects : sequence of str, default=("scratch", "spot", "cut", "colour")
        Defect kinds to draw, used in turn (in shuffled order) per domain.
    random_state : int, numpy Generator or None, default=None
        Seed for :func:`numpy.random.default_rng`; the same seed gives the
        same data.

    Returns
    -------
    Bunch
        ``images`` (uint8 ndarray of shape (n, image_size, image_size, 3)),
        ``y`` (int ndarray, 1 = anomalous), ``groups`` (ndarray of str, the
        domain name of every image), ``masks`` (uint8 0/1 ndarray of shape
        (n, image_size, image_size), exactly the changed pixels; all zero for
        normal images) and ``defect_types`` (ndarray of str, ``"good"`` for
        normal images). Each domain lists its normal images first.

    Examples
    --------
    >>> from skad.datasets import make_textures
    >>> data = make_textures(n_domains=2, n_normal=4, n_anomalous=2, random_state=0)
    >>> data.images.shape, data.images.dtype
    ((12, 64, 64, 3), dtype('uint8'))
    >>> sorted(set(data.groups.tolist()))
    ['checker', 'stripes']
    >>> bool(data.masks[data.y == 1].any(axis=(1, 2)).all())
    True
    """
    return Bunch(
        **make_texture_set(n_domains, n_normal, n_anomalous, image_size, defects, random_state)
    )
