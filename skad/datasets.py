"""Dataset loaders for MVTec-style folders and a synthetic texture generator.

* :func:`load_mvtec` lists one category stored in the MVTec AD layout::

      <root>/<category>/train/good/*
      <root>/<category>/test/<defect_type>/*          ("good" = defect-free)
      <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png

  Images are returned as paths (decoding is left to the estimators, which
  resize anyway); masks can be loaded on request.
* :func:`load_domains` concatenates several such categories and labels every
  image with its category in ``groups``, for leave-one-domain-out studies;
  :func:`load_labelled_domains` takes both splits, the training set of a
  detector that learns from labels across domains; :func:`find_categories`
  lists the categories of a root.
* :func:`make_textures` draws small procedural textured surfaces with
  synthetic defects and exact masks, for tests and examples that need no
  download (see :mod:`skad._textures` for the generators).
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch

from skad._files import list_images, list_subfolders
from skad._images import displayed_size, read_mask
from skad._textures import DEFECT_KINDS, make_texture_set

__all__ = ["find_categories", "load_domains", "load_labelled_domains", "load_mvtec",
           "make_textures"]

_SPLITS = ("train", "test")


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


def _read_mask(mask_path, image_path):
    """Mask of ``image_path`` as a bool array of the image's displayed size."""
    mask = read_mask(mask_path)
    shape = displayed_size(image_path)
    if mask.shape != shape:
        raise ValueError(
            f"mask {mask_path} is {mask.shape[1]} x {mask.shape[0]} pixels but its image "
            f"{image_path} is {shape[1]} x {shape[0]} (width x height, as displayed, EXIF "
            "orientation applied); a mask must have its image's size"
        )
    return mask


def _load_masks(paths, mask_paths, mask_size):
    """Masks for every image: read from file, or all-zero for normal images."""
    target = _mask_shape(mask_size)
    masks = []
    for path, mask_path in zip(paths, mask_paths):
        if mask_path is not None:
            mask = _read_mask(mask_path, path)
        else:
            mask = np.zeros(target or displayed_size(path), dtype=bool)
        if target is not None and mask.shape != target:
            # Nearest-neighbour keeps the mask binary and its edges sharp.
            mask = np.asarray(Image.fromarray(mask).resize(target[::-1], Image.NEAREST))
        masks.append(mask.astype(np.uint8))
    return masks


def load_mvtec(root, category, split="test", *, return_masks=False, mask_size=None):
    """List the images of one category stored in the MVTec AD layout.

    Hidden files and folders and the debris of notebooks, macOS, Windows and
    NAS boxes (``.ipynb_checkpoints``, ``__MACOSX``, ``._*``, ``Thumbs.db``,
    ...) are never images or defect types; what is skipped is logged on the
    ``skad`` logger.

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
        Also load the ground-truth masks. Any nonzero pixel of a mask file is a
        defect (0/255, 0/1 and class-index masks alike, as in
        :mod:`skad.metrics`).
    mask_size : int or (int, int), default=None
        Resize masks (nearest neighbour) to this size, ``(h, w)`` for a pair,
        once each is checked against its image. By default each mask has the
        size of its image.

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
    ValueError
        If an image or mask file cannot be read, or a mask's size differs from
        its image's displayed size (the message names both files).

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
        type_dirs = list_subfolders(split_dir)

    paths, defect_types, mask_paths = [], [], []
    for type_dir in type_dirs:
        defect_type = type_dir.name
        for image_path in list_images(type_dir):
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


def find_categories(root):
    """The categories of an MVTec-layout root: its subfolders with both ``train/`` and ``test/``.

    Parameters
    ----------
    root : str or Path

    Returns
    -------
    list of str
        Sorted by name; empty when there are none. Hidden folders and system
        debris are never categories.

    Raises
    ------
    OSError
        If ``root`` cannot be listed.
    """
    return [p.name for p in list_subfolders(root)
            if (p / "train").is_dir() and (p / "test").is_dir()]


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
    >>> from skad.datasets import load_domains
    >>> from pathlib import Path
    >>> from PIL import Image
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
        _require_dir(Path(root), "dataset root")
        categories = find_categories(root)
        if not categories:
            raise FileNotFoundError(
                f"no category folder with train/ and test/ found in {root}")
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


def load_labelled_domains(root, categories=None):
    """Every image of several categories, both splits, with labels and domains.

    The training set of a detector that learns from labelled images across
    domains (:class:`skad.MetaComparer`): the train splits of ``categories``
    (:func:`load_domains`), followed by their test splits.

    Parameters
    ----------
    root : str or Path
    categories : str or list of str, default=None
        As in :func:`load_domains`: by default every category of ``root``.

    Returns
    -------
    Bunch
        ``paths``, ``y``, ``groups``, ``defect_types`` and ``mask_paths`` of
        the train splits, then of the test splits.
    """
    train = load_domains(root, categories, "train")
    test = load_domains(root, categories, "test")
    return Bunch(
        paths=list(train.paths) + list(test.paths),
        y=np.concatenate([train.y, test.y]),
        groups=np.concatenate([train.groups, test.groups]),
        defect_types=list(train.defect_types) + list(test.defect_types),
        mask_paths=list(train.mask_paths) + list(test.mask_paths),
    )


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
