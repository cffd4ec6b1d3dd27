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
        Number of steps; ``len(iterable)`` by default.
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
    total = len(iterable) if total is None else total
    stream = sys.stderr
    tty = _is_terminal(stream)
    if interval is None:
        interval = _TTY_INTERVAL if tty else _LOG_INTERVAL
    t0 = last = time.perf_counter()
    for k, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if k == total or interval == 0 or now - last > interval:
            last = now
            extra = f" {status()}" if status is not None else ""
            text = f"{desc}: {unit}{k}/{total}{extra} [{now - t0:.1f}s]"
            if tty:
                stream.write(f"\r{text}" + ("\n" if k == total else ""))
            else:
                stream.write(text + "\n")
            stream.flush()
