"""Progress lines on stderr for long work, written only when ``verbose``.

Feature extraction, scoring, the coreset and training epochs all report
through :func:`progress`, so that every line has one form,
``desc: k/total [elapsed]``, and one policy for terminals and log files.
"""

import sys
import time

__all__ = ["progress"]

# seconds between progress lines: a terminal's line is rewritten in place often, while
# a log file (stderr redirected) gets a new line rarely enough to stay readable
_TTY_INTERVAL = 0.5
_LOG_INTERVAL = 10.0


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress(iterable, *, total=None, desc="", verbose=0, unit="", status=None, interval=None):
    """Iterate, writing ``desc: {unit}k/total [elapsed]`` to stderr when ``verbose``.

    On a terminal the line is rewritten in place (carriage return) at most
    twice a second; otherwise (stderr redirected to a file or a pipe) each
    update is a line of its own, at most one every 10 s, so that a log holds
    readable lines. The last step is always written, ending the line.

    Parameters
    ----------
    iterable : iterable
    total : int, optional
        Number of steps; ``len(iterable)`` by default. An iterable without a
        length (a generator) has no total: the line then says ``desc: k``, and
        is ended when the iteration ends.
    desc : str
    verbose : int
        Nothing is written when 0.
    unit : str, default=""
        Written before the count (``"epoch "``).
    status : callable, optional
        ``status() -> str``, called once a step is done, appended to the line
        (the loss of the epoch, say).
    interval : float, optional
        Seconds between lines instead of the defaults above; 0 writes every step.
    """
    if not verbose:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = sys.stderr
    tty = _is_terminal(stream)
    if interval is None:
        interval = _TTY_INTERVAL if tty else _LOG_INTERVAL
    t0 = last = time.perf_counter()
    k = written = 0
    for k, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if k == total or interval == 0 or now - last > interval:
            last, written = now, k
            _write(stream, tty, desc, unit, k, total, status, now - t0, end=k == total)
    if total is None and k:  # the last step of a length unknown until now
        if written != k:
            _write(stream, tty, desc, unit, k, total, status, time.perf_counter() - t0,
                   end=True)
        elif tty:
            stream.write("\n")


def _write(stream, tty, desc, unit, k, total, status, elapsed, *, end):
    """One progress line: rewritten in place on a terminal (``end`` ends it), else a line."""
    extra = f" {status()}" if status is not None else ""
    count = f"{k}/{total}" if total is not None else f"{k}"
    text = f"{desc}: {unit}{count}{extra} [{elapsed:.1f}s]"
    if tty:
        stream.write(f"\r{text}" + ("\n" if end else ""))
    else:
        stream.write(text + "\n")
    stream.flush()
