"""The detectors' docstrings, filled with the shared paragraphs of skad._docstrings."""

import re
from typing import ClassVar

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


def _one_level(layer):
    """``old_layer=k`` is ``layers=(k,)``."""
    return (layer,)


def test_renamed_parameters_entry_is_written_from_the_class():
    @fill_doc()
    class Detector:
        """A detector.

        Parameters
        ----------
        %(deprecated)s
        """

        _deprecated_parameters: ClassVar[dict] = {"lr": "learning_rate",
                                                  "old_layer": ("layers", _one_level)}

    assert "\n        lr, old_layer : deprecated\n            Deprecated in 0.2" in Detector.__doc__
    assert ("Deprecated in 0.2, removed in 0.3: the old names of ``learning_rate`` and "
            "``layers`` (``old_layer=k`` is ``layers=(k,)``), in this order; set the new names "
            "(an old one still works, with a FutureWarning).") in " ".join(Detector.__doc__.split())

    @fill_doc()
    class Single:
        """%(deprecated)s"""

        _deprecated_parameters: ClassVar[dict] = {"lr": "learning_rate"}

    assert Single.__doc__.startswith("lr : deprecated\n    Deprecated in 0.2, removed in 0.3: ")
    single = " ".join(Single.__doc__.split())
    assert "the old name of ``learning_rate``; set the new name (" in single


def test_renamed_entry_needs_renamed_parameters():
    with pytest.raises(KeyError, match="deprecated"):
        @fill_doc()
        class Detector:
            """%(deprecated)s"""


def test_every_detector_documents_its_old_names():
    for cls in DETECTORS:
        entry = next(line for line in cls.__doc__.split("\n") if line.endswith(": deprecated"))
        assert entry.strip().split(" : ")[0].split(", ") == list(cls._deprecated_parameters)


def test_unknown_names_are_refused():
    with pytest.raises(TypeError, match="colour"):
        fill_doc(colour="red")
    with pytest.raises(KeyError, match="no_such_paragraph"):
        @fill_doc()
        class Detector:
            """%(no_such_paragraph)s"""
