"""Progress bars (skad._progress) and the skad loggers."""

import logging
import re
import subprocess
import sys

import pytest
import torch
import tqdm.std

from skad import PatchCore
from skad._files import list_images
from skad._progress import ProgressAwareHandler, close_bars, progress
from skad._training import train
from skad.datasets import make_textures

TINY = {"backbone": "test_resnet", "weights": None, "image_size": 32, "random_state": 0}


class _Stream:
    """A stderr stand-in that says whether it is a terminal and keeps what is written."""

    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def _screen(text):
    """The lines a terminal shows after ``text``: carriage return, newline and cursor up."""
    rows, r, c = [[]], 0, 0
    for token in re.findall(r"\x1b\[A|.|\n", text, flags=re.DOTALL):
        if token == "\x1b[A":
            r = max(r - 1, 0)
        elif token == "\r":
            c = 0
        elif token == "\n":
            r, c = r + 1, 0
        else:
            rows.extend([] for _ in range(r + 1 - len(rows)))
            rows[r].extend(" " * (c + 1 - len(rows[r])))
            rows[r][c], c = token, c + 1
    return [line for line in ("".join(row).rstrip() for row in rows) if line]


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, moved on by the test (``clock.now += seconds``)."""

    class Clock:
        now = 1000.0

    monkeypatch.setattr(tqdm.std, "time", lambda: Clock.now)
    return Clock


def _stderr(monkeypatch, tty):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_bar_only_with_verbose(capsys):
    assert list(progress(range(5), desc="scoring", verbose=0)) == list(range(5))
    assert capsys.readouterr().err == ""
    assert list(progress(range(5), desc="scoring", verbose=1, unit="batch")) == list(range(5))
    err = capsys.readouterr().err
    assert "scoring: 100% 5/5 [" in err and "batch/s" in err


def test_a_log_gets_plain_lines_with_rate_and_time_left(monkeypatch, clock):
    """Redirected to a file, each update is a whole line (no carriage return, no bar
    graphics), one every 10 s at most, and the last step."""
    stream = _stderr(monkeypatch, tty=False)
    for _ in progress(range(20), desc="scoring", verbose=1, unit="batch"):
        clock.now += 3  # each step takes 3 s: 60 s in all
    lines = stream.text.splitlines()
    assert "\r" not in stream.text and "\x1b" not in stream.text and "|" not in stream.text
    assert stream.text.endswith("\n")
    assert lines[0].startswith("scoring:   0% 0/20")
    assert lines[-1].startswith("scoring: 100% 20/20 [01:00<00:00")
    assert 4 <= len(lines) <= 9  # the start, one every 10 s (at most 6), the last
    assert "s/batch" in lines[-1] and any("<00:" in line for line in lines[1:-1])


def test_a_terminal_gets_one_bar_redrawn_in_place(monkeypatch, clock):
    stream = _stderr(monkeypatch, tty=True)
    for _ in progress(range(20), desc="scoring", verbose=1):
        clock.now += 3
    assert stream.text.count("\r") > 2
    screen = _screen(stream.text)
    assert len(screen) == 1 and "scoring: 100%|" in screen[0] and "20/20" in screen[0]


@pytest.mark.parametrize("tty", [True, False])
def test_nested_bars_leave_the_outer_one(monkeypatch, tty):
    """A bar opened inside another's loop (the command line's run over chunks around
    a detector's batches) is erased when done on a terminal; in a log every update is
    a whole line of its own bar."""
    stream = _stderr(monkeypatch, tty)
    for _ in progress(range(3), desc="outer", verbose=1):
        for _ in progress(range(4), desc="inner", verbose=1, interval=0):
            pass
    if tty:
        screen = _screen(stream.text)
        assert len(screen) == 1 and screen[0].startswith("outer: 100%|") and "3/3" in screen[0]
    else:
        lines = stream.text.splitlines()
        assert "\r" not in stream.text and "\x1b" not in stream.text
        assert all(re.match(r"(outer|inner): +\d+% \d/\d \[", line) for line in lines)
        assert sum(line.startswith("inner: 100% 4/4") for line in lines) == 3
        assert lines[-1].startswith("outer: 100% 3/3")


def test_log_records_are_written_above_an_open_bar(monkeypatch):
    stream = _stderr(monkeypatch, tty=True)
    logger = logging.getLogger("skad.test_progress")
    handler = ProgressAwareHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        for i in progress(range(3), desc="scoring", verbose=1, interval=0):
            logger.warning("image %d is odd", i)
    finally:
        logger.removeHandler(handler)
    screen = _screen(stream.text)
    assert screen[:3] == ["image 0 is odd", "image 1 is odd", "image 2 is odd"]
    assert len(screen) == 4 and screen[3].startswith("scoring: 100%|")


def test_close_bars_ends_a_bar_that_an_error_left_open(monkeypatch):
    """The command line's error message on a line of its own, not after the bar."""
    stream = _stderr(monkeypatch, tty=True)
    bar = progress(range(5), desc="scoring", verbose=1, interval=0)
    next(bar), next(bar)  # one step done, then an error; the generator is still alive
    close_bars()
    sys.stderr.write("skad: error: disk full\n")
    assert _screen(stream.text)[-1] == "skad: error: disk full"
    assert "1/5" in _screen(stream.text)[0]
    list(bar)  # the generator's own close afterwards writes nothing more
    assert _screen(stream.text)[-1] == "skad: error: disk full"


def test_training_shows_the_loss_beside_the_bar_and_logs_it(capsys, caplog):
    module = torch.nn.Linear(2, 1)
    data = torch.ones(4, 2)

    def step(batch):
        return (module(batch) ** 2).mean()

    with caplog.at_level(logging.DEBUG, logger="skad"):
        history = train(module, step, n_epochs=3, batches=lambda epoch: [data],
                        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                        device=torch.device("cpu"), verbose=1, desc="tiny")
    err = capsys.readouterr().err
    assert "tiny: 100% 3/3 [" in err and f"epoch/s, loss {history[-1]:.4f}]" in err
    records = [r for r in caplog.records if r.name == "skad._training"]
    assert [r.getMessage() for r in records] == [
        f"tiny: epoch {k + 1}/3, loss {loss:.4f}" for k, loss in enumerate(history)]
    assert all(r.levelno == logging.DEBUG for r in records)


def _texture_paths(folder, n):
    from PIL import Image

    data = make_textures(n_domains=1, n_normal=n, n_anomalous=0, image_size=32, random_state=0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(data.images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_the_library_writes_nothing_to_stderr_by_default(tmp_path, capfd, caplog):
    """Without verbose no bar, and records (what a listing skipped) reach only the
    handlers an application set: here pytest's, never stderr."""
    folder = _texture_paths(tmp_path / "good", n=6)
    (folder / "Thumbs.db").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="skad"):
        paths = [str(p) for p in list_images(folder)]
        det = PatchCore(**TINY).fit(paths)
        det.score_and_map(paths)
    assert capfd.readouterr().err == ""
    assert caplog.records and all(r.name.startswith("skad.") for r in caplog.records)
    assert any("Thumbs.db" in r.getMessage() for r in caplog.records)


def test_a_verbose_detector_shows_its_bars(tmp_path, capsys):
    paths = [str(p) for p in list_images(_texture_paths(tmp_path / "good", n=6))]
    det = PatchCore(**TINY, verbose=1, batch_size=2).fit(paths)
    err = capsys.readouterr().err
    assert "3/3 [" in err and "coreset" in err
    det.decision_function(paths)
    assert "scoring: 100% 3/3 [" in capsys.readouterr().err


def test_the_skad_logger_has_a_null_handler_and_nothing_else():
    """Checked in a fresh interpreter: importing skad configures no logging."""
    code = ("import logging, skad, skad.cli, skad._files, skad._progress, skad.base\n"
            "skad.PatchCore\n"
            "names = [n for n in logging.root.manager.loggerDict if n.startswith('skad')]\n"
            "handlers = {n: logging.getLogger(n).handlers for n in ['skad', *names]}\n"
            "print(logging.root.handlers, {n: [type(h).__name__ for h in hs]\n"
            "                              for n, hs in handlers.items() if hs})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[] {'skad': ['NullHandler']}"
    assert out.stderr == ""


def test_library_records_stay_quiet_without_a_handler():
    """With a NullHandler on "skad", Python's last-resort handler (stderr) is not used."""
    code = ("import logging, skad\n"
            "logging.getLogger('skad._files').warning('not on stderr')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stderr == ""
