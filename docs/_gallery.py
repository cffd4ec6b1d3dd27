"""The gallery's image scraper: figures the examples save as PNG files.

skad's examples draw with :func:`skad.viz.plot_maps`, a matplotlib ``Figure`` built
without pyplot (so nothing is left open), and save it to a file; sphinx-gallery's
matplotlib scraper only sees pyplot's open figures. This scraper takes the
``*_maps.png`` files that a code block wrote, in the example's folder (where
sphinx-gallery runs it) or the temporary folder, and puts them on the example's page.
"""

import shutil
import tempfile
import time
from pathlib import Path

from sphinx_gallery.scrapers import figure_rst

_last_scan = time.time()  # files written before the build are not the examples'


def saved_figures(block, block_vars, gallery_conf):
    """Move (or copy, from the temporary folder) the figures a code block saved.

    Parameters
    ----------
    block : tuple
        The code block, as sphinx-gallery passes it.
    block_vars : dict
        The example's state; ``image_path_iterator`` gives the figures' paths.
    gallery_conf : dict
        The gallery's configuration.

    Returns
    -------
    str
        The reStructuredText that shows the figures.
    """
    global _last_scan
    since, _last_scan = _last_scan, time.time()
    folders = [Path(block_vars["src_file"]).parent, Path(tempfile.gettempdir())]
    saved = sorted(path for folder in folders for path in folder.glob("*_maps.png")
                   if path.stat().st_mtime >= since)
    names = []
    for path, target in zip(saved, block_vars["image_path_iterator"]):
        # the example's own folder is the source tree: leave nothing behind there
        (shutil.move if path.parent == folders[0] else shutil.copyfile)(path, target)
        names.append(target)
    return figure_rst(names, gallery_conf["src_dir"])


class ExampleOrder:
    """The gallery's order: the quickstart first, then domains, then one method each.

    Parameters
    ----------
    src_dir : str or path-like
        The examples' folder (sphinx-gallery passes it; the order needs only the
        file names).
    """

    ORDER = ("quickstart.py", "domain_cv.py", "domain_generalization.py",
             "general_ad_example.py", "mmr_example.py", "global_local_example.py")

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        """The sort key of ``filename``: its place in :attr:`ORDER`, others after."""
        name = Path(filename).name
        return (self.ORDER.index(name) if name in self.ORDER else len(self.ORDER), name)
