"""Listing folders as their user means them: data only, never the debris around it.

Every folder skad lists (dataset categories, defect types, image folders of the
command line) goes through :func:`list_subfolders` or :func:`list_images`, so
that one rule decides what is data. Hidden entries (names starting with ".")
and the files and folders that notebooks, macOS, Windows and NAS boxes leave
beside data (``.ipynb_checkpoints``, ``__MACOSX``, AppleDouble ``._*`` files,
``Thumbs.db``, ``$RECYCLE.BIN``, ``@eaDir``, Office ``~$*`` temporaries, ...)
are never images, defect types or categories. What is skipped is logged on the
``skad._files`` logger (INFO), which ``skad --verbose`` shows.
"""

import logging
import os
import secrets
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "is_debris", "iter_images", "list_images", "list_subfolders",
           "write_atomic"]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")

# Names, compared case-insensitively, that operating systems, archivers and NAS boxes
# put beside data; hidden names (".DS_Store", "._*", ".ipynb_checkpoints", ".Trash-1000",
# ...) are caught by their leading dot.
_DEBRIS_NAMES = frozenset({
    "__macosx",                                      # macOS zip archives
    "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini",
    "$recycle.bin", "recycler", "system volume information",  # Windows
    "@eadir", "#recycle", "#snapshot",               # Synology
    "@recycle", "@recently-snapshot",                # QNAP
    "lost+found", "__pycache__",
})
# hidden names, and the lock files and temporaries of Office ("~$report.docx")
_DEBRIS_PREFIXES = (".", "~$")
# names shown per folder in a log line
_N_LOGGED = 10

logger = logging.getLogger(__name__)


def is_debris(name):
    """Whether a file or folder name is hidden or left by a tool, never data.

    Examples
    --------
    >>> [is_debris(n) for n in ("000.png", "._000.png", "__MACOSX", "Thumbs.db")]
    [False, True, True, True]
    """
    return name.startswith(_DEBRIS_PREFIXES) or name.lower() in _DEBRIS_NAMES


def _some(names):
    """``names`` joined for a log line, the first ``_N_LOGGED`` of them."""
    more = f", ... ({len(names) - _N_LOGGED} more)" if len(names) > _N_LOGGED else ""
    return ", ".join(names[:_N_LOGGED]) + more


def _count(n, one, many):
    """``"1 file"``, ``"2 files"``."""
    return f"{n} {one if n == 1 else many}"


def _entries(folder):
    """The entries of ``folder`` that may be data, sorted by name; the rest is logged."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    skipped = [e.name for e in entries if is_debris(e.name)]
    if skipped:
        logger.info("skipped %s in %s: %s", _count(len(skipped), "hidden or system entry",
                                                   "hidden or system entries"),
                    folder, _some(skipped))
    return [e for e in entries if not is_debris(e.name)]


def list_subfolders(folder):
    """Subfolders of ``folder`` that may hold data, sorted by name.

    Parameters
    ----------
    folder : str or path-like

    Returns
    -------
    list of Path

    Raises
    ------
    OSError
        If ``folder`` cannot be listed (missing, not a folder, no permission).
    """
    return [Path(e.path) for e in _entries(folder) if e.is_dir()]


def list_images(folder, *, recursive=False, exclude=()):
    """Image files in ``folder``, sorted by path, hidden entries and debris left out.

    Parameters
    ----------
    folder : str or path-like
    recursive : bool, default=False
        Also list the subfolders, depth first; hidden and system folders, and
        symbolic links to folders (which may loop), are not entered.
    exclude : sequence of path-like, default=()
        Files or folders to leave out wherever they are below ``folder`` (the
        command line's own output folder and model file).

    Returns
    -------
    list of Path
        Files whose extension (any case) is one of ``IMAGE_EXTENSIONS``. Other
        files are left out and logged.

    Raises
    ------
    OSError
        If ``folder`` or a subfolder to enter cannot be listed.

    See Also
    --------
    iter_images : The same files one at a time, for folders too large to hold as a list.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.png", "a.JPG", "._a.JPG", "notes.txt"):
    ...     (folder / name).touch()
    >>> [p.name for p in list_images(folder)]
    ['a.JPG', 'b.png']
    """
    return list(iter_images(folder, recursive=recursive, exclude=exclude))


def iter_images(folder, *, recursive=False, exclude=(), enter=None):
    """The files of :func:`list_images`, in its order, yielded as they are found.

    Each folder's entries are read and sorted when the walk reaches it, so
    that memory holds the entries of the folders on the current path (at most
    the largest folder's names), never the whole tree; the order is
    deterministic, depth first with each folder's entries by name.

    Parameters
    ----------
    folder : str or path-like
    recursive : bool, default=False
        As :func:`list_images`.
    exclude : sequence of path-like, default=()
        As :func:`list_images`.
    enter : callable, optional
        ``enter(subfolder) -> bool``: whether to walk into a subfolder (a
        ``Path``); by default every one that may hold data. Globs prune with it.

    Yields
    ------
    Path

    Raises
    ------
    OSError
        If ``folder`` or a subfolder to enter cannot be listed (when the walk
        reaches it).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.png", "a/c.png", "a/b.png"):
    ...     (folder / name).parent.mkdir(exist_ok=True)
    ...     (folder / name).touch()
    >>> [p.relative_to(folder).as_posix() for p in iter_images(folder, recursive=True)]
    ['a/b.png', 'a/c.png', 'b.png']
    """
    excluded = {Path(p).resolve() for p in exclude}
    # a path is resolved (a system call per component) only when its name is that of an
    # excluded path, as given or resolved
    names = {p.name for p in excluded} | {Path(p).name for p in exclude}
    yield from _walk(Path(folder), recursive, excluded, names, enter)


def _walk(folder, recursive, excluded, names, enter):
    others = []
    for entry in _entries(folder):
        path = Path(entry.path)
        if entry.name in names and path.resolve() in excluded:
            logger.info("left out %s", path)
        elif entry.is_dir():
            if recursive and entry.is_symlink():
                logger.info("did not enter %s: a symbolic link to a folder", path)
            elif recursive and (enter is None or enter(path)):
                yield from _walk(path, recursive, excluded, names, enter)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            yield path
        else:
            others.append(entry.name)
    if others:
        logger.info("ignored %s in %s that %s not images (%s): %s",
                    _count(len(others), "file", "files"), folder,
                    "is" if len(others) == 1 else "are", " ".join(IMAGE_EXTENSIONS),
                    _some(others))


def write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` whole or not at all; return ``path`` as a Path.

    The bytes go to a hidden temporary file beside ``path`` (a name no listing
    takes for data), which replaces ``path`` once complete: an interrupted write
    leaves no partial file, and an existing file is replaced only by a complete
    one. The file gets the user's umask, as any file Python creates (tempfile's
    are private, mode 0600). Missing folders of ``path`` are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
