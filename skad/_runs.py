"""What makes a run the same run: its manifest, its lock, the rows it already wrote.

A run writes ``skad-run.json`` when it starts: the model's fingerprint, the inputs and
the settings that change rows. ``--resume`` checks them (:func:`check_manifest`) and
that the inputs still list the images already scored first (:func:`check_prefix`),
refusing in one line otherwise; :func:`lock_folder` keeps two runs from writing one
table.
"""

import json

from ._results import CSV_NAME, LOCK_NAME, MANIFEST_FORMAT, MANIFEST_NAME, replace_atomically
from ._tables import as_text

__all__ = ["check_manifest", "check_prefix", "lock_folder", "make_manifest",
           "write_manifest"]


def make_manifest(model_source, model_fingerprint, listing, settings):
    """The manifest of a run (JSON): what ``--resume`` checks the next run against.

    ``model_source`` says where the model came from (its file, or "a PatchCore given
    from Python"), for messages; ``model_fingerprint`` (:func:`skad._serialization.
    fingerprint`) is what is compared. ``settings`` are those that change rows.
    """
    from . import __version__

    return {"format": MANIFEST_FORMAT, "format_version": 1, "skad": __version__,
            "model": {"source": model_source, "fingerprint": model_fingerprint},
            "inputs": listing.describe(), "settings": settings}


def write_manifest(out, manifest):
    """``out/skad-run.json``, written whole or not at all."""
    text = json.dumps(manifest, indent=1) + "\n"
    replace_atomically(out / MANIFEST_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_manifest(out, manifest):
    """Refuse, in one line, to resume a run that is not this one."""
    path = out / MANIFEST_NAME
    if not (out / CSV_NAME).is_file():
        raise ValueError(f"nothing to resume in {out}: it holds no {CSV_NAME} (run without "
                         "--resume to start)")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"cannot resume {out}: it holds no run manifest ({MANIFEST_NAME}), so "
                         "what its run scored is unknown; pass --overwrite to start again") \
            from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot resume {out}: its {MANIFEST_NAME} is not readable JSON "
                         f"({exc})") from None
    if not isinstance(recorded, dict) or recorded.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"cannot resume {out}: {path} is not a skad run manifest")
    before, now = recorded.get("model", {}), manifest["model"]
    if before.get("fingerprint") != now["fingerprint"]:
        raise ValueError(
            f"cannot resume {out}: its run scored with another model ({before.get('source')}, "
            f"fingerprint {str(before.get('fingerprint'))[:12]}); this one is {now['source']} "
            f"({now['fingerprint'][:12]})")
    if recorded.get("inputs") != manifest["inputs"]:
        raise ValueError(f"cannot resume {out}: its run scored {_describe(recorded.get('inputs'))}"
                         f", not {_describe(manifest['inputs'])}")
    settings = recorded.get("settings", {})
    for name, value in manifest["settings"].items():
        if settings.get(name) != value:
            raise ValueError(f"cannot resume {out}: its run had {name}={settings.get(name)!r}, "
                             f"not {value!r}")


def lock_folder(out):
    """An advisory lock on ``out`` for the run, so that two runs never write one table
    (a ``--resume`` started while the interrupted run still goes on, say).

    Returns the open lock file (the lock is released when it is closed, or when the
    process ends, killed or not; the run removes the file at its end), or None where
    ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        return None
    fh = open(out / LOCK_NAME, "a")  # noqa: SIM115 (held for the run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ValueError(f"{out} is being written by another skad score run: wait for it to "
                         "end, or stop it, first") from None
    return fh


def _describe(inputs):
    if not isinstance(inputs, dict) or len(inputs) != 1:
        return repr(inputs)
    ((kind, value),) = inputs.items()
    return f"the {kind.replace('_', ' ')} {value}"


def check_prefix(listed, journal, out):
    """Consume the first ``journal.n_rows`` paths of ``listed``; each must be its row's."""
    recorded = (row[0] for row in journal.rows())
    for k, path in enumerate(recorded):
        now = next(listed, None)
        if now is None:
            raise ValueError(f"cannot resume {out}: the inputs now list {k} images, fewer than "
                             f"the {journal.n_rows} its run scored")
        if as_text(now) != path:
            raise ValueError(f"cannot resume {out}: row {k + 1} of its {CSV_NAME} is {path}, but "
                             f"the inputs now list {now} there: they changed since the run")
