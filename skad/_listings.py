"""The listings of skad score: the images of a folder, a file list or a glob, found lazily.

Each is an iterable of paths (str) in a deterministic order, read as it is consumed,
so that a listing of millions of images costs the memory of a folder's names, not of
the list; :func:`skad.scoring.score_files` takes any of them. ``nothing_found()`` says
why a listing found nothing, ``describe()`` what it is (the run manifest records it),
``excluding(*paths)`` returns it with the results folder and model file left out.
"""

import functools
import logging
import os
import re
from pathlib import Path

from ._files import IMAGE_EXTENSIONS, iter_images
from ._results import recorded_overlays

__all__ = ["FileList", "Glob", "ImageFolder", "as_listing"]

logger = logging.getLogger("skad.scoring")


class ImageFolder:
    """The image files below a folder, subfolders too, in a sorted walk.

    The order is that of :func:`skad._files.list_images` (depth first, each
    folder's entries by name), found as the walk goes: memory holds the
    entries of the folders on the current path, not the tree. Hidden files,
    system debris and the overlays that earlier ``skad score`` runs wrote (those
    their ``scores.csv`` lists) are left out.

    Parameters
    ----------
    folder : str or path-like
    exclude : sequence of path-like, default=()
        Files or folders never listed (:func:`score_files` adds its results
        folder and model file).

    Examples
    --------
    >>> from pathlib import Path
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.png", "a/c.png", "notes.txt"):
    ...     (folder / name).parent.mkdir(exist_ok=True)
    ...     (folder / name).touch()
    >>> [Path(p).relative_to(folder).as_posix() for p in ImageFolder(folder)]
    ['a/c.png', 'b.png']
    """

    def __init__(self, folder, *, exclude=()):
        self.folder = Path(folder)
        self.exclude = tuple(exclude)
        self._n_left_out = 0

    def __iter__(self):
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder} is not a folder")
        self._n_left_out = 0
        # a folder's recorded overlays are read once; the walk is depth first, so the
        # folders still being listed are few
        recorded = functools.lru_cache(maxsize=256)(recorded_overlays)
        for path in iter_images(self.folder, recursive=True, exclude=self.exclude):
            if path.name in recorded(path.parent):
                self._n_left_out += 1
            else:
                yield os.fspath(path)
        if self._n_left_out:
            logger.info("left out %s in %s", self._left_out(), self.folder)

    def _left_out(self):
        return (f"{self._n_left_out} overlays that earlier skad score runs wrote (listed in "
                "their scores.csv)")

    def nothing_found(self):
        """The message for a listing that found no image (after a full iteration)."""
        but = f" but {self._left_out()}" if self._n_left_out else ""
        return f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder}{but}"

    def describe(self):
        """What the listing is, for the run manifest (JSON)."""
        return {"folder": os.path.abspath(self.folder)}

    def excluding(self, *paths):
        """The same listing, never listing ``paths`` either."""
        return ImageFolder(self.folder, exclude=(*self.exclude, *paths))

    def __repr__(self):
        return f"ImageFolder({os.fspath(self.folder)!r})"


class FileList:
    """The paths written in a text file, one a line, in the file's order.

    The file is read as UTF-8 (bytes that are not become the file-system's
    surrogate escapes), a line at a time. Empty lines are skipped; nothing else
    is interpreted (no comments, no quoting). A relative path is relative to the
    list file's folder, so that a run resumed from another working directory
    reads the same files. Every line is scored: a path that does not exist or is
    not an image becomes a row with its error.

    Parameters
    ----------
    path : str or path-like
        The list file.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __iter__(self):
        if not self.path.is_file():
            raise ValueError(f"file list {self.path} "
                             f"{'is not a file' if self.path.exists() else 'does not exist'}")
        base = self.path.parent
        with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                name = line.rstrip("\n")
                if name.strip():
                    yield os.fspath(base / name)

    def nothing_found(self):
        return f"file list {self.path} names no file"

    def describe(self):
        return {"file_list": os.path.abspath(self.path)}

    def excluding(self, *paths):
        return self  # every listed path is scored: the user chose them one by one

    def __repr__(self):
        return f"FileList({os.fspath(self.path)!r})"


class Glob:
    """The image files that a glob pattern matches, in a sorted walk.

    ``*``, ``?`` and ``[...]`` match within a name, ``**`` any number of
    folders (zero included), as Python's ``glob(recursive=True)``, but found in
    the order and by the rules of :class:`ImageFolder`: sorted, lazily,
    hidden entries and debris never matched, symbolic links to folders not
    entered, and only files with an image extension (``IMAGE_EXTENSIONS``).

    Parameters
    ----------
    pattern : str
        E.g. ``"line3/2026-*/**/*.png"``; the walk starts at the folders
        before the first wildcard (``line3``).
    exclude : sequence of path-like, default=()

    Examples
    --------
    >>> from pathlib import Path
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("a/1.png", "a/b/2.png", "c/3.png", "a/4.jpg"):
    ...     (folder / name).parent.mkdir(parents=True, exist_ok=True)
    ...     (folder / name).touch()
    >>> [Path(p).relative_to(folder).as_posix() for p in Glob(f"{folder}/a/**/*.png")]
    ['a/1.png', 'a/b/2.png']
    """

    def __init__(self, pattern, *, exclude=()):
        self.pattern = os.fspath(pattern)
        self.exclude = tuple(exclude)

    def __iter__(self):
        root, parts = _split_pattern(self.pattern)
        if not root.is_dir():
            return
        regex = re.compile(_pattern_regex(parts))
        for path in iter_images(root, recursive=True, exclude=self.exclude,
                                enter=functools.partial(_may_match, root, parts)):
            if regex.fullmatch(path.relative_to(root).as_posix()):
                yield os.fspath(path)

    def nothing_found(self):
        return f"no image files ({', '.join(IMAGE_EXTENSIONS)}) match {self.pattern}"

    def describe(self):
        root, parts = _split_pattern(self.pattern)
        return {"glob": os.path.join(os.path.abspath(root), *parts)}

    def excluding(self, *paths):
        return Glob(self.pattern, exclude=(*self.exclude, *paths))

    def __repr__(self):
        return f"Glob({self.pattern!r})"


class _Paths:
    """An iterable of paths given from Python, consumed once, in its order."""

    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        return (os.fspath(p) for p in self.paths)

    def nothing_found(self):
        return "the list of images is empty"

    def describe(self):
        return {"paths": "an iterable given from Python"}

    def excluding(self, *paths):
        return self


def _has_magic(part):
    return any(c in part for c in "*?[")


def _split_pattern(pattern):
    """``(root, parts)``: the folder before the first wildcard, and the parts after it."""
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not _has_magic(parts[fixed]):
        fixed += 1
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return root, list(parts[fixed:])


def _name_regex(part):
    """A glob name pattern as a regular expression matching one path component."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := part.find("]", i + 2)) > 0:
            body = part[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _pattern_regex(parts):
    """The regular expression of a file's path relative to the root, ``/``-separated."""
    if parts[-1] == "**":  # "a/**": every file below a
        parts = [*parts, "*"]
    pieces = []
    for k, part in enumerate(parts):
        if part == "**":
            pieces.append("(?:[^/]+/)*")
        else:
            pieces.append(_name_regex(part) + ("/" if k < len(parts) - 1 else ""))
    return "".join(pieces)


def _may_match(root, parts, folder):
    """Whether files below ``folder`` may match: prunes the walk of a glob."""
    rel = folder.relative_to(root).parts
    recursive = "**" in parts
    fixed = parts.index("**") if recursive else len(parts) - 1
    if not recursive and len(rel) > fixed:
        return False
    return all(re.fullmatch(_name_regex(p), n) for n, p in zip(rel[:fixed], parts))


def as_listing(inputs):
    """``inputs`` of :func:`score_files` as a listing object.

    A folder becomes an :class:`ImageFolder`; listing objects pass through; any
    other iterable (a list, a generator) is taken as the paths themselves.
    """
    if isinstance(inputs, (ImageFolder, FileList, Glob, _Paths)):
        return inputs
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            return ImageFolder(path)
        if path.is_file():
            raise ValueError(f"{path} is a file: for a list of paths, one a line, pass "
                             f"skad.scoring.FileList({os.fspath(path)!r})")
        raise ValueError(f"{path} is not a folder")
    try:
        iter(inputs)
    except TypeError:
        raise TypeError("inputs must be a folder, a FileList, a Glob or an iterable of image "
                        f"paths; got {type(inputs).__name__}") from None
    return _Paths(inputs)
