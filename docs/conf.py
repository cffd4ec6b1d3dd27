"""Sphinx configuration of skad's documentation.

Build it from the repository root (``pip install -e ".[docs]"`` first)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import sys
from pathlib import Path

import skad

sys.path.insert(0, str(Path(__file__).parent))  # _gallery.py, named below by module name

project = "skad"
copyright = "2026, the skad developers"
author = "the skad developers"
version = release = skad.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# the API reference: one page per public name, from the numpydoc docstrings
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autodoc_typehints = "none"  # the docstrings' Parameters sections say the types
numpydoc_show_class_members = False  # the class pages list their methods themselves

# the markdown pages are the user guide; they stay readable on GitHub as they are
myst_heading_anchors = 3

# examples/ as a gallery. The build runs the examples that take well under a minute on
# two CPU cores and shows their output and figures; the others train networks for half a
# minute to several minutes and are shown as code (their pages say so). examples/benchmarks/ has no
# GALLERY_HEADER, so sphinx-gallery leaves its measurement scripts out.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"[\\/](quickstart|domain_cv)\.py$",
    # the examples save their figures with matplotlib's Figure, never pyplot: the build
    # picks up the PNG files they write
    "image_scrapers": ("_gallery.saved_figures",),
    "within_subsection_order": "_gallery.ExampleOrder",
    "download_all_examples": False,
    "abort_on_example_error": True,
    "show_memory": False,
}

html_theme = "pydata_sphinx_theme"
html_title = f"skad {release}"
