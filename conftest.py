"""pytest set-up shared by the tests and the docstrings' examples."""

import pytest


def pytest_collection_modifyitems(items):
    # the docstrings' examples are what users copy: too few references for the
    # false-reject rate asked for, or a renamed parameter, fails them. A trained
    # detector's fit says its training images promise no rate; its examples then
    # set held-out references, as users should (the marker added last wins)
    for item in items:
        if isinstance(item, pytest.DoctestItem):
            item.add_marker(pytest.mark.filterwarnings(
                "error::skad.thresholds.CalibrationWarning"))
            item.add_marker(pytest.mark.filterwarnings(
                "ignore:.*calibrated on the training images:"
                "skad.thresholds.CalibrationWarning"))
            item.add_marker(pytest.mark.filterwarnings("error::FutureWarning"))
