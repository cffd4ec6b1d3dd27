"""The detectors' docstrings, filled with the shared paragraphs of skad._docstrings."""

import re

import pytest

from skad import MMR, GeneralAD, GlobalLocal, MetaComparer, PatchCore
from skad._docstrings import fill_doc

DETECTORS = [PatchCore, MetaComparer, GeneralAD, MMR, GlobalLocal]


def _section(doc, title):
    """The lines of a numpydoc section of a class docstring."""
    lines = doc.split("\n")
    start = lines.index(f"    {title}") + 2
    end = next((i for i in range(start, len(lines))
                if re.fullmatch(r"    -+", lines[i])), len(lines)) - 1
    return lines[start:end]


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_every_parameter_and_shared_attribute_is_documented(cls):
    doc = cls.__doc__
    assert "%(" not in doc

    def names(section):
        return {name.strip() for line in _section(doc, section)
                if re.match(r"    \w", line) for name in line.split(" : ")[0].split(",")}

    assert set(cls._get_param_names()) <= names("Parameters")
    assert {"reference_scores_", "threshold_", "false_reject_rate_", "reference_map_maxima_",
            "pixel_threshold_", "n_samples_fit_"} <= names("Attributes")


def test_shared_paragraphs_are_filled_at_their_indentation():
    @fill_doc(progress="the coreset")
    class Detector:
        """A detector.

        Parameters
        ----------
        %(verbose)s
        """

    assert ("\n        verbose : int, default=0\n            When > 0, progress bars on stderr "
            "(count, rate, time left) for feature\n            extraction, the coreset and "
            "scoring.\n") in Detector.__doc__


def test_unknown_names_are_refused():
    with pytest.raises(TypeError, match="colour"):
        fill_doc(colour="red")
    with pytest.raises(KeyError, match="no_such_paragraph"):
        @fill_doc()
        class Detector:
            """%(no_such_paragraph)s"""
