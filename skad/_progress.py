"""Progress bars for long work, shown only when ``verbose``.

Feature extraction, scoring, the coreset and training epochs all report
through :func:`progress`: a `tqdm <https://tqdm.github.io>`_ bar on stderr
with the count, the rate and the time left, and one policy for terminals
and log files:

- On a terminal the bar is redrawn in place. A bar opened while another is
  open (a command's run over chunks around a detector's batches, say) is
  drawn below it and erased when done (tqdm's ``leave=None``), so that only
  the outermost bars stay on the screen.
- When stderr is a file or a pipe, tqdm's carriage-return redraws would pile
  up on one endless line; there each update is a plain line of its own,
  without the bar's graphics, at most one every 10 s, and the last one, so
  that a log stays readable.

Messages are not progress: they go to the ``skad`` logger (:mod:`logging`).
An application that shows both on one terminal writes its records with
:class:`ProgressAwareHandler`, so that they do not land inside a bar.
"""

import logging
import re
import sys

from tqdm import tqdm

__all__ = ["ProgressAwareHandler", "close_bars", "progress"]

# seconds between updates: a terminal's bar is redrawn often, while a log file
# (stderr redirected) gets a line rarely enough to stay readable
_TTY_INTERVAL = 0.5
_LOG_INTERVAL = 10.0
# a log line: tqdm's numbers without the bar's graphics, which mean nothing in a file
_LOG_FORMAT = ("{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
# the same without a total (a lazy listing): no percentage nor time left to show
_LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"

# the bars of progress() now open, outermost first (close_bars ends them)
_open_bars = []


def _is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


class _Lines:
    """A stream for tqdm that turns its redraws into plain lines.

    tqdm starts each redraw with a carriage return and clears a bar with
    spaces; here every non-blank redraw is one line, unless it shows the
    count of the line before (the redraw when the bar closes, say, which
    differs only in its times).
    """

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text):
        for part in re.split(r"[\r\n]", text):
            line = part.rstrip()
            count = line.rsplit(" [", 1)[0]  # desc, percentage and count; not the times
            if line and count != self.last:
                self.stream.write(line + "\n")
                self.last = count

    def flush(self):
        self.stream.flush()


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:  # a generator: the bar shows a count without a total
        return None


def _open_bar(total, desc, unit, interval):
    """A tqdm bar on the current ``sys.stderr``, drawn as a terminal or a log wants it."""
    stream = sys.stderr
    tty = _is_terminal(stream)
    if interval is None:
        interval = _TTY_INTERVAL if tty else _LOG_INTERVAL
    if tty:
        # position None: tqdm puts a nested bar below the open ones; leave None: it
        # erases the bar when done unless it is the top one
        options = {"file": stream, "leave": None}
    else:
        # position 0: no cursor movements (nested bars are lines like the others)
        options = {"file": _Lines(stream), "leave": True, "position": 0,
                   "bar_format": _LOG_FORMAT if total is not None else _LOG_FORMAT_NO_TOTAL,
                   "ascii": True}
    bar = tqdm(total=total, desc=desc, unit=unit, mininterval=interval,
               maxinterval=max(interval, 10.0), **options)
    _open_bars.append(bar)
    return bar


def _close(bar):
    bar.close()  # a second close (close_bars, then the generator's end) does nothing
    # by identity: tqdm compares bars by their position
    _open_bars[:] = [b for b in _open_bars if b is not bar]


def close_bars():
    """Close the open bars of :func:`progress`, innermost first.

    For a message that must not be written into a half-drawn bar, such as an
    error that stopped the work: a bar stays open until its loop's generator
    is collected, which the error's traceback delays.
    """
    while _open_bars:
        _close(_open_bars[-1])


def progress(iterable, *, total=None, desc="", verbose=0, unit="it", status=None, interval=None):
    """Iterate over ``iterable``, with a progress bar on stderr when ``verbose``.

    The bar shows ``desc``, the steps done of ``total``, the time spent and
    left, and the rate; see the module's notes for terminals and log files.
    A step counts once the caller asks for the next item (its work is done).

    Parameters
    ----------
    iterable : iterable
    total : int, optional
        Number of steps; ``len(iterable)`` by default.
    desc : str
        What is being done (``"scoring"``).
    verbose : int
        Nothing is written when 0.
    unit : str, default="it"
        What a step is (``"batch"``, ``"epoch"``), in the rate.
    status : callable, optional
        ``status() -> str``, called once a step is done, shown after the
        numbers (the loss of the epoch, say).
    interval : float, optional
        Least seconds between updates instead of the defaults (0.5 on a
        terminal, 10 in a log); 0 shows every step.

    Yields
    ------
    object
        The items of ``iterable``.
    """
    if not verbose:
        yield from iterable
        return
    bar = _open_bar(_length(iterable) if total is None else total, desc, unit, interval)
    try:
        for item in iterable:
            yield item
            if status is not None:
                bar.set_postfix_str(status(), refresh=False)
            bar.update()
    finally:
        _close(bar)


class ProgressAwareHandler(logging.StreamHandler):
    """A logging handler that writes each record above the open progress bars.

    Written plainly, a record on a terminal would be appended to the line of
    a bar and overwritten by its next redraw; :func:`tqdm.tqdm.write` clears
    the bars on the same stream, writes the record and redraws them. Log
    lines (stderr redirected) are left alone: they are whole lines already.
    """

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 -- logging's rule: a record never raises
            self.handleError(record)
