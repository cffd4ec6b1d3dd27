"""scores.csv and scores.parquet, appended a chunk at a time; the journal a resume reads.

``scores.csv`` is the run's journal: its complete rows say what is done.
:class:`Table` appends to it (and to the Parquet copy); :class:`Journal` reads an
interrupted run's complete rows back. :class:`Results` adds rows one image at a time
(``skad demo``).
"""

import csv
import logging
from itertools import islice
from pathlib import Path

from ._results import COLUMNS, CSV_NAME, PARQUET_NAME, Renderer

__all__ = ["Journal", "Results", "Table", "as_text", "require_pyarrow"]

logger = logging.getLogger("skad.scoring")

# rows of a Parquet row group: a few MB of strings held before they are written
_ROW_GROUP = 10_000


def as_text(value):
    """``value`` as valid UTF-8 text, as scores.csv stores it (surrogates escaped)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class Table:
    """``scores.csv``, and ``scores.parquet`` with ``parquet``, appended a chunk at a time.

    ``scores.csv`` is flushed after every chunk: it is the journal that
    :func:`score_files` resumes from. The Parquet file gets a row group every
    ``_ROW_GROUP`` rows and its footer when closed; a run killed before that
    leaves it unreadable, and a resume writes it again from ``scores.csv``.
    """

    def __init__(self, out, *, parquet=False, journal=None):
        self.csv_path = Path(out) / CSV_NAME
        self.parquet_path = Path(out) / PARQUET_NAME if parquet else None
        self.n_scored = self.n_rejected = self.n_failed = 0
        # a file name that is not valid Unicode is written with backslash escapes,
        # keeping the table valid UTF-8
        self._fh = open(  # noqa: SIM115 (open for the run, closed by close())
            self.csv_path, "a" if journal else "w", newline="", encoding="utf-8",
            errors="backslashreplace")
        # "\n" rows: csv's default "\r\n" shows as ^M in Unix tools
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._parquet = _ParquetTable(self.parquet_path) if parquet else None
        if journal is None:
            self._csv.writerow(COLUMNS)
            self._fh.flush()
        else:
            self.n_scored, self.n_rejected, self.n_failed = journal.counts
            if self._parquet is not None:  # its rows again, from the journal
                for row in journal.rows():
                    self._parquet.add(row)

    @property
    def n_rows(self):
        return self.n_scored + self.n_failed

    def write(self, paths, rows):
        """One chunk: ``paths`` and their rows (every column but ``path``)."""
        for path, row in zip(paths, rows):
            self._csv.writerow((path, *row))
            if row[-1]:
                self.n_failed += 1
            else:
                self.n_scored += 1
                self.n_rejected += row[2] == "1"
            if self._parquet is not None:
                self._parquet.add((as_text(path), *row))
        self._fh.flush()

    def close(self):
        self._fh.close()
        if self._parquet is not None:
            self._parquet.close()


_PARQUET_TYPES = {"path": "string", "score": "float64", "p_value": "float64",
                  "predicted_label": "int8", "threshold": "float64", "n_regions": "int32",
                  "largest_region_area": "int64", "map": "string", "raw_map": "string",
                  "error": "string"}


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError('the parquet format needs pyarrow: pip install "skad[parquet]"') \
            from None


class _ParquetTable:
    """Rows of scores.csv (text) as typed columns, a row group at a time.

    The values are those of ``scores.csv`` (scores with 6 significant digits),
    so that the two files agree; an empty cell is null.
    """

    def __init__(self, path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.schema = pa.schema([(c, getattr(pa, t)()) for c, t in _PARQUET_TYPES.items()])
        self._writer = pq.ParquetWriter(path, self.schema)
        self._rows = []

    def add(self, row):
        self._rows.append(row)
        if len(self._rows) >= _ROW_GROUP:
            self.flush()

    def flush(self):
        if not self._rows:
            return
        import pyarrow.compute as pc

        pa = self._pa
        columns = []
        for values, field in zip(zip(*self._rows), self.schema):
            text = pa.array(values, pa.string())
            if field.name != "path":  # an empty cell is null; the rest parses as its type
                text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
            columns.append(text.cast(field.type))
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self._rows = []

    def close(self):
        self.flush()
        self._writer.close()


class Journal:
    """The complete rows of an interrupted run's ``scores.csv``.

    A run killed while writing may leave a last row cut short (no line end, or a
    quoted field left open): it is not counted, and :meth:`truncate` removes
    it, so that its image is scored again. A malformed row before the end is an
    error: the table is not one this code wrote, and nothing is guessed.
    """

    def __init__(self, csv_path):
        self.path = Path(csv_path)
        self.n_rows = 0
        self.end = 0  # bytes of the header and the complete rows
        n_scored = n_rejected = n_failed = 0
        with open(self.path, "rb") as fh:
            reader = csv.reader(self._lines(fh), strict=True)
            try:
                header = next(reader, None)
                if header is None or tuple(header) != tuple(COLUMNS):
                    raise ValueError(f"cannot resume: {self.path} is not a scores.csv that "
                                     "this version of skad writes (its header differs)")
                self.end = self._consumed
                for row in reader:
                    if len(row) != len(COLUMNS):
                        raise ValueError(f"cannot resume: row {self.n_rows + 1} of {self.path}"
                                         f" has {len(row)} fields, not {len(COLUMNS)}")
                    self.n_rows += 1
                    self.end = self._consumed
                    if row[-1]:
                        n_failed += 1
                    else:
                        n_scored += 1
                        n_rejected += row[3] == "1"
            except csv.Error:
                if fh.read(1):  # an open quote before the last line: not a cut-short end
                    raise ValueError(f"cannot resume: {self.path} is malformed after row "
                                     f"{self.n_rows}") from None
        self.counts = (n_scored, n_rejected, n_failed)
        self.size = self.path.stat().st_size

    def _lines(self, fh):
        """The file's complete lines as text; ``_consumed`` counts their bytes."""
        self._consumed = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # a line cut short: only the last line can be
            self._consumed += len(raw)
            yield raw.decode("utf-8", "backslashreplace")

    def truncate(self):
        """Drop what follows the complete rows (a row cut short by the interruption)."""
        if self.size > self.end:
            logger.info("dropped the last row of %s, cut short when the run was interrupted "
                        "(%d bytes)", self.path, self.size - self.end)
            with open(self.path, "r+b") as fh:
                fh.truncate(self.end)
            self.size = self.end

    def rows(self):
        """The complete rows, read again one at a time (all columns)."""
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader)
            yield from islice(reader, self.n_rows)


class Results:
    """``scores.csv`` and one overlay PNG per image under ``out``, added one at a time.

    For results computed elsewhere (``skad demo`` scores its test images in
    one call); :func:`score_files` is the way to score files. Each row is
    flushed when written. Columns: :data:`COLUMNS`; an image that could not
    be scored has its ``path`` and ``error`` only.

    Parameters
    ----------
    out : str or path-like
        A folder made ready by :func:`prepare_output`.
    det : BaseDetector
        The detector that scored (its thresholds and reference scores).
    min_area : int, default=1
    save_maps : {"npy", "tiff"}, optional
    """

    def __init__(self, out, det, *, min_area=1, save_maps=None):
        self._renderer = Renderer(det, out, min_area=min_area, save_maps=save_maps)
        self._table = Table(out)
        self.csv_path = self._table.csv_path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._table.close()

    n_scored = property(lambda self: self._table.n_scored)
    n_above = property(lambda self: self._table.n_rejected)
    n_failed = property(lambda self: self._table.n_failed)

    def add(self, path, score, amap, image):
        """One scored image: its overlay (and raw map), then its row."""
        row = self._renderer.row(self._table.n_rows, path, score, amap, image)
        self._table.write([path], [row])

    def add_error(self, path, message):
        """One image that could not be scored."""
        self._table.write([path], [Renderer.error_row(message)])
