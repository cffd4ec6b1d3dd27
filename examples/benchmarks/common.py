"""What the benchmark scripts share: their data options, the categories, the JSON rows.

The scripts import it as a sibling (``from common import ...``): Python puts a script's
own folder first on ``sys.path``.
"""

import argparse
import json
import sys
from pathlib import Path

from skad.datasets import find_categories

#: the project's shared data beside the repository (MVTec layout, one folder per category)
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_parser(doc, *, categories=None, out_help="also write the rows as JSON", params=False):
    """An argument parser described by ``doc``'s first line, with the data options.

    ``--data`` (default :data:`DATA`), ``--categories`` (default ``categories``;
    None: every category found under ``--data``), ``--out`` (none where ``out_help``
    is None) and, with ``params``, ``--param NAME=VALUE``: a detector parameter
    over ``skad fit --offline``'s settings, repeatable.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--categories", nargs="+", default=categories,
                    help="default: " + (" ".join(categories) if categories
                                        else "every category under --data"))
    if out_help is not None:
        ap.add_argument("--out", default=None, help=out_help)
    if params:
        ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a detector parameter, as skad fit's --param (repeatable)")
    return ap


def comparison_parser(doc, *, categories, quick_help):
    """:func:`data_parser` with the options of the scripts comparing a method with PatchCore.

    ``--device``, ``--weights`` (tf_efficientnet_lite0's, for both), ``--quick``,
    ``--image-size``, ``--batch-size``, ``--eval-size`` (the metrics' map size),
    ``--seed``, ``--coreset-ratio`` (PatchCore's) and ``--verbose``.
    """
    ap = data_parser(doc, categories=categories, out_help="write the markdown tables here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="pretrained",
                    help="tf_efficientnet_lite0 weights of both methods: 'pretrained' "
                         "(offline package) or a checkpoint file")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's")
    ap.add_argument("--verbose", type=int, default=0)
    return ap


def data_categories(args, *, missing_ok=False):
    """``(root, categories)`` of the parsed arguments.

    Exits when ``--data`` is no folder: with an error, or, where ``missing_ok``
    (the scripts that skip cleanly without data), with status 0 and a line that
    says there is nothing to measure.
    """
    root = Path(args.data)
    if not root.is_dir():
        if missing_ok:
            print(f"no data folder at {root}: nothing to measure")
            sys.exit(0)
        sys.exit(f"no data at {root}")
    return root, args.categories or find_categories(root)


def write_rows(rows, out):
    """The rows as JSON in ``out``, when given."""
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
